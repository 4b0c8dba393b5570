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

    #[error("{0}")]
    Device(String),

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

    /// A corpus line or record that cannot be used: `origin` is the file (or the shard's source).
    #[error("{origin}:{line}: {msg}")]
    Corpus {
        origin: String,
        line: u64,
        msg: String,
    },

    #[error("data: {0}")]
    Data(String),

    #[error("shard {id}: {msg}")]
    Shard { id: u32, msg: String },

    #[error("tokenizer {origin}: {msg}")]
    Tokenizer { origin: String, msg: String },

    /// A fine-tuning data set input that cannot be used: `at` says where in the file
    /// (`line 12`, `question \`dev-000-1\``).
    #[error("{path}, {at}: {msg}")]
    Dataset {
        path: PathBuf,
        at: String,
        msg: String,
    },

    #[error("metrics: {0}")]
    Metrics(String),

    #[error("collective (rank {rank}): {msg}")]
    Comm { rank: usize, msg: String },
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

/// How the coordinator answers an RPC that failed on one of its own errors: a file or shard
/// that is not there is NotFound, a checkpoint that does not verify is DataLoss, and anything
/// else is Internal; the message is the error's own (it says what and where).
impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match &e {
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                tonic::Status::not_found(msg)
            }
            Error::Shard { .. } => tonic::Status::not_found(msg),
            Error::Checkpoint { .. } | Error::Json { .. } => tonic::Status::data_loss(msg),
            _ => tonic::Status::internal(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_become_statuses_by_what_went_wrong() {
        let gone = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let s = tonic::Status::from(Error::io("/ckpt/stage0-step000010/manifest.json", gone));
        assert_eq!(s.code(), tonic::Code::NotFound);
        assert!(s.message().contains("stage0-step000010"), "{s}");
        let torn = Error::Checkpoint {
            path: "/ckpt/x/model.safetensors".into(),
            msg: "checksum mismatch".into(),
        };
        assert_eq!(tonic::Status::from(torn).code(), tonic::Code::DataLoss);
        let full = std::io::Error::new(std::io::ErrorKind::StorageFull, "disk full");
        assert_eq!(
            tonic::Status::from(Error::io("/ckpt", full)).code(),
            tonic::Code::Internal
        );
    }
}
