//! Output files are written under a temporary name beside the target and renamed into place
//! only when complete, so a failure (full disk, bad tensor, Ctrl-C) leaves nothing behind and
//! an existing file is replaced only with `--force`.

use crate::error::{io_err, Error, Result};
use std::io::BufWriter;
use std::path::Path;
use tempfile::NamedTempFile;

/// Refuses an existing `out` unless `force` (checked before any work is done).
pub fn check_target(out: &Path, force: bool) -> Result<()> {
    if out.exists() && !force {
        return Err(Error::Io {
            path: out.to_path_buf(),
            msg: "already exists (pass --force to overwrite)".into(),
        });
    }
    if out.is_dir() {
        return Err(Error::Io {
            path: out.to_path_buf(),
            msg: "is a directory".into(),
        });
    }
    Ok(())
}

/// Runs `build` on a buffered temporary file in `out`'s folder, syncs it, and renames it to
/// `out`. The temporary is removed if `build` fails or the process is interrupted before the
/// rename (the tempfile guard deletes it on drop).
pub fn write_atomically(
    out: &Path,
    force: bool,
    build: impl FnOnce(&mut BufWriter<NamedTempFile>) -> Result<()>,
) -> Result<()> {
    check_target(out, force)?;
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let prefix = format!(".{name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    // A finished file gets the usual permissions (the umask still applies), not the
    // owner-only ones a temporary file is created with.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let tmp = builder.tempfile_in(dir).map_err(|e| io_err(dir, &e))?;
    let mut w = BufWriter::with_capacity(8 << 20, tmp);
    build(&mut w)?;
    let tmp = w.into_inner().map_err(|e| io_err(out, e.error()))?;
    tmp.as_file().sync_all().map_err(|e| io_err(out, &e))?;
    let persisted = if force {
        tmp.persist(out)
    } else {
        tmp.persist_noclobber(out)
    };
    persisted.map_err(|e| io_err(out, &e.error))?;
    Ok(())
}
