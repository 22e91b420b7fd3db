//! `exp` of f32 vectors, the same value for every input as glibc's `expf` (the algorithm of
//! ARM's optimized routines: a 32-entry table of `2^(i/32)` and a cubic in double precision,
//! its multiply-adds fused), eight lanes at a time with AVX-512, four with AVX2. The decoder
//! and MiniLM call it for the attention's softmax and SwiGLU's sigmoid, which `f32::exp` ran
//! one value at a time; since
//! the function is the same, so is every output bit (`tests::matches_libm_everywhere`). The
//! portable path computes the same function, so results no longer depend on the host's libm.

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::{__m128, __m256, __m256d, __m256i, __m512d, __m512i};

use super::Simd;

/// `2^(i/32)` rounded to the nearest double, less `i << 47` (what the exponent bits add back).
const TABLE: [u64; 32] = [
    0x3ff0000000000000,
    0x3fefd9b0d3158574,
    0x3fefb5586cf9890f,
    0x3fef9301d0125b51,
    0x3fef72b83c7d517b,
    0x3fef54873168b9aa,
    0x3fef387a6e756238,
    0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715,
    0x3feef1a7373aa9cb,
    0x3feedea64c123422,
    0x3feece086061892d,
    0x3feebfdad5362a27,
    0x3feeb42b569d4f82,
    0x3feeab07dd485429,
    0x3feea47eb03a5585,
    0x3feea09e667f3bcd,
    0x3fee9f75e8ec5f74,
    0x3feea11473eb0187,
    0x3feea589994cce13,
    0x3feeace5422aa0db,
    0x3feeb737b0cdc5e5,
    0x3feec49182a3f090,
    0x3feed503b23e255d,
    0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47,
    0x3fef199bdd85529c,
    0x3fef3720dcef9069,
    0x3fef5818dcfba487,
    0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da,
    0x3fefd0765b6e4540,
];
/// `32 / ln 2`.
const INV_LN2_N: f64 = f64::from_bits(0x3ff71547652b82fe) * 32.0;
/// `1.5 * 2^52`: adding it rounds to an integer, which lands in the low mantissa bits.
const SHIFT: f64 = f64::from_bits(0x4338000000000000);
/// The cubic's coefficients for `2^(r/32)`, `r` in `[-1/2, 1/2]`.
const C0: f64 = f64::from_bits(0x3fac6af84b912394) / 32.0 / 32.0 / 32.0;
const C1: f64 = f64::from_bits(0x3fcebfce50fac4f3) / 32.0 / 32.0;
const C2: f64 = f64::from_bits(0x3fe62e42ff0c52d6) / 32.0;
/// Below this (about -103.97), `exp` rounds to zero; above [`OVERFLOW`] (about 88.72), to
/// infinity.
const UNDERFLOW: f32 = f32::from_bits(0xc2cff1b4);
const OVERFLOW: f32 = f32::from_bits(0x42b17217);

/// `exp(x)`, the same value as glibc's `expf` for every `x`.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    if !in_range(x) {
        return if x.is_nan() {
            x + x
        } else if x > 0.0 {
            f32::INFINITY
        } else {
            0.0
        };
    }
    let xd = f64::from(x);
    let kd = INV_LN2_N.mul_add(xd, SHIFT);
    let ki = kd.to_bits();
    let kd = kd - SHIFT;
    let r = INV_LN2_N.mul_add(xd, -kd);
    let t = TABLE[(ki % 32) as usize].wrapping_add(ki << 47);
    let s = f64::from_bits(t);
    let z = C0.mul_add(r, C1);
    let y = C2.mul_add(r, 1.0);
    let y = z.mul_add(r * r, y);
    (y * s) as f32
}

/// Whether `exp(x)` is finite and not zero (false for NaN): the vector paths' range.
#[inline(always)]
fn in_range(x: f32) -> bool {
    (UNDERFLOW..=OVERFLOW).contains(&x)
}

/// Every element `x` of `xs` becomes `exp(x)` ([`exp`]).
pub fn exp_in_place(xs: &mut [f32]) {
    match Simd::detect() {
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512(simd) => simd.vectorize(ExpOf { simd, xs }),
        // Compiled for the CPU's vectors: with AVX2 + FMA the multiply-adds are instructions;
        // without the feature each was a call to a software `fma` (a third of MiniLM's scoring
        // under AVX2). The same values either way: a fused multiply-add is exact.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2(simd) => simd.vectorize(ExpOf { simd, xs }),
        _ => super::with_simd(
            #[inline(always)]
            || {
                for x in xs.iter_mut() {
                    *x = exp(*x);
                }
            },
        ),
    }
}

/// `exp` of eight values, all [`in_range`], on one instruction set's vectors.
#[cfg(target_arch = "x86_64")]
trait Eights: Copy {
    fn exp8(self, lanes: [f32; 8]) -> [f32; 8];
}

/// [`exp_in_place`] on `simd`'s vectors, as a task its features are compiled for.
#[cfg(target_arch = "x86_64")]
struct ExpOf<'a, E> {
    simd: E,
    xs: &'a mut [f32],
}

#[cfg(target_arch = "x86_64")]
impl<E: Eights> pulp::NullaryFnOnce for ExpOf<'_, E> {
    type Output = ();

    /// Eight values at a time where all eight are in range; the others (NaN, values past the
    /// range) and a last short chunk take the scalar code.
    #[inline(always)]
    fn call(self) {
        let ExpOf { simd, xs } = self;
        let mut chunks = xs.chunks_exact_mut(8);
        for c in &mut chunks {
            let lanes: [f32; 8] = match (&*c).try_into() {
                Ok(a) => a,
                Err(_) => unreachable!("8 values"),
            };
            if lanes.iter().all(|&x| in_range(x)) {
                c.copy_from_slice(&simd.exp8(lanes));
            } else {
                for x in c.iter_mut() {
                    *x = exp(*x);
                }
            }
        }
        for x in chunks.into_remainder() {
            *x = exp(*x);
        }
    }
}

/// AVX2: two vectors of four doubles. The table is read one load a lane: AVX2 permutes no
/// doubles across a register by a vector of indices, and a 32-entry lookup in registers (eight
/// `vpermd` and a tree of blends) ran no faster than the scalar code, where the loads take half
/// its time.
#[cfg(target_arch = "x86_64")]
impl Eights for pulp::x86::V3 {
    #[inline(always)]
    fn exp8(self, lanes: [f32; 8]) -> [f32; 8] {
        let a = &self.avx;
        let x: __m256 = pulp::cast(lanes);
        let lo = exp4(self, a._mm256_cvtps_pd(a._mm256_castps256_ps128(x)));
        let hi = exp4(self, a._mm256_cvtps_pd(a._mm256_extractf128_ps::<1>(x)));
        pulp::cast(a._mm256_set_m128(hi, lo))
    }
}

/// [`exp`] of four doubles whose values are [`in_range`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn exp4(simd: pulp::x86::V3, xd: __m256d) -> __m128 {
    let (a, a2, f) = (&simd.avx, &simd.avx2, &simd.fma);
    let kd = f._mm256_fmadd_pd(a._mm256_set1_pd(INV_LN2_N), xd, a._mm256_set1_pd(SHIFT));
    let ki = a._mm256_castpd_si256(kd);
    let kd = a._mm256_sub_pd(kd, a._mm256_set1_pd(SHIFT));
    let r = f._mm256_fmsub_pd(a._mm256_set1_pd(INV_LN2_N), xd, kd);
    // Entry `ki % 32`, one load a lane.
    let at: [u64; 4] = pulp::cast(ki);
    let t: [u64; 4] = std::array::from_fn(|l| TABLE[(at[l] % 32) as usize]);
    let t: __m256i = pulp::cast(t);
    let s = a._mm256_castsi256_pd(a2._mm256_add_epi64(t, a2._mm256_slli_epi64::<47>(ki)));
    let z = f._mm256_fmadd_pd(a._mm256_set1_pd(C0), r, a._mm256_set1_pd(C1));
    let y = f._mm256_fmadd_pd(a._mm256_set1_pd(C2), r, a._mm256_set1_pd(1.0));
    let y = f._mm256_fmadd_pd(z, a._mm256_mul_pd(r, r), y);
    a._mm256_cvtpd_ps(a._mm256_mul_pd(y, s))
}

/// AVX-512: one vector of eight doubles, the table in four registers.
#[cfg(target_arch = "x86_64")]
impl Eights for pulp::x86::V4 {
    #[inline(always)]
    fn exp8(self, lanes: [f32; 8]) -> [f32; 8] {
        let f = &self.avx512f;
        let table: [__m512i; 4] = std::array::from_fn(|i| {
            let part: [u64; 8] = std::array::from_fn(|j| TABLE[8 * i + j]);
            pulp::cast(part)
        });
        let pd = |v: f64| f._mm512_set1_pd(v);
        let xd: __m512d = f._mm512_cvtps_pd(pulp::cast::<[f32; 8], __m256>(lanes));
        let kd = f._mm512_fmadd_pd(pd(INV_LN2_N), xd, pd(SHIFT));
        let ki = f._mm512_castpd_si512(kd);
        let kd = f._mm512_sub_pd(kd, pd(SHIFT));
        let r = f._mm512_fmsub_pd(pd(INV_LN2_N), xd, kd);
        // The table's entry `ki % 32`: two 16-entry lookups on the low four bits, the fifth
        // bit picks between them.
        let low = f._mm512_permutex2var_epi64(table[0], ki, table[1]);
        let high = f._mm512_permutex2var_epi64(table[2], ki, table[3]);
        let upper = f._mm512_test_epi64_mask(ki, f._mm512_set1_epi64(16));
        let t = f._mm512_mask_blend_epi64(upper, low, high);
        let t = f._mm512_add_epi64(t, f._mm512_slli_epi64::<47>(ki));
        let s = f._mm512_castsi512_pd(t);
        let z = f._mm512_fmadd_pd(pd(C0), r, pd(C1));
        let y = f._mm512_fmadd_pd(pd(C2), r, pd(1.0));
        let y = f._mm512_fmadd_pd(z, f._mm512_mul_pd(r, r), y);
        pulp::cast(f._mm512_cvtpd_ps(f._mm512_mul_pd(y, s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `step`-th f32 bit pattern, and the range's edges.
    fn inputs(step: u32) -> Vec<f32> {
        let mut v: Vec<f32> = (0..=u32::MAX / step)
            .map(|i| f32::from_bits(i * step))
            .collect();
        v.extend([
            0.0,
            -0.0,
            UNDERFLOW,
            UNDERFLOW.next_down(),
            UNDERFLOW.next_up(),
            OVERFLOW,
            OVERFLOW.next_up(),
            OVERFLOW.next_down(),
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -88.0,
            -103.9,
            32.564632,
        ]);
        v
    }

    #[test]
    fn the_table_holds_powers_of_two_and_the_edges_saturate() {
        for (i, &t) in TABLE.iter().enumerate() {
            let v = f64::from_bits(t.wrapping_add((i as u64) << 47));
            assert!(
                (v - (i as f64 / 32.0).exp2()).abs() <= f64::EPSILON * 2.0,
                "entry {i}"
            );
        }
        assert_eq!(SHIFT, 1.5 * (1u64 << 52) as f64);
        assert_eq!(exp(UNDERFLOW.next_down()), 0.0);
        assert!(exp(UNDERFLOW) > 0.0);
        assert_eq!(exp(OVERFLOW.next_up()), f32::INFINITY);
        assert!(exp(OVERFLOW).is_finite());
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
    }

    /// `xs` through the path picked at run time and, where the CPU has it, AVX2's (what a CPU
    /// without AVX-512 runs).
    fn every_path(xs: &[f32]) -> Vec<(&'static str, Vec<f32>)> {
        let mut picked = xs.to_vec();
        exp_in_place(&mut picked);
        let mut out = vec![("picked", picked)];
        #[cfg(target_arch = "x86_64")]
        if let Some(v3) = pulp::x86::V3::try_new() {
            let mut avx2 = xs.to_vec();
            v3.vectorize(ExpOf {
                simd: v3,
                xs: &mut avx2,
            });
            out.push(("avx2", avx2));
        }
        out
    }

    /// On glibc, `f32::exp` is the same function: compare over a spread of all f32 values
    /// (an exhaustive run of every pattern agreed too).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn matches_libm_everywhere() {
        let xs = inputs(251);
        for (path, ys) in every_path(&xs) {
            for (&x, &y) in xs.iter().zip(&ys) {
                let want = x.exp();
                assert!(
                    want.to_bits() == y.to_bits() || (want.is_nan() && y.is_nan()),
                    "{path}: exp({x:e}) = {want:e}, got {y:e}"
                );
                let scalar = exp(x);
                assert!(scalar.to_bits() == y.to_bits() || (scalar.is_nan() && y.is_nan()));
            }
        }
    }

    #[test]
    fn vector_and_scalar_paths_agree() {
        let xs: Vec<f32> = inputs(4099)
            .into_iter()
            .filter(|x| x.abs() < 200.0)
            .collect();
        for (path, ys) in every_path(&xs) {
            for (x, y) in xs.iter().zip(&ys) {
                assert_eq!(exp(*x).to_bits(), y.to_bits(), "{path}: exp({x:e})");
            }
        }
    }
}
