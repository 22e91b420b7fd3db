//! AVX2 + FMA kernels: the integer dots (one or two activation rows) read one block (32 codes)
//! per register; the panels (more rows) put eight activation rows in a register, one a lane
//! (on AVX-512 machines too, up to eight rows), their tiles rounded from the f32 rows
//! ([`TileBlock`]); the f32 tile serves f32 weights, with several
//! accumulators a row so that FMAs do not wait on each other (one accumulator left a single
//! row's product bound by FMA latency, at a tenth of the machine's rate).

use core::arch::x86_64::{__m128i, __m256, __m256i};
use pulp::x86::V3;

use super::act::{self, TileBlock, Tiles};
use super::act::{LO_STEPS, QAct};
use super::panel::{ADD, NONE, Offset, TaskRows};
use super::{PANEL_TILE, PREFETCH_AHEAD, Q4Row, Q5Row, Q8Row, QK, QRow, TILE};

#[inline(always)]
fn load8(x: &[f32]) -> __m256 {
    let a: [f32; 8] = match x.try_into() {
        Ok(a) => a,
        Err(_) => unreachable!("8 values"),
    };
    pulp::cast(a)
}

/// Sum of the lanes of several accumulators (in a fixed order).
#[inline(always)]
fn hsum(simd: V3, v: &[__m256]) -> f32 {
    let total = v.iter().fold(simd.avx._mm256_setzero_ps(), |a, &b| {
        simd.avx._mm256_add_ps(a, b)
    });
    let lanes: [f32; 8] = pulp::cast(total);
    lanes.iter().sum()
}

/// [`hsum`] of each of eight single vectors, bit for bit (each one's lanes summed in lane
/// order), by an 8 x 8 transposition: eight sums in the vector lanes instead of 56 scalar
/// additions. Stage `k` swaps bit `k` of the row index with bit `k` of the lane index.
#[inline(always)]
pub(super) fn hsums8(simd: V3, mut v: [__m256; 8]) -> [f32; 8] {
    let a = &simd.avx;
    // Lane `c` of the result holds lane `c ^ 2^k` of the input.
    let swap = |k: usize, x: __m256| match k {
        0 => a._mm256_permute_ps::<0b10_11_00_01>(x),
        1 => a._mm256_permute_ps::<0b01_00_11_10>(x),
        _ => a._mm256_permute2f128_ps::<0x01>(x, x),
    };
    // Lanes whose bit `k` is set come from the other row.
    let blend = |k: usize, x: __m256, y: __m256| match k {
        0 => a._mm256_blend_ps::<0b1010_1010>(x, y),
        1 => a._mm256_blend_ps::<0b1100_1100>(x, y),
        _ => a._mm256_blend_ps::<0b1111_0000>(x, y),
    };
    for k in 0..3 {
        let bit = 1 << k;
        for r in 0..8 {
            if r & bit == 0 {
                let (lo, hi) = (v[r], v[r | bit]);
                v[r] = blend(k, lo, swap(k, hi));
                v[r | bit] = blend(k, swap(k, lo), hi);
            }
        }
    }
    let init: f32 = std::iter::empty::<f32>().sum();
    let t = v
        .iter()
        .fold(a._mm256_set1_ps(init), |t, &row| a._mm256_add_ps(t, row));
    pulp::cast(t)
}

/// 16 bytes of Q4 codes as 32 codes in element order (low nibbles, then high nibbles).
#[inline(always)]
pub(super) fn nibbles(simd: V3, raw: [u8; 16]) -> __m256i {
    let r: __m128i = pulp::cast(raw);
    let y = simd.avx2._mm256_broadcastsi128_si256(r);
    let y = simd
        .avx2
        ._mm256_srlv_epi64(y, simd.avx._mm256_setr_epi64x(0, 0, 4, 4));
    simd.avx2
        ._mm256_and_si256(y, simd.avx._mm256_set1_epi8(0x0f))
}

/// A Q5 block's 32 codes `0..32` in element order: the nibbles, plus 16 where the fifth bit
/// (bit `j` of `qh` for element `j`) is set.
#[inline(always)]
fn q5_codes(simd: V3, raw: [u8; 16], qh: u32) -> __m256i {
    let (a, x) = (&simd.avx2, &simd.avx);
    // Byte k takes byte k / 8 of qh; OR-ing in every bit but k % 8 leaves all ones iff bit k
    // was set.
    let spread = a._mm256_shuffle_epi8(
        x._mm256_set1_epi32(qh as i32),
        x._mm256_setr_epi64x(
            0,
            0x0101_0101_0101_0101,
            0x0202_0202_0202_0202,
            0x0303_0303_0303_0303,
        ),
    );
    let others = x._mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe_u64 as i64);
    let set = a._mm256_cmpeq_epi8(a._mm256_or_si256(spread, others), x._mm256_set1_epi64x(-1));
    a._mm256_or_si256(
        nibbles(simd, raw),
        a._mm256_and_si256(set, x._mm256_set1_epi8(16)),
    )
}

/// `128 (w . h) + (w . l)` per group of four bytes, as f32 (`w` unsigned; no saturation).
#[inline(always)]
fn block_sums(simd: V3, w: __m256i, h: __m256i, l: __m256i) -> __m256 {
    let a = &simd.avx2;
    let ih = a._mm256_madd_epi16(
        a._mm256_maddubs_epi16(w, h),
        simd.avx._mm256_set1_epi16(LO_STEPS as i16),
    );
    let il = a._mm256_madd_epi16(a._mm256_maddubs_epi16(w, l), simd.avx._mm256_set1_epi16(1));
    simd.avx._mm256_cvtepi32_ps(a._mm256_add_epi32(ih, il))
}

/// The weight side of the integer dots.
pub(super) trait IntRow<'a>: Copy {
    /// The row's block scales.
    fn d(self) -> &'a [f32];
    /// Block `b`'s offset (Q4's `m`), 0 for types without.
    fn offset(self, b: usize) -> f32;
    /// Codes of block `b` (unsigned) and the signs to give the activations, if signed.
    fn codes(self, simd: V3, b: usize) -> (__m256i, Option<__m256i>);
    /// [`prefetch`] ahead of block `b`'s codes.
    fn prefetch(self, simd: V3, b: usize);
}

/// Asks the memory for the byte `byte + PREFETCH_AHEAD` of a row's codes (past the row's end
/// too: the rows that follow are next in memory). One sequence's decoding reads each weight
/// once a token, and the hardware's own prefetching left the dots waiting on their loads.
#[inline(always)]
pub(super) fn prefetch<T>(simd: V3, codes: &[T], byte: usize) {
    let at = (codes.as_ptr() as *const i8).wrapping_add(byte + PREFETCH_AHEAD);
    simd.sse
        ._mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(at);
}

impl<'a> IntRow<'a> for Q4Row<'a> {
    #[inline(always)]
    fn d(self) -> &'a [f32] {
        self.d
    }
    #[inline(always)]
    fn offset(self, b: usize) -> f32 {
        self.m[b]
    }
    #[inline(always)]
    fn codes(self, simd: V3, b: usize) -> (__m256i, Option<__m256i>) {
        (nibbles(simd, self.qs.as_chunks::<{ QK / 2 }>().0[b]), None)
    }
    #[inline(always)]
    fn prefetch(self, simd: V3, b: usize) {
        prefetch(simd, self.qs, b * QK / 2);
    }
}

impl<'a> IntRow<'a> for Q5Row<'a> {
    #[inline(always)]
    fn d(self) -> &'a [f32] {
        self.d
    }
    #[inline(always)]
    fn offset(self, _: usize) -> f32 {
        0.0
    }
    /// As the 8-bit form's codes `q - 16`, so that the dots give its numbers bit for bit.
    #[inline(always)]
    fn codes(self, simd: V3, b: usize) -> (__m256i, Option<__m256i>) {
        let q = q5_codes(simd, self.qs.as_chunks::<{ QK / 2 }>().0[b], self.qh[b]);
        let w = simd.avx2._mm256_sub_epi8(q, simd.avx._mm256_set1_epi8(16));
        (simd.avx2._mm256_abs_epi8(w), Some(w))
    }
    #[inline(always)]
    fn prefetch(self, simd: V3, b: usize) {
        prefetch(simd, self.qs, b * QK / 2);
    }
}

impl<'a> IntRow<'a> for Q8Row<'a> {
    #[inline(always)]
    fn d(self) -> &'a [f32] {
        self.d
    }
    #[inline(always)]
    fn offset(self, _: usize) -> f32 {
        0.0
    }
    #[inline(always)]
    fn codes(self, simd: V3, b: usize) -> (__m256i, Option<__m256i>) {
        let w: __m256i = pulp::cast(self.qs.as_chunks::<QK>().0[b]);
        (simd.avx2._mm256_abs_epi8(w), Some(w))
    }
    #[inline(always)]
    fn prefetch(self, simd: V3, b: usize) {
        prefetch(simd, self.qs, b * QK);
    }
}

/// Dots of one weight row with `T` rounded activation rows (`T` a constant, so that the
/// accumulators stay in registers).
#[inline(always)]
fn int_dots<'a, const T: usize>(simd: V3, w: impl IntRow<'a>, xs: [&QAct; T]) -> [f32; T] {
    let (acc, offset) = int_sums(simd, w, xs);
    std::array::from_fn(|t| hsum(simd, &acc[t..=t]) + offset[t])
}

/// [`int_dots`] before the lanes are summed: each dot's accumulator and its offset term.
#[inline(always)]
fn int_sums<'a, const T: usize>(
    simd: V3,
    w: impl IntRow<'a>,
    xs: [&QAct; T],
) -> ([__m256; T], [f32; T]) {
    let mut acc = [simd.avx._mm256_setzero_ps(); T];
    let mut offset = [0.0f32; T];
    // Every activation array sliced to the row's blocks up front, so that the loop indexes
    // them without checks of its own.
    let blocks = w.d().len();
    let hi = xs.map(|x| &x.hi.as_chunks::<QK>().0[..blocks]);
    let lo = xs.map(|x| &x.lo.as_chunks::<QK>().0[..blocks]);
    let scale = xs.map(|x| &x.scale[..blocks]);
    let sum = xs.map(|x| &x.sum[..blocks]);
    for (b, &dw) in w.d().iter().enumerate() {
        w.prefetch(simd, b);
        let (codes, sign) = w.codes(simd, b);
        let m = w.offset(b);
        for t in 0..T {
            let (mut h, mut l): (__m256i, __m256i) = (pulp::cast(hi[t][b]), pulp::cast(lo[t][b]));
            if let Some(sign) = sign {
                h = simd.avx2._mm256_sign_epi8(h, sign);
                l = simd.avx2._mm256_sign_epi8(l, sign);
            }
            let s = simd.avx._mm256_set1_ps(dw * scale[t][b]);
            acc[t] = simd
                .fma
                ._mm256_fmadd_ps(block_sums(simd, codes, h, l), s, acc[t]);
            offset[t] += m * sum[t][b];
        }
    }
    (acc, offset)
}

impl super::RowDots for V3 {
    #[inline(always)]
    fn row_dots(self, w: QRow<'_>, xs: &[&QAct], out: &mut [f32]) {
        match w {
            QRow::Q4(r) => row_dots(self, r, xs, out),
            QRow::Q5(r) => row_dots(self, r, xs, out),
            QRow::Q8(r) => row_dots(self, r, xs, out),
        }
    }

    /// Eight dots' lanes summed at once ([`hsums8`]), then their offsets added.
    #[inline(always)]
    fn eight_dots<const N: usize>(
        self,
        w: &super::QMatrix,
        row0: usize,
        xs: [&QAct; N],
        out: &mut [f32; 8],
    ) {
        let zero = self.avx._mm256_setzero_ps();
        let mut v = [zero; 8];
        let mut offsets = [0.0f32; 8];
        for i in 0..8 / N {
            let (acc, off) = match w.q_row(row0 + i) {
                QRow::Q4(r) => int_sums(self, r, xs),
                QRow::Q5(r) => int_sums(self, r, xs),
                QRow::Q8(r) => int_sums(self, r, xs),
            };
            for t in 0..N {
                v[i * N + t] = self.avx._mm256_add_ps(zero, acc[t]);
                offsets[i * N + t] = off[t];
            }
        }
        let sums = hsums8(self, v);
        for ((o, s), off) in out.iter_mut().zip(sums).zip(offsets) {
            *o = s + off;
        }
    }
}

/// One weight row against every activation row: two at once, else one by one.
#[inline(always)]
fn row_dots<'a>(simd: V3, w: impl IntRow<'a>, xs: &[&QAct], out: &mut [f32]) {
    if let [a, b] = *xs {
        out.copy_from_slice(&int_dots(simd, w, [a, b]));
        return;
    }
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = int_dots(simd, w, [x])[0];
    }
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
        // `hsum` of each accumulator, eight at a time.
        let zero = simd.avx._mm256_setzero_ps();
        let sums = hsums8(
            simd,
            std::array::from_fn(|j| simd.avx._mm256_add_ps(zero, acc[j / 2][j % 2])),
        );
        let mut out = [[0.0; 2]; TILE];
        for t in 0..TILE {
            for c in 0..2 {
                let tail: f32 = w[c][full..]
                    .iter()
                    .zip(&x[t][full..])
                    .map(|(a, b)| a * b)
                    .sum();
                out[t][c] = sums[2 * t + c] + tail;
            }
        }
        out
    }
}

/// Activation rows a register holds (one a lane).
const LANES: usize = 8;
/// Weight rows whose dots run side by side (independent chains; each activation load serves
/// them all).
const GROUP: usize = 4;

/// Rows `first..` of a quantized matrix (as many as each of `out`'s `n` rows holds) against the
/// tiled activation rows, eight activation rows a register: each dot bit for bit
/// [`super::act`]'s scalar one (see [`super::panel`]). Run through an AVX-512 + VNNI token, the
/// same code serves AVX-512 machines for up to eight rows, with `vpdpwssd` on 256 bits.
pub(super) struct PanelTask<'a, 'o, D> {
    pub simd: V3,
    /// A row's block `b` as `Panel::pairs` defines it (with the widest vectors the CPU has).
    pub decode: D,
    pub w: &'a super::QMatrix,
    pub first: usize,
    pub xs: &'a Tiles,
    /// Activation rows.
    pub n: usize,
    /// One slice of the product per activation row.
    pub out: &'a mut [&'o mut [f32]],
}

impl<D: Fn(QRow<'_>, usize) -> [i32; 16]> pulp::NullaryFnOnce for PanelTask<'_, '_, D> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        let PanelTask {
            simd,
            decode,
            w,
            first,
            xs,
            n,
            out,
        } = self;
        let rows = out.first().map_or(0, |o| o.len());
        if rows == 0 || n == 0 {
            return;
        }
        let task = TaskRows::new(w, first, rows, GROUP, decode);
        // The offset's kind as a constant: a run-time match in the epilogue cost batches
        // and prompts about a fifth.
        match task.kind {
            Offset::Add => panel_product::<ADD>(simd, &task, xs, n, out),
            Offset::None => panel_product::<NONE>(simd, &task, xs, n, out),
        }
        task.recycle();
    }
}

/// [`PanelTask`] on its rows laid out ([`TaskRows`]).
#[inline(always)]
fn panel_product<const KIND: u8>(
    simd: V3,
    task: &TaskRows,
    xs: &Tiles,
    n: usize,
    out: &mut [&mut [f32]],
) {
    for c in 0..n.div_ceil(PANEL_TILE) {
        let real = (n - c * PANEL_TILE).min(PANEL_TILE);
        let out = &mut out[c * PANEL_TILE..c * PANEL_TILE + real];
        // A full half's rows share each broadcast code pair with the other half's.
        if real > LANES {
            tile_product::<KIND, 2>(simd, task, xs.tile(c), out);
        } else {
            tile_product::<KIND, 1>(simd, task, xs.tile(c), out);
        }
    }
}

/// One tile's activation rows (`out`'s, in `H` halves of [`LANES`]) against every laid-out row,
/// each broadcast code pair serving every half: on AMD's cores a broadcast from memory costs
/// about what a vector instruction does.
#[inline(always)]
fn tile_product<const KIND: u8, const H: usize>(
    simd: V3,
    task: &TaskRows,
    tile: act::Tile<'_>,
    out: &mut [&mut [f32]],
) {
    let (avx, avx2) = (&simd.avx, &simd.avx2);
    let (rows, nb) = (task.rows, task.nb);
    if H * LANES > PANEL_TILE {
        unreachable!("a tile is two halves");
    }
    // The tile's blocks, each sixteen words `k` of a tile's width of activation rows.
    let pairs = &tile.pairs.as_chunks::<PANEL_TILE>().0.as_chunks::<16>().0[..nb];
    let scales = &tile.scale.as_chunks::<PANEL_TILE>().0[..nb];
    let act_sums = &tile.sum.as_chunks::<PANEL_TILE>().0[..nb];
    for g in 0..rows.div_ceil(GROUP) {
        // A last group's padding rows: computed, not written.
        let live = (rows - g * GROUP).min(GROUP);
        // Each row's block scales and offset factors, sliced up front so that the epilogue
        // indexes them without checks.
        let at = |i: usize| (g * GROUP + i) * nb;
        let ws: [&[f32]; GROUP] = std::array::from_fn(|i| &task.scale[at(i)..][..nb]);
        let ms: [&[f32]; GROUP] = std::array::from_fn(|i| &task.offset[at(i)..][..nb]);
        let mut acc = [[avx._mm256_setzero_ps(); GROUP]; H];
        for (b, block) in pairs.iter().enumerate() {
            let mut sums = [[avx._mm256_setzero_si256(); GROUP]; H];
            let wc: [&[i32; 16]; GROUP] =
                std::array::from_fn(|i| &task.pairs[(g * GROUP + i) * nb + b]);
            // `k` picks a word of every row's codes and a row of the block; two at a time,
            // so that the loop's own count costs half as often.
            for (k2, two) in block.as_chunks::<2>().0.iter().enumerate() {
                for (j, words) in two.iter().enumerate() {
                    let k = 2 * k2 + j;
                    let mut x = [avx._mm256_setzero_si256(); H];
                    for (h, x) in x.iter_mut().enumerate() {
                        *x = pulp::cast(load_i32(&words[h * LANES..(h + 1) * LANES]));
                    }
                    for i in 0..GROUP {
                        let pair = avx._mm256_set1_epi32(wc[i][k]);
                        for h in 0..H {
                            sums[h][i] = avx2
                                ._mm256_add_epi32(sums[h][i], avx2._mm256_madd_epi16(x[h], pair));
                        }
                    }
                }
            }
            for h in 0..H {
                let lanes = h * LANES..(h + 1) * LANES;
                let scale = load8(&scales[b][lanes.clone()]);
                let sum = load8(&act_sums[b][lanes]);
                for i in 0..GROUP {
                    let ds = avx._mm256_mul_ps(avx._mm256_set1_ps(ws[i][b]), scale);
                    let scaled = avx._mm256_mul_ps(avx._mm256_cvtepi32_ps(sums[h][i]), ds);
                    let m = avx._mm256_set1_ps(ms[i][b]);
                    let term = match Offset::of(KIND) {
                        Offset::Add => avx._mm256_add_ps(scaled, avx._mm256_mul_ps(m, sum)),
                        Offset::None => scaled,
                    };
                    acc[h][i] = avx._mm256_add_ps(acc[h][i], term);
                }
            }
        }
        for (h, acc) in acc.iter().enumerate() {
            for (i, acc) in acc.iter().enumerate().take(live) {
                let v: [f32; LANES] = pulp::cast(*acc);
                let r = g * GROUP + i;
                for (o, &v) in out.iter_mut().skip(h * LANES).zip(&v) {
                    o[r] = v;
                }
            }
        }
    }
}

#[inline(always)]
fn load_i32(x: &[i32]) -> [i32; LANES] {
    match x.try_into() {
        Ok(a) => a,
        Err(_) => unreachable!("8 values"),
    }
}

/// `Panel::pairs` (the tests' definition) of a row's block `b` with AVX2: the block's 32
/// codes as signed bytes in element order (Q4's low nibbles, then its high ones; Q5's codes
/// less 16; Q8's bytes as they are), each half widened to sixteen i16 (`vpmovsxbw`), word `k`
/// the pair of codes `2k` and `2k + 1`.
#[inline(always)]
pub(super) fn code_pairs(simd: V3, w: QRow<'_>, b: usize) -> [i32; 16] {
    let (sse2, avx, avx2) = (&simd.sse2, &simd.avx, &simd.avx2);
    // Codes asked for ahead, as in the dots: from memory the layout's loads waited.
    match w {
        QRow::Q4(r) => prefetch(simd, r.qs, b * QK / 2),
        QRow::Q5(r) => prefetch(simd, r.qs, b * QK / 2),
        QRow::Q8(r) => prefetch(simd, r.qs, b * QK),
    }
    let halves: [__m128i; 2] = match w {
        QRow::Q4(r) => {
            let raw: __m128i = pulp::cast(r.qs.as_chunks::<{ QK / 2 }>().0[b]);
            let low = sse2._mm_set1_epi8(0x0f);
            [
                sse2._mm_and_si128(raw, low),
                sse2._mm_and_si128(sse2._mm_srli_epi16::<4>(raw), low),
            ]
        }
        QRow::Q5(r) => {
            let codes = avx2._mm256_sub_epi8(
                q5_codes(simd, r.qs.as_chunks::<{ QK / 2 }>().0[b], r.qh[b]),
                avx._mm256_set1_epi8(16),
            );
            [
                avx._mm256_castsi256_si128(codes),
                avx2._mm256_extracti128_si256::<1>(codes),
            ]
        }
        QRow::Q8(r) => pulp::cast(r.qs.as_chunks::<QK>().0[b]),
    };
    pulp::cast([
        avx2._mm256_cvtepi8_epi16(halves[0]),
        avx2._mm256_cvtepi8_epi16(halves[1]),
    ])
}

/// [`act::TileBlock`] with AVX2, eight lanes at a time.
impl pulp::NullaryFnOnce for TileBlock<'_, V3> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        let TileBlock {
            simd,
            x,
            cols,
            n,
            c,
            b,
            mut part,
        } = self;
        let (avx, avx2) = (&simd.avx, &simd.avx2);
        let magic = avx._mm256_set1_ps(act::ROUND_MAGIC);
        let round = |v: __m256| avx._mm256_sub_ps(avx._mm256_add_ps(v, magic), magic);
        let rows = n.saturating_sub(c * PANEL_TILE).min(PANEL_TILE);
        for t in 0..rows {
            let row = c * PANEL_TILE + t;
            let xb: &[f32; QK] = match x[row * cols + b * QK..][..QK].try_into() {
                Ok(a) => a,
                Err(_) => unreachable!("a block"),
            };
            let sum: f32 = xb.iter().sum();
            let (first, second) = xb.split_at(QK / 2);
            let v = [
                load8(&first[..8]),
                load8(&first[8..]),
                load8(&second[..8]),
                load8(&second[8..]),
            ];
            // Non-finite values, or steps so small that their inverse overflows, go through
            // `QAct::new` itself (`by_qact`).
            let words: [i32; QK / 2] = if sum.is_finite() {
                part.sum[t] = sum;
                let abs = |v: __m256| avx._mm256_andnot_ps(avx._mm256_set1_ps(-0.0), v);
                let m: [f32; 8] = pulp::cast(avx._mm256_max_ps(
                    avx._mm256_max_ps(abs(v[0]), abs(v[1])),
                    avx._mm256_max_ps(abs(v[2]), abs(v[3])),
                ));
                let amax = m.iter().fold(0.0f32, |a, &v| a.max(v));
                if amax == 0.0 {
                    continue;
                }
                let d = amax / 127.0;
                if (LO_STEPS as f32 / d).is_finite() {
                    let (inv, lo_inv) = (1.0 / d, LO_STEPS as f32 / d);
                    // (Loops, not closures: a closure may stay out of line, without AVX2.)
                    let mut q = [avx._mm256_setzero_si256(); 4];
                    for (q, &v) in q.iter_mut().zip(&v) {
                        let h = round(avx._mm256_mul_ps(v, avx._mm256_set1_ps(inv)));
                        let l = round(avx._mm256_mul_ps(
                            avx._mm256_sub_ps(v, avx._mm256_mul_ps(h, avx._mm256_set1_ps(d))),
                            avx._mm256_set1_ps(lo_inv),
                        ));
                        *q = avx2._mm256_add_epi32(
                            avx2._mm256_slli_epi32::<7>(avx._mm256_cvtps_epi32(h)),
                            avx._mm256_cvtps_epi32(l),
                        );
                    }
                    // The 32 values as i16 in element order (word k: elements 2k and
                    // 2k + 1): in range, the saturating pack keeps them as they are; it
                    // interleaves its inputs' 128-bit halves, and the permute puts them back.
                    let mut w = [avx._mm256_setzero_si256(); 2];
                    for (i, w) in w.iter_mut().enumerate() {
                        *w = avx2._mm256_permute4x64_epi64::<0b11_01_10_00>(
                            avx2._mm256_packs_epi32(q[2 * i], q[2 * i + 1]),
                        );
                    }
                    part.scale[t] = d / LO_STEPS as f32;
                    pulp::cast(w)
                } else {
                    part.by_qact(t, xb)
                }
            } else {
                part.by_qact(t, xb)
            };
            for (k, &w) in words.iter().enumerate() {
                part.pairs[k * PANEL_TILE + t] = w;
            }
        }
    }
}
