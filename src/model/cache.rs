//! A bounded cache of embeddings keyed by a hash of the normalised text, so
//! that identical mail (a newsletter to many recipients, bulk notices) goes
//! through the encoder once.
//!
//! Two generations: lookups search both; inserts go to the young one, and
//! when it is full the old one is dropped and the young one becomes old. A
//! hit in the old generation is moved to the young one. Memory stays under
//! `capacity` entries with O(1) work per operation and no per-entry list.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

type Key = [u8; 16];

pub struct EmbeddingCache {
    capacity: usize,
    inner: Mutex<Generations>,
}

#[derive(Default)]
struct Generations {
    young: HashMap<Key, Arc<[f32]>>,
    old: HashMap<Key, Arc<[f32]>>,
}

impl EmbeddingCache {
    /// `capacity` 0 disables the cache.
    pub fn new(capacity: usize) -> Self {
        EmbeddingCache { capacity, inner: Mutex::new(Generations::default()) }
    }

    /// Case and whitespace do not change what a message says.
    pub fn key(text: &str) -> Key {
        let mut h = Sha256::new();
        for word in text.split_whitespace() {
            for c in word.chars().flat_map(char::to_lowercase) {
                let mut buf = [0u8; 4];
                h.update(c.encode_utf8(&mut buf).as_bytes());
            }
            h.update(b" ");
        }
        let digest = h.finalize();
        let mut k = [0u8; 16];
        k.copy_from_slice(&digest[..16]);
        k
    }

    pub fn get(&self, key: &Key) -> Option<Arc<[f32]>> {
        if self.capacity == 0 {
            return None;
        }
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = g.young.get(key) {
            return Some(v.clone());
        }
        let v = g.old.remove(key)?;
        g.insert(*key, v.clone(), self.capacity);
        Some(v)
    }

    pub fn insert(&self, key: Key, value: Arc<[f32]>) {
        if self.capacity > 0 {
            self.inner.lock().unwrap_or_else(|p| p.into_inner()).insert(key, value, self.capacity);
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.young.len() + g.old.len()
    }
}

impl Generations {
    fn insert(&mut self, key: Key, value: Arc<[f32]>, capacity: usize) {
        if self.young.len() >= capacity.div_ceil(2) {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(key, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalised_text_hits_and_the_size_stays_bounded() {
        let c = EmbeddingCache::new(4);
        let k = EmbeddingCache::key("Weekly  Newsletter\n\nHello");
        assert_eq!(k, EmbeddingCache::key("weekly newsletter hello"));
        assert_ne!(k, EmbeddingCache::key("weekly newsletter, hello"));
        c.insert(k, Arc::from(vec![1.0f32]));
        assert_eq!(c.get(&k).as_deref(), Some(&[1.0f32][..]));
        for i in 0..100 {
            c.insert(EmbeddingCache::key(&i.to_string()), Arc::from(vec![i as f32]));
            // A recently used entry survives the churn.
            assert!(c.get(&k).is_some(), "evicted at {i}");
            assert!(c.len() <= 4);
        }
        assert!(EmbeddingCache::new(0).get(&k).is_none());
    }
}
