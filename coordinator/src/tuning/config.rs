//! The `[tuning]` and `[eval]` settings of the coordinator config.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::llm::train::LoraConfig;

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
    /// Train the LLM to classify the well-scored samples (prompt -> verbalizer).
    pub task_side: bool,
    /// The task side's targets: the samples' intended labels or the clients' soft labels.
    pub task_targets: TaskTargets,
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
    /// LoRA settings (rank, alpha, learning rate, token limits).
    pub lora: LoraConfig,
    /// Seed of the adapters' initialization and the example order.
    pub seed: u64,
    /// Options that measured no gain (docs/experiments.md, "Defaults that matter, and options
    /// tried"): kept, off by default, to reproduce those runs (`[tuning.experimental]`).
    pub experimental: ExperimentalTuning,
}

/// `[tuning.experimental]`: tuning options that were measured and gave nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExperimentalTuning {
    /// The generation side leaves out this share of each label's kept samples, the
    /// best-scored (0: none), so the LLM learns to write correct but not the easiest samples:
    /// the clients' SLMs score real task data lower than the LLM's own (measured with the
    /// experiment runner's `real_data` oracle), so the plain reward pulls the writing toward
    /// what they already find easy. A share, not a score cap, because the scores' scale moves
    /// with the partition and the round. The task side still learns from every kept sample.
    pub generation_skip_best: f32,
    /// One set of LoRA adapters for both sides, or one each.
    pub adapters: AdapterLayout,
    /// Preference pairs on the generation side (DPO), beside its weighted samples (so only
    /// with `generation_side`): the LLM learns from what the clients scored low as well.
    pub preference: PreferenceConfig,
}

impl Default for ExperimentalTuning {
    fn default() -> Self {
        Self {
            generation_skip_best: 0.0,
            adapters: AdapterLayout::Shared,
            preference: PreferenceConfig::default(),
        }
    }
}

impl Default for TuningConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            min_quality: 0.5,
            generation_side: true,
            task_side: true,
            task_targets: TaskTargets::Intended,
            // Chosen on a validation split (`crosslm-experiment probe-llm`, MR): after one and
            // two passes the LLM's accuracy had not moved, after three it had.
            epochs: 3,
            generation_epochs: 1,
            rehearsal: 1.0,
            rehearsal_text: None,
            rehearsal_skip: 1000,
            batch_size: 8,
            max_samples: 64,
            lora: LoraConfig {
                rank: 8,
                alpha: 16.0,
                learning_rate: 5e-4,
                max_completion_tokens: 64,
                max_prompt_tokens: 160,
                top_layers: 10,
            },
            seed: 7,
            experimental: ExperimentalTuning::default(),
        }
    }
}

/// Preference pairs for the generation side (the `[tuning.experimental.preference]` part of the config):
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
