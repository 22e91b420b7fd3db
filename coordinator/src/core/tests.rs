//! The core under simulated time: fake clients that score at once, a generator that answers
//! at once, an in-memory log of what was persisted, a virtual clock. No socket, no thread,
//! no sleep: each test runs in milliseconds.

use crosslm_sdk::protocol::{AggregatedScore, ServerMsg};

use super::*;
use crate::round::RoundConfig;

const T0: u64 = 1_000_000;

fn task() -> TaskInfo {
    TaskInfo {
        name: "t".into(),
        description: String::new(),
        labels: vec!["neg".into(), "pos".into()],
    }
}

fn config(min_clients: usize, quorum: usize, rounds: u64) -> DaemonConfig {
    DaemonConfig {
        rounds: Some(rounds),
        samples_per_label: 2,
        min_clients,
        round: RoundConfig {
            quorum,
            deadline_ms: 10_000,
            ..RoundConfig::default()
        },
        linger_ms: 5_000,
        ..DaemonConfig::default()
    }
}

fn samples() -> Vec<SyntheticSample> {
    (0..4)
        .map(|i| SyntheticSample {
            id: i,
            text: format!("sample {i}"),
            label: (i % 2) as u32,
        })
        .collect()
}

/// Every sample's intended label at `p`.
fn scores(p: f32) -> Vec<SampleScore> {
    samples()
        .iter()
        .map(|s| SampleScore {
            id: s.id,
            probs: if s.label == 0 {
                vec![p, 1.0 - p]
            } else {
                vec![1.0 - p, p]
            },
        })
        .collect()
}

/// The harness: the core, a clock, and everything the core asked for, sorted by kind.
struct Sim {
    core: Core,
    now: u64,
    /// Per client, what it was sent (decoded where it was a message).
    sent: Vec<(ClientId, Outbound)>,
    persisted: Vec<Persist>,
    /// Every command in order (for ordering checks).
    log: Vec<Command>,
    generate: Vec<u64>,
    llm: Vec<LlmStep>,
    exited: bool,
    /// The LLM and the generator answer by themselves.
    auto: bool,
}

impl Sim {
    fn new(cfg: DaemonConfig) -> Self {
        Self::start(cfg, Resume::fresh(), true)
    }

    fn resume(cfg: DaemonConfig, resume: Resume) -> Self {
        Self::start(cfg, resume, true)
    }

    /// The LLM and the generator answer only when the test says.
    fn manual(cfg: DaemonConfig) -> Self {
        Self::start(cfg, Resume::fresh(), false)
    }

    fn start(cfg: DaemonConfig, resume: Resume, auto: bool) -> Self {
        let mut sim = Self {
            core: Core::new(cfg, task(), resume).unwrap(),
            now: T0,
            sent: Vec::new(),
            persisted: Vec::new(),
            log: Vec::new(),
            generate: Vec::new(),
            llm: Vec::new(),
            exited: false,
            auto,
        };
        sim.core.handle_timeout(T0).unwrap();
        sim.pump();
        sim
    }

    /// Carries out the core's commands as a driver would (the generator at once when `auto`).
    fn pump(&mut self) {
        while let Some(cmd) = self.core.poll() {
            self.log.push(cmd.clone());
            match cmd {
                Command::Send { client, out } => self.sent.push((client, out)),
                Command::Persist(p) => self.persisted.push(p),
                Command::Generate { round, .. } => {
                    self.generate.push(round);
                    if self.auto {
                        self.input(Input::Generated {
                            round,
                            result: Ok(samples()),
                        });
                    }
                }
                Command::Llm(step) => {
                    self.llm.push(step);
                    if self.auto {
                        self.input(Input::LlmDone {
                            step,
                            result: Ok(None),
                        });
                    }
                }
                Command::Exit => self.exited = true,
            }
        }
    }

    fn input(&mut self, i: Input) {
        self.core.handle(i, self.now).unwrap();
        self.pump();
    }

    fn advance(&mut self, ms: u64) {
        self.now += ms;
        if self.core.poll_timeout().is_some_and(|t| self.now >= t) {
            self.core.handle_timeout(self.now).unwrap();
        }
        self.pump();
    }

    fn connect(&mut self, client: &str, conn_id: usize) {
        self.input(Input::Connected {
            client: client.into(),
            conn_id,
            info: ClientInfo {
                name: client.into(),
                slm_arch: "test".into(),
                n_private: 10,
            },
        });
    }

    fn disconnect(&mut self, client: &str, conn_id: usize) {
        self.input(Input::Disconnected {
            client: client.into(),
            conn_id,
        });
    }

    fn reply(&mut self, client: &str, round: u64, p: f32) {
        let all = scores(p);
        let (a, b) = all.split_at(2);
        for (chunk, last) in [(a.to_vec(), false), (b.to_vec(), true)] {
            self.input(Input::Scores {
                client: client.into(),
                round,
                scores: chunk,
                last,
            });
        }
    }

    /// Batches (`Frames` holding a round's opening) sent to `client`.
    fn batches(&self, client: &str) -> usize {
        self.sent
            .iter()
            .filter(|(c, o)| c == client && matches!(o, Outbound::Frames(f) if opens_round(f)))
            .count()
    }

    fn msgs(&self, client: &str) -> Vec<ServerMsg> {
        self.sent
            .iter()
            .filter(|(c, _)| c == client)
            .filter_map(|(_, o)| match o {
                Outbound::Msg(m) => Some(m.clone()),
                Outbound::Frames(_) => None,
            })
            .collect()
    }

    fn results(&self, client: &str) -> Vec<(u64, Vec<AggregatedScore>)> {
        self.sent
            .iter()
            .filter(|(c, _)| c == client)
            .filter_map(|(_, o)| match o {
                Outbound::Frames(f) => match decode(&f[0])? {
                    ServerMsg::RoundResult { round, scores, .. } => Some((round, scores)),
                    _ => None,
                },
                Outbound::Msg(_) => None,
            })
            .collect()
    }

    fn finished_rounds(&self) -> Vec<(u64, Phase)> {
        self.persisted
            .iter()
            .filter_map(|p| match p {
                Persist::Finish { round, phase, .. } => Some((*round, phase.clone())),
                _ => None,
            })
            .collect()
    }
}

fn opens_round(frames: &[Vec<u8>]) -> bool {
    matches!(decode(&frames[0]), Some(ServerMsg::RoundOpen { .. }))
}

/// One encoded frame's message.
fn decode(bytes: &[u8]) -> Option<ServerMsg> {
    frame::decode_frame::<ServerMsg>(bytes)
        .ok()
        .flatten()
        .map(|(m, _)| m)
}

#[test]
fn a_round_waits_for_min_clients_then_completes_on_quorum() {
    let mut sim = Sim::new(config(2, 2, 1));
    // The LLM is measured before anything else; no round without two clients.
    assert_eq!(sim.llm, vec![LlmStep::Baseline]);
    sim.connect("a", 1);
    assert!(sim.generate.is_empty());
    sim.connect("b", 2);
    assert_eq!(sim.generate, vec![1]);
    assert_eq!((sim.batches("a"), sim.batches("b")), (1, 1));
    assert!(matches!(sim.persisted[0], Persist::Round(ref r) if r.id == 1));
    sim.reply("a", 1, 0.9);
    assert_eq!(
        sim.core.active_round(),
        Some(1),
        "one reply is not a quorum of two"
    );
    sim.reply("b", 1, 0.7);
    assert_eq!(sim.finished_rounds(), vec![(1, Phase::Done)]);
    let (round, result) = sim.results("a").pop().expect("result sent");
    assert_eq!(round, 1);
    assert!((result[0].quality - 0.8).abs() < 1e-4, "{:?}", result[0]);
    assert_eq!(sim.results("b").len(), 1);
    // The LLM learns from the round, then the core lingers for the clients.
    assert_eq!(sim.llm, vec![LlmStep::Baseline, LlmStep::Feedback(1)]);
    assert!(!sim.exited);
}

#[test]
fn an_ack_comes_after_its_reply_is_persisted() {
    let mut sim = Sim::new(config(1, 1, 1));
    sim.connect("a", 1);
    sim.reply("a", 1, 0.9);
    let persisted = sim
        .log
        .iter()
        .position(|c| matches!(c, Command::Persist(Persist::Reply { .. })))
        .expect("reply persisted");
    let acked = sim
        .log
        .iter()
        .position(|c| {
            matches!(
                c,
                Command::Send {
                    out: Outbound::Msg(ServerMsg::ScoresAccepted { .. }),
                    ..
                }
            )
        })
        .expect("ack sent");
    assert!(persisted < acked);
}

#[test]
fn a_round_without_quorum_fails_at_its_deadline_and_the_next_one_opens() {
    let mut sim = Sim::new(config(2, 2, 2));
    sim.connect("a", 1);
    sim.connect("b", 2);
    sim.reply("a", 1, 0.9);
    sim.advance(9_999);
    assert_eq!(sim.core.active_round(), Some(1));
    sim.advance(1);
    assert!(matches!(
        &sim.finished_rounds()[..],
        [(1, Phase::Failed { .. })]
    ));
    assert!(
        sim.msgs("b")
            .iter()
            .any(|m| matches!(m, ServerMsg::RoundFailed { round: 1, .. }))
    );
    // A failed round teaches the LLM nothing; round 2 opens at once.
    assert_eq!(sim.llm, vec![LlmStep::Baseline]);
    assert_eq!(sim.generate, vec![1, 2]);
    assert_eq!(sim.core.active_round(), Some(2));
}

#[test]
fn a_client_that_vanishes_is_not_waited_for() {
    let mut sim = Sim::new(config(3, 2, 1));
    for (c, id) in [("a", 1), ("b", 2), ("c", 3)] {
        sim.connect(c, id);
    }
    sim.reply("a", 1, 0.9);
    sim.reply("b", 1, 0.8);
    // Quorum is met, but c is still expected until it replies or leaves.
    assert_eq!(sim.core.active_round(), Some(1));
    // A stale connection's end does not count: c reconnected as conn 4.
    sim.connect("c", 4);
    sim.disconnect("c", 3);
    assert_eq!(sim.core.active_round(), Some(1));
    sim.disconnect("c", 4);
    assert_eq!(sim.finished_rounds(), vec![(1, Phase::Done)]);
    assert!(sim.results("c").is_empty(), "c left before the result");
}

#[test]
fn duplicate_late_and_oversized_replies() {
    let mut sim = Sim::new(config(2, 2, 1));
    sim.connect("a", 1);
    sim.connect("b", 2);
    sim.reply("a", 1, 0.9);
    let acks = |sim: &Sim| {
        sim.msgs("a")
            .iter()
            .filter(|m| matches!(m, ServerMsg::ScoresAccepted { .. }))
            .count()
    };
    assert_eq!(acks(&sim), 1);
    // The same reply again: ignored, no second ack, nothing persisted twice.
    sim.reply("a", 1, 0.9);
    assert_eq!(acks(&sim), 1);
    let replies = |sim: &Sim| {
        sim.persisted
            .iter()
            .filter(|p| matches!(p, Persist::Reply { .. }))
            .count()
    };
    assert_eq!(replies(&sim), 1);
    // More scores than the round has samples: an error, and the partial reply is dropped.
    for _ in 0..2 {
        sim.input(Input::Scores {
            client: "b".into(),
            round: 1,
            scores: scores(0.8),
            last: false,
        });
    }
    assert!(
        sim.msgs("b")
            .iter()
            .any(|m| matches!(m, ServerMsg::Error(e) if e.code == ErrorCode::BadScores))
    );
    sim.reply("b", 1, 0.8);
    assert_eq!(sim.finished_rounds(), vec![(1, Phase::Done)]);
    // Scores for a round that is over: ignored.
    sim.reply("b", 1, 0.8);
    assert_eq!(replies(&sim), 2);
}

#[test]
fn a_restarted_core_resumes_its_round_from_the_store() {
    // First life: round 1 opens, a replies (persisted), then the process dies.
    let mut first = Sim::new(config(2, 2, 1));
    first.connect("a", 1);
    first.connect("b", 2);
    first.reply("a", 1, 0.9);
    let rec = first
        .persisted
        .iter()
        .find_map(|p| match p {
            Persist::Round(r) => Some(r.clone()),
            _ => None,
        })
        .unwrap();
    let replies: Vec<(ClientId, Reply)> = first
        .persisted
        .iter()
        .filter_map(|p| match p {
            Persist::Reply { client, reply, .. } => Some((client.clone(), reply.clone())),
            _ => None,
        })
        .collect();
    // Second life, from what was persisted (the baseline report was stored).
    let resume = Resume {
        finished: 0,
        next_round: 2,
        llm_reported: [0].into_iter().collect(),
        last_done: None,
        unfinished: Some((rec, replies)),
    };
    let mut sim = Sim::resume(config(2, 2, 1), resume);
    sim.now = T0 + 1_000;
    assert!(sim.llm.is_empty(), "the baseline is not measured twice");
    sim.connect("a", 1);
    assert_eq!(sim.batches("a"), 0, "a's scores are already in");
    sim.connect("b", 2);
    assert_eq!(sim.batches("b"), 1);
    sim.reply("b", 1, 0.7);
    assert_eq!(sim.finished_rounds(), vec![(1, Phase::Done)]);
    assert!(
        sim.generate.is_empty(),
        "no new round generated for the resumed one"
    );
    // The LLM's feedback for a done round whose report is missing comes first after a restart.
    let resume = Resume {
        finished: 1,
        next_round: 2,
        llm_reported: [0].into_iter().collect(),
        last_done: Some(1),
        unfinished: None,
    };
    let again = Sim::resume(config(1, 1, 2), resume);
    assert_eq!(again.llm, vec![LlmStep::Feedback(1)]);
}

#[test]
fn after_the_last_round_the_core_lingers_for_reports_then_exits() {
    let mut sim = Sim::new(config(2, 2, 1));
    sim.connect("a", 1);
    sim.connect("b", 2);
    sim.reply("a", 1, 0.9);
    sim.reply("b", 1, 0.7);
    assert!(!sim.exited);
    sim.input(Input::Report {
        client: "a".into(),
        round: 1,
        local_accuracy: Some(0.75),
    });
    assert!(sim.persisted.contains(&Persist::Report {
        round: 1,
        client: "a".into(),
        accuracy: 0.75
    }));
    sim.disconnect("a", 1);
    assert!(!sim.exited, "b is still there");
    sim.disconnect("b", 2);
    assert!(sim.exited, "everyone left");

    // A client that never leaves: the linger time ends it.
    let mut sim = Sim::new(config(1, 1, 1));
    sim.connect("a", 1);
    sim.reply("a", 1, 0.9);
    sim.advance(4_999);
    assert!(!sim.exited);
    sim.advance(1);
    assert!(sim.exited);
}

#[test]
fn the_llm_and_generation_take_turns_and_failures_retry() {
    let mut sim = Sim::manual(config(1, 1, 2));
    // The baseline is still running: the generator is busy, no round yet.
    sim.connect("a", 1);
    assert!(sim.generate.is_empty());
    sim.input(Input::LlmDone {
        step: LlmStep::Baseline,
        result: Err("out of memory".into()),
    });
    assert_eq!(sim.generate, vec![1]);
    // A failed generation is retried after a pause, not at once.
    sim.input(Input::Generated {
        round: 1,
        result: Err("model crashed".into()),
    });
    assert_eq!(sim.generate, vec![1]);
    sim.advance(GENERATION_RETRY_MS);
    assert_eq!(sim.generate, vec![1, 1]);
    sim.input(Input::Generated {
        round: 1,
        result: Ok(samples()),
    });
    sim.reply("a", 1, 0.9);
    // Round 2 waits for the LLM's feedback on round 1.
    assert_eq!(sim.llm, vec![LlmStep::Baseline, LlmStep::Feedback(1)]);
    assert_eq!(sim.generate, vec![1, 1]);
    sim.input(Input::LlmDone {
        step: LlmStep::Feedback(1),
        result: Ok(None),
    });
    assert_eq!(sim.generate, vec![1, 1, 2]);
}

#[test]
fn the_learning_settings_go_out_with_each_batch() {
    let mut cfg = config(1, 1, 1);
    cfg.learning = Some(LearnSchedule {
        min_quality_from_round: 2,
        ..LearnSchedule::default()
    });
    let mut sim = Sim::new(cfg);
    sim.connect("a", 1);
    let Some((_, Outbound::Frames(frames))) = sim.sent.iter().find(|(c, _)| c == "a") else {
        panic!("batch sent")
    };
    let Some(ServerMsg::RoundOpen {
        learn: Some(learn), ..
    }) = decode(&frames[0])
    else {
        panic!("round opening with settings")
    };
    assert_eq!(learn.min_quality, 0.0, "the threshold starts in round 2");
}

/// A privacy target becomes the noise multiplier every round asks of the clients; a target
/// no noise reaches is an error at start.
#[test]
fn the_privacy_target_goes_out_as_a_noise_multiplier() {
    let mut cfg = config(1, 1, 1);
    let target = crosslm_sdk::privacy::PrivacyTarget {
        epsilon: 4.0,
        delta: 1e-5,
        rounds: 3,
    };
    cfg.privacy = Some(target);
    let mut sim = Sim::new(cfg.clone());
    sim.connect("a", 1);
    let Some((_, Outbound::Frames(frames))) = sim.sent.iter().find(|(c, _)| c == "a") else {
        panic!("batch sent")
    };
    let Some(ServerMsg::RoundOpen {
        privacy: Some(p), ..
    }) = decode(&frames[0])
    else {
        panic!("round opening with a privacy request")
    };
    assert_eq!(Ok(p.noise_multiplier), target.noise_multiplier());
    cfg.privacy = Some(crosslm_sdk::privacy::PrivacyTarget {
        epsilon: -1.0,
        ..target
    });
    assert!(Core::new(cfg, task(), Resume::default()).is_err());
}

#[test]
fn stop_exits_at_once() {
    let mut sim = Sim::new(config(1, 1, 5));
    sim.connect("a", 1);
    sim.input(Input::Stop);
    assert!(sim.exited);
    assert_eq!(sim.log.iter().filter(|c| **c == Command::Exit).count(), 1);
}
