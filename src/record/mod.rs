//! What a decision leaves behind: the [`audit`] trail (no content), the
//! Prometheus [`metrics`] (names; the [`recorder`] of decisions and
//! corrections), the [`pseudonym`]s that stand for Message-IDs and
//! senders, and [`redact`] for the error text that must be logged.

pub mod audit;
pub mod metrics;
pub mod pseudonym;
pub(crate) mod recorder;
pub mod redact;

/// This host's name (the pod's, under Kubernetes): which instance wrote an
/// audit line, which one holds a lock. `localhost` if it cannot be read.
pub fn host_name() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name = name.trim();
    if name.is_empty() {
        "localhost".into()
    } else {
        name.to_string()
    }
}
