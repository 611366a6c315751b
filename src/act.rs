//! A [`Decision`] becomes a [`Plan`]: the exact list of header and recipient
//! changes a front door applies. The plan is plain data, so `classify` can
//! print what the milter would do and tests can check it without a network.

use std::collections::HashMap;

use serde::Serialize;

use crate::decide::policy::{Action, Decision, Explanation};
use crate::message::envelope::Envelope;
use crate::message::headers;
use crate::scope::InScope;
use crate::settings::Mode;

use crate::message::headers::{is_triage_header, HEADER_PREFIX};

/// One change to the message or its envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    /// Delete the `index`-th (1-based) header called `name` (case-insensitive).
    RemoveHeader {
        name: String,
        index: u32,
    },
    /// Append a header at the end of the header block.
    AddHeader {
        name: String,
        value: String,
    },
    DeleteRecipient {
        address: String,
    },
    AddRecipient {
        address: String,
    },
    /// Hold the message in the MTA's quarantine (Postfix: the hold queue).
    Quarantine {
        reason: String,
    },
    /// Accept the message and deliver it to nobody (feedback mail once
    /// recorded). Any other change in the plan is moot.
    Discard {
        reason: String,
    },
}

/// The changes for one message, in the order they must be applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub changes: Vec<Change>,
}

impl Plan {
    /// Only the removal of inbound `X-Triage-*` headers. Used when no decision
    /// could be made: a sender must not route its own mail by making us fail.
    pub fn strip_inbound(header_names: &[String]) -> Plan {
        Plan { changes: inbound_removals(header_names) }
    }

    /// The full plan for a decision. A reroute or review replaces only the
    /// recipients in `scope` (each named in an `X-Triage-Original-Recipient`
    /// header); every other recipient keeps the message.
    pub fn for_decision(decision: &Decision, envelope: &Envelope, scope: &InScope, header_names: &[String]) -> Plan {
        let mut changes = inbound_removals(header_names);
        let header = |name: &str, value: String| Change::AddHeader { name: format!("{HEADER_PREFIX}{name}"), value };
        changes.push(header("Department", decision.department.to_string()));
        changes.push(header("Priority", decision.priority.to_string()));
        changes.push(header("Confidence", format!("{:.2}", decision.confidence.clamp(0.0, 1.0))));
        changes.push(header("Source", decision.source.to_string()));
        changes.push(header("Action", decision.action.as_str().into()));
        if let Some(v) = &decision.model_version {
            changes.push(header("Model-Version", v.clone()));
        }
        if decision.mode == Mode::Shadow {
            // Admins comparing shadow results must see that nothing was rerouted.
            changes.push(header("Mode", "shadow".into()));
            return Plan { changes };
        }
        let has = |addr: &str| envelope.rcpts.iter().any(|r| r.eq_ignore_ascii_case(addr));
        match (decision.action, decision.mailbox.as_deref()) {
            (Action::Reroute | Action::Review, Some(mailbox)) => {
                let replaced: Vec<&String> =
                    scope.recipients.iter().filter(|r| !r.eq_ignore_ascii_case(mailbox)).collect();
                for r in &replaced {
                    changes.push(header("Original-Recipient", r.to_string()));
                }
                for r in replaced {
                    changes.push(Change::DeleteRecipient { address: r.clone() });
                }
                if !has(mailbox) {
                    changes.push(Change::AddRecipient { address: mailbox.into() });
                }
            }
            (Action::Copy, Some(mailbox)) if !has(mailbox) => {
                changes.push(Change::AddRecipient { address: mailbox.into() });
            }
            (Action::Quarantine, _) => {
                changes.push(Change::Quarantine { reason: format!("mailtriage: department {}", decision.department) });
            }
            _ => {}
        }
        Plan { changes }
    }

    /// Adds `X-Triage-Reason: runner-up support 0.12; terms: invoice / refund`.
    /// Non-ASCII terms become RFC 2047 encoded words, so the header stays
    /// 7-bit and mail clients show the words as written.
    pub fn add_reason(&mut self, e: &Explanation) {
        let mut value = match &e.runner_up {
            Some((label, p)) => format!("runner-up {} {p:.2}", encoded_word(label)),
            None => "no runner-up".to_string(),
        };
        if !e.terms.is_empty() {
            let terms: Vec<String> = e.terms.iter().map(|(t, _)| encoded_word(t)).collect();
            value += &format!("; terms: {}", terms.join(" / "));
        }
        self.changes.push(Change::AddHeader { name: format!("{HEADER_PREFIX}Reason"), value });
    }

    /// Whether the message is to be accepted and dropped.
    pub fn discards(&self) -> bool {
        self.changes.iter().any(|c| matches!(c, Change::Discard { .. }))
    }

    pub fn changes_recipients(&self) -> bool {
        self.changes.iter().any(|c| matches!(c, Change::DeleteRecipient { .. } | Change::AddRecipient { .. }))
    }

    /// The message with this plan's header changes made, for front doors that
    /// relay the bytes themselves (the milter asks the MTA instead). Removals
    /// count occurrences per name as the MTA would; added headers go at the end
    /// of the header block, with the message's own line ending.
    pub fn apply_to_message(&self, raw: &[u8]) -> Vec<u8> {
        let mut fields = headers::fields(raw);
        let end = fields.last().map_or(0, |f| f.end);
        for change in &self.changes {
            if let Change::RemoveHeader { name, index } = change {
                let nth = (*index as usize).checked_sub(1).and_then(|k| {
                    fields
                        .iter()
                        .enumerate()
                        .filter(|(_, f)| f.name(raw).eq_ignore_ascii_case(name.as_bytes()))
                        .nth(k)
                        .map(|(i, _)| i)
                });
                if let Some(i) = nth {
                    fields.remove(i);
                }
            }
        }
        let eol = line_ending(raw);
        let mut out = Vec::with_capacity(raw.len() + 256);
        for f in &fields {
            out.extend_from_slice(&raw[f.start..f.end]);
        }
        if !out.is_empty() && !out.ends_with(b"\n") {
            out.extend_from_slice(eol);
        }
        for change in &self.changes {
            if let Change::AddHeader { name, value } = change {
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(value.as_bytes());
                out.extend_from_slice(eol);
            }
        }
        if end == raw.len() {
            // Headers only: the body separator is still owed.
            out.extend_from_slice(eol);
        }
        out.extend_from_slice(&raw[end..]);
        out
    }

    /// The envelope recipients after this plan's recipient changes.
    pub fn apply_to_recipients(&self, rcpts: &[String]) -> Vec<String> {
        if self.discards() {
            return Vec::new();
        }
        let mut out: Vec<String> = rcpts.to_vec();
        for change in &self.changes {
            match change {
                Change::DeleteRecipient { address } => out.retain(|r| !r.eq_ignore_ascii_case(address)),
                Change::AddRecipient { address } if !out.iter().any(|r| r.eq_ignore_ascii_case(address)) => {
                    out.push(address.clone())
                }
                _ => {}
            }
        }
        out
    }
}

/// The message's own line ending: what its first line ends with (CRLF if none).
fn line_ending(raw: &[u8]) -> &'static [u8] {
    match raw.iter().position(|&b| b == b'\n') {
        Some(p) if p == 0 || raw[p - 1] != b'\r' => b"\n",
        _ => b"\r\n",
    }
}

/// A word as it may stand in an unstructured header: printable ASCII as is,
/// anything else (or a word that looks like an encoded word) as
/// `=?UTF-8?Q?…?=` (RFC 2047), cut to 40 characters first.
fn encoded_word(word: &str) -> String {
    let word: String = word.chars().take(40).collect();
    if word.bytes().all(|b| (0x21..0x7f).contains(&b) || b == b' ') && !word.contains("=?") {
        return word;
    }
    let mut out = String::from("=?UTF-8?Q?");
    for b in word.bytes() {
        match b {
            b' ' => out.push('_'),
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'!' | b'*' | b'+' | b'-' | b'/' => out.push(b as char),
            _ => out.push_str(&format!("={b:02X}")),
        }
    }
    out.push_str("?=");
    out
}

/// Removals for every inbound `X-Triage-*` header. Per name, the highest
/// index goes first, so each removal leaves the lower indices valid whether or
/// not the MTA renumbers after a delete.
fn inbound_removals(header_names: &[String]) -> Vec<Change> {
    let mut seen: HashMap<String, u32> = HashMap::new();
    let mut found = Vec::new();
    for name in header_names {
        let lower = name.to_ascii_lowercase();
        let count = seen.entry(lower.clone()).or_default();
        *count += 1;
        if is_triage_header(name) {
            found.push(Change::RemoveHeader { name: name.clone(), index: *count });
        }
    }
    found.reverse();
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::policy::Source;

    fn decision(action: Action, mode: Mode) -> Decision {
        Decision {
            department: "billing".into(),
            priority: "high".into(),
            confidence: 1.0,
            source: Source::Rule("invoices".into()),
            action,
            mailbox: Some("billing@example.com".into()),
            mode,
            model_version: None,
            classes: None,
        }
    }

    fn env(rcpts: &[&str]) -> Envelope {
        Envelope {
            mail_from: "s@x.example".into(),
            rcpts: rcpts.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    /// The plan with every recipient in scope.
    fn plan(d: &Decision, e: &Envelope, names: &[String]) -> Plan {
        Plan::for_decision(d, e, &InScope { recipients: e.rcpts.clone(), auto: None }, names)
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn reroute_replaces_recipients_after_headers() {
        let p = plan(&decision(Action::Reroute, Mode::Enforce), &env(&["a@x", "b@x"]), &[]);
        let tail: Vec<_> = p.changes[5..].to_vec();
        let original = |a: &str| Change::AddHeader { name: "X-Triage-Original-Recipient".into(), value: a.into() };
        assert_eq!(
            tail,
            vec![
                original("a@x"),
                original("b@x"),
                Change::DeleteRecipient { address: "a@x".into() },
                Change::DeleteRecipient { address: "b@x".into() },
                Change::AddRecipient { address: "billing@example.com".into() },
            ]
        );
        assert_eq!(p.changes[2], Change::AddHeader { name: "X-Triage-Confidence".into(), value: "1.00".into() });
        assert_eq!(p.changes[3], Change::AddHeader { name: "X-Triage-Source".into(), value: "rule:invoices".into() });
    }

    #[test]
    fn reroute_keeps_a_recipient_that_already_is_the_mailbox() {
        let p = plan(&decision(Action::Reroute, Mode::Enforce), &env(&["Billing@example.com", "b@x"]), &[]);
        assert!(!p.changes.iter().any(|c| matches!(c, Change::AddRecipient { .. })));
        assert_eq!(p.changes.iter().filter(|c| matches!(c, Change::DeleteRecipient { .. })).count(), 1);
    }

    #[test]
    fn reroute_replaces_only_the_recipients_in_scope_and_reaches_the_mailbox_once() {
        let e = env(&["info@example.com", "ceo@example.com", "contact@example.com"]);
        let scope = InScope { recipients: vec!["info@example.com".into(), "contact@example.com".into()], auto: None };
        for action in [Action::Reroute, Action::Review] {
            let p = Plan::for_decision(&decision(action, Mode::Enforce), &e, &scope, &[]);
            assert_eq!(p.apply_to_recipients(&e.rcpts), ["ceo@example.com", "billing@example.com"]);
            let originals: Vec<&str> = p
                .changes
                .iter()
                .filter_map(|c| match c {
                    Change::AddHeader { name, value } if name == "X-Triage-Original-Recipient" => Some(value.as_str()),
                    _ => None,
                })
                .collect();
            assert_eq!(originals, ["info@example.com", "contact@example.com"]);
            assert_eq!(p.changes.iter().filter(|c| matches!(c, Change::AddRecipient { .. })).count(), 1);
        }
        // The mailbox itself in scope: kept, not named as replaced.
        let scope = InScope { recipients: vec!["billing@example.com".into()], auto: None };
        let e = env(&["billing@example.com", "ceo@example.com"]);
        let p = Plan::for_decision(&decision(Action::Reroute, Mode::Enforce), &e, &scope, &[]);
        assert!(!p.changes_recipients());
        assert!(!p
            .changes
            .iter()
            .any(|c| matches!(c, Change::AddHeader { name, .. } if name.ends_with("Original-Recipient"))));
    }

    #[test]
    fn copy_adds_and_quarantine_holds() {
        let p = plan(&decision(Action::Copy, Mode::Enforce), &env(&["a@x"]), &[]);
        assert_eq!(p.changes.last(), Some(&Change::AddRecipient { address: "billing@example.com".into() }));
        assert!(!p.changes.iter().any(|c| matches!(c, Change::DeleteRecipient { .. })));
        let p = plan(&decision(Action::Quarantine, Mode::Enforce), &env(&["a@x"]), &[]);
        assert!(matches!(p.changes.last(), Some(Change::Quarantine { .. })));
        assert!(!p.changes_recipients());
    }

    #[test]
    fn shadow_mode_never_touches_recipients() {
        for action in [Action::Reroute, Action::Copy, Action::Review, Action::Quarantine] {
            let p = plan(&decision(action, Mode::Shadow), &env(&["a@x"]), &[]);
            assert!(!p.changes_recipients());
            assert!(!p.changes.iter().any(|c| matches!(c, Change::Quarantine { .. })));
            assert!(p.changes.contains(&Change::AddHeader { name: "X-Triage-Mode".into(), value: "shadow".into() }));
        }
    }

    #[test]
    fn plans_apply_to_raw_messages() {
        let raw = b"Received: a\r\nX-Triage-Department: ceo\r\nSubject: hi\r\n there\r\nx-triage-department: x\r\n\r\nbody\r\n";
        let names = headers::names(raw);
        assert_eq!(names, ["Received", "X-Triage-Department", "Subject", "x-triage-department"]);
        let p = plan(&decision(Action::Reroute, Mode::Enforce), &env(&["a@x", "b@x"]), &names);
        let out = String::from_utf8(p.apply_to_message(raw)).unwrap();
        assert_eq!(
            out,
            "Received: a\r\nSubject: hi\r\n there\r\nX-Triage-Department: billing\r\nX-Triage-Priority: high\r\n\
             X-Triage-Confidence: 1.00\r\nX-Triage-Source: rule:invoices\r\nX-Triage-Action: reroute\r\n\
             X-Triage-Original-Recipient: a@x\r\nX-Triage-Original-Recipient: b@x\r\n\r\nbody\r\n"
        );
        assert_eq!(p.apply_to_recipients(&["a@x".into(), "b@x".into()]), ["billing@example.com"]);
        let copy = plan(&decision(Action::Copy, Mode::Enforce), &env(&["a@x"]), &[]);
        assert_eq!(copy.apply_to_recipients(&["a@x".into()]), ["a@x", "billing@example.com"]);
        // LF-only, headers without a body, and no headers at all.
        let tag = Plan { changes: vec![Change::AddHeader { name: "X-Triage-A".into(), value: "1".into() }] };
        assert_eq!(tag.apply_to_message(b"Subject: x\n\nb\n"), b"Subject: x\nX-Triage-A: 1\n\nb\n");
        assert_eq!(tag.apply_to_message(b"Subject: x"), b"Subject: x\r\nX-Triage-A: 1\r\n\r\n");
        assert_eq!(tag.apply_to_message(b"\r\nbody"), b"X-Triage-A: 1\r\n\r\nbody");
        assert_eq!(tag.apply_to_message(b""), b"X-Triage-A: 1\r\n\r\n");
    }

    #[test]
    fn inbound_triage_headers_are_removed_highest_index_first() {
        let hdrs =
            names(&["Received", "X-Triage-Department", "Subject", "x-triage-department", "X-TRIAGE-Action", "X-Other"]);
        let p = Plan::strip_inbound(&hdrs);
        assert_eq!(
            p.changes,
            vec![
                Change::RemoveHeader { name: "X-TRIAGE-Action".into(), index: 1 },
                Change::RemoveHeader { name: "x-triage-department".into(), index: 2 },
                Change::RemoveHeader { name: "X-Triage-Department".into(), index: 1 },
            ]
        );
        let full = plan(&decision(Action::Tag, Mode::Enforce), &env(&["a@x"]), &hdrs);
        assert_eq!(full.changes[..3], p.changes[..]);
    }

    #[test]
    fn the_reason_header_is_7_bit_and_names_the_runner_up_and_terms() {
        let mut p = Plan::default();
        p.add_reason(&Explanation {
            runner_up: Some(("Customer Service".into(), 0.123)),
            terms: vec![("rechnung".into(), 1.2), ("grüße".into(), 0.5), ("=?x?=".into(), 0.1)],
        });
        let Change::AddHeader { name, value } = &p.changes[0] else { panic!("{p:?}") };
        assert_eq!(name, "X-Triage-Reason");
        assert_eq!(
            value,
            "runner-up Customer Service 0.12; terms: rechnung / =?UTF-8?Q?gr=C3=BC=C3=9Fe?= / =?UTF-8?Q?=3D=3Fx=3F=3D?="
        );
        assert!(value.is_ascii());
        let mut p = Plan::default();
        p.add_reason(&Explanation { runner_up: None, terms: vec![] });
        assert_eq!(p.changes[0], Change::AddHeader { name: "X-Triage-Reason".into(), value: "no runner-up".into() });
    }
}
