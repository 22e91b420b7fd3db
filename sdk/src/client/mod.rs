//! The high-level client: one object that an app (through the uniffi bindings) or the desktop
//! binary drives. Configure it, enroll with a token, load private data, train, take part in
//! rounds until stopped, read its status, cancel. Long operations report [`Progress`] to a
//! [`ProgressListener`]; every error is the SDK's [`Error`].
//!
//! What the client keeps in its data dir: `identity.json` (certificate and key), `checkpoint/`
//! (the SLM, replaced atomically after each training), and `state.json` (enrolled coordinator,
//! last round taken part in, last local accuracy).
//!
//! Here: the object, enrollment, data, status and cancel. What it exchanges with an app is in
//! `api.rs`; training and rounds in `learn.rs` (the round loop itself and the method's rules live
//! in `crate::rounds` and `crate::method`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::data::{self, BadRows, Dataset, Example, TableSpec};
use crate::error::SessionError;
use crate::protocol::ClientInfo;
use crate::rounds::cancelled;
use crate::slm::checkpoint::swap;
use crate::slm::{CheckpointMeta, Slm};
use crate::sync::lock;
use crate::transport::{EnrollToken, Identity};
use crate::{Error, Result};

mod api;
mod learn;

pub use api::{
    Activity, ClientConfig, DataSummary, JoinSummary, Progress, ProgressListener, SavedState,
    Status, TrainSummary,
};

const STATE_FILE: &str = "state.json";

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
    paused: AtomicBool,
    /// The capped pool for models' work ([`ClientConfig::threads`]); `None`: rayon's global.
    pool: Option<Arc<rayon::ThreadPool>>,
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
        let p = &config.privacy;
        let sound = (0.0..f64::INFINITY).contains(&p.min_noise_multiplier)
            && p.delta > 0.0
            && p.delta < 1.0
            && p.epsilon_budget.is_none_or(|b| b >= 0.0);
        if !sound {
            return Err(Error::InvalidInput(format!(
                "privacy terms need a noise multiplier >= 0, 0 < delta < 1 and a budget >= 0: {p:?}"
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
        let pool = match config.threads {
            Some(0) => return Err(Error::InvalidInput("threads must be positive".into())),
            Some(n) => Some(Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(|i| format!("crosslm-slm-{i}"))
                    .build()
                    .map_err(|e| Error::Internal(format!("cannot start {n} threads: {e}")))?,
            )),
            None => None,
        };
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
            paused: AtomicBool::new(false),
            pool,
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

    /// Sits out the rounds that open from now on (a `join` stays connected, scores nothing and
    /// does not train) until [`Client::resume`]: for an app that must save battery or go
    /// quiet without leaving. A round being scored or learned from is finished first. The
    /// coordinator sees a client that does not answer: the round closes on its quorum or
    /// deadline without it.
    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }

    /// Takes part in rounds again after [`Client::pause`].
    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
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
            epsilon_spent: state.privacy.spent(self.config.privacy.delta),
            epsilon_budget: self.config.privacy.epsilon_budget,
            privacy_delta: self.config.privacy.delta,
            paused: self.paused.load(Ordering::SeqCst),
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

fn read_meta(dir: &Path) -> Option<CheckpointMeta> {
    let bytes = std::fs::read(dir.join("meta.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
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
