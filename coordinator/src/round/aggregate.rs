//! Aggregation of per-client label probabilities into one soft label per sample.

use crosslm_sdk::protocol::{AggregatedScore, SyntheticSample};
use serde::{Deserialize, Serialize};

/// How client scores are combined.
///
/// Externally tagged (postcard, our store's encoding, cannot read internally tagged enums):
/// in TOML, `aggregation = "median"` or `aggregation = { trimmed_mean = { trim = 0.1 } }`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Mean weighted by each client's number of private examples (the default).
    #[default]
    WeightedMean,
    /// Per label, drop the `trim` fraction of lowest and highest values, then average.
    /// Robust to a minority of broken or hostile clients.
    TrimmedMean {
        /// Fraction trimmed from each end, in [0, 0.5).
        trim: f32,
    },
    /// Per label, the median over clients; the most robust option.
    Median,
}

/// One sample's aggregated score from its clients' votes `(weight, probs)`: the soft label
/// ([`combine`]) and the quality, the soft label's probability of the intended label.
pub fn score_sample(
    method: Aggregation,
    sample: &SyntheticSample,
    votes: &[(f64, &[f32])],
) -> AggregatedScore {
    let soft = combine(method, votes);
    let quality = soft.get(sample.label as usize).copied().unwrap_or(0.0);
    AggregatedScore {
        id: sample.id,
        quality,
        soft,
    }
}

/// Combines the probability vectors of several clients for one sample.
///
/// `votes` holds `(weight, probs)` per client, all of the same length. The result is
/// renormalised to sum to 1 (robust statistics taken per label do not keep the sum).
pub fn combine(method: Aggregation, votes: &[(f64, &[f32])]) -> Vec<f32> {
    let Some(n_labels) = votes.first().map(|v| v.1.len()) else {
        return Vec::new();
    };
    let mut out: Vec<f64> = match method {
        Aggregation::WeightedMean => {
            let total: f64 = votes.iter().map(|v| v.0.max(0.0)).sum();
            // All-zero weights (clients reporting no data) fall back to a plain mean.
            let (total, uniform) = if total > 0.0 {
                (total, false)
            } else {
                (votes.len() as f64, true)
            };
            (0..n_labels)
                .map(|l| {
                    votes
                        .iter()
                        .map(|(w, p)| if uniform { 1.0 } else { w.max(0.0) } * p[l] as f64)
                        .sum::<f64>()
                        / total
                })
                .collect()
        }
        Aggregation::TrimmedMean { trim } => (0..n_labels)
            .map(|l| {
                let mut col: Vec<f64> = votes.iter().map(|v| v.1[l] as f64).collect();
                col.sort_by(f64::total_cmp);
                let k = ((col.len() as f64) * trim.clamp(0.0, 0.499) as f64).floor() as usize;
                let kept = &col[k..col.len() - k];
                kept.iter().sum::<f64>() / kept.len() as f64
            })
            .collect(),
        Aggregation::Median => (0..n_labels)
            .map(|l| {
                let mut col: Vec<f64> = votes.iter().map(|v| v.1[l] as f64).collect();
                col.sort_by(f64::total_cmp);
                let m = col.len() / 2;
                if col.len() % 2 == 1 {
                    col[m]
                } else {
                    (col[m - 1] + col[m]) / 2.0
                }
            })
            .collect(),
    };
    let sum: f64 = out.iter().sum();
    if sum > 0.0 {
        out.iter_mut().for_each(|x| *x /= sum);
    } else {
        out.iter_mut().for_each(|x| *x = 1.0 / n_labels as f64);
    }
    out.into_iter().map(|x| x as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5)
    }

    #[test]
    fn weighted_mean_weights_by_data_size() {
        let a = [0.9f32, 0.1];
        let b = [0.1f32, 0.9];
        let out = combine(Aggregation::WeightedMean, &[(3.0, &a), (1.0, &b)]);
        assert!(close(&out, &[0.7, 0.3]), "{out:?}");
        let zero = combine(Aggregation::WeightedMean, &[(0.0, &a), (0.0, &b)]);
        assert!(close(&zero, &[0.5, 0.5]), "{zero:?}");
    }

    #[test]
    fn robust_options_ignore_an_outlier() {
        let good = [0.8f32, 0.2];
        let bad = [0.0f32, 1.0];
        let votes = [
            (1.0, &good[..]),
            (1.0, &good[..]),
            (1.0, &good[..]),
            (1.0, &good[..]),
            (100.0, &bad[..]),
        ];
        let med = combine(Aggregation::Median, &votes);
        assert!(close(&med, &[0.8, 0.2]), "{med:?}");
        let tm = combine(Aggregation::TrimmedMean { trim: 0.2 }, &votes);
        assert!(close(&tm, &[0.8, 0.2]), "{tm:?}");
        let wm = combine(Aggregation::WeightedMean, &votes);
        assert!(
            wm[1] > 0.9,
            "weighted mean follows the heavy outlier: {wm:?}"
        );
    }

    #[test]
    fn median_of_even_count_averages_and_renormalises() {
        let a = [0.6f32, 0.4];
        let b = [0.2f32, 0.8];
        let out = combine(Aggregation::Median, &[(1.0, &a), (1.0, &b)]);
        assert!(close(&out, &[0.4, 0.6]), "{out:?}");
        assert!((out.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
