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

use std::path::{Path, PathBuf};
use std::time::Instant;

use crosslm_sdk::data::{self, BadRows, TableSpec};
use crosslm_sdk::method::label_balance;
use crosslm_sdk::protocol::{AggregatedScore, SyntheticSample};
use rand::SeedableRng;
use rand::seq::{IndexedRandom, SliceRandom};
use serde::{Deserialize, Serialize};

use crate::llm::train::{
    LoraConfig, LoraTrainer, PreferencePair, TrainExample, load_adapters, reference_logprobs,
};
use crate::llm::{Llm, accuracy};
use crate::task::TaskSpec;
use crate::{Error, Result};

/// How the LLM learns from a round (the `[tuning]` part of the coordinator config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TuningConfig {
    /// Tune at all. `false` is the "CrossLM without LLM tuning" ablation: the LLM stays frozen.
    pub enabled: bool,
    /// Samples below this quality are not trained on: the intended label's share against its
    /// strongest rival ([`AggregatedScore::rival_share`]), the aggregated quality itself with
    /// two labels.
    pub min_quality: f32,
    /// Train the LLM to write the well-scored samples (label prompt -> sample).
    pub generation_side: bool,
    /// The generation side leaves out this share of each label's kept samples, the
    /// best-scored (0: none), so the LLM learns to write correct but not the easiest samples:
    /// the clients' SLMs score real task data lower than the LLM's own (measured with the
    /// experiment runner's `real_data` oracle), so the plain reward pulls the writing toward
    /// what they already find easy. A share, not a score cap, because the scores' scale moves
    /// with the partition and the round. The task side still learns from every kept sample.
    pub generation_skip_best: f32,
    /// Train the LLM to classify the well-scored samples (prompt -> verbalizer).
    pub task_side: bool,
    /// The task side's targets: the samples' intended labels or the clients' soft labels.
    pub task_targets: TaskTargets,
    /// One set of LoRA adapters for both sides, or one each.
    pub adapters: AdapterLayout,
    /// Passes over a round's examples.
    pub epochs: usize,
    /// The generation side (and its rehearsal) trains in only the first this many of the
    /// `epochs` passes: the task side needs several passes to move the LLM's answers, while
    /// every pass over the generation side pulls the model further toward short review-like
    /// text and away from general text (measured with `crosslm-experiment probe-llm`).
    pub generation_epochs: usize,
    /// General-text rehearsal: this many general texts per generation-side example are
    /// trained on beside them (plain language modelling, no prompt), so that learning to
    /// write the task's samples does not cost the LLM its general ability. 0: none.
    pub rehearsal: f32,
    /// Where the rehearsal texts come from (the format of [`load_general`]). None: no
    /// rehearsal (the experiment runner fills in its general-text file).
    pub rehearsal_text: Option<PathBuf>,
    /// The first this many texts of `rehearsal_text` are never trained on: when it is the
    /// evaluation's general text too, keep this at least the evaluation's `general_limit`.
    pub rehearsal_skip: usize,
    /// Examples per optimizer step.
    pub batch_size: usize,
    /// At most this many samples per round are trained on, at most `max_samples / labels`
    /// per label, the best-scored first; bounds the time a round's tuning takes on a CPU.
    /// Labels are kept balanced: no label gets more than twice the samples of the scarcest,
    /// and weights are scaled so that every label carries the same total weight.
    pub max_samples: usize,
    /// Preference pairs on the generation side (DPO), beside its weighted samples (so only
    /// with `generation_side`): the LLM learns from what the clients scored low as well.
    pub preference: PreferenceConfig,
    /// LoRA settings (rank, alpha, learning rate, token limits).
    pub lora: LoraConfig,
    /// Seed of the adapters' initialization and the example order.
    pub seed: u64,
}

impl Default for TuningConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            min_quality: 0.5,
            generation_side: true,
            generation_skip_best: 0.0,
            task_side: true,
            task_targets: TaskTargets::Intended,
            adapters: AdapterLayout::Shared,
            // Chosen on a validation split (`crosslm-experiment probe-llm`, MR): after one and
            // two passes the LLM's accuracy had not moved, after three it had.
            epochs: 3,
            generation_epochs: 1,
            rehearsal: 1.0,
            rehearsal_text: None,
            rehearsal_skip: 1000,
            batch_size: 8,
            max_samples: 64,
            preference: PreferenceConfig::default(),
            lora: LoraConfig {
                rank: 8,
                alpha: 16.0,
                learning_rate: 5e-4,
                max_completion_tokens: 64,
                max_prompt_tokens: 160,
                top_layers: 10,
            },
            seed: 7,
        }
    }
}

/// Preference pairs for the generation side (the `[tuning.preference]` part of the config):
/// the "preference pairs, high vs low score" option, trained with DPO (Rafailov et
/// al., 2023) against the LLM as it was at the round's start. Pairs train in the first
/// `epochs` of the round's passes, beside the weighted samples; they need `generation_side`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PreferenceConfig {
    /// Train on preference pairs at all.
    pub enabled: bool,
    /// Which samples are paired under a label's prompt.
    pub source: PairSource,
    /// DPO's beta: how far the model may move from the reference per unit of margin.
    pub beta: f32,
    /// Only pairs whose scores differ by at least this much.
    pub margin: f32,
    /// At most this many pairs per label and round (the best against the worst first).
    pub max_pairs_per_label: usize,
    /// Passes over the pairs: they train in the first this many of the round's `epochs`.
    /// Unlike the generation side's samples, pairs raise one text only against another, so
    /// they pull the LLM less toward task-like text and may take more passes.
    pub epochs: usize,
}

impl Default for PreferenceConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            source: PairSource::SameLabel,
            beta: 0.1,
            margin: 0.3,
            max_pairs_per_label: 16,
            epochs: 1,
        }
    }
}

/// Where the preference pairs under label A's prompt come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PairSource {
    /// Samples written for A: chosen the high-quality ones, rejected the low (the issue's
    /// option; few pairs when the LLM rarely misses its label).
    SameLabel,
    /// Every sample, scored by the clients' aggregated probability of A: rejected are also
    /// samples written for other labels that clearly carry them, which teaches the LLM to keep
    /// other labels' text out of A's samples (many more pairs).
    AllLabels,
}

/// Which LoRA adapters the two sides of the LLM's tuning train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterLayout {
    /// One set for both: the task side's one-word answers (each ending in EOS) then also
    /// shape how the LLM writes; on R8 its stories shrank from 87 to 25 words in two rounds.
    Shared,
    /// The generation side trains the adapters the LLM writes (and is measured for
    /// perplexity) with; the task side trains its own, used only to classify. The LLM then
    /// learns the task without the task side changing its samples.
    Split,
}

/// What the task side of the LLM's tuning trains toward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskTargets {
    /// The label the sample was generated for (kept only when the clients agreed).
    Intended,
    /// The clients' aggregated label distribution.
    Soft,
}

/// What the LLM is measured on (the `[eval]` part of the coordinator config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// Labeled test data of the task (any format `crosslm-client data` reads), for accuracy.
    pub test: Option<PathBuf>,
    /// Use at most this many test rows (the first ones).
    pub test_limit: usize,
    /// Held-out general text for perplexity: one text per line; in tab-separated lines the
    /// last field is the text (the NYT editorial snippets of the MR archive).
    pub general: Option<PathBuf>,
    /// Use at most this many general texts.
    pub general_limit: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            test: None,
            test_limit: 300,
            general: None,
            general_limit: 100,
        }
    }
}

/// The LLM's figures after a round (round 0: before any round, the zero-shot start).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlmReport {
    /// The round after which this was measured (0 = before the first).
    pub round: u64,
    /// Whether the LLM was tuned on this round's feedback.
    pub tuned: bool,
    /// Samples of the round that were trained on.
    pub samples_used: usize,
    /// Training examples (generation side, its rehearsal texts, task side).
    pub examples: usize,
    /// Optimizer steps taken.
    #[serde(default)]
    pub steps: usize,
    /// Preference pairs trained on (generation side, DPO).
    #[serde(default)]
    pub pairs: usize,
    /// Mean loss of the first and of the last optimizer step.
    pub loss_first: Option<f32>,
    /// Mean loss of the last optimizer step.
    pub loss_last: Option<f32>,
    /// Accuracy on the task's test split (argmax of the verbalizer probabilities).
    pub task_accuracy: Option<f64>,
    /// The same with contextual calibration.
    pub task_accuracy_calibrated: Option<f64>,
    /// Perplexity on held-out general text (with the adapters the LLM writes with).
    pub perplexity: Option<f64>,
    /// The same with the task side's own adapters (split adapters only).
    #[serde(default)]
    pub perplexity_task: Option<f64>,
    /// Seconds spent tuning.
    pub tune_secs: f64,
    /// Seconds spent evaluating.
    pub eval_secs: f64,
}

impl LlmReport {
    /// An empty report for `round`.
    pub fn new(round: u64) -> Self {
        Self {
            round,
            tuned: false,
            samples_used: 0,
            examples: 0,
            steps: 0,
            pairs: 0,
            loss_first: None,
            loss_last: None,
            task_accuracy: None,
            task_accuracy_calibrated: None,
            perplexity: None,
            perplexity_task: None,
            tune_secs: 0.0,
            eval_secs: 0.0,
        }
    }
}

/// A round's training examples, by side.
#[derive(Debug, Clone, Default)]
pub struct FeedbackExamples {
    /// Samples of the round that cleared the threshold and the label balance.
    pub used: usize,
    /// Generation side: label prompt -> sample.
    pub generation: Vec<TrainExample>,
    /// Task side: classification prompt -> label word.
    pub task: Vec<TrainExample>,
}

/// The round's samples joined with their scores, where both fit the task (a soft label per
/// task label, an intended label of the task).
fn scored_samples<'a>(
    spec: &TaskSpec,
    samples: &'a [SyntheticSample],
    scores: &'a [AggregatedScore],
) -> Vec<(&'a SyntheticSample, &'a AggregatedScore)> {
    let n_labels = spec.labels.len();
    let by_id: std::collections::HashMap<u64, &SyntheticSample> =
        samples.iter().map(|s| (s.id, s)).collect();
    scores
        .iter()
        .filter(|s| s.soft.len() == n_labels)
        .filter_map(|s| by_id.get(&s.id).map(|x| (*x, s)))
        .filter(|(x, _)| (x.label as usize) < n_labels)
        .collect()
}

/// Best-scored-first samples with their label-balance factors, so that the SLMs finding one
/// label's samples better does not teach the LLM to answer that label for everything.
fn balanced<'a>(
    spec: &TaskSpec,
    cfg: &TuningConfig,
    best_first: Vec<(&'a SyntheticSample, &'a AggregatedScore)>,
) -> Vec<((&'a SyntheticSample, &'a AggregatedScore), f32)> {
    let n_labels = spec.labels.len();
    let labels: Vec<usize> = best_first.iter().map(|(x, _)| x.label as usize).collect();
    let factors = label_balance(&labels, n_labels, cfg.max_samples / n_labels.max(1));
    best_first
        .into_iter()
        .zip(factors)
        .filter(|(_, f)| *f > 0.0)
        .collect()
}

/// The training examples one round's feedback gives (see the module docs).
pub fn feedback_examples(
    llm: &Llm,
    spec: &TaskSpec,
    cfg: &TuningConfig,
    samples: &[SyntheticSample],
    scores: &[AggregatedScore],
) -> FeedbackExamples {
    let mut scored = scored_samples(spec, samples, scores);
    scored.retain(|(_, s)| s.quality.is_finite() && s.rival_share() >= cfg.min_quality);
    scored.sort_by(|a, b| b.1.quality.total_cmp(&a.1.quality));
    let kept = balanced(spec, cfg, scored.clone());
    let tok = &llm.tokenizer;
    let mut out = FeedbackExamples {
        used: kept.len(),
        ..FeedbackExamples::default()
    };
    if cfg.generation_side {
        // Its own selection: the best are left out before the best-first budget is filled.
        let mut per_label = vec![0usize; spec.labels.len()];
        for (x, _) in &scored {
            per_label[x.label as usize] += 1;
        }
        let skip: Vec<usize> = per_label
            .iter()
            .map(|&n| (n as f32 * cfg.generation_skip_best.clamp(0.0, 1.0)).floor() as usize)
            .collect();
        let mut seen = vec![0usize; spec.labels.len()];
        scored.retain(|(x, _)| {
            let l = x.label as usize;
            seen[l] += 1;
            seen[l] > skip[l]
        });
        for ((sample, score), balance) in balanced(spec, cfg, scored) {
            let label = &spec.labels[sample.label as usize];
            // Samples do not record which of the label's prompts wrote them; any of the
            // label's paraphrased prompts is a fair context.
            let p = &label.prompts[sample.id as usize % label.prompts.len()];
            out.generation.push(TrainExample {
                prompt: tok.chat_prompt(p),
                completion: sample.text.clone(),
                weight: score.quality * balance,
            });
        }
    }
    for ((sample, score), balance) in &kept {
        let label = &spec.labels[sample.label as usize];
        if cfg.task_side {
            let prompt = tok.chat_prompt(&spec.classify_prompt(&sample.text));
            match cfg.task_targets {
                TaskTargets::Intended => out.task.push(TrainExample {
                    prompt,
                    completion: label.verbalizer.clone(),
                    weight: score.quality * balance,
                }),
                TaskTargets::Soft => {
                    for (l, target) in spec.labels.iter().zip(&score.soft) {
                        if *target > 0.01 {
                            out.task.push(TrainExample {
                                prompt: prompt.clone(),
                                completion: l.verbalizer.clone(),
                                weight: score.quality * target * balance,
                            });
                        }
                    }
                }
            }
        }
    }
    out
}

/// The round's preference pairs (see [`PreferenceConfig`]): per label, the best-scored
/// candidates against the worst-scored, best with worst first, while the score gap is at
/// least `margin`; a pair's weight is its score gap.
pub fn preference_pairs(
    llm: &Llm,
    spec: &TaskSpec,
    cfg: &PreferenceConfig,
    samples: &[SyntheticSample],
    scores: &[AggregatedScore],
) -> Vec<PreferencePair> {
    let mut scored = scored_samples(spec, samples, scores);
    scored.retain(|(_, s)| s.soft.iter().all(|p| p.is_finite()));
    let mut out = Vec::new();
    for (a, label) in spec.labels.iter().enumerate() {
        let mut cands: Vec<(&SyntheticSample, f32)> = scored
            .iter()
            .filter(|(x, _)| cfg.source == PairSource::AllLabels || x.label as usize == a)
            .map(|(x, s)| (*x, s.soft[a]))
            .collect();
        cands.sort_by(|x, y| y.1.total_cmp(&x.1));
        let half = cands.len() / 2;
        let (best, worst) = cands.split_at(cands.len() - half);
        let pairs = best.iter().zip(worst.iter().rev());
        for ((chosen, hi), (rejected, lo)) in pairs.take(cfg.max_pairs_per_label) {
            if hi - lo < cfg.margin {
                break;
            }
            let p = &label.prompts[chosen.id as usize % label.prompts.len()];
            out.push(PreferencePair {
                prompt: llm.tokenizer.chat_prompt(p),
                chosen: chosen.text.clone(),
                rejected: rejected.text.clone(),
                weight: hi - lo,
            });
        }
    }
    out
}

/// The rehearsal examples of a round: `round(ratio x generation.len())` texts of `pool`
/// (a different draw each round), prompt-free, each weighted like the mean generation-side
/// example.
pub fn rehearsal_examples(
    pool: &[String],
    generation: &[TrainExample],
    ratio: f32,
    seed: u64,
) -> Vec<TrainExample> {
    let n = ((generation.len() as f32 * ratio.max(0.0)).round() as usize).min(pool.len());
    if n == 0 {
        return Vec::new();
    }
    let weight = generation.iter().map(|e| e.weight).sum::<f32>() / generation.len() as f32;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    pool.choose_multiple(&mut rng, n)
        .map(|t| TrainExample {
            prompt: String::new(),
            completion: t.clone(),
            weight,
        })
        .collect()
}

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
        let task = (cfg.adapters == AdapterLayout::Split)
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
        let task = match (cfg.adapters, task_path.is_file()) {
            (AdapterLayout::Split, true) => Some(load(&task_path)?),
            (AdapterLayout::Shared, false) => None,
            (layout, _) => {
                return Err(Error::Model(format!(
                    "{}: the saved LLM adapters do not match [tuning] adapters = {layout:?} \
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
    let fb = feedback_examples(llm, spec, cfg, samples, scores);
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
    let pref = &cfg.preference;
    let pairs = if pref.enabled && cfg.generation_side && pref.epochs > 0 {
        preference_pairs(llm, spec, pref, samples, scores)
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

/// Measures the LLM: task accuracy on a test split, perplexity on general text.
pub struct Evaluator {
    test_texts: Vec<String>,
    test_labels: Vec<usize>,
    general: Vec<String>,
}

impl Evaluator {
    /// Loads the evaluation data named by `cfg` (paths relative to the working directory).
    pub fn load(cfg: &EvalConfig, spec: &TaskSpec) -> Result<Self> {
        let mut e = Self {
            test_texts: Vec::new(),
            test_labels: Vec::new(),
            general: Vec::new(),
        };
        if let Some(path) = &cfg.test {
            let names: Vec<String> = spec.labels.iter().map(|l| l.name.clone()).collect();
            let table = TableSpec {
                labels: Some(names),
                ..TableSpec::default()
            };
            let loaded = data::load_auto(path, None, &table, BadRows::Skip)?;
            let ds = loaded.dataset;
            // Map the file's label names onto the task's.
            for ex in ds.examples.into_iter().take(cfg.test_limit) {
                let name = &ds.label_names[ex.label];
                let idx = spec.label_index(name).ok_or_else(|| {
                    Error::Data(format!(
                        "{}: label {name:?} is not one of task {}'s",
                        path.display(),
                        spec.name
                    ))
                })?;
                e.test_texts.push(ex.text);
                e.test_labels.push(idx);
            }
        }
        if let Some(path) = &cfg.general {
            e.general = load_general(path, cfg.general_limit)?;
        }
        Ok(e)
    }

    /// From texts already in memory.
    pub fn from_parts(test: Vec<(String, usize)>, general: Vec<String>) -> Self {
        let (test_texts, test_labels) = test.into_iter().unzip();
        Self {
            test_texts,
            test_labels,
            general,
        }
    }

    /// Whether there is anything to measure.
    pub fn is_empty(&self) -> bool {
        self.test_texts.is_empty() && self.general.is_empty()
    }

    /// Fills the evaluation fields of `report`.
    pub fn evaluate(&self, llm: &Llm, spec: &TaskSpec, report: &mut LlmReport) -> Result<()> {
        let started = Instant::now();
        if !self.test_texts.is_empty() {
            let probs = llm.classify(spec, &self.test_texts)?;
            report.task_accuracy = Some(accuracy(&probs, &self.test_labels));
            let prior = llm.classify(spec, &["N/A".to_string()])?.remove(0);
            let calibrated: Vec<Vec<f32>> = probs
                .iter()
                .map(|p| crate::llm::engine::calibrate(p, &prior))
                .collect();
            report.task_accuracy_calibrated = Some(accuracy(&calibrated, &self.test_labels));
        }
        if !self.general.is_empty() {
            report.perplexity = Some(llm.perplexity(&self.general)?);
            if let Some(task) = &llm.task_lora {
                report.perplexity_task = Some(llm.perplexity_with(Some(task), &self.general)?);
            }
        }
        report.eval_secs = started.elapsed().as_secs_f64();
        tracing::info!(
            round = report.round,
            accuracy = ?report.task_accuracy,
            calibrated = ?report.task_accuracy_calibrated,
            perplexity = ?report.perplexity,
            perplexity_task = ?report.perplexity_task,
            secs = report.eval_secs,
            "LLM evaluated"
        );
        Ok(())
    }

    /// A report of the untouched model (round 0).
    pub fn baseline(&self, llm: &Llm, spec: &TaskSpec) -> Result<LlmReport> {
        let mut r = LlmReport::new(0);
        self.evaluate(llm, spec, &mut r)?;
        Ok(r)
    }
}

/// Whether two paths name one file (links and relative parts resolved where they exist).
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// General texts for perplexity: non-empty lines (the last tab-separated field), at least
/// 40 characters, the first `limit`.
pub fn load_general(path: &Path, limit: usize) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).map_err(|source| Error::File {
        path: path.to_path_buf(),
        source,
    })?;
    // The archive's files are not all valid UTF-8; a lossy read keeps every line usable.
    let text = String::from_utf8_lossy(&bytes);
    let out: Vec<String> = text
        .lines()
        .filter_map(|l| l.rsplit('\t').next())
        .map(str::trim)
        .filter(|t| t.chars().count() >= 40)
        .take(limit)
        .map(str::to_string)
        .collect();
    if out.is_empty() {
        return Err(Error::Data(format!(
            "{}: no general texts of at least 40 characters",
            path.display()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generator::{Generator, LlmGenerator};
    use crate::llm::test_assets::tiny_llm;

    fn spec() -> TaskSpec {
        let p = crosslm_sdk::data::workspace_root().join("examples/tasks/mr.toml");
        TaskSpec::from_toml_file(p).unwrap()
    }

    /// Three samples: two clear the 0.5 threshold.
    fn round() -> (Vec<SyntheticSample>, Vec<AggregatedScore>) {
        let texts = [
            "A dull, lifeless film with no reason to exist.",
            "Maybe fine.",
            "A warm, funny and moving picture.",
        ];
        let samples = texts
            .iter()
            .enumerate()
            .map(|(i, t)| SyntheticSample {
                id: i as u64,
                text: t.to_string(),
                label: if i == 2 { 1 } else { 0 },
            })
            .collect();
        let scores = vec![
            AggregatedScore {
                id: 0,
                quality: 0.9,
                soft: vec![0.9, 0.1],
            },
            AggregatedScore {
                id: 1,
                quality: 0.3,
                soft: vec![0.3, 0.7],
            },
            AggregatedScore {
                id: 2,
                quality: 0.995,
                soft: vec![0.005, 0.995],
            },
        ];
        (samples, scores)
    }

    fn quick() -> TuningConfig {
        TuningConfig {
            // One batch holds the whole round: first and last losses are comparable.
            epochs: 4,
            generation_epochs: 4,
            batch_size: 8,
            lora: LoraConfig {
                learning_rate: 5e-3,
                ..TuningConfig::default().lora
            },
            ..TuningConfig::default()
        }
    }

    #[test]
    fn feedback_gives_weighted_generation_and_task_examples() {
        let llm = tiny_llm().unwrap();
        let (samples, scores) = round();
        let fb = feedback_examples(&llm, &spec(), &quick(), &samples, &scores);
        assert_eq!(fb.used, 2, "the 0.3-quality sample is below the threshold");
        // Best first: sample 2, then sample 0; one generation and one task example each.
        let (g, t) = (&fb.generation, &fb.task);
        assert_eq!((g.len(), t.len()), (2, 2));
        assert_eq!(g[0].completion, "A warm, funny and moving picture.");
        let positive = &spec().labels[1].prompts;
        assert!(
            positive.iter().any(|p| g[0].prompt.contains(p)),
            "{}",
            g[0].prompt
        );
        assert_eq!(g[0].weight, 0.995);
        assert_eq!(t[0].completion, "Positive");
        assert!(t[0].prompt.contains("A warm, funny"));
        assert_eq!(t[1].completion, "Negative");
        assert!((t[1].weight - 0.9).abs() < 1e-6);

        // Soft targets: one task example per label above 1%, weight = quality x soft label.
        let soft = TuningConfig {
            task_targets: TaskTargets::Soft,
            ..quick()
        };
        let fb = feedback_examples(&llm, &spec(), &soft, &samples, &scores);
        assert_eq!((fb.used, fb.generation.len(), fb.task.len()), (2, 2, 3));
        let neg: Vec<_> = fb
            .task
            .iter()
            .filter(|e| e.completion == "Negative")
            .collect();
        assert_eq!(neg.len(), 1);
        assert!((neg[0].weight - 0.9 * 0.9).abs() < 1e-6);

        // Half of each label's best left out of the generation side (the writing) only: of
        // two positives the 0.995 one, of one negative none.
        let capped = TuningConfig {
            generation_skip_best: 0.5,
            ..quick()
        };
        let (mut s2, mut q2) = (samples.clone(), scores.clone());
        s2.push(SyntheticSample {
            id: 5,
            text: "Pleasant enough.".into(),
            label: 1,
        });
        q2.push(AggregatedScore {
            id: 5,
            quality: 0.8,
            soft: vec![0.2, 0.8],
        });
        let fb = feedback_examples(&llm, &spec(), &capped, &s2, &q2);
        assert_eq!((fb.used, fb.generation.len(), fb.task.len()), (3, 2, 3));
        let written: Vec<(&str, f32)> = fb
            .generation
            .iter()
            .map(|e| (e.completion.as_str(), e.weight))
            .collect();
        assert_eq!(
            written,
            vec![
                ("A dull, lifeless film with no reason to exist.", 0.9),
                ("Pleasant enough.", 0.8)
            ]
        );
        assert!(fb.task.iter().any(|e| e.prompt.contains("A warm, funny")));

        let only_task = TuningConfig {
            generation_side: false,
            ..quick()
        };
        let fb = feedback_examples(&llm, &spec(), &only_task, &samples, &scores);
        assert_eq!((fb.used, fb.generation.len(), fb.task.len()), (2, 0, 2));

        // Two more good negative samples: at most twice the scarcest label (2 negatives, the
        // best), and each label the same total weight.
        let (mut samples, mut scores) = (samples, scores);
        for (id, text, q) in [
            (3, "Tedious beyond words.", 0.95),
            (4, "Flat and dull.", 0.6),
        ] {
            samples.push(SyntheticSample {
                id,
                text: text.into(),
                label: 0,
            });
            scores.push(AggregatedScore {
                id,
                quality: q,
                soft: vec![q, 1.0 - q],
            });
        }
        let fb = feedback_examples(&llm, &spec(), &only_task, &samples, &scores);
        let ex = fb.task;
        assert_eq!((fb.used, ex.len()), (3, 3));
        assert!(!ex.iter().any(|e| e.prompt.contains("Flat and dull.")));
        let total = |c: &str| -> f32 {
            ex.iter()
                .filter(|e| e.completion == c)
                .map(|e| e.weight)
                .sum()
        };
        // Negatives: (0.95 + 0.9) x 0.75; positive: 0.995 x 1.5.
        assert!((total("Negative") - 1.85 * 0.75).abs() < 1e-5);
        assert!((total("Positive") - 0.995 * 1.5).abs() < 1e-5);
    }

    /// Round 1 of [`round`] tuned under `cfg` with fresh adapters.
    fn tune_round(llm: &mut Llm, cfg: &TuningConfig, rehearsal: &[String]) -> LlmReport {
        let mut trainers = Trainers::new(llm, cfg);
        let (samples, scores) = round();
        tune(
            llm,
            &mut trainers,
            &spec(),
            cfg,
            1,
            &samples,
            &scores,
            rehearsal,
        )
        .unwrap()
    }

    #[test]
    fn preference_pairs_put_the_best_against_the_worst() {
        let llm = tiny_llm().unwrap();
        let (samples, scores) = round();
        let cfg = PreferenceConfig {
            enabled: true,
            ..PreferenceConfig::default()
        };
        // Same label: the negatives 0 (0.9) and 1 (0.3); the lone positive has no partner.
        let pairs = preference_pairs(&llm, &spec(), &cfg, &samples, &scores);
        assert_eq!(pairs.len(), 1, "{pairs:?}");
        assert_eq!(pairs[0].chosen, samples[0].text);
        assert_eq!(pairs[0].rejected, samples[1].text);
        assert!((pairs[0].weight - 0.6).abs() < 1e-6);
        let negative = &spec().labels[0].prompts;
        assert!(negative.iter().any(|p| pairs[0].prompt.contains(p)));
        // A gap below the margin is no pair.
        let strict = PreferenceConfig {
            margin: 0.7,
            ..cfg.clone()
        };
        assert!(preference_pairs(&llm, &spec(), &strict, &samples, &scores).is_empty());
        // All labels: under each label's prompt, its clearest sample against the other
        // label's clearest one.
        let all = PreferenceConfig {
            source: PairSource::AllLabels,
            ..cfg.clone()
        };
        let pairs = preference_pairs(&llm, &spec(), &all, &samples, &scores);
        let texts: Vec<(&str, &str)> = pairs
            .iter()
            .map(|p| (p.chosen.as_str(), p.rejected.as_str()))
            .collect();
        assert_eq!(
            texts,
            [
                (samples[0].text.as_str(), samples[2].text.as_str()),
                (samples[2].text.as_str(), samples[0].text.as_str()),
            ]
        );
        let capped = PreferenceConfig {
            max_pairs_per_label: 0,
            ..all
        };
        assert!(preference_pairs(&llm, &spec(), &capped, &samples, &scores).is_empty());
    }

    #[test]
    fn tuning_with_preference_pairs_trains_on_them() {
        let mut llm = tiny_llm().unwrap();
        let cfg = TuningConfig {
            epochs: 3,
            generation_epochs: 1,
            preference: PreferenceConfig {
                enabled: true,
                epochs: 2,
                ..PreferenceConfig::default()
            },
            ..quick()
        };
        let r = tune_round(&mut llm, &cfg, &[]);
        // Epoch 1: the 4 examples in one batch and the pair; epoch 2: the 2 task-side examples
        // and the pair; epoch 3: the task side only.
        assert_eq!((r.pairs, r.examples, r.steps), (1, 4, 5), "{r:?}");
        assert!(r.tuned);
    }

    #[test]
    fn generator_tunes_saves_and_does_not_relearn_a_round_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("llm");
        let (samples, scores) = round();
        let mut g = LlmGenerator::new(tiny_llm().unwrap(), spec(), 1)
            .with_tuning(quick(), state.clone())
            .unwrap();
        let r1 = g.feedback(1, &samples, &scores).unwrap().unwrap();
        assert!(r1.tuned && r1.examples == 4, "{r1:?}");
        let (first, last) = (r1.loss_first.unwrap(), r1.loss_last.unwrap());
        assert!(last < first, "loss {first} -> {last}");
        assert!(state.join("adapters-1.lora").is_file());
        assert!(g.llm_mut().lora.is_some(), "the tuned adapters are in use");

        // A restart: the adapters are loaded, round 1 is not learned again.
        let mut g = LlmGenerator::new(tiny_llm().unwrap(), spec(), 1)
            .with_tuning(quick(), state.clone())
            .unwrap();
        assert!(g.llm_mut().lora.is_some());
        let again = g.feedback(1, &samples, &scores).unwrap().unwrap();
        assert!(again.tuned && again.examples == 0, "{again:?}");
        let r2 = g.feedback(2, &samples, &scores).unwrap().unwrap();
        assert_eq!(r2.examples, 4);
        assert!(state.join("adapters-2.lora").is_file());
        assert!(!state.join("adapters-1.lora").exists());

        // Disabled: the model stays frozen and nothing is reported.
        let mut frozen = LlmGenerator::new(tiny_llm().unwrap(), spec(), 1)
            .with_tuning(
                TuningConfig {
                    enabled: false,
                    ..quick()
                },
                dir.path().join("frozen"),
            )
            .unwrap();
        assert!(frozen.feedback(1, &samples, &scores).unwrap().is_none());
        assert!(frozen.llm_mut().lora.is_none());
    }

    /// Split adapters: the task side trains its own, which classify; the adapters the LLM
    /// writes with do not move when only the task side trains (shared ones do).
    #[test]
    fn split_adapters_keep_the_task_side_out_of_the_writing_adapters() {
        let general = ["The city council met on Tuesday to discuss the new budget.".to_string()];
        let texts = ["A warm, funny and moving picture.".to_string()];
        let base = tiny_llm().unwrap();
        let (base_ppl, base_probs) = (
            base.perplexity(&general).unwrap(),
            base.classify(&spec(), &texts).unwrap(),
        );
        let task_only = TuningConfig {
            generation_side: false,
            adapters: AdapterLayout::Split,
            ..quick()
        };
        let mut llm = tiny_llm().unwrap();
        let r = tune_round(&mut llm, &task_only, &[]);
        assert_eq!((r.examples, r.steps), (2, 4), "{r:?}");
        assert!(llm.lora.is_some() && llm.task_lora.is_some());
        assert_eq!(llm.perplexity(&general).unwrap(), base_ppl);
        let task_ppl = llm
            .perplexity_with(llm.task_lora.as_ref(), &general)
            .unwrap();
        assert_ne!(task_ppl, base_ppl);
        let probs = llm.classify(&spec(), &texts).unwrap();
        assert!(
            (probs[0][1] - base_probs[0][1]).abs() > 1e-4,
            "{probs:?} {base_probs:?}"
        );

        let mut shared = tiny_llm().unwrap();
        tune_round(
            &mut shared,
            &TuningConfig {
                adapters: AdapterLayout::Shared,
                ..task_only.clone()
            },
            &[],
        );
        assert!(shared.task_lora.is_none());
        assert_ne!(shared.perplexity(&general).unwrap(), base_ppl);

        // Both sides: each side's examples batch apart, so twice the steps of shared adapters.
        let both = TuningConfig {
            adapters: AdapterLayout::Split,
            ..quick()
        };
        let r = tune_round(&mut tiny_llm().unwrap(), &both, &[]);
        assert_eq!((r.examples, r.steps), (4, 8), "{r:?}");
    }

    #[test]
    fn split_adapters_are_saved_restored_and_must_match_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("llm");
        let (samples, scores) = round();
        let split = TuningConfig {
            adapters: AdapterLayout::Split,
            ..quick()
        };
        let texts = ["A warm, funny and moving picture.".to_string()];
        let general = vec!["The city council met on Tuesday to discuss the new budget.".into()];
        let eval = Evaluator::from_parts(vec![(texts[0].clone(), 1)], general);
        let mut g = LlmGenerator::new(tiny_llm().unwrap(), spec(), 1)
            .with_evaluator(eval)
            .with_tuning(split.clone(), state.clone())
            .unwrap();
        assert!(g.llm_mut().task_lora.is_some(), "in place from the start");
        let r = g.feedback(1, &samples, &scores).unwrap().unwrap();
        // Both adapter sets are measured on the general text.
        let (ppl, ppl_task) = (r.perplexity.unwrap(), r.perplexity_task.unwrap());
        assert!(
            ppl.is_finite() && ppl_task.is_finite() && ppl != ppl_task,
            "{r:?}"
        );
        let probs = g.llm_mut().classify(&spec(), &texts).unwrap();
        assert!(state.join("adapters-1.lora").is_file());
        assert!(state.join("task-adapters-1.lora").is_file());

        let mut g = LlmGenerator::new(tiny_llm().unwrap(), spec(), 1)
            .with_tuning(split.clone(), state.clone())
            .unwrap();
        assert_eq!(g.llm_mut().classify(&spec(), &texts).unwrap(), probs);
        g.feedback(2, &samples, &scores).unwrap().unwrap();
        assert!(state.join("task-adapters-2.lora").is_file());
        assert!(!state.join("task-adapters-1.lora").exists());

        // The state of split adapters under a shared config, and the other way round.
        let err = LlmGenerator::new(tiny_llm().unwrap(), spec(), 1)
            .with_tuning(quick(), state.clone())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("do not match"), "{err}");
        std::fs::remove_file(state.join("task-adapters-2.lora")).unwrap();
        assert!(
            LlmGenerator::new(tiny_llm().unwrap(), spec(), 1)
                .with_tuning(split, state)
                .is_err()
        );
    }

    #[test]
    fn rehearsal_draws_general_texts_weighted_like_the_generation_side() {
        let generation: Vec<TrainExample> = [0.5f32, 1.0]
            .iter()
            .map(|&weight| TrainExample {
                prompt: "write".into(),
                completion: "a review".into(),
                weight,
            })
            .collect();
        let pool: Vec<String> = (0..10).map(|i| format!("general text {i}")).collect();
        let r = rehearsal_examples(&pool, &generation, 1.5, 3);
        assert_eq!(r.len(), 3);
        assert!(r.iter().all(|e| e.prompt.is_empty() && e.weight == 0.75));
        let texts: Vec<&str> = r.iter().map(|e| e.completion.as_str()).collect();
        assert!(texts.iter().all(|t| pool.iter().any(|p| p == t)));
        let distinct: std::collections::HashSet<&str> = texts.iter().copied().collect();
        assert_eq!(distinct.len(), 3, "drawn without replacement");
        let other: Vec<String> = rehearsal_examples(&pool, &generation, 1.5, 4)
            .into_iter()
            .map(|e| e.completion)
            .collect();
        assert_ne!(texts, other, "another round, another draw");
        assert!(rehearsal_examples(&pool, &generation, 0.0, 3).is_empty());
        assert!(rehearsal_examples(&[], &generation, 1.0, 3).is_empty());
        assert_eq!(rehearsal_examples(&pool, &generation, 100.0, 3).len(), 10);
    }

    /// The generation side and its rehearsal train only in the first `generation_epochs`;
    /// rehearsal texts come after `rehearsal_skip`.
    #[test]
    fn generation_side_and_rehearsal_train_in_the_first_epochs_only() {
        let dir = tempfile::tempdir().unwrap();
        let general = dir.path().join("general.txt");
        let lines: Vec<String> = (0..6)
            .map(|i| format!("General text number {i} is long enough to be kept here."))
            .collect();
        std::fs::write(&general, lines.join("\n")).unwrap();
        let cfg = TuningConfig {
            epochs: 2,
            generation_epochs: 1,
            batch_size: 1,
            rehearsal: 1.0,
            rehearsal_text: Some(general.clone()),
            rehearsal_skip: 4,
            ..quick()
        };
        let pool = load_rehearsal(&cfg).unwrap();
        assert_eq!(pool, lines[4..].to_vec(), "the first 4 are skipped");
        let mut llm = tiny_llm().unwrap();
        let r = tune_round(&mut llm, &cfg, &pool);
        // 2 generation + 2 rehearsal + 2 task examples; epoch 1 all six, epoch 2 the task two.
        assert_eq!((r.examples, r.steps), (6, 8), "{r:?}");
        let off = TuningConfig {
            rehearsal: 0.0,
            ..cfg.clone()
        };
        assert!(load_rehearsal(&off).unwrap().is_empty());
        let all_skipped = TuningConfig {
            rehearsal_skip: 6,
            ..cfg
        };
        assert!(load_rehearsal(&all_skipped).is_err());
    }

    #[test]
    fn general_text_takes_the_last_tab_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.txt");
        std::fs::write(
            &p,
            "1_1\t0.4\tThe city plans a holiday celebration in the square at noon.\nshort\n\
             A plain line without tabs that is long enough to be used here.\n",
        )
        .unwrap();
        let g = load_general(&p, 10).unwrap();
        assert_eq!(
            g,
            vec![
                "The city plans a holiday celebration in the square at noon.".to_string(),
                "A plain line without tabs that is long enough to be used here.".to_string()
            ]
        );
        assert_eq!(load_general(&p, 1).unwrap().len(), 1);
        std::fs::write(&p, "tiny\n").unwrap();
        assert!(load_general(&p, 10).is_err());
    }

    /// On the real model: the evaluation figures are in range and the NYT text's perplexity
    /// is that of fluent English for a small model.
    #[test]
    fn real_model_evaluation() {
        let llm = crate::llm::Llm::load(
            crate::llm::test_assets::smollm2_path(),
            &burn::tensor::Device::flex(),
        )
        .unwrap();
        let assets = crate::llm::assets_dir();
        let spec = spec();
        let e = Evaluator::load(
            &EvalConfig {
                test: Some(assets.join("data/mr/movieReviewSnippets_GroundTruth.txt")),
                test_limit: 16,
                general: Some(assets.join("data/mr/nytEditorialSnippets_GroundTruth.txt")),
                general_limit: 8,
            },
            &spec,
        )
        .unwrap();
        let r = e.baseline(&llm, &spec).unwrap();
        assert_eq!(r.round, 0);
        let acc = r.task_accuracy.unwrap();
        assert!((0.0..=1.0).contains(&acc));
        assert!((0.0..=1.0).contains(&r.task_accuracy_calibrated.unwrap()));
        let ppl = r.perplexity.unwrap();
        assert!((3.0..200.0).contains(&ppl), "perplexity {ppl}");
    }
}
