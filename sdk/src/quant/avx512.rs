//! AVX-512 (F + BW) kernels: the integer dots (one or two activation rows) read two blocks
//! (64 codes) per register; the panels (more rows) put sixteen activation rows in a register,
//! one a lane, and round them there from f32 ([`TileBlock`]); the f32 tile serves f32 weights.

use core::arch::x86_64::{__m256i, __m512, __m512i};
use pulp::x86::V4;

use super::act::{LO_STEPS, QAct};
use super::act::{Tile, TileBlock, Tiles};
use super::panel::{ADD, NONE, Offset, Panel, TaskRows};
use super::{PANEL_TILE, Q4Row, Q5Row, Q8Row, QK, QRow, TILE};

#[inline(always)]
fn load(x: &[f32]) -> __m512 {
    let a: [f32; 16] = match x.try_into() {
        Ok(a) => a,
        Err(_) => unreachable!("16 values"),
    };
    pulp::cast(a)
}

#[inline(always)]
fn load64(x: &[i8]) -> __m512i {
    let a: [i8; 64] = match x.try_into() {
        Ok(a) => a,
        Err(_) => unreachable!("64 bytes"),
    };
    pulp::cast(a)
}

/// Sum of the lanes (in a fixed order, so runs repeat bit for bit).
#[inline(always)]
pub(super) fn hsum(v: __m512) -> f32 {
    let lanes: [f32; 16] = pulp::cast(v);
    lanes.iter().sum()
}

/// `[a; 8] ++ [b; 8]` from two values: broadcast the pair (one 64-bit load where they lie
/// side by side in memory), then spread it.
#[inline(always)]
fn pair_lanes(simd: V4, both: [f32; 2]) -> __m512 {
    let f = &simd.avx512f;
    let v = f._mm512_castpd_ps(f._mm512_set1_pd(pulp::cast(both)));
    f._mm512_permutexvar_ps(
        f._mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
        v,
    )
}

/// 32 bytes of Q4 codes (two blocks) as 64 codes in element order: 128-bit lanes hold block
/// `b`'s low nibbles (elements 0-15), its high nibbles (16-31), then the same for `b + 1`.
#[inline(always)]
fn nibbles(simd: V4, raw: [u8; 32]) -> __m512i {
    let f = &simd.avx512f;
    let r: __m256i = pulp::cast(raw);
    let z = f._mm512_permutexvar_epi64(
        f._mm512_set_epi64(3, 2, 3, 2, 1, 0, 1, 0),
        f._mm512_castsi256_si512(r),
    );
    let z = f._mm512_srlv_epi64(z, f._mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0));
    f._mm512_and_si512(z, f._mm512_set1_epi8(0x0f))
}

/// `128 (w . h) + (w . l)` per group of four bytes, as f32: lanes 0-7 sum block `b`, 8-15
/// block `b + 1`. `w` unsigned, `h` and `l` signed; no i16 sum can saturate (`|w| <= 128`,
/// `|h| <= 127`, `|l| <= 64`).
#[inline(always)]
fn pair_sums(simd: V4, w: __m512i, h: __m512i, l: __m512i) -> __m512 {
    let (f, bw) = (&simd.avx512f, &simd.avx512bw);
    let ih = bw._mm512_madd_epi16(
        bw._mm512_maddubs_epi16(w, h),
        f._mm512_set1_epi16(LO_STEPS as i16),
    );
    let il = bw._mm512_madd_epi16(bw._mm512_maddubs_epi16(w, l), f._mm512_set1_epi16(1));
    f._mm512_cvtepi32_ps(f._mm512_add_epi32(ih, il))
}

/// Values `b` and `b + 1` of per-block `v` (0 past the end), as [`pair_lanes`].
#[inline(always)]
fn pair_of(simd: V4, v: &[f32], b: usize) -> __m512 {
    let both = match v.get(b..b + 2) {
        Some(&[x, y]) => [x, y],
        _ => [v[b], 0.0],
    };
    pair_lanes(simd, both)
}

/// The weight side of the integer dots, two blocks at a time.
pub(super) trait IntRow<'a>: Copy {
    /// The row's block scales.
    fn d(self) -> &'a [f32];
    #[inline(always)]
    fn blocks(self) -> usize {
        self.d().len()
    }
    /// Scales of blocks `b` and `b + 1` (0 past the end), as [`pair_lanes`].
    #[inline(always)]
    fn scales(self, simd: V4, b: usize) -> __m512 {
        pair_of(simd, self.d(), b)
    }
    /// Codes of blocks `b`, `b + 1` (zeros past the end), and whether they are signed.
    fn codes(self, simd: V4, b: usize) -> (__m512i, bool);
    /// Offsets of blocks `b` and `b + 1` (Q4's `m`), as [`pair_lanes`], if the type has them;
    /// `dw` is [`IntRow::scales`] of the same blocks.
    fn offsets(self, simd: V4, b: usize, dw: __m512) -> Option<__m512>;
    /// [`IntRow::codes`] of blocks `2 p` and `2 p + 1` of a row with an even number of
    /// blocks: read as whole arrays, without the tail's cases.
    fn pair_codes(self, simd: V4, p: usize) -> (__m512i, bool);
    /// [`IntRow::offsets`] of the same pair.
    fn pair_offsets(self, simd: V4, p: usize, dw: __m512) -> Option<__m512>;
    /// [`super::avx2::prefetch`] ahead of pair `p`'s codes.
    fn prefetch_pair(self, simd: V4, p: usize);
}

/// The nibble bytes of blocks `b` and `b + 1` (zeros past the end).
#[inline(always)]
fn two_blocks(qs: &[u8], b: usize) -> [u8; 32] {
    match qs.get(b * QK / 2..(b + 2) * QK / 2) {
        Some(two) => match two.try_into() {
            Ok(a) => a,
            Err(_) => unreachable!("32 bytes"),
        },
        None => {
            let mut a = [0u8; 32];
            a[..16].copy_from_slice(&qs[b * QK / 2..(b + 1) * QK / 2]);
            a
        }
    }
}

impl<'a> IntRow<'a> for Q4Row<'a> {
    #[inline(always)]
    fn prefetch_pair(self, simd: V4, p: usize) {
        super::avx2::prefetch(*simd, self.qs, p * QK);
    }
    #[inline(always)]
    fn d(self) -> &'a [f32] {
        self.d
    }
    #[inline(always)]
    fn codes(self, simd: V4, b: usize) -> (__m512i, bool) {
        (nibbles(simd, two_blocks(self.qs, b)), false)
    }
    #[inline(always)]
    fn offsets(self, simd: V4, b: usize, _: __m512) -> Option<__m512> {
        Some(pair_of(simd, self.m, b))
    }
    #[inline(always)]
    fn pair_codes(self, simd: V4, p: usize) -> (__m512i, bool) {
        (nibbles(simd, self.qs.as_chunks::<32>().0[p]), false)
    }
    #[inline(always)]
    fn pair_offsets(self, simd: V4, p: usize, _: __m512) -> Option<__m512> {
        Some(pair_lanes(simd, self.m.as_chunks::<2>().0[p]))
    }
}

/// Two Q5 blocks' codes as the 8-bit form's, `q - 16` (signed): the nibbles, plus 16 where
/// the fifth bit (bit `j` of `high` for byte `j`) is set, minus 16. The dots then run as Q8's
/// and give its numbers bit for bit.
#[inline(always)]
fn q5_signed(simd: V4, nibble_bytes: [u8; 32], high: u64) -> __m512i {
    let (f, bw) = (&simd.avx512f, &simd.avx512bw);
    let low = nibbles(simd, nibble_bytes);
    let sixteen = f._mm512_set1_epi8(16);
    // Where the fifth bit is set, q - 16 is the nibble; elsewhere the nibble minus 16.
    bw._mm512_mask_sub_epi8(low, !high, low, sixteen)
}

impl<'a> IntRow<'a> for Q5Row<'a> {
    #[inline(always)]
    fn prefetch_pair(self, simd: V4, p: usize) {
        super::avx2::prefetch(*simd, self.qs, p * QK);
    }
    #[inline(always)]
    fn d(self) -> &'a [f32] {
        self.d
    }
    #[inline(always)]
    fn codes(self, simd: V4, b: usize) -> (__m512i, bool) {
        // The fifth bits of both blocks, one a byte in element order (a missing second block
        // reads as codes -16 against activations that are zeros there).
        let high =
            u64::from(self.qh[b]) | (u64::from(self.qh.get(b + 1).copied().unwrap_or(0)) << 32);
        (q5_signed(simd, two_blocks(self.qs, b), high), true)
    }
    #[inline(always)]
    fn offsets(self, _: V4, _: usize, _: __m512) -> Option<__m512> {
        None
    }
    #[inline(always)]
    fn pair_codes(self, simd: V4, p: usize) -> (__m512i, bool) {
        let high: u64 = pulp::cast(self.qh.as_chunks::<2>().0[p]);
        (q5_signed(simd, self.qs.as_chunks::<32>().0[p], high), true)
    }
    #[inline(always)]
    fn pair_offsets(self, _: V4, _: usize, _: __m512) -> Option<__m512> {
        None
    }
}

impl<'a> IntRow<'a> for Q8Row<'a> {
    #[inline(always)]
    fn prefetch_pair(self, simd: V4, p: usize) {
        super::avx2::prefetch(*simd, self.qs, p * 2 * QK);
    }
    #[inline(always)]
    fn d(self) -> &'a [f32] {
        self.d
    }
    #[inline(always)]
    fn codes(self, _: V4, b: usize) -> (__m512i, bool) {
        let codes = match self.qs.get(b * QK..(b + 2) * QK) {
            Some(two) => load64(two),
            None => {
                let mut a = [0i8; 64];
                a[..32].copy_from_slice(&self.qs[b * QK..(b + 1) * QK]);
                pulp::cast(a)
            }
        };
        (codes, true)
    }
    #[inline(always)]
    fn offsets(self, _: V4, _: usize, _: __m512) -> Option<__m512> {
        None
    }
    #[inline(always)]
    fn pair_codes(self, _: V4, p: usize) -> (__m512i, bool) {
        (pulp::cast(self.qs.as_chunks::<64>().0[p]), true)
    }
    #[inline(always)]
    fn pair_offsets(self, _: V4, _: usize, _: __m512) -> Option<__m512> {
        None
    }
}

/// Dots of one weight row with `T` rounded activation rows (`T` a constant, so that the
/// accumulators stay in registers). One accumulator a row is enough: a pair's work takes
/// longer than an FMA's latency.
#[inline(always)]
fn int_dots<'a, const T: usize>(simd: V4, w: impl IntRow<'a>, xs: [&QAct; T]) -> [f32; T] {
    int_sums(simd, w, xs).map(hsum)
}

/// [`int_dots`] before the lanes are summed: each dot's sixteen lanes.
#[inline(always)]
fn int_sums<'a, const T: usize>(simd: V4, w: impl IntRow<'a>, xs: [&QAct; T]) -> [__m512; T] {
    let f = &simd.avx512f;
    let mut acc = [f._mm512_setzero_ps(); T];
    let mut offset = [f._mm512_setzero_ps(); T];
    let blocks = w.blocks();
    if blocks % 2 == 0 {
        // Whole pairs: every array sliced to their count up front, so that the loop indexes
        // them without checks of its own.
        let pairs = blocks / 2;
        let d = &w.d().as_chunks::<2>().0[..pairs];
        let hi = xs.map(|x| &x.hi.as_chunks::<64>().0[..pairs]);
        let lo = xs.map(|x| &x.lo.as_chunks::<64>().0[..pairs]);
        let scale = xs.map(|x| &x.pair_scale[..pairs]);
        let sum = xs.map(|x| &x.pair_sum[..pairs]);
        for p in 0..pairs {
            w.prefetch_pair(simd, p);
            let (codes, signed) = w.pair_codes(simd, p);
            let dw = pair_lanes(simd, d[p]);
            let m = w.pair_offsets(simd, p, dw);
            let x = |t: usize| (hi[t][p], lo[t][p], scale[t][p], sum[t][p]);
            pair_step(simd, (codes, signed), dw, m, x, &mut acc, &mut offset);
        }
    } else {
        for b in (0..blocks).step_by(2) {
            let (codes, signed) = w.codes(simd, b);
            let dw = w.scales(simd, b);
            let m = w.offsets(simd, b, dw);
            let x = |t: usize| {
                let x: &QAct = xs[t];
                let h: [i8; 64] = match x.hi[b * QK..(b + 2) * QK].try_into() {
                    Ok(h) => h,
                    Err(_) => unreachable!("64 codes"),
                };
                let l: [i8; 64] = match x.lo[b * QK..(b + 2) * QK].try_into() {
                    Ok(l) => l,
                    Err(_) => unreachable!("64 codes"),
                };
                (h, l, x.pair_scale[b / 2], x.pair_sum[b / 2])
            };
            pair_step(simd, (codes, signed), dw, m, x, &mut acc, &mut offset);
        }
    }
    std::array::from_fn(|t| f._mm512_add_ps(acc[t], offset[t]))
}

/// One pair of blocks of [`int_sums`]: `x(t)` gives activation row `t`'s high and low parts,
/// scales and sums of the pair.
#[inline(always)]
fn pair_step<const T: usize>(
    simd: V4,
    (codes, signed): (__m512i, bool),
    dw: __m512,
    m: Option<__m512>,
    x: impl Fn(usize) -> ([i8; 64], [i8; 64], [f32; 16], [f32; 16]),
    acc: &mut [__m512; T],
    offset: &mut [__m512; T],
) {
    let (f, bw) = (&simd.avx512f, &simd.avx512bw);
    // Signed codes: |w| times the activation with w's sign (maddubs wants w unsigned).
    let (wu, neg) = if signed {
        (bw._mm512_abs_epi8(codes), bw._mm512_movepi8_mask(codes))
    } else {
        (codes, 0)
    };
    for t in 0..T {
        let (h, l, scale, sum) = x(t);
        let (mut h, mut l): (__m512i, __m512i) = (pulp::cast(h), pulp::cast(l));
        if signed {
            let zero = f._mm512_setzero_si512();
            h = bw._mm512_mask_sub_epi8(h, neg, zero, h);
            l = bw._mm512_mask_sub_epi8(l, neg, zero, l);
        }
        let s = f._mm512_mul_ps(dw, pulp::cast(scale));
        acc[t] = f._mm512_fmadd_ps(pair_sums(simd, wu, h, l), s, acc[t]);
        if let Some(m) = m {
            offset[t] = f._mm512_fmadd_ps(m, pulp::cast(sum), offset[t]);
        }
    }
}

impl super::RowDots for V4 {
    #[inline(always)]
    fn row_dots(self, w: QRow<'_>, xs: &[&QAct], out: &mut [f32]) {
        match w {
            QRow::Q4(r) => row_dots(self, r, xs, out),
            QRow::Q5(r) => row_dots(self, r, xs, out),
            QRow::Q8(r) => row_dots(self, r, xs, out),
        }
    }

    /// Eight dots' lanes summed at once ([`hsums8`]).
    #[inline(always)]
    fn eight_dots<const N: usize>(
        self,
        w: &super::QMatrix,
        row0: usize,
        xs: [&QAct; N],
        out: &mut [f32; 8],
    ) {
        let mut v = [self.avx512f._mm512_setzero_ps(); 8];
        for i in 0..8 / N {
            let sums = match w.q_row(row0 + i) {
                QRow::Q4(r) => int_sums(self, r, xs),
                QRow::Q5(r) => int_sums(self, r, xs),
                QRow::Q8(r) => int_sums(self, r, xs),
            };
            v[i * N..(i + 1) * N].copy_from_slice(&sums);
        }
        *out = hsums8(self, v);
    }
}

/// One weight row against every activation row: two at once, else one by one.
#[inline(always)]
fn row_dots<'a>(simd: V4, w: impl IntRow<'a>, xs: &[&QAct], out: &mut [f32]) {
    if let [a, b] = *xs {
        out.copy_from_slice(&int_dots(simd, w, [a, b]));
        return;
    }
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = int_dots(simd, w, [x])[0];
    }
}

/// Index vectors of a transposition's stage `k` (`_mm512_permutex2var_ps` of rows `r` and
/// `r | 1 << k`, `r`'s bit `k` clear): the pair swaps its row bit `k` with its column bit `k`.
/// The first vector builds row `r`, the second row `r | 1 << k`.
const fn stage_idx(k: usize) -> [[i32; 16]; 2] {
    let bit = 1 << k;
    let mut out = [[0i32; 16]; 2];
    let mut c = 0;
    while c < 16 {
        let (own, other) = (c as i32, (c ^ bit) as i32);
        if c & bit == 0 {
            out[0][c] = own;
            out[1][c] = other;
        } else {
            out[0][c] = 16 + other;
            out[1][c] = 16 + own;
        }
        c += 1;
    }
    out
}

const STAGES: [[[i32; 16]; 2]; 4] = [stage_idx(0), stage_idx(1), stage_idx(2), stage_idx(3)];

/// The first `stages` stages of a 16 x 16 transposition of the rows `v` (`N` of them, a power
/// of two, `stages = log2 N`): afterwards row `m` holds lane `m + N i` of every input row, in
/// row order, in lanes `N i..N (i + 1)`.
#[inline(always)]
fn transpose_stages<const N: usize>(simd: V4, v: &mut [__m512; N], stages: usize) {
    let f = &simd.avx512f;
    for (k, idx) in STAGES.iter().enumerate().take(stages) {
        let bit = 1 << k;
        let (lo, hi): (__m512i, __m512i) = (pulp::cast(idx[0]), pulp::cast(idx[1]));
        for r in 0..N {
            if r & bit == 0 {
                let (a, b) = (v[r], v[r | bit]);
                v[r] = f._mm512_permutex2var_ps(a, lo, b);
                v[r | bit] = f._mm512_permutex2var_ps(a, hi, b);
            }
        }
    }
}

/// [`hsum`] of each of eight vectors, bit for bit (each one's lanes summed in lane order), by
/// a transposition: eight sums in the vector lanes instead of 120 scalar additions.
#[inline(always)]
pub(super) fn hsums8(simd: V4, mut v: [__m512; 8]) -> [f32; 8] {
    let f = &simd.avx512f;
    transpose_stages(simd, &mut v, 3);
    // Row m: lane m of the eight inputs in lanes 0-7, lane m + 8 in lanes 8-15.
    let mut t = f._mm512_set1_ps(std::iter::empty::<f32>().sum());
    for &row in &v {
        t = f._mm512_add_ps(t, row);
    }
    for &row in &v {
        t = f._mm512_add_ps(t, f._mm512_shuffle_f32x4::<0b11_10_11_10>(row, row));
    }
    let lanes: [f32; 16] = pulp::cast(t);
    std::array::from_fn(|j| lanes[j])
}

/// [`hsum`] of each of sixteen vectors, bit for bit, as [`hsums8`].
#[inline(always)]
pub(super) fn hsums16(simd: V4, mut v: [__m512; 16]) -> [f32; 16] {
    let f = &simd.avx512f;
    transpose_stages(simd, &mut v, 4);
    let mut t = f._mm512_set1_ps(std::iter::empty::<f32>().sum());
    for &row in &v {
        t = f._mm512_add_ps(t, row);
    }
    pulp::cast(t)
}

/// Four activation rows by `C` f32 weight rows (two or four), sixteen lanes at a time: one
/// accumulator per (activation row, weight row), so each dot's sum does not depend on `C`.
pub(super) struct TileF32<'a, const C: usize> {
    pub simd: V4,
    pub w: [&'a [f32]; C],
    pub x: [&'a [f32]; TILE],
}

impl<const C: usize> pulp::NullaryFnOnce for TileF32<'_, C> {
    type Output = [[f32; C]; TILE];

    #[inline(always)]
    fn call(self) -> [[f32; C]; TILE] {
        let TileF32 { simd, w, x } = self;
        let f = &simd.avx512f;
        let mut acc = [[f._mm512_setzero_ps(); C]; TILE];
        let full = w[0].len() / 16 * 16;
        for k in (0..full).step_by(16) {
            let wv: [__m512; C] = std::array::from_fn(|c| load(&w[c][k..k + 16]));
            for t in 0..TILE {
                let xv = load(&x[t][k..k + 16]);
                for c in 0..C {
                    acc[t][c] = f._mm512_fmadd_ps(wv[c], xv, acc[t][c]);
                }
            }
        }
        // The accumulators' sums, eight or sixteen at a time ([`hsum`] of each).
        let zero = f._mm512_setzero_ps();
        let sums: [f32; 16] = if C * TILE <= 8 {
            let v = std::array::from_fn(|j| {
                if j < C * TILE {
                    acc[j / C][j % C]
                } else {
                    zero
                }
            });
            let s = hsums8(simd, v);
            std::array::from_fn(|j| if j < 8 { s[j] } else { 0.0 })
        } else {
            hsums16(simd, std::array::from_fn(|j| acc[j / C][j % C]))
        };
        let mut out = [[0.0; C]; TILE];
        for t in 0..TILE {
            for c in 0..C {
                let tail: f32 = w[c][full..]
                    .iter()
                    .zip(&x[t][full..])
                    .map(|(a, b)| a * b)
                    .sum();
                out[t][c] = sums[t * C + c] + tail;
            }
        }
        out
    }
}

/// Weight rows whose dots run side by side: each activation load serves them all. (With more,
/// LLVM's machine combiner splits each `vpdpwssd` back into `vpmaddwd` + `vpaddd` to shorten
/// the chains, which halves the rate.)
const GROUP: usize = 4;
/// Blocks a group's sums take at a time: twelve independent `vpdpwssd` chains, where one
/// block's four leave a core that issues two a cycle (Intel's) waiting on their latency.
const BLOCKS: usize = 3;
/// Blocks at a time where two tiles share each broadcast code pair (sixteen chains).
const PAIR_BLOCKS: usize = 2;

/// [`Panel`] with the codes decoded in registers.
trait PanelRow: Panel {
    /// `Panel::pairs` (the tests' definition) as one register, the codes
    /// [`super::avx2::prefetch`]ed ahead: a group's four rows' codes at once left the
    /// hardware's prefetching behind when the weights came from memory (as a model's do).
    fn pairs16(self, simd: V4, b: usize) -> __m512i;
}

/// `Panel::pairs` (the tests' definition) of a row's block `b`, decoded in one register.
#[inline(always)]
pub(super) fn code_pairs(simd: V4, w: QRow<'_>, b: usize) -> [i32; 16] {
    pulp::cast(match w {
        QRow::Q4(r) => r.pairs16(simd, b),
        QRow::Q5(r) => r.pairs16(simd, b),
        QRow::Q8(r) => r.pairs16(simd, b),
    })
}

/// A Q4 block's 16 bytes as its 32 codes in element order (low nibbles, then high), one
/// i16 each.
#[inline(always)]
fn nibble_words(simd: V4, raw: &[u8; QK / 2]) -> __m512i {
    simd.avx512bw
        ._mm512_cvtepu8_epi16(super::avx2::nibbles(*simd, *raw))
}

impl PanelRow for Q4Row<'_> {
    #[inline(always)]
    fn pairs16(self, simd: V4, b: usize) -> __m512i {
        super::avx2::prefetch(*simd, self.qs, b * QK / 2);
        nibble_words(simd, &self.qs.as_chunks::<{ QK / 2 }>().0[b])
    }
}

impl PanelRow for Q5Row<'_> {
    #[inline(always)]
    fn pairs16(self, simd: V4, b: usize) -> __m512i {
        let bw = &simd.avx512bw;
        super::avx2::prefetch(*simd, self.qs, b * QK / 2);
        let v = nibble_words(simd, &self.qs.as_chunks::<{ QK / 2 }>().0[b]);
        // The 8-bit form's codes `q - 16` (so the panels give its numbers): `q` is the nibble
        // plus 16 where element `j`'s fifth bit (bit `j` of `qh`) is set, so 16 comes off
        // where it is clear.
        bw._mm512_mask_sub_epi16(v, !self.qh[b], v, simd.avx512f._mm512_set1_epi16(16))
    }
}

impl PanelRow for Q8Row<'_> {
    #[inline(always)]
    fn pairs16(self, simd: V4, b: usize) -> __m512i {
        super::avx2::prefetch(*simd, self.qs, b * QK);
        let codes: __m256i = pulp::cast(self.qs.as_chunks::<QK>().0[b]);
        simd.avx512bw._mm512_cvtepi8_epi16(codes)
    }
}

/// Rows `first..` of a quantized matrix (as many as `out`, `[n, rows]`, holds) against three
/// or more rounded activation rows, each dot bit for bit [`super::act`]'s scalar one: every
/// block's integer sum is exact, and its scales and offset are applied in f32 in the scalar
/// dot's order, one lane per weight row. The task's rows are first laid out as panels of
/// sixteen rows, each block as sixteen vectors (vector `k`: the code pairs `k` of the sixteen
/// rows); then each block of a tile of activation rows is sixteen `madd`s (one `vpdpwssd` each
/// where the CPU has VNNI and the caller compiled this for it).
pub(super) struct PanelTask<'a, 'o> {
    pub simd: V4,
    pub w: &'a super::QMatrix,
    pub first: usize,
    pub xs: &'a Tiles,
    /// Activation rows.
    pub n: usize,
    /// One slice of the product per activation row.
    pub out: &'a mut [&'o mut [f32]],
}

impl pulp::NullaryFnOnce for PanelTask<'_, '_> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        let PanelTask {
            simd,
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
        let task = TaskRows::new(
            w,
            first,
            rows,
            GROUP,
            #[inline(always)]
            |row, b| code_pairs(simd, row, b),
        );
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
    simd: V4,
    task: &TaskRows,
    xs: &Tiles,
    n: usize,
    out: &mut [&mut [f32]],
) {
    let tiles = n.div_ceil(PANEL_TILE);
    let mut c = 0;
    while c + 2 <= tiles {
        tile_run::<KIND, 2, PAIR_BLOCKS>(simd, task, xs, [c, c + 1], n, out);
        c += 2;
    }
    if c < tiles {
        tile_run::<KIND, 1, BLOCKS>(simd, task, xs, [c], n, out);
    }
}

/// Tiles `cs` against every row of the task: each code pair broadcast once serves the `T`
/// tiles, and `B` blocks go at a time (`T B GROUP` chains of `vpdpwssd`).
#[inline(always)]
fn tile_run<const KIND: u8, const T: usize, const B: usize>(
    simd: V4,
    task: &TaskRows,
    xs: &Tiles,
    cs: [usize; T],
    n: usize,
    out: &mut [&mut [f32]],
) {
    let f = &simd.avx512f;
    let (rows, nb) = (task.rows, task.nb);
    let tiles: [Tile<'_>; T] = std::array::from_fn(|t| xs.tile(cs[t]));
    for g in 0..rows.div_ceil(GROUP) {
        // A last group's padding rows: computed, not written.
        let live = (rows - g * GROUP).min(GROUP);
        let mut acc = [[f._mm512_setzero_ps(); GROUP]; T];
        let mut b = 0;
        while b + B <= nb {
            add_blocks::<KIND, T, B>(simd, task, &tiles, g, b, live, &mut acc);
            b += B;
        }
        match nb - b {
            2 => add_blocks::<KIND, T, 2>(simd, task, &tiles, g, b, live, &mut acc),
            1 => add_blocks::<KIND, T, 1>(simd, task, &tiles, g, b, live, &mut acc),
            _ => {}
        }
        for (&c, acc) in cs.iter().zip(&acc) {
            let real = (n - c * PANEL_TILE).min(PANEL_TILE);
            for (i, acc) in acc.iter().enumerate().take(live) {
                let v: [f32; 16] = pulp::cast(*acc);
                let r = g * GROUP + i;
                for (t, &v) in v.iter().enumerate().take(real) {
                    out[c * PANEL_TILE + t][r] = v;
                }
            }
        }
    }
}

/// [`PanelTask`] against one tile of activation rows (up to sixteen: a batch decoding). Each
/// group's blocks are decoded a run of [`BLOCKS`] ahead of their products, where more tiles
/// share a layout of the task's rows ([`TaskRows`]) made first: one tile reads that layout
/// once, and its decoding (shuffles) ran apart from the products (`vpdpwssd`), on other
/// ports, instead of beside them.
pub(super) struct OneTile<'a, 'o>(pub PanelTask<'a, 'o>);

impl pulp::NullaryFnOnce for OneTile<'_, '_> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        let w = self.0.w;
        // One matrix, one type: every row is the first row's kind.
        match w.q_row(self.0.first) {
            QRow::Q4(_) => self.run::<ADD, _>(
                #[inline(always)]
                |r| match w.q_row(r) {
                    QRow::Q4(row) => row,
                    _ => unreachable!("a matrix holds one type"),
                },
            ),
            QRow::Q5(_) => self.run::<NONE, _>(
                #[inline(always)]
                |r| match w.q_row(r) {
                    QRow::Q5(row) => row,
                    _ => unreachable!("a matrix holds one type"),
                },
            ),
            QRow::Q8(_) => self.run::<NONE, _>(
                #[inline(always)]
                |r| match w.q_row(r) {
                    QRow::Q8(row) => row,
                    _ => unreachable!("a matrix holds one type"),
                },
            ),
        }
    }
}

impl OneTile<'_, '_> {
    #[inline(always)]
    fn run<const KIND: u8, W: PanelRow>(self, row: impl Fn(usize) -> W) {
        let PanelTask {
            simd,
            first,
            xs,
            n,
            out,
            ..
        } = self.0;
        let rows = out.first().map_or(0, |o| o.len());
        if rows == 0 || n == 0 {
            return;
        }
        let f = &simd.avx512f;
        let tiles = [xs.tile(0)];
        let nb = row(first).d().len();
        for g in 0..rows.div_ceil(GROUP) {
            // A last group's padding rows repeat its last row: computed, not written.
            let live = (rows - g * GROUP).min(GROUP);
            let ws: [W; GROUP] = std::array::from_fn(|i| row(first + g * GROUP + i.min(live - 1)));
            let mut acc = [f._mm512_setzero_ps(); GROUP];
            // Each run of blocks decoded one run ahead of its products: codes read back
            // just after they were stored waited on the stores.
            let whole = nb / BLOCKS;
            let mut runs = [[[[0; 16]; GROUP]; BLOCKS]; 2];
            if whole > 0 {
                Self::decode(simd, &ws, 0, &mut runs[0]);
            }
            for c in 0..whole {
                if c + 1 < whole {
                    Self::decode(simd, &ws, (c + 1) * BLOCKS, &mut runs[(c + 1) % 2]);
                }
                let b = c * BLOCKS;
                Self::blocks::<KIND, W, BLOCKS>(simd, &ws, &tiles, &runs[c % 2], b, live, &mut acc);
            }
            let b = whole * BLOCKS;
            match nb - b {
                2 => Self::tail::<KIND, W, 2>(simd, &ws, &tiles, b, live, &mut acc),
                1 => Self::tail::<KIND, W, 1>(simd, &ws, &tiles, b, live, &mut acc),
                _ => {}
            }
            for (i, acc) in acc.iter().enumerate().take(live) {
                let v: [f32; 16] = pulp::cast(*acc);
                let r = g * GROUP + i;
                for (t, &v) in v.iter().enumerate().take(n) {
                    out[t][r] = v;
                }
            }
        }
    }

    /// The last blocks `b..b + B` (fewer than a run), decoded and then multiplied.
    #[inline(always)]
    fn tail<const KIND: u8, W: PanelRow, const B: usize>(
        simd: V4,
        ws: &[W; GROUP],
        tiles: &[Tile<'_>; 1],
        b: usize,
        live: usize,
        acc: &mut [__m512; GROUP],
    ) {
        let mut run = [[[0; 16]; GROUP]; B];
        Self::decode(simd, ws, b, &mut run);
        Self::blocks::<KIND, W, B>(simd, ws, tiles, &run, b, live, acc);
    }

    /// The code pairs of blocks `b..b + B` of the group's rows `ws`, into `pairs`.
    #[inline(always)]
    fn decode<W: PanelRow, const B: usize>(
        simd: V4,
        ws: &[W; GROUP],
        b: usize,
        pairs: &mut [[[i32; 16]; GROUP]; B],
    ) {
        // (Loops, not closures: a closure may stay out of line, without AVX-512.)
        for (j, pairs) in pairs.iter_mut().enumerate() {
            for (i, p) in pairs.iter_mut().enumerate() {
                *p = pulp::cast(ws[i].pairs16(simd, b + j));
            }
        }
    }

    /// Blocks `b..b + B` of the group's rows `ws` (their code pairs decoded into `pairs`),
    /// into `acc` (the terms as [`add_blocks`] adds them).
    #[inline(always)]
    fn blocks<const KIND: u8, W: PanelRow, const B: usize>(
        simd: V4,
        ws: &[W; GROUP],
        tiles: &[Tile<'_>; 1],
        pairs: &[[[i32; 16]; GROUP]; B],
        b: usize,
        live: usize,
        acc: &mut [__m512; GROUP],
    ) {
        let f = &simd.avx512f;
        let bw = &simd.avx512bw;
        let tile = &tiles[0];
        // The tile's blocks as arrays, so that the loop's loads take no checks.
        let blocks = tile.pairs.as_chunks::<PANEL_TILE>().0.as_chunks::<16>().0;
        let xs: [&[[i32; PANEL_TILE]; 16]; B] = std::array::from_fn(|j| &blocks[b + j]);
        // The integer sums as [`block_sums`] takes them, of the codes just decoded.
        let mut sums = [[f._mm512_setzero_si512(); GROUP]; B];
        #[allow(clippy::needless_range_loop)]
        for k in 0..16 {
            for j in 0..B {
                let x: __m512i = pulp::cast(xs[j][k]);
                for i in 0..GROUP {
                    let pair = f._mm512_set1_epi32(pairs[j][i][k]);
                    sums[j][i] = f._mm512_add_epi32(sums[j][i], bw._mm512_madd_epi16(x, pair));
                }
            }
        }
        for (j, sums) in sums.iter().enumerate() {
            let at = (b + j) * PANEL_TILE;
            let scale: __m512 = pulp::cast(load_f32(&tile.scale[at..at + PANEL_TILE]));
            let sum: __m512 = pulp::cast(load_f32(&tile.sum[at..at + PANEL_TILE]));
            for i in 0..live {
                let ds = f._mm512_mul_ps(f._mm512_set1_ps(ws[i].d()[b + j]), scale);
                let scaled = f._mm512_mul_ps(f._mm512_cvtepi32_ps(sums[i]), ds);
                let m = f._mm512_set1_ps(ws[i].offset(b + j));
                let term = match Offset::of(KIND) {
                    Offset::Add => f._mm512_add_ps(scaled, f._mm512_mul_ps(m, sum)),
                    Offset::None => scaled,
                };
                acc[i] = f._mm512_add_ps(acc[i], term);
            }
        }
    }
}

/// Adds the terms of blocks `b..b + B` to the dots of group `g`'s `live` rows against each of
/// `tiles`: each block's integer sum times the product of the two scales, plus the offset
/// term, block after block in the scalar dot's order.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn add_blocks<const KIND: u8, const T: usize, const B: usize>(
    simd: V4,
    task: &TaskRows,
    tiles: &[Tile<'_>; T],
    g: usize,
    b: usize,
    live: usize,
    acc: &mut [[__m512; GROUP]; T],
) {
    let f = &simd.avx512f;
    let sums = block_sums::<T, B>(simd, task, tiles, g, b);
    for ((tile, sums), acc) in tiles.iter().zip(&sums).zip(acc.iter_mut()) {
        for (j, sums) in sums.iter().enumerate() {
            let at = (b + j) * PANEL_TILE;
            let scale: __m512 = pulp::cast(load_f32(&tile.scale[at..at + PANEL_TILE]));
            let sum: __m512 = pulp::cast(load_f32(&tile.sum[at..at + PANEL_TILE]));
            for i in 0..live {
                let at = (g * GROUP + i) * task.nb + b + j;
                let ds = f._mm512_mul_ps(f._mm512_set1_ps(task.scale[at]), scale);
                let scaled = f._mm512_mul_ps(f._mm512_cvtepi32_ps(sums[i]), ds);
                let m = f._mm512_set1_ps(task.offset[at]);
                let term = match Offset::of(KIND) {
                    Offset::Add => f._mm512_add_ps(scaled, f._mm512_mul_ps(m, sum)),
                    Offset::None => scaled,
                };
                acc[i] = f._mm512_add_ps(acc[i], term);
            }
        }
    }
}

/// The exact integer sums of blocks `b..b + B` of group `g`'s rows against each of `tiles`:
/// per tile, block and row, sixteen lanes (the tile's activation rows).
#[inline(always)]
fn block_sums<const T: usize, const B: usize>(
    simd: V4,
    task: &TaskRows,
    tiles: &[Tile<'_>; T],
    g: usize,
    b: usize,
) -> [[[__m512i; GROUP]; B]; T] {
    let (f, bw) = (&simd.avx512f, &simd.avx512bw);
    let nb = task.nb;
    let mut sums = [[[f._mm512_setzero_si512(); GROUP]; B]; T];
    let wc: [[&[i32; 16]; GROUP]; B] =
        std::array::from_fn(|j| std::array::from_fn(|i| &task.pairs[(g * GROUP + i) * nb + b + j]));
    // Each tile's blocks as arrays, so that the loop's loads take no checks.
    let xs: [[&[[i32; PANEL_TILE]; 16]; B]; T] = std::array::from_fn(|t| {
        let blocks = tiles[t]
            .pairs
            .as_chunks::<PANEL_TILE>()
            .0
            .as_chunks::<16>()
            .0;
        std::array::from_fn(|j| &blocks[b + j])
    });
    // `k` picks a word of every row's codes and a row of each block.
    #[allow(clippy::needless_range_loop)]
    for k in 0..16 {
        for j in 0..B {
            let x: [__m512i; T] = std::array::from_fn(|t| pulp::cast(xs[t][j][k]));
            for i in 0..GROUP {
                let pair = f._mm512_set1_epi32(wc[j][i][k]);
                for t in 0..T {
                    sums[t][j][i] =
                        f._mm512_add_epi32(sums[t][j][i], bw._mm512_madd_epi16(x[t], pair));
                }
            }
        }
    }
    sums
}

#[inline(always)]
fn load_f32(x: &[f32]) -> [f32; 16] {
    match x.try_into() {
        Ok(a) => a,
        Err(_) => unreachable!("16 values"),
    }
}

/// [`TileBlock`] with AVX-512, sixteen lanes at a time, the tile's words transposed in
/// registers.
impl pulp::NullaryFnOnce for TileBlock<'_, V4> {
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
        let f = &simd.avx512f;
        let magic = f._mm512_set1_ps(super::act::ROUND_MAGIC);
        let round = |v: __m512| f._mm512_sub_ps(f._mm512_add_ps(v, magic), magic);
        let mut words = [f._mm512_setzero_ps(); PANEL_TILE];
        for (t, words) in words.iter_mut().enumerate() {
            let row = c * PANEL_TILE + t;
            if row >= n {
                break;
            }
            let xb = &x[row * cols + b * QK..row * cols + (b + 1) * QK];
            let sum: f32 = xb.iter().sum();
            // Non-finite values, or steps so small that their inverse overflows, go through
            // `QAct::new` itself (`by_qact`).
            if !sum.is_finite() {
                *words = pulp::cast(part.by_qact(t, xb));
                continue;
            }
            part.sum[t] = sum;
            let halves = [load(&xb[..16]), load(&xb[16..])];
            let m: [f32; 16] =
                pulp::cast(f._mm512_max_ps(f._mm512_abs_ps(halves[0]), f._mm512_abs_ps(halves[1])));
            let amax = m.iter().fold(0.0f32, |a, &v| a.max(v));
            if amax == 0.0 {
                continue;
            }
            if !(super::act::LO_STEPS as f32 / (amax / 127.0)).is_finite() {
                *words = pulp::cast(part.by_qact(t, xb));
                continue;
            }
            let d = amax / 127.0;
            let (inv, lo_inv) = (1.0 / d, super::act::LO_STEPS as f32 / d);
            // (A loop, not `array::map`: its closure may stay out of line, without AVX-512.)
            let mut q = [f._mm512_setzero_si512(); 2];
            for (q, &v) in q.iter_mut().zip(&halves) {
                let h = round(f._mm512_mul_ps(v, f._mm512_set1_ps(inv)));
                let l = round(f._mm512_mul_ps(
                    f._mm512_sub_ps(v, f._mm512_mul_ps(h, f._mm512_set1_ps(d))),
                    f._mm512_set1_ps(lo_inv),
                ));
                *q = f._mm512_add_epi32(
                    f._mm512_slli_epi32::<7>(f._mm512_cvtps_epi32(h)),
                    f._mm512_cvtps_epi32(l),
                );
            }
            // The 32 values as i16 in element order (word k: elements 2k and 2k + 1): in
            // range, the saturating pack keeps them as they are; it interleaves its inputs'
            // 128-bit quarters, and the permute puts them back.
            let packed = simd.avx512bw._mm512_packs_epi32(q[0], q[1]);
            let order = f._mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7);
            *words = f._mm512_castsi512_ps(f._mm512_permutexvar_epi64(order, packed));
            part.scale[t] = d / super::act::LO_STEPS as f32;
        }
        // Row t's word k to `pairs[k T + t]`.
        transpose_stages(simd, &mut words, 4);
        for (k, w) in words.iter().enumerate() {
            let w: [i32; 16] = pulp::cast(*w);
            part.pairs[k * PANEL_TILE..(k + 1) * PANEL_TILE].copy_from_slice(&w);
        }
    }
}
