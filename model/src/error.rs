//! One error type for the model crate. Every variant names the file (and tensor) it is about,
//! and renders as a single line, so the CLI can print it as-is.

use std::path::{Path, PathBuf};

/// Every message is shown through [`one_line`] and every path through [`shown`], in
/// `Display` itself: text that came from a file (a tensor name, a key, a type) can never put a
/// newline, an escape sequence or 2 KB on the user's terminal, whoever built the error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be opened, mapped or read.
    #[error("{}: {}", shown(path), one_line(msg))]
    Io { path: PathBuf, msg: String },
    /// The file is there but its contents are not what the format says.
    #[error("{}: {}", shown(path), one_line(msg))]
    Format { path: PathBuf, msg: String },
    /// One tensor in a file is wrong (missing, bad dtype, bad shape, non-finite values).
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
    /// The model asks for something this build does not run.
    #[error("{}: {}", shown(path), one_line(msg))]
    Unsupported { path: PathBuf, msg: String },
    /// A forward call would run past the context the cache can hold.
    #[error("context length exceeded: {needed} positions needed, the limit is {limit}")]
    ContextFull { needed: usize, limit: usize },
    /// Invalid argument from the caller (bad sampling parameters, empty input, ...).
    #[error("{}", one_line(.0))]
    Invalid(String),
    /// An error from candle's tensor operations.
    #[error("tensor op failed: {}", one_line(.0))]
    Candle(String),
}

/// A path as an error shows it (see [`clean`]).
pub fn shown(path: &Path) -> String {
    clean(&path.display().to_string(), 300)
}

impl From<tandem_kernels::sampling::InvalidParams> for Error {
    fn from(e: tandem_kernels::sampling::InvalidParams) -> Self {
        Error::Invalid(e.0)
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(candle_msg(&e))
    }
}

/// candle's message without the backtrace it appends when RUST_BACKTRACE is set.
pub fn candle_msg(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_msg(inner),
        other => one_line(&other.to_string()),
    }
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(path: &Path, e: impl std::fmt::Display) -> Error {
    let msg = e.to_string();
    // A full disk says so plainly (ENOSPC / ERROR_DISK_FULL).
    let msg = if msg.contains("os error 28") || msg.contains("os error 112") {
        "no space left on device".to_string()
    } else {
        one_line(&msg)
    };
    Error::Io {
        path: path.to_path_buf(),
        msg,
    }
}

pub(crate) fn format_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        msg: one_line(&msg.into()),
    }
}

pub(crate) fn tensor_err(path: &Path, tensor: &str, msg: impl Into<String>) -> Error {
    Error::Tensor {
        path: path.to_path_buf(),
        tensor: clean(tensor, MAX_NAME_CHARS),
        msg: one_line(&msg.into()),
    }
}

/// Longest tensor or key name an error shows (a hostile file can carry a 2 KB name).
pub const MAX_NAME_CHARS: usize = 96;
/// Longest message an error shows.
pub const MAX_MESSAGE_CHARS: usize = 600;

/// Folds a multi-line message (candle and serde errors can span lines) into one line, with
/// control characters escaped and its length capped (see [`clean`]).
pub fn one_line(s: &str) -> String {
    let joined = s
        .split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    clean(&joined, MAX_MESSAGE_CHARS)
}

/// A string from a file made safe to print on a terminal: control characters (escape
/// sequences, carriage returns, NULs) shown escaped (`\u{1b}`), and at most `max` characters
/// kept, the cut marked with how much was left out.
pub fn clean(s: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i >= max {
            let rest = s.chars().count() - i;
            out.push_str(&format!("… ({rest} more characters)"));
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}
