//! The light SLM for weak devices: a fastText-style bag of wordpieces and hashed wordpiece
//! bigrams, mean-pooled, then a one-hidden-layer head; trained from scratch. It shares the
//! MiniLM tokenizer, so both architectures read the same text the same way, and costs a few
//! embedding lookups per token instead of six transformer layers.

use burn::module::Module;
use burn::nn::{
    Dropout, DropoutConfig, Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig,
};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Int, Tensor};
use serde::{Deserialize, Serialize};

use super::{Classifier, mean_pool};
use crate::{Error, Result};

/// Hyper-parameters of the bag model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BagConfig {
    /// Wordpiece vocabulary size (ids below this are unigrams).
    pub vocab_size: usize,
    /// Hash buckets for bigrams. A prime, so `(a * vocab + b) mod buckets` spreads pairs evenly.
    pub buckets: usize,
    /// Embedding width.
    pub dim: usize,
    /// Hidden width of the head.
    pub hidden: usize,
    /// Dropout on the pooled vector while training.
    pub dropout: f64,
}

impl BagConfig {
    /// Defaults for a vocabulary: 64-wide embeddings, 65,521 bigram buckets (about 6M
    /// parameters, 24 MB as f32).
    pub fn new(vocab_size: usize) -> Self {
        Self {
            vocab_size,
            buckets: 65_521,
            dim: 64,
            hidden: 64,
            dropout: 0.2,
        }
    }

    /// A model with random weights for `n_labels` labels.
    pub fn init(&self, n_labels: usize, device: &Device) -> Result<BagClassifier> {
        // Pair ids a * vocab + b must fit an i32 on backends whose ints are 32-bit.
        if (self.vocab_size as u64).pow(2) >= i32::MAX as u64 || self.buckets == 0 || self.dim == 0
        {
            return Err(Error::Model(format!("bag config out of range: {self:?}")));
        }
        if !(0.0..1.0).contains(&self.dropout) || n_labels == 0 {
            return Err(Error::Model(
                "bag: dropout must be in [0, 1) and labels > 0".into(),
            ));
        }
        Ok(BagClassifier {
            embedding: EmbeddingConfig::new(self.vocab_size + self.buckets, self.dim)
                .with_initializer(Initializer::Normal {
                    mean: 0.0,
                    std: 0.1,
                })
                .init(device),
            hidden: LinearConfig::new(self.dim, self.hidden).init(device),
            output: LinearConfig::new(self.hidden, n_labels).init(device),
            dropout: DropoutConfig::new(self.dropout).init(),
            vocab_size: self.vocab_size,
            buckets: self.buckets,
        })
    }
}

/// Bag of wordpieces + hashed bigrams classifier.
#[derive(Module, Debug)]
pub struct BagClassifier {
    embedding: Embedding,
    hidden: Linear,
    output: Linear,
    dropout: Dropout,
    #[module(skip)]
    vocab_size: usize,
    #[module(skip)]
    buckets: usize,
}

impl BagClassifier {
    /// Unigram ids followed by bigram bucket ids `[B, 2T-1]`, with their mask.
    fn features(&self, ids: Tensor<2, Int>, mask: Tensor<2>) -> (Tensor<2, Int>, Tensor<2>) {
        let [b, t] = ids.dims();
        if t < 2 {
            return (ids, mask);
        }
        let left = ids.clone().slice([0..b, 0..t - 1]);
        let right = ids.clone().slice([0..b, 1..t]);
        let bigrams = (left.mul_scalar(self.vocab_size as i64) + right)
            .remainder_scalar(self.buckets as i64)
            .add_scalar(self.vocab_size as i64);
        // A bigram counts only when both of its tokens are real (not padding).
        let bigram_mask = mask.clone().slice([0..b, 0..t - 1]) * mask.clone().slice([0..b, 1..t]);
        (
            Tensor::cat(vec![ids, bigrams], 1),
            Tensor::cat(vec![mask, bigram_mask], 1),
        )
    }
}

impl Classifier for BagClassifier {
    fn logits(&self, ids: Tensor<2, Int>, mask: Tensor<2>) -> Tensor<2> {
        let (features, mask) = self.features(ids, mask);
        let pooled = mean_pool(self.embedding.forward(features), mask);
        let h = relu(self.hidden.forward(self.dropout.forward(pooled)));
        self.output.forward(h)
    }

    fn freeze_lower(self, _frozen_layers: usize, freeze_embeddings: bool) -> Self {
        Self {
            embedding: self.embedding.set_require_grad(!freeze_embeddings),
            ..self
        }
    }
}
