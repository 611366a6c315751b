//! The one-way path every message takes once a front door has it:
//! extract → rules → policy → plan.
//!
//! Front doors see only the [`Filter`] trait: they hand over an envelope and
//! raw bytes and get a [`Plan`] back, knowing nothing of how it was decided.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use thiserror::Error;

use crate::actions::Plan;
use crate::config::Config;
use crate::envelope::Envelope;
use crate::extract::{extract, ExtractLimits, Features};
use crate::policy::{Decision, Policy};
use crate::rules::{RuleError, RuleSet};

/// One message as a front door collected it.
#[derive(Debug, Clone, Default)]
pub struct MessageInput {
    pub envelope: Envelope,
    /// Header block and body, possibly cut at `limits.max_message_bytes`.
    pub raw: Vec<u8>,
    /// Names of every header as received, in order (for anti-spoofing
    /// removal, which must see all of them even past `max_headers`).
    pub header_names: Vec<String>,
}

/// Why no plan could be made. The front door then applies `on_error`.
#[derive(Debug, Error)]
pub enum FilterError {
    #[error("decision task failed: {0}")]
    Task(String),
}

/// What a front door calls to decide a message.
pub trait Filter: Send + Sync + 'static {
    fn filter(&self, msg: MessageInput) -> impl Future<Output = Result<Plan, FilterError>> + Send;
}

/// A decision with what led to it, for `classify` and for logs.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub decision: Decision,
    pub plan: Plan,
    #[serde(skip)]
    pub features: Features,
}

/// Rules and policy built from one configuration.
#[derive(Debug)]
pub struct Triage {
    rules: RuleSet,
    policy: Policy,
    limits: ExtractLimits,
}

impl Triage {
    pub fn new(cfg: &Config) -> Result<Self, RuleError> {
        Ok(Self {
            rules: RuleSet::new(&cfg.rules)?,
            policy: Policy::new(cfg),
            limits: ExtractLimits::from(&cfg.limits),
        })
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Decides one message (CPU-bound; call from a blocking context).
    pub fn decide(&self, envelope: &Envelope, raw: &[u8], header_names: &[String]) -> Outcome {
        self.decide_extracted(envelope, self.extract(raw), header_names)
    }

    /// Extraction under this configuration's limits.
    pub fn extract(&self, raw: &[u8]) -> Features {
        extract(raw, self.limits)
    }

    /// Decides from features already extracted (when the caller needed them first).
    pub fn decide_extracted(&self, envelope: &Envelope, features: Features, header_names: &[String]) -> Outcome {
        let decision = self.policy.decide(self.rules.first_match(envelope, &features));
        let plan = Plan::for_decision(&decision, envelope, header_names);
        Outcome { decision, plan, features }
    }
}

impl Filter for Arc<Triage> {
    async fn filter(&self, msg: MessageInput) -> Result<Plan, FilterError> {
        let triage = Arc::clone(self);
        // Parsing a 1 MiB message takes milliseconds: keep it off the reactor.
        // A panic in there surfaces as a JoinError, not a dead daemon.
        let started = Instant::now();
        let queue_id = msg.envelope.queue_id.clone();
        let outcome = tokio::task::spawn_blocking(move || triage.decide(&msg.envelope, &msg.raw, &msg.header_names))
            .await
            .map_err(|e| FilterError::Task(if e.is_panic() { "panicked".into() } else { e.to_string() }))?;
        let d = &outcome.decision;
        // Names, scores and ids only: never subject, body or addresses.
        tracing::info!(
            queue_id = queue_id.as_deref().unwrap_or("-"),
            department = %d.department,
            priority = %d.priority,
            confidence = format!("{:.2}", d.confidence),
            source = %d.source,
            action = d.action.as_str(),
            mode = ?d.mode,
            changes = outcome.plan.changes.len(),
            truncated = outcome.features.truncated,
            ms = format!("{:.2}", started.elapsed().as_secs_f64() * 1e3),
            "decided"
        );
        Ok(outcome.plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actions::Change;

    #[tokio::test]
    async fn filter_decides_by_rule_and_strips_spoofed_headers() {
        let cfg = Config::from_toml(
            r#"
[[departments]]
name = "billing"
mailbox = "billing@example.com"
action = "reroute"
[[rules]]
name = "invoices"
header = "Subject"
pattern = "(?i)invoice"
department = "billing"
"#,
            "t",
        )
        .unwrap();
        let triage = Arc::new(Triage::new(&cfg).unwrap());
        let msg = MessageInput {
            envelope: Envelope {
                mail_from: "a@x.example".into(),
                rcpts: vec!["u@y.example".into()],
                queue_id: Some("Q1".into()),
            },
            raw: b"Subject: invoice 7\r\nX-Triage-Department: ceo\r\n\r\nhello\r\n".to_vec(),
            header_names: vec!["Subject".into(), "X-Triage-Department".into()],
        };
        let plan = triage.filter(msg).await.unwrap();
        assert_eq!(plan.changes[0], Change::RemoveHeader { name: "X-Triage-Department".into(), index: 1 });
        assert!(plan
            .changes
            .contains(&Change::AddHeader { name: "X-Triage-Department".into(), value: "billing".into() }));
        assert!(plan.changes.contains(&Change::AddRecipient { address: "billing@example.com".into() }));
        assert!(plan.changes.contains(&Change::DeleteRecipient { address: "u@y.example".into() }));
    }
}
