//! `crosslm-coordinator llm ...` subcommands.

use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::tensor::Device;
use clap::Subcommand;
use crosslm_coordinator::llm::device::{self, DeviceChoice};
use crosslm_coordinator::llm::gguf::Gguf;
use crosslm_coordinator::llm::model::LlamaConfig;
use crosslm_coordinator::llm::peft;
use crosslm_coordinator::llm::session::Session;
use crosslm_coordinator::llm::tokenizer::Tokenizer;
use crosslm_coordinator::llm::train::load_adapters;
use crosslm_coordinator::llm::{Llm, Sampling, accuracy};
use crosslm_coordinator::task::TaskSpec;
use crosslm_coordinator::tuning::load_general;

/// LLM tools, on the device `--device` picks.
#[derive(clap::Args)]
pub struct LlmArgs {
    /// Where the LLM runs: auto (a CUDA GPU when this build has the `cuda` feature and the
    /// machine a GPU, else the CPU's quantized decoder), cpu, or gpu.
    #[arg(long, global = true, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    #[command(subcommand)]
    cmd: LlmCmd,
}

/// LLM tools.
#[derive(Subcommand)]
pub enum LlmCmd {
    /// Print the token ids of TEXT as a JSON array.
    Tokenize {
        /// GGUF model file.
        #[arg(long)]
        model: PathBuf,
        /// Text to tokenize (special tokens such as <|im_start|> are recognized).
        text: String,
    },
    /// Continue a prompt.
    Generate {
        /// GGUF model file.
        #[arg(long)]
        model: PathBuf,
        /// The prompt (a user message with --chat).
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt in the model's chat template as a user message.
        #[arg(long)]
        chat: bool,
        /// Most new tokens.
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Sampling temperature; 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Nucleus sampling threshold (1 = off).
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// Top-k filter (0 = off).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Sampling seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print {"prompt_ids": [...], "generated_ids": [...]} instead of text.
        #[arg(long)]
        ids: bool,
    },
    /// Classify a labeled data set (zero-shot, or with tuned adapters) and print the accuracy.
    ///
    /// The data file is JSONL (`{"text": ..., "label": "<label name>"}` per line) when its
    /// name ends in `.jsonl` or `.json`, else TSV (`<label name><TAB><text>` per line).
    Classify {
        /// GGUF model file.
        #[arg(long)]
        model: PathBuf,
        /// Task spec (TOML).
        #[arg(long)]
        task: PathBuf,
        /// Labeled data (JSONL or TSV, see above).
        #[arg(long)]
        data: PathBuf,
        /// LoRA adapters saved by the coordinator: `<data_dir>/llm/adapters-<round>.lora`, or
        /// with split adapters the task side's `task-adapters-<round>.lora`.
        #[arg(long)]
        adapters: Option<PathBuf>,
        /// Classify only the first N examples.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Perplexity on general text, with or without tuned LoRA adapters: did tuning cost the
    /// model its general ability?
    ///
    /// TEXT: one text per line; in tab-separated lines the last field is the text (the MR
    /// archive's NYT snippets, Reuters .tab files). Lines under 40 characters are skipped.
    Perplexity {
        /// GGUF model file.
        #[arg(long)]
        model: PathBuf,
        /// LoRA adapters saved by the coordinator (`<data_dir>/llm/adapters-<round>.lora`).
        #[arg(long)]
        adapters: Option<PathBuf>,
        /// General text file (see above).
        #[arg(long)]
        text: PathBuf,
        /// Skip the first N texts.
        #[arg(long, default_value_t = 0)]
        skip: usize,
        /// Use N texts.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Write a coordinator's LoRA adapters in the Hugging Face PEFT layout
    /// (`adapter_config.json` + `adapter_model.safetensors`), which vLLM and `peft` load.
    ExportPeft {
        /// GGUF model file the adapters were trained on.
        #[arg(long)]
        model: PathBuf,
        /// LoRA adapters saved by the coordinator (`<data_dir>/llm/adapters-<round>.lora`).
        #[arg(long)]
        adapters: PathBuf,
        /// Output directory (created).
        #[arg(long)]
        out: PathBuf,
        /// What `base_model_name_or_path` says (default: the GGUF path).
        #[arg(long)]
        base_model: Option<String>,
    },
    /// Print the next-token logits after a prompt as JSON (`{"ids": [...], "logits": [...]}`),
    /// from the f32 decoder that training differentiates (not the quantized fast path), with
    /// or without adapters: what an exported adapter is checked against.
    Logits {
        /// GGUF model file.
        #[arg(long)]
        model: PathBuf,
        /// LoRA adapters saved by the coordinator.
        #[arg(long)]
        adapters: Option<PathBuf>,
        /// The prompt (raw text; special tokens are recognized).
        prompt: String,
    },
}

/// Runs an `llm` subcommand.
pub fn run(args: LlmArgs) -> anyhow::Result<()> {
    let (device, cmd) = (args.device, args.cmd);
    match cmd {
        LlmCmd::Tokenize { model, text } => {
            let tok = Tokenizer::from_gguf(&Gguf::open(&model)?)?;
            println!("{}", serde_json::to_string(&tok.encode(&text)?)?);
        }
        LlmCmd::Generate {
            model,
            prompt,
            chat,
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            ids,
        } => {
            let llm = load_llm(&model, None, device)?;
            let text = if chat {
                llm.tokenizer.chat_prompt(&prompt)
            } else {
                prompt
            };
            let prompt_ids = llm.tokenizer.encode(&text)?;
            let sampling = Sampling {
                temperature,
                top_k,
                top_p,
                max_new_tokens,
                seed,
            };
            let generated = llm
                .generate_ids(std::slice::from_ref(&prompt_ids), &sampling)
                .pop()
                .unwrap_or_default();
            if ids {
                let out = serde_json::json!({
                    "prompt_ids": prompt_ids,
                    "generated_ids": generated,
                });
                println!("{out}");
            } else {
                println!("{}", llm.tokenizer.decode(&generated, true)?);
            }
        }
        LlmCmd::Perplexity {
            model,
            adapters,
            text,
            skip,
            limit,
        } => {
            let texts = load_general(&text, skip.saturating_add(limit))?
                .into_iter()
                .skip(skip)
                .collect::<Vec<_>>();
            anyhow::ensure!(
                !texts.is_empty(),
                "{}: no texts after {skip}",
                text.display()
            );
            let llm = load_llm(&model, adapters.as_deref(), device)?;
            let ppl = llm.perplexity(&texts)?;
            println!(
                "{}",
                serde_json::json!({
                    "texts": texts.len(),
                    "adapters": adapters.map(|p| p.display().to_string()),
                    "perplexity": ppl,
                })
            );
        }
        LlmCmd::ExportPeft {
            model,
            adapters,
            out,
            base_model,
        } => {
            let config = LlamaConfig::from_gguf(&Gguf::open(&model)?)?;
            let (lora, cfg) = load_adapters(&adapters, &config, &Device::flex())
                .with_context(|| format!("loading {}", adapters.display()))?;
            let base = base_model.unwrap_or_else(|| model.display().to_string());
            peft::export(&lora, &cfg, &config, &base, &out)?;
            println!(
                "{}",
                serde_json::json!({
                    "out": out.display().to_string(),
                    "rank": cfg.rank,
                    "alpha": cfg.alpha,
                    "layers": (lora.first..lora.n_layers()).collect::<Vec<_>>(),
                })
            );
        }
        LlmCmd::Logits {
            model,
            adapters,
            prompt,
        } => {
            let llm = load_llm(&model, adapters.as_deref(), device)?;
            let ids = llm.tokenizer.encode(&prompt)?;
            anyhow::ensure!(!ids.is_empty(), "the prompt encodes to no tokens");
            let mut session =
                Session::burn(llm.model()?, &llm.config, llm.lora.as_ref(), &llm.device);
            let logits = session.step(std::slice::from_ref(&ids), &[0]);
            println!("{}", serde_json::json!({ "ids": ids, "logits": logits }));
        }
        LlmCmd::Classify {
            model,
            task,
            data,
            adapters,
            limit,
        } => {
            let task = TaskSpec::from_toml_file(&task)?;
            let mut rows = read_labeled(&data, &task)?;
            if let Some(n) = limit {
                rows.truncate(n);
            }
            anyhow::ensure!(!rows.is_empty(), "{}: no examples", data.display());
            let llm = load_llm(&model, adapters.as_deref(), device)?;
            let texts: Vec<String> = rows.iter().map(|(t, _)| t.clone()).collect();
            let labels: Vec<usize> = rows.iter().map(|(_, l)| *l).collect();
            let probs = llm.classify(&task, &texts)?;
            let acc = accuracy(&probs, &labels);
            let calibrated = accuracy(&llm.classify_calibrated(&task, &texts)?, &labels);
            println!(
                "{}",
                serde_json::json!({
                    "task": task.name,
                    "adapters": adapters.map(|p| p.display().to_string()),
                    "n": rows.len(),
                    "accuracy": acc,
                    "accuracy_calibrated": calibrated,
                })
            );
        }
    }
    Ok(())
}

/// The model on `device`'s placement, with `adapters` (a coordinator's `.lora` file) applied
/// if given.
fn load_llm(model: &Path, adapters: Option<&Path>, device: DeviceChoice) -> anyhow::Result<Llm> {
    let mut llm = Llm::load(model, &device::resolve(device)?.device())?;
    if let Some(path) = adapters {
        let (lora, _) = load_adapters(path, &llm.config, &llm.device)
            .with_context(|| format!("loading {}", path.display()))?;
        llm.lora = Some(lora);
    }
    Ok(llm)
}

/// Reads `(text, label index)` pairs from a JSONL or TSV file (see `Classify`).
fn read_labeled(path: &Path, task: &TaskSpec) -> anyhow::Result<Vec<(String, usize)>> {
    let content =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let jsonl = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("jsonl" | "json")
    );
    let mut rows = Vec::new();
    for (i, line) in content.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let (label, text) = if jsonl {
            let v: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("{}: bad JSON", at()))?;
            let field = |k: &str| {
                v.get(k)
                    .and_then(|x| x.as_str())
                    .map(str::to_string)
                    .with_context(|| format!("{}: missing string field {k:?}", at()))
            };
            (field("label")?, field("text")?)
        } else {
            let (l, t) = line
                .split_once('\t')
                .with_context(|| format!("{}: expected <label><TAB><text>", at()))?;
            (l.to_string(), t.to_string())
        };
        let idx = task.label_index(&label).with_context(|| {
            format!(
                "{}: unknown label {label:?} (task labels: {:?})",
                at(),
                task.label_names()
            )
        })?;
        rows.push((text, idx));
    }
    Ok(rows)
}
