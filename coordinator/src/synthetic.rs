//! What turns an LLM's answers into a round's synthetic samples, whoever runs the LLM (the
//! in-process decoder or a serving engine): the per-label prompting schedule, cleaning, the
//! task's length filter and deduplication across the whole set.

use std::collections::HashSet;

use crate::Result;
use crate::task::TaskSpec;

/// One synthetic example and the label it was generated for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LabeledText {
    /// The generated text, stripped.
    pub text: String,
    /// Index into the task's labels.
    pub label: usize,
}

/// Up to `n_per_label` distinct texts per label. `write(prompts, seed)` answers each prompt
/// (a user message; prompt `i` sampled with seed `seed + i`), at most `batch` at a time; the
/// label's prompts are cycled, answers cleaned, kept within the task's
/// `min_chars..=max_chars` and deduplicated across the whole set. A label is given up after
/// `4 * n_per_label` attempts, so the result can be short. The seeds depend only on
/// `seed` and the answers, so the same writer gives the same samples.
pub fn label_conditioned(
    task: &TaskSpec,
    n_per_label: usize,
    batch: usize,
    seed: u64,
    mut write: impl FnMut(&[String], u64) -> Result<Vec<String>>,
) -> Result<Vec<LabeledText>> {
    let g = &task.generation;
    let batch = batch.max(1);
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut seed = seed;
    for (label, spec) in task.labels.iter().enumerate() {
        let mut got = 0;
        let mut attempts = 0;
        while got < n_per_label && attempts < 4 * n_per_label {
            let want = (n_per_label - got).min(batch);
            let prompts: Vec<String> = (0..want)
                .map(|k| spec.prompts[(attempts + k) % spec.prompts.len()].clone())
                .collect();
            attempts += want;
            let answers = write(&prompts, seed)?;
            seed = seed.wrapping_add(want as u64);
            for text in answers {
                let text = clean_generated(&text);
                let n = text.chars().count();
                if n < g.min_chars || n > g.max_chars || got >= n_per_label {
                    continue;
                }
                if seen.insert(dedup_key(&text)) {
                    out.push(LabeledText { text, label });
                    got += 1;
                }
            }
        }
    }
    Ok(out)
}

/// Strips whitespace, a lead-in line such as "Here is a review:", and wrapping quotes.
pub fn clean_generated(text: &str) -> String {
    let mut t = text.trim();
    if let Some((first, rest)) = t.split_once('\n') {
        let f = first.trim().to_lowercase();
        if f.ends_with(':') && (f.starts_with("here") || f.starts_with("sure")) {
            t = rest.trim();
        }
    }
    for (open, close) in [('"', '"'), ('\u{201c}', '\u{201d}'), ('\'', '\'')] {
        if t.len() >= 2 && t.starts_with(open) && t.ends_with(close) {
            t = t[open.len_utf8()..t.len() - close.len_utf8()].trim();
        }
    }
    t.to_string()
}

/// Texts equal up to case, punctuation and spacing count as duplicates.
pub fn dedup_key(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::TaskSpec;

    fn task() -> TaskSpec {
        TaskSpec::from_toml_str(
            r#"
name = "t"
classify_template = "{text} {labels}"
[[labels]]
name = "a"
prompts = ["write a", "write A"]
[[labels]]
name = "b"
prompts = ["write b"]
[generation]
min_chars = 3
max_chars = 20
"#,
        )
        .unwrap()
    }

    #[test]
    fn cleans_and_dedups_generated_text() {
        assert_eq!(clean_generated("  \"Great film.\"  "), "Great film.");
        assert_eq!(
            clean_generated("Here is a review:\n\u{201c}Dull.\u{201d}"),
            "Dull."
        );
        assert_eq!(dedup_key("Great film!"), dedup_key("great  FILM"));
    }

    #[test]
    fn cycles_prompts_filters_dedups_and_gives_up() {
        let mut calls = Vec::new();
        let out = label_conditioned(&task(), 3, 2, 10, |prompts, seed| {
            calls.push((prompts.to_vec(), seed));
            Ok(prompts
                .iter()
                .enumerate()
                .map(|(i, p)| match p.as_str() {
                    // Label b's writer only ever repeats itself: one sample, then give up.
                    "write b" => "\"the same b\"".to_string(),
                    _ => format!("{p} {}", seed + i as u64),
                })
                .collect())
        })
        .unwrap();
        let a: Vec<&str> = out
            .iter()
            .filter(|s| s.label == 0)
            .map(|s| s.text.as_str())
            .collect();
        assert_eq!(a, ["write a 10", "write A 11", "write a 12"]);
        let b: Vec<&str> = out
            .iter()
            .filter(|s| s.label == 1)
            .map(|s| s.text.as_str())
            .collect();
        assert_eq!(b, ["the same b"]);
        assert_eq!(calls[0], (vec!["write a".into(), "write A".into()], 10));
        assert_eq!(
            calls[1],
            (vec!["write a".into()], 12),
            "one more for label a"
        );
        let b_attempts: usize = calls[2..].iter().map(|(p, _)| p.len()).sum();
        assert_eq!(b_attempts, 12, "label b stops after 4 x 3 attempts");
        assert_eq!(calls[2].1, 13, "seeds continue across labels");
    }
}
