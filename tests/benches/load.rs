//! Load: N clients (real QUIC + mutual TLS on 127.0.0.1, each its own endpoint, fixed scorers)
//! enroll with a `crosslm-coordinator serve` process (file generator, admin endpoint on) and
//! run rounds with it. Two faults, each optional:
//!
//! - `--vanish F`: in the last round a fraction F of the clients close their connection after
//!   the batch arrives, without replying; the round completes on the others (its quorum).
//! - `--crash F`: once a fraction F of round 1's replies are acknowledged, the coordinator is
//!   SIGKILLed and restarted on the same port from its data dir; every client reconnects with
//!   the SDK's backoff and jitter, and the bench checks from the store that every client
//!   (acknowledged before the crash or not) is among each round's contributors.
//!
//! Prints one table row per N: enrollment rate, round wall (the coordinator's own, batch out to
//! result), batch arrival to the last accepted reply, the coordinator's peak RSS and CPU
//! seconds, link bytes per client per round (handshake and keep-alives included), and in crash
//! mode how the reconnections spread.
//!
//! `cargo bench --workspace --bench load -- [N ...] [--rounds R] [--vanish F] [--crash F]
//! [--per-label S]` (defaults: N = 100 1000, R = 2, F = 0.1 vanish, no crash, S = 16).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crosslm_coordinator::admin::{ADDR_FILE, recorded_addr};
use crosslm_coordinator::store::Store;
use crosslm_sdk::rounds::Scorer;
use crosslm_sdk::transport::{
    Backoff, EnrollToken, Event, Identity, Reconnect, Session, enroll, sample_scores,
};
use crosslm_tests::{CoordinatorProcess, FixedScorer, bin, info, write_samples, write_task};
use tokio::sync::Semaphore;

struct Args {
    sizes: Vec<usize>,
    rounds: u64,
    vanish: f64,
    crash: Option<f64>,
    per_label: usize,
}

fn args() -> Args {
    let mut a = Args {
        sizes: Vec::new(),
        rounds: 2,
        vanish: 0.1,
        crash: None,
        per_label: 16,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        let mut value = || it.next().and_then(|v| v.parse::<f64>().ok());
        match x.as_str() {
            "--rounds" => a.rounds = value().map_or(2, |v| v as u64),
            "--vanish" => a.vanish = value().unwrap_or(0.1),
            "--crash" => a.crash = value(),
            "--per-label" => a.per_label = value().map_or(16, |v| v as usize),
            "--bench" => {}
            n => a.sizes.extend(n.parse::<usize>().ok()),
        }
    }
    if a.sizes.is_empty() {
        a.sizes = vec![100, 1000];
    }
    if a.crash.is_some() {
        a.vanish = 0.0;
    }
    a
}

/// What one client saw.
#[derive(Default)]
struct ClientFigures {
    /// Per round: when the batch first arrived, when the reply was accepted (none: vanished,
    /// or acknowledged by a coordinator that then died before saying so).
    rounds: BTreeMap<u64, (Instant, Option<Instant>)>,
    rx_bytes: u64,
    tx_bytes: u64,
    /// When it tried to reconnect after losing the link, and when it got back in.
    retries: Vec<Instant>,
    back: Option<Instant>,
    /// Kept open until the coordinator's figures are read (it exits once everyone left).
    session: Option<Session>,
}

/// Counts shared by the clients and the crash trigger.
#[derive(Default)]
struct Shared {
    accepted_round_1: AtomicUsize,
}

/// `(peak RSS MiB, CPU seconds)` of a process, from /proc.
fn proc_figures(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name (which may hold spaces): utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(f64::NAN) + f.get(12).copied().unwrap_or(f64::NAN);
    (hwm_kib / 1024.0, ticks / 100.0)
}

/// `GET path` from the admin endpoint.
async fn admin_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("admin");
    s.write_all(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes())
        .await
        .expect("admin write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("admin read");
    out.split_once("\r\n\r\n")
        .map_or(out.clone(), |(_, b)| b.to_string())
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// The admin address a (re)started daemon wrote.
async fn wait_admin(data_dir: &Path) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(a) = recorded_addr(data_dir) {
            return a;
        }
        assert!(Instant::now() < deadline, "no admin endpoint");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How a session ended.
enum Ended {
    /// The last round's result arrived.
    Done,
    /// Left without replying (`--vanish`).
    Vanished,
}

/// Takes part until the last round's result; a lost link is an error for the caller to retry.
async fn session_rounds(
    s: &mut Session,
    fig: &mut ClientFigures,
    rounds: u64,
    vanish: bool,
    shared: &Shared,
) -> crosslm_sdk::Result<Ended> {
    let mut scorer = FixedScorer { p: 0.8 };
    loop {
        match s.next_event().await? {
            Event::Round {
                round,
                task,
                samples,
                ..
            } => {
                fig.rounds.entry(round).or_insert((Instant::now(), None));
                if vanish && round == rounds {
                    s.connection().close(0u32.into(), b"gone");
                    return Ok(Ended::Vanished);
                }
                let probs = scorer.score(&task, &samples)?;
                s.send_scores(round, &sample_scores(&samples, probs)?)
                    .await?;
            }
            Event::Accepted { round } => {
                if let Some(r) = fig.rounds.get_mut(&round) {
                    r.1.get_or_insert(Instant::now());
                }
                if round == 1 {
                    shared.accepted_round_1.fetch_add(1, Ordering::Relaxed);
                }
            }
            Event::Result { round, .. } if round == rounds => return Ok(Ended::Done),
            Event::Result { .. } => {}
            Event::Failed { round, reason } => panic!("round {round} failed: {reason}"),
            Event::Refused(e) => panic!("refused: {e}"),
        }
    }
}

async fn client(
    addr: SocketAddr,
    id: Identity,
    name: String,
    rounds: u64,
    vanish: bool,
    ready: Arc<tokio::sync::Barrier>,
    shared: Arc<Shared>,
) -> ClientFigures {
    let mut fig = ClientFigures::default();
    let mut backoff = Backoff::new(Reconnect::default());
    let mut joined = false;
    loop {
        let mut s = match Session::connect(addr, &id, info(&name, 10)).await {
            Ok(s) => s,
            Err(e) => {
                let wait = backoff
                    .next_delay(&mut rand::rng())
                    .unwrap_or_else(|| panic!("{name}: gave up connecting: {e}"));
                fig.retries.push(Instant::now() + wait);
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        if joined {
            fig.back.get_or_insert(Instant::now());
        } else {
            joined = true;
            ready.wait().await;
        }
        backoff.reset();
        let ended = session_rounds(&mut s, &mut fig, rounds, vanish, &shared).await;
        let stats = s.connection().stats();
        fig.rx_bytes += stats.udp_rx.bytes;
        fig.tx_bytes += stats.udp_tx.bytes;
        match ended {
            Ok(Ended::Done) => {
                fig.session = Some(s);
                return fig;
            }
            Ok(Ended::Vanished) => return fig,
            Err(e) if e.is_link_failure() => {
                let wait = backoff
                    .next_delay(&mut rand::rng())
                    .unwrap_or_else(|| panic!("{name}: gave up: {e}"));
                fig.retries.push(Instant::now() + wait);
                tokio::time::sleep(wait).await;
            }
            Err(e) => panic!("{name}: {e}"),
        }
    }
}

fn config(dir: &Path, n: usize, quorum: usize, a: &Args) -> std::path::PathBuf {
    let config = dir.join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            r#"
task = "task.toml"
[daemon]
listen = "127.0.0.1:0"
data_dir = "coord"
rounds = {rounds}
samples_per_label = {per_label}
min_clients = {n}
idle_timeout_ms = 5000
linger_ms = 60000
admin = "127.0.0.1:0"
[daemon.round]
quorum = {quorum}
deadline_ms = 600000
[generator]
kind = "file"
path = "samples.jsonl"
"#,
            rounds = a.rounds,
            per_label = a.per_label,
        ),
    )
    .expect("config");
    config
}

async fn run(dir: &Path, n: usize, a: &Args) -> String {
    write_task(dir);
    write_samples(dir, a.per_label.max(1));
    let vanishers = ((n as f64) * a.vanish).floor() as usize;
    let config = config(dir, n, n - vanishers, a);
    let log = std::fs::File::create(dir.join("coordinator.log")).expect("log");
    let coord = CoordinatorProcess::serve(dir, &config, n, log.try_clone().expect("log"));
    let (addr, data_dir) = (coord.addr, coord.data_dir.clone());
    let mut pid = coord.child.id();
    let mut admin = wait_admin(&data_dir).await;

    // Enrollment, 32 at a time (each a fresh TLS handshake plus a certificate signing).
    let t0 = Instant::now();
    let gate = Arc::new(Semaphore::new(32));
    let mut joins = Vec::new();
    for (i, tok) in coord.tokens.iter().enumerate() {
        let tok = EnrollToken::parse(tok).expect("token");
        let gate = gate.clone();
        joins.push(tokio::spawn(async move {
            let _p = gate.acquire_owned().await.expect("gate");
            enroll(addr, &tok, info(&format!("l{i}"), 10)).await
        }));
    }
    let mut ids = Vec::new();
    for j in joins {
        ids.push(j.await.expect("join").expect("enroll"));
    }
    let enroll_secs = t0.elapsed().as_secs_f64();

    let shared = Arc::new(Shared::default());
    let ready = Arc::new(tokio::sync::Barrier::new(n + 1));
    let t1 = Instant::now();
    let mut clients = Vec::new();
    for (i, id) in ids.into_iter().enumerate() {
        clients.push(tokio::spawn(client(
            addr,
            id,
            format!("l{i}"),
            a.rounds,
            i < vanishers,
            ready.clone(),
            shared.clone(),
        )));
    }
    ready.wait().await;
    let connect_secs = t1.elapsed().as_secs_f64();

    // The crash: SIGKILL once enough of round 1 is acknowledged, then the same daemon again.
    let mut restarted: Option<std::process::Child> = None;
    let mut crash: Option<(Instant, usize)> = None;
    // The first daemon, while it lives.
    let first = if let Some(f) = a.crash {
        let want = ((n as f64) * f).ceil() as usize;
        while shared.accepted_round_1.load(Ordering::Relaxed) < want {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut coord = coord;
        coord.child.kill().expect("SIGKILL");
        coord.child.wait().expect("reap");
        let killed = Instant::now();
        crash = Some((killed, shared.accepted_round_1.load(Ordering::Relaxed)));
        drop(coord); // reaped: its Drop signals nothing more
        let _ = std::fs::remove_file(data_dir.join(ADDR_FILE));
        let child = std::process::Command::new(bin("crosslm-coordinator"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .args(["--listen", &addr.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("restart");
        pid = child.id();
        restarted = Some(child);
        admin = wait_admin(&data_dir).await;
        None
    } else {
        Some(coord)
    };
    let mut figs = Vec::new();
    for c in clients {
        figs.push(c.await.expect("client"));
    }
    let row = finish(
        dir,
        n,
        a,
        figs,
        admin,
        pid,
        restarted,
        enroll_secs,
        connect_secs,
        vanishers,
        crash,
    )
    .await;
    drop(first);
    row
}

#[allow(clippy::too_many_arguments)]
async fn finish(
    dir: &Path,
    n: usize,
    a: &Args,
    mut figs: Vec<ClientFigures>,
    admin: SocketAddr,
    pid: u32,
    restarted: Option<std::process::Child>,
    enroll_secs: f64,
    connect_secs: f64,
    vanishers: usize,
    crash: Option<(Instant, usize)>,
) -> String {
    let metrics = admin_get(admin, "/metrics").await;
    let (rss, cpu) = proc_figures(pid);
    let rejected: f64 = ["invalid", "malformed"]
        .iter()
        .filter_map(|v| {
            metric(
                &metrics,
                &format!("crosslm_replies_total{{verdict=\"{v}\"}}"),
            )
        })
        .sum();
    let last_round = metric(&metrics, "crosslm_last_round_seconds").unwrap_or(f64::NAN);
    // Per round: from the first batch's arrival to the last accepted reply.
    let mut last_reply = Vec::new();
    for r in 1..=a.rounds {
        let first = figs
            .iter()
            .filter_map(|f| f.rounds.get(&r))
            .map(|x| x.0)
            .min();
        let last = figs.iter().filter_map(|f| f.rounds.get(&r)?.1).max();
        if let (Some(f), Some(l)) = (first, last) {
            last_reply.push(format!("{:.2}", (l - f).as_secs_f64()));
        }
    }
    let rows = a.rounds as f64 * (n - vanishers) as f64 * 1024.0;
    let (rx, tx): (f64, f64) = figs
        .iter()
        .filter(|f| f.session.is_some())
        .fold((0.0, 0.0), |(r, t), f| {
            (r + f.rx_bytes as f64, t + f.tx_bytes as f64)
        });
    let crash_note = crash.map(|(killed, acked)| {
        let mut first_retry: Vec<Instant> = figs
            .iter()
            .filter_map(|f| f.retries.first().copied())
            .collect();
        first_retry.sort();
        let spread = match (first_retry.first(), first_retry.last()) {
            (Some(a), Some(b)) => (*b - *a).as_secs_f64(),
            _ => f64::NAN,
        };
        // The most first retries that fall in any one millisecond.
        let mut per_ms: BTreeMap<u128, usize> = BTreeMap::new();
        for t in &first_retry {
            *per_ms.entry((*t - killed).as_millis()).or_default() += 1;
        }
        let busiest = per_ms.values().max().copied().unwrap_or(0);
        let back = figs
            .iter()
            .filter_map(|f| f.back)
            .max()
            .map_or(f64::NAN, |t| (t - killed).as_secs_f64());
        (acked, first_retry.len(), spread, busiest, back)
    });
    assert_eq!(rejected, 0.0, "no reply rejected");
    for f in &mut figs {
        if let Some(s) = f.session.take() {
            s.close().await;
        }
    }
    // Everyone left: the daemon exits; then the store says who contributed.
    if let Some(mut child) = restarted {
        let deadline = Instant::now() + Duration::from_secs(120);
        while child.try_wait().expect("try_wait").is_none() {
            assert!(
                Instant::now() < deadline,
                "restarted coordinator did not exit"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let store = Store::open(&dir.join("coord")).expect("store");
        for r in 1..=a.rounds {
            let out = store.result(r).expect("store").expect("round result");
            assert_eq!(
                out.contributors.len(),
                n,
                "round {r}: every client contributed"
            );
        }
    }
    let mut row = format!(
        "| {n} | {:.0} | {connect_secs:.1} | {vanishers} | {last_round:.2} | {} | {rss:.0} | {cpu:.1} | {:.1} / {:.1} |",
        n as f64 / enroll_secs,
        last_reply.join(" / "),
        rx / rows,
        tx / rows,
    );
    if let Some((acked, retried, spread, busiest, back)) = crash_note {
        row += &format!(
            "\n\ncrash: SIGKILL after {acked} of {n} round-1 replies were acknowledged; {retried} clients \
             retried, first retries spread over {spread:.2} s, at most {busiest} in one millisecond; \
             all back {back:.1} s after the kill; every round's result has all {n} clients \
             (the restarted daemon's peak RSS and CPU above)"
        );
    }
    row
}

fn main() {
    let a = args();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    println!(
        "{} samples per round, {} rounds; {}",
        a.per_label * 2,
        a.rounds,
        match a.crash {
            Some(f) => format!(
                "the coordinator is SIGKILLed once {:.0}% of round 1 is acknowledged, and restarted",
                f * 100.0
            ),
            None => format!(
                "in the last round {:.0}% of the clients close their connection after the \
                 batch arrives, without replying (quorum: the rest)",
                a.vanish * 100.0
            ),
        }
    );
    println!(
        "| clients | enrollments/s | connect all (s) | vanish in last round | last round wall (s) | \
         batch to last accepted reply, per round (s) | coordinator peak RSS (MiB) | \
         coordinator CPU (s) | KiB per client per round (down / up) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &n in &a.sizes {
        let dir = tempfile::tempdir().expect("tempdir");
        let row = rt.block_on(run(dir.path(), n, &a));
        println!("{row}");
    }
}
