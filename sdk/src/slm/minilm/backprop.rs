//! MiniLM's training passes on the CPU: the forward pass keeping what the backward pass needs
//! (a tape), and the backward pass writing every trainable tensor's gradient.
//!
//! The matrix products are the scoring kernels' ([`ChannelMatrix`]): 16-bit codes, exact i32
//! sums. Each linear layer takes three per step:
//! - forward, `y = x W^T + b`: `W` on a scale per output channel, each row of `x` on its own;
//! - the input's gradient, `dx = dy W`: `W^T` on a scale per input channel, rows of `dy`;
//! - the weight's gradient, `dW = dy^T x`: `x^T` on a scale per input channel, each output
//!   channel's gradient over the batch's tokens on its own.
//!
//! Every sequence is its own span of rows (no padding computed); attention runs per sequence.
//! Sums over rows (biases, norms) run in fixed chunks in a fixed order, and dropout draws from
//! a hash of its position, so a step gives the same bits whatever the threads.

use rayon::prelude::*;

use super::cpu::{erf_scaled, half_square_exp, lane_max, lane_sum};
use super::params::{LayerParams, Params, transpose};
use crate::quant::{self, ChannelMatrix, RowCodes};
use crate::{Error, Result};

/// Rows a rayon task of the element-wise passes takes.
const CHUNK_ROWS: usize = 16;

/// What the passes need from the configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub heads: usize,
    pub eps: f32,
    /// Dropout probability of the hidden states and the pooled vector while training.
    pub dropout: f32,
}

/// Dropout's masks: element `i` of site `site` is kept unless a hash of `(key, site, i)`
/// falls below `p`; kept values are scaled by `1 / (1 - p)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dropout {
    pub p: f32,
    pub key: u64,
}

impl Dropout {
    fn mask(&self, site: u64, n: usize) -> Option<Vec<f32>> {
        if self.p <= 0.0 {
            return None;
        }
        let keep = 1.0 / (1.0 - self.p);
        let threshold = (f64::from(self.p) * (1u64 << 24) as f64) as u32;
        let base = splitmix(self.key ^ splitmix(site));
        let mut m = vec![0.0f32; n];
        m.par_chunks_mut(4096).enumerate().for_each(|(c, m)| {
            quant::with_simd(
                #[inline(always)]
                || {
                    for (i, m) in m.iter_mut().enumerate() {
                        let h = splitmix(base.wrapping_add((c * 4096 + i) as u64));
                        *m = if ((h >> 40) as u32) < threshold {
                            0.0
                        } else {
                            keep
                        };
                    }
                },
            )
        });
        Some(m)
    }
}

#[inline(always)]
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn apply(mask: &Option<Vec<f32>>, x: &mut [f32]) {
    if let Some(m) = mask {
        x.par_chunks_mut(4096)
            .zip(m.par_chunks(4096))
            .for_each(|(x, m)| x.iter_mut().zip(m).for_each(|(x, m)| *x *= m));
    }
}

/// The batch's sequences as spans of rows.
#[derive(Debug, Clone)]
struct Spans {
    lens: Vec<usize>,
    n: usize,
}

impl Spans {
    fn new(seqs: &[&[u32]]) -> Spans {
        let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        let n = lens.iter().sum();
        Spans { lens, n }
    }

    /// `buf` cut into one slice per sequence, `per(len)` values each.
    fn split<'a>(&self, buf: &'a mut [f32], per: impl Fn(usize) -> usize) -> Vec<&'a mut [f32]> {
        let mut out = Vec::with_capacity(self.lens.len());
        let mut rest = buf;
        for &len in &self.lens {
            let (span, tail) = rest.split_at_mut(per(len));
            out.push(span);
            rest = tail;
        }
        out
    }

    /// First row of each sequence.
    fn starts(&self) -> Vec<usize> {
        let mut at = 0;
        self.lens
            .iter()
            .map(|&l| {
                at += l;
                at - l
            })
            .collect()
    }
}

/// One layer's saved values.
struct LayerTape {
    x: Vec<f32>,
    qkv: Vec<f32>,
    /// Each sequence's `[heads, len, len]` attention weights, one after another.
    probs: Vec<f32>,
    context: Vec<f32>,
    drop1: Option<Vec<f32>>,
    xhat1: Vec<f32>,
    rstd1: Vec<f32>,
    h1: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
    drop2: Option<Vec<f32>>,
    xhat2: Vec<f32>,
    rstd2: Vec<f32>,
}

/// The forward pass's saved values and its logits.
pub(crate) struct Tape {
    spans: Spans,
    ids: Vec<u32>,
    xhat0: Vec<f32>,
    rstd0: Vec<f32>,
    drop0: Option<Vec<f32>>,
    layers: Vec<LayerTape>,
    /// The head's input `[B, d]` (pooled, after dropout) and its mask.
    pooled: Vec<f32>,
    drop_head: Option<Vec<f32>>,
    /// `[B, labels]`.
    pub logits: Vec<f32>,
}

fn model_err(what: &str) -> impl Fn(quant::ggml::BlockError) -> Error + '_ {
    move |e| Error::Model(format!("{what}: {e}"))
}

#[cfg(test)]
thread_local! {
    /// Tests set this to take every product in plain f32 (on the calling thread).
    static EXACT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `a` `[n, k]` times `b^T` (`b` `[m, k]`) plus `bias`, in f32 one dot at a time.
#[cfg(test)]
fn exact(a: &[f32], b: &[f32], bias: &[f32], n: usize, k: usize) -> Option<Vec<f32>> {
    if !EXACT.with(|e| e.get()) {
        return None;
    }
    let m = bias.len();
    let mut out = vec![0.0f32; n * m];
    for i in 0..n {
        for j in 0..m {
            let dot: f64 = (0..k)
                .map(|c| f64::from(a[i * k + c]) * f64::from(b[j * k + c]))
                .sum();
            out[i * m + j] = dot as f32 + bias[j];
        }
    }
    Some(out)
}

#[cfg(not(test))]
fn exact(_: &[f32], _: &[f32], _: &[f32], _: usize, _: usize) -> Option<Vec<f32>> {
    None
}

/// `y <- x W^T + b` on the kernels, `W` `[dout, din]`.
fn linear(w: &[f32], b: &[f32], x: &[f32], n: usize, codes: &mut RowCodes) -> Result<Vec<f32>> {
    let (dout, din) = (b.len(), x.len() / n.max(1));
    if let Some(y) = exact(x, w, b, n, din) {
        return Ok(y);
    }
    let m = ChannelMatrix::new(w, b, dout, din).map_err(model_err("a weight"))?;
    let mut y = Vec::new();
    m.forward_into(x, n, codes, &mut y);
    Ok(y)
}

/// `dx <- dy W` (`[n, din]`), `W` `[dout, din]`, `dy` `[n, dout]`.
fn input_grad(
    w: &[f32],
    dy: &[f32],
    n: usize,
    din: usize,
    codes: &mut RowCodes,
) -> Result<Vec<f32>> {
    let dout = dy.len() / n.max(1);
    let wt = transpose(w, dout, din);
    if let Some(dx) = exact(dy, &wt, &vec![0.0; din], n, dout) {
        return Ok(dx);
    }
    let m = ChannelMatrix::new(&wt, &vec![0.0; din], din, dout)
        .map_err(model_err("a transposed weight"))?;
    let mut dx = Vec::new();
    m.forward_into(dy, n, codes, &mut dx);
    Ok(dx)
}

/// `dW <- dy^T x` (`[dout, din]`) over the `n` rows.
fn weight_grad(dy: &[f32], x: &[f32], n: usize, codes: &mut RowCodes) -> Result<Vec<f32>> {
    let (dout, din) = (dy.len() / n.max(1), x.len() / n.max(1));
    let xt = transpose(x, n, din);
    let dyt = transpose(dy, n, dout);
    if let Some(dw) = exact(&dyt, &xt, &vec![0.0; din], dout, n) {
        return Ok(dw);
    }
    let m =
        ChannelMatrix::new(&xt, &vec![0.0; din], din, n).map_err(model_err("a layer's input"))?;
    let mut dw = Vec::new();
    m.forward_into(&dyt, dout, codes, &mut dw);
    Ok(dw)
}

/// Column sums of `x` (`[n, width]`): fixed chunks of rows, their sums added in order.
fn column_sums(x: &[f32], width: usize) -> Vec<f32> {
    let parts: Vec<Vec<f32>> = x
        .par_chunks(width * CHUNK_ROWS * 4)
        .map(|c| {
            let mut s = vec![0.0f32; width];
            quant::with_simd(
                #[inline(always)]
                || {
                    for row in c.chunks_exact(width) {
                        s.iter_mut().zip(row).for_each(|(s, v)| *s += v);
                    }
                },
            );
            s
        })
        .collect();
    let mut out = vec![0.0f32; width];
    for p in parts {
        out.iter_mut().zip(p).for_each(|(o, v)| *o += v);
    }
    out
}

/// Layer norm of each row of `r` (`[n, d]`): `xhat`, `1 / std` and the output.
fn norm_forward(
    r: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = gamma.len();
    let n = r.len() / d;
    let (mut xhat, mut rstd, mut y) = (
        vec![0.0f32; r.len()],
        vec![0.0f32; n],
        vec![0.0f32; r.len()],
    );
    xhat.par_chunks_mut(d * CHUNK_ROWS)
        .zip(y.par_chunks_mut(d * CHUNK_ROWS))
        .zip(rstd.par_chunks_mut(CHUNK_ROWS))
        .zip(r.par_chunks(d * CHUNK_ROWS))
        .for_each(|(((xh, y), rs), r)| {
            quant::with_simd(
                #[inline(always)]
                || {
                    for (((xh, y), rs), r) in xh
                        .chunks_exact_mut(d)
                        .zip(y.chunks_exact_mut(d))
                        .zip(rs.iter_mut())
                        .zip(r.chunks_exact(d))
                    {
                        let mean = lane_sum(r, |x| x) / d as f32;
                        let var = lane_sum(r, |x| (x - mean) * (x - mean)) / d as f32;
                        let inv = 1.0 / (var + eps).sqrt();
                        *rs = inv;
                        for ((((xh, y), &r), g), b) in
                            xh.iter_mut().zip(y.iter_mut()).zip(r).zip(gamma).zip(beta)
                        {
                            *xh = (r - mean) * inv;
                            *y = *xh * g + b;
                        }
                    }
                },
            )
        });
    (xhat, rstd, y)
}

/// Layer norm's backward pass: the input's gradient, and `(dgamma, dbeta)`.
fn norm_backward(
    dy: &[f32],
    xhat: &[f32],
    rstd: &[f32],
    gamma: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = gamma.len();
    let mut dx = vec![0.0f32; dy.len()];
    dx.par_chunks_mut(d * CHUNK_ROWS)
        .zip(dy.par_chunks(d * CHUNK_ROWS))
        .zip(xhat.par_chunks(d * CHUNK_ROWS))
        .zip(rstd.par_chunks(CHUNK_ROWS))
        .for_each(|(((dx, dy), xh), rs)| {
            quant::with_simd(
                #[inline(always)]
                || {
                    let mut g = vec![0.0f32; d];
                    for (((dx, dy), xh), &rs) in dx
                        .chunks_exact_mut(d)
                        .zip(dy.chunks_exact(d))
                        .zip(xh.chunks_exact(d))
                        .zip(rs)
                    {
                        for ((g, dy), gm) in g.iter_mut().zip(dy).zip(gamma) {
                            *g = dy * gm;
                        }
                        let mean_g = lane_sum(&g, |v| v) / d as f32;
                        let mut gx = [0.0f32; 16];
                        for (c, x) in g.chunks(16).zip(xh.chunks(16)) {
                            for ((a, g), x) in gx.iter_mut().zip(c).zip(x) {
                                *a += g * x;
                            }
                        }
                        let mean_gx = gx.iter().sum::<f32>() / d as f32;
                        for ((dx, g), x) in dx.iter_mut().zip(&g).zip(xh) {
                            *dx = rs * (g - mean_g - x * mean_gx);
                        }
                    }
                },
            )
        });
    let prod: Vec<f32> = dy.par_iter().zip(xhat).map(|(a, b)| a * b).collect();
    (dx, column_sums(&prod, d), column_sums(dy, d))
}

fn gelu_forward(u: &[f32]) -> Vec<f32> {
    let mut g = u.to_vec();
    g.par_chunks_mut(4096).for_each(|c| {
        let mut e = [0.0f32; 256];
        for c in c.chunks_mut(256) {
            let e = &mut e[..c.len()];
            half_square_exp(c, e);
            quant::with_simd(
                #[inline(always)]
                || {
                    for (x, &e) in c.iter_mut().zip(e.iter()) {
                        *x = 0.5 * *x * (1.0 + erf_scaled(*x, e));
                    }
                },
            );
        }
    });
    g
}

/// `dg <- dg * gelu'(u)`, `gelu'(u) = Phi(u) + u phi(u)`.
fn gelu_backward(u: &[f32], dg: &mut [f32]) {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    dg.par_chunks_mut(4096)
        .zip(u.par_chunks(4096))
        .for_each(|(dg, u)| {
            let mut e = [0.0f32; 256];
            for (dg, u) in dg.chunks_mut(256).zip(u.chunks(256)) {
                let e = &mut e[..u.len()];
                half_square_exp(u, e);
                quant::with_simd(
                    #[inline(always)]
                    || {
                        for ((dg, &x), &e) in dg.iter_mut().zip(u).zip(e.iter()) {
                            let cdf = 0.5 * (1.0 + erf_scaled(x, e));
                            *dg *= cdf + x * e * INV_SQRT_2PI;
                        }
                    },
                );
            }
        });
}

#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// One sequence's attention: `qkv` its `[len, 3 d]` rows; writes `probs` (`[heads, len, len]`)
/// and `context` (`[len, d]`).
fn attend(qkv: &[f32], len: usize, heads: usize, probs: &mut [f32], context: &mut [f32]) {
    let w = qkv.len() / len.max(1);
    let d = w / 3;
    let dh = d / heads;
    let scale = 1.0 / (dh as f32).sqrt();
    let mut kt = vec![0.0f32; dh * len];
    for h in 0..heads {
        let (qc, kc, vc) = (h * dh, d + h * dh, 2 * d + h * dh);
        for j in 0..len {
            for c in 0..dh {
                kt[c * len + j] = qkv[j * w + kc + c];
            }
        }
        for i in 0..len {
            let p = &mut probs[(h * len + i) * len..][..len];
            p.fill(0.0);
            for c in 0..dh {
                axpy(p, qkv[i * w + qc + c], &kt[c * len..][..len]);
            }
            let max = lane_max(p, f32::NEG_INFINITY);
            p.iter_mut().for_each(|s| *s = (*s - max) * scale);
            quant::exp_in_place(p);
            let inv = 1.0 / lane_sum(p, |x| x);
            p.iter_mut().for_each(|s| *s *= inv);
            let o = &mut context[i * d + qc..][..dh];
            o.fill(0.0);
            for (j, &pj) in p.iter().enumerate() {
                axpy(o, pj, &qkv[j * w + vc..][..dh]);
            }
        }
    }
}

/// [`attend`]'s backward pass: `dcontext` `[len, d]` to `dqkv` `[len, 3 d]`.
fn attend_backward(
    qkv: &[f32],
    probs: &[f32],
    dcontext: &[f32],
    len: usize,
    heads: usize,
    dqkv: &mut [f32],
) {
    let w = qkv.len() / len.max(1);
    let d = w / 3;
    let dh = d / heads;
    let scale = 1.0 / (dh as f32).sqrt();
    dqkv.fill(0.0);
    let mut vt = vec![0.0f32; dh * len];
    let mut dp = vec![0.0f32; len];
    let mut dq = vec![0.0f32; dh];
    for h in 0..heads {
        let (qc, kc, vc) = (h * dh, d + h * dh, 2 * d + h * dh);
        for j in 0..len {
            for c in 0..dh {
                vt[c * len + j] = qkv[j * w + vc + c];
            }
        }
        for i in 0..len {
            let p = &probs[(h * len + i) * len..][..len];
            let dci = &dcontext[i * d + qc..][..dh];
            dp.fill(0.0);
            for (c, &g) in dci.iter().enumerate() {
                axpy(&mut dp, g, &vt[c * len..][..len]);
            }
            for (j, &pj) in p.iter().enumerate() {
                axpy(&mut dqkv[j * w + vc..][..dh], pj, dci);
            }
            let mut acc = [0.0f32; 16];
            for (a, b) in p.chunks(16).zip(dp.chunks(16)) {
                for ((s, a), b) in acc.iter_mut().zip(a).zip(b) {
                    *s += a * b;
                }
            }
            let dot = acc.iter().sum::<f32>();
            for (g, &pj) in dp.iter_mut().zip(p) {
                *g = scale * pj * (*g - dot);
            }
            dq.fill(0.0);
            for (j, &g) in dp.iter().enumerate() {
                axpy(&mut dq, g, &qkv[j * w + kc..][..dh]);
            }
            dqkv[i * w + qc..][..dh].copy_from_slice(&dq);
            let qi = &qkv[i * w + qc..][..dh];
            for (j, &g) in dp.iter().enumerate() {
                axpy(&mut dqkv[j * w + kc..][..dh], g, qi);
            }
        }
    }
}

/// `x + mask * a` for every element, into a new buffer.
fn residual(x: &[f32], a: &[f32], mask: &Option<Vec<f32>>) -> Vec<f32> {
    let mut r = a.to_vec();
    apply(mask, &mut r);
    r.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(r, x)| r.iter_mut().zip(x).for_each(|(r, x)| *r += x));
    r
}

/// The forward pass over unpadded sequences, with dropout where `dropout` is given (training),
/// keeping the tape.
pub(crate) fn forward(
    p: &Params,
    shape: Shape,
    seqs: &[&[u32]],
    dropout: Option<Dropout>,
) -> Result<Tape> {
    let d = p.d();
    let vocab = p.word.len() / d;
    let positions = p.position.len() / d;
    for s in seqs {
        if s.len() > positions {
            return Err(Error::Model(format!(
                "a sequence of {} tokens exceeds the model's {positions} positions",
                s.len()
            )));
        }
        if let Some(&id) = s.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::Model(format!(
                "token id {id} is outside the vocabulary of {vocab}"
            )));
        }
    }
    let spans = Spans::new(seqs);
    let n = spans.n;
    if n == 0 || seqs.is_empty() {
        return Err(Error::Data("a batch with no tokens".into()));
    }
    let drop = Dropout {
        p: shape.dropout,
        key: 0,
    };
    let drop = dropout.unwrap_or(Dropout { p: 0.0, ..drop });
    let ids: Vec<u32> = seqs.iter().flat_map(|s| s.iter().copied()).collect();
    let mut e = vec![0.0f32; n * d];
    let mut rows = e.chunks_exact_mut(d);
    for s in seqs {
        for (t, (&id, row)) in s.iter().zip(rows.by_ref()).enumerate() {
            let w = &p.word[id as usize * d..][..d];
            let pos = &p.position[t * d..][..d];
            for (((o, w), pos), g) in row.iter_mut().zip(w).zip(pos).zip(&p.segment[..d]) {
                *o = w + pos + g;
            }
        }
    }
    let (xhat0, rstd0, mut x) = norm_forward(&e, &p.norm0, &p.norm0_bias, shape.eps);
    let drop0 = drop.mask(0, x.len());
    apply(&drop0, &mut x);
    let mut codes = RowCodes::default();
    let mut layers = Vec::with_capacity(p.layers.len());
    for (li, l) in p.layers.iter().enumerate() {
        let site = 1 + 2 * li as u64;
        let qkv = linear(&l.qkv, &l.qkv_bias, &x, n, &mut codes)?;
        let mut probs = vec![0.0f32; spans.lens.iter().map(|l| shape.heads * l * l).sum()];
        let mut context = vec![0.0f32; n * d];
        let starts = spans.starts();
        spans
            .split(&mut probs, |len| shape.heads * len * len)
            .into_par_iter()
            .zip(spans.split(&mut context, |len| len * d))
            .zip(starts.par_iter().zip(&spans.lens))
            .for_each(|((probs, context), (&at, &len))| {
                quant::with_simd(
                    #[inline(always)]
                    || {
                        attend(
                            &qkv[at * 3 * d..(at + len) * 3 * d],
                            len,
                            shape.heads,
                            probs,
                            context,
                        )
                    },
                )
            });
        let attended = linear(&l.out, &l.out_bias, &context, n, &mut codes)?;
        let drop1 = drop.mask(site, n * d);
        let (xhat1, rstd1, h1) = norm_forward(
            &residual(&x, &attended, &drop1),
            &l.norm1,
            &l.norm1_bias,
            shape.eps,
        );
        let up = linear(&l.up, &l.up_bias, &h1, n, &mut codes)?;
        let act = gelu_forward(&up);
        let down = linear(&l.down, &l.down_bias, &act, n, &mut codes)?;
        let drop2 = drop.mask(site + 1, n * d);
        let (xhat2, rstd2, out) = norm_forward(
            &residual(&h1, &down, &drop2),
            &l.norm2,
            &l.norm2_bias,
            shape.eps,
        );
        layers.push(LayerTape {
            x: std::mem::replace(&mut x, out),
            qkv,
            probs,
            context,
            drop1,
            xhat1,
            rstd1,
            h1,
            up,
            act,
            drop2,
            xhat2,
            rstd2,
        });
    }
    let b = seqs.len();
    let mut pooled = vec![0.0f32; b * d];
    let mut at = 0;
    for (row, &len) in pooled.chunks_exact_mut(d).zip(&spans.lens) {
        for r in x[at * d..(at + len) * d].chunks_exact(d) {
            row.iter_mut().zip(r).for_each(|(m, v)| *m += v);
        }
        let count = len.max(1) as f32;
        row.iter_mut().for_each(|m| *m /= count);
        at += len;
    }
    let drop_head = drop.mask(u64::MAX, b * d);
    apply(&drop_head, &mut pooled);
    let labels = p.labels();
    let mut logits = vec![0.0f32; b * labels];
    for (lg, x) in logits.chunks_exact_mut(labels).zip(pooled.chunks_exact(d)) {
        for ((o, w), bias) in lg.iter_mut().zip(p.head.chunks_exact(d)).zip(&p.head_bias) {
            *o = w.iter().zip(x).map(|(w, x)| w * x).sum::<f32>() + bias;
        }
    }
    Ok(Tape {
        spans,
        ids,
        xhat0,
        rstd0,
        drop0,
        layers,
        pooled,
        drop_head,
        logits,
    })
}

/// Weighted soft-target cross-entropy of `logits` (`[B, labels]`) and its gradient:
/// `sum_i w_i * -sum_c t_ic log p_ic / sum_i w_i`.
pub(crate) fn soft_ce(
    logits: &[f32],
    targets: &[f32],
    weights: &[f32],
    labels: usize,
) -> (f32, Vec<f32>) {
    let total = f64::from(weights.iter().sum::<f32>()).max(1e-12);
    let mut loss = 0.0f64;
    let mut grad = vec![0.0f32; logits.len()];
    for (((lg, t), &w), g) in logits
        .chunks_exact(labels)
        .zip(targets.chunks_exact(labels))
        .zip(weights)
        .zip(grad.chunks_exact_mut(labels))
    {
        let max = lg.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let lse = f64::from(max)
            + lg.iter()
                .map(|&v| f64::from(v - max).exp())
                .sum::<f64>()
                .ln();
        let t_sum: f64 = t.iter().map(|&v| f64::from(v)).sum();
        let ce: f64 = t
            .iter()
            .zip(lg)
            .map(|(&t, &v)| f64::from(t) * (lse - f64::from(v)))
            .sum();
        loss += f64::from(w) * ce;
        for ((g, &v), &t) in g.iter_mut().zip(lg).zip(t) {
            let p = (f64::from(v) - lse).exp();
            *g = (f64::from(w) * (p * t_sum - f64::from(t)) / total) as f32;
        }
    }
    ((loss / total) as f32, grad)
}

/// The backward pass from the logits' gradient: writes the gradient of every tensor that
/// `trainable` marks (in [`Params::tensors`] order) into `grads`; the others are left as they
/// are.
pub(crate) fn backward(
    p: &Params,
    shape: Shape,
    tape: &Tape,
    dlogits: &[f32],
    trainable: &[bool],
    grads: &mut Params,
) -> Result<()> {
    let d = p.d();
    let labels = p.labels();
    let spans = &tape.spans;
    let n = spans.n;
    // The head.
    let mut dpooled = vec![0.0f32; tape.pooled.len()];
    grads.head.fill(0.0);
    grads.head_bias.fill(0.0);
    for ((g, x), dp) in dlogits
        .chunks_exact(labels)
        .zip(tape.pooled.chunks_exact(d))
        .zip(dpooled.chunks_exact_mut(d))
    {
        for (c, &gc) in g.iter().enumerate() {
            axpy(&mut grads.head[c * d..(c + 1) * d], gc, x);
            grads.head_bias[c] += gc;
            axpy(dp, gc, &p.head[c * d..(c + 1) * d]);
        }
    }
    let embeddings = trainable.first().copied().unwrap_or(false);
    let layer_trains = |l: usize| trainable.get(5 + 12 * l).copied().unwrap_or(false);
    let lowest = (0..p.layers.len()).find(|&l| layer_trains(l));
    let Some(bottom) = (if embeddings { Some(0) } else { lowest }) else {
        return Ok(());
    };
    apply(&tape.drop_head, &mut dpooled);
    let mut dy = vec![0.0f32; n * d];
    let mut at = 0;
    for (dp, &len) in dpooled.chunks_exact(d).zip(&spans.lens) {
        let inv = 1.0 / len.max(1) as f32;
        for row in dy[at * d..(at + len) * d].chunks_exact_mut(d) {
            row.iter_mut().zip(dp).for_each(|(o, g)| *o = g * inv);
        }
        at += len;
    }
    let mut codes = RowCodes::default();
    for li in (bottom..p.layers.len()).rev() {
        let need_dx = li > bottom || embeddings;
        let g = layer_trains(li).then_some(&mut grads.layers[li]);
        dy = layer_backward(
            &p.layers[li],
            &tape.layers[li],
            spans,
            shape,
            dy,
            g,
            need_dx,
            &mut codes,
        )?;
    }
    if !embeddings {
        return Ok(());
    }
    apply(&tape.drop0, &mut dy);
    let (de, dg, db) = norm_backward(&dy, &tape.xhat0, &tape.rstd0, &p.norm0);
    grads.norm0 = dg;
    grads.norm0_bias = db;
    let positions = grads.position.len() / d;
    let (word, position, segment) = (&mut grads.word, &mut grads.position, &mut grads.segment);
    word.par_chunks_mut(4096).for_each(|c| c.fill(0.0));
    position.fill(0.0);
    segment.fill(0.0);
    let mut rows = de.chunks_exact(d).zip(&tape.ids);
    for &len in &spans.lens {
        for (t, (row, &id)) in rows.by_ref().take(len).enumerate() {
            axpy(&mut word[id as usize * d..][..d], 1.0, row);
            if t < positions {
                axpy(&mut position[t * d..][..d], 1.0, row);
            }
            axpy(&mut segment[..d], 1.0, row);
        }
    }
    Ok(())
}

/// One layer's backward pass from its output's gradient `dy`: the weights' gradients into
/// `grads` (when it trains), and the input's gradient (empty unless `need_dx`).
#[allow(clippy::too_many_arguments)]
fn layer_backward(
    l: &LayerParams,
    t: &LayerTape,
    spans: &Spans,
    shape: Shape,
    dy: Vec<f32>,
    mut grads: Option<&mut LayerParams>,
    need_dx: bool,
    codes: &mut RowCodes,
) -> Result<Vec<f32>> {
    let n = spans.n;
    let d = l.norm1.len();
    let f = l.up_bias.len();
    // Second norm: `out = norm2(h1 + drop2 * down)`.
    let (dr2, dg2, db2) = norm_backward(&dy, &t.xhat2, &t.rstd2, &l.norm2);
    let mut ddown = dr2.clone();
    apply(&t.drop2, &mut ddown);
    if let Some(g) = grads.as_deref_mut() {
        g.norm2 = dg2;
        g.norm2_bias = db2;
        g.down = weight_grad(&ddown, &t.act, n, codes)?;
        g.down_bias = column_sums(&ddown, d);
    }
    let mut dact = input_grad(&l.down, &ddown, n, f, codes)?;
    gelu_backward(&t.up, &mut dact);
    let dup = dact;
    if let Some(g) = grads.as_deref_mut() {
        g.up = weight_grad(&dup, &t.h1, n, codes)?;
        g.up_bias = column_sums(&dup, f);
    }
    let mut dh1 = input_grad(&l.up, &dup, n, d, codes)?;
    dh1.par_chunks_mut(4096)
        .zip(dr2.par_chunks(4096))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
    // First norm: `h1 = norm1(x + drop1 * attended)`.
    let (dr1, dg1, db1) = norm_backward(&dh1, &t.xhat1, &t.rstd1, &l.norm1);
    let mut dattended = dr1.clone();
    apply(&t.drop1, &mut dattended);
    if let Some(g) = grads.as_deref_mut() {
        g.norm1 = dg1;
        g.norm1_bias = db1;
        g.out = weight_grad(&dattended, &t.context, n, codes)?;
        g.out_bias = column_sums(&dattended, d);
    }
    let dcontext = input_grad(&l.out, &dattended, n, d, codes)?;
    let mut dqkv = vec![0.0f32; n * 3 * d];
    let mut prob_at = Vec::with_capacity(spans.lens.len());
    let mut acc = 0;
    for &len in &spans.lens {
        prob_at.push(acc);
        acc += shape.heads * len * len;
    }
    let starts = spans.starts();
    spans
        .split(&mut dqkv, |len| len * 3 * d)
        .into_par_iter()
        .zip(starts.par_iter().zip(&spans.lens))
        .zip(&prob_at)
        .for_each(|((dqkv, (&at, &len)), &pa)| {
            quant::with_simd(
                #[inline(always)]
                || {
                    attend_backward(
                        &t.qkv[at * 3 * d..(at + len) * 3 * d],
                        &t.probs[pa..pa + shape.heads * len * len],
                        &dcontext[at * d..(at + len) * d],
                        len,
                        shape.heads,
                        dqkv,
                    )
                },
            )
        });
    if let Some(g) = grads {
        g.qkv = weight_grad(&dqkv, &t.x, n, codes)?;
        g.qkv_bias = column_sums(&dqkv, 3 * d);
    }
    if !need_dx {
        return Ok(Vec::new());
    }
    let mut dx = input_grad(&l.qkv, &dqkv, n, d, codes)?;
    dx.par_chunks_mut(4096)
        .zip(dr1.par_chunks(4096))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
    Ok(dx)
}

#[cfg(test)]
mod tests {
    use burn::module::{Module, ModuleMapper, Param};
    use burn::optim::GradientsParams;
    use burn::tensor::{Device, Tensor, TensorData};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::data::assets_dir;
    use crate::slm::minilm::{BertConfig, MiniLmClassifier};
    use crate::slm::train::weighted_soft_ce;
    use crate::slm::{Classifier, TokenBatch};

    /// Each parameter replaced by its gradient (zeros where it has none).
    struct GradsOf<'a>(&'a GradientsParams);

    impl ModuleMapper for GradsOf<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let v = param.val();
            let g = self.0.get::<D>(param.id).unwrap_or_else(|| v.zeros_like());
            Param::initialized(param.id, g)
        }
    }

    /// The real MiniLM without dropout and a fresh 3-label head, and a batch of four
    /// sequences of different lengths with soft targets and weights.
    fn model_and_batch() -> (
        MiniLmClassifier,
        BertConfig,
        Vec<Vec<u32>>,
        Vec<f32>,
        Vec<f32>,
    ) {
        let dir = assets_dir().join("minilm");
        let mut cfg = BertConfig::from_file(&dir.join("config.json")).unwrap();
        cfg.hidden_dropout_prob = 0.0;
        let device = Device::flex();
        let encoder = cfg
            .init(&device)
            .load_safetensors(&dir.join("model.safetensors"), &device)
            .unwrap();
        let model = MiniLmClassifier::new(encoder, &cfg, 3, &device);
        let mut rng = StdRng::seed_from_u64(7);
        let seqs: Vec<Vec<u32>> = [9, 14, 5, 12]
            .iter()
            .map(|&len| {
                let mut s = vec![101u32];
                s.extend((0..len - 2).map(|_| rng.random_range(1000..20000u32)));
                s.push(102);
                s
            })
            .collect();
        let targets = vec![1.0, 0.0, 0.0, 0.2, 0.7, 0.1, 0.0, 0.0, 1.0, 0.3, 0.3, 0.4];
        let weights = vec![1.0, 0.5, 2.0, 1.0];
        (model, cfg, seqs, targets, weights)
    }

    fn rel(a: &[f32], b: &[f32]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
        let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
        (num / den.max(1e-30)).sqrt()
    }

    /// Logits and every tensor's gradient against burn's autodiff on the same weights and
    /// batch (padded there): within the 16-bit codes' rounding.
    #[test]
    fn gradients_match_burn_autodiff() {
        // f32 products: the passes themselves, to f32 rounding.
        gradients_against_burn(true, 2e-5, 1e-4);
        // The kernels' codes: their rounding through twelve layers' passes.
        gradients_against_burn(false, 5e-3, 3e-2);
    }

    fn gradients_against_burn(exact: bool, logit_tol: f32, grad_tol: f64) {
        EXACT.with(|e| e.set(exact));
        let (model, cfg, seqs, targets, weights) = model_and_batch();
        let shape = Shape {
            heads: cfg.num_attention_heads,
            eps: cfg.layer_norm_eps as f32,
            dropout: 0.0,
        };
        let params = Params::read(&model).unwrap();
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let tape = forward(&params, shape, &refs, None).unwrap();
        let (loss, dlogits) = soft_ce(&tape.logits, &targets, &weights, 3);
        let mut grads = params.zeros_like();
        let all = vec![true; params.tensors().len()];
        backward(&params, shape, &tape, &dlogits, &all, &mut grads).unwrap();

        let ad = Device::flex().autodiff();
        let burn_model = model.set_require_grad(true).train();
        let batch = TokenBatch::new(&refs, 0, &ad);
        let logits = burn_model.logits(batch.ids, batch.mask);
        let burn_logits: Vec<f32> = logits.clone().try_into_vec_as().unwrap();
        let t = Tensor::<2>::from_data(TensorData::new(targets.clone(), [4, 3]), &ad);
        let w = Tensor::<2>::from_data(TensorData::new(weights.clone(), [4, 1]), &ad);
        let burn_loss = weighted_soft_ce(logits, t, w);
        let burn_loss_value: f32 = burn_loss.clone().into_scalar();
        let g = GradientsParams::from_grads(burn_loss.backward(), &burn_model);
        let burn_grads = Params::read(&burn_model.map(&mut GradsOf(&g))).unwrap();

        let apart = tape
            .logits
            .iter()
            .zip(&burn_logits)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        println!("exact {exact}: logits at most {apart:.2e} apart");
        assert!(
            apart < logit_tol,
            "logits {:?} vs {:?}",
            tape.logits,
            burn_logits
        );
        assert!(
            (loss - burn_loss_value).abs() < logit_tol,
            "{loss} vs {burn_loss_value}"
        );
        let mut worst = (0.0f64, 0);
        for (i, (a, b)) in grads.tensors().iter().zip(burn_grads.tensors()).enumerate() {
            let r = rel(a, b);
            if r > worst.0 {
                worst = (r, i);
            }
        }
        println!(
            "exact {exact}: worst relative gradient error {:.2e} (tensor {})",
            worst.0, worst.1
        );
        assert!(
            worst.0 < grad_tol,
            "tensor {}: relative error {}",
            worst.1,
            worst.0
        );
    }

    /// A training step (dropout on) gives the same bits on one thread as on several.
    #[test]
    fn steps_do_not_depend_on_the_threads() {
        let (model, cfg, seqs, targets, weights) = model_and_batch();
        let shape = Shape {
            heads: cfg.num_attention_heads,
            eps: cfg.layer_norm_eps as f32,
            dropout: 0.1,
        };
        let params = Params::read(&model).unwrap();
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let grads_on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let drop = Dropout { p: 0.1, key: 3 };
                let tape = forward(&params, shape, &refs, Some(drop)).unwrap();
                let (_, dl) = soft_ce(&tape.logits, &targets, &weights, 3);
                let mut grads = params.zeros_like();
                let all = vec![true; params.tensors().len()];
                backward(&params, shape, &tape, &dl, &all, &mut grads).unwrap();
                grads
            })
        };
        let one = grads_on(1);
        assert!(one.tensors().iter().any(|t| t.iter().any(|&v| v != 0.0)));
        assert!(one == grads_on(3), "one thread and three differ");
    }

    /// Dropout keeps about `1 - p` of the values, scaled, and its masks differ by site.
    #[test]
    fn dropout_keeps_the_expected_share() {
        let d = Dropout { p: 0.1, key: 5 };
        let m = d.mask(1, 100_000).unwrap();
        let kept = m.iter().filter(|&&v| v != 0.0).count() as f64 / m.len() as f64;
        assert!((kept - 0.9).abs() < 0.005, "{kept}");
        assert!(m.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-6));
        assert_ne!(m, d.mask(2, 100_000).unwrap());
        assert!(Dropout { p: 0.0, key: 5 }.mask(1, 10).is_none());
    }
}
