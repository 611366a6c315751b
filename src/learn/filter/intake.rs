//! Feedback mail: which recipients are the feedback address, what labels
//! their local part names, and the message the sender is correcting.
//!
//! `triage-feedback+billing@example.com` says "department billing";
//! `triage-feedback+billing+high@…` also "priority high". The corrected
//! message is the forwarded one: a `message/rfc822` attachment when there is
//! one (what "forward as attachment" makes), else the inline forward below a
//! "Forwarded message" line, else the whole mail without its `Fwd:`.

use std::panic::{catch_unwind, AssertUnwindSafe};

use mail_parser::{MessageParser, PartType};

use super::FeedbackError;
use crate::learn::correction::Labels;
use crate::message::extract::{extract, ExtractLimits};
use crate::model::model_text;
use crate::settings::Catalog;

/// The configured feedback address, split for matching.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedbackAddress {
    local: String,
    domain: String,
}

/// What a feedback recipient asks for: raw names, resolved later.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Requested {
    pub department: Option<String>,
    pub priority: Option<String>,
}

impl FeedbackAddress {
    /// `local@domain`; `None` when it is not an address.
    pub fn parse(address: &str) -> Option<FeedbackAddress> {
        let (local, domain) = address.trim().trim_matches(['<', '>']).rsplit_once('@')?;
        (!local.is_empty() && !domain.is_empty())
            .then(|| FeedbackAddress { local: local.to_lowercase(), domain: domain.to_lowercase() })
    }

    /// Whether `rcpt` is this address (with or without `+labels`), and what it asks for.
    pub fn requested(&self, rcpt: &str) -> Option<Requested> {
        let (local, domain) = rcpt.trim().trim_matches(['<', '>']).rsplit_once('@')?;
        if !domain.eq_ignore_ascii_case(&self.domain) {
            return None;
        }
        let local = local.to_lowercase();
        if local == self.local {
            return Some(Requested::default());
        }
        let rest = local.strip_prefix(&self.local)?.strip_prefix('+')?;
        let mut parts = rest.split('+').filter(|p| !p.is_empty()).map(str::to_string);
        Some(Requested { department: parts.next(), priority: parts.next() })
    }
}

/// Resolves requested names to head labels: a head label itself, or a
/// configured department (its first `labels` entry, else its name — a new
/// department the next retraining will learn).
pub fn resolve(
    catalog: &Catalog,
    department_labels: &[String],
    priority_labels: &[String],
    req: &Requested,
) -> Result<Labels, FeedbackError> {
    let department = req
        .department
        .as_deref()
        .map(|d| {
            if let Some(l) = department_labels.iter().find(|l| l.eq_ignore_ascii_case(d)) {
                return Ok(l.clone());
            }
            match catalog.department_ignoring_case(d) {
                Some(c) => Ok(c.labels.first().cloned().unwrap_or_else(|| c.id.to_string())),
                None => Err(FeedbackError::UnknownDepartment(
                    d.to_string(),
                    catalog.departments().iter().map(|c| c.id.as_str()).collect::<Vec<_>>().join(", "),
                )),
            }
        })
        .transpose()?;
    let priority = req
        .priority
        .as_deref()
        .map(|p| {
            priority_labels
                .iter()
                .find(|l| l.eq_ignore_ascii_case(p))
                .cloned()
                .ok_or_else(|| FeedbackError::UnknownPriority(p.to_string(), priority_labels.join(", ")))
        })
        .transpose()?;
    if department.is_none() && priority.is_none() {
        return Err(FeedbackError::NoLabel);
    }
    Ok(Labels { department, priority })
}

/// What a feedback message says was misrouted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    /// The corrected message's model text (subject + body).
    pub text: String,
    /// The Message-ID of an attached (forwarded-as-attachment) message.
    pub attached_id: Option<String>,
    /// The Message-ID of the message given, outer one.
    pub outer_id: Option<String>,
}

/// Finds the corrected message in a feedback message, parsing it once.
pub fn forwarded(raw: &[u8], limits: ExtractLimits) -> Forwarded {
    // Bounded and guarded as `extract` is: a parser bug costs this one
    // correction its attachment, never the session (found by fuzzing:
    // fuzz/regressions/intake/).
    let bounded = &raw[..raw.len().min(limits.max_bytes)];
    let attached = catch_unwind(AssertUnwindSafe(|| {
        MessageParser::new().parse(bounded).and_then(|outer| {
            outer.parts.iter().find_map(|p| match &p.body {
                PartType::Message(inner) => Some((inner.raw_message().to_vec(), outer.message_id().map(str::to_owned))),
                _ => None,
            })
        })
    }))
    .ok()
    .flatten();
    if let Some((inner, outer_id)) = attached {
        let f = extract(&inner, limits);
        return Forwarded { text: model_text(&f.subject, &f.text), attached_id: f.message_id, outer_id };
    }
    let outer = extract(raw, limits);
    let text = match inline_forward(&outer.text) {
        Some((subject, body)) => model_text(&subject, &body),
        None => model_text(strip_forward_prefix(&outer.subject), &outer.text),
    };
    Forwarded { text, attached_id: None, outer_id: outer.message_id }
}

/// Lines that start an inline forward in common clients (and their German,
/// French, Spanish forms).
const FORWARD_MARKERS: &[&str] = &[
    "forwarded message",
    "original message",
    "begin forwarded message",
    "weitergeleitete nachricht",
    "ursprüngliche nachricht",
    "message transféré",
    "message d'origine",
    "mensaje reenviado",
    "mensaje original",
];

/// Subject and body of an inline forward: after the marker, a block of
/// `Name: value` lines (From, Date, Subject/Betreff/Objet/Asunto, To), a blank
/// line, then the original body.
fn inline_forward(text: &str) -> Option<(String, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().position(|l| {
        let l = l.trim().trim_matches(|c: char| c == '-' || c == '_' || c.is_whitespace()).to_lowercase();
        FORWARD_MARKERS.iter().any(|m| l.starts_with(m)) && l.len() < 60
    })?;
    let mut subject = String::new();
    let mut i = start + 1;
    while i < lines.len() {
        let l = lines[i].trim();
        if l.is_empty() {
            if subject.is_empty() && i == start + 1 {
                i += 1;
                continue;
            }
            break;
        }
        match l.split_once(':') {
            Some((name, value)) if name.len() < 20 && !name.contains(' ') => {
                if ["subject", "betreff", "objet", "asunto", "assunto", "oggetto"]
                    .contains(&name.trim().to_lowercase().as_str())
                {
                    subject = value.trim().to_string();
                }
            }
            _ => break,
        }
        i += 1;
    }
    Some((subject, lines.get(i..).unwrap_or_default().join("\n")))
}

/// `Fwd: WG: Re: subject` → `Re: subject`.
fn strip_forward_prefix(subject: &str) -> &str {
    let mut s = subject.trim();
    loop {
        let lower = s.to_lowercase();
        match ["fwd:", "fw:", "wg:", "tr:", "rv:"].iter().find(|p| lower.starts_with(*p)) {
            Some(p) => s = s[p.len()..].trim_start(),
            None => return s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Config;

    fn cfg() -> Config {
        Config::from_toml(
            r#"
[[departments]]
name = "billing"
labels = ["Billing and Payments"]
[[departments]]
name = "legal"
"#,
            "t",
        )
        .unwrap()
    }

    #[test]
    fn recognises_the_address_with_and_without_labels() {
        let a = FeedbackAddress::parse("Triage-Feedback@Example.com").unwrap();
        assert_eq!(
            a.requested("<triage-feedback+billing+HIGH@example.COM>"),
            Some(Requested { department: Some("billing".into()), priority: Some("high".into()) })
        );
        assert_eq!(a.requested("triage-feedback@example.com"), Some(Requested::default()));
        assert_eq!(a.requested("triage-feedbackx+billing@example.com"), None);
        assert_eq!(a.requested("triage-feedback+billing@example.org"), None);
        assert_eq!(a.requested("alice@example.com"), None);
        assert!(FeedbackAddress::parse("nobody").is_none());
    }

    #[test]
    fn resolves_departments_to_head_labels() {
        let labels = vec!["Billing and Payments".to_string(), "Technical Support".to_string()];
        let prio = vec!["high".to_string(), "low".to_string()];
        let r = |d: &str, p: Option<&str>| {
            resolve(
                &cfg().catalog,
                &labels,
                &prio,
                &Requested { department: Some(d.into()), priority: p.map(Into::into) },
            )
        };
        assert_eq!(r("billing", Some("HIGH")).unwrap().department.as_deref(), Some("Billing and Payments"));
        assert_eq!(r("billing", Some("HIGH")).unwrap().priority.as_deref(), Some("high"));
        assert_eq!(r("technical support", None).unwrap().department.as_deref(), Some("Technical Support"));
        assert_eq!(r("legal", None).unwrap().department.as_deref(), Some("legal"));
        let e = r("hr", None).unwrap_err().to_string();
        assert!(e.contains("`hr`") && e.contains("billing, legal"), "{e}");
        assert!(r("billing", Some("urgent")).is_err());
        assert!(resolve(&cfg().catalog, &labels, &prio, &Requested::default()).is_err());
    }

    #[test]
    fn finds_the_forwarded_message() {
        let limits = ExtractLimits::from(&crate::settings::LimitsConfig::default());
        let attached = b"From: staff@example.com\r\nSubject: Fwd: wrong desk\r\nMessage-ID: <fwd@example.com>\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nthis belongs to billing\r\n\
--b\r\nContent-Type: message/rfc822\r\n\r\nFrom: c@x.example\r\nSubject: Refund for invoice 42\r\n\
Message-ID: <orig@x.example>\r\n\r\nPlease refund my card.\r\n--b--\r\n";
        let f = forwarded(attached, limits);
        assert_eq!(f.text, "Refund for invoice 42\nPlease refund my card.");
        assert_eq!(f.attached_id.as_deref(), Some("orig@x.example"));
        assert_eq!(f.outer_id.as_deref(), Some("fwd@example.com"));

        let inline = b"From: staff@example.com\r\nSubject: Fwd: Refund\r\n\r\nFYI\r\n\r\n\
---------- Forwarded message ---------\r\nFrom: c@x.example\r\nDate: Mon, 1 Jan 2024\r\n\
Subject: Refund for invoice 42\r\nTo: support@example.com\r\n\r\nPlease refund my card.\r\n";
        assert_eq!(forwarded(inline, limits).text, "Refund for invoice 42\nPlease refund my card.");

        let plain = b"Subject: Fwd: WG: Refund please\r\nMessage-ID: <p@x.example>\r\n\r\nPlease refund my card.\r\n";
        let f = forwarded(plain, limits);
        assert_eq!(f.text, "Refund please\nPlease refund my card.");
        assert_eq!((f.attached_id, f.outer_id.as_deref()), (None, Some("p@x.example")));
    }
}
