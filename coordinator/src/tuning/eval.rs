//! Measuring the LLM (task accuracy on a labeled test split, perplexity on general text)
//! and the report of each measurement.

use std::path::Path;
use std::time::Instant;

use crosslm_sdk::data::{self, BadRows, TableSpec};
use serde::{Deserialize, Serialize};

use crate::llm::{Llm, accuracy};
use crate::task::TaskSpec;
use crate::{Error, Result};

use super::config::EvalConfig;

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
