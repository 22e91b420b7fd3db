//! The SDK's high-level client in-process against the real coordinator daemon: a cancel while
//! a reply is being scored abandons that reply cleanly and keeps the checkpoint; the same
//! client then completes the round.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crosslm_sdk::client::{Activity, Client, ClientConfig, Progress};
use crosslm_sdk::data::assets_dir;
use crosslm_sdk::slm::{Arch, load_checkpoint};
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
