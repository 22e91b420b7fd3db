//! MiniLM (all-MiniLM-L6-v2): a 6-layer BERT encoder loaded from the HF `model.safetensors`,
//! mean pooling, and a linear classification head.

use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::{
    Dropout, DropoutConfig, Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear,
    LinearConfig,
};
use burn::tensor::activation::gelu;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

mod attention;
mod backprop;
mod cpu;
mod gelu;
mod learner;
mod params;

pub use cpu::CpuMiniLm;

use std::sync::Arc;

use super::train::Learner;
use super::{ArchConfig, Classifier, CpuScorer, TrainConfig};
use crate::{Error, Result};

/// BERT hyper-parameters, as in the HF `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Wordpiece vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// Longest sequence the position table covers.
    pub max_position_embeddings: usize,
    /// Segment vocabulary (only segment 0 is used).
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// Layer norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Dropout inside the encoder while fine-tuning.
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    /// Activation; only GELU (erf) is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_dropout() -> f64 {
    0.1
}
fn default_act() -> String {
    "gelu".into()
}

impl BertConfig {
    /// Reads and checks an HF `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::File {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg: Self = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<()> {
        if self.hidden_act != "gelu" {
            return Err(Error::Model(format!(
                "activation {:?} is not supported (only gelu)",
                self.hidden_act
            )));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(Error::Model(format!(
                "hidden size {} is not a multiple of {} heads",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if !(0.0..1.0).contains(&self.hidden_dropout_prob) {
            return Err(Error::Model("dropout must be in [0, 1)".into()));
        }
        Ok(())
    }

    /// A BERT encoder with random weights (lazily initialised; loading overwrites them).
    pub fn init(&self, device: &Device) -> BertEncoder {
        let d = self.hidden_size;
        let norm = || {
            LayerNormConfig::new(d)
                .with_epsilon(self.layer_norm_eps)
                .init(device)
        };
        let dropout = || DropoutConfig::new(self.hidden_dropout_prob).init();
        BertEncoder {
            embeddings: BertEmbeddings {
                word: EmbeddingConfig::new(self.vocab_size, d).init(device),
                position: EmbeddingConfig::new(self.max_position_embeddings, d).init(device),
                token_type: EmbeddingConfig::new(self.type_vocab_size, d).init(device),
                norm: norm(),
                dropout: dropout(),
            },
            layers: (0..self.num_hidden_layers)
                .map(|_| BertLayer {
                    attention: SelfAttention {
                        query: LinearConfig::new(d, d).init(device),
                        key: LinearConfig::new(d, d).init(device),
                        value: LinearConfig::new(d, d).init(device),
                        output: LinearConfig::new(d, d).init(device),
                        norm: norm(),
                        dropout: dropout(),
                        n_heads: self.num_attention_heads,
                    },
                    intermediate: LinearConfig::new(d, self.intermediate_size).init(device),
                    output: LinearConfig::new(self.intermediate_size, d).init(device),
                    norm: norm(),
                    dropout: dropout(),
                })
                .collect(),
        }
    }
}

/// Word + position + segment-0 embeddings, then layer norm.
#[derive(Module, Debug)]
pub struct BertEmbeddings {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    norm: LayerNorm,
    dropout: Dropout,
}

impl BertEmbeddings {
    /// `[B, T]` ids to `[B, T, D]` embeddings.
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let [_, t] = ids.dims();
        let device = ids.device();
        let positions = Tensor::<1, Int>::arange(0..t as i64, &device).unsqueeze::<2>();
        // Single-segment input: every token has segment 0, so add row 0 of the segment table.
        let segment = self
            .token_type
            .weight
            .val()
            .narrow(0, 0, 1)
            .unsqueeze::<3>();
        let x = self.word.forward(ids) + self.position.forward(positions) + segment;
        self.dropout.forward(self.norm.forward(x))
    }
}

/// Multi-head self-attention with its output projection and post-norm residual.
#[derive(Module, Debug)]
pub struct SelfAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    output: Linear,
    norm: LayerNorm,
    dropout: Dropout,
    #[module(skip)]
    n_heads: usize,
}

impl SelfAttention {
    /// `x` `[B, T, D]`; `pad` `[B, T]` is true on padding keys.
    pub fn forward(&self, x: Tensor<3>, pad: Tensor<2, Bool>) -> Tensor<3> {
        let [b, t, d] = x.dims();
        let h = self.n_heads;
        let heads = |y: Tensor<3>| y.reshape([b, t, h, d / h]).swap_dims(1, 2);
        let q = heads(self.query.forward(x.clone()));
        let k = heads(self.key.forward(x.clone()));
        let v = heads(self.value.forward(x.clone()));
        let mask = pad.reshape([b, 1, 1, t]).expand([b, h, t, t]);
        let context = attention(q, k, v, Some(mask), None, AttentionModuleOptions::default());
        let context = context.swap_dims(1, 2).reshape([b, t, d]);
        self.norm
            .forward(x + self.dropout.forward(self.output.forward(context)))
    }
}

/// One encoder layer: attention block, then GELU feed-forward with post-norm residual.
#[derive(Module, Debug)]
pub struct BertLayer {
    attention: SelfAttention,
    intermediate: Linear,
    output: Linear,
    norm: LayerNorm,
    dropout: Dropout,
}

impl BertLayer {
    /// `[B, T, D]` to `[B, T, D]`.
    pub fn forward(&self, x: Tensor<3>, pad: Tensor<2, Bool>) -> Tensor<3> {
        let x = self.attention.forward(x, pad);
        let h = gelu(self.intermediate.forward(x.clone()));
        self.norm
            .forward(x + self.dropout.forward(self.output.forward(h)))
    }
}

/// The BERT encoder: embeddings and a stack of layers.
#[derive(Module, Debug)]
pub struct BertEncoder {
    embeddings: BertEmbeddings,
    layers: Vec<BertLayer>,
}

impl BertEncoder {
    /// Last hidden states `[B, T, D]`; `mask` `[B, T]` is 1 on tokens, 0 on padding.
    pub fn forward(&self, ids: Tensor<2, Int>, mask: Tensor<2>) -> Tensor<3> {
        let pad = mask.equal_elem(0.0);
        let mut x = self.embeddings.forward(ids);
        for layer in &self.layers {
            x = layer.forward(x, pad.clone());
        }
        x
    }

    /// Mean-pooled sentence embeddings `[B, D]` (not normalised).
    pub fn embed(&self, ids: Tensor<2, Int>, mask: Tensor<2>) -> Tensor<2> {
        let hidden = self.forward(ids, mask.clone());
        mean_pool(hidden, mask)
    }

    /// Sets which parameters train: the embeddings and the lowest `frozen_layers` layers are
    /// frozen (phones cannot afford backprop through all of them), the rest train.
    pub fn freeze_lower(self, frozen_layers: usize, freeze_embeddings: bool) -> Self {
        let embeddings = self.embeddings.set_require_grad(!freeze_embeddings);
        let layers = self
            .layers
            .into_iter()
            .enumerate()
            .map(|(i, l)| l.set_require_grad(i >= frozen_layers))
            .collect();
        Self { embeddings, layers }
    }

    /// Overwrites every weight with the tensors of an HF BERT `model.safetensors` (names with or
    /// without the `bert.` prefix), checking every name, dtype and shape.
    pub fn load_safetensors(mut self, path: &Path, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::File {
            path: path.to_path_buf(),
            source,
        })?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
        let w = HfWeights { st: &st, device };
        let e = &mut self.embeddings;
        e.word.weight = w.param("embeddings.word_embeddings.weight", false)?;
        e.position.weight = w.param("embeddings.position_embeddings.weight", false)?;
        e.token_type.weight = w.param("embeddings.token_type_embeddings.weight", false)?;
        w.norm(&mut e.norm, "embeddings.LayerNorm")?;
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("encoder.layer.{i}.");
            let a = &mut l.attention;
            w.linear(&mut a.query, &format!("{p}attention.self.query"))?;
            w.linear(&mut a.key, &format!("{p}attention.self.key"))?;
            w.linear(&mut a.value, &format!("{p}attention.self.value"))?;
            w.linear(&mut a.output, &format!("{p}attention.output.dense"))?;
            w.norm(&mut a.norm, &format!("{p}attention.output.LayerNorm"))?;
            w.linear(&mut l.intermediate, &format!("{p}intermediate.dense"))?;
            w.linear(&mut l.output, &format!("{p}output.dense"))?;
            w.norm(&mut l.norm, &format!("{p}output.LayerNorm"))?;
        }
        Ok(self)
    }
}

/// Masked mean over the sequence: `[B, T, D]`, mask `[B, T]` to `[B, D]`.
pub fn mean_pool(hidden: Tensor<3>, mask: Tensor<2>) -> Tensor<2> {
    let counts = mask.clone().sum_dim(1).clamp_min(1.0); // [B, 1]
    let summed = (hidden * mask.unsqueeze_dim::<3>(2))
        .sum_dim(1)
        .squeeze_dim::<2>(1);
    summed / counts
}

/// Reads HF tensors into burn parameters, checking shapes against the module being filled.
struct HfWeights<'a> {
    st: &'a SafeTensors<'a>,
    device: &'a Device,
}

impl HfWeights<'_> {
    fn tensor(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let view = self
            .st
            .tensor(name)
            .or_else(|_| self.st.tensor(&format!("bert.{name}")))
            .map_err(|_| Error::Model(format!("weights lack tensor {name:?}")))?;
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(Error::Model(format!(
                "{name}: dtype {:?}, expected F32",
                view.dtype()
            )));
        }
        let data = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok((view.shape().to_vec(), data))
    }

    /// A parameter of the shape the module expects; `transpose` turns HF's `[out, in]` linear
    /// weights into burn's `[in, out]` (done once here, on the host, so matmuls read rows).
    fn param<const D: usize>(&self, name: &str, transpose: bool) -> Result<Param<Tensor<D>>> {
        let (shape, data) = self.tensor(name)?;
        if shape.len() != D {
            return Err(Error::Model(format!(
                "{name}: rank {}, expected {D}",
                shape.len()
            )));
        }
        let (shape, data) = if transpose && D == 2 {
            let (rows, cols) = (shape[0], shape[1]);
            let mut t = vec![0f32; data.len()];
            for r in 0..rows {
                for c in 0..cols {
                    t[c * rows + r] = data[r * cols + c];
                }
            }
            (vec![cols, rows], t)
        } else {
            (shape, data)
        };
        let tensor = Tensor::<D>::from_data(TensorData::new(data, shape), self.device);
        Ok(Param::from_tensor(tensor))
    }

    fn check<const D: usize>(
        name: &str,
        expected: [usize; D],
        got: &Param<Tensor<D>>,
    ) -> Result<()> {
        // `lazy_shape`: reading the shape must not materialise a random init just to compare.
        let got = got.lazy_shape().dims::<D>();
        if got != expected {
            return Err(Error::Model(format!(
                "{name}: shape {got:?}, config expects {expected:?}"
            )));
        }
        Ok(())
    }

    fn linear(&self, linear: &mut Linear, prefix: &str) -> Result<()> {
        let expected = linear.weight.lazy_shape().dims::<2>();
        let weight = self.param::<2>(&format!("{prefix}.weight"), true)?;
        Self::check(prefix, expected, &weight)?;
        let bias = self.param::<1>(&format!("{prefix}.bias"), false)?;
        Self::check(prefix, [expected[1]], &bias)?;
        linear.weight = weight;
        linear.bias = Some(bias);
        Ok(())
    }

    fn norm(&self, norm: &mut LayerNorm, prefix: &str) -> Result<()> {
        let expected = norm.gamma.lazy_shape().dims::<1>();
        let gamma = self.param::<1>(&format!("{prefix}.weight"), false)?;
        Self::check(prefix, expected, &gamma)?;
        let beta = self.param::<1>(&format!("{prefix}.bias"), false)?;
        Self::check(prefix, expected, &beta)?;
        norm.gamma = gamma;
        norm.beta = Some(beta);
        Ok(())
    }
}

/// MiniLM classifier: encoder, mean pooling, dropout, linear head.
#[derive(Module, Debug)]
pub struct MiniLmClassifier {
    /// The pretrained encoder.
    pub encoder: BertEncoder,
    dropout: Dropout,
    head: Linear,
}

impl MiniLmClassifier {
    /// A classifier over `encoder` with a fresh head for `n_labels` labels.
    pub fn new(encoder: BertEncoder, cfg: &BertConfig, n_labels: usize, device: &Device) -> Self {
        Self {
            encoder,
            dropout: DropoutConfig::new(cfg.hidden_dropout_prob).init(),
            head: LinearConfig::new(cfg.hidden_size, n_labels).init(device),
        }
    }
}

impl Classifier for MiniLmClassifier {
    fn logits(&self, ids: Tensor<2, Int>, mask: Tensor<2>) -> Tensor<2> {
        let pooled = self.encoder.embed(ids, mask);
        self.head.forward(self.dropout.forward(pooled))
    }

    fn cpu_scorer(&self, config: &ArchConfig) -> Result<Option<Arc<dyn CpuScorer>>> {
        match config {
            ArchConfig::Minilm(cfg) => Ok(Some(Arc::new(CpuMiniLm::new(self, cfg)?))),
            ArchConfig::Bag(_) => Ok(None),
        }
    }

    #[allow(private_interfaces)]
    fn cpu_learner(
        &self,
        config: &ArchConfig,
        train: &TrainConfig,
    ) -> Result<Option<Box<dyn Learner<Self>>>> {
        match config {
            ArchConfig::Minilm(cfg) => {
                Ok(Some(Box::new(learner::CpuLearner::new(self, cfg, train)?)))
            }
            ArchConfig::Bag(_) => Ok(None),
        }
    }

    fn freeze_lower(self, frozen_layers: usize, freeze_embeddings: bool) -> Self {
        Self {
            encoder: self.encoder.freeze_lower(frozen_layers, freeze_embeddings),
            dropout: self.dropout,
            head: self.head.set_require_grad(true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::assets_dir;
    use crate::slm::{Backend, MiniLm, Slm, TrainConfig, TrainExample};

    /// Reference embeddings from `/work/shared/reference/minilm_np.py`, stored as a fixture.
    #[derive(serde::Deserialize)]
    struct Reference {
        sentences: Vec<String>,
        token_ids: Vec<Vec<u32>>,
        cosine: Vec<Vec<f32>>,
        embeddings: Vec<Vec<f32>>,
    }

    fn reference() -> Reference {
        let path = crate::data::workspace_root().join("sdk/tests/fixtures/minilm_reference.json");
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    fn minilm_dir() -> std::path::PathBuf {
        let dir = assets_dir().join("minilm");
        assert!(
            dir.join("model.safetensors").is_file(),
            "MiniLM assets missing in {} (run the asset fetch script or set CROSSLM_ASSETS)",
            dir.display()
        );
        dir
    }

    /// The oracle's fixture and MiniLM as the oracle ran it (128 tokens at most).
    fn oracle_and_model() -> (Reference, MiniLm) {
        let model = MiniLm::from_pretrained(
            &minilm_dir(),
            vec!["a".into(), "b".into()],
            128,
            Backend::Flex,
        )
        .unwrap();
        (reference(), model)
    }

    /// The gate: embeddings match the numpy oracle. Tolerance: every dimension of the unit
    /// vectors within 1e-4 (f32 vs the oracle's mixed f32/f64 math), cosines within 1e-4.
    #[test]
    fn embeddings_match_numpy_oracle() {
        let (r, model) = oracle_and_model();
        let texts: Vec<&str> = r.sentences.iter().map(String::as_str).collect();
        assert_eq!(model.tokenizer().encode(&texts).unwrap(), r.token_ids);
        let e = model.embed(&texts).unwrap();
        let mut max_err = 0f32;
        for (got, want) in e.iter().zip(&r.embeddings) {
            assert_eq!(got.len(), 384);
            for (g, w) in got.iter().zip(want) {
                max_err = max_err.max((g - w).abs());
            }
        }
        let cos = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        for i in 0..4 {
            for j in 0..4 {
                assert!(
                    (cos(&e[i], &e[j]) - r.cosine[i][j]).abs() < 1e-4,
                    "cos[{i}][{j}]"
                );
            }
        }
        let pair = cos(&e[0], &e[1]);
        println!("max per-dimension error {max_err:.2e}, cosine(pair) {pair:.4}");
        assert!((pair - 0.755).abs() < 0.001, "{pair}");
        assert!(max_err < 1e-4, "max per-dimension error {max_err}");
    }

    /// The CPU kernels' encoder (integer products) against the same oracle: each unit vector
    /// within 0.002 of the oracle's (cosine above 0.999), the pair's cosine within 0.003.
    #[test]
    fn cpu_kernels_match_numpy_oracle() {
        let (r, model) = oracle_and_model();
        let ArchConfig::Minilm(cfg) = model.config() else {
            panic!("a MiniLM config")
        };
        let cpu = CpuMiniLm::new(model.model(), cfg).unwrap();
        let seqs: Vec<&[u32]> = r.token_ids.iter().map(Vec::as_slice).collect();
        let unit = |v: Vec<f32>| {
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.into_iter().map(|x| x / n).collect::<Vec<f32>>()
        };
        let e: Vec<Vec<f32>> = cpu.pooled(&seqs).unwrap().into_iter().map(unit).collect();
        let cos = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let mut max_err = 0f32;
        for (got, want) in e.iter().zip(&r.embeddings) {
            for (g, w) in got.iter().zip(want) {
                max_err = max_err.max((g - w).abs());
            }
            assert!(
                cos(got, want) > 0.999,
                "cosine to the oracle {}",
                cos(got, want)
            );
        }
        let pair = cos(&e[0], &e[1]);
        println!("kernels: max per-dimension error {max_err:.2e}, cosine(pair) {pair:.4}");
        assert!((pair - r.cosine[0][1]).abs() < 0.003, "{pair}");
        // 1.0e-3 on 16-bit codes; 8-bit codes on a scale per 32 values gave 3.0e-3.
        assert!(max_err < 2e-3, "max per-dimension error {max_err}");
        // Every sequence alone gives what it gives among others (no padding, no mixing).
        let alone = unit(cpu.pooled(&seqs[2..3]).unwrap().remove(0));
        assert!(cos(&alone, &e[2]) > 0.99999);
        // Bad ids are errors, not panics.
        assert!(cpu.pooled(&[&[101, 1_000_000, 102]]).is_err());
        assert!(cpu.pooled(&[&vec![101; 600]]).is_err());
    }

    #[test]
    fn bad_weights_and_config_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            minilm_dir().join("config.json"),
            dir.path().join("config.json"),
        )
        .unwrap();
        std::fs::copy(
            minilm_dir().join("tokenizer.json"),
            dir.path().join("tokenizer.json"),
        )
        .unwrap();
        std::fs::write(dir.path().join("model.safetensors"), b"garbage").unwrap();
        let err =
            MiniLm::from_pretrained(dir.path(), vec!["a".into()], 64, Backend::Flex).unwrap_err();
        assert!(matches!(err, Error::Model(_)), "{err}");
        std::fs::write(dir.path().join("config.json"), b"{}").unwrap();
        assert!(MiniLm::from_pretrained(dir.path(), vec!["a".into()], 64, Backend::Flex).is_err());
    }

    /// MR's sentences. The file runs by label in long stretches: tests take strides of it, not
    /// prefixes.
    fn mr() -> Vec<crate::data::Example> {
        let path = assets_dir().join("data/mr/movieReviewSnippets_GroundTruth.txt");
        crate::data::load_mr(&path, crate::data::BadRows::Skip)
            .unwrap()
            .dataset
            .examples
    }

    fn texts<'a>(examples: impl Iterator<Item = &'a crate::data::Example>) -> Vec<&'a str> {
        examples.map(|e| e.text.as_str()).collect()
    }

    fn examples<'a>(from: impl Iterator<Item = &'a crate::data::Example>) -> Vec<TrainExample> {
        from.map(|e| TrainExample::hard(e.text.clone(), e.label, 2))
            .collect()
    }

    /// MiniLM with 64 tokens and a fresh head for two labels.
    fn untrained() -> MiniLm {
        MiniLm::from_pretrained(
            &minilm_dir(),
            vec!["neg".into(), "pos".into()],
            64,
            Backend::Flex,
        )
        .unwrap()
    }

    /// [`untrained`] fine-tuned `epochs` on `train`.
    fn fine_tuned<'a>(
        train: impl Iterator<Item = &'a crate::data::Example>,
        epochs: usize,
    ) -> MiniLm {
        let mut model = untrained();
        model
            .train(&examples(train), &quick_training(epochs), &mut |_| {})
            .unwrap();
        model
    }

    fn quick_training(epochs: usize) -> TrainConfig {
        TrainConfig {
            epochs,
            validation_fraction: 0.0,
            ..TrainConfig::default()
        }
    }

    /// Scoring on the kernels (what `predict_proba` does on Flex) against burn's f32 forward,
    /// after a short fine-tuning so that the head separates the classes: probabilities within
    /// 0.01, the same argmax on at least 97% of the texts.
    #[test]
    fn kernel_scores_follow_burn_scores() {
        let mr = mr();
        let mut model = fine_tuned(mr.iter().step_by(160), 1);
        let texts = texts(mr.iter().skip(7).step_by(50));
        let fast = model.predict_proba(&texts).unwrap();
        let burn = model.predict_proba_burn(&texts, 32).unwrap();
        let mut max_diff = 0f32;
        let mut same = 0;
        for (f, b) in fast.iter().zip(&burn) {
            for (x, y) in f.iter().zip(b) {
                max_diff = max_diff.max((x - y).abs());
            }
            same += usize::from(crate::slm::argmax(f) == crate::slm::argmax(b));
        }
        let spread = burn.iter().map(|p| (p[0] - 0.5).abs()).fold(0f32, f32::max);
        println!(
            "max |p - p_burn| {max_diff:.4}, argmax agree {same}/{}, spread {spread:.3}",
            texts.len()
        );
        assert!(spread > 0.05, "the head did not move off 0.5 ({spread})");
        assert!(max_diff < 0.005, "{max_diff}");
        assert!(same * 100 >= texts.len() * 97, "{same}");
        // Training again replaces the kernels' copy of the weights.
        let again = examples(mr.iter().skip(1).step_by(320));
        model
            .train(&again, &quick_training(1), &mut |_| {})
            .unwrap();
        let fast = model.predict_proba(&texts[..8]).unwrap();
        let burn = model.predict_proba_burn(&texts[..8], 32).unwrap();
        for (f, b) in fast.iter().zip(&burn) {
            assert!((f[0] - b[0]).abs() < 0.005, "{} against {}", f[0], b[0]);
        }
    }

    /// A run in the buffers an earlier run left (the spare) trains the model a run in fresh
    /// buffers trains, bit for bit: nothing a step reads comes from the run before. Every run
    /// starts from clones of one model, which share its head: a fresh head is drawn when first
    /// used, from burn's process-wide RNG, which tests running beside this one draw from too.
    #[test]
    fn a_run_in_kept_buffers_trains_the_same_model() {
        let mr = mr();
        let start = untrained();
        let mut by_length: Vec<_> = mr.iter().take(400).collect();
        by_length.sort_by_key(|e| std::cmp::Reverse(e.text.len()));
        let short = examples(by_length[336..].iter().copied());
        let long = examples(by_length[..64].iter().copied());
        let texts = texts(mr.iter().skip(3).step_by(400));
        let trained = |train: &[TrainExample]| {
            let mut model = start.clone();
            model.train(train, &quick_training(1), &mut |_| {}).unwrap();
            model.predict_proba(&texts).unwrap()
        };
        let first = trained(&short);
        trained(&long);
        assert_eq!(trained(&short), first);
    }

    /// Times training on the kernels (`cargo test --release --workspace --lib -- --ignored
    /// --nocapture training_probe`): 12 steps of 32 MR sentences a run, after a warmup run,
    /// and each step's milliseconds; a probe for profiles, not a gate.
    #[test]
    #[ignore]
    fn training_probe() {
        let mr = mr();
        let mut model = untrained();
        let train = examples(mr.iter().take(32 * 13));
        let cfg = TrainConfig {
            epochs: 1,
            validation_fraction: 0.0,
            ..TrainConfig::default()
        };
        model.train(&train[..32], &cfg, &mut |_| {}).unwrap();
        for _ in 0..3 {
            let mut last = std::time::Instant::now();
            let mut ms = Vec::new();
            let r = model
                .train(&train[32..], &cfg, &mut |_| {
                    ms.push(last.elapsed().as_secs_f64() * 1e3);
                    last = std::time::Instant::now();
                })
                .unwrap();
            let ms: Vec<String> = ms.iter().map(|m| format!("{m:.0}")).collect();
            println!(
                "{:.1} samples/s; ms a step: {}",
                r.train_samples_per_sec,
                ms.join(" ")
            );
        }
    }

    /// Test accuracy after fine-tuning on the kernels and through burn's autodiff, the same
    /// examples and seeds (`cargo test --release --workspace --lib -- --ignored --nocapture
    /// training_engines_probe`; `PROBE_TRAIN` examples, default 256): a probe, not a gate.
    #[test]
    #[ignore]
    fn training_engines_probe() {
        let mr = mr();
        let n: usize = std::env::var("PROBE_TRAIN")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256);
        // MR comes sorted by label: spread both sets over the whole file.
        let train = examples(mr.iter().step_by((mr.len() / n.max(1)).max(1)).take(n));
        let test: Vec<_> = mr.iter().skip(3).step_by(5).collect();
        let texts = texts(test.iter().copied());
        for seed in 1..=3 {
            for kernels in [true, false] {
                let mut slm = untrained();
                let cfg = TrainConfig {
                    seed,
                    ..TrainConfig::default()
                };
                let config = slm.config.clone();
                let start = std::time::Instant::now();
                let (model, report) = crate::slm::train::fit(
                    slm.model.clone(),
                    |m| {
                        if kernels {
                            m.cpu_learner(&config, &cfg)
                        } else {
                            Ok(None)
                        }
                    },
                    &slm.tokenizer,
                    2,
                    &train,
                    &cfg,
                    &slm.device,
                    &mut |_| {},
                )
                .unwrap();
                slm.model = model;
                slm.cpu = std::sync::OnceLock::new();
                let p = slm.predict_proba(&texts).unwrap();
                let acc = p
                    .iter()
                    .zip(&test)
                    .filter(|(p, e)| crate::slm::argmax(p) == e.label)
                    .count() as f64
                    / test.len() as f64;
                println!(
                    "seed {seed} {}: test accuracy {acc:.4}, train loss {:.4}, val loss {:?}, best epoch {}, {:.1} s",
                    if kernels { "kernels" } else { "burn   " },
                    report.train_loss,
                    report.val_loss,
                    report.best_epoch,
                    start.elapsed().as_secs_f64()
                );
            }
        }
    }

    /// Times scoring on the kernels (`cargo test --release --workspace --lib -- --ignored
    /// --nocapture scoring_probe`): a probe for profiles, not a gate.
    #[test]
    #[ignore]
    fn scoring_probe() {
        let mr = mr();
        let model = untrained();
        let texts = texts(mr.iter().take(192));
        model.predict_proba_batched(&texts, 32).unwrap();
        let reps = 20;
        let start = std::time::Instant::now();
        for _ in 0..reps {
            model.predict_proba_batched(&texts, 32).unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        println!("{:.1} samples/s", (reps * texts.len()) as f64 / secs);
        let start = std::time::Instant::now();
        for _ in 0..reps {
            model.tokenizer().encode(&texts).unwrap();
        }
        println!(
            "tokenizing: {:.1} ms a pass",
            start.elapsed().as_secs_f64() * 1e3 / reps as f64
        );
    }

    /// Test accuracy through the kernels and through burn after the same fine-tuning
    /// (`cargo test --release --workspace --lib -- --ignored --nocapture kernel_accuracy_probe`):
    /// a probe of how far integer scoring moves a client's figures, not a gate.
    #[test]
    #[ignore]
    fn kernel_accuracy_probe() {
        let mr = mr();
        let model = fine_tuned(mr.iter().step_by(40), 2);
        let test: Vec<_> = mr.iter().skip(3).step_by(5).collect();
        let texts = texts(test.iter().copied());
        let fast = model.predict_proba(&texts).unwrap();
        let burn = model.predict_proba_burn(&texts, 64).unwrap();
        let acc = |p: &[Vec<f32>]| {
            p.iter()
                .zip(&test)
                .filter(|(p, e)| crate::slm::argmax(p) == e.label)
                .count() as f64
                / test.len() as f64
        };
        let agree = fast
            .iter()
            .zip(&burn)
            .filter(|(a, b)| crate::slm::argmax(a) == crate::slm::argmax(b))
            .count();
        let max_diff = fast
            .iter()
            .zip(&burn)
            .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
            .fold(0f32, f32::max);
        println!(
            "{} test sentences: accuracy kernels {:.4}, burn {:.4}; same argmax {agree}; max |p - p_burn| {max_diff:.4}",
            test.len(),
            acc(&fast),
            acc(&burn)
        );
    }
}
