//! The completion tokens of a training batch through the model: each token's log-probability,
//! and the route a loss's gradient takes from them back to the adapters.
//!
//! The LM head is frozen and as wide as the vocabulary. On burn's autodiff, its log-softmax, the
//! gather of the targets and their backward passes ran element by element on one thread, the
//! largest part of a tuning step. Here the head's logits come back to the host once; each row's
//! softmax, and the loss's gradient through it, run fused on rayon's threads. One product
//! carries that gradient to the hidden states, and autodiff takes it from there.

use std::ops::Range;

use burn::tensor::{Int, Tensor, TensorData};
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
    /// `[n, vocab]`: the softmax over the vocabulary at each token's position.
    probs: Vec<f32>,
    targets: Vec<u32>,
    /// Example `i`'s tokens: `logprobs[spans[i]]`.
    pub spans: Vec<Range<usize>>,
}

impl Completions {
    /// Runs `batch` through the model with adapters `lora`.
    pub fn of(
        llm: &Llm,
        lora: Option<&LoraAdapters>,
        batch: &[&TrainExample],
        cfg: &LoraConfig,
    ) -> Result<Completions> {
        let seqs = batch
            .iter()
            .map(|e| example_ids(llm, e, cfg))
            .collect::<Result<Vec<_>>>()?;
        let ids: Vec<Vec<u32>> = seqs.iter().map(|(ids, _)| ids.clone()).collect();
        let (rows, pads) = left_pad(&ids, llm.tokenizer.eos_id);
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
        for (i, (row, (_, n))) in rows.iter().zip(&seqs).enumerate() {
            let n = (*n).min(t);
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
        let mut probs = to_host_f32(model.lm_head(hidden.clone().detach()));
        let logprobs = softmax_rows(&mut probs, &targets, vocab);
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
            mut probs,
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
        let vocab = probs.len() / n.max(1);
        // d logprob / d logit_v = [v = target] - p_v.
        probs
            .par_chunks_mut(vocab)
            .zip(targets.par_iter().zip(upstream))
            .for_each(|(row, (&target, &g))| {
                row.iter_mut().for_each(|p| *p *= -g);
                row[target as usize] += g;
            });
        let grad = Tensor::<2>::from_data(TensorData::new(probs, [n, vocab]), &llm.device);
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
}
