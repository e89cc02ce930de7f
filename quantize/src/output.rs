//! Output files are written under a temporary name beside the target and renamed into place
//! only when complete, so a failure (full disk, bad tensor, Ctrl-C) leaves nothing behind and
//! an existing file is replaced only with `--force` (`tandem_model::export::write_file_atomically`).

use crate::error::{Error, Result};
use std::path::Path;

/// Refuses an existing `out` unless `force` (checked before any work is done).
pub fn check_target(out: &Path, force: bool) -> Result<()> {
    tandem_model::export::check_replaceable(out)?;
    if out.exists() && !force {
        return Err(Error::Io {
            path: out.to_path_buf(),
            msg: "already exists (pass --force to overwrite)".into(),
        });
    }
    Ok(())
}

pub use tandem_model::export::write_file_atomically as write_atomically;
