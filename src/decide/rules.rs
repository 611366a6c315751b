//! The admins' header and envelope rules: ordered, compiled once, first match
//! decides.

use regex::Regex;
use serde::Serialize;

use crate::message::envelope::Envelope;
use crate::message::extract::Features;
use crate::settings::{RuleAction, RuleConfig};

/// What a rule's pattern is matched against.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// Every top-level header with this name (any occurrence may match).
    /// An address header (From, To, Reply-To…) matches on its whole value
    /// (`Alice <alice@vendor.example>`) or on any address in it alone
    /// (`alice@vendor.example`), so `@vendor\.example$` does what it says;
    /// `addresses` says which, decided once when the rule is built.
    Header {
        name: String,
        addresses: bool,
    },
    EnvelopeFrom,
    /// Any envelope recipient.
    EnvelopeTo,
}

#[derive(Debug, Clone)]
struct Rule {
    name: String,
    target: Target,
    regex: Regex,
    /// `None`: a `skip` rule.
    department: Option<String>,
    priority: Option<String>,
}

/// The rule that decided a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleMatch<'a> {
    pub rule: &'a str,
    pub department: &'a str,
    pub priority: Option<&'a str>,
}

/// What the first matching rule says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hit<'a> {
    Route(RuleMatch<'a>),
    /// A `skip` rule, by name: the message is not triaged.
    Skip(&'a str),
}

#[cfg(test)]
impl<'a> Hit<'a> {
    pub fn rule(&self) -> &'a str {
        match self {
            Hit::Route(m) => m.rule,
            Hit::Skip(r) => r,
        }
    }
}

/// A rule whose pattern does not compile. Config validation catches this
/// first; the type exists so a `RuleSet` can be built from any slice.
#[derive(Debug, thiserror::Error)]
#[error("rule `{rule}`: invalid pattern: {source}")]
pub struct RuleError {
    pub rule: String,
    #[source]
    pub source: regex::Error,
}

#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
}

impl RuleSet {
    pub fn new(configs: &[RuleConfig]) -> Result<Self, RuleError> {
        let rules = configs
            .iter()
            .map(|c| {
                let target = match c.header.to_ascii_lowercase().as_str() {
                    "envelope-from" => Target::EnvelopeFrom,
                    "envelope-to" => Target::EnvelopeTo,
                    h => Target::Header { name: h.to_string(), addresses: ADDRESS_HEADERS.contains(&h) },
                };
                let regex = match c.compiled.get() {
                    Some(re) => re.clone(),
                    None => Regex::new(&c.pattern).map_err(|source| RuleError { rule: c.name.clone(), source })?,
                };
                Ok(Rule {
                    name: c.name.clone(),
                    target,
                    regex,
                    department: (c.action == RuleAction::Route).then(|| c.department.clone().unwrap_or_default()),
                    priority: c.priority.clone(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { rules })
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// The first rule, in configuration order, that matches.
    pub fn first_match(&self, envelope: &Envelope, features: &Features) -> Option<Hit<'_>> {
        self.rules.iter().find(|r| r.matched(envelope, features).is_some()).map(|r| match &r.department {
            Some(department) => Hit::Route(RuleMatch { rule: &r.name, department, priority: r.priority.as_deref() }),
            None => Hit::Skip(&r.name),
        })
    }

    /// Every rule in order with what became of it, up to the first match
    /// (those after it are not tried): `classify --explain`. Carries
    /// message content (the values tried): never for logs.
    pub fn trace(&self, envelope: &Envelope, features: &Features) -> Vec<RuleTrace> {
        let mut out = Vec::with_capacity(self.rules.len());
        let mut decided = false;
        for r in &self.rules {
            let result = if decided {
                TraceResult::NotTried
            } else if let Some(value) = r.matched(envelope, features) {
                decided = true;
                TraceResult::Matched { value: value.to_string() }
            } else {
                let tried = r.values(envelope, features);
                if tried.is_empty() {
                    TraceResult::Absent
                } else {
                    TraceResult::NoMatch { tried }
                }
            };
            out.push(RuleTrace {
                rule: r.name.clone(),
                header: r.target.to_string(),
                pattern: r.regex.as_str().to_string(),
                result,
            });
        }
        out
    }
}

/// One rule as `classify --explain` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleTrace {
    pub rule: String,
    pub header: String,
    pub pattern: String,
    #[serde(flatten)]
    pub result: TraceResult,
}

/// Why a rule did or did not decide.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum TraceResult {
    /// The pattern matched this value (a header's, an address in it, or an envelope address).
    Matched { value: String },
    /// The pattern matched none of these values.
    NoMatch { tried: Vec<String> },
    /// The message has no such header (or no envelope sender / recipient).
    Absent,
    /// An earlier rule decided.
    NotTried,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Header { name, .. } => f.write_str(name),
            Target::EnvelopeFrom => f.write_str("envelope-from"),
            Target::EnvelopeTo => f.write_str("envelope-to"),
        }
    }
}

/// Headers whose values are address lists (RFC 5322 §3.6.2–3, §3.6.6).
const ADDRESS_HEADERS: &[&str] = &[
    "from",
    "sender",
    "reply-to",
    "to",
    "cc",
    "bcc",
    "resent-from",
    "resent-sender",
    "resent-to",
    "resent-cc",
    "return-path",
    "delivered-to",
];

/// The bare addresses of an address-list header value: its items split at
/// commas outside quotes and angle brackets, each item's `<…>` or, without
/// one, the item itself (a trailing `(comment)` dropped) when it has an `@`.
fn addresses(value: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut start, mut quoted, mut angle) = (0, false, false);
    for (i, c) in value.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '<' if !quoted => angle = true,
            '>' if !quoted => angle = false,
            ',' if !quoted && !angle => {
                items.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&value[start..]);
    items
        .into_iter()
        .filter_map(|item| match (item.rfind('<'), item.rfind('>')) {
            (Some(open), Some(close)) if open < close => Some(item[open + 1..close].trim()),
            _ => Some(item.split('(').next().unwrap_or("").trim()).filter(|a| a.contains('@')),
        })
        .filter(|a| !a.is_empty())
        .collect()
}

impl Rule {
    /// The value the pattern matched, if any.
    fn matched<'a>(&'a self, envelope: &'a Envelope, features: &'a Features) -> Option<&'a str> {
        let hit = |v: &'a str| self.regex.is_match(v).then_some(v);
        match &self.target {
            Target::EnvelopeFrom => hit(&envelope.mail_from),
            Target::EnvelopeTo => envelope.rcpts.iter().find_map(|r| hit(r)),
            Target::Header { name, addresses: address } => features
                .header_values(name)
                .find_map(|v| hit(v).or_else(|| if *address { addresses(v).into_iter().find_map(hit) } else { None })),
        }
    }

    /// The values the pattern is tried on.
    fn values(&self, envelope: &Envelope, features: &Features) -> Vec<String> {
        match &self.target {
            Target::EnvelopeFrom => vec![envelope.mail_from.clone()],
            Target::EnvelopeTo => envelope.rcpts.clone(),
            Target::Header { name, .. } => features.header_values(name).map(str::to_string).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::extract::{extract, ExtractLimits};

    fn rule(name: &str, header: &str, pattern: &str, dept: &str) -> RuleConfig {
        RuleConfig {
            name: name.into(),
            header: header.into(),
            pattern: pattern.into(),
            department: Some(dept.into()),
            action: RuleAction::Route,
            priority: None,
            compiled: Default::default(),
        }
    }

    fn features(raw: &str) -> Features {
        extract(raw.as_bytes(), ExtractLimits { max_bytes: 1 << 20, max_text_chars: 1000, max_headers: 100 })
    }

    #[test]
    fn first_match_in_order_wins() {
        let set = RuleSet::new(&[
            rule("vip", "envelope-from", "@ceo\\.example$", "exec"),
            rule("invoices", "subject", "(?i)\\binvoice\\b", "billing"),
            rule("catch-invoice-too", "Subject", "(?i)invoice", "other"),
        ])
        .unwrap();
        let f = features("Subject: Your INVOICE 42\r\n\r\nx");
        let env =
            Envelope { mail_from: "a@shop.example".into(), rcpts: vec!["u@corp.example".into()], ..Default::default() };
        assert_eq!(set.first_match(&env, &f).unwrap().rule(), "invoices");
        let env = Envelope { mail_from: "boss@ceo.example".into(), ..env };
        let Some(Hit::Route(m)) = set.first_match(&env, &f) else { panic!("a route") };
        assert_eq!(m.department, "exec");
    }

    #[test]
    fn an_address_header_matches_on_the_bare_address_too() {
        let set = RuleSet::new(&[
            rule("vendor", "From", "@vendor\\.example$", "purchasing"),
            rule("cc-legal", "Cc", "^legal@corp\\.example$", "legal"),
            rule("display", "From", "^Alice ", "alice"),
        ])
        .unwrap();
        let hit = |raw: &str| set.first_match(&Envelope::default(), &features(raw)).map(|h| h.rule());
        assert_eq!(hit("From: Alice Vendor <alice@vendor.example>\r\n\r\n"), Some("vendor"));
        assert_eq!(hit("From: \"Doe, John\" <john@vendor.example>\r\n\r\n"), Some("vendor"));
        assert_eq!(hit("From: bob@vendor.example (Bob)\r\n\r\n"), Some("vendor"));
        assert_eq!(
            hit("From: x@other.example\r\nCc: a@b.example, Legal <legal@corp.example>\r\n\r\n"),
            Some("cc-legal")
        );
        // A bare address beside a bracketed one counts too.
        assert_eq!(
            hit("From: x@other.example\r\nCc: legal@corp.example, Bob <bob@x.example>\r\n\r\n"),
            Some("cc-legal")
        );
        // The whole value still counts (a display-name pattern).
        assert_eq!(hit("From: Alice <alice@home.example>\r\n\r\n"), Some("display"));
        // Other headers are not taken apart: `<…>` in a Subject is text.
        let subject = RuleSet::new(&[rule("s", "Subject", "^x@y$", "d")]).unwrap();
        assert!(subject.first_match(&Envelope::default(), &features("Subject: see <x@y>\r\n\r\n")).is_none());
    }

    #[test]
    fn the_trace_says_why_each_rule_did_or_did_not_decide() {
        let set = RuleSet::new(&[
            rule("vip", "envelope-from", "@ceo\\.example$", "exec"),
            rule("lists", "List-Id", ".", "lists"),
            rule("invoices", "Subject", "(?i)invoice", "billing"),
            rule("later", "Subject", ".", "other"),
        ])
        .unwrap();
        let env = Envelope { mail_from: "a@shop.example".into(), ..Default::default() };
        let trace = set.trace(&env, &features("Subject: Invoice 7\r\n\r\nx"));
        let results: Vec<(&str, &TraceResult)> = trace.iter().map(|t| (t.rule.as_str(), &t.result)).collect();
        assert_eq!(
            results,
            [
                ("vip", &TraceResult::NoMatch { tried: vec!["a@shop.example".into()] }),
                ("lists", &TraceResult::Absent),
                ("invoices", &TraceResult::Matched { value: "Invoice 7".into() }),
                ("later", &TraceResult::NotTried),
            ]
        );
        let json = serde_json::to_value(&trace[2]).unwrap();
        assert_eq!(json["result"], "matched");
        assert_eq!(json["pattern"], "(?i)invoice");
        assert_eq!(json["value"], "Invoice 7");
        // The trace and first_match agree.
        assert_eq!(set.first_match(&env, &features("Subject: Invoice 7\r\n\r\nx")).unwrap().rule(), "invoices");
    }

    #[test]
    fn envelope_to_matches_any_recipient_and_headers_any_occurrence() {
        let set =
            RuleSet::new(&[rule("hr", "envelope-to", "^jobs@", "hr"), rule("list", "X-Tag", "^b$", "lists")]).unwrap();
        let env = Envelope {
            mail_from: String::new(),
            rcpts: vec!["x@c.example".into(), "jobs@c.example".into()],
            ..Default::default()
        };
        assert_eq!(set.first_match(&env, &features("Subject: s\r\n\r\n")).unwrap().rule(), "hr");
        let f = features("X-Tag: a\r\nX-Tag: b\r\n\r\n");
        assert_eq!(set.first_match(&Envelope::default(), &f).unwrap().rule(), "list");
        assert!(set.first_match(&Envelope::default(), &features("Subject: s\r\n\r\n")).is_none());
    }

    #[test]
    fn skip_rules_are_tried_in_order_with_the_others() {
        let skip = |name: &str, header: &str, pattern: &str| RuleConfig {
            department: None,
            action: RuleAction::Skip,
            ..rule(name, header, pattern, "")
        };
        let set = RuleSet::new(&[
            rule("vip", "envelope-from", "@ceo\\.example$", "exec"),
            skip("newsletters", "Subject", "(?i)newsletter"),
            rule("news-billing", "Subject", "(?i)newsletter", "billing"),
        ])
        .unwrap();
        let f = features("Subject: Our newsletter\r\n\r\n");
        assert_eq!(set.first_match(&Envelope::default(), &f), Some(Hit::Skip("newsletters")));
        let boss = Envelope { mail_from: "b@ceo.example".into(), ..Default::default() };
        assert!(matches!(set.first_match(&boss, &f), Some(Hit::Route(m)) if m.department == "exec"));
    }

    #[test]
    fn encoded_subjects_are_matched_decoded() {
        let set = RuleSet::new(&[rule("rechnung", "Subject", "Rechnung für", "billing")]).unwrap();
        let f = features("Subject: =?utf-8?Q?Rechnung_f=C3=BCr_M=C3=A4rz?=\r\n\r\n");
        assert!(set.first_match(&Envelope::default(), &f).is_some());
    }

    #[test]
    fn bad_pattern_names_the_rule() {
        let err = RuleSet::new(&[rule("broken", "Subject", "(", "x")]).unwrap_err();
        assert!(err.to_string().contains("broken"));
    }
}
