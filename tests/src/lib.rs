//! Support for the cross-crate and network integration tests in `tests/`: paths to the
//! built binaries, small task and sample files, and test doubles for the client's scorer.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crosslm_sdk::Result;
use crosslm_sdk::protocol::{ClientInfo, SyntheticSample, TaskInfo};
use crosslm_sdk::transport::{EnrollToken, Identity, Scorer, enroll};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Path of a binary built by the same `cargo test` invocation (same profile).
pub fn bin(name: &str) -> PathBuf {
    // current_exe = <target>/<profile>/deps/<test>-<hash>
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built: run the tests with `cargo test --workspace`",
        p.display()
    );
    p
}

/// A two-label task file (polarity), returned with its [`TaskInfo`].
pub fn write_task(dir: &Path) -> (PathBuf, TaskInfo) {
    let p = dir.join("task.toml");
    std::fs::write(
        &p,
        r#"
name = "mr"
description = "movie review polarity"
classify_template = "Review: {text}\nSentiment ({labels}):"
[[labels]]
name = "negative"
prompts = ["Write a negative movie review sentence."]
[[labels]]
name = "positive"
prompts = ["Write a positive movie review sentence."]
"#,
    )
    .expect("write task");
    let info = TaskInfo {
        name: "mr".into(),
        description: "movie review polarity".into(),
        labels: vec!["negative".into(), "positive".into()],
    };
    (p, info)
}

/// A JSONL file of `n` samples per label for [`write_task`]'s task.
pub fn write_samples(dir: &Path, n: usize) -> PathBuf {
    let p = dir.join("samples.jsonl");
    let mut s = String::new();
    for i in 0..n {
        s += &format!(
            "{{\"text\": \"a dull, lifeless film number {i}\", \"label\": \"negative\"}}\n"
        );
        s += &format!(
            "{{\"text\": \"a warm and wonderful film number {i}\", \"label\": \"positive\"}}\n"
        );
    }
    std::fs::write(&p, s).expect("write samples");
    p
}

/// Test double: gives each sample's intended label probability `p`.
#[derive(Clone)]
pub struct FixedScorer {
    /// Probability given to the intended label.
    pub p: f32,
}

impl Scorer for FixedScorer {
    fn score(&mut self, task: &TaskInfo, samples: &[SyntheticSample]) -> Result<Vec<Vec<f32>>> {
        let n = task.labels.len();
        Ok(samples
            .iter()
            .map(|s| {
                (0..n)
                    .map(|l| {
                        if l == s.label as usize {
                            self.p
                        } else {
                            (1.0 - self.p) / (n - 1) as f32
                        }
                    })
                    .collect()
            })
            .collect())
    }
}

/// Client metadata for tests.
pub fn info(name: &str, n_private: u64) -> ClientInfo {
    ClientInfo {
        name: name.into(),
        slm_arch: "test-double".into(),
        n_private,
    }
}

/// Enrolls a client with a fresh token.
pub async fn enroll_with(addr: SocketAddr, token: &EnrollToken, name: &str) -> Identity {
    enroll(addr, token, info(name, 10)).await.expect("enroll")
}

/// A free UDP port on 127.0.0.1 (for a coordinator that must come back on the same port).
pub fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.local_addr().expect("addr").port()
}

/// Logs to stderr for a test (once per process).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}
