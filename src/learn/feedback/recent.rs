//! Features of recently decided messages, by Message-ID, so a correction
//! that names only the Message-ID (a helpdesk webhook, the CLI) can be
//! learned from. In memory only, bounded in bytes, oldest dropped first:
//! at 5 M messages a day this is a window of minutes to hours, which is
//! why the mail and pipe channels, which carry the message, come first.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use super::MessageFeatures;

type Key = [u8; 16];

/// The window of recent decisions.
pub struct RecentDecisions {
    max_bytes: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    bytes: usize,
    order: VecDeque<Key>,
    entries: HashMap<Key, MessageFeatures>,
}

fn key(message_id: &str) -> Key {
    let id = message_id.trim().trim_matches(['<', '>']).to_lowercase();
    let d = Sha256::digest(id.as_bytes());
    d[..16].try_into().expect("16 bytes")
}

fn size(f: &MessageFeatures) -> usize {
    96 + f.terms.heap_bytes() + f.embedding.as_ref().map_or(0, |(id, e)| id.len() + 4 * e.len())
}

impl RecentDecisions {
    pub fn new(max_bytes: usize) -> Self {
        RecentDecisions { max_bytes, inner: Mutex::new(Inner::default()) }
    }

    /// Remembers a decided message's features (a re-sent Message-ID replaces the old).
    pub fn insert(&self, message_id: &str, features: MessageFeatures) {
        let k = key(message_id);
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

    pub fn get(&self, message_id: &str) -> Option<MessageFeatures> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).entries.get(&key(message_id)).cloned()
    }

    /// Forgets a message's features (erasure on request); whether they were here.
    pub fn remove(&self, message_id: &str) -> bool {
        let k = key(message_id);
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
        r.insert("<A@x.example>", f("invoice overdue"));
        r.insert("b@x.example", f("invoice overdue"));
        assert!(r.get("a@X.example").is_some(), "brackets and case do not matter");
        r.insert("c@x.example", f("invoice overdue"));
        assert!(r.get("a@x.example").is_none(), "the oldest went");
        assert!(r.get("b@x.example").is_some() && r.get("c@x.example").is_some());
        r.insert("c@x.example", f("invoice overdue"));
        assert_eq!(r.len(), 2);
        assert!(r.remove("<C@x.example>") && !r.remove("c@x.example"));
        assert!(r.get("c@x.example").is_none() && r.len() == 1);
    }
}
