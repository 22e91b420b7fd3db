//! The LLM side on a serving engine that teams already run (vLLM, llama.cpp's server): the
//! engine writes each round's samples through its OpenAI-compatible API, and CrossLM keeps its
//! own part, the rounds, the aggregation and the LoRA tuning from feedback.
//!
//! The tuning needs the base model's weights, so the coordinator holds the same base as a
//! GGUF file ([`EngineGenerator::with_local`]): it tunes adapters on it and measures it as the
//! in-process generator does, then exports each round's adapter in PEFT's layout
//! ([`crate::llm::peft`]). With [`LoraSync::Runtime`] (vLLM) the adapter is loaded into the
//! engine under a per-round name and the previous one unloaded, so the next round generates
//! with the tuned model. Engines that load adapters only at start (llama.cpp's server) keep
//! generating with the frozen base ([`LoraSync::None`]); the exported adapters are there for a
//! restart with them.

pub mod openai;

use std::path::PathBuf;

use crosslm_sdk::protocol::{AggregatedScore, SyntheticSample, TaskInfo};
use serde::{Deserialize, Serialize};

pub use openai::{ChatSampling, EngineClient, EngineEndpoint, EngineError};

use crate::generator::{GeneratedSample, Generator, LlmGenerator, round_seed};
use crate::task::TaskSpec;
use crate::tuning::LlmReport;
use crate::{Error, Result};

/// How the round's adapter reaches the engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraSync {
    /// Not at all: the engine generates with its base model (adapters are still exported).
    #[default]
    None,
    /// vLLM's runtime endpoints: load `crosslm-r<round>`, unload the previous one.
    Runtime,
}

/// Generates with a serving engine; optionally tunes and measures a local copy of the base.
pub struct EngineGenerator {
    client: EngineClient,
    /// The engine's name of the base model.
    base_model: String,
    /// What generation asks for: the base, or the loaded adapter of the last tuned round.
    serving: String,
    spec: TaskSpec,
    seed: u64,
    concurrency: usize,
    local: Option<Local>,
}

/// The local copy of the base that learns from rounds.
struct Local {
    inner: LlmGenerator,
    /// Where round `r`'s PEFT adapter goes: `<dir>/round-<r>`.
    peft_dir: PathBuf,
    sync: LoraSync,
    /// A tuned round whose adapter the engine has not loaded yet (after a restart, or a
    /// load that failed): loaded before the next generation.
    pending: Option<u64>,
}

impl EngineGenerator {
    /// Generates with `model` on the engine behind `client`, `concurrency` requests at once.
    /// Round `r` samples with seeds from [`round_seed`], as the in-process generator does.
    pub fn new(
        client: EngineClient,
        model: String,
        spec: TaskSpec,
        seed: u64,
        concurrency: usize,
    ) -> Self {
        Self {
            client,
            serving: model.clone(),
            base_model: model,
            spec,
            seed,
            concurrency: concurrency.max(1),
            local: None,
        }
    }

    /// Tunes and measures `local` (the engine's base as GGUF, with its tuning and evaluator
    /// set up) from each round's feedback, exporting each tuned round's adapter under
    /// `peft_dir` and syncing it to the engine as `sync` says. After a restart, the last tuned
    /// round's adapter is exported and loaded again before the next generation.
    pub fn with_local(
        mut self,
        local: LlmGenerator,
        peft_dir: PathBuf,
        sync: LoraSync,
    ) -> Result<Self> {
        let pending = local.tuned_through();
        let mut l = Local {
            inner: local,
            peft_dir,
            sync,
            pending: None,
        };
        if let Some(round) = pending {
            l.export(round, &self.base_model)?;
            l.pending = Some(round);
        }
        self.local = Some(l);
        Ok(self)
    }

    /// Loads a pending adapter into the engine (vLLM) and switches generation to it.
    fn sync_adapter(&mut self) -> Result<()> {
        let Some(local) = self.local.as_mut() else {
            return Ok(());
        };
        let Some(round) = local.pending else {
            return Ok(());
        };
        if local.sync == LoraSync::None {
            local.pending = None;
            return Ok(());
        }
        let name = format!("crosslm-r{round}");
        let path = local.round_dir(round);
        let path = path
            .to_str()
            .ok_or_else(|| Error::Data(format!("adapter path {} is not UTF-8", path.display())))?;
        self.client
            .load_lora(&name, path)
            .map_err(|e| Error::Model(format!("loading adapter {name}: {e}")))?;
        tracing::info!(adapter = %name, "engine loaded the round's adapter");
        let previous = std::mem::replace(&mut self.serving, name);
        if previous != self.base_model
            && let Err(e) = self.client.unload_lora(&previous)
        {
            // Only memory on the engine: the new adapter is in use already.
            tracing::warn!(adapter = %previous, error = %e, "could not unload the previous adapter");
        }
        local.pending = None;
        Ok(())
    }
}

impl Local {
    fn round_dir(&self, round: u64) -> PathBuf {
        self.peft_dir.join(format!("round-{round}"))
    }

    fn export(&self, round: u64, base_model: &str) -> Result<()> {
        let dir = self.round_dir(round);
        self.inner.export_peft(&dir, base_model)?;
        tracing::info!(round, dir = %dir.display(), "adapter exported (PEFT)");
        Ok(())
    }
}

impl Generator for EngineGenerator {
    fn generate(
        &mut self,
        _task: &TaskInfo,
        n_per_label: usize,
        round: u64,
    ) -> Result<Vec<GeneratedSample>> {
        self.sync_adapter()?;
        let g = &self.spec.generation;
        let sampling = ChatSampling {
            temperature: g.temperature,
            top_p: g.top_p,
            top_k: g.top_k,
            max_tokens: g.max_new_tokens,
            seed: 0,
        };
        let seed = round_seed(self.seed, round);
        let started = std::time::Instant::now();
        let (client, model, workers) = (&self.client, self.serving.as_str(), self.concurrency);
        let out = crate::synthetic::label_conditioned(
            &self.spec,
            n_per_label,
            workers * 4,
            seed,
            |prompts, seed| {
                let answer = |i: usize| {
                    let s = ChatSampling {
                        seed: seed.wrapping_add(i as u64),
                        ..sampling.clone()
                    };
                    client.chat(model, &prompts[i], &s)
                };
                parallel(prompts.len(), workers, answer).map_err(Error::from)
            },
        )?;
        tracing::info!(
            round,
            model,
            samples = out.len(),
            secs = started.elapsed().as_secs_f32(),
            "engine generated samples"
        );
        Ok(out.into_iter().map(GeneratedSample::from).collect())
    }

    fn baseline(&mut self) -> Result<Option<LlmReport>> {
        match self.local.as_mut() {
            Some(l) => l.inner.baseline(),
            None => Ok(None),
        }
    }

    fn feedback(
        &mut self,
        round: u64,
        samples: &[SyntheticSample],
        scores: &[AggregatedScore],
    ) -> Result<Option<LlmReport>> {
        let Some(local) = self.local.as_mut() else {
            return Ok(None);
        };
        let report = local.inner.feedback(round, samples, scores)?;
        if report.as_ref().is_some_and(|r| r.tuned) {
            local.export(round, &self.base_model)?;
            local.pending = Some(round);
        }
        Ok(report)
    }
}

/// `f(0..n)` on up to `workers` threads, results in index order; the first error wins.
fn parallel<T: Send>(
    n: usize,
    workers: usize,
    f: impl Fn(usize) -> std::result::Result<T, EngineError> + Sync,
) -> std::result::Result<Vec<T>, EngineError> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut slots: Vec<Option<std::result::Result<T, EngineError>>> =
        (0..n).map(|_| None).collect();
    let results = std::sync::Mutex::new(&mut slots);
    std::thread::scope(|s| {
        for _ in 0..workers.min(n) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let r = f(i);
                    let failed = r.is_err();
                    results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
                    if failed {
                        // The batch fails anyway: stop taking work.
                        next.store(n, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let mut out = Vec::with_capacity(n);
    for r in slots {
        match r {
            Some(r) => out.push(r?),
            // Skipped after another request failed; that error is returned above or below.
            None => continue,
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_keeps_order_and_returns_the_error() {
        let out = parallel(10, 3, |i| Ok::<_, EngineError>(i * i)).unwrap();
        assert_eq!(out, (0..10).map(|i| i * i).collect::<Vec<_>>());
        let e = parallel(10, 3, |i| {
            if i == 4 {
                Err(EngineError::Malformed {
                    url: "u".into(),
                    reason: "bad".into(),
                })
            } else {
                Ok(i)
            }
        })
        .unwrap_err();
        assert!(e.to_string().contains("bad"));
    }
}
