//! Whole-file reads with a size cap, for every file tandem reads into memory at once (texts,
//! JSON and TOML configs, chat templates, importance matrices).
//!
//! `std::fs::read_to_string` reads until the end of the file, and a path to a device or a
//! symlink into one has none: `--text /dev/zero` took 20 GB in ten seconds, and a model folder
//! whose config.json links to it would do the same. Each reader here stops one byte past its
//! cap and says what it read, and a device (`/dev/zero`, a disk) is refused before anything is
//! read: reading one up to the cap took a second and a GiB of memory for nothing. Pipes,
//! process substitution (`--text <(zcat …)`) and a terminal on standard input still work: only
//! their size is checked. The errors are `std::io::Error`s, so every caller's existing
//! error mapping (which names the file) applies unchanged.

use std::io::Read;
use std::path::Path;

/// Caps by what a file holds: a JSON or TOML config, a tokenizer or chat template.
pub const CONFIG_CAP: u64 = 64 << 20;
/// tokenizer.json (the largest vocabularies' files are tens of MB).
pub const TOKENIZER_CAP: u64 = 512 << 20;
/// A text to evaluate or calibrate on, a prompts file (wikitext-2's test set is 1.3 MB).
pub const TEXT_CAP: u64 = 1 << 30;
/// An importance matrix (llama-imatrix's files for 70B models are hundreds of MB).
pub const IMATRIX_CAP: u64 = 4 << 30;

/// The whole of `path` as bytes, refusing more than `cap`.
pub fn read_capped(path: &Path, cap: u64) -> std::io::Result<Vec<u8>> {
    let file = std::fs::File::open(path)?;
    refuse_devices(&file)?;
    let too_big = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "larger than {} MiB, the most tandem reads of such a file",
                cap >> 20
            ),
        )
    };
    // A regular file says its size up front; a device or pipe is read up to the cap.
    let declared = file
        .metadata()
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len());
    if declared.is_some_and(|n| n > cap) {
        return Err(too_big());
    }
    let mut bytes = Vec::with_capacity(declared.unwrap_or(0) as usize);
    file.take(cap.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(too_big());
    }
    Ok(bytes)
}

/// A device is no file to read whole: a block device (a disk) or a character device other
/// than a terminal (`/dev/zero`, `/dev/urandom`, `/dev/null`) is an error. A terminal stays
/// readable (`--prompts /dev/stdin` typed in by hand), as do pipes and regular files.
fn refuse_devices(file: &std::fs::File) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::io::IsTerminal;
        use std::os::unix::fs::FileTypeExt;
        let kind = file.metadata()?.file_type();
        if kind.is_block_device() || (kind.is_char_device() && !file.is_terminal()) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "is a device, not a file or a pipe",
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = file;
    Ok(())
}

/// The whole of `path` as UTF-8 text, refusing more than `cap` bytes.
pub fn read_text_capped(path: &Path, cap: u64) -> std::io::Result<String> {
    String::from_utf8(read_capped(path, cap)?).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_up_to_the_cap_and_refuses_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.txt");
        std::fs::write(&p, "héllo").unwrap();
        assert_eq!(read_text_capped(&p, 6).unwrap(), "héllo");
        let e = read_text_capped(&p, 5).unwrap_err().to_string();
        assert!(e.contains("larger than 0 MiB"), "{e}");
        std::fs::write(&p, [0xffu8, 0xfe]).unwrap();
        assert!(read_text_capped(&p, 10).is_err());
        // A device is refused before a byte is read; a pipe is read up to the cap.
        #[cfg(unix)]
        {
            for dev in ["/dev/zero", "/dev/null"] {
                let e = read_capped(Path::new(dev), 1 << 20).unwrap_err();
                assert!(e.to_string().contains("is a device"), "{dev}: {e}");
            }
        }
        #[cfg(target_os = "linux")]
        {
            let mut child = std::process::Command::new("head")
                .args(["-c", "3000000", "/dev/zero"])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let fd = std::os::fd::AsRawFd::as_raw_fd(child.stdout.as_ref().unwrap());
            let pipe = format!("/proc/self/fd/{fd}");
            let e = read_capped(Path::new(&pipe), 1 << 20).unwrap_err();
            assert!(e.to_string().contains("larger than 1 MiB"), "{e}");
            drop(child.stdout.take());
            let _ = child.wait();
        }
    }
}
