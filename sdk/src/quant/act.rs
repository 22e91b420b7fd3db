//! Activations rounded for the integer kernels, and the portable integer dots that the SIMD
//! kernels are held to.
//!
//! Each 32-element block of an activation row is written as two 8-bit parts on one scale,
//! `x ~ s (128 h + l)` with `h` in `-127..=127` and `l` in `-64..=64`: about 15 bits, so a
//! product moves the logits by thousandths, where one 8-bit part (llama.cpp's) moved them by
//! tenths. Weight codes times each part are 8-bit integer products (`maddubs` on x86), summed
//! exactly in i32; the block's scales and Q4's offset (`m` times the block's exact f32 sum)
//! are applied in f32.

use rayon::prelude::*;

use super::{PANEL_TILE, Q4Row, Q5Row, Q8Row, QK, q5_block};

/// Steps of the low part per step of the high part.
pub(super) const LO_STEPS: i32 = 128;

/// One activation row in integer form. Blocks are padded to an even count (zeros), so that the
/// kernels can read blocks in pairs.
#[derive(Debug, Clone)]
pub(super) struct QAct {
    /// High parts, `QK` per block.
    pub hi: Vec<i8>,
    /// Low parts, `QK` per block.
    pub lo: Vec<i8>,
    /// `s` per block: the value of one low step.
    pub scale: Vec<f32>,
    /// Exact f32 sum of each block's values (for Q4's offset).
    pub sum: Vec<f32>,
    /// Per pair of blocks, their two scales each repeated over eight lanes (the layout of the
    /// AVX-512 kernels' block sums).
    pub pair_scale: Vec<[f32; 16]>,
    /// Per pair of blocks, their sums over eight each repeated over eight lanes (exact: a
    /// power of two), so that eight lanes of offsets times these sum to `m` times the sum.
    pub pair_sum: Vec<[f32; 16]>,
}

/// 1.5 * 2^23: adding it to an f32 below 2^22 in magnitude leaves no fraction bits.
pub(super) const ROUND_MAGIC: f32 = 12_582_912.0;

/// Rounds to the nearest integer (ties to even) for `|v| < 2^22`, without a libm call.
#[inline(always)]
fn round_small(v: f32) -> f32 {
    (v + ROUND_MAGIC) - ROUND_MAGIC
}

impl QAct {
    /// Rounds `x` (a multiple of `QK` values).
    pub fn new(x: &[f32]) -> QAct {
        let nb = x.len() / QK;
        let padded = nb.div_ceil(2) * 2;
        let mut a = QAct {
            hi: vec![0; padded * QK],
            lo: vec![0; padded * QK],
            scale: vec![0.0; padded],
            sum: vec![0.0; padded],
            pair_scale: Vec::new(),
            pair_sum: Vec::new(),
        };
        for (b, xb) in x.chunks_exact(QK).enumerate() {
            a.sum[b] = xb.iter().sum();
            let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            if amax == 0.0 || !amax.is_finite() {
                // All zeros, or a non-finite value: the sum carries it (NaN stays NaN).
                if !amax.is_finite() {
                    a.sum[b] = f32::NAN;
                }
                continue;
            }
            let d = amax / 127.0;
            let (inv, lo_inv) = (1.0 / d, LO_STEPS as f32 / d);
            for (j, &v) in xb.iter().enumerate() {
                let h = round_small(v * inv);
                a.hi[b * QK + j] = h as i8;
                a.lo[b * QK + j] = round_small((v - h * d) * lo_inv) as i8;
            }
            a.scale[b] = d / LO_STEPS as f32;
        }
        a.pair_scale = a
            .scale
            .chunks_exact(2)
            .map(|s| std::array::from_fn(|lane| s[lane / 8]))
            .collect();
        a.pair_sum = a
            .sum
            .chunks_exact(2)
            .map(|s| std::array::from_fn(|lane| s[lane / 8] / 8.0))
            .collect();
        a
    }

    /// Block `b` as [`Tiles`] holds it: word `k` the values `128 h + l` of elements `2k`
    /// (low i16) and `2k + 1` (high i16).
    fn words(&self, b: usize) -> [i32; QK / 2] {
        let (h, l) = self.block(b);
        let value = |i: usize| LO_STEPS * i32::from(h[i]) + i32::from(l[i]);
        std::array::from_fn(|k| (value(2 * k) & 0xffff) | (value(2 * k + 1) << 16))
    }

    /// The high and low parts of block `b`.
    fn block(&self, b: usize) -> (&[i8], &[i8]) {
        (
            &self.hi[b * QK..(b + 1) * QK],
            &self.lo[b * QK..(b + 1) * QK],
        )
    }
}

/// Rounded activation rows in tiles of [`PANEL_TILE`], as the panel kernels read them: within
/// tile `c`, block `b`'s pair `k` of row `t` ([`QAct`]'s `128 h + l` of elements `2k` and
/// `2k + 1` as two i16; in range, `|128 h + l| <= 16320`) is word `(b 16 + k) T + t`, its
/// scale and sum are at `b T + t`. Rows past the last are zeros. (Adjacent elements, so that a
/// block's words are its 32 values in order: the weight codes' widenings give that order.)
#[derive(Debug, Clone)]
pub(super) struct Tiles {
    /// Blocks a row.
    blocks: usize,
    pairs: Vec<i32>,
    scale: Vec<f32>,
    sum: Vec<f32>,
}

/// One block of one tile of [`Tiles`], to fill: `pairs[k T + t]`, `scale[t]`, `sum[t]`.
pub(super) struct TilePart<'a> {
    pub pairs: &'a mut [i32],
    pub scale: &'a mut [f32],
    pub sum: &'a mut [f32],
}

/// One tile of [`Tiles`].
#[derive(Clone, Copy)]
pub(super) struct Tile<'a> {
    pub pairs: &'a [i32],
    pub scale: &'a [f32],
    pub sum: &'a [f32],
}

impl Tiles {
    /// The first `blocks` blocks of each row of `xs`.
    pub fn new(xs: &[&QAct], blocks: usize) -> Tiles {
        Tiles::with(xs.len(), blocks, |c, b, part| {
            for (t, x) in xs.iter().skip(c * PANEL_TILE).take(PANEL_TILE).enumerate() {
                part.scale[t] = x.scale[b];
                part.sum[t] = x.sum[b];
                for (k, w) in x.words(b).into_iter().enumerate() {
                    part.pairs[k * PANEL_TILE + t] = w;
                }
            }
        })
    }

    /// Tiles for `n` rows of `blocks` blocks, `fill(c, b, part)` writing block `b` of tile
    /// `c` (zeros before), a (tile, block) a rayon task.
    pub fn with(
        n: usize,
        blocks: usize,
        fill: impl Fn(usize, usize, TilePart<'_>) + Sync,
    ) -> Tiles {
        const T: usize = PANEL_TILE;
        let count = n.div_ceil(T);
        let mut tiles = Tiles {
            blocks,
            pairs: vec![0; count * blocks * QK / 2 * T],
            scale: vec![0.0; count * blocks * T],
            sum: vec![0.0; count * blocks * T],
        };
        tiles
            .pairs
            .par_chunks_mut(QK / 2 * T)
            .zip(tiles.scale.par_chunks_mut(T))
            .zip(tiles.sum.par_chunks_mut(T))
            .enumerate()
            .with_min_len(4)
            .for_each(|(j, ((pairs, scale), sum))| {
                let (c, b) = (j / blocks.max(1), j % blocks.max(1));
                fill(c, b, TilePart { pairs, scale, sum });
            });
        tiles
    }

    /// Every word, scale and sum, as bits (tests compare tiles built two ways).
    #[cfg(test)]
    pub fn bits(&self) -> (Vec<i32>, Vec<u32>, Vec<u32>) {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect();
        (self.pairs.clone(), bits(&self.scale), bits(&self.sum))
    }

    /// Tile `c` (rows `c T..`).
    pub fn tile(&self, c: usize) -> Tile<'_> {
        let (per_pairs, per) = (self.blocks * QK / 2 * PANEL_TILE, self.blocks * PANEL_TILE);
        Tile {
            pairs: &self.pairs[c * per_pairs..(c + 1) * per_pairs],
            scale: &self.scale[c * per..(c + 1) * per],
            sum: &self.sum[c * per..(c + 1) * per],
        }
    }
}

/// Block `b` of tile `c` of [`Tiles`], to round from `n` f32 rows of `cols` values (`x`) into
/// `part`, each row's block as [`QAct::new`] rounds it, bit for bit: the SIMD kernels (in
/// `avx2` and `avx512`) run the same f32 operations on whole vectors, sum each block in the
/// same order, and hand [`TilePart::by_qact`] the blocks whose values or steps are not finite.
pub(super) struct TileBlock<'a, S> {
    pub simd: S,
    pub x: &'a [f32],
    pub cols: usize,
    pub n: usize,
    pub c: usize,
    pub b: usize,
    pub part: TilePart<'a>,
}

impl TilePart<'_> {
    /// Row `t`'s block `xb` as [`QAct::new`] rounds it: its sum and scale written, its sixteen
    /// words returned. The kernels that round tiles from f32 rows hand it the blocks whose
    /// values or steps are not finite, where `QAct`'s saturating casts decide.
    pub fn by_qact(&mut self, t: usize, xb: &[f32]) -> [i32; QK / 2] {
        let q = QAct::new(xb);
        self.sum[t] = q.sum[0];
        self.scale[t] = q.scale[0];
        q.words(0)
    }
}

/// `sum_j w_j (128 h_j + l_j)` over one block, exactly.
fn int_dot(w: impl Iterator<Item = i32>, h: &[i8], l: &[i8]) -> i32 {
    w.zip(h.iter().zip(l))
        .map(|(w, (&h, &l))| w * (LO_STEPS * i32::from(h) + i32::from(l)))
        .sum()
}

/// Portable Q4 row dot: codes `q` (value `q d + m`) against a rounded activation row.
pub(super) fn scalar_q4(w: Q4Row<'_>, x: &QAct) -> f32 {
    let mut acc = 0.0f32;
    for b in 0..w.d.len() {
        let q = &w.qs[b * QK / 2..(b + 1) * QK / 2];
        let codes = q
            .iter()
            .map(|c| i32::from(c & 0x0f))
            .chain(q.iter().map(|c| i32::from(c >> 4)));
        let (h, l) = x.block(b);
        acc += int_dot(codes, h, l) as f32 * (w.d[b] * x.scale[b]) + w.m[b] * x.sum[b];
    }
    acc
}

/// Portable Q5 row dot: codes `q` (value `(q - 16) d`) taken as the 8-bit codes `q - 16`,
/// so that both forms of a Q5_0 matrix give the same numbers ([`scalar_q8`]'s).
pub(super) fn scalar_q5(w: Q5Row<'_>, x: &QAct) -> f32 {
    let mut acc = 0.0f32;
    for b in 0..w.d.len() {
        let codes = q5_block(&w.qs[b * QK / 2..(b + 1) * QK / 2], w.qh[b]);
        let (h, l) = x.block(b);
        let codes = codes.iter().map(|&c| i32::from(c) - 16);
        acc += int_dot(codes, h, l) as f32 * (w.d[b] * x.scale[b]);
    }
    acc
}

/// Portable Q8 row dot.
pub(super) fn scalar_q8(w: Q8Row<'_>, x: &QAct) -> f32 {
    let mut acc = 0.0f32;
    for b in 0..w.d.len() {
        let codes = w.qs[b * QK..(b + 1) * QK].iter().map(|&q| i32::from(q));
        let (h, l) = x.block(b);
        acc += int_dot(codes, h, l) as f32 * (w.d[b] * x.scale[b]);
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_within_half_a_low_step() {
        let x: Vec<f32> = (0..96)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.173)
            .collect();
        let a = QAct::new(&x);
        assert_eq!(a.hi.len(), 4 * QK, "three blocks padded to four");
        for (i, &v) in x.iter().enumerate() {
            let b = i / QK;
            let back = a.scale[b] * (LO_STEPS as f32 * f32::from(a.hi[i]) + f32::from(a.lo[i]));
            assert!(
                (back - v).abs() <= a.scale[b] * 0.5001,
                "{i}: {back} vs {v}"
            );
            assert!(a.lo[i].unsigned_abs() <= 64);
        }
        assert_eq!(round_small(2.5), 2.0);
        assert_eq!(round_small(-3.5), -4.0);
        assert_eq!(round_small(126.6), 127.0);
        let zeros = QAct::new(&[0.0; QK]);
        assert!(zeros.hi.iter().chain(&zeros.lo).all(|&q| q == 0));
        let mut bad = vec![1.0; QK];
        bad[3] = f32::INFINITY;
        assert!(QAct::new(&bad).sum[0].is_nan());
    }
}
