//! LoRA tuning steps of the LLM beside PyTorch's on the same model and batch, on the CPU.
//!
//! One step of what a CrossLM round runs after its scores come back: adapters on the query and
//! value projections of the top blocks (the tuning's defaults: rank 8 on the top 10 blocks,
//! completions cut at 64 tokens), Adam, the weighted NLL of 8 chat prompts' completions of
//! 30-58 words, a batch not seen before each step. The reference, `scripts/bench/tuning_torch.py`, builds the same decoder in plain
//! PyTorch f32 from the same weights (dequantized from the GGUF file, written to a temporary
//! safetensors file), with the LM head on the scored positions only, and times the same steps;
//! it runs in the Python of `CROSSLM_BENCH_PYTHON` (default: the venv of
//! `scripts/bench/setup.sh`) on `CROSSLM_BENCH_THREADS` threads (default 2).
//!
//! `cargo bench --workspace --bench tuning` (env: `CROSSLM_BENCH_MODEL` = `smollm2` (default),
//! `qwen2` or a GGUF path; `CROSSLM_BENCH_ROUNDS` rounds of 3 steps a side, default 3). Prints
//! milliseconds a step, the ratio (PyTorch's time over ours: above 1, ours is faster) and each
//! side's first loss (the adapters start as a no-op, so both are the base model's loss).

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Instant;

use common::{env_usize, median, model_path, reference_python};

use burn::tensor::Device;
use crosslm_coordinator::llm::Llm;
use crosslm_coordinator::llm::train::{LoraTrainer, TrainExample, example_ids};
use crosslm_coordinator::tuning::TuningConfig;
use crosslm_sdk::data::workspace_root;

const STEPS: usize = 3;

/// Batch `j` of the run: 8 chat prompts asking for a review, completions of 30-58 words, their
/// words starting `j` further along a text, so that no step sees a sequence seen before (a
/// trainer keeps the frozen blocks' output of the sequences it has seen: a round's later epochs
/// reuse it, which this bench leaves out).
fn batch(llm: &Llm, j: usize) -> Vec<TrainExample> {
    let words: Vec<&str> = "the film opens on a quiet street where an old projectionist keeps a \
        cinema alive against the odds and the story that follows is funny sad and wise by turns \
        with a cast that never hits a false note even when the script leans on easy sentiment \
        in its last act which drags a little before an ending that lands"
        .split_whitespace()
        .collect();
    (0..8)
        .map(|i| TrainExample {
            prompt: llm
                .tokenizer
                .chat_prompt("Write a short movie review with a positive sentiment."),
            completion: words
                .iter()
                .cycle()
                .skip(i + 8 * j)
                .take(30 + 4 * i)
                .copied()
                .collect::<Vec<_>>()
                .join(" "),
            weight: 1.0,
        })
        .collect()
}

/// Writes the model's weights (f32, GGUF names), the decoder's shape and the batches' ids for
/// the reference into `dir`.
fn write_inputs(
    llm: &Llm,
    lora: &crosslm_coordinator::llm::train::LoraConfig,
    batches: &[Vec<TrainExample>],
    dir: &std::path::Path,
) -> Result<(), String> {
    let c = &llm.config;
    let cpu = llm
        .cpu_model()
        .ok_or("the bench needs the quantized CPU decoder")?;
    let mut names = vec!["token_embd.weight".to_string(), "output_norm.weight".into()];
    if !c.tied_head {
        names.push("output.weight".into());
    }
    for i in 0..c.n_layers {
        for f in [
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ] {
            names.push(format!("blk.{i}.{f}.weight"));
        }
        if c.qkv_bias() {
            for f in ["attn_q", "attn_k", "attn_v"] {
                names.push(format!("blk.{i}.{f}.bias"));
            }
        }
    }
    let mut tensors = HashMap::new();
    for name in names {
        let (shape, values) = cpu.weight(&name).map_err(|e| e.to_string())?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        tensors.insert(name, (shape, bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, (shape, bytes))| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    safetensors::serialize_to_file(views, None, &dir.join("weights.safetensors"))
        .map_err(|e| e.to_string())?;
    let config = serde_json::json!({
        "n_layers": c.n_layers, "d_model": c.d_model, "n_heads": c.n_heads,
        "n_kv_heads": c.n_kv_heads, "rms_eps": c.rms_eps, "rope_theta": c.rope_theta,
        "rope_halves": c.rope_halves(), "top_layers": lora.top_layers, "rank": lora.rank,
        "alpha": lora.alpha, "learning_rate": lora.learning_rate,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).map_err(|e| e.to_string())?;
    let mut all = Vec::new();
    for examples in batches {
        let (ids, completion): (Vec<Vec<u32>>, Vec<usize>) = examples
            .iter()
            .map(|e| example_ids(llm, e, lora))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?
            .into_iter()
            .unzip();
        all.push(serde_json::json!({ "ids": ids, "completion": completion }));
    }
    let body = serde_json::json!({ "batches": all, "pad": llm.tokenizer.eos_id });
    std::fs::write(dir.join("batches.json"), body.to_string()).map_err(|e| e.to_string())
}

fn main() -> Result<(), String> {
    let path = model_path();
    let llm = Llm::load(&path, &Device::flex()).map_err(|e| e.to_string())?;
    let lora = TuningConfig::default().lora;
    let rounds = env_usize("CROSSLM_BENCH_ROUNDS", 3);
    // The warm-up step's batch, then each round's.
    let batches: Vec<Vec<TrainExample>> = (0..1 + rounds * STEPS).map(|j| batch(&llm, j)).collect();

    let mut trainer = LoraTrainer::new(&llm, lora.clone(), 1);
    let ours_first = trainer.step(&llm, &batches[0]).map_err(|e| e.to_string())?;
    let mut ours = Vec::new();
    for r in 0..rounds {
        let t = Instant::now();
        for examples in &batches[1 + r * STEPS..1 + (r + 1) * STEPS] {
            trainer.step(&llm, examples).map_err(|e| e.to_string())?;
        }
        ours.push(t.elapsed().as_secs_f64() / STEPS as f64 * 1e3);
        println!("round {}/{rounds}: crosslm {:.0} ms a step", r + 1, ours[r]);
    }

    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    write_inputs(&llm, &lora, &batches, dir.path())?;
    let python = reference_python();
    let out = Command::new(&python)
        .arg(workspace_root().join("scripts/bench/tuning_torch.py"))
        .arg(dir.path().join("weights.safetensors"))
        .arg(dir.path().join("config.json"))
        .arg(dir.path().join("batches.json"))
        .args([
            "--rounds",
            &rounds.to_string(),
            "--steps",
            &STEPS.to_string(),
        ])
        .output()
        .map_err(|e| format!("running {python}: {e}"))?;
    let name = path
        .file_name()
        .map_or(String::new(), |n| n.to_string_lossy().into_owned());
    println!(
        "\n{name}: LoRA rank {} on q and v of the top {} blocks, {} examples, completions cut at {} tokens; crosslm: kernels {}, 2 threads",
        lora.rank,
        lora.top_layers,
        batches[0].len(),
        lora.max_completion_tokens,
        crosslm_sdk::quant::kernels()
    );
    if !out.status.success() {
        println!(
            "PyTorch reference failed (scripts/bench/setup.sh installs torch and safetensors):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!(
            "crosslm: {:.0} ms a step (median of {rounds} rounds)",
            median(ours)
        );
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    let torch: Vec<f64> = v["step_ms"]
        .as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
        .unwrap_or_default();
    let ratios: Vec<f64> = ours.iter().zip(&torch).map(|(o, t)| t / o).collect();
    let (lo, hi) = ratios
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), r| {
            (l.min(*r), h.max(*r))
        });
    println!("(medians of {rounds} rounds of {STEPS} steps, after one warm-up step each side)");
    println!("ms a step      crosslm    PyTorch    ratio        range");
    println!(
        "LoRA step    {:>9.0}  {:>9.0}  {:>7.2}    {lo:.2}-{hi:.2}",
        median(ours.clone()),
        median(torch),
        median(ratios)
    );
    println!(
        "first loss   {ours_first:>9.4}  {:>9.4}",
        v["first_loss"].as_f64().unwrap_or(f64::NAN)
    );
    println!(
        "(PyTorch {} f32, {} threads; ratio = PyTorch's time / ours: > 1 means crosslm is faster)",
        v["torch"].as_str().unwrap_or("?"),
        v["threads"]
    );
    Ok(())
}
