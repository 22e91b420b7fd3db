//! Tests of the LLM's tuning on the real model.

use crosslm_sdk::protocol::{AggregatedScore, SyntheticSample};

use super::*;
use crate::generator::{Generator, LlmGenerator};
use crate::llm::Llm;
use crate::llm::test_assets::tiny_llm;
use crate::llm::train::{LoraConfig, TrainExample};
use crate::task::TaskSpec;

fn spec() -> TaskSpec {
    let p = crosslm_sdk::data::workspace_root().join("examples/tasks/mr.toml");
    TaskSpec::from_toml_file(p).unwrap()
}

/// Three samples: two clear the 0.5 threshold.
fn round() -> (Vec<SyntheticSample>, Vec<AggregatedScore>) {
    let texts = [
        "A dull, lifeless film with no reason to exist.",
        "Maybe fine.",
        "A warm, funny and moving picture.",
    ];
    let samples = texts
        .iter()
        .enumerate()
        .map(|(i, t)| SyntheticSample {
            id: i as u64,
            text: t.to_string(),
            label: if i == 2 { 1 } else { 0 },
        })
        .collect();
    let scores = vec![
        AggregatedScore {
            id: 0,
            quality: 0.9,
            soft: vec![0.9, 0.1],
        },
        AggregatedScore {
            id: 1,
            quality: 0.3,
            soft: vec![0.3, 0.7],
        },
        AggregatedScore {
            id: 2,
            quality: 0.995,
            soft: vec![0.005, 0.995],
        },
    ];
    (samples, scores)
}

fn quick() -> TuningConfig {
    TuningConfig {
        // One batch holds the whole round: first and last losses are comparable.
        epochs: 4,
        generation_epochs: 4,
        batch_size: 8,
        lora: LoraConfig {
            learning_rate: 5e-3,
            ..TuningConfig::default().lora
        },
        ..TuningConfig::default()
    }
}

/// A chat template stand-in: selection needs no model.
fn chat(p: &str) -> String {
    format!("<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n")
}

#[test]
fn feedback_gives_weighted_generation_and_task_examples() {
    let (samples, scores) = round();
    let fb = feedback_examples(&chat, &spec(), &quick(), &samples, &scores);
    assert_eq!(fb.used, 2, "the 0.3-quality sample is below the threshold");
    // Best first: sample 2, then sample 0; one generation and one task example each.
    let (g, t) = (&fb.generation, &fb.task);
    assert_eq!((g.len(), t.len()), (2, 2));
    assert_eq!(g[0].completion, "A warm, funny and moving picture.");
    let positive = &spec().labels[1].prompts;
    assert!(
        positive.iter().any(|p| g[0].prompt.contains(p)),
        "{}",
        g[0].prompt
    );
    assert_eq!(g[0].weight, 0.995);
    assert_eq!(t[0].completion, "Positive");
    assert!(t[0].prompt.contains("A warm, funny"));
    assert_eq!(t[1].completion, "Negative");
    assert!((t[1].weight - 0.9).abs() < 1e-6);

    // Soft targets: one task example per label above 1%, weight = quality x soft label.
    let soft = TuningConfig {
        task_targets: TaskTargets::Soft,
        ..quick()
    };
    let fb = feedback_examples(&chat, &spec(), &soft, &samples, &scores);
    assert_eq!((fb.used, fb.generation.len(), fb.task.len()), (2, 2, 3));
    let neg: Vec<_> = fb
        .task
        .iter()
        .filter(|e| e.completion == "Negative")
        .collect();
    assert_eq!(neg.len(), 1);
    assert!((neg[0].weight - 0.9 * 0.9).abs() < 1e-6);

    // Half of each label's best left out of the generation side (the writing) only: of
    // two positives the 0.995 one, of one negative none.
    let capped = TuningConfig {
        experimental: ExperimentalTuning {
            generation_skip_best: 0.5,
            ..ExperimentalTuning::default()
        },
        ..quick()
    };
    let (mut s2, mut q2) = (samples.clone(), scores.clone());
    s2.push(SyntheticSample {
        id: 5,
        text: "Pleasant enough.".into(),
        label: 1,
    });
    q2.push(AggregatedScore {
        id: 5,
        quality: 0.8,
        soft: vec![0.2, 0.8],
    });
    let fb = feedback_examples(&chat, &spec(), &capped, &s2, &q2);
    assert_eq!((fb.used, fb.generation.len(), fb.task.len()), (3, 2, 3));
    let written: Vec<(&str, f32)> = fb
        .generation
        .iter()
        .map(|e| (e.completion.as_str(), e.weight))
        .collect();
    assert_eq!(
        written,
        vec![
            ("A dull, lifeless film with no reason to exist.", 0.9),
            ("Pleasant enough.", 0.8)
        ]
    );
    assert!(fb.task.iter().any(|e| e.prompt.contains("A warm, funny")));

    let only_task = TuningConfig {
        generation_side: false,
        ..quick()
    };
    let fb = feedback_examples(&chat, &spec(), &only_task, &samples, &scores);
    assert_eq!((fb.used, fb.generation.len(), fb.task.len()), (2, 0, 2));

    // Two more good negative samples: at most twice the scarcest label (2 negatives, the
    // best), and each label the same total weight.
    let (mut samples, mut scores) = (samples, scores);
    for (id, text, q) in [
        (3, "Tedious beyond words.", 0.95),
        (4, "Flat and dull.", 0.6),
    ] {
        samples.push(SyntheticSample {
            id,
            text: text.into(),
            label: 0,
        });
        scores.push(AggregatedScore {
            id,
            quality: q,
            soft: vec![q, 1.0 - q],
        });
    }
    let fb = feedback_examples(&chat, &spec(), &only_task, &samples, &scores);
    let ex = fb.task;
    assert_eq!((fb.used, ex.len()), (3, 3));
    assert!(!ex.iter().any(|e| e.prompt.contains("Flat and dull.")));
    let total = |c: &str| -> f32 {
        ex.iter()
            .filter(|e| e.completion == c)
            .map(|e| e.weight)
            .sum()
    };
    // Negatives: (0.95 + 0.9) x 0.75; positive: 0.995 x 1.5.
    assert!((total("Negative") - 1.85 * 0.75).abs() < 1e-5);
    assert!((total("Positive") - 0.995 * 1.5).abs() < 1e-5);
}

/// Round 1 of [`round`] tuned under `cfg` with fresh adapters.
fn tune_round(llm: &mut Llm, cfg: &TuningConfig, rehearsal: &[String]) -> LlmReport {
    let mut trainers = Trainers::new(llm, cfg);
    let (samples, scores) = round();
    tune(
        llm,
        &mut trainers,
        &spec(),
        cfg,
        1,
        &samples,
        &scores,
        rehearsal,
    )
    .unwrap()
}

#[test]
fn preference_pairs_put_the_best_against_the_worst() {
    let (samples, scores) = round();
    let cfg = PreferenceConfig {
        enabled: true,
        ..PreferenceConfig::default()
    };
    // Same label: the negatives 0 (0.9) and 1 (0.3); the lone positive has no partner.
    let pairs = preference_pairs(&chat, &spec(), &cfg, &samples, &scores);
    assert_eq!(pairs.len(), 1, "{pairs:?}");
    assert_eq!(pairs[0].chosen, samples[0].text);
    assert_eq!(pairs[0].rejected, samples[1].text);
    assert!((pairs[0].weight - 0.6).abs() < 1e-6);
    let negative = &spec().labels[0].prompts;
    assert!(negative.iter().any(|p| pairs[0].prompt.contains(p)));
    // A gap below the margin is no pair.
    let strict = PreferenceConfig {
        margin: 0.7,
        ..cfg.clone()
    };
    assert!(preference_pairs(&chat, &spec(), &strict, &samples, &scores).is_empty());
    // All labels: under each label's prompt, its clearest sample against the other
    // label's clearest one.
    let all = PreferenceConfig {
        source: PairSource::AllLabels,
        ..cfg.clone()
    };
    let pairs = preference_pairs(&chat, &spec(), &all, &samples, &scores);
    let texts: Vec<(&str, &str)> = pairs
        .iter()
        .map(|p| (p.chosen.as_str(), p.rejected.as_str()))
        .collect();
    assert_eq!(
        texts,
        [
            (samples[0].text.as_str(), samples[2].text.as_str()),
            (samples[2].text.as_str(), samples[0].text.as_str()),
        ]
    );
    let capped = PreferenceConfig {
        max_pairs_per_label: 0,
        ..all
    };
    assert!(preference_pairs(&chat, &spec(), &capped, &samples, &scores).is_empty());
}

#[test]
fn tuning_with_preference_pairs_trains_on_them() {
    let mut llm = tiny_llm().unwrap();
    let cfg = TuningConfig {
        epochs: 3,
        generation_epochs: 1,
        experimental: ExperimentalTuning {
            preference: PreferenceConfig {
                enabled: true,
                epochs: 2,
                ..PreferenceConfig::default()
            },
            ..ExperimentalTuning::default()
        },
        ..quick()
    };
    let r = tune_round(&mut llm, &cfg, &[]);
    // Epoch 1: the 4 examples in one batch and the pair; epoch 2: the 2 task-side examples
    // and the pair; epoch 3: the task side only.
    assert_eq!((r.pairs, r.examples, r.steps), (1, 4, 5), "{r:?}");
    assert!(r.tuned);
}

#[test]
fn generator_tunes_saves_and_does_not_relearn_a_round_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("llm");
    let (samples, scores) = round();
    let mut g = LlmGenerator::new(tiny_llm().unwrap(), spec(), 1)
        .with_tuning(quick(), state.clone())
        .unwrap();
    let r1 = g.feedback(1, &samples, &scores).unwrap().unwrap();
    assert!(r1.tuned && r1.examples == 4, "{r1:?}");
    let (first, last) = (r1.loss_first.unwrap(), r1.loss_last.unwrap());
    assert!(last < first, "loss {first} -> {last}");
    assert!(state.join("adapters-1.lora").is_file());
    assert!(g.llm_mut().lora.is_some(), "the tuned adapters are in use");

    // A restart: the adapters are loaded, round 1 is not learned again.
    let mut g = LlmGenerator::new(tiny_llm().unwrap(), spec(), 1)
        .with_tuning(quick(), state.clone())
        .unwrap();
    assert!(g.llm_mut().lora.is_some());
    let again = g.feedback(1, &samples, &scores).unwrap().unwrap();
    assert!(again.tuned && again.examples == 0, "{again:?}");
    let r2 = g.feedback(2, &samples, &scores).unwrap().unwrap();
    assert_eq!(r2.examples, 4);
    assert!(state.join("adapters-2.lora").is_file());
    assert!(!state.join("adapters-1.lora").exists());

    // Disabled: the model stays frozen and nothing is reported.
    let mut frozen = LlmGenerator::new(tiny_llm().unwrap(), spec(), 1)
        .with_tuning(
            TuningConfig {
                enabled: false,
                ..quick()
            },
            dir.path().join("frozen"),
        )
        .unwrap();
    assert!(frozen.feedback(1, &samples, &scores).unwrap().is_none());
    assert!(frozen.llm_mut().lora.is_none());
}

/// Split adapters: the task side trains its own, which classify; the adapters the LLM
/// writes with do not move when only the task side trains (shared ones do).
#[test]
fn split_adapters_keep_the_task_side_out_of_the_writing_adapters() {
    let general = ["The city council met on Tuesday to discuss the new budget.".to_string()];
    let texts = ["A warm, funny and moving picture.".to_string()];
    let base = tiny_llm().unwrap();
    let (base_ppl, base_probs) = (
        base.perplexity(&general).unwrap(),
        base.classify(&spec(), &texts).unwrap(),
    );
    let task_only = TuningConfig {
        generation_side: false,
        experimental: ExperimentalTuning {
            adapters: AdapterLayout::Split,
            ..ExperimentalTuning::default()
        },
        ..quick()
    };
    let mut llm = tiny_llm().unwrap();
    let r = tune_round(&mut llm, &task_only, &[]);
    assert_eq!((r.examples, r.steps), (2, 4), "{r:?}");
    assert!(llm.lora.is_some() && llm.task_lora.is_some());
    assert_eq!(llm.perplexity(&general).unwrap(), base_ppl);
    let task_ppl = llm
        .perplexity_with(llm.task_lora.as_ref(), &general)
        .unwrap();
    assert_ne!(task_ppl, base_ppl);
    let probs = llm.classify(&spec(), &texts).unwrap();
    assert!(
        (probs[0][1] - base_probs[0][1]).abs() > 1e-4,
        "{probs:?} {base_probs:?}"
    );

    let mut shared = tiny_llm().unwrap();
    tune_round(
        &mut shared,
        &TuningConfig {
            experimental: ExperimentalTuning {
                adapters: AdapterLayout::Shared,
                ..ExperimentalTuning::default()
            },
            ..task_only.clone()
        },
        &[],
    );
    assert!(shared.task_lora.is_none());
    assert_ne!(shared.perplexity(&general).unwrap(), base_ppl);

    // Both sides: each side's examples batch apart, so twice the steps of shared adapters.
    let both = TuningConfig {
        experimental: ExperimentalTuning {
            adapters: AdapterLayout::Split,
            ..ExperimentalTuning::default()
        },
        ..quick()
    };
    let r = tune_round(&mut tiny_llm().unwrap(), &both, &[]);
    assert_eq!((r.examples, r.steps), (4, 8), "{r:?}");
}

#[test]
fn split_adapters_are_saved_restored_and_must_match_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("llm");
    let (samples, scores) = round();
    let split = TuningConfig {
        experimental: ExperimentalTuning {
            adapters: AdapterLayout::Split,
            ..ExperimentalTuning::default()
        },
        ..quick()
    };
    let texts = ["A warm, funny and moving picture.".to_string()];
    let general = vec!["The city council met on Tuesday to discuss the new budget.".into()];
    let eval = Evaluator::from_parts(vec![(texts[0].clone(), 1)], general);
    let mut g = LlmGenerator::new(tiny_llm().unwrap(), spec(), 1)
        .with_evaluator(eval)
        .with_tuning(split.clone(), state.clone())
        .unwrap();
    assert!(g.llm_mut().task_lora.is_some(), "in place from the start");
    let r = g.feedback(1, &samples, &scores).unwrap().unwrap();
    // Both adapter sets are measured on the general text.
    let (ppl, ppl_task) = (r.perplexity.unwrap(), r.perplexity_task.unwrap());
    assert!(
        ppl.is_finite() && ppl_task.is_finite() && ppl != ppl_task,
        "{r:?}"
    );
    let probs = g.llm_mut().classify(&spec(), &texts).unwrap();
    assert!(state.join("adapters-1.lora").is_file());
    assert!(state.join("task-adapters-1.lora").is_file());

    let mut g = LlmGenerator::new(tiny_llm().unwrap(), spec(), 1)
        .with_tuning(split.clone(), state.clone())
        .unwrap();
    assert_eq!(g.llm_mut().classify(&spec(), &texts).unwrap(), probs);
    g.feedback(2, &samples, &scores).unwrap().unwrap();
    assert!(state.join("task-adapters-2.lora").is_file());
    assert!(!state.join("task-adapters-1.lora").exists());

    // The state of split adapters under a shared config, and the other way round.
    let err = LlmGenerator::new(tiny_llm().unwrap(), spec(), 1)
        .with_tuning(quick(), state.clone())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("do not match"), "{err}");
    std::fs::remove_file(state.join("task-adapters-2.lora")).unwrap();
    assert!(
        LlmGenerator::new(tiny_llm().unwrap(), spec(), 1)
            .with_tuning(split, state)
            .is_err()
    );
}

#[test]
fn rehearsal_draws_general_texts_weighted_like_the_generation_side() {
    let generation: Vec<TrainExample> = [0.5f32, 1.0]
        .iter()
        .map(|&weight| TrainExample {
            prompt: "write".into(),
            completion: "a review".into(),
            weight,
        })
        .collect();
    let pool: Vec<String> = (0..10).map(|i| format!("general text {i}")).collect();
    let r = rehearsal_examples(&pool, &generation, 1.5, 3);
    assert_eq!(r.len(), 3);
    assert!(r.iter().all(|e| e.prompt.is_empty() && e.weight == 0.75));
    let texts: Vec<&str> = r.iter().map(|e| e.completion.as_str()).collect();
    assert!(texts.iter().all(|t| pool.iter().any(|p| p == t)));
    let distinct: std::collections::HashSet<&str> = texts.iter().copied().collect();
    assert_eq!(distinct.len(), 3, "drawn without replacement");
    let other: Vec<String> = rehearsal_examples(&pool, &generation, 1.5, 4)
        .into_iter()
        .map(|e| e.completion)
        .collect();
    assert_ne!(texts, other, "another round, another draw");
    assert!(rehearsal_examples(&pool, &generation, 0.0, 3).is_empty());
    assert!(rehearsal_examples(&[], &generation, 1.0, 3).is_empty());
    assert_eq!(rehearsal_examples(&pool, &generation, 100.0, 3).len(), 10);
}

/// The generation side and its rehearsal train only in the first `generation_epochs`;
/// rehearsal texts come after `rehearsal_skip`.
#[test]
fn generation_side_and_rehearsal_train_in_the_first_epochs_only() {
    let dir = tempfile::tempdir().unwrap();
    let general = dir.path().join("general.txt");
    let lines: Vec<String> = (0..6)
        .map(|i| format!("General text number {i} is long enough to be kept here."))
        .collect();
    std::fs::write(&general, lines.join("\n")).unwrap();
    let cfg = TuningConfig {
        epochs: 2,
        generation_epochs: 1,
        batch_size: 1,
        rehearsal: 1.0,
        rehearsal_text: Some(general.clone()),
        rehearsal_skip: 4,
        ..quick()
    };
    let pool = load_rehearsal(&cfg).unwrap();
    assert_eq!(pool, lines[4..].to_vec(), "the first 4 are skipped");
    let mut llm = tiny_llm().unwrap();
    let r = tune_round(&mut llm, &cfg, &pool);
    // 2 generation + 2 rehearsal + 2 task examples; epoch 1 all six, epoch 2 the task two.
    assert_eq!((r.examples, r.steps), (6, 8), "{r:?}");
    let off = TuningConfig {
        rehearsal: 0.0,
        ..cfg.clone()
    };
    assert!(load_rehearsal(&off).unwrap().is_empty());
    let all_skipped = TuningConfig {
        rehearsal_skip: 6,
        ..cfg
    };
    assert!(load_rehearsal(&all_skipped).is_err());
}

#[test]
fn general_text_takes_the_last_tab_field() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("g.txt");
    std::fs::write(
        &p,
        "1_1\t0.4\tThe city plans a holiday celebration in the square at noon.\nshort\n\
         A plain line without tabs that is long enough to be used here.\n",
    )
    .unwrap();
    let g = load_general(&p, 10).unwrap();
    assert_eq!(
        g,
        vec![
            "The city plans a holiday celebration in the square at noon.".to_string(),
            "A plain line without tabs that is long enough to be used here.".to_string()
        ]
    );
    assert_eq!(load_general(&p, 1).unwrap().len(), 1);
    std::fs::write(&p, "tiny\n").unwrap();
    assert!(load_general(&p, 10).is_err());
}

/// On the real model: the evaluation figures are in range and the NYT text's perplexity
/// is that of fluent English for a small model.
#[test]
fn real_model_evaluation() {
    let llm = crate::llm::Llm::load(
        crate::llm::test_assets::smollm2_path(),
        &burn::tensor::Device::flex(),
    )
    .unwrap();
    let assets = crate::llm::assets_dir();
    let spec = spec();
    let e = Evaluator::load(
        &EvalConfig {
            test: Some(assets.join("data/mr/movieReviewSnippets_GroundTruth.txt")),
            test_limit: 16,
            general: Some(assets.join("data/mr/nytEditorialSnippets_GroundTruth.txt")),
            general_limit: 8,
        },
        &spec,
    )
    .unwrap();
    let r = e.baseline(&llm, &spec).unwrap();
    assert_eq!(r.round, 0);
    let acc = r.task_accuracy.unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert!((0.0..=1.0).contains(&r.task_accuracy_calibrated.unwrap()));
    let ppl = r.perplexity.unwrap();
    assert!((3.0..200.0).contains(&ppl), "perplexity {ppl}");
}
