//! crosslm edge SDK: the wire protocol, the QUIC client, and the on-device small language
//! models (SLMs) that train on private data and score synthetic samples.

pub mod data;
pub mod error;
pub mod slm;

pub use error::{Error, Result};
