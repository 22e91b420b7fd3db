//! The coordinator daemon: the round core (one task owning the round machine, the store
//! and the connected clients) and its configuration.
//!
//! Session tasks talk to the core through [`CoreEvent`]s; the core answers through each
//! client's [`Outbound`] queue. Synthetic batches are encoded once per round and shared by
//! every client's queue, so broadcasting to many clients costs one encoding.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crosslm_sdk::method::LearnSchedule;
use crosslm_sdk::protocol::{
    self, ClientId, ClientInfo, ErrorCode, ErrorMsg, SampleScore, ServerMsg, SyntheticSample,
    TaskInfo, frame,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::generator::Generator;
use crate::round::{Action, Phase, ReplyVerdict, RoundConfig, RoundMachine, RoundOutcome};
use crate::store::{RoundRecord, Store};
use crate::transport::server::{ServerCtx, serve};
use crate::transport::{Pki, Tokens};
use crate::tuning::LlmReport;
use crate::{Error, Result};

/// Milliseconds since the Unix epoch: the machine's notion of time.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Daemon settings (the `[daemon]` part of the config file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Where the CA, tokens and database live.
    pub data_dir: PathBuf,
    /// Stop after this many finished rounds (counting those of earlier runs); none = forever.
    pub rounds: Option<u64>,
    /// Synthetic samples per label per round.
    pub samples_per_label: usize,
    /// Connected clients needed before a round opens.
    pub min_clients: usize,
    /// Round settings.
    pub round: RoundConfig,
    /// Milliseconds of silence after which a client counts as gone.
    pub idle_timeout_ms: u64,
    /// After the last round, how long to wait for clients to report and leave.
    pub linger_ms: u64,
    /// How clients learn from each round's result, sent with the round (`[daemon.learning]`);
    /// none: each client's own defaults.
    pub learning: Option<LearnSchedule>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 4433)),
            data_dir: PathBuf::from("crosslm-data"),
            rounds: None,
            samples_per_label: 32,
            min_clients: 1,
            round: RoundConfig::default(),
            idle_timeout_ms: 30_000,
            linger_ms: 120_000,
            learning: None,
        }
    }
}

/// What the core sends a session's writer.
#[derive(Debug)]
pub enum Outbound {
    /// One message.
    Msg(ServerMsg),
    /// Pre-encoded frames (a round's batch or result).
    Frames(Arc<Vec<Vec<u8>>>),
}

/// What session tasks tell the core.
#[derive(Debug)]
pub enum CoreEvent {
    /// An authenticated client opened a session.
    Connected {
        /// Who.
        client: ClientId,
        /// Which connection (a client may reconnect before its old one is noticed gone).
        conn_id: usize,
        /// Its metadata.
        info: ClientInfo,
        /// Its outbound queue.
        tx: mpsc::Sender<Outbound>,
    },
    /// A session ended.
    Disconnected {
        /// Who.
        client: ClientId,
        /// Which connection.
        conn_id: usize,
    },
    /// A chunk of scores.
    Scores {
        /// Who.
        client: ClientId,
        /// For which round.
        round: u64,
        /// The chunk.
        scores: Vec<SampleScore>,
        /// Last chunk?
        last: bool,
    },
    /// A client's local accuracy after a round.
    Report {
        /// Who.
        client: ClientId,
        /// Which round.
        round: u64,
        /// Accuracy, if measured.
        local_accuracy: Option<f32>,
    },
    /// A client gives up on a round.
    Abandon {
        /// Who.
        client: ClientId,
        /// Which connection.
        conn_id: usize,
        /// Which round.
        round: u64,
    },
    /// Send a message to a client (an error about its last frame).
    Say {
        /// Who.
        client: ClientId,
        /// Which connection.
        conn_id: usize,
        /// What.
        msg: ServerMsg,
    },
}

/// A running daemon's handle.
pub struct Daemon {
    /// The address it listens on.
    pub addr: SocketAddr,
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
        let core = Core::new(cfg, task, generator, store.clone())?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let ctx = Arc::new(ServerCtx {
            pki,
            tokens,
            store,
            core: core_tx,
        });
        let server = tokio::spawn(serve(endpoint.clone(), ctx));
        let core = tokio::spawn(core.run(core_rx, stop_rx));
        tracing::info!(%addr, "coordinator listening");
        Ok(Self {
            addr,
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
        r
    }

    /// Asks the daemon to stop after the current event.
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

struct Conn {
    conn_id: usize,
    tx: mpsc::Sender<Outbound>,
    weight: f64,
}

struct Active {
    machine: RoundMachine,
    frames: Arc<Vec<Vec<u8>>>,
}

struct Core {
    cfg: DaemonConfig,
    task: TaskInfo,
    generator: Option<Box<dyn Generator>>,
    store: Arc<Store>,
    conns: HashMap<ClientId, Conn>,
    active: Option<Active>,
    partial: HashMap<ClientId, (u64, Vec<SampleScore>)>,
    finished: u64,
    llm_steps: std::collections::VecDeque<LlmStep>,
}

/// Work on the generator (the LLM) that runs off the core task: it owns the generator while
/// it runs, so generation and tuning never overlap.
type Job = tokio::task::JoinHandle<(Box<dyn Generator>, JobOut)>;

/// What a [`Job`] produced.
enum JobOut {
    /// A round's samples.
    Samples(Result<Vec<SyntheticSample>>),
    /// The LLM's baseline or post-round report (`None`: the generator does not measure/learn).
    Llm(u64, Result<Option<LlmReport>>),
}

/// LLM work waiting for the generator, done before the next round is generated (so the
/// next round's samples come from the tuned model).
#[derive(Debug, Clone, Copy, PartialEq)]
enum LlmStep {
    /// Measure the untouched model.
    Baseline,
    /// Learn from round N's result.
    Feedback(u64),
}

impl Core {
    fn new(
        cfg: DaemonConfig,
        task: TaskInfo,
        generator: Box<dyn Generator>,
        store: Arc<Store>,
    ) -> Result<Self> {
        let finished = store
            .summaries()?
            .iter()
            .filter(|s| matches!(s.phase, Phase::Done | Phase::Failed { .. }))
            .count() as u64;
        let mut core = Self {
            cfg,
            task,
            generator: Some(generator),
            store,
            conns: HashMap::new(),
            active: None,
            partial: HashMap::new(),
            finished,
            llm_steps: Default::default(),
        };
        // Resume the LLM's side where it stopped: the baseline, then the newest round's
        // feedback if its report is missing (the generator skips learning it twice).
        let reported: std::collections::HashSet<u64> =
            core.store.llm_reports()?.iter().map(|r| r.round).collect();
        if !reported.contains(&0) {
            core.llm_steps.push_back(LlmStep::Baseline);
        }
        if let Some(last) = core.store.last_done_round()?
            && !reported.contains(&last)
        {
            core.llm_steps.push_back(LlmStep::Feedback(last));
        }
        if let Some(rec) = core.store.unfinished_round()? {
            let replies = core.store.replies(rec.id)?;
            tracing::info!(
                round = rec.id,
                replies = replies.len(),
                "resuming unfinished round"
            );
            let frames = encode_batch(&rec, core.cfg.learning.as_ref())?;
            let machine = RoundMachine::restore(
                rec.id,
                rec.task,
                rec.samples,
                rec.cfg,
                rec.deadline_at,
                replies,
            );
            core.active = Some(Active { machine, frames });
        }
        Ok(core)
    }

    fn all_done(&self) -> bool {
        self.cfg.rounds.is_some_and(|n| self.finished >= n)
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<CoreEvent>,
        mut stop: tokio::sync::oneshot::Receiver<()>,
    ) -> Result<u64> {
        let mut job: Option<Job> = None;
        loop {
            if self.all_done()
                && self.active.is_none()
                && job.is_none()
                && self.llm_steps.is_empty()
            {
                tracing::info!(rounds = self.finished, "all rounds done");
                self.linger(&mut rx).await;
                return Ok(self.finished);
            }
            if job.is_none() {
                if let Some(step) = self.llm_steps.pop_front() {
                    job = Some(self.spawn_llm_step(step)?);
                } else if self.active.is_none()
                    && !self.all_done()
                    && self.conns.len() >= self.cfg.min_clients.max(1)
                {
                    job = Some(self.spawn_generation()?);
                }
            }
            let timeout = self.active.as_ref().and_then(|a| a.machine.poll_timeout());
            let sleep = async {
                match timeout {
                    Some(t) => {
                        tokio::time::sleep(Duration::from_millis(t.saturating_sub(now_ms()))).await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(ev) => self.handle(ev)?,
                    None => return Ok(self.finished),
                },
                res = async { job.as_mut().expect("guarded").await }, if job.is_some() => {
                    job = None;
                    let (g, out) = res.map_err(|e| Error::Model(format!("generator task: {e}")))?;
                    self.generator = Some(g);
                    match out {
                        JobOut::Samples(Ok(samples)) => self.open_round(samples)?,
                        JobOut::Samples(Err(e)) => {
                            tracing::error!(error = %e, "generation failed; retrying in 5 s");
                            tokio::time::sleep(Duration::from_secs(5)).await;
                        }
                        JobOut::Llm(_, Ok(Some(report))) => self.store.put_llm_report(&report)?,
                        JobOut::Llm(_, Ok(None)) => {}
                        // The rounds go on with the model as it is; the error is in the log.
                        JobOut::Llm(round, Err(e)) => {
                            tracing::error!(round, error = %e, "LLM tuning/evaluation failed")
                        }
                    }
                }
                _ = sleep => {
                    if let Some(a) = self.active.as_mut() {
                        a.machine.handle_timeout(now_ms());
                    }
                }
                _ = &mut stop => {
                    tracing::info!("stop requested");
                    return Ok(self.finished);
                }
            }
            self.drive()?;
        }
    }

    /// After the last round, give clients time to take their results, train, report and
    /// leave (they report after training on the result).
    async fn linger(&mut self, rx: &mut mpsc::Receiver<CoreEvent>) {
        let until = tokio::time::Instant::now() + Duration::from_millis(self.cfg.linger_ms);
        while !self.conns.is_empty() {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(CoreEvent::Disconnected { client, conn_id })) => {
                    if self
                        .conns
                        .get(&client)
                        .is_some_and(|c| c.conn_id == conn_id)
                    {
                        self.conns.remove(&client);
                    }
                }
                Ok(Some(CoreEvent::Report {
                    client,
                    round,
                    local_accuracy: Some(acc),
                })) => {
                    let _ = self.store.put_report(round, &client, acc);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }

    fn spawn_llm_step(&mut self, step: LlmStep) -> Result<Job> {
        let mut g = self
            .generator
            .take()
            .ok_or_else(|| Error::Model("generator busy".into()))?;
        Ok(match step {
            LlmStep::Baseline => {
                tracing::info!("measuring the LLM before the first round");
                tokio::task::spawn_blocking(move || {
                    let r = g.baseline();
                    (g, JobOut::Llm(0, r))
                })
            }
            LlmStep::Feedback(round) => {
                let rec = self.store.round(round)?;
                let outcome = self.store.result(round)?;
                tracing::info!(round, "LLM learning from the round's feedback");
                tokio::task::spawn_blocking(move || {
                    let r = match (rec, outcome) {
                        (Some(rec), Some(o)) => g.feedback(round, &rec.samples, &o.scores),
                        _ => Err(Error::Store(format!("round {round} has no stored result"))),
                    };
                    (g, JobOut::Llm(round, r))
                })
            }
        })
    }

    fn spawn_generation(&mut self) -> Result<Job> {
        let mut g = self
            .generator
            .take()
            .ok_or_else(|| Error::Model("generator busy".into()))?;
        let task = self.task.clone();
        let n = self.cfg.samples_per_label;
        let round = self.store.next_round_id()?;
        tracing::info!(round, per_label = n, "generating synthetic samples");
        Ok(tokio::task::spawn_blocking(move || {
            let r = g.generate(&task, n, round).map(|v| {
                v.into_iter()
                    .enumerate()
                    .map(|(i, s)| SyntheticSample {
                        id: i as u64,
                        text: s.text,
                        label: s.label,
                    })
                    .collect()
            });
            (g, JobOut::Samples(r))
        }))
    }

    fn open_round(&mut self, samples: Vec<SyntheticSample>) -> Result<()> {
        let id = self.store.next_round_id()?;
        let now = now_ms();
        let rec = RoundRecord {
            id,
            task: self.task.clone(),
            samples,
            cfg: self.cfg.round.clone(),
            opened_at: now,
            deadline_at: now + self.cfg.round.deadline_ms,
            phase: Phase::Collecting,
        };
        self.store.put_round(&rec)?;
        let frames = encode_batch(&rec, self.cfg.learning.as_ref())?;
        let mut machine = RoundMachine::new(id, rec.task, rec.samples, rec.cfg, now);
        machine.start(self.conns.iter().map(|(c, k)| (c.clone(), k.weight)), now);
        tracing::info!(
            round = id,
            samples = machine.samples().len(),
            clients = self.conns.len(),
            "round opened"
        );
        self.active = Some(Active { machine, frames });
        Ok(())
    }

    fn send(&mut self, client: &str, out: Outbound) {
        if let Some(c) = self.conns.get(client)
            && c.tx.try_send(out).is_err()
        {
            tracing::warn!(%client, "client queue full or closed; dropping it");
            self.conns.remove(client);
        }
    }

    fn handle(&mut self, ev: CoreEvent) -> Result<()> {
        let now = now_ms();
        match ev {
            CoreEvent::Connected {
                client,
                conn_id,
                info,
                tx,
            } => {
                let weight = info.n_private as f64;
                self.conns.insert(
                    client.clone(),
                    Conn {
                        conn_id,
                        tx,
                        weight,
                    },
                );
                self.partial.remove(&client);
                if let Some(a) = self.active.as_mut() {
                    a.machine.join(client, weight, now);
                }
            }
            CoreEvent::Disconnected { client, conn_id } => {
                if self
                    .conns
                    .get(&client)
                    .is_some_and(|c| c.conn_id == conn_id)
                {
                    self.conns.remove(&client);
                    self.partial.remove(&client);
                    if let Some(a) = self.active.as_mut() {
                        a.machine.leave(&client, now);
                    }
                }
            }
            CoreEvent::Abandon {
                client,
                conn_id,
                round,
            } => {
                if let Some(a) = self.active.as_mut().filter(|a| a.machine.id() == round)
                    && self
                        .conns
                        .get(&client)
                        .is_some_and(|c| c.conn_id == conn_id)
                {
                    a.machine.leave(&client, now);
                }
            }
            CoreEvent::Say {
                client,
                conn_id,
                msg,
            } => {
                if self
                    .conns
                    .get(&client)
                    .is_some_and(|c| c.conn_id == conn_id)
                {
                    self.send(&client, Outbound::Msg(msg));
                }
            }
            CoreEvent::Report {
                client,
                round,
                local_accuracy,
            } => {
                if let Some(acc) = local_accuracy {
                    tracing::info!(%client, round, accuracy = acc, "client report");
                    self.store.put_report(round, &client, acc)?;
                }
            }
            CoreEvent::Scores {
                client,
                round,
                scores,
                last,
            } => self.on_scores(client, round, scores, last, now)?,
        }
        Ok(())
    }

    fn on_scores(
        &mut self,
        client: ClientId,
        round: u64,
        chunk: Vec<SampleScore>,
        last: bool,
        now: u64,
    ) -> Result<()> {
        let Some(a) = self.active.as_mut().filter(|a| a.machine.id() == round) else {
            tracing::info!(%client, round, "scores for a round that is not open; ignored");
            return Ok(());
        };
        let limit = a.machine.samples().len();
        let entry = self
            .partial
            .entry(client.clone())
            .or_insert((round, Vec::new()));
        if entry.0 != round {
            *entry = (round, Vec::new());
        }
        entry.1.extend(chunk);
        if entry.1.len() > limit {
            self.partial.remove(&client);
            let m = format!("more scores than the round's {limit} samples");
            tracing::warn!(%client, round, "{m}");
            self.send(
                &client,
                Outbound::Msg(ServerMsg::Error(ErrorMsg {
                    code: ErrorCode::BadScores,
                    message: m,
                })),
            );
            return Ok(());
        }
        if !last {
            return Ok(());
        }
        let scores = self
            .partial
            .remove(&client)
            .map(|e| e.1)
            .unwrap_or_default();
        match a.machine.on_scores(&client, scores, now) {
            ReplyVerdict::Accepted => {
                if let Some(reply) = a.machine.reply(&client) {
                    // Committed before the client hears "accepted": an ack is a promise.
                    self.store.put_reply(round, &client, reply)?;
                }
                self.send(&client, Outbound::Msg(ServerMsg::ScoresAccepted { round }));
            }
            ReplyVerdict::Ignored(_) => {}
            ReplyVerdict::Rejected(why) => {
                self.send(
                    &client,
                    Outbound::Msg(ServerMsg::Error(ErrorMsg {
                        code: ErrorCode::BadScores,
                        message: why,
                    })),
                );
            }
        }
        Ok(())
    }

    /// Carries out what the round machine asks for.
    fn drive(&mut self) -> Result<()> {
        loop {
            let Some(a) = self.active.as_mut() else {
                return Ok(());
            };
            let Some(action) = a.machine.poll_action() else {
                return Ok(());
            };
            match action {
                Action::SendBatch { client } => {
                    let frames = a.frames.clone();
                    self.send(&client, Outbound::Frames(frames));
                }
                Action::Completed(outcome) => {
                    let round = outcome.round;
                    self.store
                        .finish_round(round, Phase::Done, Some(&outcome))?;
                    self.finished += 1;
                    self.active = None;
                    self.llm_steps.push_back(LlmStep::Feedback(round));
                    let frames = encode_result(&outcome)?;
                    let clients: Vec<ClientId> = self.conns.keys().cloned().collect();
                    for c in clients {
                        self.send(&c, Outbound::Frames(frames.clone()));
                    }
                    let q = outcome.scores.iter().map(|s| s.quality).sum::<f32>()
                        / outcome.scores.len().max(1) as f32;
                    tracing::info!(
                        round,
                        contributors = outcome.contributors.len(),
                        mean_quality = q,
                        "round done"
                    );
                }
                Action::Failed { reason } => {
                    let round = a.machine.id();
                    self.store.finish_round(
                        round,
                        Phase::Failed {
                            reason: reason.clone(),
                        },
                        None,
                    )?;
                    self.finished += 1;
                    self.active = None;
                    let clients: Vec<ClientId> = self.conns.keys().cloned().collect();
                    for c in clients {
                        self.send(
                            &c,
                            Outbound::Msg(ServerMsg::RoundFailed {
                                round,
                                reason: reason.clone(),
                            }),
                        );
                    }
                }
            }
        }
    }
}

fn encode_batch(rec: &RoundRecord, learning: Option<&LearnSchedule>) -> Result<Arc<Vec<Vec<u8>>>> {
    let enc =
        |m: &ServerMsg| frame::encode(m).map_err(|e| Error::Transport(format!("encode: {e}")));
    let mut frames = vec![enc(&ServerMsg::RoundOpen {
        round: rec.id,
        task: rec.task.clone(),
        total_samples: rec.samples.len() as u64,
        deadline_ms: rec.deadline_at,
        learn: learning.map(|l| l.for_round(rec.id)),
    })?];
    for (samples, last) in protocol::chunks(&rec.samples, protocol::SAMPLES_PER_CHUNK) {
        frames.push(enc(&ServerMsg::Samples {
            round: rec.id,
            samples,
            last,
        })?);
    }
    Ok(Arc::new(frames))
}

fn encode_result(o: &RoundOutcome) -> Result<Arc<Vec<Vec<u8>>>> {
    protocol::chunks(&o.scores, protocol::SAMPLES_PER_CHUNK)
        .into_iter()
        .map(|(scores, last)| {
            frame::encode(&ServerMsg::RoundResult {
                round: o.round,
                scores,
                last,
            })
            .map_err(|e| Error::Transport(format!("encode: {e}")))
        })
        .collect::<Result<Vec<_>>>()
        .map(Arc::new)
}

/// Mints `n` enrollment tokens for the coordinator whose data dir is `data_dir` (creating
/// its CA if needed). Works while the daemon runs.
pub fn mint_tokens(data_dir: &Path, n: usize) -> Result<Vec<crosslm_sdk::transport::EnrollToken>> {
    let pki = Pki::load_or_create(data_dir)?;
    let tokens = Tokens::open(data_dir)?;
    (0..n).map(|_| tokens.mint(&pki.ca_fingerprint())).collect()
}
