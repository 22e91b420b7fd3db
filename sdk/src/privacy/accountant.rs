//! Rényi-DP accounting of the Gaussian mechanism, composed over rounds (Mironov 2017), with
//! the RDP -> (epsilon, delta) conversion of Balle et al. 2020 (Theorem 21), over the orders
//! Opacus uses: the same numbers as Opacus's `RDPAccountant` for a sampling rate of 1, against
//! which `tests` holds it.
//!
//! A round releases each coordinate with Gaussian noise of standard deviation `z` times the
//! release's L2 sensitivity; its RDP at order `a` is `a / (2 z^2)`, and rounds add up.

/// The orders Opacus's `RDPAccountant` tries: 1.1, 1.2, ..., 10.9, then 12, 13, ..., 63.
fn orders() -> impl Iterator<Item = f64> {
    (1..100)
        .map(|x| 1.0 + f64::from(x) / 10.0)
        .chain((12..64).map(f64::from))
}

/// Epsilon at `delta` after rounds with noise multipliers `noise` (one entry per round).
/// A round with a multiplier of 0 (no noise) makes it infinite; no rounds, 0.
pub fn epsilon(noise: &[f64], delta: f64) -> f64 {
    if noise.is_empty() {
        return 0.0;
    }
    if noise.iter().any(|&z| z <= 0.0 || z.is_nan()) || !(delta > 0.0 && delta < 1.0) {
        return f64::INFINITY;
    }
    // RDP per unit order: sum of 1 / (2 z^2).
    let per_order: f64 = noise.iter().map(|z| 0.5 / (z * z)).sum();
    orders()
        .map(|a| {
            let rdp = per_order * a;
            rdp - (delta.ln() + a.ln()) / (a - 1.0) + ((a - 1.0) / a).ln()
        })
        .fold(f64::INFINITY, f64::min)
        .max(0.0)
}

/// The smallest noise multiplier (to 1e-6 relative) with which `rounds` rounds stay within
/// `epsilon` at `delta`; `None` for a target no multiplier up to 1e4 reaches.
pub fn noise_for(epsilon_target: f64, delta: f64, rounds: u32) -> Option<f64> {
    let eps = |z: f64| epsilon(&vec![z; rounds as usize], delta);
    let (mut lo, mut hi) = (1e-3, 1e4);
    if rounds == 0 || eps(hi) > epsilon_target {
        return None;
    }
    // epsilon falls as the noise grows: bisect on the log scale.
    while hi / lo > 1.0 + 1e-6 {
        let mid = (lo * hi).sqrt();
        if eps(mid) <= epsilon_target {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opacus 1.6.0: `get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS,
    /// rdp=compute_rdp(q=1.0, noise_multiplier=z, steps=k, orders=...), delta=d)[0]`.
    #[test]
    fn matches_opacus() {
        let cases = [
            (1.0, 1, 1e-5, 4.728_507_067_217_623),
            (0.5, 3, 1e-5, 21.444_852_327_713_25),
            (2.0, 3, 1e-5, 4.011_321_708_510_027),
            (5.0, 10, 1e-6, 3.131_089_774_915_035),
            (1.1, 100, 1e-5, 83.099_779_499_436_18),
        ];
        for (z, k, delta, want) in cases {
            let got = epsilon(&vec![z; k], delta);
            assert!(
                (got - want).abs() < 1e-9 * want,
                "z {z} x{k}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn calibration_inverts_the_accounting() {
        for (eps, rounds) in [(8.0, 3), (4.0, 3), (1.0, 3), (1.0, 1)] {
            let z = noise_for(eps, 1e-5, rounds).unwrap();
            let spent = epsilon(&vec![z; rounds as usize], 1e-5);
            assert!(
                spent <= eps && spent > eps * 0.999,
                "{eps}: z {z} spends {spent}"
            );
            // A little less noise would overspend.
            assert!(epsilon(&vec![z * 0.99; rounds as usize], 1e-5) > eps);
        }
        // Opacus's accounting bisected the same way: 1.10448 for epsilon 8 over 3 rounds.
        let z8 = noise_for(8.0, 1e-5, 3).unwrap();
        assert!((z8 - 1.104_477).abs() < 1e-4, "{z8}");
        assert_eq!(noise_for(1.0, 1e-5, 0), None);
        assert_eq!(epsilon(&[], 1e-5), 0.0);
        assert_eq!(epsilon(&[1.0, 0.0], 1e-5), f64::INFINITY);
    }
}
