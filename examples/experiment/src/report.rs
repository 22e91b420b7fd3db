//! What an experiment measured (`metrics.json`), and its renderings: a markdown table and a
//! PNG plot of accuracy per round.

use std::path::Path;

use anyhow::Context;
use crosslm_coordinator::tuning::LlmReport;
use crosslm_sdk::slm::Arch;
use serde::{Deserialize, Serialize};

use crate::config::{ExperimentConfig, Variant};

/// One round of one variant (round 0: after local-only training).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundMetrics {
    /// The round.
    pub round: u64,
    /// Each client's SLM test accuracy (`None`: not measured or not applicable).
    pub slm: Vec<Option<f32>>,
    /// The LLM's figures after this round, where measured.
    pub llm: Option<LlmReport>,
    /// Synthetic samples in the round.
    pub samples: Option<usize>,
    /// Mean aggregated quality of the round's samples.
    pub mean_quality: Option<f32>,
    /// Samples the CrossLM clients kept: at or above their quality threshold (all of them in
    /// rounds before `min_quality_from_round`).
    pub kept: Option<usize>,
    /// Where the round's time went (networked variants; absent from older metrics files).
    #[serde(default)]
    pub split: Option<RoundSplit>,
}

/// Wall seconds of a round's phases. The clients' phases are the slowest client's; the LLM's
/// tuning and evaluation run while the clients train, on the same cores.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RoundSplit {
    /// The LLM writing the round's samples.
    pub generation: Option<f64>,
    /// The frozen LLM's batch came from the cache: no generation ran.
    #[serde(default)]
    pub generation_cached: bool,
    /// Scoring every sample.
    pub scoring: Option<f64>,
    /// LoRA-tuning the LLM on the scored samples.
    pub llm_tuning: Option<f64>,
    /// Measuring the tuned LLM (task accuracy, perplexity).
    pub llm_evaluation: Option<f64>,
    /// Training on the round's samples plus the private data, and the test accuracy after it.
    pub client_training: Option<f64>,
}

/// One variant's run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VariantResult {
    /// Which.
    pub variant: Variant,
    /// Rounds, in order.
    pub rounds: Vec<RoundMetrics>,
    /// Wall time of the variant.
    pub secs: f64,
}

/// One client of the experiment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientMeta {
    /// Name (as enrolled).
    pub name: String,
    /// SLM architecture.
    pub arch: Arch,
    /// Private examples.
    pub n_private: usize,
    /// Private examples per task label.
    pub label_counts: Vec<usize>,
}

/// Round 0's accuracies as the report counts them: an attacker's (the first
/// `attack.clients`) is left out, as it is from every later round.
pub fn honest_only(initial: &[f32], cfg: &ExperimentConfig) -> Vec<Option<f32>> {
    let all: Vec<Option<f32>> = initial.iter().copied().map(Some).collect();
    without_attackers(&all, cfg)
}

/// Accuracies with the attackers' (the first `attack.clients`) left out.
fn without_attackers(slm: &[Option<f32>], cfg: &ExperimentConfig) -> Vec<Option<f32>> {
    let attackers = cfg.attack.map_or(0, |a| a.clients);
    slm.iter()
        .enumerate()
        .map(|(i, a)| if i < attackers { None } else { *a })
        .collect()
}

/// Everything an experiment measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Metrics {
    /// The config it ran.
    pub config: ExperimentConfig,
    /// The clients.
    pub clients: Vec<ClientMeta>,
    /// Each client's SLM accuracy after local-only training (every variant's round 0).
    pub initial: Vec<f32>,
    /// The untouched LLM's figures.
    pub llm_zero_shot: Option<LlmReport>,
    /// The variants run so far.
    pub variants: Vec<VariantResult>,
}

/// Mean, min and max of the measured values.
pub fn stats(values: &[Option<f32>]) -> Option<(f32, f32, f32)> {
    let v: Vec<f32> = values.iter().flatten().copied().collect();
    if v.is_empty() {
        return None;
    }
    let mean = v.iter().sum::<f32>() / v.len() as f32;
    let min = v.iter().copied().fold(f32::INFINITY, f32::min);
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    Some((mean, min, max))
}

impl Metrics {
    /// The mean accuracy of one architecture's clients in a round.
    /// A round's SLM accuracies without the attackers' (a metrics file written before round 0
    /// left them out still holds their local-only accuracy there).
    fn honest_slm(&self, r: &RoundMetrics) -> Vec<Option<f32>> {
        without_attackers(&r.slm, &self.config)
    }

    fn arch_mean(&self, r: &RoundMetrics, arch: Arch) -> Option<f32> {
        let v: Vec<Option<f32>> = self
            .honest_slm(r)
            .iter()
            .zip(&self.clients)
            .filter(|(_, c)| c.arch == arch)
            .map(|(a, _)| *a)
            .collect();
        stats(&v).map(|s| s.0)
    }

    /// A variant's result, if run.
    pub fn variant(&self, v: Variant) -> Option<&VariantResult> {
        self.variants.iter().find(|r| r.variant == v)
    }

    /// The final-round mean SLM accuracy (a fraction) of variant `v`.
    pub fn final_slm_mean(&self, v: Variant) -> Option<f32> {
        let last = self.variant(v)?.rounds.last()?;
        stats(&self.honest_slm(last)).map(|s| s.0)
    }

    /// The markdown report.
    pub fn markdown(&self) -> String {
        let c = &self.config;
        let pct = |x: Option<f32>| x.map_or("—".to_string(), |x| format!("{:.1}", 100.0 * x));
        let pct64 = |x: Option<f64>| x.map_or("—".to_string(), |x| format!("{:.1}", 100.0 * x));
        // With split adapters, also the task side's own (it classifies, it never writes);
        // before any tuning (a zero-shot report from a split-adapter run) the two are one.
        let ppl = |l: Option<&LlmReport>| match l.map(|l| (l.perplexity, l.perplexity_task)) {
            Some((Some(x), Some(t))) if (x - t).abs() >= 0.005 => {
                format!("{x:.2} (task adapters {t:.2})")
            }
            Some((Some(x), _)) => format!("{x:.2}"),
            _ => "—".to_string(),
        };
        let archs: Vec<Arch> = [Arch::Minilm, Arch::Bag]
            .into_iter()
            .filter(|a| self.clients.iter().any(|c| c.arch == *a))
            .collect();
        let partition = match c.partition {
            crate::config::Partition::Iid => "IID".to_string(),
            crate::config::Partition::Dirichlet(a) => format!("Dirichlet({a})"),
        };
        let (n_eval, split) = c.evaluated();
        let mut s = format!(
            "# {}\n\nTask `{}`, {} clients ({}) x {} private examples, {partition}, {} rounds, \
             {} synthetic samples per label per round, seed {}. SLM accuracy on {} held-out \
             {}examples; LLM task accuracy on the first {} of them; LLM perplexity on {} general \
             texts. Accuracies in %.\n\n",
            c.name,
            c.task.file_stem().and_then(|s| s.to_str()).unwrap_or("?"),
            self.clients.len(),
            archs
                .iter()
                .map(|a| format!(
                    "{} {a}",
                    self.clients.iter().filter(|c| c.arch == *a).count()
                ))
                .collect::<Vec<_>>()
                .join(", "),
            c.per_client,
            c.rounds,
            c.samples_per_label,
            c.seed,
            n_eval,
            split,
            c.llm_test_size,
            c.general_size,
        );
        if !c.client_use_scores {
            s += "CrossLM clients train on every sample with its intended label and weight 1, as \
                  Synthetic's do (`client_use_scores = false`): their scores only steer the \
                  LLM.\n\n";
        }
        if let Some(a) = c.attack {
            s += &format!(
                "Attack: the first {} clients score adversarially (`{:?}`); the SLM columns \
                 are the other, honest clients'.\n\n",
                a.clients, a.kind
            );
        }
        if c.aggregation != crosslm_coordinator::round::Aggregation::WeightedMean {
            s += &format!("Scores combined by `{:?}`.\n\n", c.aggregation);
        }
        if let Some(p) = c.privacy {
            s += &format!(
                "Client-level DP on the scores: epsilon {} at delta {:e} over {} rounds.\n\n",
                p.epsilon, p.delta, p.rounds
            );
        }
        s += "| Variant | SLM mean | SLM min | SLM max |";
        for a in &archs {
            s += &format!(" {a} mean |");
        }
        s += " LLM acc | LLM acc (calibrated) | LLM perplexity |\n|---|---|---|---|";
        for _ in &archs {
            s += "---|";
        }
        s += "---|---|---|\n";
        let zero = self.llm_zero_shot.as_ref();
        let round0 = RoundMetrics {
            round: 0,
            slm: honest_only(&self.initial, &self.config),
            llm: None,
            samples: None,
            mean_quality: None,
            kept: None,
            split: None,
        };
        let mut row = |name: &str, r: &RoundMetrics, llm: Option<&LlmReport>| {
            let st = stats(&self.honest_slm(r));
            s += &format!(
                "| {name} | {} | {} | {} |",
                pct(st.map(|x| x.0)),
                pct(st.map(|x| x.1)),
                pct(st.map(|x| x.2))
            );
            for a in &archs {
                s += &format!(" {} |", pct(self.arch_mean(r, *a)));
            }
            s += &format!(
                " {} | {} | {} |\n",
                pct64(llm.and_then(|l| l.task_accuracy)),
                pct64(llm.and_then(|l| l.task_accuracy_calibrated)),
                ppl(llm)
            );
        };
        row("Local only, before any round", &round0, None);
        if zero.is_some() {
            row("LLM zero-shot (start)", &empty_round(), zero);
        }
        for v in &self.variants {
            let Some(last) = v.rounds.last() else {
                continue;
            };
            let llm = match v.variant {
                Variant::Crosslm => last.llm.as_ref(),
                // The LLM behind these rows is the frozen, zero-shot one.
                Variant::Synthetic | Variant::CrosslmFrozenLlm => zero,
                _ => None,
            };
            row(v.variant.label(), last, llm);
        }
        s += "\nFinal round for every variant (Centralized: one model per architecture on the \
              pooled private data; FedAvg: MiniLM clients only).\n";
        // Per-round detail of every round-based variant.
        for v in &self.variants {
            if v.rounds.len() < 2 {
                continue;
            }
            s += &format!(
                "\n## {} per round\n\n| Round | SLM mean | SLM min | SLM max | samples | mean quality | kept | LLM acc | LLM acc (cal.) | LLM perplexity | LLM tuning s |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
                v.variant.label()
            );
            for r in &v.rounds {
                let st = stats(&self.honest_slm(r));
                let llm = r.llm.as_ref();
                s += &format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    r.round,
                    pct(st.map(|x| x.0)),
                    pct(st.map(|x| x.1)),
                    pct(st.map(|x| x.2)),
                    r.samples.map_or("—".into(), |n| n.to_string()),
                    r.mean_quality.map_or("—".into(), |q| format!("{q:.3}")),
                    r.kept.map_or("—".into(), |n| n.to_string()),
                    pct64(llm.and_then(|l| l.task_accuracy)),
                    pct64(llm.and_then(|l| l.task_accuracy_calibrated)),
                    ppl(llm),
                    llm.filter(|l| l.tuned)
                        .map_or("—".into(), |l| format!("{:.0}", l.tune_secs)),
                );
            }
        }
        for v in &self.variants {
            if !v.rounds.iter().any(|r| r.split.is_some()) {
                continue;
            }
            s += &format!(
                "\n## {}: where each round's time went (s)\n\nThe clients' phases are the slowest \
                 client's; the LLM tunes and is measured while the clients train, on the same \
                 cores. Generation `cached`: the frozen LLM's batch came from the cache.\n\n\
                 | Round | generation | scoring | LLM tuning | LLM evaluation | client training |\n\
                 |---|---|---|---|---|---|\n",
                v.variant.label()
            );
            let secs = |x: Option<f64>| x.map_or("—".to_string(), |x| format!("{x:.1}"));
            for r in &v.rounds {
                let Some(t) = &r.split else { continue };
                s += &format!(
                    "| {} | {} | {} | {} | {} | {} |\n",
                    r.round,
                    if t.generation_cached {
                        "cached".to_string()
                    } else {
                        secs(t.generation)
                    },
                    secs(t.scoring),
                    secs(t.llm_tuning),
                    secs(t.llm_evaluation),
                    secs(t.client_training),
                );
            }
        }
        s += "\n## Wall time per variant\n\n";
        for v in &self.variants {
            s += &format!("- {}: {:.0} s\n", v.variant.label(), v.secs);
        }
        s
    }

    /// The headline: SLM mean accuracy, Standalone vs CrossLM; the LLM's task accuracy,
    /// zero-shot vs tuned; its general perplexity before and after.
    pub fn summary(&self) -> String {
        let final_mean = |v: Variant| self.final_slm_mean(v);
        let mut out = String::new();
        if let (Some(a), Some(b)) = (
            final_mean(Variant::Standalone),
            final_mean(Variant::Crosslm),
        ) {
            out += &format!(
                "SLM mean accuracy: Standalone {:.1}% -> CrossLM {:.1}% ({:+.1} points)\n",
                100.0 * a,
                100.0 * b,
                100.0 * (b - a)
            );
        }
        if let (Some(a), Some(b)) = (final_mean(Variant::Synthetic), final_mean(Variant::Crosslm)) {
            out += &format!(
                "SLM mean accuracy: Synthetic without feedback {:.1}% -> CrossLM {:.1}% ({:+.1} points)\n",
                100.0 * a,
                100.0 * b,
                100.0 * (b - a)
            );
        }
        let tuned = self
            .variant(Variant::Crosslm)
            .and_then(|v| v.rounds.iter().rev().find_map(|r| r.llm.clone()));
        if let (Some(z), Some(t)) = (&self.llm_zero_shot, &tuned) {
            if let (Some(a), Some(b)) = (z.task_accuracy, t.task_accuracy) {
                out += &format!(
                    "LLM task accuracy: zero-shot {:.1}% -> tuned {:.1}% ({:+.1} points)\n",
                    100.0 * a,
                    100.0 * b,
                    100.0 * (b - a)
                );
            }
            if let (Some(a), Some(b)) = (z.task_accuracy_calibrated, t.task_accuracy_calibrated) {
                // Contextual calibration corrects a zero-shot model's label bias; a tuned model
                // has learned the labels, and its "N/A" prior no longer means "no content".
                out += &format!(
                    "LLM task accuracy, calibrated (a zero-shot correction): zero-shot {:.1}% -> tuned {:.1}%\n",
                    100.0 * a,
                    100.0 * b
                );
            }
            if let (Some(a), Some(b)) = (z.perplexity, t.perplexity) {
                out += &format!(
                    "LLM perplexity on general text: {a:.2} -> {b:.2} ({:+.1}%)\n",
                    100.0 * (b - a) / a
                );
                if let Some(c) = t.perplexity_task {
                    out += &format!(
                        "LLM perplexity with the task side's own adapters: {a:.2} -> {c:.2} ({:+.1}%)\n",
                        100.0 * (c - a) / a
                    );
                }
            }
        }
        out
    }

    /// Writes `metrics.json` and `results.md` into `dir`, then `accuracy.png` (a plot that
    /// fails, e.g. for want of a font, is a warning: the numbers are already written).
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(dir.join("metrics.json"), json)?;
        std::fs::write(dir.join("results.md"), self.markdown())?;
        if let Err(e) = crate::plot::plot(self, &dir.join("accuracy.png")) {
            tracing::warn!(error = %e, "no plot");
        }
        Ok(())
    }

    /// Reads `metrics.json` from `dir`.
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        let p = dir.join("metrics.json");
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        let mut v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
        fill_legacy(&mut v);
        serde_json::from_value(v).with_context(|| format!("parsing {}", p.display()))
    }
}

/// Settings that a `metrics.json` written before they existed ran with (their defaults
/// since differ), so that resuming sees those runs as the different runs they were.
fn fill_legacy(v: &mut serde_json::Value) {
    let Some(cfg) = v.get_mut("config").and_then(|c| c.as_object_mut()) else {
        return;
    };
    for key in ["client_relative_weights", "prior_correction"] {
        cfg.entry(key).or_insert(serde_json::Value::Bool(false));
    }
    if let Some(t) = cfg.get_mut("tuning").and_then(|t| t.as_object_mut()) {
        // The generation side trained in every epoch, without rehearsal.
        let epochs = t.get("epochs").cloned().unwrap_or(serde_json::json!(3));
        t.entry("generation_epochs").or_insert(epochs);
        t.entry("rehearsal").or_insert(serde_json::json!(0.0));
        // Options that measured no gain moved under [tuning.experimental].
        for key in ["generation_skip_best", "adapters", "preference"] {
            if let Some(val) = t.remove(key) {
                let exp = t
                    .entry("experimental")
                    .or_insert_with(|| serde_json::json!({}));
                if let Some(exp) = exp.as_object_mut() {
                    exp.entry(key).or_insert(val);
                }
            }
        }
    }
}

fn empty_round() -> RoundMetrics {
    RoundMetrics {
        round: 0,
        slm: vec![],
        llm: None,
        samples: None,
        mean_quality: None,
        kept: None,
        split: None,
    }
}

/// A small experiment's metrics, for tests.
#[cfg(test)]
pub(crate) fn test_metrics() -> Metrics {
    tests::metrics()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every committed run's metrics still read (`report` and `compare` re-render them), also
    /// those written before a setting moved or appeared.
    #[test]
    fn committed_metrics_parse() {
        let results = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../results");
        let mut dirs = vec![results];
        let mut read = 0;
        while let Some(d) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.file_name().is_some_and(|n| n == "metrics.json") {
                    let dir = p.parent().unwrap();
                    Metrics::read(dir).unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()));
                    read += 1;
                }
            }
        }
        assert!(read > 50, "only {read} metrics files under results/");
    }

    pub(super) fn metrics() -> Metrics {
        let config: ExperimentConfig = toml::from_str(
            r#"
name = "t"
task = "mr.toml"
data = "d"
clients = [{ arch = "minilm", count = 1 }, { arch = "bag", count = 1 }]
per_client = 8
partition = { dirichlet = 0.5 }
rounds = 2
samples_per_label = 4
test_size = 10
llm_test_size = 5
variants = ["standalone", "crosslm"]
"#,
        )
        .unwrap();
        let llm = |round, acc, ppl| {
            let mut r = LlmReport::new(round);
            r.task_accuracy = Some(acc);
            r.task_accuracy_calibrated = Some(acc + 0.05);
            r.perplexity = Some(ppl);
            r.tuned = round > 0;
            r
        };
        let round = |round, a: f32, b: f32, l: Option<LlmReport>| RoundMetrics {
            round,
            slm: vec![Some(a), Some(b)],
            llm: l,
            samples: Some(8),
            mean_quality: Some(0.6),
            kept: Some(5),
            split: (round > 0).then(|| RoundSplit {
                generation: (round > 1).then_some(30.0),
                generation_cached: round == 1,
                scoring: Some(4.0),
                llm_tuning: Some(50.0),
                llm_evaluation: Some(12.0),
                client_training: Some(20.0),
            }),
        };
        Metrics {
            config,
            clients: vec![
                ClientMeta {
                    name: "client-0".into(),
                    arch: Arch::Minilm,
                    n_private: 8,
                    label_counts: vec![3, 5],
                },
                ClientMeta {
                    name: "client-1".into(),
                    arch: Arch::Bag,
                    n_private: 8,
                    label_counts: vec![6, 2],
                },
            ],
            initial: vec![0.6, 0.5],
            llm_zero_shot: Some(llm(0, 0.5, 20.0)),
            variants: vec![
                VariantResult {
                    variant: Variant::Standalone,
                    rounds: vec![round(0, 0.6, 0.5, None), round(2, 0.62, 0.5, None)],
                    secs: 1.0,
                },
                VariantResult {
                    variant: Variant::Crosslm,
                    rounds: vec![
                        round(0, 0.6, 0.5, Some(llm(0, 0.5, 20.0))),
                        round(1, 0.66, 0.56, Some(llm(1, 0.6, 20.2))),
                        round(2, 0.7, 0.6, Some(llm(2, 0.7, 20.4))),
                    ],
                    secs: 2.0,
                },
            ],
        }
    }

    #[test]
    fn table_summary_and_plot() {
        let m = metrics();
        let md = m.markdown();
        assert!(
            md.contains("| CrossLM | 65.0 | 60.0 | 70.0 | 70.0 | 60.0 | 70.0 | 75.0 | 20.40 |"),
            "{md}"
        );
        assert!(md.contains("| Standalone | 56.0 | 50.0 | 62.0 |"), "{md}");
        assert!(md.contains("Dirichlet(0.5)"));
        assert!(!md.contains("client_use_scores"), "{md}");
        // Each round's phases, the cached frozen batch marked as such.
        assert!(md.contains("CrossLM: where each round's time went"), "{md}");
        assert!(
            md.contains("| 1 | cached | 4.0 | 50.0 | 12.0 | 20.0 |"),
            "{md}"
        );
        assert!(
            md.contains("| 2 | 30.0 | 4.0 | 50.0 | 12.0 | 20.0 |"),
            "{md}"
        );
        // Split adapters: the task side's perplexity beside the writing side's, once tuned.
        let mut split = metrics();
        for r in split.llm_zero_shot.iter_mut().chain(
            split.variants[1]
                .rounds
                .iter_mut()
                .filter_map(|r| r.llm.as_mut()),
        ) {
            r.perplexity_task = Some(20.0 + r.round as f64);
        }
        let md_split = split.markdown();
        assert!(
            md_split.contains("| 20.40 (task adapters 22.00) |"),
            "{md_split}"
        );
        assert!(md_split.contains("| 20.00 |"), "{md_split}");
        assert!(!md_split.contains("(task adapters 20.00)"), "{md_split}");
        let mut llm_only = metrics();
        llm_only.config.client_use_scores = false;
        assert!(
            llm_only
                .markdown()
                .contains("their scores only steer the LLM")
        );
        let s = m.summary();
        assert!(
            s.contains("Standalone 56.0% -> CrossLM 65.0% (+9.0 points)"),
            "{s}"
        );
        assert!(s.contains("zero-shot 50.0% -> tuned 70.0%"), "{s}");
        assert!(s.contains("20.00 -> 20.40 (+2.0%)"), "{s}");
        let dir = tempfile::tempdir().unwrap();
        m.write(dir.path()).unwrap();
        let back = Metrics::read(dir.path()).unwrap();
        assert_eq!(back.markdown(), md);
        let json = |c: &ExperimentConfig| serde_json::to_value(c).unwrap();
        assert_eq!(
            json(&back.config),
            json(&m.config),
            "settings written are settings read"
        );
        let png = std::fs::read(dir.path().join("accuracy.png")).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG plot is written");
        assert!(png.len() > 10_000);
    }

    /// A `metrics.json` from before a setting existed reads back with the value it ran with.
    #[test]
    fn old_metrics_read_with_the_settings_they_ran_with() {
        let m = metrics();
        let mut v = serde_json::to_value(&m).unwrap();
        let cfg = v["config"].as_object_mut().unwrap();
        cfg.remove("client_relative_weights");
        cfg.remove("prior_correction");
        let t = cfg["tuning"].as_object_mut().unwrap();
        t.remove("generation_epochs");
        t.remove("rehearsal");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("metrics.json"), v.to_string()).unwrap();
        let back = Metrics::read(dir.path()).unwrap();
        assert!(!back.config.client_relative_weights && !back.config.prior_correction);
        assert_eq!(back.config.tuning.generation_epochs, m.config.tuning.epochs);
        assert_eq!(back.config.tuning.rehearsal, 0.0);
        assert_ne!(
            serde_json::to_value(&back.config).unwrap(),
            serde_json::to_value(&m.config).unwrap()
        );
    }

    #[test]
    fn stats_skip_missing_values() {
        assert_eq!(stats(&[None, None]), None);
        let (mean, min, max) = stats(&[Some(0.5), None, Some(0.7)]).unwrap();
        assert!((mean - 0.6).abs() < 1e-6 && min == 0.5 && max == 0.7);
    }

    /// An attacker's local-only accuracy is not an honest client's: round 0 leaves it out.
    #[test]
    fn round_zero_leaves_the_attackers_out() {
        let mut m = metrics();
        assert_eq!(
            honest_only(&[0.5, 0.7], &m.config),
            vec![Some(0.5), Some(0.7)]
        );
        m.config.attack = Some(crate::attack::AttackConfig {
            kind: crate::attack::AttackKind::Invert,
            clients: 1,
        });
        assert_eq!(honest_only(&[0.5, 0.7], &m.config), vec![None, Some(0.7)]);
    }
}
