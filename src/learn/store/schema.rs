//! Every table the feedback store keeps, in one place: what `Store::open`
//! creates (SQLite: the corrections; PostgreSQL: all of them). The store,
//! the head registry and the leader only run queries against them.

/// The corrections table, in either dialect: only the id and byte-string column types differ.
pub fn corrections(id: &str, bytes: &str) -> String {
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

/// The shared recent-decisions window (PostgreSQL only; see
/// the `recent` module): features under the Message-ID's pseudonym, swept by
/// age and row count.
pub const RECENT: &str = "CREATE TABLE IF NOT EXISTS mailtriage_recent (
    message_hash TEXT PRIMARY KEY,
    decided_at BIGINT NOT NULL,
    language TEXT NOT NULL,
    terms BYTEA NOT NULL,
    encoder TEXT,
    embedding BYTEA
);
CREATE INDEX IF NOT EXISTS mailtriage_recent_decided ON mailtriage_recent (decided_at);";
/// Erasures by Message-ID pseudonym, for every instance to apply to what
/// only it holds (its audit trail, its memory): see `daemon::forget`.
pub const ERASURES: &str = "CREATE TABLE IF NOT EXISTS mailtriage_erasures (
    id BIGSERIAL PRIMARY KEY,
    requested_at BIGINT NOT NULL,
    message_hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS mailtriage_erasures_requested ON mailtriage_erasures (requested_at);";

/// The shared head versions, which is current, and every retraining (PostgreSQL).
pub const HEADS: &str = "CREATE TABLE IF NOT EXISTS mailtriage_heads (
    role TEXT NOT NULL,
    number INTEGER NOT NULL,
    created_at BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    bytes BYTEA NOT NULL,
    PRIMARY KEY (role, number)
);
CREATE TABLE IF NOT EXISTS mailtriage_heads_current (
    role TEXT PRIMARY KEY,
    number INTEGER NOT NULL,
    changed_at BIGINT NOT NULL,
    changed_by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS mailtriage_retrain_history (
    id BIGSERIAL PRIMARY KEY,
    at BIGINT NOT NULL,
    role TEXT NOT NULL,
    through_id BIGINT NOT NULL,
    promoted_number INTEGER,
    instance TEXT NOT NULL,
    entry TEXT NOT NULL
);";
