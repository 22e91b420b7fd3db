//! The admin endpoint: a running coordinator seen from outside, on a local TCP port apart
//! from the QUIC one (`[daemon] admin = "127.0.0.1:4480"`). Plain HTTP/1.1, GET only, one
//! request per connection:
//!
//! - `/healthz`: `ok` while the daemon's driver runs;
//! - `/status`: JSON, the core's [`CoreView`] (round and phase, LLM work, clients, counters)
//!   plus the daemon's own figures ([`DaemonFigures`]) and the LLM's reports from the store;
//! - `/metrics`: the same numbers in Prometheus' text format.
//!
//! The driver publishes a [`Snapshot`] after every step; handlers only read it, so a slow or
//! hostile HTTP client can never stall a round. A request must arrive within 5 s and fit
//! 8 KiB; anything else gets a 4xx and the connection closes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::core::CoreView;
use crate::round::Phase;
use crate::store::Store;
use crate::{Error, Result};

/// The file in the data dir that holds a running daemon's admin address.
pub const ADDR_FILE: &str = "admin.addr";
/// Longest a request may take to arrive.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read.
const MAX_REQUEST: usize = 8 * 1024;

/// What the driver measures itself (the core is sans-IO and has no clock of its own).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DaemonFigures {
    /// When the daemon started, ms since the Unix epoch.
    pub started_unix_ms: u64,
    /// The QUIC address clients connect to.
    pub listen: String,
    /// Wall seconds of the last finished round, from its batch going out to its result.
    pub last_round_seconds: Option<f64>,
    /// Seconds spent generating samples, in total, and how many generations.
    pub generation_seconds: f64,
    /// Generations finished.
    pub generations: u64,
    /// Seconds spent on the LLM's measuring and tuning, in total.
    pub llm_seconds: f64,
    /// LLM steps finished.
    pub llm_steps: u64,
}

/// What the endpoint serves, as last published by the driver.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// The core's view.
    pub core: CoreView,
    /// The driver's figures.
    pub daemon: DaemonFigures,
}

/// Shared between the driver (writer) and the HTTP handlers (readers).
pub type Published = Arc<Mutex<Option<Snapshot>>>;

/// Listens on `addr`, writes the bound address to `<data_dir>/admin.addr` (for
/// `crosslm-coordinator status`), and serves until the task is aborted. The store is held
/// weakly: the endpoint never keeps a stopped daemon's database locked.
pub async fn start(
    addr: SocketAddr,
    data_dir: &Path,
    published: Published,
    store: Weak<Store>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Transport(format!("admin endpoint cannot listen on {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::Transport(e.to_string()))?;
    let file = data_dir.join(ADDR_FILE);
    std::fs::write(&file, bound.to_string()).map_err(|source| Error::File {
        path: file.clone(),
        source,
    })?;
    tracing::info!(addr = %bound, "admin endpoint listening (healthz, status, metrics)");
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let (published, store) = (published.clone(), store.clone());
            tokio::spawn(async move {
                if let Err(e) = handle(stream, &published, &store).await {
                    tracing::debug!(%peer, error = %e, "admin request failed");
                }
            });
        }
    });
    Ok((bound, task))
}

/// The admin address a running daemon wrote into `data_dir`, if any.
pub fn recorded_addr(data_dir: &Path) -> Option<SocketAddr> {
    std::fs::read_to_string(data_dir.join(ADDR_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Removes the address file (the daemon is stopping).
pub fn forget_addr(data_dir: &Path) -> PathBuf {
    let file = data_dir.join(ADDR_FILE);
    let _ = std::fs::remove_file(&file);
    file
}

async fn handle(
    mut stream: TcpStream,
    published: &Published,
    store: &Weak<Store>,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let head = tokio::time::timeout(READ_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        loop {
            if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(true);
            }
            if buf.len() > MAX_REQUEST {
                return Ok(false);
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(false);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    let (status, content_type, body) = match head {
        Ok(Ok(true)) => match store.upgrade() {
            Some(store) => respond(&buf, published, &store),
            None => (503, "text/plain", "stopping\n".to_string()),
        },
        Ok(Ok(false)) | Err(_) => (400, "text/plain", "bad request\n".to_string()),
        Ok(Err(e)) => return Err(e),
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Bad Request",
    };
    let out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await
}

/// Status code, content type and body for a request head.
fn respond(head: &[u8], published: &Published, store: &Store) -> (u16, &'static str, String) {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return (405, "text/plain", "GET only\n".into());
    }
    let snapshot = published.lock().map(|s| s.clone()).unwrap_or(None);
    let Some(snapshot) = snapshot else {
        return (503, "text/plain", "starting\n".into());
    };
    match path.split('?').next().unwrap_or("") {
        "/healthz" => (200, "text/plain", "ok\n".into()),
        "/status" => {
            let llm = store.llm_reports().unwrap_or_default();
            let enrolled = store.clients().map(|c| c.len()).ok();
            let body = serde_json::json!({
                "clients_enrolled": enrolled,
                "core": snapshot.core,
                "daemon": snapshot.daemon,
                "llm_reports": llm,
            });
            (200, "application/json", format!("{body:#}\n"))
        }
        "/metrics" => {
            let enrolled = store.clients().map(|c| c.len()).ok();
            (
                200,
                "text/plain; version=0.0.4",
                metrics(&snapshot, enrolled),
            )
        }
        _ => (
            404,
            "text/plain",
            "not found: /healthz, /status, /metrics\n".into(),
        ),
    }
}

/// The snapshot (and the number of enrolled clients, from the store) in Prometheus' text
/// exposition format.
pub fn metrics(s: &Snapshot, enrolled: Option<usize>) -> String {
    let c = &s.core.counters;
    let d = &s.daemon;
    let mut out = String::new();
    let mut put = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
        out += &format!("# HELP crosslm_{name} {help}\n# TYPE crosslm_{name} {kind}\n");
        for (labels, v) in samples {
            out += &format!("crosslm_{name}{labels} {v}\n");
        }
    };
    put(
        "rounds_total",
        "counter",
        "Rounds ended by this run, by outcome.",
        &[
            ("{outcome=\"done\"}", c.rounds_done as f64),
            ("{outcome=\"failed\"}", c.rounds_failed as f64),
        ],
    );
    put(
        "replies_total",
        "counter",
        "Score replies by verdict.",
        &[
            ("{verdict=\"accepted\"}", c.replies_accepted as f64),
            ("{verdict=\"invalid\"}", c.replies_invalid as f64),
            ("{verdict=\"malformed\"}", c.replies_malformed as f64),
            ("{verdict=\"ignored\"}", c.replies_ignored as f64),
        ],
    );
    put(
        "clients_connected",
        "gauge",
        "Clients with an open session.",
        &[("", s.core.clients_connected as f64)],
    );
    if let Some(n) = enrolled {
        put(
            "clients_enrolled",
            "gauge",
            "Clients holding a certificate from this coordinator.",
            &[("", n as f64)],
        );
    }
    let collecting = matches!(s.core.round, Some((_, Phase::Collecting)));
    put(
        "round_collecting",
        "gauge",
        "1 while a round's scores are being collected.",
        &[("", f64::from(u8::from(collecting)))],
    );
    put(
        "next_round",
        "gauge",
        "The id the next round will have.",
        &[("", s.core.next_round as f64)],
    );
    if let Some(secs) = d.last_round_seconds {
        put(
            "last_round_seconds",
            "gauge",
            "Wall time of the last finished round, batch out to result.",
            &[("", secs)],
        );
    }
    put(
        "generation_seconds_total",
        "counter",
        "Time spent generating synthetic samples.",
        &[("", d.generation_seconds)],
    );
    put(
        "llm_seconds_total",
        "counter",
        "Time spent measuring and tuning the LLM.",
        &[("", d.llm_seconds)],
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Counters;

    fn snapshot() -> Snapshot {
        Snapshot {
            core: CoreView {
                round: Some((3, Phase::Collecting)),
                llm: "idle".into(),
                clients_connected: 7,
                rounds_ended: 2,
                next_round: 4,
                counters: Counters {
                    rounds_done: 2,
                    replies_accepted: 14,
                    replies_invalid: 1,
                    ..Counters::default()
                },
            },
            daemon: DaemonFigures {
                last_round_seconds: Some(12.5),
                ..DaemonFigures::default()
            },
        }
    }

    #[test]
    fn metrics_are_prometheus_text() {
        let m = metrics(&snapshot(), Some(9));
        for line in [
            "# TYPE crosslm_rounds_total counter",
            "crosslm_rounds_total{outcome=\"done\"} 2",
            "crosslm_replies_total{verdict=\"accepted\"} 14",
            "crosslm_replies_total{verdict=\"invalid\"} 1",
            "crosslm_clients_connected 7",
            "crosslm_clients_enrolled 9",
            "crosslm_round_collecting 1",
            "crosslm_last_round_seconds 12.5",
        ] {
            assert!(m.lines().any(|l| l == line), "{line} missing in\n{m}");
        }
    }

    #[test]
    fn requests_are_routed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let published: Published = Arc::new(Mutex::new(None));
        let get = |path: &str| {
            respond(
                format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes(),
                &published,
                &store,
            )
        };
        assert_eq!(get("/healthz").0, 503, "nothing published yet");
        *published.lock().unwrap() = Some(snapshot());
        assert_eq!(get("/healthz"), (200, "text/plain", "ok\n".to_string()));
        let (code, kind, body) = get("/status");
        assert_eq!((code, kind), (200, "application/json"));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["core"]["clients_connected"], 7);
        assert_eq!(v["core"]["counters"]["replies_accepted"], 14);
        assert_eq!(get("/nope").0, 404);
        let post = respond(b"POST /status HTTP/1.1\r\n\r\n", &published, &store);
        assert_eq!(post.0, 405);
    }
}
