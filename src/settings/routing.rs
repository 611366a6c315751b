//! What decides where a message goes, apart from the model: `[defaults]`,
//! `[[departments]]`, `[scope]`, `[[rules]]` and `[policy]`.

use regex::Regex;
use serde::Deserialize;

use super::section::section;

use crate::domain::Action;

section! {
    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct DefaultsConfig in "defaults" {
        /// Department for a message nothing else decides.
        live department: String,
        live priority: String,
        /// The priority names admins may use, lowest first.
        live priorities: Vec<String>,
    }
}

impl Default for DefaultsConfig {
    fn default() -> Self {
        Self {
            department: "general".into(),
            priority: "medium".into(),
            priorities: vec!["low".into(), "medium".into(), "high".into()],
        }
    }
}

section! {
    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct DepartmentConfig in "departments" {
        live name: String,
        /// Where `reroute` and `copy` send the message.
        #[serde(default)]
        live mailbox: Option<String>,
        #[serde(default)]
        live action: Action,
        #[serde(default)]
        live description: String,
        /// Sample messages for the cold-start classifier (before any head is trained).
        #[serde(default)]
        live examples: Vec<String>,
        /// Head labels that mean this department, when the training data names
        /// it differently (e.g. a helpdesk queue "Billing and Payments").
        #[serde(default)]
        live labels: Vec<String>,
    }
}

section! {
    /// Which mail is triaged at all (`[scope]`). Out-of-scope mail passes
    /// unchanged but for the removal of inbound `X-Triage-*` headers.
    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct ScopeConfig in "scope" {
        /// Recipients whose mail is triaged: `info@example.com`, or `@example.com`
        /// for a whole domain. Empty: every recipient. Only these recipients are
        /// replaced by a reroute; the others keep the message.
        live recipients: Vec<String>,
        /// Skip mail from SASL-authenticated senders (staff sending out).
        live skip_authenticated: bool,
        /// Skip mail from these client networks.
        live skip_networks: Vec<crate::settings::Cidr>,
        /// Skip mail taken by these MTA listeners (milter `{daemon_name}`).
        live skip_listeners: Vec<String>,
        /// Skip automatic mail: the null sender, `Auto-Submitted` other than
        /// `no`, `List-Id`, `Precedence: bulk|list|junk`. When off, such mail is
        /// tagged but never rerouted.
        live skip_auto: bool,
        /// Relays whose `X-Triage-*` headers are ours (a mailtriage hop before
        /// this one): mail from them that carries our headers was triaged
        /// already and passes unchanged, headers kept.
        live trusted_relays: Vec<crate::settings::Cidr>,
    }
}

impl Default for ScopeConfig {
    fn default() -> Self {
        Self {
            recipients: Vec::new(),
            skip_authenticated: true,
            skip_networks: Vec::new(),
            skip_listeners: Vec::new(),
            skip_auto: true,
            trusted_relays: Vec::new(),
        }
    }
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    /// Route to the rule's `department`.
    #[default]
    Route,
    /// Leave the message untriaged (out of scope).
    Skip,
}

section! {
    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct RuleConfig in "rules" {
        live name: String,
        /// A header name (case-insensitive), or `envelope-from` / `envelope-to`.
        live header: String,
        live pattern: String,
        /// Required unless `action = "skip"`.
        #[serde(default)]
        live department: Option<String>,
        #[serde(default)]
        live action: RuleAction,
        #[serde(default)]
        live priority: Option<String>,
        /// `pattern` compiled by validation, so the rule set reuses it rather
        /// than compiling it again.
        #[serde(skip)]
        derived compiled: std::sync::OnceLock<Regex>,
    }
}

section! {
    /// What to do with unsure model decisions.
    #[derive(Debug, Clone, Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    pub struct PolicyConfig in "policy" {
        /// A model decision whose department confidence is below this goes to
        /// `review_mailbox` with `X-Triage-Action: review`. 0 disables review.
        /// Set, it wins over `target_accuracy` (the manual override).
        live review_below: Option<f32>,
        /// The accuracy automatic decisions must keep: the department head's
        /// threshold for it (its dev-split risk-coverage curve) sends the rest
        /// to review.
        live target_accuracy: Option<f32>,
        live review_mailbox: Option<String>,
        /// Add `X-Triage-Reason` to model decisions: the runner-up department
        /// and the message's strongest terms (message content, in the message
        /// only: never in logs or the audit trail).
        live reason_header: bool,
    }
}
