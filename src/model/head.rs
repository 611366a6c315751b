//! A trained head: a linear model over the sentence embedding concatenated
//! with sparse lexical features (one score per class, fitted with a squared
//! hinge or logistic loss), and a temperature that turns the scores into
//! calibrated probabilities through a softmax. Stored as safetensors plus metadata
//! (labels, encoder id, feature settings, training date, dev-split figures).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use super::lexical::{self, LexicalConfig, Sparse, TermCounts};
use super::ModelError;

/// File format tag; bump on any incompatible change.
pub const FORMAT: &str = "mailtriage-head-v1";

/// What a head file says about itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HeadMeta {
    /// Class names, in output order.
    pub labels: Vec<String>,
    /// The field of the training data these labels came from (`queue`, `priority`…).
    pub label_field: String,
    /// Encoder id whose embeddings the head was trained on; `None` for a
    /// lexical-only head.
    pub encoder: Option<String>,
    pub embedding_dim: usize,
    /// Weight of the embedding block relative to the lexical blocks.
    pub embedding_weight: f32,
    /// Token limit used when embedding the training data.
    pub max_tokens: usize,
    /// The encoder arithmetic (`f32`/`int8`) the training embeddings came
    /// from; `None` in heads older than the int8 encoder (they were f32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<crate::settings::Precision>,
    /// `[model] input_prefix` of the training embeddings (`None`: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_prefix: Option<String>,
    pub lexical: LexicalConfig,
    /// Softmax temperature fitted on the calibration split.
    pub temperature: f32,
    pub trained_at: String,
    pub train_examples: usize,
    /// Figures on the held-back dev split at training time.
    pub dev_metrics: serde_json::Value,
    /// Version shown in headers and logs: trained_at as a compact stamp.
    #[serde(default)]
    pub version: String,
    /// The cascade: a lexical-only head trained beside this one decides
    /// alone when its calibrated confidence reaches this (chosen on the dev
    /// split so accuracy does not drop), and under overload. `None`: no
    /// lexical-only head in the file.
    #[serde(default)]
    pub cascade: Option<CascadeMeta>,
    /// The risk-coverage curve on the dev split, ascending threshold (empty in
    /// heads trained without a dev split or before it was recorded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub risk_coverage: Vec<CoveragePoint>,
}

/// One point of a head's risk-coverage curve (measured on its dev split):
/// deciding automatically only where the calibrated confidence is at least
/// `threshold` covers `coverage` of the messages, with `accuracy` on those.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct CoveragePoint {
    pub threshold: f32,
    pub coverage: f64,
    pub accuracy: f64,
}

/// The lowest threshold of a curve (the most mail decided automatically)
/// whose accuracy on the decided mail reaches `target`.
pub fn threshold_for(curve: &[CoveragePoint], target: f64) -> Option<CoveragePoint> {
    curve.iter().filter(|p| p.accuracy >= target).max_by(|a, b| a.coverage.total_cmp(&b.coverage)).copied()
}

/// How the lexical-only head of a cascade was calibrated and what it did on dev.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CascadeMeta {
    pub temperature: f32,
    /// Decide without the encoder at or above this confidence (above 1:
    /// never). Heads trained before the margin gate use it; newer ones set
    /// it to 1.01 and decide by `margin`.
    pub threshold: f32,
    /// Decide without the encoder where the lexical head's margin (its top
    /// probability minus the runner-up's) is at least this; `None`: by
    /// `threshold` (or never, when that is above 1).
    #[serde(default)]
    pub margin: Option<f32>,
    /// Dev figures: share of messages decided lexically, accuracy/macro-F1 of
    /// the full head, of the cascade, and of the lexical head alone.
    pub dev: serde_json::Value,
}

/// A head's answer for one message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    pub label: String,
    pub index: usize,
    /// Calibrated probability of `label`.
    pub confidence: f32,
    pub probs: Vec<f32>,
}

#[derive(Debug, Clone)]
pub struct Head {
    pub meta: HeadMeta,
    /// `[classes × embedding_dim]`, row-major.
    pub w_emb: Vec<f32>,
    /// `[2^bits × classes]`: one row per bucket, so a sparse dot walks rows.
    pub w_lex: Vec<f32>,
    pub bias: Vec<f32>,
    pub idf: Vec<f32>,
    /// The cascade's lexical-only weights (`[2^bits × classes]` and bias),
    /// sharing `idf`; present when `meta.cascade` is.
    pub lexical_only: Option<(Vec<f32>, Vec<f32>)>,
}

impl Head {
    pub fn classes(&self) -> usize {
        self.meta.labels.len()
    }

    pub fn uses_embedding(&self) -> bool {
        self.meta.embedding_dim > 0
    }

    /// Lexical features of a text as this head was trained to see them.
    pub fn lexical(&self, text: &str) -> Sparse {
        lexical::features(text, &self.meta.lexical, &self.idf)
    }

    /// The same from stored term counts (made with this head's `bits`).
    pub fn lexical_terms(&self, terms: &TermCounts) -> Sparse {
        debug_assert_eq!(terms.bits, self.meta.lexical.bits);
        terms.features(&self.meta.lexical, &self.idf)
    }

    /// Raw scores (before temperature).
    pub fn logits(&self, emb: Option<&[f32]>, lex: &Sparse) -> Vec<f32> {
        let c = self.classes();
        let mut z = self.bias.clone();
        if let (Some(e), true) = (emb, self.uses_embedding()) {
            let d = self.meta.embedding_dim;
            let w = self.meta.embedding_weight;
            for (k, zk) in z.iter_mut().enumerate() {
                let row = &self.w_emb[k * d..(k + 1) * d];
                *zk += w * row.iter().zip(e).map(|(a, b)| a * b).sum::<f32>();
            }
        }
        for &(i, v) in lex {
            let row = &self.w_lex[i as usize * c..(i as usize + 1) * c];
            for (zk, wk) in z.iter_mut().zip(row) {
                *zk += v * wk;
            }
        }
        z
    }

    /// The word terms of `text` that pushed the head most towards class
    /// `chosen` rather than `against` (the runner-up): each term's feature
    /// value times the difference of its two weights, largest first, only
    /// positive ones, at most `top`. Words only (see [`lexical::word_terms`]);
    /// the embedding's share is not attributed to terms.
    pub fn strongest_terms(&self, text: &str, chosen: usize, against: usize, top: usize) -> Vec<(String, f32)> {
        let c = self.classes();
        if chosen >= c || against >= c {
            return Vec::new();
        }
        let lex = self.lexical(text);
        let mut seen = std::collections::HashSet::new();
        let mut terms: Vec<(String, f32)> = lexical::word_terms(text, &self.meta.lexical)
            .into_iter()
            .filter(|(_, b)| seen.insert(*b))
            .filter_map(|(term, b)| {
                let v = lex.binary_search_by_key(&b, |e| e.0).ok().map(|i| lex[i].1)?;
                let row = self.w_lex.get(b as usize * c..(b as usize + 1) * c)?;
                Some((term, v * (row[chosen] - row[against])))
            })
            .filter(|(_, w)| *w > 0.0)
            .collect();
        terms.sort_by(|a, b| b.1.total_cmp(&a.1));
        terms.truncate(top);
        terms
    }

    /// Calibrated prediction. `emb` must be given when the head uses one.
    pub fn predict(&self, emb: Option<&[f32]>, lex: &Sparse) -> Prediction {
        self.prediction(softmax(&self.logits(emb, lex), self.meta.temperature))
    }

    /// The lexical-only head's calibrated prediction, and whether it is
    /// confident enough to decide alone. `None` without a cascade.
    pub fn predict_lexical(&self, lex: &Sparse) -> Option<(Prediction, bool)> {
        let (cascade, (w, b)) = (self.meta.cascade.as_ref()?, self.lexical_only.as_ref()?);
        let c = self.classes();
        let mut z = b.clone();
        for &(i, v) in lex {
            for (zk, wk) in z.iter_mut().zip(&w[i as usize * c..(i as usize + 1) * c]) {
                *zk += v * wk;
            }
        }
        let p = self.prediction(softmax(&z, cascade.temperature));
        let confident = match cascade.margin {
            Some(m) => margin(&p.probs) >= m,
            None => p.confidence >= cascade.threshold,
        };
        Some((p, confident))
    }

    fn prediction(&self, probs: Vec<f32>) -> Prediction {
        let (index, &confidence) =
            probs.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).expect("a head has at least two classes");
        Prediction { label: self.meta.labels[index].clone(), index, confidence, probs }
    }

    /// Writes the head atomically (temp file, then rename); what root
    /// writes into the service's directory stays the service's.
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        let failed = |at: &Path, e: std::io::Error| ModelError::Write(crate::access::describe(at, &e, true));
        let data = self.to_bytes().map_err(|e| ModelError::BadFile { path: path.to_owned(), reason: e })?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::access::create_dir_all(dir).map_err(|e| failed(dir, e))?;
        }
        // A fresh name, created new: root may write into the service's
        // directory, and must not follow a link planted there.
        let tmp = PathBuf::from(format!("{}.{}.tmp", path.display(), std::process::id()));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &data))
            .and_then(|()| crate::access::inherit_owner(&tmp));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(failed(&tmp, e));
        }
        std::fs::rename(&tmp, path).map_err(|e| failed(path, e))
    }

    /// The head as a safetensors file's bytes (what [`Head::from_bytes`] reads).
    pub fn to_bytes(&self) -> Result<Vec<u8>, String> {
        let c = self.classes();
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (we, wl, b, idf) = (bytes(&self.w_emb), bytes(&self.w_lex), bytes(&self.bias), bytes(&self.idf));
        let mut views = vec![
            ("bias", TensorView::new(Dtype::F32, vec![c], &b)),
            ("idf", TensorView::new(Dtype::F32, vec![self.idf.len()], &idf)),
            ("w_lex", TensorView::new(Dtype::F32, vec![self.idf.len(), c], &wl)),
        ];
        if self.uses_embedding() {
            views.push(("w_emb", TensorView::new(Dtype::F32, vec![c, self.meta.embedding_dim], &we)));
        }
        let (lw, lb) = self.lexical_only.as_ref().map(|(w, b)| (bytes(w), bytes(b))).unwrap_or_default();
        if self.lexical_only.is_some() {
            views.push(("lexical_only.w_lex", TensorView::new(Dtype::F32, vec![self.idf.len(), c], &lw)));
            views.push(("lexical_only.bias", TensorView::new(Dtype::F32, vec![c], &lb)));
        }
        let views: Vec<(&str, TensorView<'_>)> =
            views.into_iter().map(|(n, v)| v.map(|v| (n, v))).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
        let mut info = HashMap::new();
        info.insert("format".to_string(), FORMAT.to_string());
        info.insert("meta".to_string(), serde_json::to_string(&self.meta).expect("meta serialises"));
        safetensors::tensor::serialize(views, Some(info)).map_err(|e| e.to_string())
    }

    /// Reads and checks a head file; any problem names the file and what is wrong.
    pub fn load(path: &Path) -> Result<Head, ModelError> {
        let data = std::fs::read(path).map_err(|e| open_error(path, e))?;
        Head::from_bytes(path, &data)
    }

    /// Checks and reads a head file's bytes; `path` names it in errors.
    pub fn from_bytes(path: &Path, data: &[u8]) -> Result<Head, ModelError> {
        let bad = |reason: String| ModelError::BadFile { path: path.to_owned(), reason };
        let (_, header) = SafeTensors::read_metadata(data).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let meta = meta_of(path, &header.metadata().clone().unwrap_or_default())?;
        let st = SafeTensors::deserialize(data).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let c = meta.labels.len();
        if c < 2 {
            return Err(bad("a head needs at least two labels".into()));
        }
        let dim = meta.lexical.dim();
        let read = |name: &str, shape: &[usize]| -> Result<Vec<f32>, ModelError> {
            let t = st.tensor(name).map_err(|_| bad(format!("tensor `{name}` is missing")))?;
            if t.dtype() != Dtype::F32 || t.shape() != shape {
                return Err(bad(format!("tensor `{name}` is {:?} {:?}, expected F32 {shape:?}", t.dtype(), t.shape())));
            }
            let v: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            if v.iter().any(|x| !x.is_finite()) {
                return Err(bad(format!("tensor `{name}` holds NaN or infinite values")));
            }
            Ok(v)
        };
        let w_emb = if meta.embedding_dim > 0 { read("w_emb", &[c, meta.embedding_dim])? } else { Vec::new() };
        let lexical_only = match &meta.cascade {
            Some(_) => Some((read("lexical_only.w_lex", &[dim, c])?, read("lexical_only.bias", &[c])?)),
            None => None,
        };
        if let Some(cascade) = &meta.cascade {
            if !(cascade.temperature.is_finite() && cascade.temperature > 0.0) {
                return Err(bad(format!("cascade temperature {} is not positive", cascade.temperature)));
            }
        }
        let head = Head {
            w_lex: read("w_lex", &[dim, c])?,
            bias: read("bias", &[c])?,
            idf: read("idf", &[dim])?,
            w_emb,
            lexical_only,
            meta,
        };
        if !(head.meta.temperature.is_finite() && head.meta.temperature > 0.0) {
            return Err(bad(format!("temperature {} is not positive", head.meta.temperature)));
        }
        Ok(head)
    }
}

impl Head {
    /// A head file's metadata from its header alone: listing versions should
    /// not read every file whole (a 20-class head is tens of MB). The tensors
    /// are not checked; [`Head::load`] does that.
    pub fn read_meta(path: &Path) -> Result<HeadMeta, ModelError> {
        use std::io::Read;
        // safetensors' own bound on the JSON header.
        const MAX_HEADER: u64 = 100_000_000;
        let bad = |reason: String| ModelError::BadFile { path: path.to_owned(), reason };
        let mut file = std::fs::File::open(path).map_err(|e| open_error(path, e))?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let len = u64::from_le_bytes(len);
        if len > MAX_HEADER {
            return Err(bad(format!("not a safetensors file: header of {len} bytes")));
        }
        let mut header = Vec::new();
        file.take(len).read_to_end(&mut header).map_err(|e| bad(e.to_string()))?;
        if header.len() as u64 != len {
            return Err(bad("not a safetensors file: the header is cut short".into()));
        }
        #[derive(serde::Deserialize)]
        struct Header {
            #[serde(rename = "__metadata__", default)]
            metadata: HashMap<String, String>,
        }
        let header: Header =
            serde_json::from_slice(&header).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        meta_of(path, &header.metadata)
    }
}

/// A head file that cannot be opened: missing, or why not.
fn open_error(path: &Path, e: std::io::Error) -> ModelError {
    match e.kind() {
        std::io::ErrorKind::NotFound => ModelError::MissingHead(path.to_owned()),
        _ => ModelError::BadFile { path: path.to_owned(), reason: crate::access::describe(path, &e, false) },
    }
}

/// The head metadata in a safetensors `__metadata__` map.
fn meta_of(path: &Path, info: &HashMap<String, String>) -> Result<HeadMeta, ModelError> {
    let bad = |reason: String| ModelError::BadFile { path: path.to_owned(), reason };
    if info.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(bad(format!("not a mailtriage head (format {:?}, expected {FORMAT})", info.get("format"))));
    }
    let meta: HeadMeta = serde_json::from_str(info.get("meta").map(String::as_str).unwrap_or(""))
        .map_err(|e| bad(format!("bad metadata: {e}")))?;
    // Checked before anything is sized by it (a shift past 63 bits panics).
    if !lexical::BITS.contains(&meta.lexical.bits) {
        let (lo, hi) = (lexical::BITS.start(), lexical::BITS.end());
        return Err(bad(format!("lexical.bits {} is outside {lo}–{hi}", meta.lexical.bits)));
    }
    if !lexical::WORD_NGRAMS.contains(&meta.lexical.word_ngrams) {
        let (lo, hi) = (lexical::WORD_NGRAMS.start(), lexical::WORD_NGRAMS.end());
        return Err(bad(format!("lexical.word_ngrams {} is outside {lo}–{hi}", meta.lexical.word_ngrams)));
    }
    Ok(meta)
}

/// The gap between the two most probable classes: how sure the head is of
/// its answer against the runner-up.
pub fn margin(p: &[f32]) -> f32 {
    let (mut first, mut second) = (f32::MIN, f32::MIN);
    for &x in p {
        if x > first {
            (first, second) = (x, first);
        } else if x > second {
            second = x;
        }
    }
    if second == f32::MIN {
        1.0
    } else {
        first - second
    }
}

/// Softmax of `z / t`, numerically stable.
pub fn softmax(z: &[f32], t: f32) -> Vec<f32> {
    let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = z.iter().map(|x| ((x - m) / t).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn tiny_head() -> Head {
        let lexical = LexicalConfig { bits: 8, ..Default::default() };
        let c = 2;
        let mut w_lex = vec![0.0; lexical.dim() * c];
        w_lex[3 * c] = 2.0; // bucket 3 votes for class 0
        Head {
            meta: HeadMeta {
                labels: vec!["billing".into(), "support".into()],
                label_field: "queue".into(),
                encoder: Some("enc".into()),
                embedding_dim: 3,
                embedding_weight: 1.0,
                max_tokens: 128,
                precision: None,
                input_prefix: None,
                lexical,
                temperature: 2.0,
                trained_at: "2026-01-01T00:00:00Z".into(),
                train_examples: 10,
                dev_metrics: serde_json::json!({"accuracy": 0.5}),
                version: "20260101T000000".into(),
                cascade: Some(CascadeMeta {
                    temperature: 1.0,
                    threshold: 0.8,
                    margin: None,
                    dev: serde_json::json!({}),
                }),
                risk_coverage: vec![CoveragePoint { threshold: 0.5, coverage: 0.7, accuracy: 0.9 }],
            },
            w_emb: vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
            w_lex: w_lex.clone(),
            bias: vec![0.0, 0.5],
            idf: vec![1.0; lexical.dim()],
            lexical_only: Some((w_lex, vec![0.0, 0.0])),
        }
    }

    #[test]
    fn predict_uses_embedding_lexical_bias_and_temperature() {
        let h = tiny_head();
        let p = h.predict(Some(&[1.0, 0.0, 0.0]), &vec![(3, 1.0)]);
        // logits: class0 = 1 + 2 = 3, class1 = 0.5 → softmax at T=2
        let expect = softmax(&[3.0, 0.5], 2.0);
        assert_eq!(p.label, "billing");
        assert!((p.confidence - expect[0]).abs() < 1e-6);
        // The lexical-only head: bucket 3 gives logits (2, 0) at T=1 → 0.88 ≥ 0.8, confident.
        let (lp, confident) = h.predict_lexical(&vec![(3, 1.0)]).unwrap();
        assert_eq!(lp.label, "billing");
        assert!((lp.confidence - softmax(&[2.0, 0.0], 1.0)[0]).abs() < 1e-6 && confident);
        let (_, confident) = h.predict_lexical(&vec![(3, 0.1)]).unwrap();
        assert!(!confident, "a weak lexical signal leaves it to the full head");
    }

    #[test]
    fn a_feature_width_out_of_range_is_refused_before_use() {
        let mut meta = serde_json::to_value(&tiny_head().meta).unwrap();
        meta["lexical"]["bits"] = 64.into();
        let info = HashMap::from([("format".to_string(), FORMAT.to_string()), ("meta".to_string(), meta.to_string())]);
        let data = safetensors::tensor::serialize(Vec::<(&str, TensorView<'_>)>::new(), Some(info)).unwrap();
        let err = Head::from_bytes(Path::new("wide.safetensors"), &data).unwrap_err().to_string();
        assert!(err.contains("wide.safetensors") && err.contains("lexical.bits 64"), "{err}");
    }

    #[test]
    fn save_load_round_trip_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("heads/d.safetensors");
        let h = tiny_head();
        h.save(&path).unwrap();
        let back = Head::load(&path).unwrap();
        assert_eq!(back.meta, h.meta);
        assert_eq!(Head::read_meta(&path).unwrap(), h.meta, "the header alone gives the same metadata");
        assert_eq!((back.w_emb, back.w_lex, back.bias, back.idf), (h.w_emb, h.w_lex, h.bias, h.idf));
        assert_eq!(back.lexical_only, h.lexical_only);
    }

    #[test]
    fn corrupt_files_are_named_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.safetensors");
        let err = Head::load(&path).unwrap_err().to_string();
        assert!(err.contains("h.safetensors") && err.contains("missing"), "{err}");
        std::fs::write(&path, b"garbage that is not safetensors").unwrap();
        for err in [Head::load(&path).unwrap_err(), Head::read_meta(&path).unwrap_err()] {
            let err = err.to_string();
            assert!(err.contains("h.safetensors") && err.contains("not a safetensors file"), "{err}");
        }
        assert!(Head::read_meta(&dir.path().join("none")).unwrap_err().to_string().contains("missing"));
        // valid safetensors, truncated tensor data
        tiny_head().save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
        let err = Head::load(&path).unwrap_err().to_string();
        assert!(err.contains("h.safetensors"), "{err}");
        // a model file that is not a head
        let other = safetensors::tensor::serialize(
            vec![("x", TensorView::new(Dtype::F32, vec![1], &[0, 0, 0, 0]).unwrap())],
            None,
        )
        .unwrap();
        std::fs::write(&path, other).unwrap();
        assert!(Head::load(&path).unwrap_err().to_string().contains("not a mailtriage head"));
        assert!(Head::read_meta(&path).unwrap_err().to_string().contains("not a mailtriage head"));
    }
}
