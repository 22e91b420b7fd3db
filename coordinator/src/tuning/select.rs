//! Which of a round's scored samples the LLM trains on, and as what: generation-side and
//! task-side examples, preference pairs, rehearsal texts.

use crosslm_sdk::method::label_balance;
use crosslm_sdk::protocol::{AggregatedScore, SyntheticSample};
use rand::SeedableRng;
use rand::seq::IndexedRandom;

use crate::llm::train::{PreferencePair, TrainExample};
use crate::task::TaskSpec;

use super::config::{PairSource, PreferenceConfig, TaskTargets, TuningConfig};

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
    chat: &dyn Fn(&str) -> String,
    spec: &TaskSpec,
    cfg: &TuningConfig,
    samples: &[SyntheticSample],
    scores: &[AggregatedScore],
) -> FeedbackExamples {
    let mut scored = scored_samples(spec, samples, scores);
    scored.retain(|(_, s)| s.quality.is_finite() && s.rival_share() >= cfg.min_quality);
    scored.sort_by(|a, b| b.1.quality.total_cmp(&a.1.quality));
    let kept = balanced(spec, cfg, scored.clone());
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
            .map(|&n| {
                (n as f32 * cfg.experimental.generation_skip_best.clamp(0.0, 1.0)).floor() as usize
            })
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
                prompt: chat(p),
                completion: sample.text.clone(),
                weight: score.quality * balance,
            });
        }
    }
    for ((sample, score), balance) in &kept {
        let label = &spec.labels[sample.label as usize];
        if cfg.task_side {
            let prompt = chat(&spec.classify_prompt(&sample.text));
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
    chat: &dyn Fn(&str) -> String,
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
                prompt: chat(p),
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
