//! Raw message bytes → [`Features`]: what the decision needs, bounded.
//!
//! MIME is parsed with `mail-parser`: transfer encodings and charsets are
//! decoded, HTML is turned into text, nested `message/rfc822` parts are
//! walked. Nothing here may panic or fail on hostile input: a message we
//! cannot parse still yields features (its bytes as text), and the parser
//! itself runs under `catch_unwind` so a bug in it costs one decision, never
//! the daemon.

use std::borrow::Cow;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::message::html::to_text as html_to_text;
use mail_parser::parsers::MessageStream;
use mail_parser::{Address, HeaderValue, Message, MessageParser, MimeHeaders, PartType};
use serde::Serialize;

/// Bounds on extraction, from `[limits]`.
#[derive(Debug, Clone, Copy)]
pub struct ExtractLimits {
    pub max_bytes: usize,
    pub max_text_chars: usize,
    pub max_headers: usize,
}

impl From<&crate::settings::LimitsConfig> for ExtractLimits {
    fn from(l: &crate::settings::LimitsConfig) -> Self {
        Self { max_bytes: l.max_message_bytes, max_text_chars: l.max_text_chars, max_headers: l.max_headers }
    }
}

/// An attachment's metadata (never its content).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Attachment {
    pub name: Option<String>,
    pub content_type: String,
    pub size: usize,
}

/// Everything later stages may look at, all decoded to UTF-8 text.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Features {
    pub subject: String,
    pub from: Vec<String>,
    pub to: Vec<String>,
    pub cc: Vec<String>,
    pub reply_to: Vec<String>,
    pub message_id: Option<String>,
    pub date: Option<String>,
    pub list_id: Option<String>,
    /// Top-level headers in order: name as sent, value unfolded with RFC 2047
    /// encoded words decoded.
    pub headers: Vec<(String, String)>,
    /// Plain text of every text part (HTML converted), nested messages included.
    pub text: String,
    pub attachments: Vec<Attachment>,
    /// Bytes of the message that were looked at.
    pub bytes_read: usize,
    /// True when `max_bytes`, `max_text_chars` or `max_headers` cut something.
    pub truncated: bool,
    /// True when MIME parsing failed and the text is the raw bytes.
    pub unparsed: bool,
}

impl Features {
    /// Values of every top-level header named `name` (case-insensitive).
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers.iter().filter(move |(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Nested messages deeper than this are not walked (a zip bomb of rfc822 parts).
const MAX_NESTING: usize = 8;

/// Extracts features from a raw RFC 5322 message. Never fails.
pub fn extract(raw: &[u8], limits: ExtractLimits) -> Features {
    let raw = strip_mbox_from_line(raw);
    let cut = raw.len() > limits.max_bytes;
    let raw = &raw[..raw.len().min(limits.max_bytes)];
    let parsed = catch_unwind(AssertUnwindSafe(|| {
        let parser = MessageParser::new()
            .with_mime_headers()
            .with_address_headers()
            .with_date_headers()
            .with_message_ids()
            .default_header_text();
        parser.parse(raw).map(|msg| from_message(&msg, limits))
    }));
    let mut f = match parsed {
        Ok(Some(f)) => f,
        // Not a message at all, or the parser panicked: keep the bytes as text
        // so the decision still has something, and say so.
        _ => Features {
            text: bounded(String::from_utf8_lossy(raw), limits.max_text_chars).0,
            unparsed: true,
            ..Default::default()
        },
    };
    f.bytes_read = raw.len();
    f.truncated |= cut;
    f
}

/// Files from mbox archives start with a `From sender date` envelope line
/// that is not part of the message.
fn strip_mbox_from_line(raw: &[u8]) -> &[u8] {
    if raw.starts_with(b"From ") {
        match raw.iter().position(|&b| b == b'\n') {
            Some(i) => &raw[i + 1..],
            None => &[],
        }
    } else {
        raw
    }
}

fn from_message(msg: &Message<'_>, limits: ExtractLimits) -> Features {
    let mut f = Features {
        subject: msg.subject().map(clean_line).unwrap_or_default(),
        from: addresses(msg.from()),
        to: addresses(msg.to()),
        cc: addresses(msg.cc()),
        reply_to: addresses(msg.reply_to()),
        message_id: msg.message_id().map(str::to_owned),
        date: msg.date().map(|d| d.to_rfc3339()),
        list_id: match msg.list_id() {
            HeaderValue::Text(t) => Some(t.to_string()),
            HeaderValue::TextList(l) => l.first().map(|t| t.to_string()),
            _ => None,
        },
        ..Default::default()
    };
    let raw = msg.raw_message();
    if let Some(root) = msg.parts.first() {
        for h in &root.headers {
            if f.headers.len() >= limits.max_headers {
                f.truncated = true;
                break;
            }
            let (start, end) = (h.offset_start as usize, (h.offset_end as usize).min(raw.len()));
            let value = raw.get(start..end).map(header_text).unwrap_or_default();
            f.headers.push((h.name.as_str().to_owned(), value));
        }
    }
    let mut text = String::new();
    let mut full = false;
    collect(msg, 0, &mut text, &mut f.attachments, &mut full, limits.max_text_chars);
    f.truncated |= full;
    f.text = text;
    f
}

/// Walks one message: its text bodies, then attachments, recursing into
/// attached messages.
fn collect(
    msg: &Message<'_>,
    depth: usize,
    text: &mut String,
    atts: &mut Vec<Attachment>,
    full: &mut bool,
    max: usize,
) {
    for part in msg.text_bodies() {
        let piece: Cow<'_, str> = match &part.body {
            PartType::Text(t) => Cow::Borrowed(t.as_ref()),
            PartType::Html(h) => Cow::Owned(html_to_text(h)),
            _ => continue,
        };
        push_text(text, &piece, max, full);
    }
    for part in msg.attachments() {
        match &part.body {
            PartType::Message(inner) if depth < MAX_NESTING => {
                // An attached message is read like mail: its subject is text too.
                if let Some(s) = inner.subject() {
                    push_text(text, s, max, full);
                }
                collect(inner, depth + 1, text, atts, full, max);
            }
            body => {
                // Text parts that the parser filed as attachments (an HTML part
                // in multipart/mixed, an attached .txt) are still text to read.
                match body {
                    PartType::Text(t) => push_text(text, t, max, full),
                    PartType::Html(h) => push_text(text, &html_to_text(h), max, full),
                    _ => {}
                }
                let ct = part
                    .content_type()
                    .map(|ct| match &ct.c_subtype {
                        Some(sub) => format!("{}/{}", ct.c_type, sub),
                        None => ct.c_type.to_string(),
                    })
                    .unwrap_or_else(|| "application/octet-stream".into())
                    .to_ascii_lowercase();
                atts.push(Attachment {
                    name: part.attachment_name().map(clean_line),
                    content_type: ct,
                    size: part.len(),
                });
            }
        }
    }
}

fn push_text(text: &mut String, piece: &str, max: usize, full: &mut bool) {
    let piece = piece.trim();
    if piece.is_empty() || *full {
        return;
    }
    let mut used = text.chars().count();
    if !text.is_empty() {
        text.push('\n');
        used += 1;
    }
    let (kept, cut) = bounded(Cow::Borrowed(piece), max.saturating_sub(used));
    text.push_str(&kept);
    *full |= cut;
}

/// At most `max` characters of `s`, and whether anything was cut.
fn bounded(s: Cow<'_, str>, max: usize) -> (String, bool) {
    match s.char_indices().nth(max) {
        Some((i, _)) => (s[..i].to_owned(), true),
        None => (s.into_owned(), false),
    }
}

/// A raw header value → one line of text: unfolded, encoded words decoded.
fn header_text(raw: &[u8]) -> String {
    match MessageStream::new(raw).parse_unstructured() {
        HeaderValue::Text(t) => clean_line(&t),
        _ => clean_line(&String::from_utf8_lossy(raw)),
    }
}

/// Collapses whitespace and control characters so a value is one safe line.
fn clean_line(s: &str) -> String {
    s.split(|c: char| c.is_whitespace() || c.is_control()).filter(|w| !w.is_empty()).collect::<Vec<_>>().join(" ")
}

fn addresses(a: Option<&Address<'_>>) -> Vec<String> {
    a.map(|a| a.iter().filter_map(|x| x.address()).map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ExtractLimits = ExtractLimits { max_bytes: 1 << 20, max_text_chars: 100_000, max_headers: 1000 };

    #[test]
    fn plain_message() {
        let f = extract(b"From: A <a@example.com>\r\nTo: b@example.com, c@example.com\r\nSubject: Hello\r\n there\r\nMessage-ID: <1@x>\r\n\r\nBody text\r\n", LIMITS);
        assert_eq!(f.subject, "Hello there");
        assert_eq!(f.from, vec!["a@example.com"]);
        assert_eq!(f.to, vec!["b@example.com", "c@example.com"]);
        assert_eq!(f.message_id.as_deref(), Some("1@x"));
        assert_eq!(f.text, "Body text");
        assert_eq!(f.header_values("subject").collect::<Vec<_>>(), vec!["Hello there"]);
    }

    #[test]
    fn encoded_words_base64_and_quoted_printable() {
        let raw = concat!(
            "Subject: =?utf-8?B?UmVjaG51bmcgZsO8ciBNw6Ryeg==?=\r\n",
            "X-Custom: =?iso-8859-1?Q?caf=E9?=\r\n",
            "MIME-Version: 1.0\r\n",
            "Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n",
            "--b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n",
            "SGFsbG8gV2VsdA==\r\n",
            "--b\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n",
            "Gr=FC=DFe, soft=\r\nbreak\r\n",
            "--b\r\nContent-Type: application/pdf; name=\"inv.pdf\"\r\nContent-Disposition: attachment; filename=\"inv.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n",
            "JVBERi0=\r\n--b--\r\n"
        );
        let f = extract(raw.as_bytes(), LIMITS);
        assert_eq!(f.subject, "Rechnung für März");
        assert_eq!(f.header_values("X-Custom").next(), Some("café"));
        assert!(f.text.contains("Hallo Welt"), "{}", f.text);
        assert!(f.text.contains("Grüße, softbreak"), "{}", f.text);
        assert_eq!(
            f.attachments,
            vec![Attachment { name: Some("inv.pdf".into()), content_type: "application/pdf".into(), size: 5 }]
        );
    }

    #[test]
    fn html_only_becomes_text() {
        let raw = "Subject: x\r\nContent-Type: text/html\r\n\r\n<html><body><p>Your <b>invoice</b> is due</p><script>x()</script></body></html>\r\n";
        let f = extract(raw.as_bytes(), LIMITS);
        assert!(f.text.contains("Your invoice is due"), "{:?}", f.text);
        assert!(!f.text.contains('<'), "{:?}", f.text);
    }

    #[test]
    fn eight_bit_latin1_body() {
        let mut raw =
            b"Subject: x\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
                .to_vec();
        raw.extend_from_slice(b"Caf\xe9 cr\xe8me\r\n");
        assert_eq!(extract(&raw, LIMITS).text, "Café crème");
    }

    #[test]
    fn nested_rfc822_is_walked() {
        let raw = concat!(
            "Subject: Fwd\r\nContent-Type: multipart/mixed; boundary=\"o\"\r\n\r\n",
            "--o\r\nContent-Type: text/plain\r\n\r\nsee below\r\n",
            "--o\r\nContent-Type: message/rfc822\r\n\r\n",
            "Subject: Inner invoice\r\nContent-Type: text/plain\r\n\r\ninner body\r\n",
            "--o--\r\n"
        );
        let f = extract(raw.as_bytes(), LIMITS);
        assert!(
            f.text.contains("see below") && f.text.contains("Inner invoice") && f.text.contains("inner body"),
            "{:?}",
            f.text
        );
    }

    #[test]
    fn bounds_are_applied_and_reported() {
        let body = "word ".repeat(10_000);
        let raw = format!("Subject: big\r\n\r\n{body}");
        let f = extract(raw.as_bytes(), ExtractLimits { max_bytes: 1 << 20, max_text_chars: 100, max_headers: 10 });
        assert_eq!(f.text.chars().count(), 100);
        assert!(f.truncated);
        let f = extract(raw.as_bytes(), ExtractLimits { max_bytes: 1000, max_text_chars: 100_000, max_headers: 10 });
        assert_eq!(f.bytes_read, 1000);
        assert!(f.truncated);
        let many: String = (0..50).map(|i| format!("X-H{i}: v\r\n")).collect::<String>() + "\r\nb";
        let f = extract(many.as_bytes(), ExtractLimits { max_bytes: 1 << 20, max_text_chars: 100, max_headers: 10 });
        assert_eq!(f.headers.len(), 10);
        assert!(f.truncated);
    }

    #[test]
    fn garbage_never_panics() {
        for raw in [
            &b""[..],
            b"\0\0\0",
            b"From nobody",
            b"Content-Type: multipart/mixed; boundary=\r\n\r\n--\r\n",
            &[0xff; 300],
        ] {
            let _ = extract(raw, LIMITS);
        }
        // mbox envelope line is skipped
        let f = extract(b"From a@b Mon Jan  1 00:00:00 2001\nSubject: s\n\nbody\n", LIMITS);
        assert_eq!(f.subject, "s");
    }
}
