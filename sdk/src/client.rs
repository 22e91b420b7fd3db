//! The high-level client: one object that an app (through the uniffi bindings) or the desktop
//! binary drives. Configure it, enroll with a token, load private data, train, take part in
//! rounds until stopped, read its status, cancel. Long operations report [`Progress`] to a
//! [`ProgressListener`]; every error is the SDK's [`Error`].
//!
//! What the client keeps in its data dir: `identity.json` (certificate and key), `checkpoint/`
//! (the SLM, replaced atomically after each training), and `state.json` (enrolled coordinator,
//! last round taken part in, last local accuracy).
//!
//! Over 600 lines: the one object apps drive (configuration, enrollment, data, training, rounds,
//! status, cancel) with its checkpoint and state files, and their tests; the round loop and the
//! method's rules live in `rounds.rs` and `method.rs`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::data::{self, BadRows, Dataset, Example, TableSpec};
use crate::error::SessionError;
use crate::participant::{Learning, SlmScorer};
use crate::protocol::{ClientInfo, LearnSettings, TaskInfo};
use crate::rounds::{RoundHooks, cancelled, run_rounds};
use crate::slm::checkpoint::swap;
use crate::slm::{
    self, Arch, Backend, CheckpointMeta, Slm, TrainConfig, TrainExample, TrainProgress,
};
use crate::transport::{EnrollToken, Identity, Session};
use crate::{Error, Result};

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

const STATE_FILE: &str = "state.json";
/// Below this many private examples there is no validation split: every example trains.
const MIN_FOR_VALIDATION: usize = 200;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not make status unreadable: the data is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::File {
        path: path.to_path_buf(),
        source,
    }
}

/// The live part of the status, and the listener; shared with worker threads.
struct Reporter {
    listener: Mutex<Option<Arc<dyn ProgressListener>>>,
    live: Mutex<Live>,
}

#[derive(Clone, Copy)]
struct Live {
    activity: Activity,
    round: Option<u64>,
    done: u64,
    total: u64,
}

impl Reporter {
    fn emit(&self, p: Progress) {
        {
            let mut live = lock(&self.live);
            live.activity = p.activity;
            live.done = p.done;
            live.total = p.total;
            if p.round.is_some() {
                live.round = p.round;
            }
        }
        let listener = lock(&self.listener).clone();
        if let Some(l) = listener {
            l.on_progress(&p);
        }
    }

    /// Reports an activity in the current round.
    fn report(&self, activity: Activity, done: u64, total: u64, message: impl Into<String>) {
        let round = lock(&self.live).round;
        self.emit(Progress {
            activity,
            round,
            done,
            total,
            loss: None,
            accuracy: None,
            message: message.into(),
        });
    }

    fn idle(&self) {
        *lock(&self.live) = Live {
            activity: Activity::Idle,
            round: None,
            done: 0,
            total: 0,
        };
    }
}

/// Resets the running-operation slot when an operation ends, however it ends.
struct OpGuard<'a>(&'a Client);

impl Drop for OpGuard<'_> {
    fn drop(&mut self) {
        *lock(&self.0.op) = None;
        self.0.reporter.idle();
    }
}

/// The private data and local test split.
#[derive(Default)]
struct Data {
    private: Option<Dataset>,
    test: Option<Dataset>,
}

/// The high-level client (see the module docs). Methods take `&self`; one long operation
/// (enroll, train, join) runs at a time, the others get [`Error::Busy`].
pub struct Client {
    config: ClientConfig,
    reporter: Arc<Reporter>,
    model: Mutex<Option<Box<dyn Slm>>>,
    data: Mutex<Data>,
    state: Mutex<SavedState>,
    op: Mutex<Option<&'static str>>,
    cancel: watch::Sender<bool>,
}

impl Client {
    /// Opens a client on its data dir (created if needed), reading any saved state.
    pub fn open(config: ClientConfig) -> Result<Self> {
        if config.name.trim().is_empty() {
            return Err(Error::InvalidInput("the device name is empty".into()));
        }
        if !(0.0..1.0).contains(&config.test_fraction) {
            return Err(Error::InvalidInput(format!(
                "test fraction {} is not in [0, 1)",
                config.test_fraction
            )));
        }
        if !(0.0..=1.0).contains(&config.min_quality) {
            return Err(Error::InvalidInput(format!(
                "minimum quality {} is not in [0, 1]",
                config.min_quality
            )));
        }
        if config.round_epochs == Some(0) || config.train_epochs == Some(0) || config.max_len == 0 {
            return Err(Error::InvalidInput(
                "epochs and max_len must be positive".into(),
            ));
        }
        std::fs::create_dir_all(&config.data_dir).map_err(file_err(&config.data_dir))?;
        let state_path = config.data_dir.join(STATE_FILE);
        let state = match std::fs::read(&state_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                // Only a cache of what happened: a corrupt one is replaced, not fatal.
                tracing::warn!(file = %state_path.display(), error = %e, "corrupt state file, starting afresh");
                SavedState::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => SavedState::default(),
            Err(e) => return Err(file_err(&state_path)(e)),
        };
        let client = Self {
            config,
            reporter: Arc::new(Reporter {
                listener: Mutex::new(None),
                live: Mutex::new(Live {
                    activity: Activity::Idle,
                    round: None,
                    done: 0,
                    total: 0,
                }),
            }),
            model: Mutex::new(None),
            data: Mutex::new(Data::default()),
            state: Mutex::new(state),
            op: Mutex::new(None),
            cancel: watch::channel(false).0,
        };
        swap::recover(&client.checkpoint_dir())?;
        Ok(client)
    }

    /// The configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Where the model is kept.
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.config
            .checkpoint_dir
            .clone()
            .unwrap_or_else(|| self.config.data_dir.join("checkpoint"))
    }

    /// Sets (or clears) the progress listener.
    pub fn set_listener(&self, listener: Option<Arc<dyn ProgressListener>>) {
        *lock(&self.reporter.listener) = listener;
    }

    /// Asks the running operation to stop: `join` leaves at the next safe point (a reply being
    /// scored is abandoned, training after a round finishes and its checkpoint is kept),
    /// `enroll` and connecting stop at once, `train` stops before it starts. No-op when idle.
    pub fn cancel(&self) {
        let op = lock(&self.op);
        if op.is_some() {
            self.cancel.send_replace(true);
        }
    }

    fn begin(&self, name: &'static str) -> Result<OpGuard<'_>> {
        let mut op = lock(&self.op);
        if let Some(running) = *op {
            return Err(Error::Busy(running.into()));
        }
        *op = Some(name);
        self.cancel.send_replace(false);
        Ok(OpGuard(self))
    }

    fn update_state(&self, f: impl FnOnce(&mut SavedState)) -> Result<()> {
        let mut state = lock(&self.state);
        f(&mut state);
        state.updated_unix_ms = now_ms();
        let path = self.config.data_dir.join(STATE_FILE);
        let tmp = path.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(&*state).map_err(|e| Error::Data(e.to_string()))?;
        std::fs::write(&tmp, json).map_err(file_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(file_err(&path))
    }

    /// The coordinator to talk to: configured, else the one enrolled with.
    async fn coordinator(&self) -> Result<(String, SocketAddr)> {
        let name = self
            .config
            .coordinator
            .clone()
            .or_else(|| lock(&self.state).coordinator.clone())
            .ok_or_else(|| {
                Error::NotReady("no coordinator address: configure one (host:port)".into())
            })?;
        let addr = tokio::net::lookup_host(name.clone())
            .await
            .map_err(|e| {
                Error::InvalidInput(format!(
                    "coordinator address {name:?}: {e} (expected host:port)"
                ))
            })?
            .next();
        let addr = addr.ok_or_else(|| {
            Error::InvalidInput(format!("coordinator address {name:?} resolves to nothing"))
        })?;
        Ok((name, addr))
    }

    /// Runs `fut` with the connect timeout, stopping early on cancel.
    async fn connecting<T>(
        &self,
        addr: SocketAddr,
        fut: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let mut rx = self.cancel.subscribe();
        let timeout = self.config.connect_timeout;
        tokio::select! {
            r = tokio::time::timeout(timeout, fut) => r.map_err(|_| {
                Error::from(SessionError::Connect {
                    addr: addr.to_string(),
                    reason: format!("unreachable: no answer within {:.1}s", timeout.as_secs_f64()),
                })
            })?,
            _ = cancelled(&mut rx) => Err(Error::Cancelled),
        }
    }

    /// Enrolls with the coordinator using a one-time token; returns the client id. The
    /// identity is saved in the data dir.
    pub async fn enroll(&self, token: &str) -> Result<String> {
        let _op = self.begin("enroll")?;
        let token = EnrollToken::parse(token)?;
        let (name, addr) = self.coordinator().await?;
        self.reporter
            .report(Activity::Enrolling, 0, 0, format!("enrolling with {addr}"));
        let info = ClientInfo {
            name: self.config.name.clone(),
            slm_arch: self.config.arch.to_string(),
            n_private: 0,
        };
        let id = self
            .connecting(addr, crate::transport::enroll(addr, &token, info))
            .await?;
        id.save(&self.config.data_dir)?;
        let client_id = id.client_id.clone();
        self.update_state(|s| {
            s.coordinator = Some(name);
            s.client_id = Some(client_id.clone());
        })?;
        tracing::info!(client = %client_id, "enrolled");
        Ok(client_id)
    }

    /// Labels of the model (loaded or checkpointed), which loaded data must use.
    fn model_labels(&self) -> Option<Vec<String>> {
        if let Some(m) = lock(&self.model).as_ref() {
            return Some(m.labels().to_vec());
        }
        read_meta(&self.checkpoint_dir()).map(|m| m.labels)
    }

    /// Loads private labeled data from a file (MR, SpamAssassin, R8, CSV/TSV/JSONL with
    /// `text` and `label`); a [`ClientConfig::test_fraction`] of it is held out for the local
    /// accuracy. Rows that are malformed or have a label the model does not know are skipped.
    pub fn load_data_file(&self, path: &Path) -> Result<DataSummary> {
        let (dataset, skipped) = self.load_file(path)?;
        self.set_private(dataset, skipped, &path.display().to_string())
    }

    /// Loads private labeled data from `(text, label)` rows, like [`Client::load_data_file`].
    pub fn load_data_rows(&self, rows: &[(String, String)]) -> Result<DataSummary> {
        let labels = self.model_labels().unwrap_or_else(|| {
            let mut l: Vec<String> = rows.iter().map(|(_, l)| l.clone()).collect();
            l.sort();
            l.dedup();
            l
        });
        let (dataset, skipped) = rows_dataset(rows, labels);
        self.set_private(dataset, skipped, "the rows")
    }

    /// Loads a separate local test file (replacing the held-out split).
    pub fn load_test_file(&self, path: &Path) -> Result<DataSummary> {
        let (dataset, skipped) = self.load_file(path)?;
        self.set_test(dataset, skipped, &path.display().to_string())
    }

    /// Loads a local test split from `(text, label)` rows (replacing the held-out split),
    /// labels as the model or the private data name them.
    pub fn load_test_rows(&self, rows: &[(String, String)]) -> Result<DataSummary> {
        let labels = self
            .model_labels()
            .or_else(|| {
                lock(&self.data)
                    .private
                    .as_ref()
                    .map(|p| p.label_names.clone())
            })
            .ok_or_else(|| {
                Error::NotReady("load private data (or a model) before test rows".into())
            })?;
        let (dataset, skipped) = rows_dataset(rows, labels);
        self.set_test(dataset, skipped, "the test rows")
    }

    fn set_test(&self, dataset: Dataset, skipped: u64, what: &str) -> Result<DataSummary> {
        if dataset.is_empty() {
            return Err(Error::Data(format!(
                "{what}: no usable test examples ({skipped} rows skipped)"
            )));
        }
        let mut data = lock(&self.data);
        if let Some(p) = &data.private
            && p.label_names != dataset.label_names
        {
            return Err(Error::Data(format!(
                "{what}: labels {:?} differ from the private data's {:?}",
                dataset.label_names, p.label_names
            )));
        }
        let summary = DataSummary {
            examples: data.private.as_ref().map_or(0, |p| p.len() as u64),
            test_examples: dataset.len() as u64,
            labels: dataset.label_names.clone(),
            skipped,
        };
        data.test = Some(dataset);
        Ok(summary)
    }

    fn load_file(&self, path: &Path) -> Result<(Dataset, u64)> {
        let spec = TableSpec {
            labels: self.model_labels(),
            ..TableSpec::default()
        };
        let loaded = data::load_auto(path, None, &spec, BadRows::Skip)?;
        Ok((loaded.dataset, loaded.skipped.len() as u64))
    }

    fn set_private(&self, dataset: Dataset, skipped: u64, what: &str) -> Result<DataSummary> {
        if dataset.is_empty() {
            return Err(Error::Data(format!(
                "no usable examples in {what} ({skipped} rows skipped)"
            )));
        }
        if dataset.num_labels() < 2 {
            return Err(Error::Data(format!(
                "{what}: a classifier needs at least two labels, got {:?}",
                dataset.label_names
            )));
        }
        let (private, test) = if self.config.test_fraction > 0.0 {
            dataset.split(self.config.test_fraction, self.config.seed)?
        } else {
            (dataset.clone(), dataset.with_examples(Vec::new()))
        };
        let summary = DataSummary {
            examples: private.len() as u64,
            test_examples: test.len() as u64,
            labels: private.label_names.clone(),
            skipped,
        };
        let mut data = lock(&self.data);
        data.private = Some(private);
        data.test = (!test.is_empty()).then_some(test);
        Ok(summary)
    }

    /// The in-memory model, else the checkpoint, else `None`. Loading is slow: call it from a
    /// blocking thread.
    fn take_model(
        model: Option<Box<dyn Slm>>,
        dir: &Path,
        backend: Backend,
    ) -> Result<Option<Box<dyn Slm>>> {
        match model {
            Some(m) => Ok(Some(m)),
            None if swap::is_checkpoint(dir) => Ok(Some(slm::load_checkpoint(dir, backend)?)),
            None => Ok(None),
        }
    }

    /// Trains the SLM on the loaded private data (a fresh model of the configured
    /// architecture when there is no checkpoint yet), saves the checkpoint and measures the
    /// local accuracy. Reports [`Activity::Training`] per optimizer step.
    pub async fn train(&self) -> Result<TrainSummary> {
        let _op = self.begin("train")?;
        let (private, test) = {
            let data = lock(&self.data);
            (data.private.clone(), data.test.clone())
        };
        let private = private.ok_or_else(|| {
            Error::NotReady("no private data: load a data file or rows first".into())
        })?;
        let loaded = lock(&self.model).take();
        let cfg = self.config.clone();
        let dir = self.checkpoint_dir();
        let reporter = self.reporter.clone();
        let cancel = self.cancel.subscribe();
        let (model, result) = blocking(move || {
            let mut model = None;
            let r = (|| -> Result<TrainSummary> {
                let mut slm = match Self::take_model(loaded, &dir, cfg.backend)? {
                    Some(m) => m,
                    None => slm::new_slm(
                        cfg.arch,
                        &cfg.model_dir,
                        private.label_names.clone(),
                        cfg.max_len,
                        cfg.backend,
                    )?,
                };
                if slm.labels() != private.label_names.as_slice() {
                    let labels = slm.labels().to_vec();
                    model = Some(slm);
                    return Err(Error::Data(format!(
                        "the data's labels {:?} differ from the model's {labels:?}",
                        private.label_names
                    )));
                }
                let mut train = TrainConfig::for_arch(slm.arch());
                if let Some(e) = cfg.train_epochs {
                    train.epochs = e;
                }
                if private.len() < MIN_FOR_VALIDATION {
                    train.validation_fraction = 0.0;
                }
                train.seed = cfg.seed;
                let examples = hard_examples(&private);
                if *cancel.borrow() {
                    model = Some(slm);
                    return Err(Error::Cancelled);
                }
                reporter.report(
                    Activity::Training,
                    0,
                    0,
                    format!("training {} on {} examples", slm.arch(), examples.len()),
                );
                let report = slm.train(&examples, &train, &mut |p| {
                    reporter.emit(Progress {
                        activity: Activity::Training,
                        round: None,
                        done: p.step as u64,
                        total: p.total_steps as u64,
                        loss: Some(p.loss),
                        accuracy: None,
                        message: format!("epoch {}/{}", p.epoch, p.epochs),
                    })
                });
                let report = match report {
                    Ok(r) => r,
                    Err(e) => {
                        model = Some(slm);
                        return Err(e);
                    }
                };
                let saved = swap::save(slm.as_ref(), &dir);
                let acc = test_accuracy(slm.as_ref(), test.as_ref());
                model = Some(slm);
                saved?;
                Ok(TrainSummary {
                    epochs: report.epochs_run as u64,
                    steps: report.steps as u64,
                    train_loss: report.train_loss,
                    local_accuracy: acc?,
                    seconds: report.train_seconds,
                    checkpoint: dir.clone(),
                })
            })();
            // The model stays in memory for join, also after a failed training.
            (model, r)
        })
        .await?;
        restore_model(&self.model, model);
        let summary = result?;
        self.update_state(|s| s.local_accuracy = summary.local_accuracy)?;
        self.reporter.emit(Progress {
            activity: Activity::Training,
            round: None,
            done: summary.steps,
            total: summary.steps,
            loss: Some(summary.train_loss),
            accuracy: summary.local_accuracy,
            message: "trained".into(),
        });
        Ok(summary)
    }

    /// Connects to the coordinator and takes part in rounds: score each batch, send the
    /// scores, and after each result train on it plus the private data (when loaded), save the
    /// checkpoint, report the local accuracy. Returns after `rounds` results, or when
    /// cancelled ([`JoinSummary::cancelled`]).
    pub async fn join(&self, rounds: Option<u64>) -> Result<JoinSummary> {
        let _op = self.begin("join")?;
        let identity = match Identity::load(&self.config.data_dir) {
            Ok(id) => id,
            Err(Error::File { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotReady(
                    "not enrolled: enroll with a token from the coordinator first".into(),
                ));
            }
            Err(e) => return Err(e),
        };
        let (_, addr) = self.coordinator().await?;
        let dir = self.checkpoint_dir();
        let backend = self.config.backend;
        let model = lock(&self.model).take();
        let slm = blocking(move || Self::take_model(model, &dir, backend))
            .await??
            .ok_or_else(|| {
                Error::NotReady(
                    "no model: train on private data first (or point the checkpoint at a trained SLM)"
                        .into(),
                )
            })?;
        let labels = slm.labels().to_vec();
        let arch = slm.arch();
        let (private, test) = {
            let data = lock(&self.data);
            (data.private.clone(), data.test.clone())
        };
        if let Some(p) = &private
            && p.label_names != labels
        {
            let labels_p = p.label_names.clone();
            *lock(&self.model) = Some(slm);
            return Err(Error::Data(format!(
                "the private data's labels {labels_p:?} differ from the model's {labels:?}"
            )));
        }
        let n_private = self
            .config
            .n_private
            .unwrap_or_else(|| private.as_ref().map_or(0, |p| p.len() as u64));
        let mut scorer = SlmScorer::new(slm);
        let learning = private.is_some();
        if let Some(private) = private {
            let mut train = TrainConfig::for_round(arch);
            if let Some(e) = self.config.round_epochs {
                train.epochs = e;
            }
            // Few private examples: no validation split, train on all of it.
            train.validation_fraction = 0.0;
            train.seed = self.config.seed;
            scorer = scorer.with_learning(Learning {
                private: hard_examples(&private),
                test: test.map(|t| t.examples.into_iter().map(|e| (e.text, e.label)).unzip()),
                train,
                defaults: LearnSettings {
                    min_quality: self.config.min_quality,
                    soft_targets: self.config.soft_targets,
                    ..LearnSettings::default()
                },
                checkpoint: Some(swap::sibling(&self.checkpoint_dir(), "new")),
            });
        }
        let reporter = self.reporter.clone();
        let scorer = scorer.with_train_progress(Box::new(move |p: &TrainProgress| {
            reporter.report(
                Activity::Learning,
                p.step as u64,
                p.total_steps as u64,
                format!("epoch {}/{}", p.epoch, p.epochs),
            )
        }));
        let mut scorer = Some(scorer);
        let info = ClientInfo {
            name: self.config.name.clone(),
            slm_arch: arch.to_string(),
            n_private,
        };
        self.reporter
            .report(Activity::Connecting, 0, 0, format!("connecting to {addr}"));
        let r = match self
            .connecting(addr, Session::connect(addr, &identity, info))
            .await
        {
            Ok(mut session) => {
                tracing::info!(client = session.client_id(), "joined; waiting for rounds");
                self.reporter.report(
                    Activity::Waiting,
                    0,
                    0,
                    format!("joined {addr} as {}", session.client_id()),
                );
                let r = self
                    .take_part(&mut session, &mut scorer, rounds, learning)
                    .await;
                self.reporter
                    .report(Activity::Stopping, 0, 0, "leaving the coordinator");
                // Bounded: a vanished coordinator must not hold up leaving.
                let _ = tokio::time::timeout(Duration::from_secs(5), session.close()).await;
                r
            }
            Err(Error::Cancelled) => Ok(0),
            Err(e) => Err(e),
        };
        if let Some(s) = scorer {
            *lock(&self.model) = Some(s.into_inner());
        }
        let rounds_done = r?;
        let state = lock(&self.state).clone();
        Ok(JoinSummary {
            rounds: rounds_done,
            last_round: state.last_round,
            local_accuracy: state.local_accuracy,
            cancelled: *self.cancel.borrow(),
        })
    }

    /// [`Client::join`]'s rounds: the SDK's one round loop with this client's hooks.
    async fn take_part(
        &self,
        session: &mut Session,
        scorer: &mut Option<SlmScorer>,
        rounds: Option<u64>,
        learning: bool,
    ) -> Result<u64> {
        let mut hooks = JoinHooks {
            client: self,
            learning,
        };
        let cancel = self.cancel.subscribe();
        let done = run_rounds(session, scorer, rounds, &mut hooks, Some(cancel)).await?;
        Ok(done.results)
    }

    /// A snapshot of the client.
    pub fn status(&self) -> Status {
        let state = lock(&self.state).clone();
        let live = *lock(&self.reporter.live);
        let (private_examples, test_examples) = {
            let d = lock(&self.data);
            (
                d.private.as_ref().map_or(0, |p| p.len() as u64),
                d.test.as_ref().map_or(0, |p| p.len() as u64),
            )
        };
        let dir = self.checkpoint_dir();
        let meta = read_meta(&dir);
        let client_id = Identity::load(&self.config.data_dir)
            .ok()
            .map(|id| id.client_id)
            .or(state.client_id);
        Status {
            client_id,
            coordinator: self.config.coordinator.clone().or(state.coordinator),
            data_dir: self.config.data_dir.clone(),
            checkpoint: meta.as_ref().map(|_| dir),
            arch: meta.as_ref().map(|m| m.arch),
            labels: meta.map(|m| m.labels).unwrap_or_default(),
            private_examples,
            test_examples,
            activity: live.activity,
            round: live.round,
            progress: if live.total > 0 {
                (live.done as f32 / live.total as f32).clamp(0.0, 1.0)
            } else {
                0.0
            },
            rounds_completed: state.rounds_completed,
            last_round: state.last_round,
            local_accuracy: state.local_accuracy,
        }
    }
}

/// The rows whose label is in `labels` and whose text is not blank; and how many were not.
fn rows_dataset(rows: &[(String, String)], labels: Vec<String>) -> (Dataset, u64) {
    let mut skipped = 0u64;
    let mut examples = Vec::with_capacity(rows.len());
    for (text, label) in rows {
        match labels.iter().position(|l| l == label) {
            Some(i) if !text.trim().is_empty() => examples.push(Example {
                text: text.clone(),
                label: i,
            }),
            _ => skipped += 1,
        }
    }
    let dataset = Dataset {
        label_names: labels,
        examples,
    };
    (dataset, skipped)
}

fn restore_model(slot: &Mutex<Option<Box<dyn Slm>>>, model: Option<Box<dyn Slm>>) {
    if model.is_some() {
        *lock(slot) = model;
    }
}

fn read_meta(dir: &Path) -> Option<CheckpointMeta> {
    let bytes = std::fs::read(dir.join("meta.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn hard_examples(d: &Dataset) -> Vec<TrainExample> {
    d.examples
        .iter()
        .map(|e| TrainExample::hard(e.text.clone(), e.label, d.num_labels()))
        .collect()
}

fn test_accuracy(slm: &dyn Slm, test: Option<&Dataset>) -> Result<Option<f32>> {
    let Some(test) = test.filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    let texts: Vec<&str> = test.examples.iter().map(|e| e.text.as_str()).collect();
    let labels: Vec<usize> = test.examples.iter().map(|e| e.label).collect();
    Ok(Some(slm::accuracy(slm, &texts, &labels)? as f32))
}

/// How [`Client::join`] shows rounds: progress to the listener, state and checkpoint to disk.
struct JoinHooks<'a> {
    client: &'a Client,
    /// The model trains after each round (private data loaded): commit its checkpoint.
    learning: bool,
}

impl RoundHooks for JoinHooks<'_> {
    fn scoring(&mut self, round: u64, task: &TaskInfo, done: usize, total: usize) {
        let message = if done == 0 {
            format!("scoring {total} samples of task {}", task.name)
        } else {
            "scoring".to_string()
        };
        self.client.reporter.emit(Progress {
            activity: Activity::Scoring,
            round: Some(round),
            done: done as u64,
            total: total as u64,
            loss: None,
            accuracy: None,
            message,
        });
    }

    fn scored(&mut self, round: u64) {
        self.client.reporter.report(
            Activity::Waiting,
            0,
            0,
            format!("scores for round {round} sent; waiting for the result"),
        );
    }

    fn learning(&mut self, round: u64) {
        self.client.reporter.report(
            Activity::Learning,
            0,
            0,
            format!("round {round} finished; training on its result"),
        );
    }

    fn learned(&mut self, round: u64, acc: Option<f32>) -> Result<()> {
        if self.learning {
            swap::commit(&self.client.checkpoint_dir())?;
        }
        self.client.update_state(|s| {
            s.rounds_completed += 1;
            s.last_round = Some(round);
            if acc.is_some() {
                s.local_accuracy = acc;
            }
        })?;
        self.client.reporter.emit(Progress {
            activity: Activity::RoundFinished,
            round: Some(round),
            done: 1,
            total: 1,
            loss: None,
            accuracy: acc,
            message: match acc {
                Some(a) => format!("round {round} finished, local accuracy {a:.4}"),
                None => format!("round {round} finished"),
            },
        });
        self.client
            .reporter
            .report(Activity::Waiting, 0, 0, "waiting for the next round");
        Ok(())
    }

    fn failed(&mut self, round: u64, reason: &str) {
        self.client.reporter.report(
            Activity::Waiting,
            0,
            0,
            format!("round {round} failed: {reason}"),
        );
    }
}

/// Runs CPU-heavy work (models are not `Sync`) off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("worker thread failed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_and_missing_steps_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = |f: fn(&mut ClientConfig)| {
            let mut c = ClientConfig {
                data_dir: dir.path().join("c"),
                ..ClientConfig::default()
            };
            f(&mut c);
            c
        };
        assert!(matches!(
            Client::open(cfg(|c| c.test_fraction = 1.5)),
            Err(Error::InvalidInput(_))
        ));
        assert!(matches!(
            Client::open(cfg(|c| c.name = " ".into())),
            Err(Error::InvalidInput(_))
        ));
        let client = Client::open(cfg(|_| {})).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let e = rt.block_on(client.train()).unwrap_err();
        assert!(matches!(e, Error::NotReady(_)), "{e}");
        let e = rt.block_on(client.join(Some(1))).unwrap_err();
        assert!(e.to_string().contains("not enrolled"), "{e}");
        let e = rt.block_on(client.enroll("xlm1.nope")).unwrap_err();
        assert!(e.to_string().contains("malformed token"), "{e}");
        let e = client
            .load_data_file(&dir.path().join("missing.jsonl"))
            .unwrap_err();
        assert!(e.to_string().contains("missing.jsonl"), "{e}");
        let rows = vec![("good".to_string(), "a".to_string())];
        let e = client.load_data_rows(&rows).unwrap_err();
        assert!(e.to_string().contains("two labels"), "{e}");
        assert_eq!(client.status().activity, Activity::Idle);
        assert_eq!(client.status().client_id, None);
    }

    #[test]
    fn corrupt_state_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
        let client = Client::open(ClientConfig {
            data_dir: dir.path().to_path_buf(),
            ..ClientConfig::default()
        })
        .unwrap();
        assert_eq!(client.status().rounds_completed, 0);
        client.update_state(|s| s.last_round = Some(3)).unwrap();
        let again = Client::open(ClientConfig {
            data_dir: dir.path().to_path_buf(),
            ..ClientConfig::default()
        })
        .unwrap();
        assert_eq!(again.status().last_round, Some(3));
    }
}
