//! Weights kept in their GGUF blocks, and the matrix products that read them.
//!
//! A weight `[out, in]` stays as 32-element blocks: Q4_0 and Q4_1 as 4-bit codes with a scale
//! and an offset, Q8_0 as 8-bit codes with a scale. A product decodes each block in registers
//! and multiplies it with f32 activations: `sum((q d + m) x) = d sum(q x) + m sum(x)`, with
//! `sum(x)` per block computed once per activation row. Activations stay f32 (quantizing them
//! to 8 bits, as llama.cpp does, moved logits by up to 0.4 and flipped the reference's greedy
//! ids). Output rows are split over rayon's threads; the inner dot uses AVX2 + FMA when the
//! CPU has them (detected at run time) and portable code otherwise. F32/F16 weights stay f32.

use half::f16;
use rayon::prelude::*;

use super::gguf::{GgmlType, QK};
use crate::{Error, Result};

/// Weight rows a rayon task computes: enough work per task to hide the scheduling cost, small
/// enough that a task's weights stay in L1/L2 while it sweeps the activation rows.
const ROWS_PER_TASK: usize = 32;
/// Activation rows that share one pass over a weight block (decoded nibbles reused).
const TILE: usize = 4;

/// How a matrix's values are held.
#[derive(Debug, Clone)]
enum Codes {
    /// 4-bit codes `q` in `0..16`, value `q * d + m`; 16 bytes a block, element `j` in the low
    /// nibble of byte `j` and element `j + 16` in its high nibble (GGUF's order).
    Q4 {
        d: Vec<f32>,
        m: Vec<f32>,
        qs: Vec<u8>,
    },
    /// 8-bit codes, value `q * d`; 32 bytes a block.
    Q8 { d: Vec<f32>, qs: Vec<i8> },
    /// Plain f32, `[out, in]` row-major.
    F32(Vec<f32>),
}

/// A weight matrix `[rows = out, cols = in]` as stored in a GGUF file: `y = W x`.
#[derive(Debug, Clone)]
pub struct QMatrix {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    codes: Codes,
}

/// Which product path a matrix takes (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// 4-bit codes times 8-bit activations (Q4_0, Q4_1).
    Q4,
    /// 8-bit codes times 8-bit activations (Q8_0).
    Q8,
    /// f32 weights (F32, F16 files).
    F32,
}

impl QMatrix {
    /// The `[rows, cols]` tensor of type `ty` from its raw GGUF bytes. Q4_0 becomes Q4_1 form
    /// (`m = -8 d`), exactly. F16/F32 weights take the f32 path, said in a log line; a type
    /// with no reader is an error.
    pub fn from_gguf(
        name: &str,
        ty: GgmlType,
        bytes: &[u8],
        rows: usize,
        cols: usize,
    ) -> Result<QMatrix> {
        let n = rows * cols;
        let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
        let quantized = matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0);
        if quantized && !cols.is_multiple_of(QK) {
            return Err(Error::Gguf(format!(
                "tensor {name}: rows of {cols} elements do not split into {QK}-element blocks"
            )));
        }
        let expect = ty
            .block_layout()
            .map(|(block, block_bytes)| n / block * block_bytes);
        if expect != Some(bytes.len()) {
            return Err(Error::Gguf(match expect {
                None => format!("tensor {name}: unsupported tensor type {ty:?}"),
                Some(e) => format!(
                    "tensor {name}: {} bytes for {rows}x{cols} {ty:?}, expected {e}",
                    bytes.len()
                ),
            }));
        }
        let blocks = n / QK;
        let codes = match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                let (head, step) = if ty == GgmlType::Q4_1 {
                    (4, 20)
                } else {
                    (2, 18)
                };
                let mut d = Vec::with_capacity(blocks);
                let mut m = Vec::with_capacity(blocks);
                let mut qs = Vec::with_capacity(blocks * QK / 2);
                for b in bytes.chunks_exact(step) {
                    let scale = f16_at(b, 0);
                    d.push(scale);
                    m.push(if head == 4 {
                        f16_at(b, 2)
                    } else {
                        -8.0 * scale
                    });
                    qs.extend_from_slice(&b[head..]);
                }
                Codes::Q4 { d, m, qs }
            }
            GgmlType::Q8_0 => {
                let mut d = Vec::with_capacity(blocks);
                let mut qs = Vec::with_capacity(n);
                for b in bytes.chunks_exact(2 + QK) {
                    d.push(f16_at(b, 0));
                    qs.extend(b[2..].iter().map(|&q| q as i8));
                }
                Codes::Q8 { d, qs }
            }
            _ => {
                tracing::info!(
                    "tensor {name} is {ty:?}: no quantized kernel for it, products run in f32"
                );
                Codes::F32(super::gguf::dequantize(ty, bytes, n)?)
            }
        };
        Ok(QMatrix { rows, cols, codes })
    }

    /// An f32 matrix `[rows, cols]` (row-major), kept f32.
    pub fn from_f32(values: Vec<f32>, rows: usize, cols: usize) -> QMatrix {
        assert_eq!(values.len(), rows * cols, "shape of an f32 matrix");
        QMatrix {
            rows,
            cols,
            codes: Codes::F32(values),
        }
    }

    /// The path products with this matrix take.
    pub fn path(&self) -> Path {
        match self.codes {
            Codes::Q4 { .. } => Path::Q4,
            Codes::Q8 { .. } => Path::Q8,
            Codes::F32(_) => Path::F32,
        }
    }

    /// Row `r` as f32 (an embedding lookup).
    pub fn row(&self, r: usize) -> Vec<f32> {
        let nb = self.cols / QK;
        match &self.codes {
            Codes::Q4 { d, m, qs } => {
                let mut out = vec![0.0; self.cols];
                for b in 0..nb {
                    let i = r * nb + b;
                    let q = &qs[i * QK / 2..(i + 1) * QK / 2];
                    for (j, &c) in q.iter().enumerate() {
                        out[b * QK + j] = f32::from(c & 0x0f) * d[i] + m[i];
                        out[b * QK + j + QK / 2] = f32::from(c >> 4) * d[i] + m[i];
                    }
                }
                out
            }
            Codes::Q8 { d, qs } => qs[r * self.cols..(r + 1) * self.cols]
                .iter()
                .enumerate()
                .map(|(j, &q)| f32::from(q) * d[r * nb + j / QK])
                .collect(),
            Codes::F32(v) => v[r * self.cols..(r + 1) * self.cols].to_vec(),
        }
    }

    /// Rows `range` as f32, row-major (to build the f32 model for training).
    pub fn rows_f32(&self, range: std::ops::Range<usize>) -> Vec<f32> {
        range.flat_map(|r| self.row(r)).collect()
    }

    /// `x @ W^T`: `x` is `[n, cols]` row-major, the result `[n, rows]`.
    pub fn matmul(&self, x: &[f32], n: usize) -> Vec<f32> {
        matmul_many(&[self], x, n)
            .pop()
            .unwrap_or_else(|| unreachable!("one matrix in, one product out"))
    }
}

/// One row of activations as the kernels read it.
#[derive(Clone, Copy)]
struct XRow<'a> {
    /// The values.
    f: &'a [f32],
    /// Their sum over each 32-element block (for the offset term of Q4 blocks).
    sums: &'a [f32],
}

/// `x @ W^T` for several matrices of the same input (q, k and v, say) in one parallel pass:
/// `x` is `[n, cols]`; returns one `[n, rows]` product per matrix.
pub fn matmul_many(ws: &[&QMatrix], x: &[f32], n: usize) -> Vec<Vec<f32>> {
    let Some(cols) = ws.first().map(|w| w.cols) else {
        return Vec::new();
    };
    assert!(
        ws.iter().all(|w| w.cols == cols) && x.len() == n * cols,
        "matmul shapes: x has {} values for {n} rows of {cols}",
        x.len()
    );
    let sums = block_sums(x, cols);
    let nb = cols.div_ceil(QK);
    let xrow = |r: usize| XRow {
        f: &x[r * cols..(r + 1) * cols],
        sums: &sums[r * nb..(r + 1) * nb],
    };
    let xs: Vec<XRow<'_>> = (0..n).map(xrow).collect();
    // Products are computed transposed, `[rows, n]`, so that each task owns whole rows.
    let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![0.0; w.rows * n]).collect();
    let mut tasks: Vec<(&QMatrix, usize, &mut [f32])> = Vec::new();
    for (w, out) in ws.iter().zip(outs.iter_mut()) {
        for (i, chunk) in out.chunks_mut(ROWS_PER_TASK * n).enumerate() {
            tasks.push((w, i * ROWS_PER_TASK, chunk));
        }
    }
    let simd = Simd::detect();
    tasks
        .into_par_iter()
        .for_each(|(w, first, out)| run_task(simd, w, first, &xs, out));
    if n == 1 {
        return outs;
    }
    outs.into_iter()
        .zip(ws)
        .map(|(t, w)| {
            let mut y = vec![0.0; t.len()];
            for (r, row) in t.chunks_exact(n).enumerate() {
                for (i, &v) in row.iter().enumerate() {
                    y[i * w.rows + r] = v;
                }
            }
            y
        })
        .collect()
}

/// `sum(x)` over each 32-element block of each row of `x` (`[n, cols]`).
fn block_sums(x: &[f32], cols: usize) -> Vec<f32> {
    x.chunks_exact(cols.max(1))
        .flat_map(|row| row.chunks(QK).map(|b| b.iter().sum::<f32>()))
        .collect()
}

/// Weight rows `first..` (as many as `out` holds) against every activation row.
fn run_task(simd: Simd, w: &QMatrix, first: usize, xs: &[XRow<'_>], out: &mut [f32]) {
    let n = xs.len();
    let nb = w.cols / QK;
    for (k, orow) in out.chunks_mut(n).enumerate() {
        let r = first + k;
        match &w.codes {
            Codes::Q4 { d, m, qs } => {
                let wr = Q4Row {
                    d: &d[r * nb..(r + 1) * nb],
                    m: &m[r * nb..(r + 1) * nb],
                    qs: &qs[r * nb * QK / 2..(r + 1) * nb * QK / 2],
                };
                tiled(orow, xs, |x| simd.dot_q4(wr, x));
            }
            Codes::Q8 { d, qs } => {
                let wr = Q8Row {
                    d: &d[r * nb..(r + 1) * nb],
                    qs: &qs[r * w.cols..(r + 1) * w.cols],
                };
                tiled(orow, xs, |x| simd.dot_q8(wr, x));
            }
            Codes::F32(v) => {
                let wr = &v[r * w.cols..(r + 1) * w.cols];
                for (o, x) in orow.iter_mut().zip(xs) {
                    *o = dot_f32(wr, x.f);
                }
            }
        }
    }
}

/// Fills `out[i]` with the dot of activation rows `xs[i]`, [`TILE`] rows per call of `dot`.
fn tiled<'a>(out: &mut [f32], xs: &[XRow<'a>], dot: impl Fn(&[XRow<'a>]) -> [f32; TILE]) {
    for (o, x) in out.chunks_mut(TILE).zip(xs.chunks(TILE)) {
        let v = dot(x);
        o.copy_from_slice(&v[..o.len()]);
    }
}

/// f32 dot product with eight running sums (vectorizes without fast-math).
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[derive(Clone, Copy)]
struct Q4Row<'a> {
    d: &'a [f32],
    m: &'a [f32],
    qs: &'a [u8],
}

#[derive(Clone, Copy)]
struct Q8Row<'a> {
    d: &'a [f32],
    qs: &'a [i8],
}

/// The instruction set the kernels use, picked once per product.
#[derive(Clone, Copy)]
enum Simd {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2(pulp::x86::V3),
}

impl Simd {
    fn detect() -> Simd {
        #[cfg(target_arch = "x86_64")]
        if std::env::var_os("CROSSLM_NO_SIMD").is_none()
            && let Some(v3) = pulp::x86::V3::try_new()
        {
            return Simd::Avx2(v3);
        }
        Simd::Scalar
    }

    fn dot_q4(self, w: Q4Row<'_>, xs: &[XRow<'_>]) -> [f32; TILE] {
        match self {
            Simd::Scalar => each(xs, |x| scalar_q4(w, x)),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2(v3) => v3.vectorize(avx2::DotQ4 { simd: v3, w, xs }),
        }
    }

    fn dot_q8(self, w: Q8Row<'_>, xs: &[XRow<'_>]) -> [f32; TILE] {
        match self {
            Simd::Scalar => each(xs, |x| scalar_q8(w, x)),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2(v3) => v3.vectorize(avx2::DotQ8 { simd: v3, w, xs }),
        }
    }
}

fn each(xs: &[XRow<'_>], f: impl Fn(&XRow<'_>) -> f32) -> [f32; TILE] {
    let mut out = [0.0; TILE];
    for (o, x) in out.iter_mut().zip(xs) {
        *o = f(x);
    }
    out
}

/// Portable Q4 dot: the reference the SIMD kernels are tested against.
fn scalar_q4(w: Q4Row<'_>, x: &XRow<'_>) -> f32 {
    let mut acc = 0.0f32;
    for b in 0..w.d.len() {
        let q = &w.qs[b * QK / 2..(b + 1) * QK / 2];
        let xb = &x.f[b * QK..(b + 1) * QK];
        let mut s = 0.0f32;
        for j in 0..QK / 2 {
            s += f32::from(q[j] & 0x0f) * xb[j];
            s += f32::from(q[j] >> 4) * xb[j + QK / 2];
        }
        acc += w.d[b] * s + w.m[b] * x.sums[b];
    }
    acc
}

/// Portable Q8 dot.
fn scalar_q8(w: Q8Row<'_>, x: &XRow<'_>) -> f32 {
    let mut acc = 0.0f32;
    for b in 0..w.d.len() {
        let s: f32 = w.qs[b * QK..(b + 1) * QK]
            .iter()
            .zip(&x.f[b * QK..(b + 1) * QK])
            .map(|(&q, &v)| f32::from(q) * v)
            .sum();
        acc += w.d[b] * s;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! AVX2 + FMA kernels: a block's 32 codes become four vectors of eight f32 once, then
    //! each activation row of the tile takes four FMAs and one more for the block's scale.

    use core::arch::x86_64::{__m128i, __m256};
    use pulp::x86::V3;

    use super::{Q4Row, Q8Row, QK, TILE, XRow};

    #[inline(always)]
    fn load16(b: &[u8]) -> __m128i {
        let a: [u8; 16] = match b.try_into() {
            Ok(a) => a,
            Err(_) => unreachable!("16 bytes"),
        };
        pulp::cast(a)
    }

    #[inline(always)]
    fn load8(x: &[f32]) -> __m256 {
        let a: [f32; 8] = match x.try_into() {
            Ok(a) => a,
            Err(_) => unreachable!("8 values"),
        };
        pulp::cast(a)
    }

    #[inline(always)]
    fn hsum(v: __m256) -> f32 {
        let lanes: [f32; 8] = pulp::cast(v);
        lanes.iter().sum()
    }

    /// `sum(q x)` over one block: `q` as four vectors of eight, `x` the block's 32 values.
    #[inline(always)]
    fn block_dot(simd: V3, q: &[__m256; 4], x: &[f32]) -> __m256 {
        let s = simd.avx._mm256_mul_ps(q[0], load8(&x[0..8]));
        let s = simd.fma._mm256_fmadd_ps(q[1], load8(&x[8..16]), s);
        let s = simd.fma._mm256_fmadd_ps(q[2], load8(&x[16..24]), s);
        simd.fma._mm256_fmadd_ps(q[3], load8(&x[24..32]), s)
    }

    /// Eight codes from the low eight bytes of `v`, as f32.
    #[inline(always)]
    fn widen_u8(simd: V3, v: __m128i) -> __m256 {
        simd.avx
            ._mm256_cvtepi32_ps(simd.avx2._mm256_cvtepu8_epi32(v))
    }

    #[inline(always)]
    fn widen_i8(simd: V3, v: __m128i) -> __m256 {
        simd.avx
            ._mm256_cvtepi32_ps(simd.avx2._mm256_cvtepi8_epi32(v))
    }

    pub(super) struct DotQ4<'a, 'b> {
        pub simd: V3,
        pub w: Q4Row<'a>,
        pub xs: &'b [XRow<'b>],
    }

    impl pulp::NullaryFnOnce for DotQ4<'_, '_> {
        type Output = [f32; TILE];

        #[inline(always)]
        fn call(self) -> [f32; TILE] {
            let DotQ4 { simd, w, xs } = self;
            let mask = simd.sse2._mm_set1_epi8(0x0f);
            let mut acc = [simd.avx._mm256_setzero_ps(); TILE];
            let mut offset = [0.0f32; TILE];
            for b in 0..w.d.len() {
                let raw = load16(&w.qs[b * QK / 2..(b + 1) * QK / 2]);
                // Low nibbles are elements 0..16, high nibbles 16..32.
                let lo = simd.sse2._mm_and_si128(raw, mask);
                let hi = simd
                    .sse2
                    ._mm_and_si128(simd.sse2._mm_srli_epi16::<4>(raw), mask);
                let q = [
                    widen_u8(simd, lo),
                    widen_u8(simd, simd.sse2._mm_srli_si128::<8>(lo)),
                    widen_u8(simd, hi),
                    widen_u8(simd, simd.sse2._mm_srli_si128::<8>(hi)),
                ];
                let d = simd.avx._mm256_set1_ps(w.d[b]);
                for (t, x) in xs.iter().enumerate() {
                    let s = block_dot(simd, &q, &x.f[b * QK..(b + 1) * QK]);
                    acc[t] = simd.fma._mm256_fmadd_ps(s, d, acc[t]);
                    offset[t] += w.m[b] * x.sums[b];
                }
            }
            let mut out = [0.0; TILE];
            for t in 0..xs.len() {
                out[t] = hsum(acc[t]) + offset[t];
            }
            out
        }
    }

    pub(super) struct DotQ8<'a, 'b> {
        pub simd: V3,
        pub w: Q8Row<'a>,
        pub xs: &'b [XRow<'b>],
    }

    impl pulp::NullaryFnOnce for DotQ8<'_, '_> {
        type Output = [f32; TILE];

        #[inline(always)]
        fn call(self) -> [f32; TILE] {
            let DotQ8 { simd, w, xs } = self;
            let mut acc = [simd.avx._mm256_setzero_ps(); TILE];
            for b in 0..w.d.len() {
                let codes: &[u8] = bytemuck_i8(&w.qs[b * QK..(b + 1) * QK]);
                let (a, c) = (load16(&codes[..16]), load16(&codes[16..]));
                let q = [
                    widen_i8(simd, a),
                    widen_i8(simd, simd.sse2._mm_srli_si128::<8>(a)),
                    widen_i8(simd, c),
                    widen_i8(simd, simd.sse2._mm_srli_si128::<8>(c)),
                ];
                let d = simd.avx._mm256_set1_ps(w.d[b]);
                for (t, x) in xs.iter().enumerate() {
                    let s = block_dot(simd, &q, &x.f[b * QK..(b + 1) * QK]);
                    acc[t] = simd.fma._mm256_fmadd_ps(s, d, acc[t]);
                }
            }
            let mut out = [0.0; TILE];
            for t in 0..xs.len() {
                out[t] = hsum(acc[t]);
            }
            out
        }
    }

    /// `i8` codes seen as bytes (same bits).
    #[inline(always)]
    fn bytemuck_i8(v: &[i8]) -> &[u8] {
        pulp::bytemuck::cast_slice(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random values in `[-1, 1)`.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// GGUF bytes of `values` quantized as `ty` (the writer's side, for tests).
    fn encode(ty: GgmlType, v: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for block in v.chunks_exact(QK) {
            let (lo, hi) = block
                .iter()
                .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
            match ty {
                GgmlType::Q8_0 => {
                    let d = lo.abs().max(hi.abs()) / 127.0;
                    out.extend(f16::from_f32(d).to_le_bytes());
                    out.extend(block.iter().map(|x| (x / d).round() as i8 as u8));
                }
                GgmlType::Q4_1 | GgmlType::Q4_0 => {
                    let (d, m) = if ty == GgmlType::Q4_1 {
                        ((hi - lo) / 15.0, lo)
                    } else {
                        let d = lo.abs().max(hi.abs()) / 8.0;
                        (d, -8.0 * d)
                    };
                    out.extend(f16::from_f32(d).to_le_bytes());
                    if ty == GgmlType::Q4_1 {
                        out.extend(f16::from_f32(m).to_le_bytes());
                    }
                    let q = |x: f32| ((x - m) / d).round().clamp(0.0, 15.0) as u8;
                    for j in 0..QK / 2 {
                        out.push(q(block[j]) | (q(block[j + QK / 2]) << 4));
                    }
                }
                _ => unreachable!(),
            }
        }
        out
    }

    /// Every path's product equals the f32 product of the dequantized weights up to f32
    /// summation order; AVX2 and portable code agree.
    #[test]
    fn products_match_dequantized_f32() -> Result<()> {
        let (rows, cols) = (70, 96);
        for ty in [
            GgmlType::Q4_1,
            GgmlType::Q4_0,
            GgmlType::Q8_0,
            GgmlType::F32,
        ] {
            let v = values(rows * cols, 7);
            let bytes = match ty {
                GgmlType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                _ => encode(ty, &v),
            };
            let w = QMatrix::from_gguf("w", ty, &bytes, rows, cols)?;
            let dense = super::super::gguf::dequantize(ty, &bytes, rows * cols)?;
            for r in [0, 33, rows - 1] {
                assert_eq!(w.row(r), dense[r * cols..(r + 1) * cols], "{ty:?} row {r}");
            }
            for n in [1, 3, 9] {
                let x = values(n * cols, 11 + n as u32);
                let got = w.matmul(&x, n);
                for i in 0..n {
                    for r in 0..rows {
                        let want: f32 = (0..cols)
                            .map(|c| dense[r * cols + c] * x[i * cols + c])
                            .sum();
                        let err = (got[i * rows + r] - want).abs();
                        assert!(
                            err < 1e-4 * want.abs().max(1.0),
                            "{ty:?} n={n} ({i},{r}): {} vs {want}",
                            got[i * rows + r]
                        );
                    }
                }
                let sums = block_sums(&x, cols);
                let nb = cols / QK;
                let xr: Vec<XRow<'_>> = (0..n)
                    .map(|i| XRow {
                        f: &x[i * cols..(i + 1) * cols],
                        sums: &sums[i * nb..(i + 1) * nb],
                    })
                    .collect();
                let mut scalar = vec![0.0; rows * n];
                let mut fast = vec![0.0; rows * n];
                run_task(Simd::Scalar, &w, 0, &xr, &mut scalar);
                run_task(Simd::detect(), &w, 0, &xr, &mut fast);
                for (a, b) in scalar.iter().zip(&fast) {
                    assert!(
                        (a - b).abs() <= 1e-4 * a.abs().max(1.0),
                        "{ty:?}: {a} vs {b}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn several_matrices_in_one_pass() -> Result<()> {
        let cols = 64;
        let a = QMatrix::from_gguf(
            "a",
            GgmlType::Q8_0,
            &encode(GgmlType::Q8_0, &values(5 * cols, 1)),
            5,
            cols,
        )?;
        let b = QMatrix::from_gguf(
            "b",
            GgmlType::Q4_1,
            &encode(GgmlType::Q4_1, &values(40 * cols, 2)),
            40,
            cols,
        )?;
        let x = values(3 * cols, 3);
        let both = matmul_many(&[&a, &b], &x, 3);
        assert_eq!(both, vec![a.matmul(&x, 3), b.matmul(&x, 3)]);
        Ok(())
    }

    #[test]
    fn bad_tensors_are_clear_errors() {
        let e = QMatrix::from_gguf("w", GgmlType::Q4_1, &[0; 19], 1, 32);
        assert!(matches!(e, Err(Error::Gguf(m)) if m.contains("19 bytes")));
        let e = QMatrix::from_gguf("w", GgmlType::Q8_0, &[0; 34], 2, 16);
        assert!(matches!(e, Err(Error::Gguf(m)) if m.contains("blocks")));
        let e = QMatrix::from_gguf("w", GgmlType::Other(14), &[0; 34], 1, 32);
        assert!(matches!(e, Err(Error::Gguf(m)) if m.contains("unsupported")));
    }
}
