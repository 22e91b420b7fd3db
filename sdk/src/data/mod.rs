//! Labeled text data sets: loaders, splits, partitioning across clients.
//!
//! Every loader returns a [`Loaded`]: the [`Dataset`] and the rows it skipped, each with its line
//! number (or file) and the reason. With [`BadRows::Reject`] the first bad row is an error
//! instead. Nothing here panics on bad input.

mod mr;
mod partition;
mod r8;
mod spam;
mod table;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

pub use mr::{MR_LABELS, load_mr};
pub use partition::gamma_sample;
pub use r8::{R8_LABELS, load_r8};
pub use spam::{SPAM_LABELS, email_to_text, load_spam};
pub use table::{TableFormat, TableSpec, load_table};

/// One labeled text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The text.
    pub text: String,
    /// Index into [`Dataset::label_names`].
    pub label: usize,
}

/// A labeled text classification data set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dataset {
    /// Label names; an example's `label` indexes this.
    pub label_names: Vec<String>,
    /// The examples, in file order unless split or partitioned.
    pub examples: Vec<Example>,
}

/// What a loader does with a malformed row (missing field, unknown label, invalid UTF-8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BadRows {
    /// Skip it and report it in [`Loaded::skipped`].
    #[default]
    Skip,
    /// Fail the whole load with [`Error::Data`].
    Reject,
}

/// A row a loader skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    /// The file.
    pub path: PathBuf,
    /// 1-based line number in the file (0 when the file has no lines, e.g. a JSON email).
    pub line: usize,
    /// Why it was skipped.
    pub reason: String,
}

impl std::fmt::Display for BadRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.path.display(), self.line, self.reason)
    }
}

/// A loaded data set and the rows that were skipped.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// The data set.
    pub dataset: Dataset,
    /// Skipped rows, in file order.
    pub skipped: Vec<BadRow>,
}

/// Collects bad rows under a [`BadRows`] policy; shared by all loaders.
pub(crate) struct BadRowSink {
    policy: BadRows,
    skipped: Vec<BadRow>,
}

impl BadRowSink {
    pub(crate) fn new(policy: BadRows) -> Self {
        Self {
            policy,
            skipped: Vec::new(),
        }
    }

    /// Records a bad row; under [`BadRows::Reject`] returns the error to propagate.
    pub(crate) fn bad(
        &mut self,
        path: &Path,
        line: usize,
        reason: impl Into<String>,
    ) -> Result<()> {
        let row = BadRow {
            path: path.to_path_buf(),
            line,
            reason: reason.into(),
        };
        match self.policy {
            BadRows::Reject => Err(Error::Data(row.to_string())),
            BadRows::Skip => {
                tracing::warn!("skipping bad row {row}");
                self.skipped.push(row);
                Ok(())
            }
        }
    }

    pub(crate) fn finish(self, dataset: Dataset) -> Loaded {
        Loaded {
            dataset,
            skipped: self.skipped,
        }
    }
}

/// Reads a whole file, naming it in the error.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::File {
        path: path.to_path_buf(),
        source,
    })
}

/// Splits raw bytes into lines (LF or CRLF), numbered from 1; bytes, so that one line of invalid
/// UTF-8 only spoils that line.
pub(crate) fn lines(bytes: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    bytes
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !bytes.is_empty() || !l.is_empty())
}

impl Dataset {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Number of labels.
    pub fn num_labels(&self) -> usize {
        self.label_names.len()
    }

    /// Examples per label.
    pub fn label_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.label_names.len()];
        for e in &self.examples {
            if let Some(c) = counts.get_mut(e.label) {
                *c += 1;
            }
        }
        counts
    }

    /// The label index of a name.
    pub fn label_index(&self, name: &str) -> Option<usize> {
        self.label_names.iter().position(|n| n == name)
    }

    /// A data set with the same labels and the given examples.
    pub fn with_examples(&self, examples: Vec<Example>) -> Dataset {
        Dataset {
            label_names: self.label_names.clone(),
            examples,
        }
    }

    /// Deterministic stratified train/test split: within each label the examples are shuffled
    /// with `seed` and the first `round(test_fraction * n)` go to the test set, so both sides keep
    /// the label proportions (R8 is very imbalanced). Returns `(train, test)`, each shuffled.
    pub fn split(&self, test_fraction: f64, seed: u64) -> Result<(Dataset, Dataset)> {
        if !(0.0..=1.0).contains(&test_fraction) {
            return Err(Error::Data(format!(
                "test fraction {test_fraction} is not in [0, 1]"
            )));
        }
        let mut rng = partition::rng(seed);
        let mut train = Vec::new();
        let mut test = Vec::new();
        for mut idx in self.indices_by_label() {
            partition::shuffle(&mut idx, &mut rng);
            let n_test = (test_fraction * idx.len() as f64).round() as usize;
            test.extend(idx[..n_test].iter().map(|&i| self.examples[i].clone()));
            train.extend(idx[n_test..].iter().map(|&i| self.examples[i].clone()));
        }
        partition::shuffle(&mut train, &mut rng);
        partition::shuffle(&mut test, &mut rng);
        Ok((self.with_examples(train), self.with_examples(test)))
    }

    /// A deterministic random subset of `n` examples (all of them if `n >= len`).
    pub fn sample(&self, n: usize, seed: u64) -> Dataset {
        let mut idx: Vec<usize> = (0..self.examples.len()).collect();
        partition::shuffle(&mut idx, &mut partition::rng(seed));
        idx.truncate(n);
        self.with_examples(idx.iter().map(|&i| self.examples[i].clone()).collect())
    }

    /// Example indices grouped by label.
    fn indices_by_label(&self) -> Vec<Vec<usize>> {
        let mut by_label = vec![Vec::new(); self.label_names.len()];
        for (i, e) in self.examples.iter().enumerate() {
            if let Some(v) = by_label.get_mut(e.label) {
                v.push(i);
            }
        }
        by_label
    }

    /// IID partition across `n_clients`: one seeded shuffle, then round-robin, so client sizes
    /// differ by at most one.
    pub fn partition_iid(&self, n_clients: usize, seed: u64) -> Result<Vec<Dataset>> {
        partition::iid(self, n_clients, seed)
    }

    /// Label-skewed partition across `n_clients`: for every label, client shares are drawn from
    /// Dirichlet(`alpha`) (small alpha = strong skew, large alpha = close to IID). Seeded.
    pub fn partition_dirichlet(
        &self,
        n_clients: usize,
        alpha: f64,
        seed: u64,
    ) -> Result<Vec<Dataset>> {
        partition::dirichlet(self, n_clients, alpha, seed)
    }
}

/// Builds label names from the labels seen, sorted so the mapping does not depend on row order.
pub(crate) fn label_map(labels: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
    let mut map: BTreeMap<String, usize> = labels.into_iter().map(|l| (l, 0)).collect();
    for (i, v) in map.values_mut().enumerate() {
        *v = i;
    }
    map
}

/// Which loader [`load_auto`] picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataKind {
    /// MR polarity TSV (`id<TAB>rating<TAB>sentence`).
    Mr,
    /// SpamAssassin directory of `<group>/*.json`.
    Spam,
    /// Reuters R8 Orange `.tab`.
    R8,
    /// Generic CSV/TSV/JSONL table.
    Table,
}

/// Guesses the format from the path: a directory is SpamAssassin, `*.tab` is R8, a file named
/// like `*GroundTruth.txt` is MR, anything else goes to [`load_table`] with `spec`.
pub fn detect_kind(path: &Path) -> DataKind {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if path.is_dir() {
        DataKind::Spam
    } else if name.ends_with(".tab") {
        DataKind::R8
    } else if name.ends_with("groundtruth.txt") {
        DataKind::Mr
    } else {
        DataKind::Table
    }
}

/// Loads any supported data set, picking the loader with [`detect_kind`] unless `kind` is given.
pub fn load_auto(
    path: &Path,
    kind: Option<DataKind>,
    spec: &TableSpec,
    bad_rows: BadRows,
) -> Result<Loaded> {
    match kind.unwrap_or_else(|| detect_kind(path)) {
        DataKind::Mr => load_mr(path, bad_rows),
        DataKind::Spam => load_spam(path, bad_rows),
        DataKind::R8 => load_r8(path, bad_rows),
        DataKind::Table => load_table(path, spec, bad_rows),
    }
}

/// Where the project's assets are: `$CROSSLM_ASSETS`, else `<workspace root>/assets`.
pub fn assets_dir() -> PathBuf {
    match std::env::var_os("CROSSLM_ASSETS") {
        Some(dir) => PathBuf::from(dir),
        None => workspace_root().join("assets"),
    }
}

/// The workspace checkout: found from `$CARGO_MANIFEST_DIR` at run time when cargo runs the
/// program (tests, benches, `cargo run`), else from where this crate was compiled. The run-time
/// path comes first because a target dir shared between checkouts can hold a binary compiled in
/// another one, whose compile-time path may no longer exist.
pub fn workspace_root() -> PathBuf {
    let compiled = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let Some(start) = std::env::var_os("CARGO_MANIFEST_DIR") else {
        return compiled;
    };
    Path::new(&start)
        .ancestors()
        .find(|dir| dir.join("Cargo.lock").is_file())
        .map_or(compiled, Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn toy(n_per_label: &[usize]) -> Dataset {
        let mut examples = Vec::new();
        for (label, &n) in n_per_label.iter().enumerate() {
            for i in 0..n {
                examples.push(Example {
                    text: format!("l{label} e{i}"),
                    label,
                });
            }
        }
        Dataset {
            label_names: (0..n_per_label.len()).map(|l| format!("l{l}")).collect(),
            examples,
        }
    }

    #[test]
    fn split_is_deterministic_stratified_and_disjoint() {
        let d = toy(&[100, 20]);
        let (train, test) = d.split(0.25, 7).unwrap();
        assert_eq!(test.label_counts(), vec![25, 5]);
        assert_eq!(train.label_counts(), vec![75, 15]);
        let (train2, test2) = d.split(0.25, 7).unwrap();
        assert_eq!(train, train2);
        assert_eq!(test, test2);
        let (_, test3) = d.split(0.25, 8).unwrap();
        assert_ne!(test, test3);
        for e in &test.examples {
            assert!(!train.examples.contains(e));
        }
        assert!(d.split(1.5, 0).is_err());
    }

    #[test]
    fn lines_handle_crlf_and_trailing_newline() {
        let got: Vec<_> = lines(b"a\r\nb\n\nc\r\n").collect();
        assert_eq!(
            got,
            vec![
                (1, &b"a"[..]),
                (2, &b"b"[..]),
                (3, &b""[..]),
                (4, &b"c"[..])
            ]
        );
        assert_eq!(lines(b"").count(), 0);
    }

    #[test]
    fn detect_kind_by_name() {
        assert_eq!(
            detect_kind(Path::new("x/reuters-r8-train.tab")),
            DataKind::R8
        );
        assert_eq!(
            detect_kind(Path::new("movieReviewSnippets_GroundTruth.txt")),
            DataKind::Mr
        );
        assert_eq!(detect_kind(Path::new("a.csv")), DataKind::Table);
    }
}
