//! Seeded shuffling, IID and Dirichlet label-skew partitioning.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::Dataset;
use crate::{Error, Result};

pub(crate) fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

pub(crate) fn shuffle<T>(items: &mut [T], rng: &mut StdRng) {
    items.shuffle(rng);
}

fn check_clients(d: &Dataset, n_clients: usize) -> Result<()> {
    if n_clients == 0 {
        return Err(Error::Data("cannot partition across 0 clients".into()));
    }
    if d.len() < n_clients {
        return Err(Error::Data(format!(
            "cannot give {} examples to {n_clients} clients",
            d.len()
        )));
    }
    Ok(())
}

pub(crate) fn iid(d: &Dataset, n_clients: usize, seed: u64) -> Result<Vec<Dataset>> {
    check_clients(d, n_clients)?;
    let mut idx: Vec<usize> = (0..d.len()).collect();
    shuffle(&mut idx, &mut rng(seed));
    let mut parts = vec![Vec::new(); n_clients];
    for (k, i) in idx.into_iter().enumerate() {
        parts[k % n_clients].push(d.examples[i].clone());
    }
    Ok(parts.into_iter().map(|e| d.with_examples(e)).collect())
}

pub(crate) fn dirichlet(
    d: &Dataset,
    n_clients: usize,
    alpha: f64,
    seed: u64,
) -> Result<Vec<Dataset>> {
    check_clients(d, n_clients)?;
    if !(alpha > 0.0 && alpha.is_finite()) {
        return Err(Error::Data(format!(
            "Dirichlet alpha must be > 0, got {alpha}"
        )));
    }
    let mut rng = rng(seed);
    let mut by_label = d.indices_by_label();
    // Redraw until every client has at least one example, as in the usual FL benchmarks; with
    // tiny alpha and few examples that can fail, and then the last draw is kept.
    let mut parts = Vec::new();
    for _attempt in 0..100 {
        parts = vec![Vec::new(); n_clients];
        for idx in &mut by_label {
            shuffle(idx, &mut rng);
            let shares: Vec<f64> = (0..n_clients)
                .map(|_| gamma_sample(alpha, &mut rng))
                .collect();
            let total: f64 = shares.iter().sum();
            let mut cumulative = 0.0;
            let mut start = 0;
            for (client, share) in shares.iter().enumerate() {
                cumulative += share / total;
                let end = if client + 1 == n_clients {
                    idx.len()
                } else {
                    ((cumulative * idx.len() as f64).round() as usize).min(idx.len())
                };
                parts[client].extend(idx[start..end.max(start)].iter().copied());
                start = end.max(start);
            }
        }
        if parts.iter().all(|p| !p.is_empty()) {
            break;
        }
    }
    Ok(parts
        .into_iter()
        .map(|mut p| {
            shuffle(&mut p, &mut rng);
            d.with_examples(p.into_iter().map(|i| d.examples[i].clone()).collect())
        })
        .collect())
}

/// One draw from Gamma(`shape`, 1) (Marsaglia & Tsang 2000; shape < 1 by the `U^(1/shape)`
/// boost). Written here rather than pulling in `rand_distr` for one distribution.
pub fn gamma_sample(shape: f64, rng: &mut impl Rng) -> f64 {
    if shape < 1.0 {
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        return gamma_sample(shape + 1.0, rng) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = standard_normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.random::<f64>();
        if u < 1.0 - 0.0331 * x.powi(4)
            || u.max(f64::MIN_POSITIVE).ln() < 0.5 * x * x + d * (1.0 - v + v.ln())
        {
            return d * v;
        }
    }
}

/// Box-Muller.
fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tests::toy;

    #[test]
    fn iid_is_balanced_deterministic_and_complete() {
        let d = toy(&[50, 50]);
        let parts = d.partition_iid(3, 1).unwrap();
        let sizes: Vec<usize> = parts.iter().map(Dataset::len).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 100);
        assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
        assert_eq!(parts, d.partition_iid(3, 1).unwrap());
        assert!(d.partition_iid(0, 1).is_err());
    }

    #[test]
    fn dirichlet_small_alpha_skews_large_alpha_does_not() {
        let d = toy(&[500, 500, 500]);
        let skew = |alpha: f64| {
            let parts = d.partition_dirichlet(5, alpha, 3).unwrap();
            assert_eq!(parts.iter().map(Dataset::len).sum::<usize>(), 1500);
            assert!(parts.iter().all(|p| !p.is_empty()));
            // Mean share of each client's majority label.
            parts
                .iter()
                .map(|p| *p.label_counts().iter().max().unwrap() as f64 / p.len() as f64)
                .sum::<f64>()
                / 5.0
        };
        let (low, high) = (skew(0.1), skew(100.0));
        assert!(low > 0.7, "alpha 0.1 majority share {low}");
        assert!(high < 0.45, "alpha 100 majority share {high}");
        assert_eq!(
            d.partition_dirichlet(5, 0.5, 9).unwrap(),
            d.partition_dirichlet(5, 0.5, 9).unwrap()
        );
        assert!(d.partition_dirichlet(5, 0.0, 9).is_err());
    }

    #[test]
    fn gamma_mean_is_shape() {
        let mut r = rng(0);
        for shape in [0.3, 1.0, 4.0] {
            let mean = (0..20000).map(|_| gamma_sample(shape, &mut r)).sum::<f64>() / 20000.0;
            assert!(
                (mean - shape).abs() < 0.05 * shape.max(1.0),
                "shape {shape} mean {mean}"
            );
        }
    }
}
