//! `crosslm-client enroll`, `join` and `status`: the desktop front end of the SDK's
//! high-level [`Client`], the same API the mobile bindings expose.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use crosslm_sdk::client::{Activity, Client, Progress, Status};
use crosslm_sdk::slm::{Arch, Backend};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::config::CommonArgs;

/// Arguments of `enroll`.
#[derive(clap::Args)]
pub struct EnrollArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// The one-time token the coordinator printed.
    #[arg(long)]
    pub token: String,
}

/// Arguments of `join`.
#[derive(clap::Args)]
pub struct JoinArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// SLM checkpoint directory (from `slm train`, or written by the first training here).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Architecture of a fresh model, when there is no checkpoint yet.
    #[arg(long, value_enum)]
    pub arch: Option<Arch>,
    /// Compute backend for the SLM.
    #[arg(long, value_enum)]
    pub backend: Option<Backend>,
    /// Aggregation weight announced to the coordinator (default: private examples loaded).
    #[arg(long)]
    pub n_private: Option<u64>,
    /// Leave after this many rounds (default: until Ctrl-C).
    #[arg(long)]
    pub rounds: Option<u64>,
    /// Private labeled data: the SLM trains after each round on it plus the round's scored
    /// synthetic samples (CrossLM), and the checkpoint is updated.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Local test data: its accuracy is reported after each round (else a held-out part of
    /// --data, see --test-fraction).
    #[arg(long)]
    pub test: Option<PathBuf>,
    /// Fraction of --data held out as the local test split when there is no --test.
    #[arg(long)]
    pub test_fraction: Option<f64>,
    /// Training epochs after each round (default: the architecture's: MiniLM 2, bag 15).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Epochs of the first local training (no checkpoint yet).
    #[arg(long)]
    pub train_epochs: Option<usize>,
    /// Synthetic samples below this quality (the intended label's share against its
    /// strongest rival: the aggregated quality with two labels) are not trained on.
    #[arg(long)]
    pub min_quality: Option<f32>,
}

/// Arguments of `status`.
#[derive(clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Checkpoint directory, if not the data dir's.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Runs `enroll`.
pub fn enroll_cmd(a: EnrollArgs) -> anyhow::Result<()> {
    let file = a.common.file()?;
    let client = Client::open(a.common.client_config(&file))?;
    let id = runtime()?.block_on(client.enroll(&a.token))?;
    println!(
        "enrolled as {id} (identity in {})",
        client.config().data_dir.display()
    );
    Ok(())
}

/// The activity (and round) being drawn, and its bar.
type Drawn = (Option<(Activity, Option<u64>)>, Option<ProgressBar>);

/// Draws progress bars for training, scoring and learning; other activities are lines.
#[derive(Default)]
struct Bars {
    current: Mutex<Drawn>,
}

impl Bars {
    fn new_bar(prefix: String) -> ProgressBar {
        // Hidden when stderr is not a terminal (logs, tests): the lines below still print.
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(prefix);
        bar
    }

    /// Clears the bar being drawn.
    fn clear(&self) {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = cur.1.take() {
            b.finish_and_clear();
        }
        cur.0 = None;
    }

    fn on(&self, p: &Progress) {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let key = (p.activity, p.round);
        let barred = matches!(
            p.activity,
            Activity::Training | Activity::Scoring | Activity::Learning
        );
        if cur.0 != Some(key) {
            cur.0 = Some(key);
            if let Some(b) = cur.1.take() {
                b.finish_and_clear();
            }
            if barred {
                cur.1 = Some(Self::new_bar(match (p.activity, p.round) {
                    (Activity::Scoring, Some(r)) => format!("round {r} scoring"),
                    (Activity::Learning, Some(r)) => format!("round {r} training"),
                    _ => "training".to_string(),
                }));
            }
        }
        if let Some(bar) = cur.1.as_ref().filter(|_| barred) {
            bar.set_length(p.total);
            bar.set_position(p.done);
            match p.loss {
                Some(l) => bar.set_message(format!("{} loss {l:.4}", p.message)),
                None => bar.set_message(p.message.clone()),
            }
        }
        let line = match p.activity {
            Activity::RoundFinished | Activity::Connecting | Activity::Stopping => {
                Some(p.message.clone())
            }
            Activity::Waiting if p.message.starts_with("joined") => Some(p.message.clone()),
            Activity::Training if p.message == "trained" => {
                let acc = p
                    .accuracy
                    .map_or("no test split".to_string(), |a| format!("{a:.4}"));
                Some(format!("trained: {} steps, local accuracy {acc}", p.total))
            }
            _ => None,
        };
        if let Some(line) = line {
            match cur.1.as_ref() {
                Some(bar) => bar.suspend(|| println!("{line}")),
                None => println!("{line}"),
            }
        }
    }
}

/// Runs `join`: loads the private data, trains first when there is no checkpoint yet, then
/// takes part in rounds until `--rounds` or Ctrl-C. The first Ctrl-C leaves cleanly (a reply
/// being scored is abandoned, training after a round finishes and its checkpoint is kept); a
/// second one quits at once (the checkpoint on disk is whole either way).
pub fn join_cmd(a: JoinArgs) -> anyhow::Result<()> {
    let file = a.common.file()?;
    let mut cfg = a.common.client_config(&file);
    if let Some(c) = a.checkpoint.clone() {
        cfg.checkpoint_dir = Some(c);
    }
    if let Some(v) = a.arch {
        cfg.arch = v;
    }
    if let Some(v) = a.backend {
        cfg.backend = v;
    }
    if let Some(v) = a.n_private {
        cfg.n_private = Some(v);
    }
    if let Some(v) = a.test_fraction {
        cfg.test_fraction = v;
    }
    if let Some(v) = a.epochs {
        cfg.round_epochs = Some(v);
    }
    if let Some(v) = a.train_epochs {
        cfg.train_epochs = Some(v);
    }
    if let Some(v) = a.min_quality {
        cfg.min_quality = v;
    }
    let data = a.data.clone().or(file.data.clone());
    let test = a.test.clone().or(file.test.clone());
    if test.is_some() {
        // An explicit test file: all of the private data trains.
        cfg.test_fraction = 0.0;
    }
    let client = Arc::new(Client::open(cfg)?);
    let bars = Arc::new(Bars::default());
    let b = bars.clone();
    client.set_listener(Some(Arc::new(move |p: &Progress| b.on(p))));
    if let Some(path) = &data {
        let d = client
            .load_data_file(path)
            .with_context(|| format!("loading private data {}", path.display()))?;
        println!(
            "private data: {} examples ({} held out for testing, {} rows skipped), labels {:?}",
            d.examples, d.test_examples, d.skipped, d.labels
        );
    }
    if let Some(path) = &test {
        let d = client
            .load_test_file(path)
            .with_context(|| format!("loading test data {}", path.display()))?;
        println!("test data: {} examples", d.test_examples);
    }
    if client.status().client_id.is_none() {
        anyhow::bail!(
            "not enrolled: run `crosslm-client enroll --token ...` with this data dir ({}) first",
            client.config().data_dir.display()
        );
    }
    let rt = runtime()?;
    rt.block_on(async move {
        // Ctrl-C: first asks the client to stop at a safe point, second quits.
        let c = client.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("Ctrl-C: leaving after the current step (Ctrl-C again to quit now)");
                stop2.store(true, Ordering::SeqCst);
                c.cancel();
                if tokio::signal::ctrl_c().await.is_ok() {
                    eprintln!("Ctrl-C again: quitting (the checkpoint on disk is kept)");
                    std::process::exit(130);
                }
            }
        });
        if client.status().checkpoint.is_none() {
            if data.is_none() {
                anyhow::bail!(
                    "no checkpoint at {} and no --data to train one: pass --checkpoint or --data",
                    client.checkpoint_dir().display()
                );
            }
            let s = client.train().await?;
            println!(
                "checkpoint written to {} ({} epochs, {:.1}s)",
                client.checkpoint_dir().display(),
                s.epochs,
                s.seconds
            );
        }
        if stop.load(Ordering::SeqCst) {
            println!("stopped before joining");
            return Ok(());
        }
        let s = client.join(a.rounds).await?;
        bars.clear();
        println!(
            "took part in {} round(s){}; last round {}, local accuracy {}",
            s.rounds,
            if s.cancelled { " (stopped)" } else { "" },
            s.last_round.map_or("-".into(), |r| r.to_string()),
            s.local_accuracy.map_or("-".into(), |a| format!("{a:.4}"))
        );
        Ok(())
    })
}

/// Runs `status`: the local state, no network.
pub fn status_cmd(a: StatusArgs) -> anyhow::Result<()> {
    let file = a.common.file()?;
    let mut cfg = a.common.client_config(&file);
    if let Some(c) = a.checkpoint.clone() {
        cfg.checkpoint_dir = Some(c);
    }
    let client = Client::open(cfg)?;
    let s = client.status();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print_status(&s);
    }
    Ok(())
}

fn print_status(s: &Status) {
    let or_none = |o: Option<String>| o.unwrap_or_else(|| "-".into());
    println!("data dir:         {}", s.data_dir.display());
    println!(
        "enrolled:         {}",
        match (&s.client_id, &s.coordinator) {
            (Some(id), Some(c)) => format!("as {id} with {c}"),
            (Some(id), None) => format!("as {id}"),
            _ => "no".into(),
        }
    );
    println!(
        "checkpoint:       {}",
        match (&s.checkpoint, s.arch) {
            (Some(p), Some(arch)) => format!("{} ({arch}, labels {:?})", p.display(), s.labels),
            _ => "none".into(),
        }
    );
    println!("rounds completed: {}", s.rounds_completed);
    println!(
        "last round:       {}",
        or_none(s.last_round.map(|r| r.to_string()))
    );
    println!(
        "local accuracy:   {}",
        or_none(s.local_accuracy.map(|a| format!("{a:.4}")))
    );
}
