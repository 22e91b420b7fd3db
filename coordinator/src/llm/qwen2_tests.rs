//! Gates of the Qwen2 decoder on the real Qwen2.5-Coder-0.5B-Instruct Q4_K_M file, against
//! what llama.cpp computes on the same file (`qwen2-reference.json`, written by
//! `scripts/qwen2-reference.py`): tokenization, the first step's logits, greedy
//! continuations; then batching, classification and LoRA training on it.

use std::sync::OnceLock;

use burn::tensor::Device;
use serde::Deserialize;

use super::generate::Sampling;
use super::gguf::Gguf;
use super::model::{Arch, LlamaConfig};
use super::quant::{Path, QMatrix};
use super::test_assets;
use super::train::LoraConfig;
use super::{Llm, engine::left_pad};
use crate::Result;

#[derive(Deserialize)]
struct Reference {
    prompts: Vec<PromptRef>,
    strings: Vec<StringRef>,
}

#[derive(Deserialize)]
struct PromptRef {
    user: String,
    ids: Vec<u32>,
    greedy: Vec<u32>,
    top5: Vec<(u32, f32)>,
}

#[derive(Deserialize)]
struct StringRef {
    text: String,
    ids: Vec<u32>,
}

fn reference() -> Reference {
    match serde_json::from_str(include_str!("qwen2-reference.json")) {
        Ok(r) => r,
        Err(e) => panic!("qwen2-reference.json: {e}"),
    }
}

/// The real model, loaded once for all tests of this module.
fn qwen2() -> &'static Llm {
    static LLM: OnceLock<Llm> = OnceLock::new();
    LLM.get_or_init(|| {
        let path = test_assets::qwen2_path();
        match Llm::load(&path, &Device::flex()) {
            Ok(llm) => llm,
            Err(e) => panic!("loading {}: {e}", path.display()),
        }
    })
}

#[test]
fn real_qwen2_config() -> Result<()> {
    let c = LlamaConfig::from_gguf(&Gguf::open(test_assets::qwen2_path())?)?;
    assert_eq!(c.arch, Arch::Qwen2);
    let shape = (c.n_layers, c.d_model, c.d_ff, c.n_heads, c.n_kv_heads);
    assert_eq!(shape, (24, 896, 4864, 14, 2));
    assert_eq!((c.vocab_size, c.head_dim()), (151_936, 64));
    assert_eq!(c.rope_theta, 1_000_000.0);
    assert!((c.rms_eps - 1e-6).abs() < 1e-12);
    assert!(!c.tied_head && c.qkv_bias() && c.rope_halves());
    Ok(())
}

/// Token ids of plain strings and of the chat prompts (our ChatML rendering with Qwen's
/// default system message) equal llama.cpp's.
#[test]
fn real_qwen2_tokenization_matches_llama_cpp() -> Result<()> {
    let tok = &qwen2().tokenizer;
    assert_eq!(tok.vocab_size(), 151_936);
    assert_eq!((tok.eos_id, tok.add_bos), (151_645, false));
    let r = reference();
    for s in &r.strings {
        assert_eq!(tok.encode(&s.text)?, s.ids, "{:?}", s.text);
        assert_eq!(tok.decode(&s.ids, false)?, s.text);
    }
    for p in &r.prompts {
        assert_eq!(
            tok.encode(&tok.chat_prompt(&p.user))?,
            p.ids,
            "{:?}",
            p.user
        );
    }
    Ok(())
}

/// Every matrix of the file keeps a quantized kernel: the Q5_0 matrices as 5-bit codes (the
/// default form; 8-bit under `CROSSLM_Q5=8bit`), Q6_K as 8-bit codes, Q4_K as 4-bit, the Q8_0
/// LM head as it is, the untied Q5_0 embedding (only looked up) as 5-bit codes in either case;
/// none falls back to f32.
#[test]
fn real_qwen2_weights_stay_quantized() {
    use super::quant::Q5Form;
    let Some(cpu) = qwen2().cpu_model() else {
        panic!("the model was loaded on the CPU and must use the quantized decoder")
    };
    let paths: Vec<Path> = cpu.matrices().map(QMatrix::path).collect();
    assert_eq!(paths.len(), 2 + 7 * 24);
    assert!(!paths.contains(&Path::F32), "{paths:?}");
    assert!(paths.contains(&Path::Q4) && paths.contains(&Path::Q8));
    assert_eq!(paths.first(), Some(&Path::Q5), "the embedding's form");
    let five_bit = paths.iter().filter(|p| **p == Path::Q5).count();
    match Q5Form::from_env() {
        Q5Form::Bits => assert!(five_bit > 100, "{five_bit} matrices as 5-bit codes"),
        Q5Form::Bytes => assert_eq!(five_bit, 1, "only the embedding"),
    }
}

/// The file's Q5_0 matrices held as 5-bit codes give the products of the 8-bit form bit for
/// bit (both read as the codes `q - 16`), for one and for several activation rows.
#[test]
fn real_qwen2_q5_forms_agree() -> Result<()> {
    use super::gguf::GgmlType;
    use super::quant::Q5Form;
    let g = Gguf::open(test_assets::qwen2_path())?;
    for name in ["blk.0.attn_q.weight", "blk.0.ffn_up.weight"] {
        let info = g.tensor_info(name)?;
        assert_eq!(info.ggml_type, GgmlType::Q5_0, "{name}");
        let (rows, cols) = (info.shape()[0], info.shape()[1]);
        let bytes = g.tensor_bytes(info)?;
        let bits = QMatrix::from_gguf_as(name, GgmlType::Q5_0, &bytes, rows, cols, Q5Form::Bits)?;
        let q8 = QMatrix::from_gguf_as(name, GgmlType::Q5_0, &bytes, rows, cols, Q5Form::Bytes)?;
        assert_eq!((bits.path(), q8.path()), (Path::Q5, Path::Q8));
        assert_eq!(bits.rows_f32(0..4), q8.rows_f32(0..4), "{name}");
        for n in [1, 2, 5, 40] {
            let x: Vec<f32> = (0..n * cols)
                .map(|i| ((i * 7919) % 201) as f32 / 100.0 - 1.0)
                .collect();
            let (a, b) = (bits.matmul(&x, n), q8.matmul(&x, n));
            let differ = a.iter().zip(&b).filter(|(x, y)| x.to_bits() != y.to_bits());
            assert_eq!(differ.count(), 0, "{name} n={n}");
        }
    }
    Ok(())
}

/// The first step's top 5 match llama.cpp's in order, and in value within 0.25: llama.cpp
/// rounds activations to 8 bits for every product and we for none on a prompt, and both use
/// the same weights (ours exactly, Q6_K's within an eighth of a step). On the quantized CPU
/// decoder and on the burn one (f32 weights, what training differentiates).
#[test]
fn real_qwen2_first_step_top5_match_llama_cpp() -> Result<()> {
    use super::model::{StepInputs, to_host_f32, token_tensor};
    let llm = qwen2();
    let model = llm.model()?;
    for p in &reference().prompts {
        let (rows, pads) = left_pad(std::slice::from_ref(&p.ids), 0);
        let len = rows[0].len();
        let d = &llm.device;
        let hidden = model.forward(
            token_tensor(&rows, d),
            &StepInputs::new(&llm.config, &pads, 0, len, d),
            None,
            None,
        );
        let burn = to_host_f32(model.lm_head(hidden.slice([0..1, len - 1..len])));
        let cpu = llm.session(None, len).step(&rows, &pads);
        for (name, logits) in [("cpu", cpu), ("burn", burn)] {
            let mut order: Vec<usize> = (0..logits.len()).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
            for (k, &(id, value)) in p.top5.iter().enumerate() {
                let got = logits[id as usize];
                assert!(
                    (got - value).abs() < 0.25,
                    "{name} {:?} token {id}: {got} vs {value}",
                    p.user
                );
                // Ranks must agree where llama.cpp's margin to the next is clear of the
                // tolerance (the fifth's next is unknown).
                let margin = p.top5.get(k + 1).map_or(0.0, |n| value - n.1);
                if margin > 0.5 {
                    assert_eq!(order[k] as u32, id, "{name} {:?} rank {k}", p.user);
                }
            }
        }
    }
    Ok(())
}

/// Greedy continuations equal llama.cpp's token for token.
#[test]
fn real_qwen2_greedy_matches_llama_cpp() -> Result<()> {
    let llm = qwen2();
    let r = reference();
    let prompts: Vec<Vec<u32>> = r.prompts.iter().map(|p| p.ids.clone()).collect();
    let steps = r.prompts.iter().map(|p| p.greedy.len()).max().unwrap_or(0);
    let out = llm.generate_ids(&prompts, &Sampling::greedy(steps));
    for (p, got) in r.prompts.iter().zip(&out) {
        // Ours stops at EOS without emitting it; llama.cpp's list ends with it.
        let want: Vec<u32> = p
            .greedy
            .iter()
            .copied()
            .take_while(|&t| t != llm.tokenizer.eos_id)
            .collect();
        assert_eq!(
            *got,
            want,
            "{:?}: {:?}",
            p.user,
            llm.tokenizer.decode(got, true)
        );
    }
    Ok(())
}

/// Sampling a batch of prompts of different lengths gives each what it gets alone.
#[test]
fn real_qwen2_batched_generation_equals_unbatched() -> Result<()> {
    let s = Sampling {
        temperature: 0.9,
        max_new_tokens: 10,
        seed: 3,
        ..Sampling::default()
    };
    test_assets::assert_batched_equals_unbatched(
        qwen2(),
        &["Write a short positive movie review.", "Name a fruit."],
        &s,
    )
}

/// The MR classification prompt ranks an obvious pan more negative than an obvious rave
/// (zero-shot, the Coder model leans "Negative" on both).
#[test]
fn real_qwen2_classifies() -> Result<()> {
    let llm = qwen2();
    let task = crate::task::TaskSpec::from_toml_file(
        crosslm_sdk::data::workspace_root().join("examples/tasks/mr.toml"),
    )?;
    let texts = vec![
        "A dull, lifeless mess with wooden acting and no story at all.".to_string(),
        "A joyous, moving film with wonderful performances.".to_string(),
    ];
    let probs = llm.classify(&task, &texts)?;
    assert!(probs[0][0] > probs[1][0], "{probs:?}");
    Ok(())
}

/// LoRA steps on the top blocks (q/v biases and all) raise a completion's likelihood.
#[test]
fn real_qwen2_lora_steps_lower_the_loss() -> Result<()> {
    let cfg = LoraConfig {
        learning_rate: 5e-3,
        top_layers: 4,
        ..LoraConfig::default()
    };
    test_assets::assert_lora_steps_raise_likelihood(qwen2(), cfg)
}
