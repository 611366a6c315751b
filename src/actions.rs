//! A [`Decision`] becomes a [`Plan`]: the exact list of header and recipient
//! changes a front door applies. The plan is plain data, so `classify` can
//! print what the milter would do and tests can check it without a network.

use std::collections::HashMap;

use serde::Serialize;

use crate::config::Mode;
use crate::envelope::Envelope;
use crate::policy::{Action, Decision};

/// Every header we add starts with this; inbound ones are removed first.
pub const HEADER_PREFIX: &str = "X-Triage-";

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

    /// The full plan for a decision.
    pub fn for_decision(decision: &Decision, envelope: &Envelope, header_names: &[String]) -> Plan {
        let mut changes = inbound_removals(header_names);
        let header = |name: &str, value: String| Change::AddHeader { name: format!("{HEADER_PREFIX}{name}"), value };
        changes.push(header("Department", decision.department.clone()));
        changes.push(header("Priority", decision.priority.clone()));
        changes.push(header("Confidence", format!("{:.2}", decision.confidence.clamp(0.0, 1.0))));
        changes.push(header("Source", decision.source.to_string()));
        changes.push(header("Action", decision.action.as_str().into()));
        if decision.mode == Mode::Shadow {
            // Admins comparing shadow results must see that nothing was rerouted.
            changes.push(header("Mode", "shadow".into()));
            return Plan { changes };
        }
        let has = |addr: &str| envelope.rcpts.iter().any(|r| r.eq_ignore_ascii_case(addr));
        match (decision.action, decision.mailbox.as_deref()) {
            (Action::Reroute | Action::Review, Some(mailbox)) => {
                for r in envelope.rcpts.iter().filter(|r| !r.eq_ignore_ascii_case(mailbox)) {
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

    pub fn changes_recipients(&self) -> bool {
        self.changes.iter().any(|c| matches!(c, Change::DeleteRecipient { .. } | Change::AddRecipient { .. }))
    }
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
        if lower.starts_with(&HEADER_PREFIX.to_ascii_lowercase()) {
            found.push(Change::RemoveHeader { name: name.clone(), index: *count });
        }
    }
    found.reverse();
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Source;

    fn decision(action: Action, mode: Mode) -> Decision {
        Decision {
            department: "billing".into(),
            priority: "high".into(),
            confidence: 1.0,
            source: Source::Rule("invoices".into()),
            action,
            mailbox: Some("billing@example.com".into()),
            mode,
        }
    }

    fn env(rcpts: &[&str]) -> Envelope {
        Envelope {
            mail_from: "s@x.example".into(),
            rcpts: rcpts.iter().map(|s| s.to_string()).collect(),
            queue_id: None,
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn reroute_replaces_recipients_after_headers() {
        let p = Plan::for_decision(&decision(Action::Reroute, Mode::Enforce), &env(&["a@x", "b@x"]), &[]);
        let tail: Vec<_> = p.changes[5..].to_vec();
        assert_eq!(
            tail,
            vec![
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
        let p =
            Plan::for_decision(&decision(Action::Reroute, Mode::Enforce), &env(&["Billing@example.com", "b@x"]), &[]);
        assert!(!p.changes.iter().any(|c| matches!(c, Change::AddRecipient { .. })));
        assert_eq!(p.changes.iter().filter(|c| matches!(c, Change::DeleteRecipient { .. })).count(), 1);
    }

    #[test]
    fn copy_adds_and_quarantine_holds() {
        let p = Plan::for_decision(&decision(Action::Copy, Mode::Enforce), &env(&["a@x"]), &[]);
        assert_eq!(p.changes.last(), Some(&Change::AddRecipient { address: "billing@example.com".into() }));
        assert!(!p.changes.iter().any(|c| matches!(c, Change::DeleteRecipient { .. })));
        let p = Plan::for_decision(&decision(Action::Quarantine, Mode::Enforce), &env(&["a@x"]), &[]);
        assert!(matches!(p.changes.last(), Some(Change::Quarantine { .. })));
        assert!(!p.changes_recipients());
    }

    #[test]
    fn shadow_mode_never_touches_recipients() {
        for action in [Action::Reroute, Action::Copy, Action::Review, Action::Quarantine] {
            let p = Plan::for_decision(&decision(action, Mode::Shadow), &env(&["a@x"]), &[]);
            assert!(!p.changes_recipients());
            assert!(!p.changes.iter().any(|c| matches!(c, Change::Quarantine { .. })));
            assert!(p.changes.contains(&Change::AddHeader { name: "X-Triage-Mode".into(), value: "shadow".into() }));
        }
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
        let full = Plan::for_decision(&decision(Action::Tag, Mode::Enforce), &env(&["a@x"]), &hdrs);
        assert_eq!(full.changes[..3], p.changes[..]);
    }
}
