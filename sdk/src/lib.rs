//! crosslm edge SDK: the wire protocol, the QUIC client, and the on-device small language
//! models (SLMs) that train on private data and score synthetic samples.

#[cfg(feature = "slm")]
pub mod client;
pub mod data;
pub mod error;
pub mod method;
#[cfg(feature = "slm")]
pub mod participant;
pub mod privacy;
pub mod protocol;
#[cfg(feature = "slm")]
pub mod quant;
pub mod rounds;
#[cfg(feature = "slm")]
pub mod slm;
#[cfg(feature = "slm")]
mod sync;
pub mod transport;

pub use error::{Error, Result, SessionError};
