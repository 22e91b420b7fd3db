//! The Llama-family decoder for inference on the CPU: weights stay in their GGUF blocks
//! ([`QMatrix`]), the KV cache is preallocated and written in place, and every step runs on
//! host vectors with rayon (no tensor-library dispatch per op). Same maths as
//! [`super::model::Llama`] (which training and GPUs use): RMSNorm, RoPE (adjacent pairs or
//! halves, by [`super::model::Arch`]), q/k/v biases where the file has them, grouped-query
//! attention over left-padded sequences, SwiGLU, tied or separate LM head, LoRA on q and v.

use rayon::prelude::*;

use super::gguf::Gguf;
use super::model::{LlamaConfig, LoraAdapters, LoraPair, to_host_f32};
use super::quant::{self, Q5Form, QMatrix, dot_f32, matmul_many, row_spans};
use crate::{Error, Result};

/// Runs `f` on one of rayon's workers, so that the products it starts split there. From
/// any other thread, each product would hand its work to the pool and sleep until it is done:
/// a thread wake-up per product, a large share of a small product's time when decoding.
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

/// Activation rows a step of a long input runs at once, so that memory holds a step's
/// activations rather than those of a whole batch of prompts (the feed-forward's are the
/// largest: `rows * d_ff` values, twice).
const PREFILL_ROWS: usize = 256;

/// One decoder block's weights.
struct Block {
    attn_norm: Vec<f32>,
    wq: QMatrix,
    wk: QMatrix,
    wv: QMatrix,
    wo: QMatrix,
    /// Biases of q, k and v (Qwen2).
    bias: Option<[Vec<f32>; 3]>,
    ffn_norm: Vec<f32>,
    gate: QMatrix,
    up: QMatrix,
    down: QMatrix,
}

/// The decoder over quantized weights.
pub struct CpuLlama {
    config: LlamaConfig,
    /// `[vocab, d_model]`: token embeddings, and the LM head when tied.
    embed: QMatrix,
    /// `[vocab, d_model]`: the LM head when the file has its own (`output.weight`).
    head: Option<QMatrix>,
    blocks: Vec<Block>,
    norm: Vec<f32>,
    /// RoPE frequencies `theta^(-2i/d)`, in f64 like the reference.
    inv_freq: Vec<f64>,
}

pub use super::model::Weight;

impl CpuLlama {
    /// Reads the weights of a `llama` or `qwen2` GGUF file, keeping quantized tensors
    /// quantized.
    pub fn from_gguf(g: &Gguf, config: &LlamaConfig) -> Result<CpuLlama> {
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<QMatrix> {
            let info = g.tensor_info(name)?;
            if info.shape() != [rows, cols] {
                return Err(Error::Model(format!(
                    "tensor {name} has shape {:?}, expected [{rows}, {cols}]",
                    info.shape()
                )));
            }
            // An embedding that is not also the head is only read a row per token: its
            // compact Q5_0 form costs no speed and saves a third of its memory, whatever
            // `CROSSLM_Q5` asks for the products.
            let q5 = if name == "token_embd.weight" && !config.tied_head {
                Q5Form::Bits
            } else {
                Q5Form::from_env()
            };
            let bytes = g.tensor_bytes(info)?;
            Ok(QMatrix::from_gguf_as(
                name,
                info.ggml_type,
                &bytes,
                rows,
                cols,
                q5,
            )?)
        };
        let vector = |name: &str, len: usize| -> Result<Vec<f32>> {
            let (shape, v) = g.dequantize(name)?;
            if shape != [len] {
                return Err(Error::Model(format!(
                    "tensor {name} has shape {shape:?}, expected [{len}]"
                )));
            }
            Ok(v)
        };
        CpuLlama::build(config, matrix, vector)
    }

    /// The model from f32 weights named as in a GGUF file (`[out, in]` matrices), kept f32:
    /// for models made in code.
    pub fn from_weights(
        config: &LlamaConfig,
        weight: impl Fn(&str) -> Result<Weight>,
    ) -> Result<CpuLlama> {
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<QMatrix> {
            let (shape, v) = weight(name)?;
            if shape != [rows, cols] {
                return Err(Error::Model(format!("tensor {name} has shape {shape:?}")));
            }
            Ok(QMatrix::from_f32(v, rows, cols))
        };
        let vector = |name: &str, len: usize| -> Result<Vec<f32>> {
            let (shape, v) = weight(name)?;
            if shape != [len] {
                return Err(Error::Model(format!("tensor {name} has shape {shape:?}")));
            }
            Ok(v)
        };
        CpuLlama::build(config, matrix, vector)
    }

    fn build(
        c: &LlamaConfig,
        matrix: impl Fn(&str, usize, usize) -> Result<QMatrix>,
        vector: impl Fn(&str, usize) -> Result<Vec<f32>>,
    ) -> Result<CpuLlama> {
        let kv = c.n_kv_heads * c.head_dim();
        let d = c.d_model;
        // The largest matrices first: a matrix's file bytes are held while it is repacked,
        // and the embedding's and head's would otherwise come on top of every block's weights.
        let embed = matrix("token_embd.weight", c.vocab_size, d)?;
        let head = if c.tied_head {
            None
        } else {
            Some(matrix("output.weight", c.vocab_size, d)?)
        };
        let mut blocks = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            let b = |s: &str| format!("blk.{i}.{s}.bias");
            let bias = if c.qkv_bias() {
                Some([
                    vector(&b("attn_q"), d)?,
                    vector(&b("attn_k"), kv)?,
                    vector(&b("attn_v"), kv)?,
                ])
            } else {
                None
            };
            blocks.push(Block {
                attn_norm: vector(&p("attn_norm"), d)?,
                wq: matrix(&p("attn_q"), d, d)?,
                wk: matrix(&p("attn_k"), kv, d)?,
                wv: matrix(&p("attn_v"), kv, d)?,
                wo: matrix(&p("attn_output"), d, d)?,
                bias,
                ffn_norm: vector(&p("ffn_norm"), d)?,
                gate: matrix(&p("ffn_gate"), c.d_ff, d)?,
                up: matrix(&p("ffn_up"), c.d_ff, d)?,
                down: matrix(&p("ffn_down"), d, c.d_ff)?,
            });
        }
        let half = c.head_dim() / 2;
        Ok(CpuLlama {
            config: c.clone(),
            embed,
            head,
            blocks,
            norm: vector("output_norm.weight", d)?,
            inv_freq: (0..half)
                .map(|i| c.rope_theta.powf(-((2 * i) as f64) / c.head_dim() as f64))
                .collect(),
        })
    }

    /// A weight by its GGUF name, dequantized to f32 (to build the f32 model for training).
    pub fn weight(&self, name: &str) -> Result<Weight> {
        let all = |m: &QMatrix| (vec![m.rows, m.cols], m.rows_f32(0..m.rows));
        let unknown = || Error::Model(format!("no weight named {name}"));
        match (name, &self.head) {
            ("token_embd.weight", _) => return Ok(all(&self.embed)),
            ("output.weight", Some(head)) => return Ok(all(head)),
            ("output_norm.weight", _) => {
                return Ok((vec![self.norm.len()], self.norm.clone()));
            }
            _ => {}
        }
        let rest = name.strip_prefix("blk.").ok_or_else(unknown)?;
        let (i, field) = rest.split_once('.').ok_or_else(unknown)?;
        let b = i
            .parse::<usize>()
            .ok()
            .and_then(|i| self.blocks.get(i))
            .ok_or_else(unknown)?;
        let norm = |v: &Vec<f32>| (vec![v.len()], v.clone());
        let bias = |k: usize| b.bias.as_ref().map(|bs| norm(&bs[k])).ok_or_else(unknown);
        Ok(match field {
            "attn_q.bias" => bias(0)?,
            "attn_k.bias" => bias(1)?,
            "attn_v.bias" => bias(2)?,
            "attn_norm.weight" => norm(&b.attn_norm),
            "ffn_norm.weight" => norm(&b.ffn_norm),
            "attn_q.weight" => all(&b.wq),
            "attn_k.weight" => all(&b.wk),
            "attn_v.weight" => all(&b.wv),
            "attn_output.weight" => all(&b.wo),
            "ffn_gate.weight" => all(&b.gate),
            "ffn_up.weight" => all(&b.up),
            "ffn_down.weight" => all(&b.down),
            _ => return Err(unknown()),
        })
    }

    /// The architecture.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The quantized matrices, for checks of which kernels a file gets.
    pub fn matrices(&self) -> impl Iterator<Item = &QMatrix> {
        std::iter::once(&self.embed).chain(self.head.iter()).chain(
            self.blocks
                .iter()
                .flat_map(|b| [&b.wq, &b.wk, &b.wv, &b.wo, &b.gate, &b.up, &b.down]),
        )
    }

    /// Final hidden states `[batch, seq, d_model]` (after the output norm) of `tokens`
    /// (`[batch, seq]` row-major, sequence `b` left-padded by `pads[b]` from its start),
    /// appended to `cache` after the positions it holds.
    ///
    /// Long inputs (prompts) run [`PREFILL_ROWS`] rows at a time ([`row_spans`]), with the
    /// same result bit for bit: the activations of a step, not the prompt's, are held.
    pub fn forward(
        &self,
        tokens: &[u32],
        pads: &[usize],
        cache: &mut KvCache,
        lora: Option<&HostLora>,
    ) -> Vec<f32> {
        let all = self.blocks.len();
        let x = self.forward_in_spans(tokens, pads, cache, lora, PREFILL_ROWS, all);
        rms_norm(&x, &self.norm, self.config.rms_eps)
    }

    /// The residual stream `[batch, seq, d_model]` entering block `upto` (the output of the
    /// blocks below it, not normalised) for `tokens` laid out as in [`CpuLlama::forward`],
    /// without adapters. Training runs the blocks below its adapters here: they are frozen,
    /// and these are the activations inference computes.
    pub fn residual(&self, tokens: &[u32], pads: &[usize], upto: usize) -> Vec<f32> {
        let upto = upto.min(self.blocks.len());
        let mut cache = KvCache::default();
        self.forward_in_spans(tokens, pads, &mut cache, None, PREFILL_ROWS, upto)
    }

    /// The residual stream after the first `upto` blocks, in spans of about `target_rows`
    /// rows.
    fn forward_in_spans(
        &self,
        tokens: &[u32],
        pads: &[usize],
        cache: &mut KvCache,
        lora: Option<&HostLora>,
        target_rows: usize,
        upto: usize,
    ) -> Vec<f32> {
        let batch = pads.len();
        let seq = tokens.len() / batch.max(1);
        let spans = row_spans(batch, seq, target_rows);
        if spans.len() < 2 {
            return on_pool(|| self.forward_on_pool(tokens, pads, cache, lora, upto));
        }
        let d = self.config.d_model;
        // Room for the whole input at once, not grown span by span.
        cache.prepare(&self.config, batch, seq);
        let mut hidden = vec![0.0f32; tokens.len() * d];
        for span in spans {
            let len = span.len();
            let part: Vec<u32> = (0..batch)
                .flat_map(|b| {
                    tokens[b * seq + span.start..b * seq + span.end]
                        .iter()
                        .copied()
                })
                .collect();
            let h = on_pool(|| self.forward_on_pool(&part, pads, cache, lora, upto));
            for (b, rows) in h.chunks_exact(len * d).enumerate() {
                hidden[(b * seq + span.start) * d..(b * seq + span.end) * d].copy_from_slice(rows);
            }
        }
        hidden
    }

    fn forward_on_pool(
        &self,
        tokens: &[u32],
        pads: &[usize],
        cache: &mut KvCache,
        lora: Option<&HostLora>,
        upto: usize,
    ) -> Vec<f32> {
        let c = &self.config;
        let batch = pads.len();
        let n = tokens.len();
        let seq = n / batch.max(1);
        assert_eq!(seq * batch, n, "tokens must be [batch, seq]");
        let past = cache.prepare(c, batch, seq);
        let mut x: Vec<f32> = tokens
            .iter()
            .flat_map(|&t| self.embed.row(t as usize))
            .collect();
        let rope = RopeTable::new(&self.inv_freq, pads, past, seq);
        for (i, b) in self.blocks.iter().enumerate().take(upto) {
            let xn = rms_norm(&x, &b.attn_norm, c.rms_eps);
            let mut qkv = matmul_many(&[&b.wq, &b.wk, &b.wv], &xn, n).into_iter();
            let (Some(mut q), Some(mut k), Some(mut v)) = (qkv.next(), qkv.next(), qkv.next())
            else {
                unreachable!("three matrices in, three products out")
            };
            if let Some([bq, bk, bv]) = &b.bias {
                for (out, bias) in [(&mut q, bq), (&mut k, bk), (&mut v, bv)] {
                    for row in out.chunks_exact_mut(bias.len()) {
                        add(row, bias);
                    }
                }
            }
            if let Some(l) = lora.and_then(|l| l.block(i)) {
                l[0].add(&xn, n, &mut q);
                l[1].add(&xn, n, &mut v);
            }
            rope.apply(&mut q, c.head_dim(), c.rope_halves());
            rope.apply(&mut k, c.head_dim(), c.rope_halves());
            cache.write(i, past, seq, &k, &v);
            let per_task = self.heads_per_task(pads.len());
            let attn = self.attention(&q, cache, i, pads, past, seq, per_task);
            add(&mut x, &b.wo.matmul(&attn, n));
            let xn = rms_norm(&x, &b.ffn_norm, c.rms_eps);
            let mut gu = matmul_many(&[&b.gate, &b.up], &xn, n).into_iter();
            let (Some(mut g), Some(u)) = (gu.next(), gu.next()) else {
                unreachable!("two matrices in, two products out")
            };
            swiglu(&mut g, &u);
            add(&mut x, &b.down.matmul(&g, n));
        }
        cache.len = past + seq;
        x
    }

    /// Logits `[n, vocab]` of hidden states `[n, d_model]`: the LM head, from its blocks.
    pub fn logits(&self, hidden: &[f32], n: usize) -> Vec<f32> {
        let head = self.head.as_ref().unwrap_or(&self.embed);
        on_pool(|| head.matmul(hidden, n))
    }

    /// Query heads an attention task takes: one, or a whole group sharing a key/value head
    /// when there are enough (sequence, key/value head) pairs to keep both threads busy (each
    /// key and value is then read once for the group's queries).
    fn heads_per_task(&self, batch: usize) -> usize {
        let c = &self.config;
        if batch * c.n_kv_heads >= 8 {
            c.n_heads / c.n_kv_heads
        } else {
            1
        }
    }

    /// Attention of the new queries over the cached keys/values of `layer`:
    /// `q` is `[batch, seq, heads * head_dim]`, the result has the same shape. Tasks take
    /// `per_job` heads (1, or a whole group); each head's result is the same bit for bit
    /// either way.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &[f32],
        cache: &KvCache,
        layer: usize,
        pads: &[usize],
        past: usize,
        seq: usize,
        per_job: usize,
    ) -> Vec<f32> {
        let c = &self.config;
        let (h, hd) = (c.n_heads, c.head_dim());
        let rep = h / c.n_kv_heads;
        let d = c.d_model;
        let scale = 1.0 / (hd as f32).sqrt();
        let (keys, values) = &cache.layers[layer];
        // On one thread when the whole step is small (a single sequence's first few decode
        // steps), where handing half to the other worker costs more than it saves.
        let jobs = pads.len() * h / per_job;
        let work = pads.len() * h * seq * (past + seq) * hd;
        let min_len = if work < 1 << 15 { jobs.max(1) } else { 1 };
        let heads: Vec<Vec<f32>> = (0..jobs)
            .into_par_iter()
            .with_min_len(min_len)
            .map(|job| {
                // The loops below are plain Rust; compiled for the CPU's vectors they run the
                // same arithmetic with wider registers (`with_simd`). Each head's sums run over
                // the positions in the same order however many heads a task holds.
                quant::with_simd(
                    #[inline(always)]
                    || {
                        let b = job / (h / per_job);
                        let first_head = job % (h / per_job) * per_job;
                        let g = first_head / rep;
                        let first = pads[b];
                        let mut out = vec![0.0f32; seq * per_job * hd];
                        let mut scores = vec![Vec::with_capacity(past + seq); per_job];
                        let mut totals = vec![0.0f32; per_job];
                        let (head_keys, head_values) =
                            (cache.head(keys, b, g), cache.head(values, b, g));
                        for t in 0..seq {
                            let abs = past + t;
                            if first > abs {
                                continue; // a pad query: it sees nothing and is never read
                            }
                            let row = (b * seq + t) * d + first_head * hd;
                            let qs = &q[row..row + per_job * hd];
                            for s in scores.iter_mut() {
                                s.clear();
                            }
                            for kv in head_keys[first * hd..(abs + 1) * hd].chunks_exact(hd) {
                                for (s, qv) in scores.iter_mut().zip(qs.chunks_exact(hd)) {
                                    s.push(dot_f32(qv, kv) * scale);
                                }
                            }
                            totals.fill(0.0);
                            for (s, total) in scores.iter_mut().zip(totals.iter_mut()) {
                                let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                                for s in s.iter_mut() {
                                    *s -= max;
                                }
                                quant::exp_in_place(s);
                                for s in s.iter() {
                                    *total += *s;
                                }
                            }
                            let o = &mut out[t * per_job * hd..(t + 1) * per_job * hd];
                            let positions =
                                head_values[first * hd..(abs + 1) * hd].chunks_exact(hd);
                            for (i, vv) in positions.enumerate() {
                                for ((o, s), total) in
                                    o.chunks_exact_mut(hd).zip(&scores).zip(&totals)
                                {
                                    let p = s[i] / total;
                                    for (o, v) in o.iter_mut().zip(vv) {
                                        *o += p * v;
                                    }
                                }
                            }
                        }
                        out
                    },
                )
            })
            .collect();
        let mut out = vec![0.0f32; pads.len() * seq * d];
        let width = per_job * hd;
        for (job, o) in heads.iter().enumerate() {
            let b = job / (h / per_job);
            let first_head = job % (h / per_job) * per_job;
            for t in 0..seq {
                out[(b * seq + t) * d + first_head * hd..][..width]
                    .copy_from_slice(&o[t * width..][..width]);
            }
        }
        out
    }
}

/// Keys and values of the positions seen so far, per layer `[batch, kv_heads, capacity,
/// head_dim]`, allocated ahead and written in place; it grows (doubling) only when a step
/// needs more positions than it holds. A head's positions lie one after the other, so that
/// attention reads each head's keys and values as one stream.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    batch: usize,
    len: usize,
    capacity: usize,
    width: usize,
    head_dim: usize,
    layers: Vec<(Vec<f32>, Vec<f32>)>,
}

impl KvCache {
    /// An empty cache with room for `capacity` positions (it grows past that if needed).
    pub fn with_capacity(capacity: usize) -> KvCache {
        KvCache {
            capacity,
            ..KvCache::default()
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes room for `seq` more positions of `batch` sequences; returns the cached length.
    fn prepare(&mut self, c: &LlamaConfig, batch: usize, seq: usize) -> usize {
        if self.layers.is_empty() {
            self.batch = batch;
            self.width = c.n_kv_heads * c.head_dim();
            self.head_dim = c.head_dim();
            self.capacity = self.capacity.max(seq);
            let size = batch * self.capacity * self.width;
            self.layers = (0..c.n_layers)
                .map(|_| (vec![0.0; size], vec![0.0; size]))
                .collect();
        }
        assert_eq!(batch, self.batch, "a step must feed every cached sequence");
        let need = self.len + seq;
        if need > self.capacity {
            let capacity = need.max(2 * self.capacity);
            let rows: Vec<usize> = (0..self.batch).collect();
            self.regather(&rows, capacity);
        }
        self.len
    }

    /// Keeps the sequences at `rows` (in that order; a row may repeat).
    pub fn select_rows(&mut self, rows: &[usize]) {
        self.regather(rows, self.capacity);
    }

    fn regather(&mut self, rows: &[usize], capacity: usize) {
        let (old_cap, w, hd, len) = (self.capacity, self.width, self.head_dim, self.len);
        let heads = w / hd.max(1);
        for (k, v) in &mut self.layers {
            for buf in [k, v] {
                let mut next = vec![0.0; rows.len() * capacity * w];
                for (new, &old) in rows.iter().enumerate() {
                    for g in 0..heads {
                        next[(new * heads + g) * capacity * hd..][..len * hd]
                            .copy_from_slice(&buf[(old * heads + g) * old_cap * hd..][..len * hd]);
                    }
                }
                *buf = next;
            }
        }
        self.batch = rows.len();
        self.capacity = capacity;
    }

    /// Stores the `[batch, seq, width]` keys and values of `layer` after `past` positions.
    fn write(&mut self, layer: usize, past: usize, seq: usize, k: &[f32], v: &[f32]) {
        let (cap, w, hd) = (self.capacity, self.width, self.head_dim);
        let heads = w / hd.max(1);
        let (kc, vc) = &mut self.layers[layer];
        for b in 0..self.batch {
            for t in 0..seq {
                let from = (b * seq + t) * w;
                for g in 0..heads {
                    let at = ((b * heads + g) * cap + past + t) * hd;
                    let src = from + g * hd;
                    kc[at..at + hd].copy_from_slice(&k[src..src + hd]);
                    vc[at..at + hd].copy_from_slice(&v[src..src + hd]);
                }
            }
        }
    }

    /// Head `g`'s vectors of sequence `b` in buffer `buf`, one a position (`capacity` of them).
    fn head<'a>(&self, buf: &'a [f32], b: usize, g: usize) -> &'a [f32] {
        let heads = self.width / self.head_dim.max(1);
        let size = self.capacity * self.head_dim;
        &buf[(b * heads + g) * size..][..size]
    }
}

/// RoPE cos/sin for each row of a step.
struct RopeTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// Row `b * seq + t` is at position `past + t - pads[b]` (pads sit at position 0).
    fn new(inv_freq: &[f64], pads: &[usize], past: usize, seq: usize) -> RopeTable {
        let half = inv_freq.len();
        let n = pads.len() * seq;
        let (mut cos, mut sin) = (Vec::with_capacity(n * half), Vec::with_capacity(n * half));
        for &pad in pads {
            for t in 0..seq {
                let pos = (past + t).saturating_sub(pad) as f64;
                for &f in inv_freq {
                    let a = pos * f;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
        RopeTable { half, cos, sin }
    }

    /// Rotates the pairs of every head of every row of `x` (`[rows, heads * head_dim]`):
    /// adjacent elements, or with `halves` element `i` and `i + head_dim / 2`.
    fn apply(&self, x: &mut [f32], head_dim: usize, halves: bool) {
        let rows = self.cos.len() / self.half.max(1);
        let width = x.len() / rows.max(1);
        for (r, row) in x.chunks_exact_mut(width).enumerate() {
            let cos = &self.cos[r * self.half..(r + 1) * self.half];
            let sin = &self.sin[r * self.half..(r + 1) * self.half];
            for head in row.chunks_exact_mut(head_dim) {
                if halves {
                    let (first, second) = head.split_at_mut(self.half);
                    for (i, (a, b)) in first.iter_mut().zip(second).enumerate() {
                        let (x0, x1) = (*a, *b);
                        *a = x0 * cos[i] - x1 * sin[i];
                        *b = x0 * sin[i] + x1 * cos[i];
                    }
                } else {
                    for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                        let (x0, x1) = (pair[0], pair[1]);
                        pair[0] = x0 * cos[i] - x1 * sin[i];
                        pair[1] = x0 * sin[i] + x1 * cos[i];
                    }
                }
            }
        }
    }
}

/// LoRA adapters as host vectors, for the CPU decoder.
pub struct HostLora {
    first: usize,
    blocks: Vec<[HostPair; 2]>,
}

/// One adapter `x -> scale * (x @ a) @ b`.
struct HostPair {
    a: Vec<f32>,
    b: Vec<f32>,
    rank: usize,
    scale: f32,
}

impl HostLora {
    /// A host copy of burn adapters (read once per batch of work, not per step).
    pub fn new(l: &LoraAdapters) -> HostLora {
        let pair = |p: &LoraPair| {
            let rank = p.a.val().dims()[1];
            HostPair {
                a: to_host_f32(p.a.val()),
                b: to_host_f32(p.b.val()),
                rank,
                scale: p.scale as f32,
            }
        };
        HostLora {
            first: l.first,
            blocks: l.blocks.iter().map(|b| [pair(&b.q), pair(&b.v)]).collect(),
        }
    }

    /// The q and v adapters of block `i`, if it has them.
    fn block(&self, i: usize) -> Option<&[HostPair; 2]> {
        i.checked_sub(self.first).and_then(|j| self.blocks.get(j))
    }
}

impl HostPair {
    /// `out += scale * (x @ a) @ b` for `n` rows.
    fn add(&self, x: &[f32], n: usize, out: &mut [f32]) {
        let d_in = x.len() / n;
        let d_out = out.len() / n;
        let mut h = vec![0.0f32; self.rank];
        for (xr, or) in x.chunks_exact(d_in).zip(out.chunks_exact_mut(d_out)) {
            h.iter_mut().for_each(|v| *v = 0.0);
            for (xv, arow) in xr.iter().zip(self.a.chunks_exact(self.rank)) {
                for (hv, av) in h.iter_mut().zip(arow) {
                    *hv += xv * av;
                }
            }
            for (hv, brow) in h.iter().zip(self.b.chunks_exact(d_out)) {
                let s = hv * self.scale;
                for (o, bv) in or.iter_mut().zip(brow) {
                    *o += s * bv;
                }
            }
        }
    }
}

/// `x / sqrt(mean(x^2) + eps) * weight` over each row.
fn rms_norm(x: &[f32], weight: &[f32], eps: f64) -> Vec<f32> {
    let d = weight.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(d) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps as f32).sqrt();
        out.extend(row.iter().zip(weight).map(|(v, w)| v * inv * w));
    }
    out
}

/// `g = silu(g) * u`, element by element (`silu(g) = g / (1 + exp(-g))`); long inputs in
/// chunks over the threads.
fn swiglu(g: &mut [f32], u: &[f32]) {
    const CHUNK: usize = 4096;
    let run = |g: &mut [f32], u: &[f32]| {
        let mut e: Vec<f32> = g.iter().map(|v| -v).collect();
        quant::exp_in_place(&mut e);
        for ((g, u), e) in g.iter_mut().zip(u).zip(&e) {
            *g = *g / (1.0 + e) * u;
        }
    };
    if g.len() <= CHUNK {
        return run(g, u);
    }
    g.par_chunks_mut(CHUNK)
        .zip(u.par_chunks(CHUNK))
        .for_each(|(g, u)| run(g, u));
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::test_assets;

    #[test]
    fn a_prompt_in_spans_equals_one_pass_bit_for_bit() -> Result<()> {
        let cpu = test_assets::smollm2_llm()
            .cpu_model()
            .ok_or_else(|| Error::Model("no CPU decoder".into()))?;
        // Three left-padded prompts of 50 positions: 150 rows, 2 leftover from tiles of 4.
        let (batch, seq, target) = (3, 50, 40);
        let spans = row_spans(batch, seq, target);
        assert!(spans.len() > 2, "the test must split: {spans:?}");
        let pads = [0, 5, 17];
        let tokens: Vec<u32> = (0..batch * seq)
            .map(|i| ((i * 7919 + 13) % 20_000) as u32)
            .collect();
        let (mut one, mut split) = (KvCache::default(), KvCache::default());
        let all = cpu.config().n_layers;
        let a = cpu.forward_in_spans(&tokens, &pads, &mut one, None, usize::MAX, all);
        let b = cpu.forward_in_spans(&tokens, &pads, &mut split, None, target, all);
        assert_eq!(a.len(), b.len());
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "hidden states differ"
        );
        // The caches hold the same keys and values: the next step agrees too.
        let next = [1u32, 2, 3];
        let (x, y) = (
            cpu.forward(&next, &pads, &mut one, None),
            cpu.forward(&next, &pads, &mut split, None),
        );
        assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()));
        Ok(())
    }

    #[test]
    fn attention_by_head_groups_equals_by_heads_bit_for_bit() -> Result<()> {
        let cpu = test_assets::smollm2_llm()
            .cpu_model()
            .ok_or_else(|| Error::Model("no CPU decoder".into()))?;
        let c = cpu.config();
        let rep = c.n_heads / c.n_kv_heads;
        assert!(rep > 1, "SmolLM2 shares key/value heads");
        // Three left-padded prompts, then queries for a prompt step and for a decoding step.
        let (batch, seq) = (3, 12);
        let pads = [0, 4, 9];
        let tokens: Vec<u32> = (0..batch * seq)
            .map(|i| ((i * 7919 + 13) % 20_000) as u32)
            .collect();
        let mut cache = KvCache::default();
        cpu.forward(&tokens, &pads, &mut cache, None);
        for (past, new) in [(0, seq), (seq - 1, 1)] {
            let q: Vec<f32> = (0..batch * new * c.d_model)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            for layer in [0, c.n_layers - 1] {
                let heads = cpu.attention(&q, &cache, layer, &pads, past, new, 1);
                let groups = cpu.attention(&q, &cache, layer, &pads, past, new, rep);
                assert_eq!(heads.len(), groups.len());
                assert!(heads.iter().any(|v| *v != 0.0));
                assert!(
                    heads
                        .iter()
                        .zip(&groups)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "layer {layer}, {new} new positions: grouped heads differ"
                );
            }
        }
        Ok(())
    }
}
