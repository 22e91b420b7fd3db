//! LLM throughput on CPU (burn Flex) beside llama.cpp on the same GGUF file.
//!
//! Prompt processing (prefill) and generation (one token per sequence per step, greedy, EOS
//! ignored so every run does the same work) tokens/s for batch 1 and 16, and peak memory.
//! llama.cpp runs through `scripts/bench/llm_llamacpp.py` (llama-cpp-python) when
//! `python3 -c "import llama_cpp"` works.
//!
//! `cargo bench -p crosslm-coordinator --bench llm` (env: `CROSSLM_BENCH_PROMPT` tokens per
//! prompt, default 128; `CROSSLM_BENCH_GEN` generated tokens, default 32).

use std::process::Command;
use std::time::Instant;

use burn::tensor::Device;
use crosslm_coordinator::llm::generate::argmax;
use crosslm_coordinator::llm::model::{KvCache, StepInputs, to_host_f32, token_tensor};
use crosslm_coordinator::llm::{Llm, smollm2_gguf_path};

/// Throughput of one configuration, tokens per second.
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    prefill: f64,
    generate: f64,
}

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Peak resident memory of this process in MiB (`VmHWM`).
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// `batch` prompts of exactly `len` tokens, all different.
fn prompts(llm: &Llm, batch: usize, len: usize) -> Vec<Vec<u32>> {
    let text = "The film opens on a quiet street where an old projectionist keeps a cinema \
                alive against the odds. Critics praised the performances, the score and the \
                photography, though some found the pacing slow in the second half. ";
    let base = llm
        .tokenizer
        .encode(&text.repeat(1 + len / 30))
        .unwrap_or_default();
    (0..batch)
        .map(|b| base.iter().cycle().skip(b * 3).take(len).copied().collect())
        .collect()
}

/// Prefill then `gen` greedy steps; returns tokens/s for both phases.
fn run(llm: &Llm, batch: usize, prompt_len: usize, n_gen: usize) -> Figures {
    let (c, d, m) = (&llm.config, &llm.device, &llm.model);
    let rows = prompts(llm, batch, prompt_len);
    let pads = vec![0; batch];
    let mut cache = KvCache::new();
    let t0 = Instant::now();
    let hidden = m.forward(
        token_tensor(&rows, d),
        &StepInputs::new(c, &pads, 0, prompt_len, d),
        Some(&mut cache),
        None,
    );
    let dm = c.d_model;
    let mut last = hidden
        .slice([0..batch, prompt_len - 1..prompt_len])
        .reshape([batch, dm]);
    // Reading the logits back forces the computation.
    let mut logits = to_host_f32(m.lm_head(last));
    let prefill = (batch * prompt_len) as f64 / t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for step in 0..n_gen {
        let next: Vec<Vec<u32>> = logits
            .chunks(c.vocab_size)
            .map(|row| vec![argmax(row)])
            .collect();
        let hidden = m.forward(
            token_tensor(&next, d),
            &StepInputs::new(c, &pads, prompt_len + step, 1, d),
            Some(&mut cache),
            None,
        );
        last = hidden.reshape([batch, dm]);
        logits = to_host_f32(m.lm_head(last));
    }
    let generate = (batch * n_gen) as f64 / t1.elapsed().as_secs_f64();
    Figures { prefill, generate }
}

/// llama.cpp figures from the Python script: `{"b1": {...}, "b16": {...}, "peak_rss_mib": x}`.
fn llamacpp(prompt_len: usize, n_gen: usize) -> Option<(Figures, Figures, f64)> {
    let ok = Command::new("python3")
        .args(["-c", "import llama_cpp"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        println!("llama.cpp reference missing: `python3 -c \"import llama_cpp\"` fails");
        println!("(pip install llama-cpp-python to compare)");
        return None;
    }
    let script = crosslm_sdk::data::workspace_root().join("scripts/bench/llm_llamacpp.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(smollm2_gguf_path())
        .args([
            "--prompt",
            &prompt_len.to_string(),
            "--gen",
            &n_gen.to_string(),
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        println!(
            "llama.cpp reference failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let fig = |k: &str| Figures {
        prefill: v[k]["prefill"].as_f64().unwrap_or(f64::NAN),
        generate: v[k]["generate"].as_f64().unwrap_or(f64::NAN),
    };
    Some((
        fig("b1"),
        fig("b16"),
        v["peak_rss_mib"].as_f64().unwrap_or(f64::NAN),
    ))
}

fn main() {
    let path = smollm2_gguf_path();
    if !path.is_file() {
        eprintln!("missing {}: run scripts/fetch-assets.sh", path.display());
        std::process::exit(1);
    }
    let prompt_len = env_usize("CROSSLM_BENCH_PROMPT", 128);
    let n_gen = env_usize("CROSSLM_BENCH_GEN", 32);
    let t = Instant::now();
    let llm = match Llm::load(&path, &Device::flex()) {
        Ok(llm) => llm,
        Err(e) => {
            eprintln!("loading {}: {e}", path.display());
            std::process::exit(1);
        }
    };
    println!(
        "loaded {} in {:.1}s",
        path.display(),
        t.elapsed().as_secs_f64()
    );
    // Warm-up (allocator, thread pool).
    run(&llm, 1, 8, 2);
    let b1 = run(&llm, 1, prompt_len, n_gen);
    let b16 = run(&llm, 16, prompt_len, n_gen);
    let rss = peak_rss_mib();
    let reference = llamacpp(prompt_len, n_gen);

    println!();
    println!(
        "SmolLM2-135M Q4_1, prompt {prompt_len} tokens, {n_gen} generated tokens per sequence"
    );
    println!(
        "{:<22} {:>12} {:>12} {:>8}",
        "tokens/s", "burn-flex", "llama.cpp", "ratio"
    );
    let rows = [
        (
            "prefill, batch 1",
            b1.prefill,
            reference.map(|r| r.0.prefill),
        ),
        (
            "generate, batch 1",
            b1.generate,
            reference.map(|r| r.0.generate),
        ),
        (
            "prefill, batch 16",
            b16.prefill,
            reference.map(|r| r.1.prefill),
        ),
        (
            "generate, batch 16",
            b16.generate,
            reference.map(|r| r.1.generate),
        ),
        ("peak RSS MiB", rss, reference.map(|r| r.2)),
    ];
    for (name, ours, theirs) in rows {
        match theirs {
            Some(t) => println!("{name:<22} {ours:>12.1} {t:>12.1} {:>8.2}", ours / t),
            None => println!("{name:<22} {ours:>12.1} {:>12} {:>8}", "-", "-"),
        }
    }
    println!("(ratio = burn / llama.cpp; > 1 means burn is faster, or uses more memory)");
}
