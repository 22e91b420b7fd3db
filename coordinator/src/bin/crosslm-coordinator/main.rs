//! `crosslm-coordinator`: the coordinator daemon and its tools.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use crosslm_coordinator::admin;
use crosslm_coordinator::daemon::{Daemon, DaemonConfig, mint_tokens};
use crosslm_coordinator::generator::{FileGenerator, Generator, LlmGenerator};
use crosslm_coordinator::llm::device::DeviceChoice;
use crosslm_coordinator::serving::{EngineClient, EngineEndpoint, EngineGenerator, LoraSync};
use crosslm_coordinator::store::Store;
use crosslm_coordinator::transport::Revoked;
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
    /// Print the state of rounds and clients as JSON. A running daemon with an admin endpoint
    /// (`[daemon] admin`) answers live, through the address it wrote into the data dir; a
    /// stopped one is read from its database (a running daemon holds the database's lock).
    Status {
        /// The coordinator's data dir.
        #[arg(long, default_value = "crosslm-data")]
        data_dir: PathBuf,
    },
    /// Revoke a client's certificate (works while the daemon runs): its next connection is
    /// refused with the reason. `--restore` lifts it; `--list` shows every revocation.
    Revoke {
        /// The coordinator's data dir.
        #[arg(long, default_value = "crosslm-data")]
        data_dir: PathBuf,
        /// The client id (`crosslm-coordinator status` lists them).
        #[arg(required_unless_present = "list")]
        client_id: Option<String>,
        /// Shown to the client and in the logs.
        #[arg(long, default_value = "revoked by the operator")]
        reason: String,
        /// Lift the revocation instead.
        #[arg(long, conflicts_with = "list")]
        restore: bool,
        /// List the revocations.
        #[arg(long)]
        list: bool,
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
        /// Also print each client's own score vector for the sample (`votes`, by client id,
        /// as received: after the client's privacy noise, before any aggregation), to study
        /// how the aggregation treated them.
        #[arg(long)]
        votes: bool,
    },
    /// Work with the LLM directly: tokenize, generate, classify.
    Llm(llm::LlmArgs),
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
        /// Where the LLM runs: "auto" (a CUDA GPU when built with `cuda` and present, else
        /// the CPU), "cpu" or "gpu".
        #[serde(default)]
        device: DeviceChoice,
    },
    /// A serving engine's OpenAI-compatible API (vLLM, llama.cpp's server) writes the
    /// samples; with `local_model`, the coordinator tunes LoRA adapters on its own copy of
    /// the base and hands them to the engine (see docs/serving.md).
    Engine(EngineConfig),
}

/// `[generator] kind = "engine"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EngineConfig {
    /// Up to and including `/v1`, e.g. `http://127.0.0.1:8000/v1`.
    base_url: String,
    /// The engine's name of the base model (`GET /v1/models` lists them).
    model: String,
    /// Environment variable holding the API key, if the engine wants one.
    #[serde(default)]
    api_key_env: Option<String>,
    /// Requests in flight at once.
    #[serde(default = "default_concurrency")]
    concurrency: usize,
    /// Seconds before one request is given up.
    #[serde(default = "default_timeout_secs")]
    timeout_secs: u64,
    /// Attempts after the first when the engine is down or busy (then the round's generation
    /// fails and is retried later: the daemon keeps running).
    #[serde(default = "default_retries")]
    retries: u32,
    /// The same base model as GGUF: the coordinator tunes and measures it from the rounds'
    /// feedback ([tuning], [eval]). Without it the LLM does not learn.
    #[serde(default)]
    local_model: Option<PathBuf>,
    /// How the round's adapter reaches the engine: "none" (generate with the base) or
    /// "runtime" (vLLM's /v1/load_lora_adapter).
    #[serde(default)]
    lora: LoraSync,
    /// Base sampling seed.
    #[serde(default)]
    seed: u64,
    /// Where `local_model` runs (as `[generator] device` for `kind = "llm"`).
    #[serde(default)]
    device: DeviceChoice,
}

fn default_concurrency() -> usize {
    4
}
fn default_timeout_secs() -> u64 {
    120
}
fn default_retries() -> u32 {
    3
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
        // Colours only for a person at a terminal: a log file gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
            if let Some(addr) = admin::recorded_addr(&data_dir) {
                match live_status(addr) {
                    Ok(body) => {
                        let mut v: serde_json::Value = serde_json::from_str(&body)
                            .context("the admin endpoint's status is not JSON")?;
                        v["revoked"] = serde_json::to_value(Revoked::open(&data_dir).list()?)?;
                        println!("{}", serde_json::to_string_pretty(&v)?);
                        return Ok(());
                    }
                    // A file left by a daemon that was killed: the database is free.
                    Err(e) => {
                        tracing::info!(%addr, error = %e, "no live daemon; reading the database")
                    }
                }
            }
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
                "revoked": Revoked::open(&data_dir).list()?,
            });
            println!("{}", serde_json::to_string_pretty(&status)?);
            Ok(())
        }
        Cmd::Revoke {
            data_dir,
            client_id,
            reason,
            restore,
            list,
        } => {
            let revoked = Revoked::open(&data_dir);
            match client_id {
                _ if list => {
                    println!("{}", serde_json::to_string_pretty(&revoked.list()?)?);
                }
                Some(id) if restore => {
                    if revoked.restore(&id)? {
                        eprintln!("{id}: revocation lifted");
                    } else {
                        eprintln!("{id} was not revoked");
                    }
                }
                Some(id) => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64);
                    let r = revoked.revoke(&id, &reason, now)?;
                    eprintln!(
                        "{id}: revoked ({}); its next connection is refused",
                        r.reason
                    );
                }
                None => anyhow::bail!("name a client id, or --list"),
            }
            Ok(())
        }
        Cmd::Samples {
            data_dir,
            round,
            votes,
        } => print_samples(&data_dir, round, votes),
        Cmd::Llm(cmd) => llm::run(cmd),
    }
}

/// `GET /status` from a running daemon's admin endpoint (plain HTTP on localhost).
fn live_status(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(5);
    let mut conn = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    conn.set_read_timeout(Some(timeout))?;
    conn.write_all(b"GET /status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply)?;
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .context("the admin endpoint sent no HTTP reply")?;
    let status = head.lines().next().unwrap_or_default();
    anyhow::ensure!(status.contains(" 200 "), "admin endpoint: {status}");
    Ok(body.to_string())
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
/// that has no aggregated scores (yet). With `votes`, each client's scores ride along.
fn print_samples(data_dir: &Path, only: Option<u64>, votes: bool) -> anyhow::Result<()> {
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
        // sample id -> client id -> that client's probabilities
        let mut by_sample: std::collections::HashMap<u64, serde_json::Map<String, _>> =
            Default::default();
        if votes {
            for (client, reply) in store.replies(id)? {
                for s in reply.scores {
                    by_sample
                        .entry(s.id)
                        .or_default()
                        .insert(client.clone(), serde_json::json!(s.probs));
                }
            }
        }
        for sample in &round.samples {
            let score = scores.get(&sample.id);
            let mut line = serde_json::json!({
                "round": id,
                "id": sample.id,
                "label": round.task.labels.get(sample.label as usize),
                "text": sample.text,
                "quality": score.map(|s| s.quality),
                "soft": score.map(|s| &s.soft),
            });
            if votes {
                line["votes"] =
                    serde_json::Value::Object(by_sample.remove(&sample.id).unwrap_or_default());
            }
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
        GeneratorConfig::Llm {
            model,
            seed,
            device,
        } => Box::new(local_llm(
            LocalModel {
                path: &resolve(&base, &model),
                device,
            },
            spec,
            seed,
            cfg.tuning,
            cfg.eval,
            &base,
            &daemon_cfg.data_dir,
        )?),
        GeneratorConfig::Engine(e) => {
            let api_key = match &e.api_key_env {
                Some(var) => Some(std::env::var(var).with_context(|| {
                    format!("[generator] api_key_env names {var}, which is not set")
                })?),
                None => None,
            };
            let client = EngineClient::new(EngineEndpoint {
                base_url: e.base_url.clone(),
                api_key,
                timeout: std::time::Duration::from_secs(e.timeout_secs.max(1)),
                retries: e.retries,
                backoff: std::time::Duration::from_millis(500),
            });
            match client.models() {
                Ok(models) if !models.contains(&e.model) => tracing::warn!(
                    model = %e.model, ?models, "the engine does not list this model"
                ),
                Ok(_) => tracing::info!(url = %e.base_url, model = %e.model, "engine ready"),
                // Not fatal: rounds retry generation until the engine is up.
                Err(err) => tracing::warn!(error = %err, "engine not answering yet"),
            }
            let g = EngineGenerator::new(client, e.model, spec.clone(), e.seed, e.concurrency);
            match &e.local_model {
                Some(m) => {
                    let local = local_llm(
                        LocalModel {
                            path: &resolve(&base, m),
                            device: e.device,
                        },
                        spec,
                        e.seed,
                        cfg.tuning,
                        cfg.eval,
                        &base,
                        &daemon_cfg.data_dir,
                    )?;
                    let peft = daemon_cfg.data_dir.join("llm").join("peft");
                    Box::new(g.with_local(local, peft, e.lora)?)
                }
                None => Box::new(g),
            }
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

/// The coordinator's own LLM: its GGUF file and where it runs.
struct LocalModel<'a> {
    path: &'a Path,
    device: DeviceChoice,
}

/// The LLM from a GGUF file, with its evaluator and tuning as configured (state in
/// `<data_dir>/llm`).
fn local_llm(
    model: LocalModel<'_>,
    spec: crosslm_coordinator::task::TaskSpec,
    seed: u64,
    mut tuning: TuningConfig,
    mut eval: EvalConfig,
    base: &Path,
    data_dir: &Path,
) -> anyhow::Result<LlmGenerator> {
    let LocalModel { path, device } = model;
    tracing::info!(model = %path.display(), "loading the LLM");
    let placement = crosslm_coordinator::llm::device::resolve(device)?;
    let llm = crosslm_coordinator::llm::Llm::load(path, &placement.device())
        .with_context(|| format!("loading {}", path.display()))?;
    eval.test = eval.test.map(|p| resolve(base, &p));
    eval.general = eval.general.map(|p| resolve(base, &p));
    let evaluator = Evaluator::load(&eval, &spec).context("loading evaluation data")?;
    tuning.rehearsal_text = tuning.rehearsal_text.map(|p| resolve(base, &p));
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
    Ok(LlmGenerator::new(llm, spec, seed)
        .with_evaluator(evaluator)
        .with_tuning(tuning, data_dir.join("llm"))?)
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
        assert_eq!(cfg.daemon.admin, Some("127.0.0.1:4480".parse().unwrap()));
    }
}
