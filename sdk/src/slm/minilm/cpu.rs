//! MiniLM for scoring on the CPU, on the SDK's integer kernels ([`crate::quant`]): the burn
//! model's linear weights read once and rounded to 16-bit codes on a scale per output channel
//! ([`ChannelMatrix`]; its word embeddings gathered from burn's own table), each activation
//! row rounded on a scale of its own per product, every text its own sequence (no padding
//! computed).
//! This serves scoring on the Flex device; training takes the same products in
//! [`super::backprop`].

use burn::nn::{LayerNorm, Linear};
use burn::tensor::{Int, Tensor, TensorData};
use rayon::prelude::*;
use std::sync::Mutex;

use super::attention;
use super::gelu::gelu_in_place;
use super::params::{self, values};
use super::{BertConfig, MiniLmClassifier};
use crate::quant::{self, ChannelMatrix, RowCodes};
use crate::slm::CpuScorer;
use crate::sync::lock;
use crate::{Error, Result};

/// Rows a rayon task of the embeddings' norm takes.
const CHUNK_ROWS: usize = 16;
/// The most rows a task of a layer's row-wise part takes: the feed-forward weights stay in
/// L2 while its blocks of rows pass.
const TASK_ROWS: usize = 64;

/// The classifier's forward pass on the CPU kernels.
#[derive(Debug)]
pub struct CpuMiniLm {
    d: usize,
    heads: usize,
    eps: f32,
    vocab: usize,
    /// Word embeddings `[vocab, d]`: burn's own table (a shared handle, not a copy: 47 MB for
    /// MiniLM), whose rows a batch gathers.
    word: Tensor<2>,
    /// Position embeddings `[positions, d]`.
    position: Vec<f32>,
    /// Segment 0's embedding `[d]` (single-segment input).
    segment: Vec<f32>,
    embed_norm: Norm,
    layers: Vec<Layer>,
    /// The classification head `[labels, d]` and its bias, f32 (one row per text).
    head: Vec<f32>,
    head_bias: Vec<f32>,
    /// The last batch's scratch, for the next batch: a fresh one spends the first layer
    /// allocating (and the kernel zeroing) memory. A batch scored meanwhile takes a fresh one.
    spare: Mutex<Option<Scratch>>,
}

/// A batch's intermediate products, reused by every layer (not zeroed again each time).
#[derive(Debug, Default)]
struct Scratch {
    qkv: [Vec<f32>; 3],
    context: Vec<f32>,
    /// What the tasks of a layer's row-wise parts borrow.
    tasks: Mutex<Vec<TaskScratch>>,
}

/// One task's rows through a layer's products, kept from task to task.
#[derive(Debug, Default)]
struct TaskScratch {
    codes: RowCodes,
    attended: Vec<f32>,
    hidden: Vec<f32>,
    down: Vec<f32>,
}

/// A [`TaskScratch`] taken from a pool, given back when the task is done.
struct Lent<'a> {
    pool: &'a Mutex<Vec<TaskScratch>>,
    scratch: Option<TaskScratch>,
}

impl<'a> Lent<'a> {
    fn from(pool: &'a Mutex<Vec<TaskScratch>>) -> Lent<'a> {
        let scratch = lock(pool).pop().unwrap_or_default();
        Lent {
            pool,
            scratch: Some(scratch),
        }
    }

    fn get(&mut self) -> &mut TaskScratch {
        self.scratch.get_or_insert_with(TaskScratch::default)
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.scratch.take() {
            lock(self.pool).push(s);
        }
    }
}

/// One encoder layer.
#[derive(Debug)]
struct Layer {
    query: ChannelMatrix,
    key: ChannelMatrix,
    value: ChannelMatrix,
    output: ChannelMatrix,
    attention_norm: Norm,
    intermediate: ChannelMatrix,
    down: ChannelMatrix,
    norm: Norm,
}

/// Layer norm parameters.
#[derive(Debug)]
struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

/// A linear layer's `[out, in]` weight and bias on the kernels.
fn dense(l: &Linear) -> Result<ChannelMatrix> {
    let (w, b) = params::linear(l)?;
    let (dout, din) = (b.len(), w.len() / b.len().max(1));
    ChannelMatrix::new(&w, &b, dout, din)
        .map_err(|e| Error::Model(format!("linear {din}x{dout}: {e}")))
}

impl Norm {
    fn new(n: &LayerNorm) -> Result<Norm> {
        let (gamma, beta) = params::norm(n)?;
        Ok(Norm { gamma, beta })
    }

    /// Every row of `x` (`d` values) becomes `norm(row + add)`.
    fn residual_rows(&self, x: &mut [f32], add: &[f32], d: usize, eps: f32) {
        quant::with_simd(
            #[inline(always)]
            || {
                for (row, add) in x.chunks_exact_mut(d).zip(add.chunks_exact(d)) {
                    self.residual(row, add, eps);
                }
            },
        )
    }

    /// `row <- norm(row + add)` (biased variance, as burn's and BERT's).
    #[inline(always)]
    fn residual(&self, row: &mut [f32], add: &[f32], eps: f32) {
        for (x, a) in row.iter_mut().zip(add) {
            *x += a;
        }
        self.apply(row, eps);
    }

    #[inline(always)]
    fn apply(&self, row: &mut [f32], eps: f32) {
        let d = row.len() as f32;
        let mean = lane_sum(row, |x| x) / d;
        let var = lane_sum(row, |x| (x - mean) * (x - mean)) / d;
        let inv = 1.0 / (var + eps).sqrt();
        for ((x, g), b) in row.iter_mut().zip(&self.gamma).zip(&self.beta) {
            *x = (*x - mean) * inv * g + b;
        }
    }
}

impl CpuMiniLm {
    /// Reads `model`'s weights (the burn classifier of `cfg`).
    pub fn new(model: &MiniLmClassifier, cfg: &BertConfig) -> Result<CpuMiniLm> {
        let e = &model.encoder.embeddings;
        let d = cfg.hidden_size;
        let layers = model
            .encoder
            .layers
            .iter()
            .map(|l| {
                let a = &l.attention;
                Ok(Layer {
                    query: dense(&a.query)?,
                    key: dense(&a.key)?,
                    value: dense(&a.value)?,
                    output: dense(&a.output)?,
                    attention_norm: Norm::new(&a.norm)?,
                    intermediate: dense(&l.intermediate)?,
                    down: dense(&l.output)?,
                    norm: Norm::new(&l.norm)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // The layer's row-wise passes and attention take rows `d` wide from these products.
        for l in &layers {
            for (name, m) in [
                ("query", &l.query),
                ("key", &l.key),
                ("value", &l.value),
                ("output", &l.output),
                ("down", &l.down),
            ] {
                if m.rows() != d {
                    return Err(Error::Model(format!(
                        "the {name} product has {} outputs, the model is {d} wide",
                        m.rows()
                    )));
                }
            }
        }
        let (head, head_bias) = params::linear(&model.head)?;
        let mut segment = values(e.token_type.weight.val())?;
        if segment.len() < d {
            return Err(Error::Model("the segment table has no row 0".into()));
        }
        segment.truncate(d);
        Ok(CpuMiniLm {
            d,
            heads: cfg.num_attention_heads,
            eps: cfg.layer_norm_eps as f32,
            vocab: cfg.vocab_size,
            word: e.word.weight.val(),
            position: values(e.position.weight.val())?,
            segment,
            embed_norm: Norm::new(&e.norm)?,
            layers,
            head,
            head_bias,
            spare: Mutex::new(None),
        })
    }

    fn positions(&self) -> usize {
        self.position.len() / self.d
    }

    /// Mean-pooled last hidden states, one row per sequence.
    pub(super) fn pooled(&self, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let d = self.d;
        for s in seqs {
            if s.len() > self.positions() {
                return Err(Error::Model(format!(
                    "a sequence of {} tokens exceeds the model's {} positions",
                    s.len(),
                    self.positions()
                )));
            }
            if let Some(&id) = s.iter().find(|&&id| id as usize >= self.vocab) {
                return Err(Error::Model(format!(
                    "token id {id} is outside the vocabulary of {}",
                    self.vocab
                )));
            }
        }
        let n: usize = seqs.iter().map(|s| s.len()).sum();
        if n == 0 {
            return Ok(vec![vec![0.0; d]; seqs.len()]);
        }
        let ids: Vec<i64> = seqs
            .iter()
            .flat_map(|s| s.iter().map(|&id| i64::from(id)))
            .collect();
        let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [n]), &self.word.device());
        let mut x = values(self.word.clone().select(0, ids))?;
        let mut rows = x.chunks_exact_mut(d);
        for s in seqs {
            for (t, row) in (0..s.len()).zip(rows.by_ref()) {
                let p = &self.position[t * d..][..d];
                for ((o, p), g) in row.iter_mut().zip(p).zip(&self.segment) {
                    *o = *o + p + g;
                }
            }
        }
        x.par_chunks_mut(d * CHUNK_ROWS).for_each(|c| {
            quant::with_simd(
                #[inline(always)]
                || {
                    for row in c.chunks_exact_mut(d) {
                        self.embed_norm.apply(row, self.eps);
                    }
                },
            )
        });
        let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        let mut scratch = lock(&self.spare).take().unwrap_or_default();
        for layer in &self.layers {
            self.layer(layer, &mut x, &lens, &mut scratch);
        }
        *lock(&self.spare) = Some(scratch);
        let mut out = Vec::with_capacity(seqs.len());
        let mut at = 0;
        for &len in &lens {
            let mut mean = vec![0.0f32; d];
            for row in x[at * d..(at + len) * d].chunks_exact(d) {
                for (m, v) in mean.iter_mut().zip(row) {
                    *m += v;
                }
            }
            let count = len.max(1) as f32;
            mean.iter_mut().for_each(|m| *m /= count);
            out.push(mean);
            at += len;
        }
        Ok(out)
    }

    /// One layer over `x` (`[n, d]`), in place: the query, key and value products row by
    /// row, attention over each sequence, then the rest row by row.
    fn layer(&self, l: &Layer, x: &mut [f32], lens: &[usize], s: &mut Scratch) {
        let (d, n) = (self.d, x.len() / self.d);
        // Enough tasks for every thread to take a few, in whole blocks of rounded rows.
        let per_task = n
            .div_ceil(4 * rayon::current_num_threads())
            .next_multiple_of(quant::ROW_BLOCK)
            .clamp(quant::ROW_BLOCK, TASK_ROWS);
        let tasks = &s.tasks;
        let [q, k, v] = &mut s.qkv;
        for m in [&mut *q, &mut *k, &mut *v] {
            m.resize(n * d, 0.0);
        }
        let chunk = per_task * d;
        x.par_chunks(chunk)
            .zip(q.par_chunks_mut(chunk))
            .zip(k.par_chunks_mut(chunk))
            .zip(v.par_chunks_mut(chunk))
            .for_each_init(
                || Lent::from(tasks),
                |t, (((x, q), k), v)| {
                    let t = t.get();
                    // Query, key and value share the rounded rows (one shape, one code range).
                    t.codes.round_here(x, x.len() / d, d, l.query.limit());
                    for (w, out) in [(&l.query, q), (&l.key, k), (&l.value, v)] {
                        w.product_here(&t.codes, out);
                    }
                },
            );
        self.attention(q, k, v, lens, &mut s.context);
        x.par_chunks_mut(chunk)
            .zip(s.context.par_chunks(chunk))
            .for_each_init(
                || Lent::from(tasks),
                |t, (x, context)| self.rows_after_attention(l, x, context, t.get()),
            );
    }

    /// Rows `x` of the batch through the attention's output product and norm, the
    /// feed-forward block and its norm, from their `context` rows: every step of the layer
    /// after attention works on each row alone, so a task takes its rows through all of them
    /// while they stay in its core's caches, and the wide hidden rows never go to memory.
    fn rows_after_attention(&self, l: &Layer, x: &mut [f32], context: &[f32], t: &mut TaskScratch) {
        let (d, n) = (self.d, x.len() / self.d);
        let width = l.intermediate.rows();
        t.codes.round_here(context, n, d, l.output.limit());
        t.attended.resize(n * d, 0.0);
        l.output.product_here(&t.codes, &mut t.attended);
        l.attention_norm.residual_rows(x, &t.attended, d, self.eps);
        t.codes.round_here(x, n, d, l.intermediate.limit());
        t.hidden.resize(n * width, 0.0);
        l.intermediate.product_here(&t.codes, &mut t.hidden);
        gelu_in_place(&mut t.hidden);
        t.codes.round_here(&t.hidden, n, width, l.down.limit());
        t.down.resize(n * d, 0.0);
        l.down.product_here(&t.codes, &mut t.down);
        l.norm.residual_rows(x, &t.down, d, self.eps);
    }

    /// Each sequence's heads attend over that sequence's tokens only; `context` becomes
    /// `[n, d]`, every value written.
    fn attention(&self, q: &[f32], k: &[f32], v: &[f32], lens: &[usize], context: &mut Vec<f32>) {
        let d = self.d;
        let dh = d / self.heads;
        context.resize(q.len(), 0.0);
        let mut spans = Vec::with_capacity(lens.len());
        let mut rest = context.as_mut_slice();
        let mut at = 0;
        for &len in lens {
            let (span, tail) = rest.split_at_mut(len * d);
            spans.push((at, len, span));
            rest = tail;
            at += len;
        }
        spans.into_par_iter().for_each(|(at, len, out)| {
            let span = at * d..(at + len) * d;
            let (q, k, v) = (&q[span.clone()], &k[span.clone()], &v[span]);
            attention::sequence(q, k, v, (len, self.heads, dh), out);
        });
    }
}

impl CpuScorer for CpuMiniLm {
    fn probs(&self, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let pooled = self.pooled(seqs)?;
        Ok(pooled
            .iter()
            .map(|e| {
                let mut logits: Vec<f32> = self
                    .head
                    .chunks_exact(self.d)
                    .zip(&self.head_bias)
                    .map(|(w, b)| w.iter().zip(e).map(|(w, x)| w * x).sum::<f32>() + b)
                    .collect();
                softmax(&mut logits);
                logits
            })
            .collect())
    }
}

/// `f` summed over `xs` in eight running sums (a plain sum is one chain of dependent adds,
/// which the compiler may not reorder into vectors).
#[inline(always)]
pub(super) fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&x| f(x)).sum();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += f(x);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The largest of `xs` and `floor`, NaNs passed over: sixteen running maxima compared with
/// `>` (which the compiler vectorizes, where `f32::max`'s NaN rule keeps a loop scalar).
#[inline(always)]
pub(super) fn lane_max(xs: &[f32], floor: f32) -> f32 {
    let pick = |a: f32, b: f32| if b > a { b } else { a };
    let mut acc = [floor; 16];
    let chunks = xs.chunks_exact(16);
    let tail = chunks.remainder().iter().fold(floor, |a, &b| pick(a, b));
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = pick(*a, x);
        }
    }
    acc.iter().fold(tail, |a, &b| pick(a, b))
}

fn softmax(v: &mut [f32]) {
    let max = v.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    v.iter_mut().for_each(|x| *x = (*x - max).exp());
    let sum: f32 = v.iter().sum();
    v.iter_mut().for_each(|x| *x /= sum);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_max_is_the_plain_maximum() {
        for len in [0, 1, 15, 16, 17, 40, 64] {
            let mut xs: Vec<f32> = (0..len).map(|i| ((i * 37) % 23) as f32 - 11.0).collect();
            if len > 3 {
                xs[3] = f32::NAN;
            }
            let plain = xs.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            assert_eq!(lane_max(&xs, f32::NEG_INFINITY), plain, "{len}");
        }
        assert_eq!(
            lane_max(&[f32::NAN; 20], f32::NEG_INFINITY),
            f32::NEG_INFINITY
        );
    }
}
