//! The bridge between an on-device SLM and a round: [`SlmScorer`] scores synthetic samples
//! with any [`Slm`], mapping the task's labels onto the model's by name.

use crate::protocol::{SyntheticSample, TaskInfo};
use crate::slm::Slm;
use crate::transport::Scorer;
use crate::{Error, Result};

/// Scores samples with an SLM.
pub struct SlmScorer {
    slm: Box<dyn Slm>,
}

impl SlmScorer {
    /// Wraps a model.
    pub fn new(slm: Box<dyn Slm>) -> Self {
        Self { slm }
    }

    /// The model back.
    pub fn into_inner(self) -> Box<dyn Slm> {
        self.slm
    }

    /// For each task label, the index of the same-named label in the model.
    fn label_map(&self, task: &TaskInfo) -> Result<Vec<usize>> {
        let labels = self.slm.labels();
        task.labels
            .iter()
            .map(|l| {
                labels.iter().position(|m| m == l).ok_or_else(|| {
                    Error::Model(format!(
                        "task {} has label {l:?} that this SLM (labels {labels:?}) does not know",
                        task.name
                    ))
                })
            })
            .collect()
    }
}

impl Scorer for SlmScorer {
    fn score(&mut self, task: &TaskInfo, samples: &[SyntheticSample]) -> Result<Vec<Vec<f32>>> {
        let map = self.label_map(task)?;
        let texts: Vec<&str> = samples.iter().map(|s| s.text.as_str()).collect();
        let probs = self.slm.predict_proba(&texts)?;
        Ok(probs
            .into_iter()
            .map(|p| {
                // Renormalise over the task's labels (a model may know more labels).
                let row: Vec<f32> = map.iter().map(|&i| p[i]).collect();
                let sum: f32 = row.iter().sum();
                if sum > 0.0 {
                    row.iter().map(|x| x / sum).collect()
                } else {
                    vec![1.0 / row.len() as f32; row.len()]
                }
            })
            .collect())
    }
}
