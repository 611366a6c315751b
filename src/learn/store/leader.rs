//! Who retrains when several instances share a PostgreSQL store: exactly
//! one, chosen by a session-level advisory lock. The lock lives as long as
//! the connection that took it, so a leader that crashes, is killed or
//! loses its host gives it up when PostgreSQL notices the connection gone
//! (at once for a dead process, within TCP keepalive for a dead host), and
//! the next instance that asks takes over. No lease to renew, no clock to
//! trust.
//!
//! Holding the lock is not enough to promote: a leader whose connection
//! broke mid-training would not know a successor exists. So each promotion
//! checks, inside its own transaction, that the leader's session (its
//! backend pid, the [`Fence`]) still holds the lock ([`holds`]).

use super::{Store, StoreError};

/// Who may promote: the backend pid of the connection holding the
/// retraining lock (see the module's text). The promotion's transaction
/// checks that this session still holds it, so a leader that lost its
/// connection mid-training cannot promote beside its successor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    pub pid: i32,
}

/// The advisory lock of the retraining leader ("mtrt").
pub const RETRAIN_LOCK: i64 = 0x6D74_7274;
/// The transaction lock every promotion and rollback takes ("mtpr").
pub const PROMOTE_LOCK: i64 = 0x6D74_7072;

/// Whether the session `fence` names holds the retraining lock now.
pub fn holds(tx: &mut postgres::Transaction<'_>, fence: Fence) -> Result<bool, postgres::Error> {
    // A bigint advisory key shows in pg_locks as classid (high half), objid (low half), objsubid 1.
    let row = tx.query_one(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND classid = 0 \
         AND objid = $1::bigint::oid AND objsubid = 1 AND pid = $2 AND granted)",
        &[&RETRAIN_LOCK, &fence.pid],
    )?;
    Ok(row.get(0))
}

/// A connection of its own that tries to hold the retraining lock.
pub struct Leadership {
    store: Store,
    /// The backend holding the lock, while we lead.
    held: Option<Fence>,
}

/// What [`Leadership::ensure`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// This instance leads (newly, or still).
    Leading { fence: Fence, newly: bool },
    /// Another session holds the lock: its `application_name`, if visible.
    Following(Option<String>),
}

impl Leadership {
    /// `store` must be a connection used for nothing else (see
    /// [`Store::second_connection`]): the lock belongs to its session.
    pub fn new(store: Store) -> Self {
        Leadership { store, held: None }
    }

    /// Keeps or takes the lead. A broken connection loses it (the store
    /// reconnects with a new session, which must take the lock anew).
    pub fn ensure(&mut self) -> Result<Role, StoreError> {
        let held = self.held;
        let (pid, got, leader): (i32, bool, Option<String>) = self.store.with_pg(|c| {
            let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[])?.get(0);
            if held.is_some_and(|f| f.pid == pid) {
                return Ok((pid, true, None));
            }
            let got: bool = c.query_one("SELECT pg_try_advisory_lock($1)", &[&RETRAIN_LOCK])?.get(0);
            let leader = if got {
                None
            } else {
                c.query_opt(
                    "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                     WHERE l.locktype = 'advisory' AND l.classid = 0 AND l.objid = $1::bigint::oid \
                     AND l.objsubid = 1 AND l.granted",
                    &[&RETRAIN_LOCK],
                )?
                .map(|r| r.get(0))
            };
            Ok((pid, got, leader))
        })?;
        if got {
            let fence = Fence { pid };
            let newly = self.held != Some(fence);
            self.held = Some(fence);
            Ok(Role::Leading { fence, newly })
        } else {
            self.held = None;
            Ok(Role::Following(leader))
        }
    }

    /// Lets go of the lead (a clean shutdown; a crash does the same implicitly).
    pub fn release(&mut self) {
        if self.held.take().is_some() {
            let _ = self.store.with_pg(|c| c.execute("SELECT pg_advisory_unlock($1)", &[&RETRAIN_LOCK]));
        }
    }
}
