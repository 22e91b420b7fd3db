//! The training loop shared by every architecture: AdamW, linear warmup then linear decay,
//! length-bucketed mini-batches, weighted soft-target cross-entropy, early stopping on a local
//! validation split.

use std::time::Instant;

use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Tensor, TensorData};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::{Classifier, TextTokenizer, TokenBatch, argmax};
use crate::{Error, Result};

/// One training example: a text, a target distribution over the labels (one-hot for real data,
/// soft for synthetic samples with aggregated scores) and a weight in the loss.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainExample {
    /// The text.
    pub text: String,
    /// Target probabilities, one per label, summing to 1.
    pub target: Vec<f32>,
    /// Weight of this example in the loss (>= 0).
    pub weight: f32,
}

impl TrainExample {
    /// A hard-labeled example with weight 1.
    pub fn hard(text: impl Into<String>, label: usize, n_labels: usize) -> Self {
        let mut target = vec![0.0; n_labels];
        if let Some(t) = target.get_mut(label) {
            *t = 1.0;
        }
        Self {
            text: text.into(),
            target,
            weight: 1.0,
        }
    }
}

/// Training hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// Passes over the training examples.
    pub epochs: usize,
    /// Examples per optimizer step.
    pub batch_size: usize,
    /// Peak learning rate (after warmup).
    pub learning_rate: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f32,
    /// Fraction of all steps spent warming up linearly from 0; the rest decays linearly to 0.
    pub warmup_fraction: f64,
    /// Fraction of the examples held out for early stopping (0 disables it).
    pub validation_fraction: f64,
    /// Epochs without a better validation loss before stopping.
    pub patience: usize,
    /// Freeze the lowest this-many encoder layers (MiniLM only).
    pub freeze_layers: usize,
    /// Freeze the embedding tables.
    pub freeze_embeddings: bool,
    /// Clip each parameter tensor's gradient to this L2 norm (burn's clipping by norm).
    pub max_grad_norm: Option<f32>,
    /// Seed for the validation split, batch order and dropout.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 3,
            batch_size: 32,
            learning_rate: 5e-5,
            weight_decay: 0.01,
            warmup_fraction: 0.1,
            validation_fraction: 0.1,
            patience: 2,
            freeze_layers: 0,
            freeze_embeddings: false,
            max_grad_norm: Some(1.0),
            seed: 42,
        }
    }
}

impl TrainConfig {
    /// Defaults for an architecture: MiniLM fine-tunes gently, the bag model learns from scratch
    /// and wants a much larger step and more epochs.
    pub fn for_arch(arch: super::Arch) -> Self {
        match arch {
            super::Arch::Minilm => Self::default(),
            super::Arch::Bag => Self {
                epochs: 15,
                learning_rate: 1e-3,
                weight_decay: 0.0,
                warmup_fraction: 0.05,
                patience: 3,
                ..Self::default()
            },
        }
    }

    /// Defaults for the update after each round (private data plus the round's synthetic
    /// samples, from the current weights): MiniLM 2 epochs at its rate; the bag model 15 at
    /// 2e-3. Why: at 5 epochs of 1e-3 a bag model first trained on label-skewed private data
    /// did not fit the update's own data (last epoch's mean loss 0.62 against 0.03) and went on
    /// answering its majority label.
    pub fn for_round(arch: super::Arch) -> Self {
        let base = Self::for_arch(arch);
        match arch {
            super::Arch::Minilm => Self { epochs: 2, ..base },
            super::Arch::Bag => Self {
                epochs: 15,
                learning_rate: 2e-3,
                ..base
            },
        }
    }

    /// Learning rate at `step` of `total`: linear warmup, then linear decay to 0.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        let warmup = ((self.warmup_fraction * total as f64).round() as usize).max(1);
        let s = step as f64 + 1.0;
        if step < warmup {
            self.learning_rate * s / warmup as f64
        } else {
            let rest = (total.saturating_sub(warmup)).max(1) as f64;
            self.learning_rate * ((total as f64 - step as f64) / rest).clamp(0.0, 1.0)
        }
    }

    fn check(&self) -> Result<()> {
        if self.epochs == 0 || self.batch_size == 0 {
            return Err(Error::Data("epochs and batch size must be positive".into()));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(Error::Data("learning rate must be positive".into()));
        }
        if !(0.0..1.0).contains(&self.validation_fraction)
            || !(0.0..=1.0).contains(&self.warmup_fraction)
        {
            return Err(Error::Data(
                "validation/warmup fractions must be in [0, 1)".into(),
            ));
        }
        Ok(())
    }
}

/// Reported after every optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainProgress {
    /// Current epoch, from 1.
    pub epoch: usize,
    /// Planned epochs.
    pub epochs: usize,
    /// Optimizer steps done so far.
    pub step: usize,
    /// Planned steps.
    pub total_steps: usize,
    /// Loss of this step's batch.
    pub loss: f32,
    /// Learning rate of this step.
    pub learning_rate: f64,
    /// Validation loss, set on the last step of an epoch when there is a validation split.
    pub val_loss: Option<f32>,
}

/// What a training run did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// Epochs run (fewer than planned after early stopping).
    pub epochs_run: usize,
    /// Epoch whose weights were kept (the best on validation, else the last).
    pub best_epoch: usize,
    /// Optimizer steps taken.
    pub steps: usize,
    /// Training examples (after the validation split).
    pub train_examples: usize,
    /// Validation examples.
    pub val_examples: usize,
    /// Mean training loss of the last epoch.
    pub train_loss: f32,
    /// Validation loss of the kept weights.
    pub val_loss: Option<f32>,
    /// Validation accuracy of the kept weights (argmax of target vs prediction).
    pub val_accuracy: Option<f64>,
    /// Wall time spent in training steps, seconds.
    pub train_seconds: f64,
    /// Training examples processed per second (forward + backward + update).
    pub train_samples_per_sec: f64,
}

/// A tokenized example.
pub(crate) struct Encoded {
    /// Token ids (unpadded).
    pub ids: Vec<u32>,
    /// Target probabilities.
    pub target: Vec<f32>,
    /// Weight in the loss.
    pub weight: f32,
}

/// What the training loop drives: a model with its optimizer and its passes. burn's autodiff
/// is one ([`BurnLearner`]); MiniLM on the CPU kernels is another.
pub(crate) trait Learner<M> {
    /// One optimizer step over `batch` at learning rate `lr`; the batch's loss.
    fn step(&mut self, batch: &[&Encoded], lr: f64) -> Result<f32>;
    /// Inference-mode logits of `batch`, `[B * labels]` row-major.
    fn logits(&mut self, batch: &[&Encoded]) -> Result<Vec<f32>>;
    /// Remembers the current weights as the best so far.
    fn keep(&mut self) -> Result<()>;
    /// The kept weights (else the current ones) in inference form.
    fn finish(self: Box<Self>) -> Result<M>;
}

/// burn's autodiff and AdamW on the model's own device.
struct BurnLearner<M: Classifier> {
    model: M,
    optim: burn::optim::ModuleOptimizer,
    best: Option<M>,
    n_labels: usize,
    pad: u32,
    device: Device,
}

/// Tensors of one batch: tokens, targets `[B, C]`, weights `[B, 1]`.
struct Batch {
    tokens: TokenBatch,
    targets: Tensor<2>,
    weights: Tensor<2>,
}

fn make_batch(items: &[&Encoded], n_labels: usize, pad_id: u32, device: &Device) -> Batch {
    let seqs: Vec<&[u32]> = items.iter().map(|e| e.ids.as_slice()).collect();
    let targets: Vec<f32> = items
        .iter()
        .flat_map(|e| e.target.iter().copied())
        .collect();
    let weights: Vec<f32> = items.iter().map(|e| e.weight).collect();
    Batch {
        tokens: TokenBatch::new(&seqs, pad_id, device),
        targets: Tensor::from_data(TensorData::new(targets, [items.len(), n_labels]), device),
        weights: Tensor::from_data(TensorData::new(weights, [items.len(), 1]), device),
    }
}

/// Weighted soft-target cross-entropy: `sum_i w_i * -sum_c t_ic log p_ic / sum_i w_i`.
pub(crate) fn weighted_soft_ce(
    logits: Tensor<2>,
    targets: Tensor<2>,
    weights: Tensor<2>,
) -> Tensor<1> {
    let per_example = -(log_softmax(logits, 1) * targets).sum_dim(1); // [B, 1]
    let total_weight = weights.clone().sum().clamp_min(1e-12);
    (per_example * weights).sum() / total_weight
}

/// Batches of indices bucketed by length: shuffle, cut into pools of 16 batches, sort each pool
/// by length, cut into batches, shuffle the batches. Batches pad little and still differ from
/// epoch to epoch.
fn bucketed_batches(
    lengths: &[usize],
    idx: &[usize],
    batch: usize,
    rng: &mut StdRng,
) -> Vec<Vec<usize>> {
    let mut idx = idx.to_vec();
    idx.shuffle(rng);
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for pool in idx.chunks_mut(batch * 16) {
        pool.sort_by_key(|&i| lengths[i]);
        batches.extend(pool.chunks(batch).map(<[usize]>::to_vec));
    }
    batches.shuffle(rng);
    batches
}

/// Held for the whole of a training run. Burn's CPU backend draws dropout masks from one
/// process-wide RNG, which each run seeds at its start: two runs at once in one process (e.g.
/// several clients of an experiment) would interleave their draws in whatever order the
/// threads run, and the same inputs would train different models.
static TRAINING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Trains `model` and returns it in inference form (no autodiff) with the report: on the CPU
/// kernels where `cpu` offers a learner for it, else with burn's autodiff on `device`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn fit<M: Classifier>(
    model: M,
    cpu: impl FnOnce(&M) -> Result<Option<Box<dyn Learner<M>>>>,
    tokenizer: &TextTokenizer,
    n_labels: usize,
    examples: &[TrainExample],
    cfg: &TrainConfig,
    device: &Device,
    progress: &mut dyn FnMut(&TrainProgress),
) -> Result<(M, TrainReport)> {
    cfg.check()?;
    if examples.is_empty() {
        return Err(Error::Data("no training examples".into()));
    }
    for (i, e) in examples.iter().enumerate() {
        if e.target.len() != n_labels {
            return Err(Error::Data(format!(
                "example {i}: {} target values for {n_labels} labels",
                e.target.len()
            )));
        }
        if !(e.weight >= 0.0 && e.weight.is_finite())
            || e.target.iter().any(|t| !t.is_finite() || *t < 0.0)
        {
            return Err(Error::Data(format!(
                "example {i}: weight and targets must be finite and >= 0"
            )));
        }
    }
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let data: Vec<Encoded> = tokenizer
        .encode(&texts)?
        .into_iter()
        .zip(examples)
        .map(|(ids, e)| Encoded {
            ids,
            target: e.target.clone(),
            weight: e.weight,
        })
        .collect();
    let lengths: Vec<usize> = data.iter().map(|e| e.ids.len()).collect();

    // A poisoned lock only means another run panicked; the RNG is reseeded below.
    let _one_at_a_time = crate::sync::lock(&TRAINING);
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    device.seed(cfg.seed);
    let mut all: Vec<usize> = (0..data.len()).collect();
    all.shuffle(&mut rng);
    let n_val = if data.len() >= 20 {
        (cfg.validation_fraction * data.len() as f64).round() as usize
    } else {
        0
    };
    let (val_idx, train_idx) = all.split_at(n_val);
    let (val_idx, train_idx) = (val_idx.to_vec(), train_idx.to_vec());

    let steps_per_epoch = train_idx.len().div_ceil(cfg.batch_size);
    let total_steps = steps_per_epoch * cfg.epochs;
    let mut learner: Box<dyn Learner<M>> = match cpu(&model)? {
        Some(l) => l,
        None => Box::new(BurnLearner::new(
            model,
            cfg,
            n_labels,
            tokenizer.pad_id(),
            device,
        )),
    };
    let mut best: Option<(f32, f64, usize)> = None;
    let (mut step, mut epochs_run, mut train_loss, mut since_best) = (0, 0, 0.0f32, 0);
    let mut train_seconds = 0.0;
    let mut seen = 0usize;

    for epoch in 1..=cfg.epochs {
        epochs_run = epoch;
        let (mut loss_sum, mut loss_weight) = (0.0f64, 0.0f64);
        let batches = bucketed_batches(&lengths, &train_idx, cfg.batch_size, &mut rng);
        let n_batches = batches.len();
        for (b, batch_idx) in batches.into_iter().enumerate() {
            let start = Instant::now();
            let items: Vec<&Encoded> = batch_idx.iter().map(|&i| &data[i]).collect();
            let lr = cfg.lr_at(step, total_steps);
            let loss_value = learner.step(&items, lr)?;
            if !loss_value.is_finite() {
                return Err(Error::Model(format!(
                    "loss became {loss_value} at step {step}"
                )));
            }
            train_seconds += start.elapsed().as_secs_f64();
            seen += items.len();
            step += 1;
            loss_sum += f64::from(loss_value) * items.len() as f64;
            loss_weight += items.len() as f64;

            let last = b + 1 == n_batches;
            let val = if last && !val_idx.is_empty() {
                Some(evaluate(learner.as_mut(), &data, &val_idx, n_labels)?)
            } else {
                None
            };
            progress(&TrainProgress {
                epoch,
                epochs: cfg.epochs,
                step,
                total_steps,
                loss: loss_value,
                learning_rate: lr,
                val_loss: val.map(|v| v.0),
            });
            if let Some((val_loss, val_acc)) = val {
                if best.as_ref().is_none_or(|b| val_loss < b.0) {
                    learner.keep()?;
                    best = Some((val_loss, val_acc, epoch));
                    since_best = 0;
                } else {
                    since_best += 1;
                }
            }
        }
        train_loss = (loss_sum / loss_weight.max(1.0)) as f32;
        if !val_idx.is_empty() && since_best >= cfg.patience && epoch < cfg.epochs {
            tracing::info!(
                "early stop after epoch {epoch}: no validation improvement for {since_best} epochs"
            );
            break;
        }
    }

    let model = learner.finish()?;
    let (best_epoch, val_loss, val_accuracy) = match best {
        Some((loss, acc, epoch)) => (epoch, Some(loss), Some(acc)),
        None => (epochs_run, None, None),
    };
    Ok((
        model,
        TrainReport {
            epochs_run,
            best_epoch,
            steps: step,
            train_examples: train_idx.len(),
            val_examples: val_idx.len(),
            train_loss,
            val_loss,
            val_accuracy,
            train_seconds,
            train_samples_per_sec: seen as f64 / train_seconds.max(1e-9),
        },
    ))
}

impl<M: Classifier> BurnLearner<M> {
    fn new(model: M, cfg: &TrainConfig, n_labels: usize, pad: u32, device: &Device) -> Self {
        let optim = AdamWConfig::new()
            .with_weight_decay(cfg.weight_decay)
            .with_epsilon(1e-8)
            .with_grad_clipping(cfg.max_grad_norm.map(GradientClippingConfig::Norm))
            .init();
        let model = model
            .set_require_grad(true)
            .freeze_lower(cfg.freeze_layers, cfg.freeze_embeddings)
            .train();
        BurnLearner {
            model,
            optim,
            best: None,
            n_labels,
            pad,
            device: device.clone(),
        }
    }
}

impl<M: Classifier> Learner<M> for BurnLearner<M> {
    fn step(&mut self, batch: &[&Encoded], lr: f64) -> Result<f32> {
        // Tensors for training live on the plain device with autodiff.
        let batch = make_batch(
            batch,
            self.n_labels,
            self.pad,
            &self.device.clone().autodiff(),
        );
        let logits = self.model.logits(batch.tokens.ids, batch.tokens.mask);
        let loss = weighted_soft_ce(logits, batch.targets, batch.weights);
        let value = loss
            .clone()
            .try_into_scalar::<f32>()
            .map_err(|e| Error::Model(format!("reading loss: {e:?}")))?;
        if value.is_finite() {
            let grads = GradientsParams::from_grads(loss.backward(), &self.model);
            self.model = self.optim.step(lr, self.model.clone(), grads);
        }
        Ok(value)
    }

    fn logits(&mut self, batch: &[&Encoded]) -> Result<Vec<f32>> {
        let batch = make_batch(batch, self.n_labels, self.pad, &self.device);
        self.model
            .valid()
            .logits(batch.tokens.ids, batch.tokens.mask)
            .try_into_vec_as::<f32>()
            .map_err(|e| Error::Model(format!("reading logits: {e:?}")))
    }

    fn keep(&mut self) -> Result<()> {
        self.best = Some(self.model.valid());
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<M> {
        Ok(self.best.unwrap_or_else(|| self.model.valid()))
    }
}

/// `log sum exp` of one row of logits, in f64.
pub(crate) fn log_sum_exp(lg: &[f32]) -> f64 {
    let max = lg.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    f64::from(max)
        + lg.iter()
            .map(|&v| f64::from(v - max).exp())
            .sum::<f64>()
            .ln()
}

/// Soft-target cross-entropy `-sum_c t_c log p_c` of one row of logits, given its
/// [`log_sum_exp`].
pub(crate) fn soft_ce_row(lg: &[f32], t: &[f32], lse: f64) -> f64 {
    t.iter()
        .zip(lg)
        .map(|(&t, &v)| f64::from(t) * (lse - f64::from(v)))
        .sum()
}

/// Soft-target cross-entropy of each row of `logits` (`[B, labels]`), in f64.
pub(crate) fn soft_ce_rows(logits: &[f32], targets: &[f32], labels: usize) -> Vec<f64> {
    logits
        .chunks_exact(labels)
        .zip(targets.chunks_exact(labels))
        .map(|(lg, t)| soft_ce_row(lg, t, log_sum_exp(lg)))
        .collect()
}

/// Validation loss and accuracy of the learner's current weights, in inference mode.
fn evaluate<M>(
    learner: &mut dyn Learner<M>,
    data: &[Encoded],
    idx: &[usize],
    n_labels: usize,
) -> Result<(f32, f64)> {
    let mut sorted = idx.to_vec();
    sorted.sort_by_key(|&i| data[i].ids.len());
    let (mut loss_sum, mut weight_sum, mut correct) = (0.0f64, 0.0f64, 0usize);
    for chunk in sorted.chunks(64) {
        let items: Vec<&Encoded> = chunk.iter().map(|&i| &data[i]).collect();
        let logits = learner.logits(&items)?;
        let targets: Vec<f32> = items
            .iter()
            .flat_map(|e| e.target.iter().copied())
            .collect();
        for ((ce, e), lg) in soft_ce_rows(&logits, &targets, n_labels)
            .into_iter()
            .zip(&items)
            .zip(logits.chunks_exact(n_labels))
        {
            loss_sum += f64::from(e.weight) * ce;
            weight_sum += f64::from(e.weight);
            if argmax(lg) == argmax(&e.target) {
                correct += 1;
            }
        }
    }
    Ok((
        (loss_sum / weight_sum.max(1e-12)) as f32,
        correct as f64 / idx.len().max(1) as f64,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        let cfg = TrainConfig {
            learning_rate: 1.0,
            warmup_fraction: 0.1,
            ..Default::default()
        };
        assert!((cfg.lr_at(0, 100) - 0.1).abs() < 1e-9);
        assert!((cfg.lr_at(9, 100) - 1.0).abs() < 1e-9);
        assert!(cfg.lr_at(50, 100) < 0.6 && cfg.lr_at(50, 100) > 0.5);
        assert!(cfg.lr_at(99, 100) <= 0.02);
    }

    #[test]
    fn weighted_soft_ce_matches_hand_computation() {
        let device = Device::flex();
        let logits = Tensor::<2>::from_data([[0.0f32, 0.0], [2.0, 0.0]], &device);
        let targets = Tensor::<2>::from_data([[1.0f32, 0.0], [0.5, 0.5]], &device);
        let weights = Tensor::<2>::from_data([[1.0f32], [3.0]], &device);
        let loss: f32 = weighted_soft_ce(logits, targets, weights).into_scalar();
        let l1 = std::f32::consts::LN_2;
        let lse = (2f32.exp() + 1.0).ln();
        let l2 = 0.5 * (lse - 2.0) + 0.5 * lse;
        assert!((loss - (l1 + 3.0 * l2) / 4.0).abs() < 1e-5, "{loss}");
    }

    #[test]
    fn buckets_cover_every_index_once() {
        let lengths: Vec<usize> = (0..100).map(|i| (i * 37) % 23).collect();
        let idx: Vec<usize> = (0..100).collect();
        let batches = bucketed_batches(&lengths, &idx, 8, &mut StdRng::seed_from_u64(1));
        let mut all: Vec<usize> = batches.concat();
        all.sort();
        assert_eq!(all, idx);
        assert!(batches.iter().all(|b| b.len() <= 8));
    }
}
