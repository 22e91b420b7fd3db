//! The coordinator daemon: the driver of the sans-IO [`Core`] (sockets, clock, database and
//! the generator's thread) and its configuration.
//!
//! Session tasks ([`crate::transport::server`]) send [`CoreEvent`]s; the driver keeps each
//! client's [`Outbound`] queue, hands the events to the core with the time, and carries out
//! the core's commands in order. Synthetic batches are encoded once per round and shared by
//! every client's queue, so broadcasting to many clients costs one encoding.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crosslm_sdk::protocol::{ClientId, SyntheticSample, TaskInfo};
use tokio::sync::mpsc;

use crate::admin::{self, DaemonFigures, Published, Snapshot};
pub use crate::core::DaemonConfig;
use crate::core::{Command, Core, Input, LlmStep, Outbound, Persist, Resume, now_ms};
use crate::generator::Generator;
use crate::store::Store;
use crate::transport::server::{CoreEvent, ServerCtx, serve};
use crate::transport::{Pki, Revoked, Tokens};
use crate::{Error, Result};

/// A running daemon's handle.
pub struct Daemon {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Where its admin endpoint listens, if it has one.
    pub admin: Option<SocketAddr>,
    admin_task: Option<tokio::task::JoinHandle<()>>,
    data_dir: std::path::PathBuf,
    endpoint: quinn::Endpoint,
    core: tokio::task::JoinHandle<Result<u64>>,
    server: Option<tokio::task::JoinHandle<()>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Daemon {
    /// Starts the daemon: opens the data dir (CA, tokens, database), resumes an unfinished
    /// round if there is one, and listens.
    pub async fn start(
        cfg: DaemonConfig,
        task: TaskInfo,
        generator: Box<dyn Generator>,
    ) -> Result<Self> {
        let pki = Pki::load_or_create(&cfg.data_dir)?;
        let tokens = Tokens::open(&cfg.data_dir)?;
        let store = Arc::new(Store::open(&cfg.data_dir)?);
        let (core_tx, core_rx) = mpsc::channel(1024);
        let server_cfg = pki.server_config(Duration::from_millis(cfg.idle_timeout_ms))?;
        let endpoint = quinn::Endpoint::server(server_cfg, cfg.listen)
            .map_err(|e| Error::Transport(format!("cannot listen on {}: {e}", cfg.listen)))?;
        let addr = endpoint
            .local_addr()
            .map_err(|e| Error::Transport(e.to_string()))?;
        let data_dir = cfg.data_dir.clone();
        let admin_addr = cfg.admin;
        let max_unauthenticated = cfg.max_unauthenticated;
        let core = Core::new(cfg, task.clone(), Resume::from_store(&store)?)?;
        let published: Published = Arc::new(Mutex::new(None));
        let (admin, admin_task) = match admin_addr {
            Some(a) => {
                let (bound, t) =
                    admin::start(a, &data_dir, published.clone(), Arc::downgrade(&store)).await?;
                (Some(bound), Some(t))
            }
            None => (None, None),
        };
        let figures = DaemonFigures {
            started_unix_ms: now_ms(),
            listen: addr.to_string(),
            ..DaemonFigures::default()
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let ctx = Arc::new(ServerCtx {
            pki,
            tokens,
            revoked: Revoked::open(&data_dir),
            store: store.clone(),
            core: core_tx,
            unauthenticated: Arc::new(tokio::sync::Semaphore::new(max_unauthenticated)),
            busy: Default::default(),
        });
        let server = tokio::spawn(serve(endpoint.clone(), ctx));
        let core = tokio::spawn(drive(
            core,
            Some(generator),
            store.clone(),
            task,
            core_rx,
            stop_rx,
            (published, figures),
        ));
        tracing::info!(%addr, "coordinator listening");
        Ok(Self {
            addr,
            admin,
            admin_task,
            data_dir,
            endpoint,
            core,
            server: Some(server),
            stop: Some(stop_tx),
        })
    }

    /// Waits until the configured number of rounds is done (or [`Daemon::stop`]), then
    /// closes the endpoint. Returns the number of rounds finished in total.
    pub async fn wait(&mut self) -> Result<u64> {
        let r = (&mut self.core)
            .await
            .map_err(|e| Error::Transport(format!("core task: {e}")))?;
        self.endpoint.close(0u32.into(), b"shutdown");
        // Sessions end with the endpoint; once the server task is done the store is closed.
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
        self.stop_admin();
        r
    }

    /// Stops serving the admin endpoint and removes its address file.
    fn stop_admin(&mut self) {
        if let Some(t) = self.admin_task.take() {
            t.abort();
            admin::forget_addr(&self.data_dir);
        }
    }

    /// Asks the daemon to stop after the current event.
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Work on the generator (the LLM) off the driver's task: it owns the generator while it
/// runs, so generation and tuning never overlap; its answer is the core's next input.
type Job = tokio::task::JoinHandle<(Box<dyn Generator>, Input)>;

impl Drop for Daemon {
    /// A daemon dropped without [`Daemon::wait`] still stops serving its admin endpoint.
    fn drop(&mut self) {
        self.stop_admin();
    }
}

/// Runs the core until it says exit (or the sessions are gone), publishing what it does
/// for the admin endpoint after every step.
async fn drive(
    mut core: Core,
    mut generator: Option<Box<dyn Generator>>,
    store: Arc<Store>,
    task: TaskInfo,
    mut rx: mpsc::Receiver<CoreEvent>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    (published, mut figures): (Published, DaemonFigures),
) -> Result<u64> {
    let mut queues: HashMap<ClientId, (usize, mpsc::Sender<Outbound>)> = HashMap::new();
    let mut job: Option<Job> = None;
    // When the running job started and whether it generates; when the open round went out.
    let mut job_started: Option<(Instant, bool)> = None;
    let mut round_started: Option<Instant> = None;
    core.handle_timeout(now_ms())?;
    loop {
        while let Some(cmd) = core.poll() {
            match cmd {
                Command::Send { client, out } => {
                    let Some((conn_id, tx)) = queues.get(&client) else {
                        continue;
                    };
                    if tx.try_send(out).is_err() {
                        tracing::warn!(%client, "client queue full or closed; dropping it");
                        let conn_id = *conn_id;
                        queues.remove(&client);
                        core.handle(Input::Disconnected { client, conn_id }, now_ms())?;
                    }
                }
                Command::Persist(p) => {
                    match &p {
                        Persist::Round(_) => round_started = Some(Instant::now()),
                        Persist::Finish { outcome, .. } => {
                            if let Some(t) = round_started.take()
                                && outcome.is_some()
                            {
                                figures.last_round_seconds = Some(t.elapsed().as_secs_f64());
                            }
                        }
                        _ => {}
                    }
                    persist(&store, p)?
                }
                Command::Generate { round, per_label } => {
                    let g = generator
                        .take()
                        .ok_or_else(|| Error::Model("generator busy".into()))?;
                    job = Some(generate(g, task.clone(), round, per_label));
                    job_started = Some((Instant::now(), true));
                }
                Command::Llm(step) => {
                    let g = generator
                        .take()
                        .ok_or_else(|| Error::Model("generator busy".into()))?;
                    job = Some(llm_step(g, step, &store)?);
                    job_started = Some((Instant::now(), false));
                }
                Command::Exit => return Ok(core.finished()),
            }
        }
        if let Ok(mut p) = published.lock() {
            *p = Some(Snapshot {
                core: core.view(),
                daemon: figures.clone(),
            });
        }
        let timeout = core.poll_timeout();
        let sleep = async {
            match timeout {
                Some(t) => {
                    tokio::time::sleep(Duration::from_millis(t.saturating_sub(now_ms()))).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = rx.recv() => {
                let Some(CoreEvent { input, queue }) = ev else { return Ok(core.finished()) };
                match (&input, queue) {
                    (Input::Connected { client, conn_id, .. }, Some(tx)) => {
                        queues.insert(client.clone(), (*conn_id, tx));
                    }
                    (Input::Disconnected { client, conn_id }, _)
                        if queues.get(client).is_some_and(|(c, _)| c == conn_id) =>
                    {
                        queues.remove(client);
                    }
                    _ => {}
                }
                core.handle(input, now_ms())?;
            }
            res = async { job.as_mut().expect("guarded").await }, if job.is_some() => {
                job = None;
                if let Some((t, generating)) = job_started.take() {
                    let secs = t.elapsed().as_secs_f64();
                    if generating {
                        figures.generation_seconds += secs;
                        figures.generations += 1;
                    } else {
                        figures.llm_seconds += secs;
                        figures.llm_steps += 1;
                    }
                }
                let (g, input) = res.map_err(|e| Error::Model(format!("generator task: {e}")))?;
                generator = Some(g);
                core.handle(input, now_ms())?;
            }
            _ = sleep => core.handle_timeout(now_ms())?,
            _ = &mut stop => core.handle(Input::Stop, now_ms())?,
        }
    }
}

fn persist(store: &Store, p: Persist) -> Result<()> {
    match p {
        Persist::Round(rec) => store.put_round(&rec),
        Persist::Reply {
            round,
            client,
            reply,
        } => store.put_reply(round, &client, &reply),
        Persist::Finish {
            round,
            phase,
            outcome,
        } => store.finish_round(round, phase, outcome.as_ref()),
        Persist::Report {
            round,
            client,
            accuracy,
        } => store.put_report(round, &client, accuracy),
        Persist::LlmReport(report) => store.put_llm_report(&report),
    }
}

fn generate(mut g: Box<dyn Generator>, task: TaskInfo, round: u64, per_label: usize) -> Job {
    tokio::task::spawn_blocking(move || {
        let result = g
            .generate(&task, per_label, round)
            .map(|v| {
                v.into_iter()
                    .enumerate()
                    .map(|(i, s)| SyntheticSample {
                        id: i as u64,
                        text: s.text,
                        label: s.label,
                    })
                    .collect()
            })
            .map_err(|e| e.to_string());
        (g, Input::Generated { round, result })
    })
}

fn llm_step(mut g: Box<dyn Generator>, step: LlmStep, store: &Store) -> Result<Job> {
    Ok(match step {
        LlmStep::Baseline => {
            tracing::info!("measuring the LLM before the first round");
            tokio::task::spawn_blocking(move || {
                let result = g.baseline().map_err(|e| e.to_string());
                (g, Input::LlmDone { step, result })
            })
        }
        LlmStep::Feedback(round) => {
            let rec = store.round(round)?;
            let outcome = store.result(round)?;
            tracing::info!(round, "LLM learning from the round's feedback");
            tokio::task::spawn_blocking(move || {
                let result = match (rec, outcome) {
                    (Some(rec), Some(o)) => g.feedback(round, &rec.samples, &o.scores),
                    _ => Err(Error::Store(format!("round {round} has no stored result"))),
                }
                .map_err(|e| e.to_string());
                (g, Input::LlmDone { step, result })
            })
        }
    })
}

/// Mints `n` enrollment tokens for the coordinator whose data dir is `data_dir` (creating
/// its CA if needed). Works while the daemon runs.
pub fn mint_tokens(data_dir: &Path, n: usize) -> Result<Vec<crosslm_sdk::transport::EnrollToken>> {
    let pki = Pki::load_or_create(data_dir)?;
    let tokens = Tokens::open(data_dir)?;
    (0..n).map(|_| tokens.mint(&pki.ca_fingerprint())).collect()
}
