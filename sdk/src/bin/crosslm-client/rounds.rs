//! `crosslm-client enroll` and `crosslm-client join`: taking part in CrossLM rounds.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use crosslm_sdk::data::{self, BadRows, TableSpec};
use crosslm_sdk::participant::{Learning, SlmScorer};
use crosslm_sdk::protocol::ClientInfo;
use crosslm_sdk::slm::{Backend, TrainConfig, TrainExample, load_checkpoint};
use crosslm_sdk::transport::{EnrollToken, Identity, Session, enroll, participate};

/// Arguments of `enroll`.
#[derive(clap::Args)]
pub struct EnrollArgs {
    /// Coordinator address (host:port, UDP).
    #[arg(long)]
    pub coordinator: SocketAddr,
    /// The one-time token the coordinator printed.
    #[arg(long)]
    pub token: String,
    /// Where this client keeps its identity and checkpoints.
    #[arg(long, default_value = "crosslm-client-data")]
    pub data_dir: PathBuf,
    /// Name of this device, as the coordinator will log it.
    #[arg(long, default_value = "desktop")]
    pub name: String,
}

/// Arguments of `join`.
#[derive(clap::Args)]
pub struct JoinArgs {
    /// Coordinator address (host:port, UDP).
    #[arg(long)]
    pub coordinator: SocketAddr,
    /// Where this client keeps its identity.
    #[arg(long, default_value = "crosslm-client-data")]
    pub data_dir: PathBuf,
    /// A trained SLM checkpoint (from `slm train`) that scores the samples.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Compute backend for the SLM.
    #[arg(long, value_enum, default_value = "flex")]
    pub backend: Backend,
    /// Number of private examples behind the checkpoint (the aggregation weight).
    #[arg(long, default_value_t = 0)]
    pub n_private: u64,
    /// Name of this device.
    #[arg(long, default_value = "desktop")]
    pub name: String,
    /// Leave after this many rounds (default: until Ctrl-C).
    #[arg(long)]
    pub rounds: Option<u64>,
    /// Private labeled data: when given, the SLM trains after each round on it plus the
    /// round's scored synthetic samples (CrossLM), and the checkpoint is updated.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Local test data: its accuracy is reported to the coordinator after each round.
    #[arg(long)]
    pub test: Option<PathBuf>,
    /// Training epochs per round.
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
    /// Synthetic samples below this aggregated quality are not trained on.
    #[arg(long, default_value_t = 0.5)]
    pub min_quality: f32,
}

fn load_labeled(
    path: &std::path::Path,
    labels: &[String],
) -> anyhow::Result<crosslm_sdk::data::Dataset> {
    let spec = TableSpec {
        labels: Some(labels.to_vec()),
        ..TableSpec::default()
    };
    let loaded = data::load_auto(path, None, &spec, BadRows::Skip)
        .with_context(|| format!("loading {}", path.display()))?;
    if !loaded.skipped.is_empty() {
        tracing::warn!(file = %path.display(), skipped = loaded.skipped.len(), "bad rows skipped");
    }
    Ok(loaded.dataset)
}

/// Runs `enroll`.
pub fn enroll_cmd(a: EnrollArgs) -> anyhow::Result<()> {
    let token = EnrollToken::parse(&a.token)?;
    let info = ClientInfo {
        name: a.name,
        slm_arch: String::new(),
        n_private: 0,
    };
    let rt = tokio::runtime::Runtime::new()?;
    let id = rt.block_on(enroll(a.coordinator, &token, info))?;
    id.save(&a.data_dir)?;
    println!(
        "enrolled as {} (identity in {})",
        id.client_id,
        Identity::path(&a.data_dir).display()
    );
    Ok(())
}

/// Runs `join`.
pub fn join_cmd(a: JoinArgs) -> anyhow::Result<()> {
    let id =
        Identity::load(&a.data_dir).context("no identity: run `crosslm-client enroll` first")?;
    let slm = load_checkpoint(&a.checkpoint, a.backend)
        .with_context(|| format!("loading checkpoint {}", a.checkpoint.display()))?;
    let arch = slm.arch();
    let labels = slm.labels().to_vec();
    let mut scorer = SlmScorer::new(slm);
    let mut n_private = a.n_private;
    if let Some(path) = &a.data {
        let private = load_labeled(path, &labels)?;
        n_private = private.len() as u64;
        let test = a
            .test
            .as_ref()
            .map(|t| load_labeled(t, &labels))
            .transpose()?
            .map(|d| d.examples.into_iter().map(|e| (e.text, e.label)).unzip());
        let mut train = TrainConfig::for_arch(arch);
        train.epochs = a.epochs;
        // Tiny private sets: no validation split, train on all of it.
        train.validation_fraction = 0.0;
        scorer = scorer.with_learning(Learning {
            private: private
                .examples
                .iter()
                .map(|e| TrainExample::hard(e.text.clone(), e.label, labels.len()))
                .collect(),
            test,
            train,
            min_quality: a.min_quality,
            use_scores: true,
            checkpoint: Some(a.checkpoint.clone()),
        });
    }
    let info = ClientInfo {
        name: a.name,
        slm_arch: arch.to_string(),
        n_private,
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let mut session = Session::connect(a.coordinator, &id, info).await?;
        tracing::info!(
            client = session.client_id(),
            "joined; waiting for rounds (Ctrl-C to leave)"
        );
        tokio::select! {
            r = participate(&mut session, scorer, a.rounds) => {
                let (_, n) = r?;
                println!("took part in {n} round(s)");
            }
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("Ctrl-C: leaving");
            }
        }
        session.close().await;
        Ok(())
    })
}
