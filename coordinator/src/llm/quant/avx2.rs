//! AVX2 + FMA kernels: the integer dots read one block (32 codes) per register; the decoded
//! dots turn a block into 32 f32 weights in registers, shared by a tile of activation rows;
//! the f32 tile serves f32 weights and decoded panels. The f32 kernels keep several
//! accumulators a row so that FMAs do not wait on each other (one accumulator left a single
//! row's product bound by FMA latency, at a tenth of the machine's rate).

use core::arch::x86_64::{__m128i, __m256, __m256i};
use pulp::x86::V3;

use super::act::{LO_STEPS, QAct};
use super::{Q4Row, Q5Row, Q8Row, QK, QRow, TILE, XRow};

#[inline(always)]
fn load8(x: &[f32]) -> __m256 {
    let a: [f32; 8] = match x.try_into() {
        Ok(a) => a,
        Err(_) => unreachable!("8 values"),
    };
    pulp::cast(a)
}

#[inline(always)]
fn load32(x: &[i8]) -> __m256i {
    let a: [i8; 32] = match x.try_into() {
        Ok(a) => a,
        Err(_) => unreachable!("32 bytes"),
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
fn nibbles(simd: V3, raw: &[u8]) -> __m256i {
    let a: [u8; 16] = match raw.try_into() {
        Ok(a) => a,
        Err(_) => unreachable!("16 bytes"),
    };
    let r: __m128i = pulp::cast(a);
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
fn q5_codes(simd: V3, raw: &[u8], qh: u32) -> __m256i {
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
        (nibbles(simd, &self.qs[b * QK / 2..(b + 1) * QK / 2]), None)
    }
}

impl<'a> IntRow<'a> for Q5Row<'a> {
    #[inline(always)]
    fn d(self) -> &'a [f32] {
        self.d
    }
    #[inline(always)]
    fn offset(self, b: usize) -> f32 {
        -16.0 * self.d[b]
    }
    #[inline(always)]
    fn codes(self, simd: V3, b: usize) -> (__m256i, Option<__m256i>) {
        (
            q5_codes(simd, &self.qs[b * QK / 2..(b + 1) * QK / 2], self.qh[b]),
            None,
        )
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
        let w = load32(&self.qs[b * QK..(b + 1) * QK]);
        (simd.avx2._mm256_abs_epi8(w), Some(w))
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
    for (b, &dw) in w.d().iter().enumerate() {
        let (codes, sign) = w.codes(simd, b);
        let m = w.offset(b);
        for t in 0..T {
            let x = xs[t];
            let mut h = load32(&x.hi[b * QK..(b + 1) * QK]);
            let mut l = load32(&x.lo[b * QK..(b + 1) * QK]);
            if let Some(sign) = sign {
                h = simd.avx2._mm256_sign_epi8(h, sign);
                l = simd.avx2._mm256_sign_epi8(l, sign);
            }
            let s = simd.avx._mm256_set1_ps(dw * x.scale[b]);
            acc[t] = simd
                .fma
                ._mm256_fmadd_ps(block_sums(simd, codes, h, l), s, acc[t]);
            offset[t] += m * x.sum[b];
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

    /// One or two activation rows: eight dots' lanes summed at once ([`hsums8`]), each dot
    /// the same as [`row_dots`]'s.
    #[inline(always)]
    fn task_dots(self, w: &super::QMatrix, first: usize, xs: &[&QAct], out: &mut [f32]) {
        let n = xs.len();
        let zero = self.avx._mm256_setzero_ps();
        super::in_groups_of_eight(
            self,
            w,
            first,
            xs,
            out,
            // Inlined into the instruction set's context, or the intrinsics become calls.
            #[inline(always)]
            |row0, o| {
                let mut v = [zero; 8];
                let mut offsets = [0.0f32; 8];
                for (i, (lanes, offs)) in v
                    .chunks_exact_mut(n)
                    .zip(offsets.chunks_exact_mut(n))
                    .enumerate()
                {
                    let (acc, off) = match w.q_row(row0 + i) {
                        QRow::Q4(r) => few_sums(self, r, xs),
                        QRow::Q5(r) => few_sums(self, r, xs),
                        QRow::Q8(r) => few_sums(self, r, xs),
                    };
                    for (l, a) in lanes.iter_mut().zip(acc) {
                        *l = self.avx._mm256_add_ps(zero, a);
                    }
                    offs.copy_from_slice(&off[..n]);
                }
                let sums = hsums8(self, v);
                for ((o, s), off) in o.iter_mut().zip(sums).zip(offsets) {
                    *o = s + off;
                }
            },
        );
    }
}

/// [`int_sums`] of one or two activation rows, padded to two (zeros).
#[inline(always)]
fn few_sums<'a>(simd: V3, w: impl IntRow<'a>, xs: &[&QAct]) -> ([__m256; 2], [f32; 2]) {
    let zero = simd.avx._mm256_setzero_ps();
    match *xs {
        [a] => {
            let (acc, off) = int_sums(simd, w, [a]);
            ([acc[0], zero], [off[0], 0.0])
        }
        [a, b] => int_sums(simd, w, [a, b]),
        _ => unreachable!("one or two activation rows"),
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
    fn decode(self, simd: V3, b: usize) -> [__m256; 4];
}

/// Unsigned codes in the low eight bytes of `v` as `q d + m`.
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

/// A block's unsigned codes, elements 0..16 in `lo` and 16..32 in `hi`, as four registers of
/// `q d + m`.
#[inline(always)]
fn widen_block(simd: V3, lo: __m128i, hi: __m128i, d: __m256, m: __m256) -> [__m256; 4] {
    [
        widen_u8(simd, lo, d, m),
        widen_u8(simd, simd.sse2._mm_srli_si128::<8>(lo), d, m),
        widen_u8(simd, hi, d, m),
        widen_u8(simd, simd.sse2._mm_srli_si128::<8>(hi), d, m),
    ]
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
        widen_block(simd, lo, hi, d, m)
    }
}

impl Decode for Q5Row<'_> {
    #[inline(always)]
    fn blocks(self) -> usize {
        self.d.len()
    }

    #[inline(always)]
    fn decode(self, simd: V3, b: usize) -> [__m256; 4] {
        let codes = q5_codes(simd, &self.qs[b * QK / 2..(b + 1) * QK / 2], self.qh[b]);
        let lo = simd.avx._mm256_castsi256_si128(codes);
        let hi = simd.avx2._mm256_extracti128_si256::<1>(codes);
        let d = simd.avx._mm256_set1_ps(self.d[b]);
        let m = simd.avx._mm256_set1_ps(-16.0 * self.d[b]);
        widen_block(simd, lo, hi, d, m)
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
fn decoded_dots(simd: V3, w: impl Decode, xs: &[XRow<'_>]) -> [f32; TILE] {
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
    // `hsum` of each row's pair of accumulators, the rows' sums at once.
    let zero = simd.avx._mm256_setzero_ps();
    let sums = hsums8(
        simd,
        std::array::from_fn(|j| match acc.get(j) {
            Some(a) => simd
                .avx
                ._mm256_add_ps(simd.avx._mm256_add_ps(zero, a[0]), a[1]),
            None => zero,
        }),
    );
    let n = xs.len();
    out[..n].copy_from_slice(&sums[..n]);
    out
}

/// One weight row (Q4, Q5 or Q8), decoded to f32, against up to [`TILE`] f32 activation rows.
pub(super) struct DecodedDot<'b, W> {
    pub simd: V3,
    pub w: W,
    pub xs: &'b [XRow<'b>],
}

impl<W: Decode> pulp::NullaryFnOnce for DecodedDot<'_, W> {
    type Output = [f32; TILE];

    #[inline(always)]
    fn call(self) -> [f32; TILE] {
        decoded_dots(self.simd, self.w, self.xs)
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
