//! The SDK's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in the SDK.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Any other I/O error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Model weights, configuration or checkpoint are missing, corrupt or do not fit.
    #[error("model: {0}")]
    Model(String),
    /// Tokenizer construction or use failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A data file is malformed (with its line number where known).
    #[error("data: {0}")]
    Data(String),
}

/// Result with the SDK's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
