//! The seam where synthetic data comes from: the [`Generator`] trait, and
//! [`FileGenerator`], which serves labeled samples from a JSONL file (so data made by any
//! external LLM can drive rounds).

use std::collections::HashSet;
use std::path::Path;

use crosslm_sdk::protocol::{AggregatedScore, SyntheticSample, TaskInfo};
use serde::Deserialize;

use crate::tuning::LlmReport;

use crate::{Error, Result};

/// One generated text and the label it was conditioned on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GeneratedSample {
    /// The text.
    pub text: String,
    /// Index of the label in the task's label list.
    pub label: u32,
}

impl From<crate::synthetic::LabeledText> for GeneratedSample {
    fn from(t: crate::synthetic::LabeledText) -> Self {
        Self {
            text: t.text,
            label: t.label as u32,
        }
    }
}

/// The base sampling seed of round `round`: a restarted coordinator regenerates the same
/// batch for an unfinished round, whichever writer (in-process LLM or engine) it uses.
pub fn round_seed(seed: u64, round: u64) -> u64 {
    seed.wrapping_add(round.wrapping_mul(1_000_003))
}

/// Produces label-conditioned synthetic samples for a task.
pub trait Generator: Send + 'static {
    /// About `n_per_label` samples for each label of `task`, for round `round`.
    fn generate(
        &mut self,
        task: &TaskInfo,
        n_per_label: usize,
        round: u64,
    ) -> Result<Vec<GeneratedSample>>;

    /// Measures the model before any round (the zero-shot start); `None`: nothing to measure.
    fn baseline(&mut self) -> Result<Option<LlmReport>> {
        Ok(None)
    }

    /// Learns from a finished round's aggregated scores (the LLM half of CrossLM) and
    /// measures the result; `None`: this generator does not learn. Called again for the same
    /// round after a restart that interrupted it, so it must not learn a round twice.
    fn feedback(
        &mut self,
        _round: u64,
        _samples: &[SyntheticSample],
        _scores: &[AggregatedScore],
    ) -> Result<Option<LlmReport>> {
        Ok(None)
    }
}

impl crate::task::TaskSpec {
    /// What clients are told about the task: its name, description and label names.
    pub fn info(&self) -> TaskInfo {
        TaskInfo {
            name: self.name.clone(),
            description: self.description.clone(),
            labels: self.labels.iter().map(|l| l.name.clone()).collect(),
        }
    }
}

#[derive(Deserialize)]
struct Line {
    text: String,
    label: String,
}

/// Serves samples from a JSONL file of `{"text": ..., "label": "<label name>"}` lines.
///
/// Round `r` takes the next `n_per_label` samples of each label, wrapping around, so
/// consecutive rounds see different data and a restarted coordinator regenerates the same
/// batch for the same round.
#[derive(Debug, Clone)]
pub struct FileGenerator {
    /// Per label, the deduplicated texts in file order.
    pools: Vec<Vec<String>>,
}

impl FileGenerator {
    /// Loads `path` for `task`. Blank lines are skipped; a line that is not valid JSON, has
    /// an empty text or names a label the task does not have is an error naming the line.
    pub fn load(path: &Path, task: &TaskInfo) -> Result<Self> {
        let raw = std::fs::read(path).map_err(|source| Error::File {
            path: path.to_path_buf(),
            source,
        })?;
        let mut pools = vec![Vec::new(); task.labels.len()];
        let mut seen = HashSet::new();
        for (i, line) in raw.split(|b| *b == b'\n').enumerate() {
            let lineno = i + 1;
            let line = std::str::from_utf8(line)
                .map_err(|_| Error::Data(format!("{}:{lineno}: invalid UTF-8", path.display())))?
                .trim();
            if line.is_empty() {
                continue;
            }
            let l: Line = serde_json::from_str(line)
                .map_err(|e| Error::Data(format!("{}:{lineno}: {e}", path.display())))?;
            let label = task
                .labels
                .iter()
                .position(|x| *x == l.label)
                .ok_or_else(|| {
                    Error::Data(format!(
                        "{}:{lineno}: unknown label {:?} (task {} has {:?})",
                        path.display(),
                        l.label,
                        task.name,
                        task.labels
                    ))
                })?;
            let text = l.text.trim().to_string();
            if text.is_empty() {
                return Err(Error::Data(format!(
                    "{}:{lineno}: empty text",
                    path.display()
                )));
            }
            if seen.insert(text.clone()) {
                pools[label].push(text);
            }
        }
        if let Some(i) = pools.iter().position(|p| p.is_empty()) {
            return Err(Error::Data(format!(
                "{}: no samples for label {:?}",
                path.display(),
                task.labels[i]
            )));
        }
        Ok(Self { pools })
    }
}

impl Generator for FileGenerator {
    fn generate(
        &mut self,
        _task: &TaskInfo,
        n_per_label: usize,
        round: u64,
    ) -> Result<Vec<GeneratedSample>> {
        let mut out = Vec::new();
        for (label, pool) in self.pools.iter().enumerate() {
            let n = n_per_label.min(pool.len());
            let start = (round.saturating_sub(1) as usize).wrapping_mul(n_per_label) % pool.len();
            out.extend((0..n).map(|k| GeneratedSample {
                text: pool[(start + k) % pool.len()].clone(),
                label: label as u32,
            }));
        }
        Ok(out)
    }
}

/// Generates samples with the coordinator's LLM, from the task's per-label prompts and
/// generation settings. Round `r` samples with seed `seed + r`, so a restarted coordinator
/// regenerates the same batch for an unfinished round. With [`LlmGenerator::with_tuning`] it
/// also learns from each round's feedback (see [`crate::tuning`]) and keeps its adapters in
/// a state directory, so a restart continues from the last tuned round.
pub struct LlmGenerator {
    llm: crate::llm::Llm,
    spec: crate::task::TaskSpec,
    seed: u64,
    tuning: Option<Tuning>,
    evaluator: Option<crate::tuning::Evaluator>,
}

struct Tuning {
    cfg: crate::tuning::TuningConfig,
    trainers: crate::tuning::Trainers,
    state_dir: std::path::PathBuf,
    /// Rounds up to this one are in the adapters.
    tuned_through: u64,
    /// General texts rehearsed beside the generation side.
    rehearsal: Vec<String>,
}

impl LlmGenerator {
    /// Wraps a loaded model for a task.
    pub fn new(llm: crate::llm::Llm, spec: crate::task::TaskSpec, seed: u64) -> Self {
        Self {
            llm,
            spec,
            seed,
            tuning: None,
            evaluator: None,
        }
    }

    /// Measures the model with `evaluator` before the first round and after each tuning.
    pub fn with_evaluator(mut self, evaluator: crate::tuning::Evaluator) -> Self {
        if !evaluator.is_empty() {
            self.evaluator = Some(evaluator);
        }
        self
    }

    /// Tunes the model on each round's feedback; adapters live in `state_dir` (the latest
    /// ones found there are loaded and applied now). A disabled config leaves the model frozen.
    pub fn with_tuning(
        mut self,
        cfg: crate::tuning::TuningConfig,
        state_dir: std::path::PathBuf,
    ) -> Result<Self> {
        if !cfg.enabled {
            return Ok(self);
        }
        use crate::tuning::Trainers;
        let (trainers, tuned_through) = match Trainers::latest_round(&state_dir) {
            Some(round) => {
                let trainers = Trainers::load(&self.llm, &cfg, &state_dir, round)?;
                tracing::info!(round, dir = %state_dir.display(), "LLM adapters loaded");
                (trainers, round)
            }
            None => (Trainers::new(&self.llm, &cfg), 0),
        };
        // Fresh adapters leave the model's output as it was; with split adapters the task
        // side's are then in place from the start, so classification never falls back to
        // the generation side's.
        trainers.apply(&mut self.llm);
        std::fs::create_dir_all(&state_dir).map_err(|source| Error::File {
            path: state_dir.clone(),
            source,
        })?;
        let rehearsal = crate::tuning::load_rehearsal(&cfg)?;
        self.tuning = Some(Tuning {
            cfg,
            trainers,
            state_dir,
            tuned_through,
            rehearsal,
        });
        Ok(self)
    }

    /// The model (for evaluation and tuning between rounds).
    pub fn llm_mut(&mut self) -> &mut crate::llm::Llm {
        &mut self.llm
    }

    /// The last round whose feedback the adapters hold, if tuning is on and one was tuned.
    pub fn tuned_through(&self) -> Option<u64> {
        self.tuning
            .as_ref()
            .map(|t| t.tuned_through)
            .filter(|&r| r > 0)
    }

    /// Writes the adapters the model generates with in PEFT's layout into `dir` (see
    /// [`crate::llm::peft`]); `base_model` is what the adapter config names as its base.
    pub fn export_peft(&self, dir: &std::path::Path, base_model: &str) -> Result<()> {
        let t = self
            .tuning
            .as_ref()
            .ok_or_else(|| Error::Model("no tuning, no adapters to export".into()))?;
        let adapters = t
            .trainers
            .generation
            .adapters()
            .ok_or_else(|| Error::Model("the LoRA trainer lost its adapters".into()))?;
        crate::llm::peft::export(
            &adapters,
            t.trainers.generation.config(),
            &self.llm.config,
            base_model,
            dir,
        )
    }
}

impl Generator for LlmGenerator {
    fn generate(
        &mut self,
        _task: &TaskInfo,
        n_per_label: usize,
        round: u64,
    ) -> Result<Vec<GeneratedSample>> {
        let g = &self.spec.generation;
        let sampling = crate::llm::Sampling {
            temperature: g.temperature,
            top_k: g.top_k,
            top_p: g.top_p,
            max_new_tokens: g.max_new_tokens,
            seed: round_seed(self.seed, round),
        };
        let started = std::time::Instant::now();
        let out = self.llm.generate(&self.spec, n_per_label, &sampling)?;
        tracing::info!(
            round,
            samples = out.len(),
            secs = started.elapsed().as_secs_f32(),
            "LLM generated samples"
        );
        Ok(out.into_iter().map(GeneratedSample::from).collect())
    }

    fn baseline(&mut self) -> Result<Option<LlmReport>> {
        match &self.evaluator {
            Some(e) => e.baseline(&self.llm, &self.spec).map(Some),
            None => Ok(None),
        }
    }

    fn feedback(
        &mut self,
        round: u64,
        samples: &[SyntheticSample],
        scores: &[AggregatedScore],
    ) -> Result<Option<LlmReport>> {
        let Some(t) = self.tuning.as_mut() else {
            return Ok(None);
        };
        let mut report = if round <= t.tuned_through {
            // A restart interrupted this round after its adapters were saved.
            let mut r = crate::tuning::LlmReport::new(round);
            r.tuned = true;
            r
        } else {
            let r = crate::tuning::tune(
                &mut self.llm,
                &mut t.trainers,
                &self.spec,
                &t.cfg,
                round,
                samples,
                scores,
                &t.rehearsal,
            )?;
            t.trainers.save(&t.state_dir, round)?;
            if t.tuned_through > 0 {
                crate::tuning::Trainers::remove(&t.state_dir, t.tuned_through);
            }
            t.tuned_through = round;
            r
        };
        if let Some(e) = &self.evaluator {
            e.evaluate(&self.llm, &self.spec, &mut report)?;
        }
        Ok(Some(report))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> TaskInfo {
        TaskInfo {
            name: "mr".into(),
            description: String::new(),
            labels: vec!["negative".into(), "positive".into()],
        }
    }

    #[test]
    fn serves_rotating_per_label_batches() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.jsonl");
        let mut s = String::new();
        for i in 0..5 {
            s += &format!("{{\"text\": \"bad {i}\", \"label\": \"negative\"}}\n");
            s += &format!("{{\"text\": \"good {i}\", \"label\": \"positive\"}}\n\n");
        }
        s += "{\"text\": \"good 0\", \"label\": \"positive\"}\n";
        std::fs::write(&p, s).unwrap();
        let mut g = FileGenerator::load(&p, &task()).unwrap();
        let r1 = g.generate(&task(), 2, 1).unwrap();
        let r2 = g.generate(&task(), 2, 2).unwrap();
        assert_eq!(r1.len(), 4);
        assert_eq!(r1.iter().filter(|s| s.label == 1).count(), 2);
        assert_ne!(r1, r2);
        assert_eq!(
            r1,
            g.generate(&task(), 2, 1).unwrap(),
            "same round, same batch"
        );
    }

    #[test]
    fn bad_lines_name_their_line_number() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.jsonl");
        std::fs::write(
            &p,
            "{\"text\": \"a\", \"label\": \"negative\"}\n{\"text\": \"b\", \"label\": \"meh\"}\n",
        )
        .unwrap();
        let err = FileGenerator::load(&p, &task()).unwrap_err().to_string();
        assert!(
            err.contains(":2:") && err.contains("unknown label"),
            "{err}"
        );
        std::fs::write(&p, "{\"text\": \"a\", \"label\": \"negative\"}\nnot json\n").unwrap();
        assert!(
            FileGenerator::load(&p, &task())
                .unwrap_err()
                .to_string()
                .contains(":2:")
        );
        std::fs::write(&p, "{\"text\": \"a\", \"label\": \"negative\"}\n").unwrap();
        assert!(
            FileGenerator::load(&p, &task())
                .unwrap_err()
                .to_string()
                .contains("no samples for label")
        );
    }
}
