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
    /// A session with the coordinator could not start or broke.
    #[error("session: {0}")]
    Session(#[from] SessionError),
    /// The peer broke the protocol (a malformed or oversized frame, an unexpected message).
    #[error("protocol: {0}")]
    Protocol(String),
    /// The coordinator refused a request.
    #[error("coordinator refused: {0}")]
    Refused(crate::protocol::ErrorMsg),
    /// A data file is malformed (with its line number where known).
    #[error("data: {0}")]
    Data(String),
    /// A setting or argument is invalid (bad address, empty name, out-of-range value).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// An operation needs a step that has not happened yet (enroll, load data, train).
    #[error("not ready: {0}")]
    NotReady(String),
    /// Another long operation is running on the same client.
    #[error("busy: {0} is running")]
    Busy(String),
    /// The operation was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// A checkpoint directory could not be written or replaced.
    #[error("checkpoint {}: {reason}", dir.display())]
    Checkpoint {
        /// The checkpoint directory.
        dir: PathBuf,
        /// What failed.
        reason: String,
    },
    /// A bug or a crash inside the SDK (a worker thread panicked), not the caller's input.
    #[error("internal: {0}")]
    Internal(String),
}

/// How a session with the coordinator failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The coordinator could not be reached or the handshake failed.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The coordinator's address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The coordinator closed the session.
    #[error("the coordinator closed the session")]
    Closed,
    /// Sending or receiving failed mid-session (reset, timeout, local socket).
    #[error("{0}")]
    Link(String),
    /// The coordinator had no room for this connection now ([`crate::protocol::CLOSE_BUSY`]);
    /// worth trying again later.
    #[error("the coordinator is busy: {0}; try again later")]
    Busy(String),
    /// The TLS configuration could not be built (a bad certificate or key).
    #[error("TLS setup: {0}")]
    Tls(String),
}

impl Error {
    /// The link to the coordinator failed (unreachable, reset, timed out): worth trying again
    /// later. A refusal, a clean close or a protocol error is not.
    pub fn is_link_failure(&self) -> bool {
        matches!(
            self,
            Error::Session(
                SessionError::Connect { .. } | SessionError::Link(_) | SessionError::Busy(_)
            )
        )
    }
}

/// Result with the SDK's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
