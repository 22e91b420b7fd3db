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
    /// Per label, the median over clients. Robust to extreme votes, but with `k` attackers
    /// voting one way it becomes a low (or high) quantile of the honest votes.
    Median,
    /// The weighted mean over the clients whose scores track the others' ([`agreement`]
    /// above `min_agreement`, per round); the rest are left out of the round. Clients that
    /// score every sample alike (constant, uniform, always one way) have agreement 0 and
    /// those that invert the others' judgement a negative one. `0.0` is the natural setting.
    ScreenedMean {
        /// Least agreement (a correlation, in [-1, 1)) a client needs to be counted.
        min_agreement: f32,
    },
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

/// Removes one client's label bias from its scores of a batch (a prior-shift correction):
/// each label's probability is divided by the client's mean probability of that label over
/// the batch, multiplied by the batch's share of samples written for that label, and each
/// row renormalized. Why: a client whose private data is mostly one label (label skew) leans
/// toward that label for every sample, so its votes would drop the other labels' samples,
/// the very ones it lacks; a client that answers the same for every sample carries no signal
/// and becomes uniform. `rows[i]` scores `samples[i]`.
pub fn correct_prior(rows: &[&[f32]], samples: &[SyntheticSample]) -> Vec<Vec<f32>> {
    let Some(n_labels) = rows.first().map(|r| r.len()) else {
        return Vec::new();
    };
    let n = rows.len() as f64;
    let mut prior = vec![0.0f64; n_labels];
    for r in rows {
        for (p, x) in prior.iter_mut().zip(r.iter()) {
            *p += *x as f64 / n;
        }
    }
    let mut target = vec![0.0f64; n_labels];
    for s in samples {
        if let Some(t) = target.get_mut(s.label as usize) {
            *t += 1.0;
        }
    }
    let total: f64 = target.iter().sum();
    if total == 0.0 {
        target.fill(1.0 / n_labels as f64);
    } else {
        target.iter_mut().for_each(|t| *t /= total);
    }
    rows.iter()
        .map(|r| {
            let scaled: Vec<f64> = r
                .iter()
                .zip(prior.iter().zip(&target))
                .map(|(&x, (&p, &t))| if p > 1e-9 { x as f64 * t / p } else { 0.0 })
                .collect();
            let sum: f64 = scaled.iter().sum();
            if sum > 0.0 && sum.is_finite() {
                scaled.iter().map(|x| (x / sum) as f32).collect()
            } else {
                vec![1.0 / n_labels as f32; n_labels]
            }
        })
        .collect()
}

/// Each client's agreement with the others over one round: the Pearson correlation, across
/// the round's samples, between the client's probability of each sample's intended label (what
/// the quality threshold reads) and the median of the other clients' probabilities of it.
/// `rows[c][i]` is client `c`'s vector for `samples[i]`. A client whose probabilities do not
/// vary (or whose others' median does not) gets 0: it carries no ranking of the samples.
/// Fewer than three clients: there is no majority to tell from a minority, and every client
/// gets 1.
pub fn agreement(rows: &[Vec<Vec<f32>>], samples: &[SyntheticSample]) -> Vec<f32> {
    let n = rows.len();
    if n < 3 {
        return vec![1.0; n];
    }
    let intended = |c: usize, i: usize, s: &SyntheticSample| -> f64 {
        rows[c]
            .get(i)
            .and_then(|r| r.get(s.label as usize))
            .copied()
            .unwrap_or(0.0) as f64
    };
    let mut others = Vec::with_capacity(n - 1);
    (0..n)
        .map(|c| {
            let (mut mine, mut theirs) = (Vec::new(), Vec::new());
            for (i, s) in samples.iter().enumerate() {
                others.clear();
                others.extend((0..n).filter(|&o| o != c).map(|o| intended(o, i, s)));
                others.sort_by(f64::total_cmp);
                let m = others.len() / 2;
                theirs.push(if others.len() % 2 == 1 {
                    others[m]
                } else {
                    (others[m - 1] + others[m]) / 2.0
                });
                mine.push(intended(c, i, s));
            }
            pearson(&mine, &theirs) as f32
        })
        .collect()
}

/// Which clients a method counts in a round (all but for [`Aggregation::ScreenedMean`]), with
/// each client's [`agreement`] when it was computed. Screening never leaves a round without
/// votes: if every client falls under the bar, all are counted.
pub fn screen(
    method: Aggregation,
    rows: &[Vec<Vec<f32>>],
    samples: &[SyntheticSample],
) -> (Vec<bool>, Option<Vec<f32>>) {
    let Aggregation::ScreenedMean { min_agreement } = method else {
        return (vec![true; rows.len()], None);
    };
    let agree = agreement(rows, samples);
    let kept: Vec<bool> = agree.iter().map(|&a| a > min_agreement).collect();
    if kept.iter().any(|&k| k) {
        (kept, Some(agree))
    } else {
        (vec![true; rows.len()], Some(agree))
    }
}

/// Pearson correlation; 0 when either side is (nearly) constant.
fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    if n < 2 {
        return 0.0;
    }
    let mean = |x: &[f64]| x[..n].iter().sum::<f64>() / n as f64;
    let (ma, mb) = (mean(a), mean(b));
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a[..n].iter().zip(&b[..n]) {
        sab += (x - ma) * (y - mb);
        saa += (x - ma) * (x - ma);
        sbb += (y - mb) * (y - mb);
    }
    // Probabilities live in [0, 1]: a spread under 1e-6 is rounding, not a ranking.
    if saa / (n as f64) < 1e-12 || sbb / (n as f64) < 1e-12 {
        return 0.0;
    }
    (sab / (saa * sbb).sqrt()).clamp(-1.0, 1.0)
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
        // The screening happened over the whole batch ([`screen`]); what is left is averaged.
        Aggregation::WeightedMean | Aggregation::ScreenedMean { .. } => {
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

    fn batch(labels: &[u32]) -> Vec<SyntheticSample> {
        labels
            .iter()
            .enumerate()
            .map(|(i, &label)| SyntheticSample {
                id: i as u64,
                text: String::new(),
                label,
            })
            .collect()
    }

    #[test]
    fn prior_correction_removes_a_clients_label_bias() {
        let samples = batch(&[0, 0, 1, 1]);
        // A skewed client: leans positive everywhere, but still ranks the samples right.
        let rows: [&[f32]; 4] = [&[0.3, 0.7], &[0.2, 0.8], &[0.05, 0.95], &[0.1, 0.9]];
        let out = correct_prior(&rows, &samples);
        assert!(
            out[0][0] > 0.5 && out[1][0] > 0.5,
            "negatives now lean negative: {out:?}"
        );
        assert!(out[2][1] > 0.5 && out[3][1] > 0.5, "{out:?}");
        assert!(
            out.iter()
                .all(|r| (r.iter().sum::<f32>() - 1.0).abs() < 1e-5)
        );
        // The same answer for every sample is no signal: uniform.
        let flat: [&[f32]; 4] = [&[0.1, 0.9]; 4];
        let out = correct_prior(&flat, &samples);
        assert!(out.iter().all(|r| close(r, &[0.5, 0.5])), "{out:?}");
        // An unbiased client is left as it is.
        let fair: [&[f32]; 4] = [&[0.8, 0.2], &[0.6, 0.4], &[0.4, 0.6], &[0.2, 0.8]];
        let out = correct_prior(&fair, &samples);
        for (a, b) in out.iter().zip(fair) {
            assert!(close(a, b), "{out:?}");
        }
        assert!(correct_prior(&[], &samples).is_empty());
    }

    /// Six honest clients who rank the samples alike (with their own noise) and one each
    /// of the attacks: the constant, the always-one-way and the inverting client fall under
    /// 0 agreement, the honest ones stay well above it, and screening drops exactly the three.
    #[test]
    fn screening_drops_clients_that_do_not_track_the_others() {
        let labels: Vec<u32> = (0..40).map(|i| i % 2).collect();
        let samples = batch(&labels);
        // How good sample i is, as the honest clients see it (a hidden truth they share).
        let truth = |i: usize| ((i * 37) % 40) as f32 / 40.0;
        let honest = |c: usize| -> Vec<Vec<f32>> {
            (0..40)
                .map(|i| {
                    let noise = (((i * 13 + c * 7) % 11) as f32 - 5.0) / 50.0;
                    let q = (0.1 + 0.8 * truth(i) + noise).clamp(0.0, 1.0);
                    let mut r = vec![0.0; 2];
                    r[labels[i] as usize] = q;
                    r[1 - labels[i] as usize] = 1.0 - q;
                    r
                })
                .collect()
        };
        let mut rows: Vec<Vec<Vec<f32>>> = (0..6).map(honest).collect();
        rows.push(vec![vec![0.5, 0.5]; 40]); // constant
        rows.push(
            (0..40)
                .map(|i| {
                    if labels[i] == 0 {
                        vec![1.0, 0.0]
                    } else {
                        vec![0.0, 1.0]
                    }
                })
                .collect(),
        ); // inflate: every sample all on its intended label
        rows.push(honest(0).into_iter().map(|r| vec![r[1], r[0]]).collect()); // inverts an honest judgement
        let agree = agreement(&rows, &samples);
        assert!(agree[..6].iter().all(|&a| a > 0.8), "{agree:?}");
        assert_eq!(&agree[6..8], &[0.0, 0.0], "{agree:?}");
        assert!(agree[8] < -0.8, "{agree:?}");
        let method = Aggregation::ScreenedMean { min_agreement: 0.0 };
        let (kept, seen) = screen(method, &rows, &samples);
        assert_eq!(
            kept,
            [true, true, true, true, true, true, false, false, false]
        );
        assert_eq!(seen, Some(agree));
        // Other methods count everyone and compute nothing.
        assert_eq!(
            screen(Aggregation::Median, &rows, &samples),
            (vec![true; 9], None)
        );
        // Nobody over the bar: all counted rather than none.
        let (kept, _) = screen(method, &rows[6..], &samples);
        assert_eq!(kept, [true, true, true]);
        // Two clients: no majority, both counted.
        assert_eq!(agreement(&rows[7..], &samples), [1.0, 1.0]);
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
