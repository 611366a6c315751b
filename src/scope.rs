//! Which mail is triaged, and for which of its recipients (`[scope]`).
//!
//! The first stage after a front door: from the envelope (recipients,
//! sender, the client's address, authentication and listener) and a glance
//! at the header block, a message is either [`Scoped::Skip`]ped (it passes
//! unchanged but for the removal of inbound `X-Triage-*` headers) or
//! triaged for its in-scope recipients only; a reroute replaces those and
//! no other. Automatic mail that is triaged is never rerouted (a bounce or
//! a vacation reply must not loop between a department and the outside).

use serde::Serialize;

use crate::message::envelope::Envelope;
use crate::message::headers::{self, is_triage_header};
use crate::settings::{Cidr, ScopeConfig};

/// Why a message is not triaged. Its `reason` labels the metric and the
/// audit line; serde writes what `Display` does (`authenticated`,
/// `rule:newsletters`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// No recipient is in `scope.recipients`.
    Recipients,
    /// The client authenticated (`scope.skip_authenticated`).
    Authenticated,
    /// The client is in `scope.skip_networks`.
    Network,
    /// The listener is in `scope.skip_listeners`.
    Listener,
    /// Automatic mail (`scope.skip_auto`).
    Auto(Auto),
    /// A trusted relay's mailtriage triaged it already (its headers are kept).
    Triaged,
    /// An admin's `skip` rule, by name.
    Rule(String),
}

impl Skip {
    /// A short label: `mailtriage_skipped_total{reason}` and the audit line.
    pub fn reason(&self) -> &'static str {
        match self {
            Skip::Recipients => "recipients",
            Skip::Authenticated => "authenticated",
            Skip::Network => "network",
            Skip::Listener => "listener",
            Skip::Auto(a) => a.as_str(),
            Skip::Triaged => "triaged",
            Skip::Rule(_) => "rule",
        }
    }

    /// Whether the inbound `X-Triage-*` headers stay: only when they are a
    /// trusted hop's own.
    pub fn keeps_headers(&self) -> bool {
        matches!(self, Skip::Triaged)
    }
}

impl Serialize for Skip {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skip::Rule(name) => write!(f, "rule:{name}"),
            other => f.write_str(other.reason()),
        }
    }
}

/// What makes mail automatic (RFC 3834 and list conventions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Auto {
    /// `MAIL FROM:<>`: a bounce or a delivery report.
    NullSender,
    /// `Auto-Submitted:` other than `no` (vacation replies, notifications).
    AutoSubmitted,
    /// `List-Id:` (RFC 2919).
    MailingList,
    /// `Precedence: bulk`, `list` or `junk`.
    Bulk,
}

impl Auto {
    pub fn as_str(self) -> &'static str {
        match self {
            Auto::NullSender => "null_sender",
            Auto::AutoSubmitted => "auto_submitted",
            Auto::MailingList => "mailing_list",
            Auto::Bulk => "bulk",
        }
    }

    /// The first automatic mark of a message, if any.
    pub fn of(envelope: &Envelope, raw: &[u8]) -> Option<Auto> {
        if envelope.mail_from.is_empty() {
            return Some(Auto::NullSender);
        }
        let mut found = None;
        for f in headers::fields(raw) {
            let name = f.name(raw);
            let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
            let this = if is("Auto-Submitted") {
                // "no" (with optional comment/parameters) is the only human value.
                let v = f.value(raw);
                let word: Vec<u8> =
                    v.iter().take_while(|b| b.is_ascii_alphanumeric() || **b == b'-').copied().collect();
                (!word.eq_ignore_ascii_case(b"no")).then_some(Auto::AutoSubmitted)
            } else if is("List-Id") {
                Some(Auto::MailingList)
            } else if is("Precedence") {
                let v = f.value(raw);
                ["bulk", "list", "junk"].iter().any(|p| v.eq_ignore_ascii_case(p.as_bytes())).then_some(Auto::Bulk)
            } else {
                None
            };
            // Auto-Submitted is the standard; it wins over list conventions.
            match (found, this) {
                (_, Some(Auto::AutoSubmitted)) => return Some(Auto::AutoSubmitted),
                (None, Some(a)) => found = Some(a),
                _ => {}
            }
        }
        found
    }
}

/// A message to triage, and the part of its envelope that is ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InScope {
    /// The recipients a reroute may replace, in RCPT order.
    pub recipients: Vec<String>,
    /// Automatic mail triaged anyway (`skip_auto = false`): tag it, never
    /// reroute, copy or hold it.
    pub auto: Option<Auto>,
}

/// The scope stage's answer for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scoped {
    Triage(InScope),
    Skip(Skip),
}

/// One `scope.recipients` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    /// A whole address; the domain compared without case, the local part
    /// as given (RFC 5321 §2.4) but for ASCII case, which every MTA folds.
    Address { local: String, domain: String },
    /// `@domain`: every address at that domain (not its subdomains).
    Domain(String),
}

impl Pattern {
    fn parse(s: &str) -> Option<Pattern> {
        let (local, domain) = s.trim().rsplit_once('@')?;
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        if domain.is_empty() {
            return None;
        }
        Some(if local.is_empty() { Pattern::Domain(domain) } else { Pattern::Address { local: local.into(), domain } })
    }

    fn matches(&self, addr: &str) -> bool {
        let Some((local, domain)) = addr.rsplit_once('@') else { return false };
        let domain = domain.trim_end_matches('.');
        match self {
            Pattern::Domain(d) => domain.eq_ignore_ascii_case(d),
            Pattern::Address { local: l, domain: d } => {
                domain.eq_ignore_ascii_case(d) && local.as_bytes().eq_ignore_ascii_case(l.as_bytes())
            }
        }
    }
}

/// `[scope]`, ready to match.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// Empty: every recipient is in scope.
    recipients: Vec<Pattern>,
    skip_authenticated: bool,
    skip_networks: Vec<Cidr>,
    skip_listeners: Vec<String>,
    skip_auto: bool,
    trusted_relays: Vec<Cidr>,
}

impl From<&ScopeConfig> for Scope {
    fn from(c: &ScopeConfig) -> Self {
        Scope {
            // Validation rejected what does not parse.
            recipients: c.recipients.iter().filter_map(|r| Pattern::parse(r)).collect(),
            skip_authenticated: c.skip_authenticated,
            skip_networks: c.skip_networks.clone(),
            skip_listeners: c.skip_listeners.clone(),
            skip_auto: c.skip_auto,
            trusted_relays: c.trusted_relays.clone(),
        }
    }
}

impl Scope {
    /// Whether `addr` is one of the recipients this instance triages for.
    pub fn owns(&self, addr: &str) -> bool {
        self.recipients.is_empty() || self.recipients.iter().any(|p| p.matches(addr))
    }

    /// Decides whether a message is triaged. `triage_headers` are the names
    /// of its inbound `X-Triage-*` headers (what the front door collected);
    /// `raw` is read only for its header block.
    pub fn check(&self, envelope: &Envelope, triage_headers: &[String], raw: &[u8]) -> Scoped {
        let client = &envelope.client;
        let from_trusted = client.addr.is_some_and(|a| self.trusted_relays.iter().any(|n| n.contains(a)));
        if from_trusted && triage_headers.iter().any(|h| is_triage_header(h)) {
            return Scoped::Skip(Skip::Triaged);
        }
        if self.skip_authenticated && client.authenticated {
            return Scoped::Skip(Skip::Authenticated);
        }
        if client.addr.is_some_and(|a| self.skip_networks.iter().any(|n| n.contains(a))) {
            return Scoped::Skip(Skip::Network);
        }
        if client.listener.as_ref().is_some_and(|l| self.skip_listeners.iter().any(|s| s.eq_ignore_ascii_case(l))) {
            return Scoped::Skip(Skip::Listener);
        }
        let recipients: Vec<String> = envelope.rcpts.iter().filter(|r| self.owns(r)).cloned().collect();
        // No recipient at all happens only offline (`classify` of a file
        // without To or Cc): decided when the scope covers everyone.
        if recipients.is_empty() && !(envelope.rcpts.is_empty() && self.recipients.is_empty()) {
            return Scoped::Skip(Skip::Recipients);
        }
        let auto = Auto::of(envelope, raw);
        match auto {
            Some(a) if self.skip_auto => Scoped::Skip(Skip::Auto(a)),
            auto => Scoped::Triage(InScope { recipients, auto }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::envelope::Client;

    fn scope(toml: &str) -> Scope {
        let cfg = crate::settings::Config::from_toml(&format!("[scope]\n{toml}"), "t").unwrap();
        Scope::from(&cfg.scope)
    }

    fn env(from: &str, rcpts: &[&str]) -> Envelope {
        Envelope { mail_from: from.into(), rcpts: rcpts.iter().map(|r| r.to_string()).collect(), ..Default::default() }
    }

    fn check(s: &Scope, e: &Envelope, raw: &str) -> Scoped {
        let names: Vec<String> = headers::names(raw.as_bytes());
        s.check(e, &names, raw.as_bytes())
    }

    #[test]
    fn recipients_by_address_and_domain_ignoring_ascii_case() {
        let s = scope(r#"recipients = ["info@example.com", "@support.example.com", "Jörg@example.com"]"#);
        assert!(s.owns("INFO@Example.COM"));
        assert!(s.owns("anyone@support.example.com"));
        assert!(s.owns("x@SUPPORT.example.com."), "a trailing root dot is the same domain");
        assert!(!s.owns("anyone@sub.support.example.com"), "@domain does not take subdomains");
        assert!(!s.owns("ceo@example.com"));
        assert!(!s.owns("info"));
        // UTF-8 local parts are compared as bytes (only ASCII case folds).
        assert!(s.owns("jörg@example.com"));
        assert!(!s.owns("JÖRG@example.com"));
        let e = env("a@outside.example", &["info@example.com", "ceo@example.com", "x@support.example.com"]);
        assert_eq!(
            check(&s, &e, "Subject: hi\r\n\r\n"),
            Scoped::Triage(InScope {
                recipients: vec!["info@example.com".into(), "x@support.example.com".into()],
                auto: None
            })
        );
        assert_eq!(check(&s, &env("a@o.example", &["ceo@example.com"]), ""), Scoped::Skip(Skip::Recipients));
        // No recipients listed: all are in scope.
        let all = scope("");
        assert_eq!(
            check(&all, &env("a@o.example", &["ceo@example.com"]), ""),
            Scoped::Triage(InScope { recipients: vec!["ceo@example.com".into()], auto: None })
        );
    }

    #[test]
    fn authenticated_networks_and_listeners_are_skipped() {
        let s = scope(
            r#"skip_networks = ["10.0.0.0/8", "2001:db8::/32"]
skip_listeners = ["submission"]"#,
        );
        let mut e = env("staff@example.com", &["customer@outside.example"]);
        assert!(matches!(check(&s, &e, ""), Scoped::Triage(_)));
        e.client = Client { authenticated: true, ..Default::default() };
        assert_eq!(check(&s, &e, ""), Scoped::Skip(Skip::Authenticated));
        e.client = Client { addr: Some("10.1.2.3".parse().unwrap()), ..Default::default() };
        assert_eq!(check(&s, &e, ""), Scoped::Skip(Skip::Network));
        e.client = Client { addr: Some("::ffff:10.1.2.3".parse().unwrap()), ..Default::default() };
        assert_eq!(check(&s, &e, ""), Scoped::Skip(Skip::Network), "IPv4-mapped counts as IPv4");
        e.client = Client { addr: Some("2001:db8::25".parse().unwrap()), ..Default::default() };
        assert_eq!(check(&s, &e, ""), Scoped::Skip(Skip::Network));
        e.client = Client {
            addr: Some("192.0.2.1".parse().unwrap()),
            listener: Some("Submission".into()),
            ..Default::default()
        };
        assert_eq!(check(&s, &e, ""), Scoped::Skip(Skip::Listener));
        e.client.listener = Some("mx.example.com".into());
        assert!(matches!(check(&s, &e, ""), Scoped::Triage(_)));
        // skip_authenticated can be turned off.
        let keep = scope("skip_authenticated = false");
        e.client = Client { authenticated: true, ..Default::default() };
        assert!(matches!(check(&keep, &e, ""), Scoped::Triage(_)));
    }

    #[test]
    fn automatic_mail_is_skipped_or_only_tagged() {
        let s = scope("");
        let e = env("a@o.example", &["info@example.com"]);
        let skip = |raw: &str| check(&s, &e, raw);
        assert_eq!(check(&s, &env("", &["info@example.com"]), ""), Scoped::Skip(Skip::Auto(Auto::NullSender)));
        assert_eq!(skip("Auto-Submitted: auto-replied\r\n\r\n"), Scoped::Skip(Skip::Auto(Auto::AutoSubmitted)));
        assert_eq!(
            skip("auto-submitted: Auto-Generated (vacation)\r\n\r\n"),
            Scoped::Skip(Skip::Auto(Auto::AutoSubmitted))
        );
        assert!(matches!(skip("Auto-Submitted: no\r\n\r\n"), Scoped::Triage(_)));
        assert!(matches!(skip("Auto-Submitted: No (comment)\r\n\r\n"), Scoped::Triage(_)));
        assert_eq!(skip("List-Id: <l.example.com>\r\n\r\n"), Scoped::Skip(Skip::Auto(Auto::MailingList)));
        assert_eq!(skip("Precedence: BULK\r\n\r\n"), Scoped::Skip(Skip::Auto(Auto::Bulk)));
        assert!(matches!(skip("Precedence: first-class\r\n\r\n"), Scoped::Triage(_)));
        assert_eq!(
            skip("List-Id: <l>\r\nAuto-Submitted: auto-generated\r\n\r\n"),
            Scoped::Skip(Skip::Auto(Auto::AutoSubmitted)),
            "the standard mark wins"
        );
        // In the body it is not a header.
        assert!(matches!(skip("Subject: s\r\n\r\nList-Id: <x>\r\n"), Scoped::Triage(_)));
        // skip_auto = false: triaged, marked so it is only tagged.
        let tag = scope("skip_auto = false");
        assert_eq!(
            check(&tag, &e, "Precedence: list\r\n\r\n"),
            Scoped::Triage(InScope { recipients: vec!["info@example.com".into()], auto: Some(Auto::Bulk) })
        );
    }

    #[test]
    fn our_headers_count_only_from_a_trusted_relay() {
        let s = scope(r#"trusted_relays = ["192.0.2.10"]"#);
        let raw = "X-Triage-Action: reroute\r\nSubject: s\r\n\r\n";
        let mut e = env("a@o.example", &["billing@example.com"]);
        e.client.addr = Some("192.0.2.10".parse().unwrap());
        assert_eq!(check(&s, &e, raw), Scoped::Skip(Skip::Triaged));
        assert!(Skip::Triaged.keeps_headers());
        // The same headers from anyone else are a sender's forgery: triaged (and stripped).
        e.client.addr = Some("198.51.100.7".parse().unwrap());
        assert!(matches!(check(&s, &e, raw), Scoped::Triage(_)));
        // From the trusted relay without our headers: not triaged there, so here.
        e.client.addr = Some("192.0.2.10".parse().unwrap());
        assert!(matches!(check(&s, &e, "Subject: s\r\n\r\n"), Scoped::Triage(_)));
        assert_eq!(Skip::Rule("lists".into()).to_string(), "rule:lists");
        assert_eq!(Skip::Auto(Auto::NullSender).reason(), "null_sender");
        assert_eq!(serde_json::to_value(Skip::Rule("lists".into())).unwrap(), "rule:lists");
        assert_eq!(serde_json::to_value(Skip::Auto(Auto::Bulk)).unwrap(), "bulk");
    }
}
