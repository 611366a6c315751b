//! What a decision leaves behind: the [`audit`] trail (no content), the
//! Prometheus [`metrics`] (names; the [`recorder`] of decisions and
//! corrections), the [`pseudonym`]s that stand for Message-IDs and
//! senders, and [`redact`] for the error text that must be logged.

pub mod audit;
pub mod metrics;
pub mod pseudonym;
pub(crate) mod recorder;
pub mod redact;
