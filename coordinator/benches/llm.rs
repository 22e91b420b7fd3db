//! LLM throughput on CPU beside llama.cpp on the same GGUF file.
//!
//! Prompt processing (prefill) and generation (one token per sequence per step, greedy, EOS
//! ignored so every run does the same work) tokens/s for batch 1 and 16, and peak memory;
//! then what CrossLM's rounds run: MR classification (sentences/s of `Llm::classify`) and
//! perplexity on NYT text (tokens/s of `Llm::perplexity`). llama.cpp runs through
//! `scripts/bench/llm_llamacpp.py` (llama-cpp-python) in the Python of
//! `CROSSLM_BENCH_PYTHON` (default: the venv of `scripts/bench/setup.sh`, else `python3`).
//!
//! `cargo bench --workspace --bench llm` (env: `CROSSLM_BENCH_MODEL` = `smollm2` (default),
//! `qwen2` or a GGUF path; `CROSSLM_BENCH_PROMPT` tokens per prompt, default 128;
//! `CROSSLM_BENCH_GEN` generated tokens, default 32; `CROSSLM_LLM_ENGINE=burn` measures the
//! burn decoder instead of the quantized one).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use burn::tensor::Device;
use crosslm_coordinator::llm::generate::argmax;
use crosslm_coordinator::llm::{Llm, qwen2_gguf_path, smollm2_gguf_path};
use crosslm_coordinator::task::TaskSpec;
use crosslm_sdk::data::{BadRows, assets_dir, load_mr, workspace_root};

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
    let rows = prompts(llm, batch, prompt_len);
    let pads = vec![0; batch];
    let mut session = llm.session(None, prompt_len + n_gen);
    let t0 = Instant::now();
    let mut logits = session.step(&rows, &pads);
    let prefill = (batch * prompt_len) as f64 / t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for _ in 0..n_gen {
        let next: Vec<Vec<u32>> = logits
            .chunks(llm.config.vocab_size)
            .map(|row| vec![argmax(row)])
            .collect();
        logits = session.step(&next, &pads);
    }
    let generate = (batch * n_gen) as f64 / t1.elapsed().as_secs_f64();
    Figures { prefill, generate }
}

/// MR classification (sentences/s) and NYT perplexity (scored tokens/s), as a round runs them.
fn round_work(llm: &Llm) -> Result<(f64, f64), String> {
    let task = TaskSpec::from_toml_file(workspace_root().join("examples/tasks/mr.toml"))
        .map_err(|e| e.to_string())?;
    let load = |name: &str, n: usize| -> Result<Vec<String>, String> {
        let loaded = load_mr(&assets_dir().join("data/mr").join(name), BadRows::Skip)
            .map_err(|e| e.to_string())?;
        Ok(loaded
            .dataset
            .examples
            .iter()
            .take(n)
            .map(|e| e.text.clone())
            .collect())
    };
    let sentences = load("movieReviewSnippets_GroundTruth.txt", 64)?;
    let t = Instant::now();
    llm.classify(&task, &sentences).map_err(|e| e.to_string())?;
    let classify = sentences.len() as f64 / t.elapsed().as_secs_f64();
    let general = load("nytEditorialSnippets_GroundTruth.txt", 32)?;
    let tokens: usize = general
        .iter()
        .map(|t| {
            llm.tokenizer
                .encode(t)
                .map_or(0, |v| v.len().saturating_sub(1))
        })
        .sum();
    let t = Instant::now();
    llm.perplexity(&general).map_err(|e| e.to_string())?;
    let perplexity = tokens as f64 / t.elapsed().as_secs_f64();
    Ok((classify, perplexity))
}

/// The Python with the references installed: `CROSSLM_BENCH_PYTHON`, else the venv that
/// `scripts/bench/setup.sh` makes, else `python3`.
fn reference_python() -> String {
    if let Ok(p) = std::env::var("CROSSLM_BENCH_PYTHON") {
        return p;
    }
    let venv = std::env::var("HOME").map(|h| format!("{h}/.cache/crosslm/venv/bin/python"));
    match venv {
        Ok(v) if std::path::Path::new(&v).is_file() => v,
        _ => "python3".into(),
    }
}

/// llama.cpp figures from the Python script: `{"b1": {...}, "b16": {...}, "peak_rss_mib": x}`.
fn llamacpp(path: &Path, prompt_len: usize, n_gen: usize) -> Option<(Figures, Figures, f64)> {
    let python = reference_python();
    let ok = Command::new(&python)
        .args(["-c", "import llama_cpp"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        println!("llama.cpp reference missing: `{python} -c \"import llama_cpp\"` fails");
        println!("(scripts/bench/setup.sh installs it, then set CROSSLM_BENCH_PYTHON)");
        return None;
    }
    let script = workspace_root().join("scripts/bench/llm_llamacpp.py");
    let out = Command::new(&python)
        .arg(script)
        .arg(path)
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

/// The GGUF file to measure: `CROSSLM_BENCH_MODEL` = `smollm2` (default), `qwen2`, or a path.
fn model_path() -> PathBuf {
    match std::env::var("CROSSLM_BENCH_MODEL").as_deref() {
        Ok("qwen2") => qwen2_gguf_path(),
        Ok("smollm2") | Err(_) => smollm2_gguf_path(),
        Ok(other) => PathBuf::from(other),
    }
}

fn main() {
    let path = model_path();
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
    let work = round_work(&llm);
    let reference = llamacpp(&path, prompt_len, n_gen);
    let engine = if llm.cpu_model().is_some() {
        "quantized CPU decoder"
    } else {
        "burn decoder"
    };

    println!();
    println!(
        "{}, prompt {prompt_len} tokens, {n_gen} generated tokens per sequence; \
         crosslm: {engine}, {} threads, {}",
        path.file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        rayon::current_num_threads(),
        simd_note()
    );
    println!(
        "{:<22} {:>12} {:>12} {:>8}",
        "tokens/s", "crosslm", "llama.cpp", "ratio"
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
    println!("(ratio = crosslm / llama.cpp; > 1 means crosslm is faster, or uses more memory)");
    match work {
        Ok((classify, perplexity)) => {
            println!("MR classification, sentences/s   {classify:>8.1}");
            println!("NYT perplexity, scored tokens/s  {perplexity:>8.1}");
        }
        Err(e) => println!("round work not measured: {e}"),
    }
}

/// Which SIMD the CPU offers (the kernels pick AVX2 at run time when present).
fn simd_note() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let list: Vec<&str> = [
            (std::arch::is_x86_feature_detected!("avx2"), "avx2"),
            (std::arch::is_x86_feature_detected!("fma"), "fma"),
            (std::arch::is_x86_feature_detected!("avx512f"), "avx512f"),
            (
                std::arch::is_x86_feature_detected!("avx512vnni"),
                "avx512vnni",
            ),
        ]
        .into_iter()
        .filter_map(|(has, name)| has.then_some(name))
        .collect();
        format!("CPU has {}", list.join(" "))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        "no x86 SIMD (portable kernels)".to_string()
    }
}
