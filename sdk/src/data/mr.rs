//! MR sentence polarity (Rotten Tomatoes snippets, Pang & Lee; VADER ground-truth file).

use std::path::Path;

use super::{BadRowSink, BadRows, Dataset, Example, Loaded, lines, read_file};
use crate::Result;

/// MR label names: index 0 is negative, 1 is positive.
pub const MR_LABELS: [&str; 2] = ["negative", "positive"];

/// Loads `movieReviewSnippets_GroundTruth.txt` (TSV `id<TAB>mean_rating<TAB>sentence`, CRLF).
///
/// The label is the sign of the rating; rows rated exactly 0 have no polarity and are left out
/// silently (they are not malformed). The NYT editorial file beside it has the same format.
pub fn load_mr(path: &Path, bad_rows: BadRows) -> Result<Loaded> {
    let bytes = read_file(path)?;
    let mut sink = BadRowSink::new(bad_rows);
    let mut examples = Vec::new();
    for (line, raw) in lines(&bytes) {
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let Ok(row) = std::str::from_utf8(raw) else {
            sink.bad(path, line, "invalid UTF-8")?;
            continue;
        };
        let mut fields = row.splitn(3, '\t');
        let (_id, rating, text) = (fields.next(), fields.next(), fields.next());
        let (Some(rating), Some(text)) = (rating, text) else {
            sink.bad(path, line, "expected 3 tab-separated fields")?;
            continue;
        };
        let Ok(rating) = rating.trim().parse::<f64>() else {
            sink.bad(path, line, format!("rating {rating:?} is not a number"))?;
            continue;
        };
        let text = text.trim();
        if text.is_empty() {
            sink.bad(path, line, "empty sentence")?;
            continue;
        }
        if rating == 0.0 || rating.is_nan() {
            continue;
        }
        examples.push(Example {
            text: text.to_string(),
            label: usize::from(rating > 0.0),
        });
    }
    Ok(sink.finish(Dataset {
        label_names: MR_LABELS.iter().map(|s| s.to_string()).collect(),
        examples,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::assets_dir;

    #[test]
    fn parses_signs_skips_zeros_and_reports_bad_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mr.txt");
        let mut content = b"1\t2.5\tgood film\r\n2\t-1.0\tbad film\r\n3\t0\tmeh\r\n4\tx\tbroken\r\n5\t1.0\r\n6\t1.0\t\xff\xfe\r\n".to_vec();
        content.extend_from_slice(b"7\t-0.2\tnot great\r\n");
        std::fs::write(&path, &content).unwrap();

        let loaded = load_mr(&path, BadRows::Skip).unwrap();
        let d = loaded.dataset;
        assert_eq!(d.examples.len(), 3);
        assert_eq!(
            d.examples[0],
            Example {
                text: "good film".into(),
                label: 1
            }
        );
        assert_eq!(d.examples[1].label, 0);
        assert_eq!(d.examples[2].label, 0);
        let lines: Vec<usize> = loaded.skipped.iter().map(|b| b.line).collect();
        assert_eq!(lines, vec![4, 5, 6]);
        assert!(loaded.skipped[2].reason.contains("UTF-8"));

        let err = load_mr(&path, BadRows::Reject).unwrap_err().to_string();
        assert!(err.contains(":4:"), "{err}");
        assert!(load_mr(&dir.path().join("missing"), BadRows::Skip).is_err());
    }

    #[test]
    fn real_file_has_expected_counts() {
        let path = assets_dir().join("data/mr/movieReviewSnippets_GroundTruth.txt");
        if !path.exists() {
            panic!(
                "MR data missing at {} (run the asset fetch script or set CROSSLM_ASSETS)",
                path.display()
            );
        }
        let loaded = load_mr(&path, BadRows::Reject).unwrap();
        assert_eq!(loaded.dataset.label_counts(), vec![5326, 5242]);
    }
}
