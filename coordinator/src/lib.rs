//! crosslm coordinator: the LLM, synthetic data generation, feedback fine-tuning, round
//! orchestration and the QUIC server.

pub mod error;
pub mod llm;
pub mod task;

pub use error::{Error, Result};
