//! MiniLM throughput: training and scoring samples/s (MR sentences, seq <= 64, batch 32) on
//! burn Flex (CPU), burn wgpu (a GPU, or Mesa lavapipe on CPU-only machines), and PyTorch on
//! the same CPU in the same run (`scripts/bench/slm_torch.py`, skipped if `import torch` fails).
//!
//! `cargo bench -p crosslm-sdk --bench slm`. Environment:
//! - `SLM_BENCH_STEPS` (default 6) timed training steps on CPU backends, after one warmup step;
//! - `SLM_BENCH_WGPU_STEPS` (default 1; lavapipe runs ~1 GFLOP/s) timed steps on wgpu;
//! - `SLM_BENCH_PYTHON` (default `/root/.cache/crosslm/venv/bin/python`, then `python3`);
//! - `SLM_BENCH_BACKENDS` (default `flex,wgpu,torch`).
//!
//! Scoring on Flex is what `predict_proba` runs there, the CPU kernels (8-bit weights, no
//! padding); a second row times burn's f32 forward on the same batches.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crosslm_sdk::data::{BadRows, assets_dir, load_mr};
use crosslm_sdk::slm::{Backend, MiniLm, Slm, TrainConfig, TrainExample, wgpu_available};

const BATCH: usize = 32;
const MAX_LEN: usize = 64;

struct Row {
    backend: String,
    train: Option<f64>,
    score: Option<f64>,
    note: String,
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Trains `steps` timed batches after one warmup batch, then scores `steps` batches (and, on
/// Flex, scores them again through burn's forward).
fn bench_burn(
    backend: Backend,
    texts: &[String],
    steps: usize,
) -> Result<(f64, f64, Option<f64>), String> {
    let model_dir = assets_dir().join("minilm");
    let mut slm = MiniLm::from_pretrained(
        &model_dir,
        vec!["neg".into(), "pos".into()],
        MAX_LEN,
        backend,
    )
    .map_err(|e| e.to_string())?;
    let examples: Vec<TrainExample> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| TrainExample::hard(t.clone(), i % 2, 2))
        .collect();
    let cfg = TrainConfig {
        epochs: 1,
        batch_size: BATCH,
        validation_fraction: 0.0,
        ..TrainConfig::default()
    };
    // Warmup: one batch (allocators, kernel compilation on wgpu).
    slm.train(&examples[..BATCH], &cfg, &mut |_| {})
        .map_err(|e| e.to_string())?;
    let timed = &examples[BATCH..BATCH * (steps + 1)];
    let report = slm
        .train(timed, &cfg, &mut |_| {})
        .map_err(|e| e.to_string())?;

    let score_texts: Vec<&str> = texts[..BATCH * (steps + 1)]
        .iter()
        .map(String::as_str)
        .collect();
    slm.predict_proba_batched(&score_texts[..BATCH], BATCH)
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    slm.predict_proba_batched(&score_texts[BATCH..], BATCH)
        .map_err(|e| e.to_string())?;
    let score = (score_texts.len() - BATCH) as f64 / start.elapsed().as_secs_f64();
    let burn = if backend == Backend::Flex {
        slm.predict_proba_burn(&score_texts[..BATCH], BATCH)
            .map_err(|e| e.to_string())?;
        let start = Instant::now();
        slm.predict_proba_burn(&score_texts[BATCH..], BATCH)
            .map_err(|e| e.to_string())?;
        Some((score_texts.len() - BATCH) as f64 / start.elapsed().as_secs_f64())
    } else {
        None
    };
    Ok((report.train_samples_per_sec, score, burn))
}

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("SLM_BENCH_PYTHON") {
        return p.into();
    }
    let venv = Path::new("/root/.cache/crosslm/venv/bin/python");
    if venv.exists() {
        venv.into()
    } else {
        "python3".into()
    }
}

fn bench_torch(texts_json: &Path, steps: usize) -> Result<(f64, f64, String), String> {
    let py = python();
    let ok = Command::new(&py)
        .args(["-c", "import torch, tokenizers, safetensors"])
        .output();
    if !ok.as_ref().is_ok_and(|o| o.status.success()) {
        return Err(format!(
            "{} cannot import torch/tokenizers/safetensors",
            py.display()
        ));
    }
    let script = crosslm_sdk::data::workspace_root().join("scripts/bench/slm_torch.py");
    let out = Command::new(&py)
        .arg(&script)
        .arg(assets_dir().join("minilm"))
        .arg(texts_json)
        .args([
            "--batch",
            &BATCH.to_string(),
            "--max-len",
            &MAX_LEN.to_string(),
        ])
        .args([
            "--train-steps",
            &steps.to_string(),
            "--score-batches",
            &steps.to_string(),
        ])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(last).map_err(|e| format!("{e}: {last}"))?;
    let num = |k: &str| v[k].as_f64().ok_or(format!("no {k} in {last}"));
    Ok((
        num("train_samples_per_sec")?,
        num("score_samples_per_sec")?,
        format!(
            "torch {} threads {}",
            v["torch"].as_str().unwrap_or("?"),
            v["threads"]
        ),
    ))
}

fn main() {
    let steps = env_usize("SLM_BENCH_STEPS", 6);
    let wgpu_steps = env_usize("SLM_BENCH_WGPU_STEPS", 1);
    let backends = std::env::var("SLM_BENCH_BACKENDS").unwrap_or_else(|_| "flex,wgpu,torch".into());
    let mr = assets_dir().join("data/mr/movieReviewSnippets_GroundTruth.txt");
    let data = match load_mr(&mr, BadRows::Skip) {
        Ok(l) => l.dataset,
        Err(e) => {
            eprintln!("slm bench: cannot load MR data ({e}); run the asset fetch script");
            return;
        }
    };
    let texts: Vec<String> = data
        .examples
        .iter()
        .take(BATCH * (steps.max(wgpu_steps) + 1))
        .map(|e| e.text.clone())
        .collect();
    let dir = std::env::temp_dir().join(format!("crosslm-slm-bench-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let texts_json = dir.join("texts.json");
    let _ = std::fs::write(&texts_json, serde_json::to_vec(&texts).unwrap_or_default());

    let mut rows = Vec::new();
    for name in backends.split(',') {
        eprintln!("slm bench: running {name} ...");
        let row = match name.trim() {
            "flex" => match bench_burn(Backend::Flex, &texts, steps) {
                Ok((t, s, burn)) => {
                    rows.push(Row {
                        backend: "burn flex (CPU)".into(),
                        train: Some(t),
                        score: Some(s),
                        note: format!("{steps} steps; scoring on the CPU kernels"),
                    });
                    Row {
                        backend: "  f32 forward".into(),
                        train: None,
                        score: burn,
                        note: "scoring through burn (CROSSLM_SLM_SCORING=burn)".into(),
                    }
                }
                Err(e) => Row {
                    backend: "burn flex (CPU)".into(),
                    train: None,
                    score: None,
                    note: e,
                },
            },
            "wgpu" if !wgpu_available() => Row {
                backend: "burn wgpu".into(),
                train: None,
                score: None,
                note: "SKIPPED: no wgpu adapter (install mesa-vulkan-drivers libvulkan1)".into(),
            },
            "wgpu" => match bench_burn(Backend::Wgpu, &texts, wgpu_steps) {
                Ok((t, s, _)) => Row {
                    backend: "burn wgpu".into(),
                    train: Some(t),
                    score: Some(s),
                    note: format!("{wgpu_steps} steps"),
                },
                Err(e) => Row {
                    backend: "burn wgpu".into(),
                    train: None,
                    score: None,
                    note: e,
                },
            },
            "torch" => match bench_torch(&texts_json, steps) {
                Ok((t, s, note)) => Row {
                    backend: "pytorch (CPU)".into(),
                    train: Some(t),
                    score: Some(s),
                    note,
                },
                Err(e) => Row {
                    backend: "pytorch (CPU)".into(),
                    train: None,
                    score: None,
                    note: format!("skipped: {}", e.lines().last().unwrap_or_default()),
                },
            },
            other => Row {
                backend: other.into(),
                train: None,
                score: None,
                note: "unknown backend".into(),
            },
        };
        rows.push(row);
    }
    let _ = std::fs::remove_dir_all(&dir);

    let torch = rows
        .iter()
        .find(|r| r.backend.starts_with("pytorch"))
        .and_then(|r| r.train.zip(r.score));
    println!("\nMiniLM-L6 (22.7M params), MR sentences, batch {BATCH}, seq <= {MAX_LEN}");
    println!(
        "{:<18} {:>12} {:>12} {:>10} {:>10}  note",
        "backend", "train/s", "score/s", "train/pt", "score/pt"
    );
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let ratio = |v: Option<f64>, base: Option<f64>| match (v, base) {
        (Some(v), Some(b)) if b > 0.0 => format!("{:.2}x", v / b),
        _ => "-".into(),
    };
    for r in &rows {
        println!(
            "{:<18} {:>12} {:>12} {:>10} {:>10}  {}",
            r.backend,
            fmt(r.train),
            fmt(r.score),
            ratio(r.train, torch.map(|t| t.0)),
            ratio(r.score, torch.map(|t| t.1)),
            r.note
        );
    }
}
