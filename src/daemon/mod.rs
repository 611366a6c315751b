//! The daemon: build, serve, reload, drain.
//!
//! [`run`] builds in one direction, each part from the ones before it: the
//! decision engine (with the feedback link, which outlives reloads), then
//! the front doors' shared setup ([`FrontDoors`]: byte budget, STARTTLS
//! certificate, next hop), then the HTTP endpoints that read the engine,
//! then the listeners. Once all are bound it reports ready (`/readyz`, and
//! `READY=1` to systemd through `notify`). A reload ([`reload`]) swaps the
//! engine and the session settings while mail flows; SIGTERM starts a
//! drain: `/readyz` answers 503 and systemd hears `STOPPING=1` at once,
//! listeners stop accepting, messages in flight finish within `shutdown_grace`.

pub mod feedback;
pub mod forget;
mod http;
mod logging;
mod notify;
pub mod reload;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use thiserror::Error;
use tokio::sync::{watch, Notify};

use crate::frontdoor::budget::ByteBudget;
use crate::frontdoor::net::{Listener, ServerError};
use crate::frontdoor::Live;
use crate::learn::filter::layer::{FeedbackLayer, FeedbackLink};
use crate::learn::store::heads::{self, Registry};
use crate::milter::session::SessionConfig;
use crate::pipeline::{Triage, TriageError};
use crate::record::metrics::{self, MetricsError};
use crate::settings::Config;
use crate::smtp::relay::RelaySettings;
use crate::smtp::session::SmtpSettings;
use crate::smtp::tls::TlsError;

/// Why the daemon could not start. Each names what to fix.
#[derive(Debug, Error)]
pub enum DaemonError {
    #[error("loading rules and model: {0}")]
    Engine(#[from] TriageError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Bind(#[from] http::BindError),
    #[error(transparent)]
    Listen(#[from] ServerError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Token(#[from] feedback::TokenError),
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// What the front doors share, built (and checked) before anything listens:
/// one byte budget for all of them, the STARTTLS certificate, the next hop.
/// Made once: a reload keeps them (their keys are restart-only).
#[derive(Clone)]
pub struct FrontDoors {
    budget: Arc<ByteBudget>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    relay: Option<Arc<RelaySettings>>,
}

impl FrontDoors {
    pub fn new(cfg: &Config) -> Result<Self, DaemonError> {
        let tls = match (&cfg.server.tls_cert, &cfg.server.tls_key) {
            (Some(cert), Some(key)) => Some(crate::smtp::tls::acceptor(cert, key)?),
            _ => None,
        };
        Ok(FrontDoors {
            budget: ByteBudget::new(cfg.limits.max_total_bytes),
            tls,
            relay: RelaySettings::from_config(cfg)?,
        })
    }

    /// The milter sessions' settings under `cfg`, sharing this budget.
    fn milter(&self, cfg: &Config) -> SessionConfig {
        let mut s = SessionConfig::from(cfg);
        s.budget = self.budget.clone();
        s
    }

    /// The SMTP (or LMTP) sessions' settings under `cfg`; `None` without a next hop.
    fn smtp(&self, cfg: &Config, lmtp: bool) -> Option<SmtpSettings> {
        let relay = self.relay.clone()?;
        Some(SmtpSettings::new(cfg, lmtp, self.tls.clone(), self.budget.clone(), relay))
    }
}

/// A one-line summary of the front doors: `milter inet:…, smtp inet:… → smtp://…`.
pub fn describe_front_doors(cfg: &Config) -> String {
    let mut doors = Vec::new();
    if let Some(m) = cfg.server.milter_listen() {
        doors.push(format!("milter {m}"));
    }
    for (name, addr) in [("smtp", &cfg.server.smtp), ("lmtp", &cfg.server.lmtp)] {
        if let Some(a) = addr {
            doors.push(format!("{name} {a}"));
        }
    }
    let mut out = doors.join(", ");
    if let Some(r) = &cfg.relay {
        out.push_str(&format!(" → {}", r.next_hop));
    }
    out
}

/// What `check-config` checks beyond the file itself, all of it, reporting
/// every failure: the engine builds (rules compile, model and heads load,
/// every head label is claimed by a department), the STARTTLS certificate
/// and the next hop's CA file read, the feedback store answers and its
/// token reads. On success, a one-line summary.
pub fn check(cfg: &Config) -> Result<String, Vec<String>> {
    let mut problems = Vec::new();
    let engine = Triage::new(&heads::current(cfg)).map_err(|e| problems.push(format!("loading rules and model: {e}")));
    if let Err(e) = FrontDoors::new(cfg) {
        problems.push(e.to_string());
    }
    let mut store = None;
    if let Some(f) = &cfg.feedback {
        match crate::learn::store::Store::for_config(f, false).and_then(|s| s.describe()) {
            Ok(d) => store = Some(d),
            Err(e) => problems.push(e.to_string()),
        }
    }
    if let Err(e) = feedback::http_token(cfg) {
        problems.push(e.to_string());
    }
    // The retrainer writes here only later: say now if it could not.
    if let Some(problem) = cfg.feedback.as_ref().and_then(|f| crate::access::check_writable(&f.heads_dir)) {
        problems.push(format!("feedback.heads_dir: {problem}"));
    }
    match engine {
        Ok(t) if problems.is_empty() => Ok(format!(
            "{} departments, {} rules, model {}, mode {:?}, {}{}",
            cfg.departments.len(),
            cfg.rules.len(),
            t.model_summary(),
            cfg.server.mode,
            describe_front_doors(cfg),
            store.map(|s| format!("; feedback store: {s}")).unwrap_or_default()
        )),
        _ => Err(problems),
    }
}

/// The session settings of every front door, replaced together on reload.
#[derive(Clone)]
struct Sessions {
    milter: Live<SessionConfig>,
    smtp: Option<Live<SmtpSettings>>,
    lmtp: Option<Live<SmtpSettings>>,
}

impl Sessions {
    fn new(doors: &FrontDoors, cfg: &Config) -> Self {
        Sessions {
            milter: Live::new(doors.milter(cfg)),
            smtp: doors.smtp(cfg, false).map(Live::new),
            lmtp: doors.smtp(cfg, true).map(Live::new),
        }
    }

    fn replace(&self, doors: &FrontDoors, cfg: &Config) {
        self.milter.replace(doors.milter(cfg));
        for (live, lmtp) in [(&self.smtp, false), (&self.lmtp, true)] {
            if let (Some(live), Some(s)) = (live, doors.smtp(cfg, lmtp)) {
                live.replace(s);
            }
        }
    }
}

/// The decision path the front doors call, replaced on reload (SIGHUP, a
/// promoted head): the feedback layer around the pipeline around the engine.
pub type Running = Live<FeedbackLayer>;

/// Builds the decision path from `cfg`, with the head versions in use.
pub fn build(cfg: &Config, link: Option<FeedbackLink>) -> Result<FeedbackLayer, TriageError> {
    Ok(FeedbackLayer::new(Triage::new(&heads::current(cfg))?, cfg, link))
}

/// Runs the daemon on `cfg` (read from `path`, which reloads read again)
/// until SIGTERM or SIGINT, then drains. Blocks the calling thread.
pub fn run(cfg: Config, path: PathBuf) -> Result<(), DaemonError> {
    let log_level = logging::init(&cfg.logging);
    // Before anything records: metrics recorded earlier would be lost.
    let prometheus = cfg.metrics.as_ref().map(|_| metrics::install()).transpose()?;
    // Build order: engine (with its feedback link) → front doors → endpoints.
    let link = feedback::open_link(&cfg);
    // Shared heads: start on the version the store has in use (with the
    // cache as it is if the store does not answer now; the listener catches up).
    if let (Some(l), Some(fb)) = (&link, &cfg.feedback) {
        if let Err(e) = Registry::with_store(&fb.heads_dir, l.store.clone()).sync() {
            tracing::warn!(error = %e, "head versions not synced from the store at start; using the local cache");
        }
    }
    let engine = build(&cfg, link.clone())?;
    engine.triage().publish_head_versions();
    let token = feedback::http_token(&cfg)?;
    let doors = FrontDoors::new(&cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(DaemonError::Runtime)?;
    rt.block_on(async move {
        let model = engine.triage().model_summary();
        let (rules, departments) = (engine.triage().rule_count(), cfg.departments.len());
        let shared = Running::new(engine);
        let ready = Arc::new(AtomicBool::new(false));
        if let (Some(m), Some(handle)) = (&cfg.metrics, prometheus) {
            let listener = http::bind(&m.listen).await?;
            let posts = token.map(|token| http::PostEndpoints {
                token,
                routes: vec![
                    ("/feedback", feedback::endpoint(shared.clone())),
                    ("/forget", forget::endpoint(shared.clone())),
                ],
            });
            tracing::info!(listen = %m.listen, post = posts.is_some(), "metrics on /metrics, /healthz, /readyz");
            tokio::spawn(http::serve(listener, handle, ready.clone(), posts));
        }
        let mode = cfg.server.milter_socket_mode;
        let bind = |a: &Option<crate::settings::ListenAddress>| {
            let a = a.clone();
            async move {
                match a {
                    Some(a) => Listener::bind(&a, mode).await.map(Some),
                    None => Ok(None),
                }
            }
        };
        let milter = bind(&cfg.server.milter_listen()).await?;
        let smtp = bind(&cfg.server.smtp).await?;
        let lmtp = bind(&cfg.server.lmtp).await?;
        metrics::set_info(&cfg.version, &model, None);
        ready.store(true, Ordering::Relaxed);
        let notifier = Arc::new(notify::Notifier::from_env());
        notifier.ready(&format!("{}; mode {:?}; model {model}", describe_front_doors(&cfg), cfg.server.mode));
        notifier.spawn_watchdog();
        let bound = |l: &Option<Listener>| l.as_ref().map(|l| l.local_addr()).unwrap_or_else(|| "-".into());
        tracing::info!(
            milter = %bound(&milter),
            smtp = %bound(&smtp),
            lmtp = %bound(&lmtp),
            next_hop = %cfg.relay.as_ref().map(|r| r.next_hop.to_string()).unwrap_or_else(|| "-".into()),
            mode = ?cfg.server.mode,
            on_error = ?cfg.server.on_error,
            rules,
            model = %model,
            departments,
            config = %cfg.source.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            "mailtriage listening"
        );
        let sessions = Sessions::new(&doors, &cfg);
        let reload_requested = Arc::new(Notify::new());
        if let (Some(l), Some(fb)) = (&link, &cfg.feedback) {
            feedback::spawn_retrainer(path.clone(), &cfg, l, shared.clone(), reload_requested.clone());
            feedback::spawn_store_listener(fb.heads_dir.clone(), l, shared.clone());
            tokio::spawn(feedback::watch_heads(fb.heads_dir.clone(), reload_requested.clone()));
        }
        let reloader = reload::Reloader {
            path,
            running: cfg.clone(),
            engine: shared.clone(),
            link: link.clone(),
            apply: Box::new({
                let (sessions, doors, notifier) = (sessions.clone(), doors.clone(), notifier.clone());
                move |cfg: &Config| {
                    sessions.replace(&doors, cfg);
                    log_level.set(&cfg.logging.level);
                    notifier.status(&format!("reloaded config {}; mode {:?}", cfg.version, cfg.server.mode));
                }
            }),
        };
        tokio::spawn(reloader.run(reload_requested));
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn({
            let (ready, notifier) = (ready.clone(), notifier.clone());
            async move {
                wait_for_stop_signal().await;
                // Load balancers, probes and systemd hear it first.
                ready.store(false, Ordering::Relaxed);
                notifier.stopping();
                tracing::info!("stopping: no new connections, finishing messages in flight");
                let _ = stop_tx.send(true);
            }
        });
        let (max, grace) = (cfg.server.max_connections, cfg.server.shutdown_grace);
        let mut running = tokio::task::JoinSet::new();
        if let Some(l) = milter {
            running.spawn(crate::milter::server::serve(
                l,
                shared.clone(),
                sessions.milter.clone(),
                max,
                grace,
                stop_rx.clone(),
            ));
        }
        for (listener, settings) in [(smtp, sessions.smtp.clone()), (lmtp, sessions.lmtp.clone())] {
            let (Some(l), Some(settings)) = (listener, settings) else { continue };
            running.spawn(crate::smtp::server::serve(l, shared.clone(), settings, max, grace, stop_rx.clone()));
        }
        while running.join_next().await.is_some() {}
        tracing::info!("stopped");
        Ok(())
    })
}

async fn wait_for_stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            std::future::pending::<()>().await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_gives_new_connections_the_new_session_settings_and_keeps_the_budget() {
        let a = Config::from_toml("[server]\ndecision_timeout = \"5s\"\non_error = \"accept\"\n", "a").unwrap();
        let b = Config::from_toml(
            "[server]\ndecision_timeout = \"9s\"\non_error = \"tempfail\"\nidle_timeout = \"1m\"\n\
             [limits]\nmax_recipients = 7\nmax_total_bytes = 1\n",
            "b",
        )
        .unwrap();
        let doors = FrontDoors::new(&a).unwrap();
        let sessions = Sessions::new(&doors, &a);
        let before = sessions.milter.current();
        sessions.replace(&doors, &b);
        let after = sessions.milter.current();
        assert_eq!(after.decision.timeout, std::time::Duration::from_secs(9));
        assert_eq!(after.decision.on_error, crate::settings::OnError::Tempfail);
        assert_eq!((after.idle_timeout, after.max_recipients), (std::time::Duration::from_secs(60), 7));
        // The byte budget is shared by all connections and restart-only.
        assert!(Arc::ptr_eq(&before.budget, &after.budget));
        assert_eq!(before.decision.timeout, std::time::Duration::from_secs(5), "a running connection keeps its own");
    }
}
