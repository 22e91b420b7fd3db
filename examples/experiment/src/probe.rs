//! `probe-llm`: what the LLM's tuning learns from one round, measured on the validation split
//! (pool examples no client holds), never on the test split. The round is the frozen LLM's
//! round-1 batch, scored by the clients' local-only SLMs and aggregated as the daemon does;
//! the LLM is tuned on it epoch by epoch and measured after each. This is the evidence behind
//! the `[tuning]` defaults.

use std::fmt::Write as _;

use anyhow::Context;
use crosslm_coordinator::llm::Llm;
use crosslm_coordinator::round::aggregate::{Aggregation, correct_prior, score_sample};
use crosslm_coordinator::tuning::{
    Evaluator, LlmReport, TaskTargets, Trainers, TuningConfig, load_rehearsal, tune,
};
use crosslm_sdk::protocol::{AggregatedScore, SyntheticSample};
use crosslm_sdk::slm::{Backend, load_checkpoint};

use crate::run::{CachedSample, Ctx};

/// What to probe.
pub struct Probe {
    /// Passes over the round, measured after each.
    pub epochs: usize,
    /// Train the generation side too.
    pub generation_side: bool,
    /// Task-side targets.
    pub task_targets: TaskTargets,
    /// LoRA learning rate (default: the config's).
    pub learning_rate: Option<f64>,
}

/// Runs the probe and returns a markdown table.
pub fn probe_llm(ctx: &Ctx, p: &Probe) -> anyhow::Result<String> {
    let cfg = &ctx.cfg;
    let path = ctx
        .cache
        .join(format!("frozen-round1-n{}.json", cfg.samples_per_label));
    let batch: Vec<CachedSample> = serde_json::from_slice(
        &std::fs::read(&path)
            .with_context(|| format!("{} (run a Synthetic variant first)", path.display()))?,
    )?;
    let samples: Vec<SyntheticSample> = batch
        .into_iter()
        .enumerate()
        .map(|(i, s)| SyntheticSample {
            id: i as u64,
            text: s.text,
            label: s.label,
        })
        .collect();
    // The round's scores: every client's local-only SLM, aggregated by private data size.
    let texts: Vec<&str> = samples.iter().map(|s| s.text.as_str()).collect();
    let mut probs = Vec::new();
    for (i, c) in ctx.clients.iter().enumerate() {
        let slm = load_checkpoint(&ctx.initial_ckpt(i), Backend::Flex).with_context(|| {
            format!("{}: run the experiment's local-only training first", c.name)
        })?;
        let rows = slm.predict_proba(&texts)?;
        let rows = if cfg.prior_correction {
            let refs: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
            correct_prior(&refs, &samples)
        } else {
            rows
        };
        probs.push((c.private.len() as f64, rows));
    }
    let scores: Vec<AggregatedScore> = samples
        .iter()
        .enumerate()
        .map(|(j, s)| {
            let votes: Vec<(f64, &[f32])> =
                probs.iter().map(|(w, p)| (*w, p[j].as_slice())).collect();
            score_sample(Aggregation::WeightedMean, s, &votes)
        })
        .collect();
    let mean_q = scores.iter().map(|s| s.quality).sum::<f32>() / scores.len().max(1) as f32;

    let llm_path = ctx.assets.join(&cfg.llm);
    let mut llm = Llm::load(&llm_path, &ctx.placement.device())
        .with_context(|| format!("loading {}", llm_path.display()))?;
    let eval = Evaluator::from_parts(ctx.validation.clone(), ctx.general.clone());
    let mut tcfg = TuningConfig {
        epochs: 1,
        generation_side: p.generation_side,
        task_targets: p.task_targets,
        ..crate::run::resolve_tuning(cfg, &ctx.assets)
    };
    if let Some(lr) = p.learning_rate {
        tcfg.lora.learning_rate = lr;
    }
    let mut out = String::new();
    writeln!(
        out,
        "probe-llm {}: {} samples (mean quality {mean_q:.3}), validation {} sentences, \
         generation side {} ({} epochs, rehearsal {}), task targets {:?}, lr {}\n",
        cfg.name,
        samples.len(),
        ctx.validation.len(),
        p.generation_side,
        cfg.tuning.generation_epochs,
        tcfg.rehearsal,
        p.task_targets,
        tcfg.lora.learning_rate
    )?;
    writeln!(
        out,
        "| epoch | samples | loss first -> last | val. accuracy | calibrated | perplexity | secs |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|")?;
    let row = |out: &mut String, e: usize, r: &LlmReport| -> std::fmt::Result {
        let pct = |x: Option<f64>| x.map_or("-".into(), |v| format!("{:.1}", v * 100.0));
        writeln!(
            out,
            "| {e} | {} | {} | {} | {} | {} | {:.0} |",
            r.samples_used,
            match (r.loss_first, r.loss_last) {
                (Some(a), Some(b)) => format!("{a:.3} -> {b:.3}"),
                _ => "-".into(),
            },
            pct(r.task_accuracy),
            pct(r.task_accuracy_calibrated),
            r.perplexity.map_or("-".into(), |v| format!("{v:.2}")),
            r.tune_secs + r.eval_secs
        )
    };
    let r0 = eval.baseline(&llm, &ctx.spec)?;
    row(&mut out, 0, &r0)?;
    eprintln!("{out}");
    let rehearsal = load_rehearsal(&tcfg)?;
    let mut trainers = Trainers::new(&llm, &tcfg);
    for e in 1..=p.epochs {
        // One call per epoch: the generation side only in the first `generation_epochs`.
        let epoch_cfg = TuningConfig {
            generation_epochs: usize::from(e <= cfg.tuning.generation_epochs),
            ..tcfg.clone()
        };
        let mut r = tune(
            &mut llm,
            &mut trainers,
            &ctx.spec,
            &epoch_cfg,
            e as u64,
            &samples,
            &scores,
            &rehearsal,
        )?;
        eval.evaluate(&llm, &ctx.spec, &mut r)?;
        row(&mut out, e, &r)?;
        eprintln!("{}", out.lines().last().unwrap_or_default());
    }
    Ok(out)
}
