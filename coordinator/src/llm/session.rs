//! A batch of sequences in flight: the decoder it runs on, the adapters in use and its KV
//! cache. Generation, classification and perplexity drive a [`Session`] and never see which
//! decoder is underneath: the quantized CPU one ([`super::cpu_model`]) when the model is on
//! the CPU, the burn one ([`super::model`]) on a GPU.

use burn::tensor::{Device, Tensor, TensorData};

use super::cpu_model::{self, CpuLlama, HostLora};
use super::model::{self, Llama, LlamaConfig, LoraAdapters, StepInputs, to_host_f32, token_tensor};

/// The decoder of a session and its cache.
enum Backend<'a> {
    Cpu {
        model: &'a CpuLlama,
        lora: Option<HostLora>,
        cache: cpu_model::KvCache,
    },
    Burn {
        model: &'a Llama,
        lora: Option<&'a LoraAdapters>,
        device: &'a Device,
        cache: model::KvCache,
    },
}

/// A batch of sequences, fed step by step.
pub struct Session<'a> {
    config: &'a LlamaConfig,
    backend: Backend<'a>,
}

impl<'a> Session<'a> {
    /// A session on the quantized CPU decoder, with room for `capacity` positions.
    pub fn cpu(model: &'a CpuLlama, lora: Option<&LoraAdapters>, capacity: usize) -> Session<'a> {
        Session {
            config: model.config(),
            backend: Backend::Cpu {
                model,
                lora: lora.map(HostLora::new),
                cache: cpu_model::KvCache::with_capacity(capacity),
            },
        }
    }

    /// A session on the burn decoder (any device).
    pub fn burn(
        model: &'a Llama,
        config: &'a LlamaConfig,
        lora: Option<&'a LoraAdapters>,
        device: &'a Device,
    ) -> Session<'a> {
        Session {
            config,
            backend: Backend::Burn {
                model,
                lora,
                device,
                cache: model::KvCache::new(),
            },
        }
    }

    /// The model's architecture.
    pub fn config(&self) -> &LlamaConfig {
        self.config
    }

    /// Positions cached so far.
    pub fn cached(&self) -> usize {
        match &self.backend {
            Backend::Cpu { cache, .. } => cache.len(),
            Backend::Burn { cache, .. } => cache.len(),
        }
    }

    /// Feeds `rows` (`[batch][seq]`, sequence `b` left-padded by `pads[b]` from its start)
    /// after the cached positions; returns their final hidden states `[batch, seq, d_model]`.
    pub fn hidden(&mut self, rows: &[Vec<u32>], pads: &[usize]) -> Vec<f32> {
        let past = self.cached();
        match &mut self.backend {
            Backend::Cpu { model, lora, cache } => {
                let tokens: Vec<u32> = rows.iter().flatten().copied().collect();
                model.forward(&tokens, pads, cache, lora.as_ref())
            }
            Backend::Burn {
                model,
                lora,
                device,
                cache,
            } => {
                let seq = rows.first().map_or(0, Vec::len);
                let inputs = StepInputs::new(self.config, pads, past, seq, device);
                to_host_f32(model.forward(token_tensor(rows, device), &inputs, Some(cache), *lora))
            }
        }
    }

    /// Logits `[n, vocab]` of hidden states `[n, d_model]`.
    pub fn logits(&self, hidden: &[f32], n: usize) -> Vec<f32> {
        match &self.backend {
            Backend::Cpu { model, .. } => model.logits(hidden, n),
            Backend::Burn { model, device, .. } => {
                let h = Tensor::<2>::from_data(
                    TensorData::new(hidden.to_vec(), [n, self.config.d_model]),
                    *device,
                );
                to_host_f32(model.lm_head(h))
            }
        }
    }

    /// Feeds `rows` and returns the logits of each row's last position, `[batch, vocab]`.
    pub fn step(&mut self, rows: &[Vec<u32>], pads: &[usize]) -> Vec<f32> {
        let hidden = self.hidden(rows, pads);
        let d = self.config.d_model;
        let seq = rows.first().map_or(0, Vec::len);
        let last: Vec<f32> = hidden
            .chunks_exact(seq * d)
            .flat_map(|h| &h[(seq - 1) * d..])
            .copied()
            .collect();
        self.logits(&last, rows.len())
    }

    /// Keeps only the cached sequences at `rows`, in that order (a row may repeat).
    pub fn keep_rows(&mut self, rows: &[usize]) {
        match &mut self.backend {
            Backend::Cpu { cache, .. } => cache.select_rows(rows),
            Backend::Burn { cache, .. } => cache.select_rows(rows),
        }
    }
}
