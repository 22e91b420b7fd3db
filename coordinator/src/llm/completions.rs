//! The completion tokens of a training batch through the model: each token's log-probability,
//! and the route a loss's gradient takes from them back to the adapters.
//!
//! The LM head is frozen and as wide as the vocabulary. On burn's autodiff, its log-softmax, the
//! gather of the targets and their backward passes ran element by element on one thread, the
//! largest part of a tuning step. Here the head's softmax and the loss's gradient through it are
//! computed outright, without autodiff: on the CPU the logits come back to the host once and each
//! row runs fused on rayon's threads; on a GPU they stay there, as tensor ops. One product
//! carries that gradient to the hidden states, and autodiff takes it from there.

use std::ops::Range;

use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor, TensorData};
use rayon::prelude::*;

use super::engine::{Llm, left_pad};
use super::model::{LoraAdapters, StepInputs, to_host_f32, token_tensor};
use super::quant;
use super::train::{LoraConfig, TrainExample, example_ids};
use crate::{Error, Result};

/// A batch's completion tokens, scored by the model.
pub(crate) struct Completions {
    /// `[n, d_model]`: the hidden states that predict the completion tokens, one row per token
    /// (tracked where the adapters are).
    hidden: Tensor<2>,
    /// Each token's log-probability.
    pub logprobs: Vec<f32>,
    /// The softmax over the vocabulary at each token's position.
    probs: Softmax,
    targets: Vec<u32>,
    /// Example `i`'s tokens: `logprobs[spans[i]]`.
    pub spans: Vec<Range<usize>>,
}

/// A batch's token rows (prompt, then completion), left-padded to one length.
pub(crate) struct Padded {
    pub rows: Vec<Vec<u32>>,
    /// Each row's padding.
    pub pads: Vec<usize>,
    /// Each example's number of completion tokens (they end its row).
    pub completion: Vec<usize>,
}

impl Padded {
    pub fn new(llm: &Llm, batch: &[&TrainExample], cfg: &LoraConfig) -> Result<Padded> {
        let (ids, completion): (Vec<Vec<u32>>, Vec<usize>) = batch
            .iter()
            .map(|e| example_ids(llm, e, cfg))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .unzip();
        let (rows, pads) = left_pad(&ids, llm.tokenizer.eos_id);
        Ok(Padded {
            rows,
            pads,
            completion,
        })
    }
}

/// `[n, vocab]` softmax rows, where they are computed.
enum Softmax {
    /// On the host, row-major.
    Host(Vec<f32>),
    /// On the model's device (a tensor is a large value: boxed).
    Device(Box<Tensor<2>>),
}

impl Completions {
    /// Runs `batch` through the model with adapters `lora`.
    pub fn of(
        llm: &Llm,
        lora: Option<&LoraAdapters>,
        batch: &[&TrainExample],
        cfg: &LoraConfig,
    ) -> Result<Completions> {
        Completions::of_on(llm, lora, batch, cfg, llm.cpu_model().is_some())
    }

    /// [`Completions::of`] with the softmax on the host or on the model's device.
    fn of_on(
        llm: &Llm,
        lora: Option<&LoraAdapters>,
        batch: &[&TrainExample],
        cfg: &LoraConfig,
        on_host: bool,
    ) -> Result<Completions> {
        let Padded {
            rows,
            pads,
            completion: lens,
        } = Padded::new(llm, batch, cfg)?;
        let (b, len) = (rows.len(), rows[0].len());
        // Position `j` predicts token `j + 1`: the last token is input to nothing.
        let t = len - 1;
        let (d, vocab) = (llm.config.d_model, llm.config.vocab_size);
        let device = &llm.device;
        let inputs: Vec<Vec<u32>> = rows.iter().map(|r| r[..t].to_vec()).collect();
        let model = llm.model()?;
        let step = StepInputs::new(&llm.config, &pads, 0, t, device);
        // Blocks below the first adapter are frozen and tracked by nothing: where the quantized
        // CPU decoder holds the model, they run there, faster than on burn.
        let first = lora.map_or(0, |l| l.first);
        let hidden = match llm.cpu_model() {
            Some(cpu) if first > 0 => {
                let x = cpu.residual(&inputs.concat(), &pads, first);
                let x = Tensor::<3>::from_data(TensorData::new(x, [b, t, d]), device);
                model.forward_from(x, first, &step, lora)
            }
            _ => model.forward(token_tensor(&inputs, device), &step, None, lora),
        };
        // Example `i`'s `n` completion tokens end its row (rows are left-padded), so its last
        // `n` positions predict them.
        let (mut spans, mut at, mut targets) = (Vec::with_capacity(b), Vec::new(), Vec::new());
        for (i, (row, &n)) in rows.iter().zip(&lens).enumerate() {
            let n = n.min(t);
            spans.push(targets.len()..targets.len() + n);
            at.extend((t - n..t).map(|j| (i * t + j) as i64));
            targets.extend_from_slice(&row[len - n..]);
        }
        if let Some(&bad) = targets.iter().find(|&&x| x as usize >= vocab) {
            return Err(Error::Model(format!(
                "token {bad} is outside the model's vocabulary of {vocab}"
            )));
        }
        let n = targets.len();
        let at = Tensor::<1, Int>::from_data(TensorData::new(at, [n]), device);
        let hidden = hidden.reshape([b * t, d]).select(0, at);
        let logits = model.lm_head(hidden.clone().detach());
        let (logprobs, probs) = if on_host {
            let mut probs = to_host_f32(logits);
            let logprobs = softmax_rows(&mut probs, &targets, vocab);
            (logprobs, Softmax::Host(probs))
        } else {
            let (logprobs, probs) = softmax_tensor(logits, &targets, device);
            (logprobs, Softmax::Device(Box::new(probs)))
        };
        Ok(Completions {
            hidden,
            logprobs,
            probs,
            targets,
            spans,
        })
    }

    /// Each example's summed log-probability.
    pub fn sums(&self) -> Vec<f32> {
        self.spans
            .iter()
            .map(|s| self.logprobs[s.clone()].iter().sum())
            .collect()
    }

    /// A scalar to back-propagate for a loss `L` of the log-probabilities, given `upstream`,
    /// `dL/dlogprob` of each token: its gradient is `L`'s (its value means nothing). The head is
    /// frozen, so the gradient stops at the hidden states: `dL/dlogits @ head^T`.
    pub fn carrier(self, llm: &Llm, upstream: &[f32]) -> Result<Tensor<1>> {
        let Completions {
            hidden,
            probs,
            targets,
            ..
        } = self;
        let n = targets.len();
        if upstream.len() != n {
            return Err(Error::Model(format!(
                "{} gradients for {n} completion tokens",
                upstream.len()
            )));
        }
        let device = &llm.device;
        // d logprob / d logit_v = [v = target] - p_v.
        let grad = match probs {
            Softmax::Host(mut probs) => {
                let vocab = probs.len() / n.max(1);
                probs
                    .par_chunks_mut(vocab)
                    .zip(targets.par_iter().zip(upstream))
                    .for_each(|(row, (&target, &g))| {
                        row.iter_mut().for_each(|p| *p *= -g);
                        row[target as usize] += g;
                    });
                Tensor::<2>::from_data(TensorData::new(probs, [n, vocab]), device)
            }
            Softmax::Device(probs) => {
                let g = Tensor::<2>::from_data(TensorData::new(upstream.to_vec(), [n, 1]), device);
                let at = column(&targets, device);
                (*probs * g.clone().neg()).scatter(1, at, g, IndexingUpdateOp::Add)
            }
        };
        let dh = llm.model()?.lm_head_backward(grad);
        Ok((hidden * dh).sum())
    }
}

/// Each row of `logits` (`[n, vocab]`) becomes its softmax; returns the log-probability of each
/// row's target.
fn softmax_rows(logits: &mut [f32], targets: &[u32], vocab: usize) -> Vec<f32> {
    logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .map(|(row, &target)| {
            quant::with_simd(
                #[inline(always)]
                || {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let picked = row[target as usize] - max;
                    row.iter_mut().for_each(|x| *x -= max);
                    quant::exp_in_place(row);
                    let sum: f64 = row.iter().map(|&e| f64::from(e)).sum();
                    let inv = (1.0 / sum) as f32;
                    row.iter_mut().for_each(|p| *p *= inv);
                    picked - sum.ln() as f32
                },
            )
        })
        .collect()
}

/// The device's form of [`softmax_rows`]: the log-probability of each row's target (on the
/// host) and the rows' softmax (on the device).
fn softmax_tensor(logits: Tensor<2>, targets: &[u32], device: &Device) -> (Vec<f32>, Tensor<2>) {
    let shifted = logits.clone() - logits.max_dim(1);
    let exp = shifted.clone().exp();
    let sum = exp.clone().sum_dim(1);
    let picked = shifted.gather(1, column(targets, device)) - sum.clone().log();
    (to_host_f32(picked), exp / sum)
}

/// `[n, 1]` indices.
fn column(targets: &[u32], device: &Device) -> Tensor<2, Int> {
    let at: Vec<i64> = targets.iter().map(|&t| i64::from(t)).collect();
    Tensor::from_data(TensorData::new(at, [targets.len(), 1]), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_become_their_softmax_and_give_the_targets_log_probability() {
        let mut rows = vec![1.0f32, 2.0, 3.0, 0.5, 0.5, -200.0];
        let lp = softmax_rows(&mut rows, &[2, 0], 3);
        let lse = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        assert!((f64::from(lp[0]) - (3.0 - lse)).abs() < 1e-6, "{lp:?}");
        assert!((f64::from(lp[1]) - 0.5f64.ln()).abs() < 1e-6, "{lp:?}");
        assert!((rows[..3].iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((rows[2] - (3.0 - lse).exp() as f32).abs() < 1e-6);
        assert_eq!(rows[5], 0.0);
    }

    /// The softmax and gradient as tensor ops (a GPU's route) give what the host's rows give:
    /// the same log-probabilities and the same gradient at the adapters.
    #[test]
    fn the_devices_route_is_the_hosts() -> Result<()> {
        use burn::module::Module;

        use crate::llm::train::LoraTrainer;

        let llm = crate::llm::test_assets::tiny_llm()?;
        let sides = [
            ("Review:", " a wonderful film"),
            ("Spam:", " win money now, click here"),
        ]
        .map(|(p, c)| TrainExample {
            prompt: p.into(),
            completion: c.into(),
            weight: 1.0,
        });
        let batch: Vec<&TrainExample> = sides.iter().collect();
        let cfg = LoraConfig::default();
        // A step first: a fresh adapter's `b` factors are zero, and so would `a`'s gradients be.
        let mut trainer = LoraTrainer::new(&llm, cfg.clone(), 3);
        trainer.step(&llm, &sides)?;
        let adapters = trainer.adapters().expect("adapters").train();
        let run = |on_host| -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
            let c = Completions::of_on(&llm, Some(&adapters), &batch, &cfg, on_host)?;
            let logprobs = c.logprobs.clone();
            let upstream: Vec<f32> = (0..logprobs.len()).map(|i| 0.1 * i as f32 - 0.3).collect();
            let grads = c.carrier(&llm, &upstream)?.backward();
            let mut out = Vec::new();
            for block in &adapters.blocks {
                for p in [&block.q.a, &block.q.b, &block.v.a, &block.v.b] {
                    out.push(to_host_f32(p.val().grad(&grads).expect("a gradient")));
                }
            }
            Ok((logprobs, out))
        };
        let (host_lp, host_grads) = run(true)?;
        let (device_lp, device_grads) = run(false)?;
        for (h, d) in host_lp.iter().zip(&device_lp) {
            assert!((h - d).abs() < 1e-4, "{h} against {d}");
        }
        for (h, d) in host_grads.iter().zip(&device_grads) {
            let scale = h.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(scale > 0.0);
            for (x, y) in h.iter().zip(d) {
                assert!((x - y).abs() <= 1e-4 * scale, "{x} against {y}");
            }
        }
        Ok(())
    }
}
