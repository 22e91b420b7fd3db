//! LLM throughput beside a reference on the same GGUF file: llama.cpp on the CPU, PyTorch on
//! a GPU.
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
//! burn decoder instead of the quantized one; `CROSSLM_BENCH_DEVICE` = `cpu` (default), `gpu`
//! or `auto`, as `--device` takes them: on a GPU (a `cuda` build) the reference is
//! `scripts/bench/llm_torch.py`, transformers on the same GPU and the same prompt ids, in
//! f32 as burn runs, and in bf16 beside it; `CROSSLM_BENCH_ROUNDS` turns of ours then the
//! reference's, 3 on the CPU and 1 on a GPU by default: the table shows medians, each ratio
//! the median of the rounds' ratios, with their range).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::{env_usize, median, model_path, reference_python};

use crosslm_coordinator::llm::Llm;
use crosslm_coordinator::llm::device::{self, DeviceChoice, Placement};
use crosslm_coordinator::llm::generate::argmax;
use crosslm_coordinator::task::TaskSpec;
use crosslm_sdk::data::{BadRows, assets_dir, load_mr, workspace_root};

/// Throughput of one configuration, tokens per second.
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    prefill: f64,
    generate: f64,
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

/// Prefill then `gen` greedy steps; returns tokens/s for both phases and the first
/// sequence's greedy tokens.
fn run(llm: &Llm, batch: usize, prompt_len: usize, n_gen: usize) -> (Figures, Vec<u32>) {
    let rows = prompts(llm, batch, prompt_len);
    let pads = vec![0; batch];
    let mut session = llm.session(None, prompt_len + n_gen);
    let t0 = Instant::now();
    let mut logits = session.step(&rows, &pads);
    let prefill = (batch * prompt_len) as f64 / t0.elapsed().as_secs_f64();
    let mut first = Vec::with_capacity(n_gen + 1);
    let t1 = Instant::now();
    for _ in 0..n_gen {
        let next: Vec<Vec<u32>> = logits
            .chunks(llm.config.vocab_size)
            .map(|row| vec![argmax(row)])
            .collect();
        first.push(next[0][0]);
        logits = session.step(&next, &pads);
    }
    let generate = (batch * n_gen) as f64 / t1.elapsed().as_secs_f64();
    first.extend(logits.chunks(llm.config.vocab_size).take(1).map(argmax));
    (Figures { prefill, generate }, first)
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

/// A reference's figures beside ours.
struct Reference {
    /// The column's name, e.g. "llama.cpp" or "PyTorch f32".
    name: String,
    b1: Figures,
    b16: Figures,
    /// The reference's peak process memory (llama.cpp's RSS), when comparable with ours.
    peak_rss_mib: Option<f64>,
    /// One line on what the reference ran with.
    note: String,
    /// The first sequence's greedy tokens at batch 1, where the reference reports them.
    tokens: Vec<u32>,
}

/// Runs a reference script and parses its `{"b1": {...}, "b16": {...}, ...}` JSON.
fn run_reference(
    what: &str,
    module: &str,
    script: &str,
    args: &[String],
) -> Option<serde_json::Value> {
    let python = reference_python();
    let ok = Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        println!("{what} reference missing: `{python} -c \"import {module}\"` fails");
        println!("(scripts/bench/setup.sh installs it, then set CROSSLM_BENCH_PYTHON)");
        return None;
    }
    let out = Command::new(&python)
        .arg(workspace_root().join("scripts/bench").join(script))
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        println!(
            "{what} reference failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn figures(v: &serde_json::Value, key: &str) -> Figures {
    Figures {
        prefill: v[key]["prefill"].as_f64().unwrap_or(f64::NAN),
        generate: v[key]["generate"].as_f64().unwrap_or(f64::NAN),
    }
}

/// llama.cpp on the CPU (`scripts/bench/llm_llamacpp.py`), its own tokenization of the text.
fn llamacpp(path: &Path, prompt_len: usize, n_gen: usize) -> Option<Reference> {
    let args = [
        path.display().to_string(),
        "--prompt".into(),
        prompt_len.to_string(),
        "--gen".into(),
        n_gen.to_string(),
    ];
    let v = run_reference("llama.cpp", "llama_cpp", "llm_llamacpp.py", &args)?;
    let simd = v["simd"].as_str().unwrap_or("(no system info)");
    // Kernels narrowed below AVX-512 (`CROSSLM_SIMD`) against a llama.cpp that uses it
    // compare two instruction sets, not two engines: say so, and how to pair them.
    let unlike = !crosslm_sdk::quant::kernels().starts_with("avx512") && simd.contains("AVX512");
    Some(Reference {
        name: "llama.cpp".into(),
        b1: figures(&v, "b1"),
        b16: figures(&v, "b16"),
        peak_rss_mib: v["peak_rss_mib"].as_f64(),
        note: format!(
            "llama.cpp: {} threads, built with {simd}{}",
            v["threads"],
            if unlike {
                "; it uses AVX-512 where the kernels do not: `./scripts/bench/setup.sh \
                 --llama-avx2` builds llama.cpp for AVX2 alone (pass its Python as \
                 CROSSLM_BENCH_PYTHON)"
            } else {
                ""
            }
        ),
        tokens: Vec::new(),
    })
}

/// PyTorch (transformers) on the same GPU and the same prompt ids, in `dtype`.
fn torch(
    path: &Path,
    prompts: &[Vec<Vec<u32>>; 2],
    n_gen: usize,
    dtype: &str,
) -> Option<Reference> {
    let ids = std::env::temp_dir().join(format!("crosslm-bench-ids-{}.json", std::process::id()));
    let body = serde_json::json!({ "b1": prompts[0], "b16": prompts[1] });
    std::fs::write(&ids, body.to_string()).ok()?;
    let args = [
        path.display().to_string(),
        "--ids".into(),
        ids.display().to_string(),
        "--gen".into(),
        n_gen.to_string(),
        "--dtype".into(),
        dtype.into(),
    ];
    let v = run_reference("PyTorch", "transformers, gguf", "llm_torch.py", &args);
    let _ = std::fs::remove_file(&ids);
    let v = v?;
    let short = if dtype == "float32" { "f32" } else { "bf16" };
    Some(Reference {
        name: format!("PyTorch {short}"),
        b1: figures(&v, "b1"),
        b16: figures(&v, "b16"),
        peak_rss_mib: None,
        note: format!(
            "PyTorch {short}: torch {} on {}, peak GPU memory {:.0} MiB",
            v["torch"].as_str().unwrap_or("?"),
            v["device"].as_str().unwrap_or("?"),
            v["peak_gpu_mib"].as_f64().unwrap_or(f64::NAN)
        ),
        tokens: v["b1"]["tokens"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_u64())
                    .map(|t| t as u32)
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// The GGUF file to measure: `CROSSLM_BENCH_MODEL` = `smollm2` (default), `qwen2`, or a path.
/// Where the LLM runs: `CROSSLM_BENCH_DEVICE` (cpu by default: the bench's figures are the
/// CPU's unless a GPU is asked for).
fn placement() -> Result<Placement, String> {
    let choice = match std::env::var("CROSSLM_BENCH_DEVICE") {
        Ok(v) => v.parse::<DeviceChoice>().map_err(|e| e.to_string())?,
        Err(_) => DeviceChoice::Cpu,
    };
    device::resolve(choice).map_err(|e| e.to_string())
}

fn main() {
    let path = model_path();
    if !path.is_file() {
        eprintln!("missing {}: run scripts/fetch-assets.sh", path.display());
        std::process::exit(1);
    }
    let placement = match placement() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("CROSSLM_BENCH_DEVICE: {e}");
            std::process::exit(1);
        }
    };
    let prompt_len = env_usize("CROSSLM_BENCH_PROMPT", 128);
    let n_gen = env_usize("CROSSLM_BENCH_GEN", 32);
    let t = Instant::now();
    let llm = match Llm::load(&path, &placement.device()) {
        Ok(llm) => llm,
        Err(e) => {
            eprintln!("loading {}: {e}", path.display());
            std::process::exit(1);
        }
    };
    println!(
        "loaded {} on {placement} in {:.1}s",
        path.display(),
        t.elapsed().as_secs_f64()
    );
    let on_cpu = placement == Placement::Cpu;
    if on_cpu {
        // Warm-up (allocator, thread pool).
        run(&llm, 1, 8, 2);
    } else {
        // A GPU backend compiles (and autotunes) kernels per shape on first use: warm up on the
        // measured shapes, as the reference does.
        run(&llm, 1, prompt_len, n_gen);
        run(&llm, 16, prompt_len, n_gen);
    }
    // Ours and the reference take turns, round after round: on a shared machine the speed
    // moves by tens of percent within a minute, so a ratio is taken per round (both sides
    // measured moments apart) and the table shows the median round.
    let rounds = env_usize("CROSSLM_BENCH_ROUNDS", if on_cpu { 3 } else { 1 }).max(1);
    let mut ours: Vec<[Figures; 2]> = Vec::new();
    let mut greedy = Vec::new();
    let mut per_round: Vec<Vec<Reference>> = Vec::new();
    for round in 0..rounds {
        let (b1, first) = run(&llm, 1, prompt_len, n_gen);
        let (b16, _) = run(&llm, 16, prompt_len, n_gen);
        if round == 0 {
            greedy = first;
        }
        ours.push([b1, b16]);
        per_round.push(if on_cpu {
            llamacpp(&path, prompt_len, n_gen).into_iter().collect()
        } else {
            let ids = [prompts(&llm, 1, prompt_len), prompts(&llm, 16, prompt_len)];
            ["float32", "bfloat16"]
                .into_iter()
                .filter_map(|dtype| torch(&path, &ids, n_gen, dtype))
                .collect()
        });
        if rounds > 1 {
            eprintln!(
                "round {}/{rounds}: crosslm generate {:.1} / {:.1} tokens/s (batch 1 / 16){}",
                round + 1,
                b1.generate,
                b16.generate,
                per_round[round]
                    .iter()
                    .map(|r| format!("; {} {:.1} / {:.1}", r.name, r.b1.generate, r.b16.generate))
                    .collect::<String>()
            );
        }
    }
    let rss = peak_rss_mib();
    let work = round_work(&llm);
    // A reference counts where every round has it.
    let references: Vec<&Reference> = per_round[0]
        .iter()
        .filter(|r| {
            per_round
                .iter()
                .all(|rs| rs.iter().any(|x| x.name == r.name))
        })
        .collect();
    let same = |name: &str, round: usize| per_round[round].iter().find(|r| r.name == name);
    let engine = if llm.cpu_model().is_some() {
        "quantized CPU decoder".to_string()
    } else {
        format!("burn decoder (f32) on {placement}")
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
    if references.is_empty() {
        println!("no reference ran: figures below have no ratio");
    }
    let columns: Vec<Option<&Reference>> = if references.is_empty() {
        vec![None]
    } else {
        references.iter().copied().map(Some).collect()
    };
    if rounds > 1 {
        println!(
            "({rounds} rounds, each side's turn moments apart: medians, and the range of the \
             rounds' ratios)"
        );
    }
    type Pick = fn(&[Figures; 2]) -> f64;
    let rows: [(&str, Pick); 4] = [
        ("prefill, batch 1", |f| f[0].prefill),
        ("generate, batch 1", |f| f[0].generate),
        ("prefill, batch 16", |f| f[1].prefill),
        ("generate, batch 16", |f| f[1].generate),
    ];
    for reference in columns {
        let name = reference.map_or("-", |r| r.name.as_str());
        println!(
            "{:<22} {:>12} {:>12} {:>8} {:>12}",
            "tokens/s", "crosslm", name, "ratio", "range"
        );
        for (row, pick) in rows {
            let mine = median(ours.iter().map(pick).collect());
            let Some(r) = reference else {
                println!("{row:<22} {mine:>12.1} {:>12} {:>8}", "-", "-");
                continue;
            };
            let theirs: Vec<f64> = (0..rounds)
                .filter_map(|k| same(&r.name, k))
                .map(|x| pick(&[x.b1, x.b16]))
                .collect();
            let ratios: Vec<f64> = ours.iter().zip(&theirs).map(|(o, t)| pick(o) / t).collect();
            let (lo, hi) = ratios
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                    (a.min(x), b.max(x))
                });
            println!(
                "{row:<22} {mine:>12.1} {:>12.1} {:>8.2} {:>12}",
                median(theirs),
                median(ratios),
                if rounds > 1 {
                    format!("{lo:.2}-{hi:.2}")
                } else {
                    String::new()
                }
            );
        }
        let their_rss = reference.and_then(|r| {
            (0..rounds)
                .filter_map(|k| same(&r.name, k).and_then(|x| x.peak_rss_mib))
                .reduce(f64::max)
        });
        match their_rss {
            Some(t) => println!(
                "{:<22} {rss:>12.1} {t:>12.1} {:>8.2}",
                "peak RSS MiB",
                rss / t
            ),
            None => println!("{:<22} {rss:>12.1} {:>12} {:>8}", "peak RSS MiB", "-", "-"),
        }
        if let Some(r) = reference {
            println!("({})", r.note);
            if !r.tokens.is_empty() {
                let agree = greedy
                    .iter()
                    .zip(&r.tokens)
                    .take_while(|(a, b)| a == b)
                    .count();
                println!(
                    "(greedy tokens at batch 1: the first {agree} of {} agree)",
                    greedy.len().min(r.tokens.len())
                );
            }
        }
    }
    println!("(ratio = crosslm / reference; > 1 means crosslm is faster, or uses more memory)");
    match work {
        Ok((classify, perplexity)) => {
            println!("MR classification, sentences/s   {classify:>8.1}");
            println!("NYT perplexity, scored tokens/s  {perplexity:>8.1}");
        }
        Err(e) => println!("round work not measured: {e}"),
    }
}

/// The middle value (the mean of the middle two for an even count); NaN for none.
/// Which SIMD the kernels use, and which the CPU offers.
fn simd_note() -> String {
    format!("kernels {}, {}", crosslm_sdk::quant::kernels(), cpu_simd())
}

/// Which SIMD the CPU offers.
fn cpu_simd() -> String {
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
