//! Batched autoregressive generation with a KV cache, and token sampling (temperature, top-k,
//! top-p, seeded).
//!
//! Prompts of different lengths are LEFT padded into one batch; each sequence samples with its
//! own seeded RNG, so a sequence's output does not depend on what else is in the batch.
//! Finished sequences leave the batch (their cache rows are dropped) so late steps stay cheap.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::session::Session;

/// How to pick the next token.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// Softmax temperature; `0` means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` disables.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; `1` disables.
    pub top_p: f32,
    /// Stop after this many new tokens.
    pub max_new_tokens: usize,
    /// Base seed; sequence `i` of a batch samples with seed `seed + i` unless seeds are given.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Sampling {
        Sampling {
            temperature: 0.8,
            top_k: 50,
            top_p: 0.95,
            max_new_tokens: 64,
            seed: 0,
        }
    }
}

impl Sampling {
    /// Greedy decoding of up to `max_new_tokens` tokens.
    pub fn greedy(max_new_tokens: usize) -> Sampling {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens,
            seed: 0,
        }
    }

    /// Picks a token from one row of logits.
    pub fn sample(&self, logits: &[f32], rng: &mut StdRng) -> u32 {
        if self.temperature <= 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.temperature;
        // Candidates sorted by logit, most likely first (stable on ties: lower id first).
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l * inv_t))
            .collect();
        if self.top_k > 0 && self.top_k < cand.len() {
            cand.select_nth_unstable_by(self.top_k - 1, |a, b| b.1.total_cmp(&a.1));
            cand.truncate(self.top_k);
        }
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let max = cand.first().map_or(0.0, |c| c.1);
        let mut probs: Vec<f64> = cand.iter().map(|c| f64::from(c.1 - max).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|&p| {
                    acc += p;
                    acc >= f64::from(self.top_p)
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut r = rng.random::<f64>() * total;
        for (c, p) in cand.iter().zip(&probs) {
            r -= p;
            if r <= 0.0 {
                return c.0;
            }
        }
        cand[probs.len() - 1].0
    }
}

/// Index of the largest value (first on ties).
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// Generates continuations of many prompts at once in a fresh `session`. Sequence `i`
/// samples with its own RNG seeded by `seeds[i]` (or `sampling.seed + i` when `seeds` is
/// `None`) and stops at `eos` (not included in the output) or after `max_new_tokens`. Returns
/// the new ids per prompt.
pub fn generate(
    session: &mut Session<'_>,
    prompts: &[Vec<u32>],
    sampling: &Sampling,
    seeds: Option<&[u64]>,
    eos: u32,
) -> Vec<Vec<u32>> {
    let n = prompts.len();
    let mut outputs = vec![Vec::new(); n];
    if n == 0 || sampling.max_new_tokens == 0 {
        return outputs;
    }
    let mut rngs: Vec<StdRng> = (0..n)
        .map(|i| {
            let seed = seeds
                .and_then(|s| s.get(i).copied())
                .unwrap_or(sampling.seed.wrapping_add(i as u64));
            StdRng::seed_from_u64(seed)
        })
        .collect();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0).max(1);
    // `active[j]` is the prompt index of batch row `j`; `pads[j]` its left padding.
    let mut active: Vec<usize> = (0..n).collect();
    let mut pads: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
    let rows: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let mut row = vec![eos; longest - p.len()];
            row.extend(p);
            row
        })
        .collect();
    let vocab = session.config().vocab_size;
    let mut logits = session.step(&rows, &pads);
    loop {
        let mut next = Vec::with_capacity(active.len());
        let mut keep = Vec::with_capacity(active.len());
        for (j, &i) in active.iter().enumerate() {
            let row = &logits[j * vocab..(j + 1) * vocab];
            let tok = sampling.sample(row, &mut rngs[i]);
            if tok == eos {
                continue;
            }
            outputs[i].push(tok);
            if outputs[i].len() < sampling.max_new_tokens {
                keep.push(j);
                next.push(vec![tok]);
            }
        }
        if keep.is_empty() {
            break;
        }
        if keep.len() < active.len() {
            session.keep_rows(&keep);
            active = keep.iter().map(|&j| active[j]).collect();
            pads = keep.iter().map(|&j| pads[j]).collect();
        }
        logits = session.step(&next, &pads);
    }
    outputs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_and_top_k_1_is_greedy() {
        let logits = [0.1, 2.0, -1.0, 1.9];
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(Sampling::greedy(1).sample(&logits, &mut rng), 1);
        let s = Sampling {
            temperature: 1.0,
            top_k: 1,
            ..Sampling::default()
        };
        for _ in 0..10 {
            assert_eq!(s.sample(&logits, &mut rng), 1);
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus_only() {
        // Probabilities ~ [0.0, 0.5, 0.0, 0.5]: top_p 0.4 keeps only the first of the two.
        let logits = [-50.0, 3.0, -50.0, 3.0];
        let s = Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.4,
            ..Sampling::default()
        };
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..20 {
            assert_eq!(s.sample(&logits, &mut rng), 1);
        }
        // Without top-p both tokens show up.
        let s = Sampling { top_p: 1.0, ..s };
        let picks: Vec<u32> = (0..50).map(|_| s.sample(&logits, &mut rng)).collect();
        assert!(picks.contains(&1) && picks.contains(&3));
        assert!(picks.iter().all(|&p| p == 1 || p == 3));
    }

    #[test]
    fn same_seed_same_samples() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let s = Sampling::default();
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..20)
                .map(|_| s.sample(&logits, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    /// On tiny random models (Llama and Qwen2), a batch of prompts of different lengths gives each prompt the
    /// same continuation as generating it alone with the same seed, and a stop token ends each
    /// continuation exactly where it first comes; the burn and the CPU decoders agree.
    #[test]
    fn batched_equals_unbatched_on_tiny_model() -> crate::Result<()> {
        use super::super::model::LlamaConfig;
        batched_equals_unbatched_on(LlamaConfig::tiny(64))?;
        batched_equals_unbatched_on(LlamaConfig::tiny_qwen2(64))
    }

    fn batched_equals_unbatched_on(c: super::super::model::LlamaConfig) -> crate::Result<()> {
        use super::super::cpu_model::CpuLlama;
        use super::super::model::{Llama, lookup, random_weights};
        let device = burn::tensor::Device::flex();
        let weights = random_weights(&c, 5);
        let model = Llama::random(&c, 5, &device);
        let cpu = CpuLlama::from_weights(&c, |n| lookup(&weights, n))?;
        let prompts = vec![vec![5u32, 9, 11], vec![7u32], vec![1u32, 2, 3, 4, 5, 6, 7]];
        let s = Sampling {
            temperature: 0.9,
            max_new_tokens: 8,
            seed: 42,
            ..Sampling::default()
        };
        let seeds = [10u64, 11, 12];
        let burn = |p: &[Vec<u32>], seeds: &[u64], eos| {
            generate(
                &mut Session::burn(&model, &c, None, &device),
                p,
                &s,
                Some(seeds),
                eos,
            )
        };
        let on_cpu = |p: &[Vec<u32>], seeds: &[u64], eos| {
            generate(&mut Session::cpu(&cpu, None, 4), p, &s, Some(seeds), eos)
        };
        let batched = burn(&prompts, &seeds, 63);
        assert_eq!(on_cpu(&prompts, &seeds, 63), batched);
        for (i, p) in prompts.iter().enumerate() {
            let alone = burn(std::slice::from_ref(p), &seeds[i..=i], 63);
            assert_eq!(alone[0], batched[i], "prompt {i}");
            let alone = on_cpu(std::slice::from_ref(p), &seeds[i..=i], 63);
            assert_eq!(alone[0], batched[i], "prompt {i} on the CPU decoder");
        }
        // The model and seeds are fixed, so this holds or fails on every run.
        assert!(
            batched.iter().all(|o| o.len() == 8 && !o.contains(&63)),
            "expected full-length continuations: {batched:?}"
        );
        let stop = batched[0][3];
        let cut = on_cpu(&prompts, &seeds, stop);
        for (i, (full, cut)) in batched.iter().zip(&cut).enumerate() {
            let expected: Vec<u32> = full.iter().copied().take_while(|&t| t != stop).collect();
            assert_eq!(*cut, expected, "prompt {i}");
        }
        assert!(cut[0].len() <= 3);
        Ok(())
    }
}
