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
use std::sync::{Arc, LazyLock};

use tokio::sync::Notify;

use super::Running;
use crate::learn::filter::layer::{FeedbackLayer, FeedbackLink};
use crate::record::metrics;
use crate::settings::{Config, FeedbackConfig, RelayConfig};

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

/// The value of `section.key` in an optional section: a section that
/// appears or goes is a change (what it starts is on, or off).
macro_rules! opt {
    ($section:ident . $key:ident) => {
        |a: &Config, b: &Config| a.$section.as_ref().map(|s| &s.$key) != b.$section.as_ref().map(|s| &s.$key)
    };
}

/// The value of `section.key` as in effect: an absent section reads as its
/// defaults, so a section that appears (or goes) names only the keys it sets
/// to something else, not every key left at its default.
macro_rules! eff {
    ($section:ident . $key:ident, $defaults:expr) => {
        |a: &Config, b: &Config| {
            let d = $defaults;
            a.$section.as_ref().unwrap_or(d).$key != b.$section.as_ref().unwrap_or(d).$key
        }
    };
}

/// `[feedback]`'s defaults, for [`eff!`].
static FEEDBACK_DEFAULTS: LazyLock<FeedbackConfig> = LazyLock::new(FeedbackConfig::default);

/// `[relay]`'s defaults (its one required key, `next_hop`, is compared by [`opt!`]).
static RELAY_DEFAULTS: LazyLock<RelayConfig> = LazyLock::new(|| {
    Config::from_toml("[relay]\nnext_hop = \"smtp://127.0.0.1:25\"\n", "relay defaults")
        .ok()
        .and_then(|c| c.relay)
        .expect("a [relay] with only next_hop is valid")
});

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
    ("relay.tls", eff!(relay.tls, &*RELAY_DEFAULTS)),
    ("relay.tls_ca_file", eff!(relay.tls_ca_file, &*RELAY_DEFAULTS)),
    ("relay.timeout", eff!(relay.timeout, &*RELAY_DEFAULTS)),
    ("relay.data_timeout", eff!(relay.data_timeout, &*RELAY_DEFAULTS)),
    ("relay.quarantine_mailbox", eff!(relay.quarantine_mailbox, &*RELAY_DEFAULTS)),
    ("metrics.listen", opt!(metrics.listen)),
    ("logging.format", |a, b| a.logging.format != b.logging.format),
    ("feedback.store", opt!(feedback.store)),
    ("feedback.store_password_file", eff!(feedback.store_password_file, &*FEEDBACK_DEFAULTS)),
    ("feedback.http_token_file", eff!(feedback.http_token_file, &*FEEDBACK_DEFAULTS)),
    ("feedback.recent_bytes", eff!(feedback.recent_bytes, &*FEEDBACK_DEFAULTS)),
    ("feedback.recent_max_age", eff!(feedback.recent_max_age, &*FEEDBACK_DEFAULTS)),
    ("feedback.recent_max_rows", eff!(feedback.recent_max_rows, &*FEEDBACK_DEFAULTS)),
    ("feedback.retrain", eff!(feedback.retrain, &*FEEDBACK_DEFAULTS)),
    ("feedback.retrain_every", eff!(feedback.retrain_every, &*FEEDBACK_DEFAULTS)),
    ("feedback.retrain_after", eff!(feedback.retrain_after, &*FEEDBACK_DEFAULTS)),
    ("feedback.heads_dir", eff!(feedback.heads_dir, &*FEEDBACK_DEFAULTS)),
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
        tracing::info!(
            config_version = %cfg.version,
            mode = ?cfg.server.mode,
            rules = triage.rule_count(),
            model = %triage.model_summary(),
            "reloaded"
        );
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
        let empty = Config::from_toml("", "e").unwrap();
        assert_eq!(restart_needed(&empty, &c), ["relay.next_hop"], "its keys left at their defaults are not");
    }

    #[test]
    fn a_feedback_section_that_appears_names_only_the_keys_it_changes() {
        let none = Config::from_toml("[server]\nmode = \"shadow\"\n", "a").unwrap();
        // Five keys set, two of them restart-only and one restart-only at its default.
        let five = Config::from_toml(
            "[server]\nmode = \"shadow\"\n[feedback]\nstore = \"sqlite:///tmp/x.db\"\n\
             address = \"triage-feedback@example.com\"\nretrain_after = 50\nretrain = true\nmin_per_class = 3\n",
            "b",
        )
        .unwrap();
        assert_eq!(restart_needed(&none, &five), ["feedback.store", "feedback.retrain_after"]);
        assert_eq!(restart_needed(&five, &none), ["feedback.store", "feedback.retrain_after"], "and when it goes");
        // A section with every key at its default still turns the feedback store on.
        let defaults = Config::from_toml("[feedback]\n", "c").unwrap();
        assert_eq!(restart_needed(&none, &defaults), ["feedback.store"]);
        assert!(restart_needed(&five, &five).is_empty());
    }

    /// What a reload logs goes to a buffer, as the daemon's text log shows it.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_reload_line_names_the_mode_now_in_force() {
        let shadow = Config::from_toml("[server]\nmode = \"shadow\"\n", "a").unwrap();
        let enforce = Config::from_toml("[server]\nmode = \"enforce\"\n", "b").unwrap();
        let mut reloader = Reloader {
            path: PathBuf::from("unused.toml"),
            running: shadow.clone(),
            engine: Running::new(super::super::build(&shadow, None).unwrap()),
            link: None,
            apply: Box::new(|_| {}),
        };
        let log = Captured::default();
        let subscriber = tracing_subscriber::fmt().with_writer({
            let log = log.clone();
            move || log.clone()
        });
        tracing::subscriber::with_default(subscriber.with_ansi(false).finish(), || {
            reloader.swap(enforce.clone(), super::super::build(&enforce, None).unwrap());
        });
        let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        let line = text.lines().find(|l| l.contains("reloaded")).unwrap_or_else(|| panic!("no reload line: {text}"));
        assert!(line.contains("mode=Enforce"), "{line}");
    }
}
