//! Erasure on request (GDPR Art. 17): every trace mailtriage kept of one
//! message, or of one person's corrections.
//!
//! What a message leaves behind, and where it is erased:
//! - corrections of it in the feedback store (by the Message-ID hash);
//! - its features in the daemon's recent-decisions window (memory, and the
//!   shared table with a PostgreSQL store);
//! - its audit lines, in the current file and every rotated one (by the
//!   `message_id_hash` field; the file is rewritten, see
//!   [`audit::erase`]).
//!
//! What a sender leaves behind: the corrections they made (their actor is
//! an HMAC of their address). Audit lines hold only domains and decisions
//! never record the sender, so there is nothing else to erase.
//!
//! The daemon serves this as `POST /forget` (it alone holds the recent
//! window); `mailtriage forget` calls that, or does the same itself when no
//! daemon runs ([`erase`] with no window).

use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::http::Handler;
use super::Running;
use crate::learn::filter::recent::RecentDecisions;
use crate::learn::store::{Store, StoreError};
use crate::record::audit::{self, AuditError, ErasedLines};
use crate::record::pseudonym::Pseudonyms;

/// Whose traces to erase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// One message, by its Message-ID (angle brackets optional).
    MessageId(String),
    /// One person, by the address they sent corrections from.
    Sender(String),
}

impl Subject {
    /// From a request body: `{"message_id": …}` or `{"sender": …}`.
    pub fn from_json(v: &serde_json::Value) -> Option<Subject> {
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::trim).filter(|s| !s.is_empty());
        match (field("message_id"), field("sender")) {
            (Some(id), None) => Some(Subject::MessageId(id.to_string())),
            (None, Some(sender)) => Some(Subject::Sender(sender.to_string())),
            _ => None,
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Subject::MessageId(id) => serde_json::json!({ "message_id": id }),
            Subject::Sender(s) => serde_json::json!({ "sender": s }),
        }
    }
}

/// Where the traces may be: whatever this process can reach.
pub struct Places<'a> {
    pub pseudonyms: &'a Pseudonyms,
    pub store: Option<&'a Store>,
    pub recent: Option<&'a RecentDecisions>,
    /// The audit file (its rotated siblings are found beside it).
    pub audit: Option<&'a Path>,
}

/// What was erased, place by place.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Erased {
    /// Corrections deleted from the store (`None`: no store configured).
    pub corrections: Option<u64>,
    /// Whether the recent-decisions window held the message (`None`: not reachable or not kept).
    pub recent_decision: Option<bool>,
    /// Audit lines removed, per file (`None`: no audit trail configured).
    pub audit: Option<Vec<ErasedLines>>,
    /// What could not hold this subject, in words.
    pub notes: Vec<String>,
}

#[derive(Debug, Error)]
pub enum ForgetError {
    #[error("erasing from the feedback store: {0}")]
    Store(#[from] StoreError),
    #[error("erasing from the audit trail: {0}")]
    Audit(#[from] AuditError),
}

impl ForgetError {
    /// Whether trying again later may succeed (the store was down).
    pub fn is_retryable(&self) -> bool {
        matches!(self, ForgetError::Store(e) if e.is_retryable())
    }
}

/// Erases every trace of `subject` from `places`. The store goes first: if
/// it is down nothing else is touched, so a retry does the whole erasure.
pub fn erase(subject: &Subject, places: &Places<'_>) -> Result<Erased, ForgetError> {
    let mut erased = Erased::default();
    match subject {
        Subject::MessageId(id) => {
            let hash = places.pseudonyms.message_id(id);
            erased.corrections = places.store.map(|s| s.forget_message(&hash)).transpose()?;
            erased.recent_decision = places.recent.map(|r| r.forget(&hash)).transpose()?;
            erased.audit = places.audit.map(|path| audit::erase(path, &hash)).transpose()?;
            // The other instances' audit trails and memories: each applies it on notice.
            if let Some(store) = places.store.filter(|s| s.is_shared()) {
                store.announce_erasure(&hash)?;
                erased.notes.push(
                    "every instance sharing the store erases its own audit lines and memory of it (now, or when it \
                     starts again)"
                        .into(),
                );
            }
        }
        Subject::Sender(address) => {
            if places.pseudonyms.is_keyed() {
                let actor = places.pseudonyms.actor(address);
                erased.corrections = places.store.map(|s| s.forget_actor(&actor)).transpose()?;
            } else if places.store.is_some() {
                erased.notes.push(
                    "without an audit key the store records only a sender's domain: no correction names this \
                     sender"
                        .into(),
                );
            }
            erased.notes.push(
                "audit lines and recent decisions never hold a sender's address (domains only): nothing to erase \
                 there"
                    .into(),
            );
        }
    }
    if places.store.is_none() {
        erased.notes.push("no feedback store is configured".into());
    }
    Ok(erased)
}

/// `POST /forget` over the running daemon: its store, its recent window and
/// this host's audit trail.
pub fn endpoint(shared: Running) -> Handler {
    std::sync::Arc::new(move |v: serde_json::Value| {
        let subject =
            Subject::from_json(&v).ok_or((400, "give exactly one of `message_id` and `sender`".to_string()))?;
        let layer = shared.current();
        let link = layer.link().ok_or((503, "the feedback store is not open (see the daemon's log)".to_string()))?;
        let audit = layer.triage().audit();
        let places = Places {
            pseudonyms: layer.pseudonyms(),
            store: Some(&link.store),
            recent: Some(&link.recent),
            audit: audit.map(|a| a.path()),
        };
        let erased = erase(&subject, &places).map_err(|e| (if e.is_retryable() { 503 } else { 500 }, e.to_string()))?;
        tracing::info!(
            corrections = erased.corrections.unwrap_or(0),
            recent = erased.recent_decision.unwrap_or(false),
            audit_lines = erased.audit.iter().flatten().map(|f| f.lines).sum::<usize>(),
            "erased on request"
        );
        Ok(serde_json::to_value(&erased).expect("serialisable"))
    })
}

/// Applies the erasures other instances announced (PostgreSQL) to what
/// only this daemon holds: its audit trail and its recent decisions in
/// memory. The id of the last one applied is kept beside the audit file
/// (`<audit path>.erasures`), so a daemon that was down catches up when it
/// starts; without an audit trail there is only memory, empty at start.
pub struct ErasureFollower {
    cursor_file: Option<std::path::PathBuf>,
    last: Option<i64>,
}

impl ErasureFollower {
    pub fn new(audit: Option<&Path>) -> Self {
        let cursor_file = audit.map(|p| std::path::PathBuf::from(format!("{}.erasures", p.display())));
        let last = cursor_file
            .as_ref()
            .map(|f| std::fs::read_to_string(f).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0));
        ErasureFollower { cursor_file, last }
    }

    /// Applies what is new; how many erasures that was.
    pub fn apply(
        &mut self,
        store: &Store,
        recent: Option<&RecentDecisions>,
        audit: Option<&Path>,
    ) -> Result<usize, ForgetError> {
        let last = match self.last {
            Some(l) => l,
            // Memory only: nothing decided before this start can be in it.
            None => *self.last.insert(store.last_erasure()?),
        };
        let new = store.erasures_after(last)?;
        let Some(&(newest, _)) = new.last() else { return Ok(0) };
        let hashes: Vec<&str> = new.iter().map(|(_, h)| h.as_str()).collect();
        if let Some(r) = recent {
            for h in &hashes {
                r.remove(h);
            }
        }
        let lines = match audit {
            Some(path) => audit::erase_each(path, &hashes)?.iter().map(|f| f.lines).sum(),
            None => 0,
        };
        self.last = Some(newest);
        if let Some(f) = &self.cursor_file {
            let tmp = f.with_extension("erasures.tmp");
            if let Err(e) = std::fs::write(&tmp, format!("{newest}\n"))
                .and_then(|()| crate::access::inherit_owner(&tmp))
                .and_then(|()| std::fs::rename(&tmp, f))
            {
                tracing::warn!(file = %f.display(), error = %e, "cannot keep the erasure cursor (they will be applied again, harmlessly)");
            }
        }
        tracing::info!(erasures = new.len(), audit_lines = lines, "applied erasures announced through the store");
        Ok(new.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_come_from_exactly_one_field() {
        let id = Subject::from_json(&serde_json::json!({ "message_id": " <a@b> " }));
        assert_eq!(id, Some(Subject::MessageId("<a@b>".into())));
        assert_eq!(Subject::from_json(&Subject::Sender("x@y".into()).to_json()), Some(Subject::Sender("x@y".into())));
        assert_eq!(Subject::from_json(&serde_json::json!({ "message_id": "a", "sender": "b" })), None);
        assert_eq!(Subject::from_json(&serde_json::json!({ "message_id": "" })), None);
    }
}
