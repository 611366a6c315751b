//! Loading the settings: the file read, `MAILTRIAGE__SECTION__KEY`
//! overrides applied, deserialised into [`Config`] (every unknown key and
//! wrong type named with its line, a variable's problem blamed on the
//! variable), validated, relative paths made absolute against the file's
//! directory; and the effective settings `config show` prints.

use std::path::{Path, PathBuf};

use thiserror::Error;

use super::file::Config;

/// A configuration that could not be loaded.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    /// Every problem found, one per line.
    #[error("{}", problems.iter().map(|p| p.located(path)).collect::<Vec<_>>().join("\n"))]
    Invalid { path: String, problems: Vec<Problem> },
}

/// One problem in a configuration: the key and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
    /// The `MAILTRIAGE__…` variable that set the key, when the file did not.
    pub env: Option<String>,
    /// The line of the file that holds the key, when known.
    pub line: Option<usize>,
}

impl Problem {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem { key: key.into(), message: message.into(), env: None, line: None }
    }

    /// `FILE: `key`: message`, or `environment variable VAR (`key`): message`
    /// when the value came from the environment.
    pub fn located(&self, file: &str) -> String {
        match &self.env {
            Some(var) => format!("environment variable {var} (`{}`): {}", self.key, self.message),
            None if self.key.is_empty() => format!("{file}: {}", self.message),
            None => {
                let line = self.line.map(|n| format!(", line {n}")).unwrap_or_default();
                format!("{file}{line}: `{}`: {}", self.key, self.message)
            }
        }
    }
}

/// Prefix of environment overrides: `MAILTRIAGE__SERVER__MODE=shadow`.
pub const ENV_PREFIX: &str = "MAILTRIAGE__";

impl Config {
    /// Reads, overrides from the environment, and validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = read_file(path)?;
        let mut cfg = Self::from_toml_with_env(&text, &path.display().to_string(), &env_overrides())?;
        cfg.resolve_relative_paths(&config_dir(path));
        cfg.source = Some(path.to_owned());
        let digest = <sha2::Sha256 as sha2::Digest>::digest(text.as_bytes());
        cfg.version = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
        Ok(cfg)
    }

    /// Parses TOML text (no environment), then validates. `origin` names the
    /// text in error messages.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        Self::from_toml_with_env(text, origin, &[])
    }

    pub(super) fn from_toml_with_env(
        text: &str,
        origin: &str,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let table = overlaid(text, origin, env)?;
        // Re-serialising loses spans, so deserialise from the text when no
        // override applied: its errors point at the line and column.
        let parsed = if env.is_empty() { toml::from_str(text) } else { toml::Table::try_into(table.clone()) };
        let mut cfg: Config = parsed.map_err(|first: toml::de::Error| {
            let mut problems = shape_problems(&table);
            for p in &mut problems {
                p.line = line_of(text, &p.key);
            }
            problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
            if problems.is_empty() {
                // What the probes cannot see (a required key missing): the
                // parser's own words, with the line when it has one.
                problems.push(Problem::new("", first.to_string().trim_end()));
            }
            blame_env(&mut problems, env);
            ConfigError::Invalid { path: origin.into(), problems }
        })?;
        cfg.validate(origin).map_err(|e| match e {
            ConfigError::Invalid { path, mut problems } => {
                for p in &mut problems {
                    p.line = line_of(text, &p.key);
                }
                blame_env(&mut problems, env);
                ConfigError::Invalid { path, problems }
            }
            other => other,
        })?;
        cfg.catalog = super::Catalog::new(&cfg);
        Ok(cfg)
    }
}

/// Every key whose value does not fit its type, and every unknown key or
/// section, each on its own: serde stops at the first, so each key is
/// deserialised alone (`{section: {key: value}}`; every section has
/// defaults, and a missing required key is left to the full parse).
fn shape_problems(table: &toml::Table) -> Vec<Problem> {
    // (The error of deserialising only `{section: value}`, and whether it
    // is a required key missing.)
    let attempt = |section: &str, value: toml::Value| -> Option<(String, bool)> {
        let one = toml::Table::from_iter([(section.to_string(), value)]);
        let e = toml::Table::try_into::<Config>(one).err()?;
        Some((e.message().trim_end().to_string(), e.message().starts_with("missing field")))
    };
    let probe = |section: &str, value: toml::Value| attempt(section, value).filter(|e| !e.1).map(|e| e.0);
    // A required key missing, once the keys already named are left out.
    let missing = |section: &str, value: toml::Value| attempt(section, value).filter(|e| e.1).map(|e| e.0);
    let without = |keys: &toml::Table, bad: &[String]| -> toml::Table {
        keys.iter().filter(|(k, _)| !bad.contains(k)).map(|(k, v)| (k.clone(), v.clone())).collect()
    };
    let mut problems = Vec::new();
    for (section, value) in table {
        if probe(section, value.clone()).is_none() {
            if let Some(message) = missing(section, value.clone()) {
                problems.push(Problem::new(section.clone(), message));
            }
            continue;
        }
        // An unknown section: said once, not once per key in it.
        let empty =
            if value.is_array() { toml::Value::Array(Vec::new()) } else { toml::Value::Table(Default::default()) };
        if let Some(message) = probe(section, empty) {
            problems.push(Problem::new(section.clone(), message));
            continue;
        }
        let before = problems.len();
        match value {
            toml::Value::Table(keys) => {
                let mut bad = Vec::new();
                for (key, v) in keys {
                    let alone = toml::Value::Table(toml::Table::from_iter([(key.clone(), v.clone())]));
                    if let Some(message) = probe(section, alone) {
                        problems.push(Problem::new(format!("{section}.{key}"), message));
                        bad.push(key.clone());
                    }
                }
                if let Some(message) = missing(section, toml::Value::Table(without(keys, &bad))) {
                    problems.push(Problem::new(section.clone(), message));
                }
            }
            toml::Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let Some(keys) = item.as_table() else { continue };
                    let name =
                        keys.get("name").and_then(toml::Value::as_str).map(|n| format!(" ({n})")).unwrap_or_default();
                    let mut bad = Vec::new();
                    for (key, v) in keys {
                        let alone = toml::Table::from_iter([(key.clone(), v.clone())]);
                        let entry = toml::Value::Array(vec![toml::Value::Table(alone)]);
                        if let Some(message) = probe(section, entry) {
                            problems.push(Problem::new(format!("{section}[{i}]{name}.{key}"), message));
                            bad.push(key.clone());
                        }
                    }
                    let rest = toml::Value::Array(vec![toml::Value::Table(without(keys, &bad))]);
                    if let Some(message) = missing(section, rest) {
                        problems.push(Problem::new(format!("{section}[{i}]{name}"), message));
                    }
                }
            }
            _ => {}
        }
        if problems.len() == before {
            // Wrong as a whole (`server = 5`, `[sever]`): name the section.
            problems.push(Problem::new(section.clone(), probe(section, value.clone()).unwrap_or_default()));
        }
    }
    problems
}

/// The line holding `key` (`server.mode`, `rules[2] (x).pattern`, or a
/// section), found by a plain scan of the text: enough to point an admin
/// at it.
fn line_of(text: &str, key: &str) -> Option<usize> {
    let (path, index) = match key.split_once('[') {
        Some((section, rest)) => {
            let (i, after) = rest.split_once(']')?;
            // `departments[0] (name).key`, or the entry itself: `departments[0]`.
            let path = match after.rsplit_once('.') {
                Some((_, k)) => format!("{section}.{k}"),
                None => section.to_string(),
            };
            (path, Some(i.parse::<usize>().ok()?))
        }
        None => (key.to_string(), None),
    };
    let (section, name) = path.split_once('.').map_or((path.as_str(), None), |(s, k)| (s, Some(k)));
    let (mut current, mut seen) = (String::new(), 0usize);
    for (n, line) in text.lines().enumerate() {
        // Without a trailing `# comment` (only the header and the key's name are compared).
        let t = line.split(" #").next().unwrap_or(line).trim();
        if let Some(header) = t.strip_prefix('[') {
            let array = header.starts_with('[');
            current = header.trim_matches(|c| c == '[' || c == ']' || c == ' ').to_string();
            if current == section {
                if array {
                    seen += 1;
                }
                let here = index.is_none_or(|i| seen == i + 1);
                if name.is_none() && here {
                    return Some(n + 1);
                }
            }
            continue;
        }
        let Some(k) = name else { continue };
        let here = current == section && index.is_none_or(|i| seen == i + 1);
        let lhs = t.split('=').next().unwrap_or("").trim().trim_matches('"');
        if here && t.contains('=') && lhs == k {
            return Some(n + 1);
        }
    }
    None
}

/// Marks the problems whose key a `MAILTRIAGE__…` variable set: the message
/// then names the variable, not the file.
fn blame_env(problems: &mut [Problem], env: &[(String, String)]) {
    for p in problems.iter_mut() {
        let key = p.key.to_ascii_lowercase();
        p.env = env
            .iter()
            .find(|(var, _)| {
                let path = var[ENV_PREFIX.len()..].split("__").collect::<Vec<_>>().join(".").to_ascii_lowercase();
                key == path || key.starts_with(&format!("{path}."))
            })
            .map(|(var, _)| var.clone());
    }
}

/// The directory relative paths in the file at `path` are taken from: its
/// own, absolute (so the service and an admin's shell in another directory
/// read the same files).
pub fn config_dir(path: &Path) -> PathBuf {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned())
}

impl Config {
    /// Makes every file path of the settings absolute against `base` (the
    /// configuration file's directory). Socket addresses are left as written.
    pub fn resolve_relative_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        let fix_opt = |p: &mut Option<PathBuf>| {
            if let Some(p) = p {
                fix(p);
            }
        };
        fix_opt(&mut self.server.tls_cert);
        fix_opt(&mut self.server.tls_key);
        if let Some(r) = &mut self.relay {
            fix_opt(&mut r.tls_ca_file);
        }
        if let Some(m) = &mut self.model {
            fix_opt(&mut m.path);
            fix_opt(&mut m.department_head);
            fix_opt(&mut m.priority_head);
        }
        if let Some(a) = &mut self.audit {
            fix(&mut a.path);
            fix(&mut a.key_file);
        }
        if let Some(f) = &mut self.feedback {
            if let Some(db) = f.store.strip_prefix("sqlite://").filter(|p| !p.starts_with('/')) {
                f.store = format!("sqlite://{}", base.join(db).display());
            }
            for p in [&mut f.store_password_file, &mut f.http_token_file, &mut f.training_data, &mut f.dev_data] {
                fix_opt(p);
            }
            fix_opt(&mut f.embedding_cache);
            fix(&mut f.heads_dir);
        }
    }
}

/// The settings as the daemon reads them, as TOML: the file with the
/// environment overrides applied and secrets masked (`config show`). The
/// file is validated first, so what is shown is what would run. Keys left
/// at their defaults are not listed, as with `postconf -n`.
pub fn effective_toml(path: &Path) -> Result<String, ConfigError> {
    let (text, origin, env) = (read_file(path)?, path.display().to_string(), env_overrides());
    Config::from_toml_with_env(&text, &origin, &env)?;
    let mut table = overlaid(&text, &origin, &env)?;
    mask_secrets(&mut table);
    let mut out = format!("# {} (mailtriage config show)\n", path.display());
    for (var, _) in &env {
        out.push_str(&format!("# overridden by the environment: {var}\n"));
    }
    out.push_str(&toml::to_string_pretty(&table).unwrap_or_default());
    Ok(out)
}

fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })
}

/// The `MAILTRIAGE__…` variables of this process, sorted by name (so the
/// order they apply in is stable).
fn env_overrides() -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = std::env::vars().filter(|(k, _)| k.starts_with(ENV_PREFIX)).collect();
    env.sort();
    env
}

/// The file's TOML table with the environment overrides applied.
fn overlaid(text: &str, origin: &str, env: &[(String, String)]) -> Result<toml::Table, ConfigError> {
    let mut table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Parse { path: origin.into(), message: e.to_string() })?;
    for (var, value) in env {
        apply_env(&mut table, var, value)?;
    }
    Ok(table)
}

/// Replaces credentials with `****`: the password in a store URL
/// (`postgres://user:****@host/db`), and any string value whose key names a
/// password, token or secret (files holding them are paths, and shown).
pub(super) fn mask_secrets(table: &mut toml::Table) {
    for (key, value) in table.iter_mut() {
        match value {
            toml::Value::Table(t) => mask_secrets(t),
            toml::Value::Array(items) => {
                for t in items.iter_mut().filter_map(toml::Value::as_table_mut) {
                    mask_secrets(t);
                }
            }
            toml::Value::String(s) => {
                let k = key.to_ascii_lowercase();
                if (k.contains("password") || k.contains("token") || k.contains("secret")) && !k.ends_with("_file") {
                    *s = "****".into();
                } else if let std::borrow::Cow::Owned(masked) = crate::redact::credentials(s) {
                    *s = masked;
                }
            }
            _ => {}
        }
    }
}

/// Applies one `MAILTRIAGE__A__B=value` override to the TOML table. The value
/// is read as a TOML value when it parses as one (`true`, `5`, `["a"]`), and
/// as a string otherwise.
fn apply_env(table: &mut toml::Table, var: &str, value: &str) -> Result<(), ConfigError> {
    let path: Vec<String> = var[ENV_PREFIX.len()..].split("__").map(|s| s.to_ascii_lowercase()).collect();
    if path.iter().any(|p| p.is_empty()) {
        return Err(ConfigError::Env { var: var.into(), message: "expected MAILTRIAGE__SECTION__KEY".into() });
    }
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let mut cur = table;
    for part in &path[..path.len() - 1] {
        let entry = cur.entry(part.clone()).or_insert_with(|| toml::Value::Table(Default::default()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| ConfigError::Env { var: var.into(), message: format!("`{part}` is not a section") })?;
    }
    cur.insert(path[path.len() - 1].clone(), parsed);
    Ok(())
}
