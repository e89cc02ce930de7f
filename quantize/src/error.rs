//! Errors of the quantizer: each renders as one line naming the file or tensor it is about.

use std::path::{Path, PathBuf};
// Messages and names are shown escaped and cut, as the model crate's errors are.
use tandem_model::error::{clean, one_line, shown, MAX_NAME_CHARS};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] tandem_model::Error),
    /// Reading or writing a file failed; a full disk says so.
    #[error("{}: {}", shown(path), one_line(msg))]
    Io { path: PathBuf, msg: String },
    /// The policy, a rule or a recipe is wrong (unknown type, rule matching nothing, ...).
    #[error("{}", one_line(.0))]
    Plan(String),
    /// One source tensor cannot be quantized (NaN/Inf, wrong imatrix length, ...).
    #[error(
        "{}: tensor '{}': {}",
        shown(path),
        clean(tensor, MAX_NAME_CHARS),
        one_line(msg)
    )]
    Tensor {
        path: PathBuf,
        tensor: String,
        msg: String,
    },
    /// The run was stopped (Ctrl-C); nothing was written.
    #[error("interrupted; no output written")]
    Interrupted,
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Model(e.into())
    }
}

/// An I/O error with the file it happened on, worded for the common causes.
pub fn io_err(path: &Path, e: &std::io::Error) -> Error {
    let msg = match e.kind() {
        std::io::ErrorKind::StorageFull => "no space left on device".to_string(),
        std::io::ErrorKind::QuotaExceeded => "disk quota exceeded".to_string(),
        _ => tandem_model::error::one_line(&e.to_string()),
    };
    Error::Io {
        path: path.to_path_buf(),
        msg,
    }
}

pub fn tensor_err(path: &Path, tensor: &str, msg: impl Into<String>) -> Error {
    Error::Tensor {
        path: path.to_path_buf(),
        tensor: tensor.to_string(),
        msg: msg.into(),
    }
}
