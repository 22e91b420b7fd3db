//! MiniLM's parameters as plain f32 tensors, read from and written back to the burn classifier:
//! what the CPU training path ([`super::backprop`]) updates. Linear weights are `[out, in]`
//! (burn keeps `[in, out]`); query, key and value are one `[3 d, d]` matrix.

use burn::module::Param;
use burn::nn::{LayerNorm, Linear};
use burn::tensor::{Tensor, TensorData};

use rayon::prelude::*;

use super::MiniLmClassifier;
use crate::quant;
use crate::{Error, Result};

/// One encoder layer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LayerParams {
    /// Query, key and value stacked, `[3 d, d]`, and their bias `[3 d]`.
    pub qkv: Vec<f32>,
    pub qkv_bias: Vec<f32>,
    /// Attention output `[d, d]`.
    pub out: Vec<f32>,
    pub out_bias: Vec<f32>,
    pub norm1: Vec<f32>,
    pub norm1_bias: Vec<f32>,
    /// Feed-forward up `[f, d]` and down `[d, f]`.
    pub up: Vec<f32>,
    pub up_bias: Vec<f32>,
    pub down: Vec<f32>,
    pub down_bias: Vec<f32>,
    pub norm2: Vec<f32>,
    pub norm2_bias: Vec<f32>,
}

/// The whole classifier.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Params {
    /// `[vocab, d]`.
    pub word: Vec<f32>,
    /// `[positions, d]`.
    pub position: Vec<f32>,
    /// `[segments, d]` (inputs use segment 0 only).
    pub segment: Vec<f32>,
    pub norm0: Vec<f32>,
    pub norm0_bias: Vec<f32>,
    pub layers: Vec<LayerParams>,
    /// `[labels, d]`.
    pub head: Vec<f32>,
    pub head_bias: Vec<f32>,
}

/// Which of [`Params::tensors`] an encoder freeze leaves trainable.
pub(crate) fn trainable(layers: usize, frozen_layers: usize, freeze_embeddings: bool) -> Vec<bool> {
    let mut out = vec![!freeze_embeddings; 5];
    for l in 0..layers {
        out.extend([l >= frozen_layers; 12]);
    }
    out.extend([true; 2]);
    out
}

impl LayerParams {
    fn tensors(&self) -> [&Vec<f32>; 12] {
        [
            &self.qkv,
            &self.qkv_bias,
            &self.out,
            &self.out_bias,
            &self.norm1,
            &self.norm1_bias,
            &self.up,
            &self.up_bias,
            &self.down,
            &self.down_bias,
            &self.norm2,
            &self.norm2_bias,
        ]
    }

    fn tensors_mut(&mut self) -> [&mut Vec<f32>; 12] {
        [
            &mut self.qkv,
            &mut self.qkv_bias,
            &mut self.out,
            &mut self.out_bias,
            &mut self.norm1,
            &mut self.norm1_bias,
            &mut self.up,
            &mut self.up_bias,
            &mut self.down,
            &mut self.down_bias,
            &mut self.norm2,
            &mut self.norm2_bias,
        ]
    }
}

impl Params {
    /// Every tensor in a fixed order: the embeddings' five, each layer's twelve, the head's two.
    pub fn tensors(&self) -> Vec<&Vec<f32>> {
        let mut out = vec![
            &self.word,
            &self.position,
            &self.segment,
            &self.norm0,
            &self.norm0_bias,
        ];
        for l in &self.layers {
            out.extend(l.tensors());
        }
        out.extend([&self.head, &self.head_bias]);
        out
    }

    /// [`Params::tensors`], mutable.
    pub fn tensors_mut(&mut self) -> Vec<&mut Vec<f32>> {
        let mut out = vec![
            &mut self.word,
            &mut self.position,
            &mut self.segment,
            &mut self.norm0,
            &mut self.norm0_bias,
        ];
        for l in &mut self.layers {
            out.extend(l.tensors_mut());
        }
        out.extend([&mut self.head, &mut self.head_bias]);
        out
    }

    /// Zeros of the same shapes (fresh allocations: pages nothing writes are never touched).
    pub fn zeros_like(&self) -> Params {
        let z = |t: &Vec<f32>| vec![0.0f32; t.len()];
        Params {
            word: z(&self.word),
            position: z(&self.position),
            segment: z(&self.segment),
            norm0: z(&self.norm0),
            norm0_bias: z(&self.norm0_bias),
            layers: self
                .layers
                .iter()
                .map(|l| LayerParams {
                    qkv: z(&l.qkv),
                    qkv_bias: z(&l.qkv_bias),
                    out: z(&l.out),
                    out_bias: z(&l.out_bias),
                    norm1: z(&l.norm1),
                    norm1_bias: z(&l.norm1_bias),
                    up: z(&l.up),
                    up_bias: z(&l.up_bias),
                    down: z(&l.down),
                    down_bias: z(&l.down_bias),
                    norm2: z(&l.norm2),
                    norm2_bias: z(&l.norm2_bias),
                })
                .collect(),
            head: z(&self.head),
            head_bias: z(&self.head_bias),
        }
    }

    /// The model's hidden width.
    pub fn d(&self) -> usize {
        self.norm0.len()
    }

    /// Labels of the head.
    pub fn labels(&self) -> usize {
        self.head_bias.len()
    }

    /// Reads `model`'s current weights.
    pub fn read(model: &MiniLmClassifier) -> Result<Params> {
        let e = &model.encoder.embeddings;
        let layers = model
            .encoder
            .layers
            .iter()
            .map(|l| {
                let a = &l.attention;
                let (q, qb) = linear(&a.query)?;
                let (k, kb) = linear(&a.key)?;
                let (v, vb) = linear(&a.value)?;
                let (out, out_bias) = linear(&a.output)?;
                let (norm1, norm1_bias) = norm(&a.norm)?;
                let (up, up_bias) = linear(&l.intermediate)?;
                let (down, down_bias) = linear(&l.output)?;
                let (norm2, norm2_bias) = norm(&l.norm)?;
                Ok(LayerParams {
                    qkv: [q, k, v].concat(),
                    qkv_bias: [qb, kb, vb].concat(),
                    out,
                    out_bias,
                    norm1,
                    norm1_bias,
                    up,
                    up_bias,
                    down,
                    down_bias,
                    norm2,
                    norm2_bias,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (norm0, norm0_bias) = norm(&e.norm)?;
        let (head, head_bias) = linear(&model.head)?;
        Ok(Params {
            word: values(e.word.weight.val())?,
            position: values(e.position.weight.val())?,
            segment: values(e.token_type.weight.val())?,
            norm0,
            norm0_bias,
            layers,
            head,
            head_bias,
        })
    }

    /// `model` with every weight replaced by these (parameter ids kept).
    pub fn write(&self, mut model: MiniLmClassifier) -> MiniLmClassifier {
        let d = self.d();
        let e = &mut model.encoder.embeddings;
        set(&mut e.word.weight, &self.word, [self.word.len() / d, d]);
        set(
            &mut e.position.weight,
            &self.position,
            [self.position.len() / d, d],
        );
        set(
            &mut e.token_type.weight,
            &self.segment,
            [self.segment.len() / d, d],
        );
        set_norm(&mut e.norm, &self.norm0, &self.norm0_bias);
        for (l, p) in model.encoder.layers.iter_mut().zip(&self.layers) {
            let a = &mut l.attention;
            let (q, kv) = p.qkv.split_at(d * d);
            let (k, v) = kv.split_at(d * d);
            let (qb, kvb) = p.qkv_bias.split_at(d);
            let (kb, vb) = kvb.split_at(d);
            set_linear(&mut a.query, q, qb);
            set_linear(&mut a.key, k, kb);
            set_linear(&mut a.value, v, vb);
            set_linear(&mut a.output, &p.out, &p.out_bias);
            set_norm(&mut a.norm, &p.norm1, &p.norm1_bias);
            set_linear(&mut l.intermediate, &p.up, &p.up_bias);
            set_linear(&mut l.output, &p.down, &p.down_bias);
            set_norm(&mut l.norm, &p.norm2, &p.norm2_bias);
        }
        set_linear(&mut model.head, &self.head, &self.head_bias);
        model
    }
}

/// A tensor's values.
pub(super) fn values<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    t.try_into_vec_as::<f32>()
        .map_err(|e| Error::Model(format!("reading weights: {e:?}")))
}

/// A linear layer's weight as `[out, in]` and its bias (zeros if it has none).
pub(super) fn linear(l: &Linear) -> Result<(Vec<f32>, Vec<f32>)> {
    let w = l.weight.val();
    let [din, dout] = w.dims();
    let w = values(w)?;
    let t = transpose(&w, din, dout);
    let b = match &l.bias {
        Some(b) => values(b.val())?,
        None => vec![0.0; dout],
    };
    Ok((t, b))
}

/// A layer norm's gamma and beta (zeros if it has none).
pub(super) fn norm(n: &LayerNorm) -> Result<(Vec<f32>, Vec<f32>)> {
    let gamma = values(n.gamma.val())?;
    let beta = match &n.beta {
        Some(b) => values(b.val())?,
        None => vec![0.0; gamma.len()],
    };
    Ok((gamma, beta))
}

/// `[rows, cols]` to `[cols, rows]`.
pub(crate) fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; x.len()];
    transpose_into(x, rows, cols, &mut t);
    t
}

/// `x` (`[rows, cols]`) transposed into `out` (`[cols, rows]`): tasks of sixteen output rows,
/// each read and written in 16 x 16 tiles.
pub(crate) fn transpose_into(x: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    const B: usize = 16;
    if rows == 0 || cols == 0 {
        return;
    }
    out.par_chunks_mut(B * rows)
        .enumerate()
        .for_each(|(cb, out)| {
            quant::with_simd(
                #[inline(always)]
                || {
                    let c0 = cb * B;
                    let width = (cols - c0).min(B);
                    for r0 in (0..rows).step_by(B) {
                        let height = (rows - r0).min(B);
                        let mut tile = [[0.0f32; B]; B];
                        for (i, row) in tile.iter_mut().enumerate().take(height) {
                            let src = &x[(r0 + i) * cols + c0..][..width];
                            // Whole tiles as fixed-size copies (a runtime length calls
                            // memcpy).
                            match <&[f32; B]>::try_from(src) {
                                Ok(s) => *row = *s,
                                Err(_) => row[..width].copy_from_slice(src),
                            }
                        }
                        for (c, dst) in out.chunks_exact_mut(rows).take(width).enumerate() {
                            match <&mut [f32; B]>::try_from(&mut dst[r0..r0 + height]) {
                                Ok(d) => *d = std::array::from_fn(|i| tile[i][c]),
                                Err(_) => {
                                    for (i, d) in dst[r0..r0 + height].iter_mut().enumerate() {
                                        *d = tile[i][c];
                                    }
                                }
                            }
                        }
                    }
                },
            )
        });
}

fn set<const D: usize>(p: &mut Param<Tensor<D>>, v: &[f32], shape: [usize; D]) {
    let device = p.lazy_device();
    let t = Tensor::<D>::from_data(TensorData::new(v.to_vec(), shape), &device);
    *p = Param::initialized(p.id, t);
}

fn set_linear(l: &mut Linear, w: &[f32], b: &[f32]) {
    let (dout, din) = (b.len(), w.len() / b.len().max(1));
    set(&mut l.weight, &transpose(w, dout, din), [din, dout]);
    if let Some(bias) = &mut l.bias {
        set(bias, b, [dout]);
    }
}

fn set_norm(n: &mut LayerNorm, g: &[f32], b: &[f32]) {
    set(&mut n.gamma, g, [g.len()]);
    if let Some(beta) = &mut n.beta {
        set(beta, b, [b.len()]);
    }
}
