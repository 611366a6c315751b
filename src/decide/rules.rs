//! The admins' header and envelope rules: ordered, compiled once, first match
//! decides.

use regex::Regex;

use crate::message::envelope::Envelope;
use crate::message::extract::Features;
use crate::settings::{RuleAction, RuleConfig};

/// What a rule's pattern is matched against.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// Every top-level header with this name (any occurrence may match).
    Header(String),
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
                    h => Target::Header(h.to_string()),
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
        self.rules.iter().find(|r| r.matches(envelope, features)).map(|r| match &r.department {
            Some(department) => Hit::Route(RuleMatch { rule: &r.name, department, priority: r.priority.as_deref() }),
            None => Hit::Skip(&r.name),
        })
    }
}

impl Rule {
    fn matches(&self, envelope: &Envelope, features: &Features) -> bool {
        match &self.target {
            Target::EnvelopeFrom => self.regex.is_match(&envelope.mail_from),
            Target::EnvelopeTo => envelope.rcpts.iter().any(|r| self.regex.is_match(r)),
            Target::Header(name) => features.header_values(name).any(|v| self.regex.is_match(v)),
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
