//! Sparse lexical features: hashed word 1–2-grams and character 3–5-grams,
//! sublinear term frequency, weighted by IDF and L2-normalised per group.
//!
//! They carry what a frozen English encoder misses: the exact vocabulary of a
//! company's mail, product names, and every language the encoder does not
//! know. The hash (FNV-1a, 64-bit) is part of the head file format: changing
//! it would silently break every trained head, so it is fixed here and tested.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// How features are made; stored in each head so inference matches training.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LexicalConfig {
    /// Feature space is 2^bits buckets.
    pub bits: u8,
    /// Weight of the word n-gram block (after its own L2 normalisation).
    pub word_weight: f32,
    /// Weight of the character n-gram block.
    pub char_weight: f32,
}

impl Default for LexicalConfig {
    fn default() -> Self {
        Self { bits: 18, word_weight: 1.0, char_weight: 1.0 }
    }
}

impl LexicalConfig {
    pub fn dim(&self) -> usize {
        1usize << self.bits
    }
}

/// A sparse vector: (bucket, value), buckets ascending and unique.
pub type Sparse = Vec<(u32, f32)>;

/// Longest word whose character n-grams are taken (URLs, base64 debris).
const MAX_WORD_CHARS: usize = 40;

fn fnv1a(prefix: u8, parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    eat(prefix);
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            eat(b' ');
        }
        p.bytes().for_each(&mut eat);
    }
    h
}

/// Lower-cased words of a text: runs of alphanumeric characters.
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(|w| w.to_lowercase()).collect()
}

/// Raw counts per bucket for the word block and the character block.
fn counts(text: &str, mask: u64) -> (HashMap<u32, f32>, HashMap<u32, f32>) {
    let ws = words(text);
    let (mut wc, mut cc) = (HashMap::new(), HashMap::new());
    for (i, w) in ws.iter().enumerate() {
        *wc.entry((fnv1a(b'w', &[w]) & mask) as u32).or_insert(0.0) += 1.0;
        if i + 1 < ws.len() {
            *wc.entry((fnv1a(b'b', &[w, &ws[i + 1]]) & mask) as u32).or_insert(0.0) += 1.0;
        }
        let chars: Vec<char> = std::iter::once(' ').chain(w.chars().take(MAX_WORD_CHARS)).chain([' ']).collect();
        for n in 3..=5 {
            for win in chars.windows(n) {
                let g: String = win.iter().collect();
                *cc.entry((fnv1a(b'c', &[&g]) & mask) as u32).or_insert(0.0) += 1.0;
            }
        }
    }
    (wc, cc)
}

/// Which buckets a text touches (for document frequencies when training).
pub fn buckets(text: &str, cfg: &LexicalConfig) -> Vec<u32> {
    let (w, c) = counts(text, (cfg.dim() - 1) as u64);
    let mut b: Vec<u32> = w.into_keys().chain(c.into_keys()).collect();
    b.sort_unstable();
    b.dedup();
    b
}

/// The weighted feature vector of a text. `idf` has `cfg.dim()` entries.
pub fn features(text: &str, cfg: &LexicalConfig, idf: &[f32]) -> Sparse {
    let (w, c) = counts(text, (cfg.dim() - 1) as u64);
    let mut out: HashMap<u32, f32> = HashMap::with_capacity(w.len() + c.len());
    for (block, weight) in [(w, cfg.word_weight), (c, cfg.char_weight)] {
        let mut vals: Vec<(u32, f32)> =
            block.into_iter().map(|(k, n)| (k, (1.0 + n.ln()) * idf.get(k as usize).copied().unwrap_or(1.0))).collect();
        // Sum in bucket order: HashMap order varies per process, float sums must not.
        vals.sort_unstable_by_key(|(k, _)| *k);
        let norm = vals.iter().map(|(_, v)| v * v).sum::<f32>().sqrt();
        if norm > 0.0 {
            for (k, v) in vals {
                *out.entry(k).or_insert(0.0) += weight * v / norm;
            }
        }
    }
    let mut v: Sparse = out.into_iter().collect();
    v.sort_unstable_by_key(|(k, _)| *k);
    v
}

/// Smoothed inverse document frequency from per-document bucket lists.
pub fn idf(docs: &[Vec<u32>], dim: usize) -> Vec<f32> {
    let mut df = vec![0u32; dim];
    for d in docs {
        for &b in d {
            df[b as usize] += 1;
        }
    }
    let n = docs.len() as f32;
    df.into_iter().map(|d| ((1.0 + n) / (1.0 + d as f32)).ln() + 1.0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_frozen() {
        // Trained heads depend on these exact values (computed independently in Python).
        assert_eq!(fnv1a(b'w', &["invoice"]), 0xeba0_64cd_10d6_19fd);
        assert_eq!(fnv1a(b'b', &["a", "b"]), 0x9962_d69b_a965_2812);
        assert_eq!(fnv1a(b'c', &[" in"]), 0xd6f8_6f92_1d79_b6b9);
        assert_eq!(fnv1a(b'x', &[]), 0xaf63_f54c_8602_1707);
    }

    #[test]
    fn features_are_sorted_normalised_and_case_insensitive() {
        let cfg = LexicalConfig { bits: 16, ..Default::default() };
        let idf = vec![1.0; cfg.dim()];
        let a = features("Invoice OVERDUE, invoice!", &cfg, &idf);
        let b = features("invoice overdue invoice", &cfg, &idf);
        assert_eq!(a, b);
        assert!(a.windows(2).all(|w| w[0].0 < w[1].0));
        // two blocks, each of unit norm: total squared norm ≈ 2 (less any collisions adding up)
        let sq: f32 = a.iter().map(|(_, v)| v * v).sum();
        assert!((sq - 2.0).abs() < 0.05, "{sq}");
        assert!(features("", &cfg, &idf).is_empty());
    }

    #[test]
    fn idf_downweights_common_buckets() {
        let cfg = LexicalConfig { bits: 12, ..Default::default() };
        let docs: Vec<Vec<u32>> =
            ["the invoice", "the outage", "the printer"].iter().map(|t| buckets(t, &cfg)).collect();
        let idf = idf(&docs, cfg.dim());
        let the = (fnv1a(b'w', &["the"]) & 0xfff) as usize;
        let inv = (fnv1a(b'w', &["invoice"]) & 0xfff) as usize;
        assert!(idf[the] < idf[inv]);
    }
}
