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
use crate::daemon::forget::ErasureFollower;
use crate::learn::correction::Channel;
use crate::learn::filter::intake::Requested;
use crate::learn::filter::layer::FeedbackLink;
use crate::learn::filter::recent::{Bounds, RecentDecisions, SharedWindow};
use crate::learn::filter::FeedbackError;
use crate::learn::store::heads::{self, Registry, Role};
use crate::learn::store::leader::{self, Leadership};
use crate::learn::store::{instance_name, Store, FORGET_CHANNEL};
use crate::learn::train::retrain;
use crate::record::metrics::name;
use crate::record::recorder::Recorder;
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
    match Store::for_config(fb, true) {
        Ok(store) => {
            let store = Arc::new(store);
            // Only a correction over HTTP (or the CLI, through it) reads the recent
            // decisions: without the token the daemon keeps none.
            let recent_bytes = if fb.http_token_file.is_some() { fb.recent_bytes } else { 0 };
            let shared = store.second_connection().filter(|_| fb.http_token_file.is_some()).and_then(|writer| {
                let bounds = Bounds { max_age: fb.recent_max_age, max_rows: fb.recent_max_rows };
                SharedWindow::start(store.clone(), writer, bounds)
                    .map_err(|e| tracing::error!(error = %e, "cannot start the recent-decisions writer"))
                    .ok()
            });
            let recent = match shared {
                Some(s) => RecentDecisions::shared(recent_bytes, s),
                None => RecentDecisions::new(recent_bytes),
            };
            Some(FeedbackLink { store, recent: Arc::new(recent) })
        }
        Err(e) => {
            tracing::error!(error = %e, "feedback store unavailable; corrections are not recorded until a restart");
            None
        }
    }
}

/// `POST /feedback` over the running engine: a correction by Message-ID.
/// Every refusal is counted in `mailtriage_feedback_refused_total` (the
/// engine counts its own; a body without `message_id` here).
pub fn endpoint(shared: Running) -> Handler {
    Arc::new(move |v: serde_json::Value| {
        let str_of = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let channel = if str_of("channel").as_deref() == Some("cli") { Channel::Cli } else { Channel::Http };
        let Some(message_id) = str_of("message_id") else {
            Recorder::refused(channel.as_str(), "bad_request");
            return Err((400, "`message_id` is required".to_string()));
        };
        let requested = Requested { department: str_of("department"), priority: str_of("priority") };
        shared
            .current()
            .correct_by_message_id(&message_id, &requested, channel, channel.as_str().to_string())
            .map(|recorded| serde_json::to_value(recorded).expect("serialisable"))
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
///
/// With a PostgreSQL store, only the instance holding the retraining lock
/// runs (see [`leader`]); the others log that they follow, and take over
/// when the leader's session ends. The cursor of what was trained is the
/// store's history, so a successor starts where the last recorded run did.
pub fn spawn_retrainer(path: PathBuf, cfg: &Config, link: &FeedbackLink, shared: Running, reload: Arc<Notify>) {
    let Some(fb) = cfg.feedback.clone().filter(|f| f.retrain) else { return };
    let store = link.store.clone();
    let mut leadership = store.second_connection().map(Leadership::new);
    let spawned = std::thread::Builder::new().name("retrain".into()).spawn(move || {
        let registry = Registry::with_store(&fb.heads_dir, store.clone());
        // Files: what is new is what arrives from this start on. PostgreSQL:
        // read from the history once this instance leads.
        let mut cursor: Option<i64> = (!registry.is_shared()).then(|| store.max_id().unwrap_or(0));
        let mut last_run = Instant::now();
        let mut failed_at: Option<Instant> = None;
        // What the log last said about the lead: each change is logged once.
        let mut said = String::new();
        let mut changed = |now: String| std::mem::replace(&mut said, now.clone()) != now;
        let check = fb.retrain_every.min(Duration::from_secs(5));
        loop {
            std::thread::sleep(check);
            let fence = match leadership.as_mut().map(|l| l.ensure()) {
                None => None,
                Some(Ok(leader::Role::Leading { fence, newly })) => {
                    if newly {
                        cursor = None;
                    }
                    if changed("leading".into()) {
                        tracing::info!(instance = %instance_name(), "retraining leader: this instance retrains for all sharing the store");
                    }
                    Some(fence)
                }
                Some(Ok(leader::Role::Following(who))) => {
                    let who = who.unwrap_or_else(|| "another instance".into());
                    if changed(format!("following {who}")) {
                        tracing::info!(leader = %who, "retraining follower: another instance retrains; this one follows its promotions");
                    }
                    continue;
                }
                Some(Err(e)) => {
                    if changed(format!("no lock: {e}")) {
                        tracing::warn!(error = %e, "retraining paused: the store does not answer");
                    }
                    continue;
                }
            };
            if failed_at.is_some_and(|t| t.elapsed() < Duration::from_secs(60)) {
                continue;
            }
            let last_id = match cursor {
                Some(c) => c,
                None => match registry.trained_through() {
                    Ok(Some(c)) => *cursor.insert(c),
                    Ok(None) => *cursor.insert(store.max_id().unwrap_or(0)),
                    Err(e) => {
                        tracing::warn!(error = %e, "feedback store: cannot read the retraining history");
                        continue;
                    }
                },
            };
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
            // Files: the cursor moves now. PostgreSQL: it is re-read from the history the run records.
            cursor = if registry.is_shared() { None } else { Some(store.max_id().unwrap_or(last_id)) };
            last_run = Instant::now();
            // The configuration as it is now (reloads may have changed it).
            let cfg = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "retraining skipped: configuration does not load");
                    continue;
                }
            };
            if let Err(e) = registry.sync() {
                tracing::warn!(error = %e, "retraining skipped: the head versions could not be read");
                continue;
            }
            let encoder = shared.current().triage().encoder();
            failed_at = None;
            for role in Role::ALL.into_iter().filter(|&r| heads::in_use(&cfg, r).is_some()) {
                let started = Instant::now();
                tracing::info!(head = role.as_str(), new_corrections = new, "retraining started");
                match retrain::retrain(&cfg, &store, role, encoder.as_deref(), 1, fence) {
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
                        failed_at = Some(Instant::now());
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

/// PostgreSQL: listens on a connection of its own for what other
/// instances announce. Promotions and rollbacks (`NOTIFY mailtriage_heads`)
/// are copied into this host's cache ([`Registry::sync`]), which
/// [`watch_heads`] then reloads from; erasures (`NOTIFY mailtriage_forget`)
/// are applied to this host's audit trail and memory
/// ([`ErasureFollower`]). It also looks every 30 s, so what was announced
/// while the connection was down is caught up.
pub fn spawn_store_listener(heads_dir: PathBuf, link: &FeedbackLink, shared: Running) {
    let Some(listen) = link.store.second_connection() else { return };
    let listen = Arc::new(listen);
    let registry = Registry::with_store(heads_dir, listen.clone());
    let recent = link.recent.clone();
    let spawned = std::thread::Builder::new().name("store-listen".into()).spawn(move || {
        let audit_path = |s: &Running| s.current().triage().audit().map(|a| a.path().to_path_buf());
        let mut erasures = ErasureFollower::new(audit_path(&shared).as_deref());
        let mut last_expiry = None::<Instant>;
        let (mut heads_failing, mut erasures_failing) = (false, false);
        loop {
            match registry.sync() {
                Ok(moved) => {
                    if moved {
                        tracing::info!("new head version from the store; swapping it in");
                    }
                    heads_failing = false;
                }
                Err(e) => {
                    if !heads_failing {
                        tracing::warn!(error = %e, "head versions not synced from the store (retrying)");
                    }
                    heads_failing = true;
                }
            }
            match erasures.apply(&listen, Some(&recent), audit_path(&shared).as_deref()) {
                Ok(_) => erasures_failing = false,
                Err(e) => {
                    if !erasures_failing {
                        tracing::warn!(error = %e, "erasures announced by other instances not applied yet (retrying)");
                    }
                    erasures_failing = true;
                }
            }
            // Erasure requests are kept a year and a month: longer than any audit retention.
            if last_expiry.is_none_or(|t| t.elapsed() > Duration::from_secs(3600)) {
                last_expiry = Some(Instant::now());
                let _ = listen.expire_erasures(crate::learn::correction::now() - 400 * 86_400);
            }
            let waited = listen.with_pg(|c| {
                c.batch_execute(&format!("LISTEN {}; LISTEN {}", heads::CHANNEL, FORGET_CHANNEL))?;
                let mut n = c.notifications();
                let got =
                    postgres::fallible_iterator::FallibleIterator::next(&mut n.timeout_iter(Duration::from_secs(30)))?;
                Ok(got.is_some())
            });
            if waited.is_err() {
                std::thread::sleep(Duration::from_secs(5));
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the store listener");
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
