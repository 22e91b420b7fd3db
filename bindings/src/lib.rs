//! crosslm client for mobile apps and other languages: the SDK's high-level
//! [`crosslm_sdk::client::Client`] exported with uniffi proc-macros, so that Kotlin (Android),
//! Swift (iOS) and Python get the same API as the desktop client.
//!
//! Long operations are `async` (Kotlin `suspend`, Swift `async`, Python coroutines) and run on
//! one Tokio runtime owned by this library, so the foreign side needs no Rust executor.
//! Progress arrives through the foreign-implemented [`ProgressListener`]; errors are the flat
//! [`CrossLmError`] whose message says what went wrong.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crosslm_sdk::client::{self, Client, ClientConfig};
use crosslm_sdk::privacy::PrivacyFloor;
use crosslm_sdk::protocol::ErrorCode;
use crosslm_sdk::slm::{Arch, Backend};
use crosslm_sdk::transport::Reconnect;

uniffi::setup_scaffolding!();

/// Every error of the bindings: the kind, a message, and for a refusal the coordinator's code.
#[derive(Debug, thiserror::Error, uniffi::Error)]
pub enum CrossLmError {
    /// A setting or argument is invalid.
    #[error("{message}")]
    InvalidInput {
        /// What went wrong.
        message: String,
    },
    /// A file could not be read or written.
    #[error("{message}")]
    Io {
        /// What went wrong.
        message: String,
    },
    /// A data file or rows are malformed or unusable.
    #[error("{message}")]
    Data {
        /// What went wrong.
        message: String,
    },
    /// The model is missing, corrupt or does not fit.
    #[error("{message}")]
    Model {
        /// What went wrong.
        message: String,
    },
    /// The model's checkpoint could not be written or replaced.
    #[error("{message}")]
    Checkpoint {
        /// What went wrong.
        message: String,
    },
    /// Enrollment failed (malformed token, identity unusable).
    #[error("{message}")]
    Enrollment {
        /// What went wrong.
        message: String,
    },
    /// The coordinator refused a request (e.g. an unknown or used token): its code and reason.
    #[error("{message}")]
    Refused {
        /// The coordinator's code.
        code: RefusalCode,
        /// Its reason.
        message: String,
    },
    /// The coordinator could not be reached or the connection broke.
    #[error("{message}")]
    Network {
        /// What went wrong.
        message: String,
    },
    /// The coordinator broke the protocol (a malformed frame, an unexpected message).
    #[error("{message}")]
    Protocol {
        /// What went wrong.
        message: String,
    },
    /// A step is missing first (enroll, load data, train).
    #[error("{message}")]
    NotReady {
        /// What went wrong.
        message: String,
    },
    /// Another long operation is running.
    #[error("{message}")]
    Busy {
        /// What went wrong.
        message: String,
    },
    /// The operation was cancelled.
    #[error("{message}")]
    Cancelled {
        /// What went wrong.
        message: String,
    },
    /// A bug or crash inside the SDK, not the caller's input.
    #[error("{message}")]
    Internal {
        /// What went wrong.
        message: String,
    },
}

/// Why the coordinator refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum RefusalCode {
    /// Client and coordinator speak different protocol versions.
    VersionMismatch,
    /// A message the coordinator could not read.
    Malformed,
    /// A message over the size limit.
    TooLarge,
    /// No valid client certificate.
    Unauthenticated,
    /// An unknown or used enrollment token.
    BadToken,
    /// Scores that break the round's rules.
    BadScores,
    /// The coordinator failed.
    Internal,
}

impl From<ErrorCode> for RefusalCode {
    fn from(c: ErrorCode) -> Self {
        match c {
            ErrorCode::VersionMismatch => Self::VersionMismatch,
            ErrorCode::Malformed => Self::Malformed,
            ErrorCode::TooLarge => Self::TooLarge,
            ErrorCode::Unauthenticated => Self::Unauthenticated,
            ErrorCode::BadToken => Self::BadToken,
            ErrorCode::BadScores => Self::BadScores,
            ErrorCode::Internal => Self::Internal,
        }
    }
}

impl From<crosslm_sdk::Error> for CrossLmError {
    fn from(e: crosslm_sdk::Error) -> Self {
        use crosslm_sdk::Error as E;
        let message = e.to_string();
        match e {
            E::File { .. } | E::Io(_) => Self::Io { message },
            E::Model(_) | E::Tokenizer(_) => Self::Model { message },
            E::Checkpoint { .. } => Self::Checkpoint { message },
            E::Enroll(_) => Self::Enrollment { message },
            E::Session(_) => Self::Network { message },
            E::Protocol(_) => Self::Protocol { message },
            E::Refused(r) => Self::Refused {
                code: r.code.into(),
                message,
            },
            E::Data(_) => Self::Data { message },
            E::InvalidInput(_) => Self::InvalidInput { message },
            E::NotReady(_) => Self::NotReady { message },
            E::Busy(_) => Self::Busy { message },
            E::Cancelled => Self::Cancelled { message },
            E::Internal(_) => Self::Internal { message },
        }
    }
}

type Result<T> = std::result::Result<T, CrossLmError>;

/// SLM architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum SlmArch {
    /// all-MiniLM-L6-v2 fine-tuned (22.7M parameters): better, heavier.
    Minilm,
    /// Light bag of wordpieces: for weak devices.
    Bag,
}

/// Where the SLM computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum SlmBackend {
    /// CPU (always available).
    Cpu,
    /// GPU through wgpu (Vulkan on Android, Metal on iOS).
    Gpu,
}

/// How a [`CrossLmClient`] is set up; [`default_settings`] fills in the defaults.
#[derive(Debug, Clone, uniffi::Record)]
pub struct ClientSettings {
    /// Coordinator `host:port`; may be left out after enrollment.
    pub coordinator: Option<String>,
    /// App-private directory for the identity, checkpoint and state.
    pub data_dir: String,
    /// Device name, as the coordinator logs it.
    pub name: String,
    /// Architecture of a fresh model.
    pub arch: SlmArch,
    /// Compute backend.
    pub backend: SlmBackend,
    /// Directory with the MiniLM `tokenizer.json` (and weights for MiniLM), shipped with the app.
    pub model_dir: String,
    /// Epochs of `train` (`None`: the architecture's default).
    pub train_epochs: Option<u32>,
    /// Epochs of the training after each round (`None`: the architecture's default).
    pub round_epochs: Option<u32>,
    /// Fraction of private data held out to measure local accuracy.
    pub test_fraction: f64,
    /// Synthetic samples below this quality (the intended label's share against its
    /// strongest rival: the aggregated quality with two labels) are not trained on.
    pub min_quality: f32,
    /// How long to wait for the coordinator to answer, ms.
    pub connect_timeout_ms: u64,
    /// Most threads for training and scoring (`None`: every core); fewer leave cores to the
    /// app and draw less power.
    pub threads: Option<u32>,
    /// The least Gaussian noise this device adds to the scores it sends, whatever the
    /// coordinator asks (0: what the coordinator asks); see the SDK's `privacy` module.
    pub min_noise_multiplier: f64,
    /// The most epsilon the device's scores may spend; rounds past it are refused.
    pub epsilon_budget: Option<f64>,
    /// The delta the device accounts its epsilon at.
    pub privacy_delta: f64,
    /// How many times `join` tries again after losing the coordinator (a crash, a network
    /// change), waiting 0.25-0.5 s before the first try, twice that before each next one, at
    /// most 30 s, with jitter; 0: give up at once. A refusal is never tried again.
    pub reconnect_attempts: u32,
}

/// Default settings for a data dir.
#[uniffi::export]
pub fn default_settings(data_dir: String) -> ClientSettings {
    let d = ClientConfig::default();
    ClientSettings {
        coordinator: None,
        data_dir,
        name: d.name,
        arch: SlmArch::Bag,
        backend: SlmBackend::Cpu,
        model_dir: d.model_dir.display().to_string(),
        train_epochs: None,
        round_epochs: d.round_epochs.map(|e| e as u32),
        test_fraction: d.test_fraction,
        min_quality: d.min_quality,
        connect_timeout_ms: d.connect_timeout.as_millis() as u64,
        threads: None,
        min_noise_multiplier: d.privacy.min_noise_multiplier,
        epsilon_budget: d.privacy.epsilon_budget,
        privacy_delta: d.privacy.delta,
        reconnect_attempts: d.reconnect.attempts,
    }
}

/// The library's version.
#[uniffi::export]
pub fn version() -> String {
    env!("CARGO_PKG_VERSION").into()
}

/// What the client is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum Activity {
    /// Nothing.
    Idle,
    /// Trading a token for a certificate.
    Enrolling,
    /// Training on the private data.
    Training,
    /// Connecting to the coordinator.
    Connecting,
    /// Waiting for a round or its result.
    Waiting,
    /// Scoring a round's samples.
    Scoring,
    /// Training on a finished round's result.
    Learning,
    /// A round finished for this client.
    RoundFinished,
    /// Leaving the coordinator.
    Stopping,
}

impl From<client::Activity> for Activity {
    fn from(a: client::Activity) -> Self {
        use client::Activity as A;
        match a {
            A::Idle => Self::Idle,
            A::Enrolling => Self::Enrolling,
            A::Training => Self::Training,
            A::Connecting => Self::Connecting,
            A::Waiting => Self::Waiting,
            A::Scoring => Self::Scoring,
            A::Learning => Self::Learning,
            A::RoundFinished => Self::RoundFinished,
            A::Stopping => Self::Stopping,
        }
    }
}

/// One progress report.
#[derive(Debug, Clone, uniffi::Record)]
pub struct ProgressEvent {
    /// What is happening.
    pub activity: Activity,
    /// The round, while taking part in one.
    pub round: Option<u64>,
    /// Units done (training steps, scored samples).
    pub done: u64,
    /// Units planned (0: unknown).
    pub total: u64,
    /// Loss of the last training step.
    pub loss: Option<f32>,
    /// Local accuracy, when just measured.
    pub accuracy: Option<f32>,
    /// A line for people.
    pub message: String,
}

/// Implemented by the app: receives progress, on a background thread.
#[uniffi::export(with_foreign)]
pub trait ProgressListener: Send + Sync {
    /// One report.
    fn on_progress(&self, event: ProgressEvent);
}

/// Adapts a foreign listener to the SDK's.
struct Forward(Arc<dyn ProgressListener>);

impl client::ProgressListener for Forward {
    fn on_progress(&self, p: &client::Progress) {
        self.0.on_progress(ProgressEvent {
            activity: p.activity.into(),
            round: p.round,
            done: p.done,
            total: p.total,
            loss: p.loss,
            accuracy: p.accuracy,
            message: p.message.clone(),
        });
    }
}

/// A snapshot of the client.
#[derive(Debug, Clone, uniffi::Record)]
pub struct ClientStatus {
    /// Id assigned at enrollment.
    pub client_id: Option<String>,
    /// The coordinator.
    pub coordinator: Option<String>,
    /// Checkpoint directory, if it holds a model.
    pub checkpoint: Option<String>,
    /// The model's labels.
    pub labels: Vec<String>,
    /// Private training examples loaded.
    pub private_examples: u64,
    /// Local test examples loaded.
    pub test_examples: u64,
    /// What the client is doing.
    pub activity: Activity,
    /// The round in progress.
    pub round: Option<u64>,
    /// Progress of the current activity, 0 to 1.
    pub progress: f32,
    /// Rounds taken part in, over all runs.
    pub rounds_completed: u64,
    /// The last of them.
    pub last_round: Option<u64>,
    /// Local accuracy after the last training.
    pub local_accuracy: Option<f32>,
    /// Paused: rounds that open are sat out until `resume()`.
    pub paused: bool,
    /// Epsilon the device's scores have spent so far (at its delta).
    pub epsilon_spent: f64,
    /// The device's epsilon budget, if it has one.
    pub epsilon_budget: Option<f64>,
}

/// What loading private data gave.
#[derive(Debug, Clone, uniffi::Record)]
pub struct DataSummary {
    /// Training examples.
    pub examples: u64,
    /// Held-out test examples.
    pub test_examples: u64,
    /// Label names.
    pub labels: Vec<String>,
    /// Rows skipped.
    pub skipped: u64,
}

impl From<client::DataSummary> for DataSummary {
    fn from(d: client::DataSummary) -> Self {
        Self {
            examples: d.examples,
            test_examples: d.test_examples,
            labels: d.labels,
            skipped: d.skipped,
        }
    }
}

/// One labeled text of private data.
#[derive(Debug, Clone, uniffi::Record)]
pub struct LabeledText {
    /// The text.
    pub text: String,
    /// Its label name.
    pub label: String,
}

/// What `train` did.
#[derive(Debug, Clone, uniffi::Record)]
pub struct TrainSummary {
    /// Epochs run.
    pub epochs: u64,
    /// Optimizer steps.
    pub steps: u64,
    /// Training loss of the last epoch.
    pub train_loss: f32,
    /// Local accuracy after training.
    pub local_accuracy: Option<f32>,
    /// Seconds spent training.
    pub seconds: f64,
}

/// What `join` did.
#[derive(Debug, Clone, uniffi::Record)]
pub struct JoinSummary {
    /// Rounds finished during the call.
    pub rounds: u64,
    /// The last round taken part in.
    pub last_round: Option<u64>,
    /// Local accuracy after it.
    pub local_accuracy: Option<f32>,
    /// Whether `cancel` ended it.
    pub cancelled: bool,
}

/// The runtime that drives the network and the SDK's worker threads; the foreign executor
/// only awaits its join handles.
fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RT: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("crosslm")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| CrossLmError::Io {
        message: format!("cannot start the runtime: {e}"),
    })
}

/// Runs an SDK future on the library's runtime.
async fn on_runtime<T: Send + 'static>(
    f: impl std::future::Future<Output = crosslm_sdk::Result<T>> + Send + 'static,
) -> Result<T> {
    runtime()?
        .spawn(f)
        .await
        .map_err(|e| CrossLmError::Internal {
            message: format!("task failed: {e}"),
        })?
        .map_err(Into::into)
}

/// Cancels the client's operation if the foreign caller drops the call before it ends (a
/// Kotlin coroutine or Swift task cancelled): the operation runs as a task of the library's
/// runtime, which would otherwise go on, holding the client busy, with nobody awaiting it.
struct CancelOnDrop(Option<Arc<Client>>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.cancel();
        }
    }
}

/// Runs one of the client's long operations on the library's runtime (see [`CancelOnDrop`]).
async fn client_op<T: Send + 'static>(
    client: &Arc<Client>,
    f: impl std::future::Future<Output = crosslm_sdk::Result<T>> + Send + 'static,
) -> Result<T> {
    let mut guard = CancelOnDrop(Some(client.clone()));
    let r = on_runtime(f).await;
    guard.0 = None;
    r
}

/// The crosslm client: enroll, load private data, train, take part in rounds.
#[derive(uniffi::Object)]
pub struct CrossLmClient {
    inner: Arc<Client>,
}

#[uniffi::export]
impl CrossLmClient {
    /// Opens a client on its data dir (created if needed).
    #[uniffi::constructor]
    pub fn new(settings: ClientSettings) -> Result<Arc<Self>> {
        init_logging();
        let d = ClientConfig::default();
        let config = ClientConfig {
            coordinator: settings.coordinator.filter(|c| !c.trim().is_empty()),
            data_dir: PathBuf::from(settings.data_dir),
            name: settings.name,
            arch: match settings.arch {
                SlmArch::Minilm => Arch::Minilm,
                SlmArch::Bag => Arch::Bag,
            },
            backend: match settings.backend {
                SlmBackend::Cpu => Backend::Flex,
                SlmBackend::Gpu => Backend::Wgpu,
            },
            model_dir: PathBuf::from(settings.model_dir),
            train_epochs: settings.train_epochs.map(|e| e as usize),
            round_epochs: settings.round_epochs.map(|e| e as usize),
            test_fraction: settings.test_fraction,
            min_quality: settings.min_quality,
            connect_timeout: Duration::from_millis(settings.connect_timeout_ms),
            threads: settings.threads.map(|t| t as usize),
            privacy: PrivacyFloor {
                min_noise_multiplier: settings.min_noise_multiplier,
                epsilon_budget: settings.epsilon_budget,
                delta: settings.privacy_delta,
                noise_seed: None,
            },
            reconnect: Reconnect {
                attempts: settings.reconnect_attempts,
                ..d.reconnect
            },
            ..d
        };
        Ok(Arc::new(Self {
            inner: Arc::new(Client::open(config)?),
        }))
    }

    /// Sets the progress listener (replacing any earlier one).
    pub fn set_listener(&self, listener: Arc<dyn ProgressListener>) {
        self.inner.set_listener(Some(Arc::new(Forward(listener))));
    }

    /// Removes the progress listener.
    pub fn clear_listener(&self) {
        self.inner.set_listener(None);
    }

    /// Enrolls with the coordinator using a one-time token; returns the client id.
    pub async fn enroll(&self, token: String) -> Result<String> {
        let c = self.inner.clone();
        client_op(&self.inner, async move { c.enroll(&token).await }).await
    }

    /// Loads private labeled data from a file (CSV/TSV/JSONL with `text` and `label`, or a
    /// benchmark format).
    pub fn load_data_file(&self, path: String) -> Result<DataSummary> {
        Ok(self
            .inner
            .load_data_file(std::path::Path::new(&path))?
            .into())
    }

    /// Loads private labeled data from rows.
    pub fn load_data_rows(&self, rows: Vec<LabeledText>) -> Result<DataSummary> {
        let rows: Vec<(String, String)> = rows.into_iter().map(|r| (r.text, r.label)).collect();
        Ok(self.inner.load_data_rows(&rows)?.into())
    }

    /// Loads a separate local test file.
    pub fn load_test_file(&self, path: String) -> Result<DataSummary> {
        Ok(self
            .inner
            .load_test_file(std::path::Path::new(&path))?
            .into())
    }

    /// Trains the SLM on the private data and saves the checkpoint.
    pub async fn train(&self) -> Result<TrainSummary> {
        let c = self.inner.clone();
        let s = client_op(&self.inner, async move { c.train().await }).await?;
        Ok(TrainSummary {
            epochs: s.epochs,
            steps: s.steps,
            train_loss: s.train_loss,
            local_accuracy: s.local_accuracy,
            seconds: s.seconds,
        })
    }

    /// Takes part in rounds until `rounds` results arrived (`None`: until cancelled).
    pub async fn join(&self, rounds: Option<u64>) -> Result<JoinSummary> {
        let c = self.inner.clone();
        let s = client_op(&self.inner, async move { c.join(rounds).await }).await?;
        Ok(JoinSummary {
            rounds: s.rounds,
            last_round: s.last_round,
            local_accuracy: s.local_accuracy,
            cancelled: s.cancelled,
        })
    }

    /// Stops the running operation at its next safe point (the checkpoint is kept).
    pub fn cancel(&self) {
        self.inner.cancel();
    }

    /// Sits out rounds from now on while staying joined (no scoring, no training) until
    /// `resume()`: for an app going to the background or low on battery.
    pub fn pause(&self) {
        self.inner.pause();
    }

    /// Takes part in rounds again after `pause()`.
    pub fn resume(&self) {
        self.inner.resume();
    }

    /// A snapshot of the client.
    pub fn status(&self) -> ClientStatus {
        let s = self.inner.status();
        ClientStatus {
            client_id: s.client_id,
            coordinator: s.coordinator,
            checkpoint: s.checkpoint.map(|p| p.display().to_string()),
            labels: s.labels,
            private_examples: s.private_examples,
            test_examples: s.test_examples,
            activity: s.activity.into(),
            round: s.round,
            progress: s.progress,
            rounds_completed: s.rounds_completed,
            last_round: s.last_round,
            local_accuracy: s.local_accuracy,
            paused: s.paused,
            epsilon_spent: s.epsilon_spent,
            epsilon_budget: s.epsilon_budget,
        }
    }
}

/// Logs to stderr once, filtered by `RUST_LOG` (default: warnings), for apps' debug consoles.
fn init_logging() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_writer(std::io::stderr)
            .try_init();
    });
}
