//! Rounds over real QUIC on 127.0.0.1: a full round, a client vanishing mid-round.

use std::process::Stdio;
use std::time::Duration;

use crosslm_coordinator::daemon::{Daemon, DaemonConfig, mint_tokens};
use crosslm_coordinator::generator::FileGenerator;
use crosslm_coordinator::round::{Phase, RoundConfig};
use crosslm_coordinator::store::Store;
use crosslm_sdk::method::LearnSchedule;
use crosslm_sdk::privacy::{PrivacyFloor, PrivacyLedger, PrivacyTarget, ScorePrivacy};
use crosslm_sdk::protocol::{
    AggregatedScore, ArchTraining, LearnSettings, SyntheticSample, TaskInfo,
};
use crosslm_sdk::rounds::{RoundHooks, Scorer, participate, run_rounds};
use crosslm_sdk::transport::Session;
use crosslm_tests::*;
use tokio::io::AsyncBufReadExt;

fn config(dir: &std::path::Path, min_clients: usize, quorum: usize) -> DaemonConfig {
    DaemonConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join("coord"),
        rounds: Some(1),
        samples_per_label: 300, // 600 samples: several chunks each way
        min_clients,
        round: RoundConfig {
            quorum,
            deadline_ms: 60_000,
            ..Default::default()
        },
        idle_timeout_ms: 10_000, // a loaded 2-core CI machine can stall a runtime for seconds
        linger_ms: 10_000,
        learning: None,
        privacy: None,
        admin: None,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_and_three_clients_complete_a_round() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (_, task) = write_task(dir.path());
    let samples = write_samples(dir.path(), 400);
    let cfg = config(dir.path(), 3, 3);
    let data_dir = cfg.data_dir.clone();
    let tokens = mint_tokens(&data_dir, 3).unwrap();
    let generator = FileGenerator::load(&samples, &task).unwrap();
    let mut daemon = Daemon::start(cfg, task, Box::new(generator)).await.unwrap();
    let addr = daemon.addr;

    let mut clients = Vec::new();
    for (i, (token, p)) in tokens.into_iter().zip([0.9f32, 0.6, 0.3]).enumerate() {
        clients.push(tokio::spawn(async move {
            let id = enroll_with(addr, &token, &format!("c{i}")).await;
            // n_private differs per client: the aggregation weights.
            let mut s = Session::connect(addr, &id, info(&format!("c{i}"), (i as u64 + 1) * 10))
                .await
                .unwrap();
            let (_, n) = participate(&mut s, FixedScorer { p }, Some(1))
                .await
                .unwrap();
            s.close().await;
            n
        }));
    }
    for c in clients {
        assert_eq!(c.await.unwrap(), 1, "each client saw one round result");
    }
    assert_eq!(daemon.wait().await.unwrap(), 1);
    drop(daemon);

    let store = Store::open(&data_dir).unwrap();
    let out = store.result(1).unwrap().expect("round 1 result persisted");
    assert_eq!(out.contributors.len(), 3);
    assert_eq!(out.scores.len(), 600);
    // Weighted by n_private 10, 20, 30: (0.9*10 + 0.6*20 + 0.3*30) / 60 = 0.5.
    for s in &out.scores {
        assert!((s.quality - 0.5).abs() < 1e-4, "{s:?}");
        assert!((s.soft.iter().sum::<f32>() - 1.0).abs() < 1e-4);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_completes_on_quorum_when_a_client_process_is_killed() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (_, task) = write_task(dir.path());
    let samples = write_samples(dir.path(), 400);
    let cfg = config(dir.path(), 3, 2);
    let data_dir = cfg.data_dir.clone();
    let tokens = mint_tokens(&data_dir, 3).unwrap();
    let generator = FileGenerator::load(&samples, &task).unwrap();
    let mut daemon = Daemon::start(cfg, task, Box::new(generator)).await.unwrap();
    let addr = daemon.addr;

    // The victim: a real process that receives the batch and then is SIGKILLed.
    let victim_dir = dir.path().join("victim");
    enroll_with(addr, &tokens[2], "victim")
        .await
        .save(&victim_dir)
        .unwrap();
    let mut victim = tokio::process::Command::new(bin("test-client"))
        .args([&addr.to_string(), victim_dir.to_str().unwrap(), "hang"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(victim.stdout.take().unwrap()).lines();

    let mut clients = Vec::new();
    for (i, token) in tokens[..2].iter().cloned().enumerate() {
        clients.push(tokio::spawn(async move {
            let id = enroll_with(addr, &token, &format!("c{i}")).await;
            let mut s = Session::connect(addr, &id, info(&format!("c{i}"), 10))
                .await
                .unwrap();
            let (_, n) = participate(&mut s, FixedScorer { p: 0.8 }, Some(1))
                .await
                .unwrap();
            n
        }));
    }
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(line.as_deref(), Some("got-batch"));
    victim.start_kill().unwrap(); // SIGKILL: no goodbye on the wire
    victim.wait().await.unwrap();

    for c in clients {
        let n = tokio::time::timeout(Duration::from_secs(30), c)
            .await
            .expect("round finished")
            .unwrap();
        assert_eq!(n, 1);
    }
    assert_eq!(daemon.wait().await.unwrap(), 1);
    drop(daemon);
    let store = Store::open(&data_dir).unwrap();
    let s = &store.summaries().unwrap()[0];
    assert_eq!(s.phase, Phase::Done);
    assert_eq!(s.replies.len(), 2);
}

/// Records the settings each round's result came with.
struct Recording {
    inner: FixedScorer,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Option<LearnSettings>>>>,
}

impl Scorer for Recording {
    fn score(
        &mut self,
        task: &TaskInfo,
        samples: &[SyntheticSample],
    ) -> crosslm_sdk::Result<Vec<Vec<f32>>> {
        self.inner.score(task, samples)
    }

    fn learn(
        &mut self,
        _: &TaskInfo,
        _: &[SyntheticSample],
        _: &[AggregatedScore],
        settings: Option<&LearnSettings>,
    ) -> crosslm_sdk::Result<Option<f32>> {
        self.seen.lock().unwrap().push(settings.cloned());
        Ok(None)
    }
}

/// The coordinator's `[daemon.learning]` reaches the client with every round, the quality
/// threshold on its schedule: an experiment's variant is a coordinator setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learning_settings_travel_with_each_round() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (_, task) = write_task(dir.path());
    let samples = write_samples(dir.path(), 100);
    let schedule = LearnSchedule {
        settings: LearnSettings {
            min_quality: 0.7,
            soft_targets: true,
            training: vec![ArchTraining {
                arch: "test-double".into(),
                epochs: Some(3),
                learning_rate: Some(1e-3),
                batch_size: None,
            }],
            ..LearnSettings::default()
        },
        min_quality_from_round: 2,
    };
    let mut cfg = config(dir.path(), 1, 1);
    cfg.rounds = Some(2);
    cfg.samples_per_label = 4;
    cfg.learning = Some(schedule.clone());
    let tokens = mint_tokens(&cfg.data_dir, 1).unwrap();
    let generator = FileGenerator::load(&samples, &task).unwrap();
    let mut daemon = Daemon::start(cfg, task, Box::new(generator)).await.unwrap();
    let addr = daemon.addr;
    let id = enroll_with(addr, &tokens[0], "c0").await;
    let mut s = Session::connect(addr, &id, info("c0", 10)).await.unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let scorer = Recording {
        inner: FixedScorer { p: 0.8 },
        seen: seen.clone(),
    };
    let (_, n) = participate(&mut s, scorer, Some(2)).await.unwrap();
    s.close().await;
    assert_eq!(n, 2);
    assert_eq!(daemon.wait().await.unwrap(), 2);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![Some(schedule.for_round(1)), Some(schedule.for_round(2))]
    );
    assert_eq!(seen[0].as_ref().map(|s| s.min_quality), Some(0.0));
    assert_eq!(seen[1].as_ref().map(|s| s.min_quality), Some(0.7));
}

/// Hooks with a client's own privacy terms: its ledger and floor, and the refusals it gave.
struct BudgetHooks {
    floor: PrivacyFloor,
    ledger: PrivacyLedger,
    refused: Vec<(u64, String)>,
}

impl RoundHooks for BudgetHooks {
    fn privacy(
        &mut self,
        round: u64,
        requested: Option<ScorePrivacy>,
    ) -> Result<Option<f64>, String> {
        self.ledger.admit(round, &self.floor, requested)
    }

    fn failed(&mut self, round: u64, reason: &str) {
        self.refused.push((round, reason.to_string()));
    }
}

/// Client-level DP over real QUIC: the coordinator asks every round for the noise of
/// epsilon 4 over one round. A client that follows (the SDK's default hooks) sends
/// privatized scores: its fixed 0.9 no longer arrives as 0.9. A client whose budget is 4
/// scores round 1 and abandons round 2 with a reason naming its budget, and round 2 completes
/// on the other client's reply alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_past_its_privacy_budget_abandons_the_round() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (_, task) = write_task(dir.path());
    let samples = write_samples(dir.path(), 40);
    let mut cfg = config(dir.path(), 2, 1);
    cfg.rounds = Some(2);
    cfg.samples_per_label = 16;
    let target = PrivacyTarget {
        epsilon: 4.0,
        delta: 1e-5,
        rounds: 1,
    };
    cfg.privacy = Some(target);
    let data_dir = cfg.data_dir.clone();
    let tokens = mint_tokens(&data_dir, 2).unwrap();
    let generator = FileGenerator::load(&samples, &task).unwrap();
    let mut daemon = Daemon::start(cfg, task, Box::new(generator)).await.unwrap();
    let addr = daemon.addr;

    let follower = {
        let token = tokens[0].clone();
        tokio::spawn(async move {
            let id = enroll_with(addr, &token, "follower").await;
            let mut s = Session::connect(addr, &id, info("follower", 10))
                .await
                .unwrap();
            let (_, n) = participate(&mut s, FixedScorer { p: 0.9 }, Some(2))
                .await
                .unwrap();
            n
        })
    };
    let careful = {
        let token = tokens[1].clone();
        tokio::spawn(async move {
            let id = enroll_with(addr, &token, "careful").await;
            let mut s = Session::connect(addr, &id, info("careful", 10))
                .await
                .unwrap();
            let mut hooks = BudgetHooks {
                floor: PrivacyFloor {
                    epsilon_budget: Some(4.0),
                    ..PrivacyFloor::default()
                },
                ledger: PrivacyLedger::default(),
                refused: Vec::new(),
            };
            let mut scorer = Some(FixedScorer { p: 0.9 });
            run_rounds(&mut s, &mut scorer, Some(2), &mut hooks, None)
                .await
                .unwrap();
            hooks
        })
    };
    let timeout = Duration::from_secs(60);
    assert_eq!(
        tokio::time::timeout(timeout, follower)
            .await
            .unwrap()
            .unwrap(),
        2
    );
    let hooks = tokio::time::timeout(timeout, careful)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(hooks.ledger.rounds.len(), 1, "only round 1 spent");
    assert!(hooks.ledger.spent(1e-5) <= 4.0);
    assert_eq!(hooks.refused.len(), 1);
    assert_eq!(hooks.refused[0].0, 2);
    assert!(hooks.refused[0].1.contains("budget"), "{:?}", hooks.refused);
    assert_eq!(daemon.wait().await.unwrap(), 2);
    drop(daemon);

    let store = Store::open(&data_dir).unwrap();
    let one = store.result(1).unwrap().expect("round 1 result");
    let two = store.result(2).unwrap().expect("round 2 result");
    assert_eq!(one.contributors.len(), 2);
    assert_eq!(
        two.contributors.len(),
        1,
        "the careful client sat round 2 out"
    );
    // sigma = z sqrt(2 * 32) with z about 1.2: the fixed 0.9 is gone in the noise.
    let moved = two
        .scores
        .iter()
        .filter(|s| (s.quality - 0.9).abs() > 0.05)
        .count();
    assert!(
        moved > two.scores.len() / 2,
        "{moved} of {} moved",
        two.scores.len()
    );
    for s in &two.scores {
        assert!((s.soft.iter().sum::<f32>() - 1.0).abs() < 1e-4, "{s:?}");
    }
}
