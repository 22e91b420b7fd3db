//! `crosslm-client data partition`: split a benchmark data set into per-client private
//! files and a shared test file, as an experiment or demo needs.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use crosslm_sdk::data::{self, BadRows, Dataset, TableSpec};

/// Data set tools.
#[derive(clap::Subcommand)]
pub enum DataCmd {
    /// Split a data set into a test file and N per-client JSONL files (IID or label-skewed).
    Partition(PartitionArgs),
}

/// Arguments of `data partition`.
#[derive(clap::Args)]
pub struct PartitionArgs {
    /// Data file or directory (MR, SpamAssassin, R8, CSV/TSV/JSONL).
    #[arg(long)]
    pub data: PathBuf,
    /// Number of clients.
    #[arg(long)]
    pub clients: usize,
    /// Keep at most this many private examples per client.
    #[arg(long)]
    pub per_client: Option<usize>,
    /// Label skew: Dirichlet concentration (small = strong skew); IID when absent.
    #[arg(long)]
    pub dirichlet: Option<f64>,
    /// Fraction held out as the shared test split.
    #[arg(long, default_value_t = 0.2)]
    pub test_fraction: f64,
    /// Keep at most this many test examples.
    #[arg(long)]
    pub test_limit: Option<usize>,
    /// Seed of the split and partition.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Output directory: `test.jsonl`, `client-<i>.jsonl`.
    #[arg(long)]
    pub out: PathBuf,
}

fn write_jsonl(path: &PathBuf, ds: &Dataset) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    for e in &ds.examples {
        let line = serde_json::json!({"text": e.text, "label": ds.label_names[e.label]});
        writeln!(f, "{line}")?;
    }
    f.flush()?;
    Ok(())
}

/// Runs a `data` subcommand.
pub fn run(cmd: DataCmd) -> anyhow::Result<()> {
    let DataCmd::Partition(a) = cmd;
    let loaded = data::load_auto(&a.data, None, &TableSpec::default(), BadRows::Skip)?;
    if !loaded.skipped.is_empty() {
        eprintln!(
            "skipped {} bad rows of {}",
            loaded.skipped.len(),
            a.data.display()
        );
    }
    let (train, test) = loaded.dataset.split(a.test_fraction, a.seed)?;
    let test = match a.test_limit {
        Some(n) => test.sample(n, a.seed),
        None => test,
    };
    let parts = match a.dirichlet {
        Some(alpha) => train.partition_dirichlet(a.clients, alpha, a.seed)?,
        None => train.partition_iid(a.clients, a.seed)?,
    };
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    write_jsonl(&a.out.join("test.jsonl"), &test)?;
    for (i, p) in parts.iter().enumerate() {
        let p = match a.per_client {
            Some(n) => p.sample(n, a.seed.wrapping_add(i as u64)),
            None => p.clone(),
        };
        write_jsonl(&a.out.join(format!("client-{i}.jsonl")), &p)?;
        println!(
            "client-{i}: {} examples, per label {:?}",
            p.len(),
            p.label_counts()
        );
    }
    println!("test: {} examples", test.len());
    Ok(())
}
