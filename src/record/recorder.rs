//! The metrics a decision and a correction leave, recorded in one place.

use super::metrics::name;
use crate::decide::engine::ModelPath;
use crate::decide::policy::{Action, Decision};

/// Records what the decision path produces: one place for the message
/// counters and the staff-time KPI.
#[derive(Debug, Clone, Copy)]
pub struct Recorder {
    /// Staff minutes a message routed without review saves (`[kpi]`).
    pub minutes_per_message: f64,
}

impl Recorder {
    /// A message decided in `seconds` (extraction took `extract_seconds`),
    /// the model's part by `path`.
    pub fn decided(&self, d: &Decision, path: Option<ModelPath>, extract_seconds: Option<f64>, seconds: f64) {
        if let Some(s) = extract_seconds {
            metrics::histogram!(name::EXTRACT_SECONDS).record(s);
        }
        if let Some(p) = path.filter(|p| *p != ModelPath::Heads) {
            metrics::counter!(name::MODEL_PATH, "path" => p.as_str()).increment(1);
        }
        metrics::histogram!(name::DECISION_SECONDS).record(seconds);
        metrics::counter!(
            name::MESSAGES,
            "department" => d.department.to_string(),
            "action" => d.action.as_str(),
            "source" => d.source.to_string()
        )
        .increment(1);
        if d.action != Action::Review {
            metrics::gauge!(name::MINUTES_SAVED).increment(self.minutes_per_message);
        }
    }

    /// A message not triaged (`mailtriage_skipped_total{reason}`).
    pub fn skipped(&self, skip: &crate::scope::Skip) {
        metrics::counter!(name::SKIPPED, "reason" => skip.reason()).increment(1);
    }

    /// A decision that failed after `seconds` (the front door counts it in
    /// `mailtriage_decisions_failed_total`, with the verdict it gave).
    pub fn failed(&self, seconds: f64) {
        metrics::histogram!(name::DECISION_SECONDS).record(seconds);
    }

    /// A correction recorded: a person triaged this message after all.
    pub fn correction(&self, department: &str, channel: &'static str) {
        metrics::counter!(name::FEEDBACK, "department" => department.to_string(), "channel" => channel).increment(1);
        metrics::gauge!(name::MINUTES_SAVED).decrement(self.minutes_per_message);
    }

    /// A correction refused (unknown department or priority).
    pub fn refused(&self, channel: &'static str) {
        metrics::counter!(name::FEEDBACK_REFUSED, "channel" => channel).increment(1);
    }

    /// Each head's version number (`v3` → 3; 0 for a head not promoted by
    /// retraining) as `mailtriage_head_version{head}`.
    pub fn head_versions(&self, department: Option<&str>, priority: Option<&str>) {
        let number = |v: &str| v.strip_prefix('v').and_then(|n| n.parse::<f64>().ok()).unwrap_or(0.0);
        if let Some(v) = department {
            metrics::gauge!(name::HEAD_VERSION, "head" => "department").set(number(v));
        }
        if let Some(v) = priority {
            metrics::gauge!(name::HEAD_VERSION, "head" => "priority").set(number(v));
        }
    }
}
