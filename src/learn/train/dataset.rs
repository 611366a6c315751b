//! Labeled mail for `train`, `eval` and `replay`: JSONL records, or a folder
//! per department holding a Maildir, loose message files, or mbox files.
//!
//! Whole RFC 822 messages (`raw` in JSONL, every Maildir or mbox message) go
//! through the same extraction as live mail, so a head learns from what the
//! daemon will see.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use thiserror::Error;

use crate::message::extract::{extract, ExtractLimits};
use crate::model::{features_text, model_text};

/// One message of a data set.
#[derive(Debug, Clone)]
pub struct Record {
    /// Subject + body, as the model sees it.
    pub text: String,
    /// The label, when the data has one.
    pub label: Option<String>,
    /// Other fields (for `--slice`), as strings.
    pub fields: Map<String, Value>,
    /// Where it came from: `file:line` or the message path.
    pub origin: String,
    /// The raw message, for replay (Maildir/mbox/raw records only).
    pub raw: Option<Vec<u8>>,
}

#[derive(Debug, Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {reason}")]
    Line { path: PathBuf, line: usize, reason: String },
    #[error("{0}: no messages found")]
    Empty(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io { path: path.to_owned(), source }
}

/// Reads JSONL: each line an object with `subject` and `body`, or `raw`,
/// plus the `label` field (required when `label` is given).
pub fn read_jsonl(path: &Path, label: Option<&str>, limits: ExtractLimits) -> Result<Vec<Record>, DataError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |reason: String| DataError::Line { path: path.to_owned(), line: n + 1, reason };
        let obj: Map<String, Value> = match serde_json::from_str(line) {
            Ok(Value::Object(o)) => o,
            Ok(_) => return Err(err("not a JSON object".into())),
            Err(e) => return Err(err(format!("invalid JSON: {e}"))),
        };
        let str_field = |k: &str| obj.get(k).and_then(Value::as_str).unwrap_or("");
        let (text, raw) = match obj.get("raw").and_then(Value::as_str) {
            Some(raw) => (features_text(&extract(raw.as_bytes(), limits)), Some(raw.as_bytes().to_vec())),
            None if obj.contains_key("subject") || obj.contains_key("body") => {
                (model_text(str_field("subject"), str_field("body")), None)
            }
            None => return Err(err("needs `subject` and `body`, or `raw`".into())),
        };
        let label_value = match label {
            Some(field) => match obj.get(field) {
                Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
                Some(Value::Number(x)) => Some(x.to_string()),
                _ => return Err(err(format!("no `{field}` label"))),
            },
            None => None,
        };
        out.push(Record {
            text,
            label: label_value,
            fields: obj,
            origin: format!("{}:{}", path.display(), n + 1),
            raw,
        });
    }
    if out.is_empty() {
        return Err(DataError::Empty(path.to_owned()));
    }
    Ok(out)
}

/// Reads `DIR/<department>/…`: each subfolder's name is the label of every
/// message in it (Maildir `cur/` and `new/`, loose files, or mbox files).
pub fn read_maildir(dir: &Path, limits: ExtractLimits) -> Result<Vec<Record>, DataError> {
    let mut out = Vec::new();
    let mut departments: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect();
    departments.sort();
    for d in departments {
        let label = d.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        for file in message_files(&d)? {
            let bytes = std::fs::read(&file).map_err(io(&file))?;
            for (i, raw) in split_mbox(&bytes).into_iter().enumerate() {
                let text = features_text(&extract(raw, limits));
                let origin = if i == 0 { file.display().to_string() } else { format!("{}#{}", file.display(), i + 1) };
                out.push(Record {
                    text,
                    label: Some(label.clone()),
                    fields: Map::new(),
                    origin,
                    raw: Some(raw.to_vec()),
                });
            }
        }
    }
    if out.is_empty() {
        return Err(DataError::Empty(dir.to_owned()));
    }
    Ok(out)
}

/// Message files under a department folder: Maildir `cur/` + `new/` if
/// present, otherwise every regular file (recursively), sorted.
fn message_files(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut files = Vec::new();
    let maildir = dir.join("cur").is_dir() || dir.join("new").is_dir();
    let roots: Vec<PathBuf> = if maildir { vec![dir.join("cur"), dir.join("new")] } else { vec![dir.to_owned()] };
    let mut stack = roots;
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let hidden = p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if hidden || (maildir && p.file_name().is_some_and(|n| n == "tmp")) {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if p.is_file() {
                files.push(p);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// An mbox file holds messages each starting with a `From ` line; any other
/// file is one message.
fn split_mbox(bytes: &[u8]) -> Vec<&[u8]> {
    if !bytes.starts_with(b"From ") {
        return vec![bytes];
    }
    let mut starts = vec![0];
    let mut i = 0;
    while let Some(p) = bytes[i..].windows(6).position(|w| w == b"\nFrom ") {
        starts.push(i + p + 1);
        i += p + 1;
    }
    starts.iter().enumerate().map(|(k, &s)| &bytes[s..starts.get(k + 1).copied().unwrap_or(bytes.len())]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ExtractLimits = ExtractLimits { max_bytes: 1 << 20, max_text_chars: 10_000, max_headers: 100 };

    #[test]
    fn jsonl_subject_body_raw_and_errors_with_line_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(
            &p,
            "{\"subject\":\"Invoice\",\"body\":\"pay\",\"queue\":\"billing\",\"language\":\"en\"}\n\n\
             {\"raw\":\"Subject: Outage\\r\\n\\r\\nall down\",\"queue\":\"support\"}\n",
        )
        .unwrap();
        let r = read_jsonl(&p, Some("queue"), LIMITS).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].text, "Invoice\npay");
        assert_eq!(r[1].text, "Outage\nall down");
        assert_eq!(r[1].label.as_deref(), Some("support"));
        assert_eq!(r[0].fields["language"], "en");
        let err = read_jsonl(&p, Some("priority"), LIMITS).unwrap_err().to_string();
        assert!(err.contains("d.jsonl:1") && err.contains("priority"), "{err}");
        std::fs::write(&p, "{\"subject\": oops}\n").unwrap();
        assert!(read_jsonl(&p, None, LIMITS).unwrap_err().to_string().contains("d.jsonl:1: invalid JSON"));
    }

    #[test]
    fn maildir_loose_files_and_mbox_per_department() {
        let dir = tempfile::tempdir().unwrap();
        let billing = dir.path().join("billing");
        std::fs::create_dir_all(billing.join("cur")).unwrap();
        std::fs::create_dir_all(billing.join("new")).unwrap();
        std::fs::create_dir_all(billing.join("tmp")).unwrap();
        std::fs::write(billing.join("cur/1:2,S"), "Subject: Invoice 1\r\n\r\npay").unwrap();
        std::fs::write(billing.join("new/2"), "Subject: Invoice 2\r\n\r\npay").unwrap();
        std::fs::write(billing.join("tmp/partial"), "Subject: not yet delivered\r\n\r\n").unwrap();
        let support = dir.path().join("support");
        std::fs::create_dir_all(&support).unwrap();
        std::fs::write(
            support.join("archive.mbox"),
            "From a@b Mon Jan 1 2001\nSubject: Down\n\nx\nFrom c@d Tue Jan 2 2001\nSubject: Broken\n\ny\n",
        )
        .unwrap();
        let r = read_maildir(dir.path(), LIMITS).unwrap();
        let got: Vec<(String, String)> =
            r.iter().map(|r| (r.label.clone().unwrap(), r.text.lines().next().unwrap().to_string())).collect();
        assert_eq!(
            got,
            vec![
                ("billing".into(), "Invoice 1".into()),
                ("billing".into(), "Invoice 2".into()),
                ("support".into(), "Down".into()),
                ("support".into(), "Broken".into()),
            ]
        );
    }
}
