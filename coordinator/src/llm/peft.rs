//! LoRA adapters exported in the layout of Hugging Face PEFT (`adapter_config.json` +
//! `adapter_model.safetensors`), which serving engines such as vLLM load at run time.
//!
//! Ours compute `x -> alpha / r * (x @ a) @ b` with `a: [d_in, r]`, `b: [r, d_out]`; PEFT's
//! `lora_A.weight` is `[r, d_in]` and `lora_B.weight` `[d_out, r]` with the same scaling, so
//! both are transposed. The query projection needs one more step: the GGUF converter permuted
//! the rows of `q_proj` (per head, HF's two halves became interleaved pairs, so that llama.cpp's
//! adjacent-pair RoPE applies), and the adapter's output rows follow the GGUF order. PEFT adds
//! the update to HF's unpermuted `q_proj`, so `lora_B`'s rows of the query are put back in HF's
//! order. The value projection is not permuted, and Qwen2 files permute neither (their RoPE
//! rotates halves, as HF's does).

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

use super::model::{Arch, LlamaConfig, LoraAdapters, LoraPair};
use super::train::LoraConfig;
use crate::{Error, Result};

/// The config file PEFT and vLLM read.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The tensors.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// A host copy of one adapter in PEFT's layout: `lora_A` `[r, d_in]`, `lora_B` `[d_out, r]`.
struct PeftPair {
    a: Vec<f32>,
    a_shape: [usize; 2],
    b: Vec<f32>,
    b_shape: [usize; 2],
}

/// Writes `adapters` into `dir` (created if needed) as a PEFT LoRA adapter of the model
/// `model`. `base_model` is recorded as `base_model_name_or_path` (a name or path the reader
/// knows the base by). Files are written beside and renamed into place, so a reader never
/// sees half an adapter.
pub fn export(
    adapters: &LoraAdapters,
    lora: &LoraConfig,
    model: &LlamaConfig,
    base_model: &str,
    dir: &Path,
) -> Result<()> {
    if adapters.n_layers() != model.n_layers {
        return Err(Error::Model(format!(
            "adapters for {} layers, model has {}",
            adapters.n_layers(),
            model.n_layers
        )));
    }
    let head_dim = model.head_dim();
    let mut tensors: Vec<(String, PeftPair)> = Vec::new();
    for (k, block) in adapters.blocks.iter().enumerate() {
        let layer = adapters.first + k;
        let permuted = (model.arch == Arch::Llama).then_some((model.n_heads, head_dim));
        let q = peft_pair(&block.q, permuted)?;
        let v = peft_pair(&block.v, None)?;
        tensors.push((module_name(layer, "q_proj"), q));
        tensors.push((module_name(layer, "v_proj"), v));
    }
    let bytes: Vec<(String, Vec<u8>, [usize; 2])> = tensors
        .iter()
        .flat_map(|(name, p)| {
            [
                (format!("{name}.lora_A.weight"), le_bytes(&p.a), p.a_shape),
                (format!("{name}.lora_B.weight"), le_bytes(&p.b), p.b_shape),
            ]
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, data, shape)| {
            TensorView::new(Dtype::F32, shape.to_vec(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Model(format!("PEFT tensor {name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let weights = safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::Model(format!("serializing the PEFT adapter: {e}")))?;
    let config = peft_config(adapters, lora, base_model);
    let config = serde_json::to_vec_pretty(&config)
        .map_err(|e| Error::Model(format!("PEFT config: {e}")))?;
    std::fs::create_dir_all(dir).map_err(|source| Error::File {
        path: dir.to_path_buf(),
        source,
    })?;
    // Weights first, config last: a reader that finds the config finds the weights it names.
    write_replacing(&dir.join(WEIGHTS_FILE), &weights)?;
    write_replacing(&dir.join(CONFIG_FILE), &config)
}

/// PEFT's module name of a projection in block `layer` (as `PeftModel.save_pretrained`
/// writes it, without the adapter name).
fn module_name(layer: usize, proj: &str) -> String {
    format!("base_model.model.model.layers.{layer}.self_attn.{proj}")
}

/// The `adapter_config.json` of these adapters, stating what they are.
fn peft_config(adapters: &LoraAdapters, lora: &LoraConfig, base_model: &str) -> serde_json::Value {
    let mut cfg = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "revision": null,
    });
    if adapters.first > 0 {
        // Only the top blocks have adapters; say which, so PEFT adds none below them.
        cfg["layers_to_transform"] = (adapters.first..adapters.n_layers()).collect();
    }
    cfg
}

/// One adapter on the host in PEFT's layout. `q_heads`: `(heads, head_dim)` of a query
/// projection whose output rows are in GGUF's permuted order.
fn peft_pair(pair: &LoraPair, q_heads: Option<(usize, usize)>) -> Result<PeftPair> {
    let host = |t: burn::tensor::Tensor<2>| -> Result<(Vec<f32>, [usize; 2])> {
        let dims = t.dims();
        let v = t
            .into_data()
            .try_to_vec_as::<f32>()
            .map_err(|e| Error::Model(format!("reading an adapter: {e:?}")))?;
        Ok((v, dims))
    };
    let (a, [d_in, r]) = host(pair.a.val())?;
    let (b, [r_b, d_out]) = host(pair.b.val())?;
    if r != r_b {
        return Err(Error::Model(format!("adapter ranks differ: {r} and {r_b}")));
    }
    let hf_row = |row: usize| -> usize {
        match q_heads {
            Some((_, hd)) => gguf_row_of_hf(row, hd),
            None => row,
        }
    };
    if let Some((heads, hd)) = q_heads
        && heads * hd != d_out
    {
        return Err(Error::Model(format!(
            "query adapter has {d_out} outputs, not {heads} heads x {hd}"
        )));
    }
    let a_t = transpose(&a, d_in, r);
    // lora_B[o, k] = b[k, gguf(o)].
    let mut b_t = vec![0.0f32; d_out * r];
    for o in 0..d_out {
        let g = hf_row(o);
        for k in 0..r {
            b_t[o * r + k] = b[k * d_out + g];
        }
    }
    Ok(PeftPair {
        a: a_t,
        a_shape: [r, d_in],
        b: b_t,
        b_shape: [d_out, r],
    })
}

/// The GGUF row that holds HF row `row` of a permuted q/k projection with heads of `hd`:
/// within a head, HF's `j * hd/2 + i` (half `j`, index `i`) is GGUF's `2 i + j`.
fn gguf_row_of_hf(row: usize, hd: usize) -> usize {
    let (head, within) = (row / hd, row % hd);
    let half = hd / 2;
    let (j, i) = (within / half, within % half);
    head * hd + 2 * i + j
}

/// `[rows, cols]` row-major -> `[cols, rows]` row-major.
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = x[r * cols + c];
        }
    }
    out
}

fn le_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn write_replacing(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| Error::File { path: p, source }
    };
    std::fs::write(&tmp, bytes).map_err(err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(err(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Param;
    use burn::tensor::{Device, Tensor, TensorData};

    #[test]
    fn the_permutation_undoes_the_converters() {
        // The converter: HF rows reshaped (head, half j, i), halves swapped with i, flattened.
        let (heads, hd) = (3, 8);
        let hf: Vec<usize> = (0..heads * hd).collect();
        let mut gguf = vec![0; hf.len()];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..hd / 2 {
                    gguf[h * hd + 2 * i + j] = hf[h * hd + j * hd / 2 + i];
                }
            }
        }
        for (row, &want) in hf.iter().enumerate() {
            assert_eq!(gguf[gguf_row_of_hf(row, hd)], want);
        }
    }

    /// A small config whose adapters can be filled with known values.
    fn config() -> LlamaConfig {
        LlamaConfig {
            n_layers: 3,
            d_model: 8,
            d_ff: 16,
            n_heads: 2,
            n_kv_heads: 1,
            vocab_size: 32,
            max_seq_len: 64,
            ..LlamaConfig::tiny(32)
        }
    }

    #[test]
    fn export_writes_what_peft_reads() {
        let cfg = config();
        let device = Device::flex();
        let mut adapters = LoraAdapters::new(&cfg, 2, 4.0, 2, 7, &device);
        // Give b known values (it starts at zero): b[k, o] = 100 k + o.
        for block in &mut adapters.blocks {
            for pair in [&mut block.q, &mut block.v] {
                let [r, d_out] = pair.b.val().dims();
                let vals: Vec<f32> = (0..r * d_out)
                    .map(|x| (100 * (x / d_out) + x % d_out) as f32)
                    .collect();
                pair.b = Param::from_tensor(Tensor::from_data(
                    TensorData::new(vals, [r, d_out]),
                    &device,
                ));
            }
        }
        let lora = LoraConfig {
            rank: 2,
            alpha: 4.0,
            top_layers: 2,
            ..LoraConfig::default()
        };
        let dir = tempfile::tempdir().unwrap();
        export(&adapters, &lora, &cfg, "smollm2", dir.path()).unwrap();
        let c: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(c["r"], 2);
        assert_eq!(c["lora_alpha"], 4.0);
        assert_eq!(c["layers_to_transform"], serde_json::json!([1, 2]));
        let bytes = std::fs::read(dir.path().join(WEIGHTS_FILE)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.len(), 8, "A and B of q and v in two blocks");
        assert!(
            st.tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
                .is_err(),
            "the bottom block has no adapter"
        );
        let f32s = |name: &str| -> (Vec<f32>, Vec<usize>) {
            let t = st.tensor(name).unwrap();
            let v = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (v, t.shape().to_vec())
        };
        // v: lora_B[o, k] = b[k, o] = 100 k + o, no permutation; kv_dim = 4.
        let (vb, shape) = f32s("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight");
        assert_eq!(shape, [4, 2]);
        assert_eq!(vb, [0.0, 100.0, 1.0, 101.0, 2.0, 102.0, 3.0, 103.0]);
        // q: head_dim 4; HF row 1 (half 0, i 1) is GGUF row 2, HF row 2 (half 1, i 0) is 1.
        let (qb, shape) = f32s("base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight");
        assert_eq!(shape, [8, 2]);
        let col0: Vec<f32> = qb.iter().step_by(2).copied().collect();
        assert_eq!(col0, [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
        // A is transposed: lora_A[k, i] = a[i, k].
        let a = adapters.blocks[0]
            .q
            .a
            .val()
            .into_data()
            .try_to_vec_as::<f32>()
            .unwrap();
        let (qa, shape) = f32s("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight");
        assert_eq!(shape, [2, 8]);
        assert_eq!(qa[1], a[2], "lora_A[0, 1] = a[1, 0]");
        assert_eq!(qa[8], a[1], "lora_A[1, 0] = a[0, 1]");
    }
}
