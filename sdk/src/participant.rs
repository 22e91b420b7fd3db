//! The bridge between an on-device SLM and a round: [`SlmScorer`] scores synthetic samples
//! with any [`Slm`], mapping the task's labels onto the model's by name, and (with
//! [`Learning`]) trains the SLM on each round's scored samples beside its private data, the
//! client half of CrossLM. Which samples, targets and weights: [`crate::method`].

use std::path::PathBuf;

use crate::method::round_examples;
use crate::protocol::{AggregatedScore, LearnSettings, SyntheticSample, TaskInfo};
use crate::rounds::Scorer;
use crate::slm::{Slm, TrainConfig, TrainExample, TrainProgress, accuracy};
use crate::{Error, Result};

/// How a client learns from a finished round.
pub struct Learning {
    /// The private labeled examples (they never leave the device).
    pub private: Vec<TrainExample>,
    /// Local test split, `(texts, label indices)`, for the accuracy reported after a round.
    pub test: Option<(Vec<String>, Vec<usize>)>,
    /// Training settings of the per-round update; a round's [`LearnSettings`] may override its
    /// epochs, learning rate and batch size.
    pub train: TrainConfig,
    /// What applies when the coordinator sends no [`LearnSettings`] with a round.
    pub defaults: LearnSettings,
    /// Where to save the updated model after each round.
    pub checkpoint: Option<PathBuf>,
}

impl Learning {
    /// The update's training settings for an SLM of `arch` under a round's `settings`.
    pub fn train_config(&self, arch: &str, settings: &LearnSettings) -> TrainConfig {
        let mut train = self.train.clone();
        let Some(t) = settings.training.iter().find(|t| t.arch == arch) else {
            return train;
        };
        if let Some(e) = t.epochs.filter(|&e| e > 0) {
            train.epochs = e as usize;
        }
        if let Some(lr) = t.learning_rate.filter(|lr| lr.is_finite() && *lr > 0.0) {
            train.learning_rate = lr;
        }
        if let Some(b) = t.batch_size.filter(|&b| b > 0) {
            train.batch_size = b as usize;
        }
        train
    }
}

/// Called after every optimizer step of the per-round training.
pub type TrainProgressFn = Box<dyn FnMut(&TrainProgress) + Send>;

/// Scores samples with an SLM.
pub struct SlmScorer {
    slm: Box<dyn Slm>,
    learning: Option<Learning>,
    train_progress: Option<TrainProgressFn>,
    pool: Option<std::sync::Arc<rayon::ThreadPool>>,
}

impl SlmScorer {
    /// Wraps a model.
    pub fn new(slm: Box<dyn Slm>) -> Self {
        Self {
            slm,
            learning: None,
            train_progress: None,
            pool: None,
        }
    }

    /// Scores and trains on `pool`'s threads (a capped pool: burn's CPU backend splits its
    /// work over the pool it runs in) instead of rayon's global one.
    pub fn with_pool(mut self, pool: Option<std::sync::Arc<rayon::ThreadPool>>) -> Self {
        self.pool = pool;
        self
    }

    /// Runs `f` on the scorer's pool, if it has one.
    fn in_pool<R: Send>(&mut self, f: impl FnOnce(&mut Self) -> R + Send) -> R {
        match self.pool.clone() {
            Some(pool) => pool.install(|| f(self)),
            None => f(self),
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
    /// Trains on private data plus the round's synthetic samples chosen by
    /// [`round_examples`] under the round's settings (else [`Learning::defaults`]), saves the
    /// model, then reports the local test accuracy.
    fn learn(
        &mut self,
        task: &TaskInfo,
        samples: &[SyntheticSample],
        scores: &[AggregatedScore],
        settings: Option<&LearnSettings>,
    ) -> Result<Option<f32>> {
        self.in_pool(|s| s.learn_here(task, samples, scores, settings))
    }

    fn score(&mut self, task: &TaskInfo, samples: &[SyntheticSample]) -> Result<Vec<Vec<f32>>> {
        self.in_pool(|s| s.score_here(task, samples))
    }
}

impl SlmScorer {
    fn learn_here(
        &mut self,
        task: &TaskInfo,
        samples: &[SyntheticSample],
        scores: &[AggregatedScore],
        settings: Option<&LearnSettings>,
    ) -> Result<Option<f32>> {
        let map = self.label_map(task)?;
        let n_labels = self.slm.labels().len();
        let Some(learning) = self.learning.as_ref() else {
            return Ok(None);
        };
        let settings = settings.unwrap_or(&learning.defaults);
        let mut examples = learning.private.clone();
        let before = examples.len();
        examples.extend(
            round_examples(settings, &map, n_labels, samples, scores)
                .into_iter()
                .map(|e| TrainExample {
                    text: e.text,
                    target: e.target,
                    weight: e.weight,
                }),
        );
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
        let train = learning.train_config(&self.slm.arch().to_string(), settings);
        self.slm.train(&examples, &train, progress)?;
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

    fn score_here(
        &mut self,
        task: &TaskInfo,
        samples: &[SyntheticSample],
    ) -> Result<Vec<Vec<f32>>> {
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
            defaults: LearnSettings {
                soft_targets: true,
                balance_labels: false,
                ..LearnSettings::default()
            },
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
            .learn(&task(&["neg", "pos"]), &s, &scores, None)
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
            plain
                .learn(&task(&["neg", "pos"]), &s, &scores, None)
                .unwrap(),
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
        let learner = || Learning {
            private: vec![],
            test: Some((texts.clone(), labels.clone())),
            train: bag_training(),
            defaults: LearnSettings::default(),
            checkpoint: None,
        };
        let settings = |use_scores| LearnSettings {
            use_scores,
            soft_targets: true,
            balance_labels: false,
            ..LearnSettings::default()
        };
        let t = task(&["neg", "pos"]);
        let mut unscored = SlmScorer::new(small_bag()).with_learning(learner());
        let acc = unscored
            .learn(&t, &s, &scores, Some(&settings(false)))
            .unwrap()
            .unwrap();
        assert!(acc >= 0.99, "accuracy {acc}");
        // With scores, nothing clears the threshold and there is nothing to train on.
        let mut scored = SlmScorer::new(small_bag()).with_learning(learner());
        assert!(
            scored
                .learn(&t, &s, &scores, Some(&settings(true)))
                .is_err()
        );
        // The round's settings decide, not the defaults: a threshold of 0 keeps every sample.
        let open = LearnSettings {
            min_quality: 0.0,
            ..settings(true)
        };
        assert!(scored.learn(&t, &s, &scores, Some(&open)).is_ok());
        // No settings sent: the learner's defaults (threshold 0.5) apply.
        assert!(scored.learn(&t, &s, &scores, None).is_err());
    }

    /// A round's schedule for this model's architecture overrides the update's settings;
    /// another architecture's entry, or a field left out, keeps the client's own.
    #[test]
    fn round_training_follows_the_own_architecture_entry() {
        let learning = Learning {
            private: vec![],
            test: None,
            train: bag_training(),
            defaults: LearnSettings::default(),
            checkpoint: None,
        };
        let entry = |arch: &str| crate::protocol::ArchTraining {
            arch: arch.into(),
            epochs: Some(4),
            learning_rate: Some(1e-3),
            batch_size: None,
        };
        let settings = LearnSettings {
            training: vec![entry("minilm"), entry("bag")],
            ..LearnSettings::default()
        };
        let t = learning.train_config("bag", &settings);
        assert_eq!((t.epochs, t.learning_rate), (4, 1e-3));
        assert_eq!(t.batch_size, bag_training().batch_size);
        let other = LearnSettings {
            training: vec![entry("minilm")],
            ..LearnSettings::default()
        };
        let t = learning.train_config("bag", &other);
        assert_eq!(t.epochs, bag_training().epochs);
    }
}
