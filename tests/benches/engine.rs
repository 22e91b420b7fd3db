//! One round's generation on a serving engine against the in-process LLM: the same task
//! (examples/tasks/mr.toml), the same prompts, seeds and sampling settings, SmolLM2 on both
//! (llama-cpp-python's server over HTTP on 127.0.0.1; burn's quantized CPU decoder in
//! process). Prints samples/s for each and the ratio. Runs llama-cpp-python's server when
//! CROSSLM_ENGINE_PYTHON is set (scripts/test-engine.sh) and vLLM (the GGUF's weights in f32, up
//! to 16 requests in flight, which it batches) when CROSSLM_VLLM_PYTHON and CROSSLM_VLLM_MODEL
//! are (scripts/test-vllm.sh); at least one of them.
//!
//! `cargo bench --workspace --bench engine [-- PER_LABEL]` (default 32 per label)

use std::time::{Duration, Instant};

use crosslm_coordinator::generator::{Generator, LlmGenerator};
use crosslm_coordinator::serving::EngineGenerator;
use crosslm_coordinator::task::TaskSpec;
use crosslm_tests::{EngineProcess, engine_client, engine_gguf, free_tcp_port};

fn main() {
    let per_label: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(32);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let spec = TaskSpec::from_toml_file(root.join("examples/tasks/mr.toml")).unwrap();
    let task = spec.info();
    let dir = tempfile::tempdir().unwrap();

    let mut rows = Vec::new();
    let mut engines: Vec<(&str, Vec<usize>)> = Vec::new();
    if std::env::var_os("CROSSLM_ENGINE_PYTHON").is_some() {
        engines.push(("llama-cpp-python server", vec![1, 2]));
    }
    if std::env::var_os("CROSSLM_VLLM_PYTHON").is_some() {
        engines.push(("vLLM, CPU build, f32", vec![1, 16]));
    }
    assert!(
        !engines.is_empty(),
        "set CROSSLM_ENGINE_PYTHON and/or CROSSLM_VLLM_PYTHON (scripts/test-engine.sh, scripts/test-vllm.sh)"
    );
    for (name, concurrencies) in engines {
        let port = free_tcp_port();
        let log = dir.path().join("engine.log");
        let engine = if name.starts_with("vLLM") {
            EngineProcess::vllm(port, 8, &log)
        } else {
            EngineProcess::start(port, &log)
        };
        let client = engine_client(port, Duration::from_secs(300));
        for concurrency in concurrencies {
            let mut g = EngineGenerator::new(
                client.clone(),
                "smollm2".into(),
                spec.clone(),
                1,
                concurrency,
            );
            let t = Instant::now();
            let n = g.generate(&task, per_label, 1).unwrap().len();
            rows.push((
                format!("engine ({name}, {concurrency} in flight)"),
                n,
                t.elapsed().as_secs_f64(),
            ));
        }
        drop(engine);
    }

    let llm =
        crosslm_coordinator::llm::Llm::load(engine_gguf(), &burn::tensor::Device::flex()).unwrap();
    let mut g = LlmGenerator::new(llm, spec, 1);
    let t = Instant::now();
    let n = g.generate(&task, per_label, 1).unwrap().len();
    rows.push((
        "in process (burn, quantized CPU decoder)".into(),
        n,
        t.elapsed().as_secs_f64(),
    ));

    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("One round's generation, {per_label} per label, SmolLM2-135M Q4_1, {cpus} CPUs\n");
    println!("| path | samples | seconds | samples/s |");
    println!("|---|---|---|---|");
    for (name, n, s) in &rows {
        println!("| {name} | {n} | {s:.1} | {:.2} |", *n as f64 / s);
    }
    let rate = |r: &(String, usize, f64)| r.1 as f64 / r.2;
    let (in_process, engines) = rows.split_last().expect("rows");
    let best_engine = engines.iter().map(rate).fold(0.0, f64::max);
    println!(
        "\nin process / engine (best): {:.2}x",
        rate(in_process) / best_engine
    );
}
