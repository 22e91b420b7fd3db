//! `crosslm-client slm ...` subcommands.

use clap::Subcommand;

/// SLM tools.
#[derive(Subcommand)]
pub enum SlmCmd {}

/// Runs an `slm` subcommand.
pub fn run(cmd: SlmCmd) -> anyhow::Result<()> {
    match cmd {}
}
