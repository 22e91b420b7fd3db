//! `crosslm-client`: the desktop client of crosslm.

use clap::{Parser, Subcommand};

mod config;
mod data;
mod rounds;
mod slm;

/// crosslm desktop client: trains an on-device SLM and takes part in CrossLM rounds.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Prepare data sets: per-client partitions.
    #[command(subcommand)]
    Data(data::DataCmd),
    /// Enroll with a coordinator using a one-time token.
    Enroll(rounds::EnrollArgs),
    /// Take part in rounds until Ctrl-C (or --rounds N); trains first when there is no
    /// checkpoint yet.
    Join(rounds::JoinArgs),
    /// Show the local state: enrollment, checkpoint, last round, local accuracy.
    Status(rounds::StatusArgs),
    /// Work with the on-device SLM: embed, train, eval, score.
    #[command(subcommand)]
    Slm(slm::SlmCmd),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal: a log file gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Slm(cmd) => slm::run(cmd),
        Cmd::Enroll(a) => rounds::enroll_cmd(a),
        Cmd::Data(cmd) => data::run(cmd),
        Cmd::Join(a) => rounds::join_cmd(a),
        Cmd::Status(a) => rounds::status_cmd(a),
    }
}
