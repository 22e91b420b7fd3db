//! The round engine: a sans-IO state machine in the style of quinn-proto.
//!
//! A round goes `Open -> Collecting -> Done | Failed`. The machine owns no socket and reads
//! no clock: the driver feeds it events (a client joined or left, scores arrived, time
//! passed, each with `now` in milliseconds since the Unix epoch) and drains
//! [`RoundMachine::poll_action`] for what to do (send the batch to a client, publish the
//! result). Wall-clock milliseconds are used so that a deadline survives a restart.

pub mod aggregate;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use crosslm_sdk::protocol::{AggregatedScore, ClientId, SampleScore, SyntheticSample, TaskInfo};
use serde::{Deserialize, Serialize};

pub use aggregate::{Aggregation, agreement, combine, correct_prior, score_sample, screen};

/// Tolerance on the sum of a client's probabilities for one sample.
pub const SUM_TOLERANCE: f32 = 1e-3;

/// Round settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoundConfig {
    /// Least number of clients whose scores make a round valid.
    pub quorum: usize,
    /// Time from opening to the deadline, in milliseconds.
    pub deadline_ms: u64,
    /// How client scores are combined.
    pub aggregation: Aggregation,
    /// Correct each client's label bias before combining ([`correct_prior`]).
    pub prior_correction: bool,
}

impl Default for RoundConfig {
    fn default() -> Self {
        Self {
            quorum: 1,
            deadline_ms: 600_000,
            aggregation: Aggregation::WeightedMean,
            prior_correction: true,
        }
    }
}

/// Where a round stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Phase {
    /// Created, not yet distributed.
    Open,
    /// The batch is out; scores are being collected.
    Collecting,
    /// Aggregated: the result is final.
    Done,
    /// Ended without quorum.
    Failed {
        /// Why.
        reason: String,
    },
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send the round's task and samples to this client.
    SendBatch {
        /// The client.
        client: ClientId,
    },
    /// The round is done: persist and publish the result.
    Completed(RoundOutcome),
    /// The round failed.
    Failed {
        /// Why.
        reason: String,
    },
}

/// The result of a finished round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundOutcome {
    /// The round.
    pub round: u64,
    /// Per sample, the aggregated soft label and quality.
    pub scores: Vec<AggregatedScore>,
    /// Clients whose scores went in.
    pub contributors: Vec<ClientId>,
}

/// What happened to a score reply.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyVerdict {
    /// Recorded.
    Accepted,
    /// Dropped without error: a duplicate or a late reply.
    Ignored(String),
    /// Refused: the scores are invalid.
    Rejected(String),
}

/// A client's accepted reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Aggregation weight (the client's number of private examples).
    pub weight: f64,
    /// Scores, one per sample, in the round's sample order.
    pub scores: Vec<SampleScore>,
}

/// One round's state machine.
#[derive(Debug)]
pub struct RoundMachine {
    id: u64,
    task: TaskInfo,
    samples: Vec<SyntheticSample>,
    index: HashMap<u64, usize>,
    cfg: RoundConfig,
    phase: Phase,
    deadline_at: u64,
    /// Connected clients that were sent the batch and have not replied, with their weight.
    pending: BTreeMap<ClientId, f64>,
    replies: BTreeMap<ClientId, Reply>,
    actions: VecDeque<Action>,
}

impl RoundMachine {
    /// A new round over `samples`, opening at `now`.
    pub fn new(
        id: u64,
        task: TaskInfo,
        samples: Vec<SyntheticSample>,
        cfg: RoundConfig,
        now: u64,
    ) -> Self {
        let index = samples.iter().enumerate().map(|(i, s)| (s.id, i)).collect();
        let deadline_at = now.saturating_add(cfg.deadline_ms);
        Self {
            id,
            task,
            samples,
            index,
            cfg,
            phase: Phase::Open,
            deadline_at,
            pending: BTreeMap::new(),
            replies: BTreeMap::new(),
            actions: VecDeque::new(),
        }
    }

    /// Rebuilds a round after a restart from what was persisted: it resumes collecting
    /// with the replies already received; no client is connected yet.
    pub fn restore(
        id: u64,
        task: TaskInfo,
        samples: Vec<SyntheticSample>,
        cfg: RoundConfig,
        deadline_at: u64,
        replies: Vec<(ClientId, Reply)>,
    ) -> Self {
        let mut m = Self::new(id, task, samples, cfg, 0);
        m.deadline_at = deadline_at;
        m.phase = Phase::Collecting;
        m.replies = replies.into_iter().collect();
        m
    }

    /// The round's id.
    pub fn id(&self) -> u64 {
        self.id
    }
    /// The task.
    pub fn task(&self) -> &TaskInfo {
        &self.task
    }
    /// The synthetic samples.
    pub fn samples(&self) -> &[SyntheticSample] {
        &self.samples
    }
    /// Current phase.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }
    /// Deadline, in ms since the Unix epoch.
    pub fn deadline_at(&self) -> u64 {
        self.deadline_at
    }
    /// Clients whose replies were accepted.
    pub fn replied(&self) -> impl Iterator<Item = &ClientId> {
        self.replies.keys()
    }
    /// The accepted reply of `client`, if any.
    pub fn reply(&self, client: &str) -> Option<&Reply> {
        self.replies.get(client)
    }
    /// Whether `client` already replied.
    pub fn has_replied(&self, client: &str) -> bool {
        self.replies.contains_key(client)
    }

    /// Starts distribution to the clients connected now (`(id, weight)`).
    pub fn start(&mut self, clients: impl IntoIterator<Item = (ClientId, f64)>, now: u64) {
        if self.phase != Phase::Open {
            return;
        }
        self.phase = Phase::Collecting;
        for (c, w) in clients {
            self.join(c, w, now);
        }
        self.check(now);
    }

    /// A client connected (or reconnected): it gets the batch unless it already replied.
    pub fn join(&mut self, client: ClientId, weight: f64, now: u64) {
        if self.phase != Phase::Collecting || now >= self.deadline_at {
            return;
        }
        if self.replies.contains_key(&client) {
            tracing::debug!(round = self.id, %client, "client rejoined; its scores are already in");
            return;
        }
        self.pending.insert(client.clone(), weight);
        self.actions.push_back(Action::SendBatch { client });
    }

    /// A client disconnected: the round no longer waits for it.
    pub fn leave(&mut self, client: &str, now: u64) {
        if self.pending.remove(client).is_some() {
            tracing::info!(round = self.id, %client, "client left before replying");
            self.check(now);
        }
    }

    /// Scores arrived from a client.
    pub fn on_scores(&mut self, client: &str, scores: Vec<SampleScore>, now: u64) -> ReplyVerdict {
        if self.phase != Phase::Collecting || now >= self.deadline_at {
            let why = format!("late scores from {client} for round {} ignored", self.id);
            tracing::info!(round = self.id, %client, "late scores ignored");
            return ReplyVerdict::Ignored(why);
        }
        if self.replies.contains_key(client) {
            tracing::info!(round = self.id, %client, "duplicate scores ignored");
            return ReplyVerdict::Ignored(format!("duplicate scores from {client} ignored"));
        }
        let Some(weight) = self.pending.get(client).copied() else {
            tracing::warn!(round = self.id, %client, "scores from a client that was not sent the batch");
            return ReplyVerdict::Rejected(format!("{client} was not sent round {}", self.id));
        };
        if let Err(why) = self.validate(&scores) {
            tracing::warn!(round = self.id, %client, %why, "scores rejected");
            return ReplyVerdict::Rejected(why);
        }
        let mut ordered = scores;
        ordered.sort_by_key(|s| self.index[&s.id]);
        self.pending.remove(client);
        self.replies.insert(
            client.to_string(),
            Reply {
                weight,
                scores: ordered,
            },
        );
        self.check(now);
        ReplyVerdict::Accepted
    }

    /// Time passed; call when [`poll_timeout`](Self::poll_timeout) is reached.
    pub fn handle_timeout(&mut self, now: u64) {
        self.check(now);
    }

    /// When the machine next needs [`handle_timeout`](Self::handle_timeout).
    pub fn poll_timeout(&self) -> Option<u64> {
        (self.phase == Phase::Collecting).then_some(self.deadline_at)
    }

    /// Next action for the driver.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    fn validate(&self, scores: &[SampleScore]) -> Result<(), String> {
        let n_labels = self.task.labels.len();
        let mut seen = HashSet::with_capacity(scores.len());
        for s in scores {
            if !self.index.contains_key(&s.id) {
                return Err(format!("unknown sample id {}", s.id));
            }
            if !seen.insert(s.id) {
                return Err(format!("sample {} scored twice", s.id));
            }
            if s.probs.len() != n_labels {
                return Err(format!(
                    "sample {}: {} probabilities for {n_labels} labels",
                    s.id,
                    s.probs.len()
                ));
            }
            if let Some(p) = s
                .probs
                .iter()
                .find(|p| !p.is_finite() || **p < 0.0 || **p > 1.0)
            {
                return Err(format!("sample {}: probability {p} is not in [0, 1]", s.id));
            }
            let sum: f32 = s.probs.iter().sum();
            if (sum - 1.0).abs() > SUM_TOLERANCE {
                return Err(format!(
                    "sample {}: probabilities sum to {sum}, not 1",
                    s.id
                ));
            }
        }
        if seen.len() != self.samples.len() {
            return Err(format!(
                "{} of {} samples scored",
                seen.len(),
                self.samples.len()
            ));
        }
        Ok(())
    }

    /// Completes or fails the round when its conditions are met.
    fn check(&mut self, now: u64) {
        if self.phase != Phase::Collecting {
            return;
        }
        let enough = self.replies.len() >= self.cfg.quorum.max(1);
        let past_deadline = now >= self.deadline_at;
        if enough && (self.pending.is_empty() || past_deadline) {
            let outcome = self.aggregate();
            self.phase = Phase::Done;
            tracing::info!(
                round = self.id,
                clients = outcome.contributors.len(),
                "round aggregated"
            );
            self.actions.push_back(Action::Completed(outcome));
        } else if past_deadline {
            let reason = format!(
                "deadline passed with {} of {} required replies",
                self.replies.len(),
                self.cfg.quorum
            );
            tracing::warn!(round = self.id, %reason, "round failed");
            self.pending.clear();
            self.phase = Phase::Failed {
                reason: reason.clone(),
            };
            self.actions.push_back(Action::Failed { reason });
        }
    }

    fn aggregate(&self) -> RoundOutcome {
        let (weights, rows): (Vec<f64>, Vec<Vec<Vec<f32>>>) = self
            .replies
            .values()
            .map(|r| {
                let rows: Vec<&[f32]> = r.scores.iter().map(|s| s.probs.as_slice()).collect();
                let rows = if self.cfg.prior_correction {
                    correct_prior(&rows, &self.samples)
                } else {
                    rows.iter().map(|r| r.to_vec()).collect()
                };
                (r.weight, rows)
            })
            .unzip();
        let (counted, agree) = screen(self.cfg.aggregation, &rows, &self.samples);
        if let Some(agree) = &agree {
            for ((client, a), &k) in self.replies.keys().zip(agree).zip(&counted) {
                if k {
                    tracing::debug!(round = self.id, client, agreement = a, "scores counted");
                } else {
                    tracing::warn!(
                        round = self.id,
                        client,
                        agreement = a,
                        "scores left out: they do not track the other clients'"
                    );
                }
            }
        }
        let per_client: Vec<(f64, Vec<Vec<f32>>)> = weights
            .into_iter()
            .zip(rows)
            .zip(&counted)
            .filter(|(_, k)| **k)
            .map(|(wr, _)| wr)
            .collect();
        let scores = self
            .samples
            .iter()
            .enumerate()
            .map(|(i, sample)| {
                let votes: Vec<(f64, &[f32])> = per_client
                    .iter()
                    .map(|(w, rows)| (*w, rows[i].as_slice()))
                    .collect();
                score_sample(self.cfg.aggregation, sample, &votes)
            })
            .collect();
        RoundOutcome {
            round: self.id,
            scores,
            contributors: self.replies.keys().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests;
