//! `crosslm-client slm ...` subcommands.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use crosslm_sdk::data::{self, BadRows, DataKind, Dataset, TableFormat, TableSpec};
use crosslm_sdk::slm::{self, Arch, Backend, MiniLm, TrainConfig, TrainExample, TrainProgress};
use indicatif::{ProgressBar, ProgressStyle};

/// SLM tools.
#[derive(Subcommand)]
pub enum SlmCmd {
    /// Print the mean-pooled, L2-normalised MiniLM embedding of each TEXT as a JSON array.
    Embed {
        /// Directory with config.json, model.safetensors and tokenizer.json.
        #[arg(long, default_value_os_t = data::assets_dir().join("minilm"))]
        model: PathBuf,
        /// Truncate texts to this many tokens.
        #[arg(long, default_value_t = 128)]
        max_len: usize,
        /// Tensor backend.
        #[arg(long, value_enum, default_value_t = Backend::Flex)]
        backend: Backend,
        /// Texts to embed.
        #[arg(required = true)]
        texts: Vec<String>,
    },
    /// Train an SLM on a labeled data file and write a checkpoint directory.
    Train(TrainArgs),
    /// Print the accuracy of a checkpoint on a labeled data file.
    Eval {
        /// Checkpoint directory.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Tensor backend.
        #[arg(long, value_enum, default_value_t = Backend::Flex)]
        backend: Backend,
        #[command(flatten)]
        data: DataArgs,
    },
    /// Print per-label probabilities for every text of a data file, as JSON lines.
    Score {
        /// Checkpoint directory.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Tensor backend.
        #[arg(long, value_enum, default_value_t = Backend::Flex)]
        backend: Backend,
        #[command(flatten)]
        data: DataArgs,
    },
}

/// `slm train` options.
#[derive(Args)]
pub struct TrainArgs {
    /// Architecture.
    #[arg(long, value_enum, default_value_t = Arch::Minilm)]
    arch: Arch,
    /// Checkpoint directory to write.
    #[arg(long)]
    out: PathBuf,
    /// Continue training this checkpoint instead of a new model (its architecture, tokenizer,
    /// length limit and label order then apply; `--arch`, `--model`, `--max-len` are ignored).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Pretrained MiniLM directory (the bag model takes its tokenizer from here too).
    #[arg(long, default_value_os_t = data::assets_dir().join("minilm"))]
    model: PathBuf,
    /// Tensor backend.
    #[arg(long, value_enum, default_value_t = Backend::Flex)]
    backend: Backend,
    /// Truncate texts to this many tokens.
    #[arg(long, default_value_t = 128)]
    max_len: usize,
    /// Epochs (default: 3 for minilm, 15 for bag).
    #[arg(long)]
    epochs: Option<usize>,
    /// Batch size.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Peak learning rate (default: 5e-5 for minilm, 1e-3 for bag).
    #[arg(long)]
    lr: Option<f64>,
    /// Fraction of the training data held out for early stopping.
    #[arg(long)]
    val_fraction: Option<f64>,
    /// Epochs without validation improvement before stopping.
    #[arg(long)]
    patience: Option<usize>,
    /// Freeze the lowest N encoder layers.
    #[arg(long, default_value_t = 0)]
    freeze_layers: usize,
    /// Freeze the embedding tables.
    #[arg(long)]
    freeze_embeddings: bool,
    /// Seed for training (validation split, batch order, dropout, head init).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[command(flatten)]
    data: DataArgs,
}

/// Which part of a split data set to use.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    /// The training part.
    Train,
    /// The held-out test part.
    Test,
    /// Everything.
    All,
}

/// Data set format.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// From the path.
    Auto,
    /// MR polarity TSV.
    Mr,
    /// SpamAssassin directory.
    Spam,
    /// Reuters R8 `.tab`.
    R8,
    /// CSV with header.
    Csv,
    /// TSV.
    Tsv,
    /// JSON lines.
    Jsonl,
}

/// Options that pick the labeled data.
#[derive(Args)]
pub struct DataArgs {
    /// Data file (or SpamAssassin directory).
    #[arg(long)]
    data: PathBuf,
    /// Data format.
    #[arg(long, value_enum, default_value_t = Format::Auto)]
    format: Format,
    /// Text column (CSV/TSV header name or 0-based index; JSONL key).
    #[arg(long, default_value = "text")]
    text_column: String,
    /// Label column.
    #[arg(long, default_value = "label")]
    label_column: String,
    /// CSV/TSV files have no header row.
    #[arg(long)]
    no_header: bool,
    /// Fail on the first bad row instead of skipping it.
    #[arg(long)]
    reject_bad_rows: bool,
    /// Hold out this fraction as a test split (0: no split).
    #[arg(long, default_value_t = 0.0)]
    test_fraction: f64,
    /// Seed of the train/test split.
    #[arg(long, default_value_t = 13)]
    split_seed: u64,
    /// Part of the split to use (train uses `train`; eval/score default to `test` when split).
    #[arg(long, value_enum)]
    split: Option<Part>,
    /// Use at most N examples of the chosen part (a seeded sample).
    #[arg(long)]
    limit: Option<usize>,
}

impl DataArgs {
    /// Loads the data, maps it onto `labels` if given, and returns (chosen part, test part).
    fn load(&self, labels: Option<&[String]>, default: Part) -> anyhow::Result<(Dataset, Dataset)> {
        let (kind, format) = match self.format {
            Format::Auto => (None, TableFormat::Auto),
            Format::Mr => (Some(DataKind::Mr), TableFormat::Auto),
            Format::Spam => (Some(DataKind::Spam), TableFormat::Auto),
            Format::R8 => (Some(DataKind::R8), TableFormat::Auto),
            Format::Csv => (Some(DataKind::Table), TableFormat::Csv),
            Format::Tsv => (Some(DataKind::Table), TableFormat::Tsv),
            Format::Jsonl => (Some(DataKind::Table), TableFormat::Jsonl),
        };
        let spec = TableSpec {
            format,
            text_column: self.text_column.clone(),
            label_column: self.label_column.clone(),
            has_header: !self.no_header,
            labels: labels.map(<[String]>::to_vec),
        };
        let bad = if self.reject_bad_rows {
            BadRows::Reject
        } else {
            BadRows::Skip
        };
        let loaded = data::load_auto(&self.data, kind, &spec, bad)?;
        if !loaded.skipped.is_empty() {
            eprintln!(
                "skipped {} bad rows (first: {})",
                loaded.skipped.len(),
                loaded.skipped[0]
            );
        }
        let mut dataset = loaded.dataset;
        if let Some(labels) = labels {
            dataset = remap(dataset, labels)?;
        }
        let (train, test) = if self.test_fraction > 0.0 {
            dataset.split(self.test_fraction, self.split_seed)?
        } else {
            (dataset.clone(), dataset.with_examples(Vec::new()))
        };
        let part = match self.split.unwrap_or(if self.test_fraction > 0.0 {
            default
        } else {
            Part::All
        }) {
            Part::Train => train,
            Part::Test => test.clone(),
            Part::All if self.test_fraction > 0.0 => {
                let mut all = train;
                all.examples.extend(test.examples.iter().cloned());
                all
            }
            Part::All => train,
        };
        let part = match self.limit {
            Some(n) => part.sample(n, self.split_seed),
            None => part,
        };
        if part.is_empty() {
            bail!("no examples selected from {}", self.data.display());
        }
        Ok((part, test))
    }
}

/// Re-indexes a data set's labels onto a checkpoint's label names.
fn remap(dataset: Dataset, labels: &[String]) -> anyhow::Result<Dataset> {
    let map: Vec<usize> = dataset
        .label_names
        .iter()
        .map(|n| {
            labels
                .iter()
                .position(|l| l == n)
                .with_context(|| format!("data label {n:?} is not one of the model's {labels:?}"))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Dataset {
        label_names: labels.to_vec(),
        examples: dataset
            .examples
            .into_iter()
            .map(|mut e| {
                e.label = map[e.label];
                e
            })
            .collect(),
    })
}

fn texts_and_labels(d: &Dataset) -> (Vec<&str>, Vec<usize>) {
    d.examples
        .iter()
        .map(|e| (e.text.as_str(), e.label))
        .unzip()
}

/// Runs an `slm` subcommand.
pub fn run(cmd: SlmCmd) -> anyhow::Result<()> {
    match cmd {
        SlmCmd::Embed {
            model,
            max_len,
            backend,
            texts,
        } => {
            let slm = MiniLm::from_pretrained(&model, vec!["_".into()], max_len, backend)?;
            let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
            let mut out = std::io::stdout().lock();
            for e in slm.embed(&texts)? {
                writeln!(out, "{}", serde_json::to_string(&e)?)?;
            }
            Ok(())
        }
        SlmCmd::Train(args) => train(args),
        SlmCmd::Eval {
            checkpoint,
            backend,
            data,
        } => {
            let slm = slm::load_checkpoint(&checkpoint, backend)?;
            let (part, _) = data.load(Some(slm.labels()), Part::Test)?;
            let (texts, labels) = texts_and_labels(&part);
            let start = Instant::now();
            let acc = slm::accuracy(slm.as_ref(), &texts, &labels)?;
            let secs = start.elapsed().as_secs_f64();
            println!(
                "accuracy {acc:.4} on {} examples ({:.1} samples/s scoring)",
                texts.len(),
                texts.len() as f64 / secs
            );
            Ok(())
        }
        SlmCmd::Score {
            checkpoint,
            backend,
            data,
        } => {
            let slm = slm::load_checkpoint(&checkpoint, backend)?;
            let (part, _) = data.load(Some(slm.labels()), Part::Test)?;
            let (texts, labels) = texts_and_labels(&part);
            let probs = slm.predict_proba(&texts)?;
            let mut out = std::io::stdout().lock();
            for ((text, label), p) in texts.iter().zip(labels).zip(probs) {
                let probs: serde_json::Map<String, serde_json::Value> = slm
                    .labels()
                    .iter()
                    .zip(p)
                    .map(|(l, p)| (l.clone(), serde_json::json!(p)))
                    .collect();
                let line = serde_json::json!({
                    "text": text,
                    "label": slm.labels()[label],
                    "probs": probs,
                });
                writeln!(out, "{line}")?;
            }
            Ok(())
        }
    }
}

fn train(args: TrainArgs) -> anyhow::Result<()> {
    // A checkpoint to continue fixes the label order: the data's labels are mapped onto it.
    let init = match &args.init {
        Some(dir) => {
            let slm = slm::load_checkpoint(dir, args.backend)?;
            eprintln!("continuing the {} checkpoint {}", slm.arch(), dir.display());
            Some(slm)
        }
        None => None,
    };
    let (train_set, test_set) = args
        .data
        .load(init.as_ref().map(|s| s.labels()), Part::Train)?;
    let arch = init.as_ref().map_or(args.arch, |s| s.arch());
    let defaults = TrainConfig::for_arch(arch);
    let cfg = TrainConfig {
        epochs: args.epochs.unwrap_or(defaults.epochs),
        batch_size: args.batch_size.unwrap_or(defaults.batch_size),
        learning_rate: args.lr.unwrap_or(defaults.learning_rate),
        validation_fraction: args.val_fraction.unwrap_or(defaults.validation_fraction),
        patience: args.patience.unwrap_or(defaults.patience),
        freeze_layers: args.freeze_layers,
        freeze_embeddings: args.freeze_embeddings,
        seed: args.seed,
        ..defaults
    };
    eprintln!(
        "training {} on {} examples, labels {:?} (counts {:?}), backend {:?}",
        arch,
        train_set.len(),
        train_set.label_names,
        train_set.label_counts(),
        args.backend
    );
    let n_labels = train_set.num_labels();
    let mut slm = match init {
        Some(slm) => slm,
        None => slm::new_slm(
            args.arch,
            &args.model,
            train_set.label_names.clone(),
            args.max_len,
            args.backend,
        )?,
    };
    let examples: Vec<TrainExample> = train_set
        .examples
        .iter()
        .map(|e| TrainExample::hard(e.text.clone(), e.label, n_labels))
        .collect();

    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} epoch {prefix} [{bar:30}] {pos}/{len} steps {per_sec} eta {eta} {msg}",
        )?
        .progress_chars("=> "),
    );
    let mut on_step = |p: &TrainProgress| {
        bar.set_length(p.total_steps as u64);
        bar.set_position(p.step as u64);
        bar.set_prefix(format!("{}/{}", p.epoch, p.epochs));
        match p.val_loss {
            Some(v) => bar.println(format!("epoch {} validation loss {v:.4}", p.epoch)),
            None => bar.set_message(format!("loss {:.4} lr {:.2e}", p.loss, p.learning_rate)),
        }
    };
    let start = Instant::now();
    let report = slm.train(&examples, &cfg, &mut on_step)?;
    bar.finish_and_clear();
    eprintln!(
        "trained in {:.1}s ({:.1} samples/s): {} epochs, kept epoch {}, train loss {:.4}, val loss {:?}, val accuracy {:?}",
        start.elapsed().as_secs_f64(),
        report.train_samples_per_sec,
        report.epochs_run,
        report.best_epoch,
        report.train_loss,
        report.val_loss,
        report.val_accuracy
    );
    slm.save(&args.out)?;
    eprintln!("checkpoint written to {}", args.out.display());
    if !test_set.is_empty() {
        let (texts, labels) = texts_and_labels(&test_set);
        let start = Instant::now();
        let acc = slm::accuracy(slm.as_ref(), &texts, &labels)?;
        println!(
            "test accuracy {acc:.4} on {} held-out examples ({:.1} samples/s scoring)",
            texts.len(),
            texts.len() as f64 / start.elapsed().as_secs_f64()
        );
    }
    print_json_report(&args.out, &report)
}

fn print_json_report(out: &Path, report: &slm::TrainReport) -> anyhow::Result<()> {
    let path = out.join("train_report.json");
    std::fs::write(&path, serde_json::to_vec_pretty(report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
