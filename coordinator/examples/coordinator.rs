//! A coordinator from the library: SmolLM2 writes each round's samples for the MR task and is
//! LoRA-tuned on the clients' scores; clients learn with the SDK's default settings, sent with
//! every round. Prints one enrollment token per client, then runs the rounds.
//!
//! ```sh
//! ./scripts/fetch-assets.sh   # the model and the task's data
//! $CARGO_TARGET_DIR/release/examples/coordinator --data-dir coord --clients 2 --rounds 1
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use crosslm_coordinator::daemon::{Daemon, DaemonConfig, mint_tokens};
use crosslm_coordinator::generator::LlmGenerator;
use crosslm_coordinator::llm::device::{self, DeviceChoice};
use crosslm_coordinator::llm::{Llm, smollm2_gguf_path};
use crosslm_coordinator::round::RoundConfig;
use crosslm_coordinator::task::TaskSpec;
use crosslm_coordinator::tuning::TuningConfig;
use crosslm_sdk::data::workspace_root;
use crosslm_sdk::method::LearnSchedule;

/// Runs a crosslm coordinator on the MR task.
#[derive(Parser)]
struct Args {
    /// Where the CA, tokens, rounds and adapters are kept (a restart resumes from it).
    #[arg(long, default_value = "crosslm-coordinator-data")]
    data_dir: PathBuf,
    /// UDP address to listen on.
    #[arg(long, default_value = "127.0.0.1:4433")]
    listen: SocketAddr,
    /// Clients to wait for (and tokens to print).
    #[arg(long, default_value_t = 2)]
    clients: usize,
    /// Rounds to run.
    #[arg(long, default_value_t = 1)]
    rounds: u64,
    /// Synthetic samples per label per round.
    #[arg(long, default_value_t = 8)]
    samples_per_label: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let spec = TaskSpec::from_toml_file(workspace_root().join("examples/tasks/mr.toml"))?;
    // The GPU when this build has CUDA and the machine a GPU, else the CPU's quantized decoder.
    let placement = device::resolve(DeviceChoice::Auto)?;
    let llm = Llm::load(smollm2_gguf_path(), &placement.device())?;
    let generator = LlmGenerator::new(llm, spec.clone(), 1)
        .with_tuning(TuningConfig::default(), args.data_dir.join("llm"))?;
    let cfg = DaemonConfig {
        listen: args.listen,
        data_dir: args.data_dir,
        rounds: Some(args.rounds),
        samples_per_label: args.samples_per_label,
        min_clients: args.clients,
        round: RoundConfig {
            quorum: args.clients,
            ..RoundConfig::default()
        },
        learning: Some(LearnSchedule::default()),
        privacy: None,
        admin: None,
        ..DaemonConfig::default()
    };
    for token in mint_tokens(&cfg.data_dir, args.clients)? {
        println!("enrollment token: {token}");
    }
    let mut daemon = Daemon::start(cfg, spec.info(), Box::new(generator)).await?;
    println!("listening on {}", daemon.addr);
    let rounds = daemon.wait().await?;
    println!("{rounds} rounds finished");
    Ok(())
}
