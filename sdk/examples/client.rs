//! A device with the SDK's high-level client: enroll with a token, load private data, train
//! the on-device SLM, then take part in rounds. The same calls are what the desktop binary
//! (`crosslm-client`) and the mobile bindings make.
//!
//! ```sh
//! # a coordinator first (it prints enrollment tokens), e.g. coordinator/examples/coordinator.rs
//! $CARGO_TARGET_DIR/release/examples/client --coordinator 127.0.0.1:4433 --token xlm1.… \
//!     --data assets/data/mr/movieReviewSnippets_GroundTruth.txt --dir phone1
//! ```

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use crosslm_sdk::client::{Client, ClientConfig, Progress};
use crosslm_sdk::slm::Arch;

/// Joins a crosslm coordinator as one device.
#[derive(Parser)]
struct Args {
    /// Coordinator address, host:port (UDP).
    #[arg(long)]
    coordinator: String,
    /// One-time enrollment token (only the first time; the identity is kept in --dir).
    #[arg(long)]
    token: Option<String>,
    /// Private labeled data (MR, SpamAssassin, R8, or CSV/TSV/JSONL with text and label).
    #[arg(long)]
    data: PathBuf,
    /// Where the device keeps its identity, model and state.
    #[arg(long, default_value = "crosslm-device")]
    dir: PathBuf,
    /// SLM architecture of a fresh model.
    #[arg(long, value_enum, default_value = "bag")]
    arch: Arch,
    /// Rounds to take part in.
    #[arg(long, default_value_t = 1)]
    rounds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = Client::open(ClientConfig {
        coordinator: Some(args.coordinator),
        data_dir: args.dir,
        name: "example-device".into(),
        arch: args.arch,
        ..ClientConfig::default()
    })?;
    // Progress of every long operation (an app would update its UI here).
    client.set_listener(Some(Arc::new(|p: &Progress| {
        if p.done == 0 || p.done == p.total {
            println!("{:?}: {}", p.activity, p.message);
        }
    })));
    if let Some(token) = &args.token {
        println!("enrolled as {}", client.enroll(token).await?);
    }
    let data = client.load_data_file(&args.data)?;
    println!(
        "{} private examples, {} held out for testing, labels {:?}",
        data.examples, data.test_examples, data.labels
    );
    let trained = client.train().await?;
    println!("trained: local accuracy {:?}", trained.local_accuracy);
    let joined = client.join(Some(args.rounds)).await?;
    println!(
        "took part in {} rounds; local accuracy now {:?}",
        joined.rounds, joined.local_accuracy
    );
    Ok(())
}
