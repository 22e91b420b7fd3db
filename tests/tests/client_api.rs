//! The SDK's high-level client in-process against the real coordinator daemon: a cancel while
//! a reply is being scored abandons that reply cleanly and keeps the checkpoint; the same
//! client then completes the round.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crosslm_sdk::client::{Activity, Client, ClientConfig, Progress};
use crosslm_sdk::data::assets_dir;
use crosslm_sdk::slm::{Arch, load_checkpoint};
use crosslm_sdk::transport::Reconnect;
use crosslm_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_while_scoring_abandons_the_reply_and_keeps_the_checkpoint() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    // 2 rounds of 400 samples: scoring takes several chunks.
    let coord = CoordinatorProcess::start(dir.path(), 2, 200, 1, 1);
    let client = Arc::new(
        Client::open(ClientConfig {
            coordinator: Some(coord.addr.to_string()),
            data_dir: dir.path().join("client"),
            name: "api-test".into(),
            arch: Arch::Bag,
            model_dir: assets_dir().join("minilm"),
            train_epochs: Some(10),
            test_fraction: 0.25,
            connect_timeout: Duration::from_secs(5),
            ..ClientConfig::default()
        })
        .unwrap(),
    );
    let events: Arc<Mutex<Vec<Progress>>> = Arc::default();
    let (ev, weak) = (events.clone(), Arc::downgrade(&client));
    client.set_listener(Some(Arc::new(move |p: &Progress| {
        ev.lock().unwrap().push(p.clone());
        // Cancel from inside scoring, after the first chunk: deterministic mid-reply.
        if p.activity == Activity::Scoring
            && p.done > 0
            && p.done < p.total
            && let Some(c) = weak.upgrade()
        {
            c.cancel();
        }
    })));
    client.enroll(&coord.tokens[0]).await.unwrap();
    client
        .load_data_file(&write_private_data(dir.path(), 40))
        .unwrap();
    client.train().await.unwrap();
    let ckpt = client.checkpoint_dir();
    let before = std::fs::read(ckpt.join("model.bpk")).unwrap();

    let s = client.join(None).await.unwrap();
    assert!(s.cancelled, "{s:?}");
    assert_eq!((s.rounds, s.last_round), (0, None));
    let scored: Vec<(u64, u64)> = events
        .lock()
        .unwrap()
        .iter()
        .filter(|p| p.activity == Activity::Scoring && p.done > 0)
        .map(|p| (p.done, p.total))
        .collect();
    assert!(
        scored.iter().all(|&(d, t)| d < t && t == 400),
        "the reply was abandoned mid-batch: {scored:?}"
    );
    assert_eq!(
        std::fs::read(ckpt.join("model.bpk")).unwrap(),
        before,
        "checkpoint kept as it was"
    );
    load_checkpoint(&ckpt, Default::default()).expect("checkpoint loads");
    assert_eq!(client.status().activity, Activity::Idle);

    // The same client goes on: it rejoins and completes a round.
    events.lock().unwrap().clear();
    client.set_listener(None);
    let s = client.join(Some(1)).await.unwrap();
    assert_eq!((s.rounds, s.cancelled), (1, false));
    assert!(s.last_round.is_some());
    assert!(s.local_accuracy.is_some());
    assert_ne!(
        std::fs::read(ckpt.join("model.bpk")).unwrap(),
        before,
        "trained on the round's result"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_client_sits_rounds_out_and_a_thread_cap_holds() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    // Two clients open the round; with one reply it closes at its 5 s deadline.
    let coord = CoordinatorProcess::start_with_deadline(dir.path(), 1, 5, 2, 2, 5_000);
    let data = write_private_data(dir.path(), 40);
    let open = |name: &str, threads: Option<usize>| {
        Arc::new(
            Client::open(ClientConfig {
                coordinator: Some(coord.addr.to_string()),
                data_dir: dir.path().join(name),
                name: name.into(),
                arch: Arch::Bag,
                model_dir: assets_dir().join("minilm"),
                train_epochs: Some(5),
                test_fraction: 0.25,
                connect_timeout: Duration::from_secs(5),
                threads,
                ..ClientConfig::default()
            })
            .unwrap(),
        )
    };
    let (active, paused) = (open("active", None), open("paused", Some(1)));
    // Training progress is reported from inside the training: it sees the capped pool.
    let pool_sizes: Arc<Mutex<Vec<usize>>> = Arc::default();
    let messages: Arc<Mutex<Vec<String>>> = Arc::default();
    let (sizes, msgs) = (pool_sizes.clone(), messages.clone());
    paused.set_listener(Some(Arc::new(move |p: &Progress| {
        // Per-step events come from inside the training ("epoch i/n"), the final one not.
        if p.activity == Activity::Training && p.message.starts_with("epoch") {
            sizes.lock().unwrap().push(rayon::current_num_threads());
        }
        msgs.lock().unwrap().push(p.message.clone());
    })));
    for (c, token) in [(&active, &coord.tokens[0]), (&paused, &coord.tokens[1])] {
        c.enroll(token).await.unwrap();
        c.load_data_file(&data).unwrap();
        c.train().await.unwrap();
    }
    let sizes = pool_sizes.lock().unwrap().clone();
    assert!(
        !sizes.is_empty() && sizes.iter().all(|&n| n == 1),
        "training ran on the 1-thread pool: {sizes:?}"
    );
    assert!(matches!(
        Client::open(ClientConfig {
            data_dir: dir.path().join("zero"),
            threads: Some(0),
            ..ClientConfig::default()
        }),
        Err(crosslm_sdk::Error::InvalidInput(_))
    ));

    let ckpt = paused.checkpoint_dir().join("model.bpk");
    let before = std::fs::read(&ckpt).unwrap();
    paused.pause();
    assert!(paused.status().paused);
    let (a, p) = tokio::join!(active.join(Some(1)), paused.join(Some(1)));
    let (a, p) = (a.unwrap(), p.unwrap());
    assert_eq!((a.rounds, a.last_round), (1, Some(1)));
    // The paused client saw the round end without scoring or learning from it.
    assert_eq!((p.rounds, p.last_round), (1, None), "{p:?}");
    assert_eq!(paused.status().rounds_completed, 0);
    assert_eq!(active.status().rounds_completed, 1);
    assert_eq!(
        std::fs::read(&ckpt).unwrap(),
        before,
        "no training while paused"
    );
    assert!(
        messages
            .lock()
            .unwrap()
            .iter()
            .any(|m| m == "paused: sat out round 1"),
        "a progress event says so"
    );
    paused.resume();
    assert!(!paused.status().paused);
}

/// The coordinator process is SIGKILLed while the client scores round 1, then restarted on
/// the same port: the client notices the lost link, reconnects with backoff, scores the
/// resumed round and finishes both rounds in one `join`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_reconnects_after_a_coordinator_crash_and_finishes_its_rounds() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    // 2 rounds of 400 samples: scoring takes several chunks.
    let coord = CoordinatorProcess::start(dir.path(), 2, 200, 1, 1);
    let (addr, token) = (coord.addr, coord.tokens[0].clone());
    let running = Arc::new(Mutex::new(Some(coord)));
    let client = Arc::new(
        Client::open(ClientConfig {
            coordinator: Some(addr.to_string()),
            data_dir: dir.path().join("client"),
            name: "crash-test".into(),
            arch: Arch::Bag,
            model_dir: assets_dir().join("minilm"),
            train_epochs: Some(5),
            test_fraction: 0.25,
            connect_timeout: Duration::from_secs(5),
            reconnect: Reconnect {
                attempts: 20,
                first_delay: Duration::from_millis(200),
                max_delay: Duration::from_secs(2),
            },
            ..ClientConfig::default()
        })
        .unwrap(),
    );
    let messages: Arc<Mutex<Vec<String>>> = Arc::default();
    let (log, victim) = (messages.clone(), running.clone());
    client.set_listener(Some(Arc::new(move |p: &Progress| {
        log.lock().unwrap().push(p.message.clone());
        if p.activity == Activity::Scoring && p.done > 0 {
            // Drop kills (SIGKILL) and reaps: no goodbye on the wire.
            drop(victim.lock().unwrap().take());
        }
    })));
    client.enroll(&token).await.unwrap();
    client
        .load_data_file(&write_private_data(dir.path(), 40))
        .unwrap();
    client.train().await.unwrap();

    let joining = tokio::spawn({
        let client = client.clone();
        async move { client.join(Some(2)).await }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while running.lock().unwrap().is_some() {
        assert!(std::time::Instant::now() < deadline, "round 1 never scored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Back on the same port from the same data dir and config.
    let mut restarted = std::process::Command::new(bin("crosslm-coordinator"))
        .arg("serve")
        .arg("--config")
        .arg(dir.path().join("coordinator.toml"))
        .args(["--listen", &addr.to_string()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let summary = tokio::time::timeout(Duration::from_secs(180), joining).await;
    let _ = restarted.kill();
    let _ = restarted.wait();
    let s = summary.expect("join finished").unwrap().unwrap();
    assert_eq!(
        (s.rounds, s.last_round, s.cancelled),
        (2, Some(2), false),
        "{s:?}"
    );
    let messages = messages.lock().unwrap();
    assert!(
        messages.iter().any(|m| m.starts_with("link lost")),
        "the reconnection was reported: {messages:?}"
    );
}
