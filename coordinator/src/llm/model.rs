//! The Llama-family decoder in burn (SmolLM2's Llama, Qwen2.5's Qwen2): config, RMSNorm,
//! RoPE, grouped-query attention with a KV cache, SwiGLU MLP, block, model and the LM head.
//!
//! Base weights are plain (non-parameter) tensors: they are frozen by construction, and the
//! only trainable tensors are the optional LoRA adapters passed to [`Llama::forward`].
//! Sequences of different lengths share a batch with LEFT padding: [`StepInputs`] carries each
//! sequence's RoPE positions and an attention mask that hides pad keys and future keys.
//!
//! Over 600 lines with its tests beside the code.

use burn::module::{Module, Param};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::module::{embedding, linear};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::gguf::Gguf;
use crate::{Error, Result};

/// A named weight in GGUF's row-major shape, as f32 (what a model is built from).
pub type Weight = (Vec<usize>, Vec<f32>);

/// The decoder families this loader reads, by the GGUF's `general.architecture`. Both are
/// pre-norm RMSNorm + RoPE + grouped-query attention + SwiGLU; Qwen2 adds biases to the
/// query, key and value projections and rotates the two halves of each head (the GGUF
/// converter leaves its q/k rows as trained), where Llama files rotate adjacent pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `llama` (SmolLM2).
    Llama,
    /// `qwen2` (Qwen2 / Qwen2.5).
    Qwen2,
}

impl Arch {
    /// The GGUF name, also the prefix of its metadata keys.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }
}

/// Architecture hyper-parameters, read from GGUF `<arch>.*` metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// The decoder family.
    pub arch: Arch,
    /// Number of decoder blocks.
    pub n_layers: usize,
    /// Hidden size.
    pub d_model: usize,
    /// MLP inner size.
    pub d_ff: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention: `n_heads` is a multiple).
    pub n_kv_heads: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Longest context the model was trained for.
    pub max_seq_len: usize,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// Whether the LM head is the token embedding (no `output.weight` in the file).
    pub tied_head: bool,
}

impl LlamaConfig {
    /// Reads the config of a `llama` or `qwen2` GGUF file.
    pub fn from_gguf(g: &Gguf) -> Result<LlamaConfig> {
        let arch = match g.meta_str("general.architecture")? {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(Error::Model(format!(
                    "architecture {other} is not supported (expected llama or qwen2)"
                )));
            }
        };
        let key = |k: &str| format!("{}.{k}", arch.name());
        let u = |k: &str| g.meta_u64(&key(k)).map(|v| v as usize);
        let vocab_size = match g.meta_u64(&key("vocab_size")) {
            Ok(v) => v as usize,
            Err(_) => g.meta_str_array("tokenizer.ggml.tokens")?.len(),
        };
        let config = LlamaConfig {
            arch,
            n_layers: u("block_count")?,
            d_model: u("embedding_length")?,
            d_ff: u("feed_forward_length")?,
            n_heads: u("attention.head_count")?,
            n_kv_heads: u("attention.head_count_kv")?,
            vocab_size,
            max_seq_len: u("context_length")?,
            rope_theta: g.meta_f64(&key("rope.freq_base")).unwrap_or(10_000.0),
            rms_eps: g.meta_f64(&key("attention.layer_norm_rms_epsilon"))?,
            tied_head: g.tensor_info("output.weight").is_err(),
        };
        config.validate()?;
        Ok(config)
    }

    /// Whether the query, key and value projections have biases.
    pub fn qkv_bias(&self) -> bool {
        self.arch == Arch::Qwen2
    }

    /// Whether RoPE rotates the two halves of a head (`x[i]`, `x[i + d/2]`) rather than
    /// adjacent pairs.
    pub fn rope_halves(&self) -> bool {
        self.arch == Arch::Qwen2
    }

    /// A tiny config for fast tests.
    pub fn tiny(vocab_size: usize) -> LlamaConfig {
        LlamaConfig {
            arch: Arch::Llama,
            n_layers: 2,
            d_model: 32,
            d_ff: 64,
            n_heads: 4,
            n_kv_heads: 2,
            vocab_size,
            max_seq_len: 256,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            tied_head: true,
        }
    }

    /// The tiny config as Qwen2: biases, rotated halves, an untied LM head.
    pub fn tiny_qwen2(vocab_size: usize) -> LlamaConfig {
        LlamaConfig {
            arch: Arch::Qwen2,
            rope_theta: 1_000_000.0,
            tied_head: false,
            ..LlamaConfig::tiny(vocab_size)
        }
    }

    fn validate(&self) -> Result<()> {
        let ok = self.n_layers > 0
            && self.n_heads > 0
            && self.n_kv_heads > 0
            && self.n_heads.is_multiple_of(self.n_kv_heads)
            && self.d_model.is_multiple_of(self.n_heads)
            && self.head_dim().is_multiple_of(2)
            && self.vocab_size > 0;
        if ok {
            Ok(())
        } else {
            Err(Error::Model(format!(
                "inconsistent decoder config {self:?}"
            )))
        }
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }
}

/// Root-mean-square layer norm: `x / sqrt(mean(x^2) + eps) * weight`.
#[derive(Module, Debug)]
pub struct RmsNorm {
    weight: Tensor<1>,
    eps: f64,
}

impl RmsNorm {
    /// Normalizes over the last axis.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let rms = x
            .clone()
            .square()
            .mean_dim(D - 1)
            .add_scalar(self.eps)
            .sqrt();
        (x / rms) * self.weight.clone().unsqueeze()
    }
}

/// RoPE cos/sin for each (sequence, position) of a step, shaped to broadcast over heads and
/// the two members of each rotated pair: `[batch, 1, seq, head_dim / 2, 1]` for adjacent
/// pairs, `[batch, 1, seq, 1, head_dim / 2]` for halves.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor<5>,
    sin: Tensor<5>,
    halves: bool,
}

impl Rope {
    /// Rotates pair `i` of each head by `pos * theta^(-2i/d)`. Llama files pair ADJACENT
    /// elements `(x[2i], x[2i+1])` (their converter permuted the q/k weight rows for
    /// llama.cpp's "normal" RoPE); Qwen2 pairs the halves `(x[i], x[i + d/2])` ("neox").
    /// `x`: `[batch, heads, seq, head_dim]`.
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, h, t, d] = x.dims();
        let (x, axis) = if self.halves {
            (x.reshape([b, h, t, 2, d / 2]), 3)
        } else {
            (x.reshape([b, h, t, d / 2, 2]), 4)
        };
        let x0 = x.clone().slice_dim(axis, 0..1);
        let x1 = x.slice_dim(axis, 1..2);
        let out0 = x0.clone() * self.cos.clone() - x1.clone() * self.sin.clone();
        let out1 = x0 * self.sin.clone() + x1 * self.cos.clone();
        Tensor::cat(vec![out0, out1], axis).reshape([b, h, t, d])
    }
}

/// What one forward step needs besides the tokens: RoPE angles per sequence and the attention
/// mask over `[cached keys, new keys]`. Built on the host from each sequence's left padding.
#[derive(Debug, Clone)]
pub struct StepInputs {
    /// Rotary embedding for the new tokens.
    pub rope: Rope,
    /// `[batch, 1, seq, past + seq]`, `true` where a query must NOT see a key.
    pub mask: Tensor<4, Bool>,
}

impl StepInputs {
    /// Inputs for `seq` new tokens per sequence after `past` cached ones, where sequence `b`
    /// starts with `pads[b]` pad tokens (left padding). A real token at absolute index `j` has
    /// position `j - pads[b]`; a query sees keys that are not pads and not in its future.
    pub fn new(
        config: &LlamaConfig,
        pads: &[usize],
        past: usize,
        seq: usize,
        device: &Device,
    ) -> StepInputs {
        let batch = pads.len();
        let half = config.head_dim() / 2;
        let total = past + seq;
        // Frequencies in f64, like the reference, then rounded once to f32.
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| {
                config
                    .rope_theta
                    .powf(-((2 * i) as f64) / config.head_dim() as f64)
            })
            .collect();
        let mut cos = Vec::with_capacity(batch * seq * half);
        let mut sin = Vec::with_capacity(batch * seq * half);
        let mut mask = Vec::with_capacity(batch * seq * total);
        for &pad in pads {
            for t in 0..seq {
                let abs = past + t;
                let pos = abs.saturating_sub(pad) as f64;
                for &f in &inv_freq {
                    let a = pos * f;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
                mask.extend((0..total).map(|j| j < pad || j > abs));
            }
        }
        let shape = if config.rope_halves() {
            [batch, 1, seq, 1, half]
        } else {
            [batch, 1, seq, half, 1]
        };
        StepInputs {
            rope: Rope {
                cos: Tensor::from_data(TensorData::new(cos, shape), device),
                sin: Tensor::from_data(TensorData::new(sin, shape), device),
                halves: config.rope_halves(),
            },
            mask: Tensor::from_data(TensorData::new(mask, [batch, 1, seq, total]), device),
        }
    }
}

/// Keys and values of the tokens seen so far, per layer: `[batch, kv_heads, len, head_dim]`.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> KvCache {
        KvCache::default()
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dims()[2],
            _ => 0,
        }
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends this step's keys/values for `layer` and returns all of them.
    fn append(&mut self, layer: usize, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, None);
        }
        let (k, v) = match self.layers[layer].take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        (k, v)
    }

    /// Keeps only the sequences at `rows` (e.g. to drop finished sequences from a batch).
    pub fn select_rows(&mut self, rows: &[usize]) {
        for (k, v) in self.layers.iter_mut().flatten() {
            let device = k.device();
            let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
            let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [rows.len()]), &device);
            *k = k.clone().select(0, idx.clone());
            *v = v.clone().select(0, idx);
        }
    }
}

/// A `[rows, cols]` tensor of normal draws with standard deviation `std` (Box-Muller) from
/// `rng`. Random weights come from here, not from the backend's RNG: that one is shared by
/// everything running in the process (tests side by side), so seeding it reproduces nothing.
fn seeded_normal(rng: &mut StdRng, shape: [usize; 2], std: f64, device: &Device) -> Tensor<2> {
    let values = seeded_values(rng, shape[0] * shape[1], std);
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// `n` normal draws with standard deviation `std` (Box-Muller) from `rng`.
fn seeded_values(rng: &mut StdRng, n: usize, std: f64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1 = 1.0 - rng.random::<f64>(); // (0, 1]: ln stays finite
            let u2 = rng.random::<f64>();
            (std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect()
}

/// Random weights for `c`, named and shaped as in a GGUF file, the same for the same `seed`:
/// normal with standard deviation `1/sqrt(d_in)` (embeddings 1, biases 0.1), norms 1.
pub fn random_weights(c: &LlamaConfig, seed: u64) -> BTreeMap<String, Weight> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = BTreeMap::new();
    let mut normal = |name: String, rows: usize, cols: usize, std: f64| {
        let values = seeded_values(&mut rng, rows * cols, std);
        out.insert(name, (vec![rows, cols], values));
    };
    let (d, kv) = (c.d_model, c.n_kv_heads * c.head_dim());
    normal("token_embd.weight".into(), c.vocab_size, d, 1.0);
    for i in 0..c.n_layers {
        let p = |s: &str| format!("blk.{i}.{s}.weight");
        for (name, rows, cols) in [
            ("attn_q", d, d),
            ("attn_k", kv, d),
            ("attn_v", kv, d),
            ("attn_output", d, d),
            ("ffn_gate", c.d_ff, d),
            ("ffn_up", c.d_ff, d),
            ("ffn_down", d, c.d_ff),
        ] {
            normal(p(name), rows, cols, 1.0 / (cols as f64).sqrt());
        }
    }
    if !c.tied_head {
        normal(
            "output.weight".into(),
            c.vocab_size,
            d,
            1.0 / (d as f64).sqrt(),
        );
    }
    if c.qkv_bias() {
        for i in 0..c.n_layers {
            for (name, rows) in [("attn_q", d), ("attn_k", kv), ("attn_v", kv)] {
                let values = seeded_values(&mut rng, rows, 0.1);
                out.insert(format!("blk.{i}.{name}.bias"), (vec![rows], values));
            }
        }
    }
    let ones = || (vec![d], vec![1.0; d]);
    for i in 0..c.n_layers {
        out.insert(format!("blk.{i}.attn_norm.weight"), ones());
        out.insert(format!("blk.{i}.ffn_norm.weight"), ones());
    }
    out.insert("output_norm.weight".into(), ones());
    out
}

/// A named weight of [`random_weights`], or a clear error.
pub fn lookup(weights: &BTreeMap<String, Weight>, name: &str) -> Result<Weight> {
    weights
        .get(name)
        .cloned()
        .ok_or_else(|| Error::Model(format!("no weight named {name}")))
}

/// One low-rank adapter `x -> scale * (x @ a) @ b` added to a frozen projection.
#[derive(Module, Debug)]
pub struct LoraPair {
    /// `[d_in, rank]`, random at init.
    pub a: Param<Tensor<2>>,
    /// `[rank, d_out]`, zero at init so the adapter starts as a no-op.
    pub b: Param<Tensor<2>>,
    /// `alpha / rank`.
    pub scale: f64,
}

impl LoraPair {
    fn new(
        d_in: usize,
        d_out: usize,
        rank: usize,
        alpha: f64,
        rng: &mut StdRng,
        device: &Device,
    ) -> LoraPair {
        let std = 1.0 / (d_in as f64).sqrt();
        LoraPair {
            a: Param::from_tensor(seeded_normal(rng, [d_in, rank], std, device)),
            b: Param::from_tensor(Tensor::zeros([rank, d_out], device)),
            scale: alpha / rank as f64,
        }
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        linear(linear(x, self.a.val(), None), self.b.val(), None).mul_scalar(self.scale)
    }
}

/// LoRA adapters of one block: on the query and value projections.
#[derive(Module, Debug)]
pub struct LoraBlock {
    /// Adapter on `attn_q`.
    pub q: LoraPair,
    /// Adapter on `attn_v`.
    pub v: LoraPair,
}

/// LoRA adapters for every block of a model; the only trainable tensors.
#[derive(Module, Debug)]
pub struct LoraAdapters {
    /// Index of the first adapted block: blocks below it have no adapter, so training
    /// neither tracks nor back-propagates through them (the cost of a step shrinks with it).
    pub first: usize,
    /// One per adapted block, in order.
    pub blocks: Vec<LoraBlock>,
}

impl LoraAdapters {
    /// Fresh adapters of the given rank on the top `top_layers` blocks (0: every block);
    /// the output is unchanged until trained (`b = 0`).
    pub fn new(
        config: &LlamaConfig,
        rank: usize,
        alpha: f64,
        top_layers: usize,
        seed: u64,
        device: &Device,
    ) -> LoraAdapters {
        let mut rng = StdRng::seed_from_u64(seed);
        let kv_dim = config.n_kv_heads * config.head_dim();
        let d = config.d_model;
        let top = if top_layers == 0 {
            config.n_layers
        } else {
            top_layers.min(config.n_layers)
        };
        LoraAdapters {
            first: config.n_layers - top,
            blocks: (0..top)
                .map(|_| LoraBlock {
                    q: LoraPair::new(d, d, rank, alpha, &mut rng, device),
                    v: LoraPair::new(d, kv_dim, rank, alpha, &mut rng, device),
                })
                .collect(),
        }
    }

    /// The adapter of block `i`, if it has one.
    pub fn block(&self, i: usize) -> Option<&LoraBlock> {
        i.checked_sub(self.first).and_then(|j| self.blocks.get(j))
    }

    /// Blocks of the model these adapters were made for.
    pub fn n_layers(&self) -> usize {
        self.first + self.blocks.len()
    }
}

/// Grouped-query self-attention. Weights are `[d_in, d_out]` (views of GGUF's `[out, in]`);
/// Qwen2 has biases on q, k and v.
#[derive(Module, Debug)]
pub struct Attention {
    wq: Tensor<2>,
    wk: Tensor<2>,
    wv: Tensor<2>,
    wo: Tensor<2>,
    bq: Option<Tensor<1>>,
    bk: Option<Tensor<1>>,
    bv: Option<Tensor<1>>,
    n_heads: usize,
    n_kv_heads: usize,
}

impl Attention {
    /// `x`: `[batch, seq, d_model]` -> `[batch, seq, d_model]`; appends to `cache` if given.
    pub fn forward(
        &self,
        x: Tensor<3>,
        inputs: &StepInputs,
        cache: Option<(&mut KvCache, usize)>,
        lora: Option<&LoraBlock>,
    ) -> Tensor<3> {
        let [b, t, d] = x.dims();
        let (h, kvh) = (self.n_heads, self.n_kv_heads);
        let hd = d / h;
        let rep = h / kvh;
        let mut q = linear(x.clone(), self.wq.clone(), self.bq.clone());
        let k = linear(x.clone(), self.wk.clone(), self.bk.clone());
        let mut v = linear(x.clone(), self.wv.clone(), self.bv.clone());
        if let Some(l) = lora {
            q = q + l.q.forward(x.clone());
            v = v + l.v.forward(x);
        }
        let q = inputs.rope.apply(q.reshape([b, t, h, hd]).swap_dims(1, 2));
        let k = inputs
            .rope
            .apply(k.reshape([b, t, kvh, hd]).swap_dims(1, 2));
        let v = v.reshape([b, t, kvh, hd]).swap_dims(1, 2);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v),
            None => (k, v),
        };
        let s = k.dims()[2];
        // GQA without copying K/V: query head `g * rep + r` uses kv head `g`, so fold the `rep`
        // query heads of a group into the row axis: [b, kvh, rep * t, hd].
        let q = q.reshape([b, kvh, rep * t, hd]);
        let scores = q
            .matmul(k.swap_dims(2, 3))
            .mul_scalar(1.0 / (hd as f64).sqrt());
        let mask = inputs.mask.clone().repeat_dim(2, rep);
        let scores = scores.mask_fill(mask, -1.0e9);
        let probs = softmax(scores, 3);
        let out = probs.matmul(v); // [b, kvh, rep * t, hd]
        let out = out
            .reshape([b, h, t, hd])
            .swap_dims(1, 2)
            .reshape([b, t, d]);
        debug_assert_eq!(s, inputs.mask.dims()[3]);
        linear(out, self.wo.clone(), None)
    }
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp {
    gate: Tensor<2>,
    up: Tensor<2>,
    down: Tensor<2>,
}

impl Mlp {
    /// `[.., d_model] -> [.., d_model]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let g = silu(linear(x.clone(), self.gate.clone(), None));
        let u = linear(x, self.up.clone(), None);
        linear(g * u, self.down.clone(), None)
    }
}

/// Pre-norm decoder block: `x + attn(norm(x))`, then `x + mlp(norm(x))`.
#[derive(Module, Debug)]
pub struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    ffn_norm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    /// One block over `[batch, seq, d_model]`.
    pub fn forward(
        &self,
        x: Tensor<3>,
        inputs: &StepInputs,
        cache: Option<(&mut KvCache, usize)>,
        lora: Option<&LoraBlock>,
    ) -> Tensor<3> {
        let h = x.clone()
            + self
                .attn
                .forward(self.attn_norm.forward(x), inputs, cache, lora);
        h.clone() + self.mlp.forward(self.ffn_norm.forward(h))
    }
}

/// The decoder (Llama or Qwen2, see [`Arch`]).
#[derive(Module, Debug)]
pub struct Llama {
    /// `[vocab, d_model]`: token embeddings.
    embed: Tensor<2>,
    /// `[d_model, vocab]`: the LM head, transposed and contiguous: `output.weight`'s, or the
    /// embedding's when tied.
    head: Tensor<2>,
    blocks: Vec<Block>,
    norm: RmsNorm,
}

/// `[rows, cols]` row-major f32 data transposed to `[cols, rows]`.
fn transpose(data: &TensorData, rows: usize, cols: usize) -> Result<TensorData> {
    let v = data
        .as_slice::<f32>()
        .map_err(|e| Error::Model(format!("weight data is not f32: {e:?}")))?;
    let mut out = vec![0.0f32; rows * cols];
    for (r, row) in v.chunks_exact(cols).enumerate() {
        for (c, &x) in row.iter().enumerate() {
            out[c * rows + r] = x;
        }
    }
    Ok(TensorData::new(out, [cols, rows]))
}

impl Llama {
    /// Loads the model from a GGUF file, dequantizing every weight to f32.
    pub fn from_gguf(g: &Gguf, device: &Device) -> Result<(LlamaConfig, Llama)> {
        let c = LlamaConfig::from_gguf(g)?;
        let model = Llama::from_weights(&c, |name| g.dequantize(name), device)?;
        Ok((c, model))
    }

    /// The model from f32 weights named and shaped as in a GGUF file (matrices `[out, in]`).
    pub fn from_weights(
        c: &LlamaConfig,
        weight: impl Fn(&str) -> Result<Weight>,
        device: &Device,
    ) -> Result<Llama> {
        let kv = c.n_kv_heads * c.head_dim();
        let load = |name: &str, shape: &[usize]| -> Result<TensorData> {
            let (got, values) = weight(name)?;
            if got != shape {
                return Err(Error::Model(format!(
                    "tensor {name} has shape {got:?}, expected {shape:?}"
                )));
            }
            Ok(TensorData::new(values, got))
        };
        // Linear weights: GGUF `[out, in]` row-major, stored transposed as contiguous
        // `[in, out]` (a strided transposed view makes gemm's one-row case very slow).
        let lin = |name: &str, d_in: usize, d_out: usize| -> Result<Tensor<2>> {
            let data = load(name, &[d_out, d_in])?;
            Ok(Tensor::from_data(transpose(&data, d_out, d_in)?, device))
        };
        let norm = |name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: Tensor::from_data(load(name, &[c.d_model])?, device),
                eps: c.rms_eps,
            })
        };
        let bias = |name: String, d_out: usize| -> Result<Option<Tensor<1>>> {
            if !c.qkv_bias() {
                return Ok(None);
            }
            Ok(Some(Tensor::from_data(load(&name, &[d_out])?, device)))
        };
        let mut blocks = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            let b = |s: &str| format!("blk.{i}.{s}.bias");
            blocks.push(Block {
                attn_norm: norm(&p("attn_norm"))?,
                attn: Attention {
                    wq: lin(&p("attn_q"), c.d_model, c.d_model)?,
                    wk: lin(&p("attn_k"), c.d_model, kv)?,
                    wv: lin(&p("attn_v"), c.d_model, kv)?,
                    wo: lin(&p("attn_output"), c.d_model, c.d_model)?,
                    bq: bias(b("attn_q"), c.d_model)?,
                    bk: bias(b("attn_k"), kv)?,
                    bv: bias(b("attn_v"), kv)?,
                    n_heads: c.n_heads,
                    n_kv_heads: c.n_kv_heads,
                },
                ffn_norm: norm(&p("ffn_norm"))?,
                mlp: Mlp {
                    gate: lin(&p("ffn_gate"), c.d_model, c.d_ff)?,
                    up: lin(&p("ffn_up"), c.d_model, c.d_ff)?,
                    down: lin(&p("ffn_down"), c.d_ff, c.d_model)?,
                },
            });
        }
        let embed = load("token_embd.weight", &[c.vocab_size, c.d_model])?;
        let head = if c.tied_head {
            transpose(&embed, c.vocab_size, c.d_model)?
        } else {
            let output = load("output.weight", &[c.vocab_size, c.d_model])?;
            transpose(&output, c.vocab_size, c.d_model)?
        };
        Ok(Llama {
            head: Tensor::from_data(head, device),
            embed: Tensor::from_data(embed, device),
            blocks,
            norm: norm("output_norm.weight")?,
        })
    }

    /// A randomly initialised model (for tests of the machinery, not of the weights), the
    /// same for the same `seed` (see [`random_weights`]).
    pub fn random(c: &LlamaConfig, seed: u64, device: &Device) -> Llama {
        let weights = random_weights(c, seed);
        match Llama::from_weights(c, |n| lookup(&weights, n), device) {
            Ok(model) => model,
            Err(e) => unreachable!("random weights have the config's shapes: {e}"),
        }
    }

    /// Final hidden states `[batch, seq, d_model]` (after the output norm) for `tokens`
    /// `[batch, seq]`, appending to `cache` when given.
    pub fn forward(
        &self,
        tokens: Tensor<2, Int>,
        inputs: &StepInputs,
        mut cache: Option<&mut KvCache>,
        lora: Option<&LoraAdapters>,
    ) -> Tensor<3> {
        let mut x = embedding(self.embed.clone(), tokens);
        for (i, block) in self.blocks.iter().enumerate() {
            let c = cache.as_deref_mut().map(|c| (c, i));
            x = block.forward(x, inputs, c, lora.and_then(|l| l.block(i)));
        }
        self.norm.forward(x)
    }

    /// Final hidden states from the residual stream `x` `[batch, seq, d_model]` entering
    /// block `first` (computed elsewhere, e.g. by the CPU decoder): blocks `first..`, then
    /// the output norm.
    pub fn forward_from(
        &self,
        mut x: Tensor<3>,
        first: usize,
        inputs: &StepInputs,
        lora: Option<&LoraAdapters>,
    ) -> Tensor<3> {
        for (i, block) in self.blocks.iter().enumerate().skip(first) {
            x = block.forward(x, inputs, None, lora.and_then(|l| l.block(i)));
        }
        self.norm.forward(x)
    }

    /// Logits over the vocabulary from hidden states: `h @ head`.
    pub fn lm_head<const D: usize>(&self, hidden: Tensor<D>) -> Tensor<D> {
        linear(hidden, self.head.clone(), None)
    }

    /// The LM head's backward pass to its input (the head is frozen): `dL/dh` `[n, d_model]`
    /// from `dL/dlogits` `[n, vocab]`.
    pub fn lm_head_backward(&self, grad: Tensor<2>) -> Tensor<2> {
        grad.matmul(self.head.clone().transpose())
    }
}

/// Reads a float tensor back to the host as `f32`, row-major. Failing here is a bug (a
/// float tensor always converts), not bad input, hence the panic.
pub fn to_host_f32<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    match t.into_data().try_to_vec_as::<f32>() {
        Ok(v) => v,
        Err(e) => panic!("reading a float tensor back: {e:?}"),
    }
}

/// Tokens `[batch, seq]` as an Int tensor.
pub fn token_tensor(rows: &[Vec<u32>], device: &Device) -> Tensor<2, Int> {
    let batch = rows.len();
    let seq = rows.first().map_or(0, Vec::len);
    let data: Vec<i64> = rows.iter().flatten().map(|&t| i64::from(t)).collect();
    Tensor::from_data(TensorData::new(data, [batch, seq]), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::test_assets;

    fn to_vec(t: Tensor<3>) -> Vec<f32> {
        to_host_f32(t)
    }

    /// The decoder is backend-generic: on wgpu (lavapipe in CI, a GPU elsewhere) and, in a
    /// `cuda` build on a machine with a GPU, on CUDA it computes what it computes on Flex.
    /// Tiny shapes: lavapipe is slow.
    #[test]
    fn gpu_forward_matches_flex() {
        let mut gpus = Vec::new();
        if crosslm_sdk::slm::wgpu_available() {
            gpus.push(crate::llm::device::Placement::Wgpu);
        } else {
            eprintln!("SKIPPED wgpu: no adapter (install mesa-vulkan-drivers for lavapipe)");
        }
        if crate::llm::device::cuda_present() {
            gpus.push(crate::llm::device::Placement::Cuda);
        }
        let flex = Device::flex();
        let c = LlamaConfig::tiny(50);
        let model = Llama::random(&c, 1, &flex);
        let ids = vec![vec![5u32, 6, 7, 8, 9]];
        let run = |m: &Llama, d: &Device| {
            to_vec(m.forward(
                token_tensor(&ids, d),
                &StepInputs::new(&c, &[0], 0, 5, d),
                None,
                None,
            ))
        };
        let a = run(&model, &flex);
        for gpu in gpus {
            let device = gpu.device();
            let b = run(&model.clone().to_device(&device), &device);
            assert_eq!(a.len(), b.len());
            let worst = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            // CUDA's matmuls run f32 operands on TF32 tensor cores (10-bit mantissas): 1.5e-3
            // seen on an H200, where wgpu stays within 1e-3.
            let tolerance = match gpu {
                crate::llm::device::Placement::Cuda => 1e-2,
                _ => 1e-3,
            };
            assert!(worst < tolerance, "flex vs {gpu} differ by {worst}");
        }
    }

    /// Left padding must not change a sequence's hidden states: the same prompt alone and
    /// padded in a batch beside a longer one give the same output.
    #[test]
    fn left_padding_matches_unpadded() {
        let device = Device::flex();
        for c in [LlamaConfig::tiny(50), LlamaConfig::tiny_qwen2(50)] {
            let model = Llama::random(&c, 1, &device);
            let short = vec![3u32, 7, 9];
            let long = vec![1u32, 2, 4, 8, 16, 32];
            let alone = model.forward(
                token_tensor(std::slice::from_ref(&short), &device),
                &StepInputs::new(&c, &[0], 0, 3, &device),
                None,
                None,
            );
            let padded = vec![0u32, 0, 0, 3, 7, 9];
            let both = model.forward(
                token_tensor(&[padded, long], &device),
                &StepInputs::new(&c, &[3, 0], 0, 6, &device),
                None,
                None,
            );
            let a = to_vec(alone);
            let b = to_vec(both.slice([0..1, 3..6]));
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-4, "{x} vs {y}");
            }
        }
    }

    /// Prefill + cached one-token steps equal one full forward pass.
    #[test]
    fn kv_cache_matches_full_forward() {
        let device = Device::flex();
        for c in [LlamaConfig::tiny(50), LlamaConfig::tiny_qwen2(50)] {
            let model = Llama::random(&c, 1, &device);
            let ids = vec![5u32, 6, 7, 8, 9];
            let full = to_vec(model.forward(
                token_tensor(std::slice::from_ref(&ids), &device),
                &StepInputs::new(&c, &[0], 0, 5, &device),
                None,
                None,
            ));
            let mut cache = KvCache::new();
            let mut out = to_vec(model.forward(
                token_tensor(&[ids[..3].to_vec()], &device),
                &StepInputs::new(&c, &[0], 0, 3, &device),
                Some(&mut cache),
                None,
            ));
            for (i, &t) in ids.iter().enumerate().skip(3) {
                out.extend(to_vec(model.forward(
                    token_tensor(&[vec![t]], &device),
                    &StepInputs::new(&c, &[0], i, 1, &device),
                    Some(&mut cache),
                    None,
                )));
            }
            assert_eq!(cache.len(), 5);
            for (x, y) in full.iter().zip(&out) {
                assert!((x - y).abs() < 1e-4, "{x} vs {y}");
            }
        }
    }

    #[test]
    fn reads_the_real_config() -> Result<()> {
        let g = Gguf::open(test_assets::smollm2_path())?;
        let c = LlamaConfig::from_gguf(&g)?;
        let shape = (c.n_layers, c.d_model, c.d_ff, c.n_heads, c.n_kv_heads);
        assert_eq!(shape, (30, 576, 1536, 9, 3));
        assert_eq!(
            (c.vocab_size, c.max_seq_len, c.head_dim()),
            (49152, 8192, 64)
        );
        assert_eq!(c.rope_theta, 100_000.0);
        // Stored as f32 in the file.
        assert!((c.rms_eps - 1e-5).abs() < 1e-12);
        Ok(())
    }
}
