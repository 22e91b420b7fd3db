//! AdamW over plain f32 tensors, as burn's `AdamW` with gradient clipping by norm computes it:
//! each tensor's gradient clipped to `max_norm` by its own L2 norm, bias-corrected moments,
//! decoupled weight decay `p (1 - lr wd)`, then `p - lr m^ / (sqrt(v^) + eps)`.

use rayon::prelude::*;

/// Elements a rayon task of the update takes.
const CHUNK: usize = 1 << 14;

/// The optimizer's settings and moments.
#[derive(Debug, Clone)]
pub(crate) struct AdamW {
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    max_norm: Option<f32>,
    time: i32,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl AdamW {
    /// Moments of zero for tensors of `sizes` values; burn's betas (0.9, 0.999).
    pub fn new(sizes: &[usize], weight_decay: f32, eps: f32, max_norm: Option<f32>) -> AdamW {
        AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps,
            weight_decay,
            max_norm,
            time: 0,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    /// One step at `lr` of every tensor `train` marks, from its gradient; a tensor that `rows`
    /// names (its index, row width, the rows) steps on those rows only, its gradient taken as
    /// zero elsewhere.
    pub fn step(
        &mut self,
        lr: f64,
        params: Vec<&mut Vec<f32>>,
        grads: Vec<&Vec<f32>>,
        train: &[bool],
        rows: Option<(usize, usize, &[u32])>,
    ) {
        self.time += 1;
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        let c1 = 1.0 - b1.powi(self.time);
        let c2 = 1.0 - b2.powi(self.time);
        let decay = (1.0 - lr * f64::from(self.weight_decay)) as f32;
        let lr = lr as f32;
        for (i, ((((p, g), m), v), &on)) in params
            .into_iter()
            .zip(grads)
            .zip(&mut self.m)
            .zip(&mut self.v)
            .zip(train)
            .enumerate()
        {
            if !on {
                continue;
            }
            if let Some((_, width, ids)) = rows.filter(|r| r.0 == i) {
                let row = |x: &[f32], r: u32| -> std::ops::Range<usize> {
                    let at = r as usize * width;
                    at.min(x.len())..(at + width).min(x.len())
                };
                let clip = match self.max_norm {
                    Some(max) => {
                        let sq: f64 = ids
                            .iter()
                            .flat_map(|&r| &g[row(g, r)])
                            .map(|&x| f64::from(x) * f64::from(x))
                            .sum();
                        (max / (sq.sqrt() as f32 + f32::MIN_POSITIVE)).min(1.0)
                    }
                    None => 1.0,
                };
                for &r in ids {
                    let span = row(g, r);
                    update(
                        &mut p[span.clone()],
                        &g[span.clone()],
                        &mut m[span.clone()],
                        &mut v[span],
                        clip,
                        (b1, b2, eps, c1, c2, decay, lr),
                    );
                }
                continue;
            }
            let clip = match self.max_norm {
                Some(max) => {
                    let sq: f64 = g
                        .par_chunks(CHUNK)
                        .map(|c| c.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>())
                        .collect::<Vec<f64>>()
                        .iter()
                        .sum();
                    let norm = sq.sqrt() as f32;
                    (max / (norm + f32::MIN_POSITIVE)).min(1.0)
                }
                None => 1.0,
            };
            p.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .for_each(|(((p, g), m), v)| {
                    update(p, g, m, v, clip, (b1, b2, eps, c1, c2, decay, lr));
                });
        }
    }
}

/// One AdamW update of `p` from `g` (scaled by `clip`), `k` the step's constants
/// `(beta1, beta2, eps, 1 - beta1^t, 1 - beta2^t, 1 - lr wd, lr)`.
fn update(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    clip: f32,
    k: (f32, f32, f32, f32, f32, f32, f32),
) {
    let (b1, b2, eps, c1, c2, decay, lr) = k;
    crate::quant::with_simd(
        #[inline(always)]
        || {
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m).zip(v) {
                let g = g * clip;
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                let step = (*m / c1) / ((*v / c2).sqrt() + eps);
                *p = *p * decay - lr * step;
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two steps on one tensor by hand.
    #[test]
    fn follows_the_adamw_formula() {
        let mut opt = AdamW::new(&[2], 0.1, 1e-8, None);
        let mut p = vec![1.0f32, -2.0];
        let g = vec![0.5f32, 0.25];
        opt.step(0.01, vec![&mut p], vec![&g], &[true], None);
        // First step: m^ = g, v^ = g^2, so the step is sign(g) (eps aside).
        let want = [1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001) - 0.01];
        for (a, b) in p.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        opt.step(0.01, vec![&mut p], vec![&g], &[false], None);
        for (a, b) in p.iter().zip(want) {
            assert_eq!(*a, b, "a frozen tensor does not move");
        }
    }

    #[test]
    fn clips_each_tensor_by_its_own_norm() {
        // Clipped to norm 1, g = (3, 4) becomes (0.6, 0.8): the step is the same sign step,
        // but the moments hold the clipped gradient.
        let mut opt = AdamW::new(&[2, 1], 0.0, 1e-8, Some(1.0));
        let (mut a, mut b) = (vec![0.0f32; 2], vec![0.0f32]);
        let (ga, gb) = (vec![3.0f32, 4.0], vec![0.5f32]);
        opt.step(
            1.0,
            vec![&mut a, &mut b],
            vec![&ga, &gb],
            &[true, true],
            None,
        );
        assert!((opt.m[0][0] - 0.1 * 0.6).abs() < 1e-6);
        assert!((opt.m[0][1] - 0.1 * 0.8).abs() < 1e-6);
        assert!(
            (opt.m[1][0] - 0.1 * 0.5).abs() < 1e-6,
            "under the norm: unclipped"
        );
    }
}
