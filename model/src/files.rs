//! Whole-file reads with a size cap, for every file tandem reads into memory at once (texts,
//! JSON and TOML configs, chat templates, importance matrices).
//!
//! `std::fs::read_to_string` reads until the end of the file, and a path to a device or a
//! symlink into one has none: `--text /dev/zero` took 20 GB in ten seconds, and a model folder
//! whose config.json links to it would do the same. Each reader here stops one byte past its
//! cap and says what it read. Pipes and process substitution (`--text <(zcat …)`) still work:
//! only the size is checked. The errors are `std::io::Error`s, so every caller's existing
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
        // A device without an end stops at the cap instead of filling memory.
        #[cfg(unix)]
        {
            let e = read_capped(Path::new("/dev/zero"), 1 << 20).unwrap_err();
            assert!(e.to_string().contains("larger than 1 MiB"), "{e}");
        }
    }
}
