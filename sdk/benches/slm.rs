//! MiniLM throughput: training and scoring samples/s (MR sentences, seq <= 64, batch 32) on
//! burn Flex (CPU), burn wgpu (a GPU, or Mesa lavapipe on CPU-only machines), and PyTorch on
//! the same CPU in the same run (`scripts/bench/slm_torch.py`, skipped if `import torch` fails);
//! and the light bag model on Flex (`bag`, no reference: PyTorch has no such model here).
//!
//! `cargo bench -p crosslm-sdk --bench slm`. Environment:
//! - `SLM_BENCH_STEPS` (default 6) timed training steps on CPU backends, after one warmup step;
//! - `SLM_BENCH_WGPU_STEPS` (default 1; lavapipe runs ~1 GFLOP/s) timed steps on wgpu;
//! - `SLM_BENCH_SCORE_PASSES` (default 5) timed passes over the scored batches (one pass is
//!   about half a second on two CPU cores, short enough for a neighbour's burst to halve it);
//! - `SLM_BENCH_PYTHON` (default `/root/.cache/crosslm/venv/bin/python`, then `python3`);
//! - `SLM_BENCH_BACKENDS` (default `flex,wgpu,torch,bag`);
//! - `SLM_BENCH_ROUNDS` (default 3) rounds of every backend, each ratio taken within a round
//!   (the table: medians, and the range of the rounds' ratios).
//!
//! Scoring on Flex is what `predict_proba` runs there, the CPU kernels (16-bit codes, no
//! padding); a second row times burn's f32 forward on the same batches.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crosslm_sdk::data::{BadRows, assets_dir, load_mr};
use crosslm_sdk::slm::{
    Backend, Bag, Classifier, MiniLm, Slm, TextClassifier, TrainConfig, TrainExample,
    wgpu_available,
};

const BATCH: usize = 32;
const MAX_LEN: usize = 64;

struct Row {
    backend: String,
    train: Option<f64>,
    score: Option<f64>,
    note: String,
}

impl Row {
    /// A backend that did not run, and why.
    fn failed(backend: &str, note: impl Into<String>) -> Row {
        Row {
            backend: backend.into(),
            train: None,
            score: None,
            note: note.into(),
        }
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// MiniLM on `backend`: [`bench_model`], burn's own forward timed too on Flex.
fn bench_burn(
    backend: Backend,
    texts: &[String],
    steps: usize,
) -> Result<(f64, f64, Option<f64>), String> {
    let model_dir = assets_dir().join("minilm");
    let slm = MiniLm::from_pretrained(
        &model_dir,
        vec!["neg".into(), "pos".into()],
        MAX_LEN,
        backend,
    )
    .map_err(|e| e.to_string())?;
    bench_model(slm, texts, steps, backend == Backend::Flex)
}

/// Trains `steps` timed batches after one warmup batch, then scores `steps` batches (and, with
/// `burn_too`, scores them again through burn's forward).
fn bench_model<M: Classifier>(
    mut slm: TextClassifier<M>,
    texts: &[String],
    steps: usize,
    burn_too: bool,
) -> Result<(f64, f64, Option<f64>), String> {
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
    let passes = score_passes();
    let start = Instant::now();
    for _ in 0..passes {
        slm.predict_proba_batched(&score_texts[BATCH..], BATCH)
            .map_err(|e| e.to_string())?;
    }
    let score = (passes * (score_texts.len() - BATCH)) as f64 / start.elapsed().as_secs_f64();
    let burn = if burn_too {
        slm.predict_proba_burn(&score_texts[..BATCH], BATCH)
            .map_err(|e| e.to_string())?;
        let start = Instant::now();
        for _ in 0..passes {
            slm.predict_proba_burn(&score_texts[BATCH..], BATCH)
                .map_err(|e| e.to_string())?;
        }
        Some((passes * (score_texts.len() - BATCH)) as f64 / start.elapsed().as_secs_f64())
    } else {
        None
    };
    Ok((report.train_samples_per_sec, score, burn))
}

fn score_passes() -> usize {
    env_usize("SLM_BENCH_SCORE_PASSES", 5).max(1)
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
            "--score-passes",
            &score_passes().to_string(),
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
            "torch {} threads {} {}",
            v["torch"].as_str().unwrap_or("?"),
            v["threads"],
            v["simd"].as_str().unwrap_or("?")
        ),
    ))
}

fn main() {
    let steps = env_usize("SLM_BENCH_STEPS", 6);
    let wgpu_steps = env_usize("SLM_BENCH_WGPU_STEPS", 1);
    let backends =
        std::env::var("SLM_BENCH_BACKENDS").unwrap_or_else(|_| "flex,wgpu,torch,bag".into());
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

    let rounds = env_usize("SLM_BENCH_ROUNDS", 3).max(1);
    // One table of rows a round; each round runs every backend, so that each ratio compares
    // runs moments apart.
    let mut tables: Vec<Vec<Row>> = Vec::new();
    for round in 0..rounds {
        let mut rows = Vec::new();
        for name in backends.split(',') {
            eprintln!(
                "slm bench: round {}/{rounds}: running {name} ...",
                round + 1
            );
            let row = match name.trim() {
                "flex" => match bench_burn(Backend::Flex, &texts, steps) {
                    Ok((t, s, burn)) => {
                        rows.push(Row {
                            backend: "burn flex (CPU)".into(),
                            train: Some(t),
                            score: Some(s),
                            note: format!(
                                "{steps} steps; scoring on the CPU kernels ({})",
                                crosslm_sdk::quant::kernels()
                            ),
                        });
                        Row {
                            backend: "  f32 forward".into(),
                            train: None,
                            score: burn,
                            note: "scoring through burn (CROSSLM_SLM_SCORING=burn)".into(),
                        }
                    }
                    Err(e) => Row::failed("burn flex (CPU)", e),
                },
                "wgpu" if !wgpu_available() => Row::failed(
                    "burn wgpu",
                    "SKIPPED: no wgpu adapter (install mesa-vulkan-drivers libvulkan1)",
                ),
                "wgpu" => match bench_burn(Backend::Wgpu, &texts, wgpu_steps) {
                    Ok((t, s, _)) => Row {
                        backend: "burn wgpu".into(),
                        train: Some(t),
                        score: Some(s),
                        note: format!("{wgpu_steps} steps"),
                    },
                    Err(e) => Row::failed("burn wgpu", e),
                },
                "torch" => match bench_torch(&texts_json, steps) {
                    Ok((t, s, note)) => Row {
                        backend: "pytorch (CPU)".into(),
                        train: Some(t),
                        score: Some(s),
                        note,
                    },
                    Err(e) => Row::failed(
                        "pytorch (CPU)",
                        format!("skipped: {}", e.lines().last().unwrap_or_default()),
                    ),
                },
                "bag" => {
                    let bag = Bag::new(
                        &assets_dir().join("minilm/tokenizer.json"),
                        vec!["neg".into(), "pos".into()],
                        MAX_LEN,
                        Backend::Flex,
                    )
                    .map_err(|e| e.to_string())
                    .and_then(|bag| bench_model(bag, &texts, steps, false));
                    match bag {
                        Ok((t, s, _)) => Row {
                            backend: "bag, burn flex".into(),
                            train: Some(t),
                            score: Some(s),
                            note: format!("{steps} steps; no reference"),
                        },
                        Err(e) => Row::failed("bag, burn flex", e),
                    }
                }
                other => Row::failed(other, "unknown backend"),
            };
            rows.push(row);
        }
        for r in &rows {
            eprintln!(
                "round {}/{rounds}: {} train {:?} score {:?}",
                round + 1,
                r.backend.trim(),
                r.train.map(|v| (v * 10.0).round() / 10.0),
                r.score.map(|v| (v * 10.0).round() / 10.0)
            );
        }
        tables.push(rows);
    }
    let _ = std::fs::remove_dir_all(&dir);

    let Some(first) = tables.first() else {
        return;
    };
    // Per round, PyTorch's (train, score) of that round.
    let torch: Vec<Option<(f64, f64)>> = tables
        .iter()
        .map(|rows| {
            rows.iter()
                .find(|r| r.backend.starts_with("pytorch"))
                .and_then(|r| r.train.zip(r.score))
        })
        .collect();
    println!("\nMiniLM-L6 (22.7M params), MR sentences, batch {BATCH}, seq <= {MAX_LEN}");
    println!(
        "({rounds} rounds, every backend each round: medians, and the range of the rounds' ratios)"
    );
    println!(
        "{:<18} {:>10} {:>10} {:>18} {:>18}  note",
        "backend", "train/s", "score/s", "train/pt", "score/pt"
    );
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    for (i, r) in first.iter().enumerate() {
        let of = |f: fn(&Row) -> Option<f64>| -> Vec<f64> {
            tables
                .iter()
                .filter_map(|rows| rows.get(i).and_then(f))
                .collect()
        };
        // PyTorch runs MiniLM only: no ratio for the bag model.
        let ratios = |f: fn(&Row) -> Option<f64>, pick: fn((f64, f64)) -> f64| -> String {
            if r.backend.starts_with("bag") {
                return "-".into();
            }
            let v: Vec<f64> = tables
                .iter()
                .zip(&torch)
                .filter_map(|(rows, t)| {
                    let v = rows.get(i).and_then(f)?;
                    let b = pick((*t)?);
                    (b > 0.0).then(|| v / b)
                })
                .collect();
            match (
                median(&v),
                v.iter().copied().reduce(f64::min),
                v.iter().copied().reduce(f64::max),
            ) {
                (Some(m), Some(lo), Some(hi)) => format!("{m:.2}x ({lo:.2}-{hi:.2})"),
                _ => "-".into(),
            }
        };
        println!(
            "{:<18} {:>10} {:>10} {:>18} {:>18}  {}",
            r.backend,
            fmt(median(&of(|r| r.train))),
            fmt(median(&of(|r| r.score))),
            ratios(|r| r.train, |t| t.0),
            ratios(|r| r.score, |t| t.1),
            r.note
        );
    }
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}
