//! The metrics every part records, under one set of names.
//!
//! The counters and histograms are recorded with the `metrics` facade (a
//! no-op when no recorder is installed, as in `classify`); the daemon
//! installs the Prometheus recorder and serves it over HTTP.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use thiserror::Error;
/// Names of every metric, in one place.
pub mod name {
    pub const MESSAGES: &str = "mailtriage_messages_total";
    /// Messages not triaged, by reason: `recipients`, `authenticated`,
    /// `network`, `listener`, `null_sender`, `auto_submitted`,
    /// `mailing_list`, `bulk`, `triaged` (a trusted hop did), `rule`.
    pub const SKIPPED: &str = "mailtriage_skipped_total";
    /// Audit lines that could not be written (a full disk, a read-only mount).
    pub const AUDIT_FAILURES: &str = "mailtriage_audit_failures_total";
    pub const FAILED_OPEN: &str = "mailtriage_decisions_failed_total";
    pub const EXTRACT_SECONDS: &str = "mailtriage_extract_seconds";
    pub const QUEUE_WAIT_SECONDS: &str = "mailtriage_inference_queue_wait_seconds";
    pub const INFERENCE_SECONDS: &str = "mailtriage_inference_seconds";
    pub const DECISION_SECONDS: &str = "mailtriage_decision_seconds";
    pub const QUEUE_DEPTH: &str = "mailtriage_inference_queue_depth";
    pub const CONNECTIONS: &str = "mailtriage_connections_open";
    pub const INFO: &str = "mailtriage_info";
    /// Model decisions by how they were reached: `lexical` (the cascade's
    /// lexical head was sure), `cache` (same text seen before), `encoder`,
    /// `overload` (queue full or deadline passed: the lexical head decided).
    pub const MODEL_PATH: &str = "mailtriage_model_decisions_total";
    /// SMTP/LMTP front doors: messages relayed to the next hop, by result.
    pub const RELAY: &str = "mailtriage_relay_total";
    /// Corrections recorded, by department (as configured) and channel: the misroute rate.
    pub const FEEDBACK: &str = "mailtriage_feedback_corrections_total";
    /// Corrections refused, by channel and reason: `unknown_department`,
    /// `unknown_priority`, `no_label`, `not_recent` (Message-ID not among the
    /// recent decisions), `not_configured`, `store_unavailable`, `features`,
    /// and on `POST /feedback` also `unauthorized`, `bad_request`,
    /// `method_not_allowed`, `failed`.
    pub const FEEDBACK_REFUSED: &str = "mailtriage_feedback_refused_total";
    /// Recent decisions not written to the shared PostgreSQL window (its
    /// queue full or the store away); this instance's memory still has them.
    pub const RECENT_DROPPED: &str = "mailtriage_recent_shared_dropped_total";
    /// Retrainings by head and result (`promoted`, `refused`, `failed`).
    pub const RETRAIN: &str = "mailtriage_retrain_total";
    /// The version number of the head in use, per head (0: the configured file).
    pub const HEAD_VERSION: &str = "mailtriage_head_version";
    /// Per head with a cascade, as measured on its dev split when it was
    /// trained: the share of messages its gate sends to the encoder, and the
    /// accuracy (fraction) skipping the encoder on the others cost. Compare
    /// the first with the live `mailtriage_model_decisions_total{path}`.
    pub const CASCADE_ENCODER_SHARE: &str = "mailtriage_cascade_dev_encoder_share";
    pub const CASCADE_ACCURACY_COST: &str = "mailtriage_cascade_dev_accuracy_cost";
    /// Estimated staff minutes saved since the process started:
    /// `[kpi] minutes_per_manual_triage` × (messages routed without review −
    /// corrections), never below 0 (`mailtriage report`'s figure, over the
    /// process's life; a restart starts it at 0).
    pub const MINUTES_SAVED: &str = "mailtriage_staff_minutes_saved";
}

/// Latency buckets (seconds): sub-millisecond rules up to multi-second model waits.
const BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("installing the Prometheus recorder: {0}")]
    Install(String),
}

/// Installs the global Prometheus recorder. Call once, before anything records.
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    PrometheusBuilder::new()
        .set_buckets(BUCKETS)
        .map_err(|e| MetricsError::Install(e.to_string()))?
        .install_recorder()
        .map_err(|e| MetricsError::Install(e.to_string()))
}

/// Publishes what is running as `mailtriage_info{version,config_version,model} 1`,
/// and sets the series of the set it replaces (after a reload) to 0, so
/// exactly one series reads 1.
pub fn set_info(config_version: &str, model: &str, replaced: Option<(&str, &str)>) {
    let series = |c: &str, m: &str| {
        metrics::gauge!(
            name::INFO,
            "version" => env!("CARGO_PKG_VERSION"),
            "config_version" => c.to_string(),
            "model" => m.to_string()
        )
    };
    if let Some((c, m)) = replaced {
        series(c, m).set(0.0);
    }
    series(config_version, model).set(1.0);
}
