//! The admin endpoint of a running daemon over real TCP on 127.0.0.1: health, live status and
//! Prometheus metrics during and after a round, `crosslm-coordinator status` answering live
//! while the daemon holds its database, and a stalled HTTP client that blocks nothing.

use std::net::SocketAddr;
use std::time::Duration;

use crosslm_coordinator::admin::{ADDR_FILE, recorded_addr};
use crosslm_coordinator::daemon::{Daemon, DaemonConfig, mint_tokens};
use crosslm_coordinator::generator::FileGenerator;
use crosslm_coordinator::round::RoundConfig;
use crosslm_sdk::protocol::ClientMsg;
use crosslm_sdk::rounds::participate;
use crosslm_sdk::transport::Session;
use crosslm_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP GET; the status code and the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut reply))
        .await
        .expect("answer within 10 s")
        .unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body.to_string())
}

/// The value of an unlabeled or labeled sample line in Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoint_reports_a_round_live() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (_, task) = write_task(dir.path());
    let samples = write_samples(dir.path(), 50);
    let cfg = DaemonConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("coord"),
        rounds: Some(1),
        samples_per_label: 20,
        min_clients: 2,
        round: RoundConfig {
            quorum: 2,
            deadline_ms: 60_000,
            ..Default::default()
        },
        idle_timeout_ms: 10_000,
        linger_ms: 30_000,
        learning: None,
        privacy: None,
        admin: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    };
    let data_dir = cfg.data_dir.clone();
    let tokens = mint_tokens(&data_dir, 2).unwrap();
    let generator = FileGenerator::load(&samples, &task).unwrap();
    let mut daemon = Daemon::start(cfg, task, Box::new(generator)).await.unwrap();
    let admin = daemon.admin.expect("admin endpoint bound");
    assert_eq!(
        recorded_addr(&data_dir),
        Some(admin),
        "address written for the CLI"
    );

    // A client that connects and never sends a request holds nothing up.
    let _stalled = tokio::net::TcpStream::connect(admin).await.unwrap();
    assert_eq!(get(admin, "/healthz").await, (200, "ok\n".to_string()));
    let (code, text) = get(admin, "/metrics").await;
    assert_eq!(code, 200);
    assert_eq!(metric(&text, "crosslm_rounds_total{outcome=\"done\"}"), 0.0);
    assert_eq!(metric(&text, "crosslm_next_round"), 1.0);
    assert_eq!(get(admin, "/nothing").await.0, 404);

    // Two clients score one round and stay connected (the daemon lingers for them).
    let mut sessions = Vec::new();
    let addr = daemon.addr;
    for (i, token) in tokens.into_iter().enumerate() {
        let name = format!("c{i}");
        sessions.push(tokio::spawn(async move {
            let id = enroll_with(addr, &token, &name).await;
            let mut s = Session::connect(addr, &id, info(&name, 10)).await.unwrap();
            let (_, n) = participate(&mut s, FixedScorer { p: 0.8 }, Some(1))
                .await
                .unwrap();
            assert_eq!(n, 1);
            s
        }));
    }
    let mut open: Vec<Session> = Vec::new();
    for s in sessions {
        open.push(
            tokio::time::timeout(Duration::from_secs(60), s)
                .await
                .expect("round finished")
                .unwrap(),
        );
    }

    // The driver publishes its snapshot after it has sent the results out, so a client can
    // hold its result a moment before the endpoint shows the round: wait for it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let (code, text) = get(admin, "/metrics").await;
        assert_eq!(code, 200);
        if metric(&text, "crosslm_rounds_total{outcome=\"done\"}") == 1.0 {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "round never shown as done: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        metric(&text, "crosslm_replies_total{verdict=\"accepted\"}"),
        2.0
    );
    assert_eq!(
        metric(&text, "crosslm_replies_total{verdict=\"invalid\"}"),
        0.0
    );
    assert_eq!(metric(&text, "crosslm_clients_connected"), 2.0);
    assert_eq!(metric(&text, "crosslm_clients_enrolled"), 2.0);
    assert!(metric(&text, "crosslm_last_round_seconds") > 0.0);
    assert!(metric(&text, "crosslm_generation_seconds_total") >= 0.0);

    // Scores for a round the client was never in: counted as ignored, never aggregated.
    open[0]
        .send(&ClientMsg::Scores {
            round: 99,
            scores: vec![],
            last: true,
        })
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = get(admin, "/metrics").await.1;
        if metric(&text, "crosslm_replies_total{verdict=\"ignored\"}") == 1.0 {
            assert_eq!(
                metric(&text, "crosslm_replies_total{verdict=\"accepted\"}"),
                2.0
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not counted:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (code, body) = get(admin, "/status").await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["core"]["counters"]["rounds_done"], 1);
    assert_eq!(v["core"]["next_round"], 2);
    assert_eq!(v["daemon"]["listen"], addr.to_string());
    assert_eq!(v["clients_enrolled"], 2);

    // The CLI answers live while the daemon holds the database's lock.
    let data = data_dir.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin("crosslm-coordinator"))
            .args(["status", "--data-dir", data.to_str().unwrap()])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let live: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(live["core"]["counters"]["replies_accepted"], 2);

    for s in open {
        s.close().await;
    }
    assert_eq!(daemon.wait().await.unwrap(), 1);
    assert!(
        !data_dir.join(ADDR_FILE).exists(),
        "a stopped daemon leaves no address behind"
    );
}
