//! Versioned heads. Every promoted head is a new version, never
//! overwritten (`department-v3.safetensors`); a pointer names the one in
//! use. Promotion and rollback only move the pointer, and every daemon
//! notices and swaps the head in without a restart. Without a pointer, the
//! head configured in `[model]` is in use.
//!
//! Where versions live depends on the feedback store:
//! - SQLite (one host): files in `[feedback] heads_dir`, the pointer a small
//!   file (`department.current`) rewritten by rename.
//! - PostgreSQL (several instances): the database holds every version's
//!   bytes, the pointer and the retraining history; `heads_dir` is each
//!   host's cache of it, in the same layout, so the engine loads heads
//!   from files either way. A promotion or rollback commits the pointer and
//!   `NOTIFY mailtriage_heads` in one transaction; each daemon's listener
//!   ([`Registry::sync`]) then copies the new version into its cache and
//!   moves its local pointer, which its reload watch picks up.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use sha2::{Digest, Sha256};
use thiserror::Error;

pub use super::leader::Fence;
use super::{Store, StoreError};
use crate::model::head::Head;
use crate::model::ModelError;
use crate::settings::Config;

/// Which head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Department,
    Priority,
}

impl Role {
    pub const ALL: [Role; 2] = [Role::Department, Role::Priority];
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Department => "department",
            Role::Priority => "priority",
        }
    }
}

#[derive(Debug, Error)]
pub enum HeadsError {
    /// Not a `source`: the text says it all (see [`crate::access::describe`]).
    #[error("{}", crate::access::describe(path, error, true))]
    Io { path: PathBuf, error: std::io::Error },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("no {role} head version `{version}` in {dir} (have: {have})")]
    UnknownVersion { role: &'static str, version: String, dir: String, have: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the {role} head v{number} in the store is damaged ({reason}); roll back to another version")]
    Damaged { role: &'static str, number: u32, reason: String },
    /// The promotion's fence failed: this process no longer holds the
    /// retraining lock (its connection broke and another instance may lead).
    #[error("not promoted: this instance lost the retraining leadership while training")]
    NotLeader,
}

impl HeadsError {
    /// Whether the same call may succeed later (the store was away).
    pub fn is_retryable(&self) -> bool {
        matches!(self, HeadsError::Store(e) if e.is_retryable())
    }
}

/// One version on disk.
#[derive(Debug, Clone, Serialize)]
pub struct VersionInfo {
    pub role: Role,
    pub version: String,
    pub number: u32,
    pub path: PathBuf,
    pub current: bool,
    pub trained_at: String,
    pub train_examples: usize,
    /// The gate's figures for this version when it was promoted.
    pub promotion: serde_json::Value,
}

/// The versioned heads: a folder, or the PostgreSQL store with the folder as its cache.
#[derive(Clone)]
pub struct Registry {
    dir: PathBuf,
    db: Option<Arc<Store>>,
}

/// What one retraining leaves in the registry.
pub struct Attempt<'a> {
    pub role: Role,
    /// The newest correction id it read: the next run starts after it.
    pub through_id: i64,
    /// The outcome, as `history.jsonl` (or the history table) keeps it.
    pub entry: serde_json::Value,
    /// The head to promote, if the gate passed it.
    pub promote: Option<&'a mut Head>,
}

/// The channel promotions and rollbacks are announced on.
pub const CHANNEL: &str = "mailtriage_heads";

impl Registry {
    /// Versions as files in `dir` (the single-host mode).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Registry { dir: dir.into(), db: None }
    }

    /// Versions in `store` when it is PostgreSQL, `dir` its local cache;
    /// as [`Registry::new`] for SQLite.
    pub fn with_store(dir: impl Into<PathBuf>, store: Arc<Store>) -> Self {
        Registry { dir: dir.into(), db: Some(store).filter(|s| s.is_shared()) }
    }

    /// Whether versions live in PostgreSQL.
    pub fn is_shared(&self) -> bool {
        self.db.is_some()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn pointer(&self, role: Role) -> PathBuf {
        self.dir.join(format!("{}.current", role.as_str()))
    }

    fn file(&self, role: Role, number: u32) -> PathBuf {
        self.dir.join(format!("{}-v{number}.safetensors", role.as_str()))
    }

    /// The promoted head in use, if a pointer names one.
    pub fn current(&self, role: Role) -> Option<PathBuf> {
        let name = std::fs::read_to_string(self.pointer(role)).ok()?;
        let name = name.trim();
        (!name.is_empty() && !name.contains('/')).then(|| self.dir.join(name))
    }

    /// Pointer contents, to notice promotions and rollbacks cheaply.
    pub fn signature(&self) -> String {
        Role::ALL.iter().map(|&r| std::fs::read_to_string(self.pointer(r)).unwrap_or_default()).collect()
    }

    fn numbers(&self, role: Role) -> Vec<u32> {
        let prefix = format!("{}-v", role.as_str());
        let mut out: Vec<u32> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix(&prefix)?.strip_suffix(".safetensors")?.parse().ok()
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// Every stored version, oldest first.
    pub fn versions(&self, role: Role) -> Result<Vec<VersionInfo>, HeadsError> {
        if let Some(db) = &self.db {
            // Copy every version into the cache, and the pointer, then list the cache.
            for n in stored_numbers(db, role)? {
                self.cached(db, role, n)?;
            }
            self.sync()?;
        }
        let current = self.current(role);
        self.numbers(role)
            .into_iter()
            .map(|n| {
                let path = self.file(role, n);
                let meta = Head::read_meta(&path)?;
                Ok(VersionInfo {
                    role,
                    version: meta.version.clone(),
                    number: n,
                    current: current.as_deref() == Some(path.as_path()),
                    trained_at: meta.trained_at.clone(),
                    train_examples: meta.train_examples,
                    promotion: meta.dev_metrics.get("promotion").cloned().unwrap_or_default(),
                    path,
                })
            })
            .collect()
    }

    /// Writes `head` as the next version and makes it current. Returns its version.
    pub fn promote(&self, role: Role, head: &mut Head) -> Result<String, HeadsError> {
        let entry = serde_json::Value::Null;
        self.record(Attempt { role, through_id: 0, entry, promote: Some(head) }, None)
            .map(|v| v.expect("a promotion has a version"))
    }

    /// Records one retraining: the history entry and, if it passed the gate,
    /// the new version made current, all or nothing with PostgreSQL (a
    /// leader killed mid-way leaves no version without its history line, so
    /// its successor neither loses those corrections nor promotes twice).
    /// `fence`: the promoting leader (PostgreSQL). Returns the new version.
    pub fn record(&self, attempt: Attempt<'_>, fence: Option<Fence>) -> Result<Option<String>, HeadsError> {
        let Attempt { role, through_id, mut entry, promote } = attempt;
        let Some(db) = &self.db else {
            let mut version = None;
            if let Some(head) = promote {
                crate::access::create_dir_all(&self.dir)
                    .map_err(|source| HeadsError::Io { path: self.dir.clone(), error: source })?;
                let n = self.numbers(role).last().map_or(1, |n| n + 1);
                head.meta.version = format!("v{n}");
                let path = self.file(role, n);
                head.save(&path)?;
                self.point(role, &path)?;
                version = Some(head.meta.version.clone());
            }
            if !entry.is_null() {
                if let (serde_json::Value::Object(m), Some(v)) = (&mut entry, &version) {
                    m.insert("version".into(), v.clone().into());
                }
                self.log(&entry)?;
            }
            return Ok(version);
        };
        let instance = super::instance_name();
        let now = crate::learn::correction::now();
        let version = db.with_pg(|c| {
            let mut tx = c.transaction()?;
            // One promotion at a time, whoever asks (a leader, `heads rollback`, `retrain`).
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&super::leader::PROMOTE_LOCK])?;
            if let Some(f) = fence {
                if !super::leader::holds(&mut tx, f)? {
                    return Ok(Err(HeadsError::NotLeader));
                }
            }
            let mut number: Option<i32> = None;
            if let Some(head) = promote {
                let n: i32 = tx
                    .query_one(
                        "SELECT COALESCE(MAX(number), 0) + 1 FROM mailtriage_heads WHERE role = $1",
                        &[&role.as_str()],
                    )?
                    .get(0);
                head.meta.version = format!("v{n}");
                let bytes = match head.to_bytes() {
                    Ok(b) => b,
                    Err(reason) => {
                        return Ok(Err(ModelError::BadFile { path: self.file(role, n as u32), reason }.into()))
                    }
                };
                let sha = hex(&Sha256::digest(&bytes));
                tx.execute(
                    "INSERT INTO mailtriage_heads (role, number, created_at, created_by, sha256, bytes) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                    &[&role.as_str(), &n, &now, &instance, &sha, &bytes],
                )?;
                point_in(&mut tx, role, n, now, &instance)?;
                number = Some(n);
            }
            if !entry.is_null() {
                if let (serde_json::Value::Object(m), Some(n)) = (&mut entry, number) {
                    m.insert("version".into(), format!("v{n}").into());
                }
                tx.execute(
                    "INSERT INTO mailtriage_retrain_history (at, role, through_id, promoted_number, instance, entry) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                    &[&now, &role.as_str(), &through_id, &number, &instance, &entry.to_string()],
                )?;
            }
            tx.commit()?;
            Ok(Ok(number))
        })??;
        self.sync()?;
        Ok(version.map(|n| format!("v{n}")))
    }

    /// Makes an earlier version current again (`v3` or `3`).
    pub fn rollback(&self, role: Role, version: &str) -> Result<PathBuf, HeadsError> {
        let numbers: Vec<u32> = match &self.db {
            Some(db) => stored_numbers(db, role)?,
            None => self.numbers(role),
        };
        let wanted = version.trim_start_matches('v').parse::<u32>().ok().filter(|n| numbers.contains(n));
        let Some(n) = wanted else {
            return Err(HeadsError::UnknownVersion {
                role: role.as_str(),
                version: version.to_string(),
                dir: match &self.db {
                    Some(db) => db.url().to_string(),
                    None => self.dir.display().to_string(),
                },
                have: numbers.iter().map(|n| format!("v{n}")).collect::<Vec<_>>().join(", "),
            });
        };
        let Some(db) = &self.db else {
            let path = self.file(role, n);
            Head::load(&path)?;
            self.point(role, &path)?;
            return Ok(path);
        };
        // The version must load before every instance is told to use it.
        let path = self.cached(db, role, n)?;
        let instance = super::instance_name();
        db.with_pg(|c| {
            let mut tx = c.transaction()?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&super::leader::PROMOTE_LOCK])?;
            point_in(&mut tx, role, n as i32, crate::learn::correction::now(), &instance)?;
            tx.commit()
        })?;
        self.sync()?;
        Ok(path)
    }

    /// Copies the store's current versions into the cache and moves the
    /// cache's pointers to match (PostgreSQL; nothing to do with files).
    /// Returns whether a pointer moved. A version whose bytes do not match
    /// their checksum, or do not load, is refused and the pointer stays.
    pub fn sync(&self) -> Result<bool, HeadsError> {
        let Some(db) = &self.db else { return Ok(false) };
        let current: Vec<(String, i32)> = db.with_pg(|c| {
            Ok(c.query("SELECT role, number FROM mailtriage_heads_current", &[])?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect())
        })?;
        let mut moved = false;
        for role in Role::ALL {
            let pointer = self.pointer(role);
            match current.iter().find(|(r, _)| r == role.as_str()) {
                Some(&(_, n)) => {
                    let path = self.cached(db, role, n as u32)?;
                    if self.current(role).as_deref() != Some(path.as_path()) {
                        self.point(role, &path)?;
                        moved = true;
                    }
                }
                // The store has no promoted version: the configured head is in use.
                None if pointer.exists() => {
                    std::fs::remove_file(&pointer).map_err(|source| HeadsError::Io { path: pointer, error: source })?;
                    moved = true;
                }
                None => {}
            }
        }
        Ok(moved)
    }

    /// The cache file of version `n`, fetched from the store if missing.
    fn cached(&self, db: &Store, role: Role, n: u32) -> Result<PathBuf, HeadsError> {
        let path = self.file(role, n);
        if path.is_file() {
            return Ok(path);
        }
        let row = db.with_pg(|c| {
            c.query_opt(
                "SELECT sha256, bytes FROM mailtriage_heads WHERE role = $1 AND number = $2",
                &[&role.as_str(), &(n as i32)],
            )
        })?;
        let damaged = |reason: String| HeadsError::Damaged { role: role.as_str(), number: n, reason };
        let Some(row) = row else { return Err(damaged("no such version".into())) };
        let (sha, bytes): (String, Vec<u8>) = (row.get(0), row.get(1));
        if hex(&Sha256::digest(&bytes)) != sha {
            return Err(damaged("its bytes do not match their SHA-256".into()));
        }
        Head::from_bytes(&path, &bytes).map_err(|e| damaged(e.to_string()))?;
        crate::access::create_dir_all(&self.dir)
            .map_err(|source| HeadsError::Io { path: self.dir.clone(), error: source })?;
        let tmp = unique_tmp(&path);
        std::fs::write(&tmp, &bytes)
            .and_then(|()| crate::access::inherit_owner(&tmp))
            .map_err(|source| HeadsError::Io { path: tmp.clone(), error: source })?;
        std::fs::rename(&tmp, &path).map_err(|source| HeadsError::Io { path: path.clone(), error: source })?;
        Ok(path)
    }

    /// The correction id the last recorded retraining read up to (0: none yet);
    /// PostgreSQL only, `None` with files.
    pub fn trained_through(&self) -> Result<Option<i64>, HeadsError> {
        let Some(db) = &self.db else { return Ok(None) };
        Ok(Some(db.with_pg(|c| {
            Ok(c.query_one("SELECT COALESCE(MAX(through_id), 0) FROM mailtriage_retrain_history", &[])?.get(0))
        })?))
    }

    fn point(&self, role: Role, path: &Path) -> Result<(), HeadsError> {
        let pointer = self.pointer(role);
        let tmp = unique_tmp(&pointer);
        let name = path.file_name().expect("a file").to_string_lossy().into_owned();
        std::fs::write(&tmp, format!("{name}\n"))
            .and_then(|()| crate::access::inherit_owner(&tmp))
            .map_err(|source| HeadsError::Io { path: tmp.clone(), error: source })?;
        std::fs::rename(&tmp, &pointer).map_err(|source| HeadsError::Io { path: pointer.clone(), error: source })
    }

    /// Appends one line to `history.jsonl` (every retraining, promoted or not).
    pub fn log(&self, entry: &serde_json::Value) -> Result<(), HeadsError> {
        use std::io::Write;
        crate::access::create_dir_all(&self.dir)
            .map_err(|source| HeadsError::Io { path: self.dir.clone(), error: source })?;
        let path = self.dir.join("history.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|f| crate::access::inherit_owner(&path).map(|()| f))
            .map_err(|source| HeadsError::Io { path: path.clone(), error: source })?;
        // One write of the whole line: `writeln!` on a File writes it in
        // pieces, and a reader (a test, a tail) could see half a line.
        f.write_all(format!("{entry}\n").as_bytes()).map_err(|source| HeadsError::Io { path, error: source })
    }
}

/// The version numbers the store holds for `role`, oldest first.
fn stored_numbers(db: &Store, role: Role) -> Result<Vec<u32>, StoreError> {
    let rows = db.with_pg(|c| {
        c.query("SELECT number FROM mailtriage_heads WHERE role = $1 ORDER BY number", &[&role.as_str()])
    })?;
    Ok(rows.iter().map(|r| r.get::<_, i32>(0) as u32).collect())
}

/// Moves the store's pointer to version `n` and announces it (in the
/// caller's transaction: the announcement goes out only if it commits).
fn point_in(
    tx: &mut postgres::Transaction<'_>,
    role: Role,
    n: i32,
    now: i64,
    instance: &str,
) -> Result<(), postgres::Error> {
    tx.execute(
        "INSERT INTO mailtriage_heads_current (role, number, changed_at, changed_by) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (role) DO UPDATE SET number = EXCLUDED.number, changed_at = EXCLUDED.changed_at, \
         changed_by = EXCLUDED.changed_by",
        &[&role.as_str(), &n, &now, &instance],
    )?;
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &format!("{} v{n}", role.as_str())])?;
    Ok(())
}

/// A temporary name beside `path` no other thread or process uses (the
/// store listener and the retrainer may both fill the cache).
fn unique_tmp(path: &Path) -> PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    PathBuf::from(format!("{}.{}.{n}.tmp", path.display(), std::process::id()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The head files in use under this configuration: the registry's current
/// version where there is one, else `[model] department_head`/`priority_head`.
pub fn in_use(cfg: &Config, role: Role) -> Option<PathBuf> {
    let registry = cfg.feedback.as_ref().map(|f| Registry::new(&f.heads_dir));
    let configured = cfg.model.as_ref().and_then(|m| match role {
        Role::Department => m.department_head.clone(),
        Role::Priority => m.priority_head.clone(),
    });
    registry.and_then(|r| r.current(role)).or(configured)
}

/// For a command run beside the daemons (`classify`, `replay`, the
/// feedback pipe): brings this host's cache up to the store's versions when
/// they live in PostgreSQL. A store that does not answer leaves the cache
/// as it is, with a warning: those commands still work.
pub fn refresh(cfg: &Config) {
    let Some(fb) = cfg.feedback.as_ref().filter(|f| f.store.starts_with("postgres")) else { return };
    let synced = Store::for_config(fb, false)
        .map_err(HeadsError::from)
        .and_then(|s| Registry::with_store(&fb.heads_dir, Arc::new(s)).sync());
    if let Err(e) = synced {
        tracing::warn!(error = %e, "head versions not refreshed from the store; using {}", fb.heads_dir.display());
    }
}

/// `cfg` with `[model]`'s head paths pointing at the versions in use: what
/// the engine is built from wherever promoted heads must count (the daemon,
/// `classify`, `replay`, the feedback pipe). The engine itself only loads
/// the paths it is given.
pub fn current(cfg: &Config) -> Config {
    let mut cfg = cfg.clone();
    let (department, priority) = (in_use(&cfg, Role::Department), in_use(&cfg, Role::Priority));
    if let Some(m) = &mut cfg.model {
        m.department_head = department;
        m.priority_head = priority;
    }
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::head::tests::tiny_head;

    #[test]
    fn promote_list_and_roll_back() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::new(dir.path().join("heads"));
        assert!(reg.current(Role::Department).is_none());
        let mut h = tiny_head();
        assert_eq!(reg.promote(Role::Department, &mut h).unwrap(), "v1");
        let before = reg.signature();
        assert_eq!(reg.promote(Role::Department, &mut h).unwrap(), "v2");
        assert_ne!(reg.signature(), before);
        assert!(reg.current(Role::Department).unwrap().ends_with("department-v2.safetensors"));
        let list = reg.versions(Role::Department).unwrap();
        assert_eq!(
            list.iter().map(|v| (v.version.as_str(), v.current)).collect::<Vec<_>>(),
            [("v1", false), ("v2", true)]
        );
        reg.rollback(Role::Department, "v1").unwrap();
        assert!(reg.current(Role::Department).unwrap().ends_with("department-v1.safetensors"));
        let e = reg.rollback(Role::Department, "v9").unwrap_err().to_string();
        assert!(e.contains("v9") && e.contains("have: v1, v2"), "{e}");
        assert!(reg.versions(Role::Priority).unwrap().is_empty());
    }
}
