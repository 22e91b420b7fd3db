//! Support for the cross-crate and network integration tests in `tests/`: paths to the
//! built binaries, small task and sample files, and test doubles for the client's scorer.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crosslm_sdk::Result;
use crosslm_sdk::protocol::{ClientInfo, SyntheticSample, TaskInfo};
use crosslm_sdk::rounds::Scorer;
use crosslm_sdk::transport::{EnrollToken, Identity, enroll};

pub use crosslm_sdk::data::workspace_root;

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

/// Path of an example program (`sdk/examples`, `coordinator/examples`) built in the same
/// profile (`cargo build --workspace --examples`, which `scripts/test.sh` runs).
pub fn example_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join("examples").join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --release --workspace --examples` first",
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

/// A `crosslm-coordinator serve` process on 127.0.0.1 with a file generator
/// ([`write_task`], [`write_samples`]), killed on drop.
pub struct CoordinatorProcess {
    /// The process.
    pub child: std::process::Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Enrollment tokens it printed.
    pub tokens: Vec<String>,
    /// Its data dir (for `crosslm-coordinator status` after it exits).
    pub data_dir: PathBuf,
}

impl CoordinatorProcess {
    /// Starts the daemon in `dir`: `rounds` rounds of `per_label` samples per label, opening
    /// when `min_clients` are connected, done on one reply; prints `tokens` tokens.
    pub fn start(
        dir: &Path,
        rounds: u64,
        per_label: usize,
        min_clients: usize,
        tokens: usize,
    ) -> Self {
        Self::start_with_deadline(dir, rounds, per_label, min_clients, tokens, 120_000)
    }

    /// [`CoordinatorProcess::start`] with a round deadline of `deadline_ms`: a round that has
    /// its quorum but not every client's reply closes then.
    pub fn start_with_deadline(
        dir: &Path,
        rounds: u64,
        per_label: usize,
        min_clients: usize,
        tokens: usize,
        deadline_ms: u64,
    ) -> Self {
        write_task(dir);
        write_samples(dir, per_label.max(1));
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
min_clients = {min_clients}
idle_timeout_ms = 5000
linger_ms = 5000
[daemon.round]
quorum = 1
deadline_ms = {deadline_ms}
[generator]
kind = "file"
path = "samples.jsonl"
"#
            ),
        )
        .expect("write coordinator config");
        Self::serve(dir, &config, tokens, std::process::Stdio::inherit())
    }

    /// Starts `crosslm-coordinator serve` with the config file `config` (in `dir`, data dir
    /// `coord`), its stderr to `stderr`; returns once it listens, with `tokens` tokens.
    pub fn serve(
        dir: &Path,
        config: &Path,
        tokens: usize,
        stderr: impl Into<std::process::Stdio>,
    ) -> Self {
        let addr_file = dir.join("addr");
        let mut child = std::process::Command::new(bin("crosslm-coordinator"))
            .args(["serve", "--config"])
            .arg(config)
            .args(["--print-tokens", &tokens.to_string(), "--addr-file"])
            .arg(&addr_file)
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start crosslm-coordinator");
        // Tokens are printed before it listens; the address file appears once it does.
        let out = child.stdout.take().expect("stdout");
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(out));
        let mut toks = Vec::new();
        while toks.len() < tokens {
            let line = lines
                .next()
                .expect("coordinator printed its tokens")
                .expect("read");
            if let Some(t) = line.strip_prefix("enrollment token: ") {
                toks.push(t.trim().to_string());
            }
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let addr = loop {
            if let Ok(s) = std::fs::read_to_string(&addr_file)
                && let Ok(a) = s.trim().parse()
            {
                break a;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "coordinator did not start listening"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        Self {
            child,
            addr,
            tokens: toks,
            data_dir: dir.join("coord"),
        }
    }

    /// Waits for the daemon to exit by itself (after its rounds and linger).
    pub fn wait(&mut self, timeout: std::time::Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "coordinator did not exit"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small private data file for [`write_task`]'s task: `n` JSONL rows, alternating labels,
/// with distinct wording per label so that a small model learns it.
pub fn write_private_data(dir: &Path, n: usize) -> PathBuf {
    let p = dir.join("private.jsonl");
    let neg = ["dull", "lifeless", "boring", "awful", "tedious"];
    let pos = ["warm", "wonderful", "moving", "brilliant", "charming"];
    let mut s = String::new();
    for i in 0..n {
        let (label, words) = if i % 2 == 0 {
            ("negative", &neg)
        } else {
            ("positive", &pos)
        };
        let text = format!(
            "a {} and {} film, take {i}",
            words[i % words.len()],
            words[(i / 2 + 1) % words.len()]
        );
        s += &format!("{}\n", serde_json::json!({"text": text, "label": label}));
    }
    std::fs::write(&p, s).expect("write private data");
    p
}

/// The Python of a serving engine (llama-cpp-python's server): `CROSSLM_ENGINE_PYTHON`.
pub fn engine_python() -> PathBuf {
    std::env::var_os("CROSSLM_ENGINE_PYTHON")
        .map(PathBuf::from)
        .expect("set CROSSLM_ENGINE_PYTHON to a python with llama-cpp-python[server] (scripts/test-engine.sh does)")
}

/// The GGUF the engine serves (and the coordinator tunes).
pub fn engine_gguf() -> PathBuf {
    let p = crosslm_coordinator::llm::assets_dir().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "{} missing: run scripts/fetch-assets.sh",
        p.display()
    );
    p
}

/// A TCP port that was free a moment ago.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `python -m llama_cpp.server` with the SmolLM2 GGUF as `smollm2` on 127.0.0.1:`port`,
/// killed on drop.
pub struct EngineProcess(std::process::Child);

impl EngineProcess {
    /// Starts it; panics if it does not list its model within two minutes.
    pub fn start(port: u16, log: &Path) -> EngineProcess {
        let log = std::fs::File::create(log).unwrap();
        let child = std::process::Command::new(engine_python())
            .args(["-m", "llama_cpp.server", "--model"])
            .arg(engine_gguf())
            .args([
                "--model_alias",
                "smollm2",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--n_ctx",
                "1024",
                "--n_threads",
                "2",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start llama_cpp.server");
        EngineProcess(child).when_up(port, Duration::from_secs(120))
    }

    /// vLLM's OpenAI-compatible server (`CROSSLM_VLLM_PYTHON`, a python with vLLM) serving
    /// the Hugging Face checkpoint `CROSSLM_VLLM_MODEL` as `smollm2` on 127.0.0.1:`port`, in
    /// f32, with runtime LoRA loading on (rank up to `max_lora_rank`); panics if it does not
    /// list its model within ten minutes (on two CPU cores it starts in a few).
    pub fn vllm(port: u16, max_lora_rank: usize, log: &Path) -> EngineProcess {
        let var = |name: &str| {
            std::env::var_os(name)
                .map(PathBuf::from)
                .unwrap_or_else(|| panic!("set {name} (scripts/test-vllm.sh does)"))
        };
        let log = std::fs::File::create(log).unwrap();
        let child = std::process::Command::new(var("CROSSLM_VLLM_PYTHON"))
            .args(["-m", "vllm.entrypoints.openai.api_server", "--model"])
            .arg(var("CROSSLM_VLLM_MODEL"))
            .args([
                "--served-model-name",
                "smollm2",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--dtype",
                "float32",
                "--max-model-len",
                "1024",
                "--enforce-eager",
                "--enable-lora",
                "--max-loras",
                "2",
                "--max-lora-rank",
                &max_lora_rank.to_string(),
            ])
            .env("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
            .env("VLLM_CPU_KVCACHE_SPACE", "1")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start vllm");
        EngineProcess(child).when_up(port, Duration::from_secs(600))
    }

    /// Waits until the engine on `port` lists its model; panics after `timeout`.
    fn when_up(self, port: u16, timeout: Duration) -> EngineProcess {
        let deadline = Instant::now() + timeout;
        while !models_answer(port) {
            assert!(Instant::now() < deadline, "the engine did not come up");
            std::thread::sleep(Duration::from_millis(300));
        }
        self
    }
}

impl Drop for EngineProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A client of the engine on 127.0.0.1:`port` (no retries: tests want to see failures).
pub fn engine_client(port: u16, timeout: Duration) -> crosslm_coordinator::serving::EngineClient {
    crosslm_coordinator::serving::EngineClient::new(crosslm_coordinator::serving::EngineEndpoint {
        base_url: format!("http://127.0.0.1:{port}/v1"),
        api_key: None,
        timeout,
        retries: 0,
        backoff: Duration::from_millis(10),
    })
}

/// Whether the engine on `port` answers `GET /v1/models` with its model.
pub fn models_answer(port: u16) -> bool {
    engine_client(port, Duration::from_secs(2))
        .models()
        .is_ok_and(|m| m.iter().any(|id| id == "smollm2"))
}
