//! Why a correction was not recorded, in the words every channel answers
//! with (HTTP status, CLI exit, the feedback mail's log line).

use thiserror::Error;

use crate::learn::store::StoreError;

#[derive(Debug, Error)]
pub enum FeedbackError {
    #[error("unknown department `{0}` (known: {1})")]
    UnknownDepartment(String, String),
    #[error("unknown priority `{0}` (known: {1})")]
    UnknownPriority(String, String),
    #[error("a correction needs a department or a priority")]
    NoLabel,
    #[error("no recent decision for that Message-ID (it is older than the recent-decisions window, or was decided by a rule)")]
    NotRecent,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("feedback is not configured: add a [feedback] section with `store`")]
    NotConfigured,
}

impl FeedbackError {
    /// The `reason` label of `mailtriage_feedback_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            FeedbackError::UnknownDepartment(..) => "unknown_department",
            FeedbackError::UnknownPriority(..) => "unknown_priority",
            FeedbackError::NoLabel => "no_label",
            FeedbackError::NotRecent => "not_recent",
            FeedbackError::Store(_) => "store_unavailable",
            FeedbackError::NotConfigured => "not_configured",
        }
    }
}
