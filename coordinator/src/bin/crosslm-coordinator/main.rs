//! `crosslm-coordinator`: the coordinator daemon and its tools.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use crosslm_coordinator::daemon::{Daemon, DaemonConfig, mint_tokens};
use crosslm_coordinator::generator::{FileGenerator, Generator, LlmGenerator};
use crosslm_coordinator::store::Store;
use crosslm_coordinator::tuning::{EvalConfig, Evaluator, TuningConfig};
use serde::Deserialize;

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
    /// Run the daemon: listen for clients and run rounds.
    Serve(ServeArgs),
    /// Mint one-time enrollment tokens (works while the daemon runs).
    Token {
        /// The coordinator's data dir.
        #[arg(long, default_value = "crosslm-data")]
        data_dir: PathBuf,
        /// How many tokens.
        #[arg(short, long, default_value_t = 1)]
        count: usize,
    },
    /// Print the state of rounds and clients as JSON (daemon stopped: the database is locked while it runs).
    Status {
        /// The coordinator's data dir.
        #[arg(long, default_value = "crosslm-data")]
        data_dir: PathBuf,
    },
    /// Print the rounds' synthetic samples with their aggregated scores, as JSON lines (daemon
    /// stopped): what the clients were sent and what they made of it. `label` is the
    /// intended label's name, so `crosslm-client slm score --format jsonl` reads the output.
    Samples {
        /// The coordinator's data dir.
        #[arg(long, default_value = "crosslm-data")]
        data_dir: PathBuf,
        /// Only this round.
        #[arg(long)]
        round: Option<u64>,
    },
    /// Work with the LLM directly: tokenize, generate, classify.
    #[command(subcommand)]
    Llm(llm::LlmCmd),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Config file (TOML); see examples/coordinator.toml.
    #[arg(short, long)]
    config: PathBuf,
    /// Override the listen address.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Override the data dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Override the number of rounds to run before exiting.
    #[arg(long)]
    rounds: Option<u64>,
    /// Print this many fresh enrollment tokens at start.
    #[arg(long, default_value_t = 0)]
    print_tokens: usize,
    /// Write the bound address to this file once listening (for scripts and tests).
    #[arg(long)]
    addr_file: Option<PathBuf>,
}

/// Where synthetic samples come from.
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum GeneratorConfig {
    /// Labeled samples from a JSONL file.
    File {
        /// The file.
        path: PathBuf,
    },
    /// The coordinator's LLM (SmolLM2 GGUF), prompted with the task's label prompts.
    Llm {
        /// GGUF model file.
        model: PathBuf,
        /// Base sampling seed.
        #[serde(default)]
        seed: u64,
    },
}

/// The config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    /// Task spec (TOML).
    task: PathBuf,
    #[serde(default)]
    daemon: DaemonConfig,
    generator: GeneratorConfig,
    /// How the LLM learns from rounds (LLM generator only).
    #[serde(default)]
    tuning: TuningConfig,
    /// What the LLM is measured on before the first round and after each tuning.
    #[serde(default)]
    eval: EvalConfig,
}

/// Relative paths in a config file are relative to the file.
fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
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
        Cmd::Serve(args) => serve(args),
        Cmd::Token { data_dir, count } => {
            for t in mint_tokens(&data_dir, count)? {
                println!("{t}");
            }
            Ok(())
        }
        Cmd::Status { data_dir } => {
            let store = open_store(&data_dir)?;
            let rounds = store.summaries()?;
            let mut reports = Vec::new();
            for r in &rounds {
                let accs: std::collections::BTreeMap<_, _> =
                    store.reports(r.id)?.into_iter().collect();
                reports.push(serde_json::json!({"round": r.id, "local_accuracy": accs}));
            }
            let status = serde_json::json!({
                "clients": store.clients()?,
                "rounds": rounds,
                "client_reports": reports,
                "llm": store.llm_reports()?,
            });
            println!("{}", serde_json::to_string_pretty(&status)?);
            Ok(())
        }
        Cmd::Samples { data_dir, round } => print_samples(&data_dir, round),
        Cmd::Llm(cmd) => llm::run(cmd),
    }
}

/// Opens a stopped daemon's database; the running daemon holds its lock. A read-only command
/// must not create an empty database where none was (a mistyped `--data-dir`).
fn open_store(data_dir: &Path) -> anyhow::Result<Store> {
    if !data_dir.join("state.redb").is_file() {
        anyhow::bail!(
            "{} holds no coordinator state (no state.redb): is --data-dir the daemon's?",
            data_dir.display()
        );
    }
    Store::open(data_dir).with_context(|| {
        format!(
            "opening {} (is the daemon running? it holds the lock)",
            data_dir.display()
        )
    })
}

/// `samples`: one JSON line per synthetic sample; `quality` and `soft` are null for a round
/// that has no aggregated scores (yet).
fn print_samples(data_dir: &Path, only: Option<u64>) -> anyhow::Result<()> {
    use std::io::Write;
    let store = open_store(data_dir)?;
    let ids: Vec<u64> = match only {
        Some(r) => vec![r],
        None => store.summaries()?.iter().map(|r| r.id).collect(),
    };
    let mut out = std::io::stdout().lock();
    for id in ids {
        let round = store
            .round(id)?
            .with_context(|| format!("no round {id} in {}", data_dir.display()))?;
        let scores: std::collections::HashMap<u64, _> = store
            .result(id)?
            .map(|o| o.scores.into_iter().map(|s| (s.id, s)).collect())
            .unwrap_or_default();
        for sample in &round.samples {
            let score = scores.get(&sample.id);
            let line = serde_json::json!({
                "round": id,
                "id": sample.id,
                "label": round.task.labels.get(sample.label as usize),
                "text": sample.text,
                "quality": score.map(|s| s.quality),
                "soft": score.map(|s| &s.soft),
            });
            match writeln!(out, "{line}") {
                // A reader that stops early (`| head`) is not an error.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                r => r?,
            }
        }
    }
    Ok(())
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let cfg: ConfigFile =
        toml::from_str(&text).with_context(|| format!("parsing {}", args.config.display()))?;
    let base = args.config.parent().unwrap_or(Path::new(".")).to_path_buf();
    let mut daemon_cfg = cfg.daemon;
    daemon_cfg.data_dir = resolve(&base, &daemon_cfg.data_dir);
    if let Some(l) = args.listen {
        daemon_cfg.listen = l;
    }
    if let Some(d) = args.data_dir {
        daemon_cfg.data_dir = d;
    }
    if args.rounds.is_some() {
        daemon_cfg.rounds = args.rounds;
    }
    let spec = crosslm_coordinator::task::TaskSpec::from_toml_file(resolve(&base, &cfg.task))?;
    let task = spec.info();
    let generator: Box<dyn Generator> = match cfg.generator {
        GeneratorConfig::File { path } => {
            Box::new(FileGenerator::load(&resolve(&base, &path), &task)?)
        }
        GeneratorConfig::Llm { model, seed } => {
            let path = resolve(&base, &model);
            tracing::info!(model = %path.display(), "loading the LLM");
            let llm = crosslm_coordinator::llm::Llm::load(&path, &burn::tensor::Device::flex())
                .with_context(|| format!("loading {}", path.display()))?;
            let mut eval = cfg.eval;
            eval.test = eval.test.map(|p| resolve(&base, &p));
            eval.general = eval.general.map(|p| resolve(&base, &p));
            let evaluator = Evaluator::load(&eval, &spec).context("loading evaluation data")?;
            let mut tuning = cfg.tuning;
            tuning.rehearsal_text = tuning.rehearsal_text.map(|p| resolve(&base, &p));
            if tuning.rehearsal > 0.0
                && let (Some(a), Some(b)) = (&tuning.rehearsal_text, &eval.general)
                && crosslm_coordinator::tuning::same_file(a, b)
                && tuning.rehearsal_skip < eval.general_limit
            {
                anyhow::bail!(
                    "[tuning] rehearsal_skip = {} would train on texts that [eval] measures \
                     perplexity on (general_limit = {}): raise it to at least that",
                    tuning.rehearsal_skip,
                    eval.general_limit
                );
            }
            Box::new(
                LlmGenerator::new(llm, spec, seed)
                    .with_evaluator(evaluator)
                    .with_tuning(tuning, daemon_cfg.data_dir.join("llm"))?,
            )
        }
    };
    for t in mint_tokens(&daemon_cfg.data_dir, args.print_tokens)? {
        println!("enrollment token: {t}");
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let mut daemon = Daemon::start(daemon_cfg, task, generator).await?;
        if let Some(f) = &args.addr_file {
            std::fs::write(f, daemon.addr.to_string())
                .with_context(|| format!("writing {}", f.display()))?;
        }
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        tokio::select! {
            r = daemon.wait() => { r?; }
            _ = &mut ctrl_c => {
                tracing::info!("Ctrl-C: stopping (state is on disk; a restart resumes)");
            }
        }
        Ok::<_, anyhow::Error>(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented example config parses (it lists every option), so it cannot drift from
    /// the config types unnoticed.
    #[test]
    fn example_config_parses() {
        let path = crosslm_sdk::data::workspace_root().join("examples/coordinator.toml");
        let text = std::fs::read_to_string(&path).expect("examples/coordinator.toml");
        let cfg: ConfigFile = toml::from_str(&text).expect("example config parses");
        assert!(cfg.tuning.enabled && !cfg.tuning.experimental.preference.enabled);
        assert_eq!(cfg.tuning.experimental.preference.max_pairs_per_label, 16);
        let learning = cfg.daemon.learning.expect("[daemon.learning]");
        assert_eq!(learning.settings.training.len(), 2);
        assert_eq!(learning.settings.training[0].epochs, Some(15));
    }
}
