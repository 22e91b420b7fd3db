//! `crosslm-coordinator`: the coordinator daemon and its tools.

use clap::{Parser, Subcommand};

mod llm;

/// crosslm coordinator: runs CrossLM rounds with edge clients over QUIC.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Work with the LLM directly: tokenize, generate, classify.
    #[command(subcommand)]
    Llm(llm::LlmCmd),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Llm(cmd) => llm::run(cmd),
    }
}
