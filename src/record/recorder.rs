//! The metrics a decision and a correction leave, recorded in one place.

use std::sync::Mutex;

use super::metrics::name;
use crate::decide::engine::ModelPath;
use crate::decide::policy::{Action, Decision};

/// The staff-time KPI of this process: the minutes messages routed without
/// review saved, and the minutes corrections gave back, each only growing.
/// The gauge is their difference, never below 0: what `mailtriage report`
/// computes over its window from the audit trail and the store, here over
/// the process's life. One per process (a reload keeps it, a restart starts
/// it at 0), so corrections of mail decided before a restart cannot take it
/// below 0, which subtracting each correction from the gauge did.
#[derive(Debug, Clone, Copy, PartialEq)]
struct StaffMinutes {
    routed: f64,
    corrected: f64,
}

static STAFF_MINUTES: Mutex<StaffMinutes> = Mutex::new(StaffMinutes::ZERO);

impl StaffMinutes {
    const ZERO: StaffMinutes = StaffMinutes { routed: 0.0, corrected: 0.0 };

    /// A message routed without review; the minutes saved now.
    fn routed(&mut self, minutes: f64) -> f64 {
        self.routed += minutes.max(0.0);
        self.saved()
    }

    /// A correction; the minutes saved now.
    fn corrected(&mut self, minutes: f64) -> f64 {
        self.corrected += minutes.max(0.0);
        self.saved()
    }

    fn saved(&self) -> f64 {
        (self.routed - self.corrected).max(0.0)
    }
}

/// The inference queue's figures as metrics: queue depth, wait and
/// inference time (`mailtriage_queue_depth`, `…_queue_wait_seconds`,
/// `…_inference_seconds`).
pub struct QueueMetrics;

impl crate::model::batcher::QueueObserver for QueueMetrics {
    fn depth(&self, waiting: usize) {
        metrics::gauge!(name::QUEUE_DEPTH).set(waiting as f64);
    }

    fn waited(&self, seconds: f64) {
        metrics::histogram!(name::QUEUE_WAIT_SECONDS).record(seconds);
    }

    fn inferred(&self, seconds: f64) {
        metrics::histogram!(name::INFERENCE_SECONDS).record(seconds);
    }
}

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
            let saved = STAFF_MINUTES.lock().unwrap_or_else(|p| p.into_inner()).routed(self.minutes_per_message);
            metrics::gauge!(name::MINUTES_SAVED).set(saved);
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
        let saved = STAFF_MINUTES.lock().unwrap_or_else(|p| p.into_inner()).corrected(self.minutes_per_message);
        metrics::gauge!(name::MINUTES_SAVED).set(saved);
    }

    /// A correction refused, whatever refused it: an unknown department or
    /// priority, a Message-ID not among the recent decisions, the store
    /// away, a request without the token or not JSON
    /// (`mailtriage_feedback_refused_total{channel,reason}`).
    pub fn refused(channel: &'static str, reason: &'static str) {
        metrics::counter!(name::FEEDBACK_REFUSED, "channel" => channel, "reason" => reason).increment(1);
    }

    /// A head's cascade as its dev split measured it: the share of
    /// messages sent to the encoder, and the accuracy the rest cost.
    pub fn cascade(&self, head: &'static str, encoder_share: f64, accuracy_cost: f64) {
        metrics::gauge!(name::CASCADE_ENCODER_SHARE, "head" => head).set(encoder_share);
        metrics::gauge!(name::CASCADE_ACCURACY_COST, "head" => head).set(accuracy_cost);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of an unlabelled gauge or counter in Prometheus text.
    fn value(text: &str, metric: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(metric)?.strip_prefix(' ')?.trim().parse().ok())
    }

    #[test]
    fn staff_minutes_saved_is_never_negative_and_means_the_report_s_figure() {
        // A process that has just started (after a restart) gets a correction of
        // mail it never decided: nothing saved yet, and not less than nothing.
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            Recorder { minutes_per_message: 2.0 }.correction("billing", "http");
        });
        let shown = value(&handle.render(), name::MINUTES_SAVED).expect("the gauge is published");
        assert!(shown >= 0.0, "{shown}");

        // The arithmetic, on a tally of its own: (routed − corrections) × minutes, at least 0,
        // whatever the order (as `mailtriage report` computes it).
        let mut t = StaffMinutes::ZERO;
        assert_eq!(t.corrected(2.0), 0.0);
        assert_eq!(t.routed(2.0), 0.0);
        assert_eq!(t.routed(2.0), 2.0);
        assert_eq!(t.routed(2.0), 4.0);
        assert_eq!(t.corrected(2.0), 2.0);
        let mut restarted = StaffMinutes::ZERO;
        for _ in 0..3 {
            assert_eq!(restarted.corrected(2.0), 0.0);
        }
    }
}
