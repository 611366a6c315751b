//! What a decision leaves behind: the [`audit`] trail (no content), the
//! Prometheus [`metrics`] (names; the [`recorder`] of decisions and
//! corrections) and the [`pseudonym`]s that stand for Message-IDs and
//! senders. Masking what must be logged is [`crate::redact`], at the
//! ground, since settings and the store need it too.

pub mod audit;
pub mod metrics;
pub mod pseudonym;
pub(crate) mod recorder;

/// This host's name (the pod's, under Kubernetes): which instance wrote an
/// audit line, which one holds a lock. `localhost` if it cannot be read.
pub fn host_name() -> String {
    crate::access::host_name().unwrap_or_else(|| "localhost".into())
}
