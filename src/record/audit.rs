//! The audit trail: one JSON line per decision, with no personal data.
//!
//! A line holds the time, the MTA queue id, a keyed hash (HMAC-SHA256) of the
//! Message-ID, the sender and recipient *domains*, the decision, what made it
//! (rule name, or model and head versions), the mode, the config version
//! and the latency. Never a subject, a body or a full address. The key makes
//! the hash useless to anyone without it (Message-IDs are guessable), yet lets
//! an auditor holding the key find the line for a given message.
//!
//! The file is rotated when it would exceed `max_bytes`; rotated files older
//! than `retention_days` are deleted.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use thiserror::Error;

use crate::decide::policy::{Decision, Source};
use crate::domain::{Action, DepartmentId, PriorityId};
use crate::message::envelope::{domain_of, Envelope};
use crate::scope::{Auto, Skip};
use crate::settings::{AuditConfig, Mode};

#[derive(Debug, Error)]
pub enum AuditError {
    #[error("audit file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("audit key file {0}: must hold at least 16 bytes")]
    ShortKey(PathBuf),
}

/// What became of a message, as the audit line says it.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Decided,
    /// No decision: the message got `on_error`; `reason` says why.
    Failed,
    /// A correction mail; `reason` says whether it was recorded.
    Feedback,
    /// Not triaged (`[scope]`, or a `skip` rule); `reason` says why.
    Skipped,
}

/// What decided the department, or `feedback` for a correction mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordSource {
    Decision(Source),
    Feedback,
}

impl Serialize for RecordSource {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RecordSource::Decision(src) => src.serialize(s),
            RecordSource::Feedback => s.serialize_str("feedback"),
        }
    }
}

/// What was done with the message: a decision's action, or for a
/// correction mail, whether a copy went to the audit mailbox or it was
/// dropped.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Handling {
    Action(Action),
    Feedback(FeedbackHandling),
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FeedbackHandling {
    Discard,
    AuditCopy,
}

/// One message, as recorded. Built from the typed decision by
/// [`Record::decided`] and its siblings; serde writes the strings.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Record {
    pub time: String,
    pub queue_id: Option<String>,
    pub message_id_hash: Option<String>,
    pub sender_domain: String,
    pub recipient_domains: Vec<String>,
    pub outcome: Outcome,
    pub reason: Option<String>,
    pub department: Option<DepartmentId>,
    pub priority: Option<PriorityId>,
    pub confidence: Option<f32>,
    pub source: Option<RecordSource>,
    pub action: Option<Handling>,
    /// Automatic mail triaged but only tagged (`scope.skip_auto = false`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto: Option<Auto>,
    pub mode: Mode,
    pub config_version: String,
    pub model_version: String,
    pub latency_ms: f64,
}

/// What every line of one running configuration shares.
#[derive(Debug, Clone)]
pub struct Context {
    pub mode: Mode,
    pub config_version: String,
    /// `model:<id> (department=…, priority=…)`, or `none`.
    pub model_version: String,
}

impl Record {
    /// A line for a message with this envelope, outcome not yet known
    /// (`failed`, reason `abandoned`, until told otherwise). Domains only:
    /// never a full address.
    pub fn begin(envelope: &Envelope, ctx: &Context) -> Record {
        let mut recipient_domains: Vec<String> = envelope.rcpts.iter().map(|r| domain_of(r)).collect();
        recipient_domains.sort();
        recipient_domains.dedup();
        Record {
            time: String::new(),
            queue_id: envelope.queue_id.clone(),
            message_id_hash: None,
            sender_domain: domain_of(&envelope.mail_from),
            recipient_domains,
            outcome: Outcome::Failed,
            reason: Some("abandoned".into()),
            department: None,
            priority: None,
            confidence: None,
            source: None,
            action: None,
            auto: None,
            mode: ctx.mode,
            config_version: ctx.config_version.clone(),
            model_version: ctx.model_version.clone(),
            latency_ms: 0.0,
        }
    }

    /// The message was decided.
    pub fn decided(mut self, d: &Decision, message_id_hash: Option<String>) -> Record {
        self.outcome = Outcome::Decided;
        self.reason = None;
        self.message_id_hash = message_id_hash;
        self.department = Some(d.department.clone());
        self.priority = Some(d.priority.clone());
        self.confidence = Some(d.confidence);
        self.source = Some(RecordSource::Decision(d.source.clone()));
        self.action = Some(Handling::Action(d.action));
        self
    }

    /// Marks automatic mail that was only tagged.
    pub fn auto(mut self, auto: Option<Auto>) -> Record {
        self.auto = auto;
        self
    }

    /// Not triaged: `reason` is the scope's label (`authenticated`,
    /// `null_sender`, `rule:<name>`…).
    pub fn skipped(mut self, skip: &Skip) -> Record {
        self.outcome = Outcome::Skipped;
        self.reason = Some(skip.to_string());
        self
    }

    /// No decision; `reason` is a short, content-free label.
    pub fn failed(mut self, reason: &str) -> Record {
        self.outcome = Outcome::Failed;
        self.reason = Some(reason.to_string());
        self
    }

    /// A correction mail; `status` says whether it was recorded (redacted here).
    pub fn feedback(mut self, status: &str, handling: FeedbackHandling) -> Record {
        self.outcome = Outcome::Feedback;
        self.reason = Some(crate::record::redact::redact(status).into_owned());
        self.source = Some(RecordSource::Feedback);
        self.action = Some(Handling::Feedback(handling));
        self
    }
}

/// The line of a message in progress: written as it stands when dropped, so
/// a decision the front door stops waiting for (its deadline, the MTA
/// hanging up) is still audited, as `failed`, reason `abandoned`.
pub struct Pending<'a> {
    log: &'a AuditLog,
    record: Option<Record>,
    started: std::time::Instant,
}

impl Pending<'_> {
    /// Writes the line (decided, failed, feedback) now.
    pub fn finish(mut self, f: impl FnOnce(Record) -> Record) {
        if let Some(r) = self.record.take() {
            self.write(f(r));
        }
    }

    fn write(&self, mut record: Record) {
        record.latency_ms = self.started.elapsed().as_secs_f64() * 1e3;
        record.time = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        if let Err(e) = self.log.write(&record) {
            tracing::error!(error = %e, "audit record not written");
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(r) = self.record.take() {
            self.write(r);
        }
    }
}

pub struct AuditLog {
    path: PathBuf,
    max_bytes: u64,
    retention: Duration,
    key: Vec<u8>,
    file: Mutex<(BufWriter<File>, u64)>,
}

impl AuditLog {
    /// Opens (appending) the audit file and its key, creating the key (0600,
    /// 32 random bytes) on first use.
    pub fn open(cfg: &AuditConfig) -> Result<AuditLog, AuditError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| AuditError::Io { path, source }
        };
        if let Some(dir) = cfg.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        let key = load_or_create_key(&cfg.key_file)?;
        let file = open_append(&cfg.path).map_err(io(&cfg.path))?;
        let size = file.metadata().map_err(io(&cfg.path))?.len();
        let log = AuditLog {
            path: cfg.path.clone(),
            max_bytes: cfg.max_bytes,
            retention: Duration::from_secs(cfg.retention_days * 86_400),
            key,
            file: Mutex::new((BufWriter::new(file), size)),
        };
        log.expire_rotated();
        Ok(log)
    }

    /// Starts the line of one message (see [`Pending`]).
    pub fn begin(&self, envelope: &Envelope, ctx: &Context) -> Pending<'_> {
        Pending { log: self, record: Some(Record::begin(envelope, ctx)), started: std::time::Instant::now() }
    }

    /// HMAC-SHA256 of a Message-ID (angle brackets and case of the domain ignored), hex.
    pub fn hash_message_id(&self, message_id: &str) -> String {
        let id = message_id.trim().trim_start_matches('<').trim_end_matches('>');
        let normal = match id.rsplit_once('@') {
            Some((local, domain)) => format!("{local}@{}", domain.to_ascii_lowercase()),
            None => id.to_string(),
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(normal.as_bytes());
        mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Appends one record. A write error is returned, never a panic: the
    /// caller logs it and mail keeps flowing.
    pub fn write(&self, record: &Record) -> Result<(), AuditError> {
        let mut line = serde_json::to_vec(record).expect("records serialise");
        line.push(b'\n');
        let io = |source| AuditError::Io { path: self.path.clone(), source };
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if guard.1 > 0 && guard.1 + line.len() as u64 > self.max_bytes {
            guard.0.flush().map_err(io)?;
            let stamp = humantime::format_rfc3339_micros(SystemTime::now()).to_string().replace([':', '-'], "");
            let rotated = PathBuf::from(format!("{}.{}", self.path.display(), stamp.trim_end_matches('Z')));
            std::fs::rename(&self.path, &rotated).map_err(io)?;
            *guard = (BufWriter::new(open_append(&self.path).map_err(io)?), 0);
            drop(guard);
            self.expire_rotated();
            guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        }
        guard.0.write_all(&line).map_err(io)?;
        guard.0.flush().map_err(io)?;
        guard.1 += line.len() as u64;
        Ok(())
    }

    /// Deletes rotated files (`<name>.<stamp>`) older than the retention.
    fn expire_rotated(&self) {
        let (Some(dir), Some(name)) = (self.path.parent(), self.path.file_name()) else { return };
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        let prefix = format!("{}.", name.to_string_lossy());
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > self.retention);
            if old && e.file_name().to_string_lossy().starts_with(&prefix) {
                if let Err(err) = std::fs::remove_file(e.path()) {
                    tracing::warn!(file = %e.path().display(), error = %err, "cannot delete expired audit file");
                }
            }
        }
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).mode(0o640).open(path)
}

fn load_or_create_key(path: &Path) -> Result<Vec<u8>, AuditError> {
    let io = |source| AuditError::Io { path: path.to_owned(), source };
    match std::fs::read(path) {
        Ok(k) if k.len() >= 16 => Ok(k),
        Ok(_) => Err(AuditError::ShortKey(path.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = vec![0u8; 32];
            File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key)).map_err(io)?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            let mut f = OpenOptions::new().create_new(true).write(true).mode(0o600).open(path).map_err(io)?;
            f.write_all(&key).map_err(io)?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: usize) -> Record {
        Record {
            time: "2026-11-22T00:00:00Z".into(),
            queue_id: Some(format!("Q{i}")),
            message_id_hash: None,
            sender_domain: "shop.example".into(),
            recipient_domains: vec!["corp.example".into()],
            outcome: Outcome::Decided,
            reason: None,
            department: Some(DepartmentId::new("billing")),
            priority: Some(PriorityId::new("high")),
            confidence: Some(1.0),
            source: Some(RecordSource::Decision(Source::Rule("invoices".into()))),
            action: Some(Handling::Action(Action::Reroute)),
            auto: None,
            mode: Mode::Enforce,
            config_version: "abc".into(),
            model_version: "none".into(),
            latency_ms: 0.5,
        }
    }

    #[test]
    fn serde_writes_the_typed_fields_as_the_audit_trail_always_spelled_them() {
        let v = serde_json::to_value(record(1)).unwrap();
        assert_eq!(
            (&v["outcome"], &v["source"], &v["action"], &v["mode"], &v["department"]),
            (&"decided".into(), &"rule:invoices".into(), &"reroute".into(), &"enforce".into(), &"billing".into())
        );
        for (handling, spelled) in [(FeedbackHandling::AuditCopy, "audit_copy"), (FeedbackHandling::Discard, "discard")]
        {
            let v = serde_json::to_value(record(1).feedback("recorded 7", handling)).unwrap();
            assert_eq!(
                (&v["outcome"], &v["source"], &v["action"]),
                (&"feedback".into(), &"feedback".into(), &spelled.into())
            );
            assert_eq!(v["reason"], "recorded 7");
        }
        let v = serde_json::to_value(record(1).failed("timeout")).unwrap();
        assert_eq!((&v["outcome"], &v["reason"]), (&"failed".into(), &"timeout".into()));
        assert!(v.get("auto").is_none(), "written only for automatic mail");
        let v = serde_json::to_value(record(1).skipped(&Skip::Rule("lists".into()))).unwrap();
        assert_eq!((&v["outcome"], &v["reason"]), (&"skipped".into(), &"rule:lists".into()));
        let v = serde_json::to_value(record(1).auto(Some(Auto::NullSender))).unwrap();
        assert_eq!(v["auto"], "null_sender");
    }

    fn cfg(dir: &Path, max_bytes: u64) -> AuditConfig {
        AuditConfig {
            path: dir.join("audit.jsonl"),
            max_bytes,
            retention_days: 30,
            key_file: dir.join("keys/audit.key"),
        }
    }

    #[test]
    fn lines_rotation_and_a_stable_keyed_hash() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(&cfg(dir.path(), 600)).unwrap();
        for i in 0..6 {
            log.write(&record(i)).unwrap();
        }
        let current = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
        let rotated: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("audit.jsonl."))
            .collect();
        assert!(!rotated.is_empty(), "no rotation at 600 bytes");
        assert!(current.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
        assert!(current.len() <= 600);
        // The key persists: the same Message-ID hashes the same after a restart.
        let h1 = log.hash_message_id("<abc@Example.COM>");
        drop(log);
        let log = AuditLog::open(&cfg(dir.path(), 600)).unwrap();
        assert_eq!(h1, log.hash_message_id("abc@example.com"));
        assert_eq!(h1.len(), 64);
        assert_ne!(h1, log.hash_message_id("abd@example.com"));
        let mode = std::fs::metadata(dir.path().join("keys/audit.key")).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
    }

    #[test]
    fn a_short_key_file_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("keys")).unwrap();
        std::fs::write(dir.path().join("keys/audit.key"), b"short").unwrap();
        let err = AuditLog::open(&cfg(dir.path(), 600)).err().unwrap().to_string();
        assert!(err.contains("audit.key"), "{err}");
    }
}
