//! crosslm coordinator: the LLM, synthetic data generation, feedback fine-tuning, round
//! orchestration and the QUIC server.

pub mod admin;
pub mod core;
pub mod daemon;
pub mod error;
pub mod generator;
pub mod llm;
pub mod round;
pub mod serving;
pub mod store;
pub mod synthetic;
pub mod task;
pub mod transport;
pub mod tuning;

pub use error::{Error, Result};
