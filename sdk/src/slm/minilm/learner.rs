//! MiniLM trained on the CPU kernels: [`super::backprop`]'s passes and [`AdamW`], on the
//! classifier's weights read once per training run and written back at its end.

use std::sync::Mutex;

use super::backprop::{self, Dropout, Shape, Work};
use super::params::{Params, trainable};
use super::{BertConfig, MiniLmClassifier};
use crate::Result;
use crate::slm::TrainConfig;
use crate::slm::adamw::AdamW;
use crate::slm::train::{Encoded, Learner};
use crate::sync::lock;

/// The last training run's buffers, for the next run. A run in a fresh [`Work`] spends its
/// first steps allocating (and the kernel zeroing) the memory later steps reuse; a client
/// trains every round. Runs take turns (see `slm::train`), so one spare is enough.
static SPARE: Mutex<Option<Work>> = Mutex::new(None);

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
    words: WordRows,
    weight_decay: f32,
}

/// The word table steps only on the rows some batch has used (live rows). The others have
/// zero moments, so AdamW would only decay them: their decay waits, as a running product of
/// the steps' factors, until a batch or a read of the weights needs them. A batch uses a few
/// hundred of the table's rows, and stepping them all would read and write the whole table,
/// and its moments, every step.
struct WordRows {
    width: usize,
    live: Vec<bool>,
    /// The live rows, in the order they came.
    rows: Vec<u32>,
    /// Each row's weights hold the decay of the steps before `at[row]`.
    at: Vec<usize>,
    /// `decay[k]`: the product of the first `k` steps' factors.
    decay: Vec<f64>,
}

impl WordRows {
    fn new(vocab: usize, width: usize) -> WordRows {
        WordRows {
            width,
            live: vec![false; vocab],
            rows: Vec::new(),
            at: vec![0; vocab],
            decay: vec![1.0],
        }
    }

    /// Applies the decay waiting on `row` of `word`; with `mark`, the row steps from now on.
    fn sync(&mut self, word: &mut [f32], row: u32, mark: bool) {
        let r = row as usize;
        if self.live.get(r).is_none_or(|&l| l) {
            return;
        }
        let now = self.decay.len() - 1;
        if self.at[r] != now {
            let f = (self.decay[now] / self.decay[self.at[r]]) as f32;
            word[r * self.width..][..self.width]
                .iter_mut()
                .for_each(|w| *w *= f);
            self.at[r] = now;
        }
        if mark {
            self.live[r] = true;
            self.rows.push(row);
        }
    }

    /// [`WordRows::sync`] for every row.
    fn sync_all(&mut self, word: &mut [f32]) {
        for r in 0..self.live.len() {
            self.sync(word, r as u32, false);
        }
    }
}

impl CpuLearner {
    /// Starts from `model`'s weights.
    pub fn new(model: &MiniLmClassifier, cfg: &BertConfig, train: &TrainConfig) -> Result<Self> {
        let params = Params::read(model)?;
        let d = params.d();
        let words = WordRows::new(params.word.len() / d.max(1), d);
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
            work: lock(&SPARE).take().unwrap_or_default(),
            words,
            weight_decay: train.weight_decay,
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
        // The word table's rows this batch reads are brought up to date, and step from now on.
        let embeddings = self.trainable.first().copied().unwrap_or(false);
        if embeddings {
            for &id in seqs.iter().flat_map(|s| s.iter()) {
                self.words.sync(&mut self.params.word, id, true);
            }
        }
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
        let rows = embeddings.then_some((0, self.words.width, self.words.rows.as_slice()));
        self.optim.step(
            lr,
            self.params.tensors_mut(),
            self.grads.tensors(),
            &self.trainable,
            rows,
        );
        if embeddings {
            // The rows the batch wrote go back to zero (the backward pass writes only those).
            let d = self.words.width;
            for &id in seqs.iter().flat_map(|s| s.iter()) {
                self.grads.word[id as usize * d..][..d].fill(0.0);
            }
            // The step's decay, as AdamW applied it to the live rows.
            let factor = f64::from((1.0 - lr * f64::from(self.weight_decay)) as f32);
            let last = self.words.decay.last().copied().unwrap_or(1.0);
            self.words.decay.push(last * factor);
        }
        self.steps += 1;
        Ok(loss)
    }

    fn logits(&mut self, batch: &[&Encoded]) -> Result<Vec<f32>> {
        let seqs: Vec<&[u32]> = batch.iter().map(|e| e.ids.as_slice()).collect();
        for &id in seqs.iter().flat_map(|s| s.iter()) {
            self.words.sync(&mut self.params.word, id, false);
        }
        let tape = backprop::forward(&self.params, self.shape, &seqs, None, &mut self.work)?;
        let logits = tape.logits.clone();
        tape.recycle(&mut self.work);
        Ok(logits)
    }

    fn keep(&mut self) -> Result<()> {
        self.words.sync_all(&mut self.params.word);
        self.best = Some(self.params.clone());
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<MiniLmClassifier> {
        self.words.sync_all(&mut self.params.word);
        *lock(&SPARE) = Some(std::mem::take(&mut self.work));
        let p = self.best.as_ref().unwrap_or(&self.params);
        Ok(p.write(self.model))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows stepped only once a batch uses them, their decay held back until then, end where
    /// AdamW over the whole table ends.
    #[test]
    fn live_rows_end_where_dense_steps_end() {
        let (vocab, d, wd) = (6usize, 3usize, 0.1f32);
        let start: Vec<f32> = (0..vocab * d).map(|i| (i as f32 - 7.0) * 0.25).collect();
        let batches: [&[u32]; 4] = [&[1], &[1, 3], &[4], &[]];
        let grad_of = |ids: &[u32], step: usize| {
            let mut g = vec![0.0f32; vocab * d];
            for &id in ids {
                for (c, g) in g[id as usize * d..][..d].iter_mut().enumerate() {
                    *g += 0.3 * (c as f32 + 1.0) - 0.2 * step as f32;
                }
            }
            g
        };
        let lrs = [0.05, 0.1, 0.08, 0.02];

        let mut dense = start.clone();
        let mut opt = AdamW::new(&[vocab * d], wd, 1e-8, Some(1.0));
        for (k, ids) in batches.iter().enumerate() {
            let g = grad_of(ids, k);
            opt.step(lrs[k], vec![&mut dense], vec![&g], &[true], None);
        }

        let mut lazy = start.clone();
        let mut words = WordRows::new(vocab, d);
        let mut opt = AdamW::new(&[vocab * d], wd, 1e-8, Some(1.0));
        for (k, ids) in batches.iter().enumerate() {
            for &id in *ids {
                words.sync(&mut lazy, id, true);
            }
            let g = grad_of(ids, k);
            let rows = Some((0, d, words.rows.as_slice()));
            opt.step(lrs[k], vec![&mut lazy], vec![&g], &[true], rows);
            let factor = f64::from((1.0 - lrs[k] * f64::from(wd)) as f32);
            let last = *words.decay.last().unwrap();
            words.decay.push(last * factor);
        }
        words.sync_all(&mut lazy);
        for (i, (a, b)) in lazy.iter().zip(&dense).enumerate() {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{i}: {a} vs {b}");
        }
        assert_ne!(lazy, start);
    }
}
