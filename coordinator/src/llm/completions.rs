//! The completion tokens of a training batch through the model: each token's log-probability,
//! and the route a loss's gradient takes from them back to the adapters.
//!
//! The LM head is frozen and as wide as the vocabulary. On burn's autodiff, its log-softmax, the
//! gather of the targets and their backward passes ran element by element on one thread, the
//! largest part of a tuning step. Here the head's softmax and the loss's gradient through it are
//! computed outright, without autodiff: on the CPU the logits come back to the host once and each
//! row runs fused on rayon's threads; on a GPU they stay there, as tensor ops. One product
//! carries that gradient to the hidden states, and autodiff takes it from there.

use std::collections::HashMap;
use std::ops::Range;

use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor, TensorData};
use rayon::prelude::*;

use super::cpu_model::CpuLlama;
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

/// The frozen blocks' output (the residual stream entering the first adapted block) for the
/// sequences a trainer has seen. A round's tuning passes over its examples several times, and
/// the blocks below the adapters give a sequence the same rows every time: the CPU decoder
/// computes a sequence's rows bit for bit the same in any batch, and a pad position's values
/// never reach a real token's rows (its key is masked, its rows are its own).
#[derive(Default)]
pub(crate) struct FrozenRows {
    first: usize,
    rows: HashMap<Vec<u32>, Vec<f32>>,
    floats: usize,
}

/// The most floats [`FrozenRows`] holds (128 MiB: a round's examples with the defaults, about
/// 200 sequences of about 100 tokens, for models up to Qwen2.5-0.5B's width); past it the rows
/// are dropped and computed again.
const FROZEN_FLOATS: usize = 32 << 20;

impl FrozenRows {
    /// The residual stream `[b, t, d_model]` entering block `first` of `rows` (`[b, t]`,
    /// left-padded by `pads`), zeros at pad positions; rows not held are computed on `cpu`.
    fn residual(
        &mut self,
        cpu: &CpuLlama,
        rows: &[Vec<u32>],
        pads: &[usize],
        first: usize,
    ) -> Vec<f32> {
        let d = cpu.config().d_model;
        if first != self.first {
            self.clear();
            self.first = first;
        }
        let seqs: Vec<&[u32]> = rows.iter().zip(pads).map(|(r, &p)| &r[p..]).collect();
        let mut missing = self.missing(&seqs);
        let need: usize = missing.iter().map(|s| s.len() * d).sum();
        if !missing.is_empty() && self.floats + need > FROZEN_FLOATS {
            // Drop what is held; this batch's sequences are all computed again.
            self.clear();
            missing = self.missing(&seqs);
        }
        if !missing.is_empty() {
            let (padded, at) = left_pad(&missing, 0);
            let t = padded[0].len();
            let x = cpu.residual(&padded.concat(), &at, first);
            for (k, seq) in missing.into_iter().enumerate() {
                let held = x[(k * t + at[k]) * d..(k + 1) * t * d].to_vec();
                self.floats += held.len();
                self.rows.insert(seq, held);
            }
        }
        let t = rows[0].len();
        let mut out = vec![0.0f32; rows.len() * t * d];
        for (i, (s, &p)) in seqs.iter().zip(pads).enumerate() {
            if let Some(held) = self.rows.get(*s) {
                out[(i * t + p) * d..(i + 1) * t * d].copy_from_slice(held);
            }
        }
        out
    }

    /// The sequences of `seqs` not held, once each.
    fn missing(&self, seqs: &[&[u32]]) -> Vec<Vec<u32>> {
        let mut missing: Vec<Vec<u32>> = Vec::new();
        for s in seqs {
            if !self.rows.contains_key(*s) && !missing.iter().any(|m| m == s) {
                missing.push(s.to_vec());
            }
        }
        missing
    }

    fn clear(&mut self) {
        self.rows.clear();
        self.floats = 0;
    }
}

impl Completions {
    /// Runs `batch` through the model with adapters `lora`, taking the frozen blocks' output
    /// from `frozen` where it holds it.
    pub fn of(
        llm: &Llm,
        lora: Option<&LoraAdapters>,
        batch: &[&TrainExample],
        cfg: &LoraConfig,
        frozen: Option<&mut FrozenRows>,
    ) -> Result<Completions> {
        let on_host = llm.cpu_model().is_some();
        Completions::of_on(llm, lora, batch, cfg, frozen, on_host)
    }

    /// [`Completions::of`] with the softmax on the host or on the model's device.
    fn of_on(
        llm: &Llm,
        lora: Option<&LoraAdapters>,
        batch: &[&TrainExample],
        cfg: &LoraConfig,
        frozen: Option<&mut FrozenRows>,
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
        // CPU decoder holds the model, they run there, faster than on burn. Without adapters,
        // the split is the one `cfg`'s adapters have, so that a DPO reference computes what its
        // policy computes at the start.
        let first = match lora {
            Some(l) => l.first,
            None if cfg.top_layers > 0 => llm.config.n_layers.saturating_sub(cfg.top_layers),
            None => 0,
        };
        let hidden = match llm.cpu_model() {
            Some(cpu) if first > 0 => {
                let x = match frozen {
                    Some(held) => held.residual(cpu, &inputs, &pads, first),
                    None => cpu.residual(&inputs.concat(), &pads, first),
                };
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

    /// A batch's log-probabilities, and the adapters' gradients for an upstream gradient
    /// that differs token by token.
    fn logprobs_and_grads(c: Completions, llm: &Llm, adapters: &LoraAdapters) -> Result<Scored> {
        let logprobs = c.logprobs.clone();
        let upstream: Vec<f32> = (0..logprobs.len()).map(|i| 0.1 * i as f32 - 0.3).collect();
        let grads = c.carrier(llm, &upstream)?.backward();
        let mut out = Vec::new();
        for block in &adapters.blocks {
            for p in [&block.q.a, &block.q.b, &block.v.a, &block.v.b] {
                out.push(to_host_f32(p.val().grad(&grads).expect("a gradient")));
            }
        }
        Ok((logprobs, out))
    }

    type Scored = (Vec<f32>, Vec<Vec<f32>>);

    /// Adapters after one step on `batch`: a fresh adapter's `b` factors are zero, and so
    /// would `a`'s gradients be.
    fn stepped_adapters(
        llm: &Llm,
        cfg: &LoraConfig,
        batch: &[TrainExample],
    ) -> Result<LoraAdapters> {
        use burn::module::Module;

        use crate::llm::train::LoraTrainer;
        let mut trainer = LoraTrainer::new(llm, cfg.clone(), 3);
        trainer.step(llm, batch)?;
        Ok(trainer.adapters().expect("adapters").train())
    }

    fn example(prompt: &str, completion: &str) -> TrainExample {
        TrainExample {
            prompt: prompt.into(),
            completion: completion.into(),
            weight: 1.0,
        }
    }

    /// The softmax and gradient as tensor ops (a GPU's route) give what the host's rows give:
    /// the same log-probabilities and the same gradient at the adapters.
    #[test]
    fn the_devices_route_is_the_hosts() -> Result<()> {
        let llm = crate::llm::test_assets::tiny_llm()?;
        let sides = [
            example("Review:", " a wonderful film"),
            example("Spam:", " win money now, click here"),
        ];
        let batch: Vec<&TrainExample> = sides.iter().collect();
        let cfg = LoraConfig::default();
        let adapters = stepped_adapters(&llm, &cfg, &sides)?;
        let run = |on_host| {
            let c = Completions::of_on(&llm, Some(&adapters), &batch, &cfg, None, on_host)?;
            logprobs_and_grads(c, &llm, &adapters)
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

    /// The frozen blocks' output taken from a store gives what computing it in the batch gives,
    /// bit for bit (log-probabilities and the adapters' gradients), though a sequence comes
    /// back in a batch of another length (other padding). On the real model: its integer
    /// products give a row the same bits in any batch (the tiny model's f32 tiles need not).
    #[test]
    fn held_frozen_rows_are_the_batchs_own() -> Result<()> {
        let llm = crate::llm::test_assets::smollm2_llm();
        let cfg = LoraConfig {
            rank: 2,
            alpha: 4.0,
            top_layers: 2,
            ..LoraConfig::default()
        };
        let (a, b, c) = (
            example("Review:", " a wonderful film"),
            example("Spam:", " win money now"),
            example(
                "A much longer prompt, so that the others are padded:",
                " and more",
            ),
        );
        let adapters = stepped_adapters(llm, &cfg, &[a.clone(), b.clone()])?;
        let mut frozen = FrozenRows::default();
        for batch in [[&a, &b], [&b, &c], [&c, &a]] {
            let held = Completions::of(llm, Some(&adapters), &batch, &cfg, Some(&mut frozen))?;
            let own = Completions::of(llm, Some(&adapters), &batch, &cfg, None)?;
            let (held, own) = (
                logprobs_and_grads(held, llm, &adapters)?,
                logprobs_and_grads(own, llm, &adapters)?,
            );
            let bits = |(lp, grads): Scored| {
                let mut v: Vec<u32> = lp.iter().map(|x| x.to_bits()).collect();
                v.extend(grads.iter().flatten().map(|x| x.to_bits()));
                v
            };
            assert!(bits(held) == bits(own), "held rows gave other bits");
        }
        assert_eq!(frozen.rows.len(), 3);
        Ok(())
    }
}
