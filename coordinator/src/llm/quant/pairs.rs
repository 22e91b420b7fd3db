//! The order in which Q8 codes and integer activations are stored: blocks in pairs, each block
//! split into its elements `4j, 4j + 1` (the first half, `P`) and `4j + 2, 4j + 3` (the second,
//! `Q`), `j = 0..8`. A pair of blocks `b, b + 1` is stored `P_b P_b+1 Q_b Q_b+1` (16 values
//! each); a row's last block, when it has no partner, `P_b Q_b`.
//!
//! Why: widened to 16 bits, the 32 values `P_b P_b+1` and the 32 of `Q_b Q_b+1` are two
//! registers whose 16-bit products `madd` sums two at a time into the same 32-bit lanes:
//! lane `j` of block `b` gets elements `4j..4j + 4` from the two registers together, the
//! partition of the kernels' earlier 8-bit products (`maddubs` then `madd`), so the sums and
//! everything after them are the same bit for bit with half the multiplies.

use super::QK;

/// Values in a half block.
const HALF: usize = QK / 2;

/// Where element `e` (`0..32`) of a block sits in its half, and which half (0 = `P`, 1 = `Q`).
#[inline(always)]
fn place(e: usize) -> (usize, usize) {
    (e / 2 % 2, e / 4 * 2 + e % 2)
}

/// A row of `blocks` blocks (`natural`, element order) in the pair order.
pub(super) fn to_pairs<T: Copy + Default>(natural: &[T]) -> Vec<T> {
    let blocks = natural.len() / QK;
    let mut out = vec![T::default(); natural.len()];
    for first in (0..blocks).step_by(2) {
        let group = (blocks - first).min(2);
        let base = first * QK;
        for k in 0..group {
            for (e, &v) in natural[base + k * QK..][..QK].iter().enumerate() {
                let (half, at) = place(e);
                out[base + half * group * HALF + k * HALF + at] = v;
            }
        }
    }
    out
}

/// Block `b`'s halves `P_b`, `Q_b` in a row of `blocks` blocks stored in the pair order.
#[inline(always)]
pub(super) fn halves<T>(row: &[T], blocks: usize, b: usize) -> (&[T], &[T]) {
    let first = b / 2 * 2;
    let group = (blocks - first).min(2);
    let at = first * QK + (b - first) * HALF;
    (
        &row[at..at + HALF],
        &row[at + group * HALF..at + group * HALF + HALF],
    )
}

/// A block's 32 values in element order from its halves: 16-bit units taken in turn.
#[inline(always)]
pub(super) fn interleave<T: Copy>(p: &[T], q: &[T]) -> [T; QK] {
    std::array::from_fn(|e| {
        let (half, at) = place(e);
        if half == 0 { p[at] } else { q[at] }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every block reads back in element order, for rows of even and odd block counts, and
    /// a pair's `P` halves (and `Q` halves) are 32 contiguous values.
    #[test]
    fn blocks_read_back_in_element_order() {
        for blocks in [1usize, 2, 3, 4, 7] {
            let natural: Vec<i16> = (0..(blocks * QK) as i16).collect();
            let row = to_pairs(&natural);
            let mut sorted = row.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, natural, "a permutation ({blocks} blocks)");
            for b in 0..blocks {
                let (p, q) = halves(&row, blocks, b);
                assert_eq!(
                    interleave(p, q)[..],
                    natural[b * QK..(b + 1) * QK],
                    "block {b}"
                );
                // P holds elements 4j, 4j + 1.
                assert_eq!(p[2], natural[b * QK + 4]);
                assert_eq!(q[1], natural[b * QK + 3]);
            }
            for first in (0..blocks.saturating_sub(1)).step_by(2) {
                let (p0, _) = halves(&row, blocks, first);
                let (p1, q0) = (
                    halves(&row, blocks, first + 1).0,
                    halves(&row, blocks, first).1,
                );
                let base = first * QK;
                assert_eq!(p0.as_ptr(), row[base..].as_ptr());
                assert_eq!(p1.as_ptr(), row[base + HALF..].as_ptr());
                assert_eq!(q0.as_ptr(), row[base + QK..].as_ptr());
            }
        }
    }
}
