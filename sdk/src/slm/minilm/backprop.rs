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

use super::attention;
use super::cpu::lane_sum;
use super::gelu::{gelu_grad_in_place, gelu_in_place};
#[cfg(test)]
use super::params::transpose;
use super::params::{LayerParams, Params};
use crate::quant::{self, ChannelMatrix, RowCodes};
use crate::slm::train::{log_sum_exp, soft_ce_row};
use crate::{Error, Result};

/// Rows a rayon task of the element-wise passes takes.
const CHUNK_ROWS: usize = 16;

/// Buffers kept from step to step: a step's values allocated afresh each time cost a page
/// fault a page, and the TLB flushes of handing them back. Each kept buffer keeps its whole
/// length, so a longer use than the last writes nothing but its own values.
#[derive(Default)]
pub(crate) struct Work {
    f32s: Vec<Vec<f32>>,
    mats: Vec<ChannelMatrix>,
    codes: RowCodes,
}

/// The first `len` values of a kept buffer (all of whose values are written).
#[derive(Debug)]
pub(crate) struct Buf {
    data: Vec<f32>,
    len: usize,
}

impl std::ops::Deref for Buf {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        &self.data[..self.len]
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.data[..self.len]
    }
}

impl From<Vec<f32>> for Buf {
    fn from(data: Vec<f32>) -> Buf {
        Buf {
            len: data.len(),
            data,
        }
    }
}

impl Work {
    /// `len` zeros, in the shortest kept buffer that holds them (else the longest, grown).
    fn take(&mut self, len: usize) -> Buf {
        let mut v = self.take_dirty(len);
        v.fill(0.0);
        v
    }

    /// [`Work::take`] for a buffer the caller writes whole: whatever values it held.
    fn take_dirty(&mut self, len: usize) -> Buf {
        let fits = (0..self.f32s.len())
            .filter(|&i| self.f32s[i].len() >= len)
            .min_by_key(|&i| self.f32s[i].len());
        let pick = fits.or_else(|| (0..self.f32s.len()).max_by_key(|&i| self.f32s[i].len()));
        let mut data = pick.map(|i| self.f32s.swap_remove(i)).unwrap_or_default();
        if data.len() < len {
            // A new allocation: growing would copy values no one reads.
            drop(data);
            data = vec![0.0; len];
        }
        Buf { data, len }
    }

    /// A copy of `x` in a kept buffer.
    fn copy(&mut self, x: &[f32]) -> Buf {
        let mut v = self.take_dirty(x.len());
        v.copy_from_slice(x);
        v
    }

    fn give(&mut self, v: Buf) {
        if !v.data.is_empty() {
            self.f32s.push(v.data);
        }
    }

    fn give_mask(&mut self, m: Option<Buf>) {
        if let Some(m) = m {
            self.give(m);
        }
    }

    /// A kept matrix, filled by `fill` (rounding a weight or a layer's input).
    fn matrix(
        &mut self,
        what: &str,
        fill: impl FnOnce(&mut ChannelMatrix) -> std::result::Result<(), quant::ggml::BlockError>,
    ) -> Result<ChannelMatrix> {
        let mut m = self.mats.pop().unwrap_or_default();
        fill(&mut m).map_err(model_err(what))?;
        Ok(m)
    }

    /// `out <- x m^T + bias` for the `n` rows of `x`, in a kept buffer; `m` kept again.
    fn product(&mut self, m: ChannelMatrix, x: &[f32], n: usize) -> Buf {
        let mut out = self.take_dirty(n * m.rows());
        m.forward(x, n, &mut self.codes, &mut out);
        self.mats.push(m);
        out
    }

    /// `out <- x^T m^T` (`[cols, m.rows()]`) for the columns of `x` (`[n, cols]`) as rows,
    /// with no transposed copy; `m` kept again.
    fn product_of_columns(&mut self, m: ChannelMatrix, x: &[f32], n: usize, out: &mut [f32]) {
        let cols = x.len() / n.max(1);
        self.codes.round_transposed(x, n, cols, m.limit());
        m.product(&self.codes, out);
        self.mats.push(m);
    }
}

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
    fn mask(&self, site: u64, n: usize, work: &mut Work) -> Option<Buf> {
        if self.p <= 0.0 {
            return None;
        }
        let keep = 1.0 / (1.0 - self.p);
        let threshold = (f64::from(self.p) * (1u64 << 24) as f64) as u32;
        let base = splitmix(self.key ^ splitmix(site));
        let mut m = work.take_dirty(n);
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

fn apply(mask: &Option<Buf>, x: &mut [f32]) {
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
    x: Buf,
    qkv: Buf,
    /// Each sequence's `[heads, len, len]` attention weights, one after another.
    probs: Buf,
    context: Buf,
    drop1: Option<Buf>,
    xhat1: Buf,
    rstd1: Buf,
    h1: Buf,
    up: Buf,
    act: Buf,
    drop2: Option<Buf>,
    xhat2: Buf,
    rstd2: Buf,
}

/// The forward pass's saved values and its logits.
pub(crate) struct Tape {
    spans: Spans,
    ids: Vec<u32>,
    xhat0: Buf,
    rstd0: Buf,
    drop0: Option<Buf>,
    layers: Vec<LayerTape>,
    /// The head's input `[B, d]` (pooled, after dropout) and its mask.
    pooled: Buf,
    drop_head: Option<Buf>,
    /// `[B, labels]`.
    pub logits: Vec<f32>,
}

impl Tape {
    /// Hands every buffer back to `work`.
    pub(crate) fn recycle(self, work: &mut Work) {
        for l in self.layers {
            for v in [
                l.x, l.qkv, l.probs, l.context, l.xhat1, l.rstd1, l.h1, l.up, l.act, l.xhat2,
                l.rstd2,
            ] {
                work.give(v);
            }
            work.give_mask(l.drop1);
            work.give_mask(l.drop2);
        }
        for v in [self.xhat0, self.rstd0, self.pooled] {
            work.give(v);
        }
        work.give_mask(self.drop0);
        work.give_mask(self.drop_head);
    }
}

fn model_err(what: &str) -> impl Fn(quant::ggml::BlockError) -> Error + '_ {
    move |e| Error::Model(format!("{what}: {e}"))
}

#[cfg(test)]
thread_local! {
    /// Tests set this to take every product in plain f32 (on the calling thread).
    static EXACT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether a test asked for plain f32 products on this thread.
#[cfg(test)]
fn exact_on() -> bool {
    EXACT.with(|e| e.get())
}

/// `a` `[n, k]` times `b^T` (`b` `[m, k]`) plus `bias`, in f32 one dot at a time.
#[cfg(test)]
fn exact(a: &[f32], b: &[f32], bias: &[f32], n: usize, k: usize) -> Buf {
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
    out.into()
}

/// `y <- x W^T + b` on the kernels, `W` `[dout, din]`.
fn linear(w: &[f32], b: &[f32], x: &[f32], n: usize, work: &mut Work) -> Result<Buf> {
    let (dout, din) = (b.len(), x.len() / n.max(1));
    #[cfg(test)]
    if exact_on() {
        return Ok(exact(x, w, b, n, din));
    }
    let m = work.matrix("a weight", |m| m.refill(w, b, dout, din))?;
    Ok(work.product(m, x, n))
}

/// `dx <- dy W` (`[n, din]`), `W` `[dout, din]`, `dy` `[n, dout]`.
fn input_grad(w: &[f32], dy: &[f32], n: usize, din: usize, work: &mut Work) -> Result<Buf> {
    let dout = dy.len() / n.max(1);
    #[cfg(test)]
    if exact_on() {
        return Ok(exact(
            dy,
            &transpose(w, dout, din),
            &vec![0.0; din],
            n,
            dout,
        ));
    }
    let m = work.matrix("a weight", |m| m.refill_transposed(w, dout, din))?;
    Ok(work.product(m, dy, n))
}

/// `dW <- dy^T x` (`[dout, din]`) over the `n` rows, into `dw`.
fn weight_grad(dy: &[f32], x: &[f32], n: usize, dw: &mut [f32], work: &mut Work) -> Result<()> {
    let din = x.len() / n.max(1);
    #[cfg(test)]
    if exact_on() {
        let dout = dy.len() / n.max(1);
        let (dyt, xt) = (transpose(dy, n, dout), transpose(x, n, din));
        dw.copy_from_slice(&exact(&dyt, &xt, &vec![0.0; din], dout, n));
        return Ok(());
    }
    let m = work.matrix("a layer's input", |m| m.refill_transposed(x, n, din))?;
    work.product_of_columns(m, dy, n, dw);
    Ok(())
}

/// Column sums of `x` (`[n, out.len()]`) into `out`: fixed chunks of rows, their sums added
/// in order.
fn column_sums(x: &[f32], out: &mut [f32]) {
    let width = out.len();
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
    out.fill(0.0);
    for p in parts {
        out.iter_mut().zip(p).for_each(|(o, v)| *o += v);
    }
}

/// Layer norm of each row of `r` (`[n, d]`): `xhat`, `1 / std` and the output.
fn norm_forward(
    r: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    work: &mut Work,
) -> (Buf, Buf, Buf) {
    let d = gamma.len();
    let n = r.len() / d;
    let (mut xhat, mut rstd, mut y) = (
        work.take_dirty(r.len()),
        work.take_dirty(n),
        work.take_dirty(r.len()),
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

/// Layer norm's backward pass: the input's gradient; `(dgamma, dbeta)` into `grads` where
/// given.
fn norm_backward(
    dy: &[f32],
    xhat: &[f32],
    rstd: &[f32],
    gamma: &[f32],
    grads: Option<(&mut [f32], &mut [f32])>,
    work: &mut Work,
) -> Buf {
    let d = gamma.len();
    let mut dx = work.take_dirty(dy.len());
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
    if let Some((dgamma, dbeta)) = grads {
        let mut prod = work.copy(dy);
        prod.par_chunks_mut(4096)
            .zip(xhat.par_chunks(4096))
            .for_each(|(p, x)| p.iter_mut().zip(x).for_each(|(p, x)| *p *= x));
        column_sums(&prod, dgamma);
        work.give(prod);
        column_sums(dy, dbeta);
    }
    dx
}

fn gelu_forward(u: &[f32], work: &mut Work) -> Buf {
    let mut g = work.copy(u);
    g.par_chunks_mut(4096).for_each(gelu_in_place);
    g
}

/// `dg <- dg * gelu'(u)`.
fn gelu_backward(u: &[f32], dg: &mut [f32]) {
    dg.par_chunks_mut(4096)
        .zip(u.par_chunks(4096))
        .for_each(|(dg, u)| gelu_grad_in_place(u, dg));
}

#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Columns `col..col + dh` of the `len` rows of `qkv` (`w` wide), transposed into `out`
/// (`[dh, len]`).
#[inline(always)]
fn head_columns(qkv: &[f32], len: usize, w: usize, col: usize, dh: usize, out: &mut [f32]) {
    for j in 0..len {
        for (c, &x) in qkv[j * w + col..][..dh].iter().enumerate() {
            out[c * len + j] = x;
        }
    }
}

/// One query's row of `dS = scale P (dP - rowsum(P dP))` into `ds`, with `dP = dc V^T`
/// (`vt`: the head's values transposed, [`head_columns`]) and `p` the query's weights.
#[inline(always)]
fn score_grads(ds: &mut [f32], p: &[f32], dc: &[f32], vt: &[f32], scale: f32) {
    let len = p.len();
    ds.fill(0.0);
    for (c, &g) in dc.iter().enumerate() {
        axpy(ds, g, &vt[c * len..][..len]);
    }
    let mut acc = [0.0f32; 16];
    for (a, b) in p.chunks(16).zip(ds.chunks(16)) {
        for ((s, a), b) in acc.iter_mut().zip(a).zip(b) {
            *s += a * b;
        }
    }
    let dot = acc.iter().sum::<f32>();
    for (g, &pj) in ds.iter_mut().zip(p) {
        *g = scale * pj * (*g - dot);
    }
}

/// The attention's backward pass ([`attention::sequence_keeping`] the forward): `dcontext`
/// `[len, d]` to `dqkv` `[len, 3 d]`.
#[inline(always)]
fn attend_backward(
    qkv: &[f32],
    probs: &[f32],
    dcontext: &[f32],
    len: usize,
    heads: usize,
    dqkv: &mut [f32],
) {
    let d = qkv.len() / len.max(1) / 3;
    match d / heads.max(1) {
        32 => attend_backward_heads::<32>(qkv, probs, dcontext, len, heads, dqkv),
        64 => attend_backward_heads::<64>(qkv, probs, dcontext, len, heads, dqkv),
        _ => attend_backward_any(qkv, probs, dcontext, len, heads, dqkv),
    }
}

/// [`attend_backward`] for heads `DH` wide, the same sums in the same order as
/// [`attend_backward_any`]: the gradients of a query, key or value row are summed in registers
/// and written once, where the general version adds into memory at every step.
#[inline(always)]
fn attend_backward_heads<const DH: usize>(
    qkv: &[f32],
    probs: &[f32],
    dcontext: &[f32],
    len: usize,
    heads: usize,
    dqkv: &mut [f32],
) {
    let d = DH * heads;
    let w = 3 * d;
    let scale = 1.0 / (DH as f32).sqrt();
    let row = |x: &[f32], r: usize, width: usize, at: usize| -> [f32; DH] {
        match x[r * width + at..][..DH].try_into() {
            Ok(a) => a,
            Err(_) => unreachable!("DH values"),
        }
    };
    let mut vt = vec![0.0f32; DH * len];
    // One head's `dS` ([`score_grads`]).
    let mut ds = vec![0.0f32; len * len];
    for h in 0..heads {
        let (qc, kc, vc) = (h * DH, d + h * DH, 2 * d + h * DH);
        let p = &probs[h * len * len..][..len * len];
        head_columns(qkv, len, w, vc, DH, &mut vt);
        for (i, (dsi, pi)) in ds
            .chunks_exact_mut(len)
            .zip(p.chunks_exact(len))
            .enumerate()
        {
            score_grads(dsi, pi, &dcontext[i * d + qc..][..DH], &vt, scale);
        }
        for (i, dsi) in ds.chunks_exact(len).enumerate() {
            let mut dq = [0.0f32; DH];
            for (j, &g) in dsi.iter().enumerate() {
                let kj = row(qkv, j, w, kc);
                for (a, k) in dq.iter_mut().zip(kj) {
                    *a += g * k;
                }
            }
            dqkv[i * w + qc..][..DH].copy_from_slice(&dq);
        }
        for j in 0..len {
            let (mut dk, mut dv) = ([0.0f32; DH], [0.0f32; DH]);
            for i in 0..len {
                let (g, pij) = (ds[i * len + j], p[i * len + j]);
                let (qi, dci) = (row(qkv, i, w, qc), row(dcontext, i, d, qc));
                for ((a, b), (q, c)) in dk.iter_mut().zip(dv.iter_mut()).zip(qi.iter().zip(&dci)) {
                    *a += g * q;
                    *b += pij * c;
                }
            }
            dqkv[j * w + kc..][..DH].copy_from_slice(&dk);
            dqkv[j * w + vc..][..DH].copy_from_slice(&dv);
        }
    }
}

/// [`attend_backward`] for any head width.
fn attend_backward_any(
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
        head_columns(qkv, len, w, vc, dh, &mut vt);
        for i in 0..len {
            let p = &probs[(h * len + i) * len..][..len];
            let dci = &dcontext[i * d + qc..][..dh];
            for (j, &pj) in p.iter().enumerate() {
                axpy(&mut dqkv[j * w + vc..][..dh], pj, dci);
            }
            score_grads(&mut dp, p, dci, &vt, scale);
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
fn residual(x: &[f32], a: &[f32], mask: &Option<Buf>, work: &mut Work) -> Buf {
    let mut r = work.copy(a);
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
    work: &mut Work,
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
    let drop = dropout.unwrap_or(Dropout { p: 0.0, key: 0 });
    let ids: Vec<u32> = seqs.iter().flat_map(|s| s.iter().copied()).collect();
    let mut e = work.take_dirty(n * d);
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
    let (xhat0, rstd0, mut x) = norm_forward(&e, &p.norm0, &p.norm0_bias, shape.eps, work);
    work.give(e);
    let drop0 = drop.mask(0, x.len(), work);
    apply(&drop0, &mut x);
    let mut layers = Vec::with_capacity(p.layers.len());
    for (li, l) in p.layers.iter().enumerate() {
        let site = 1 + 2 * li as u64;
        let qkv = linear(&l.qkv, &l.qkv_bias, &x, n, work)?;
        let mut probs = work.take_dirty(spans.lens.iter().map(|l| shape.heads * l * l).sum());
        let mut context = work.take_dirty(n * d);
        let starts = spans.starts();
        spans
            .split(&mut probs, |len| shape.heads * len * len)
            .into_par_iter()
            .zip(spans.split(&mut context, |len| len * d))
            .zip(starts.par_iter().zip(&spans.lens))
            .for_each(|((probs, context), (&at, &len))| {
                let qkv = &qkv[at * 3 * d..(at + len) * 3 * d];
                attention::sequence_keeping(
                    qkv,
                    (len, shape.heads, d / shape.heads),
                    probs,
                    context,
                )
            });
        let attended = linear(&l.out, &l.out_bias, &context, n, work)?;
        let drop1 = drop.mask(site, n * d, work);
        let r1 = residual(&x, &attended, &drop1, work);
        work.give(attended);
        let (xhat1, rstd1, h1) = norm_forward(&r1, &l.norm1, &l.norm1_bias, shape.eps, work);
        work.give(r1);
        let up = linear(&l.up, &l.up_bias, &h1, n, work)?;
        let act = gelu_forward(&up, work);
        let down = linear(&l.down, &l.down_bias, &act, n, work)?;
        let drop2 = drop.mask(site + 1, n * d, work);
        let r2 = residual(&h1, &down, &drop2, work);
        work.give(down);
        let (xhat2, rstd2, out) = norm_forward(&r2, &l.norm2, &l.norm2_bias, shape.eps, work);
        work.give(r2);
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
    let mut pooled = work.take(b * d);
    let mut at = 0;
    for (row, &len) in pooled.chunks_exact_mut(d).zip(&spans.lens) {
        for r in x[at * d..(at + len) * d].chunks_exact(d) {
            row.iter_mut().zip(r).for_each(|(m, v)| *m += v);
        }
        let count = len.max(1) as f32;
        row.iter_mut().for_each(|m| *m /= count);
        at += len;
    }
    work.give(x);
    let drop_head = drop.mask(u64::MAX, b * d, work);
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
        let lse = log_sum_exp(lg);
        let t_sum: f64 = t.iter().map(|&v| f64::from(v)).sum();
        loss += f64::from(w) * soft_ce_row(lg, t, lse);
        for ((g, &v), &t) in g.iter_mut().zip(lg).zip(t) {
            let p = (f64::from(v) - lse).exp();
            *g = (f64::from(w) * (p * t_sum - f64::from(t)) / total) as f32;
        }
    }
    ((loss / total) as f32, grad)
}

/// The backward pass from the logits' gradient: writes the gradient of every tensor that
/// `trainable` marks (in [`Params::tensors`] order) into `grads`; the others are left as they
/// are. The word table's gradient is written on the batch's rows only: the others must hold
/// zeros already (the caller zeroes the rows it was given after using them).
pub(crate) fn backward(
    p: &Params,
    shape: Shape,
    tape: &Tape,
    dlogits: &[f32],
    trainable: &[bool],
    grads: &mut Params,
    work: &mut Work,
) -> Result<()> {
    let d = p.d();
    let labels = p.labels();
    let spans = &tape.spans;
    let n = spans.n;
    // The head.
    let mut dpooled = work.take(tape.pooled.len());
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
    let mut dy = work.take_dirty(n * d);
    let mut at = 0;
    for (dp, &len) in dpooled.chunks_exact(d).zip(&spans.lens) {
        let inv = 1.0 / len.max(1) as f32;
        for row in dy[at * d..(at + len) * d].chunks_exact_mut(d) {
            row.iter_mut().zip(dp).for_each(|(o, g)| *o = g * inv);
        }
        at += len;
    }
    work.give(dpooled);
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
            work,
        )?;
    }
    if !embeddings {
        return Ok(());
    }
    apply(&tape.drop0, &mut dy);
    let norm_grads = Some((&mut grads.norm0[..], &mut grads.norm0_bias[..]));
    let de = norm_backward(&dy, &tape.xhat0, &tape.rstd0, &p.norm0, norm_grads, work);
    work.give(dy);
    let positions = grads.position.len() / d;
    let (word, position, segment) = (&mut grads.word, &mut grads.position, &mut grads.segment);
    // The word table's gradient is zero but on the batch's rows (see [`backward`]).
    for &id in &tape.ids {
        word[id as usize * d..][..d].fill(0.0);
    }
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
    work.give(de);
    Ok(())
}

/// Through `out = norm(x + drop * sub)` from `dy` at `out`: the gradients at `x` and at
/// `sub`; the norm's own into `norm_grads` (gamma, beta) where given.
#[allow(clippy::type_complexity)]
fn residual_norm_backward(
    dy: Buf,
    xhat: &[f32],
    rstd: &[f32],
    gamma: &[f32],
    drop: &Option<Buf>,
    norm_grads: Option<(&mut [f32], &mut [f32])>,
    work: &mut Work,
) -> (Buf, Buf) {
    let dx = norm_backward(&dy, xhat, rstd, gamma, norm_grads, work);
    work.give(dy);
    let mut dsub = work.copy(&dx);
    apply(drop, &mut dsub);
    (dx, dsub)
}

/// A linear layer's weight and bias gradients from its output's gradient `dy` and its input
/// `x` (`n` rows each).
fn linear_grads(
    w: &mut [f32],
    b: &mut [f32],
    dy: &[f32],
    x: &[f32],
    n: usize,
    work: &mut Work,
) -> Result<()> {
    weight_grad(dy, x, n, w, work)?;
    column_sums(dy, b);
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
    dy: Buf,
    mut grads: Option<&mut LayerParams>,
    need_dx: bool,
    work: &mut Work,
) -> Result<Buf> {
    let n = spans.n;
    let d = l.norm1.len();
    let f = l.up_bias.len();
    // Second norm: `out = norm2(h1 + drop2 * down)`.
    let norm2 = grads
        .as_deref_mut()
        .map(|g| (&mut g.norm2[..], &mut g.norm2_bias[..]));
    let (dr2, ddown) =
        residual_norm_backward(dy, &t.xhat2, &t.rstd2, &l.norm2, &t.drop2, norm2, work);
    if let Some(g) = grads.as_deref_mut() {
        linear_grads(&mut g.down, &mut g.down_bias, &ddown, &t.act, n, work)?;
    }
    let mut dact = input_grad(&l.down, &ddown, n, f, work)?;
    work.give(ddown);
    gelu_backward(&t.up, &mut dact);
    let dup = dact;
    if let Some(g) = grads.as_deref_mut() {
        linear_grads(&mut g.up, &mut g.up_bias, &dup, &t.h1, n, work)?;
    }
    let mut dh1 = input_grad(&l.up, &dup, n, d, work)?;
    dh1.par_chunks_mut(4096)
        .zip(dr2.par_chunks(4096))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
    work.give(dup);
    work.give(dr2);
    // First norm: `h1 = norm1(x + drop1 * attended)`.
    let norm1 = grads
        .as_deref_mut()
        .map(|g| (&mut g.norm1[..], &mut g.norm1_bias[..]));
    let (dr1, dattended) =
        residual_norm_backward(dh1, &t.xhat1, &t.rstd1, &l.norm1, &t.drop1, norm1, work);
    if let Some(g) = grads.as_deref_mut() {
        linear_grads(&mut g.out, &mut g.out_bias, &dattended, &t.context, n, work)?;
    }
    let dcontext = input_grad(&l.out, &dattended, n, d, work)?;
    work.give(dattended);
    let mut dqkv = work.take_dirty(n * 3 * d);
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
        linear_grads(&mut g.qkv, &mut g.qkv_bias, &dqkv, &t.x, n, work)?;
    }
    work.give(dcontext);
    if !need_dx {
        work.give(dqkv);
        work.give(dr1);
        return Ok(Buf::from(Vec::new()));
    }
    let mut dx = input_grad(&l.qkv, &dqkv, n, d, work)?;
    dx.par_chunks_mut(4096)
        .zip(dr1.par_chunks(4096))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
    work.give(dqkv);
    work.give(dr1);
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

    fn shape_of(cfg: &BertConfig, dropout: f32) -> Shape {
        Shape {
            heads: cfg.num_attention_heads,
            eps: cfg.layer_norm_eps as f32,
            dropout,
        }
    }

    /// One forward and backward pass: the logits, the loss and the gradients of `train`'s
    /// tensors.
    fn gradients(
        params: &Params,
        shape: Shape,
        seqs: &[&[u32]],
        (targets, weights): (&[f32], &[f32]),
        dropout: Option<Dropout>,
        train: &[bool],
    ) -> (Vec<f32>, f32, Params) {
        let mut work = Work::default();
        let tape = forward(params, shape, seqs, dropout, &mut work).unwrap();
        let (loss, dl) = soft_ce(&tape.logits, targets, weights, 3);
        let mut grads = params.zeros_like();
        backward(params, shape, &tape, &dl, train, &mut grads, &mut work).unwrap();
        (tape.logits.clone(), loss, grads)
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
        let params = Params::read(&model).unwrap();
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let all = vec![true; params.tensors().len()];
        let (ours, loss, grads) = gradients(
            &params,
            shape_of(&cfg, 0.0),
            &refs,
            (&targets, &weights),
            None,
            &all,
        );

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

        let apart = ours
            .iter()
            .zip(&burn_logits)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        println!("exact {exact}: logits at most {apart:.2e} apart");
        assert!(apart < logit_tol, "logits {ours:?} vs {burn_logits:?}");
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
        let params = Params::read(&model).unwrap();
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let all = vec![true; params.tensors().len()];
        let grads_on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let drop = Some(Dropout { p: 0.1, key: 3 });
            let shape = shape_of(&cfg, 0.1);
            pool.install(|| gradients(&params, shape, &refs, (&targets, &weights), drop, &all).2)
        };
        let one = grads_on(1);
        assert!(one.tensors().iter().any(|t| t.iter().any(|&v| v != 0.0)));
        assert!(one == grads_on(3), "one thread and three differ");
    }

    /// With the embeddings and the lowest two layers frozen, the trainable tensors get the same
    /// gradients as when everything trains, and the frozen ones none.
    #[test]
    fn frozen_tensors_get_no_gradient() {
        let (model, cfg, seqs, targets, weights) = model_and_batch();
        let params = Params::read(&model).unwrap();
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let shape = shape_of(&cfg, 0.0);
        let grads_for =
            |train: &[bool]| gradients(&params, shape, &refs, (&targets, &weights), None, train).2;
        let layers = params.layers.len();
        let all = grads_for(&super::super::params::trainable(layers, 0, false));
        let some_train = super::super::params::trainable(layers, 2, true);
        let some = grads_for(&some_train);
        for ((a, b), on) in all.tensors().iter().zip(some.tensors()).zip(&some_train) {
            if *on {
                assert_eq!(a, &b);
            } else {
                assert!(b.iter().all(|&v| v == 0.0));
            }
        }
        assert_eq!(some_train.iter().filter(|&&t| !t).count(), 5 + 2 * 12);
    }

    /// Steps hand back every buffer they take, and at the same lengths: from one step to the
    /// next, the kept buffers neither grow nor shrink in number or size (a step that has to
    /// grow one allocates, and the kernel zeroes the pages it touches), once the longest
    /// batch has run.
    #[test]
    fn steps_keep_a_steady_set_of_buffers() {
        let (model, cfg, seqs, targets, weights) = model_and_batch();
        let params = Params::read(&model).unwrap();
        // A batch of more tokens than the model is wide (its activations outgrow its weights'
        // gradients), and a short one, in turn, as length buckets come.
        let refs: Vec<&[u32]> = seqs.iter().cycle().take(44).map(Vec::as_slice).collect();
        let targets = targets.repeat(11);
        let weights = weights.repeat(11);
        let all = vec![true; params.tensors().len()];
        let shape = shape_of(&cfg, 0.1);
        let mut work = Work::default();
        let mut grads = params.zeros_like();
        let mut kept = Vec::new();
        for step in 0..6 {
            let b = if step % 2 == 0 { refs.len() } else { 2 };
            let drop = Some(Dropout { p: 0.1, key: step });
            let tape = forward(&params, shape, &refs[..b], drop, &mut work).unwrap();
            let (_, dl) = soft_ce(&tape.logits, &targets[..3 * b], &weights[..b], 3);
            backward(&params, shape, &tape, &dl, &all, &mut grads, &mut work).unwrap();
            tape.recycle(&mut work);
            let floats: usize = work.f32s.iter().map(Vec::len).sum();
            kept.push((work.f32s.len(), floats, work.mats.len()));
        }
        assert!(kept[1..].iter().all(|k| *k == kept[1]), "{kept:?}");
    }

    /// Dropout keeps about `1 - p` of the values, scaled, and its masks differ by site.
    /// Attention for heads 32 wide, its sums in registers, gives the bits of the sums taken in
    /// memory: the context against a plain loop, the backward pass against the general version.
    #[test]
    fn attention_for_a_head_width_equals_the_general_one() {
        let (len, heads, d) = (13usize, 12usize, 384usize);
        let mut rng = StdRng::seed_from_u64(9);
        let mut values =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
        let (qkv, dcontext) = (values(len * 3 * d), values(len * d));
        let mut probs = vec![0.0f32; heads * len * len];
        let mut context = vec![0.0f32; len * d];
        let dh = d / heads;
        attention::sequence_keeping(&qkv, (len, heads, dh), &mut probs, &mut context);
        for (h, i) in (0..heads).flat_map(|h| (0..len).map(move |i| (h, i))) {
            let p = &probs[(h * len + i) * len..][..len];
            for c in 0..dh {
                let mut o = 0.0f32;
                for (j, &pj) in p.iter().enumerate() {
                    o += pj * qkv[j * 3 * d + 2 * d + h * dh + c];
                }
                assert_eq!(o.to_bits(), context[i * d + h * dh + c].to_bits());
            }
        }
        let (mut fast, mut general) = (vec![f32::NAN; len * 3 * d], vec![f32::NAN; len * 3 * d]);
        attend_backward(&qkv, &probs, &dcontext, len, heads, &mut fast);
        attend_backward_any(&qkv, &probs, &dcontext, len, heads, &mut general);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&fast), bits(&general));
        assert!(fast.iter().any(|&v| v != 0.0));
    }

    #[test]
    fn dropout_keeps_the_expected_share() {
        let d = Dropout { p: 0.1, key: 5 };
        let w = &mut Work::default();
        let m = d.mask(1, 100_000, w).unwrap();
        let kept = m.iter().filter(|&&v| v != 0.0).count() as f64 / m.len() as f64;
        assert!((kept - 0.9).abs() < 0.005, "{kept}");
        assert!(m.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-6));
        assert_ne!(&m[..], &d.mask(2, 100_000, w).unwrap()[..]);
        assert!(Dropout { p: 0.0, key: 5 }.mask(1, 10, w).is_none());
    }
}
