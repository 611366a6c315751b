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
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use thiserror::Error;

use super::pseudonym::Pseudonyms;

use crate::decide::policy::{Decision, Source};
use crate::domain::{Action, DepartmentId, PriorityId};
use crate::message::envelope::{domain_of, Envelope};
use crate::scope::{Auto, Skip};
use crate::settings::{AuditConfig, Mode};

#[derive(Debug, Error)]
pub enum AuditError {
    /// Not a `source`: the text already says it (a permission error with
    /// the owner and the fix), and error chains would repeat it.
    #[error("audit trail: {}", crate::access::describe(path, error, true))]
    Io { path: PathBuf, error: std::io::Error },
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
    /// The host that decided: behind several relays, the trails are merged
    /// centrally (journald, a log pipeline) and this says whose line it is.
    pub instance: String,
}

/// What every line of one running configuration shares.
#[derive(Debug, Clone)]
pub struct Context {
    pub mode: Mode,
    pub config_version: String,
    /// `model:<id> (department=…, priority=…)`, or `none`.
    pub model_version: String,
    /// [`crate::record::host_name`].
    pub instance: String,
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
            instance: ctx.instance.clone(),
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
        self.reason = Some(crate::redact::redact(status).into_owned());
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
            self.log.failed(&e);
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
    pseudonyms: Pseudonyms,
    file: Mutex<Current>,
    /// When a failure was last logged, and how many since went unlogged.
    last_failure_log: Mutex<Option<Instant>>,
    unlogged_failures: AtomicU64,
}

/// How often a failing audit trail (a full disk) is logged.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// The open audit file: its handle, size and identity (device, inode).
struct Current {
    file: File,
    size: u64,
    id: (u64, u64),
}

impl Current {
    fn open(path: &Path) -> std::io::Result<Current> {
        let file = open_append(path)?;
        let m = file.metadata()?;
        Ok(Current { size: m.len(), id: (m.dev(), m.ino()), file })
    }
}

impl AuditLog {
    /// Opens (appending) the audit file and its key, creating the key (0600,
    /// 32 random bytes) on first use.
    pub fn open(cfg: &AuditConfig) -> Result<AuditLog, AuditError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| AuditError::Io { path, error: source }
        };
        if let Some(dir) = cfg.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::access::create_dir_all(dir).map_err(io(dir))?;
        }
        let key = load_or_create_key(&cfg.key_file)?;
        let log = AuditLog {
            path: cfg.path.clone(),
            max_bytes: cfg.max_bytes,
            retention: Duration::from_secs(cfg.retention_days * 86_400),
            pseudonyms: Pseudonyms::keyed(key),
            file: Mutex::new(Current::open(&cfg.path).map_err(io(&cfg.path))?),
            last_failure_log: Mutex::new(None),
            unlogged_failures: AtomicU64::new(0),
        };
        log.expire_rotated();
        Ok(log)
    }

    /// Starts the line of one message (see [`Pending`]).
    pub fn begin(&self, envelope: &Envelope, ctx: &Context) -> Pending<'_> {
        Pending { log: self, record: Some(Record::begin(envelope, ctx)), started: std::time::Instant::now() }
    }

    /// The audit file (rotated files lie beside it).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pseudonyms keyed with this trail's key (Message-ID hashes, actors).
    pub fn pseudonyms(&self) -> &Pseudonyms {
        &self.pseudonyms
    }

    /// Appends one record. A write error is returned, never a panic: the
    /// caller counts it and mail keeps flowing. A failed write (a full disk)
    /// is cut back off the file, so the trail never holds half a line.
    ///
    /// Each write holds an exclusive `flock` on the file and first checks that
    /// the path still names the file it holds: [`erase`] (another process)
    /// replaces the file under that lock, and the next write follows it.
    pub fn write(&self, record: &Record) -> Result<(), AuditError> {
        let mut line = serde_json::to_vec(record).expect("records serialise");
        line.push(b'\n');
        let io = |source| AuditError::Io { path: self.path.clone(), error: source };
        let mut g = self.file.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            g.file.lock().map_err(io)?;
            match std::fs::metadata(&self.path) {
                Ok(m) if (m.dev(), m.ino()) == g.id => {
                    g.size = m.len();
                    break;
                }
                _ => {
                    let _ = g.file.unlock();
                    *g = Current::open(&self.path).map_err(io)?;
                }
            }
        }
        // Whatever happens below, the lock is released before returning.
        let appended = self.append_locked(&mut g, &line);
        let _ = g.file.unlock();
        drop(g);
        if appended.as_ref().is_ok_and(|&rotated| rotated) {
            self.expire_rotated();
        }
        appended.map(drop).map_err(io)
    }

    /// Rotates if the line would overflow `max_bytes`, then appends it, under
    /// the file's lock; returns whether it rotated.
    fn append_locked(&self, g: &mut Current, line: &[u8]) -> std::io::Result<bool> {
        let mut rotated = false;
        if g.size > 0 && g.size + line.len() as u64 > self.max_bytes {
            let stamp = humantime::format_rfc3339_micros(SystemTime::now()).to_string().replace([':', '-'], "");
            let to = PathBuf::from(format!("{}.{}", self.path.display(), stamp.trim_end_matches('Z')));
            std::fs::rename(&self.path, &to)?;
            let next = Current::open(&self.path)?;
            next.file.lock()?;
            let _ = g.file.unlock();
            *g = next;
            rotated = true;
        }
        if let Err(e) = (&g.file).write_all(line) {
            let _ = g.file.set_len(g.size);
            return Err(e);
        }
        g.size += line.len() as u64;
        Ok(rotated)
    }

    /// Counts a write that failed, and logs it at most once a minute (with
    /// how many went unlogged): a full disk must not flood the journal.
    pub fn failed(&self, e: &AuditError) {
        metrics::counter!(crate::record::metrics::name::AUDIT_FAILURES).increment(1);
        let mut last = self.last_failure_log.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < FAILURE_LOG_INTERVAL) {
            self.unlogged_failures.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(Instant::now());
        let unlogged = self.unlogged_failures.swap(0, Ordering::Relaxed);
        tracing::error!(error = %e, unlogged_since_last = unlogged, "audit records not written (mail keeps flowing)");
    }

    /// Deletes rotated files (`<name>.<stamp>`) older than the retention.
    fn expire_rotated(&self) {
        for file in files_of(&self.path).into_iter().skip(1) {
            let old = std::fs::metadata(&file)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > self.retention);
            if old {
                if let Err(err) = std::fs::remove_file(&file) {
                    tracing::warn!(file = %file.display(), error = %err, "cannot delete expired audit file");
                }
            }
        }
    }
}

/// The audit file and its rotated siblings (`<name>.<stamp>`), current first.
pub fn files_of(path: &Path) -> Vec<PathBuf> {
    let mut files = vec![path.to_owned()];
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return files };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let prefix = format!("{}.", name.to_string_lossy());
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut rotated: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect();
        rotated.sort();
        files.extend(rotated);
    }
    files
}

/// Lines one [`erase`] removed from one file.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ErasedLines {
    pub file: PathBuf,
    pub lines: usize,
}

/// Removes every line whose `message_id_hash` is `hash` from the audit file
/// and its rotated siblings; returns what went from where.
///
/// A file with such lines is rewritten beside itself (same owner and mode),
/// synced, and renamed over the original while its `flock` is held, so a
/// daemon writing to it (in this process or another) waits, then follows
/// the new file; a crash leaves either the old file or the new one.
pub fn erase(path: &Path, hash: &str) -> Result<Vec<ErasedLines>, AuditError> {
    erase_each(path, &[hash])
}

/// As [`erase`], for several hashes in one pass over the files (erasures
/// announced by other instances, applied in a batch).
pub fn erase_each(path: &Path, hashes: &[&str]) -> Result<Vec<ErasedLines>, AuditError> {
    let mut erased = Vec::new();
    for file in files_of(path) {
        let n = erase_in(&file, hashes).map_err(|source| AuditError::Io { path: file.clone(), error: source })?;
        if n > 0 {
            erased.push(ErasedLines { file, lines: n });
        }
    }
    Ok(erased)
}

fn erase_in(file: &Path, hashes: &[&str]) -> std::io::Result<usize> {
    use std::os::unix::fs::PermissionsExt;
    let wanted: std::collections::HashSet<&str> = hashes.iter().copied().collect();
    loop {
        let f = match File::open(file) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0), // expired meanwhile
            Err(e) => return Err(e),
        };
        f.lock()?;
        let held = f.metadata()?;
        match std::fs::metadata(file) {
            Ok(m) if (m.dev(), m.ino()) == (held.dev(), held.ino()) => {}
            _ => continue, // rotated or replaced while we waited: take the file there now
        }
        let mut text = Vec::with_capacity(held.len() as usize);
        std::io::Read::read_to_end(&mut &f, &mut text)?;
        let (mut kept, mut removed) = (Vec::with_capacity(text.len()), 0);
        for line in text.split_inclusive(|&b| b == b'\n') {
            if carries(line, &wanted) {
                removed += 1;
            } else {
                kept.extend_from_slice(line);
            }
        }
        if removed == 0 {
            return Ok(0);
        }
        let dir = file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = dir.join(format!(".{name}.erase-{}", std::process::id()));
        let mut out = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        let result = (|| {
            std::os::unix::fs::fchown(&out, Some(held.uid()), Some(held.gid()))?;
            out.set_permissions(std::fs::Permissions::from_mode(held.mode() & 0o7777))?;
            out.write_all(&kept)?;
            out.sync_all()?;
            std::fs::rename(&tmp, file)?;
            File::open(dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        return result.map(|()| removed);
    }
}

/// Whether an audit line is about the message with this hash (parsed, so a
/// hash that merely appears elsewhere in a line never removes it).
fn carries(line: &[u8], hashes: &std::collections::HashSet<&str>) -> bool {
    // Cheap test first (a batch can hold thousands of hashes): the line's own
    // hash, if it has one, is a set lookup; the JSON is parsed only on a hit.
    const KEY: &[u8] = b"\"message_id_hash\":\"";
    let Some(at) = line.windows(KEY.len()).position(|w| w == KEY) else { return false };
    let rest = &line[at + KEY.len()..];
    let Some(end) = rest.iter().position(|&b| b == b'"') else { return false };
    let Ok(candidate) = std::str::from_utf8(&rest[..end]) else { return false };
    hashes.contains(candidate)
        && serde_json::from_slice::<serde_json::Value>(line)
            .is_ok_and(|v| v.get("message_id_hash").and_then(|h| h.as_str()) == Some(candidate))
}

fn open_append(path: &Path) -> std::io::Result<File> {
    let f = OpenOptions::new().create(true).append(true).mode(0o640).open(path)?;
    crate::access::inherit_owner(path)?;
    Ok(f)
}

/// The audit key, for tools that read the trail (`forget`): never created here.
pub fn read_key(path: &Path) -> Result<Vec<u8>, AuditError> {
    match std::fs::read(path) {
        Ok(k) if k.len() >= 16 => Ok(k),
        Ok(_) => Err(AuditError::ShortKey(path.to_owned())),
        Err(source) => Err(AuditError::Io { path: path.to_owned(), error: source }),
    }
}

fn load_or_create_key(path: &Path) -> Result<Vec<u8>, AuditError> {
    let io = |source| AuditError::Io { path: path.to_owned(), error: source };
    match read_key(path) {
        Err(AuditError::Io { error: source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            let mut key = vec![0u8; 32];
            File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key)).map_err(io)?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                crate::access::create_dir_all(dir).map_err(io)?;
            }
            let mut f = OpenOptions::new().create_new(true).write(true).mode(0o600).open(path).map_err(io)?;
            crate::access::inherit_owner(path).map_err(io)?;
            f.write_all(&key).map_err(io)?;
            Ok(key)
        }
        other => other,
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
            instance: "mx1".into(),
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
        let h1 = log.pseudonyms().message_id("<abc@Example.COM>");
        drop(log);
        let log = AuditLog::open(&cfg(dir.path(), 600)).unwrap();
        assert_eq!(h1, log.pseudonyms().message_id("abc@example.com"));
        assert_ne!(h1, log.pseudonyms().message_id("abd@example.com"));
        let mode = std::fs::metadata(dir.path().join("keys/audit.key")).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
    }

    #[test]
    fn erase_removes_one_message_from_every_file_and_the_writer_follows_the_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(&cfg(dir.path(), 900)).unwrap();
        let with_hash = |i: usize, h: &str| Record { message_id_hash: Some(h.into()), ..record(i) };
        for i in 0..8 {
            log.write(&with_hash(i, if i % 2 == 0 { "aa11" } else { "bb22" })).unwrap();
        }
        // Another message whose text mentions the hash is not about it.
        log.write(&Record { reason: Some("aa11".into()), ..with_hash(8, "bb22") }).unwrap();
        let path = dir.path().join("audit.jsonl");
        assert!(files_of(&path).len() > 1, "no rotation at 900 bytes");
        let all = |h: &str| -> usize {
            files_of(&path)
                .iter()
                .flat_map(|f| std::fs::read_to_string(f).unwrap().lines().map(String::from).collect::<Vec<_>>())
                .filter(|l| l.contains(&format!("\"message_id_hash\":\"{h}\"")))
                .count()
        };
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions();
        let before = mode(&path);
        let erased = erase(&path, "aa11").unwrap();
        assert_eq!(erased.iter().map(|e| e.lines).sum::<usize>(), 4, "{erased:?}");
        assert_eq!((all("aa11"), all("bb22")), (0, 5));
        assert_eq!(mode(&path), before, "the rewritten file keeps its mode");
        assert!(erase(&path, "aa11").unwrap().is_empty(), "nothing left the second time");
        // The open log writes into the file now at the path, not the replaced one.
        log.write(&with_hash(9, "cc33")).unwrap();
        assert_eq!(all("cc33"), 1);
        assert!(files_of(&path).iter().all(|f| !f.file_name().unwrap().to_string_lossy().starts_with('.')));
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
