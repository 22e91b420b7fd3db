//! The bridge between an on-device SLM and a round: [`SlmScorer`] scores synthetic samples
//! with any [`Slm`], mapping the task's labels onto the model's by name, and (with
//! [`Learning`]) trains the SLM on each round's scored samples beside its private data, the
//! client half of CrossLM.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::protocol::{AggregatedScore, SyntheticSample, TaskInfo};
use crate::slm::{Slm, TrainConfig, TrainExample, TrainProgress, accuracy};
use crate::transport::Scorer;
use crate::{Error, Result};

/// How a client learns from a finished round.
pub struct Learning {
    /// The private labeled examples (they never leave the device).
    pub private: Vec<TrainExample>,
    /// Local test split, `(texts, label indices)`, for the accuracy reported after a round.
    pub test: Option<(Vec<String>, Vec<usize>)>,
    /// Training settings for the per-round update.
    pub train: TrainConfig,
    /// Synthetic samples whose intended label's share against its strongest rival
    /// ([`AggregatedScore::rival_share`]; the aggregated quality with two labels) is below
    /// this are not trained on.
    pub min_quality: f32,
    /// The threshold applies from this round on, counting the rounds this scorer has learned
    /// from (1: always); earlier rounds keep every sample, still weighted by quality. Why:
    /// in the first rounds the scoring SLMs have seen only their private data, and a threshold
    /// on their scores can cost a client more good samples than bad ones.
    pub min_quality_from: u64,
    /// Learn from the clients' scores (CrossLM). `false` ignores them: every sample is
    /// trained on with its intended label and weight 1 (the "synthetic data without
    /// feedback" baseline, ZeroGen style).
    pub use_scores: bool,
    /// With scores: train toward the aggregated soft label (`true`) or toward the sample's
    /// intended label (`false`, the scores then only select and weight samples).
    pub soft_targets: bool,
    /// With scores: balance the kept samples' labels ([`label_balance`]).
    pub balance_labels: bool,
    /// With scores: scale the kept samples' weights so that they average 1, like the
    /// private examples' and the unscored baseline's. Quality then ranks samples against each
    /// other without shrinking the synthetic data's share of training as a whole (with
    /// qualities around 0.7, absolute weights gave it about a third less pull than the
    /// baseline that ignores the scores).
    pub relative_weights: bool,
    /// Where to save the updated model after each round.
    pub checkpoint: Option<PathBuf>,
}

/// Balances the labels of a round's kept samples (their intended labels, best-scored first):
/// each label keeps at most `cap` samples and at most twice as many as the scarcest label
/// (none at all when a label has no sample), and gets a weight factor that gives every label
/// the same total weight. Returns one factor per sample, 0 for a sample left out.
///
/// Why: the clients' SLMs are not equally sure of every label (under label skew especially),
/// so the samples that clear a quality threshold lean toward some labels; trained on as they
/// are, a model learns to answer those labels more often. The coordinator's LLM tuning uses
/// the same rule.
pub fn label_balance(labels: &[usize], n_labels: usize, cap: usize) -> Vec<f32> {
    let mut counts = vec![0usize; n_labels];
    for &l in labels {
        if let Some(c) = counts.get_mut(l) {
            *c += 1;
        }
    }
    let limit = counts
        .iter()
        .copied()
        .min()
        .unwrap_or(0)
        .saturating_mul(2)
        .min(cap);
    let taken: Vec<usize> = counts.iter().map(|c| (*c).min(limit)).collect();
    let total: usize = taken.iter().sum();
    let mean = total as f32 / n_labels.max(1) as f32;
    let mut seen = vec![0usize; n_labels];
    labels
        .iter()
        .map(|&l| match seen.get_mut(l) {
            Some(s) if *s < limit => {
                *s += 1;
                mean / taken[l] as f32
            }
            _ => 0.0,
        })
        .collect()
}

/// The training examples a CrossLM client takes from a round's scored samples: those at or
/// above `threshold`, labels balanced, weighted by quality (see [`Learning`]).
/// `map` gives the model's label index of each task label.
fn scored_examples(
    learning: &Learning,
    threshold: f32,
    map: &[usize],
    n_labels: usize,
    by_id: &HashMap<u64, &SyntheticSample>,
    scores: &[AggregatedScore],
) -> Vec<TrainExample> {
    let mut kept: Vec<(&SyntheticSample, &AggregatedScore, usize)> = scores
        .iter()
        .filter(|s| {
            s.quality.is_finite() && s.rival_share() >= threshold && s.soft.len() == map.len()
        })
        .filter_map(|sc| {
            let sample = by_id.get(&sc.id)?;
            let model_label = *map.get(sample.label as usize)?;
            Some((*sample, sc, model_label))
        })
        .collect();
    kept.sort_by(|a, b| b.1.quality.total_cmp(&a.1.quality));
    let factors = if learning.balance_labels {
        let labels: Vec<usize> = kept.iter().map(|k| k.2).collect();
        label_balance(&labels, n_labels, usize::MAX)
    } else {
        vec![1.0; kept.len()]
    };
    let mut out = Vec::new();
    for ((sample, sc, model_label), factor) in kept.into_iter().zip(factors) {
        if factor <= 0.0 {
            continue;
        }
        let mut target = vec![0.0; n_labels];
        if learning.soft_targets {
            for (task_label, &m) in map.iter().enumerate() {
                target[m] = sc.soft[task_label];
            }
        } else {
            target[model_label] = 1.0;
        }
        out.push(TrainExample {
            text: sample.text.clone(),
            target,
            weight: sc.quality * factor,
        });
    }
    let total: f32 = out.iter().map(|e| e.weight).sum();
    if learning.relative_weights && total > 0.0 {
        let scale = out.len() as f32 / total;
        out.iter_mut().for_each(|e| e.weight *= scale);
    }
    out
}

/// The quality threshold a CrossLM client applies in its `round`-th round (from 1): none
/// (0) before round `from`, `min_quality` from then on (see [`Learning::min_quality_from`]).
pub fn scheduled_threshold(min_quality: f32, from: u64, round: u64) -> f32 {
    if round >= from { min_quality } else { 0.0 }
}

/// Called after every optimizer step of the per-round training.
pub type TrainProgressFn = Box<dyn FnMut(&TrainProgress) + Send>;

/// Scores samples with an SLM.
pub struct SlmScorer {
    slm: Box<dyn Slm>,
    learning: Option<Learning>,
    train_progress: Option<TrainProgressFn>,
    /// Rounds learned from so far (for [`Learning::min_quality_from`]).
    learned: u64,
}

impl SlmScorer {
    /// Wraps a model.
    pub fn new(slm: Box<dyn Slm>) -> Self {
        Self {
            slm,
            learning: None,
            train_progress: None,
            learned: 0,
        }
    }

    /// Reports the progress of each round's training (progress bars, app callbacks).
    pub fn with_train_progress(mut self, f: TrainProgressFn) -> Self {
        self.train_progress = Some(f);
        self
    }

    /// Also train on each round's result (see [`Learning`]).
    pub fn with_learning(mut self, learning: Learning) -> Self {
        self.learning = Some(learning);
        self
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
    /// Trains on private data plus the round's synthetic samples, each weighted by its
    /// aggregated quality with the aggregated soft label as target, then reports the local
    /// test accuracy.
    fn learn(
        &mut self,
        task: &TaskInfo,
        samples: &[SyntheticSample],
        scores: &[AggregatedScore],
    ) -> Result<Option<f32>> {
        let map = self.label_map(task)?;
        let n_labels = self.slm.labels().len();
        let Some(learning) = self.learning.as_ref() else {
            return Ok(None);
        };
        let by_id: HashMap<u64, &SyntheticSample> = samples.iter().map(|s| (s.id, s)).collect();
        let mut examples = learning.private.clone();
        let before = examples.len();
        self.learned += 1;
        if learning.use_scores {
            let threshold = scheduled_threshold(
                learning.min_quality,
                learning.min_quality_from,
                self.learned,
            );
            examples.extend(scored_examples(
                learning, threshold, &map, n_labels, &by_id, scores,
            ));
        } else {
            for sample in samples {
                if let Some(&model_label) = map.get(sample.label as usize) {
                    examples.push(TrainExample::hard(
                        sample.text.clone(),
                        model_label,
                        n_labels,
                    ));
                }
            }
        }
        tracing::info!(
            private = before,
            synthetic = examples.len() - before,
            "training on the round's result"
        );
        let mut no_progress = |_: &TrainProgress| {};
        let progress: &mut dyn FnMut(&TrainProgress) = match self.train_progress.as_mut() {
            Some(f) => f,
            None => &mut no_progress,
        };
        self.slm.train(&examples, &learning.train, progress)?;
        if let Some(dir) = &learning.checkpoint {
            self.slm.save(dir)?;
        }
        match &learning.test {
            Some((texts, labels)) => {
                let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
                Ok(Some(accuracy(self.slm.as_ref(), &texts, labels)? as f32))
            }
            None => Ok(None),
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slm::{Backend, small_test_bag};

    #[test]
    fn label_balance_caps_and_evens_the_labels() {
        // 5 of label 0, 2 of label 1: label 0 keeps its best 4, each label weighs 3 in all.
        let f = label_balance(&[0, 0, 1, 0, 0, 1, 0], 2, usize::MAX);
        assert_eq!(f, vec![0.75, 0.75, 1.5, 0.75, 0.75, 1.5, 0.0]);
        // The cap applies first.
        assert_eq!(label_balance(&[0, 1, 0, 1], 2, 1), vec![1.0, 1.0, 0.0, 0.0]);
        // A label with no sample: nothing is kept.
        assert_eq!(label_balance(&[0, 0], 2, 10), vec![0.0, 0.0]);
        assert!(label_balance(&[], 2, 10).is_empty());
    }

    fn small_bag() -> Box<dyn Slm> {
        Box::new(small_test_bag(
            vec!["neg".into(), "pos".into()],
            Backend::Flex,
        ))
    }

    /// Enough steps for the small bag model to learn the toy samples from any random start:
    /// at MiniLM's defaults (one batch an epoch, lr 5e-3) it stayed at chance in about 1 run
    /// of 25.
    fn bag_training() -> TrainConfig {
        TrainConfig {
            epochs: 30,
            learning_rate: 2e-2,
            validation_fraction: 0.0,
            batch_size: 4,
            ..TrainConfig::for_arch(crate::slm::Arch::Bag)
        }
    }

    fn task(labels: &[&str]) -> TaskInfo {
        TaskInfo {
            name: "t".into(),
            description: String::new(),
            labels: labels.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn samples() -> Vec<SyntheticSample> {
        (0..8)
            .map(|i| SyntheticSample {
                id: i,
                text: if i % 2 == 0 {
                    format!("awful dull boring mess {i}")
                } else {
                    format!("wonderful moving great film {i}")
                },
                label: (i % 2) as u32,
            })
            .collect()
    }

    #[test]
    fn scores_follow_the_task_label_order() {
        let mut s = SlmScorer::new(small_bag());
        let a = s.score(&task(&["neg", "pos"]), &samples()).unwrap();
        let b = s.score(&task(&["pos", "neg"]), &samples()).unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x[0] - y[1]).abs() < 1e-6 && (x[1] - y[0]).abs() < 1e-6);
            assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        let err = s
            .score(&task(&["neg", "meh"]), &samples())
            .unwrap_err()
            .to_string();
        assert!(err.contains("meh"), "{err}");
    }

    #[test]
    fn learning_trains_on_scored_samples_saves_and_reports_accuracy() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("ckpt");
        let s = samples();
        let texts: Vec<String> = s.iter().map(|x| x.text.clone()).collect();
        let labels: Vec<usize> = s.iter().map(|x| x.label as usize).collect();
        let train = bag_training();
        let mut scorer = SlmScorer::new(small_bag()).with_learning(Learning {
            private: vec![
                TrainExample::hard("awful film", 0, 2),
                TrainExample::hard("great film", 1, 2),
            ],
            test: Some((texts, labels)),
            train,
            min_quality: 0.5,
            min_quality_from: 1,
            use_scores: true,
            soft_targets: true,
            balance_labels: false,
            relative_weights: true,
            checkpoint: Some(ckpt.clone()),
        });
        // Aggregated scores: confident and right, so the model should learn the samples.
        let scores: Vec<AggregatedScore> = s
            .iter()
            .map(|x| {
                let soft = if x.label == 0 {
                    vec![0.9, 0.1]
                } else {
                    vec![0.1, 0.9]
                };
                AggregatedScore {
                    id: x.id,
                    quality: 0.9,
                    soft,
                }
            })
            .collect();
        let acc = scorer
            .learn(&task(&["neg", "pos"]), &s, &scores)
            .unwrap()
            .expect("accuracy");
        assert!(
            acc >= 0.99,
            "trained on the scored samples themselves, accuracy {acc}"
        );
        assert!(ckpt.join("meta.json").exists(), "checkpoint updated");
        // Without learning configured, learn is a no-op.
        let mut plain = SlmScorer::new(small_bag());
        assert_eq!(
            plain.learn(&task(&["neg", "pos"]), &s, &scores).unwrap(),
            None
        );
    }

    /// Without feedback every sample counts with its intended label, whatever the scores.
    #[test]
    fn learning_without_scores_uses_intended_labels() {
        let s = samples();
        let texts: Vec<String> = s.iter().map(|x| x.text.clone()).collect();
        let labels: Vec<usize> = s.iter().map(|x| x.label as usize).collect();
        // Scores that would make a CrossLM learner skip (and mislabel) every sample.
        let scores: Vec<AggregatedScore> = s
            .iter()
            .map(|x| AggregatedScore {
                id: x.id,
                quality: 0.1,
                soft: if x.label == 0 {
                    vec![0.1, 0.9]
                } else {
                    vec![0.9, 0.1]
                },
            })
            .collect();
        let learner = |use_scores, min_quality_from| Learning {
            private: vec![],
            test: Some((texts.clone(), labels.clone())),
            train: bag_training(),
            min_quality: 0.5,
            min_quality_from,
            use_scores,
            soft_targets: true,
            balance_labels: false,
            relative_weights: true,
            checkpoint: None,
        };
        let mut unscored = SlmScorer::new(small_bag()).with_learning(learner(false, 1));
        let acc = unscored
            .learn(&task(&["neg", "pos"]), &s, &scores)
            .unwrap()
            .unwrap();
        assert!(acc >= 0.99, "accuracy {acc}");
        // With scores, nothing clears the threshold and there is nothing to train on.
        let mut scored = SlmScorer::new(small_bag()).with_learning(learner(true, 1));
        assert!(scored.learn(&task(&["neg", "pos"]), &s, &scores).is_err());
        // A threshold from round 2 on: the first round keeps every sample, the second none.
        let mut later = SlmScorer::new(small_bag()).with_learning(learner(true, 2));
        assert!(later.learn(&task(&["neg", "pos"]), &s, &scores).is_ok());
        assert!(later.learn(&task(&["neg", "pos"]), &s, &scores).is_err());
    }

    /// Kept samples: threshold, balance, and weights relative (mean 1) or absolute.
    #[test]
    fn scored_examples_keep_balance_and_weigh() {
        let s: Vec<SyntheticSample> = (0..5)
            .map(|i| SyntheticSample {
                id: i,
                text: format!("sample {i}"),
                label: u32::from(i >= 3),
            })
            .collect();
        // Qualities: three negatives (0.9, 0.6, 0.3), two positives (0.8, 0.7).
        let q = [0.9f32, 0.6, 0.3, 0.8, 0.7];
        let scores: Vec<AggregatedScore> = s
            .iter()
            .zip(q)
            .map(|(x, q)| AggregatedScore {
                id: x.id,
                quality: q,
                soft: if x.label == 0 {
                    vec![q, 1.0 - q]
                } else {
                    vec![1.0 - q, q]
                },
            })
            .collect();
        let by_id: HashMap<u64, &SyntheticSample> = s.iter().map(|x| (x.id, x)).collect();
        let mut learning = Learning {
            private: vec![],
            test: None,
            train: TrainConfig::default(),
            min_quality: 0.5,
            min_quality_from: 1,
            use_scores: true,
            soft_targets: false,
            balance_labels: true,
            relative_weights: false,
            checkpoint: None,
        };
        // The model orders the labels the other way round.
        let map = [1, 0];
        let abs = scored_examples(&learning, 0.5, &map, 2, &by_id, &scores);
        assert_eq!(abs.len(), 4, "the 0.3 sample is below the threshold");
        let w: Vec<f32> = abs.iter().map(|e| e.weight).collect();
        assert!(
            (w[0] - 0.9).abs() < 1e-6 && (w[3] - 0.6).abs() < 1e-6,
            "{w:?}"
        );
        assert_eq!(
            abs[0].target,
            vec![0.0, 1.0],
            "negative is the model's label 1"
        );
        learning.relative_weights = true;
        let rel = scored_examples(&learning, 0.5, &map, 2, &by_id, &scores);
        let total: f32 = rel.iter().map(|e| e.weight).sum();
        assert!((total - 4.0).abs() < 1e-5, "weights average 1: {total}");
        assert!(
            (rel[0].weight / rel[3].weight - 1.5).abs() < 1e-5,
            "ranks kept"
        );
    }
}
