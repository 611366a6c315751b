//! Retraining with a gate. A candidate head is trained from the original
//! training data plus a class-balanced reservoir of corrections, then both
//! it and the head in use are measured on the same evaluation set: the
//! original dev split plus a held-back share of the corrections (chosen by
//! id, so a correction never trains the head that is judged on it). The
//! candidate is promoted only if macro-F1 drops neither on the whole set nor
//! on the original dev split, and no language slice drops by more than
//! `max_slice_drop`. Every attempt is logged in the heads' `history.jsonl`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use thiserror::Error;

use crate::learn::correction::{now, Correction};
use crate::learn::store::heads::{self, Attempt, Fence, HeadsError, Registry, Role};
use crate::learn::store::{Store, StoreError};
use crate::learn::train::dataset::{self, DataError};
use crate::learn::train::eval::{self, Outcome};
use crate::learn::train::{self, Example, Loss, Provenance, TrainError, TrainOptions};
use crate::message::extract::ExtractLimits;
use crate::message::language;
use crate::model::encoder::TextEncoder;
use crate::model::head::Head;
use crate::model::lexical::TermCounts;
use crate::model::{bulk, encoder_text, ModelError};
use crate::settings::{Config, FeedbackConfig};

#[derive(Debug, Error)]
pub enum RetrainError {
    #[error("feedback is not configured: add a [feedback] section")]
    NotConfigured,
    #[error("no {0} head to start from: train one and set [model] {0}_head")]
    NoHead(&'static str),
    #[error("the {0} head reads embeddings but no encoder is loaded")]
    NoEncoder(&'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Heads(#[from] HeadsError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Train(#[from] TrainError),
}

/// A head's figures on the gate's evaluation set.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Figures {
    pub n: usize,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub ece: f64,
    /// On the original dev split alone (when configured).
    pub dev_macro_f1: Option<f64>,
    /// On the held-back corrections alone.
    pub feedback_macro_f1: Option<f64>,
    /// Per language: (examples, macro-F1).
    pub slices: BTreeMap<String, (usize, f64)>,
}

/// What one retraining did.
#[derive(Debug, Clone, Serialize)]
pub struct RetrainOutcome {
    pub role: Role,
    pub time: String,
    pub promoted: bool,
    /// The new version, when promoted.
    pub version: Option<String>,
    /// The version it was compared with.
    pub against: String,
    /// Why it was (not) promoted.
    pub reason: String,
    pub current: Figures,
    pub candidate: Figures,
    pub original_examples: usize,
    pub reservoir: usize,
    pub held_back: usize,
    /// Corrections unusable for this head (other hash width).
    pub skipped: usize,
}

/// One example of the evaluation set.
struct EvalItem {
    terms: TermCounts,
    embedding: Vec<f32>,
    label: String,
    language: String,
    from_dev: bool,
}

/// Whether correction `id` is held back for the gate (stable, spread by a hash).
pub fn held_back(id: i64, percent: u8) -> bool {
    let mut x = id as u64 ^ 0x9E37_79B9_7F4A_7C15;
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    x % 100 < percent as u64
}

/// Retrains the `role` head once and promotes it if it passes the gate.
/// `encoder` is needed when the head reads embeddings; `threads` embed the
/// original data (once: `embedding_cache` keeps them).
/// With a PostgreSQL store, `fence` is the retraining leader's (see
/// [`crate::learn::store::leader`]): the promotion happens only while it still leads.
pub fn retrain(
    cfg: &Config,
    store: &Arc<Store>,
    role: Role,
    encoder: Option<&dyn TextEncoder>,
    threads: usize,
    fence: Option<Fence>,
) -> Result<RetrainOutcome, RetrainError> {
    let fb = cfg.feedback.as_ref().ok_or(RetrainError::NotConfigured)?;
    let path = heads::in_use(cfg, role).ok_or(RetrainError::NoHead(role.as_str()))?;
    let current = Head::load(&path)?;
    let meta = &current.meta;
    let bits = meta.lexical.bits;
    let dim = meta.embedding_dim;
    if dim > 0 && encoder.is_none() {
        return Err(RetrainError::NoEncoder(role.as_str()));
    }
    let oldest = now() - fb.retention_days as i64 * 86_400;
    store.expire(oldest)?;
    let label_of = |c: &Correction| match role {
        Role::Department => c.department.clone(),
        Role::Priority => c.priority.clone(),
    };

    // Corrections for this head; a later correction of the same message wins.
    let mut latest: HashMap<String, usize> = HashMap::new();
    let all = store.load(oldest)?;
    let through_id = all.iter().map(|c| c.id).max().unwrap_or(0);
    let mut usable: Vec<(Correction, String)> = Vec::new();
    let mut skipped = 0;
    for c in all {
        let Some(label) = label_of(&c) else { continue };
        if c.terms.bits != bits {
            skipped += 1;
            continue;
        }
        if let Some(h) = c.message_hash.clone() {
            if let Some(&i) = latest.get(&h) {
                usable[i] = (c, label);
                continue;
            }
            latest.insert(h, usable.len());
        }
        usable.push((c, label));
    }
    let embedding_of = |c: &Correction| -> Vec<f32> {
        match (&c.embedding, &c.encoder) {
            (Some(e), Some(id)) if dim > 0 && e.len() == dim && meta.encoder.as_deref() == Some(id.as_str()) => {
                e.clone()
            }
            _ => Vec::new(),
        }
    };
    let (held, train_part): (Vec<_>, Vec<_>) =
        usable.into_iter().partition(|(c, _)| held_back(c.id, fb.holdout_percent));

    // The reservoir: the newest corrections per class, new classes only with enough of them.
    let mut by_class: BTreeMap<String, Vec<&Correction>> = BTreeMap::new();
    for (c, label) in &train_part {
        by_class.entry(label.clone()).or_default().push(c);
    }
    let mut reservoir: Vec<(&Correction, &str)> = Vec::new();
    for (label, mut cs) in by_class.iter().map(|(l, v)| (l, v.clone())) {
        if !meta.labels.contains(label) && cs.len() < fb.min_per_class {
            continue;
        }
        cs.sort_by_key(|c| std::cmp::Reverse(c.id));
        cs.truncate(fb.max_per_class);
        reservoir.extend(cs.into_iter().map(|c| (c, label.as_str())));
    }
    reservoir.sort_by_key(|(c, _)| c.id);

    // The original data and dev split, as features.
    let limits = ExtractLimits::from(&cfg.limits);
    let read = |p: &Option<PathBuf>| -> Result<Vec<dataset::Record>, RetrainError> {
        Ok(match p {
            Some(p) => dataset::read_jsonl(p, Some(&meta.label_field), limits)?,
            None => Vec::new(),
        })
    };
    let (original, dev) = (read(&fb.training_data)?, read(&fb.dev_data)?);
    let embed = |records: &[dataset::Record]| -> Result<Vec<Vec<f32>>, RetrainError> {
        match encoder.filter(|_| dim > 0) {
            Some(enc) => {
                let texts: Vec<String> = records.iter().map(|r| encoder_text(&r.text)).collect();
                Ok(bulk::embed_all(enc, &texts, threads, fb.embedding_cache.as_deref(), &|_| {})?)
            }
            None => Ok(vec![Vec::new(); records.len()]),
        }
    };
    let (original_emb, dev_emb) = (embed(&original)?, embed(&dev)?);

    let mut examples: Vec<Example> = original
        .iter()
        .map(|r| Example { terms: TermCounts::of(&r.text, bits), label: r.label.clone().expect("labeled") })
        .collect();
    let mut embeddings = original_emb;
    for (c, label) in &reservoir {
        examples.push(Example { terms: c.terms.clone(), label: label.to_string() });
        embeddings.push(embedding_of(c));
    }
    let defaults = TrainOptions::default();
    let setting = |m: &serde_json::Value, key: &str| m.get(key).and_then(|v| v.as_f64()).map(|v| v as f32);
    // Heads from before the loss was recorded were all logistic.
    let loss =
        meta.dev_metrics.get("loss").and_then(|v| v.as_str()).and_then(Loss::from_name).unwrap_or(Loss::Logistic);
    let opts = TrainOptions {
        loss,
        lexical: meta.lexical,
        embedding_weight: meta.embedding_weight,
        balanced: meta.dev_metrics.get("balanced").and_then(|b| b.as_bool()).unwrap_or(true),
        // The settings the head was trained with (heads from before they were
        // recorded, or with values `train` would refuse, get today's defaults).
        l2: setting(&meta.dev_metrics, "l2").filter(|v| v.is_finite() && *v >= 0.0).unwrap_or(loss.default_l2()),
        prior_shift: setting(&meta.dev_metrics, "prior_shift")
            .filter(|v| (0.0..=1.0).contains(v))
            .unwrap_or(defaults.prior_shift),
        threads,
        cascade_tolerance: if meta.cascade.is_some() { defaults.cascade_tolerance } else { -1.0 },
        ..defaults
    };
    let provenance = Provenance {
        label_field: meta.label_field.clone(),
        encoder: meta.encoder.clone(),
        max_tokens: meta.max_tokens,
        precision: meta.precision,
        input_prefix: meta.input_prefix.clone(),
    };
    let (mut candidate, _) =
        train::train(&examples, (dim > 0).then_some(embeddings.as_slice()), provenance, &opts, |_, _, _| {})?;

    // The evaluation set.
    let mut items: Vec<EvalItem> = dev
        .iter()
        .zip(dev_emb)
        .map(|(r, embedding)| EvalItem {
            terms: TermCounts::of(&r.text, bits),
            embedding,
            label: r.label.clone().expect("labeled"),
            language: r
                .fields
                .get("language")
                .and_then(|l| l.as_str())
                .map_or_else(|| language::detect(&r.text).to_string(), str::to_string),
            from_dev: true,
        })
        .collect();
    items.extend(held.iter().map(|(c, label)| EvalItem {
        terms: c.terms.clone(),
        embedding: embedding_of(c),
        label: label.clone(),
        language: c.language.clone(),
        from_dev: false,
    }));
    let current_figures = figures(&current, &items);
    let candidate_figures = figures(&candidate, &items);
    let (promoted, reason) = gate(fb, &current_figures, &candidate_figures);

    let registry = Registry::with_store(&fb.heads_dir, store.clone());
    let against = meta.version.clone();
    let mut outcome = RetrainOutcome {
        role,
        time: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        promoted,
        version: None,
        against,
        reason,
        current: current_figures,
        candidate: candidate_figures,
        original_examples: original.len(),
        reservoir: reservoir.len(),
        held_back: held.len(),
        skipped,
    };
    if promoted {
        if let serde_json::Value::Object(m) = &mut candidate.meta.dev_metrics {
            m.insert("promotion".into(), serde_json::to_value(&outcome).expect("serialisable"));
        }
    }
    let entry = serde_json::to_value(&outcome).expect("serialisable");
    let attempt = Attempt { role, through_id, entry, promote: promoted.then_some(&mut candidate) };
    outcome.version = registry.record(attempt, fence)?;
    Ok(outcome)
}

/// A head's figures on the evaluation set, over the union of the labels it
/// knows and the labels the set holds (a department new to it counts against it).
fn figures(head: &Head, items: &[EvalItem]) -> Figures {
    let labels: Vec<String> = head
        .meta
        .labels
        .iter()
        .cloned()
        .chain(items.iter().map(|i| i.label.clone()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let index = |l: &str| labels.binary_search_by(|x| x.as_str().cmp(l)).ok();
    let outcomes: Vec<Outcome> = items
        .iter()
        .map(|i| {
            let emb = (!i.embedding.is_empty()).then_some(i.embedding.as_slice());
            let p = head.predict(emb, &head.lexical_terms(&i.terms));
            Outcome { truth: index(&i.label), predicted: index(&p.label).expect("own label"), confidence: p.confidence }
        })
        .collect();
    let subset = |keep: &dyn Fn(&EvalItem) -> bool| -> Vec<Outcome> {
        items.iter().zip(&outcomes).filter(|(i, _)| keep(i)).map(|(_, o)| *o).collect()
    };
    let macro_f1_of = |o: &[Outcome]| (!o.is_empty()).then(|| eval::compute(&labels, o).macro_f1);
    let all = eval::compute(&labels, &outcomes);
    let languages: BTreeSet<&str> = items.iter().map(|i| i.language.as_str()).collect();
    let slices = languages
        .into_iter()
        .map(|l| {
            let o = subset(&|i| i.language == l);
            (l.to_string(), (o.len(), macro_f1_of(&o).unwrap_or(0.0)))
        })
        .collect();
    Figures {
        n: all.n,
        accuracy: all.accuracy,
        macro_f1: all.macro_f1,
        ece: all.ece,
        dev_macro_f1: macro_f1_of(&subset(&|i| i.from_dev)),
        feedback_macro_f1: macro_f1_of(&subset(&|i| !i.from_dev)),
        slices,
    }
}

/// The promotion rule; returns the decision and the reason in words.
fn gate(fb: &FeedbackConfig, current: &Figures, candidate: &Figures) -> (bool, String) {
    if candidate.n == 0 {
        return (false, "nothing to evaluate on: configure dev_data or collect more corrections".into());
    }
    if candidate.macro_f1 < current.macro_f1 {
        return (false, format!("macro-F1 would drop: {:.4} → {:.4}", current.macro_f1, candidate.macro_f1));
    }
    if let (Some(c), Some(n)) = (current.dev_macro_f1, candidate.dev_macro_f1) {
        if n < c {
            return (false, format!("macro-F1 on the original dev split would drop: {c:.4} → {n:.4}"));
        }
    }
    for (lang, &(n, f1)) in &candidate.slices {
        let Some(&(_, before)) = current.slices.get(lang) else { continue };
        if n >= fb.min_slice && f1 < before - fb.max_slice_drop {
            return (false, format!("language `{lang}` ({n} messages) would drop: macro-F1 {before:.4} → {f1:.4}"));
        }
    }
    (true, format!("macro-F1 {:.4} → {:.4}", current.macro_f1, candidate.macro_f1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fig(macro_f1: f64, dev: f64, de: f64) -> Figures {
        Figures {
            n: 100,
            accuracy: 0.5,
            macro_f1,
            ece: 0.0,
            dev_macro_f1: Some(dev),
            feedback_macro_f1: None,
            slices: [("en".to_string(), (70, 0.5)), ("de".to_string(), (60, de)), ("fr".to_string(), (5, 0.9))]
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn gate_refuses_any_drop_and_slice_drops_beyond_the_limit() {
        let fb = FeedbackConfig { min_slice: 50, ..FeedbackConfig::default() };
        assert!(gate(&fb, &fig(0.40, 0.40, 0.40), &fig(0.42, 0.41, 0.39)).0);
        let (ok, why) = gate(&fb, &fig(0.40, 0.40, 0.40), &fig(0.399, 0.41, 0.40));
        assert!(!ok && why.contains("macro-F1 would drop"), "{why}");
        assert!(!gate(&fb, &fig(0.40, 0.40, 0.40), &fig(0.41, 0.39, 0.40)).0);
        let (ok, why) = gate(&fb, &fig(0.40, 0.40, 0.40), &fig(0.45, 0.45, 0.37));
        assert!(!ok && why.contains("`de`"), "{why}");
        // A slice below min_slice is not gated.
        let mut small = fig(0.45, 0.45, 0.40);
        small.slices.insert("fr".into(), (5, 0.1));
        assert!(gate(&fb, &fig(0.40, 0.40, 0.40), &small).0);
    }

    #[test]
    fn holdout_is_stable_and_about_the_share_asked() {
        let n = (1..=10_000).filter(|&id| held_back(id, 20)).count();
        assert!((1800..2200).contains(&n), "{n}");
        assert_eq!(held_back(17, 20), held_back(17, 20));
    }
}
