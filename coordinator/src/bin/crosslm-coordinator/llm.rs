//! `crosslm-coordinator llm ...` subcommands.

use clap::Subcommand;

/// LLM tools.
#[derive(Subcommand)]
pub enum LlmCmd {}

/// Runs an `llm` subcommand.
pub fn run(cmd: LlmCmd) -> anyhow::Result<()> {
    match cmd {}
}
