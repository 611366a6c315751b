//! What every front door shares: the [`Filter`] it hands messages to, the
//! timed decision ([`decide`]) that turns the filter's answer, an error or a
//! timeout into one [`Verdict`](decide::Verdict) (counted and logged once),
//! the listeners ([`net`]) and the memory bound over all buffered messages
//! ([`budget`]).
//!
//! A front door knows nothing of rules or models: it turns its protocol into
//! a [`MessageInput`] and a verdict back into its protocol.

pub mod budget;
pub mod decide;
pub mod net;

use std::future::Future;
use std::sync::{Arc, RwLock};

use thiserror::Error;

use crate::act::Plan;
use crate::message::envelope::Envelope;

/// One message as a front door collected it.
#[derive(Debug, Clone, Default)]
pub struct MessageInput {
    pub envelope: Envelope,
    /// Header block and body, possibly cut at `limits.max_message_bytes`.
    pub raw: Vec<u8>,
    /// Names of the inbound `X-Triage-*` headers, in order, for anti-spoofing
    /// removal (other names may be included; they are ignored).
    pub header_names: Vec<String>,
}

/// Why no plan could be made. The front door then applies `on_error`.
#[derive(Debug, Error)]
pub enum FilterError {
    /// The inference queue was full.
    #[error("overloaded: {0}")]
    Overload(String),
    /// A deadline inside the decision passed.
    #[error("timed out: {0}")]
    Timeout(String),
    /// Anything else (a failed task, a model error).
    #[error("{0}")]
    Failed(String),
    /// The message cannot be handled now and must not be delivered as it is
    /// (a correction mail while the feedback store is down): the client is
    /// asked to retry whatever `on_error` says.
    #[error("retry later: {0}")]
    Retry(String),
}

impl FilterError {
    /// A short, content-free label: the `reason` of
    /// `mailtriage_decisions_failed_total` and of the audit line.
    pub fn reason(&self) -> &'static str {
        match self {
            FilterError::Overload(_) => "overload",
            FilterError::Timeout(_) => "timeout",
            FilterError::Failed(_) => "error",
            FilterError::Retry(_) => "retry",
        }
    }
}

/// What a front door calls to decide a message.
pub trait Filter: Send + Sync + 'static {
    fn filter(&self, msg: MessageInput) -> impl Future<Output = Result<Plan, FilterError>> + Send;
}

/// A value the daemon may replace while the front doors run (the decision
/// engine on reload, the session settings). Readers take the current one
/// and keep it for as long as they need it: a message in flight finishes on
/// the set it started with.
#[derive(Debug)]
pub struct Live<T>(Arc<RwLock<Arc<T>>>);

impl<T> Clone for Live<T> {
    fn clone(&self) -> Self {
        Live(self.0.clone())
    }
}

impl<T> Live<T> {
    pub fn new(value: T) -> Self {
        Live(Arc::new(RwLock::new(Arc::new(value))))
    }

    pub fn current(&self) -> Arc<T> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn replace(&self, value: T) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(value);
    }
}

/// A replaceable filter decides each message with the one current when the
/// message arrived.
impl<F: Send + Sync + 'static> Filter for Live<F>
where
    Arc<F>: Filter,
{
    async fn filter(&self, msg: MessageInput) -> Result<Plan, FilterError> {
        self.current().filter(msg).await
    }
}
