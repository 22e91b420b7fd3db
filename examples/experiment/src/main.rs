//! `crosslm-experiment`: runs CrossLM and its baselines on a real task, with a coordinator
//! and clients talking real QUIC on loopback, and writes `results/<name>/` (metrics.json,
//! results.md, accuracy.png).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use indicatif::MultiProgress;

mod attack;
mod compare;
mod config;
mod plot;
mod probe;
mod report;
mod run;

use config::{ExperimentConfig, Variant};
use crosslm_coordinator::tuning::TaskTargets;
use report::Metrics;

/// CrossLM experiments: CrossLM against Standalone, Centralized, FedAvg, synthetic data
/// without feedback, and CrossLM without LLM tuning.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run an experiment from a config file (see examples/experiments/*.toml).
    Run {
        /// The experiment config (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// Results root: results go to `<out>/<name>/`.
        #[arg(long, default_value = "results")]
        out: PathBuf,
        /// Only these variants (comma-separated), instead of the config's list.
        #[arg(long, value_delimiter = ',')]
        variants: Option<Vec<Variant>>,
        /// Start over instead of keeping variants already in `metrics.json`.
        #[arg(long)]
        fresh: bool,
        /// Another seed (partition, models, samples) than the config's; results go to
        /// `<out>/<name>-seed<N>/`.
        #[arg(long)]
        seed: Option<u64>,
        /// Override a config setting, `KEY=VALUE` (repeatable; `tuning.epochs=2` reaches into
        /// a table), e.g. `--set evaluate_on=validation --set min_quality=0.25 --set name=x`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Tune the LLM on the frozen LLM's round-1 batch (scored by the local-only SLMs) and
    /// measure it on the validation split after each epoch: the evidence for `[tuning]`.
    /// Needs an earlier `run` of the same config (local-only models, cached batch).
    ProbeLlm {
        /// The experiment config (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// Results root, as for `run`.
        #[arg(long, default_value = "results")]
        out: PathBuf,
        /// Epochs, measured after each.
        #[arg(long, default_value_t = 3)]
        epochs: usize,
        /// Task side only (no generation-side examples).
        #[arg(long)]
        task_only: bool,
        /// Task-side targets: the samples' intended labels or the clients' soft labels.
        #[arg(long, value_enum, default_value = "intended")]
        targets: Targets,
        /// LoRA learning rate (default: the config's).
        #[arg(long)]
        lr: Option<f64>,
        /// Override a config setting, `KEY=VALUE`, as for `run`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Re-render results.md and accuracy.png from a results dir's metrics.json.
    Report {
        /// `results/<name>`.
        dir: PathBuf,
    },
    /// One experiment under several seeds (`run --seed`): final-round SLM accuracy per seed,
    /// mean ± s.d., and CrossLM's paired differences to the baselines.
    Compare {
        /// Results dirs (`results/<name>`, `results/<name>-seed2`, ...).
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
    },
}

/// Task-side targets (see `[tuning] task_targets`).
#[derive(Clone, Copy, clap::ValueEnum)]
enum Targets {
    Intended,
    Soft,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run {
            config,
            out,
            variants,
            fresh,
            seed,
            sets,
        } => {
            let mut cfg = ExperimentConfig::load_with(&config, &sets)?;
            if let Some(v) = variants {
                cfg.variants = v;
            }
            if let Some(s) = seed {
                cfg.seed = s;
                cfg.name = format!("{}-seed{s}", cfg.name);
            }
            let dir = out.join(&cfg.name);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            // Logs go to a file: the terminal shows progress bars and the results.
            let log = std::fs::File::create(dir.join("run.log"))?;
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(log))
                .init();
            let started = std::time::Instant::now();
            eprintln!(
                "experiment {} -> {} (log: {})",
                cfg.name,
                dir.display(),
                dir.join("run.log").display()
            );
            let metrics = run::experiment(cfg, &out, fresh, MultiProgress::new())?;
            println!("{}", metrics.markdown());
            println!("{}", metrics.summary());
            eprintln!(
                "wall time {:.0} s; results in {}",
                started.elapsed().as_secs_f64(),
                dir.display()
            );
            Ok(())
        }
        Cmd::ProbeLlm {
            config,
            out,
            epochs,
            task_only,
            targets,
            lr,
            sets,
        } => {
            let cfg = ExperimentConfig::load_with(&config, &sets)?;
            let ctx = run::Ctx::setup(cfg, &out, MultiProgress::new())?;
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
                .with_writer(std::io::stderr)
                .init();
            let table = probe::probe_llm(
                &ctx,
                &probe::Probe {
                    epochs,
                    generation_side: !task_only,
                    task_targets: match targets {
                        Targets::Intended => TaskTargets::Intended,
                        Targets::Soft => TaskTargets::Soft,
                    },
                    learning_rate: lr,
                },
            )?;
            println!("{table}");
            Ok(())
        }
        Cmd::Report { dir } => {
            let m = Metrics::read(&dir)?;
            m.write(&dir)?;
            println!("{}", m.markdown());
            println!("{}", m.summary());
            Ok(())
        }
        Cmd::Compare { dirs } => {
            let runs = dirs
                .iter()
                .map(|d| Metrics::read(d))
                .collect::<anyhow::Result<Vec<_>>>()?;
            print!("{}", compare::compare(&runs));
            Ok(())
        }
    }
}
