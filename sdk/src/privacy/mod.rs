//! Differential privacy for what a client sends: its score vectors.
//!
//! Unit: a client (client-level DP). Two neighbouring clients differ in their whole private
//! data set, so their SLMs, and with them every score vector of a round, may differ
//! arbitrarily. A score vector is a point of the probability simplex, whose L2 diameter is
//! sqrt(2); a round's `n` vectors together have sensitivity `sqrt(2 n)`. The Gaussian
//! mechanism adds `N(0, (z sqrt(2 n))^2)` to every coordinate, `z` the noise multiplier,
//! then projects each vector back onto the simplex (post-processing, so free of privacy
//! cost, and what the coordinator validates). [`accountant`] composes the rounds.
//!
//! Who sets `z`: the coordinator asks for one with the round ([`ScorePrivacy`], computed from
//! its `[daemon.privacy]` target by [`PrivacyTarget::noise_multiplier`]); a client applies the
//! larger of that and its own floor ([`PrivacyFloor`]), which the coordinator cannot lower,
//! and refuses to score once the next round would take its cumulative epsilon past its budget
//! ([`PrivacyLedger::admit`]). See `docs/privacy.md` for what this protects and what not.

pub mod accountant;

use rand::Rng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

/// What the coordinator asks of every client's scores in a round (sent with the round).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScorePrivacy {
    /// Gaussian noise standard deviation per coordinate, in units of the round's sensitivity.
    pub noise_multiplier: f64,
}

/// The coordinator's privacy target (`[daemon.privacy]`): every client's scores over
/// `rounds` rounds are `(epsilon, delta)`-DP at the client level.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyTarget {
    /// Total epsilon over the planned rounds.
    pub epsilon: f64,
    /// Delta.
    pub delta: f64,
    /// The rounds the target covers.
    pub rounds: u32,
}

impl PrivacyTarget {
    /// The noise multiplier every round needs, or an error saying why there is none.
    pub fn noise_multiplier(&self) -> Result<f64, String> {
        if !(self.epsilon > 0.0 && self.delta > 0.0 && self.delta < 1.0 && self.rounds > 0) {
            return Err(format!(
                "privacy target needs epsilon > 0, 0 < delta < 1 and rounds > 0: {self:?}"
            ));
        }
        accountant::noise_for(self.epsilon, self.delta, self.rounds)
            .ok_or_else(|| format!("no noise multiplier up to 1e4 reaches {self:?}"))
    }
}

/// A client's own terms (`[privacy]` of its config): never less noise than
/// `min_noise_multiplier`, and no round past `epsilon_budget` at `delta`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrivacyFloor {
    /// The least noise the client sends its scores with (0: whatever the coordinator asks).
    pub min_noise_multiplier: f64,
    /// The most epsilon the client spends over its lifetime; none: no limit.
    pub epsilon_budget: Option<f64>,
    /// The delta the client accounts at.
    pub delta: f64,
    /// Draw the noise from this seed instead of the OS's randomness: for reproducible
    /// experiments only (a known seed lets anyone subtract the noise).
    pub noise_seed: Option<u64>,
}

impl Default for PrivacyFloor {
    fn default() -> Self {
        Self {
            min_noise_multiplier: 0.0,
            epsilon_budget: None,
            delta: 1e-5,
            noise_seed: None,
        }
    }
}

/// The noise multipliers of the rounds a client has scored with noise, oldest first: what its
/// privacy loss so far is computed from. Kept with the client's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PrivacyLedger {
    /// One entry per round scored (0 for a round scored without noise).
    pub rounds: Vec<(u64, f64)>,
}

impl PrivacyLedger {
    /// Epsilon spent so far at `delta` (infinite once a round went without noise).
    pub fn spent(&self, delta: f64) -> f64 {
        let noise: Vec<f64> = self.rounds.iter().map(|r| r.1).collect();
        accountant::epsilon(&noise, delta)
    }

    /// Decides the noise of `round` under `floor` when the coordinator asks for `requested`:
    /// the larger of the two multipliers (`None`: no noise), recorded in the ledger before
    /// any score leaves, or an error (nothing recorded) when the round would take the
    /// client past its budget.
    pub fn admit(
        &mut self,
        round: u64,
        floor: &PrivacyFloor,
        requested: Option<ScorePrivacy>,
    ) -> Result<Option<f64>, String> {
        let asked = requested.map_or(0.0, |p| p.noise_multiplier);
        let z = floor.min_noise_multiplier.max(asked);
        if let Some(budget) = floor.epsilon_budget {
            let mut next = self.clone();
            next.rounds.push((round, z));
            let after = next.spent(floor.delta);
            if after > budget {
                return Err(format!(
                    "privacy budget: round {round} with noise multiplier {z:.3} would take epsilon \
                     from {:.3} to {after:.3}, past this client's budget of {budget} (delta {:e})",
                    self.spent(floor.delta),
                    floor.delta
                ));
            }
        }
        if z > 0.0 || floor.epsilon_budget.is_some() {
            self.rounds.push((round, z));
        }
        Ok((z > 0.0).then_some(z))
    }
}

/// Adds the Gaussian mechanism's noise to a round's score vectors (`rows`, one per sample)
/// with multiplier `z`, then projects each onto the probability simplex.
pub fn privatize(rows: &mut [Vec<f32>], z: f64, rng: &mut StdRng) {
    let sigma = noise_std(rows.len(), z);
    for row in rows.iter_mut() {
        for p in row.iter_mut() {
            *p = (f64::from(*p) + sigma * standard_normal(rng)) as f32;
        }
        project_to_simplex(row);
    }
}

/// The per-coordinate standard deviation of a round of `n` score vectors at multiplier `z`.
pub fn noise_std(n: usize, z: f64) -> f64 {
    z * (2.0 * n as f64).sqrt()
}

/// One draw of N(0, 1) (Box-Muller).
fn standard_normal(rng: &mut StdRng) -> f64 {
    let u1 = 1.0 - rng.random::<f64>(); // (0, 1]: the log stays finite
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// The Euclidean projection of `v` onto the probability simplex (Held et al.; Duchi et al.
/// 2008): subtract the threshold that leaves the positive parts summing to 1.
pub fn project_to_simplex(v: &mut [f32]) {
    if v.is_empty() {
        return;
    }
    // Adding a constant to every entry does not move the projection: measure from the
    // largest entry, so that the threshold keeps its precision whatever the magnitudes (from
    // entries near 1e38, `u - 1` rounds back to `u` and every entry was cut to 0). A row with
    // a NaN or infinite entry is not shifted: it comes out as it always did.
    let top = if v.iter().all(|x| x.is_finite()) {
        v.iter()
            .map(|&x| f64::from(x))
            .fold(f64::NEG_INFINITY, f64::max)
    } else {
        0.0
    };
    let mut sorted: Vec<f64> = v.iter().map(|&x| f64::from(x) - top).collect();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let mut sum = 0.0;
    let mut theta = 0.0;
    for (k, &u) in sorted.iter().enumerate() {
        sum += u;
        let t = (sum - 1.0) / (k + 1) as f64;
        if u - t > 0.0 {
            theta = t;
        }
    }
    for x in v.iter_mut() {
        *x = (f64::from(*x) - top - theta).max(0.0) as f32;
    }
    // Rounding: make the sum exactly what f32 can hold nearest 1.
    let total: f32 = v.iter().sum();
    if total > 0.0 {
        v.iter_mut().for_each(|x| *x /= total);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// The noise has the configured standard deviation: over 256 vectors of 2 labels at
    /// z = 0.5 (sigma = 0.5 sqrt(512) = 11.3), before projection.
    #[test]
    fn noise_has_the_configured_sigma() {
        let mut rng = StdRng::seed_from_u64(1);
        let (n, z) = (256, 0.5);
        let sigma = noise_std(n, z);
        let draws: Vec<f64> = (0..200_000)
            .map(|_| sigma * standard_normal(&mut rng))
            .collect();
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        let var = draws.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / draws.len() as f64;
        assert!((sigma - 11.3137).abs() < 1e-3);
        assert!(mean.abs() < 0.1, "mean {mean}");
        assert!(
            (var.sqrt() / sigma - 1.0).abs() < 0.01,
            "sd {} vs {sigma}",
            var.sqrt()
        );
    }

    #[test]
    fn privatized_rows_are_distributions() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut rows = vec![vec![0.9f32, 0.1]; 64];
        privatize(&mut rows, 0.1, &mut rng);
        for r in &rows {
            assert!(r.iter().all(|p| (0.0..=1.0).contains(p)), "{r:?}");
            assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{r:?}");
        }
        // sigma = 0.1 * sqrt(128) = 1.13: the rows no longer say what the model said.
        assert!(rows.iter().any(|r| r[0] < 0.5));
    }

    #[test]
    fn projection_onto_the_simplex() {
        let mut v = vec![0.3f32, 0.5, 0.2];
        project_to_simplex(&mut v);
        assert_eq!(v, vec![0.3, 0.5, 0.2]);
        let mut v = vec![2.0f32, 0.0];
        project_to_simplex(&mut v);
        assert_eq!(v, vec![1.0, 0.0]);
        let mut v = vec![0.8f32, 0.6, -3.0];
        project_to_simplex(&mut v);
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.4).abs() < 1e-6 && v[2] == 0.0);
    }

    /// Regression (fuzz target `score_reply`, 2026-12-03): a score reply whose second row is
    /// `[-1.74e38, -1.89e38]` was projected to `[0, 0]`, which the coordinator rejects
    /// (sum 0, not 1). Every finite row must project onto the simplex.
    #[test]
    fn huge_entries_still_project_onto_the_simplex() {
        use crate::protocol::ClientMsg;
        use crate::protocol::frame::decode_frame;
        const CRASH: &[u8] = &[
            0x00, 0x00, 0x00, 0x18, 0x02, 0x0a, 0x02, 0x01, 0x02, 0x66, 0x66, 0x66, 0x3f, 0xcd,
            0xcc, 0xcc, 0x3d, 0x02, 0x02, 0xff, 0xff, 0x02, 0xff, 0x02, 0x0e, 0x0e, 0xff, 0x01,
        ];
        let Some((ClientMsg::Scores { scores, .. }, _)) = decode_frame(CRASH).unwrap() else {
            panic!("the crash input is a Scores frame");
        };
        let mut rows: Vec<Vec<f32>> = scores.into_iter().map(|s| s.probs).collect();
        assert_eq!(rows[1], vec![-1.7412885e38, -1.888231e38]);
        rows.extend([
            vec![f32::MAX, f32::MAX],
            vec![f32::MIN, 0.5, f32::MAX],
            vec![-1e30, -1e30, -1e30 - 1e23],
        ]);
        for row in rows {
            let mut v = row.clone();
            project_to_simplex(&mut v);
            let sum: f32 = v.iter().sum();
            assert!(
                v.iter().all(|p| (0.0..=1.0).contains(p)) && (sum - 1.0).abs() < 1e-6,
                "{row:?} -> {v:?}"
            );
        }
        let mut v = vec![-1.7412885e38f32, -1.888231e38];
        project_to_simplex(&mut v);
        assert_eq!(v, vec![1.0, 0.0]);
    }

    /// A client with a budget takes the larger multiplier, records each round, and refuses
    /// the round that would overspend, recording nothing for it.
    #[test]
    fn ledger_refuses_past_the_budget() {
        let target = PrivacyTarget {
            epsilon: 4.0,
            delta: 1e-5,
            rounds: 3,
        };
        let z = target.noise_multiplier().unwrap();
        let floor = PrivacyFloor {
            epsilon_budget: Some(4.0),
            ..PrivacyFloor::default()
        };
        let mut ledger = PrivacyLedger::default();
        let asked = Some(ScorePrivacy {
            noise_multiplier: z,
        });
        for round in 1..=3 {
            assert_eq!(ledger.admit(round, &floor, asked), Ok(Some(z)));
        }
        assert!(ledger.spent(1e-5) <= 4.0);
        let refused = ledger.admit(4, &floor, asked).unwrap_err();
        assert!(
            refused.contains("budget") && refused.contains("round 4"),
            "{refused}"
        );
        assert_eq!(ledger.rounds.len(), 3);
        // No noise asked, none in the floor: unbounded epsilon, refused at once.
        let mut fresh = PrivacyLedger::default();
        assert!(fresh.admit(1, &floor, None).is_err());
        // The floor wins over a smaller request.
        let strict = PrivacyFloor {
            min_noise_multiplier: 2.0,
            ..PrivacyFloor::default()
        };
        assert_eq!(fresh.admit(1, &strict, asked), Ok(Some(2.0f64.max(z))));
        // No budget, no noise: nothing to account.
        let mut open = PrivacyLedger::default();
        assert_eq!(open.admit(1, &PrivacyFloor::default(), None), Ok(None));
        assert!(open.rounds.is_empty());
    }

    #[test]
    fn bad_targets_are_errors() {
        let t = PrivacyTarget {
            epsilon: 0.0,
            delta: 1e-5,
            rounds: 3,
        };
        assert!(t.noise_multiplier().is_err());
    }
}
