//! GELU in its exact erf form, `x/2 (1 + erf(x / sqrt 2))`, and its derivative, for scoring and
//! training on the CPU. erf is a rational function of `x` (odd degree-13 numerator over an
//! even degree-8 denominator, inputs clamped to [-4, 4] where erf is 1 in f32), so GELU takes
//! no exponential; the derivative's density takes [`exp_approx`]. Both compile for the
//! CPU's widest vectors.

use crate::quant;

/// `erf(x)`, absolute error under 5e-7.
#[inline(always)]
pub(super) fn erf(x: f32) -> f32 {
    const ALPHA: [f32; 7] = [
        -2.726_142_3e-10,
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.954_6e-3,
        -1.609_603_3e-2,
    ];
    const BETA: [f32; 5] = [
        -1.456_607_2e-5,
        -2.133_740_6e-4,
        -1.682_827e-3,
        -7.373_329e-3,
        -1.426_474e-2,
    ];
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = ALPHA[1..].iter().fold(ALPHA[0], |p, &a| p * x2 + a) * x;
    let q = BETA[1..].iter().fold(BETA[0], |q, &b| q * x2 + b);
    // Near +-4 the quotient rounds a step past 1.
    (p / q).clamp(-1.0, 1.0)
}

/// `e^x` for `x <= 0` (inputs below -80 taken as -80), relative error under 3e-7: `2^n`
/// from the exponent bits times a degree-7 series for `e^y`, `y = x - n ln 2`, `|y| <= ln 2 / 2`.
#[inline(always)]
pub(super) fn exp_approx(x: f32) -> f32 {
    /// `1.5 * 2^23`: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = if x < -80.0 { -80.0 } else { x };
    /// `ln 2` in two parts, the first exact in few bits, so that `x - n ln 2` keeps its
    /// digits (Cody and Waite).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let y = (x - n * LN2_HI) - n * LN2_LO;
    const C: [f32; 8] = [
        1.0 / 5040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ];
    let p = C[1..].iter().fold(C[0], |p, &c| p * y + c);
    let k = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    f32::from_bits((p.to_bits() as i32 + (k << 23)) as u32)
}

/// `x <- gelu(x)` for each of `xs`.
pub(super) fn gelu_in_place(xs: &mut [f32]) {
    quant::with_simd(
        #[inline(always)]
        || {
            for x in xs.iter_mut() {
                *x = 0.5 * *x * (1.0 + erf(*x * std::f32::consts::FRAC_1_SQRT_2));
            }
        },
    );
}

/// `dg <- dg * gelu'(u)`, `gelu'(u) = Phi(u) + u phi(u)`.
pub(super) fn gelu_grad_in_place(u: &[f32], dg: &mut [f32]) {
    /// `1 / sqrt(2 pi)`.
    const DENSITY: f32 = 0.398_942_3;
    quant::with_simd(
        #[inline(always)]
        || {
            for (dg, &x) in dg.iter_mut().zip(u) {
                let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
                *dg *= cdf + x * DENSITY * exp_approx(-0.5 * x * x);
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf's own series (in f64 it holds to about 1e-12 up to |x| = 4; past that erf is 1
    /// in f32 and the series loses its digits).
    fn erf_series(x: f64) -> f64 {
        if x.abs() > 4.0 {
            return x.signum();
        }
        let mut sum = 0.0;
        let mut term = x;
        for n in 0..200 {
            sum += term / (2 * n + 1) as f64;
            term *= -x * x / (n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    fn grid() -> Vec<f32> {
        (-800..=800).map(|i| i as f32 / 100.0).collect()
    }

    #[test]
    fn erf_follows_its_series() {
        for x in grid() {
            let want = erf_series(f64::from(x));
            assert!(
                (f64::from(erf(x)) - want).abs() < 5e-7,
                "erf({x}) = {}, want {want}",
                erf(x)
            );
        }
    }

    #[test]
    fn exp_approx_follows_exp() {
        for i in 0..=8_000 {
            let x = -(i as f32) / 100.0;
            let want = f64::from(x).exp();
            let got = f64::from(exp_approx(x));
            assert!(
                (got - want).abs() <= 3e-7 * want,
                "exp({x}) = {got}, want {want}"
            );
        }
        assert!(exp_approx(-1e6) > 0.0 && exp_approx(-1e6) < 1e-34);
    }

    #[test]
    fn gelu_and_its_gradient_follow_the_erf_form() {
        let xs = grid();
        let mut g = xs.clone();
        gelu_in_place(&mut g);
        let mut dg = vec![1.0f32; xs.len()];
        gelu_grad_in_place(&xs, &mut dg);
        for ((&x, &g), &dg) in xs.iter().zip(&g).zip(&dg) {
            let x = f64::from(x);
            let cdf = 0.5 * (1.0 + erf_series(x / 2f64.sqrt()));
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            assert!((f64::from(g) - x * cdf).abs() < 2e-6, "gelu({x}) = {g}");
            assert!(
                (f64::from(dg) - (cdf + x * pdf)).abs() < 2e-6,
                "gelu'({x}) = {dg}"
            );
        }
    }
}
