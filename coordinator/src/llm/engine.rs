//! What CrossLM asks of the LLM: label-conditioned synthetic data ([`Llm::generate`]),
//! zero-shot classification ([`Llm::classify`]) and perplexity on general text
//! ([`Llm::perplexity`]).
//!
//! Over 600 lines with its tests beside the code.

use std::path::Path;
use std::sync::OnceLock;

use burn::tensor::Device;

use super::cpu_model::CpuLlama;
use super::generate::{Sampling, generate};
use super::gguf::Gguf;
use super::model::{Llama, LlamaConfig, LoraAdapters};
use super::session::Session;
use super::tokenizer::Tokenizer;
use crate::synthetic::{self, LabeledText};
use crate::task::TaskSpec;
use crate::{Error, Result};

/// Most sequences run through the model at once (bounds memory: the LM head of a step is
/// `batch x 49152` floats).
pub const MAX_BATCH: usize = 16;
/// Texts are cut to this many tokens for classification and perplexity.
pub const MAX_TEXT_TOKENS: usize = 384;

/// The coordinator LLM: model, tokenizer, device and (optionally) LoRA adapters in use.
///
/// On the CPU, inference runs on the quantized decoder ([`CpuLlama`], weights kept in their
/// GGUF blocks) and the f32 burn model that training needs is built from it on first use; on
/// a GPU the burn model does everything.
pub struct Llm {
    /// Architecture.
    pub config: LlamaConfig,
    /// The quantized CPU decoder, when the model runs on the CPU.
    cpu: Option<CpuLlama>,
    /// The burn model (frozen base): built at load on a GPU, on first use on the CPU.
    burn: OnceLock<Llama>,
    /// Tokenizer and chat template.
    pub tokenizer: Tokenizer,
    /// Device the model lives on.
    pub device: Device,
    /// Adapters applied on top of the base model, if any (see [`super::train`]).
    pub lora: Option<LoraAdapters>,
    /// The task side's own adapters, when it has them (split adapters, see
    /// `crate::tuning::AdapterLayout`): classification runs with these instead of `lora`, so
    /// that learning one-word answers does not change how the model writes.
    pub task_lora: Option<LoraAdapters>,
}

impl Llm {
    /// Loads model and tokenizer from a GGUF file onto `device`. On the CPU (Flex) the
    /// quantized decoder serves inference unless `CROSSLM_LLM_ENGINE=burn` asks for the burn
    /// one (to compare the two).
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Llm> {
        let gguf = Gguf::open(path)?;
        let tokenizer = Tokenizer::from_gguf(&gguf)?;
        let config = LlamaConfig::from_gguf(&gguf)?;
        if tokenizer.vocab_size() != config.vocab_size {
            return Err(Error::Model(format!(
                "tokenizer has {} tokens, model {}",
                tokenizer.vocab_size(),
                config.vocab_size
            )));
        }
        let burn_asked = std::env::var("CROSSLM_LLM_ENGINE").is_ok_and(|v| v == "burn");
        let (cpu, burn) = if *device == Device::flex() && !burn_asked {
            (Some(CpuLlama::from_gguf(&gguf, &config)?), OnceLock::new())
        } else {
            (None, OnceLock::from(Llama::from_gguf(&gguf, device)?.1))
        };
        Ok(Llm {
            config,
            cpu,
            burn,
            tokenizer,
            device: device.clone(),
            lora: None,
            task_lora: None,
        })
    }

    /// An LLM on the CPU from a decoder made in code (tests).
    pub fn from_cpu_model(cpu: CpuLlama, tokenizer: Tokenizer) -> Llm {
        Llm {
            config: cpu.config().clone(),
            cpu: Some(cpu),
            burn: OnceLock::new(),
            tokenizer,
            device: Device::flex(),
            lora: None,
            task_lora: None,
        }
    }

    /// The frozen base as a burn model (what training differentiates through), built from the
    /// quantized weights on first use when the model runs on the CPU.
    pub fn model(&self) -> Result<&Llama> {
        if let Some(m) = self.burn.get() {
            return Ok(m);
        }
        let cpu = self
            .cpu
            .as_ref()
            .ok_or_else(|| Error::Model("the LLM holds no weights".into()))?;
        let model = Llama::from_weights(&self.config, |n| cpu.weight(n), &self.device)?;
        Ok(self.burn.get_or_init(|| model))
    }

    /// The quantized CPU decoder, when inference runs on it.
    pub fn cpu_model(&self) -> Option<&CpuLlama> {
        self.cpu.as_ref()
    }

    /// A fresh batch of sequences on the inference decoder with adapters `lora`, with room for
    /// `capacity` positions.
    pub fn session<'a>(&'a self, lora: Option<&'a LoraAdapters>, capacity: usize) -> Session<'a> {
        match (&self.cpu, self.burn.get()) {
            (Some(cpu), _) => Session::cpu(cpu, lora, capacity),
            (None, Some(model)) => Session::burn(model, &self.config, lora, &self.device),
            (None, None) => unreachable!("an Llm is built with one of its decoders"),
        }
    }

    /// Generates continuations of token-id prompts, [`MAX_BATCH`] at a time. Prompt `i` samples
    /// with seed `sampling.seed + i`, so results do not depend on the batching.
    pub fn generate_ids(&self, prompts: &[Vec<u32>], sampling: &Sampling) -> Vec<Vec<u32>> {
        let seeds: Vec<u64> = (0..prompts.len() as u64)
            .map(|i| sampling.seed.wrapping_add(i))
            .collect();
        let mut out = Vec::with_capacity(prompts.len());
        for (p, s) in prompts.chunks(MAX_BATCH).zip(seeds.chunks(MAX_BATCH)) {
            let longest = p.iter().map(Vec::len).max().unwrap_or(0);
            let mut session = self.session(self.lora.as_ref(), longest + sampling.max_new_tokens);
            out.extend(generate(
                &mut session,
                p,
                sampling,
                Some(s),
                self.tokenizer.eos_id,
            ));
        }
        out
    }

    /// Answers one chat message per prompt (ChatML template applied) and decodes the answers.
    pub fn chat(&self, users: &[String], sampling: &Sampling) -> Result<Vec<String>> {
        let prompts = users
            .iter()
            .map(|u| self.tokenizer.encode(&self.tokenizer.chat_prompt(u)))
            .collect::<Result<Vec<_>>>()?;
        self.generate_ids(&prompts, sampling)
            .iter()
            .map(|ids| self.tokenizer.decode(ids, true))
            .collect()
    }

    /// Label-conditioned synthetic data written by this model (see
    /// [`synthetic::label_conditioned`]), [`MAX_BATCH`] prompts at a time.
    pub fn generate(
        &self,
        task: &TaskSpec,
        n_per_label: usize,
        sampling: &Sampling,
    ) -> Result<Vec<LabeledText>> {
        synthetic::label_conditioned(
            task,
            n_per_label,
            MAX_BATCH,
            sampling.seed,
            |users, seed| {
                let s = Sampling {
                    seed,
                    ..sampling.clone()
                };
                self.chat(users, &s)
            },
        )
    }

    /// Zero-shot classification: for each text, the probability of each label's verbalizer as
    /// the assistant's answer to the task's classification prompt, normalized over labels.
    /// Multi-token verbalizers are scored exactly (sum of token log-probs).
    pub fn classify(&self, task: &TaskSpec, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let tok = &self.tokenizer;
        let verbalizers = task
            .labels
            .iter()
            .map(|l| tok.encode(&l.verbalizer))
            .collect::<Result<Vec<_>>>()?;
        if verbalizers.iter().any(Vec::is_empty) {
            return Err(Error::Task("a verbalizer encodes to no tokens".into()));
        }
        let prompts = texts
            .iter()
            .map(|t| {
                let text = truncate_tokens(tok, t, MAX_TEXT_TOKENS)?;
                tok.encode(&tok.chat_prompt(&task.classify_prompt(&text)))
            })
            .collect::<Result<Vec<_>>>()?;
        let shared = shared_prefix(&prompts);
        let mut out = Vec::with_capacity(texts.len());
        let rows_per_prompt = if verbalizers.iter().all(|v| v.len() == 1) {
            1
        } else {
            task.labels.len()
        };
        let chunk = (MAX_BATCH / rows_per_prompt).max(1);
        for batch in prompts.chunks(chunk) {
            let scores = self.score_continuations(batch, shared, &verbalizers);
            out.extend(scores.into_iter().map(|s| normalize_log_probs(&s)));
        }
        Ok(out)
    }

    /// [`Llm::classify`] with contextual calibration (Zhao et al., 2021): each row is divided
    /// by the label probabilities the model gives a content-free text ("N/A"), then
    /// renormalized. Removes the small model's bias toward one verbalizer.
    pub fn classify_calibrated(&self, task: &TaskSpec, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let prior = self.classify(task, &["N/A".to_string()])?.remove(0);
        let probs = self.classify(task, texts)?;
        Ok(probs.iter().map(|p| calibrate(p, &prior)).collect())
    }

    /// `scores[i][l]` = log p(`conts[l]` | `prompts[i]`), where the prompts' first `shared`
    /// tokens are the same: that prefix runs once and its cache is repeated for every row;
    /// each row is then a prompt's rest followed by a continuation but its last token,
    /// RIGHT-padded (later positions cannot influence earlier ones), one row per prompt when
    /// every continuation is one token, else one per (prompt, continuation).
    fn score_continuations(
        &self,
        prompts: &[Vec<u32>],
        shared: usize,
        conts: &[Vec<u32>],
    ) -> Vec<Vec<f32>> {
        let Some(first) = prompts.first() else {
            return Vec::new();
        };
        let eos = self.tokenizer.eos_id;
        let per_prompt = if conts.iter().all(|c| c.len() == 1) {
            1
        } else {
            conts.len()
        };
        // Row r: prompt r / per_prompt, continuation r % per_prompt (when per_prompt > 1).
        let rows: Vec<Vec<u32>> = prompts
            .iter()
            .flat_map(|p| (0..per_prompt).map(move |l| (p, l)))
            .map(|(p, l)| {
                let mut row = p[shared..].to_vec();
                if per_prompt > 1 {
                    row.extend(&conts[l][..conts[l].len() - 1]);
                }
                row
            })
            .collect();
        let width = rows.iter().map(Vec::len).max().unwrap_or(1);
        let mut session = self.session(self.classifier_lora(), shared + width);
        if shared > 0 {
            session.hidden(&[first[..shared].to_vec()], &[0]);
            session.keep_rows(&vec![0; rows.len()]);
        }
        let padded: Vec<Vec<u32>> = rows
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r.resize(width, eos);
                r
            })
            .collect();
        let hidden = session.hidden(&padded, &vec![0; padded.len()]);
        // (row, position in the row, prompt, continuation, token index in it) for every
        // scored token: continuation l's token j is predicted at the prompt's last position + j.
        let d = self.config.d_model;
        let mut wanted = Vec::new();
        for (r, p) in prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p, per_prompt))
            .enumerate()
        {
            let last = p.len() - shared - 1;
            let (i, ls) = if per_prompt > 1 {
                (r / per_prompt, r % per_prompt..r % per_prompt + 1)
            } else {
                (r, 0..conts.len())
            };
            for l in ls {
                for j in 0..conts[l].len() {
                    wanted.push((r, last + j, i, l, j));
                }
            }
        }
        // One head row per distinct (row, position): single-token continuations share one.
        let mut positions: Vec<(usize, usize)> = wanted.iter().map(|w| (w.0, w.1)).collect();
        positions.dedup();
        let h: Vec<f32> = positions
            .iter()
            .flat_map(|&(r, t)| &hidden[(r * width + t) * d..][..d])
            .copied()
            .collect();
        let vocab = self.config.vocab_size;
        let logits = session.logits(&h, positions.len());
        let mut scores = vec![vec![0.0f32; conts.len()]; prompts.len()];
        for (r, t, i, l, j) in wanted {
            let k = positions
                .iter()
                .position(|&x| x == (r, t))
                .unwrap_or_else(|| unreachable!("every wanted position was kept"));
            scores[i][l] += log_prob(&logits[k * vocab..(k + 1) * vocab], conts[l][j]);
        }
        scores
    }

    /// The adapters classification runs with: the task side's own, else the shared ones.
    pub fn classifier_lora(&self) -> Option<&LoraAdapters> {
        self.task_lora.as_ref().or(self.lora.as_ref())
    }

    /// Perplexity of the model on plain texts: `exp(mean NLL)` over every predicted token
    /// (each text's first token has no context and is not scored). Texts are cut to
    /// [`MAX_TEXT_TOKENS`].
    pub fn perplexity(&self, texts: &[String]) -> Result<f64> {
        self.perplexity_with(self.lora.as_ref(), texts)
    }

    /// [`Llm::perplexity`] with the given adapters instead of `lora` (e.g. the task side's).
    pub fn perplexity_with(&self, lora: Option<&LoraAdapters>, texts: &[String]) -> Result<f64> {
        let mut ids = Vec::with_capacity(texts.len());
        for t in texts {
            let mut v = self.tokenizer.encode(t)?;
            v.truncate(MAX_TEXT_TOKENS);
            if v.len() >= 2 {
                ids.push(v);
            }
        }
        if ids.is_empty() {
            return Err(Error::Data(
                "perplexity needs texts of at least 2 tokens".into(),
            ));
        }
        // Similar lengths together keep padding low.
        ids.sort_by_key(Vec::len);
        let (mut nll, mut count) = (0.0f64, 0usize);
        for batch in ids.chunks(4) {
            let longest = batch.iter().map(Vec::len).max().unwrap_or(0);
            let mut session = self.session(lora, longest);
            let (sum, n) = sequence_nll(&mut session, batch, self.tokenizer.eos_id);
            nll += sum;
            count += n;
        }
        Ok((nll / count as f64).exp())
    }
}

/// Contextual calibration of one row: divide by the content-free `prior`, renormalize.
pub fn calibrate(probs: &[f32], prior: &[f32]) -> Vec<f32> {
    let scaled: Vec<f32> = probs
        .iter()
        .zip(prior)
        .map(|(x, q)| x / q.max(1e-9))
        .collect();
    let total: f32 = scaled.iter().sum();
    scaled.iter().map(|x| x / total).collect()
}

/// Fraction of rows whose most probable label is the true one.
pub fn accuracy(probs: &[Vec<f32>], labels: &[usize]) -> f64 {
    if probs.is_empty() {
        return 0.0;
    }
    let hits = probs
        .iter()
        .zip(labels)
        .filter(|(p, l)| super::generate::argmax(p) as usize == **l)
        .count();
    hits as f64 / probs.len() as f64
}

/// Length of the prefix all `prompts` share, leaving each at least its last token.
fn shared_prefix(prompts: &[Vec<u32>]) -> usize {
    let Some((first, rest)) = prompts.split_first() else {
        return 0;
    };
    let mut n = first.len().saturating_sub(1);
    for p in rest {
        n = n.min(p.len().saturating_sub(1));
        n = first
            .iter()
            .zip(p)
            .take(n)
            .take_while(|(a, b)| a == b)
            .count();
    }
    n
}

/// Left-pads rows to the same length with `pad`; returns rows and pad counts.
pub(crate) fn left_pad(rows: &[Vec<u32>], pad: u32) -> (Vec<Vec<u32>>, Vec<usize>) {
    let longest = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let pads: Vec<usize> = rows.iter().map(|r| longest - r.len()).collect();
    let rows = rows
        .iter()
        .map(|r| {
            let mut v = vec![pad; longest - r.len()];
            v.extend(r);
            v
        })
        .collect();
    (rows, pads)
}

/// `log softmax(logits)[token]` of one row of logits.
fn log_prob(logits: &[f32], token: u32) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    logits[token as usize] - max - sum.ln() as f32
}

/// Hidden rows the LM head runs on at a time in [`sequence_nll`] (bounds the logits buffer).
const HEAD_ROWS: usize = 64;

/// Sum of next-token NLL over all real positions of left-padded sequences, and their count.
fn sequence_nll(session: &mut Session<'_>, seqs: &[Vec<u32>], pad: u32) -> (f64, usize) {
    let (rows, pads) = left_pad(seqs, pad);
    let len = rows[0].len();
    let inputs: Vec<Vec<u32>> = rows.iter().map(|r| r[..len - 1].to_vec()).collect();
    let hidden = session.hidden(&inputs, &pads);
    let d = session.config().d_model;
    let vocab = session.config().vocab_size;
    // Position j predicts token j + 1; the first real token (index pad) is not predicted,
    // and pad positions predict nothing: the head runs on the scored positions only.
    let scored: Vec<(usize, usize)> = pads
        .iter()
        .enumerate()
        .flat_map(|(i, &pad)| (pad..len - 1).map(move |j| (i, j)))
        .collect();
    let mut sum = 0.0f64;
    for part in scored.chunks(HEAD_ROWS) {
        let h: Vec<f32> = part
            .iter()
            .flat_map(|&(i, j)| &hidden[(i * (len - 1) + j) * d..][..d])
            .copied()
            .collect();
        let logits = session.logits(&h, part.len());
        for (&(i, j), row) in part.iter().zip(logits.chunks_exact(vocab)) {
            sum -= f64::from(log_prob(row, rows[i][j + 1]));
        }
    }
    (sum, scored.len())
}

/// Softmax of log-scores.
fn normalize_log_probs(scores: &[f32]) -> Vec<f32> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f32 = exp.iter().sum();
    exp.iter().map(|e| e / total).collect()
}

/// Keeps at most `max` tokens of a text.
fn truncate_tokens(tok: &Tokenizer, text: &str, max: usize) -> Result<String> {
    let ids = tok.encode(text)?;
    if ids.len() <= max {
        return Ok(text.to_string());
    }
    tok.decode(&ids[..max], true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::test_assets::smollm2_llm as smollm2;

    /// From `smollm2_reference.json` (numpy f32 oracle).
    const REF_USER: &str = "Write a one-sentence negative review of a movie.";
    const REF_GREEDY: [u32; 23] = [
        504, 7704, 476, 504, 25343, 18, 553, 719, 20053, 327, 624, 4591, 16476, 335, 4737, 284,
        624, 28115, 282, 253, 42930, 1774, 30,
    ];
    const REF_TOP5: [(u32, f32); 5] = [
        (504, 27.723_435),
        (18, 27.488_127),
        (1348, 26.854_921),
        (49, 26.326_853),
        (788, 25.554_227),
    ];

    /// Prompts of different lengths, sampled in one batch and alone.
    const BATCH_USERS: [&str; 3] = [
        "Write a short positive movie review.",
        "Name a fruit.",
        "Write one sentence about the sea, in the style of a newspaper headline.",
    ];
    fn batch_sampling() -> Sampling {
        Sampling {
            temperature: 0.7,
            max_new_tokens: 12,
            seed: 5,
            ..Sampling::default()
        }
    }

    /// Gate: the first-step logits' top 5 match the oracle in ids and within 1e-2 in value, on
    /// the burn decoder and on the quantized CPU one (all three compute with the same Q4_1
    /// weights in f32; differences are f32 summation order).
    #[test]
    fn real_first_step_top5_logits_match_reference() -> Result<()> {
        use crate::llm::model::{StepInputs, to_host_f32, token_tensor};
        let llm = smollm2();
        let ids = llm.tokenizer.encode(&llm.tokenizer.chat_prompt(REF_USER))?;
        let (rows, pads) = left_pad(&[ids], 0);
        let len = rows[0].len();
        let d = &llm.device;
        let model = llm.model()?;
        let hidden = model.forward(
            token_tensor(&rows, d),
            &StepInputs::new(&llm.config, &pads, 0, len, d),
            None,
            None,
        );
        let last = hidden.slice([0..1, len - 1..len]);
        let burn = to_host_f32(model.lm_head(last));
        let cpu = llm.session(None, len).step(&rows, &pads);
        assert_top5_matches_reference(&burn, 1e-2);
        assert_top5_matches_reference(&cpu, 1e-2);
        Ok(())
    }

    /// Gate: the reference prompt through the lower blocks on the CPU decoder and the rest on
    /// burn (how LoRA training runs), left-padded beside a longer prompt, gives the oracle's
    /// top 5 too.
    #[test]
    fn real_split_forward_matches_reference() -> Result<()> {
        use crate::llm::model::{StepInputs, to_host_f32};
        use burn::tensor::{Tensor, TensorData};
        let llm = smollm2();
        let chat = |u: &str| llm.tokenizer.encode(&llm.tokenizer.chat_prompt(u));
        let longer = format!("{REF_USER} Answer in one short paragraph, please.");
        let (rows, pads) = left_pad(&[chat(REF_USER)?, chat(&longer)?], 0);
        assert!(pads[0] > 0 && pads[1] == 0, "{pads:?}");
        let (b, len, d) = (rows.len(), rows[0].len(), &llm.device);
        let first = llm.config.n_layers - 10;
        let cpu = llm
            .cpu_model()
            .ok_or_else(|| Error::Model("no CPU decoder".into()))?;
        let x = cpu.residual(&rows.concat(), &pads, first);
        let x = Tensor::<3>::from_data(TensorData::new(x, [b, len, llm.config.d_model]), d);
        let model = llm.model()?;
        let inputs = StepInputs::new(&llm.config, &pads, 0, len, d);
        let hidden = model.forward_from(x, first, &inputs, None);
        let last = hidden.slice([0..1, len - 1..len]);
        assert_top5_matches_reference(&to_host_f32(model.lm_head(last)), 1e-2);
        Ok(())
    }

    /// The oracle's top 5 ids in order, each logit within `tol` of the oracle's.
    fn assert_top5_matches_reference(logits: &[f32], tol: f32) {
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        for (k, &(id, value)) in REF_TOP5.iter().enumerate() {
            assert_eq!(order[k] as u32, id, "rank {k} (tolerance {tol})");
            let got = logits[id as usize];
            assert!((got - value).abs() < tol, "token {id}: {got} vs {value}");
        }
    }

    /// Gate: greedy continuation of the reference prompt equals the oracle's ids exactly.
    #[test]
    fn real_greedy_continuation_matches_reference() -> Result<()> {
        let llm = smollm2();
        let ids = llm.tokenizer.encode(&llm.tokenizer.chat_prompt(REF_USER))?;
        let out = llm.generate_ids(&[ids], &Sampling::greedy(40));
        assert_eq!(out[0], REF_GREEDY);
        Ok(())
    }

    /// Probe for profiles of one sequence decoding (`cargo test --release --workspace --lib --
    /// --ignored --nocapture one_sequence_decoding`): not a gate.
    #[test]
    #[ignore]
    fn one_sequence_decoding() -> Result<()> {
        let llm = smollm2();
        let ids = llm.tokenizer.encode(&llm.tokenizer.chat_prompt(REF_USER))?;
        let steps = 300;
        let mut session = llm.session(None, ids.len() + steps);
        let mut logits = session.step(&[ids], &[0]);
        let t = std::time::Instant::now();
        for _ in 0..steps {
            let next = crate::llm::generate::argmax(&logits);
            logits = session.step(&[vec![next]], &[0]);
        }
        println!("{steps} tokens in {:.2} s", t.elapsed().as_secs_f64());
        Ok(())
    }

    /// Gate: sampling a batch of prompts of different lengths gives each prompt what it gets
    /// alone with the same seed.
    #[test]
    fn real_batched_generation_equals_unbatched() -> Result<()> {
        crate::llm::test_assets::assert_batched_equals_unbatched(
            smollm2(),
            &BATCH_USERS,
            &batch_sampling(),
        )
    }

    #[test]
    fn real_classify_and_perplexity_are_sane() -> Result<()> {
        let llm = smollm2();
        let task = TaskSpec::from_toml_file(
            crosslm_sdk::data::workspace_root().join("examples/tasks/mr.toml"),
        )?;
        let texts = vec![
            "A dull, lifeless mess with wooden acting and no story at all.".to_string(),
            "A joyous, moving film with wonderful performances.".to_string(),
        ];
        let probs = llm.classify(&task, &texts)?;
        for p in &probs {
            assert_eq!(p.len(), 2);
            assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        }
        // The 135M model leans "Positive" overall; it must still rank the texts right.
        assert!(probs[0][0] > probs[1][0], "{probs:?}");
        let fluent = llm.perplexity(&[
            "The cat sat on the mat and looked out of the window at the birds.".to_string(),
        ])?;
        let noise = llm.perplexity(&[
            "mat window the birds sat cat out looked on of at and the.".to_string(),
        ])?;
        assert!(
            fluent.is_finite() && fluent > 1.0 && fluent < noise,
            "{fluent} vs {noise}"
        );
        Ok(())
    }

    /// The real file's weights all take a quantized path: Q8_0 embeddings (and tied head),
    /// Q4_1 everywhere else; none falls back to f32.
    #[test]
    fn real_weights_stay_quantized() {
        use crate::llm::quant::{Path, QMatrix};
        let Some(cpu) = smollm2().cpu_model() else {
            panic!("the model was loaded on the CPU and must use the quantized decoder")
        };
        let paths: Vec<Path> = cpu.matrices().map(QMatrix::path).collect();
        assert_eq!(paths.len(), 1 + 7 * 30);
        assert_eq!(paths[0], Path::Q8);
        assert!(paths[1..].iter().all(|p| *p == Path::Q4), "{paths:?}");
    }

    /// Classification with a shared prefix and right-padded rows gives each text what a
    /// plain forward pass over its whole prompt and each continuation gives, for one- and
    /// multi-token verbalizers, in a batch and alone.
    #[test]
    fn shared_prefix_scoring_matches_plain_passes() -> Result<()> {
        let llm = crate::llm::test_assets::tiny_llm()?;
        let tok = &llm.tokenizer;
        let mut task = TaskSpec::from_toml_file(
            crosslm_sdk::data::workspace_root().join("examples/tasks/mr.toml"),
        )?;
        let texts: Vec<String> = [
            "Dull.",
            "A warm, funny and moving picture with a cast at its best.",
            "Not bad at all",
        ]
        .map(String::from)
        .to_vec();
        for verbalizers in [["Negative", "Positive"], ["thumbs down", "a warm yes"]] {
            for (label, v) in task.labels.iter_mut().zip(verbalizers) {
                label.verbalizer = v.to_string();
            }
            let conts: Vec<Vec<u32>> = verbalizers
                .iter()
                .map(|v| tok.encode(v))
                .collect::<Result<_>>()?;
            let batched = llm.classify(&task, &texts)?;
            for (text, got) in texts.iter().zip(&batched) {
                let prompt = tok.encode(&tok.chat_prompt(&task.classify_prompt(text)))?;
                let plain: Vec<f32> = conts
                    .iter()
                    .map(|c| {
                        let mut seq = prompt.clone();
                        seq.extend(&c[..c.len() - 1]);
                        let mut session = llm.session(None, seq.len());
                        let hidden = session.hidden(std::slice::from_ref(&seq), &[0]);
                        let d = llm.config.d_model;
                        let at = &hidden[(prompt.len() - 1) * d..];
                        let logits = session.logits(&at[..c.len() * d], c.len());
                        let vocab = llm.config.vocab_size;
                        c.iter()
                            .enumerate()
                            .map(|(j, &t)| log_prob(&logits[j * vocab..(j + 1) * vocab], t))
                            .sum()
                    })
                    .collect();
                let want = normalize_log_probs(&plain);
                let alone = llm.classify(&task, std::slice::from_ref(text))?.remove(0);
                for ((w, g), a) in want.iter().zip(got).zip(&alone) {
                    assert!(
                        (w - g).abs() < 1e-4 && (w - a).abs() < 1e-4,
                        "{verbalizers:?}"
                    );
                }
            }
            assert!(conts.iter().any(|c| c.len() > 1) == (verbalizers[0] == "thumbs down"));
        }
        Ok(())
    }

    #[test]
    fn shared_prefix_leaves_every_prompt_a_token() {
        assert_eq!(shared_prefix(&[vec![1, 2, 3], vec![1, 2, 4, 5]]), 2);
        assert_eq!(shared_prefix(&[vec![1, 2, 3], vec![1, 2, 3, 5]]), 2);
        assert_eq!(shared_prefix(&[vec![1, 2, 3]]), 2);
        assert_eq!(shared_prefix(&[vec![7], vec![1, 2]]), 0);
        assert_eq!(shared_prefix(&[]), 0);
    }

    #[test]
    fn accuracy_and_normalization() {
        let p = normalize_log_probs(&[0.0, (3.0f32).ln()]);
        assert!((p[0] - 0.25).abs() < 1e-6 && (p[1] - 0.75).abs() < 1e-6);
        let probs = vec![vec![0.9, 0.1], vec![0.2, 0.8], vec![0.6, 0.4]];
        assert!((accuracy(&probs, &[0, 1, 1]) - 2.0 / 3.0).abs() < 1e-12);
    }

    /// The real model on an NVIDIA GPU, held to the gates above with wider tolerances: burn's
    /// CUDA matmuls take f32 operands on TF32 tensor cores (10-bit mantissas), where the CPU
    /// decoders multiply in full f32 (seen on an H200: a top-5 logit 0.021 off, class
    /// probabilities 3e-3). Only in a `cuda` build, and ignored by default (CI has no GPU); on a
    /// machine with one:
    /// `cargo test --release --workspace --features crosslm-coordinator/cuda --lib -- --ignored ::cuda::`.
    #[cfg(feature = "cuda")]
    mod cuda {
        use super::*;
        use crate::llm::test_assets::smollm2_path;

        /// SmolLM2 on CUDA device 0 (burn's f32 decoder), loaded once.
        fn on_cuda() -> &'static Llm {
            static LLM: OnceLock<Llm> = OnceLock::new();
            LLM.get_or_init(|| {
                assert!(crate::llm::device::cuda_present(), "no CUDA device here");
                let device = crate::llm::device::Placement::Cuda.device();
                match Llm::load(smollm2_path(), &device) {
                    Ok(llm) => llm,
                    Err(e) => panic!("loading on CUDA: {e}"),
                }
            })
        }

        #[test]
        #[ignore = "needs an NVIDIA GPU and a cuda build"]
        fn real_top5_and_greedy_continuation_match_reference() -> Result<()> {
            let llm = on_cuda();
            assert!(
                llm.cpu_model().is_none(),
                "must run burn's decoder on the GPU"
            );
            let ids = llm.tokenizer.encode(&llm.tokenizer.chat_prompt(REF_USER))?;
            let logits = llm
                .session(None, ids.len())
                .step(std::slice::from_ref(&ids), &[0]);
            assert_top5_matches_reference(&logits, 5e-2);
            let out = llm.generate_ids(&[ids], &Sampling::greedy(40));
            assert_eq!(out[0], REF_GREEDY);
            Ok(())
        }

        #[test]
        #[ignore = "needs an NVIDIA GPU and a cuda build"]
        fn real_batched_generation_equals_unbatched() -> Result<()> {
            crate::llm::test_assets::assert_batched_equals_unbatched(
                on_cuda(),
                &BATCH_USERS,
                &batch_sampling(),
            )
        }

        /// Classification and perplexity, the evaluations a round runs, agree with the CPU's
        /// quantized decoder (both from the same Q4_1 weights; TF32 products on the GPU).
        #[test]
        #[ignore = "needs an NVIDIA GPU and a cuda build"]
        fn real_classify_and_perplexity_match_cpu() -> Result<()> {
            let gpu = on_cuda();
            let cpu = smollm2();
            let task = TaskSpec::from_toml_file(
                crosslm_sdk::data::workspace_root().join("examples/tasks/mr.toml"),
            )?;
            let texts = vec![
                "A dull, lifeless mess with wooden acting and no story at all.".to_string(),
                "A joyous, moving film with wonderful performances.".to_string(),
                "It is a movie.".to_string(),
            ];
            let (a, b) = (cpu.classify(&task, &texts)?, gpu.classify(&task, &texts)?);
            for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
                assert!((x - y).abs() < 1e-2, "{a:?} vs {b:?}");
            }
            let general = vec![texts[1].clone(), texts[0].clone()];
            let (p, q) = (cpu.perplexity(&general)?, gpu.perplexity(&general)?);
            assert!((p - q).abs() < 1e-2 * p, "{p} vs {q}");
            Ok(())
        }
    }
}
