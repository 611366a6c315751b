//! Versioned heads. Every promoted head is a new file in `[feedback]
//! heads_dir` (`department-v3.safetensors`), never overwritten; a small
//! pointer file (`department.current`) names the one in use. Promotion and
//! rollback only rewrite the pointer (atomically, by rename), and the daemon
//! notices the pointer change and swaps the head in without a restart.
//! Without a pointer, the head configured in `[model]` is in use.

use std::path::{Path, PathBuf};

use serde::Serialize;
use thiserror::Error;

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
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("no {role} head version `{version}` in {dir} (have: {have})")]
    UnknownVersion { role: &'static str, version: String, dir: PathBuf, have: String },
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

/// The folder of versioned heads.
#[derive(Debug, Clone)]
pub struct Registry {
    dir: PathBuf,
}

impl Registry {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Registry { dir: dir.into() }
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
        std::fs::create_dir_all(&self.dir).map_err(|source| HeadsError::Io { path: self.dir.clone(), source })?;
        let n = self.numbers(role).last().map_or(1, |n| n + 1);
        head.meta.version = format!("v{n}");
        let path = self.file(role, n);
        head.save(&path)?;
        self.point(role, &path)?;
        Ok(head.meta.version.clone())
    }

    /// Makes an earlier version current again (`v3` or `3`).
    pub fn rollback(&self, role: Role, version: &str) -> Result<PathBuf, HeadsError> {
        let numbers = self.numbers(role);
        let wanted = version.trim_start_matches('v').parse::<u32>().ok().filter(|n| numbers.contains(n));
        let Some(n) = wanted else {
            return Err(HeadsError::UnknownVersion {
                role: role.as_str(),
                version: version.to_string(),
                dir: self.dir.clone(),
                have: numbers.iter().map(|n| format!("v{n}")).collect::<Vec<_>>().join(", "),
            });
        };
        let path = self.file(role, n);
        Head::load(&path)?;
        self.point(role, &path)?;
        Ok(path)
    }

    fn point(&self, role: Role, path: &Path) -> Result<(), HeadsError> {
        let pointer = self.pointer(role);
        let tmp = pointer.with_extension("current.tmp");
        let name = path.file_name().expect("a file").to_string_lossy().into_owned();
        std::fs::write(&tmp, format!("{name}\n")).map_err(|source| HeadsError::Io { path: tmp.clone(), source })?;
        std::fs::rename(&tmp, &pointer).map_err(|source| HeadsError::Io { path: pointer.clone(), source })
    }

    /// Appends one line to `history.jsonl` (every retraining, promoted or not).
    pub fn log(&self, entry: &serde_json::Value) -> Result<(), HeadsError> {
        use std::io::Write;
        std::fs::create_dir_all(&self.dir).map_err(|source| HeadsError::Io { path: self.dir.clone(), source })?;
        let path = self.dir.join("history.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| HeadsError::Io { path: path.clone(), source })?;
        // One write of the whole line: `writeln!` on a File writes it in
        // pieces, and a reader (a test, a tail) could see half a line.
        f.write_all(format!("{entry}\n").as_bytes()).map_err(|source| HeadsError::Io { path, source })
    }
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
