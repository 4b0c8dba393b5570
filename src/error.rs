//! The library's error type: every message says what was expected and where.

use std::path::PathBuf;

/// Errors raised by tandem's library code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("invalid model config: {0}")]
    Config(String),

    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },

    #[error("tensor `{name}`: expected shape {expected:?}, the checkpoint has {found:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("invalid batch: {0}")]
    Batch(String),

    #[error("training: {0}")]
    Train(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
