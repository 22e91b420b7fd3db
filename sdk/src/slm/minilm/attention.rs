//! MiniLM's self-attention over one sequence, for scoring and for training's forward pass, on
//! explicit vectors of the CPU's width (pulp's portable `Simd`). Scores are tiled four queries
//! by two vectors of keys, so that eight sums run side by side (one query's sums for a short
//! block waited on the adder's latency) and each key's load serves four queries; context rows
//! are tiled likewise over the head's dimensions. Every score and context value is summed in
//! the order of the plain loops, one multiply and one add a step: the same bits at every
//! vector width.

use pulp::{Simd, WithSimd};

use super::cpu::{lane_max, lane_sum};
use crate::quant;

/// Queries a tile of scores takes.
const QUERY_TILE: usize = 4;
/// Vectors of keys a block of scores takes.
const KEY_VECTORS: usize = 2;
/// Accumulators a context tile keeps: queries times vectors of a head's row.
const CONTEXT_SUMS: usize = 8;

/// One sequence's heads for scoring: `q`, `k`, `v` and `out` are its `[len, d]` rows,
/// `d = heads * dh`. Every value of `out` is written.
pub(super) fn sequence(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: (usize, usize, usize),
    out: &mut [f32],
) {
    quant::vectorize(Sequence::scoring(q, k, v, shape, out));
}

/// One sequence's heads for training: `qkv` its `[len, 3 d]` rows (queries, keys, values side
/// by side); writes `out` (`[len, d]`) and, for the backward pass, each query's weights into
/// `probs` (`[heads, len, len]`).
pub(super) fn sequence_keeping(
    qkv: &[f32],
    shape: (usize, usize, usize),
    probs: &mut [f32],
    out: &mut [f32],
) {
    quant::vectorize(Sequence::keeping(qkv, shape, probs, out));
}

/// Rows of queries, keys or values: row `i`'s `d` values at `data[i * stride + at..]`.
#[derive(Clone, Copy)]
struct Rows<'a> {
    data: &'a [f32],
    stride: usize,
    at: usize,
}

impl<'a> Rows<'a> {
    /// Row `i`'s `width` values from column `col` of the head.
    #[inline(always)]
    fn get(&self, i: usize, col: usize, width: usize) -> &'a [f32] {
        &self.data[i * self.stride + self.at + col..][..width]
    }
}

struct Sequence<'a> {
    q: Rows<'a>,
    k: Rows<'a>,
    v: Rows<'a>,
    len: usize,
    heads: usize,
    dh: usize,
    /// Where the weights are kept (training), or none (scoring).
    probs: Option<&'a mut [f32]>,
    out: &'a mut [f32],
}

impl<'a> Sequence<'a> {
    fn scoring(
        q: &'a [f32],
        k: &'a [f32],
        v: &'a [f32],
        (len, heads, dh): (usize, usize, usize),
        out: &'a mut [f32],
    ) -> Sequence<'a> {
        let rows = |data| Rows {
            data,
            stride: heads * dh,
            at: 0,
        };
        Sequence {
            q: rows(q),
            k: rows(k),
            v: rows(v),
            len,
            heads,
            dh,
            probs: None,
            out,
        }
    }

    fn keeping(
        qkv: &'a [f32],
        (len, heads, dh): (usize, usize, usize),
        probs: &'a mut [f32],
        out: &'a mut [f32],
    ) -> Sequence<'a> {
        let d = heads * dh;
        let rows = |at| Rows {
            data: qkv,
            stride: 3 * d,
            at,
        };
        assert_eq!(
            probs.len(),
            heads * len * len,
            "{heads} heads of {len} x {len}"
        );
        Sequence {
            q: rows(0),
            k: rows(d),
            v: rows(2 * d),
            len,
            heads,
            dh,
            probs: Some(probs),
            out,
        }
    }
}

impl WithSimd for Sequence<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Sequence {
            q,
            k,
            v,
            len,
            heads,
            dh,
            mut probs,
            out,
        } = self;
        let d = heads * dh;
        for rows in [q, k, v] {
            assert!(
                rows.at + d <= rows.stride && rows.data.len() >= len * rows.stride,
                "{len} rows of {d} values"
            );
        }
        assert_eq!(out.len(), len * d, "{len} rows of {d} values");
        let block = KEY_VECTORS * S::F32_LANES;
        let padded = len.div_ceil(block) * block;
        // Keys transposed (`[dh, padded]`, the padding zero): a block of a query's scores is a
        // sum of whole vectors over the head's dimensions.
        let mut kt = vec![0.0f32; dh * padded];
        let mut p = vec![0.0f32; QUERY_TILE * padded];
        let scale = 1.0 / (dh as f32).sqrt();
        for h in 0..heads {
            let head = Head {
                d,
                col: h * dh,
                dh,
                len,
                padded,
            };
            for j in 0..len {
                for (c, &x) in k.get(j, head.col, dh).iter().enumerate() {
                    kt[c * padded + j] = x;
                }
            }
            let mut i = 0;
            while i < len {
                let rows = (len - i).min(QUERY_TILE);
                match rows {
                    1 => head.scores::<S, 1>(simd, i, q, &kt, &mut p),
                    2 => head.scores::<S, 2>(simd, i, q, &kt, &mut p),
                    3 => head.scores::<S, 3>(simd, i, q, &kt, &mut p),
                    _ => head.scores::<S, QUERY_TILE>(simd, i, q, &kt, &mut p),
                }
                let mut inv = [0.0f32; QUERY_TILE];
                for (r, inv) in inv.iter_mut().enumerate().take(rows) {
                    let row = &mut p[r * padded..][..padded];
                    let max = lane_max(&row[..len], f32::NEG_INFINITY);
                    row[..len].iter_mut().for_each(|s| *s = (*s - max) * scale);
                    // The padding's scores too (finite, and never read): whole vectors, where
                    // a row's last few values went one at a time.
                    quant::exp_in_place(row);
                    *inv = 1.0 / lane_sum(&row[..len], |x| x);
                    if let Some(probs) = probs.as_deref_mut() {
                        // The weights themselves: each `e * inv`, the value the context
                        // takes either way (times 1, exactly).
                        let row = &mut row[..len];
                        row.iter_mut().for_each(|e| *e *= *inv);
                        probs[(h * len + i + r) * len..][..len].copy_from_slice(row);
                        *inv = 1.0;
                    }
                }
                let weights = Weights {
                    i,
                    rows,
                    p: &p,
                    inv: &inv,
                };
                head.context(simd, weights, v, out);
                i += rows;
            }
        }
    }
}

/// One head of one sequence: its columns `col..col + dh` of the queries', keys', values' and
/// output's rows (these `d` wide).
struct Head {
    d: usize,
    col: usize,
    dh: usize,
    len: usize,
    /// `len` in whole key blocks.
    padded: usize,
}

impl Head {
    /// The scores of queries `i..i + Q` against every key (`kt` transposed), into rows
    /// `0..Q` of `p` (`padded` apart).
    #[inline(always)]
    fn scores<S: Simd, const Q: usize>(
        &self,
        simd: S,
        i: usize,
        q: Rows,
        kt: &[f32],
        p: &mut [f32],
    ) {
        let (col, dh, padded) = (self.col, self.dh, self.padded);
        let block = KEY_VECTORS * S::F32_LANES;
        let qs: [&[f32]; Q] = std::array::from_fn(|r| q.get(i + r, col, dh));
        for b in (0..padded).step_by(block) {
            let mut acc = [[simd.splat_f32s(0.0); KEY_VECTORS]; Q];
            for c in 0..dh {
                let (keys, _) = S::as_simd_f32s(&kt[c * padded + b..][..block]);
                for (acc, qr) in acc.iter_mut().zip(&qs) {
                    let qc = simd.splat_f32s(qr[c]);
                    for (a, &kv) in acc.iter_mut().zip(keys) {
                        *a = simd.add_f32s(*a, simd.mul_f32s(qc, kv));
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let (row, _) = S::as_mut_simd_f32s(&mut p[r * padded + b..][..block]);
                row.copy_from_slice(acc);
            }
        }
    }

    /// The context rows of a tile's queries.
    #[inline(always)]
    fn context<S: Simd>(&self, simd: S, mut w: Weights, v: Rows, out: &mut [f32]) {
        let lanes = S::F32_LANES;
        let vectors = if self.dh.is_multiple_of(lanes) {
            self.dh / lanes
        } else {
            0
        };
        while w.rows > 0 {
            let took = match vectors {
                1 => self.context_tile::<S, 1>(simd, w, v, out),
                2 => self.context_tile::<S, 2>(simd, w, v, out),
                4 => self.context_tile::<S, 4>(simd, w, v, out),
                8 => self.context_tile::<S, 8>(simd, w, v, out),
                _ => self.context_row(w, v, out),
            };
            w = Weights {
                i: w.i + took,
                rows: w.rows - took,
                p: &w.p[took * self.padded..],
                inv: &w.inv[took..],
            };
        }
    }

    /// The first of `w`'s queries that `CONTEXT_SUMS` accumulators hold, each row of the head
    /// `V` vectors; returns how many it took.
    #[inline(always)]
    fn context_tile<S: Simd, const V: usize>(
        &self,
        simd: S,
        w: Weights,
        v: Rows,
        out: &mut [f32],
    ) -> usize {
        match w.rows.min(CONTEXT_SUMS / V) {
            1 => self.context_sums::<S, V, 1>(simd, w, v, out),
            2 => self.context_sums::<S, V, 2>(simd, w, v, out),
            3 => self.context_sums::<S, V, 3>(simd, w, v, out),
            _ => self.context_sums::<S, V, 4>(simd, w, v, out),
        }
    }

    /// The context rows of `w`'s first `Q` queries, each `V` vectors, summed in registers;
    /// returns `Q`.
    #[inline(always)]
    fn context_sums<S: Simd, const V: usize, const Q: usize>(
        &self,
        simd: S,
        w: Weights,
        v: Rows,
        out: &mut [f32],
    ) -> usize {
        let (d, col, padded) = (self.d, self.col, self.padded);
        let width = V * S::F32_LANES;
        let mut o = [[simd.splat_f32s(0.0); V]; Q];
        for j in 0..self.len {
            let (vj, _) = S::as_simd_f32s(v.get(j, col, width));
            for (r, o) in o.iter_mut().enumerate() {
                let pj = simd.splat_f32s(w.p[r * padded + j] * w.inv[r]);
                for (o, &vv) in o.iter_mut().zip(vj) {
                    *o = simd.add_f32s(*o, simd.mul_f32s(pj, vv));
                }
            }
        }
        for (r, o) in o.iter().enumerate() {
            let (row, _) = S::as_mut_simd_f32s(&mut out[(w.i + r) * d + col..][..width]);
            row.copy_from_slice(o);
        }
        Q
    }

    /// The context row of `w`'s first query one value at a time (heads whose width is not
    /// whole vectors); returns 1.
    #[inline(always)]
    fn context_row(&self, w: Weights, v: Rows, out: &mut [f32]) -> usize {
        let (d, col, dh) = (self.d, self.col, self.dh);
        let o = &mut out[w.i * d + col..][..dh];
        o.fill(0.0);
        for (j, &pj) in w.p[..self.len].iter().enumerate() {
            let pj = pj * w.inv[0];
            for (o, &vv) in o.iter_mut().zip(v.get(j, col, dh)) {
                *o += pj * vv;
            }
        }
        1
    }
}

/// Queries `i..i + rows` of a tile: their exponentiated scores (rows of `p`, a head's
/// `padded` apart) and the inverses of their sums.
#[derive(Clone, Copy)]
struct Weights<'a> {
    i: usize,
    rows: usize,
    p: &'a [f32],
    inv: &'a [f32],
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain loops: each query's scores one key at a time, its weights, and its context one
    /// value row at a time. Returns the context rows and the weights (`[heads, len, len]`).
    fn plain(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        len: usize,
        heads: usize,
        dh: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let d = heads * dh;
        let scale = 1.0 / (dh as f32).sqrt();
        let mut out = vec![0.0; len * d];
        let mut probs = vec![0.0; heads * len * len];
        for h in 0..heads {
            let cols = h * dh..(h + 1) * dh;
            for i in 0..len {
                let qi = &q[i * d..][cols.clone()];
                let p = &mut probs[(h * len + i) * len..][..len];
                for (j, p) in p.iter_mut().enumerate() {
                    *p = qi
                        .iter()
                        .zip(&k[j * d..][cols.clone()])
                        .fold(0.0, |s, (a, b)| s + a * b);
                }
                let max = lane_max(p, f32::NEG_INFINITY);
                p.iter_mut().for_each(|s| *s = (*s - max) * scale);
                quant::exp_in_place(p);
                let inv = 1.0 / lane_sum(p, |x| x);
                p.iter_mut().for_each(|s| *s *= inv);
                let o = &mut out[i * d..][cols.clone()];
                for (j, &w) in p.iter().enumerate() {
                    for (o, &vv) in o.iter_mut().zip(&v[j * d..][cols.clone()]) {
                        *o += w * vv;
                    }
                }
            }
        }
        (out, probs)
    }

    /// Scoring's and training's forms of [`Sequence`] with `simd`: the context rows of each,
    /// and training's weights.
    fn run<S: Simd>(
        simd: S,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: (usize, usize, usize),
    ) -> [Vec<f32>; 3] {
        let (len, heads, dh) = shape;
        let d = heads * dh;
        let mut scored = vec![f32::NAN; len * d];
        Simd::vectorize(simd, Sequence::scoring(q, k, v, shape, &mut scored));
        let qkv: Vec<f32> = (0..len)
            .flat_map(|i| [q, k, v].map(|m| &m[i * d..(i + 1) * d]).concat())
            .collect();
        let mut trained = vec![f32::NAN; len * d];
        let mut probs = vec![f32::NAN; heads * len * len];
        Simd::vectorize(
            simd,
            Sequence::keeping(&qkv, shape, &mut probs, &mut trained),
        );
        [scored, trained, probs]
    }

    /// The tiled heads, as scoring and as training run them, against the plain loops bit for
    /// bit, at every vector width this CPU has, for heads of whole vectors and not, sequences
    /// shorter and longer than a key block and a query tile.
    #[test]
    fn tiled_heads_equal_plain_loops_bit_for_bit() {
        let mut seed = 7u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 * 4.0 - 2.0
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (heads, dh) in [(3, 32), (2, 64), (2, 8), (1, 16), (2, 12), (1, 128)] {
            let d = heads * dh;
            for len in [1, 2, 3, 4, 5, 7, 16, 17, 33, 64, 70] {
                let q: Vec<f32> = (0..len * d).map(|_| next()).collect();
                let k: Vec<f32> = (0..len * d).map(|_| next()).collect();
                let v: Vec<f32> = (0..len * d).map(|_| next()).collect();
                let (out, probs) = plain(&q, &k, &v, len, heads, dh);
                let shape = (len, heads, dh);
                let mut got = vec![("scalar", run(pulp::Scalar::new(), &q, &k, &v, shape))];
                #[cfg(target_arch = "x86_64")]
                {
                    if let Some(v3) = pulp::x86::V3::try_new() {
                        got.push(("avx2", run(v3, &q, &k, &v, shape)));
                    }
                    if let Some(v4) = pulp::x86::V4::try_new() {
                        got.push(("avx512", run(v4, &q, &k, &v, shape)));
                    }
                }
                let case = format!("{heads} heads of {dh}, {len} tokens");
                for (name, [scored, trained, kept]) in got {
                    assert!(bits(&scored) == bits(&out), "{name} scoring, {case}");
                    assert!(bits(&trained) == bits(&out), "{name} training, {case}");
                    assert!(bits(&kept) == bits(&probs), "{name} weights, {case}");
                }
            }
        }
    }
}
