//! The experiment config file (TOML): task, clients, data split, rounds, variants.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use crosslm_coordinator::round::Aggregation;
use crosslm_coordinator::tuning::TuningConfig;
use crosslm_sdk::privacy::PrivacyTarget;

use crate::attack::AttackConfig;
use crosslm_sdk::slm::Arch;
use serde::{Deserialize, Serialize};

/// How private data is spread over clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Partition {
    /// Every client draws from the same label distribution.
    Iid,
    /// Label-skewed: per label, client shares from Dirichlet(alpha).
    Dirichlet(f64),
}

/// A group of clients with the same SLM architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientGroup {
    /// The SLM architecture.
    pub arch: Arch,
    /// How many clients.
    pub count: usize,
}

/// What is compared. Each is one row of the results table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// Each client trains only on its private data (as many epochs as a CrossLM client).
    Standalone,
    /// One SLM per architecture on all private data pooled: the upper bound.
    Centralized,
    /// Federated averaging of SLM weights (MiniLM clients only: it needs one architecture).
    Fedavg,
    /// Frozen-LLM samples with their intended labels, no scores, no LLM tuning (ZeroGen).
    Synthetic,
    /// CrossLM with the LLM frozen (ablation): clients learn from scored samples.
    CrosslmFrozenLlm,
    /// CrossLM: scored samples for the clients, LoRA tuning of the LLM on the feedback.
    Crosslm,
    /// Diagnostic, not a method: Synthetic with a perfect generator. Each round serves real
    /// examples (held by no client, outside the test and validation splits, true labels) in
    /// place of the LLM's samples, so it bounds what better generated data could give.
    RealData,
}

impl Variant {
    /// Short display name.
    pub fn label(self) -> &'static str {
        match self {
            Variant::Standalone => "Standalone",
            Variant::Centralized => "Centralized (upper bound)",
            Variant::Fedavg => "FedAvg (MiniLM clients)",
            Variant::Synthetic => "Synthetic without feedback",
            Variant::CrosslmFrozenLlm => "CrossLM without LLM tuning",
            Variant::Crosslm => "CrossLM",
            Variant::RealData => "Real data instead of synthetic (oracle)",
        }
    }
}

/// Which held-out split the variants are measured on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalSplit {
    /// The test split: the numbers to report.
    #[default]
    Test,
    /// The validation split (`validation_size` pool examples no client holds): for choosing
    /// settings without looking at the test split.
    Validation,
}

/// SLM training settings for one architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlmTraining {
    /// Epochs of the first, local-only training (round 0).
    pub epochs_initial: usize,
    /// Epochs of each per-round update.
    pub epochs_per_round: usize,
    /// Learning rate of the first training.
    pub lr_initial: f64,
    /// Learning rate of per-round updates.
    pub lr_per_round: f64,
    /// Epochs of the Centralized baseline (all private data pooled, so fewer passes).
    pub epochs_centralized: usize,
    /// Batch size.
    pub batch_size: usize,
}

impl SlmTraining {
    /// Chosen once from the SLM issue's figures (not tuned on any test split).
    pub fn default_for(arch: Arch) -> Self {
        match arch {
            Arch::Minilm => Self {
                epochs_initial: 8,
                epochs_per_round: 2,
                lr_initial: 1e-4,
                lr_per_round: 5e-5,
                epochs_centralized: 4,
                batch_size: 16,
            },
            Arch::Bag => Self {
                epochs_initial: 30,
                epochs_per_round: 5,
                lr_initial: 2e-3,
                lr_per_round: 1e-3,
                epochs_centralized: 30,
                batch_size: 16,
            },
        }
    }
}

impl Default for SlmTraining {
    fn default() -> Self {
        Self::default_for(Arch::Minilm)
    }
}

/// An `[minilm_training]` or `[bag_training]` table as written: the fields it leaves out take
/// that architecture's defaults (not the struct's, which are MiniLM's: a partial
/// `[bag_training]` would otherwise train the bag model at MiniLM's rates).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SlmTrainingPatch {
    epochs_initial: Option<usize>,
    epochs_per_round: Option<usize>,
    lr_initial: Option<f64>,
    lr_per_round: Option<f64>,
    epochs_centralized: Option<usize>,
    batch_size: Option<usize>,
}

impl SlmTrainingPatch {
    fn over(self, base: SlmTraining) -> SlmTraining {
        SlmTraining {
            epochs_initial: self.epochs_initial.unwrap_or(base.epochs_initial),
            epochs_per_round: self.epochs_per_round.unwrap_or(base.epochs_per_round),
            lr_initial: self.lr_initial.unwrap_or(base.lr_initial),
            lr_per_round: self.lr_per_round.unwrap_or(base.lr_per_round),
            epochs_centralized: self.epochs_centralized.unwrap_or(base.epochs_centralized),
            batch_size: self.batch_size.unwrap_or(base.batch_size),
        }
    }
}

fn minilm_training_patch<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SlmTraining, D::Error> {
    Ok(SlmTrainingPatch::deserialize(d)?.over(minilm_training()))
}

fn bag_training_patch<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SlmTraining, D::Error> {
    Ok(SlmTrainingPatch::deserialize(d)?.over(bag_training()))
}

/// One experiment.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// Name: results go to `<out>/<name>/`.
    pub name: String,
    /// Task spec (TOML); relative to the config file.
    pub task: PathBuf,
    /// Labeled data set, relative to the assets dir (`$CROSSLM_ASSETS`, default `assets/`).
    pub data: PathBuf,
    /// The LLM (GGUF), relative to the assets dir.
    #[serde(default = "default_llm")]
    pub llm: PathBuf,
    /// Where the LLM runs: `auto` (a CUDA GPU when the build and machine have one, else the
    /// CPU's quantized decoder), `cpu` or `gpu`.
    #[serde(default)]
    pub llm_device: crosslm_coordinator::llm::device::DeviceChoice,
    /// MiniLM files (and the bag model's tokenizer), relative to the assets dir.
    #[serde(default = "default_minilm")]
    pub minilm: PathBuf,
    /// General text for the LLM's perplexity, relative to the assets dir.
    #[serde(default = "default_general")]
    pub general: PathBuf,
    /// Seed of the split, partition, model initialization and sampling.
    #[serde(default = "one")]
    pub seed: u64,
    /// The clients, by architecture.
    pub clients: Vec<ClientGroup>,
    /// Private labeled examples per client.
    pub per_client: usize,
    /// IID or Dirichlet.
    pub partition: Partition,
    /// CrossLM rounds.
    pub rounds: u64,
    /// Synthetic samples per label per round.
    pub samples_per_label: usize,
    /// Held-out test examples for the SLMs (never trained on).
    pub test_size: usize,
    /// The LLM's task accuracy uses the first this many test examples.
    pub llm_test_size: usize,
    /// Validation examples (training pool, held by no client), for choices that must not
    /// see the test split (`crosslm-experiment probe-llm`).
    #[serde(default = "default_validation_size")]
    pub validation_size: usize,
    /// Measure the SLMs and the LLM on the test split (default) or on the validation split,
    /// which stands in for it when choosing settings (its first `llm_test_size` for the LLM).
    #[serde(default)]
    pub evaluate_on: EvalSplit,
    /// General texts for the LLM's perplexity.
    #[serde(default = "default_general_size")]
    pub general_size: usize,
    /// Samples below this quality (the intended label's share against its strongest rival:
    /// the aggregated quality with two labels) are not trained on (clients).
    #[serde(default = "half")]
    pub min_quality: f32,
    /// CrossLM clients apply `min_quality` from this round on (1, default: from the first);
    /// earlier rounds keep every sample, still weighted by quality (`Learning::min_quality_from`
    /// in the SDK).
    #[serde(default = "one")]
    pub min_quality_from_round: u64,
    /// CrossLM clients train toward the aggregated soft labels (`true`) or toward the
    /// samples' intended labels, the scores only selecting and weighting (`false`, default).
    #[serde(default)]
    pub client_soft_targets: bool,
    /// CrossLM clients train on the scored samples: threshold, label balance, quality weights
    /// (`true`, default). `false`: on every sample with its intended label and weight 1, as in
    /// Synthetic without feedback; their scores then only steer the LLM's tuning.
    #[serde(default = "yes")]
    pub client_use_scores: bool,
    /// CrossLM clients balance the labels of the samples they keep (see
    /// `crosslm_sdk::participant::label_balance`).
    #[serde(default = "yes")]
    pub client_balance_labels: bool,
    /// CrossLM clients scale the kept samples' weights to average 1 (`Learning::relative_weights`
    /// in the SDK); `false`: the absolute qualities.
    #[serde(default = "yes")]
    pub client_relative_weights: bool,
    /// The coordinator corrects each client's label bias before aggregating its scores
    /// (`[round] prior_correction` of the coordinator).
    #[serde(default = "yes")]
    pub prior_correction: bool,
    /// Differential privacy on the clients' scores, asked by the coordinator of every client
    /// (`privacy = { epsilon = 8.0, delta = 1e-5, rounds = 3 }`); none: scores in clear. The
    /// noise is seeded from the run's seed: reproducible runs, not a deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacyTarget>,
    /// Clients that score adversarially in place of the first honest ones
    /// (`attack = { kind = "invert", clients = 1 }`); none: every client is honest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attack: Option<AttackConfig>,
    /// How the coordinator combines the clients' scores (`"median"`,
    /// `{ trimmed_mean = { trim = 0.25 } }`; default the weighted mean): the defence.
    #[serde(default)]
    pub aggregation: Aggregation,
    /// SLM tokens per text.
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    /// What to run, in order.
    pub variants: Vec<Variant>,
    /// MiniLM training.
    #[serde(
        default = "minilm_training",
        deserialize_with = "minilm_training_patch"
    )]
    pub minilm_training: SlmTraining,
    /// Bag model training.
    #[serde(default = "bag_training", deserialize_with = "bag_training_patch")]
    pub bag_training: SlmTraining,
    /// The LLM's tuning (CrossLM variant).
    #[serde(default)]
    pub tuning: TuningConfig,
}

fn default_llm() -> PathBuf {
    "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".into()
}
fn default_minilm() -> PathBuf {
    "minilm".into()
}
fn default_general() -> PathBuf {
    "data/mr/nytEditorialSnippets_GroundTruth.txt".into()
}
fn default_general_size() -> usize {
    100
}
fn default_max_len() -> usize {
    64
}
fn one() -> u64 {
    1
}
fn yes() -> bool {
    true
}
fn default_validation_size() -> usize {
    200
}
fn half() -> f32 {
    0.5
}
fn minilm_training() -> SlmTraining {
    SlmTraining::default_for(Arch::Minilm)
}
fn bag_training() -> SlmTraining {
    SlmTraining::default_for(Arch::Bag)
}

impl ExperimentConfig {
    /// Reads a config file (the task path becomes absolute), with `key=value` overrides
    /// applied first (dotted keys reach into tables, `tuning.epochs=2`; a value is read as
    /// TOML, else taken as a string), so that a sweep needs no copies of the file.
    pub fn load_with(path: &Path, sets: &[String]) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut doc: toml::Table =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        for set in sets {
            apply_set(&mut doc, set)?;
        }
        let mut cfg: Self = doc
            .try_into()
            .with_context(|| format!("parsing {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        if cfg.task.is_relative() {
            cfg.task = base.join(&cfg.task);
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let n: usize = self.clients.iter().map(|g| g.count).sum();
        if n == 0 {
            bail!("no clients");
        }
        if let Some(a) = self.attack
            && a.clients >= n
        {
            bail!(
                "attack.clients = {} leaves no honest client of {n}",
                a.clients
            );
        }
        if let Aggregation::TrimmedMean { trim } = self.aggregation
            && !(0.0..0.5).contains(&trim)
        {
            bail!("trimmed_mean trim must be in [0, 0.5), got {trim}");
        }
        if let Aggregation::ScreenedMean { min_agreement } = self.aggregation
            && !(-1.0..1.0).contains(&min_agreement)
        {
            bail!("screened_mean min_agreement must be in [-1, 1), got {min_agreement}");
        }
        if self.per_client == 0 || self.test_size == 0 || self.rounds == 0 {
            bail!("per_client, test_size and rounds must be positive");
        }
        if let Partition::Dirichlet(a) = self.partition
            && !(a > 0.0 && a.is_finite())
        {
            bail!("Dirichlet alpha must be positive, got {a}");
        }
        if self.variants.is_empty() {
            bail!("no variants to run");
        }
        if self.evaluate_on == EvalSplit::Validation && self.validation_size == 0 {
            bail!("evaluate_on = \"validation\" needs a validation_size above 0");
        }
        Ok(())
    }

    /// How many held-out examples the variants are measured on, and the report's word for
    /// the split ("" for the test split).
    pub fn evaluated(&self) -> (usize, &'static str) {
        match self.evaluate_on {
            EvalSplit::Test => (self.test_size, ""),
            EvalSplit::Validation => (
                self.validation_size,
                "validation (not test: `evaluate_on = \"validation\"`) ",
            ),
        }
    }

    /// Every client's architecture, in client order.
    pub fn archs(&self) -> Vec<Arch> {
        self.clients
            .iter()
            .flat_map(|g| std::iter::repeat_n(g.arch, g.count))
            .collect()
    }

    /// Training settings of an architecture.
    pub fn training(&self, arch: Arch) -> &SlmTraining {
        match arch {
            Arch::Minilm => &self.minilm_training,
            Arch::Bag => &self.bag_training,
        }
    }
}

/// Applies one `key=value` override to a parsed config.
fn apply_set(doc: &mut toml::Table, set: &str) -> anyhow::Result<()> {
    let Some((key, raw)) = set.split_once('=') else {
        bail!("--set {set:?}: expected KEY=VALUE");
    };
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    let (last, tables) = parts
        .split_last()
        .filter(|(l, _)| !l.is_empty())
        .with_context(|| format!("--set {set:?}: empty key"))?;
    let mut table = doc;
    for part in tables {
        table = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .with_context(|| format!("--set {set:?}: {part} is not a table"))?;
    }
    table.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_configs_parse() {
        let dir = crosslm_sdk::data::workspace_root().join("examples/experiments");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                let c = ExperimentConfig::load_with(&p, &[]).unwrap();
                assert!(
                    c.task.is_file(),
                    "{}: task {}",
                    p.display(),
                    c.task.display()
                );
                n += 1;
            }
        }
        assert!(n >= 3);
        // Options that measured no gain sit under [tuning.experimental], and still apply.
        let root = crosslm_sdk::data::workspace_root();
        let load = |f: &str| ExperimentConfig::load_with(&root.join(f), &[]).unwrap();
        let split = load("examples/experiments/mr-iid-split.toml");
        assert_eq!(
            split.tuning.experimental.adapters,
            crosslm_coordinator::tuning::AdapterLayout::Split
        );
        assert!(
            load("examples/experiments/mr-iid-dpo.toml")
                .tuning
                .experimental
                .preference
                .enabled
        );
        assert_eq!(
            load("examples/experiments/mr-iid-band.toml")
                .tuning
                .experimental
                .generation_skip_best,
            0.25
        );
    }

    #[test]
    fn bad_configs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.toml");
        let base = r#"
name = "x"
task = "t.toml"
data = "d"
clients = [{ arch = "minilm", count = 2 }]
per_client = 8
rounds = 1
samples_per_label = 4
test_size = 10
llm_test_size = 5
variants = ["crosslm"]
"#;
        std::fs::write(&p, format!("{base}partition = \"iid\"\n")).unwrap();
        let c = ExperimentConfig::load_with(&p, &[]).unwrap();
        assert_eq!(c.archs(), vec![Arch::Minilm, Arch::Minilm]);
        std::fs::write(&p, format!("{base}partition = {{ dirichlet = -1.0 }}\n")).unwrap();
        assert!(ExperimentConfig::load_with(&p, &[]).is_err());
        std::fs::write(&p, format!("{base}partition = \"iid\"\nbogus = 1\n")).unwrap();
        assert!(ExperimentConfig::load_with(&p, &[]).is_err());
    }

    #[test]
    fn overrides_reach_fields_and_tables_and_are_checked() {
        let p = crosslm_sdk::data::workspace_root().join("examples/experiments/mr-iid.toml");
        let base = ExperimentConfig::load_with(&p, &[]).unwrap();
        assert_eq!(base.evaluate_on, EvalSplit::Test);
        let sets = [
            "min_quality=0.25",
            "evaluate_on=validation",
            "name=sweep",
            "tuning.epochs=7",
            "rounds = 1",
            "privacy.epsilon=8.0",
            "privacy.delta=1e-5",
            "privacy.rounds=3",
            "attack.kind=\"invert\"",
            "attack.clients=2",
            "aggregation=\"median\"",
        ]
        .map(String::from);
        let c = ExperimentConfig::load_with(&p, &sets).unwrap();
        assert_eq!(c.min_quality, 0.25);
        assert_eq!(c.evaluate_on, EvalSplit::Validation);
        assert_eq!(c.name, "sweep");
        assert_eq!(c.tuning.epochs, 7);
        assert_eq!(c.rounds, 1);
        assert_eq!(c.tuning.batch_size, base.tuning.batch_size);
        assert_eq!(base.privacy, None);
        let dp = c.privacy.expect("privacy set");
        assert_eq!((dp.epsilon, dp.delta, dp.rounds), (8.0, 1e-5, 3));
        assert_eq!(
            c.attack,
            Some(AttackConfig {
                kind: crate::attack::AttackKind::Invert,
                clients: 2
            })
        );
        assert_eq!(c.aggregation, Aggregation::Median);
        let screened = ["aggregation={ screened_mean = { min_agreement = 0.0 } }".to_string()];
        assert_eq!(
            ExperimentConfig::load_with(&p, &screened)
                .unwrap()
                .aggregation,
            Aggregation::ScreenedMean { min_agreement: 0.0 }
        );
        for bad in [
            "bogus=1",
            "min_quality",
            "rounds=many",
            "name.x=1",
            "=3",
            "bag_training.epochs=3",
            "attack={ kind = \"invert\", clients = 8 }",
            "aggregation={ trimmed_mean = { trim = 0.5 } }",
            "aggregation={ screened_mean = { min_agreement = 1.0 } }",
        ] {
            assert!(
                ExperimentConfig::load_with(&p, &[bad.to_string()]).is_err(),
                "{bad}"
            );
        }
    }

    /// A training table that sets some fields keeps its architecture's defaults for the
    /// rest, from an override or from the file (the bag model at MiniLM's rates learned little).
    #[test]
    fn partial_training_tables_keep_their_architectures_defaults() {
        let p = crosslm_sdk::data::workspace_root().join("examples/experiments/mr-iid.toml");
        let sets = [
            "bag_training.epochs_per_round=15",
            "minilm_training.lr_per_round=1e-5",
        ]
        .map(String::from);
        let c = ExperimentConfig::load_with(&p, &sets).unwrap();
        let bag = SlmTraining {
            epochs_per_round: 15,
            ..SlmTraining::default_for(Arch::Bag)
        };
        assert_eq!(c.bag_training, bag);
        let minilm = SlmTraining {
            lr_per_round: 1e-5,
            ..SlmTraining::default_for(Arch::Minilm)
        };
        assert_eq!(c.minilm_training, minilm);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.toml");
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(
            &f,
            format!("{text}\n[bag_training]\nlr_per_round = 0.002\n"),
        )
        .unwrap();
        let c = ExperimentConfig::load_with(&f, &[]).unwrap();
        assert_eq!(c.bag_training.lr_per_round, 0.002);
        assert_eq!(c.bag_training.epochs_initial, 30);
        // What a run writes reads back as it was.
        let back: ExperimentConfig =
            serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back.bag_training, c.bag_training);
    }
}
