//! The daemon's side of learning from corrections: the store connection and
//! recent-decisions window (made once, they outlive reloads), the
//! `POST /feedback` handler, the retraining thread and the head-pointer
//! watch. Each is started from [`super::run`] in that order, after the
//! decision engine exists, so nothing is bound late.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::sync::Notify;

use super::http::Handler;
use super::Running;
use crate::learn::feedback::heads::{self, Registry, Role};
use crate::learn::feedback::intake::Requested;
use crate::learn::feedback::layer::FeedbackLink;
use crate::learn::feedback::recent::RecentDecisions;
use crate::learn::feedback::retrain;
use crate::learn::feedback::store::Store;
use crate::learn::feedback::{Channel, FeedbackError};
use crate::record::metrics::name;
use crate::settings::Config;

/// The shared secret of `POST /feedback` could not be read.
#[derive(Debug, Error)]
pub enum TokenError {
    #[error("reading the feedback token {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: the feedback token must be at least 16 characters")]
    Short { path: PathBuf },
}

/// The bearer token of `POST /feedback` (`[feedback] http_token_file`), if configured.
pub fn http_token(cfg: &Config) -> Result<Option<String>, TokenError> {
    let Some(path) = cfg.feedback.as_ref().and_then(|f| f.http_token_file.as_ref()) else { return Ok(None) };
    let t = std::fs::read_to_string(path).map_err(|source| TokenError::Read { path: path.clone(), source })?;
    let t = t.trim().to_string();
    if t.len() < 16 {
        return Err(TokenError::Short { path: path.clone() });
    }
    Ok(Some(t))
}

/// Opens the store. A store that is down does not stop mail: a PostgreSQL
/// server is connected again on each use (corrections meanwhile get "retry
/// later"); a store that cannot work at all (a bad URL, an unwritable SQLite
/// file) turns the feedback channels off until a restart, and that is logged.
pub fn open_link(cfg: &Config) -> Option<FeedbackLink> {
    let fb = cfg.feedback.as_ref()?;
    match Store::open_later(&fb.store) {
        Ok(store) => {
            // Only a correction over HTTP (or the CLI, through it) reads the recent
            // decisions: without the token the daemon keeps none.
            let recent_bytes = if fb.http_token_file.is_some() { fb.recent_bytes } else { 0 };
            Some(FeedbackLink { store: Arc::new(store), recent: Arc::new(RecentDecisions::new(recent_bytes)) })
        }
        Err(e) => {
            tracing::error!(error = %e, "feedback store unavailable; corrections are not recorded until a restart");
            None
        }
    }
}

/// `POST /feedback` over the running engine: a correction by Message-ID.
pub fn endpoint(shared: Running) -> Handler {
    Arc::new(move |v: serde_json::Value| {
        let str_of = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let message_id = str_of("message_id").ok_or((400, "`message_id` is required".to_string()))?;
        let requested = Requested { department: str_of("department"), priority: str_of("priority") };
        let channel = if str_of("channel").as_deref() == Some("cli") { Channel::Cli } else { Channel::Http };
        shared
            .current()
            .correct_by_message_id(&message_id, &requested, channel, channel.as_str().to_string())
            .map(|id| serde_json::json!({ "recorded": id }))
            .map_err(|e| {
                let code = match e {
                    FeedbackError::NotRecent => 404,
                    FeedbackError::UnknownDepartment(..)
                    | FeedbackError::UnknownPriority(..)
                    | FeedbackError::NoLabel => 422,
                    _ => 503,
                };
                (code, e.to_string())
            })
    })
}

/// Retrains in the background: when `retrain_after` corrections arrived or
/// `retrain_every` passed with new ones. A promotion asks for a reload.
/// Runs on its own thread with one embedding thread, beside mail.
pub fn spawn_retrainer(path: PathBuf, cfg: &Config, link: &FeedbackLink, shared: Running, reload: Arc<Notify>) {
    let Some(fb) = cfg.feedback.clone().filter(|f| f.retrain) else { return };
    let store = link.store.clone();
    let spawned = std::thread::Builder::new().name("retrain".into()).spawn(move || {
        let mut last_id = store.max_id().unwrap_or(0);
        let mut last_run = Instant::now();
        let check = fb.retrain_every.min(Duration::from_secs(5));
        loop {
            std::thread::sleep(check);
            let new = match store.count_after(last_id) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "feedback store: cannot count new corrections");
                    continue;
                }
            };
            if new == 0 || (new < fb.retrain_after && last_run.elapsed() < fb.retrain_every) {
                continue;
            }
            last_id = store.max_id().unwrap_or(last_id);
            last_run = Instant::now();
            // The configuration as it is now (reloads may have changed it).
            let cfg = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "retraining skipped: configuration does not load");
                    continue;
                }
            };
            let encoder = shared.current().triage().encoder();
            for role in Role::ALL.into_iter().filter(|&r| heads::in_use(&cfg, r).is_some()) {
                let started = Instant::now();
                match retrain::retrain(&cfg, &store, role, encoder.as_deref(), 1) {
                    Ok(o) => {
                        let result = if o.promoted { "promoted" } else { "refused" };
                        metrics::counter!(name::RETRAIN, "head" => role.as_str(), "result" => result).increment(1);
                        tracing::info!(
                            head = role.as_str(),
                            result,
                            version = o.version.as_deref().unwrap_or("-"),
                            reason = %o.reason,
                            new_corrections = new,
                            seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
                            "retrained"
                        );
                        if o.promoted {
                            reload.notify_one();
                        }
                    }
                    Err(e) => {
                        metrics::counter!(name::RETRAIN, "head" => role.as_str(), "result" => "failed").increment(1);
                        tracing::error!(head = role.as_str(), error = %e, "retraining failed");
                    }
                }
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the retraining thread");
    }
}

/// Watches the head pointers (a promotion by `mailtriage retrain`, a
/// rollback) and asks for a reload when they change.
pub async fn watch_heads(heads_dir: PathBuf, reload: Arc<Notify>) {
    let registry = Registry::new(&heads_dir);
    let mut seen = registry.signature();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let r = registry.clone();
        let Ok(now) = tokio::task::spawn_blocking(move || r.signature()).await else { continue };
        if now != seen {
            seen = now;
            tracing::info!(dir = %heads_dir.display(), "head version changed; reloading");
            reload.notify_one();
        }
    }
}
