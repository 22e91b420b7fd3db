//! Dequantization of the GGUF block formats that k-quant files (Q4_K_M, Q5_K_M, ...) mix in:
//! Q5_0 and Q5_1 (32-element blocks with a fifth bit per element) and the 256-element
//! "super-blocks" Q4_K, Q5_K and Q6_K, whose sub-blocks carry their own 6- or 8-bit scales.
//! Layouts follow ggml's block structs; each function takes whole blocks and appends their
//! values. Tested against the `gguf` Python package's dequantization (`tests` below).

use half::f16;

/// Elements per super-block of the K formats.
pub const QK_K: usize = 256;
/// Bytes of a Q5_0 block: f16 d, u32 high bits, 16 bytes of low nibbles.
pub const Q5_0_BYTES: usize = 22;
/// Bytes of a Q5_1 block: f16 d, f16 m, u32 high bits, 16 bytes of low nibbles.
pub const Q5_1_BYTES: usize = 24;
/// Bytes of a Q4_K block: f16 d, f16 dmin, 12 bytes of packed 6-bit scales and mins, 128 of nibbles.
pub const Q4_K_BYTES: usize = 144;
/// Bytes of a Q5_K block: Q4_K's plus 32 bytes of high bits.
pub const Q5_K_BYTES: usize = 176;
/// Bytes of a Q6_K block: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 i8 scales, f16 d.
pub const Q6_K_BYTES: usize = 210;

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Q5_0 / Q5_1: element `j` of the 32 takes its low nibble from byte `j % 16` (low half for
/// `j < 16`) and its fifth bit from bit `j` of `qh`; value `(q - 16) d` (Q5_0) or `q d + m`.
pub fn q5(block: &[u8], with_min: bool, out: &mut Vec<f32>) {
    let d = f16_at(block, 0);
    let (m, rest) = if with_min {
        (f16_at(block, 2), &block[4..])
    } else {
        (0.0, &block[2..])
    };
    let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
    let qs = &rest[4..20];
    let value = |q: u32| {
        if with_min {
            q as f32 * d + m
        } else {
            (q as f32 - 16.0) * d
        }
    };
    for (j, &b) in qs.iter().enumerate() {
        let hi = (qh >> j) & 1;
        out.push(value(u32::from(b & 0x0f) | (hi << 4)));
    }
    for (j, &b) in qs.iter().enumerate() {
        let hi = (qh >> (j + 16)) & 1;
        out.push(value(u32::from(b >> 4) | (hi << 4)));
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) from Q4_K/Q5_K's 12 packed bytes: the
/// first four sub-blocks keep theirs in the low 6 bits of bytes 0..4 and 4..8; the last four
/// combine a nibble of bytes 8..12 with the top two bits of those first bytes.
pub fn scale_min(j: usize, s: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    };
    (f32::from(sc), f32::from(m))
}

/// Q4_K / Q5_K: eight sub-blocks of 32, value `d sc_j q - dmin m_j`; 64 elements share 32
/// bytes of nibbles (low nibbles first); Q5_K's fifth bits come from `qh`, two bit planes per
/// 64 elements.
pub fn q4_5_k(block: &[u8], five_bits: bool, out: &mut Vec<f32>) {
    let d = f16_at(block, 0);
    let dmin = f16_at(block, 2);
    let scales = &block[4..16];
    let (qh, qs) = if five_bits {
        (&block[16..48], &block[48..176])
    } else {
        (&block[0..0], &block[16..144])
    };
    for chunk in 0..4 {
        let q = &qs[chunk * 32..chunk * 32 + 32];
        for half in 0..2 {
            let (sc, m) = scale_min(2 * chunk + half, scales);
            let (d1, m1) = (d * sc, dmin * m);
            let plane = 2 * chunk + half;
            for (l, &b) in q.iter().enumerate() {
                let low = if half == 0 { b & 0x0f } else { b >> 4 };
                let high = if five_bits {
                    ((qh[l] >> plane) & 1) << 4
                } else {
                    0
                };
                out.push(d1 * f32::from(low | high) - m1);
            }
        }
    }
}

/// Q6_K: sixteen sub-blocks of 16 with i8 scales; 6-bit values (low nibble from `ql`, two
/// high bits from `qh`) minus 32, times `d` and the sub-block's scale. Each half of 128
/// elements uses 64 bytes of `ql` and 32 of `qh`.
pub fn q6_k(block: &[u8], out: &mut Vec<f32>) {
    let ql = &block[0..128];
    let qh = &block[128..192];
    let sc = &block[192..208];
    let d = f16_at(block, 208);
    for half in 0..2 {
        let (ql, qh, sc) = (&ql[half * 64..], &qh[half * 32..], &sc[half * 8..]);
        let mut y = [0.0f32; 128];
        for l in 0..32 {
            let is = l / 16;
            let h = qh[l];
            let q1 = i32::from((ql[l] & 0x0f) | ((h & 3) << 4)) - 32;
            let q2 = i32::from((ql[l + 32] & 0x0f) | (((h >> 2) & 3) << 4)) - 32;
            let q3 = i32::from((ql[l] >> 4) | (((h >> 4) & 3) << 4)) - 32;
            let q4 = i32::from((ql[l + 32] >> 4) | (((h >> 6) & 3) << 4)) - 32;
            let s = |k: usize| d * f32::from(sc[is + k] as i8);
            y[l] = s(0) * q1 as f32;
            y[l + 32] = s(2) * q2 as f32;
            y[l + 64] = s(4) * q3 as f32;
            y[l + 96] = s(6) * q4 as f32;
        }
        out.extend_from_slice(&y);
    }
}

#[cfg(test)]
mod tests {
    use super::super::ggml::{GgmlType, dequantize};

    /// Blocks of random bytes (scales kept finite) and the `gguf` Python package's
    /// dequantization of them, from `scripts/kquant-fixture.py`.
    const FIXTURE: &str = include_str!("kquant-fixture.json");

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn matches_the_gguf_package() {
        let fixture: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
        let cases = fixture.as_array().unwrap();
        let mut types = Vec::new();
        for case in cases {
            let ty = GgmlType::from_number(case["type"].as_u64().unwrap() as u32);
            let bytes = hex(case["bytes"].as_str().unwrap());
            let want: Vec<f32> = case["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let got = dequantize(ty, &bytes, want.len()).unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                    "{ty:?} element {i}: {g} against {w}"
                );
            }
            types.push(ty);
        }
        for ty in [
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q4K,
            GgmlType::Q5K,
            GgmlType::Q6K,
        ] {
            assert!(types.contains(&ty), "no case of {ty:?}");
        }
    }
}
