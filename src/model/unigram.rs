//! A compact Unigram (SentencePiece) model for the `tokenizers` pipeline.
//!
//! The `tokenizers` crate's `Unigram` finds the pieces that start at a
//! position with a byte trie that has a hash map in every node: for XLM-R's
//! 250,002 pieces (multilingual-e5-small) that is about 300 MB resident, more
//! than the model's int8 weights. Here the pieces live in one string, sorted
//! once, and the prefix search narrows a range of that sorted list byte by
//! byte (two binary searches per byte): about 9 MB for the same vocabulary.
//! The first two bytes are looked up in a table instead (half a MB): those
//! searches ran over the largest ranges, a cache miss per step, and took 6 %
//! of the daemon's CPU with e5 under load.
//!
//! The segmentation is the crate's own (its `encode_optimized`, after
//! SentencePiece): a Viterbi pass that keeps, for each end position, the best
//! total score, the earlier start winning ties; a character no piece covers is
//! an unknown token scored `min_score − 10`, and runs of unknowns are fused
//! into one. `tests/model.rs` checks that both give identical ids on
//! thousands of real messages in five languages.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tokenizers::models::unigram::UnigramTrainer;
use tokenizers::{Model, Result, Token};

/// What the crate adds below the lowest piece score for an unknown character.
const UNK_PENALTY: f64 = 10.0;

pub struct CompactUnigram {
    /// Every piece, concatenated in id order.
    arena: String,
    /// Id → byte range of its piece in `arena`.
    spans: Vec<(u32, u32)>,
    scores: Vec<f64>,
    /// Ids ordered by their pieces' bytes (for the prefix search).
    sorted: Vec<u32>,
    /// The range of `sorted` whose pieces start with byte `b`.
    by_first: Vec<(u32, u32)>,
    /// The range of `sorted` whose pieces start with bytes `b0 b1`, at `b0 << 8 | b1`.
    by_two: Vec<(u32, u32)>,
    unk_id: Option<u32>,
    min_score: f64,
}

impl CompactUnigram {
    /// From a tokenizer.json's `model` object: `vocab` as `[[piece, score], …]`
    /// and `unk_id`. `None` when the model is not a plain Unigram this type
    /// reproduces (byte fallback, a piece listed twice, or not a Unigram at all).
    pub fn from_json(model: &serde_json::Value) -> Option<std::result::Result<CompactUnigram, String>> {
        if model.get("type")?.as_str()? != "Unigram"
            || model.get("byte_fallback").and_then(|v| v.as_bool()) == Some(true)
        {
            return None;
        }
        match Self::build(model) {
            // The crate resolves a repeated piece through its hash map; the
            // prefix search here assumes unique pieces.
            Ok(me) if me.sorted.windows(2).any(|w| me.piece(w[0]) == me.piece(w[1])) => None,
            other => Some(other),
        }
    }

    fn build(model: &serde_json::Value) -> std::result::Result<CompactUnigram, String> {
        let vocab = model["vocab"].as_array().ok_or("the Unigram model has no `vocab` list")?;
        let mut arena = String::new();
        let (mut spans, mut scores) = (Vec::with_capacity(vocab.len()), Vec::with_capacity(vocab.len()));
        for (i, entry) in vocab.iter().enumerate() {
            let (Some(piece), Some(score)) = (entry[0].as_str(), entry[1].as_f64()) else {
                return Err(format!("vocab entry {i} is not [piece, score]"));
            };
            spans.push((arena.len() as u32, piece.len() as u32));
            arena.push_str(piece);
            scores.push(score);
        }
        if spans.is_empty() {
            return Err("the Unigram vocabulary is empty".into());
        }
        let unk_id = match &model["unk_id"] {
            serde_json::Value::Null => None,
            v => {
                Some(v.as_u64().filter(|&u| (u as usize) < spans.len()).ok_or("unk_id is outside the vocabulary")?
                    as u32)
            }
        };
        let min_score = scores.iter().copied().fold(f64::INFINITY, f64::min);
        let mut me = CompactUnigram {
            arena,
            spans,
            scores,
            sorted: Vec::new(),
            by_first: vec![(0, 0); 256],
            by_two: vec![(0, 0); 1 << 16],
            unk_id,
            min_score,
        };
        let mut sorted: Vec<u32> = (0..me.spans.len() as u32).collect();
        sorted.sort_by(|&a, &b| me.piece(a).as_bytes().cmp(me.piece(b).as_bytes()));
        // Sorted, the pieces sharing a first byte (or two) are one run.
        let extend = |range: &mut (u32, u32), at: u32| {
            if range.1 == range.0 {
                *range = (at, at + 1);
            } else {
                range.1 = at + 1;
            }
        };
        for (at, &id) in sorted.iter().enumerate() {
            let p = me.piece(id).as_bytes();
            let (first, two) = (p.first().copied(), (p.len() >= 2).then(|| (p[0] as usize) << 8 | p[1] as usize));
            if let Some(b0) = first {
                extend(&mut me.by_first[b0 as usize], at as u32);
            }
            if let Some(i) = two {
                extend(&mut me.by_two[i], at as u32);
            }
        }
        me.sorted = sorted;
        Ok(me)
    }

    fn piece(&self, id: u32) -> &str {
        let (start, len) = self.spans[id as usize];
        &self.arena[start as usize..(start + len) as usize]
    }

    /// Calls `found(id, len)` for every piece that is a prefix of `rest`,
    /// shortest first.
    fn prefixes(&self, rest: &[u8], mut found: impl FnMut(u32, usize)) {
        let range = |r: (u32, u32)| (r.0 as usize, r.1 as usize);
        let (mut lo, mut hi, from) = match *rest {
            [] => return,
            [b0] => {
                let (lo, hi) = range(self.by_first[b0 as usize]);
                (lo, hi, 1)
            }
            [b0, b1, ..] => {
                // The one-byte piece `b0`, if there is one, sorts first among those starting with it.
                let (lo, _) = range(self.by_first[b0 as usize]);
                if lo < self.sorted.len() && self.piece(self.sorted[lo]).as_bytes() == [b0] {
                    found(self.sorted[lo], 1);
                }
                let (lo, hi) = range(self.by_two[(b0 as usize) << 8 | b1 as usize]);
                (lo, hi, 2)
            }
        };
        if lo >= hi {
            return;
        }
        for (depth, &b) in rest.iter().enumerate().skip(from) {
            // In [lo, hi) every piece starts with rest[..depth]; a piece of
            // exactly that length sorts first.
            if lo < hi && self.piece(self.sorted[lo]).len() == depth {
                if depth > 0 {
                    found(self.sorted[lo], depth);
                }
                lo += 1;
            }
            let byte = |i: &u32| self.piece(*i).as_bytes()[depth];
            let range = &self.sorted[lo..hi];
            let first = range.partition_point(|i| byte(i) < b);
            let last = range.partition_point(|i| byte(i) <= b);
            (lo, hi) = (lo + first, lo + last);
            if lo >= hi {
                return;
            }
        }
        if lo < hi && self.piece(self.sorted[lo]).len() == rest.len() {
            found(self.sorted[lo], rest.len());
        }
    }

    /// The best segmentation: (id, byte range) per token, unknowns fused.
    fn segment(&self, s: &str) -> Result<Vec<(u32, usize, usize)>> {
        #[derive(Clone, Copy)]
        struct Best {
            id: u32,
            score: f64,
            start: Option<usize>,
        }
        let size = s.len();
        let unk_score = self.min_score - UNK_PENALTY;
        let mut best = vec![Best { id: 0, score: 0.0, start: None }; size + 1];
        let mut at = 0;
        while at < size {
            let here = best[at].score;
            let mblen = s[at..].chars().next().map_or(1, char::len_utf8);
            let mut single = false;
            self.prefixes(&s.as_bytes()[at..], |id, len| {
                let candidate = self.scores[id as usize] + here;
                let node = &mut best[at + len];
                if node.start.is_none() || candidate > node.score {
                    *node = Best { id, score: candidate, start: Some(at) };
                }
                single |= len == mblen;
            });
            if !single {
                let unk = self.unk_id.ok_or("an unknown character, and the model has no unk_id")?;
                let candidate = unk_score + here;
                let node = &mut best[at + mblen];
                if node.start.is_none() || candidate > node.score {
                    *node = Best { id: unk, score: candidate, start: Some(at) };
                }
            }
            at += mblen;
        }
        let mut out: Vec<(u32, usize, usize)> = Vec::new();
        let mut end = size;
        while end > 0 {
            let node = best[end];
            let start = node.start.ok_or("no segmentation reaches the end")?;
            match out.last_mut() {
                // Runs of unknowns become one token.
                Some(last) if Some(node.id) == self.unk_id && Some(last.0) == self.unk_id => last.1 = start,
                _ => out.push((node.id, start, end)),
            }
            end = start;
        }
        out.reverse();
        Ok(out)
    }
}

impl Model for CompactUnigram {
    type Trainer = UnigramTrainer;

    fn tokenize(&self, sequence: &str) -> Result<Vec<Token>> {
        if sequence.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self
            .segment(sequence)?
            .into_iter()
            .map(|(id, start, end)| Token::new(id, sequence[start..end].to_string(), (start, end)))
            .collect())
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        let i = self.sorted.binary_search_by(|&id| self.piece(id).as_bytes().cmp(token.as_bytes())).ok()?;
        Some(self.sorted[i])
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        ((id as usize) < self.spans.len()).then(|| self.piece(id).to_string())
    }

    fn get_vocab(&self) -> HashMap<String, u32> {
        (0..self.spans.len() as u32).map(|id| (self.piece(id).to_string(), id)).collect()
    }

    fn get_vocab_size(&self) -> usize {
        self.spans.len()
    }

    fn save(&self, _folder: &Path, _prefix: Option<&str>) -> Result<Vec<PathBuf>> {
        Err("the compact Unigram model is built from tokenizer.json and never saved".into())
    }

    fn get_trainer(&self) -> UnigramTrainer {
        UnigramTrainer::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(vocab: &[(&str, f64)]) -> CompactUnigram {
        let v: Vec<serde_json::Value> = vocab.iter().map(|(p, s)| serde_json::json!([p, s])).collect();
        CompactUnigram::from_json(&serde_json::json!({"type": "Unigram", "unk_id": 0, "vocab": v})).unwrap().unwrap()
    }

    #[test]
    fn best_path_ties_and_unknowns_as_the_crate_does() {
        let m =
            model(&[("<unk>", 0.0), ("a", -1.0), ("b", -1.0), ("ab", -1.5), ("abc", -5.0), ("c", -2.0), ("é", -1.0)]);
        let ids = |s: &str| m.tokenize(s).unwrap().into_iter().map(|t| t.id).collect::<Vec<_>>();
        assert_eq!(ids("ab"), vec![3]); // -1.5 beats a+b = -2
        assert_eq!(ids("abc"), vec![3, 5]); // -3.5 beats abc = -5
        assert_eq!(ids("aé"), vec![1, 6]);
        // x and y are unknown: one fused token covering both.
        let t = m.tokenize("axyb").unwrap();
        assert_eq!(
            t.iter().map(|t| (t.id, t.offsets)).collect::<Vec<_>>(),
            vec![(1, (0, 1)), (0, (1, 3)), (2, (3, 4))]
        );
        assert_eq!((m.token_to_id("ab"), m.token_to_id("zz"), m.id_to_token(6).as_deref()), (Some(3), None, Some("é")));
        assert!(m.tokenize("").unwrap().is_empty());
    }

    #[test]
    fn byte_fallback_and_other_models_are_left_to_the_crate() {
        assert!(CompactUnigram::from_json(&serde_json::json!({"type": "WordPiece"})).is_none());
        let bf = serde_json::json!({"type": "Unigram", "byte_fallback": true, "unk_id": 0, "vocab": [["<unk>", 0.0]]});
        assert!(CompactUnigram::from_json(&bf).is_none());
        let twice =
            serde_json::json!({"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0], ["a", -1.0], ["a", -2.0]]});
        assert!(CompactUnigram::from_json(&twice).is_none());
        let bad = serde_json::json!({"type": "Unigram", "unk_id": 9, "vocab": [["<unk>", 0.0]]});
        assert!(CompactUnigram::from_json(&bad).unwrap().is_err());
    }
}
