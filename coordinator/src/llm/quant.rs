//! Weights kept in their GGUF blocks, and the matrix products that read them.
//!
//! A weight `[out, in]` stays as 32-element blocks: Q4_0 and Q4_1 as 4-bit codes with a scale
//! and an offset, Q8_0 as 8-bit codes with a scale. A product decodes each block into f32
//! weights `q d + m` in registers and multiplies them with f32 activations (rounding the
//! activations to 8 bits, as llama.cpp does, moved logits by up to 0.4 and flipped the
//! reference's greedy ids). Output rows are split over rayon's threads; the inner dot uses AVX2 + FMA when the
//! CPU has them, AVX-512 when it has that (both detected at run time), portable code otherwise. F32/F16 weights stay f32.
//!
//! Over 600 lines: the same products for three instruction sets (portable, AVX2, AVX-512) side by
//! side, and the tests that hold each to the dense f32 result.

use half::f16;
use rayon::prelude::*;

use super::gguf::{GgmlType, QK};
use crate::{Error, Result};

/// Weight rows a rayon task computes: enough work per task to hide the scheduling cost, small
/// enough that a task's weights stay in L1/L2 while it sweeps the activation rows.
const ROWS_PER_TASK: usize = 32;
/// Activation rows that share one pass over a weight block (decoded nibbles reused).
const TILE: usize = 4;
/// From this many activation rows on, a task decodes its weight rows to f32 once and runs an
/// f32 register-tiled product (decoding per block per tile costs more than that).
const PANEL_ROWS: usize = 32;

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
        let mut out = vec![0.0; self.cols];
        self.decode_into(r, &mut out);
        out
    }

    /// Writes row `r` as f32 into `out` (`cols` values).
    fn decode_into(&self, r: usize, out: &mut [f32]) {
        let nb = self.cols / QK;
        match &self.codes {
            Codes::Q4 { d, m, qs } => {
                for (b, o) in out.chunks_exact_mut(QK).enumerate() {
                    let i = r * nb + b;
                    let q = &qs[i * QK / 2..(i + 1) * QK / 2];
                    let (lo, hi) = o.split_at_mut(QK / 2);
                    for ((l, h), &c) in lo.iter_mut().zip(hi).zip(q) {
                        *l = f32::from(c & 0x0f) * d[i] + m[i];
                        *h = f32::from(c >> 4) * d[i] + m[i];
                    }
                }
            }
            Codes::Q8 { d, qs } => {
                let row = &qs[r * self.cols..(r + 1) * self.cols];
                for (b, (o, q)) in out
                    .chunks_exact_mut(QK)
                    .zip(row.chunks_exact(QK))
                    .enumerate()
                {
                    let scale = d[r * nb + b];
                    for (o, &q) in o.iter_mut().zip(q) {
                        *o = f32::from(q) * scale;
                    }
                }
            }
            Codes::F32(v) => out.copy_from_slice(&v[r * self.cols..(r + 1) * self.cols]),
        }
    }

    /// Rows `range` as f32, row-major (a task's panel; the f32 model for training).
    pub fn rows_f32(&self, range: std::ops::Range<usize>) -> Vec<f32> {
        let mut out = vec![0.0; range.len() * self.cols];
        for (r, o) in range.zip(out.chunks_exact_mut(self.cols.max(1))) {
            self.decode_into(r, o);
        }
        out
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
    f: &'a [f32],
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
    let xrow = |r: usize| XRow {
        f: &x[r * cols..(r + 1) * cols],
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

/// Weight rows `first..` (as many as `out` holds) against every activation row.
fn run_task(simd: Simd, w: &QMatrix, first: usize, xs: &[XRow<'_>], out: &mut [f32]) {
    let n = xs.len();
    let nb = w.cols / QK;
    let rows = out.len() / n.max(1);
    if let Codes::F32(v) = &w.codes {
        return simd.f32_product(&v[first * w.cols..(first + rows) * w.cols], w.cols, xs, out);
    }
    if n >= PANEL_ROWS {
        let panel = w.rows_f32(first..first + rows);
        return simd.f32_product(&panel, w.cols, xs, out);
    }
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
            Codes::F32(_) => unreachable!("f32 matrices returned above"),
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
pub(crate) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
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
    #[cfg(target_arch = "x86_64")]
    Avx512(pulp::x86::V4),
}

impl Simd {
    /// The kernels for this CPU, chosen once per process.
    fn detect() -> Simd {
        static CHOSEN: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(Simd::choose)
    }

    fn choose() -> Simd {
        // CROSSLM_SIMD=avx2 or =scalar narrows the choice (to compare kernels).
        #[cfg(target_arch = "x86_64")]
        {
            let asked = std::env::var("CROSSLM_SIMD").unwrap_or_default();
            if asked.is_empty()
                && let Some(v4) = pulp::x86::V4::try_new()
            {
                return Simd::Avx512(v4);
            }
            if asked != "scalar"
                && let Some(v3) = pulp::x86::V3::try_new()
            {
                return Simd::Avx2(v3);
            }
        }
        Simd::Scalar
    }

    /// `out[r * n + i]` = row `r` of `panel` (`[rows, cols]`) dot `xs[i]`: tiles of four
    /// activation rows (kept in L1 while every weight row of the panel passes) by two weight
    /// rows; leftovers one dot at a time.
    fn f32_product(self, panel: &[f32], cols: usize, xs: &[XRow<'_>], out: &mut [f32]) {
        let n = xs.len();
        let rows = panel.len() / cols.max(1);
        let row = |r: usize| &panel[r * cols..(r + 1) * cols];
        let pairs = rows / 2 * 2;
        let tiles = n / TILE * TILE;
        for i in (0..tiles).step_by(TILE) {
            let x = [xs[i].f, xs[i + 1].f, xs[i + 2].f, xs[i + 3].f];
            for r in (0..pairs).step_by(2) {
                let w = [row(r), row(r + 1)];
                let v = match self {
                    Simd::Scalar => x.map(|x| [dot_f32(w[0], x), dot_f32(w[1], x)]),
                    #[cfg(target_arch = "x86_64")]
                    Simd::Avx2(v3) => v3.vectorize(avx2::TileF32 { simd: v3, w, x }),
                    #[cfg(target_arch = "x86_64")]
                    Simd::Avx512(v4) => v4.vectorize(avx512::TileF32 { simd: v4, w, x }),
                };
                for (t, v) in v.iter().enumerate() {
                    out[r * n + i + t] = v[0];
                    out[(r + 1) * n + i + t] = v[1];
                }
            }
        }
        for r in 0..rows {
            let first = if r < pairs { tiles } else { 0 };
            for (i, x) in xs.iter().enumerate().skip(first) {
                out[r * n + i] = dot_f32(row(r), x.f);
            }
        }
    }

    fn dot_q4(self, w: Q4Row<'_>, xs: &[XRow<'_>]) -> [f32; TILE] {
        match self {
            Simd::Scalar => each(xs, |x| scalar_q4(w, x)),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2(v3) => v3.vectorize(avx2::Dot { simd: v3, w, xs }),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512(v4) => v4.vectorize(avx512::Dot { simd: v4, w, xs }),
        }
    }

    fn dot_q8(self, w: Q8Row<'_>, xs: &[XRow<'_>]) -> [f32; TILE] {
        match self {
            Simd::Scalar => each(xs, |x| scalar_q8(w, x)),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2(v3) => v3.vectorize(avx2::Dot { simd: v3, w, xs }),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512(v4) => v4.vectorize(avx512::Dot { simd: v4, w, xs }),
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
        for j in 0..QK / 2 {
            acc += (f32::from(q[j] & 0x0f) * w.d[b] + w.m[b]) * xb[j];
            acc += (f32::from(q[j] >> 4) * w.d[b] + w.m[b]) * xb[j + QK / 2];
        }
    }
    acc
}

/// Portable Q8 dot.
fn scalar_q8(w: Q8Row<'_>, x: &XRow<'_>) -> f32 {
    let mut acc = 0.0f32;
    for b in 0..w.d.len() {
        for (&q, &v) in w.qs[b * QK..(b + 1) * QK]
            .iter()
            .zip(&x.f[b * QK..(b + 1) * QK])
        {
            acc += f32::from(q) * w.d[b] * v;
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! AVX2 + FMA kernels: a block's 32 codes are decoded once into four vectors of eight f32
    //! weights (`q d + m`), then FMA'd into each activation row of the tile. Every row keeps
    //! several accumulators so that FMAs do not wait on each other (one accumulator left a
    //! single row's product bound by FMA latency, at a tenth of the machine's rate).

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
    fn hsum(simd: V3, v: &[__m256]) -> f32 {
        let total = v.iter().fold(simd.avx._mm256_setzero_ps(), |a, &b| {
            simd.avx._mm256_add_ps(a, b)
        });
        let lanes: [f32; 8] = pulp::cast(total);
        lanes.iter().sum()
    }

    /// A weight row whose blocks decode to f32.
    pub(super) trait Decode: Copy {
        fn blocks(self) -> usize;
        fn decode(self, simd: V3, b: usize) -> [__m256; 4];
    }

    /// Codes `0..16` in the low eight bytes of `v` as `q d + m`.
    #[inline(always)]
    fn widen_u8(simd: V3, v: __m128i, d: __m256, m: __m256) -> __m256 {
        let q = simd
            .avx
            ._mm256_cvtepi32_ps(simd.avx2._mm256_cvtepu8_epi32(v));
        simd.fma._mm256_fmadd_ps(q, d, m)
    }

    /// Signed codes in the low eight bytes of `v` as `q d`.
    #[inline(always)]
    fn widen_i8(simd: V3, v: __m128i, d: __m256) -> __m256 {
        let q = simd
            .avx
            ._mm256_cvtepi32_ps(simd.avx2._mm256_cvtepi8_epi32(v));
        simd.avx._mm256_mul_ps(q, d)
    }

    impl Decode for Q4Row<'_> {
        #[inline(always)]
        fn blocks(self) -> usize {
            self.d.len()
        }

        #[inline(always)]
        fn decode(self, simd: V3, b: usize) -> [__m256; 4] {
            let raw = load16(&self.qs[b * QK / 2..(b + 1) * QK / 2]);
            let mask = simd.sse2._mm_set1_epi8(0x0f);
            // Low nibbles are elements 0..16, high nibbles 16..32.
            let lo = simd.sse2._mm_and_si128(raw, mask);
            let hi = simd
                .sse2
                ._mm_and_si128(simd.sse2._mm_srli_epi16::<4>(raw), mask);
            let d = simd.avx._mm256_set1_ps(self.d[b]);
            let m = simd.avx._mm256_set1_ps(self.m[b]);
            [
                widen_u8(simd, lo, d, m),
                widen_u8(simd, simd.sse2._mm_srli_si128::<8>(lo), d, m),
                widen_u8(simd, hi, d, m),
                widen_u8(simd, simd.sse2._mm_srli_si128::<8>(hi), d, m),
            ]
        }
    }

    impl Decode for Q8Row<'_> {
        #[inline(always)]
        fn blocks(self) -> usize {
            self.d.len()
        }

        #[inline(always)]
        fn decode(self, simd: V3, b: usize) -> [__m256; 4] {
            let codes: &[u8] = pulp::bytemuck::cast_slice(&self.qs[b * QK..(b + 1) * QK]);
            let (a, c) = (load16(&codes[..16]), load16(&codes[16..]));
            let d = simd.avx._mm256_set1_ps(self.d[b]);
            [
                widen_i8(simd, a, d),
                widen_i8(simd, simd.sse2._mm_srli_si128::<8>(a), d),
                widen_i8(simd, c, d),
                widen_i8(simd, simd.sse2._mm_srli_si128::<8>(c), d),
            ]
        }
    }

    /// Dots of one weight row with up to [`TILE`] activation rows.
    #[inline(always)]
    fn dots(simd: V3, w: impl Decode, xs: &[XRow<'_>]) -> [f32; TILE] {
        let mut out = [0.0; TILE];
        if let [x] = xs {
            // One row: four accumulators.
            let mut acc = [simd.avx._mm256_setzero_ps(); 4];
            for b in 0..w.blocks() {
                let w = w.decode(simd, b);
                let xb = &x.f[b * QK..(b + 1) * QK];
                for k in 0..4 {
                    acc[k] = simd
                        .fma
                        ._mm256_fmadd_ps(w[k], load8(&xb[8 * k..8 * k + 8]), acc[k]);
                }
            }
            out[0] = hsum(simd, &acc);
            return out;
        }
        // A tile: two accumulators a row, eight chains in flight for four rows.
        let mut acc = [[simd.avx._mm256_setzero_ps(); 2]; TILE];
        for b in 0..w.blocks() {
            let w = w.decode(simd, b);
            for (t, x) in xs.iter().enumerate() {
                let xb = &x.f[b * QK..(b + 1) * QK];
                for k in 0..4 {
                    acc[t][k % 2] =
                        simd.fma
                            ._mm256_fmadd_ps(w[k], load8(&xb[8 * k..8 * k + 8]), acc[t][k % 2]);
                }
            }
        }
        for (o, a) in out.iter_mut().zip(&acc).take(xs.len()) {
            *o = hsum(simd, a);
        }
        out
    }

    /// Four activation rows by two f32 weight rows: eight accumulators, each FMA chain
    /// independent of the others.
    pub(super) struct TileF32<'a> {
        pub simd: V3,
        pub w: [&'a [f32]; 2],
        pub x: [&'a [f32]; TILE],
    }

    impl pulp::NullaryFnOnce for TileF32<'_> {
        type Output = [[f32; 2]; TILE];

        #[inline(always)]
        fn call(self) -> [[f32; 2]; TILE] {
            let TileF32 { simd, w, x } = self;
            let mut acc = [[simd.avx._mm256_setzero_ps(); 2]; TILE];
            let full = w[0].len() / 8 * 8;
            for k in (0..full).step_by(8) {
                let w0 = load8(&w[0][k..k + 8]);
                let w1 = load8(&w[1][k..k + 8]);
                for t in 0..TILE {
                    let xv = load8(&x[t][k..k + 8]);
                    acc[t][0] = simd.fma._mm256_fmadd_ps(w0, xv, acc[t][0]);
                    acc[t][1] = simd.fma._mm256_fmadd_ps(w1, xv, acc[t][1]);
                }
            }
            let mut out = [[0.0; 2]; TILE];
            for t in 0..TILE {
                for c in 0..2 {
                    let tail: f32 = w[c][full..]
                        .iter()
                        .zip(&x[t][full..])
                        .map(|(a, b)| a * b)
                        .sum();
                    out[t][c] = hsum(simd, &acc[t][c..=c]) + tail;
                }
            }
            out
        }
    }

    /// One weight row (Q4 or Q8) against up to [`TILE`] activation rows.
    pub(super) struct Dot<'b, W> {
        pub simd: V3,
        pub w: W,
        pub xs: &'b [XRow<'b>],
    }

    impl<W: Decode> pulp::NullaryFnOnce for Dot<'_, W> {
        type Output = [f32; TILE];

        #[inline(always)]
        fn call(self) -> [f32; TILE] {
            dots(self.simd, self.w, self.xs)
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The same kernels as [`super::avx2`] on 16-lane registers, for CPUs with AVX-512: half
    //! the instructions per block.

    use core::arch::x86_64::{__m128i, __m512};
    use pulp::x86::V4;

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
    fn load(x: &[f32]) -> __m512 {
        let a: [f32; 16] = match x.try_into() {
            Ok(a) => a,
            Err(_) => unreachable!("16 values"),
        };
        pulp::cast(a)
    }

    #[inline(always)]
    fn hsum(simd: V4, v: &[__m512]) -> f32 {
        let total = v.iter().fold(simd.avx512f._mm512_setzero_ps(), |a, &b| {
            simd.avx512f._mm512_add_ps(a, b)
        });
        let lanes: [f32; 16] = pulp::cast(total);
        lanes.iter().sum()
    }

    /// A weight row whose blocks decode to f32.
    pub(super) trait Decode: Copy {
        fn blocks(self) -> usize;
        fn decode(self, simd: V4, b: usize) -> [__m512; 2];
    }

    /// Sixteen codes `0..16` as `q d + m`.
    #[inline(always)]
    fn widen_u8(simd: V4, v: __m128i, d: __m512, m: __m512) -> __m512 {
        let q = simd
            .avx512f
            ._mm512_cvtepi32_ps(simd.avx512f._mm512_cvtepu8_epi32(v));
        simd.avx512f._mm512_fmadd_ps(q, d, m)
    }

    /// Sixteen signed codes as `q d`.
    #[inline(always)]
    fn widen_i8(simd: V4, v: __m128i, d: __m512) -> __m512 {
        let q = simd
            .avx512f
            ._mm512_cvtepi32_ps(simd.avx512f._mm512_cvtepi8_epi32(v));
        simd.avx512f._mm512_mul_ps(q, d)
    }

    impl Decode for Q4Row<'_> {
        #[inline(always)]
        fn blocks(self) -> usize {
            self.d.len()
        }

        #[inline(always)]
        fn decode(self, simd: V4, b: usize) -> [__m512; 2] {
            let raw = load16(&self.qs[b * QK / 2..(b + 1) * QK / 2]);
            let mask = simd.sse2._mm_set1_epi8(0x0f);
            // Low nibbles are elements 0..16, high nibbles 16..32.
            let lo = simd.sse2._mm_and_si128(raw, mask);
            let hi = simd
                .sse2
                ._mm_and_si128(simd.sse2._mm_srli_epi16::<4>(raw), mask);
            let d = simd.avx512f._mm512_set1_ps(self.d[b]);
            let m = simd.avx512f._mm512_set1_ps(self.m[b]);
            [widen_u8(simd, lo, d, m), widen_u8(simd, hi, d, m)]
        }
    }

    impl Decode for Q8Row<'_> {
        #[inline(always)]
        fn blocks(self) -> usize {
            self.d.len()
        }

        #[inline(always)]
        fn decode(self, simd: V4, b: usize) -> [__m512; 2] {
            let codes: &[u8] = pulp::bytemuck::cast_slice(&self.qs[b * QK..(b + 1) * QK]);
            let d = simd.avx512f._mm512_set1_ps(self.d[b]);
            [
                widen_i8(simd, load16(&codes[..16]), d),
                widen_i8(simd, load16(&codes[16..]), d),
            ]
        }
    }

    /// Dots of one weight row with up to [`TILE`] activation rows.
    #[inline(always)]
    fn dots(simd: V4, w: impl Decode, xs: &[XRow<'_>]) -> [f32; TILE] {
        let f = &simd.avx512f;
        let mut out = [0.0; TILE];
        if let [x] = xs {
            // One row: four accumulators (two a block, alternating blocks).
            let mut acc = [f._mm512_setzero_ps(); 4];
            for b in 0..w.blocks() {
                let wv = w.decode(simd, b);
                let xb = &x.f[b * QK..(b + 1) * QK];
                let a = 2 * (b % 2);
                acc[a] = f._mm512_fmadd_ps(wv[0], load(&xb[..16]), acc[a]);
                acc[a + 1] = f._mm512_fmadd_ps(wv[1], load(&xb[16..]), acc[a + 1]);
            }
            out[0] = hsum(simd, &acc);
            return out;
        }
        let mut acc = [[f._mm512_setzero_ps(); 2]; TILE];
        for b in 0..w.blocks() {
            let wv = w.decode(simd, b);
            for (t, x) in xs.iter().enumerate() {
                let xb = &x.f[b * QK..(b + 1) * QK];
                acc[t][0] = f._mm512_fmadd_ps(wv[0], load(&xb[..16]), acc[t][0]);
                acc[t][1] = f._mm512_fmadd_ps(wv[1], load(&xb[16..]), acc[t][1]);
            }
        }
        for (o, a) in out.iter_mut().zip(&acc).take(xs.len()) {
            *o = hsum(simd, a);
        }
        out
    }

    /// One weight row (Q4 or Q8) against up to [`TILE`] activation rows.
    pub(super) struct Dot<'b, W> {
        pub simd: V4,
        pub w: W,
        pub xs: &'b [XRow<'b>],
    }

    impl<W: Decode> pulp::NullaryFnOnce for Dot<'_, W> {
        type Output = [f32; TILE];

        #[inline(always)]
        fn call(self) -> [f32; TILE] {
            dots(self.simd, self.w, self.xs)
        }
    }

    /// Four activation rows by two f32 weight rows, sixteen lanes at a time.
    pub(super) struct TileF32<'a> {
        pub simd: V4,
        pub w: [&'a [f32]; 2],
        pub x: [&'a [f32]; TILE],
    }

    impl pulp::NullaryFnOnce for TileF32<'_> {
        type Output = [[f32; 2]; TILE];

        #[inline(always)]
        fn call(self) -> [[f32; 2]; TILE] {
            let TileF32 { simd, w, x } = self;
            let f = &simd.avx512f;
            let mut acc = [[f._mm512_setzero_ps(); 2]; TILE];
            let full = w[0].len() / 16 * 16;
            for k in (0..full).step_by(16) {
                let w0 = load(&w[0][k..k + 16]);
                let w1 = load(&w[1][k..k + 16]);
                for t in 0..TILE {
                    let xv = load(&x[t][k..k + 16]);
                    acc[t][0] = f._mm512_fmadd_ps(w0, xv, acc[t][0]);
                    acc[t][1] = f._mm512_fmadd_ps(w1, xv, acc[t][1]);
                }
            }
            let mut out = [[0.0; 2]; TILE];
            for t in 0..TILE {
                for c in 0..2 {
                    let tail: f32 = w[c][full..]
                        .iter()
                        .zip(&x[t][full..])
                        .map(|(a, b)| a * b)
                        .sum();
                    out[t][c] = hsum(simd, &acc[t][c..=c]) + tail;
                }
            }
            out
        }
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

    /// Every kernel set this CPU can run.
    fn simd_kinds() -> Vec<Simd> {
        let mut out = vec![Simd::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            out.extend(pulp::x86::V3::try_new().map(Simd::Avx2));
            out.extend(pulp::x86::V4::try_new().map(Simd::Avx512));
        }
        out
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
            for n in [1, 3, 9, 40] {
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
                let xr: Vec<XRow<'_>> = (0..n)
                    .map(|i| XRow {
                        f: &x[i * cols..(i + 1) * cols],
                    })
                    .collect();
                let mut scalar = vec![0.0; rows * n];
                run_task(Simd::Scalar, &w, 0, &xr, &mut scalar);
                for simd in simd_kinds() {
                    let mut fast = vec![0.0; rows * n];
                    run_task(simd, &w, 0, &xr, &mut fast);
                    for (a, b) in scalar.iter().zip(&fast) {
                        assert!(
                            (a - b).abs() <= 1e-4 * a.abs().max(1.0),
                            "{ty:?}: {a} vs {b}"
                        );
                    }
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
