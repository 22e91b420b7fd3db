//! The LLM side on a real serving engine: llama-cpp-python's OpenAI-compatible server on
//! 127.0.0.1 with the SmolLM2 GGUF writes the samples, a real client (the `crosslm-client`
//! binary) scores them and learns, and the coordinator tunes its local copy of the base from
//! the feedback and exports each round's adapter in PEFT's layout. The engine is down when
//! the first round wants samples: the round waits, retries, and runs once it is up.
//!
//! Ignored by default (it needs a Python with `llama-cpp-python[server]`, which CI does not
//! install): `scripts/test-engine.sh` sets one up and runs it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crosslm_tests::*;

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
#[ignore = "needs llama-cpp-python[server]: scripts/test-engine.sh"]
fn rounds_run_on_a_serving_engine_that_comes_up_late() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_task(d);
    let port = free_tcp_port();
    let config = d.join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            r#"
task = "task.toml"
[daemon]
listen = "127.0.0.1:0"
data_dir = "coord"
rounds = 2
samples_per_label = 6
min_clients = 1
idle_timeout_ms = 5000
linger_ms = 3000
[daemon.round]
quorum = 1
deadline_ms = 300000
[generator]
kind = "engine"
base_url = "http://127.0.0.1:{port}/v1"
model = "smollm2"
concurrency = 2
timeout_secs = 60
retries = 1
local_model = "{}"
lora = "none"
seed = 1
[tuning]
enabled = true
min_quality = 0.0
epochs = 1
"#,
            engine_gguf().display()
        ),
    )
    .unwrap();
    let coord_log = d.join("coordinator.log");
    let mut coord =
        CoordinatorProcess::serve(d, &config, 1, std::fs::File::create(&coord_log).unwrap());
    let log = || std::fs::read_to_string(&coord_log).unwrap_or_default();
    let (addr, token) = (coord.addr.to_string(), coord.tokens[0].clone());

    // A real client: enroll, then take part in both rounds (in the background).
    let data = write_private_data(d, 40);
    let client_cfg = d.join("client.toml");
    std::fs::write(
        &client_cfg,
        format!(
            "coordinator = \"{}\"\ndata_dir = \"client-data\"\nname = \"engine-test\"\narch = \"bag\"\ndata = \"{}\"\ntest_fraction = 0.25\ntrain_epochs = 10\nround_epochs = 2\nconnect_timeout_ms = 5000\n",
            addr,
            data.display()
        ),
    )
    .unwrap();
    let run_client = |args: &[&str]| {
        let mut c = Command::new(bin("crosslm-client"));
        c.args(args)
            .arg("--config")
            .arg(&client_cfg)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };
    let out = run_client(&["enroll", "--token", &token]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client = run_client(&["join", "--rounds", "2"]).spawn().unwrap();

    // The engine is not up: round 1's generation fails with a clear error and is retried.
    wait_for("a failed generation", Duration::from_secs(120), || {
        log().contains("generation failed; retrying")
    });
    let l = log();
    assert!(
        l.contains(&format!(
            "engine at http://127.0.0.1:{port}/v1/chat/completions unreachable"
        )),
        "{l}"
    );
    let started = Instant::now();
    let _engine = EngineProcess::start(port, &d.join("engine.log"));
    eprintln!("engine up after {:.1}s", started.elapsed().as_secs_f64());

    let out = client.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("took part in 2 round(s); last round 2"),
        "{stdout}"
    );
    let status = coord.wait(Duration::from_secs(600));
    let l = log();
    assert!(status.success(), "coordinator: {l}");
    assert!(l.contains("engine generated samples"), "{l}");

    // Each round's samples came from the engine; the LLM tuned on both rounds' feedback and
    // its adapters are exported in PEFT's layout.
    let out = Command::new(bin("crosslm-coordinator"))
        .args(["samples", "--data-dir"])
        .arg(d.join("coord"))
        .output()
        .unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for round in [1, 2] {
        let n = lines.iter().filter(|s| s["round"] == round).count();
        assert!(n >= 6, "round {round}: {n} samples");
    }
    assert!(
        lines.iter().all(|s| s["quality"].is_number()),
        "every sample scored"
    );
    for round in [1, 2] {
        let peft = d.join(format!("coord/llm/peft/round-{round}"));
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(peft.join("adapter_config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["peft_type"], "LORA");
        assert!(peft.join("adapter_model.safetensors").is_file());
    }
}
