//! Linear layers of f32 models (MiniLM) on integer products: weights as 16-bit codes on one
//! scale per output channel, each activation row rounded to codes on one scale of its own,
//! and every dot one exact i32 sum and one f32 epilogue (`sum as f32 * (sx * sw) + bias`).
//!
//! The codes' range is the matrix's: `|w|, |x| <= limit` with `cols * limit^2 <= i32::MAX`,
//! so no sum can overflow: 2364 steps a side at 384 columns, 1182 at 1536. That is finer than
//! 8-bit codes on a scale per 32 weights, and the sums run the whole row with no per-block
//! scales between them. Products take `vpdpwssd` (a `madd` and an `add` fused, where the CPU
//! has VNNI) with AVX-512, `madd` and `add` with AVX2, portable code elsewhere; the sums are
//! exact and the epilogue is one piece of code, so every instruction set gives the same
//! numbers bit for bit.

use rayon::prelude::*;

use super::Simd;
#[cfg(target_arch = "x86_64")]
use super::V4Vnni;
use super::ggml::BlockError;

/// Output channels of a group: the lanes of an AVX-512 register.
const LANES: usize = 16;
/// Activation rows of a full tile.
const TILE_ROWS: usize = 8;
/// The rows of a block of [`RowCodes`]: tasks that split a product's rows take whole blocks.
pub const ROW_BLOCK: usize = TILE_ROWS;
/// Channel groups of a full tile: with [`TILE_ROWS`], 24 sums in registers (24 `vpdpwssd`
/// chains, enough to cover the instruction's latency at two a cycle).
const TILE_GROUPS: usize = 3;
/// The most activation rows a rayon task takes: its weights stay in L2 while they pass.
const TASK_ROWS: usize = 64;
/// `1.5 * 2^23`: for |v| <= 2^22, the low mantissa bits of `v + ROUND` less those of `ROUND`
/// are `v` rounded half to even.
const ROUND: f32 = 12_582_912.0;

/// The largest code magnitude for rows of `cols` values: `cols * limit^2 <= i32::MAX`.
fn limit_for(cols: usize) -> i32 {
    let l = (f64::from(i32::MAX) / cols.max(1) as f64).sqrt().floor();
    l.min(f64::from(i16::MAX)) as i32
}

#[inline(always)]
fn lo(w: i32) -> i32 {
    (w << 16) >> 16
}

#[inline(always)]
fn hi(w: i32) -> i32 {
    w >> 16
}

/// A weight matrix `[rows = out, cols = in]` with its bias, as 16-bit codes on a scale per
/// row (output channel).
#[derive(Debug, Clone, Default)]
pub struct ChannelMatrix {
    rows: usize,
    cols: usize,
    limit: i32,
    /// Per channel, padded with zeros to whole tiles.
    scale: Vec<f32>,
    bias: Vec<f32>,
    /// Tile `t` (channels `t SPAN..`)'s pair `p` at `(t * pairs + p) * SPAN`: word
    /// `g LANES + l` holds channel `t SPAN + g LANES + l`'s codes `2p` (low i16) and `2p + 1`
    /// (high); padding codes are 0. A tile's words for one pair lie side by side, so a kernel
    /// reads them at fixed offsets from one pointer.
    words: Vec<i32>,
}

/// Channels of a tile.
const SPAN: usize = TILE_GROUPS * LANES;

/// Activation rows rounded for a [`ChannelMatrix`], in blocks of [`TILE_ROWS`] (the last
/// padded with rows of zeros): row `r`'s pair `p` at `((r / TILE_ROWS) * pairs + p) *
/// TILE_ROWS + r % TILE_ROWS` (a block's rows side by side for each pair), its values
/// `code * scale[r]`.
#[derive(Debug, Default)]
pub struct RowCodes {
    n: usize,
    cols: usize,
    limit: i32,
    words: Vec<i32>,
    scale: Vec<f32>,
}

impl RowCodes {
    /// Rounds the `n` rows of `x` (`cols` values each) to `|code| <= limit`, rows split over
    /// the threads, into this value's buffers. A row with a non-finite value gets a NaN scale
    /// (its products are NaN); a row of zeros, or of values so small that the inverse of
    /// their step overflows (below about 1e-35), gets codes 0 and scale 0.
    pub fn round(&mut self, x: &[f32], n: usize, cols: usize, limit: i32) {
        assert_eq!(x.len(), n * cols, "{n} rows of {cols} values");
        if !self.reshape(n, cols, limit) {
            return;
        }
        let pairs = cols.div_ceil(2);
        let rows_per_task = 2 * TILE_ROWS;
        self.words
            .par_chunks_mut(pairs * rows_per_task)
            .zip(self.scale.par_chunks_mut(rows_per_task))
            .zip(x.par_chunks(cols * rows_per_task))
            .for_each(|((words, scale), x)| {
                super::with_simd(
                    #[inline(always)]
                    || round_blocks(x, cols, limit, words, scale),
                )
            });
    }

    /// [`RowCodes::round`] on the calling thread, for rows a task of its own holds.
    pub fn round_here(&mut self, x: &[f32], n: usize, cols: usize, limit: i32) {
        assert_eq!(x.len(), n * cols, "{n} rows of {cols} values");
        if !self.reshape(n, cols, limit) {
            return;
        }
        super::with_simd(
            #[inline(always)]
            || round_blocks(x, cols, limit, &mut self.words, &mut self.scale),
        )
    }

    /// Buffers for `rows` rows of `cols` values within `limit`; false where there is nothing
    /// to round.
    fn reshape(&mut self, rows: usize, cols: usize, limit: i32) -> bool {
        let padded = rows.next_multiple_of(TILE_ROWS);
        (self.n, self.cols, self.limit) = (rows, cols, limit);
        self.words.resize(padded * cols.div_ceil(2), 0);
        self.scale.resize(padded, 0.0);
        rows > 0 && cols > 0
    }

    /// [`RowCodes::round`] of `x^T`: the `cols` columns of `x` (`[n, cols]`) as rows of `n`
    /// values, without the transposed copy; the same codes and scales bit for bit.
    pub fn round_transposed(&mut self, x: &[f32], n: usize, cols: usize, limit: i32) {
        assert_eq!(x.len(), n * cols, "{n} rows of {cols} values");
        if !self.reshape(cols, n, limit) {
            return;
        }
        let pairs = n.div_ceil(2);
        // Two blocks a task: sixteen columns, a cache line of each row.
        let per_task = 2;
        self.words
            .par_chunks_mut(pairs * TILE_ROWS * per_task)
            .zip(self.scale.par_chunks_mut(TILE_ROWS * per_task))
            .enumerate()
            .for_each(|(t, (words, scale))| {
                super::with_simd(
                    #[inline(always)]
                    || {
                        for (b, (block, scale)) in words
                            .chunks_exact_mut(pairs * TILE_ROWS)
                            .zip(scale.chunks_exact_mut(TILE_ROWS))
                            .enumerate()
                        {
                            let c0 = (t * per_task + b) * TILE_ROWS;
                            round_columns(x, n, cols, c0, limit, scale, block);
                        }
                    },
                )
            });
    }
}

/// The rows of `x` (`cols` values each) rounded into whole blocks of [`RowCodes`]' layout
/// (`words`, `scale`; rows past those of `x` as zeros).
#[inline(always)]
fn round_blocks(x: &[f32], cols: usize, limit: i32, words: &mut [i32], scale: &mut [f32]) {
    let pairs = cols.div_ceil(2);
    let mut row = vec![0i32; pairs];
    let blocks = words.chunks_exact_mut(pairs * TILE_ROWS);
    let xs = x.chunks(cols * TILE_ROWS);
    for ((block, x), scale) in blocks.zip(xs).zip(scale.chunks_mut(TILE_ROWS)) {
        for (i, scale) in scale.iter_mut().enumerate() {
            *scale = match x.get(i * cols..(i + 1) * cols) {
                Some(x) => round_row(x, limit, &mut row),
                None => {
                    row.fill(0);
                    0.0
                }
            };
            place(&row, TILE_ROWS, i, block);
        }
    }
}

/// Rounds `x` into `words` (its codes as pairs); returns the row's scale.
#[inline(always)]
fn round_row(x: &[f32], limit: i32, words: &mut [i32]) -> f32 {
    let top = x.iter().fold(0u32, |m, v| m.max(top_bits(*v)));
    let (inv, scale) = step(top, limit);
    if inv == 0.0 {
        words.fill(0);
        return scale;
    }
    let code = |v: f32| code(v, inv, limit);
    // Thirty-two codes at a time as i16s, which are the sixteen words' bytes (low half
    // first); a last short chunk padded with zeros. Whole chunks are written as arrays: a
    // slice of sixteen words would be copied by a call to `memcpy`.
    let mut chunks = x.chunks_exact(32);
    let (whole, rest) = words.split_at_mut((x.len() / 32 * 16).min(words.len()));
    for (c, w) in chunks.by_ref().zip(whole.chunks_exact_mut(16)) {
        let (c, w): (&[f32; 32], &mut [i32; 16]) = match (c.try_into(), w.try_into()) {
            (Ok(c), Ok(w)) => (c, w),
            _ => unreachable!("32 values, 16 words"),
        };
        let mut q = [0i16; 32];
        for i in 0..32 {
            q[i] = code(c[i]);
        }
        *w = pulp::cast::<[i16; 32], [i32; 16]>(q);
    }
    if let Some(w) = rest.chunks_mut(16).next() {
        let mut q = [0i16; 32];
        for (q, &v) in q.iter_mut().zip(chunks.remainder()) {
            *q = code(v);
        }
        let q = pulp::cast::<[i16; 32], [i32; 16]>(q);
        let len = w.len();
        w.copy_from_slice(&q[..len]);
    }
    scale
}

/// A rounded row's pairs into a block's or a tile's layout (`width` rows or channels side by
/// side): pair `p` at `p width + k`. One pass over the row, as it is rounded.
#[inline(always)]
fn place(pairs: &[i32], width: usize, k: usize, words: &mut [i32]) {
    for (p, &w) in pairs.iter().enumerate() {
        words[p * width + k] = w;
    }
}

/// The magnitude's bits of `v`: integer maxima of these order finite values as their
/// magnitudes do (infinities and NaNs above them all), and vectorize where float maxima with
/// their NaN rules do not.
#[inline(always)]
fn top_bits(v: f32) -> u32 {
    v.to_bits() & 0x7fff_ffff
}

/// A row's `(1 / step, step)` from the bits of its largest magnitude: `(0, NaN)` for a row with
/// a non-finite value, `(0, 0)` for a row of zeros or of values so small that the inverse of
/// their step overflows; either way its codes are all 0.
#[inline(always)]
fn step(top: u32, limit: i32) -> (f32, f32) {
    if top >= f32::INFINITY.to_bits() {
        return (0.0, f32::NAN);
    }
    let amax = f32::from_bits(top);
    let l = limit as f32;
    let inv = l / amax;
    if amax == 0.0 || !inv.is_finite() {
        return (0.0, 0.0);
    }
    (inv, amax / l)
}

/// `v`'s code on a step of `1 / inv`, rounded half to even: integer steps only, no float-to-int
/// cast (whose NaN and range rules keep a loop scalar).
#[inline(always)]
fn code(v: f32, inv: f32, limit: i32) -> i16 {
    let q = (v * inv + ROUND).to_bits() as i32 - ROUND.to_bits() as i32;
    q.clamp(-limit, limit) as i16
}

/// Two codes as a word: `lo` in the low half, as the kernels read them.
#[inline(always)]
fn word(lo: i16, hi: i16) -> i32 {
    (i32::from(hi) << 16) | i32::from(lo as u16)
}

/// The largest magnitudes' bits ([`top_bits`]) of columns `c0..c0 + tops.len()` of `x`
/// (`[n, cols]`).
#[inline(always)]
fn column_tops(x: &[f32], cols: usize, c0: usize, tops: &mut [u32]) {
    tops.fill(0);
    let k = tops.len();
    for row in x.chunks_exact(cols) {
        for (t, v) in tops.iter_mut().zip(&row[c0..c0 + k]) {
            *t = (*t).max(top_bits(*v));
        }
    }
}

/// Columns `c0..c0 + k` of rows `2p` and `2p + 1` of `x` (`[n, cols]`); the second is
/// missing past the last row.
#[inline(always)]
fn row_pair(
    x: &[f32],
    n: usize,
    cols: usize,
    (c0, k): (usize, usize),
    p: usize,
) -> [Option<&[f32]>; 2] {
    [2 * p, 2 * p + 1].map(|r| (r < n).then(|| &x[r * cols + c0..][..k]))
}

/// Codes `2p` and `2p + 1` of some columns read as rows (`rows`: [`row_pair`]), each column on
/// its own `inv`, as words (a missing row as zeros). A column whose `inv` is 0 ([`step`]'s
/// odd rows) gets codes 0.
#[inline(always)]
fn column_pair(rows: [Option<&[f32]>; 2], inv: &[f32], limit: i32, out: &mut [i32]) {
    match rows {
        [Some(a), Some(b)] => {
            for (((o, &a), &b), &inv) in out.iter_mut().zip(a).zip(b).zip(inv) {
                let w = word(code(a, inv, limit), code(b, inv, limit));
                *o = if inv == 0.0 { 0 } else { w };
            }
        }
        [Some(a), None] => {
            for ((o, &a), &inv) in out.iter_mut().zip(a).zip(inv) {
                let w = word(code(a, inv, limit), 0);
                *o = if inv == 0.0 { 0 } else { w };
            }
        }
        _ => out.fill(0),
    }
}

/// Columns `c0..c0 + scale.len()` (at most [`SPAN`]) of `x` (`[n, cols]`; those past `cols`
/// as zeros) rounded as rows of `n` values: their scales into `scale`, column `k`'s pair `p`
/// at `words[p * scale.len() + k]` (a block's or a tile's layout).
#[inline(always)]
fn round_columns(
    x: &[f32],
    n: usize,
    cols: usize,
    c0: usize,
    limit: i32,
    scale: &mut [f32],
    words: &mut [i32],
) {
    let width = scale.len();
    let live = cols.saturating_sub(c0).min(width);
    scale.fill(0.0);
    if live == 0 {
        words.fill(0);
        return;
    }
    let mut tops = [0u32; SPAN];
    column_tops(x, cols, c0, &mut tops[..live]);
    let mut inv = [0.0f32; SPAN];
    for ((inv, scale), &top) in inv.iter_mut().zip(scale.iter_mut()).zip(&tops[..live]) {
        (*inv, *scale) = step(top, limit);
    }
    for (p, words) in words.chunks_exact_mut(width).enumerate() {
        column_pair(
            row_pair(x, n, cols, (c0, live), p),
            &inv[..live],
            limit,
            &mut words[..live],
        );
        words[live..].fill(0);
    }
}

/// A matrix's tiles (their words and scales) split over the threads, with their indices.
fn words_by_tile<'a>(
    words: &'a mut [i32],
    scale: &'a mut [f32],
    pairs: usize,
) -> impl IndexedParallelIterator<Item = (usize, (&'a mut [i32], &'a mut [f32]))> {
    words
        .par_chunks_mut((pairs * SPAN).max(1))
        .zip(scale.par_chunks_mut(SPAN))
        .enumerate()
}

impl ChannelMatrix {
    /// `weights` `[rows, cols]` (row-major) and `bias` `[rows]`, rounded: each row's codes
    /// `round(w limit / max |w|)` (half to even), its scale `max |w| / limit`.
    pub fn new(
        weights: &[f32],
        bias: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<ChannelMatrix, BlockError> {
        let mut m = ChannelMatrix::default();
        m.refill(weights, bias, rows, cols)?;
        Ok(m)
    }

    /// [`ChannelMatrix::new`] into this value's buffers (kept from matrix to matrix: the
    /// training path rounds every weight, and every layer's input, each step).
    pub fn refill(
        &mut self,
        weights: &[f32],
        bias: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<(), BlockError> {
        if weights.len() != rows * cols || bias.len() != rows {
            return Err(BlockError(format!(
                "{} weights and {} biases for a {rows}x{cols} layer",
                weights.len(),
                bias.len()
            )));
        }
        if bias.iter().any(|v| !v.is_finite()) {
            return Err(BlockError("a non-finite bias".into()));
        }
        let pairs = self.reshape(rows, cols);
        self.bias[..rows].copy_from_slice(bias);
        let (words, scale, limit) = (&mut self.words, &mut self.scale, self.limit);
        // Tiles split over the threads (the training path rounds every matrix each step), each
        // channel rounded as activation rows are, then its pairs set in the tile's layout.
        words_by_tile(words, scale, pairs).for_each(|(t, (words, scale))| {
            super::with_simd(
                #[inline(always)]
                || {
                    let mut codes = vec![0i32; pairs];
                    let channels = weights
                        .chunks_exact(cols.max(1))
                        .take(rows)
                        .skip(t * SPAN)
                        .take(SPAN);
                    for (k, (row, scale)) in channels.zip(scale.iter_mut()).enumerate() {
                        *scale = round_row(row, limit, &mut codes);
                        place(&codes, SPAN, k, words);
                    }
                },
            )
        });
        if self.scale.iter().any(|s| s.is_nan()) {
            return Err(BlockError("a non-finite weight".into()));
        }
        Ok(())
    }

    /// The matrix of `x^T` with no bias: the `cols` columns of `x` (`[n, cols]`) as its
    /// channels, without the transposed copy; the same codes and scales as
    /// [`ChannelMatrix::refill`] of the transpose, bit for bit.
    pub fn refill_transposed(
        &mut self,
        x: &[f32],
        n: usize,
        cols: usize,
    ) -> Result<(), BlockError> {
        if x.len() != n * cols {
            return Err(BlockError(format!(
                "{} values for {n} rows of {cols}",
                x.len()
            )));
        }
        let pairs = self.reshape(cols, n);
        let limit = self.limit;
        words_by_tile(&mut self.words, &mut self.scale, pairs).for_each(|(t, (words, scale))| {
            super::with_simd(
                #[inline(always)]
                || round_columns(x, n, cols, t * SPAN, limit, scale, words),
            )
        });
        if self.scale.iter().any(|s| s.is_nan()) {
            return Err(BlockError("a non-finite value".into()));
        }
        Ok(())
    }

    /// Zeroed buffers for `rows` channels of `cols` values; the pairs a channel holds.
    fn reshape(&mut self, rows: usize, cols: usize) -> usize {
        let (channels, pairs) = (rows.next_multiple_of(SPAN), cols.div_ceil(2));
        for v in [&mut self.scale, &mut self.bias] {
            v.clear();
            v.resize(channels, 0.0);
        }
        self.words.clear();
        self.words.resize(channels * pairs, 0);
        (self.rows, self.cols, self.limit) = (rows, cols, limit_for(cols));
        pairs
    }

    /// Output channels.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The code range activation rows are rounded to for this matrix ([`RowCodes::round`]).
    pub fn limit(&self) -> i32 {
        self.limit
    }

    /// [`ChannelMatrix::forward`] into a vector sized here (for tests).
    #[cfg(test)]
    fn forward_into(&self, x: &[f32], n: usize, codes: &mut RowCodes, out: &mut Vec<f32>) {
        out.resize(n * self.rows, 0.0);
        self.forward(x, n, codes, out);
    }

    /// `out <- x W^T + b` for the `n` rows of `x` (`out` `n * rows` values), rounding them into
    /// `codes`' buffers.
    pub fn forward(&self, x: &[f32], n: usize, codes: &mut RowCodes, out: &mut [f32]) {
        codes.round(x, n, self.cols, self.limit);
        self.product(codes, out);
    }

    /// `out <- x W^T + b` (`[n, rows]`, `out` that long) for rows rounded for this matrix's
    /// shape and range, row blocks split over the threads.
    pub fn product(&self, xs: &RowCodes, out: &mut [f32]) {
        let n = self.check(xs, out);
        if n == 0 || self.rows == 0 {
            return;
        }
        let rows = self.rows;
        // Enough tasks for every thread to take a few, in whole tiles.
        let per_task = n
            .div_ceil(4 * rayon::current_num_threads())
            .next_multiple_of(TILE_ROWS)
            .clamp(TILE_ROWS, TASK_ROWS);
        let simd = Simd::detect();
        let pairs = self.cols.div_ceil(2);
        out.par_chunks_mut(per_task * rows)
            .zip(xs.words.par_chunks(per_task * pairs))
            .zip(xs.scale.par_chunks(per_task))
            .for_each(|((out, x), sx)| {
                // The epilogue compiled for the CPU's widest vectors too.
                super::with_simd(
                    #[inline(always)]
                    || self.rows_into(simd, x, sx, out),
                )
            });
    }

    /// [`ChannelMatrix::product`] on the calling thread, for rows a task of its own holds.
    pub fn product_here(&self, xs: &RowCodes, out: &mut [f32]) {
        if self.check(xs, out) == 0 || self.rows == 0 {
            return;
        }
        let simd = Simd::detect();
        super::with_simd(
            #[inline(always)]
            || self.rows_into(simd, &xs.words, &xs.scale, out),
        )
    }

    /// The number of rows of `xs`, which must be rounded for this matrix, and `out` hold.
    fn check(&self, xs: &RowCodes, out: &[f32]) -> usize {
        assert!(
            xs.cols == self.cols && xs.limit == self.limit,
            "rows rounded for {} columns within {}, the matrix has {} within {}",
            xs.cols,
            xs.limit,
            self.cols,
            self.limit
        );
        let (n, rows) = (xs.n, self.rows);
        assert_eq!(out.len(), n * rows, "{n} rows of {rows} channels");
        n
    }

    /// The rows of `out` (`[k, rows]`) from their blocks' codes `x` and scales `sx`.
    #[inline(always)]
    fn rows_into(&self, simd: Simd, x: &[i32], sx: &[f32], out: &mut [f32]) {
        let pairs = self.cols.div_ceil(2);
        let tiles = self.rows.div_ceil(SPAN);
        let blocks = x
            .chunks_exact(pairs * TILE_ROWS)
            .zip(sx.chunks_exact(TILE_ROWS));
        for ((x, sx), out) in blocks.zip(out.chunks_mut(TILE_ROWS * self.rows)) {
            for t in 0..tiles {
                let w = &self.words[t * pairs * SPAN..(t + 1) * pairs * SPAN];
                let sums = simd.channel_sums(w, x);
                for ((sums, &sx), row) in sums.iter().zip(sx).zip(out.chunks_exact_mut(self.rows)) {
                    self.epilogue(t, sums, sx, row);
                }
            }
        }
    }

    /// Tile `t`'s dots of one activation row (scale `sx`) into `row`'s channels.
    #[inline(always)]
    fn epilogue(&self, t: usize, sums: &[i32; SPAN], sx: f32, row: &mut [f32]) {
        let at = t * SPAN;
        let live = (self.rows - at).min(SPAN);
        let (sw, b) = (&self.scale[at..at + SPAN], &self.bias[at..at + SPAN]);
        for (l, o) in row[at..at + live].iter_mut().enumerate() {
            *o = sums[l] as f32 * (sx * sw[l]) + b[l];
        }
    }

    /// Channel `c`'s dot with row `r` of `xs`, one product at a time (for tests).
    #[cfg(test)]
    fn dot_reference(&self, xs: &RowCodes, r: usize, c: usize) -> f32 {
        let pairs = self.cols.div_ceil(2);
        let (t, k) = (c / SPAN, c % SPAN);
        let (b, i) = (r / TILE_ROWS, r % TILE_ROWS);
        let mut sum = 0i64;
        for p in 0..pairs {
            let w = self.words[(t * pairs + p) * SPAN + k];
            let x = xs.words[(b * pairs + p) * TILE_ROWS + i];
            sum += i64::from(lo(w)) * i64::from(lo(x)) + i64::from(hi(w)) * i64::from(hi(x));
        }
        let sum = i32::try_from(sum).expect("the code range keeps sums within i32");
        sum as f32 * (xs.scale[r] * self.scale[c]) + self.bias[c]
    }
}

impl Simd {
    /// The exact sums of a block of activation rows (`x`, [`RowCodes`]' layout) with a tile
    /// of channels (`w`, [`ChannelMatrix`]'s): `[row][channel]`.
    #[inline(always)]
    fn channel_sums(self, w: &[i32], x: &[i32]) -> [[i32; SPAN]; TILE_ROWS] {
        match self {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512(v4) => {
                let task = ChannelTile { simd: v4, w, x };
                match V4Vnni::detect() {
                    Some(vnni) => vnni.vectorize(task),
                    None => v4.vectorize(task),
                }
            }
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2(v3) => v3.vectorize(ChannelTileAvx2 { simd: v3, w, x }),
            _ => super::with_simd(
                #[inline(always)]
                || portable_sums(w, x),
            ),
        }
    }
}

/// A pair's words of a tile and of a block of rows.
#[inline(always)]
fn pair_words<'a>(w: &'a [i32], x: &'a [i32]) -> (&'a [i32; SPAN], &'a [i32; TILE_ROWS]) {
    match (w.try_into(), x.try_into()) {
        (Ok(w), Ok(x)) => (w, x),
        _ => unreachable!("a tile's and a block's words"),
    }
}

/// [`Simd::channel_sums`] in portable code.
#[inline(always)]
fn portable_sums(w: &[i32], x: &[i32]) -> [[i32; SPAN]; TILE_ROWS] {
    let mut acc = [[0i32; SPAN]; TILE_ROWS];
    for (w, x) in w.chunks_exact(SPAN).zip(x.chunks_exact(TILE_ROWS)) {
        let (w, x) = pair_words(w, x);
        for (acc, &xw) in acc.iter_mut().zip(x) {
            let (xl, xh) = (lo(xw), hi(xw));
            for (a, &ww) in acc.iter_mut().zip(w) {
                *a = a.wrapping_add(lo(ww) * xl + hi(ww) * xh);
            }
        }
    }
    acc
}

/// [`Simd::channel_sums`] on AVX-512: per pair, [`TILE_GROUPS`] loads and [`TILE_ROWS`]
/// broadcasts, all at fixed offsets from two pointers, feed `TILE_ROWS * TILE_GROUPS` chains
/// of `madd` + `add`.
#[cfg(target_arch = "x86_64")]
struct ChannelTile<'a> {
    simd: pulp::x86::V4,
    w: &'a [i32],
    x: &'a [i32],
}

#[cfg(target_arch = "x86_64")]
impl pulp::NullaryFnOnce for ChannelTile<'_> {
    type Output = [[i32; SPAN]; TILE_ROWS];

    #[inline(always)]
    fn call(self) -> Self::Output {
        use core::arch::x86_64::__m512i;
        let ChannelTile { simd, w, x } = self;
        let (f, bw) = (&simd.avx512f, &simd.avx512bw);
        let mut acc = [[f._mm512_setzero_si512(); TILE_GROUPS]; TILE_ROWS];
        for (w, x) in w.chunks_exact(SPAN).zip(x.chunks_exact(TILE_ROWS)) {
            let (w, x) = pair_words(w, x);
            let w: [__m512i; TILE_GROUPS] = std::array::from_fn(|j| {
                let lanes: [i32; LANES] = match w[j * LANES..(j + 1) * LANES].try_into() {
                    Ok(a) => a,
                    Err(_) => unreachable!("LANES words"),
                };
                pulp::cast(lanes)
            });
            for (acc, &x) in acc.iter_mut().zip(x) {
                let x = f._mm512_set1_epi32(x);
                for (acc, &w) in acc.iter_mut().zip(&w) {
                    *acc = f._mm512_add_epi32(*acc, bw._mm512_madd_epi16(w, x));
                }
            }
        }
        acc.map(pulp::cast::<[__m512i; TILE_GROUPS], [i32; SPAN]>)
    }
}

/// [`Simd::channel_sums`] on AVX2 (sixteen registers): the tile in quarters of four rows by
/// sixteen channels, each a pass over the pairs with eight chains of `madd` + `add`.
#[cfg(target_arch = "x86_64")]
struct ChannelTileAvx2<'a> {
    simd: pulp::x86::V3,
    w: &'a [i32],
    x: &'a [i32],
}

#[cfg(target_arch = "x86_64")]
impl pulp::NullaryFnOnce for ChannelTileAvx2<'_> {
    type Output = [[i32; SPAN]; TILE_ROWS];

    #[inline(always)]
    fn call(self) -> Self::Output {
        use core::arch::x86_64::__m256i;
        const HALF: usize = TILE_ROWS / 2;
        let ChannelTileAvx2 { simd, w, x } = self;
        let (a, a2) = (&simd.avx, &simd.avx2);
        let mut out = [[0i32; SPAN]; TILE_ROWS];
        for h in 0..2 {
            for g in 0..TILE_GROUPS {
                let mut acc = [[a._mm256_setzero_si256(); 2]; HALF];
                for (w, x) in w.chunks_exact(SPAN).zip(x.chunks_exact(TILE_ROWS)) {
                    let (w, x) = pair_words(w, x);
                    let half = |k: usize| -> __m256i {
                        let at = g * LANES + k * 8;
                        let lanes: [i32; 8] = match w[at..at + 8].try_into() {
                            Ok(l) => l,
                            Err(_) => unreachable!("8 words"),
                        };
                        pulp::cast(lanes)
                    };
                    let wv = [half(0), half(1)];
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let xv = a._mm256_set1_epi32(x[h * HALF + i]);
                        for (acc, &wv) in acc.iter_mut().zip(&wv) {
                            *acc = a2._mm256_add_epi32(*acc, a2._mm256_madd_epi16(wv, xv));
                        }
                    }
                }
                for (i, acc) in acc.iter().enumerate() {
                    let lanes: [i32; LANES] = pulp::cast(*acc);
                    out[h * HALF + i][g * LANES..(g + 1) * LANES].copy_from_slice(&lanes);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect()
    }

    #[test]
    fn limits_keep_every_sum_in_i32() {
        for cols in [1, 2, 3, 31, 384, 1536, 4096, 100_000] {
            let l = i64::from(limit_for(cols));
            assert!(cols as i64 * l * l <= i64::from(i32::MAX), "{cols}");
            assert!(cols as i64 * (l + 1) * (l + 1) > i64::from(i32::MAX) || l == 32767);
        }
        assert_eq!(limit_for(384), 2364);
        assert_eq!(limit_for(1536), 1182);
    }

    /// Every shape's remainders (rows past whole tiles, channels past whole groups, an odd
    /// column) against the one-product-at-a-time dot, bit for bit, and against f32.
    #[test]
    fn products_equal_the_reference_dots() {
        for (n, rows, cols) in [
            (1, 5, 3),
            (9, 48, 64),
            (21, 40, 33),
            (70, 50, 384),
            (17, 16, 1),
        ] {
            let w = values(rows as u64, rows * cols, 0.2);
            let b = values(cols as u64, rows, 0.1);
            let x = values(n as u64 + 7, n * cols, 4.0);
            let m = ChannelMatrix::new(&w, &b, rows, cols).unwrap();
            let mut codes = RowCodes::default();
            let mut out = Vec::new();
            m.forward_into(&x, n, &mut codes, &mut out);
            assert_eq!(out.len(), n * rows);
            for r in 0..n {
                for c in 0..rows {
                    let got = out[r * rows + c];
                    let want = m.dot_reference(&codes, r, c);
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{n}x{rows}x{cols} ({r}, {c})"
                    );
                    let f32_dot: f32 = (0..cols)
                        .map(|i| w[c * cols + i] * x[r * cols + i])
                        .sum::<f32>()
                        + b[c];
                    let bound = 2e-3 * (cols as f32).sqrt() + 1e-4;
                    assert!((got - f32_dot).abs() < bound, "{got} against {f32_dot}");
                }
            }
            // The portable sums agree with whatever kernel ran above.
            let pairs = cols.div_ceil(2);
            let (w, x) = (&m.words[..pairs * SPAN], &codes.words[..pairs * TILE_ROWS]);
            assert_eq!(portable_sums(w, x), Simd::detect().channel_sums(w, x));
        }
    }

    /// Rounding the columns in place gives the codes and scales of rounding a transposed
    /// copy, bit for bit: odd token counts, columns past whole blocks and tiles, and columns
    /// of zeros, of tiny values and with a NaN.
    #[test]
    fn transposed_rounding_equals_rounding_the_transpose() {
        for (n, cols) in [(1, 1), (7, 5), (33, 48), (70, 100), (129, 384)] {
            let mut x = values(n as u64 * 31 + cols as u64, n * cols, 3.0);
            if cols > 3 {
                for r in 0..n {
                    x[r * cols + 1] = 0.0;
                    x[r * cols + 2] = 1e-40;
                }
                x[(n / 2) * cols + 3] = f32::NAN;
            }
            let mut t = vec![0.0f32; n * cols];
            for r in 0..n {
                for c in 0..cols {
                    t[c * n + r] = x[r * cols + c];
                }
            }
            let limit = limit_for(n);
            let (mut a, mut b) = (RowCodes::default(), RowCodes::default());
            a.round(&t, cols, n, limit);
            b.round_transposed(&x, n, cols, limit);
            assert_eq!((a.n, a.cols, a.limit), (b.n, b.cols, b.limit));
            assert_eq!(a.words, b.words, "{n}x{cols}");
            let bits = |v: &[f32]| v.iter().map(|s| s.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a.scale), bits(&b.scale), "{n}x{cols}");

            let zeros = vec![0.0; cols];
            let mut m = ChannelMatrix::default();
            let refilled = m.refill_transposed(&x, n, cols);
            if cols > 3 {
                assert!(refilled.is_err(), "a NaN column is an error");
                for v in x.iter_mut().filter(|v| v.is_nan()) {
                    *v = 0.5;
                }
                for r in 0..n {
                    t[3 * n + r] = x[r * cols + 3];
                }
                m.refill_transposed(&x, n, cols).unwrap();
            }
            let want = ChannelMatrix::new(&t, &zeros, cols, n).unwrap();
            assert_eq!(
                (m.rows, m.cols, m.limit),
                (want.rows, want.cols, want.limit)
            );
            assert_eq!(m.words, want.words, "{n}x{cols}");
            assert_eq!(bits(&m.scale), bits(&want.scale), "{n}x{cols}");
            assert_eq!(m.bias, want.bias);
        }
        let mut m = ChannelMatrix::default();
        assert!(m.refill_transposed(&[1.0; 5], 2, 3).is_err());
    }

    #[test]
    fn extreme_codes_do_not_overflow() {
        let (rows, cols) = (16, 1536);
        let w = vec![-1.0f32; rows * cols];
        let b = vec![0.0; rows];
        let x = vec![3.0f32; cols];
        let m = ChannelMatrix::new(&w, &b, rows, cols).unwrap();
        let mut codes = RowCodes::default();
        let mut out = Vec::new();
        m.forward_into(&x, 1, &mut codes, &mut out);
        for &o in &out {
            assert!((o + 3.0 * cols as f32).abs() < 1e-2, "{o}");
        }
    }

    #[test]
    fn odd_rows_give_nan_or_bias() {
        let (rows, cols) = (20, 8);
        let w = values(1, rows * cols, 1.0);
        let b = values(2, rows, 1.0);
        let m = ChannelMatrix::new(&w, &b, rows, cols).unwrap();
        let mut x = vec![0.0f32; 3 * cols];
        x[cols + 2] = f32::NAN;
        x[2 * cols..].fill(1e-40);
        let mut codes = RowCodes::default();
        let mut out = Vec::new();
        m.forward_into(&x, 3, &mut codes, &mut out);
        assert_eq!(&out[..rows], &b[..]);
        assert!(out[rows..2 * rows].iter().all(|v| v.is_nan()));
        assert_eq!(&out[2 * rows..], &b[..]);
        let mut bad = w.clone();
        bad[5] = f32::INFINITY;
        assert!(ChannelMatrix::new(&bad, &b, rows, cols).is_err());
        assert!(ChannelMatrix::new(&w, &b[1..], rows, cols).is_err());
    }

    /// Times a MiniLM-sized product (`cargo test --release --workspace --lib -- --ignored
    /// --nocapture channel_probe`): a probe for the kernels' rate, not a gate.
    #[test]
    #[ignore]
    fn channel_probe() {
        for (rows, cols) in [(384, 384), (1536, 384), (384, 1536)] {
            let n = 870;
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
                .collect();
            let x: Vec<f32> = (0..n * cols)
                .map(|i| ((i * 104729) % 997) as f32 / 997.0 - 0.5)
                .collect();
            let m = ChannelMatrix::new(&w, &vec![0.0; rows], rows, cols).unwrap();
            let mut codes = RowCodes::default();
            let mut out = Vec::new();
            m.forward_into(&x, n, &mut codes, &mut out);
            let reps = 50;
            let start = std::time::Instant::now();
            for _ in 0..reps {
                codes.round(&x, n, cols, m.limit());
            }
            let round = start.elapsed().as_secs_f64() / reps as f64;
            let start = std::time::Instant::now();
            for _ in 0..reps {
                m.product(&codes, &mut out);
            }
            let secs = start.elapsed().as_secs_f64() / reps as f64;
            let gmac = (n * rows * cols) as f64 / secs / 1e9;
            println!(
                "{rows}x{cols}, {n} rows: round {:.0} us, product {:.0} us, {gmac:.1} GMAC/s",
                round * 1e6,
                secs * 1e6
            );
        }
    }
}
