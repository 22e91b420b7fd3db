//! AVX-512 (F + BW) kernels: the integer dots read two blocks (64 codes) per register; the
//! decoded dots turn a block into 32 f32 weights in registers, shared by a tile of activation
//! rows; the f32 tile serves f32 weights and decoded panels.

use core::arch::x86_64::{__m128i, __m256i, __m512, __m512i};
use pulp::x86::V4;

use super::act::{LO_STEPS, QAct};
use super::{Q4Row, Q5Row, Q8Row, QK, QRow, TILE, XRow};

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

/// `[a; 8] ++ [b; 8]` from two values: broadcast the pair, then spread it.
#[inline(always)]
fn pair_lanes(simd: V4, a: f32, b: f32) -> __m512 {
    let f = &simd.avx512f;
    let both: u64 = pulp::cast([a, b]);
    let v = f._mm512_castsi512_ps(f._mm512_set1_epi64(both as i64));
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
    pair_lanes(simd, v[b], v.get(b + 1).copied().unwrap_or(0.0))
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
}

impl<'a> IntRow<'a> for Q5Row<'a> {
    #[inline(always)]
    fn d(self) -> &'a [f32] {
        self.d
    }
    #[inline(always)]
    fn codes(self, simd: V4, b: usize) -> (__m512i, bool) {
        let low = nibbles(simd, two_blocks(self.qs, b));
        // The fifth bits of both blocks, one a byte in element order: add 16 where set.
        let high =
            u64::from(self.qh[b]) | (u64::from(self.qh.get(b + 1).copied().unwrap_or(0)) << 32);
        let codes =
            simd.avx512bw
                ._mm512_mask_add_epi8(low, high, low, simd.avx512f._mm512_set1_epi8(16));
        (codes, false)
    }
    #[inline(always)]
    fn offsets(self, simd: V4, _: usize, dw: __m512) -> Option<__m512> {
        Some(
            simd.avx512f
                ._mm512_mul_ps(dw, simd.avx512f._mm512_set1_ps(-16.0)),
        )
    }
}

impl<'a> IntRow<'a> for Q8Row<'a> {
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
    let (f, bw) = (&simd.avx512f, &simd.avx512bw);
    let mut acc = [f._mm512_setzero_ps(); T];
    let mut offset = [f._mm512_setzero_ps(); T];
    for b in (0..w.blocks()).step_by(2) {
        let (codes, signed) = w.codes(simd, b);
        let dw = w.scales(simd, b);
        let m = w.offsets(simd, b, dw);
        // Signed codes: |w| times the activation with w's sign (maddubs wants w unsigned).
        let (wu, neg) = if signed {
            (bw._mm512_abs_epi8(codes), bw._mm512_movepi8_mask(codes))
        } else {
            (codes, 0)
        };
        for t in 0..T {
            let x = xs[t];
            let mut h = load64(&x.hi[b * QK..(b + 2) * QK]);
            let mut l = load64(&x.lo[b * QK..(b + 2) * QK]);
            if signed {
                let zero = f._mm512_setzero_si512();
                h = bw._mm512_mask_sub_epi8(h, neg, zero, h);
                l = bw._mm512_mask_sub_epi8(l, neg, zero, l);
            }
            let s = f._mm512_mul_ps(dw, pulp::cast(x.pair_scale[b / 2]));
            acc[t] = f._mm512_fmadd_ps(pair_sums(simd, wu, h, l), s, acc[t]);
            if let Some(m) = m {
                offset[t] = f._mm512_fmadd_ps(m, pulp::cast(x.pair_sum[b / 2]), offset[t]);
            }
        }
    }
    std::array::from_fn(|t| f._mm512_add_ps(acc[t], offset[t]))
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

    /// One or two activation rows: eight dots' lanes summed at once ([`hsums8`]), each dot
    /// the same as [`row_dots`]'s.
    #[inline(always)]
    fn task_dots(self, w: &super::QMatrix, first: usize, xs: &[&QAct], out: &mut [f32]) {
        let n = xs.len();
        super::in_groups_of_eight(
            self,
            w,
            first,
            xs,
            out,
            // Inlined into the instruction set's context, or the intrinsics become calls.
            #[inline(always)]
            |row0, o| {
                let mut v = [self.avx512f._mm512_setzero_ps(); 8];
                for (i, lanes) in v.chunks_exact_mut(n).enumerate() {
                    let sums = match w.q_row(row0 + i) {
                        QRow::Q4(r) => few_sums(self, r, xs),
                        QRow::Q5(r) => few_sums(self, r, xs),
                        QRow::Q8(r) => few_sums(self, r, xs),
                    };
                    lanes.copy_from_slice(&sums[..n]);
                }
                o.copy_from_slice(&hsums8(self, v)[..o.len()]);
            },
        );
    }
}

/// [`int_sums`] of one or two activation rows, padded to two (zeros).
#[inline(always)]
fn few_sums<'a>(simd: V4, w: impl IntRow<'a>, xs: &[&QAct]) -> [__m512; 2] {
    match *xs {
        [a] => [int_sums(simd, w, [a])[0], simd.avx512f._mm512_setzero_ps()],
        [a, b] => int_sums(simd, w, [a, b]),
        _ => unreachable!("one or two activation rows"),
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

/// Sum of the lanes of several accumulators.
#[inline(always)]
fn hsum_many(simd: V4, v: &[__m512]) -> f32 {
    hsum(v.iter().fold(simd.avx512f._mm512_setzero_ps(), |a, &b| {
        simd.avx512f._mm512_add_ps(a, b)
    }))
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

/// [`hsum_many`] of two accumulators, taken by value: a reference into a tile's accumulator
/// array kept the whole array in memory, stored at every block.
#[inline(always)]
fn hsum2(simd: V4, a: __m512, b: __m512) -> f32 {
    let f = &simd.avx512f;
    hsum(f._mm512_add_ps(f._mm512_add_ps(f._mm512_setzero_ps(), a), b))
}

#[inline(always)]
fn load16(b: &[u8]) -> __m128i {
    let a: [u8; 16] = match b.try_into() {
        Ok(a) => a,
        Err(_) => unreachable!("16 bytes"),
    };
    pulp::cast(a)
}

/// A weight row whose blocks decode to f32.
pub(super) trait Decode: Copy {
    fn blocks(self) -> usize;
    fn decode(self, simd: V4, b: usize) -> [__m512; 2];
}

/// Sixteen unsigned codes as `q d + m`.
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

/// A block's 16 nibble bytes as its elements 0..16 (low nibbles) and 16..32 (high nibbles).
#[inline(always)]
fn nibble_halves(simd: V4, qs: &[u8]) -> (__m128i, __m128i) {
    let raw = load16(qs);
    let mask = simd.sse2._mm_set1_epi8(0x0f);
    let lo = simd.sse2._mm_and_si128(raw, mask);
    let hi = simd
        .sse2
        ._mm_and_si128(simd.sse2._mm_srli_epi16::<4>(raw), mask);
    (lo, hi)
}

impl Decode for Q4Row<'_> {
    #[inline(always)]
    fn blocks(self) -> usize {
        self.d.len()
    }

    #[inline(always)]
    fn decode(self, simd: V4, b: usize) -> [__m512; 2] {
        let (lo, hi) = nibble_halves(simd, &self.qs[b * QK / 2..(b + 1) * QK / 2]);
        let d = simd.avx512f._mm512_set1_ps(self.d[b]);
        let m = simd.avx512f._mm512_set1_ps(self.m[b]);
        [widen_u8(simd, lo, d, m), widen_u8(simd, hi, d, m)]
    }
}

impl Decode for Q5Row<'_> {
    #[inline(always)]
    fn blocks(self) -> usize {
        self.d.len()
    }

    #[inline(always)]
    fn decode(self, simd: V4, b: usize) -> [__m512; 2] {
        let f = &simd.avx512f;
        let (lo, hi) = nibble_halves(simd, &self.qs[b * QK / 2..(b + 1) * QK / 2]);
        let d = f._mm512_set1_ps(self.d[b]);
        let m = f._mm512_set1_ps(-16.0 * self.d[b]);
        let sixteen = f._mm512_set1_epi32(16);
        let widen = |v: __m128i, bits: u16| {
            let q = f._mm512_cvtepu8_epi32(v);
            let q = f._mm512_mask_add_epi32(q, bits, q, sixteen);
            f._mm512_fmadd_ps(f._mm512_cvtepi32_ps(q), d, m)
        };
        let qh = self.qh[b];
        [widen(lo, qh as u16), widen(hi, (qh >> 16) as u16)]
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

/// Dots of one weight row with one activation row: four accumulators (two a block,
/// alternating blocks).
#[inline(always)]
fn decoded_one(simd: V4, w: impl Decode, x: &XRow<'_>) -> f32 {
    let f = &simd.avx512f;
    let mut acc = [f._mm512_setzero_ps(); 4];
    // Two blocks a step, each block's pair of accumulators at a fixed place: an index that
    // alternated with the block kept them in memory.
    for first in (0..w.blocks()).step_by(2) {
        for (a, b) in [(0, first), (2, first + 1)] {
            if b < w.blocks() {
                let wv = w.decode(simd, b);
                let xb = &x.f[b * QK..(b + 1) * QK];
                acc[a] = f._mm512_fmadd_ps(wv[0], load(&xb[..16]), acc[a]);
                acc[a + 1] = f._mm512_fmadd_ps(wv[1], load(&xb[16..]), acc[a + 1]);
            }
        }
    }
    hsum_many(simd, &acc)
}

/// Dots of one weight row with `T` activation rows (`T` a constant, so that the accumulators
/// stay in registers): each block decoded once for all `T`, two accumulators a row.
#[inline(always)]
fn decoded_tile<const T: usize>(simd: V4, w: impl Decode, xs: &[XRow<'_>], out: &mut [f32]) {
    let f = &simd.avx512f;
    let x: [&[f32]; T] = std::array::from_fn(|t| xs[t].f);
    let mut acc = [[f._mm512_setzero_ps(); 2]; T];
    for b in 0..w.blocks() {
        let wv = w.decode(simd, b);
        for t in 0..T {
            let xb = &x[t][b * QK..(b + 1) * QK];
            acc[t][0] = f._mm512_fmadd_ps(wv[0], load(&xb[..16]), acc[t][0]);
            acc[t][1] = f._mm512_fmadd_ps(wv[1], load(&xb[16..]), acc[t][1]);
        }
    }
    for t in 0..T {
        out[t] = hsum2(simd, acc[t][0], acc[t][1]);
    }
}

/// Dots of one weight row with every activation row, in [`TILE`]-row chunks.
#[inline(always)]
fn decoded_row(simd: V4, w: impl Decode, xs: &[XRow<'_>], out: &mut [f32]) {
    for (x, o) in xs.chunks(TILE).zip(out.chunks_mut(TILE)) {
        match x.len() {
            1 => o[0] = decoded_one(simd, w, &x[0]),
            2 => decoded_tile::<2>(simd, w, x, o),
            3 => decoded_tile::<3>(simd, w, x, o),
            TILE => decoded_tile::<TILE>(simd, w, x, o),
            _ => unreachable!("chunks of at most TILE rows"),
        }
    }
}

/// Dots of two weight rows with `T` activation rows: each activation load serves both weight
/// rows; per (weight row, activation row) the same two accumulators as [`decoded_tile`].
#[inline(always)]
fn decoded_pair_tile<const T: usize, W: Decode>(
    simd: V4,
    w: [W; 2],
    xs: &[XRow<'_>],
    out: [&mut [f32]; 2],
) {
    let f = &simd.avx512f;
    let x: [&[f32]; T] = std::array::from_fn(|t| xs[t].f);
    let mut acc = [[[f._mm512_setzero_ps(); 2]; T]; 2];
    for b in 0..w[0].blocks() {
        let wv = [w[0].decode(simd, b), w[1].decode(simd, b)];
        for t in 0..T {
            let xb = &x[t][b * QK..(b + 1) * QK];
            let (lo, hi) = (load(&xb[..16]), load(&xb[16..]));
            for k in 0..2 {
                acc[k][t][0] = f._mm512_fmadd_ps(wv[k][0], lo, acc[k][t][0]);
                acc[k][t][1] = f._mm512_fmadd_ps(wv[k][1], hi, acc[k][t][1]);
            }
        }
    }
    // Each dot is `hsum2` of its two accumulators, eight at a time.
    let zero = f._mm512_setzero_ps();
    let both: [__m512; 8] = std::array::from_fn(|j| {
        let (k, t) = (j / T, j % T);
        if k < 2 {
            f._mm512_add_ps(f._mm512_add_ps(zero, acc[k][t][0]), acc[k][t][1])
        } else {
            zero
        }
    });
    let sums = hsums8(simd, both);
    for (k, o) in out.into_iter().enumerate() {
        o[..T].copy_from_slice(&sums[k * T..(k + 1) * T]);
    }
}

/// Two weight rows against every activation row, in [`TILE`]-row chunks as [`decoded_row`]
/// (a lone row takes [`decoded_one`] for each weight row), so each row's dot is bit for bit
/// [`decoded_row`]'s.
pub(super) struct DecodedPair<'b, W> {
    pub simd: V4,
    pub w: [W; 2],
    pub xs: &'b [XRow<'b>],
    pub out: [&'b mut [f32]; 2],
}

impl<W: Decode> pulp::NullaryFnOnce for DecodedPair<'_, W> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        let DecodedPair { simd, w, xs, out } = self;
        let [o0, o1] = out;
        for ((x, a), b) in xs
            .chunks(TILE)
            .zip(o0.chunks_mut(TILE))
            .zip(o1.chunks_mut(TILE))
        {
            match x.len() {
                1 => {
                    a[0] = decoded_one(simd, w[0], &x[0]);
                    b[0] = decoded_one(simd, w[1], &x[0]);
                }
                2 => decoded_pair_tile::<2, W>(simd, w, x, [a, b]),
                3 => decoded_pair_tile::<3, W>(simd, w, x, [a, b]),
                TILE => decoded_pair_tile::<TILE, W>(simd, w, x, [a, b]),
                _ => unreachable!("chunks of at most TILE rows"),
            }
        }
    }
}

/// One weight row (Q4, Q5 or Q8), decoded to f32 a block at a time, against every activation
/// row (`out[i]` for `xs[i]`).
pub(super) struct DecodedRow<'b, W> {
    pub simd: V4,
    pub w: W,
    pub xs: &'b [XRow<'b>],
    pub out: &'b mut [f32],
}

impl<W: Decode> pulp::NullaryFnOnce for DecodedRow<'_, W> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        decoded_row(self.simd, self.w, self.xs, self.out)
    }
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
