//! MiniLM trained on the CPU kernels: [`super::backprop`]'s passes and [`AdamW`], on the
//! classifier's weights read once per training run and written back at its end.

use super::backprop::{self, Dropout, Shape, Work};
use super::params::{Params, trainable};
use super::{BertConfig, MiniLmClassifier};
use crate::Result;
use crate::slm::TrainConfig;
use crate::slm::adamw::AdamW;
use crate::slm::train::{Encoded, Learner};

/// A training run's state.
pub(crate) struct CpuLearner {
    model: MiniLmClassifier,
    params: Params,
    grads: Params,
    best: Option<Params>,
    optim: AdamW,
    trainable: Vec<bool>,
    shape: Shape,
    seed: u64,
    steps: u64,
    work: Work,
}

impl CpuLearner {
    /// Starts from `model`'s weights.
    pub fn new(model: &MiniLmClassifier, cfg: &BertConfig, train: &TrainConfig) -> Result<Self> {
        let params = Params::read(model)?;
        let sizes: Vec<usize> = params.tensors().iter().map(|t| t.len()).collect();
        Ok(CpuLearner {
            model: model.clone(),
            grads: params.zeros_like(),
            trainable: trainable(
                params.layers.len(),
                train.freeze_layers,
                train.freeze_embeddings,
            ),
            params,
            best: None,
            optim: AdamW::new(&sizes, train.weight_decay, 1e-8, train.max_grad_norm),
            shape: Shape {
                heads: cfg.num_attention_heads,
                eps: cfg.layer_norm_eps as f32,
                dropout: cfg.hidden_dropout_prob as f32,
            },
            seed: train.seed,
            steps: 0,
            work: Work::default(),
        })
    }
}

impl Learner<MiniLmClassifier> for CpuLearner {
    fn step(&mut self, batch: &[&Encoded], lr: f64) -> Result<f32> {
        let seqs: Vec<&[u32]> = batch.iter().map(|e| e.ids.as_slice()).collect();
        let targets: Vec<f32> = batch
            .iter()
            .flat_map(|e| e.target.iter().copied())
            .collect();
        let weights: Vec<f32> = batch.iter().map(|e| e.weight).collect();
        let dropout = Dropout {
            p: self.shape.dropout,
            key: self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ self.steps,
        };
        let tape = backprop::forward(
            &self.params,
            self.shape,
            &seqs,
            Some(dropout),
            &mut self.work,
        )?;
        let (loss, dlogits) =
            backprop::soft_ce(&tape.logits, &targets, &weights, self.params.labels());
        if !loss.is_finite() {
            tape.recycle(&mut self.work);
            return Ok(loss);
        }
        backprop::backward(
            &self.params,
            self.shape,
            &tape,
            &dlogits,
            &self.trainable,
            &mut self.grads,
            &mut self.work,
        )?;
        tape.recycle(&mut self.work);
        self.optim.step(
            lr,
            self.params.tensors_mut(),
            self.grads.tensors(),
            &self.trainable,
        );
        self.steps += 1;
        Ok(loss)
    }

    fn logits(&mut self, batch: &[&Encoded]) -> Result<Vec<f32>> {
        let seqs: Vec<&[u32]> = batch.iter().map(|e| e.ids.as_slice()).collect();
        let tape = backprop::forward(&self.params, self.shape, &seqs, None, &mut self.work)?;
        let logits = tape.logits.clone();
        tape.recycle(&mut self.work);
        Ok(logits)
    }

    fn keep(&mut self) -> Result<()> {
        self.best = Some(self.params.clone());
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<MiniLmClassifier> {
        let p = self.best.as_ref().unwrap_or(&self.params);
        Ok(p.write(self.model))
    }
}
