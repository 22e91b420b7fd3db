//! ggml's tensor types: their block layouts and dequantization (the k-quants in `kquant`).

use half::f16;

use super::kquant;

/// Elements in one block of the 32-element types (Q4_0, Q4_1, Q5_0, Q8_0).
pub const QK: usize = 32;

/// Tensor bytes that do not hold what their type and shape say.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BlockError(pub String);

/// The ggml tensor types known by number (only some can be dequantized).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// Blocks of 32: f16 scale, 32 x 4-bit, value = (q - 8) * d.
    Q4_0,
    /// Blocks of 32: f16 scale and min, 32 x 4-bit, value = q * d + m.
    Q4_1,
    /// Blocks of 32: f16 scale, 32 x i8, value = q * d.
    Q8_0,
    /// Blocks of 32: f16 scale, 32 x 5-bit, value = (q - 16) * d.
    Q5_0,
    /// Blocks of 32: f16 scale and min, 32 x 5-bit, value = q * d + m.
    Q5_1,
    /// Super-blocks of 256: eight sub-blocks with 6-bit scales and mins, 4-bit values.
    Q4K,
    /// Super-blocks of 256: as Q4K with 5-bit values.
    Q5K,
    /// Super-blocks of 256: sixteen sub-blocks with i8 scales, 6-bit values.
    Q6K,
    /// A type this reader recognizes but cannot dequantize (K-quants, bf16, ...), by number.
    Other(u32),
}

impl GgmlType {
    /// The type of ggml's type number `v`.
    pub fn from_number(v: u32) -> GgmlType {
        match v {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            other => GgmlType::Other(other),
        }
    }

    /// ggml's number for this type (what a GGUF file stores).
    pub fn number(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::Other(v) => v,
        }
    }

    /// `(elements per block, bytes per block)`, or `None` for a type this reader cannot size.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        match self {
            GgmlType::F32 => Some((1, 4)),
            GgmlType::F16 => Some((1, 2)),
            GgmlType::Q4_0 => Some((QK, 2 + QK / 2)),
            GgmlType::Q4_1 => Some((QK, 4 + QK / 2)),
            GgmlType::Q8_0 => Some((QK, 2 + QK)),
            GgmlType::Q5_0 => Some((QK, kquant::Q5_0_BYTES)),
            GgmlType::Q5_1 => Some((QK, kquant::Q5_1_BYTES)),
            GgmlType::Q4K => Some((kquant::QK_K, kquant::Q4_K_BYTES)),
            GgmlType::Q5K => Some((kquant::QK_K, kquant::Q5_K_BYTES)),
            GgmlType::Q6K => Some((kquant::QK_K, kquant::Q6_K_BYTES)),
            GgmlType::Other(_) => None,
        }
    }
}

/// Dequantizes `n` elements of type `ty` from `bytes` (which must be exactly their size).
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>, BlockError> {
    let (block, block_bytes) = ty
        .block_layout()
        .ok_or_else(|| BlockError(format!("unsupported tensor type {ty:?}")))?;
    if !n.is_multiple_of(block) || bytes.len() != n / block * block_bytes {
        return Err(BlockError(format!(
            "{n} elements of {ty:?} do not fit {} bytes",
            bytes.len()
        )));
    }
    let mut out = Vec::with_capacity(n);
    let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    match ty {
        GgmlType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        GgmlType::F16 => out.extend(bytes.chunks_exact(2).map(|b| f16_at(b, 0))),
        GgmlType::Q8_0 => {
            for b in bytes.chunks_exact(block_bytes) {
                let d = f16_at(b, 0);
                out.extend(b[2..].iter().map(|&q| f32::from(q as i8) * d));
            }
        }
        GgmlType::Q4_0 => {
            for b in bytes.chunks_exact(block_bytes) {
                let d = f16_at(b, 0);
                let qs = &b[2..];
                // Low nibbles are elements 0..16, high nibbles 16..32.
                out.extend(qs.iter().map(|&q| (f32::from(q & 0x0f) - 8.0) * d));
                out.extend(qs.iter().map(|&q| (f32::from(q >> 4) - 8.0) * d));
            }
        }
        GgmlType::Q4_1 => {
            for b in bytes.chunks_exact(block_bytes) {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                let qs = &b[4..];
                out.extend(qs.iter().map(|&q| f32::from(q & 0x0f) * d + m));
                out.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            for b in bytes.chunks_exact(block_bytes) {
                kquant::q5(b, ty == GgmlType::Q5_1, &mut out);
            }
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            for b in bytes.chunks_exact(block_bytes) {
                kquant::q4_5_k(b, ty == GgmlType::Q5K, &mut out);
            }
        }
        GgmlType::Q6K => {
            for b in bytes.chunks_exact(block_bytes) {
                kquant::q6_k(b, &mut out);
            }
        }
        GgmlType::Other(_) => unreachable!("block_layout returned Some"),
    }
    Ok(out)
}
