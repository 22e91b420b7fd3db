//! What the LLM benches share: the model they load, the Python of the references, medians.

use std::path::PathBuf;

use crosslm_coordinator::llm::{qwen2_gguf_path, smollm2_gguf_path};

/// `CROSSLM_BENCH_MODEL`: `smollm2` (default), `qwen2` or a GGUF path.
pub fn model_path() -> PathBuf {
    match std::env::var("CROSSLM_BENCH_MODEL").as_deref() {
        Ok("qwen2") => qwen2_gguf_path(),
        Ok("smollm2") | Err(_) => smollm2_gguf_path(),
        Ok(other) => PathBuf::from(other),
    }
}

/// The Python with the references installed: `CROSSLM_BENCH_PYTHON`, else the venv that
/// `scripts/bench/setup.sh` makes, else `python3`.
pub fn reference_python() -> String {
    if let Ok(p) = std::env::var("CROSSLM_BENCH_PYTHON") {
        return p;
    }
    let venv = std::env::var("HOME").map(|h| format!("{h}/.cache/crosslm/venv/bin/python"));
    match venv {
        Ok(v) if std::path::Path::new(&v).is_file() => v,
        _ => "python3".into(),
    }
}

pub fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}
