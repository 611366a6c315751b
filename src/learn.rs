//! The continuous-learning subcommands (`feedback`, `retrain`, `heads`,
//! `report`) and the daemon's side of it: the store connection, the
//! retraining thread, the head-pointer watch and `POST /feedback`.

use std::collections::BTreeMap;
use std::io::Read;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mailtriage::config::Config;
use mailtriage::feedback::heads::{Registry, Role};
use mailtriage::feedback::intake::Requested;
use mailtriage::feedback::recent::RecentDecisions;
use mailtriage::feedback::retrain::{self, RetrainOutcome};
use mailtriage::feedback::store::Store;
use mailtriage::feedback::{Channel, FeedbackError};
use mailtriage::metrics::{name, FeedbackEndpoint};
use mailtriage::pipeline::{FeedbackLink, SharedTriage, Triage};
use tokio::sync::Notify;

use crate::cli::{FeedbackArgs, HeadArg, HeadsCommand};

fn role(h: HeadArg) -> Role {
    match h {
        HeadArg::Department => Role::Department,
        HeadArg::Priority => Role::Priority,
    }
}

fn open_store(cfg: &Config) -> Result<Store> {
    let fb = cfg.feedback.as_ref().context("no [feedback] section in the configuration")?;
    Ok(Store::open(&fb.store)?)
}

/// `mailtriage feedback`: a message from a person (stdin or a file), or a
/// Message-ID the daemon decided recently.
pub fn feedback(cfg: &Config, args: &FeedbackArgs) -> Result<ExitCode> {
    let requested = Requested { department: args.department.clone(), priority: args.priority.clone() };
    if requested == Requested::default() {
        bail!("say what is right: --department NAME and/or --priority NAME");
    }
    if let Some(id) = &args.message_id {
        return feedback_by_message_id(cfg, id, &requested);
    }
    let mut raw = Vec::new();
    match &args.file {
        Some(p) => raw = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        None => {
            std::io::stdin().read_to_end(&mut raw).context("reading the message from stdin")?;
        }
    }
    if raw.is_empty() {
        bail!("no message given (pipe one into stdin, or name a file)");
    }
    let mut triage = Triage::new(cfg).context("loading rules and model")?;
    // The pipe reads the message itself, so it keeps no recent decisions (0 bytes).
    let link = FeedbackLink { store: Arc::new(open_store(cfg)?), recent: Arc::new(RecentDecisions::new(0)) };
    triage.connect_feedback(link);
    let (features, message_id) = triage.features_of(&raw)?;
    let actor = format!("user:{}", std::env::var("USER").unwrap_or_else(|_| "unknown".into()));
    let hash = message_id.as_deref().map(|m| triage.message_hash(m));
    let id = triage.record(&features, &requested, Channel::Pipe, actor, hash)?;
    println!("recorded correction {id}");
    Ok(ExitCode::SUCCESS)
}

/// Asks the running daemon (its metrics listener) to record a correction
/// for a recent decision: only it holds the recent decisions' features.
fn feedback_by_message_id(cfg: &Config, message_id: &str, requested: &Requested) -> Result<ExitCode> {
    use std::io::Write;
    let listen = &cfg.metrics.as_ref().context("--message-id needs [metrics] listen (the daemon's HTTP side)")?.listen;
    let token = token(cfg)?.context("--message-id needs [feedback] http_token_file")?;
    let body = serde_json::json!({
        "message_id": message_id,
        "department": requested.department,
        "priority": requested.priority,
        "channel": "cli",
    })
    .to_string();
    let mut s =
        std::net::TcpStream::connect(listen).with_context(|| format!("connecting to the daemon at {listen}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "POST /feedback HTTP/1.1\r\nHost: {listen}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    if head.starts_with("HTTP/1.1 200") {
        println!("{}", body.trim());
        Ok(ExitCode::SUCCESS)
    } else {
        bail!("the daemon refused: {} {}", head.lines().next().unwrap_or(""), body.trim())
    }
}

fn token(cfg: &Config) -> Result<Option<String>> {
    let Some(path) = cfg.feedback.as_ref().and_then(|f| f.http_token_file.as_ref()) else { return Ok(None) };
    let t = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let t = t.trim().to_string();
    if t.len() < 16 {
        bail!("{}: the token must be at least 16 characters", path.display());
    }
    Ok(Some(t))
}

fn roles(cfg: &Config, only: Option<HeadArg>) -> Vec<Role> {
    match only {
        Some(h) => vec![role(h)],
        None => Role::ALL.into_iter().filter(|&r| mailtriage::feedback::heads::in_use(cfg, r).is_some()).collect(),
    }
}

fn print_outcome(o: &RetrainOutcome, json: bool) {
    if json {
        println!("{}", serde_json::to_string(o).expect("serialisable"));
        return;
    }
    let verdict = match &o.version {
        Some(v) => format!("promoted as {v}"),
        None => "kept the current head".into(),
    };
    println!(
        "{} head: {verdict} ({}); compared with {}: macro-F1 {:.4} → {:.4}, accuracy {:.4} → {:.4} on {} messages \
         ({} original, {} corrections in the reservoir, {} held back)",
        o.role.as_str(),
        o.reason,
        if o.against.is_empty() { "the configured head" } else { &o.against },
        o.current.macro_f1,
        o.candidate.macro_f1,
        o.current.accuracy,
        o.candidate.accuracy,
        o.candidate.n,
        o.original_examples,
        o.reservoir,
        o.held_back
    );
}

/// `mailtriage retrain`.
pub fn retrain(cfg: &Config, head: Option<HeadArg>, json: bool) -> Result<ExitCode> {
    let store = open_store(cfg)?;
    let triage = Triage::new(cfg).context("loading rules and model")?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let roles = roles(cfg, head);
    if roles.is_empty() {
        bail!("no trained head to retrain: set [model] department_head (train one with `mailtriage train`)");
    }
    for r in roles {
        let o = retrain::retrain(cfg, &store, r, triage.encoder().as_deref(), threads)?;
        print_outcome(&o, json);
    }
    Ok(ExitCode::SUCCESS)
}

/// `mailtriage heads list|rollback`.
pub fn heads(cfg: &Config, cmd: &HeadsCommand) -> Result<ExitCode> {
    let fb = cfg.feedback.as_ref().context("no [feedback] section (heads_dir) in the configuration")?;
    let registry = Registry::new(&fb.heads_dir);
    match cmd {
        HeadsCommand::List { json } => {
            for r in Role::ALL {
                let versions = registry.versions(r)?;
                if *json {
                    for v in &versions {
                        println!("{}", serde_json::to_string(v).expect("serialisable"));
                    }
                    continue;
                }
                if versions.is_empty() {
                    let configured = mailtriage::feedback::heads::in_use(cfg, r);
                    println!(
                        "{}: no promoted versions (in use: {})",
                        r.as_str(),
                        configured.map_or("none".into(), |p| p.display().to_string())
                    );
                }
                for v in &versions {
                    println!(
                        "{} {} {:<4} trained {} on {} messages; gate: {}",
                        if v.current { "*" } else { " " },
                        r.as_str(),
                        v.version,
                        v.trained_at,
                        v.train_examples,
                        v.promotion.get("reason").and_then(|x| x.as_str()).unwrap_or("-"),
                    );
                }
            }
        }
        HeadsCommand::Rollback { version, head } => {
            let path = registry.rollback(role(*head), version)?;
            println!(
                "{} head is now {} ({}); a running daemon swaps it in within seconds",
                role(*head).as_str(),
                version,
                path.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `mailtriage report`: from the audit trail and the feedback store.
pub fn report(cfg: &Config, days: u64, json: bool) -> Result<ExitCode> {
    let audit = cfg.audit.as_ref().context("the report reads the audit trail: configure [audit]")?;
    let since = std::time::SystemTime::now() - Duration::from_secs(days * 86_400);
    let mut files = vec![audit.path.clone()];
    if let (Some(dir), Some(name)) = (audit.path.parent(), audit.path.file_name()) {
        let prefix = format!("{}.", name.to_string_lossy());
        for e in std::fs::read_dir(if dir.as_os_str().is_empty() { std::path::Path::new(".") } else { dir })?.flatten()
        {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                files.push(e.path());
            }
        }
    }
    let (mut decided, mut failed, mut review, mut by_model, mut by_rule, mut by_default) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else { continue };
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            let recent =
                v["time"].as_str().and_then(|t| humantime::parse_rfc3339_weak(t).ok()).is_some_and(|t| t >= since);
            if !recent {
                continue;
            }
            if v["outcome"] != "decided" {
                failed += u64::from(v["outcome"] == "failed");
                continue;
            }
            decided += 1;
            let source = v["source"].as_str().unwrap_or("");
            if v["action"] == "review" {
                review += 1;
            } else if source.starts_with("model:") {
                by_model += 1;
            } else if source.starts_with("rule:") {
                by_rule += 1;
            } else {
                by_default += 1;
            }
        }
    }
    let since_unix = mailtriage::feedback::now() - (days * 86_400) as i64;
    let corrections = match cfg.feedback.as_ref() {
        Some(_) => open_store(cfg)?.summary(since_unix)?,
        None => Vec::new(),
    };
    let mut per_department: BTreeMap<String, u64> = BTreeMap::new();
    for c in &corrections {
        *per_department.entry(c.department.clone().unwrap_or_else(|| "(priority only)".into())).or_default() += 1;
    }
    let auto = by_model + by_rule;
    let minutes = cfg.kpi.minutes_per_manual_triage;
    let saved = (auto as f64 - corrections.len() as f64).max(0.0) * minutes;
    let share = |n: u64| if decided > 0 { n as f64 / decided as f64 } else { 0.0 };
    let report = serde_json::json!({
        "days": days,
        "messages": decided,
        "failed_open": failed,
        "auto_routed": auto,
        "auto_routed_share": share(auto),
        "by_model": by_model,
        "by_rule": by_rule,
        "default": by_default,
        "review": review,
        "review_share": share(review),
        "corrections": corrections.len(),
        "misroute_rate": if auto > 0 { corrections.len() as f64 / auto as f64 } else { 0.0 },
        "corrections_per_day": per_department.iter().map(|(d, n)| (d.clone(), *n as f64 / days.max(1) as f64)).collect::<BTreeMap<_, _>>(),
        "minutes_per_manual_triage": minutes,
        "staff_minutes_saved": saved,
        "staff_hours_saved": saved / 60.0,
    });
    if json {
        println!("{report}");
        return Ok(ExitCode::SUCCESS);
    }
    println!("last {days} days: {decided} messages decided, {failed} failed open");
    println!("  auto-routed {auto} ({:.1} %: {by_model} by the model, {by_rule} by rules), review {review} ({:.1} %), default {by_default}", 100.0 * share(auto), 100.0 * share(review));
    println!(
        "  corrections {} (misroute rate {:.2} % of auto-routed)",
        corrections.len(),
        100.0 * report["misroute_rate"].as_f64().unwrap_or(0.0)
    );
    for (d, n) in &per_department {
        println!("    {d:<30} {n:>6}  ({:.1} per day)", *n as f64 / days.max(1) as f64);
    }
    println!(
        "  estimated staff time saved: {saved:.0} minutes ({:.1} hours) at {minutes} min per message",
        saved / 60.0
    );
    Ok(ExitCode::SUCCESS)
}

/// The daemon's feedback side, started once.
pub struct DaemonFeedback {
    pub link: Option<FeedbackLink>,
    pub endpoint: Option<FeedbackEndpoint>,
}

/// Opens the store (a store that is down does not stop mail: the feedback
/// channels are off until a restart, and that is logged) and builds the
/// HTTP endpoint around `shared`.
pub fn start(cfg: &Config, shared_slot: Arc<std::sync::OnceLock<SharedTriage>>) -> Result<DaemonFeedback> {
    let Some(fb) = &cfg.feedback else { return Ok(DaemonFeedback { link: None, endpoint: None }) };
    let link = match Store::open(&fb.store) {
        Ok(store) => {
            Some(FeedbackLink { store: Arc::new(store), recent: Arc::new(RecentDecisions::new(fb.recent_bytes)) })
        }
        Err(e) => {
            tracing::error!(error = %e, "feedback store unavailable; corrections are not recorded until a restart");
            None
        }
    };
    let endpoint = match (token(cfg)?, &link) {
        (Some(token), Some(_)) => Some(FeedbackEndpoint {
            token,
            handler: Arc::new(move |v: serde_json::Value| {
                let Some(shared) = shared_slot.get() else { return Err((503, "starting".into())) };
                let str_of = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
                let message_id = str_of("message_id").ok_or((400, "`message_id` is required".to_string()))?;
                let requested = Requested { department: str_of("department"), priority: str_of("priority") };
                let channel = if str_of("channel").as_deref() == Some("cli") { Channel::Cli } else { Channel::Http };
                shared
                    .current()
                    .correct_by_message_id(&message_id, &requested, channel, channel.as_str().to_string())
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
            }),
        }),
        _ => None,
    };
    Ok(DaemonFeedback { link, endpoint })
}

/// Retrains in the background: when `retrain_after` corrections arrived or
/// `retrain_every` passed with new ones. A promotion asks for a reload.
/// Runs on its own thread with one embedding thread, beside mail.
pub fn spawn_retrainer(
    path: std::path::PathBuf,
    cfg: &Config,
    link: &FeedbackLink,
    shared: SharedTriage,
    reload: Arc<Notify>,
) {
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
            let encoder = shared.current().encoder();
            for role in Role::ALL.into_iter().filter(|&r| mailtriage::feedback::heads::in_use(&cfg, r).is_some()) {
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
pub async fn watch_heads(cfg: Config, reload: Arc<Notify>) {
    let Some(fb) = cfg.feedback else { return };
    let registry = Registry::new(&fb.heads_dir);
    let mut seen = registry.signature();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let r = registry.clone();
        let Ok(now) = tokio::task::spawn_blocking(move || r.signature()).await else { continue };
        if now != seen {
            seen = now;
            tracing::info!(dir = %fb.heads_dir.display(), "head version changed; reloading");
            reload.notify_one();
        }
    }
}
