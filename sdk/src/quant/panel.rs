//! The panel products (more than [`super::INT_ROWS`] activation rows): which kernel runs
//! ([`Simd::panel_task`]), how the rows are rounded into tiles ([`Simd::tiles`]), and what the
//! kernels read of a weight row: its blocks' codes as i16 pairs, scales and offsets, and how
//! the offset enters a dot.
//! Each kernel computes a dot exactly as [`super::act`]'s scalar dots do: the block's integer
//! sum (exact in i32), then `sum as f32 * (d * s)`, then the offset term, added to the running
//! f32 total block after block, one lane per dot.

use std::cell::Cell;

use super::act::{self, QAct, Tiles};
use super::{PANEL_TILE, Q4Row, Q5Row, Q8Row, QK, QMatrix, QRow, Simd};
#[cfg(target_arch = "x86_64")]
use super::{V4Vnni, avx2, avx512};

/// How a type's per-block offset enters a dot.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Offset {
    /// Q4: `+ m * sum`.
    Add,
    /// Q8, and Q5 (its codes read as `q - 16`): none.
    #[default]
    None,
}

/// [`Offset`]s as constants, for kernels generic over the kind.
pub(super) const ADD: u8 = 0;
pub(super) const NONE: u8 = 1;

impl Offset {
    /// The kind a constant names.
    #[inline(always)]
    pub const fn of(kind: u8) -> Offset {
        match kind {
            ADD => Offset::Add,
            _ => Offset::None,
        }
    }
}

/// A quantized weight row as the panel kernels read it.
pub(super) trait Panel: Copy {
    const OFFSET: Offset;
    /// The blocks' scales.
    fn d(&self) -> &[f32];
    /// Block `b`'s offset factor: `m` (Q4), 0 (Q5, Q8).
    fn offset(self, b: usize) -> f32;
    /// Block `b` as sixteen words: word `k` holds the codes of elements `2k` (low i16) and
    /// `2k + 1` (high i16), as [`super::act::Tiles`] holds the activations. The kernels decode
    /// in registers (`avx2::code_pairs`, `avx512::code_pairs`); this is their definition.
    #[cfg(test)]
    fn pairs(self, b: usize) -> [i32; 16];
}

/// Two codes as the i16 pair of one word.
#[cfg(test)]
fn pair(lo: i32, hi: i32) -> i32 {
    (lo & 0xffff) | (hi << 16)
}

impl Panel for Q4Row<'_> {
    const OFFSET: Offset = Offset::Add;
    #[inline(always)]
    fn d(&self) -> &[f32] {
        self.d
    }
    #[inline(always)]
    fn offset(self, b: usize) -> f32 {
        self.m[b]
    }
    #[cfg(test)]
    fn pairs(self, b: usize) -> [i32; 16] {
        let q = &self.qs[b * QK / 2..(b + 1) * QK / 2];
        // Byte `j` holds element `j` (low nibble) and `j + 16` (high).
        let code = |e: usize| {
            i32::from(if e < QK / 2 {
                q[e] & 0x0f
            } else {
                q[e - QK / 2] >> 4
            })
        };
        std::array::from_fn(|k| pair(code(2 * k), code(2 * k + 1)))
    }
}

/// Q5 codes `q` read as the 8-bit form's `q - 16`: the panels give the 8-bit form's numbers.
impl Panel for Q5Row<'_> {
    const OFFSET: Offset = Offset::None;
    #[inline(always)]
    fn d(&self) -> &[f32] {
        self.d
    }
    #[inline(always)]
    fn offset(self, _: usize) -> f32 {
        0.0
    }
    #[cfg(test)]
    fn pairs(self, b: usize) -> [i32; 16] {
        let c = super::q5_block(&self.qs[b * QK / 2..(b + 1) * QK / 2], self.qh[b]);
        let q = |k: usize| i32::from(c[k]) - 16;
        std::array::from_fn(|k| pair(q(2 * k), q(2 * k + 1)))
    }
}

impl Panel for Q8Row<'_> {
    const OFFSET: Offset = Offset::None;
    #[inline(always)]
    fn d(&self) -> &[f32] {
        self.d
    }
    #[inline(always)]
    fn offset(self, _: usize) -> f32 {
        0.0
    }
    #[cfg(test)]
    fn pairs(self, b: usize) -> [i32; 16] {
        let q = &self.qs[b * QK..(b + 1) * QK];
        std::array::from_fn(|k| pair(i32::from(q[2 * k]), i32::from(q[2 * k + 1])))
    }
}

/// A task's weight rows as the panel kernels read them: row `r`'s block `b` at `r nb + b`
/// (its code pairs, scale and offset factor), padded to a multiple of the kernel's group with
/// rows whose dots the kernels compute but never write.
#[derive(Default)]
pub(super) struct TaskRows {
    pub rows: usize,
    pub nb: usize,
    pub kind: Offset,
    pub pairs: Vec<[i32; 16]>,
    pub scale: Vec<f32>,
    pub offset: Vec<f32>,
}

thread_local! {
    /// The buffers of this thread's last [`TaskRows`], for its next: a product's tasks lay out
    /// the same sizes again and again, and a fresh layout of a few hundred KiB a task cost
    /// more than the products themselves at sixteen activation rows.
    static SPARE: Cell<TaskRows> = Cell::new(TaskRows::default());
}

impl TaskRows {
    /// Rows `first..first + rows` of `w`, `decode(row, b)` giving a block's pairs (with the
    /// widest vectors the CPU has), in the thread's spare buffers; [`TaskRows::recycle`] hands
    /// them back.
    #[inline(always)]
    pub fn new(
        w: &QMatrix,
        first: usize,
        rows: usize,
        group: usize,
        decode: impl Fn(QRow<'_>, usize) -> [i32; 16],
    ) -> TaskRows {
        let nb = w.cols / QK;
        let mut t = SPARE.take();
        t.rows = rows;
        t.nb = nb;
        t.kind = Offset::None;
        // Zeros only where the buffers grow. The padding rows may hold an earlier task's
        // codes and scales: the kernels compute their dots but never write them.
        let padded = rows.div_ceil(group) * group * nb;
        t.pairs.resize(padded, [0; 16]);
        t.scale.resize(padded, 0.0);
        t.offset.resize(padded, 0.0);
        if nb == 0 {
            return t;
        }
        let laid = t
            .pairs
            .chunks_exact_mut(nb)
            .zip(t.scale.chunks_exact_mut(nb))
            .zip(t.offset.chunks_exact_mut(nb));
        for (r, ((pairs, scale), offset)) in (first..first + rows).zip(laid) {
            // One match a row: each block's decoding is the type's own.
            t.kind = match w.q_row(r) {
                QRow::Q4(row) => lay_row(
                    row,
                    pairs,
                    scale,
                    offset,
                    #[inline(always)]
                    |b| decode(QRow::Q4(row), b),
                ),
                QRow::Q5(row) => lay_row(
                    row,
                    pairs,
                    scale,
                    offset,
                    #[inline(always)]
                    |b| decode(QRow::Q5(row), b),
                ),
                QRow::Q8(row) => lay_row(
                    row,
                    pairs,
                    scale,
                    offset,
                    #[inline(always)]
                    |b| decode(QRow::Q8(row), b),
                ),
            };
        }
        t
    }

    /// Gives the buffers back to the thread for its next task.
    pub fn recycle(self) {
        SPARE.set(self);
    }
}

/// Writes row `w`'s code pairs (`decode(b)`: block `b`'s), scales and offset factors; returns
/// its offset's kind.
#[inline(always)]
fn lay_row<W: Panel>(
    w: W,
    pairs: &mut [[i32; 16]],
    scale: &mut [f32],
    offset: &mut [f32],
    decode: impl Fn(usize) -> [i32; 16],
) -> Offset {
    for (b, p) in pairs.iter_mut().enumerate() {
        *p = decode(b);
    }
    scale.copy_from_slice(w.d());
    for (b, o) in offset.iter_mut().enumerate() {
        *o = w.offset(b);
    }
    W::OFFSET
}

/// Tiles for `n` f32 rows of `cols` values (`x`), each (tile, block) rounded by `round` (an
/// instruction set's [`act::TileBlock`]).
#[cfg(target_arch = "x86_64")]
fn from_f32<S: Copy + Sync>(
    simd: S,
    x: &[f32],
    n: usize,
    cols: usize,
    round: impl Fn(act::TileBlock<'_, S>) + Sync,
) -> Tiles {
    Tiles::with(n, cols / QK, |c, b, part| {
        round(act::TileBlock {
            simd,
            x,
            cols,
            n,
            c,
            b,
            part,
        })
    })
}

impl Simd {
    /// Whether [`Simd::tiles`] and [`Simd::panel_task`] read rounded rows ([`QAct`]) rather
    /// than the f32 rows.
    pub(super) fn panels_from_rows(self) -> bool {
        matches!(self, Simd::Scalar)
    }

    /// `x` (`n` rows of `cols`) rounded into the panel kernels' tiles; `qs` the rounded rows
    /// where [`Simd::panels_from_rows`].
    pub(super) fn tiles(self, x: &[f32], n: usize, cols: usize, qs: &[&QAct]) -> Tiles {
        match self {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512(simd) => from_f32(simd, x, n, cols, |block| simd.vectorize(block)),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2(simd) => from_f32(simd, x, n, cols, |block| simd.vectorize(block)),
            _ => Tiles::new(qs, cols / QK),
        }
    }

    /// Weight rows `first..` (as many as `out`, `[n, rows]`, holds) against more than
    /// [`INT_ROWS`] rounded activation rows: each dot bit for bit the scalar one ([`act::scalar_q4`] and its
    /// siblings) on every instruction set, so that batches and prompts give the same numbers
    /// on every machine.
    pub(super) fn panel_task(
        self,
        w: &QMatrix,
        first: usize,
        n: usize,
        xs: &[&QAct],
        tiles: Option<&Tiles>,
        out: &mut [&mut [f32]],
    ) {
        match (self, tiles) {
            // Up to eight rows, eight lanes a register (the AVX2 kernel) waste fewer lanes.
            #[cfg(target_arch = "x86_64")]
            (Simd::Avx512(v4), Some(tiles)) if n <= 8 => {
                let task = avx2::PanelTask {
                    simd: *v4,
                    decode: decoder(
                        #[inline(always)]
                        move |row: QRow<'_>, b: usize| avx512::code_pairs(v4, row, b),
                    ),
                    w,
                    first,
                    xs: tiles,
                    n,
                    out,
                };
                on_avx512(v4, task);
            }
            #[cfg(target_arch = "x86_64")]
            (Simd::Avx512(simd), Some(tiles)) => {
                let task = avx512::PanelTask {
                    simd,
                    w,
                    first,
                    xs: tiles,
                    n,
                    out,
                };
                if n <= PANEL_TILE {
                    // One tile (a batch decoding): blocks decoded beside their products.
                    on_avx512(simd, avx512::OneTile(task));
                } else {
                    on_avx512(simd, task);
                }
            }
            #[cfg(target_arch = "x86_64")]
            (Simd::Avx2(simd), Some(tiles)) => simd.vectorize(avx2::PanelTask {
                simd,
                decode: decoder(
                    #[inline(always)]
                    move |row: QRow<'_>, b: usize| avx2::code_pairs(simd, row, b),
                ),
                w,
                first,
                xs: tiles,
                n,
                out,
            }),
            _ => {
                let rows = out.first().map_or(0, |o| o.len());
                for (r, row) in (first..first + rows).map(|r| w.q_row(r)).enumerate() {
                    for (x, out) in xs.iter().zip(out.iter_mut()) {
                        out[r] = match row {
                            QRow::Q4(row) => act::scalar_q4(row, x),
                            QRow::Q5(row) => act::scalar_q5(row, x),
                            QRow::Q8(row) => act::scalar_q8(row, x),
                        };
                    }
                }
            }
        }
    }
}

/// Runs an AVX-512 kernel compiled with VNNI where the CPU has it (`madd` + `add` become
/// `vpdpwssd`), else without.
#[cfg(target_arch = "x86_64")]
fn on_avx512(v4: pulp::x86::V4, task: impl pulp::NullaryFnOnce<Output = ()>) {
    match V4Vnni::detect() {
        Some(vnni) => vnni.vectorize(task),
        None => v4.vectorize(task),
    }
}

/// A code decoder for the panel kernels, as written (a closure can carry `#[inline(always)]`
/// only as an argument; without it its intrinsics may become calls).
#[cfg(target_arch = "x86_64")]
pub(super) fn decoder<D: Fn(QRow<'_>, usize) -> [i32; 16]>(d: D) -> D {
    d
}
