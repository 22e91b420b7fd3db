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
    /// Enrollment failed or the stored identity is unusable.
    #[error("enrollment: {0}")]
    Enroll(String),
    /// The QUIC/TLS link failed.
    #[error("transport: {0}")]
    Transport(String),
    /// The peer broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The coordinator refused a request.
    #[error("coordinator refused: {0}")]
    Refused(crate::protocol::ErrorMsg),
    /// A data file is malformed (with its line number where known).
    #[error("data: {0}")]
    Data(String),
}

/// Result with the SDK's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
