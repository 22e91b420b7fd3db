//! LoRA fine-tuning of the LLM on burn's autodiff device.
//!
//! The base model stays on its plain (non-autodiff) device and is never a parameter, so it is
//! frozen by construction; activations become tracked where they meet the adapters, which live
//! on `device.autodiff()`. The loss is the weighted mean, over examples, of each completion's
//! mean token NLL given its prompt; prompt tokens are context only.
//!
//! Over 600 lines with its tests beside the code.

use std::path::Path;

use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::Device;

use super::completions::{Completions, FrozenRows};
use super::engine::Llm;
use super::model::{LlamaConfig, LoraAdapters};
use crate::{Error, Result};

/// One training example: the model should write `completion` after `prompt` (the prompt is
/// used verbatim: apply the chat template first for chat-style data). `weight` scales the
/// example's loss (e.g. client feedback); zero-weight examples are ignored.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainExample {
    /// Context text.
    pub prompt: String,
    /// Text whose likelihood is raised.
    pub completion: String,
    /// Loss weight, >= 0.
    pub weight: f32,
}

/// LoRA hyper-parameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    /// Adapter rank.
    pub rank: usize,
    /// Scale numerator: the update is `alpha / rank * x A B`.
    pub alpha: f64,
    /// Adam learning rate.
    pub learning_rate: f64,
    /// Completions are cut to this many tokens (the EOS token included).
    pub max_completion_tokens: usize,
    /// Prompts are cut (from the left) to this many tokens.
    pub max_prompt_tokens: usize,
    /// Adapt only the top this many blocks (0: all). Lower blocks then run forward only,
    /// untracked, which makes a training step much cheaper on a CPU.
    #[serde(default)]
    pub top_layers: usize,
}

impl Default for LoraConfig {
    fn default() -> LoraConfig {
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            learning_rate: 1e-3,
            max_completion_tokens: 96,
            max_prompt_tokens: 160,
            top_layers: 0,
        }
    }
}

/// Trains LoRA adapters (q and v projections of every block) with Adam.
pub struct LoraTrainer {
    /// The adapters, on the autodiff device while training.
    adapters: Option<LoraAdapters>,
    optim: ModuleOptimizer,
    config: LoraConfig,
    /// The frozen blocks' output for the examples seen so far.
    frozen: FrozenRows,
}

impl LoraTrainer {
    /// Fresh adapters for `llm` (the model's output is unchanged until the first step).
    pub fn new(llm: &Llm, config: LoraConfig, seed: u64) -> LoraTrainer {
        let adapters = LoraAdapters::new(
            &llm.config,
            config.rank,
            config.alpha,
            config.top_layers,
            seed,
            &llm.device,
        );
        LoraTrainer::from_adapters(adapters, config, &llm.device)
    }

    /// Continues training existing adapters (e.g. loaded with [`load_adapters`]).
    pub fn from_adapters(adapters: LoraAdapters, config: LoraConfig, device: &Device) -> Self {
        // Built on the plain device, `train()` makes the factors tracked autodiff leaves.
        let plain = device.clone().without_autodiff();
        LoraTrainer {
            adapters: Some(adapters.to_device(&plain).train()),
            optim: AdamConfig::new().init(),
            config,
            frozen: FrozenRows::default(),
        }
    }

    /// The current adapters without autodiff, ready for `Llm::lora` (inference).
    pub fn adapters(&self) -> Option<LoraAdapters> {
        self.adapters.as_ref().map(Module::valid)
    }

    /// One optimizer step on `batch`; returns the loss before the step.
    pub fn step(&mut self, llm: &Llm, batch: &[TrainExample]) -> Result<f32> {
        self.step_on(llm, |adapters, cfg, frozen| {
            nll(llm, Some(adapters), batch, cfg, Some(frozen))
        })
    }

    /// One optimizer step on the DPO loss of `pairs` (Rafailov et al., 2023); `reference` from
    /// [`reference_logprobs`]. Returns the loss before the step.
    pub fn preference_step(
        &mut self,
        llm: &Llm,
        pairs: &[PreferencePair],
        reference: &[(f32, f32)],
        beta: f32,
    ) -> Result<f32> {
        self.step_on(llm, |adapters, cfg, frozen| {
            dpo(
                llm,
                Some(adapters),
                pairs,
                reference,
                beta,
                cfg,
                Some(frozen),
            )
        })
    }

    /// One Adam step on the loss `loss_of` scores with the tracked adapters.
    fn step_on(
        &mut self,
        llm: &Llm,
        loss_of: impl FnOnce(&LoraAdapters, &LoraConfig, &mut FrozenRows) -> Result<Scored>,
    ) -> Result<f32> {
        let adapters = self
            .adapters
            .take()
            .ok_or_else(|| Error::Model("LoRA trainer lost its adapters".into()))?;
        let loss = match loss_of(&adapters, &self.config, &mut self.frozen) {
            Ok(loss) => loss,
            Err(e) => {
                self.adapters = Some(adapters);
                return Err(e);
            }
        };
        let carrier = match loss.completions.carrier(llm, &loss.upstream) {
            Ok(carrier) => carrier,
            Err(e) => {
                self.adapters = Some(adapters);
                return Err(e);
            }
        };
        let grads = GradientsParams::from_grads(carrier.backward(), &adapters);
        self.adapters = Some(self.optim.step(self.config.learning_rate, adapters, grads));
        Ok(loss.value)
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// Saves the adapters (see [`save_adapters`]).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let adapters = self
            .adapters()
            .ok_or_else(|| Error::Model("LoRA trainer lost its adapters".into()))?;
        save_adapters(&adapters, &self.config, path)
    }
}

/// Token ids of one example: prompt (left-truncated), then completion + EOS (right-truncated);
/// returns the ids and the number of completion tokens at the end. A completion cut at
/// `max_completion_tokens` gets no EOS: one there would teach the LLM to stop where the cut
/// fell (R8's stories run ~120 tokens).
pub fn example_ids(llm: &Llm, ex: &TrainExample, cfg: &LoraConfig) -> Result<(Vec<u32>, usize)> {
    let mut prompt = llm.tokenizer.encode(&ex.prompt)?;
    if prompt.len() > cfg.max_prompt_tokens {
        prompt.drain(..prompt.len() - cfg.max_prompt_tokens);
    }
    let mut completion = llm.tokenizer.encode(&ex.completion)?;
    let max = cfg.max_completion_tokens.max(1);
    if completion.len() < max {
        completion.push(llm.tokenizer.eos_id);
    } else {
        completion.truncate(max);
    }
    if prompt.is_empty() {
        // The first token is never predicted: keep one token of context.
        prompt.push(llm.tokenizer.eos_id);
    }
    let n = completion.len();
    prompt.extend(completion);
    Ok((prompt, n))
}

/// The weighted NLL's coefficient of each completion token's log-probability:
/// `w_i / (n_i * W)` on example `i`'s `n_i` tokens (`W` the batch's total weight).
fn nll_coefficients(batch: &[&TrainExample], c: &Completions) -> Vec<f32> {
    let total_w: f32 = batch.iter().map(|e| e.weight).sum();
    let mut coef = vec![0.0f32; c.logprobs.len()];
    for (e, span) in batch.iter().zip(&c.spans) {
        let f = e.weight / (span.len() as f32 * total_w);
        coef[span.clone()].iter_mut().for_each(|x| *x = f);
    }
    coef
}

/// The examples of `batch` with a positive weight; an error when their total is not positive
/// and finite.
fn weighted(batch: &[TrainExample]) -> Result<Vec<&TrainExample>> {
    let batch: Vec<&TrainExample> = batch.iter().filter(|e| e.weight > 0.0).collect();
    let total_w: f32 = batch.iter().map(|e| e.weight).sum();
    if batch.is_empty() || !total_w.is_finite() {
        return Err(Error::Data(
            "training batch has no positive finite weight".into(),
        ));
    }
    Ok(batch)
}

/// A batch's loss: its value, the completions it scored and its gradient in each of their
/// tokens' log-probabilities (what [`Completions::carrier`] takes back to the adapters).
struct Scored {
    value: f32,
    completions: Completions,
    upstream: Vec<f32>,
}

/// Weighted NLL of the completions of `batch`: `sum_i w_i * mean_t nll_it / sum_i w_i`.
pub fn weighted_nll(
    llm: &Llm,
    lora: Option<&LoraAdapters>,
    batch: &[TrainExample],
    cfg: &LoraConfig,
) -> Result<f32> {
    Ok(nll(llm, lora, batch, cfg, None)?.value)
}

/// [`weighted_nll`] with its gradient in each completion token's log-probability.
fn nll(
    llm: &Llm,
    lora: Option<&LoraAdapters>,
    batch: &[TrainExample],
    cfg: &LoraConfig,
    frozen: Option<&mut FrozenRows>,
) -> Result<Scored> {
    let batch = weighted(batch)?;
    let completions = Completions::of(llm, lora, &batch, cfg, frozen)?;
    let coef = nll_coefficients(&batch, &completions);
    Ok(Scored {
        value: -dot(&coef, &completions.logprobs),
        upstream: coef.iter().map(|x| -x).collect(),
        completions,
    })
}

/// `sum_i a_i b_i`, accumulated in f64.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum::<f64>() as f32
}

/// One preference pair for the generation side: after `prompt`, `chosen` (a sample the
/// clients scored high) should become likelier than `rejected` (one they scored low).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PreferencePair {
    /// Context text (the label's generation prompt, chat template applied).
    pub prompt: String,
    /// The preferred completion.
    pub chosen: String,
    /// The dispreferred completion.
    pub rejected: String,
    /// Loss weight, >= 0 (e.g. the score gap).
    pub weight: f32,
}

impl PreferencePair {
    fn sides(&self) -> [TrainExample; 2] {
        [&self.chosen, &self.rejected].map(|c| TrainExample {
            prompt: self.prompt.clone(),
            completion: c.clone(),
            weight: 1.0,
        })
    }
}

/// The pairs' sides through the model: the chosen sides (first p), then the rejected ones.
fn pair_completions(
    llm: &Llm,
    lora: Option<&LoraAdapters>,
    pairs: &[PreferencePair],
    cfg: &LoraConfig,
    frozen: Option<&mut FrozenRows>,
) -> Result<Completions> {
    let sides: Vec<[TrainExample; 2]> = pairs.iter().map(PreferencePair::sides).collect();
    let batch: Vec<&TrainExample> = sides
        .iter()
        .map(|[c, _]| c)
        .chain(sides.iter().map(|[_, r]| r))
        .collect();
    Completions::of(llm, lora, &batch, cfg, frozen)
}

/// The reference model's summed log-probabilities (chosen, rejected) of each pair: the
/// model as it is now (`llm.lora` applied, nothing tracked), in batches of `batch_size`.
pub fn reference_logprobs(
    llm: &Llm,
    pairs: &[PreferencePair],
    cfg: &LoraConfig,
    batch_size: usize,
) -> Result<Vec<(f32, f32)>> {
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch_size.max(1)) {
        let lp = pair_completions(llm, llm.lora.as_ref(), chunk, cfg, None)?.sums();
        let p = chunk.len();
        out.extend((0..p).map(|i| (lp[i], lp[p + i])));
    }
    Ok(out)
}

/// DPO loss (Rafailov et al., 2023) of `pairs` against their reference log-probabilities:
/// `-sum_i w_i log sigmoid(beta * ((c_i - c_ref_i) - (r_i - r_ref_i))) / sum_i w_i`.
fn dpo(
    llm: &Llm,
    lora: Option<&LoraAdapters>,
    pairs: &[PreferencePair],
    reference: &[(f32, f32)],
    beta: f32,
    cfg: &LoraConfig,
    frozen: Option<&mut FrozenRows>,
) -> Result<Scored> {
    let total_w: f32 = pairs.iter().map(|p| p.weight.max(0.0)).sum();
    if pairs.is_empty() || pairs.len() != reference.len() || !total_w.is_finite() || total_w <= 0.0
    {
        return Err(Error::Data(
            "preference batch is empty, has no positive weight, or lacks reference values".into(),
        ));
    }
    let p = pairs.len();
    let c = pair_completions(llm, lora, pairs, cfg, frozen)?;
    let sums = c.sums();
    let mut value = 0.0f64;
    let mut upstream = vec![0.0f32; c.logprobs.len()];
    for (i, (pair, (c_ref, r_ref))) in pairs.iter().zip(reference).enumerate() {
        let w = f64::from(pair.weight.max(0.0) / total_w);
        // margin = (c - r) - (c_ref - r_ref); the loss is -w log sigmoid(beta margin), whose
        // derivative in the margin is -w beta sigmoid(-beta margin).
        let z = f64::from(beta) * f64::from((sums[i] - sums[p + i]) - (c_ref - r_ref));
        value -= w * log_sigmoid(z);
        let dm = (-w * f64::from(beta) * log_sigmoid(-z).exp()) as f32;
        upstream[c.spans[i].clone()].fill(dm);
        upstream[c.spans[p + i].clone()].fill(-dm);
    }
    Ok(Scored {
        value: value as f32,
        completions: c,
        upstream,
    })
}

/// `ln(1 / (1 + e^-z))`, without overflow for large `|z|`.
fn log_sigmoid(z: f64) -> f64 {
    -((-z).max(0.0) + (-z.abs()).exp().ln_1p())
}

/// Magic line at the start of an adapter file.
const ADAPTER_MAGIC: &[u8] = b"CROSSLM-LORA 1\n";

/// Writes adapters: a magic line, a JSON header line (config, shapes) and the burnpack record.
pub fn save_adapters(
    adapters: &LoraAdapters,
    cfg: &LoraConfig,
    path: impl AsRef<Path>,
) -> Result<()> {
    let path = path.as_ref();
    let header = serde_json::json!({
        "lora": cfg,
        "n_layers": adapters.n_layers(),
    });
    let record = adapters
        .clone()
        .into_record()
        .into_bytes()
        .map_err(|e| Error::Model(format!("serializing adapters: {e}")))?;
    let mut bytes = ADAPTER_MAGIC.to_vec();
    bytes.extend(header.to_string().as_bytes());
    bytes.push(b'\n');
    bytes.extend_from_slice(&record);
    std::fs::write(path, bytes).map_err(|source| Error::File {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads adapters written by [`save_adapters`] for a model of config `model`, onto `device`.
/// A file that is not an adapter file, is corrupt, or does not fit the model is an error.
pub fn load_adapters(
    path: impl AsRef<Path>,
    model: &LlamaConfig,
    device: &Device,
) -> Result<(LoraAdapters, LoraConfig)> {
    let path = path.as_ref();
    let bad = |msg: String| Error::Model(format!("LoRA adapter file {}: {msg}", path.display()));
    let bytes = std::fs::read(path).map_err(|source| Error::File {
        path: path.to_path_buf(),
        source,
    })?;
    let rest = bytes
        .strip_prefix(ADAPTER_MAGIC)
        .ok_or_else(|| bad("not an adapter file (bad magic)".into()))?;
    let nl = rest
        .iter()
        .position(|&c| c == b'\n')
        .ok_or_else(|| bad("truncated header".into()))?;
    let header: serde_json::Value =
        serde_json::from_slice(&rest[..nl]).map_err(|e| bad(format!("corrupt header: {e}")))?;
    let cfg: LoraConfig = serde_json::from_value(header["lora"].clone())
        .map_err(|e| bad(format!("corrupt header: {e}")))?;
    let n_layers = header["n_layers"].as_u64().unwrap_or(0) as usize;
    if n_layers != model.n_layers || cfg.rank == 0 {
        return Err(bad(format!(
            "made for {n_layers} layers with rank {}, model has {} layers",
            cfg.rank, model.n_layers
        )));
    }
    let record = burn::store::ModuleRecord::from_bytes(burn::tensor::Bytes::from_bytes_vec(
        rest[nl + 1..].to_vec(),
    ))
    .map_err(|e| bad(format!("corrupt tensors: {e}")))?;
    let adapters = LoraAdapters::new(model, cfg.rank, cfg.alpha, cfg.top_layers, 0, device)
        .try_load_record(record)
        .map_err(|e| bad(format!("tensors do not fit: {e}")))?;
    Ok((adapters, cfg))
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;

    use super::*;
    use crate::llm::model::to_host_f32;
    use crate::llm::test_assets::{self, tiny_llm};

    fn examples() -> Vec<TrainExample> {
        vec![
            TrainExample {
                prompt: "Review:".into(),
                completion: " a wonderful film".into(),
                weight: 1.0,
            },
            TrainExample {
                prompt: "Spam:".into(),
                completion: " win money now".into(),
                weight: 2.0,
            },
            TrainExample {
                prompt: "ignored".into(),
                completion: " zero weight".into(),
                weight: 0.0,
            },
        ]
    }

    fn loss_of(llm: &Llm, lora: Option<&LoraAdapters>, cfg: &LoraConfig) -> Result<f32> {
        weighted_nll(llm, lora, &examples(), cfg)
    }

    /// The weighted NLL as burn's autodiff computes it end to end (the whole model on burn,
    /// then log-softmax, gather and the weighted sum as tensors): the oracle of the host's
    /// head and gradient route.
    fn autodiff_nll(
        llm: &Llm,
        lora: &LoraAdapters,
        batch: &[TrainExample],
        cfg: &LoraConfig,
    ) -> Result<Tensor<1>> {
        use burn::tensor::activation::log_softmax;
        use burn::tensor::{Int, TensorData};

        use crate::llm::completions::Padded;
        use crate::llm::model::{StepInputs, token_tensor};
        let batch = weighted(batch)?;
        let total_w: f32 = batch.iter().map(|e| e.weight).sum();
        let Padded {
            rows,
            pads,
            completion: lens,
        } = Padded::new(llm, &batch, cfg)?;
        let (b, len) = (rows.len(), rows[0].len());
        let device = &llm.device;
        let inputs: Vec<Vec<u32>> = rows.iter().map(|r| r[..len - 1].to_vec()).collect();
        let model = llm.model()?;
        let step = StepInputs::new(&llm.config, &pads, 0, len - 1, device);
        let hidden = model.forward(token_tensor(&inputs, device), &step, None, Some(lora));
        let k = lens.iter().copied().max().unwrap_or(1);
        let [_, t, dm] = hidden.dims();
        let lp = log_softmax(model.lm_head(hidden.slice([0..b, t - k..t, 0..dm])), 2);
        let targets: Vec<i64> = rows
            .iter()
            .flat_map(|r| r[len - k..].iter().map(|&t| t.into()))
            .collect();
        let targets = Tensor::<3, Int>::from_data(TensorData::new(targets, [b, k, 1]), device);
        let picked = lp.gather(2, targets).reshape([b, k]);
        let mut w = vec![0.0f32; b * k];
        for (i, (e, &n)) in batch.iter().zip(&lens).enumerate() {
            w[i * k + k - n..(i + 1) * k].fill(e.weight / (n as f32 * total_w));
        }
        let w = Tensor::<2>::from_data(TensorData::new(w, [b, k]), device);
        Ok((picked * w).sum().neg())
    }

    /// The gradient that reaches the adapters through the host's softmax and the head's
    /// backward product is the one burn's autodiff computes through log-softmax and gather,
    /// and so is the loss.
    #[test]
    fn host_head_gradients_are_autodiffs() -> Result<()> {
        let llm = tiny_llm()?;
        let cfg = LoraConfig {
            rank: 4,
            learning_rate: 1e-2,
            ..LoraConfig::default()
        };
        let mut trainer = LoraTrainer::new(&llm, cfg.clone(), 7);
        // A step first, so that no factor is zero and every gradient carries something.
        trainer.step(&llm, &examples())?;
        let adapters = trainer.adapters.take().expect("adapters");
        let oracle = autodiff_nll(&llm, &adapters, &examples(), &cfg)?;
        let oracle_value = oracle.clone().into_scalar::<f32>();
        let oracle = oracle.backward();
        let loss = nll(&llm, Some(&adapters), &examples(), &cfg, None)?;
        assert!(
            (loss.value - oracle_value).abs() < 1e-4 * oracle_value.abs(),
            "{} against {oracle_value}",
            loss.value
        );
        let ours = loss.completions.carrier(&llm, &loss.upstream)?.backward();
        let mut compared = 0;
        for block in &adapters.blocks {
            for param in [&block.q.a, &block.q.b, &block.v.a, &block.v.b] {
                let want = to_host_f32(param.val().grad(&oracle).expect("an oracle gradient"));
                let got = to_host_f32(param.val().grad(&ours).expect("a gradient"));
                let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
                assert!(scale > 0.0);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-3 * scale,
                        "{g} against {w} (scale {scale})"
                    );
                }
                compared += 1;
            }
        }
        assert_eq!(compared, 4 * llm.config.n_layers);
        Ok(())
    }

    #[test]
    fn lora_training_lowers_the_loss_and_adapters_round_trip() -> Result<()> {
        let mut llm = tiny_llm()?;
        let cfg = LoraConfig {
            rank: 4,
            learning_rate: 1e-2,
            ..LoraConfig::default()
        };
        let before = loss_of(&llm, None, &cfg)?;
        let mut trainer = LoraTrainer::new(&llm, cfg.clone(), 7);
        let first = trainer.step(&llm, &examples())?;
        // b = 0 at init: the adapters start as a no-op.
        assert!((first - before).abs() < 1e-4, "{first} vs {before}");
        let mut last = first;
        for _ in 0..30 {
            last = trainer.step(&llm, &examples())?;
        }
        let adapters = trainer
            .adapters()
            .ok_or_else(|| Error::Model("no adapters".into()))?;
        let after = loss_of(&llm, Some(&adapters), &cfg)?;
        assert!(after < 0.5 * before, "loss {before} -> {last} -> {after}");
        // The base model is untouched.
        assert!((loss_of(&llm, None, &cfg)? - before).abs() < 1e-5);

        // Save, load, same loss; the loaded adapters drive `Llm::lora`.
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("a.lora");
        trainer.save(&path)?;
        let (loaded, loaded_cfg) = load_adapters(&path, &llm.config, &llm.device)?;
        assert_eq!(loaded_cfg, cfg);
        llm.lora = Some(loaded);
        let reloaded = loss_of(&llm, llm.lora.as_ref(), &cfg)?;
        assert!((reloaded - after).abs() < 1e-5, "{reloaded} vs {after}");
        Ok(())
    }

    #[test]
    fn corrupt_adapter_files_are_clear_errors() -> Result<()> {
        let llm = tiny_llm()?;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("a.lora");
        let adapters = LoraAdapters::new(&llm.config, 2, 4.0, 0, 1, &llm.device);
        save_adapters(&adapters, &LoraConfig::default(), &path)?;
        let good = std::fs::read(&path)?;
        let expect_err = |bytes: &[u8], why: &str| -> Result<()> {
            std::fs::write(&path, bytes)?;
            match load_adapters(&path, &llm.config, &llm.device) {
                Err(Error::Model(msg)) => assert!(msg.contains(why), "{why}: {msg}"),
                Err(other) => panic!("{why}: unexpected error {other}"),
                Ok(_) => panic!("{why}: loaded a corrupt file"),
            }
            Ok(())
        };
        expect_err(b"hello", "bad magic")?;
        expect_err(&good[..ADAPTER_MAGIC.len() + 5], "truncated header")?;
        expect_err(&good[..good.len() - 100], "tensors")?;
        let mut other = llm.config.clone();
        other.n_layers = 3;
        std::fs::write(&path, &good)?;
        assert!(load_adapters(&path, &other, &llm.device).is_err());
        Ok(())
    }

    /// One short check on the real model: a few steps on one example raise its likelihood.
    #[test]
    fn real_lora_steps_raise_completion_likelihood() -> Result<()> {
        let llm = Llm::load(test_assets::smollm2_path(), &Device::flex())?;
        let cfg = LoraConfig {
            learning_rate: 5e-3,
            ..LoraConfig::default()
        };
        test_assets::assert_lora_steps_raise_likelihood(&llm, cfg)
    }

    /// DPO steps make the chosen completions likelier relative to the rejected ones than
    /// under the reference; the first loss is ln 2 (the adapters start as a no-op).
    #[test]
    fn dpo_steps_raise_the_chosen_over_the_rejected() -> Result<()> {
        let mut llm = tiny_llm()?;
        let pairs = vec![
            PreferencePair {
                prompt: "Review:".into(),
                chosen: " a wonderful film".into(),
                rejected: " a dreadful film".into(),
                weight: 1.0,
            },
            PreferencePair {
                prompt: "Spam:".into(),
                chosen: " win money now".into(),
                rejected: " lunch at noon".into(),
                weight: 0.5,
            },
        ];
        let cfg = LoraConfig {
            rank: 4,
            learning_rate: 1e-2,
            ..LoraConfig::default()
        };
        let reference = reference_logprobs(&llm, &pairs, &cfg, 1)?;
        let mut trainer = LoraTrainer::new(&llm, cfg.clone(), 3);
        let first = trainer.preference_step(&llm, &pairs, &reference, 0.5)?;
        assert!((first - std::f32::consts::LN_2).abs() < 1e-3, "{first}");
        for _ in 0..20 {
            trainer.preference_step(&llm, &pairs, &reference, 0.5)?;
        }
        let adapters = trainer.adapters().expect("adapters");
        let after = dpo(&llm, Some(&adapters), &pairs, &reference, 0.5, &cfg, None)?.value;
        assert!(after < first - 0.1, "DPO loss {first} -> {after}");
        assert!(dpo(&llm, None, &[], &[], 0.5, &cfg, None).is_err());
        llm.lora = Some(adapters);
        let now = reference_logprobs(&llm, &pairs, &cfg, 2)?;
        for ((c, r), (c0, r0)) in now.iter().zip(&reference) {
            assert!((c - r) > (c0 - r0), "margin {} -> {}", c0 - r0, c - r);
        }
        Ok(())
    }

    /// On the real model with adapters on its top blocks, the reference (no adapters) and a
    /// fresh policy (adapters that add zeros) compute the same log-probabilities, so the first
    /// DPO loss is ln 2 to the last bits: both split the blocks between the CPU decoder and
    /// burn in the same place.
    #[test]
    fn the_first_dpo_loss_on_the_real_model_is_ln_2() -> Result<()> {
        let llm = test_assets::smollm2_llm();
        let chat = |u: &str| llm.tokenizer.chat_prompt(u);
        let pairs = vec![PreferencePair {
            prompt: chat("Write a short positive movie review."),
            chosen: " A warm, funny and moving film.".into(),
            rejected: " Dull and far too long.".into(),
            weight: 1.0,
        }];
        let cfg = LoraConfig {
            top_layers: 2,
            ..LoraConfig::default()
        };
        let reference = reference_logprobs(llm, &pairs, &cfg, 1)?;
        let mut trainer = LoraTrainer::new(llm, cfg, 3);
        let first = trainer.preference_step(llm, &pairs, &reference, 0.5)?;
        assert!((first - std::f32::consts::LN_2).abs() < 1e-6, "{first}");
        Ok(())
    }

    /// A completion within the limit ends with EOS; one cut at the limit does not.
    #[test]
    fn cut_completions_get_no_eos() -> Result<()> {
        let llm = tiny_llm()?;
        let eos = llm.tokenizer.eos_id;
        let ex = |completion: &str| TrainExample {
            prompt: "Story:".into(),
            completion: completion.into(),
            weight: 1.0,
        };
        let short = ex(" a b");
        let n_short = llm.tokenizer.encode(&short.completion)?.len();
        let cfg = LoraConfig {
            max_completion_tokens: n_short + 1,
            ..LoraConfig::default()
        };
        let (ids, n) = example_ids(&llm, &short, &cfg)?;
        assert_eq!((n, ids.last().copied()), (n_short + 1, Some(eos)));
        let long = ex(" a b c d e f g h");
        let (ids, n) = example_ids(&llm, &long, &cfg)?;
        assert_eq!(n, n_short + 1);
        assert_ne!(
            ids.last().copied(),
            Some(eos),
            "a cut completion must not end"
        );
        Ok(())
    }

    /// Adapters on the top blocks only: lower blocks have none, training still lowers the
    /// loss, and the file round-trips with its layer count.
    #[test]
    fn top_layer_adapters_train_and_round_trip() -> Result<()> {
        let llm = tiny_llm()?;
        let n = llm.config.n_layers;
        let cfg = LoraConfig {
            rank: 2,
            alpha: 4.0,
            learning_rate: 1e-2,
            top_layers: 1,
            ..LoraConfig::default()
        };
        let mut trainer = LoraTrainer::new(&llm, cfg.clone(), 1);
        let first = trainer.step(&llm, &examples())?;
        for _ in 0..10 {
            trainer.step(&llm, &examples())?;
        }
        let adapters = trainer.adapters().expect("adapters");
        assert_eq!((adapters.first, adapters.blocks.len()), (n - 1, 1));
        assert!(adapters.block(0).is_none() || n == 1);
        assert!(adapters.block(n - 1).is_some());
        let after = loss_of(&llm, Some(&adapters), &cfg)?;
        assert!(after < first - 0.1, "loss {first} -> {after}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.lora");
        trainer.save(&path)?;
        let (loaded, lcfg) = load_adapters(&path, &llm.config, &llm.device)?;
        assert_eq!(lcfg.top_layers, 1);
        assert!((loss_of(&llm, Some(&loaded), &cfg)? - after).abs() < 1e-4);
        Ok(())
    }

    /// Times LoRA steps on the real model with the tuning's defaults (top 10 blocks adapted,
    /// completions cut at 64 tokens) on a demo-sized batch: 8 chat prompts, completions of 30-60
    /// words (`cargo test --release --workspace --lib -- --ignored --nocapture
    /// tuning_step_probe`). Also times the same batch's loss without adapters (forward only)
    /// and the blocks below the adapters on the CPU decoder.
    /// A probe for profiles, not a gate.
    #[test]
    #[ignore]
    fn tuning_step_probe() -> Result<()> {
        let llm = test_assets::smollm2_llm();
        let cfg = crate::tuning::TuningConfig::default().lora;
        let words: Vec<&str> = "the film opens on a quiet street where an old projectionist \
            keeps a cinema alive against the odds and the story that follows is funny sad and \
            wise by turns with a cast that never hits a false note even when the script leans \
            on easy sentiment in its last act which drags a little before an ending that lands"
            .split_whitespace()
            .collect();
        let batch: Vec<TrainExample> = (0..8)
            .map(|i| TrainExample {
                prompt: llm
                    .tokenizer
                    .chat_prompt("Write a short movie review with a positive sentiment."),
                completion: words[i..]
                    .iter()
                    .take(30 + 4 * i)
                    .copied()
                    .collect::<Vec<_>>()
                    .join(" "),
                weight: 1.0,
            })
            .collect();
        let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
            f()?;
            let start = std::time::Instant::now();
            for _ in 0..3 {
                f()?;
            }
            Ok(start.elapsed().as_secs_f64() / 3.0 * 1e3)
        };
        let mut trainer = LoraTrainer::new(llm, cfg.clone(), 1);
        let step = time(&mut || trainer.step(llm, &batch).map(drop))?;
        let forward = time(&mut || weighted_nll(llm, None, &batch, &cfg).map(drop))?;
        println!("LoRA step {step:.0} ms, loss without adapters (forward only) {forward:.0} ms");
        // The blocks below the adapters, on the CPU decoder.
        let refs: Vec<&TrainExample> = batch.iter().collect();
        let crate::llm::completions::Padded { rows, pads, .. } =
            crate::llm::completions::Padded::new(llm, &refs, &cfg)?;
        let first = llm.config.n_layers - cfg.top_layers;
        let cpu = llm.cpu_model().expect("the CPU decoder");
        let lower = time(&mut || {
            cpu.residual(&rows.concat(), &pads, first);
            Ok(())
        })?;
        println!(
            "{} x {} tokens: blocks 0..{first} on the CPU decoder {lower:.0} ms",
            rows.len(),
            rows[0].len()
        );
        Ok(())
    }

    /// LoRA tuning on an NVIDIA GPU (burn's autodiff over CUDA): the real-model check above,
    /// on CUDA. Only in a `cuda` build, ignored by default; run with `-- --ignored ::cuda::`.
    #[cfg(feature = "cuda")]
    mod cuda {
        use super::*;

        #[test]
        #[ignore = "needs an NVIDIA GPU and a cuda build"]
        fn real_lora_steps_raise_completion_likelihood() -> Result<()> {
            assert!(crate::llm::device::cuda_present(), "no CUDA device here");
            let device = crate::llm::device::Placement::Cuda.device();
            let llm = Llm::load(test_assets::smollm2_path(), &device)?;
            let cfg = LoraConfig {
                learning_rate: 5e-3,
                ..LoraConfig::default()
            };
            test_assets::assert_lora_steps_raise_likelihood(&llm, cfg)
        }
    }
}
