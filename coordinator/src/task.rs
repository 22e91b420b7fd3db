//! Task specifications (labels, prompt templates), loaded from TOML.
//!
//! A task names its labels; each label has a description, a verbalizer (the answer word the
//! LLM should give when classifying) and the prompts used to generate synthetic examples of
//! it. See `examples/tasks/*.toml`.

use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One class of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelSpec {
    /// Label name as it appears in data files (e.g. `positive`).
    pub name: String,
    /// What the label means, in words.
    #[serde(default)]
    pub description: String,
    /// The answer the LLM gives for this label in the classification prompt (e.g.
    /// `Positive`). Defaults to the name.
    #[serde(default)]
    pub verbalizer: String,
    /// Prompts (user messages) that make the LLM write one example of this label.
    pub prompts: Vec<String>,
}

/// Defaults for synthetic-data generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerationSpec {
    /// Softmax temperature.
    pub temperature: f32,
    /// Top-k filter (0 = off).
    pub top_k: usize,
    /// Nucleus filter (1 = off).
    pub top_p: f32,
    /// Most new tokens per sample.
    pub max_new_tokens: usize,
    /// Samples shorter than this (in characters, after stripping) are dropped.
    pub min_chars: usize,
    /// Samples longer than this (in characters, after stripping) are dropped.
    pub max_chars: usize,
}

impl Default for GenerationSpec {
    fn default() -> GenerationSpec {
        GenerationSpec {
            temperature: 0.9,
            top_k: 50,
            top_p: 0.95,
            max_new_tokens: 64,
            min_chars: 10,
            max_chars: 600,
        }
    }
}

/// A classification task: its labels and prompts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Short name, e.g. `mr`.
    pub name: String,
    /// What the task is.
    #[serde(default)]
    pub description: String,
    /// The classification prompt (a user message). `{text}` is replaced by the text to
    /// classify and `{labels}` by the verbalizers joined with ", ".
    pub classify_template: String,
    /// The classes, in label-index order.
    pub labels: Vec<LabelSpec>,
    /// Generation defaults.
    #[serde(default)]
    pub generation: GenerationSpec,
}

impl TaskSpec {
    /// Parses and validates a task from TOML text.
    pub fn from_toml_str(text: &str) -> Result<TaskSpec> {
        let mut spec: TaskSpec =
            toml::from_str(text).map_err(|e| Error::Task(format!("invalid TOML: {e}")))?;
        for label in &mut spec.labels {
            if label.verbalizer.is_empty() {
                label.verbalizer = label.name.clone();
            }
        }
        spec.validate()?;
        Ok(spec)
    }

    /// Reads, parses and validates a task file.
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<TaskSpec> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::File {
            path: path.to_path_buf(),
            source,
        })?;
        TaskSpec::from_toml_str(&text).map_err(|e| Error::Task(format!("{}: {e}", path.display())))
    }

    /// Checks: a name, at least two labels with unique non-empty names and verbalizers, each
    /// with at least one non-empty prompt, and a template that uses `{text}`.
    pub fn validate(&self) -> Result<()> {
        let fail = |msg: String| Err(Error::Task(format!("task {:?}: {msg}", self.name)));
        if self.name.trim().is_empty() {
            return fail("empty name".into());
        }
        if self.labels.len() < 2 {
            return fail(format!(
                "needs at least 2 labels, has {}",
                self.labels.len()
            ));
        }
        let mut names = HashSet::new();
        let mut verbalizers = HashSet::new();
        for l in &self.labels {
            if l.name.trim().is_empty() {
                return fail("a label has an empty name".into());
            }
            if !names.insert(l.name.as_str()) {
                return fail(format!("duplicate label name {:?}", l.name));
            }
            if !verbalizers.insert(l.verbalizer.as_str()) {
                return fail(format!("duplicate verbalizer {:?}", l.verbalizer));
            }
            if l.prompts.is_empty() || l.prompts.iter().any(|p| p.trim().is_empty()) {
                return fail(format!("label {:?} needs non-empty prompts", l.name));
            }
        }
        if !self.classify_template.contains("{text}") {
            return fail("classify_template must contain {text}".into());
        }
        let g = &self.generation;
        if g.min_chars > g.max_chars || g.max_new_tokens == 0 || g.top_p.is_nan() || g.top_p <= 0.0
        {
            return fail(format!("invalid generation settings {g:?}"));
        }
        Ok(())
    }

    /// Label names in index order.
    pub fn label_names(&self) -> Vec<String> {
        self.labels.iter().map(|l| l.name.clone()).collect()
    }

    /// Index of a label by name.
    pub fn label_index(&self, name: &str) -> Option<usize> {
        self.labels.iter().position(|l| l.name == name)
    }

    /// The classification prompt (user message) for one text.
    pub fn classify_prompt(&self, text: &str) -> String {
        let labels: Vec<&str> = self.labels.iter().map(|l| l.verbalizer.as_str()).collect();
        self.classify_template
            .replace("{labels}", &labels.join(", "))
            .replace("{text}", text.trim())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINI: &str = r#"
name = "mini"
classify_template = "Is this {labels}? {text}"
[[labels]]
name = "a"
prompts = ["write a"]
[[labels]]
name = "b"
verbalizer = "Bee"
prompts = ["write b"]
"#;

    #[test]
    fn parses_with_defaults() -> Result<()> {
        let t = TaskSpec::from_toml_str(MINI)?;
        assert_eq!(t.label_names(), vec!["a", "b"]);
        assert_eq!(t.labels[0].verbalizer, "a");
        assert_eq!(t.generation, GenerationSpec::default());
        assert_eq!(t.classify_prompt(" hi "), "Is this a, Bee? hi");
        assert_eq!(t.label_index("b"), Some(1));
        Ok(())
    }

    #[test]
    fn rejects_invalid_specs() {
        let one_label = MINI
            .split("[[labels]]\nname = \"b\"")
            .next()
            .unwrap_or_default();
        let dup = MINI.replace("name = \"b\"", "name = \"a\"");
        let empty_prompt = MINI.replace("[\"write b\"]", "[\"  \"]");
        let no_text = MINI.replace("{text}", "");
        for (bad, why) in [
            (one_label.to_string(), "at least 2 labels"),
            (dup, "duplicate label"),
            (empty_prompt, "non-empty prompts"),
            (no_text, "{text}"),
            ("name = 3".to_string(), "invalid TOML"),
        ] {
            match TaskSpec::from_toml_str(&bad) {
                Err(Error::Task(msg)) => assert!(msg.contains(why), "{msg}"),
                other => panic!("expected a task error for {why}, got {other:?}"),
            }
        }
    }

    #[test]
    fn example_tasks_load() -> Result<()> {
        let dir = crosslm_sdk::data::workspace_root().join("examples/tasks");
        let mr = TaskSpec::from_toml_file(dir.join("mr.toml"))?;
        assert_eq!(mr.label_names(), vec!["negative", "positive"]);
        let spam = TaskSpec::from_toml_file(dir.join("spam.toml"))?;
        assert_eq!(spam.label_names(), vec!["ham", "spam"]);
        let r8 = TaskSpec::from_toml_file(dir.join("r8.toml"))?;
        assert_eq!(
            r8.label_names(),
            vec![
                "acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"
            ]
        );
        Ok(())
    }
}
