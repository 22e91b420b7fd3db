//! The LLM side on a real serving engine: llama-cpp-python's OpenAI-compatible server on
//! 127.0.0.1 with the SmolLM2 GGUF writes the samples, a real client (the `crosslm-client`
//! binary) scores them and learns, and the coordinator tunes its local copy of the base from
//! the feedback and exports each round's adapter in PEFT's layout. The engine is down when
//! the first round wants samples: the round waits, retries, and runs once it is up.
//!
//! Ignored by default (it needs a Python with `llama-cpp-python[server]`, which CI does not
//! install): `scripts/test-engine.sh` sets one up and runs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crosslm_tests::*;

/// The coordinator's config: the engine on `port` writes the samples (`lora` = "none" or
/// "runtime"), its local GGUF copy tunes from the feedback for `epochs`, one client suffices.
fn coordinator_config(d: &Path, port: u16, rounds: u32, lora: &str, epochs: u32) -> PathBuf {
    let config = d.join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            r#"
task = "task.toml"
[daemon]
listen = "127.0.0.1:0"
data_dir = "coord"
rounds = {rounds}
samples_per_label = 6
min_clients = 1
idle_timeout_ms = 5000
linger_ms = 3000
[daemon.round]
quorum = 1
deadline_ms = 600000
[generator]
kind = "engine"
base_url = "http://127.0.0.1:{port}/v1"
model = "smollm2"
concurrency = 2
timeout_secs = 300
retries = 1
local_model = "{}"
lora = "{lora}"
seed = 1
[tuning]
enabled = true
min_quality = 0.0
epochs = {epochs}
"#,
            engine_gguf().display()
        ),
    )
    .unwrap();
    config
}

/// A `crosslm-client` config: bag model on `data`, a quarter held out.
fn client_config(d: &Path, addr: &str, name: &str, data: &Path) -> PathBuf {
    let p = d.join("client.toml");
    std::fs::write(
        &p,
        format!(
            "coordinator = \"{addr}\"\ndata_dir = \"client-data\"\nname = \"{name}\"\narch = \"bag\"\ndata = \"{}\"\ntest_fraction = 0.25\ntrain_epochs = 10\nround_epochs = 2\nconnect_timeout_ms = 5000\n",
            data.display()
        ),
    )
    .unwrap();
    p
}

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
    let config = coordinator_config(d, port, 2, "none", 1);
    let coord_log = d.join("coordinator.log");
    let mut coord =
        CoordinatorProcess::serve(d, &config, 1, std::fs::File::create(&coord_log).unwrap());
    let log = || std::fs::read_to_string(&coord_log).unwrap_or_default();
    let (addr, token) = (coord.addr.to_string(), coord.tokens[0].clone());

    // A real client: enroll, then take part in both rounds (in the background).
    let data = write_private_data(d, 40);
    let client_cfg = client_config(d, &addr, "engine-test", &data);
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

/// The adapter's round trip through vLLM: three CrossLM rounds with `lora = "runtime"`
/// against a real vLLM (CPU build, f32, the GGUF's weights in Hugging Face form). After rounds
/// 1 and 2 the coordinator exports the adapter, loads it into vLLM as `crosslm-rN` and writes
/// the next round with it, unloading the one before. Then vLLM's next-token log-probabilities
/// under round 3's adapter are compared with burn's adapted decoder (`llm logits --adapters`): they
/// agree as closely as the two bases do, and the adapter moves vLLM's by far more than that.
#[test]
#[ignore = "needs vLLM: scripts/test-vllm.sh"]
fn each_rounds_adapter_is_loaded_into_vllm_and_matches_burns_adapted_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_task(d);
    let port = free_tcp_port();
    let started = Instant::now();
    let _engine = EngineProcess::vllm(port, 8, &d.join("engine.log"));
    eprintln!("vLLM up after {:.1}s", started.elapsed().as_secs_f64());
    let config = coordinator_config(d, port, 3, "runtime", 2);
    let coord_log = d.join("coordinator.log");
    let mut coord =
        CoordinatorProcess::serve(d, &config, 1, std::fs::File::create(&coord_log).unwrap());
    let log = || std::fs::read_to_string(&coord_log).unwrap_or_default();
    let data = write_private_data(d, 40);
    let client_cfg = client_config(d, &coord.addr.to_string(), "vllm-test", &data);
    let client = |args: &[&str]| {
        Command::new(bin("crosslm-client"))
            .args(args)
            .arg("--config")
            .arg(&client_cfg)
            .output()
            .unwrap()
    };
    let out = client(&["enroll", "--token", &coord.tokens[0].clone()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = client(&["join", "--rounds", "3"]);
    assert!(
        out.status.success(),
        "client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = coord.wait(Duration::from_secs(1200));
    let l = log();
    assert!(status.success(), "coordinator: {l}");
    for (round, model) in [(1, "smollm2"), (2, "crosslm-r1"), (3, "crosslm-r2")] {
        let line = l
            .lines()
            .find(|x| {
                x.contains("engine generated samples") && x.contains(&format!("round={round} "))
            })
            .unwrap_or_else(|| panic!("round {round} not generated: {l}"));
        assert!(line.contains(&format!("model=\"{model}\" ")), "{line}");
    }
    assert!(!l.contains("could not unload"), "{l}");
    let models = engine_client(port, Duration::from_secs(60))
        .models()
        .unwrap();
    assert!(models.iter().any(|m| m == "crosslm-r2"), "{models:?}");
    assert!(!models.iter().any(|m| m == "crosslm-r1"), "{models:?}");

    // The last round's adapter (exported, not loaded: no round came after it), loaded here
    // as the coordinator does, and vLLM's adapted model against burn's (the coordinator
    // keeps the newest round's .lora file only): next token after each prompt, on vLLM's top 5.
    let adapters = d.join("coord/llm/adapters-3.lora");
    assert!(adapters.is_file(), "{} missing", adapters.display());
    let peft = d.join("coord/llm/peft/round-3");
    engine_client(port, Duration::from_secs(60))
        .load_lora("crosslm-r3", peft.to_str().unwrap())
        .unwrap();
    let (mut base_gap, mut adapted_gap, mut moved) = (0f64, 0f64, 0f64);
    for prompt in [
        "<|im_start|>user\nWrite a one-sentence movie review that is positive.<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nWrite a one-sentence movie review that is negative.<|im_end|>\n<|im_start|>assistant\n",
        "The history of the city begins in",
    ] {
        let (ids, burn_base) = burn_logprobs(prompt, None);
        let (_, burn_adapted) = burn_logprobs(prompt, Some(&adapters));
        let vllm_base = vllm_top_logprobs(port, "smollm2", &ids);
        let vllm_adapted = vllm_top_logprobs(port, "crosslm-r3", &ids);
        for (tok, lp) in &vllm_base {
            base_gap = base_gap.max((lp - burn_base[*tok]).abs());
        }
        for (tok, lp) in &vllm_adapted {
            adapted_gap = adapted_gap.max((lp - burn_adapted[*tok]).abs());
            if let Some((_, b)) = vllm_base.iter().find(|(t, _)| t == tok) {
                moved = moved.max((lp - b).abs());
            }
        }
    }
    eprintln!(
        "max |vLLM - burn| next-token log-prob: base {base_gap:.2e}, with crosslm-r3 {adapted_gap:.2e}; the adapter moves vLLM's by up to {moved:.2e}"
    );
    // f32 on both sides: the bases agree to float noise, and so must the adapted models.
    assert!(
        adapted_gap <= 2.0 * base_gap.max(1e-3),
        "{adapted_gap} vs {base_gap}"
    );
    assert!(
        moved > 10.0 * adapted_gap.max(1e-4),
        "the adapter moved vLLM's log-probs by only {moved}"
    );
}

/// burn's next-token log-probabilities after `prompt` (the f32 decoder, with or without a
/// `.lora` file), and the prompt's token ids.
fn burn_logprobs(prompt: &str, adapters: Option<&Path>) -> (Vec<u32>, Vec<f64>) {
    let mut c = Command::new(bin("crosslm-coordinator"));
    c.args(["llm", "logits", "--model"]).arg(engine_gguf());
    if let Some(a) = adapters {
        c.arg("--adapters").arg(a);
    }
    let out = c.arg(prompt).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<u32> = serde_json::from_value(v["ids"].clone()).unwrap();
    let logits: Vec<f64> = serde_json::from_value(v["logits"].clone()).unwrap();
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + logits.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
    (ids, logits.iter().map(|x| x - lse).collect())
}

/// vLLM's top-5 next-token log-probabilities after the token ids `ids` under `model`.
fn vllm_top_logprobs(port: u16, model: &str, ids: &[u32]) -> Vec<(usize, f64)> {
    let body = serde_json::json!({
        "model": model, "prompt": ids, "max_tokens": 1, "temperature": 0.0,
        "logprobs": 5, "return_tokens_as_token_ids": true,
    });
    let mut resp = ureq::post(format!("http://127.0.0.1:{port}/v1/completions"))
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
    let top = v["choices"][0]["logprobs"]["top_logprobs"][0]
        .as_object()
        .unwrap_or_else(|| panic!("no top_logprobs: {v}"));
    top.iter()
        .map(|(k, lp)| {
            let id = k
                .strip_prefix("token_id:")
                .unwrap_or_else(|| panic!("token key {k}"));
            (id.parse().unwrap(), lp.as_f64().unwrap())
        })
        .collect()
}
