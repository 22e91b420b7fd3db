//! What an app exchanges with the [`Client`](super::Client): its configuration, the progress
//! it reports, its status and the summaries its operations return, and the state it saves.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::data;
use crate::privacy::{PrivacyFloor, PrivacyLedger};
use crate::slm::{Arch, Backend};
use crate::transport::Reconnect;

/// How a [`Client`] is set up.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientConfig {
    /// Coordinator address, `host:port` (UDP). May be left out after enrollment: the enrolled
    /// coordinator is remembered in `state.json`.
    pub coordinator: Option<String>,
    /// Where the client keeps its identity, checkpoint and state.
    pub data_dir: PathBuf,
    /// Name of this device, as the coordinator logs it.
    pub name: String,
    /// SLM architecture of a fresh model (a checkpoint keeps its own).
    pub arch: Arch,
    /// Compute backend of the SLM.
    pub backend: Backend,
    /// Directory of the pretrained MiniLM files (the bag model takes its tokenizer from here).
    pub model_dir: PathBuf,
    /// Checkpoint directory (default: `<data_dir>/checkpoint`).
    pub checkpoint_dir: Option<PathBuf>,
    /// Truncate texts to this many tokens.
    pub max_len: usize,
    /// Epochs of [`Client::train`] (default: the architecture's).
    pub train_epochs: Option<usize>,
    /// Epochs of the training after each round when the coordinator sends none (default: the
    /// architecture's, [`TrainConfig::for_round`]).
    pub round_epochs: Option<usize>,
    /// Fraction of loaded private data held out to measure local accuracy (0: none).
    pub test_fraction: f64,
    /// Synthetic samples below this quality are not trained on (the intended label's share
    /// against its strongest rival: the aggregated quality with two labels). A coordinator
    /// that sends [`LearnSettings`] with its rounds overrides this and `soft_targets`.
    pub min_quality: f32,
    /// Train toward the clients' aggregated soft labels instead of the samples' intended
    /// labels (the default, `false`: scores then only select and weight the samples; the
    /// soft labels of weak SLMs are their own uncertain beliefs, see the README's results).
    pub soft_targets: bool,
    /// Aggregation weight announced to the coordinator (default: number of private examples).
    pub n_private: Option<u64>,
    /// How long to wait for the coordinator to answer a connection.
    pub connect_timeout: Duration,
    /// Seed of the test split and training.
    pub seed: u64,
    /// Most threads the SLM's training and scoring use (default: every core). On a phone,
    /// fewer leave cores to the app and draw less power; the work itself never runs on the
    /// caller's thread.
    pub threads: Option<usize>,
    /// The client's own privacy terms for its scores: a noise floor the coordinator cannot
    /// lower and an epsilon budget ([`crate::privacy`]).
    pub privacy: PrivacyFloor,
    /// How [`Client::join`] reconnects after losing its link to the coordinator.
    pub reconnect: Reconnect,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            coordinator: None,
            data_dir: PathBuf::from("crosslm-client-data"),
            name: "device".into(),
            arch: Arch::Minilm,
            backend: Backend::Flex,
            model_dir: data::assets_dir().join("minilm"),
            checkpoint_dir: None,
            max_len: 128,
            train_epochs: None,
            round_epochs: None,
            test_fraction: 0.2,
            min_quality: 0.5,
            soft_targets: false,
            n_private: None,
            connect_timeout: Duration::from_secs(10),
            seed: 42,
            threads: None,
            privacy: PrivacyFloor::default(),
            reconnect: Reconnect::default(),
        }
    }
}

/// What the client is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activity {
    /// Nothing.
    Idle,
    /// Trading a token for a certificate.
    Enrolling,
    /// Training the SLM on the private data ([`Client::train`]).
    Training,
    /// Connecting to the coordinator.
    Connecting,
    /// Connected, waiting for a round or its result.
    Waiting,
    /// Scoring a round's synthetic samples.
    Scoring,
    /// Training on a finished round's scored samples plus the private data.
    Learning,
    /// A round finished for this client (its accuracy is reported).
    RoundFinished,
    /// Leaving the coordinator.
    Stopping,
}

/// One progress report of a long operation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Progress {
    /// What is happening.
    pub activity: Activity,
    /// The round, while taking part in one.
    pub round: Option<u64>,
    /// Units done (training steps, scored samples).
    pub done: u64,
    /// Units planned (0: unknown).
    pub total: u64,
    /// Training loss of the last step.
    pub loss: Option<f32>,
    /// Local test accuracy, when just measured.
    pub accuracy: Option<f32>,
    /// A line for people.
    pub message: String,
}

/// Receives [`Progress`] from a [`Client`]; called from worker threads.
pub trait ProgressListener: Send + Sync {
    /// One report.
    fn on_progress(&self, progress: &Progress);
}

impl<F: Fn(&Progress) + Send + Sync> ProgressListener for F {
    fn on_progress(&self, progress: &Progress) {
        self(progress)
    }
}

/// What `state.json` keeps between runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SavedState {
    /// The coordinator enrolled with.
    pub coordinator: Option<String>,
    /// The id it assigned.
    pub client_id: Option<String>,
    /// Rounds this client scored and learned from.
    pub rounds_completed: u64,
    /// The last of them.
    pub last_round: Option<u64>,
    /// Local test accuracy after the last training.
    pub local_accuracy: Option<f32>,
    /// The rounds scored with noise (or under a budget): the privacy loss so far.
    pub privacy: PrivacyLedger,
    /// When this was written, ms since the Unix epoch.
    pub updated_unix_ms: u64,
}

/// A snapshot of the client: persisted state plus what it is doing now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    /// The id the coordinator assigned (enrolled) or `None`.
    pub client_id: Option<String>,
    /// The coordinator (configured, else enrolled with).
    pub coordinator: Option<String>,
    /// The data dir.
    pub data_dir: PathBuf,
    /// The checkpoint directory, if it holds a model.
    pub checkpoint: Option<PathBuf>,
    /// The checkpoint's architecture.
    pub arch: Option<Arch>,
    /// The checkpoint's labels.
    pub labels: Vec<String>,
    /// Private examples loaded (training part).
    pub private_examples: u64,
    /// Local test examples loaded.
    pub test_examples: u64,
    /// What the client is doing.
    pub activity: Activity,
    /// The round in progress.
    pub round: Option<u64>,
    /// Progress of the current activity, 0 to 1 (0 when unknown).
    pub progress: f32,
    /// Rounds scored and learned from, over all runs.
    pub rounds_completed: u64,
    /// The last of them.
    pub last_round: Option<u64>,
    /// Local test accuracy after the last training.
    pub local_accuracy: Option<f32>,
    /// [`Client::pause`]d: rounds that open are sat out until [`Client::resume`].
    pub paused: bool,
    /// Epsilon the client's scores have spent so far (at [`Status::privacy_delta`]); infinite
    /// once a round went out without noise under a budget, 0 before any.
    pub epsilon_spent: f64,
    /// The client's epsilon budget, if it has one.
    pub epsilon_budget: Option<f64>,
    /// The delta the client accounts at.
    pub privacy_delta: f64,
}

/// What loading private data gave.
#[derive(Debug, Clone, PartialEq)]
pub struct DataSummary {
    /// Training examples kept on the device.
    pub examples: u64,
    /// Held-out local test examples.
    pub test_examples: u64,
    /// Label names, in model order.
    pub labels: Vec<String>,
    /// Rows skipped as malformed or with an unknown label.
    pub skipped: u64,
}

/// What [`Client::train`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    /// Epochs run.
    pub epochs: u64,
    /// Optimizer steps.
    pub steps: u64,
    /// Mean training loss of the last epoch.
    pub train_loss: f32,
    /// Local test accuracy after training, if there is a test split.
    pub local_accuracy: Option<f32>,
    /// Wall time of the training steps, seconds.
    pub seconds: f64,
    /// Where the model was saved.
    pub checkpoint: PathBuf,
}

/// What [`Client::join`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinSummary {
    /// Rounds whose result arrived during this call.
    pub rounds: u64,
    /// The last round taken part in (over all runs).
    pub last_round: Option<u64>,
    /// Local test accuracy after the last round.
    pub local_accuracy: Option<f32>,
    /// Whether [`Client::cancel`] ended it.
    pub cancelled: bool,
}
