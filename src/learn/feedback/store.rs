//! Where corrections live: SQLite (one instance) or PostgreSQL (several
//! instances behind several MTAs sharing one store). Same table, same SQL
//! (`$n` placeholders work in both), and only features: see [`Correction`].

use std::path::PathBuf;
use std::sync::Mutex;

use thiserror::Error;

use super::Correction;
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
        StoreError::Query(e.to_string())
    }
}

impl StoreError {
    /// Whether the same call may succeed later (the server was away).
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }
}

/// The table, in either dialect: only the id and byte-string column types differ.
fn schema(id: &str, bytes: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS mailtriage_corrections (
    id {id},
    created_at BIGINT NOT NULL,
    channel TEXT NOT NULL,
    actor TEXT NOT NULL,
    message_hash TEXT,
    department TEXT,
    priority TEXT,
    language TEXT NOT NULL,
    terms {bytes} NOT NULL,
    encoder TEXT,
    embedding {bytes}
);
CREATE INDEX IF NOT EXISTS mailtriage_corrections_created ON mailtriage_corrections (created_at);"
    )
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
    /// With it, to reconnect; never shown.
    connect_url: String,
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
        let fail =
            |reason: String| StoreError::Open { url: crate::record::redact::credentials(url).into_owned(), reason };
        let backend = if let Some(path) = url.strip_prefix("sqlite://") {
            let path = PathBuf::from(path);
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| fail(format!("creating {}: {e}", dir.display())))?;
            }
            let conn = rusqlite::Connection::open(&path).map_err(|e| fail(e.to_string()))?;
            // WAL: the daemon writes while `retrain` or `report` read.
            conn.pragma_update(None, "journal_mode", "WAL").map_err(|e| fail(e.to_string()))?;
            conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(|e| fail(e.to_string()))?;
            conn.execute_batch(&schema("INTEGER PRIMARY KEY AUTOINCREMENT", "BLOB"))
                .map_err(|e| fail(e.to_string()))?;
            Backend::Sqlite(conn)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres(Some(Box::new(pg_connect(url).map_err(|e| fail(e.to_string()))?)))
        } else {
            return Err(fail("expected sqlite:///path/to/feedback.db or postgres://…".into()));
        };
        Ok(Store {
            url: crate::record::redact::credentials(url).into_owned(),
            connect_url: url.to_string(),
            db: Mutex::new(backend),
        })
    }

    /// A PostgreSQL store whose server may be down now (the daemon starting
    /// before its database): every call tries to connect until one succeeds.
    /// What cannot get better by waiting is still an error now: a URL that
    /// does not parse, a server that answered with an error (a wrong
    /// password, no such database). Other URLs open as [`Store::open`].
    pub fn open_later(url: &str) -> Result<Store, StoreError> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Store::open(url);
        }
        let shown = crate::record::redact::credentials(url).into_owned();
        let fail = |reason: String| StoreError::Open { url: shown.clone(), reason };
        url.parse::<postgres::Config>().map_err(|e| fail(e.to_string()))?;
        let client = match pg_connect(url) {
            Ok(c) => Some(Box::new(c)),
            Err(e) if e.as_db_error().is_some() => return Err(fail(e.to_string())),
            Err(e) => {
                tracing::warn!(store = %shown, error = %e, "feedback store unavailable; connecting again on each use");
                None
            }
        };
        Ok(Store { url: shown.clone(), connect_url: url.to_string(), db: Mutex::new(Backend::Postgres(client)) })
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
            *slot = Some(Box::new(pg_connect(&self.connect_url).map_err(|e| unavailable(e.to_string()))?));
        }
        let client = slot.as_mut().expect("connected above");
        match f(client) {
            Ok(v) => Ok(v),
            Err(e) if e.is_closed() || client.is_closed() || e.code().is_none() && e.as_db_error().is_none() => {
                *slot = None;
                Err(unavailable(e.to_string()))
            }
            Err(e) => Err(e.into()),
        }
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

/// Connects (with [`CONNECT_TIMEOUT`] unless the URL says otherwise) and
/// creates the table if needed.
fn pg_connect(url: &str) -> Result<postgres::Client, postgres::Error> {
    let mut config: postgres::Config = url.parse()?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    let mut client = config.connect(postgres::NoTls)?;
    client.batch_execute(&schema("BIGSERIAL PRIMARY KEY", "BYTEA"))?;
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
    use crate::learn::feedback::Channel;

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
