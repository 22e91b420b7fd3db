//! The coordinator's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in the coordinator.
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
    /// A GGUF model file is malformed, truncated or unsupported.
    #[error("GGUF: {0}")]
    Gguf(String),
    /// The model's weights or configuration do not fit the architecture.
    #[error("model: {0}")]
    Model(String),
    /// The LLM cannot run on the device asked for, or the name is not one.
    #[error("LLM device: {0}")]
    Device(String),
    /// Tokenizer construction or use failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A task specification is invalid.
    #[error("task spec: {0}")]
    Task(String),
    /// The coordinator's database failed or holds a corrupt record.
    #[error("state store: {0}")]
    Store(String),
    /// Enrollment was refused.
    #[error("enrollment: {0}")]
    Enroll(String),
    /// Certificate authority or TLS setup failed.
    #[error("PKI: {0}")]
    Pki(String),
    /// The network side failed.
    #[error("transport: {0}")]
    Transport(String),
    /// The SDK reported an error.
    #[error(transparent)]
    Sdk(#[from] crosslm_sdk::Error),
    /// A serving engine failed or answered garbage.
    #[error(transparent)]
    Engine(#[from] crate::serving::EngineError),
    /// Invalid input data (files of samples, labels).
    #[error("data: {0}")]
    Data(String),
}

impl From<crosslm_sdk::quant::ggml::BlockError> for Error {
    fn from(e: crosslm_sdk::quant::ggml::BlockError) -> Self {
        Error::Gguf(e.0)
    }
}

/// Result with the coordinator's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
