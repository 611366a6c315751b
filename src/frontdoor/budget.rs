//! One memory bound shared by every connection.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A global bound on buffered message bytes across all connections and front
/// doors. What a front door does when it is spent is its own choice: the
/// milter decides on what it already holds (as if truncated) and lets the
/// mail through; the SMTP filter, which must hold the whole message to relay
/// it, answers 452 so the client retries later.
#[derive(Debug)]
pub struct ByteBudget {
    left: AtomicUsize,
}

impl ByteBudget {
    pub fn new(bytes: usize) -> Arc<Self> {
        Arc::new(ByteBudget { left: AtomicUsize::new(bytes) })
    }

    /// Takes up to `want` bytes; returns how many were granted.
    pub fn take(&self, want: usize) -> usize {
        let mut granted = 0;
        let _ = self.left.fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
            granted = want.min(left);
            Some(left - granted)
        });
        granted
    }

    pub fn give_back(&self, bytes: usize) {
        self.left.fetch_add(bytes, Ordering::AcqRel);
    }

    pub fn available(&self) -> usize {
        self.left.load(Ordering::Acquire)
    }
}

/// The bytes one message holds from the budget, all given back when it is
/// dropped (the message ended, was aborted, or its connection died).
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<ByteBudget>,
    bytes: usize,
}

impl Reservation {
    pub fn new(budget: Arc<ByteBudget>) -> Self {
        Reservation { budget, bytes: 0 }
    }

    /// Takes up to `want` more bytes; returns how many were granted.
    pub fn take(&mut self, want: usize) -> usize {
        let granted = self.budget.take(want);
        self.bytes += granted;
        granted
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}
