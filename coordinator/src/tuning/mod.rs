//! The LLM half of CrossLM: after a round, LoRA-tune the coordinator's LLM on the clients'
//! aggregated feedback, then measure it.
//!
//! Two kinds of training example come out of one scored sample whose quality (aggregated
//! probability of its intended label) clears `min_quality` (compared as its share against the
//! strongest rival label, [`AggregatedScore::rival_share`], which is the quality itself with
//! two labels):
//! - generation side: (the label's generation prompt -> the sample), weight = quality, so the
//!   LLM writes more like the samples the clients' SLMs found clearly on-label;
//! - task side: (classification prompt of the sample -> its intended label's verbalizer),
//!   weight = quality: the clients vouched that the sample carries the label it was written
//!   for, so the LLM learns to classify text like it. With `task_targets = "soft"` the target is
//!   the aggregated soft label instead (one example per label, weight = quality x soft label);
//!   with weak SLMs (60% accurate) those targets sit near uniform and teach little.
//!
//! The generation side trains only in the first `generation_epochs` passes, beside as many
//! general texts (rehearsal, plain language modelling) so that writing the task's samples does
//! not pull the LLM away from general text; the task side trains in every pass.
//!
//! The paper (arXiv 2312.05842) gives no code; these are our choices, each a [`TuningConfig`]
//! option. Evaluation ([`Evaluator`]) reports task accuracy on a labeled test split and
//! perplexity on held-out general text (is general ability kept?).

mod config;
mod eval;
mod select;
#[cfg(test)]
mod tests;

pub use config::*;
pub use eval::*;
pub use select::*;

use std::path::{Path, PathBuf};
use std::time::Instant;

use crosslm_sdk::protocol::{AggregatedScore, SyntheticSample};
use rand::SeedableRng;
use rand::seq::SliceRandom;

use crate::llm::Llm;
use crate::llm::train::{
    LoraTrainer, PreferencePair, TrainExample, load_adapters, reference_logprobs,
};
use crate::task::TaskSpec;
use crate::{Error, Result};

/// The LoRA trainers of the LLM's tuning: one shared by both sides, or one per side
/// ([`AdapterLayout`]).
pub struct Trainers {
    /// Trains the adapters the LLM writes with (with shared adapters, also classifies with).
    pub generation: LoraTrainer,
    /// The task side's own trainer (split adapters only).
    pub task: Option<LoraTrainer>,
}

impl Trainers {
    /// Fresh adapters laid out as `cfg` says (the model's output is unchanged until the
    /// first step).
    pub fn new(llm: &Llm, cfg: &TuningConfig) -> Self {
        let task = (cfg.experimental.adapters == AdapterLayout::Split)
            .then(|| LoraTrainer::new(llm, cfg.lora.clone(), cfg.seed.wrapping_add(1)));
        Self {
            generation: LoraTrainer::new(llm, cfg.lora.clone(), cfg.seed),
            task,
        }
    }

    /// The adapter files of `round` in `dir`: the generation side's (or shared) and the task
    /// side's own.
    pub fn files(dir: &Path, round: u64) -> (PathBuf, PathBuf) {
        (
            dir.join(format!("adapters-{round}.lora")),
            dir.join(format!("task-adapters-{round}.lora")),
        )
    }

    /// The newest round whose adapters are saved in `dir` (the generation side's file marks
    /// a round as saved), if any.
    pub fn latest_round(dir: &Path) -> Option<u64> {
        std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let round = name.strip_prefix("adapters-")?.strip_suffix(".lora")?;
                round.parse::<u64>().ok()
            })
            .max()
    }

    /// Removes `round`'s files from `dir` (older rounds are history; the newest are the
    /// state). Missing files are no error.
    pub fn remove(dir: &Path, round: u64) {
        let (gen_path, task_path) = Self::files(dir, round);
        let _ = std::fs::remove_file(gen_path);
        let _ = std::fs::remove_file(task_path);
    }

    /// The adapters [`Trainers::save`] left for `round` in `dir`, laid out as `cfg` says; a
    /// layout that does not match the files is an error (a state from another config).
    pub fn load(llm: &Llm, cfg: &TuningConfig, dir: &Path, round: u64) -> Result<Self> {
        let (gen_path, task_path) = Self::files(dir, round);
        let load = |path: &Path| -> Result<LoraTrainer> {
            let (adapters, lora) = load_adapters(path, &llm.config, &llm.device)?;
            Ok(LoraTrainer::from_adapters(adapters, lora, &llm.device))
        };
        let generation = load(&gen_path)?;
        let task = match (cfg.experimental.adapters, task_path.is_file()) {
            (AdapterLayout::Split, true) => Some(load(&task_path)?),
            (AdapterLayout::Shared, false) => None,
            (layout, _) => {
                return Err(Error::Model(format!(
                    "{}: the saved LLM adapters do not match [tuning.experimental] adapters = {layout:?} \
                     (split adapters keep a task-adapters-<round>.lora beside them); \
                     use the config the state was made with, or a fresh data dir",
                    dir.display()
                )));
            }
        };
        Ok(Self { generation, task })
    }

    /// Saves the adapters as `round`'s files in `dir` (see [`Trainers::files`]).
    pub fn save(&self, dir: &Path, round: u64) -> Result<()> {
        let (gen_path, task_path) = Self::files(dir, round);
        if let Some(t) = &self.task {
            t.save(&task_path)?;
        }
        // The generation side's file last: its presence marks the round as saved.
        self.generation.save(&gen_path)
    }

    /// Puts the current adapters into `llm` (`lora`, and `task_lora` when split).
    pub fn apply(&self, llm: &mut Llm) {
        llm.lora = self.generation.adapters();
        llm.task_lora = self.task.as_ref().and_then(LoraTrainer::adapters);
    }

    /// The trainer of the task side's examples.
    fn task_side(&mut self) -> &mut LoraTrainer {
        self.task.as_mut().unwrap_or(&mut self.generation)
    }
}

/// LoRA-tunes `llm` on a round's feedback (plus `rehearsal` general texts, see
/// [`TuningConfig::rehearsal`]) and leaves the new adapters in `llm` ([`Trainers::apply`]).
/// Returns the report's training fields.
#[allow(clippy::too_many_arguments)]
pub fn tune(
    llm: &mut Llm,
    trainers: &mut Trainers,
    spec: &TaskSpec,
    cfg: &TuningConfig,
    round: u64,
    samples: &[SyntheticSample],
    scores: &[AggregatedScore],
    rehearsal: &[String],
) -> Result<LlmReport> {
    let started = Instant::now();
    let mut report = LlmReport::new(round);
    let chat = |p: &str| llm.tokenizer.chat_prompt(p);
    let fb = feedback_examples(&chat, spec, cfg, samples, scores);
    let seed = cfg.seed.wrapping_add(round);
    let mut generation = fb.generation;
    generation.extend(rehearsal_examples(
        rehearsal,
        &generation,
        cfg.rehearsal,
        seed,
    ));
    if cfg.generation_epochs == 0 {
        generation.clear();
    }
    report.samples_used = fb.used;
    report.examples = generation.len() + fb.task.len();
    if report.examples == 0 {
        tracing::warn!(
            round,
            "no sample cleared the quality threshold; LLM not tuned"
        );
        return Ok(report);
    }
    let batch_size = cfg.batch_size.max(1);
    let pref = &cfg.experimental.preference;
    let pairs = if pref.enabled && cfg.generation_side && pref.epochs > 0 {
        preference_pairs(&chat, spec, pref, samples, scores)
    } else {
        Vec::new()
    };
    // The reference is the LLM as it enters the round (its adapters so far).
    let reference = reference_logprobs(llm, &pairs, &cfg.lora, batch_size)?;
    report.pairs = pairs.len();
    if !pairs.is_empty() {
        tracing::info!(round, pairs = pairs.len(), "LLM preference pairs");
    }
    // An epoch's work: batches of examples, and in the first `preference.epochs` passes
    // batches of pairs (half a batch: a pair is two sequences), in a shuffled order. With
    // split adapters each side's examples batch apart, for their own trainer.
    enum Batch {
        Examples(Vec<TrainExample>),
        TaskExamples(Vec<TrainExample>),
        Pairs(Vec<(PreferencePair, (f32, f32))>),
    }
    let split = trainers.task.is_some();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut epochs: Vec<Vec<Batch>> = Vec::new();
    for epoch in 0..cfg.epochs {
        let mut batches: Vec<Batch> = Vec::new();
        let mut examples = Vec::new();
        if split {
            let mut task = fb.task.clone();
            task.shuffle(&mut rng);
            batches.extend(
                task.chunks(batch_size)
                    .map(|c| Batch::TaskExamples(c.to_vec())),
            );
        } else {
            examples.extend(fb.task.iter().cloned());
        }
        if epoch < cfg.generation_epochs {
            examples.extend(generation.iter().cloned());
        }
        examples.shuffle(&mut rng);
        batches.extend(
            examples
                .chunks(batch_size)
                .map(|c| Batch::Examples(c.to_vec())),
        );
        if epoch < pref.epochs {
            let mut paired: Vec<_> = pairs
                .iter()
                .cloned()
                .zip(reference.iter().copied())
                .collect();
            paired.shuffle(&mut rng);
            batches.extend(
                paired
                    .chunks((batch_size / 2).max(1))
                    .map(|c| Batch::Pairs(c.to_vec())),
            );
        }
        batches.shuffle(&mut rng);
        epochs.push(batches);
    }
    let steps: usize = epochs.iter().map(Vec::len).sum();
    let mut step = 0;
    for batch in epochs.into_iter().flatten() {
        let (loss, kind) = match batch {
            Batch::Examples(b) => (trainers.generation.step(llm, &b)?, "samples"),
            Batch::TaskExamples(b) => (trainers.task_side().step(llm, &b)?, "task"),
            Batch::Pairs(b) => {
                let (pairs, reference): (Vec<_>, Vec<_>) = b.into_iter().unzip();
                let loss = trainers
                    .generation
                    .preference_step(llm, &pairs, &reference, pref.beta)?;
                (loss, "pairs")
            }
        };
        step += 1;
        report.loss_first.get_or_insert(loss);
        report.loss_last = Some(loss);
        tracing::info!(round, step, steps, loss, kind, "LLM tuning");
    }
    if step == 0 {
        tracing::warn!(round, "no training example in any epoch; LLM not tuned");
        return Ok(report);
    }
    trainers.apply(llm);
    report.steps = step;
    report.tuned = true;
    report.tune_secs = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The rehearsal texts `cfg` names: those of `rehearsal_text` after the first
/// `rehearsal_skip`; none when rehearsal is off.
pub fn load_rehearsal(cfg: &TuningConfig) -> Result<Vec<String>> {
    let Some(path) = cfg.rehearsal_text.as_ref().filter(|_| cfg.rehearsal > 0.0) else {
        if cfg.enabled && cfg.generation_side && cfg.rehearsal > 0.0 {
            tracing::warn!(
                "[tuning] rehearsal is on but no rehearsal_text is set: the generation side \
                 trains without rehearsal"
            );
        }
        return Ok(Vec::new());
    };
    let texts: Vec<String> = load_general(path, usize::MAX)?
        .into_iter()
        .skip(cfg.rehearsal_skip)
        .collect();
    if texts.is_empty() {
        return Err(Error::Data(format!(
            "{}: no rehearsal text after the first {} (rehearsal_skip)",
            path.display(),
            cfg.rehearsal_skip
        )));
    }
    Ok(texts)
}
