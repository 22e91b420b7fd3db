//! Broadcast throughput: a synthetic batch of ~64 MiB sent to 1, 8 and 32 clients over
//! QUIC on loopback, beside quinn's own single-stream bulk throughput measured in the same
//! run with the same TLS and transport settings. Prints a table.
//!
//! `cargo bench -p crosslm-tests --bench broadcast [-- MIB]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use crosslm_coordinator::daemon::{Daemon, DaemonConfig, mint_tokens};
use crosslm_coordinator::generator::FileGenerator;
use crosslm_coordinator::round::RoundConfig;
use crosslm_coordinator::transport::Pki;
use crosslm_sdk::transport::tls::{self, SERVER_NAME};
use crosslm_sdk::transport::{Event, Session, enroll};
use crosslm_tests::{info, write_task};

const TEXT_LEN: usize = 1024;

/// quinn alone: one uni stream of `bytes` over the same TLS/transport settings.
async fn quinn_single_stream(pki: &Pki, bytes: usize) -> f64 {
    let server = quinn::Endpoint::server(
        pki.server_config(Duration::from_secs(30)).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let recv = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let mut s = conn.accept_uni().await.unwrap();
        let mut n = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        while let Some(k) = s.read(&mut buf).await.unwrap() {
            n += k;
        }
        (n, Instant::now())
    });
    let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = client
        .connect_with(
            tls::anonymous_config(pki.ca_der()).unwrap(),
            addr,
            SERVER_NAME,
        )
        .unwrap()
        .await
        .unwrap();
    let chunk = vec![7u8; 1 << 20];
    let start = Instant::now();
    let mut s = conn.open_uni().await.unwrap();
    let mut sent = 0;
    while sent < bytes {
        s.write_all(&chunk).await.unwrap();
        sent += chunk.len();
    }
    s.finish().unwrap();
    let (n, end) = recv.await.unwrap();
    assert_eq!(n, sent);
    n as f64 / (1 << 20) as f64 / (end - start).as_secs_f64()
}

/// Our daemon broadcasting one round's batch to `n` clients; aggregate MiB/s of sample
/// payload delivered (framing and encoding included in the time).
async fn broadcast(
    dir: &std::path::Path,
    samples_path: &std::path::Path,
    per_label: usize,
    n: usize,
) -> (f64, usize) {
    let (_, task) = write_task(dir);
    let data_dir = dir.join(format!("coord-{n}"));
    let tokens = mint_tokens(&data_dir, n).unwrap();
    let cfg = DaemonConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir,
        rounds: Some(1),
        samples_per_label: per_label,
        min_clients: n,
        round: RoundConfig {
            quorum: n,
            deadline_ms: 600_000,
            ..Default::default()
        },
        idle_timeout_ms: 30_000,
        linger_ms: 10_000,
        learning: None,
        privacy: None,
        admin: None,
        ..Default::default()
    };
    let generator = FileGenerator::load(samples_path, &task).unwrap();
    let mut daemon = Daemon::start(cfg, task, Box::new(generator)).await.unwrap();
    let addr = daemon.addr;
    let mut ids = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        ids.push(enroll(addr, t, info(&format!("b{i}"), 1)).await.unwrap());
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(n + 1));
    let mut handles = Vec::new();
    for (i, id) in ids.into_iter().enumerate() {
        let b = barrier.clone();
        handles.push(tokio::spawn(async move {
            let mut s = Session::connect(addr, &id, info(&format!("b{i}"), 1))
                .await
                .unwrap();
            b.wait().await;
            let Event::Round { samples, .. } = s.next_event().await.unwrap() else {
                panic!()
            };
            let bytes: usize = samples.iter().map(|x| x.text.len()).sum();
            (Instant::now(), bytes, s)
        }));
    }
    barrier.wait().await;
    let start = Instant::now();
    let mut total = 0usize;
    let mut last = start;
    let mut sessions = Vec::new();
    for h in handles {
        let (t, bytes, s) = h.await.unwrap();
        total += bytes;
        last = last.max(t);
        sessions.push(s);
    }
    daemon.stop();
    let _ = daemon.wait().await;
    drop(sessions);
    (
        total as f64 / (1 << 20) as f64 / (last - start).as_secs_f64(),
        total / n,
    )
}

fn main() {
    let mib: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(64);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let per_label = mib * 1024 * 1024 / TEXT_LEN / 2;
    let samples = dir.path().join("big.jsonl");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&samples).unwrap());
        for i in 0..per_label {
            for label in ["negative", "positive"] {
                let mut text = format!("{label} sample {i} ");
                while text.len() < TEXT_LEN {
                    text.push_str("lorem ipsum ");
                }
                text.truncate(TEXT_LEN);
                writeln!(f, "{}", serde_json::json!({"text": text, "label": label})).unwrap();
            }
        }
    }
    let pki_dir = dir.path().join("pki-ref");
    let pki = Pki::load_or_create(&pki_dir).unwrap();
    rt.block_on(async {
        let reference = quinn_single_stream(&pki, mib << 20).await;
        println!("| what | clients | batch MiB | aggregate MiB/s | ratio to quinn single stream |");
        println!("|---|---|---|---|---|");
        println!("| quinn single stream (reference) | 1 | {mib} | {reference:.1} | 1.00 |");
        for n in [1usize, 8, 32] {
            let (rate, per_client) = broadcast(dir.path(), &samples, per_label, n).await;
            println!(
                "| crosslm broadcast | {n} | {:.1} | {rate:.1} | {:.2} |",
                per_client as f64 / (1 << 20) as f64,
                rate / reference
            );
        }
    });
}
