//! The coordinator's core as a sans-IO state machine, in the style of quinn-proto: it owns no
//! socket, no clock, no database and no model. The driver ([`crate::daemon`]) feeds it
//! [`Input`]s with the time (`handle`), calls [`Core::handle_timeout`] when
//! [`Core::poll_timeout`] is reached, and carries out the [`Command`]s it drains from
//! [`Core::poll`] in order: send to a client, persist, generate a round's samples, run an LLM
//! step, exit. A `Persist` comes before the `Send` that depends on it (an acknowledgement is a
//! promise that the reply is on disk).
//!
//! Time is milliseconds since the Unix epoch, so a deadline survives a restart.
//!
//! Over 600 lines: about half is the documented input, command and persist types that a driver
//! speaks; the machine is the rest (its tests are in `tests.rs`).

mod config;
#[cfg(test)]
mod tests;

pub use config::DaemonConfig;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use crosslm_sdk::method::LearnSchedule;
use crosslm_sdk::privacy::{ScorePrivacy, accountant};
use crosslm_sdk::protocol::{
    self, ClientId, ClientInfo, ErrorCode, ErrorMsg, Reassembly, SampleScore, ServerMsg,
    SyntheticSample, TaskInfo, frame,
};

use crate::round::{Action, Phase, Reply, ReplyVerdict, RoundMachine, RoundOutcome};
use crate::store::{RoundRecord, Store};
use crate::tuning::LlmReport;
use crate::{Error, Result};

/// Milliseconds since the Unix epoch: the machine's notion of time (for drivers; the core
/// only ever gets time as an argument).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How long to wait before generating again after a failed generation.
pub const GENERATION_RETRY_MS: u64 = 5_000;

/// What the core sends a client.
#[derive(Debug, Clone, PartialEq)]
pub enum Outbound {
    /// One message.
    Msg(ServerMsg),
    /// Pre-encoded frames (a round's batch or result), shared by every client's queue.
    Frames(Arc<Vec<Vec<u8>>>),
}

/// What happened, as the driver tells it.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// An authenticated client opened a session.
    Connected {
        /// Who.
        client: ClientId,
        /// Which connection (a client may reconnect before its old one is noticed gone).
        conn_id: usize,
        /// Its metadata.
        info: ClientInfo,
    },
    /// A session ended (or its queue could not take more).
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
    /// Say something to one connection (an error about its last frame).
    Say {
        /// Who.
        client: ClientId,
        /// Which connection.
        conn_id: usize,
        /// What.
        msg: ServerMsg,
    },
    /// The samples asked for by [`Command::Generate`] (or why there are none).
    Generated {
        /// The round they are for.
        round: u64,
        /// The samples.
        result: std::result::Result<Vec<SyntheticSample>, String>,
    },
    /// An [`LlmStep`] finished.
    LlmDone {
        /// The step.
        step: LlmStep,
        /// Its report (`None`: the generator does not measure or learn).
        result: std::result::Result<Option<LlmReport>, String>,
    },
    /// Stop now.
    Stop,
}

/// Work on the LLM, done before the next round is generated (so the next round's samples
/// come from the tuned model).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlmStep {
    /// Measure the untouched model.
    Baseline,
    /// Learn from round N's result.
    Feedback(u64),
}

/// A write the driver makes durable before carrying out the commands after it.
#[derive(Debug, Clone, PartialEq)]
pub enum Persist {
    /// A round opened.
    Round(RoundRecord),
    /// A client's accepted reply.
    Reply {
        /// The round.
        round: u64,
        /// Who.
        client: ClientId,
        /// The reply.
        reply: Reply,
    },
    /// A round ended.
    Finish {
        /// The round.
        round: u64,
        /// Done or failed.
        phase: Phase,
        /// The result of a done round.
        outcome: Option<RoundOutcome>,
    },
    /// A client's local accuracy.
    Report {
        /// The round.
        round: u64,
        /// Who.
        client: ClientId,
        /// Accuracy.
        accuracy: f32,
    },
    /// The LLM's report.
    LlmReport(LlmReport),
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Queue this for the client (a client whose queue is full or gone is reported back as
    /// [`Input::Disconnected`]).
    Send {
        /// Who.
        client: ClientId,
        /// What.
        out: Outbound,
    },
    /// Make this durable.
    Persist(Persist),
    /// Generate the samples of `round` (answer with [`Input::Generated`]).
    Generate {
        /// The round.
        round: u64,
        /// Samples per label.
        per_label: usize,
    },
    /// Run an LLM step (answer with [`Input::LlmDone`]).
    Llm(LlmStep),
    /// All rounds are done and the clients have left (or lingering is over), or a stop was
    /// asked for: the driver can exit.
    Exit,
}

/// The durable state a core starts from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resume {
    /// Rounds that ended (done or failed).
    pub finished: u64,
    /// Id of the next round.
    pub next_round: u64,
    /// Rounds with an LLM report (0: the baseline).
    pub llm_reported: HashSet<u64>,
    /// The newest done round.
    pub last_done: Option<u64>,
    /// An unfinished round and the replies already in.
    pub unfinished: Option<(RoundRecord, Vec<(ClientId, Reply)>)>,
}

impl Resume {
    /// A coordinator with no history.
    pub fn fresh() -> Self {
        Self {
            next_round: 1,
            ..Self::default()
        }
    }

    /// What `store` holds.
    pub fn from_store(store: &Store) -> Result<Self> {
        let finished = store
            .summaries()?
            .iter()
            .filter(|s| matches!(s.phase, Phase::Done | Phase::Failed { .. }))
            .count() as u64;
        let unfinished = match store.unfinished_round()? {
            Some(rec) => {
                let replies = store.replies(rec.id)?;
                Some((rec, replies))
            }
            None => None,
        };
        Ok(Self {
            finished,
            next_round: store.next_round_id()?,
            llm_reported: store.llm_reports()?.iter().map(|r| r.round).collect(),
            last_done: store.last_done_round()?,
            unfinished,
        })
    }
}

struct Conn {
    conn_id: usize,
    weight: f64,
}

struct Active {
    machine: RoundMachine,
    frames: Arc<Vec<Vec<u8>>>,
}

/// What the generator (the LLM) is doing; it does one thing at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Busy {
    Idle,
    Generating(u64),
    Llm(LlmStep),
}

/// What the core has counted since it started (this run), for the admin endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Rounds that completed with a result.
    pub rounds_done: u64,
    /// Rounds that ended without quorum.
    pub rounds_failed: u64,
    /// Replies recorded.
    pub replies_accepted: u64,
    /// Replies refused because their scores are invalid (NaN, out of range, ids...).
    pub replies_invalid: u64,
    /// Replies whose chunks could not be put together (too many, wrong round...).
    pub replies_malformed: u64,
    /// Replies dropped without error: duplicates, late ones, rounds the client is not in.
    pub replies_ignored: u64,
}

/// What the core is doing, for the admin endpoint.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CoreView {
    /// The open round and its phase.
    pub round: Option<(u64, Phase)>,
    /// `idle`, `generating round N`, `llm baseline` or `llm feedback of round N`.
    pub llm: String,
    /// Connected clients.
    pub clients_connected: usize,
    /// Rounds ended, this run and earlier ones.
    pub rounds_ended: u64,
    /// The next round's id.
    pub next_round: u64,
    /// This run's counters.
    pub counters: Counters,
}

/// The coordinator core (see the module docs).
pub struct Core {
    cfg: DaemonConfig,
    counters: Counters,
    /// What `cfg.privacy` asks of the clients' scores.
    privacy: Option<ScorePrivacy>,
    task: TaskInfo,
    conns: HashMap<ClientId, Conn>,
    active: Option<Active>,
    partial: HashMap<ClientId, Reassembly<SampleScore>>,
    finished: u64,
    next_round: u64,
    llm_steps: VecDeque<LlmStep>,
    busy: Busy,
    retry_at: Option<u64>,
    linger_until: Option<u64>,
    exited: bool,
    out: VecDeque<Command>,
}

impl Core {
    /// A core over `resume`: the LLM's missing steps are queued (the baseline, then the
    /// newest round's feedback if its report is missing; the generator skips learning a
    /// round twice) and an unfinished round resumes.
    pub fn new(cfg: DaemonConfig, task: TaskInfo, resume: Resume) -> Result<Self> {
        let privacy = match &cfg.privacy {
            Some(target) => {
                let z = target.noise_multiplier().map_err(Error::Data)?;
                tracing::info!(
                    epsilon = target.epsilon,
                    delta = target.delta,
                    rounds = target.rounds,
                    noise_multiplier = z,
                    "clients' scores: Gaussian noise asked with every round"
                );
                Some(ScorePrivacy {
                    noise_multiplier: z,
                })
            }
            None => None,
        };
        let mut core = Self {
            counters: Counters::default(),
            privacy,
            cfg,
            task,
            conns: HashMap::new(),
            active: None,
            partial: HashMap::new(),
            finished: resume.finished,
            next_round: resume.next_round.max(1),
            llm_steps: VecDeque::new(),
            busy: Busy::Idle,
            retry_at: None,
            linger_until: None,
            exited: false,
            out: VecDeque::new(),
        };
        if !resume.llm_reported.contains(&0) {
            core.llm_steps.push_back(LlmStep::Baseline);
        }
        if let Some(last) = resume.last_done
            && !resume.llm_reported.contains(&last)
        {
            core.llm_steps.push_back(LlmStep::Feedback(last));
        }
        if let Some((rec, replies)) = resume.unfinished {
            tracing::info!(
                round = rec.id,
                replies = replies.len(),
                "resuming unfinished round"
            );
            let frames = encode_batch(&rec, core.cfg.learning.as_ref(), core.privacy)?;
            core.next_round = core.next_round.max(rec.id + 1);
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

    /// Rounds ended so far (this run and earlier ones).
    pub fn finished(&self) -> u64 {
        self.finished
    }

    /// Connected clients.
    pub fn clients(&self) -> usize {
        self.conns.len()
    }

    /// What the core is doing and has counted.
    pub fn view(&self) -> CoreView {
        CoreView {
            round: self
                .active
                .as_ref()
                .map(|a| (a.machine.id(), a.machine.phase().clone())),
            llm: match &self.busy {
                Busy::Idle => "idle".into(),
                Busy::Generating(r) => format!("generating round {r}"),
                Busy::Llm(LlmStep::Baseline) => "llm baseline".into(),
                Busy::Llm(LlmStep::Feedback(r)) => format!("llm feedback of round {r}"),
            },
            clients_connected: self.conns.len(),
            rounds_ended: self.finished,
            next_round: self.next_round,
            counters: self.counters.clone(),
        }
    }

    /// The open round's id.
    pub fn active_round(&self) -> Option<u64> {
        self.active.as_ref().map(|a| a.machine.id())
    }

    /// The next command for the driver.
    pub fn poll(&mut self) -> Option<Command> {
        self.out.pop_front()
    }

    /// When [`Core::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<u64> {
        [
            self.active.as_ref().and_then(|a| a.machine.poll_timeout()),
            self.retry_at,
            self.linger_until,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Time passed.
    pub fn handle_timeout(&mut self, now: u64) -> Result<()> {
        if let Some(a) = self.active.as_mut() {
            a.machine.handle_timeout(now);
        }
        if self.retry_at.is_some_and(|t| now >= t) {
            self.retry_at = None;
        }
        self.advance(now)
    }

    /// Something happened.
    pub fn handle(&mut self, input: Input, now: u64) -> Result<()> {
        if self.exited {
            return Ok(());
        }
        match input {
            Input::Connected {
                client,
                conn_id,
                info,
            } => {
                let weight = info.n_private as f64;
                self.conns.insert(client.clone(), Conn { conn_id, weight });
                self.partial.remove(&client);
                if let Some(a) = self.active.as_mut() {
                    a.machine.join(client, weight, now);
                }
            }
            Input::Disconnected { client, conn_id } => {
                if self.is_current(&client, conn_id) {
                    self.conns.remove(&client);
                    self.partial.remove(&client);
                    if let Some(a) = self.active.as_mut() {
                        a.machine.leave(&client, now);
                    }
                }
            }
            Input::Abandon {
                client,
                conn_id,
                round,
            } => {
                if self.is_current(&client, conn_id)
                    && let Some(a) = self.active.as_mut().filter(|a| a.machine.id() == round)
                {
                    a.machine.leave(&client, now);
                }
            }
            Input::Say {
                client,
                conn_id,
                msg,
            } => {
                if self.is_current(&client, conn_id) {
                    self.send(&client, Outbound::Msg(msg));
                }
            }
            Input::Report {
                client,
                round,
                local_accuracy,
            } => {
                if let Some(accuracy) = local_accuracy {
                    tracing::info!(%client, round, accuracy, "client report");
                    self.out.push_back(Command::Persist(Persist::Report {
                        round,
                        client,
                        accuracy,
                    }));
                }
            }
            Input::Scores {
                client,
                round,
                scores,
                last,
            } => self.on_scores(client, round, scores, last, now),
            Input::Generated { round, result } => {
                if self.busy == Busy::Generating(round) {
                    self.busy = Busy::Idle;
                }
                match result {
                    Ok(samples) => self.open_round(round, samples, now)?,
                    Err(e) => {
                        tracing::error!(round, error = %e, "generation failed; retrying");
                        self.retry_at = Some(now + GENERATION_RETRY_MS);
                    }
                }
            }
            Input::LlmDone { step, result } => {
                if self.busy == Busy::Llm(step) {
                    self.busy = Busy::Idle;
                }
                match result {
                    Ok(Some(report)) => self
                        .out
                        .push_back(Command::Persist(Persist::LlmReport(report))),
                    Ok(None) => {}
                    // The rounds go on with the model as it is; the error is in the log.
                    Err(e) => tracing::error!(?step, error = %e, "LLM tuning/evaluation failed"),
                }
            }
            Input::Stop => {
                tracing::info!("stop requested");
                self.exit();
                return Ok(());
            }
        }
        self.advance(now)
    }

    fn is_current(&self, client: &str, conn_id: usize) -> bool {
        self.conns.get(client).is_some_and(|c| c.conn_id == conn_id)
    }

    fn all_done(&self) -> bool {
        self.cfg.rounds.is_some_and(|n| self.finished >= n)
    }

    fn exit(&mut self) {
        if !self.exited {
            self.exited = true;
            self.out.push_back(Command::Exit);
        }
    }

    fn send(&mut self, client: &str, out: Outbound) {
        if self.conns.contains_key(client) {
            self.out.push_back(Command::Send {
                client: client.to_string(),
                out,
            });
        }
    }

    /// Carries the round machine's actions out, then starts the generator's next job, or
    /// lingers and exits when everything is done.
    fn advance(&mut self, now: u64) -> Result<()> {
        self.drive_round()?;
        if self.exited {
            return Ok(());
        }
        if self.all_done()
            && self.active.is_none()
            && self.busy == Busy::Idle
            && self.llm_steps.is_empty()
        {
            // After the last round, give clients time to take their results, train, report
            // and leave.
            let until = *self.linger_until.get_or_insert_with(|| {
                tracing::info!(rounds = self.finished, "all rounds done");
                now + self.cfg.linger_ms
            });
            if self.conns.is_empty() || now >= until {
                self.exit();
            }
            return Ok(());
        }
        if self.busy != Busy::Idle {
            return Ok(());
        }
        if let Some(step) = self.llm_steps.pop_front() {
            self.busy = Busy::Llm(step);
            self.out.push_back(Command::Llm(step));
        } else if self.active.is_none()
            && !self.all_done()
            && self.retry_at.is_none()
            && self.conns.len() >= self.cfg.min_clients.max(1)
        {
            let round = self.next_round;
            tracing::info!(
                round,
                per_label = self.cfg.samples_per_label,
                "generating synthetic samples"
            );
            self.busy = Busy::Generating(round);
            self.out.push_back(Command::Generate {
                round,
                per_label: self.cfg.samples_per_label,
            });
        }
        Ok(())
    }

    fn open_round(&mut self, id: u64, samples: Vec<SyntheticSample>, now: u64) -> Result<()> {
        if self.active.is_some() || id != self.next_round {
            tracing::warn!(round = id, "samples for a round that is not due; dropped");
            return Ok(());
        }
        let rec = RoundRecord {
            id,
            task: self.task.clone(),
            samples,
            cfg: self.cfg.round.clone(),
            opened_at: now,
            deadline_at: now + self.cfg.round.deadline_ms,
            phase: Phase::Collecting,
        };
        let frames = encode_batch(&rec, self.cfg.learning.as_ref(), self.privacy)?;
        if let (Some(p), Some(target)) = (self.privacy, &self.cfg.privacy) {
            let spent = accountant::epsilon(&vec![p.noise_multiplier; id as usize], target.delta);
            let per_round = accountant::epsilon(&[p.noise_multiplier], target.delta);
            tracing::info!(
                round = id,
                noise_multiplier = p.noise_multiplier,
                epsilon_round = per_round,
                epsilon_total = spent,
                delta = target.delta,
                "privacy of the scores through this round (a client that scored every round)"
            );
        }
        self.next_round = id + 1;
        let mut machine = RoundMachine::new(
            id,
            rec.task.clone(),
            rec.samples.clone(),
            rec.cfg.clone(),
            now,
        );
        self.out.push_back(Command::Persist(Persist::Round(rec)));
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

    fn on_scores(
        &mut self,
        client: ClientId,
        round: u64,
        chunk: Vec<SampleScore>,
        last: bool,
        now: u64,
    ) {
        let Some(a) = self.active.as_mut().filter(|a| a.machine.id() == round) else {
            tracing::info!(%client, round, "scores for a round that is not open; ignored");
            if last {
                self.counters.replies_ignored += 1;
            }
            return;
        };
        let limit = a.machine.samples().len();
        let entry = self
            .partial
            .entry(client.clone())
            .or_insert_with(|| Reassembly::new(round, limit));
        if entry.key() != round {
            *entry = Reassembly::new(round, limit);
        }
        let scores = match entry.push(chunk, last) {
            Ok(None) => return,
            Ok(Some(all)) => {
                self.partial.remove(&client);
                all
            }
            Err(e) => {
                self.partial.remove(&client);
                self.counters.replies_malformed += 1;
                tracing::warn!(%client, round, "{e}");
                self.send(
                    &client,
                    Outbound::Msg(ServerMsg::Error(ErrorMsg {
                        code: ErrorCode::BadScores,
                        message: e.to_string(),
                    })),
                );
                return;
            }
        };
        match a.machine.on_scores(&client, scores, now) {
            ReplyVerdict::Accepted => {
                self.counters.replies_accepted += 1;
                if let Some(reply) = a.machine.reply(&client) {
                    // Persisted before the client hears "accepted": an ack is a promise.
                    self.out.push_back(Command::Persist(Persist::Reply {
                        round,
                        client: client.clone(),
                        reply: reply.clone(),
                    }));
                }
                self.send(&client, Outbound::Msg(ServerMsg::ScoresAccepted { round }));
            }
            ReplyVerdict::Ignored(_) => self.counters.replies_ignored += 1,
            ReplyVerdict::Rejected(why) => {
                self.counters.replies_invalid += 1;
                self.send(
                    &client,
                    Outbound::Msg(ServerMsg::Error(ErrorMsg {
                        code: ErrorCode::BadScores,
                        message: why,
                    })),
                )
            }
        }
    }

    /// Carries out what the round machine asks for.
    fn drive_round(&mut self) -> Result<()> {
        while let Some(a) = self.active.as_mut() {
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
                    let frames = encode_result(&outcome)?;
                    let q = outcome.scores.iter().map(|s| s.quality).sum::<f32>()
                        / outcome.scores.len().max(1) as f32;
                    tracing::info!(
                        round,
                        contributors = outcome.contributors.len(),
                        mean_quality = q,
                        "round done"
                    );
                    self.out.push_back(Command::Persist(Persist::Finish {
                        round,
                        phase: Phase::Done,
                        outcome: Some(outcome),
                    }));
                    self.finished += 1;
                    self.counters.rounds_done += 1;
                    self.active = None;
                    self.llm_steps.push_back(LlmStep::Feedback(round));
                    self.broadcast(Outbound::Frames(frames));
                }
                Action::Failed { reason } => {
                    let round = a.machine.id();
                    tracing::warn!(round, %reason, "round failed");
                    self.out.push_back(Command::Persist(Persist::Finish {
                        round,
                        phase: Phase::Failed {
                            reason: reason.clone(),
                        },
                        outcome: None,
                    }));
                    self.finished += 1;
                    self.counters.rounds_failed += 1;
                    self.active = None;
                    self.broadcast(Outbound::Msg(ServerMsg::RoundFailed { round, reason }));
                }
            }
        }
        Ok(())
    }

    fn broadcast(&mut self, out: Outbound) {
        let mut clients: Vec<ClientId> = self.conns.keys().cloned().collect();
        clients.sort();
        for c in clients {
            self.send(&c, out.clone());
        }
    }
}

/// A round's batch as frames: the opening (with the round's learning settings) and the
/// samples in chunks.
fn encode_batch(
    rec: &RoundRecord,
    learning: Option<&LearnSchedule>,
    privacy: Option<ScorePrivacy>,
) -> Result<Arc<Vec<Vec<u8>>>> {
    let enc =
        |m: &ServerMsg| frame::encode(m).map_err(|e| Error::Transport(format!("encode: {e}")));
    let mut frames = vec![enc(&ServerMsg::RoundOpen {
        round: rec.id,
        task: rec.task.clone(),
        total_samples: rec.samples.len() as u64,
        deadline_ms: rec.deadline_at,
        learn: learning.map(|l| l.for_round(rec.id)),
        privacy,
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

/// A round's result as frames, in chunks.
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
