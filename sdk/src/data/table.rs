//! Generic labeled tables: CSV, TSV and JSON lines, with a text column and a label column.

use std::collections::BTreeMap;
use std::path::Path;

use super::{BadRowSink, BadRows, Dataset, Example, Loaded, label_map, lines, read_file};
use crate::{Error, Result};

/// The table format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TableFormat {
    /// From the file extension: `.csv`, `.tsv`/`.tab`/`.txt`, `.jsonl`/`.ndjson`/`.json`.
    #[default]
    Auto,
    /// Comma-separated, RFC 4180 quoting (quoted fields may span lines).
    Csv,
    /// Tab-separated, no quoting.
    Tsv,
    /// One JSON object per line.
    Jsonl,
}

/// Which columns hold the text and the label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpec {
    /// The format.
    pub format: TableFormat,
    /// Text column: a header name / JSON key, or a 0-based index for CSV/TSV without header.
    pub text_column: String,
    /// Label column, same conventions as `text_column`.
    pub label_column: String,
    /// Whether CSV/TSV files start with a header row (ignored for JSONL).
    pub has_header: bool,
    /// The label set, in index order. `None`: the labels seen, sorted. With a fixed set, a
    /// label outside it is a bad row.
    pub labels: Option<Vec<String>>,
}

impl Default for TableSpec {
    fn default() -> Self {
        Self {
            format: TableFormat::Auto,
            text_column: "text".into(),
            label_column: "label".into(),
            has_header: true,
            labels: None,
        }
    }
}

/// A parsed row before label mapping: line number, text, label.
type RawRow = (usize, String, String);

/// Loads a CSV/TSV/JSONL table of labeled texts.
pub fn load_table(path: &Path, spec: &TableSpec, bad_rows: BadRows) -> Result<Loaded> {
    let bytes = read_file(path)?;
    let format = match spec.format {
        TableFormat::Auto => {
            let ext = path
                .extension()
                .map(|e| e.to_string_lossy().to_lowercase())
                .unwrap_or_default();
            match ext.as_str() {
                "csv" => TableFormat::Csv,
                "tsv" | "tab" | "txt" => TableFormat::Tsv,
                "jsonl" | "ndjson" | "json" => TableFormat::Jsonl,
                _ => {
                    return Err(Error::Data(format!(
                        "{}: cannot tell the table format from the extension; name it",
                        path.display()
                    )));
                }
            }
        }
        f => f,
    };
    let mut sink = BadRowSink::new(bad_rows);
    let rows = match format {
        TableFormat::Jsonl => jsonl_rows(path, &bytes, spec, &mut sink)?,
        TableFormat::Csv => {
            let records = csv_records(&bytes);
            delimited_rows(path, records, spec, &mut sink)?
        }
        _ => {
            let records = lines(&bytes)
                .map(|(n, l)| (n, l.split(|&b| b == b'\t').map(<[u8]>::to_vec).collect()));
            delimited_rows(path, records, spec, &mut sink)?
        }
    };

    let map: BTreeMap<String, usize> = match &spec.labels {
        Some(labels) => labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.clone(), i))
            .collect(),
        None => label_map(rows.iter().map(|(_, _, l)| l.clone())),
    };
    let mut label_names = vec![String::new(); map.len()];
    for (name, &i) in &map {
        label_names[i] = name.clone();
    }
    let mut examples = Vec::with_capacity(rows.len());
    for (line, text, label) in rows {
        match map.get(&label) {
            Some(&label) => examples.push(Example { text, label }),
            None => sink.bad(path, line, format!("unknown label {label:?}"))?,
        }
    }
    Ok(sink.finish(Dataset {
        label_names,
        examples,
    }))
}

/// Column position: a header name, or a number when there is no header (or no such name).
fn column_index(header: Option<&[String]>, column: &str) -> Option<usize> {
    header
        .and_then(|h| h.iter().position(|c| c.trim() == column))
        .or_else(|| column.parse().ok())
}

fn delimited_rows(
    path: &Path,
    records: impl Iterator<Item = (usize, Vec<Vec<u8>>)>,
    spec: &TableSpec,
    sink: &mut BadRowSink,
) -> Result<Vec<RawRow>> {
    let mut records = records.filter(|(_, fields)| {
        !(fields.len() == 1 && fields[0].iter().all(u8::is_ascii_whitespace))
    });
    let header: Option<Vec<String>> = if spec.has_header {
        let Some((_, fields)) = records.next() else {
            return Ok(Vec::new());
        };
        Some(
            fields
                .iter()
                .map(|f| String::from_utf8_lossy(f).into_owned())
                .collect(),
        )
    } else {
        None
    };
    let find = |column: &str| {
        column_index(header.as_deref(), column).ok_or_else(|| {
            Error::Data(format!(
                "{}: no column {column:?} (header: {header:?})",
                path.display()
            ))
        })
    };
    let (text_at, label_at) = (find(&spec.text_column)?, find(&spec.label_column)?);
    let mut rows = Vec::new();
    for (line, fields) in records {
        let (Some(text), Some(label)) = (fields.get(text_at), fields.get(label_at)) else {
            sink.bad(
                path,
                line,
                format!(
                    "expected at least {} fields, got {}",
                    text_at.max(label_at) + 1,
                    fields.len()
                ),
            )?;
            continue;
        };
        let (Ok(text), Ok(label)) = (std::str::from_utf8(text), std::str::from_utf8(label)) else {
            sink.bad(path, line, "invalid UTF-8")?;
            continue;
        };
        if text.trim().is_empty() || label.trim().is_empty() {
            sink.bad(path, line, "empty text or label")?;
            continue;
        }
        rows.push((line, text.trim().to_string(), label.trim().to_string()));
    }
    Ok(rows)
}

/// RFC 4180 records: `"` quotes fields, `""` is a quote inside one, quoted fields may hold
/// commas and newlines. Each record carries the line it starts on.
fn csv_records(bytes: &[u8]) -> impl Iterator<Item = (usize, Vec<Vec<u8>>)> {
    let mut records = Vec::new();
    let (mut fields, mut field) = (Vec::new(), Vec::new());
    let (mut line, mut start_line, mut in_quotes, mut i) = (1usize, 1usize, false, 0usize);
    while i < bytes.len() {
        let b = bytes[i];
        if in_quotes {
            match b {
                b'"' if bytes.get(i + 1) == Some(&b'"') => {
                    field.push(b'"');
                    i += 1;
                }
                b'"' => in_quotes = false,
                b'\n' => {
                    line += 1;
                    field.push(b);
                }
                _ => field.push(b),
            }
        } else {
            match b {
                b'"' if field.is_empty() => in_quotes = true,
                b',' => fields.push(std::mem::take(&mut field)),
                b'\r' if bytes.get(i + 1) == Some(&b'\n') => {}
                b'\n' => {
                    fields.push(std::mem::take(&mut field));
                    records.push((start_line, std::mem::take(&mut fields)));
                    line += 1;
                    start_line = line;
                }
                _ => field.push(b),
            }
        }
        i += 1;
    }
    if !field.is_empty() || !fields.is_empty() {
        fields.push(field);
        records.push((start_line, fields));
    }
    records.into_iter()
}

fn jsonl_rows(
    path: &Path,
    bytes: &[u8],
    spec: &TableSpec,
    sink: &mut BadRowSink,
) -> Result<Vec<RawRow>> {
    let mut rows = Vec::new();
    for (line, raw) in lines(bytes) {
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if std::str::from_utf8(raw).is_err() {
            sink.bad(path, line, "invalid UTF-8")?;
            continue;
        }
        let value: serde_json::Value = match serde_json::from_slice(raw) {
            Ok(v) => v,
            Err(e) => {
                sink.bad(path, line, format!("invalid JSON: {e}"))?;
                continue;
            }
        };
        let field = |key: &str| match value.get(key) {
            Some(serde_json::Value::String(s)) => Some(s.trim().to_string()),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            Some(serde_json::Value::Bool(b)) => Some(b.to_string()),
            _ => None,
        };
        match (field(&spec.text_column), field(&spec.label_column)) {
            (Some(text), Some(label)) if !text.is_empty() && !label.is_empty() => {
                rows.push((line, text, label))
            }
            _ => sink.bad(
                path,
                line,
                format!(
                    "missing or empty {:?}/{:?}",
                    spec.text_column, spec.label_column
                ),
            )?,
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, content: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        (dir, path)
    }

    #[test]
    fn csv_with_quotes_newlines_and_bad_rows() {
        let (_d, path) = write(
            "t.csv",
            b"id,text,label\r\n1,\"hello, \"\"world\"\"\",pos\r\n2,\"two\nlines\",neg\r\n3,missing\r\n4,\xff,pos\r\n5,ok,pos\r\n",
        );
        let loaded = load_table(&path, &TableSpec::default(), BadRows::Skip).unwrap();
        let d = loaded.dataset;
        assert_eq!(d.label_names, vec!["neg", "pos"]);
        assert_eq!(
            d.examples[0],
            Example {
                text: "hello, \"world\"".into(),
                label: 1
            }
        );
        assert_eq!(
            d.examples[1],
            Example {
                text: "two\nlines".into(),
                label: 0
            }
        );
        assert_eq!(d.examples.len(), 3);
        let bad: Vec<usize> = loaded.skipped.iter().map(|b| b.line).collect();
        assert_eq!(bad, vec![5, 6]);
    }

    #[test]
    fn tsv_without_header_by_index_and_fixed_labels() {
        let (_d, path) = write("t.tsv", b"pos\tgood\nneg\tbad\nmeh\tso so\n");
        let spec = TableSpec {
            text_column: "1".into(),
            label_column: "0".into(),
            has_header: false,
            labels: Some(vec!["neg".into(), "pos".into()]),
            ..Default::default()
        };
        let loaded = load_table(&path, &spec, BadRows::Skip).unwrap();
        assert_eq!(loaded.dataset.examples.len(), 2);
        assert_eq!(loaded.dataset.examples[0].label, 1);
        assert_eq!(loaded.skipped[0].line, 3);
        assert!(loaded.skipped[0].reason.contains("unknown label"));
        let err = load_table(&path, &spec, BadRows::Reject)
            .unwrap_err()
            .to_string();
        assert!(err.contains(":3:"), "{err}");
    }

    #[test]
    fn jsonl_rows_and_numeric_labels() {
        let (_d, path) = write(
            "t.jsonl",
            b"{\"text\":\"a\",\"label\":1}\n{\"text\":\"b\"}\nnot json\n{\"text\":\"c\",\"label\":0}\n",
        );
        let loaded = load_table(&path, &TableSpec::default(), BadRows::Skip).unwrap();
        assert_eq!(loaded.dataset.label_names, vec!["0", "1"]);
        assert_eq!(loaded.dataset.examples.len(), 2);
        assert_eq!(
            loaded.skipped.iter().map(|b| b.line).collect::<Vec<_>>(),
            vec![2, 3]
        );
    }

    #[test]
    fn missing_column_is_an_error() {
        let (_d, path) = write("t.csv", b"a,b\n1,2\n");
        assert!(load_table(&path, &TableSpec::default(), BadRows::Skip).is_err());
        let (_d, path) = write("t.xyz", b"a,b\n1,2\n");
        assert!(load_table(&path, &TableSpec::default(), BadRows::Skip).is_err());
    }
}
