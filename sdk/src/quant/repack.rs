//! GGUF block formats recast into the forms the kernels read: 4-bit codes with a scale and an
//! offset per 32 elements ([`Codes::Q4`]), 5-bit codes with a scale ([`Codes::Q5`]), and 8-bit
//! codes with a scale per 32 ([`Codes::Q8`]).
//!
//! - Q4_0, Q4_1 -> Q4 and Q8_0 -> Q8 keep their blocks.
//! - Q5_0 -> Q5 ([`Q5Form::Bits`], the default): the nibbles and the fifth bits as they are,
//!   the scale as f32; exact. Or -> Q8: the 5-bit code minus 16 is the 8-bit code; exact.
//! - Q4_K -> Q4: each 32-element sub-block has the scale `d sc` and offset `-dmin m` that
//!   ggml's own dequantization computes; the nibbles are reordered; exact.
//! - Q6_K -> Q8: two 16-element sub-blocks with their own scales share one 32-element Q8
//!   block, so the values are rounded again to 8 bits with the block's absolute maximum
//!   (error at most `max|v| / 254` per value, an eighth of a 6-bit step of the larger
//!   sub-block); exact where both sub-blocks have the same scale.
//!
//! Other types are not repacked: the caller keeps them f32.

use half::f16;

use super::ggml::{GgmlType, QK};
use super::kquant::{self, Q4_K_BYTES, Q5_0_BYTES, Q6_K_BYTES};
use super::{Codes, Q5Form};

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// The kernels' form of `bytes` (whole blocks of type `ty`), or `None` for a type without one.
pub(super) fn repack(ty: GgmlType, bytes: &[u8], q5: Q5Form) -> Option<Codes> {
    Some(match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let with_min = ty == GgmlType::Q4_1;
            let step = if with_min { 4 + QK / 2 } else { 2 + QK / 2 };
            let mut q4 = Q4Builder::with_blocks(bytes.len() / step);
            for b in bytes.chunks_exact(step) {
                let d = f16_at(b, 0);
                let (m, qs) = if with_min {
                    (f16_at(b, 2), &b[4..])
                } else {
                    (-8.0 * d, &b[2..])
                };
                q4.push_packed(d, m, qs);
            }
            q4.finish()
        }
        GgmlType::Q8_0 => {
            let mut q8 = Q8Builder::with_blocks(bytes.len() / (2 + QK));
            for b in bytes.chunks_exact(2 + QK) {
                q8.push(f16_at(b, 0), b[2..].iter().map(|&q| q as i8));
            }
            q8.finish()
        }
        GgmlType::Q5_0 if q5 == Q5Form::Bytes => {
            let mut q8 = Q8Builder::with_blocks(bytes.len() / Q5_0_BYTES);
            for b in bytes.chunks_exact(Q5_0_BYTES) {
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                let codes = super::q5_block(&b[6..22], qh);
                q8.push(f16_at(b, 0), codes.iter().map(|&c| c as i8 - 16));
            }
            q8.finish()
        }
        GgmlType::Q5_0 => {
            let n = bytes.len() / Q5_0_BYTES;
            let (mut d, mut qs, mut qh) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n * QK / 2),
                Vec::with_capacity(n),
            );
            for b in bytes.chunks_exact(Q5_0_BYTES) {
                d.push(f16_at(b, 0));
                qh.push(u32::from_le_bytes([b[2], b[3], b[4], b[5]]));
                qs.extend_from_slice(&b[6..22]);
            }
            Codes::Q5 { d, qs, qh }
        }
        GgmlType::Q4K => {
            let mut q4 = Q4Builder::with_blocks(bytes.len() / Q4_K_BYTES * 8);
            for b in bytes.chunks_exact(Q4_K_BYTES) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let qs = &b[16..144];
                for sub in 0..8 {
                    let (sc, m) = kquant::scale_min(sub, &b[4..16]);
                    let nibbles = &qs[sub / 2 * 32..][..32];
                    let mut codes = [0u8; QK];
                    for (c, &n) in codes.iter_mut().zip(nibbles) {
                        *c = if sub % 2 == 0 { n & 0x0f } else { n >> 4 };
                    }
                    q4.push_codes(d * sc, -(dmin * m), &codes);
                }
            }
            q4.finish()
        }
        GgmlType::Q6K => {
            let mut q8 = Q8Builder::with_blocks(bytes.len() / Q6_K_BYTES * 8);
            let mut values = Vec::with_capacity(kquant::QK_K);
            for b in bytes.chunks_exact(Q6_K_BYTES) {
                values.clear();
                kquant::q6_k(b, &mut values);
                let scales = &b[192..208];
                for (k, block) in values.chunks_exact(QK).enumerate() {
                    let (sa, sb) = (scales[2 * k] as i8, scales[2 * k + 1] as i8);
                    if sa == sb {
                        let d = f16_at(b, 208) * f32::from(sa);
                        q8.push(d, block.iter().map(|&v| code(v, d)));
                    } else {
                        let amax = block.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                        let d = amax / 127.0;
                        q8.push(d, block.iter().map(|&v| code(v, d)));
                    }
                }
            }
            q8.finish()
        }
        _ => return None,
    })
}

/// `v / d` rounded to an 8-bit code (0 when the scale is 0).
fn code(v: f32, d: f32) -> i8 {
    if d == 0.0 {
        0
    } else {
        (v / d).round().clamp(-128.0, 127.0) as i8
    }
}

struct Q4Builder {
    d: Vec<f32>,
    m: Vec<f32>,
    qs: Vec<u8>,
}

impl Q4Builder {
    fn with_blocks(n: usize) -> Q4Builder {
        Q4Builder {
            d: Vec::with_capacity(n),
            m: Vec::with_capacity(n),
            qs: Vec::with_capacity(n * QK / 2),
        }
    }

    /// A block already in GGUF's nibble order (element `j` low, `j + 16` high).
    fn push_packed(&mut self, d: f32, m: f32, qs: &[u8]) {
        self.d.push(d);
        self.m.push(m);
        self.qs.extend_from_slice(&qs[..QK / 2]);
    }

    /// A block of 32 codes in `0..16`, in element order.
    fn push_codes(&mut self, d: f32, m: f32, codes: &[u8; QK]) {
        self.d.push(d);
        self.m.push(m);
        let (lo, hi) = codes.split_at(QK / 2);
        self.qs.extend(lo.iter().zip(hi).map(|(l, h)| l | (h << 4)));
    }

    fn finish(self) -> Codes {
        Codes::Q4 {
            d: self.d,
            m: self.m,
            qs: self.qs,
        }
    }
}

struct Q8Builder {
    d: Vec<f32>,
    qs: Vec<i8>,
}

impl Q8Builder {
    fn with_blocks(n: usize) -> Q8Builder {
        Q8Builder {
            d: Vec::with_capacity(n),
            qs: Vec::with_capacity(n * QK),
        }
    }

    fn push(&mut self, d: f32, codes: impl Iterator<Item = i8>) {
        self.d.push(d);
        self.qs.extend(codes);
    }

    fn finish(self) -> Codes {
        Codes::Q8 {
            d: self.d,
            qs: self.qs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Path, Q5Form, QMatrix};
    use crate::quant::ggml::{GgmlType, dequantize};

    /// Random blocks of `ty` with finite, modest scales (f16 bytes patched in).
    fn random_blocks(ty: GgmlType, blocks: usize, seed: u64) -> Vec<u8> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (_, size) = ty.block_layout().unwrap();
        let mut out = vec![0u8; blocks * size];
        rng.fill(&mut out[..]);
        let scale = |rng: &mut rand::rngs::StdRng| {
            half::f16::from_f32(rng.random_range(0.001f32..0.05)).to_le_bytes()
        };
        for b in out.chunks_exact_mut(size) {
            match ty {
                GgmlType::Q5_0 => b[0..2].copy_from_slice(&scale(&mut rng)),
                GgmlType::Q4K => {
                    b[0..2].copy_from_slice(&scale(&mut rng));
                    b[2..4].copy_from_slice(&scale(&mut rng));
                }
                GgmlType::Q6K => {
                    b[208..210].copy_from_slice(&scale(&mut rng));
                    // Some equal neighbouring scales: the exact branch.
                    b[194] = b[195];
                }
                _ => unreachable!(),
            }
        }
        out
    }

    /// Rows decoded from the kernels' form equal ggml's dequantization: exactly for Q5_0 (both
    /// forms) and Q4_K, within the documented bound for Q6_K.
    #[test]
    fn repacked_rows_equal_the_dequantized_file() {
        let (rows, cols) = (3, 512);
        for (ty, seed, q5) in [
            (GgmlType::Q5_0, 1, Q5Form::Bytes),
            (GgmlType::Q5_0, 1, Q5Form::Bits),
            (GgmlType::Q4K, 2, Q5Form::Bytes),
            (GgmlType::Q6K, 3, Q5Form::Bytes),
        ] {
            let (block, _) = ty.block_layout().unwrap();
            let bytes = random_blocks(ty, rows * cols / block, seed);
            let want = dequantize(ty, &bytes, rows * cols).unwrap();
            let m = QMatrix::from_gguf_as("t", ty, &bytes, rows, cols, q5).unwrap();
            let path = match (ty, q5) {
                (GgmlType::Q5_0, Q5Form::Bits) => Path::Q5,
                (GgmlType::Q4K, _) => Path::Q4,
                _ => Path::Q8,
            };
            assert_eq!(m.path(), path, "{ty:?} as {q5:?}");
            let got = m.rows_f32(0..rows);
            for (i, (w, g)) in want.chunks(32).zip(got.chunks(32)).enumerate() {
                let amax = w.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                let bound = if ty == GgmlType::Q6K {
                    amax / 254.0 * 1.001
                } else {
                    1e-6 * amax
                };
                for (x, y) in w.iter().zip(g) {
                    assert!((x - y).abs() <= bound, "{ty:?} block {i}: {x} vs {y}");
                }
            }
        }
    }
}
