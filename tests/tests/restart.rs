//! The coordinator process is SIGKILLed mid-round and restarted: the round resumes and no
//! acknowledged score is lost.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crosslm_sdk::transport::{Event, Identity, Session};
use crosslm_tests::*;

fn start_coordinator(config: &Path, port: u16) -> std::process::Child {
    Command::new(bin("crosslm-coordinator"))
        .args([
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

async fn connect_retry(addr: SocketAddr, id: &Identity, name: &str) -> Session {
    for _ in 0..100 {
        if let Ok(s) = Session::connect(addr, id, info(name, 10)).await {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("coordinator did not come up");
}

async fn score_round(s: &mut Session, p: f32) -> Vec<u64> {
    let Event::Round {
        round,
        task,
        samples,
        ..
    } = s.next_event().await.unwrap()
    else {
        panic!("expected a round")
    };
    let mut scorer = FixedScorer { p };
    let probs = crosslm_sdk::rounds::Scorer::score(&mut scorer, &task, &samples).unwrap();
    let scores: Vec<_> = samples
        .iter()
        .zip(probs)
        .map(|(x, probs)| crosslm_sdk::protocol::SampleScore { id: x.id, probs })
        .collect();
    s.send_scores(round, &scores).await.unwrap();
    assert_eq!(s.next_event().await.unwrap(), Event::Accepted { round });
    samples.iter().map(|x| x.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_and_restarted_mid_round_resumes_without_losing_scores() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    write_task(dir.path());
    write_samples(dir.path(), 50);
    let data = dir.path().join("coord");
    let config = dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        r#"
task = "task.toml"
[daemon]
data_dir = "coord"
rounds = 1
samples_per_label = 20
min_clients = 3
idle_timeout_ms = 10000
[daemon.round]
quorum = 3
deadline_ms = 120000
[generator]
kind = "file"
path = "samples.jsonl"
"#,
    )
    .unwrap();
    let out = Command::new(bin("crosslm-coordinator"))
        .args([
            "token",
            "--data-dir",
            data.to_str().unwrap(),
            "--count",
            "3",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let tokens: Vec<_> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| crosslm_sdk::transport::EnrollToken::parse(l).unwrap())
        .collect();
    assert_eq!(tokens.len(), 3);

    let port = free_udp_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut coord = start_coordinator(&config, port);

    let mut ids = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        let mut id = None;
        for _ in 0..100 {
            match crosslm_sdk::transport::enroll(addr, t, info(&format!("c{i}"), 10)).await {
                Ok(x) => {
                    id = Some(x);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        ids.push(id.expect("enrolled"));
    }
    let mut s0 = connect_retry(addr, &ids[0], "c0").await;
    let mut s1 = connect_retry(addr, &ids[1], "c1").await;
    let mut s2 = connect_retry(addr, &ids[2], "c2").await;
    // c0 and c1 reply; c2 takes the batch but has not replied when the coordinator dies.
    let batch0 = score_round(&mut s0, 0.9).await;
    score_round(&mut s1, 0.7).await;
    let Event::Round {
        samples: before, ..
    } = s2.next_event().await.unwrap()
    else {
        panic!()
    };

    coord.kill().unwrap(); // SIGKILL
    coord.wait().unwrap();
    drop((s0, s1, s2));

    let mut coord = start_coordinator(&config, port);
    // Everybody reconnects; only c2, which had not replied, gets the batch again.
    let mut s0 = connect_retry(addr, &ids[0], "c0").await;
    let mut s1 = connect_retry(addr, &ids[1], "c1").await;
    let mut s2 = connect_retry(addr, &ids[2], "c2").await;
    let batch2 = score_round(&mut s2, 0.5).await;
    assert_eq!(batch0, batch2, "the resumed round is the same round");
    assert_eq!(before.len(), batch2.len());
    for s in [&mut s0, &mut s1, &mut s2] {
        let ev = tokio::time::timeout(Duration::from_secs(30), s.next_event())
            .await
            .unwrap()
            .unwrap();
        let Event::Result { round, scores } = ev else {
            panic!("expected result, got {ev:?}")
        };
        assert_eq!(round, 1);
        assert_eq!(scores.len(), 40);
        // Equal weights: (0.9 + 0.7 + 0.5) / 3 = 0.7 — the killed coordinator's two
        // acknowledged replies are in.
        assert!(
            scores.iter().all(|x| (x.quality - 0.7).abs() < 1e-4),
            "{:?}",
            scores[0]
        );
    }
    for s in [s0, s1, s2] {
        s.close().await;
    }
    let status = coord.wait().unwrap();
    assert!(status.success());
    let out = Command::new(bin("crosslm-coordinator"))
        .args(["status", "--data-dir", data.to_str().unwrap()])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["rounds"][0]["phase"], "Done");
    assert_eq!(status["rounds"][0]["replies"].as_array().unwrap().len(), 3);

    // `samples` lists the round's samples with the scores that survived the restart.
    let out = Command::new(bin("crosslm-coordinator"))
        .args(["samples", "--data-dir", data.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 40);
    for l in &lines {
        assert_eq!(l["round"], 1);
        assert!((l["quality"].as_f64().unwrap() - 0.7).abs() < 1e-4, "{l}");
        assert!(l["label"] == "negative" || l["label"] == "positive", "{l}");
        assert!(!l["text"].as_str().unwrap().is_empty());
    }
    let out = Command::new(bin("crosslm-coordinator"))
        .args([
            "samples",
            "--round",
            "9",
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no round 9"));
    // A mistyped data dir is an error, and reading it creates nothing there.
    let wrong = dir.path().join("no-such-coordinator");
    let out = Command::new(bin("crosslm-coordinator"))
        .args(["samples", "--data-dir", wrong.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no coordinator state"));
    assert!(!wrong.exists());
}
