//! Reload (SIGHUP, or a promoted head): what a new configuration changes,
//! key by key, and whether the running daemon can apply it.
//!
//! Every key of the file says, beside its field (`settings::section`),
//! whether a reload applies it. Live keys are applied: the decision engine
//! is rebuilt from the new file (rules, departments, model, policy, audit,
//! KPI), new connections and messages take the new session settings
//! (timeouts, `on_error`, limits other than the shared byte budget), the log
//! level changes at once. Restart keys hold what was bound or started once
//! (sockets, the certificate, the next hop, the feedback store, the
//! retraining thread); each is compared by its typed value and, when it
//! changed, named in the "restart needed" warning
//! ([`Config::restart_needed`]).

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::Notify;

use super::Running;
use crate::learn::filter::layer::{FeedbackLayer, FeedbackLink};
use crate::record::metrics;
use crate::settings::Config;

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
        let restart = self.running.restart_needed(&cfg);
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
        assert_eq!(a.restart_needed(&b), ["server.milter"]);
        assert!(a.restart_needed(&a).is_empty());
        let c = Config::from_toml("[relay]\nnext_hop = \"smtp://127.0.0.1:10026\"\n", "c").unwrap();
        assert!(a.restart_needed(&c).contains(&"relay.next_hop"), "a section that appears is a change");
        let empty = Config::from_toml("", "e").unwrap();
        assert_eq!(empty.restart_needed(&c), ["relay.next_hop"], "its keys left at their defaults are not");
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
        assert_eq!(none.restart_needed(&five), ["feedback.store", "feedback.retrain_after"]);
        assert_eq!(five.restart_needed(&none), ["feedback.store", "feedback.retrain_after"], "and when it goes");
        // A section with every key at its default still turns the feedback store on.
        let defaults = Config::from_toml("[feedback]\n", "c").unwrap();
        assert_eq!(none.restart_needed(&defaults), ["feedback.store"]);
        assert!(five.restart_needed(&five).is_empty());
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
