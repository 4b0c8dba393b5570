//! The library's error type: every message says what was expected and where.

#![warn(missing_docs)]

use std::path::PathBuf;

/// Errors raised by tandem's library code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed in candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// A JSON file (config, manifest, index, data set) does not parse as expected.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// serde_json's error, with line and column.
        #[source]
        source: serde_json::Error,
    },

    /// A model configuration or task head that is not valid or not supported.
    #[error("invalid model config: {0}")]
    Config(String),

    /// A `--device` that cannot be parsed or opened (or CUDA in a build without it).
    #[error("{0}")]
    Device(String),

    /// A checkpoint that is missing a part, does not verify or does not fit the model.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },

    /// A loaded tensor's shape differs from the parameter's.
    #[error("tensor `{name}`: expected shape {expected:?}, the checkpoint has {found:?}")]
    ShapeMismatch {
        /// The parameter's name.
        name: String,
        /// The shape the model declares.
        expected: Vec<usize>,
        /// The shape that was supplied.
        found: Vec<usize>,
    },

    /// A batch whose sizes or labels are inconsistent.
    #[error("invalid batch: {0}")]
    Batch(String),

    /// A training step or parameter store misuse (unknown parameter, non-finite gradient).
    #[error("training: {0}")]
    Train(String),

    /// A corpus line or record that cannot be used: `origin` is the file (or the shard's source).
    #[error("{origin}:{line}: {msg}")]
    Corpus {
        /// The file (or the shard's source).
        origin: String,
        /// The line number, from 1.
        line: u64,
        /// What is wrong with it.
        msg: String,
    },

    /// Data inputs or options that cannot be used (no such file, bad pattern, bad option).
    #[error("data: {0}")]
    Data(String),

    /// A shard that is not in the index or whose bytes do not match it.
    #[error("shard {id}: {msg}")]
    Shard {
        /// The shard's id in the index.
        id: u32,
        /// What is wrong with it.
        msg: String,
    },

    /// A tokenizer that cannot be loaded, trained or used.
    #[error("tokenizer {origin}: {msg}")]
    Tokenizer {
        /// Where the tokenizer came from (a file, or how it was made).
        origin: String,
        /// What went wrong.
        msg: String,
    },

    /// A fine-tuning data set input that cannot be used: `at` says where in the file
    /// (`line 12`, `question \`dev-000-1\``).
    #[error("{path}, {at}: {msg}")]
    Dataset {
        /// The data set file.
        path: PathBuf,
        /// Where in the file.
        at: String,
        /// What was expected there.
        msg: String,
    },

    /// Dev metric inputs that do not fit together (lengths, label ids, missing predictions).
    #[error("metrics: {0}")]
    Metrics(String),

    /// A collective (ring or NCCL) failed: a peer lost or too slow, or a backend error.
    #[error("collective (rank {rank}): {msg}")]
    Comm {
        /// The rank that raised it.
        rank: usize,
        /// What went wrong.
        msg: String,
    },
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How the coordinator answers an RPC that failed on one of its own errors: a file or shard
/// that is not there is NotFound, a checkpoint that does not verify is DataLoss, and anything
/// else is Internal; the message is the error's own (it says what and where).
impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        // A status travels in an HTTP/2 header (peers take 16 KiB): a message quoting a long
        // name from the request is cut, or the client would get a protocol error instead.
        let mut msg = e.to_string();
        if msg.len() > 2048 {
            let cut = (0..=2048)
                .rev()
                .find(|i| msg.is_char_boundary(*i))
                .unwrap_or(0);
            msg.truncate(cut);
            msg.push('…');
        }
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
