//! What types alone cannot check in a configuration file: references
//! between sections, regexes, addresses, ranges. Every problem is reported,
//! each naming its key, so an admin fixes the file in one pass.

use std::collections::HashSet;

use regex::Regex;

use super::file::Config;
use super::load::{ConfigError, Problem};
use super::relay::RelayTls;
use super::routing::RuleAction;
use crate::domain::Action;

impl Config {
    /// Checks what types alone cannot: references between sections, regexes,
    /// addresses. Reports every problem found, each naming its key.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        self.check(&mut problems);
        self.check_smtp(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid { path: origin.into(), problems })
        }
    }

    fn check(&self, problems: &mut Vec<Problem>) {
        let invalid = |key: String, message: String| Problem::new(key, message);
        let d = &self.defaults;
        if d.priorities.is_empty() {
            problems.push(invalid("defaults.priorities".into(), "at least one priority is needed".into()));
        }
        if !d.priorities.contains(&d.priority) {
            problems.push(invalid(
                "defaults.priority".into(),
                format!("`{}` is not one of defaults.priorities {:?}", d.priority, d.priorities),
            ));
        }
        if d.department.trim().is_empty() {
            problems.push(invalid("defaults.department".into(), "must not be empty".into()));
        }
        if let Some(f) = &self.feedback {
            if !(f.store.starts_with("sqlite://")
                || f.store.starts_with("postgres://")
                || f.store.starts_with("postgresql://"))
            {
                problems.push(invalid(
                    "feedback.store".into(),
                    "expected sqlite:///path/to/feedback.db or postgres://…".into(),
                ));
            }
            for (key, addr) in [("feedback.address", &f.address), ("feedback.audit_copy", &f.audit_copy)] {
                if let Some(a) = addr.as_deref().filter(|a| !valid_mailbox(a)) {
                    problems.push(invalid(key.into(), format!("`{a}` is not an address")));
                }
            }
            if f.holdout_percent == 0 || f.holdout_percent >= 100 {
                problems.push(invalid("feedback.holdout_percent".into(), "must be between 1 and 99".into()));
            }
            if f.retention_days == 0 {
                problems.push(invalid("feedback.retention_days".into(), "must be at least 1".into()));
            }
        }
        if self.kpi.minutes_per_manual_triage.is_nan() || self.kpi.minutes_per_manual_triage < 0.0 {
            problems.push(invalid("kpi.minutes_per_manual_triage".into(), "must be a number ≥ 0".into()));
        }
        let mut names = HashSet::new();
        for (i, dep) in self.departments.iter().enumerate() {
            let key = |field: &str| format!("departments[{i}] ({}).{field}", dep.name);
            if !valid_label(&dep.name) {
                problems.push(invalid(
                    key("name"),
                    "use letters, digits, `-`, `_` or `.` (it becomes a header value)".into(),
                ));
            }
            if !names.insert(dep.name.as_str()) {
                problems.push(invalid(key("name"), "duplicate department name".into()));
            }
            match (&dep.mailbox, dep.action) {
                (Some(m), _) if !valid_mailbox(m) => {
                    problems.push(invalid(key("mailbox"), format!("`{m}` is not an address like billing@example.com")));
                }
                (_, Action::Review) => problems.push(invalid(
                    key("action"),
                    "`review` is for unsure decisions: set policy.review_below and policy.review_mailbox".into(),
                )),
                (None, Action::Reroute | Action::Copy) => {
                    problems.push(invalid(
                        key("mailbox"),
                        format!("action `{:?}` needs a mailbox", dep.action).to_lowercase(),
                    ));
                }
                _ => {}
            }
        }
        for (i, r) in self.scope.recipients.iter().enumerate() {
            if !valid_scope_recipient(r) {
                problems.push(invalid(
                    format!("scope.recipients[{i}]"),
                    format!("`{r}` is neither an address (info@example.com) nor a domain (@example.com)"),
                ));
            }
        }
        for (i, l) in self.scope.skip_listeners.iter().enumerate() {
            if l.is_empty() || l.contains(char::is_whitespace) {
                problems.push(invalid(
                    format!("scope.skip_listeners[{i}]"),
                    format!("`{l}` is not a listener name (the MTA's {{daemon_name}}, e.g. `submission`)"),
                ));
            }
        }
        for (i, rule) in self.rules.iter().enumerate() {
            let key = |field: &str| format!("rules[{i}] ({}).{field}", rule.name);
            if rule.name.trim().is_empty() || !valid_label(&rule.name) {
                problems.push(invalid(
                    key("name"),
                    "use letters, digits, `-`, `_` or `.` (it becomes a header value)".into(),
                ));
            }
            if rule.header.trim().is_empty() || rule.header.contains(|c: char| c == ':' || c.is_whitespace()) {
                problems.push(invalid(key("header"), format!("`{}` is not a header name", rule.header)));
            }
            match Regex::new(&rule.pattern) {
                Ok(re) => {
                    let _ = rule.compiled.set(re);
                }
                Err(e) => problems.push(invalid(key("pattern"), format!("invalid regular expression: {e}"))),
            }
            match (rule.action, &rule.department) {
                (RuleAction::Route, None) => {
                    problems.push(invalid(key("department"), "a rule needs a department (or action = \"skip\")".into()))
                }
                (RuleAction::Skip, Some(_)) => problems.push(invalid(
                    key("department"),
                    "a `skip` rule leaves the message untriaged: remove its department".into(),
                )),
                (RuleAction::Route, Some(dep)) if !names.contains(dep.as_str()) && *dep != d.department => {
                    problems.push(invalid(key("department"), format!("`{dep}` is not a configured department")))
                }
                _ => {}
            }
            if let Some(p) = &rule.priority {
                if !d.priorities.contains(p) {
                    problems.push(invalid(
                        key("priority"),
                        format!("`{p}` is not one of defaults.priorities {:?}", d.priorities),
                    ));
                }
            }
        }
        let mut claimed: HashSet<&str> = HashSet::new();
        for (i, dep) in self.departments.iter().enumerate() {
            for l in &dep.labels {
                if !claimed.insert(l.as_str()) {
                    problems.push(invalid(
                        format!("departments[{i}] ({}).labels", dep.name),
                        format!("label `{l}` is claimed twice"),
                    ));
                }
            }
        }
        let p = &self.policy;
        if p.review_below.is_some_and(|r| !(0.0..=1.0).contains(&r)) {
            problems.push(invalid("policy.review_below".into(), "must be between 0 and 1".into()));
        }
        if p.target_accuracy.is_some_and(|t| !(t > 0.0 && t <= 1.0)) {
            problems.push(invalid("policy.target_accuracy".into(), "must be above 0 and at most 1 (e.g. 0.9)".into()));
        }
        match &p.review_mailbox {
            Some(m) if !valid_mailbox(m) => problems.push(invalid(
                "policy.review_mailbox".into(),
                format!("`{m}` is not an address like triage@example.com"),
            )),
            None if p.review_below.is_some_and(|r| r > 0.0) || p.target_accuracy.is_some() => problems.push(invalid(
                "policy.review_mailbox".into(),
                "review_below or target_accuracy is set, so a review mailbox is needed".into(),
            )),
            _ => {}
        }
        if let Some(a) = &self.audit {
            if a.max_bytes < 4096 {
                problems.push(invalid("audit.max_bytes".into(), "must be at least 4096".into()));
            }
            if a.retention_days == 0 {
                problems.push(invalid("audit.retention_days".into(), "must be at least 1".into()));
            }
        }
        if let Some(m) = &self.model {
            if m.id.trim().is_empty() {
                problems.push(invalid("model.id".into(), "must not be empty".into()));
            }
            if !(3..=8192).contains(&m.max_tokens) {
                problems.push(invalid("model.max_tokens".into(), "must be between 3 and 8192".into()));
            }
            if m.workers == 0 || m.workers > 64 {
                problems.push(invalid("model.workers".into(), "must be between 1 and 64".into()));
            }
            if m.queue_depth == 0 {
                problems.push(invalid("model.queue_depth".into(), "must be greater than 0".into()));
            }
            if m.deadline.is_zero() {
                problems.push(invalid("model.deadline".into(), "must be greater than 0".into()));
            }
        }
        let l = &self.limits;
        for (k, v) in [
            ("limits.max_frame_bytes", l.max_frame_bytes),
            ("limits.max_message_bytes", l.max_message_bytes),
            ("limits.max_text_chars", l.max_text_chars),
            ("limits.max_headers", l.max_headers),
            ("limits.max_recipients", l.max_recipients),
            ("limits.max_total_bytes", l.max_total_bytes),
            ("limits.max_smtp_message_bytes", l.max_smtp_message_bytes),
            ("server.max_connections", self.server.max_connections),
        ] {
            if v == 0 {
                problems.push(invalid(k.into(), "must be greater than 0".into()));
            }
        }
        // Postfix's body chunks are up to 65535 bytes; a smaller frame limit would drop every large message.
        if l.max_frame_bytes < 65_536 + 16 {
            problems.push(invalid(
                "limits.max_frame_bytes".into(),
                "must be at least 65552 (MTAs send 64 KiB body chunks)".into(),
            ));
        }
        if self.server.decision_timeout.is_zero() {
            problems.push(invalid("server.decision_timeout".into(), "must be greater than 0".into()));
        }
        if self.server.progress_interval.is_zero() {
            problems.push(invalid("server.progress_interval".into(), "must be greater than 0".into()));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.logging.level) {
            problems.push(invalid("logging.level".into(), format!("not a log filter: {e}")));
        }
    }

    /// The SMTP/LMTP front doors and their next hop.
    fn check_smtp(&self, problems: &mut Vec<Problem>) {
        let invalid = |key: &str, message: &str| Problem::new(key, message);
        let srv = &self.server;
        let listening = srv.smtp.is_some() || srv.lmtp.is_some();
        match (&srv.tls_cert, &srv.tls_key) {
            (Some(_), None) => problems.push(invalid("server.tls_key", "tls_cert is set, so a key is needed")),
            (None, Some(_)) => problems.push(invalid("server.tls_cert", "tls_key is set, so a certificate is needed")),
            (None, None) if srv.require_tls => {
                problems.push(invalid("server.require_tls", "needs tls_cert and tls_key to offer STARTTLS"))
            }
            _ => {}
        }
        if srv.hostname.is_empty() || !srv.hostname.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)) {
            problems.push(invalid("server.hostname", "must be a host name such as mx.example.com"));
        }
        if srv.smtp_timeout.is_zero() {
            problems.push(invalid("server.smtp_timeout", "must be greater than 0"));
        }
        if listening && self.relay.is_none() {
            problems
                .push(invalid("relay.next_hop", "server.smtp/lmtp need a [relay] next_hop to pass filtered mail to"));
        }
        if let Some(r) = &self.relay {
            if r.timeout.is_zero() || r.data_timeout.is_zero() {
                problems.push(invalid("relay.timeout", "timeouts must be greater than 0"));
            }
            if let Some(m) = &r.quarantine_mailbox {
                if !valid_mailbox(m) {
                    problems.push(invalid("relay.quarantine_mailbox", &format!("`{m}` is not an address")));
                }
            }
            if r.tls_ca_file.is_some() && r.tls != RelayTls::Verify {
                problems.push(invalid("relay.tls_ca_file", "only used with tls = \"verify\""));
            }
            if listening && r.quarantine_mailbox.is_none() {
                if let Some(d) = self.departments.iter().find(|d| d.action == Action::Quarantine) {
                    problems.push(invalid(
                        "relay.quarantine_mailbox",
                        &format!(
                            "department `{}` quarantines, and an SMTP/LMTP filter has no hold queue: \
                             name a mailbox to quarantine into",
                            d.name
                        ),
                    ));
                }
            }
        }
    }
}

/// Names that end up in header values: keep them token-like.
fn valid_label(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// A plain `local@domain` address (no display name, no brackets).
/// `local@domain` or `@domain`. Local parts may be UTF-8 (RFC 6531); they
/// are compared as given, never re-encoded.
fn valid_scope_recipient(s: &str) -> bool {
    match s.rsplit_once('@') {
        Some((local, domain)) => {
            !domain.is_empty()
                && !domain.contains('@')
                && !local.contains('@')
                && !s.chars().any(|c| c.is_whitespace() || c.is_control() || "<>,;\"".contains(c))
        }
        None => false,
    }
}

fn valid_mailbox(s: &str) -> bool {
    match s.rsplit_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.is_empty()
                && domain.contains('.') | (domain == "localhost")
                && s.chars().all(|c| c.is_ascii_graphic() && !"<>(),;:\"[]\\".contains(c))
        }
        None => false,
    }
}
