//! Sparse lexical features: hashed word 1–3-grams and character 3–5-grams,
//! sublinear term frequency, weighted by IDF and L2-normalised per group.
//!
//! They carry what a frozen English encoder misses: the exact vocabulary of a
//! company's mail, product names, and every language the encoder does not
//! know. The hash (FNV-1a, 64-bit) is part of the head file format: changing
//! it would silently break every trained head, so it is fixed here and tested.

use std::borrow::Cow;

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
    /// Longest word n-gram in the word block: 2 (words and pairs) or 3
    /// (and triples). Heads written before triples existed use 2.
    #[serde(default = "pairs")]
    pub word_ngrams: u8,
}

fn pairs() -> u8 {
    2
}

impl Default for LexicalConfig {
    fn default() -> Self {
        // Word trigrams: +0.4–0.5 accuracy on both ticket labels on the dev folds (docs/performance.md).
        Self { bits: 18, word_weight: 1.0, char_weight: 1.0, word_ngrams: 3 }
    }
}

/// Longest word n-grams a head may use.
pub const WORD_NGRAMS: std::ops::RangeInclusive<u8> = 2..=3;

/// Feature-space widths a head or a stored correction may have: 2^30 buckets
/// is already 4 GiB of weights per class.
pub const BITS: std::ops::RangeInclusive<u8> = 1..=30;

impl LexicalConfig {
    pub fn dim(&self) -> usize {
        1usize << self.bits
    }
}

/// A sparse vector: (bucket, value), buckets ascending and unique.
pub type Sparse = Vec<(u32, f32)>;

/// Longest word whose character n-grams are taken (URLs, base64 debris).
const MAX_WORD_CHARS: usize = 40;

/// FNV-1a, 64-bit, fed byte by byte: an n-gram's hash extends its prefix's,
/// so the character n-grams starting at one position share their work.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new(prefix: u8) -> Fnv {
        let mut h = Fnv(0xcbf2_9ce4_8422_2325);
        h.eat(&[prefix]);
        h
    }

    fn eat(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// The hash of an n-gram: the prefix names its kind, parts are joined by a space.
fn fnv1a(prefix: u8, parts: &[&str]) -> u64 {
    let mut h = Fnv::new(prefix);
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h.eat(b" ");
        }
        h.eat(p.as_bytes());
    }
    h.0
}

/// Lower-cased words of a text: runs of alphanumeric characters. A word
/// that is lower case already is borrowed, not copied (most of a body).
pub fn words(text: &str) -> Vec<Cow<'_, str>> {
    text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(lower).collect()
}

fn lower(w: &str) -> Cow<'_, str> {
    let unchanged = if w.is_ascii() {
        !w.bytes().any(|b| b.is_ascii_uppercase())
    } else {
        // `str::to_lowercase` maps character by character, except a capital
        // sigma (which changes anyway), so this is exactly "it would not change".
        w.chars().all(|c| {
            let mut l = c.to_lowercase();
            l.next() == Some(c) && l.next().is_none()
        })
    };
    if unchanged {
        Cow::Borrowed(w)
    } else {
        Cow::Owned(w.to_lowercase())
    }
}

/// Hash prefixes of word 1-, 2- and 3-grams: part of the head format.
const WORD_PREFIX: [u8; 3] = [b'w', b'b', b't'];

/// The readable terms of a text with their buckets: each word n-gram the
/// head uses (hashed exactly as [`TermCounts::of`] does), in text order.
/// Character n-grams are left out: they name no term a person would read.
pub fn word_terms(text: &str, cfg: &LexicalConfig) -> Vec<(String, u32)> {
    let mask = (1u64 << cfg.bits) - 1;
    let ws = words(text);
    let ws: Vec<&str> = ws.iter().map(|w| w.as_ref()).collect();
    let mut out = Vec::with_capacity(3 * ws.len());
    for i in 0..ws.len() {
        for n in 1..=(cfg.word_ngrams as usize).min(ws.len() - i) {
            let gram = &ws[i..i + n];
            out.push((gram.join(" "), (fnv1a(WORD_PREFIX[n - 1], gram) & mask) as u32));
        }
    }
    out
}

/// Hashed term counts of one text, per block, buckets ascending: all the
/// lexical features need, and all the feedback store keeps of a message (a
/// head applies its own IDF at use). Depends only on `bits` and the hash.
/// Word trigrams are a block of their own so that a head using pairs only
/// (one written before trigrams) can leave them out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TermCounts {
    pub bits: u8,
    /// Words and word pairs.
    pub word: Vec<(u32, u32)>,
    pub char: Vec<(u32, u32)>,
    /// Word triples.
    pub trigram: Vec<(u32, u32)>,
}

impl TermCounts {
    pub fn of(text: &str, bits: u8) -> TermCounts {
        let mask = (1u64 << bits) - 1;
        let owned = words(text);
        let ws: Vec<&str> = owned.iter().map(|w| w.as_ref()).collect();
        // Buckets are collected, then sorted and counted: no map, and no
        // string per n-gram (this runs on every message a head decides).
        let (mut wc, mut tc) = (Vec::with_capacity(2 * ws.len()), Vec::with_capacity(ws.len()));
        let mut cc = Vec::with_capacity(12 * ws.len());
        // " word " (space-padded) and the byte offset where each of its characters ends.
        let (mut padded, mut ends) = (String::new(), Vec::<usize>::new());
        for (i, w) in ws.iter().enumerate() {
            for n in 1..=WORD_PREFIX.len().min(ws.len() - i) {
                let bucket = (fnv1a(WORD_PREFIX[n - 1], &ws[i..i + n]) & mask) as u32;
                if n < 3 { &mut wc } else { &mut tc }.push(bucket);
            }
            let cut = w.char_indices().nth(MAX_WORD_CHARS).map_or(w.len(), |(b, _)| b);
            padded.clear();
            padded.push(' ');
            padded.push_str(&w[..cut]);
            padded.push(' ');
            ends.clear();
            ends.extend(padded.char_indices().map(|(b, c)| b + c.len_utf8()));
            // Character 3-, 4- and 5-grams starting at each character, hashed
            // exactly as `fnv1a(b'c', &[gram])`.
            let bytes = padded.as_bytes();
            for first in 0..ends.len().saturating_sub(2) {
                let mut h = Fnv::new(b'c');
                let mut at = if first == 0 { 0 } else { ends[first - 1] };
                for (n, &end) in ends[first..].iter().take(5).enumerate() {
                    h.eat(&bytes[at..end]);
                    at = end;
                    if n >= 2 {
                        cc.push((h.0 & mask) as u32);
                    }
                }
            }
        }
        TermCounts { bits, word: counted(wc, bits), char: counted(cc, bits), trigram: counted(tc, bits) }
    }

    /// The word-block entries a head with this configuration uses.
    fn word_block(&self, cfg: &LexicalConfig) -> Cow<'_, [(u32, u32)]> {
        if cfg.word_ngrams < 3 || self.trigram.is_empty() {
            return Cow::Borrowed(&self.word);
        }
        Cow::Owned(merge_sorted(&self.word, &self.trigram))
    }

    /// Which buckets the text touches for a head with this configuration
    /// (for document frequencies).
    pub fn buckets(&self, cfg: &LexicalConfig) -> Vec<u32> {
        let mut b: Vec<u32> = self.word_block(cfg).iter().chain(&self.char).map(|&(k, _)| k).collect();
        b.sort_unstable();
        b.dedup();
        b
    }

    /// The weighted feature vector: sublinear TF × IDF, each block L2-normalised
    /// and weighted. `idf` has `cfg.dim()` entries.
    pub fn features(&self, cfg: &LexicalConfig, idf: &[f32]) -> Sparse {
        let word = self.word_block(cfg);
        let weighted = |block: &[(u32, u32)], weight: f32| -> Sparse {
            let mut vals: Vec<(u32, f32)> = block
                .iter()
                .map(|&(k, n)| (k, (1.0 + (n as f32).ln()) * idf.get(k as usize).copied().unwrap_or(1.0)))
                .collect();
            // Summed in bucket order, so the result never depends on hashing order.
            let norm = vals.iter().map(|(_, v)| v * v).sum::<f32>().sqrt();
            if norm > 0.0 && weight != 0.0 {
                vals.iter_mut().for_each(|(_, v)| *v = weight * *v / norm);
                vals
            } else {
                Vec::new()
            }
        };
        // Both blocks are sorted by bucket; a bucket in both (a hash
        // collision) becomes one entry, word value first.
        merge_sorted(&weighted(&word, cfg.word_weight), &weighted(&self.char, cfg.char_weight))
    }

    /// Compact little-endian encoding for storage: bits, then each block
    /// (words and pairs, characters, triples) as a count of entries followed
    /// by (bucket u32, count u32) pairs.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(13 + 8 * (self.word.len() + self.char.len() + self.trigram.len()));
        out.push(self.bits);
        for block in [&self.word, &self.char, &self.trigram] {
            out.extend_from_slice(&(block.len() as u32).to_le_bytes());
            for &(k, n) in block {
                out.extend_from_slice(&k.to_le_bytes());
                out.extend_from_slice(&n.to_le_bytes());
            }
        }
        out
    }

    /// Inverse of [`to_bytes`](Self::to_bytes); `None` for bytes it did not
    /// write. Bytes stored before triples existed (two blocks) read with none.
    pub fn from_bytes(bytes: &[u8]) -> Option<TermCounts> {
        let (&bits, mut rest) = bytes.split_first()?;
        if !BITS.contains(&bits) {
            return None;
        }
        fn take_u32(rest: &mut &[u8]) -> Option<u32> {
            let (head, tail) = rest.split_first_chunk::<4>()?;
            *rest = tail;
            Some(u32::from_le_bytes(*head))
        }
        let mut blocks = [Vec::new(), Vec::new(), Vec::new()];
        for (i, block) in blocks.iter_mut().enumerate() {
            if i == 2 && rest.is_empty() {
                break;
            }
            let n = take_u32(&mut rest)? as usize;
            if n > (1usize << bits) {
                return None;
            }
            for _ in 0..n {
                let (k, c) = (take_u32(&mut rest)?, take_u32(&mut rest)?);
                if k >> bits != 0 {
                    return None;
                }
                block.push((k, c));
            }
        }
        let [word, char, trigram] = blocks;
        rest.is_empty().then_some(TermCounts { bits, word, char, trigram })
    }

    /// Approximate heap size, for memory budgets.
    pub fn heap_bytes(&self) -> usize {
        8 * (self.word.capacity() + self.char.capacity() + self.trigram.capacity())
    }
}

/// (bucket, occurrences), buckets ascending. `buckets` are below 2^`bits`.
fn counted(mut buckets: Vec<u32>, bits: u8) -> Vec<(u32, u32)> {
    sort_buckets(&mut buckets, bits);
    let mut out: Vec<(u32, u32)> = Vec::with_capacity(buckets.len());
    for k in buckets {
        match out.last_mut() {
            Some((last, n)) if *last == k => *n += 1,
            _ => out.push((k, 1)),
        }
    }
    out
}

/// Sorts bucket numbers below 2^`bits`: least-significant-digit radix
/// sort, a byte per pass (3 passes for the default 18 bits), where a
/// message's thousands of character n-grams would cost a comparison sort
/// n·log n; short lists take the comparison sort.
fn sort_buckets(v: &mut Vec<u32>, bits: u8) {
    if v.len() < 256 {
        v.sort_unstable();
        return;
    }
    let mut spare = vec![0u32; v.len()];
    for shift in (0..u32::from(bits)).step_by(8) {
        let mut start = [0usize; 257];
        for &x in v.iter() {
            start[((x >> shift) & 0xff) as usize + 1] += 1;
        }
        for d in 1..257 {
            start[d] += start[d - 1];
        }
        for &x in v.iter() {
            let d = ((x >> shift) & 0xff) as usize;
            spare[start[d]] = x;
            start[d] += 1;
        }
        std::mem::swap(v, &mut spare);
    }
}

/// Two lists sorted by bucket, each bucket once, as one such list: a bucket
/// in both gets `a`'s value plus `b`'s (in that order, so float sums are the
/// same as sorting the concatenation stably and summing). Linear: this runs
/// for every head on every message.
fn merge_sorted<T: std::ops::AddAssign + Copy>(a: &[(u32, T)], b: &[(u32, T)]) -> Vec<(u32, T)> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let (ka, kb) = (a[i].0, b[j].0);
        if ka < kb {
            out.push(a[i]);
            i += 1;
        } else if kb < ka {
            out.push(b[j]);
            j += 1;
        } else {
            let mut v = a[i].1;
            v += b[j].1;
            out.push((ka, v));
            i += 1;
            j += 1;
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}

/// Which buckets a text touches (for document frequencies when training).
pub fn buckets(text: &str, cfg: &LexicalConfig) -> Vec<u32> {
    TermCounts::of(text, cfg.bits).buckets(cfg)
}

/// The weighted feature vector of a text. `idf` has `cfg.dim()` entries.
pub fn features(text: &str, cfg: &LexicalConfig, idf: &[f32]) -> Sparse {
    TermCounts::of(text, cfg.bits).features(cfg, idf)
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

    /// The reference for `merge_sorted`: concatenate, sort stably, sum.
    fn merged_by_sorting(a: &[(u32, f32)], b: &[(u32, f32)]) -> Vec<(u32, f32)> {
        let mut v: Vec<(u32, f32)> = a.iter().chain(b).copied().collect();
        v.sort_by_key(|&(k, _)| k);
        v.dedup_by(|later, earlier| {
            if earlier.0 == later.0 {
                earlier.1 += later.1;
                true
            } else {
                false
            }
        });
        v
    }

    #[test]
    fn radix_sort_sorts_every_width() {
        let mut x = 0x9e37_79b9u32;
        for bits in [1u8, 7, 8, 9, 18, 24, 30] {
            for n in [0usize, 1, 255, 256, 5000] {
                let mut v: Vec<u32> = (0..n)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        x & ((1u32 << bits) - 1)
                    })
                    .collect();
                let mut want = v.clone();
                want.sort_unstable();
                sort_buckets(&mut v, bits);
                assert_eq!(v, want, "bits {bits}, n {n}");
            }
        }
    }

    #[test]
    fn merging_sorted_blocks_matches_sorting_their_concatenation() {
        let a = [(1, 0.1f32), (4, 0.3), (9, 0.7), (12, 1e-3)];
        let b = [(0, 0.5f32), (4, 0.2), (10, 0.9), (12, 3.0), (40, 0.25)];
        for (x, y) in [(&a[..], &b[..]), (&b[..], &a[..]), (&a[..], &[][..]), (&[][..], &b[..])] {
            let got = merge_sorted(x, y);
            let want = merged_by_sorting(x, y);
            assert_eq!(got.len(), want.len());
            // Bit for bit: a collision sums in the same order as before.
            assert!(got.iter().zip(&want).all(|(g, w)| g.0 == w.0 && g.1.to_bits() == w.1.to_bits()), "{got:?}");
        }
        let words = TermCounts::of("the cat sat on the mat; the cat sat", 18);
        let cfg = LexicalConfig::default();
        let idf = vec![1.0; cfg.dim()];
        let f = words.features(&cfg, &idf);
        assert!(f.windows(2).all(|w| w[0].0 < w[1].0), "sorted, each bucket once");
    }

    #[test]
    fn hash_is_frozen() {
        // Trained heads depend on these exact values (computed independently in Python).
        assert_eq!(fnv1a(b'w', &["invoice"]), 0xeba0_64cd_10d6_19fd);
        assert_eq!(fnv1a(b'b', &["a", "b"]), 0x9962_d69b_a965_2812);
        assert_eq!(fnv1a(b't', &["a", "b", "c"]), 0x4f05_83d6_07e4_a7c9);
        assert_eq!(fnv1a(b'c', &[" in"]), 0xd6f8_6f92_1d79_b6b9);
        assert_eq!(fnv1a(b'x', &[]), 0xaf63_f54c_8602_1707);
    }

    /// The counting as first written (a string per n-gram, a map per block):
    /// the reference the allocation-free [`TermCounts::of`] must match bucket
    /// for bucket, since trained heads and stored corrections depend on it.
    fn reference_counts(text: &str, bits: u8) -> TermCounts {
        use std::collections::HashMap;
        let mask = (1u64 << bits) - 1;
        let ws: Vec<String> =
            text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(|w| w.to_lowercase()).collect();
        let ws: Vec<&str> = ws.iter().map(String::as_str).collect();
        let (mut wc, mut cc, mut tc) = (HashMap::<u32, u32>::new(), HashMap::<u32, u32>::new(), HashMap::new());
        for (i, w) in ws.iter().enumerate() {
            for n in 1..=3.min(ws.len() - i) {
                let bucket = (fnv1a(WORD_PREFIX[n - 1], &ws[i..i + n]) & mask) as u32;
                *if n < 3 { &mut wc } else { &mut tc }.entry(bucket).or_insert(0) += 1;
            }
            let chars: Vec<char> = std::iter::once(' ').chain(w.chars().take(MAX_WORD_CHARS)).chain([' ']).collect();
            for n in 3..=5 {
                for win in chars.windows(n) {
                    let g: String = win.iter().collect();
                    *cc.entry((fnv1a(b'c', &[&g]) & mask) as u32).or_insert(0) += 1;
                }
            }
        }
        let sorted = |m: HashMap<u32, u32>| {
            let mut v: Vec<(u32, u32)> = m.into_iter().collect();
            v.sort_unstable();
            v
        };
        TermCounts { bits, word: sorted(wc), char: sorted(cc), trigram: sorted(tc) }
    }

    #[test]
    fn counts_match_the_reference_on_every_kind_of_text() {
        let long = "x".repeat(39) + "é" + "yz" + &"q".repeat(50);
        let texts = [
            "",
            "a",
            "Hi",
            "Invoice OVERDUE, invoice! Rechnung überfällig: Straße ÄÖÜ",
            "ΟΔΥΣΣΕΥΣ Σ σ ς — Ǆemal ǅ İstanbul ß ﬁle",
            "日本語のテキスト 中文 한국어 emoji 🎉 mixed123 4711",
            &long,
            "tab\tseparated\nlines and   spaces-hyphen_under",
        ];
        for bits in [6, 18] {
            for t in texts {
                assert_eq!(TermCounts::of(t, bits), reference_counts(t, bits), "{t:?} at {bits} bits");
            }
        }
        let data = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        assert_eq!(TermCounts::of(&data, 18), reference_counts(&data, 18));
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

    #[test]
    fn term_counts_round_trip_and_reject_foreign_bytes() {
        let t = TermCounts::of("Invoice overdue: the invoice is overdue", 12);
        assert_eq!(t.word.iter().find(|(k, _)| *k == (fnv1a(b'w', &["invoice"]) & 0xfff) as u32).unwrap().1, 2);
        assert_eq!(TermCounts::from_bytes(&t.to_bytes()), Some(t.clone()));
        let mut bytes = t.to_bytes();
        bytes.pop();
        assert_eq!(TermCounts::from_bytes(&bytes), None);
        assert_eq!(TermCounts::from_bytes(b"not features"), None);
        assert_eq!(TermCounts::from_bytes(&[]), None);
    }

    #[test]
    fn triples_count_only_for_heads_that_use_them() {
        let text = "please reset my password please reset it";
        let t = TermCounts::of(text, 16);
        assert_eq!(t.trigram.len(), 5, "seven words, five triples");
        let idf = vec![1.0; 1 << 16];
        let pairs = LexicalConfig { bits: 16, word_ngrams: 2, ..Default::default() };
        let triples = LexicalConfig { bits: 16, word_ngrams: 3, ..Default::default() };
        let prp = (fnv1a(b't', &["please", "reset", "my"]) & 0xffff) as u32;
        assert!(!t.buckets(&pairs).contains(&prp));
        assert!(t.buckets(&triples).contains(&prp));
        assert!(t.features(&pairs, &idf).iter().all(|&(k, _)| k != prp || t.word.iter().any(|w| w.0 == k)));
        assert!(t.features(&triples, &idf).iter().any(|&(k, _)| k == prp));
        // Explanations name the triples a head uses, with the same buckets.
        assert!(word_terms(text, &triples).contains(&("please reset my".to_string(), prp)));
        assert!(word_terms(text, &pairs).iter().all(|(term, _)| term.split(' ').count() <= 2));
    }

    #[test]
    fn stored_counts_from_before_triples_still_read() {
        let t = TermCounts::of("the invoice is overdue", 12);
        let old = TermCounts { trigram: Vec::new(), ..t.clone() };
        let bytes = old.to_bytes();
        // The old format ended after the character block.
        let two_blocks = &bytes[..bytes.len() - 4];
        assert_eq!(TermCounts::from_bytes(two_blocks), Some(old));
        assert_eq!(TermCounts::from_bytes(&t.to_bytes()), Some(t));
    }

    #[test]
    fn heads_without_the_setting_read_as_pairs() {
        let old: LexicalConfig = serde_json::from_str(r#"{"bits":18,"word_weight":1.0,"char_weight":1.0}"#).unwrap();
        assert_eq!(old.word_ngrams, 2);
        assert_eq!(LexicalConfig::default().word_ngrams, 3);
    }
}
