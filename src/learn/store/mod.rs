//! Where corrections live: SQLite (one instance) or PostgreSQL (several
//! instances behind several MTAs sharing one store). Same table, same SQL
//! (`$n` placeholders work in both), and only features: see [`Correction`].
//!
//! - [`schema`]: every table, in one place.
//! - [`pg`]: connecting to PostgreSQL the way libpq does.
//! - [`leader`]: which instance retrains, when several share the store.
//! - [`heads`]: versioned head files, the current pointer, rollback.
//!
//! Nothing here trains or decides: the filter writes through it, training
//! reads from it.

pub mod heads;
pub mod leader;
pub mod pg;
pub mod schema;

use std::path::PathBuf;
use std::sync::Mutex;

use thiserror::Error;

use self::pg::Target;
use crate::learn::correction::Correction;
use crate::model::lexical::TermCounts;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("feedback store `{url}`: {reason}")]
    Open { url: String, reason: String },
    /// The server cannot be reached now; the next call reconnects. Callers
    /// answer "retry later" (HTTP 503, SMTP 4xx, exit code 75).
    #[error("feedback store `{url}` unavailable (retry later): {reason}")]
    Unavailable { url: String, reason: String },
    #[error("feedback store: {0}")]
    Query(String),
    #[error("feedback store row {id}: {reason}")]
    Row { id: i64, reason: String },
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Query(e.to_string())
    }
}

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        StoreError::Query(pg_error(&e))
    }
}

/// A PostgreSQL error with its causes: tokio-postgres's own message is only
/// the outer layer ("error performing TLS handshake"), the reason is below.
fn pg_error(e: &postgres::Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

impl StoreError {
    /// Whether the same call may succeed later (the server was away).
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }
}

const INSERT: &str = "INSERT INTO mailtriage_corrections \
    (created_at, channel, actor, message_hash, department, priority, language, terms, encoder, embedding) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";
const SELECT: &str = "SELECT id, created_at, channel, actor, message_hash, department, priority, language, terms, \
    encoder, embedding FROM mailtriage_corrections WHERE created_at >= $1 ORDER BY id";
const SUMMARY: &str = "SELECT created_at, department, priority, channel FROM mailtriage_corrections \
    WHERE created_at >= $1 ORDER BY id";
const EXPIRE: &str = "DELETE FROM mailtriage_corrections WHERE created_at < $1";
const COUNT_AFTER: &str = "SELECT COUNT(*) FROM mailtriage_corrections WHERE id > $1";
const MAX_ID: &str = "SELECT COALESCE(MAX(id), 0) FROM mailtriage_corrections";
const FORGET_MESSAGE: &str = "DELETE FROM mailtriage_corrections WHERE message_hash = $1";
const FORGET_ACTOR: &str = "DELETE FROM mailtriage_corrections WHERE actor = $1";

const RECENT_GET: &str =
    "SELECT message_hash, decided_at, language, terms, encoder, embedding FROM mailtriage_recent WHERE message_hash = $1";
const RECENT_FORGET: &str = "DELETE FROM mailtriage_recent WHERE message_hash = $1";
const RECENT_EXPIRE: &str = "DELETE FROM mailtriage_recent WHERE decided_at < $1";
/// Keeps the newest `$1` rows: deletes those older than the `$1`-th newest.
const RECENT_TRIM: &str = "DELETE FROM mailtriage_recent WHERE decided_at < \
    (SELECT decided_at FROM mailtriage_recent ORDER BY decided_at DESC OFFSET $1 LIMIT 1)";

/// The channel erasures are announced on.
pub const FORGET_CHANNEL: &str = "mailtriage_forget";

/// One row of the shared recent-decisions window.
#[derive(Debug, Clone, PartialEq)]
pub struct RecentRow {
    pub hash: String,
    pub decided_at: i64,
    pub language: String,
    pub terms: Vec<u8>,
    pub encoder: Option<String>,
    pub embedding: Option<Vec<u8>>,
}

/// One row of [`Store::summary`]: when, which labels, which channel.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryRow {
    pub created_at: i64,
    pub department: Option<String>,
    pub priority: Option<String>,
    pub channel: String,
}

enum Backend {
    Sqlite(rusqlite::Connection),
    /// `None` after the server went away: the next call reconnects.
    Postgres(Option<Box<postgres::Client>>),
}

/// A connection to the store. Calls block: run them off the async reactor.
pub struct Store {
    /// Without the password, for messages.
    url: String,
    /// How to (re)connect to PostgreSQL; `None` for SQLite.
    target: Option<Target>,
    db: Mutex<Backend>,
}

/// How long a (re)connection to PostgreSQL may take before the call fails
/// as unavailable, unless the URL sets `connect_timeout` itself.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

type RawRow = (
    i64,
    i64,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
    Vec<u8>,
    Option<String>,
    Option<Vec<u8>>,
);

impl Store {
    /// Opens (and creates the table in) `sqlite:///path/file.db` or
    /// `postgres://user:pass@host/db` (also `postgresql://`).
    pub fn open(url: &str) -> Result<Store, StoreError> {
        Self::open_with(url, None)
    }

    /// The store `[feedback]` names, with its `store_password_file`;
    /// `wait`: as [`Store::open_later`] (the daemon), else [`Store::open`].
    pub fn for_config(fb: &crate::settings::FeedbackConfig, wait: bool) -> Result<Store, StoreError> {
        let password = fb.store_password_file.as_deref();
        if wait {
            Self::open_later_with(&fb.store, password)
        } else {
            Self::open_with(&fb.store, password)
        }
    }

    /// As [`Store::open`], the PostgreSQL password read from `password_file`.
    pub fn open_with(url: &str, password_file: Option<&std::path::Path>) -> Result<Store, StoreError> {
        let fail = |reason: String| StoreError::Open { url: crate::redact::credentials(url).into_owned(), reason };
        let mut target = None;
        let backend = if let Some(path) = url.strip_prefix("sqlite://") {
            let path = PathBuf::from(path);
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                crate::access::create_dir_all(dir).map_err(|e| fail(crate::access::describe(dir, &e, true)))?;
            }
            // SQLite writes the file and, in WAL mode, `-wal`/`-shm` beside it.
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
            if let Some(problem) = crate::access::check_writable(&path).or_else(|| crate::access::check_writable(dir)) {
                return Err(fail(problem));
            }
            let conn = rusqlite::Connection::open(&path).map_err(|e| fail(e.to_string()))?;
            // WAL: the daemon writes while `retrain` or `report` read.
            conn.pragma_update(None, "journal_mode", "WAL").map_err(|e| fail(e.to_string()))?;
            conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(|e| fail(e.to_string()))?;
            // What root's `mailtriage feedback` or `retrain` created beside
            // the service's files stays the service's.
            for f in [
                path.clone(),
                PathBuf::from(format!("{}-wal", path.display())),
                PathBuf::from(format!("{}-shm", path.display())),
            ] {
                if f.exists() {
                    crate::access::inherit_owner(&f).map_err(|e| fail(crate::access::describe(&f, &e, true)))?;
                }
            }
            conn.execute_batch(&schema::corrections("INTEGER PRIMARY KEY AUTOINCREMENT", "BLOB"))
                .map_err(|e| fail(e.to_string()))?;
            Backend::Sqlite(conn)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let t = pg_target(url, password_file).map_err(fail)?;
            let client = pg_connect(&t).map_err(|e| fail(pg_error(&e)))?;
            target = Some(t);
            Backend::Postgres(Some(Box::new(client)))
        } else {
            return Err(fail("expected sqlite:///path/to/feedback.db or postgres://…".into()));
        };
        Ok(Store { url: crate::redact::credentials(url).into_owned(), target, db: Mutex::new(backend) })
    }

    /// A PostgreSQL store whose server may be down now (the daemon starting
    /// before its database): every call tries to connect until one succeeds.
    /// What cannot get better by waiting is still an error now: a URL that
    /// does not parse, a server that answered with an error (a wrong
    /// password, no such database). Other URLs open as [`Store::open`].
    pub fn open_later(url: &str) -> Result<Store, StoreError> {
        Self::open_later_with(url, None)
    }

    /// As [`Store::open_later`], the PostgreSQL password read from `password_file`.
    pub fn open_later_with(url: &str, password_file: Option<&std::path::Path>) -> Result<Store, StoreError> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Store::open_with(url, password_file);
        }
        let shown = crate::redact::credentials(url).into_owned();
        let fail = |reason: String| StoreError::Open { url: shown.clone(), reason };
        let target = pg_target(url, password_file).map_err(fail)?;
        let client = match pg_connect(&target) {
            Ok(c) => Some(Box::new(c)),
            Err(e) if e.as_db_error().is_some() => return Err(fail(pg_error(&e))),
            Err(e) => {
                tracing::warn!(store = %shown, error = %pg_error(&e), "feedback store unavailable; connecting again on each use");
                None
            }
        };
        Ok(Store { url: shown.clone(), target: Some(target), db: Mutex::new(Backend::Postgres(client)) })
    }

    /// Runs `f` on the PostgreSQL connection, connecting first when there is
    /// none; a connection that broke is dropped so the next call reconnects.
    fn pg<T>(
        &self,
        slot: &mut Option<Box<postgres::Client>>,
        f: impl FnOnce(&mut postgres::Client) -> Result<T, postgres::Error>,
    ) -> Result<T, StoreError> {
        let unavailable = |reason: String| StoreError::Unavailable { url: self.url.clone(), reason };
        // A server restarted since the last call leaves a connection that looks
        // open: a round trip finds out before the statement is sent, so an
        // insert is never retried blind (calls are corrections and polls, not per message).
        if slot.as_mut().is_some_and(|c| c.is_valid(CONNECT_TIMEOUT).is_err()) {
            *slot = None;
        }
        if slot.as_ref().is_none_or(|c| c.is_closed()) {
            *slot = None;
            let target = self.target.as_ref().expect("a PostgreSQL store has a target");
            *slot = Some(Box::new(pg_connect(target).map_err(|e| unavailable(pg_error(&e)))?));
        }
        let client = slot.as_mut().expect("connected above");
        match f(client) {
            Ok(v) => Ok(v),
            Err(e) if e.is_closed() || client.is_closed() || e.code().is_none() && e.as_db_error().is_none() => {
                *slot = None;
                Err(unavailable(pg_error(&e)))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Whether this is a PostgreSQL store (state shared between instances).
    pub fn is_shared(&self) -> bool {
        self.target.is_some()
    }

    /// Another connection to the same PostgreSQL store, opened on first use
    /// (a background writer's own); `None` for SQLite.
    pub fn second_connection(&self) -> Option<Store> {
        let target = self.target.clone()?;
        Some(Store { url: self.url.clone(), target: Some(target), db: Mutex::new(Backend::Postgres(None)) })
    }

    /// Runs `f` on the PostgreSQL connection; an error for SQLite (callers
    /// check [`Store::is_shared`] first).
    pub(crate) fn with_pg<T>(
        &self,
        f: impl FnOnce(&mut postgres::Client) -> Result<T, postgres::Error>,
    ) -> Result<T, StoreError> {
        match &mut *self.db() {
            Backend::Postgres(slot) => self.pg(slot, f),
            Backend::Sqlite(_) => Err(StoreError::Query("this needs a PostgreSQL store".into())),
        }
    }

    /// Writes recent decisions (a re-decided message replaces its row).
    pub fn put_recent(&self, rows: &[RecentRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        // One statement for the batch: a round trip per row would cap the
        // writer at a few thousand rows a second across a network.
        let mut sql = String::from(
            "INSERT INTO mailtriage_recent (message_hash, decided_at, language, terms, encoder, embedding) VALUES ",
        );
        let mut params: Vec<&(dyn postgres::types::ToSql + Sync)> = Vec::with_capacity(rows.len() * 6);
        // Two decisions of one Message-ID in a batch would make ON CONFLICT fail: keep the last.
        let mut seen = std::collections::HashSet::new();
        let unique: Vec<&RecentRow> = rows.iter().rev().filter(|r| seen.insert(r.hash.as_str())).collect();
        for (i, r) in unique.iter().enumerate() {
            let b = i * 6;
            if i > 0 {
                sql.push(',');
            }
            sql.push_str(&format!("(${},${},${},${},${},${})", b + 1, b + 2, b + 3, b + 4, b + 5, b + 6));
            params.extend([
                &r.hash as &(dyn postgres::types::ToSql + Sync),
                &r.decided_at,
                &r.language,
                &r.terms,
                &r.encoder,
                &r.embedding,
            ]);
        }
        sql.push_str(
            " ON CONFLICT (message_hash) DO UPDATE SET decided_at = EXCLUDED.decided_at, language = EXCLUDED.language, \
             terms = EXCLUDED.terms, encoder = EXCLUDED.encoder, embedding = EXCLUDED.embedding",
        );
        self.with_pg(|c| c.execute(sql.as_str(), &params)).map(|_| ())
    }

    /// A recent decision by its Message-ID pseudonym.
    pub fn get_recent(&self, hash: &str) -> Result<Option<RecentRow>, StoreError> {
        let row = self.with_pg(|c| c.query_opt(RECENT_GET, &[&hash]))?;
        Ok(row.map(|r| RecentRow {
            hash: r.get(0),
            decided_at: r.get(1),
            language: r.get(2),
            terms: r.get(3),
            encoder: r.get(4),
            embedding: r.get(5),
        }))
    }

    /// Deletes a recent decision (erasure); how many rows went (0 or 1).
    pub fn forget_recent(&self, hash: &str) -> Result<u64, StoreError> {
        self.with_pg(|c| c.execute(RECENT_FORGET, &[&hash]))
    }

    /// Deletes recent decisions made before `before` (unix seconds), then all
    /// but the newest `max_rows`; how many went.
    pub fn sweep_recent(&self, before: i64, max_rows: u64) -> Result<u64, StoreError> {
        let max_rows = max_rows as i64;
        self.with_pg(|c| Ok(c.execute(RECENT_EXPIRE, &[&before])? + c.execute(RECENT_TRIM, &[&max_rows])?))
    }

    /// Asks every instance to erase what it holds of a message (PostgreSQL):
    /// the request is kept, so an instance that is down now applies it when
    /// it comes back, and announced at once. Returns its id.
    pub fn announce_erasure(&self, hash: &str) -> Result<i64, StoreError> {
        self.with_pg(|c| {
            let mut tx = c.transaction()?;
            let id: i64 = tx
                .query_one(
                    "INSERT INTO mailtriage_erasures (requested_at, message_hash) VALUES ($1, $2) RETURNING id",
                    &[&crate::learn::correction::now(), &hash],
                )?
                .get(0);
            tx.execute("SELECT pg_notify($1, $2)", &[&FORGET_CHANNEL, &id.to_string()])?;
            tx.commit()?;
            Ok(id)
        })
    }

    /// Erasures requested after `id`, oldest first: (id, Message-ID pseudonym).
    pub fn erasures_after(&self, id: i64) -> Result<Vec<(i64, String)>, StoreError> {
        let rows = self.with_pg(|c| {
            c.query("SELECT id, message_hash FROM mailtriage_erasures WHERE id > $1 ORDER BY id LIMIT 10000", &[&id])
        })?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// The newest erasure's id (0: none).
    pub fn last_erasure(&self) -> Result<i64, StoreError> {
        Ok(self.with_pg(|c| c.query_one("SELECT COALESCE(MAX(id), 0) FROM mailtriage_erasures", &[]))?.get(0))
    }

    /// Deletes erasure requests older than `before` (unix seconds).
    pub fn expire_erasures(&self, before: i64) -> Result<u64, StoreError> {
        self.with_pg(|c| c.execute("DELETE FROM mailtriage_erasures WHERE requested_at < $1", &[&before]))
    }

    /// Rows in the shared window and the bytes the table and its indexes take.
    pub fn recent_size(&self) -> Result<(i64, i64), StoreError> {
        let r = self.with_pg(|c| {
            c.query_one(
                "SELECT (SELECT COUNT(*) FROM mailtriage_recent), pg_total_relation_size('mailtriage_recent')",
                &[],
            )
        })?;
        Ok((r.get(0), r.get(1)))
    }

    /// Connects anew and says what was negotiated: the server's version and
    /// the TLS in use (`check-config` prints it).
    pub fn describe(&self) -> Result<String, StoreError> {
        let Some(target) = &self.target else { return Ok(format!("SQLite {}", rusqlite::version())) };
        let unavailable = |e: postgres::Error| StoreError::Unavailable { url: self.url.clone(), reason: pg_error(&e) };
        let (mut client, negotiated) = target.connect().map_err(unavailable)?;
        let version: String = client.query_one("SHOW server_version", &[])?.get(0);
        Ok(format!("PostgreSQL {version}; {negotiated}"))
    }

    /// The store's address without its password, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Backend> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records one correction; returns its id.
    pub fn insert(&self, c: &Correction) -> Result<i64, StoreError> {
        let terms = c.terms.to_bytes();
        let embedding = c.embedding.as_ref().map(|e| e.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>());
        match &mut *self.db() {
            Backend::Sqlite(conn) => {
                conn.execute(
                    INSERT,
                    rusqlite::params![
                        c.created_at,
                        c.channel.as_str(),
                        c.actor,
                        c.message_hash,
                        c.department,
                        c.priority,
                        c.language,
                        terms,
                        c.encoder,
                        embedding
                    ],
                )?;
                Ok(conn.last_insert_rowid())
            }
            Backend::Postgres(slot) => self.pg(slot, |client| {
                let row = client.query_one(
                    &format!("{INSERT} RETURNING id"),
                    &[
                        &c.created_at,
                        &c.channel.as_str(),
                        &c.actor,
                        &c.message_hash,
                        &c.department,
                        &c.priority,
                        &c.language,
                        &terms,
                        &c.encoder,
                        &embedding,
                    ],
                )?;
                Ok(row.get(0))
            }),
        }
    }

    /// Every correction made at or after `since` (unix seconds), oldest first.
    pub fn load(&self, since: i64) -> Result<Vec<Correction>, StoreError> {
        let rows: Vec<RawRow> = match &mut *self.db() {
            Backend::Sqlite(conn) => {
                let mut stmt = conn.prepare(SELECT)?;
                let rows = stmt.query_map([since], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                        r.get(8)?,
                        r.get(9)?,
                        r.get(10)?,
                    ))
                })?;
                rows.collect::<Result<_, _>>()?
            }
            Backend::Postgres(slot) => self
                .pg(slot, |client| client.query(SELECT, &[&since]))?
                .into_iter()
                .map(|r| {
                    (
                        r.get(0),
                        r.get(1),
                        r.get(2),
                        r.get(3),
                        r.get(4),
                        r.get(5),
                        r.get(6),
                        r.get(7),
                        r.get(8),
                        r.get(9),
                        r.get(10),
                    )
                })
                .collect(),
        };
        rows.into_iter().map(decode).collect()
    }

    /// Who corrected what when, without the features (for `report`).
    pub fn summary(&self, since: i64) -> Result<Vec<SummaryRow>, StoreError> {
        let row = |created_at, department, priority, channel| SummaryRow { created_at, department, priority, channel };
        Ok(match &mut *self.db() {
            Backend::Sqlite(conn) => {
                let mut stmt = conn.prepare(SUMMARY)?;
                let rows = stmt.query_map([since], |r| Ok(row(r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
                rows.collect::<Result<_, _>>()?
            }
            Backend::Postgres(slot) => self
                .pg(slot, |client| client.query(SUMMARY, &[&since]))?
                .into_iter()
                .map(|r| row(r.get(0), r.get(1), r.get(2), r.get(3)))
                .collect(),
        })
    }

    /// Deletes corrections made before `before` (unix seconds); returns how many.
    pub fn expire(&self, before: i64) -> Result<u64, StoreError> {
        Ok(match &mut *self.db() {
            Backend::Sqlite(conn) => conn.execute(EXPIRE, [before])? as u64,
            Backend::Postgres(slot) => self.pg(slot, |client| client.execute(EXPIRE, &[&before]))?,
        })
    }

    /// The newest correction id (0 when empty): a cursor for "new since".
    pub fn max_id(&self) -> Result<i64, StoreError> {
        Ok(match &mut *self.db() {
            Backend::Sqlite(conn) => conn.query_row(MAX_ID, [], |r| r.get(0))?,
            Backend::Postgres(slot) => self.pg(slot, |client| client.query_one(MAX_ID, &[]))?.get(0),
        })
    }

    /// How many corrections have an id above `id`.
    pub fn count_after(&self, id: i64) -> Result<u64, StoreError> {
        let n: i64 = match &mut *self.db() {
            Backend::Sqlite(conn) => conn.query_row(COUNT_AFTER, [id], |r| r.get(0))?,
            Backend::Postgres(slot) => self.pg(slot, |client| client.query_one(COUNT_AFTER, &[&id]))?.get(0),
        };
        Ok(n as u64)
    }

    /// Deletes every correction of the message with this hash
    /// ([`Correction::message_hash`]); returns how many.
    pub fn forget_message(&self, message_hash: &str) -> Result<u64, StoreError> {
        self.delete(FORGET_MESSAGE, message_hash)
    }

    /// Deletes every correction made by this actor ([`Correction::actor`]); returns how many.
    pub fn forget_actor(&self, actor: &str) -> Result<u64, StoreError> {
        self.delete(FORGET_ACTOR, actor)
    }

    fn delete(&self, sql: &str, value: &str) -> Result<u64, StoreError> {
        Ok(match &mut *self.db() {
            Backend::Sqlite(conn) => conn.execute(sql, [value])? as u64,
            Backend::Postgres(slot) => self.pg(slot, |client| client.execute(sql, &[&value]))?,
        })
    }
}

/// The URL parsed with [`pg::Target`], with our defaults where it sets
/// none: [`CONNECT_TIMEOUT`], TCP keepalives (a host that vanished is
/// noticed, and its leadership released, in about a minute), and an
/// `application_name` naming this host, so `pg_stat_activity` (and a
/// follower's log) say which instance holds what.
pub(crate) fn pg_target(url: &str, password_file: Option<&std::path::Path>) -> Result<Target, String> {
    let mut target = Target::parse(url, password_file)?;
    let config = target.config_mut();
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    config.keepalives(true).keepalives_idle(std::time::Duration::from_secs(30));
    if config.get_application_name().is_none() {
        config.application_name(&instance_name());
    }
    Ok(target)
}

/// `mailtriage@<host name>:<pid>`: how this instance names itself to PostgreSQL.
pub fn instance_name() -> String {
    format!("mailtriage@{}:{}", crate::record::host_name(), std::process::id())
}

/// Connects and creates the tables if needed.
fn pg_connect(target: &Target) -> Result<postgres::Client, postgres::Error> {
    let (mut client, _) = target.connect()?;
    client.batch_execute(&schema::corrections("BIGSERIAL PRIMARY KEY", "BYTEA"))?;
    client.batch_execute(schema::RECENT)?;
    client.batch_execute(schema::ERASURES)?;
    client.batch_execute(schema::HEADS)?;
    Ok(client)
}

fn decode(row: RawRow) -> Result<Correction, StoreError> {
    let (id, created_at, channel, actor, message_hash, department, priority, language, terms, encoder, embedding) = row;
    let bad = |reason: &str| StoreError::Row { id, reason: reason.into() };
    let terms = TermCounts::from_bytes(&terms).ok_or_else(|| bad("unreadable term counts"))?;
    let embedding = match embedding {
        Some(b) if b.len() % 4 == 0 => {
            Some(b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect())
        }
        Some(_) => return Err(bad("embedding is not a whole number of f32")),
        None => None,
    };
    Ok(Correction {
        id,
        created_at,
        channel: channel.parse().map_err(|_| bad("unknown channel"))?,
        actor,
        message_hash,
        department,
        priority,
        language,
        terms,
        encoder,
        embedding,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learn::correction::Channel;

    pub(crate) fn sample(created_at: i64, department: &str) -> Correction {
        Correction {
            id: 0,
            created_at,
            channel: Channel::Mail,
            actor: "hmac:abcd".into(),
            message_hash: Some("h1".into()),
            department: Some(department.into()),
            priority: None,
            language: "en".into(),
            terms: TermCounts::of("the invoice is overdue", 12),
            encoder: Some("enc".into()),
            embedding: Some(vec![0.5, -1.25, 3.0]),
        }
    }

    #[test]
    fn sqlite_round_trip_expiry_and_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}/sub/feedback.db", dir.path().display())).unwrap();
        assert_eq!(store.max_id().unwrap(), 0);
        let a = store.insert(&sample(100, "billing")).unwrap();
        let b = store.insert(&Correction { embedding: None, ..sample(200, "support") }).unwrap();
        assert!(b > a);
        let all = store.load(0).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0], Correction { id: a, ..sample(100, "billing") });
        assert_eq!(all[1].embedding, None);
        assert_eq!(store.count_after(a).unwrap(), 1);
        assert_eq!(store.summary(150).unwrap()[0].department.as_deref(), Some("support"));
        assert_eq!(store.expire(150).unwrap(), 1);
        assert_eq!(store.load(0).unwrap().len(), 1);
    }

    #[test]
    fn a_postgresql_server_that_is_down_is_retried_a_broken_url_is_not() {
        // Nothing listens on port 1: refused at once, so the store waits for it.
        let store = Store::open_later("postgres://u:hunter2@127.0.0.1:1/db").unwrap();
        let e = store.insert(&sample(1, "billing")).unwrap_err();
        assert!(e.is_retryable(), "{e}");
        assert!(e.to_string().contains("u:****@127.0.0.1:1") && !e.to_string().contains("hunter2"), "{e}");
        let e = Store::open_later("postgres://u@127.0.0.1:notaport/db").err().unwrap();
        assert!(!e.is_retryable() && e.to_string().contains("notaport"), "{e}");
    }

    #[test]
    fn bad_urls_are_named_without_the_password() {
        let e = Store::open("mysql://u:hunter2@h/db").err().unwrap().to_string();
        assert!(e.contains("mysql://u:****@h/db") && e.contains("expected sqlite"), "{e}");
        assert!(!e.contains("hunter2"));
        let e = Store::open("sqlite:///proc/no/such/dir/f.db").err().unwrap().to_string();
        assert!(e.contains("/proc/no/such/dir"), "{e}");
    }
}
