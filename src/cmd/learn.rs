//! The continuous-learning subcommands: `feedback`, `retrain`, `heads`,
//! `report`. The daemon's side of it is `mailtriage::daemon::feedback`.

use std::collections::BTreeMap;
use std::io::Read;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mailtriage::daemon;
use mailtriage::learn::correction::{Channel, Recorded};
use mailtriage::learn::filter::intake::Requested;
use mailtriage::learn::filter::layer::FeedbackLink;
use mailtriage::learn::filter::recent::RecentDecisions;
use mailtriage::learn::filter::FeedbackError;
use mailtriage::learn::store::heads;
use mailtriage::learn::store::heads::{Registry, Role};
use mailtriage::learn::store::leader::{self, Leadership};
use mailtriage::learn::store::Store;
use mailtriage::learn::train::retrain::{self, RetrainOutcome};
use mailtriage::pipeline::Triage;
use mailtriage::settings::Config;

use crate::cli::{FeedbackArgs, HeadArg, HeadsCommand};

fn role(h: HeadArg) -> Role {
    match h {
        HeadArg::Department => Role::Department,
        HeadArg::Priority => Role::Priority,
    }
}

fn open_store(cfg: &Config) -> Result<Store> {
    let fb = cfg.feedback.as_ref().context("no [feedback] section in the configuration")?;
    Ok(Store::for_config(fb, false)?)
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
    // The pipe reads the message itself, so it keeps no recent decisions (0 bytes).
    // A PostgreSQL store that is down answers EX_TEMPFAIL below, not a failure here.
    let fb = cfg.feedback.as_ref().context("no [feedback] section in the configuration")?;
    let link =
        FeedbackLink { store: Arc::new(Store::for_config(fb, true)?), recent: Arc::new(RecentDecisions::new(0)) };
    heads::refresh(cfg);
    let triage = daemon::build(cfg, Some(link)).context("loading rules and model")?;
    let (features, message_id) = triage.features_of(&raw)?;
    let actor = format!("user:{}", std::env::var("USER").unwrap_or_else(|_| "unknown".into()));
    let hash = message_id.as_deref().map(|m| triage.message_hash(m));
    match triage.record(&features, &requested, Channel::Pipe, actor, hash) {
        Ok(recorded) => {
            println!("{recorded}");
            Ok(ExitCode::SUCCESS)
        }
        // Dovecot's pipe and scripts retry on EX_TEMPFAIL.
        Err(FeedbackError::Store(e)) if e.is_retryable() => {
            eprintln!("mailtriage: not recorded, retry later: {e}");
            Ok(ExitCode::from(super::EX_TEMPFAIL))
        }
        Err(e) => Err(e.into()),
    }
}

/// Asks the running daemon (its metrics listener) to record a correction
/// for a recent decision: only it holds the recent decisions' features.
fn feedback_by_message_id(cfg: &Config, message_id: &str, requested: &Requested) -> Result<ExitCode> {
    let listen = &cfg.metrics.as_ref().context("--message-id needs [metrics] listen (the daemon's HTTP side)")?.listen;
    let token = token(cfg)?.context("--message-id needs [feedback] http_token_file")?;
    let body = serde_json::json!({
        "message_id": message_id,
        "department": requested.department,
        "priority": requested.priority,
        "channel": "cli",
    });
    let (status, answer) = super::post_to_daemon(listen, &token, "/feedback", &body)
        .with_context(|| format!("asking the daemon at {listen}"))?;
    match status {
        // The same line as the pipe prints; the JSON is the HTTP answer's.
        200 => {
            match serde_json::from_str::<Recorded>(answer.trim()) {
                Ok(recorded) => println!("{recorded}"),
                Err(_) => println!("{}", answer.trim()),
            }
            Ok(ExitCode::SUCCESS)
        }
        503 => {
            eprintln!("mailtriage: the daemon cannot record it now (retry later): {}", answer.trim());
            Ok(ExitCode::from(super::EX_TEMPFAIL))
        }
        _ => bail!("the daemon refused: {status} {}", answer.trim()),
    }
}

pub(crate) fn token(cfg: &Config) -> Result<Option<String>> {
    Ok(mailtriage::daemon::feedback::http_token(cfg)?)
}

fn roles(cfg: &Config, only: Option<HeadArg>) -> Vec<Role> {
    match only {
        Some(h) => vec![role(h)],
        None => Role::ALL.into_iter().filter(|&r| mailtriage::learn::store::heads::in_use(cfg, r).is_some()).collect(),
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

/// `mailtriage retrain`. With a PostgreSQL store it takes the retraining
/// lock first, so it never runs beside a daemon that leads.
pub fn retrain(cfg: &Config, head: Option<HeadArg>, json: bool) -> Result<ExitCode> {
    let store = Arc::new(open_store(cfg)?);
    let fb = cfg.feedback.as_ref().context("no [feedback] section in the configuration")?;
    Registry::with_store(&fb.heads_dir, store.clone()).sync()?;
    let mut leadership = store.second_connection().map(Leadership::new);
    let fence = match leadership.as_mut().map(|l| l.ensure()).transpose()? {
        None => None,
        Some(leader::Role::Leading { fence, .. }) => Some(fence),
        Some(leader::Role::Following(who)) => bail!(
            "{} holds the retraining lock: it retrains with these corrections on its own schedule \
             (stop it, or wait for it to finish, to retrain by hand)",
            who.unwrap_or_else(|| "another instance".into())
        ),
    };
    let triage = Triage::new(&heads::current(cfg)).context("loading rules and model")?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let roles = roles(cfg, head);
    if roles.is_empty() {
        bail!("no trained head to retrain: set [model] department_head (train one with `mailtriage train`)");
    }
    for r in roles {
        let o = retrain::retrain(cfg, &store, r, triage.encoder().as_deref(), threads, fence)?;
        print_outcome(&o, json);
    }
    Ok(ExitCode::SUCCESS)
}

/// `mailtriage heads list|rollback`.
pub fn heads(cfg: &Config, cmd: &HeadsCommand) -> Result<ExitCode> {
    let fb = cfg.feedback.as_ref().context("no [feedback] section (heads_dir) in the configuration")?;
    let registry = Registry::with_store(&fb.heads_dir, Arc::new(open_store(cfg)?));
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
                    let configured = mailtriage::learn::store::heads::in_use(cfg, r);
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
                "{} head is now {} ({}); running daemons swap it in within seconds{}",
                role(*head).as_str(),
                version,
                path.display(),
                if registry.is_shared() { " (every instance sharing the store)" } else { "" }
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
    let since_unix = mailtriage::learn::correction::now() - (days * 86_400) as i64;
    let corrections = match cfg.feedback.as_ref() {
        Some(_) => open_store(cfg)?.summary(since_unix)?,
        None => Vec::new(),
    };
    // Corrections store the head label they train; several labels may mean one
    // department (its `labels`), and the report, like the metrics, counts departments.
    let mut per_department: BTreeMap<String, u64> = BTreeMap::new();
    let mut per_label: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for c in &corrections {
        let department = match c.department.as_deref() {
            Some(l) => cfg.catalog.for_label(l).map_or_else(|| l.to_string(), |d| d.to_string()),
            None => "(priority only)".into(),
        };
        if let Some(l) = &c.department {
            *per_label.entry(department.clone()).or_default().entry(l.clone()).or_default() += 1;
        }
        *per_department.entry(department).or_default() += 1;
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
        "target_accuracy": cfg.policy.target_accuracy,
        "corrections_by_department": per_department,
        "corrections_per_day": per_department.iter().map(|(d, n)| (d.clone(), *n as f64 / days.max(1) as f64)).collect::<BTreeMap<_, _>>(),
        "corrections_by_label": per_label,
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
    if let Some(t) = cfg.policy.target_accuracy {
        let achieved = 1.0 - report["misroute_rate"].as_f64().unwrap_or(0.0);
        println!(
            "  target accuracy {:.1} % (policy.target_accuracy); achieved on auto-routed mail by staff corrections: {:.1} %",
            t * 100.0,
            achieved * 100.0
        );
    }
    for (d, n) in &per_department {
        // The head labels only where they are not just the department's name.
        let labels = per_label.get(d).filter(|l| l.len() > 1 || l.keys().any(|l| l != d)).map(|l| {
            format!("; labels {}", l.iter().map(|(l, n)| format!("{l:?} {n}")).collect::<Vec<_>>().join(", "))
        });
        println!("    {d:<30} {n:>6}  ({:.1} per day{})", *n as f64 / days.max(1) as f64, labels.unwrap_or_default());
    }
    println!(
        "  estimated staff time saved: {saved:.0} minutes ({:.1} hours) at {minutes} min per message",
        saved / 60.0
    );
    Ok(ExitCode::SUCCESS)
}
