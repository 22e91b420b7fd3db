//! The coordinator LLM (SmolLM2's Llama, Qwen2.5's Qwen2) in burn and on CPU kernels.
//!
//! - [`engine`]: [`Llm`], what CrossLM needs: generate, classify, perplexity.
//! - [`device`]: where it runs (`auto`: CUDA when built with it and present, else the CPU).
//! - [`session`]: a batch of sequences in flight on either decoder, with its KV cache.
//! - [`generate`]: batched generation over a session, sampling.
//! - [`gguf`]: GGUF v3 reader.
//! - [`quant`] (the SDK's, shared with the SLMs): weights kept in GGUF blocks and the SIMD,
//!   multi-threaded products over them.
//! - [`cpu_model`]: the Llama decoder for CPU inference over quantized weights.
//! - [`model`]: the Llama decoder in burn (config, blocks, KV cache, LoRA adapters), which
//!   training differentiates and GPUs run.
//! - [`tokenizer`]: byte-level BPE from GGUF metadata, ChatML template.
//! - [`train`]: LoRA fine-tuning (weighted completion NLL), adapter files.
//! - [`peft`]: adapters exported in Hugging Face PEFT's layout, for serving engines.

mod completions;
pub mod cpu_model;
pub mod device;
pub mod engine;
pub mod generate;
pub mod gguf;
pub mod model;
pub mod peft;
#[cfg(test)]
mod qwen2_tests;
pub mod session;
pub mod tokenizer;
pub mod train;

/// The CPU decoder's arithmetic, numbered: raised whenever its outputs change (2: batches and
/// prompts multiply rounded integer activations), so that what was cached from another
/// version (generated batches, evaluations) is not reused as if this one had produced it.
pub const DECODER_VERSION: u32 = 2;

pub use crate::synthetic::LabeledText;
pub use crosslm_sdk::quant;
pub use engine::{Llm, accuracy};
pub use generate::Sampling;

use std::path::PathBuf;

/// Where the project's fetched assets live (one definition, shared with the SDK).
pub use crosslm_sdk::data::assets_dir;

/// The default GPU device of this build: wgpu (Vulkan/Metal/DX12), or CUDA with the `cuda`
/// feature. Models move there with burn's `Module::to_device`.
pub fn default_gpu_device() -> burn::tensor::Device {
    #[cfg(feature = "cuda")]
    {
        burn::tensor::Device::cuda(0)
    }
    #[cfg(not(feature = "cuda"))]
    {
        burn::tensor::Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)
    }
}

/// The SmolLM2-135M-Instruct Q4_1 GGUF file inside [`assets_dir`].
pub fn smollm2_gguf_path() -> PathBuf {
    assets_dir().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF file inside [`assets_dir`].
pub fn qwen2_gguf_path() -> PathBuf {
    assets_dir().join("qwen2/Qwen2.5-Coder-0.5B-Instruct-AWQ.Q4_K_M.gguf")
}

#[cfg(test)]
pub(crate) mod test_assets {
    use std::path::PathBuf;

    /// The real model file; panics with a clear message when it is missing, so that tests on
    /// the real model fail instead of silently passing.
    pub fn smollm2_path() -> PathBuf {
        let path = super::smollm2_gguf_path();
        assert!(
            path.is_file(),
            "missing test asset {}: run scripts/fetch-assets.sh or set CROSSLM_ASSETS",
            path.display()
        );
        path
    }

    /// The real SmolLM2 model on the CPU, loaded once for every test that shares it.
    pub fn smollm2_llm() -> &'static super::Llm {
        static LLM: std::sync::OnceLock<super::Llm> = std::sync::OnceLock::new();
        LLM.get_or_init(|| {
            let path = smollm2_path();
            match super::Llm::load(&path, &burn::tensor::Device::flex()) {
                Ok(llm) => llm,
                Err(e) => panic!("loading {}: {e}", path.display()),
            }
        })
    }

    /// The real Qwen2.5 file, or a clear panic like [`smollm2_path`].
    pub fn qwen2_path() -> PathBuf {
        let path = super::qwen2_gguf_path();
        assert!(
            path.is_file(),
            "missing test asset {}: run scripts/fetch-assets.sh or set CROSSLM_ASSETS",
            path.display()
        );
        path
    }

    /// Sampling a batch of chat prompts of different lengths gives each prompt what it gets
    /// alone with the same seed (the batch's row `i` samples with `seed + i`).
    pub fn assert_batched_equals_unbatched(
        llm: &super::Llm,
        users: &[&str],
        sampling: &super::Sampling,
    ) -> crate::Result<()> {
        let prompts = users
            .iter()
            .map(|u| llm.tokenizer.encode(&llm.tokenizer.chat_prompt(u)))
            .collect::<crate::Result<Vec<_>>>()?;
        let batched = llm.generate_ids(&prompts, sampling);
        for (i, p) in prompts.iter().enumerate() {
            let alone = super::Sampling {
                seed: sampling.seed + i as u64,
                ..sampling.clone()
            };
            let single = llm.generate_ids(std::slice::from_ref(p), &alone);
            assert_eq!(single[0], batched[i], "prompt {i}");
        }
        Ok(())
    }

    /// Four LoRA steps on one chat example ("Name a colour." -> "Vermilion.") leave its loss
    /// at least 0.5 below the first step's.
    pub fn assert_lora_steps_raise_likelihood(
        llm: &super::Llm,
        cfg: super::train::LoraConfig,
    ) -> crate::Result<()> {
        use super::train::{LoraTrainer, TrainExample, weighted_nll};
        let ex = vec![TrainExample {
            prompt: llm.tokenizer.chat_prompt("Name a colour."),
            completion: "Vermilion.".into(),
            weight: 1.0,
        }];
        let mut trainer = LoraTrainer::new(llm, cfg.clone(), 1);
        let losses: Vec<f32> = (0..4)
            .map(|_| trainer.step(llm, &ex))
            .collect::<crate::Result<_>>()?;
        let adapters = trainer
            .adapters()
            .ok_or_else(|| crate::Error::Model("no adapters".into()))?;
        let after = weighted_nll(llm, Some(&adapters), &ex, &cfg)?;
        assert!(after < losses[0] - 0.5, "losses {losses:?} then {after}");
        Ok(())
    }

    /// A tiny random model with the real tokenizer: fast, and enough to see learning.
    pub fn tiny_llm() -> crate::Result<super::Llm> {
        use super::cpu_model::CpuLlama;
        use super::gguf::Gguf;
        use super::model::{LlamaConfig, lookup, random_weights};
        use super::tokenizer::Tokenizer;
        let tokenizer = Tokenizer::from_gguf(&Gguf::open(smollm2_path())?)?;
        let config = LlamaConfig::tiny(tokenizer.vocab_size());
        let weights = random_weights(&config, 3);
        let cpu = CpuLlama::from_weights(&config, |n| lookup(&weights, n))?;
        Ok(super::Llm::from_cpu_model(cpu, tokenizer))
    }
}
