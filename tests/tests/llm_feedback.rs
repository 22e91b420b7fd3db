//! The coordinator drives the LLM's side of CrossLM between rounds, over real QUIC: a
//! baseline before the first round, then feedback with each round's samples and aggregated
//! scores, before the next round is generated; reports are stored and survive a restart.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crosslm_coordinator::Result;
use crosslm_coordinator::daemon::{Daemon, DaemonConfig, mint_tokens};
use crosslm_coordinator::generator::{FileGenerator, GeneratedSample, Generator};
use crosslm_coordinator::round::RoundConfig;
use crosslm_coordinator::store::Store;
use crosslm_coordinator::tuning::LlmReport;
use crosslm_sdk::protocol::{AggregatedScore, LearnSettings, SyntheticSample, TaskInfo};
use crosslm_sdk::rounds::{Scorer, participate};
use crosslm_sdk::transport::Session;
use crosslm_tests::*;

/// What the generator saw, in order.
#[derive(Debug, Clone, PartialEq)]
enum Call {
    Generate(u64),
    Baseline,
    Feedback {
        round: u64,
        samples: usize,
        mean_quality: f32,
    },
}

/// A file generator that records calls and "learns" (reports) from feedback.
struct Recording {
    inner: FileGenerator,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl Generator for Recording {
    fn generate(&mut self, task: &TaskInfo, n: usize, round: u64) -> Result<Vec<GeneratedSample>> {
        self.calls.lock().unwrap().push(Call::Generate(round));
        self.inner.generate(task, n, round)
    }

    fn baseline(&mut self) -> Result<Option<LlmReport>> {
        self.calls.lock().unwrap().push(Call::Baseline);
        let mut r = LlmReport::new(0);
        r.task_accuracy = Some(0.5);
        Ok(Some(r))
    }

    fn feedback(
        &mut self,
        round: u64,
        samples: &[SyntheticSample],
        scores: &[AggregatedScore],
    ) -> Result<Option<LlmReport>> {
        let mean_quality = scores.iter().map(|s| s.quality).sum::<f32>() / scores.len() as f32;
        self.calls.lock().unwrap().push(Call::Feedback {
            round,
            samples: samples.len(),
            mean_quality,
        });
        let mut r = LlmReport::new(round);
        r.tuned = true;
        r.task_accuracy = Some(0.5 + round as f64 / 10.0);
        Ok(Some(r))
    }
}

/// Scores like [`FixedScorer`] and reports a local accuracy after each round.
struct Reporting(FixedScorer);

impl Scorer for Reporting {
    fn score(
        &mut self,
        task: &TaskInfo,
        samples: &[SyntheticSample],
    ) -> crosslm_sdk::Result<Vec<Vec<f32>>> {
        self.0.score(task, samples)
    }

    fn learn(
        &mut self,
        _: &TaskInfo,
        _: &[SyntheticSample],
        _: &[AggregatedScore],
        _: Option<&LearnSettings>,
    ) -> crosslm_sdk::Result<Option<f32>> {
        Ok(Some(0.75))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_learns_between_rounds_and_reports_persist() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (_, task) = write_task(dir.path());
    let samples = write_samples(dir.path(), 50);
    let cfg = DaemonConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("coord"),
        rounds: Some(2),
        samples_per_label: 10,
        min_clients: 2,
        round: RoundConfig {
            quorum: 2,
            deadline_ms: 60_000,
            ..Default::default()
        },
        idle_timeout_ms: 10_000, // a loaded 2-core CI machine can stall a runtime for seconds
        linger_ms: 5_000,
        learning: None,
        privacy: None,
        admin: None,
        ..Default::default()
    };
    let data_dir = cfg.data_dir.clone();
    let tokens = mint_tokens(&data_dir, 2).unwrap();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let generator = Recording {
        inner: FileGenerator::load(&samples, &task).unwrap(),
        calls: calls.clone(),
    };
    let mut daemon = Daemon::start(cfg, task, Box::new(generator)).await.unwrap();
    let addr = daemon.addr;
    let mut clients = Vec::new();
    for (i, token) in tokens.into_iter().enumerate() {
        clients.push(tokio::spawn(async move {
            let id = enroll_with(addr, &token, &format!("c{i}")).await;
            let mut s = Session::connect(addr, &id, info(&format!("c{i}"), 10))
                .await
                .unwrap();
            let (_, n) = participate(&mut s, Reporting(FixedScorer { p: 0.8 }), Some(2))
                .await
                .unwrap();
            s.close().await;
            n
        }));
    }
    for c in clients {
        assert_eq!(c.await.unwrap(), 2);
    }
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(30), daemon.wait())
            .await
            .unwrap()
            .unwrap(),
        2
    );
    let calls = calls.lock().unwrap().clone();
    // Both FixedScorer clients give the intended label 0.8: the aggregate quality is 0.8.
    let fb = |round| Call::Feedback {
        round,
        samples: 20,
        mean_quality: 0.8,
    };
    let expect = vec![
        Call::Baseline,
        Call::Generate(1),
        fb(1),
        Call::Generate(2),
        fb(2),
    ];
    assert_eq!(calls.len(), expect.len(), "{calls:?}");
    for (got, want) in calls.iter().zip(&expect) {
        match (got, want) {
            (
                Call::Feedback {
                    round,
                    samples,
                    mean_quality,
                },
                Call::Feedback {
                    round: r,
                    samples: n,
                    mean_quality: q,
                },
            ) => {
                assert_eq!((round, samples), (r, n));
                assert!((mean_quality - q).abs() < 1e-4, "{got:?}");
            }
            _ => assert_eq!(got, want),
        }
    }
    let store = Store::open(&data_dir).unwrap();
    let reports = store.llm_reports().unwrap();
    let rounds: Vec<u64> = reports.iter().map(|r| r.round).collect();
    assert_eq!(rounds, vec![0, 1, 2]);
    assert_eq!(reports[2].task_accuracy, Some(0.7));
    // The last round's reports arrive although the clients close right after sending them.
    for round in [1, 2] {
        let r = store.reports(round).unwrap();
        assert_eq!(r.len(), 2, "round {round}: {r:?}");
        assert!(r.iter().all(|(_, a)| *a == 0.75));
    }
}
