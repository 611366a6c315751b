//! What the daemon tells its operators: `[metrics]`, `[audit]`, `[kpi]`,
//! `[logging]`.

use std::path::PathBuf;

use serde::Deserialize;

use super::section::section;

section! {
    /// Prometheus metrics and health endpoints.
    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct MetricsConfig in "metrics" {
        /// `HOST:PORT` serving /metrics, /healthz and /readyz.
        restart_with_section listen: String,
    }
}

/// What an absent `[metrics]` compares as in a reload (`listen` is named
/// whenever the section appears or goes; the placeholder is never compared).
impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { listen: String::new() }
    }
}

section! {
    /// The audit trail (one JSON line per decision, no personal data).
    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct AuditConfig in "audit" {
        live path: PathBuf,
        /// Rotate when the file would grow past this.
        #[serde(default = "default_audit_max_bytes")]
        live max_bytes: u64,
        /// Rotated files older than this are deleted.
        #[serde(default = "default_audit_retention_days")]
        live retention_days: u64,
        /// Key of the Message-ID hash; created (32 random bytes, mode 0600) if missing.
        live key_file: PathBuf,
    }
}

/// What an absent `[audit]` compares as in a reload (its required paths
/// are placeholders: every key is live, none is compared).
impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            path: PathBuf::new(),
            max_bytes: default_audit_max_bytes(),
            retention_days: default_audit_retention_days(),
            key_file: PathBuf::new(),
        }
    }
}

fn default_audit_max_bytes() -> u64 {
    100 * 1024 * 1024
}

fn default_audit_retention_days() -> u64 {
    90
}

section! {
    /// Figures for the people paying for it.
    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct KpiConfig in "kpi" {
        /// Staff minutes one message costs when triaged by hand.
        live minutes_per_manual_triage: f64,
    }
}

impl Default for KpiConfig {
    fn default() -> Self {
        Self { minutes_per_manual_triage: 2.0 }
    }
}

section! {
    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct LoggingConfig in "logging" {
        /// A `tracing` filter: `info`, `debug`, `mailtriage=debug,warn`…
        live level: String,
        restart format: LogFormat,
    }
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self { level: "info".into(), format: LogFormat::Text }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}
