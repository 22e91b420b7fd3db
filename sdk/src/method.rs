//! The client half of CrossLM's rules, as pure functions: which of a round's scored samples a
//! client trains on, with what target and weight, and the label balance that the
//! coordinator's LLM tuning applies too. No model, no network: every rule is tested here.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::protocol::{AggregatedScore, LearnSettings, SyntheticSample};

/// The coordinator's side of [`LearnSettings`]: the settings it sends with every round, and
/// from which round on their quality threshold applies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LearnSchedule {
    /// What clients are told.
    #[serde(flatten)]
    pub settings: LearnSettings,
    /// `min_quality` applies from this round on (1: always); earlier rounds keep every
    /// sample, still weighted by quality. Why: in the first rounds the scoring SLMs have seen
    /// only their private data, and a threshold on their scores can cost a client more good
    /// samples than bad ones.
    pub min_quality_from_round: u64,
}

impl Default for LearnSchedule {
    fn default() -> Self {
        Self {
            settings: LearnSettings::default(),
            min_quality_from_round: 1,
        }
    }
}

impl LearnSchedule {
    /// The settings of round `round` (from 1).
    pub fn for_round(&self, round: u64) -> LearnSettings {
        LearnSettings {
            min_quality: scheduled_threshold(
                self.settings.min_quality,
                self.min_quality_from_round,
                round,
            ),
            ..self.settings.clone()
        }
    }
}

/// The quality threshold of round `round` (from 1): none (0) before round `from`,
/// `min_quality` from then on.
pub fn scheduled_threshold(min_quality: f32, from: u64, round: u64) -> f32 {
    if round >= from { min_quality } else { 0.0 }
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

/// One synthetic example a client trains on.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundExample {
    /// The sample's text.
    pub text: String,
    /// Target distribution over the model's labels.
    pub target: Vec<f32>,
    /// Loss weight.
    pub weight: f32,
}

/// The synthetic examples a client trains on after a round. `map` gives the model's label
/// index of each task label, `n_labels` the model's label count.
///
/// With scores: the samples whose rival share reaches `settings.min_quality`, best first,
/// labels balanced when asked, weighted by quality (scaled to average 1 with
/// `relative_weights`), targets the intended label or the soft label. Without: every sample
/// with its intended label and weight 1.
pub fn round_examples(
    settings: &LearnSettings,
    map: &[usize],
    n_labels: usize,
    samples: &[SyntheticSample],
    scores: &[AggregatedScore],
) -> Vec<RoundExample> {
    let hard = |label: usize| {
        let mut t = vec![0.0; n_labels];
        t[label] = 1.0;
        t
    };
    if !settings.use_scores {
        return samples
            .iter()
            .filter_map(|s| {
                let &label = map.get(s.label as usize)?;
                (label < n_labels).then(|| RoundExample {
                    text: s.text.clone(),
                    target: hard(label),
                    weight: 1.0,
                })
            })
            .collect();
    }
    let by_id: HashMap<u64, &SyntheticSample> = samples.iter().map(|s| (s.id, s)).collect();
    let mut kept: Vec<(&SyntheticSample, &AggregatedScore, usize)> = scores
        .iter()
        .filter(|s| {
            s.quality.is_finite()
                && s.rival_share() >= settings.min_quality
                && s.soft.len() == map.len()
        })
        .filter_map(|sc| {
            let sample = by_id.get(&sc.id)?;
            let label = *map.get(sample.label as usize)?;
            (label < n_labels).then_some((*sample, sc, label))
        })
        .collect();
    kept.sort_by(|a, b| b.1.quality.total_cmp(&a.1.quality));
    let factors = if settings.balance_labels {
        let labels: Vec<usize> = kept.iter().map(|k| k.2).collect();
        label_balance(&labels, n_labels, usize::MAX)
    } else {
        vec![1.0; kept.len()]
    };
    let mut out = Vec::new();
    for ((sample, sc, label), factor) in kept.into_iter().zip(factors) {
        if factor <= 0.0 {
            continue;
        }
        let target = if settings.soft_targets {
            let mut t = vec![0.0; n_labels];
            for (task_label, &m) in map.iter().enumerate() {
                if let Some(slot) = t.get_mut(m) {
                    *slot = sc.soft[task_label];
                }
            }
            t
        } else {
            hard(label)
        };
        out.push(RoundExample {
            text: sample.text.clone(),
            target,
            weight: sc.quality * factor,
        });
    }
    let total: f32 = out.iter().map(|e| e.weight).sum();
    if settings.relative_weights && total > 0.0 {
        let scale = out.len() as f32 / total;
        out.iter_mut().for_each(|e| e.weight *= scale);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: u64, label: u32) -> SyntheticSample {
        SyntheticSample {
            id,
            text: format!("sample {id}"),
            label,
        }
    }

    fn score(id: u64, quality: f32) -> AggregatedScore {
        AggregatedScore {
            id,
            quality,
            soft: vec![quality, 1.0 - quality],
        }
    }

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

    #[test]
    fn the_threshold_applies_from_its_round() {
        let s = LearnSchedule {
            settings: LearnSettings {
                min_quality: 0.6,
                ..LearnSettings::default()
            },
            min_quality_from_round: 3,
        };
        assert_eq!(s.for_round(1).min_quality, 0.0);
        assert_eq!(s.for_round(2).min_quality, 0.0);
        assert_eq!(s.for_round(3).min_quality, 0.6);
        assert_eq!(s.for_round(9).min_quality, 0.6);
        assert_eq!(s.for_round(3).soft_targets, s.settings.soft_targets);
    }

    #[test]
    fn scored_examples_select_balance_and_weigh() {
        let samples: Vec<_> = (0..6).map(|i| sample(i, (i % 2) as u32)).collect();
        // Label 0: ids 0, 2, 4; label 1: ids 1, 3, 5. Id 5 is below the threshold.
        let scores = [0.9, 0.8, 0.7, 0.6, 0.55, 0.2]
            .iter()
            .enumerate()
            .map(|(i, &q)| score(i as u64, q))
            .collect::<Vec<_>>();
        let settings = LearnSettings {
            min_quality: 0.5,
            balance_labels: false,
            relative_weights: false,
            ..LearnSettings::default()
        };
        let out = round_examples(&settings, &[0, 1], 2, &samples, &scores);
        assert_eq!(out.len(), 5);
        assert_eq!(out[0].text, "sample 0");
        assert_eq!(out[0].target, vec![1.0, 0.0]);
        assert_eq!(out[1].target, vec![0.0, 1.0]);
        assert!((out[0].weight - 0.9).abs() < 1e-6);
        // Relative weights average 1.
        let rel = LearnSettings {
            relative_weights: true,
            ..settings.clone()
        };
        let out = round_examples(&rel, &[0, 1], 2, &samples, &scores);
        let mean = out.iter().map(|e| e.weight).sum::<f32>() / out.len() as f32;
        assert!((mean - 1.0).abs() < 1e-5);
        // Balanced: label 0 has 3 kept, label 1 has 2 -> all 5 stay (cap is twice), equal
        // total weight per label.
        let bal = LearnSettings {
            balance_labels: true,
            ..settings.clone()
        };
        let out = round_examples(&bal, &[0, 1], 2, &samples, &scores);
        let w = |t: usize| -> f32 {
            out.iter()
                .filter(|e| e.target[t] == 1.0)
                .map(|e| e.weight)
                .sum()
        };
        assert_eq!(out.len(), 5);
        let ratio = w(0) / w(1);
        let expected = (0.9 + 0.7 + 0.55) / 3.0 / ((0.8 + 0.6) / 2.0);
        assert!((ratio - expected).abs() < 1e-5, "{ratio} vs {expected}");
        // Soft targets follow the task-to-model label map.
        let soft = LearnSettings {
            soft_targets: true,
            ..settings
        };
        let out = round_examples(&soft, &[1, 0], 2, &samples, &scores);
        assert_eq!(out[0].target[1], 0.9);
        assert!((out[0].target[0] - 0.1).abs() < 1e-6, "{:?}", out[0].target);
    }

    #[test]
    fn without_scores_every_sample_counts_once_with_its_label() {
        let samples: Vec<_> = (0..4).map(|i| sample(i, (i % 2) as u32)).collect();
        let settings = LearnSettings {
            use_scores: false,
            ..LearnSettings::default()
        };
        // No scores at all: the baseline needs none.
        let out = round_examples(&settings, &[1, 0], 2, &samples, &[]);
        assert_eq!(out.len(), 4);
        assert!(out.iter().all(|e| e.weight == 1.0));
        assert_eq!(out[0].target, vec![0.0, 1.0]);
        // A sample whose label the map lacks is skipped, not a panic.
        let odd = [sample(9, 7)];
        assert!(round_examples(&settings, &[0, 1], 2, &odd, &[]).is_empty());
    }
}
