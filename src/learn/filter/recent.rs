//! Features of recently decided messages, by Message-ID, so a correction
//! that names only the Message-ID (a helpdesk webhook, the CLI) can be
//! learned from.
//!
//! Always in memory, bounded in bytes, oldest dropped first: at 5 M
//! messages a day this is a window of minutes to hours, which is why the
//! mail and pipe channels, which carry the message, come first. With a
//! PostgreSQL store the window is also shared: every decision is written,
//! in batches by a background thread ([`SharedWindow`]), to the
//! `mailtriage_recent` table under the Message-ID's pseudonym, so any
//! instance (or the CLI) finds what another decided. The decision never
//! waits for the database: when it is slow or away, rows are dropped and
//! counted, and this instance's memory still answers.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::learn::correction::{now, MessageFeatures};
use crate::learn::store::{RecentRow, Store, StoreError};
use crate::message::language;
use crate::model::lexical::TermCounts;
use crate::record::metrics::name;

type Key = [u8; 16];

/// The window of recent decisions.
pub struct RecentDecisions {
    max_bytes: usize,
    inner: Mutex<Inner>,
    shared: Option<SharedWindow>,
}

#[derive(Default)]
struct Inner {
    bytes: usize,
    order: VecDeque<Key>,
    entries: HashMap<Key, MessageFeatures>,
}

/// Memory is keyed by the Message-ID's pseudonym (as the audit trail and
/// the store name it), so an erasure that knows only the pseudonym finds it.
fn key(hash: &str) -> Key {
    let d = Sha256::digest(hash.as_bytes());
    d[..16].try_into().expect("16 bytes")
}

fn size(f: &MessageFeatures) -> usize {
    96 + f.terms.heap_bytes() + f.embedding.as_ref().map_or(0, |(id, e)| id.len() + 4 * e.len())
}

impl RecentDecisions {
    /// A window in this process's memory only.
    pub fn new(max_bytes: usize) -> Self {
        RecentDecisions { max_bytes, inner: Mutex::new(Inner::default()), shared: None }
    }

    /// A window also kept in the PostgreSQL store (see [`SharedWindow`]).
    pub fn shared(max_bytes: usize, shared: SharedWindow) -> Self {
        RecentDecisions { max_bytes, inner: Mutex::new(Inner::default()), shared: Some(shared) }
    }

    /// Remembers a decided message's features under its Message-ID's
    /// pseudonym `hash` (as corrections and the audit trail name it). Never
    /// blocks on the database.
    pub fn remember(&self, hash: &str, features: MessageFeatures) {
        if let Some(shared) = &self.shared {
            shared.send(hash, &features);
        }
        self.insert(hash, features);
    }

    /// The features of a decided message: this process's memory first, then
    /// the shared table. An error only when the shared table is unreachable
    /// and memory had nothing.
    pub fn find(&self, hash: &str) -> Result<Option<MessageFeatures>, StoreError> {
        if let Some(f) = self.get(hash) {
            return Ok(Some(f));
        }
        match &self.shared {
            Some(shared) => shared.get(hash),
            None => Ok(None),
        }
    }

    /// Forgets a message everywhere this window keeps it; whether it was
    /// held (in memory or in the shared table).
    pub fn forget(&self, hash: &str) -> Result<bool, StoreError> {
        let shared = match &self.shared {
            Some(s) => s.store.forget_recent(hash)? > 0,
            None => false,
        };
        Ok(self.remove(hash) | shared)
    }

    /// Remembers features in this process's memory only (a re-decided message replaces the old).
    pub fn insert(&self, hash: &str, features: MessageFeatures) {
        let k = key(hash);
        let n = size(&features);
        if n > self.max_bytes {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = g.entries.insert(k, features) {
            g.bytes -= size(&old);
            g.order.retain(|o| *o != k);
        }
        g.bytes += n;
        g.order.push_back(k);
        while g.bytes > self.max_bytes {
            let Some(oldest) = g.order.pop_front() else { break };
            if let Some(old) = g.entries.remove(&oldest) {
                g.bytes -= size(&old);
            }
        }
    }

    /// Features in this process's memory.
    pub fn get(&self, hash: &str) -> Option<MessageFeatures> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).entries.get(&key(hash)).cloned()
    }

    /// Forgets features held in this process's memory; whether they were here.
    pub fn remove(&self, hash: &str) -> bool {
        let k = key(hash);
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(old) = g.entries.remove(&k) else { return false };
        g.bytes -= size(&old);
        g.order.retain(|o| *o != k);
        true
    }

    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One decision on its way to the shared table.
struct Pending {
    hash: String,
    decided_at: i64,
    features: MessageFeatures,
}

/// The shared half of the window: a bounded queue to a writer thread that
/// inserts in batches and sweeps the table by age and row count, and the
/// store connection lookups use.
pub struct SharedWindow {
    queue: crossbeam_channel::Sender<Pending>,
    store: std::sync::Arc<Store>,
}

/// How the shared table is bounded.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub max_age: Duration,
    pub max_rows: u64,
}

/// Decisions waiting for the writer; beyond this they are dropped (and counted).
const QUEUE: usize = 20_000;
/// Rows per INSERT.
const BATCH: usize = 500;
/// How long the writer gathers a batch.
const GATHER: Duration = Duration::from_millis(100);
/// How often the table is swept.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

impl SharedWindow {
    /// Starts the writer thread. `writer` is a connection of its own (bulk
    /// inserts never hold up a correction's lookup on `store`).
    pub fn start(store: std::sync::Arc<Store>, writer: Store, bounds: Bounds) -> std::io::Result<SharedWindow> {
        let (queue, rx) = crossbeam_channel::bounded(QUEUE);
        std::thread::Builder::new().name("recent-writer".into()).spawn(move || write_loop(&writer, &rx, bounds))?;
        Ok(SharedWindow { queue, store })
    }

    fn send(&self, hash: &str, features: &MessageFeatures) {
        let p = Pending { hash: hash.to_string(), decided_at: now(), features: features.clone() };
        if self.queue.try_send(p).is_err() {
            metrics::counter!(name::RECENT_DROPPED).increment(1);
        }
    }

    fn get(&self, hash: &str) -> Result<Option<MessageFeatures>, StoreError> {
        let Some(row) = self.store.get_recent(hash)? else { return Ok(None) };
        let Some(terms) = TermCounts::from_bytes(&row.terms) else { return Ok(None) };
        let embedding = match (row.encoder, row.embedding) {
            (Some(id), Some(b)) if b.len() % 4 == 0 => {
                Some((id, b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()))
            }
            _ => None,
        };
        Ok(Some(MessageFeatures { terms, language: language::code(&row.language), embedding }))
    }
}

fn write_loop(store: &Store, rx: &crossbeam_channel::Receiver<Pending>, bounds: Bounds) {
    let mut last_sweep = Instant::now();
    let mut failing = false;
    loop {
        let mut batch = Vec::new();
        match rx.recv_timeout(SWEEP_EVERY) {
            Ok(p) => batch.push(p),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        }
        let deadline = Instant::now() + GATHER;
        while batch.len() < BATCH {
            match rx.recv_deadline(deadline) {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            let rows: Vec<RecentRow> = batch.into_iter().map(row_of).collect();
            match store.put_recent(&rows) {
                Ok(()) => failing = false,
                Err(e) => {
                    metrics::counter!(name::RECENT_DROPPED).increment(rows.len() as u64);
                    if !failing {
                        tracing::warn!(error = %e, "recent decisions not shared (dropped until the store answers)");
                    }
                    failing = true;
                }
            }
        }
        if last_sweep.elapsed() >= SWEEP_EVERY {
            last_sweep = Instant::now();
            let oldest = now() - bounds.max_age.as_secs() as i64;
            if let Err(e) = store.sweep_recent(oldest, bounds.max_rows) {
                tracing::debug!(error = %e, "sweeping recent decisions");
            }
        }
    }
}

fn row_of(p: Pending) -> RecentRow {
    let (encoder, embedding) = match p.features.embedding {
        Some((id, e)) => (Some(id), Some(e.iter().flat_map(|x| x.to_le_bytes()).collect())),
        None => (None, None),
    };
    RecentRow {
        hash: p.hash,
        decided_at: p.decided_at,
        language: p.features.language.to_string(),
        terms: p.features.terms.to_bytes(),
        encoder,
        embedding,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lexical::TermCounts;

    fn f(text: &str) -> MessageFeatures {
        MessageFeatures { terms: TermCounts::of(text, 12), language: "en", embedding: Some(("e".into(), vec![0.0; 8])) }
    }

    #[test]
    fn finds_by_message_id_and_drops_the_oldest_past_the_budget() {
        let one = size(&f("invoice overdue"));
        let r = RecentDecisions::new(one * 2 + one / 2);
        r.insert("hash-a", f("invoice overdue"));
        r.insert("hash-b", f("invoice overdue"));
        assert!(r.get("hash-a").is_some());
        r.insert("hash-c", f("invoice overdue"));
        assert!(r.get("hash-a").is_none(), "the oldest went");
        assert!(r.get("hash-b").is_some() && r.get("hash-c").is_some());
        r.insert("hash-c", f("invoice overdue"));
        assert_eq!(r.len(), 2);
        assert!(r.forget("hash-c").unwrap() && !r.forget("hash-c").unwrap());
        assert!(r.get("hash-c").is_none() && r.len() == 1);
    }
}
