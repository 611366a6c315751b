//! Reload (SIGHUP, or a promoted head): what a new configuration changes,
//! key by key, and whether the running daemon can apply it.
//!
//! Every key of the file is in exactly one of two lists. [`LIVE`] keys are
//! applied by the reload: the decision engine is rebuilt from the new file
//! (rules, departments, model, policy, audit, KPI), new connections and
//! messages take the new session settings (timeouts, `on_error`, limits
//! other than the shared byte budget), the log level changes at once.
//! [`RESTART`] keys hold what was bound or started once (sockets, the
//! certificate, the next hop, the feedback store, the retraining thread);
//! each is compared by its typed value and, when it changed, named in the
//! "restart needed" warning. A test (`tests/docs.rs`) walks every key the
//! file accepts and fails on one that is in neither list.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::Notify;

use super::Running;
use crate::learn::feedback::layer::{FeedbackLayer, FeedbackLink};
use crate::record::metrics;
use crate::settings::Config;

/// How a reload applies a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    /// Applied by the reload (to new messages and connections).
    Live,
    /// Needs a restart; the reload warns when it changed.
    Restart,
}

/// Keys (or whole sections, as `section.*`) a reload applies.
pub const LIVE: &[&str] = &[
    "server.hostname",
    "server.require_tls",
    "server.xforward_hosts",
    "server.smtp_timeout",
    "server.mode",
    "server.on_error",
    "server.decision_timeout",
    "server.progress_interval",
    "server.idle_timeout",
    "limits.max_frame_bytes",
    "limits.max_message_bytes",
    "limits.max_text_chars",
    "limits.max_headers",
    "limits.max_recipients",
    "limits.max_smtp_message_bytes",
    "defaults.*",
    "departments.*",
    "scope.*",
    "rules.*",
    "model.*",
    "policy.*",
    "audit.*",
    "kpi.*",
    "logging.level",
    // The feedback mail address is the engine's; retraining reads the file
    // anew before each run.
    "feedback.address",
    "feedback.audit_copy",
    "feedback.retention_days",
    "feedback.training_data",
    "feedback.dev_data",
    "feedback.embedding_cache",
    "feedback.min_per_class",
    "feedback.max_per_class",
    "feedback.holdout_percent",
    "feedback.max_slice_drop",
    "feedback.min_slice",
];

/// Compares one key of two configurations.
type Changed = fn(&Config, &Config) -> bool;

/// The value of `section.key` in an optional section.
macro_rules! opt {
    ($section:ident . $key:ident) => {
        |a: &Config, b: &Config| a.$section.as_ref().map(|s| &s.$key) != b.$section.as_ref().map(|s| &s.$key)
    };
}

/// Keys only a restart applies, each with its typed comparison.
pub const RESTART: &[(&str, Changed)] = &[
    ("server.milter", |a, b| a.server.milter != b.server.milter),
    ("server.milter_socket_mode", |a, b| a.server.milter_socket_mode != b.server.milter_socket_mode),
    ("server.smtp", |a, b| a.server.smtp != b.server.smtp),
    ("server.lmtp", |a, b| a.server.lmtp != b.server.lmtp),
    ("server.tls_cert", |a, b| a.server.tls_cert != b.server.tls_cert),
    ("server.tls_key", |a, b| a.server.tls_key != b.server.tls_key),
    ("server.max_connections", |a, b| a.server.max_connections != b.server.max_connections),
    ("server.shutdown_grace", |a, b| a.server.shutdown_grace != b.server.shutdown_grace),
    ("limits.max_total_bytes", |a, b| a.limits.max_total_bytes != b.limits.max_total_bytes),
    ("relay.next_hop", opt!(relay.next_hop)),
    ("relay.tls", opt!(relay.tls)),
    ("relay.tls_ca_file", opt!(relay.tls_ca_file)),
    ("relay.timeout", opt!(relay.timeout)),
    ("relay.data_timeout", opt!(relay.data_timeout)),
    ("relay.quarantine_mailbox", opt!(relay.quarantine_mailbox)),
    ("metrics.listen", opt!(metrics.listen)),
    ("logging.format", |a, b| a.logging.format != b.logging.format),
    ("feedback.store", opt!(feedback.store)),
    ("feedback.store_password_file", opt!(feedback.store_password_file)),
    ("feedback.http_token_file", opt!(feedback.http_token_file)),
    ("feedback.recent_bytes", opt!(feedback.recent_bytes)),
    ("feedback.recent_max_age", opt!(feedback.recent_max_age)),
    ("feedback.recent_max_rows", opt!(feedback.recent_max_rows)),
    ("feedback.retrain", opt!(feedback.retrain)),
    ("feedback.retrain_every", opt!(feedback.retrain_every)),
    ("feedback.retrain_after", opt!(feedback.retrain_after)),
    ("feedback.heads_dir", opt!(feedback.heads_dir)),
];

/// How a reload applies `section.key`; `None` for a key this table does not know.
pub fn apply_of(key: &str) -> Option<Apply> {
    let section = key.split('.').next().unwrap_or(key);
    let live = LIVE.iter().any(|k| *k == key || k.strip_suffix(".*") == Some(section));
    let restart = RESTART.iter().any(|(k, _)| *k == key);
    match (live, restart) {
        (true, false) => Some(Apply::Live),
        (false, true) => Some(Apply::Restart),
        _ => None,
    }
}

/// The restart-only keys whose value differs between `running` and `new`.
pub fn restart_needed(running: &Config, new: &Config) -> Vec<&'static str> {
    RESTART.iter().filter(|(_, changed)| changed(running, new)).map(|(k, _)| *k).collect()
}

/// Re-reads the configuration on request and swaps in what it can.
pub struct Reloader {
    pub path: PathBuf,
    /// The configuration in force.
    pub running: Config,
    pub engine: Running,
    /// The feedback store and recent decisions, kept across reloads.
    pub link: Option<FeedbackLink>,
    /// Applies the live settings outside the engine (sessions, log level).
    pub apply: Box<dyn Fn(&Config) + Send + Sync>,
}

impl Reloader {
    /// Reloads on SIGHUP and whenever `requested` is notified (a new head
    /// version). A file that does not load, or an engine that does not
    /// build, is logged and the running set stays.
    pub async fn run(mut self, requested: Arc<Notify>) {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::error!("cannot install the SIGHUP handler; reload needs a restart");
            return;
        };
        loop {
            tokio::select! {
                r = hup.recv() => if r.is_none() { return },
                _ = requested.notified() => {}
            }
            let (path, link) = (self.path.clone(), self.link.clone());
            let loaded = tokio::task::spawn_blocking(move || -> Result<(Config, FeedbackLayer), String> {
                let cfg = Config::load(&path).map_err(|e| e.to_string())?;
                let engine = super::build(&cfg, link).map_err(|e| e.to_string())?;
                Ok((cfg, engine))
            })
            .await
            .unwrap_or_else(|e| Err(format!("reload task failed: {e}")));
            match loaded {
                Ok((cfg, triage)) => self.swap(cfg, triage),
                Err(e) => tracing::error!(
                    error = %e,
                    config_version = %self.running.version,
                    "reload failed; keeping the running configuration"
                ),
            }
        }
    }

    fn swap(&mut self, cfg: Config, engine: FeedbackLayer) {
        let triage = engine.triage().clone();
        let restart = restart_needed(&self.running, &cfg);
        if !restart.is_empty() {
            tracing::warn!(settings = ?restart, "changed settings that apply only after a restart");
        }
        let replaced = self.engine.current().triage().model_summary();
        metrics::set_info(&cfg.version, &triage.model_summary(), Some((&self.running.version, &replaced)));
        tracing::info!(config_version = %cfg.version, rules = triage.rule_count(), model = %triage.model_summary(), "reloaded");
        triage.publish_head_versions();
        self.engine.replace(engine);
        (self.apply)(&cfg);
        self.running = cfg;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_restart_key_is_named_and_a_live_one_is_not() {
        let a =
            Config::from_toml("[server]\nmilter = \"inet:127.0.0.1:8890\"\ndecision_timeout = \"5s\"\n", "a").unwrap();
        let b =
            Config::from_toml("[server]\nmilter = \"inet:127.0.0.1:8891\"\ndecision_timeout = \"9s\"\n", "b").unwrap();
        assert_eq!(restart_needed(&a, &b), ["server.milter"]);
        assert!(restart_needed(&a, &a).is_empty());
        let c = Config::from_toml("[relay]\nnext_hop = \"smtp://127.0.0.1:10026\"\n", "c").unwrap();
        assert!(restart_needed(&a, &c).contains(&"relay.next_hop"), "a section that appears is a change");
    }
}
