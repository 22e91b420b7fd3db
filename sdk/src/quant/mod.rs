//! Weights kept in their GGUF blocks, and the matrix products that read them.
//!
//! A weight `[out, in]` stays as 32-element blocks: Q4_0 and Q4_1 as 4-bit codes with a scale
//! and an offset, Q8_0 as 8-bit codes with a scale; Q5_0 as 5-bit codes or 8-bit codes
//! ([`Q5Form`]: the same numbers); Q4_K and Q6_K are recast into the 4- or 8-bit form
//! ([`repack`]). Every activation row is rounded once per product to two 8-bit parts on one
//! scale a block, about 15 bits ([`act`]), and the products run on integers, by the number of
//! activation rows:
//! - up to [`INT_ROWS`] (one sequence decoding): dots along each weight row, 8-bit integer
//!   products (`maddubs`), the lanes summed at the end;
//! - more (a batch decoding, prompts): panels ([`panel`]): the rows' `128 h + l` as i16, in
//!   tiles of [`PANEL_TILE`] rows, one activation row a vector lane, against each weight
//!   code pair broadcast (`vpdpwssd` where the CPU has VNNI); each dot is the portable
//!   scalar dot bit for bit, on every instruction set.
//!
//! Output rows are split over rayon's threads. The kernels use AVX-512 (F + BW, and VNNI where
//! present) or AVX2 + FMA when the CPU has them (detected at run time), portable code
//! otherwise. F32/F16 weights stay f32 and take an f32 register-tiled product.
//!
//! Linear layers of f32 models (MiniLM's scoring) take [`ChannelMatrix`] instead: 16-bit
//! codes on a scale per output channel, activation rows on a scale per row, one exact integer
//! sum per dot (`channel.rs`).

mod act;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod channel;
mod exp;
pub mod ggml;
mod kquant;
mod panel;
mod repack;
#[cfg(test)]
mod tests;

use rayon::prelude::*;

use self::act::{QAct, Tiles};
pub use self::channel::{ChannelMatrix, ROW_BLOCK, RowCodes};
pub use self::exp::exp_in_place;
use self::ggml::{BlockError, GgmlType, QK};

type Result<T> = std::result::Result<T, BlockError>;

/// Weight rows a rayon task computes: enough work per task to hide the scheduling cost, small
/// enough that a task's weights stay in L1/L2 while it sweeps the activation rows.
const ROWS_PER_TASK: usize = 32;
/// How far ahead of the codes it reads a single-row dot asks for weight bytes (x86): a few
/// rows, about as far as the memory's latency takes to cover at the rate the dots read.
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD: usize = 4096;
/// Activation rows of one tile of the f32 product (F32 weights).
const TILE: usize = 4;
/// Up to this many activation rows, products run dots along each weight row (no panel to lay
/// out); from there on, panels.
const INT_ROWS: usize = 2;
/// Activation rows that share a pass of the panel kernels over a block of weight rows: the
/// lanes of an AVX-512 register.
const PANEL_TILE: usize = 16;
/// The fewest rows a span of [`row_spans`] gets (enough for the panels to fill their lanes).
const PANEL_ROWS: usize = 32;

/// How Q5_0 weights are held. Both forms give the same numbers bit for bit (the kernels read
/// 5-bit codes `q` as the 8-bit codes `q - 16`); the 5-bit form takes 24 bytes a block where
/// the 8-bit form takes 36, and decoding one sequence reads every weight once a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Q5Form {
    /// 8-bit codes `q - 16` ([`Path::Q8`]): `CROSSLM_Q5=8bit`.
    Bytes,
    /// The file's nibbles and fifth bits ([`Path::Q5`]), the default.
    Bits,
}

impl Q5Form {
    /// `CROSSLM_Q5=8bit` picks [`Q5Form::Bytes`]; otherwise [`Q5Form::Bits`]. Read once per
    /// process (a model loads every matrix through it).
    pub fn from_env() -> Q5Form {
        static CHOSEN: std::sync::OnceLock<Q5Form> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| match std::env::var("CROSSLM_Q5").as_deref() {
            Ok("8bit") => Q5Form::Bytes,
            _ => Q5Form::Bits,
        })
    }
}

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
    /// 5-bit codes `q` in `0..32`, value `(q - 16) * d` (Q5_0): the low four bits as in
    /// [`Codes::Q4`], bit `j` of a block's `qh` the fifth bit of element `j`; 20 bytes a block
    /// where 8-bit codes took 32 (decoding reads less memory).
    Q5 {
        d: Vec<f32>,
        qs: Vec<u8>,
        qh: Vec<u32>,
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
    /// 4-bit codes times 8-bit activations (Q4_0, Q4_1, Q4_K).
    Q4,
    /// 5-bit codes times 8-bit activations (Q5_0).
    Q5,
    /// 8-bit codes times 8-bit activations (Q8_0, Q6_K).
    Q8,
    /// f32 weights (F32, F16 files).
    F32,
}

impl QMatrix {
    /// The `[rows, cols]` tensor of type `ty` from its raw GGUF bytes, in the kernels' 4- or
    /// 5- or 8-bit form where the type has one ([`repack`]: Q4_0, Q4_1, Q8_0, Q5_0, Q4_K, Q6_K;
    /// Q5_0 as [`Q5Form::from_env`] says). Other types take the f32 path, said in a log line; a
    /// type with no reader is an error.
    pub fn from_gguf(
        name: &str,
        ty: GgmlType,
        bytes: &[u8],
        rows: usize,
        cols: usize,
    ) -> Result<QMatrix> {
        QMatrix::from_gguf_as(name, ty, bytes, rows, cols, Q5Form::from_env())
    }

    /// [`QMatrix::from_gguf`] with Q5_0 held as `q5` says.
    pub fn from_gguf_as(
        name: &str,
        ty: GgmlType,
        bytes: &[u8],
        rows: usize,
        cols: usize,
        q5: Q5Form,
    ) -> Result<QMatrix> {
        let n = rows * cols;
        let Some((block, block_bytes)) = ty.block_layout() else {
            return Err(BlockError(format!(
                "tensor {name}: unsupported tensor type {ty:?}"
            )));
        };
        if !cols.is_multiple_of(block) {
            return Err(BlockError(format!(
                "tensor {name}: rows of {cols} elements do not split into {block}-element blocks"
            )));
        }
        let expect = n / block * block_bytes;
        if bytes.len() != expect {
            return Err(BlockError(format!(
                "tensor {name}: {} bytes for {rows}x{cols} {ty:?}, expected {expect}",
                bytes.len()
            )));
        }
        let codes = match repack::repack(ty, bytes, q5) {
            Some(codes) => codes,
            None => {
                tracing::info!(
                    "tensor {name} is {ty:?}: no quantized kernel for it, products run in f32"
                );
                Codes::F32(ggml::dequantize(ty, bytes, n)?)
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
            Codes::Q5 { .. } => Path::Q5,
            Codes::Q8 { .. } => Path::Q8,
            Codes::F32(_) => Path::F32,
        }
    }

    /// Row `r` of a quantized matrix, as the dot kernels read it.
    #[inline(always)]
    fn q_row(&self, r: usize) -> QRow<'_> {
        let nb = self.cols / QK;
        match &self.codes {
            Codes::Q4 { d, m, qs } => QRow::Q4(Q4Row {
                d: &d[r * nb..(r + 1) * nb],
                m: &m[r * nb..(r + 1) * nb],
                qs: &qs[r * nb * QK / 2..(r + 1) * nb * QK / 2],
            }),
            Codes::Q5 { d, qs, qh } => QRow::Q5(Q5Row {
                d: &d[r * nb..(r + 1) * nb],
                qs: &qs[r * nb * QK / 2..(r + 1) * nb * QK / 2],
                qh: &qh[r * nb..(r + 1) * nb],
            }),
            Codes::Q8 { d, qs } => QRow::Q8(Q8Row {
                d: &d[r * nb..(r + 1) * nb],
                qs: &qs[r * self.cols..(r + 1) * self.cols],
            }),
            Codes::F32(_) => unreachable!("f32 matrices take the f32 product"),
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
            Codes::Q5 { d, qs, qh } => {
                for (b, o) in out.chunks_exact_mut(QK).enumerate() {
                    let i = r * nb + b;
                    let codes = q5_block(&qs[i * QK / 2..(i + 1) * QK / 2], qh[i]);
                    for (o, &c) in o.iter_mut().zip(&codes) {
                        *o = (f32::from(c) - 16.0) * d[i];
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

/// One row of activations as the f32 kernels read it.
#[derive(Clone, Copy)]
struct XRow<'a> {
    f: &'a [f32],
}

/// `x @ W^T` for several matrices of the same input (q, k and v, say) in one parallel pass:
/// `x` is `[n, cols]`; returns one `[n, rows]` product per matrix.
pub fn matmul_many(ws: &[&QMatrix], x: &[f32], n: usize) -> Vec<Vec<f32>> {
    let mut outs = vec![Vec::new(); ws.len()];
    matmul_many_into(ws, x, n, &mut outs);
    outs
}

/// [`matmul_many`] into `outs` (one per matrix), each resized to its `[n, rows]` product and
/// overwritten: a caller that multiplies again and again reuses its buffers rather than
/// having fresh ones zeroed each time.
pub fn matmul_many_into(ws: &[&QMatrix], x: &[f32], n: usize, outs: &mut [Vec<f32>]) {
    assert_eq!(ws.len(), outs.len(), "one output per matrix");
    let Some(cols) = ws.first().map(|w| w.cols) else {
        return;
    };
    assert!(
        ws.iter().all(|w| w.cols == cols) && x.len() == n * cols,
        "matmul shapes: x has {} values for {n} rows of {cols}",
        x.len()
    );
    let rows = |r: usize| &x[r * cols..(r + 1) * cols];
    let simd = Simd::detect();
    let integer = ws.iter().any(|w| w.path() != Path::F32);
    let panel = integer && n > INT_ROWS;
    // Rounded rows for the integer dots; for the panels, tiles (and the rows only where the
    // portable code runs them).
    let rounded: Vec<QAct> = if integer && !panel {
        (0..n).map(|r| QAct::new(rows(r))).collect()
    } else if panel && simd.panels_from_rows() {
        (0..n).into_par_iter().map(|r| QAct::new(rows(r))).collect()
    } else {
        Vec::new()
    };
    let xs: Vec<XRow<'_>> = (0..n).map(|r| XRow { f: rows(r) }).collect();
    let qs: Vec<&QAct> = rounded.iter().collect();
    let tiles = panel.then(|| simd.tiles(x, n, cols, &qs));
    let tiles = tiles.as_ref();
    // Every value is written below (each task its rows, for every activation row).
    for (w, out) in ws.iter().zip(outs.iter_mut()) {
        out.resize(w.rows * n, 0.0);
    }
    if n == 1 {
        // One row: the kernels' order is the product's; each task owns its slice.
        let mut tasks: Vec<(&QMatrix, usize, &mut [f32])> = Vec::new();
        for (w, out) in ws.iter().zip(outs.iter_mut()) {
            for (i, chunk) in out.chunks_mut(ROWS_PER_TASK).enumerate() {
                tasks.push((w, i * ROWS_PER_TASK, chunk));
            }
        }
        tasks.into_par_iter().for_each(|(w, first, out)| {
            run_task(simd, w, first, &xs, &qs, tiles, out);
        });
        return;
    }
    // A task's columns of the `[n, rows]` product: the panel kernels write them in place; the
    // dots write a task's rows transposed (`[rows, n]`), in a buffer of the task's own whose
    // values it then copies into its columns, on its thread and while they are in cache.
    let mut tasks: Vec<(&QMatrix, usize, Vec<&mut [f32]>)> = Vec::new();
    for (w, out) in ws.iter().zip(outs.iter_mut()) {
        let mut columns: Vec<_> = out
            .chunks_mut(w.rows.max(1))
            .map(|row| row.chunks_mut(ROWS_PER_TASK))
            .collect();
        for c in 0..w.rows.div_ceil(ROWS_PER_TASK) {
            let pieces: Vec<&mut [f32]> = columns.iter_mut().filter_map(Iterator::next).collect();
            tasks.push((w, c * ROWS_PER_TASK, pieces));
        }
    }
    tasks.into_par_iter().for_each(|(w, first, mut pieces)| {
        if panel && w.path() != Path::F32 {
            simd.panel_task(w, first, n, &qs, tiles, &mut pieces);
            return;
        }
        let len = pieces.first().map_or(0, |p| p.len());
        let mut t = vec![0.0; len * n];
        if run_task(simd, w, first, &xs, &qs, tiles, &mut t) == Layout::RowsFirst {
            for (r, row) in t.chunks_exact(n).enumerate() {
                for (piece, &v) in pieces.iter_mut().zip(row) {
                    piece[r] = v;
                }
            }
        } else {
            for (piece, part) in pieces.iter_mut().zip(t.chunks_exact(len.max(1))) {
                piece.copy_from_slice(part);
            }
        }
    });
}

/// Splits `seq` positions of `batch` sequences (activation rows `[batch, seq]`) into spans of
/// about `target_rows` rows each, such that products over the spans one after the other give
/// bit for bit the rows of one product over all of them: every span takes the same path as the
/// whole (at least [`PANEL_ROWS`] rows when the whole has them), every span but the last has a
/// multiple of [`TILE`] rows, and the last keeps the whole's leftover rows. One span when the
/// rows are no more than `target_rows`, or too few to split that way.
pub fn row_spans(batch: usize, seq: usize, target_rows: usize) -> Vec<std::ops::Range<usize>> {
    let batch = batch.max(1);
    if batch * seq <= target_rows.max(PANEL_ROWS) {
        return std::iter::once(0..seq).collect();
    }
    // Positions per span: a multiple of `step`, so that the span's rows are a multiple of TILE.
    let step = TILE / gcd(batch, TILE);
    let span = (target_rows / batch)
        .max(PANEL_ROWS.div_ceil(batch))
        .div_ceil(step)
        * step;
    let mut spans: Vec<std::ops::Range<usize>> = (0..seq)
        .step_by(span)
        .map(|start| start..(start + span).min(seq))
        .collect();
    // A last span too small for the whole's path joins the one before it.
    if let [.., before, last] = spans.as_mut_slice()
        && batch * last.len() < PANEL_ROWS
    {
        before.end = last.end;
        spans.pop();
    }
    spans
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Weight rows `first..` (as many as `out` holds) against every activation row; `qs` holds the
/// rows rounded for the integer dots, or nothing, and `tiles` the same in the panel kernels'
/// tiles (more than [`INT_ROWS`] rows). Returns the layout `out` got.
fn run_task(
    simd: Simd,
    w: &QMatrix,
    first: usize,
    xs: &[XRow<'_>],
    qs: &[&QAct],
    tiles: Option<&Tiles>,
    out: &mut [f32],
) -> Layout {
    let n = xs.len();
    let rows = out.len() / n.max(1);
    if let Codes::F32(v) = &w.codes {
        simd.f32_product(&v[first * w.cols..(first + rows) * w.cols], w.cols, xs, out);
        return Layout::RowsFirst;
    }
    if n <= INT_ROWS {
        simd.int_task(w, first, qs, out);
        return Layout::RowsFirst;
    }
    let mut pieces: Vec<&mut [f32]> = out.chunks_mut(rows.max(1)).collect();
    simd.panel_task(w, first, n, qs, tiles, &mut pieces);
    Layout::ActivationsFirst
}

/// How a task's products come out: `[rows, n]` or `[n, rows]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    RowsFirst,
    ActivationsFirst,
}

/// f32 dot product with eight running sums (vectorizes without fast-math).
#[inline(always)]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
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

/// An instruction set's integer dots of weight rows with rounded activation rows.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
trait RowDots: Copy {
    /// One weight row against every activation row.
    fn row_dots(self, w: QRow<'_>, xs: &[&QAct], out: &mut [f32]);

    /// Weight rows `row0..row0 + 8 / N` against `N` activation rows (`N` a constant, so that
    /// every sum stays in a register), eight dots' lanes summed at once: `out[i N + t]` is row
    /// `i`'s dot with `xs[t]`, each the same as [`RowDots::row_dots`]'s.
    fn eight_dots<const N: usize>(
        self,
        w: &QMatrix,
        row0: usize,
        xs: [&QAct; N],
        out: &mut [f32; 8],
    );

    /// Weight rows `first..` (as many as `out` holds) against every activation row: with one
    /// or two activation rows, weight rows in groups of `8 / n`; the leftover rows, and other
    /// numbers of activation rows, to `row_dots` one by one.
    #[inline(always)]
    fn task_dots(self, w: &QMatrix, first: usize, xs: &[&QAct], out: &mut [f32]) {
        match *xs {
            [a] => groups_of_eight(self, w, first, [a], out),
            [a, b] => groups_of_eight(self, w, first, [a, b], out),
            _ => {
                for (k, o) in out.chunks_mut(xs.len().max(1)).enumerate() {
                    self.row_dots(w.q_row(first + k), xs, o);
                }
            }
        }
    }
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[inline(always)]
fn groups_of_eight<S: RowDots, const N: usize>(
    simd: S,
    w: &QMatrix,
    first: usize,
    xs: [&QAct; N],
    out: &mut [f32],
) {
    let per = 8 / N;
    let done = out.len() / 8 * per;
    let mut groups = out.chunks_exact_mut(8);
    for (g, o) in (&mut groups).enumerate() {
        let o: &mut [f32; 8] = match o.try_into() {
            Ok(o) => o,
            Err(_) => unreachable!("chunks of eight"),
        };
        simd.eight_dots(w, first + g * per, xs, o);
    }
    for (k, o) in groups.into_remainder().chunks_mut(N).enumerate() {
        simd.row_dots(w.q_row(first + done + k), &xs, o);
    }
}

/// Integer dots for a task: weight rows `first..` (as many as `out` holds) against every
/// rounded activation row, in one entry into the instruction set's context (`vectorize`).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct IntTask<'a, 'b, S> {
    simd: S,
    w: &'a QMatrix,
    first: usize,
    xs: &'b [&'a QAct],
    out: &'b mut [f32],
}

impl<S: RowDots> pulp::NullaryFnOnce for IntTask<'_, '_, S> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        self.simd.task_dots(self.w, self.first, self.xs, self.out)
    }
}

/// One row of a quantized weight matrix.
#[derive(Clone, Copy)]
enum QRow<'a> {
    Q4(Q4Row<'a>),
    Q5(Q5Row<'a>),
    Q8(Q8Row<'a>),
}

#[derive(Clone, Copy)]
struct Q4Row<'a> {
    d: &'a [f32],
    m: &'a [f32],
    qs: &'a [u8],
}

#[derive(Clone, Copy)]
struct Q5Row<'a> {
    d: &'a [f32],
    qs: &'a [u8],
    qh: &'a [u32],
}

/// The 32 codes `0..32` of a Q5 block (its 16 nibble bytes and fifth bits), in element order.
#[inline(always)]
fn q5_block(qs: &[u8], qh: u32) -> [u8; QK] {
    let mut out = [0u8; QK];
    for (j, &b) in qs.iter().enumerate().take(QK / 2) {
        out[j] = (b & 0x0f) | ((((qh >> j) & 1) as u8) << 4);
        out[j + QK / 2] = (b >> 4) | ((((qh >> (j + QK / 2)) & 1) as u8) << 4);
    }
    out
}

/// The instruction set the integer kernels run with in this process: `avx512+vnni`,
/// `avx512`, `avx2` or `scalar` (`CROSSLM_SIMD` narrows it), for logs and benchmarks.
pub fn kernels() -> &'static str {
    match Simd::detect() {
        Simd::Scalar => "scalar",
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2(_) => "avx2",
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512(_) if V4Vnni::detect().is_some() => "avx512+vnni",
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512(_) => "avx512",
    }
}

/// Runs `f` compiled for this CPU's widest vectors (AVX-512 or AVX2), so that the compiler
/// vectorizes its plain loops with them. Only the vector width changes: Rust never fuses a
/// multiply and an add, so every element gets the same operations in the same order, and the
/// results are the portable code's bit for bit.
#[inline(always)]
pub fn with_simd<R>(f: impl FnOnce() -> R) -> R {
    match Simd::detect() {
        Simd::Scalar => f(),
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2(v3) => v3.vectorize(f),
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512(v4) => v4.vectorize(f),
    }
}

/// Runs `op` with this CPU's widest vectors as pulp's portable [`pulp::Simd`] token (the
/// choice [`with_simd`] makes), for kernels written on explicit vectors of any width.
#[inline(always)]
pub fn vectorize<Op: pulp::WithSimd>(op: Op) -> Op::Output {
    // The trait's method: the tokens' own `vectorize` takes a closure.
    use pulp::Simd as S;
    match Simd::detect() {
        Simd::Scalar => S::vectorize(pulp::Scalar::new(), op),
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2(v3) => S::vectorize(v3, op),
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512(v4) => S::vectorize(v4, op),
    }
}

#[derive(Clone, Copy)]
struct Q8Row<'a> {
    d: &'a [f32],
    qs: &'a [i8],
}

#[cfg(target_arch = "x86_64")]
pulp::simd_type! {
    /// AVX-512 (pulp's `V4`) plus VNNI: kernels written for `V4` and run through this token
    /// are compiled with VNNI, where the compiler fuses a `madd` and an `add` into `vpdpwssd`.
    struct V4Vnni {
        sse: "sse",
        sse2: "sse2",
        fxsr: "fxsr",
        sse3: "sse3",
        ssse3: "ssse3",
        sse4_1: "sse4.1",
        sse4_2: "sse4.2",
        popcnt: "popcnt",
        avx: "avx",
        avx2: "avx2",
        bmi1: "bmi1",
        bmi2: "bmi2",
        fma: "fma",
        lzcnt: "lzcnt",
        avx512f: "avx512f",
        avx512bw: "avx512bw",
        avx512cd: "avx512cd",
        avx512dq: "avx512dq",
        avx512vl: "avx512vl",
        avx512vnni: "avx512vnni",
    }
}

#[cfg(target_arch = "x86_64")]
impl V4Vnni {
    /// The token where the CPU has VNNI and `CROSSLM_SIMD` does not narrow the choice.
    fn detect() -> Option<V4Vnni> {
        static CHOSEN: std::sync::OnceLock<Option<V4Vnni>> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| match std::env::var("CROSSLM_SIMD").as_deref() {
            Ok("") | Err(_) => V4Vnni::try_new(),
            Ok(_) => None,
        })
    }
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
    /// rows (four with AVX-512, then a pair); leftovers one dot at a time.
    fn f32_product(self, panel: &[f32], cols: usize, xs: &[XRow<'_>], out: &mut [f32]) {
        self.f32_product_in(panel, cols, xs, true, out)
    }

    /// [`Simd::f32_product`], with AVX-512's four-row tiles or not (tests compare them).
    fn f32_product_in(
        self,
        panel: &[f32],
        cols: usize,
        xs: &[XRow<'_>],
        quads: bool,
        out: &mut [f32],
    ) {
        let n = xs.len();
        let rows = panel.len() / cols.max(1);
        let row = |r: usize| &panel[r * cols..(r + 1) * cols];
        let pairs = rows / 2 * 2;
        let tiles = n / TILE * TILE;
        for i in (0..tiles).step_by(TILE) {
            let x = [xs[i].f, xs[i + 1].f, xs[i + 2].f, xs[i + 3].f];
            let mut r = 0;
            #[cfg(target_arch = "x86_64")]
            if let Simd::Avx512(v4) = self
                && quads
            {
                while r + 4 <= rows {
                    let w = [row(r), row(r + 1), row(r + 2), row(r + 3)];
                    let v = v4.vectorize(avx512::TileF32 { simd: v4, w, x });
                    for (t, v) in v.iter().enumerate() {
                        for (c, v) in v.iter().enumerate() {
                            out[(r + c) * n + i + t] = *v;
                        }
                    }
                    r += 4;
                }
            }
            for r in (r..pairs).step_by(2) {
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

    /// Integer dots of weight rows `first..` (as many as `out` holds) with every rounded
    /// activation row.
    fn int_task(self, w: &QMatrix, first: usize, xs: &[&QAct], out: &mut [f32]) {
        match self {
            Simd::Scalar => {
                for (k, o) in out.chunks_mut(xs.len()).enumerate() {
                    let dot: &dyn Fn(&QAct) -> f32 = match w.q_row(first + k) {
                        QRow::Q4(r) => &move |x| act::scalar_q4(r, x),
                        QRow::Q5(r) => &move |x| act::scalar_q5(r, x),
                        QRow::Q8(r) => &move |x| act::scalar_q8(r, x),
                    };
                    for (o, x) in o.iter_mut().zip(xs) {
                        *o = dot(x);
                    }
                }
            }
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2(v3) => v3.vectorize(IntTask {
                simd: v3,
                w,
                first,
                xs,
                out,
            }),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512(v4) => {
                let task = IntTask {
                    simd: v4,
                    w,
                    first,
                    xs,
                    out,
                };
                match V4Vnni::detect() {
                    // With VNNI the compiler fuses a `madd` and the `add` after it.
                    Some(vnni) => vnni.vectorize(task),
                    None => v4.vectorize(task),
                }
            }
        }
    }
}
