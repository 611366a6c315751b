//! Learning a head from labeled mail.
//!
//! A linear model over `[embedding · w_e ; word n-grams ; char n-grams]`,
//! fitted to the minimum of its L2-regularised, class-weighted loss:
//! multinomial cross-entropy by L-BFGS ([`lbfgs`]), or the one-vs-rest squared
//! hinge (a linear SVM's loss; see [`Loss`]) by dual coordinate descent
//! ([`dual_cd`]). Either way the head's scores go
//! through a softmax with a fitted temperature: a stratified dev split is
//! held back to fit it (calibration) and to report figures; the head is then
//! refitted on all the data with the same settings and that temperature.
//!
//! Offline, or in the background: nothing here runs on a message's path.
//! - [`dataset`]: labeled mail (JSONL, Maildir, mbox, a folder per department).
//! - [`eval`]: accuracy, macro-F1, calibration, risk-coverage.
//! - [`lbfgs`], [`dual_cd`]: the two solvers; [`rng`]: the one seeded source of randomness.
//! - [`retrain`]: original data + the corrections' reservoir → candidate → gate.

pub mod dataset;
pub mod dual_cd;
pub mod eval;
pub mod lbfgs;
pub mod retrain;
pub mod rng;

use std::collections::BTreeSet;

use serde::Serialize;
use thiserror::Error;

use self::eval::{Metrics, Outcome};
use crate::model::head::{softmax, CascadeMeta, Head, HeadMeta};
use crate::model::lexical::{self, LexicalConfig, Sparse, TermCounts};

/// One labeled training message, as the hashed term counts of its text
/// (subject + body, as the daemon sees mail): the trainer never needs the
/// text itself, so stored corrections train exactly like the original data.
#[derive(Debug, Clone)]
pub struct Example {
    pub terms: TermCounts,
    pub label: String,
}

impl Example {
    pub fn new(text: &str, label: impl Into<String>, lexical: &LexicalConfig) -> Example {
        Example { terms: TermCounts::of(text, lexical.bits), label: label.into() }
    }
}

/// The training loss. Both are convex; each is fitted by the method that
/// reaches its minimum fastest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Loss {
    /// Multinomial cross-entropy: probabilities by construction.
    Logistic,
    /// One binary squared hinge per class, `max(0, 1 − s·z)²` with s = ±1:
    /// what scikit-learn's LinearSVC minimises. It ignores messages already
    /// on the right side of the margin, so it spends the weights on the hard
    /// ones; its scores become probabilities through the same fitted softmax
    /// temperature. The default: on the dev folds it beat the logistic loss
    /// on 20 Newsgroups (+0.6–0.9 accuracy) and a little on priority with an
    /// encoder (+0.2–0.3 accuracy, +0.5–0.9 macro-F1); on departments it
    /// trades half a point of accuracy for a point of macro-F1
    /// (docs/performance.md).
    #[default]
    SquaredHinge,
}

impl Loss {
    pub const ALL: [Loss; 2] = [Loss::Logistic, Loss::SquaredHinge];

    /// The loss named `name` (as [`Loss::name`] writes it).
    pub fn from_name(name: &str) -> Option<Loss> {
        Self::ALL.into_iter().find(|l| l.name() == name)
    }

    /// The L2 weight each loss was tuned with on the dev folds (tickets,
    /// 20news): the hinge's scores are margins of ±1, not log-odds, so it
    /// wants a stronger penalty (scikit-learn's LinearSVC default, C = 1).
    pub fn default_l2(self) -> f32 {
        match self {
            Loss::Logistic => 0.1,
            Loss::SquaredHinge => 1.0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Loss::Logistic => "logistic",
            Loss::SquaredHinge => "squared_hinge",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainOptions {
    pub loss: Loss,
    /// L-BFGS iterations at most, logistic loss only (it usually converges
    /// sooner; the squared hinge is solved in the dual, [`dual_cd`]).
    pub max_iterations: usize,
    /// L2 weight of the summed (not averaged) loss: 1/C in scikit-learn's terms.
    pub l2: f32,
    /// Share of each class held back for calibration and dev figures.
    pub dev_fraction: f32,
    pub seed: u64,
    /// Weight classes by n / (classes · n_class), so small departments count.
    pub balanced: bool,
    /// Class weighting makes the head behave as if all classes were equally
    /// frequent: good for macro-F1, at some cost in accuracy. Adding
    /// `prior_shift · ln(class frequency)` to the calibrated log-odds leans it
    /// back towards the real frequencies (1: fully, for a balanced head; 0:
    /// not at all).
    pub prior_shift: f32,
    /// Threads computing the training objective (it is a sum over messages).
    pub threads: usize,
    pub embedding_weight: f32,
    pub lexical: LexicalConfig,
    /// Refit on train + dev after calibrating (more data, same temperature).
    pub refit: bool,
    /// Try a small grid of settings (character block on/off, class weighting,
    /// embedding weight) and keep the best on the dev split.
    pub search: bool,
    /// With embeddings: also train a lexical-only head and let it decide
    /// alone where, on the dev split, that costs at most this much accuracy
    /// and macro-F1. Negative: no cascade.
    pub cascade_tolerance: f64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            loss: Loss::default(),
            max_iterations: 300,
            l2: Loss::default().default_l2(),
            dev_fraction: 0.15,
            seed: 42,
            balanced: true,
            prior_shift: 0.0,
            threads: 1,
            embedding_weight: 0.5,
            lexical: LexicalConfig::default(),
            refit: true,
            search: false,
            cascade_tolerance: 0.005,
        }
    }
}

impl TrainOptions {
    /// The settings `search` tries: these options, and variants of them.
    pub fn candidates(&self, with_embedding: bool) -> Vec<TrainOptions> {
        if !self.search {
            return vec![self.clone()];
        }
        let mut out = Vec::new();
        for char_weight in [1.0, 0.0] {
            for balanced in [true, false] {
                let weights = if with_embedding {
                    vec![self.embedding_weight, self.embedding_weight / 2.0]
                } else {
                    vec![self.embedding_weight]
                };
                for embedding_weight in weights {
                    let mut o = self.clone();
                    o.lexical.char_weight = char_weight;
                    o.balanced = balanced;
                    o.embedding_weight = embedding_weight;
                    out.push(o);
                }
            }
        }
        out
    }
}

#[derive(Debug, Error)]
pub enum TrainError {
    #[error("need at least two labels, found {0:?}")]
    TooFewLabels(Vec<String>),
    #[error("{0} examples but {1} embeddings")]
    EmbeddingCount(usize, usize),
    #[error("example {0} was hashed with {1} bits, the settings say {2}")]
    HashWidth(usize, u8, u8),
    #[error("the squared hinge needs an L2 weight above 0 (--l2), got {0}: without one it has no minimum on data no line separates")]
    NoPenalty(f32),
}

/// What training produced, besides the head.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    /// The settings used (after `search`).
    pub chosen: TrainOptions,
    /// Each candidate's dev score (mean of accuracy and macro-F1), in order tried.
    pub search: Vec<(String, f64)>,
    pub train_examples: usize,
    pub dev_examples: usize,
    pub temperature: f32,
    pub dev: Metrics,
    /// The lexical-only head's threshold and dev figures, when one was trained.
    pub cascade: Option<CascadeMeta>,
}

/// Where the head came from, for its metadata.
pub struct Provenance {
    pub label_field: String,
    pub encoder: Option<String>,
    pub max_tokens: usize,
    /// The encoder's resolved arithmetic, when embeddings were used.
    pub precision: Option<crate::settings::Precision>,
    /// `[model] input_prefix` the embeddings were made with.
    pub input_prefix: Option<String>,
}

use self::rng::Rng;

/// Indices of a stratified split: (train, dev).
pub fn stratified_split(labels: &[usize], classes: usize, fraction: f32, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut rng = Rng::new(seed);
    let (mut train, mut dev) = (Vec::new(), Vec::new());
    for c in 0..classes {
        let mut idx: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == c).collect();
        rng.shuffle(&mut idx);
        let k =
            if idx.len() >= 2 { ((idx.len() as f32 * fraction).round() as usize).clamp(1, idx.len() - 1) } else { 0 };
        dev.extend_from_slice(&idx[..k]);
        train.extend_from_slice(&idx[k..]);
    }
    train.sort_unstable();
    dev.sort_unstable();
    (train, dev)
}

/// Trains a head. `embeddings[i]` belongs to `examples[i]` (empty where a
/// message has none: its embedding block then counts as zero); `None` trains
/// a lexical-only head. `progress(stage, done, total)` is called once per L-BFGS
/// iteration (stage "iteration") and once at the end of each fit ("fit").
pub fn train(
    examples: &[Example],
    embeddings: Option<&[Vec<f32>]>,
    provenance: Provenance,
    opts: &TrainOptions,
    mut progress: impl FnMut(&str, usize, usize),
) -> Result<(Head, TrainReport), TrainError> {
    let labels: Vec<String> = examples.iter().map(|e| e.label.clone()).collect::<BTreeSet<_>>().into_iter().collect();
    if labels.len() < 2 {
        return Err(TrainError::TooFewLabels(labels));
    }
    if opts.loss == Loss::SquaredHinge && opts.l2.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
        return Err(TrainError::NoPenalty(opts.l2));
    }
    if let Some(e) = embeddings {
        if e.len() != examples.len() {
            return Err(TrainError::EmbeddingCount(examples.len(), e.len()));
        }
    }
    if let Some((i, e)) = examples.iter().enumerate().find(|(_, e)| e.terms.bits != opts.lexical.bits) {
        return Err(TrainError::HashWidth(i, e.terms.bits, opts.lexical.bits));
    }
    let y: Vec<usize> = examples.iter().map(|e| labels.binary_search(&e.label).expect("label from the set")).collect();
    let (train_idx, dev_idx) = stratified_split(&y, labels.len(), opts.dev_fraction, opts.seed);
    let dim = embeddings.and_then(|e| e.iter().map(Vec::len).find(|&n| n > 0)).unwrap_or(0);
    let buckets: Vec<Vec<u32>> = examples.iter().map(|e| e.terms.buckets(&opts.lexical)).collect();

    let base_meta = HeadMeta {
        labels: labels.clone(),
        label_field: provenance.label_field,
        encoder: provenance.encoder.filter(|_| dim > 0),
        embedding_dim: dim,
        embedding_weight: opts.embedding_weight,
        max_tokens: provenance.max_tokens,
        precision: provenance.precision.filter(|_| dim > 0),
        input_prefix: provenance.input_prefix.filter(|p| dim > 0 && !p.is_empty()),
        lexical: opts.lexical,
        temperature: 1.0,
        trained_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        train_examples: examples.len(),
        dev_metrics: serde_json::Value::Null,
        version: String::new(),
        cascade: None,
        risk_coverage: Vec::new(),
    };
    let emb_of = |i: usize| embeddings.map(|e| e[i].as_slice()).filter(|e| e.len() == dim && dim > 0);
    let dev_y: Vec<usize> = dev_idx.iter().map(|&i| y[i]).collect();
    // Dev logits of a head, computed once per head; outcomes derive from them at any temperature.
    let dev_logits_of = |head: &Head| -> Vec<Vec<f32>> {
        dev_idx.iter().map(|&i| head.logits(emb_of(i), &head.lexical_terms(&examples[i].terms))).collect()
    };
    let outcomes = |logits: &[Vec<f32>], t: f32| -> Vec<Outcome> {
        logits
            .iter()
            .zip(&dev_y)
            .map(|(z, &truth)| {
                let p = softmax(z, t);
                let (k, &c) = p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap();
                Outcome { truth: Some(truth), predicted: k, confidence: c }
            })
            .collect()
    };

    // 1. Fit each candidate on the train part; keep the best on the dev part.
    let candidates = opts.candidates(dim > 0);
    let mut search = Vec::new();
    let mut best: Option<(f64, TrainOptions, Head, Vec<Vec<f32>>)> = None;
    for cand in candidates {
        let meta = HeadMeta { embedding_weight: cand.embedding_weight, lexical: cand.lexical, ..base_meta.clone() };
        let head = fit(examples, &buckets, &y, &train_idx, emb_of, meta, &cand, &mut progress);
        let logits = dev_logits_of(&head);
        let score = if dev_idx.is_empty() {
            0.0
        } else {
            let m = eval::compute(&labels, &outcomes(&logits, 1.0));
            (m.accuracy + m.macro_f1) / 2.0
        };
        search.push((
            format!(
                "char_weight={} balanced={} embedding_weight={}",
                cand.lexical.char_weight, cand.balanced, cand.embedding_weight
            ),
            score,
        ));
        if best.as_ref().is_none_or(|(s, ..)| score > *s) {
            best = Some((score, cand, head, logits));
        }
    }
    let (_, chosen, mut head, mut dev_logits) = best.expect("at least one candidate");

    // 2. Lean back towards the class frequencies (`prior_shift`).
    let log_prior_of = |rows: &[usize]| -> Vec<f32> {
        let mut n = vec![0usize; labels.len()];
        rows.iter().for_each(|&i| n[y[i]] += 1);
        n.iter().map(|&k| (k.max(1) as f32 / rows.len().max(1) as f32).ln()).collect()
    };
    // The shift is meant in calibrated log-odds, score / T. A hinge head's
    // scores are margins (on the dev folds T was 0.1–0.8), a logistic head's
    // are log-odds already (T ≈ 1): scale by the temperature fitted before
    // shifting, so the same `prior_shift` means the same for either loss.
    let shift_scale =
        if chosen.prior_shift > 0.0 && !dev_idx.is_empty() { fit_temperature(&dev_logits, &dev_y) } else { 1.0 };
    let shift = chosen.prior_shift * shift_scale;
    let lean = |bias: &mut [f32], log_prior: &[f32]| bias.iter_mut().zip(log_prior).for_each(|(b, p)| *b += shift * p);
    let train_prior = log_prior_of(&train_idx);
    dev_logits.iter_mut().for_each(|z| lean(z, &train_prior));

    // 3. Calibrate on the dev part and measure there.
    let temperature = if dev_idx.is_empty() { 1.0 } else { fit_temperature(&dev_logits, &dev_y) };
    let dev_outcomes = outcomes(&dev_logits, temperature);
    let dev = eval::compute(&labels, &dev_outcomes);

    // 4. The cascade: a lexical-only head with the same settings, and the
    //    lowest confidence at which it may decide alone.
    let lexical_meta = HeadMeta { encoder: None, embedding_dim: 0, lexical: chosen.lexical, ..base_meta.clone() };
    let no_embedding = |_: usize| -> Option<&[f32]> { None };
    let cascade = (dim > 0 && !dev_idx.is_empty() && opts.cascade_tolerance >= 0.0).then(|| {
        let mut lexical =
            fit(examples, &buckets, &y, &train_idx, no_embedding, lexical_meta.clone(), &chosen, &mut progress);
        lean(&mut lexical.bias, &train_prior);
        let lexical_logits = dev_logits_of(&lexical);
        let t = fit_temperature(&lexical_logits, &dev_y);
        let (full, alone) = (outcomes(&dev_logits, temperature), outcomes(&lexical_logits, t));
        let full_p: Vec<Vec<f32>> = dev_logits.iter().map(|z| softmax(z, temperature)).collect();
        let (threshold, dev_figures) = cascade_threshold(&labels, &full, &full_p, &alone, opts.cascade_tolerance);
        CascadeMeta { temperature: t, threshold, dev: dev_figures }
    });

    // 5. Refit on everything with the chosen settings, keep the temperatures
    //    and the shift.
    let all: Vec<usize> = (0..examples.len()).collect();
    let refit = chosen.refit && !dev_idx.is_empty();
    let rows = if refit { &all } else { &train_idx };
    if refit {
        let meta = HeadMeta { embedding_weight: chosen.embedding_weight, lexical: chosen.lexical, ..base_meta };
        head = fit(examples, &buckets, &y, &all, emb_of, meta, &chosen, &mut progress);
    }
    let final_prior = log_prior_of(rows);
    lean(&mut head.bias, &final_prior);
    if cascade.is_some() {
        let mut lexical = fit(examples, &buckets, &y, rows, no_embedding, lexical_meta, &chosen, &mut progress);
        lean(&mut lexical.bias, &final_prior);
        debug_assert_eq!(lexical.idf, head.idf, "both heads see the same documents");
        head.lexical_only = Some((lexical.w_lex, lexical.bias));
        head.meta.cascade = cascade.clone();
    }
    head.meta.temperature = temperature;
    head.meta.risk_coverage = eval::risk_coverage(&dev_outcomes);
    head.meta.dev_metrics = serde_json::json!({
        "n": dev.n, "accuracy": dev.accuracy, "macro_f1": dev.macro_f1, "ece": dev.ece,
        "balanced": chosen.balanced, "prior_shift": chosen.prior_shift, "prior_shift_scale": shift_scale,
        "l2": chosen.l2,
        "loss": chosen.loss.name(),
    });
    head.meta.version = head.meta.trained_at.replace(['-', ':'], "").trim_end_matches('Z').to_string();
    let report = TrainReport {
        chosen,
        search,
        train_examples: train_idx.len(),
        dev_examples: dev_idx.len(),
        temperature,
        dev,
        cascade,
    };
    Ok((head, report))
}

/// The lowest confidence (0.30, 0.31, … 1.00; 1.01 = never) at which the
/// lexical head's answer may replace the full head's on the dev split with
/// accuracy and macro-F1 each at most `tolerance` below the full head's, and
/// with an *expected* accuracy loss of at most `tolerance` by the full head's
/// own calibrated probabilities `full_p`: where the two heads disagree, a
/// replacement costs p(full's answer) − p(lexical's answer). The labelled
/// check alone is noise on a few hundred dev messages (on the ticket folds it
/// let the lexical head take 89 % of priority decisions at a cost of half a
/// point of accuracy); the expected loss uses every disagreement, labelled
/// right or not. Returns the threshold with the dev figures at it.
fn cascade_threshold(
    labels: &[String],
    full: &[Outcome],
    full_p: &[Vec<f32>],
    lexical: &[Outcome],
    tolerance: f64,
) -> (f32, serde_json::Value) {
    let f = eval::compute(labels, full);
    let alone = eval::compute(labels, lexical);
    let n = full.len().max(1) as f64;
    let mixed = |t: f32| -> (Metrics, usize, f64) {
        let out: Vec<Outcome> =
            full.iter().zip(lexical).map(|(f, l)| if l.confidence >= t { *l } else { *f }).collect();
        let expected_loss: f64 = full
            .iter()
            .zip(lexical)
            .zip(full_p)
            .filter(|((_, l), _)| l.confidence >= t)
            .map(|((f, l), p)| (p[f.predicted] - p[l.predicted]) as f64)
            .sum::<f64>()
            / n;
        (eval::compute(labels, &out), lexical.iter().filter(|l| l.confidence >= t).count(), expected_loss)
    };
    let chosen = (30..=101)
        .map(|p| p as f32 / 100.0)
        .find(|&t| {
            let (m, _, expected_loss) = mixed(t);
            m.accuracy >= f.accuracy - tolerance && m.macro_f1 >= f.macro_f1 - tolerance && expected_loss <= tolerance
        })
        .unwrap_or(1.01);
    let (m, skipped, expected_loss) = mixed(chosen);
    let figures = serde_json::json!({
        "n": full.len(),
        "skipped_share": skipped as f64 / n,
        "tolerance": tolerance,
        "expected_accuracy_loss": expected_loss,
        "full": {"accuracy": f.accuracy, "macro_f1": f.macro_f1},
        "cascade": {"accuracy": m.accuracy, "macro_f1": m.macro_f1, "ece": m.ece},
        "lexical_alone": {"accuracy": alone.accuracy, "macro_f1": alone.macro_f1, "ece": alone.ece},
    });
    (chosen, figures)
}

/// The embedding block as the optimiser sees it: each dimension centred and
/// scaled to unit variance over the training messages, the whole block then
/// scaled to `weight / √dim` (so its expected squared norm is `weight²`, like
/// a lexical block's). Sentence encoders' vectors are anisotropic (e5's pairwise
/// cosines sit around 0.8): most of each vector is a direction every message
/// shares, and the differences that carry the class are small coordinates an
/// L2 penalty keeps the head from using. After fitting, [`Standardiser::fold`]
/// turns the weights back into ones on the raw embedding, so a head's format
/// and inference do not change. A message without an embedding counts as the
/// zero vector, as it does at inference.
struct Standardiser {
    mean: Vec<f32>,
    factor: Vec<f32>,
}

impl Standardiser {
    fn fit(rows: &[Option<&[f32]>], dim: usize, weight: f32) -> Self {
        let (mut sum, mut sq, mut n) = (vec![0.0f64; dim], vec![0.0f64; dim], 0usize);
        for e in rows.iter().flatten() {
            n += 1;
            for ((s, q), &v) in sum.iter_mut().zip(&mut sq).zip(*e) {
                *s += v as f64;
                *q += v as f64 * v as f64;
            }
        }
        let n = n.max(1) as f64;
        let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
        let scale = weight as f64 / (dim as f64).sqrt();
        let factor = sq
            .iter()
            .zip(&mean)
            .map(|(q, m)| {
                let sd = (q / n - m * m).max(0.0).sqrt();
                // A constant dimension carries nothing: leave it at zero.
                if sd > 1e-6 {
                    (scale / sd) as f32
                } else {
                    0.0
                }
            })
            .collect();
        Self { mean: mean.into_iter().map(|m| m as f32).collect(), factor }
    }

    fn apply(&self, e: Option<&[f32]>) -> Vec<f32> {
        let zero = vec![0.0; self.mean.len()];
        let e = e.unwrap_or(&zero);
        e.iter().zip(&self.mean).zip(&self.factor).map(|((v, m), f)| (v - m) * f).collect()
    }

    /// Weights `w` (class-major) on standardised input → weights on the raw
    /// embedding for a head that multiplies it by `embedding_weight`, with the
    /// centring moved into the bias: exact, the logits do not change.
    fn fold(&self, w: &mut [f32], bias: &mut [f32], embedding_weight: f32) {
        let dim = self.mean.len();
        for (k, b) in bias.iter_mut().enumerate() {
            let row = &mut w[k * dim..(k + 1) * dim];
            let mut moved = 0.0f64;
            for ((wj, f), m) in row.iter_mut().zip(&self.factor).zip(&self.mean) {
                let on_raw = *wj * f;
                moved += on_raw as f64 * *m as f64;
                *wj = on_raw / embedding_weight;
            }
            *b -= moved as f32;
        }
    }
}

/// Fits a head on the examples `idx` (IDF from those examples only):
/// minimises Σᵢ cᵢ·lossᵢ + l2/2·‖W‖² (cᵢ the class weight) over the buckets
/// those examples touch. The logistic loss by L-BFGS, biases free; the squared
/// hinge in the dual, its biases penalised like weights (as LinearSVC's):
/// there L-BFGS needed all of its 300 iterations (460 s on 20 Newsgroups), the
/// dual converges exactly in 20–50 passes (19 s, the same figures).
#[allow(clippy::too_many_arguments)]
fn fit<'a>(
    examples: &[Example],
    buckets: &[Vec<u32>],
    y: &[usize],
    idx: &[usize],
    emb_of: impl Fn(usize) -> Option<&'a [f32]>,
    meta: HeadMeta,
    opts: &TrainOptions,
    progress: &mut impl FnMut(&str, usize, usize),
) -> Head {
    let c = meta.labels.len();
    let dim = meta.embedding_dim;
    let lexdim = meta.lexical.dim();
    let docs: Vec<Vec<u32>> = idx.iter().map(|&i| buckets[i].clone()).collect();
    let idf = lexical::idf(&docs, lexdim);
    let mut head = Head {
        meta,
        w_emb: vec![0.0; c * dim],
        w_lex: vec![0.0; lexdim * c],
        bias: vec![0.0; c],
        idf,
        lexical_only: None,
    };
    // Buckets no training example touches keep weight 0 (their gradient is
    // only the L2 term): optimise over the touched ones, renumbered densely.
    let xs: Vec<Sparse> = idx.iter().map(|&i| head.lexical_terms(&examples[i].terms)).collect();
    let used: Vec<u32> = xs.iter().flatten().map(|e| e.0).collect::<BTreeSet<_>>().into_iter().collect();
    let xs: Vec<Sparse> = xs
        .into_iter()
        .map(|x| x.into_iter().map(|(b, v)| (used.binary_search(&b).expect("collected above") as u32, v)).collect())
        .collect();
    let we = head.meta.embedding_weight;
    let raw: Vec<Option<&[f32]>> = idx.iter().map(|&i| emb_of(i)).collect();
    let standard = (dim > 0 && we > 0.0).then(|| Standardiser::fit(&raw, dim, we));
    let std_rows: Vec<Vec<f32>> = match &standard {
        Some(st) => raw.iter().map(|e| st.apply(*e)).collect(),
        None => Vec::new(),
    };
    let embs: Vec<Option<&[f32]>> =
        if standard.is_some() { std_rows.iter().map(|v| Some(v.as_slice())).collect() } else { vec![None; idx.len()] };

    let mut counts = vec![0usize; c];
    idx.iter().for_each(|&i| counts[y[i]] += 1);
    let class_weight: Vec<f64> = counts
        .iter()
        .map(|&n| if opts.balanced && n > 0 { idx.len() as f64 / (c as f64 * n as f64) } else { 1.0 })
        .collect();

    // θ = [w_emb (c × dim) | w_lex (used × c) | bias (c)]
    let (n_emb, n_lex) = (c * dim, used.len() * c);
    let n_params = n_emb + n_lex + c;
    let mut theta = vec![0.0f32; n_params];
    match opts.loss {
        Loss::Logistic => {
            let l2 = opts.l2 as f64;
            // The loss and gradient of the messages `part` (unregularised), added
            // into `grad`.
            let partial = |theta: &[f32], part: std::ops::Range<usize>, grad: &mut [f32]| -> f64 {
                let (w_emb, rest) = theta.split_at(n_emb);
                let (w_lex, bias) = rest.split_at(n_lex);
                let (g_emb, g_rest) = grad.split_at_mut(n_emb);
                let (g_lex, g_bias) = g_rest.split_at_mut(n_lex);
                let mut loss = 0.0f64;
                let mut z = vec![0.0f32; c];
                for o in part {
                    let truth = y[idx[o]];
                    z.copy_from_slice(bias);
                    if let Some(e) = embs[o] {
                        for (k, zk) in z.iter_mut().enumerate() {
                            *zk += w_emb[k * dim..(k + 1) * dim].iter().zip(e).map(|(a, b)| a * b).sum::<f32>();
                        }
                    }
                    for &(b, v) in &xs[o] {
                        let row = &w_lex[b as usize * c..(b as usize + 1) * c];
                        z.iter_mut().zip(row).for_each(|(zk, w)| *zk += v * w);
                    }
                    let cw = class_weight[truth];
                    // z becomes the residual ∂loss/∂z.
                    let max = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    let sum: f64 = z.iter().map(|&v| ((v - max) as f64).exp()).sum();
                    loss += cw * (sum.ln() + (max - z[truth]) as f64);
                    for (k, zk) in z.iter_mut().enumerate() {
                        let p = ((*zk - max) as f64).exp() / sum;
                        *zk = (cw * (p - (k == truth) as u8 as f64)) as f32;
                    }
                    g_bias.iter_mut().zip(&z).for_each(|(g, r)| *g += r);
                    if let Some(e) = embs[o] {
                        for (k, &r) in z.iter().enumerate() {
                            g_emb[k * dim..(k + 1) * dim].iter_mut().zip(e).for_each(|(g, x)| *g += r * x);
                        }
                    }
                    for &(b, v) in &xs[o] {
                        let row = &mut g_lex[b as usize * c..(b as usize + 1) * c];
                        row.iter_mut().zip(&z).for_each(|(g, r)| *g += v * r);
                    }
                }
                loss
            };
            let threads = opts.threads.clamp(1, idx.len().max(1));
            // Gradient buffers of the helper threads, allocated once.
            let mut scratch = vec![vec![0.0f32; n_params]; threads - 1];
            let objective = |theta: &[f32], grad: &mut [f32]| -> f64 {
                grad.fill(0.0);
                let per = idx.len().div_ceil(threads);
                let mut loss = std::thread::scope(|s| {
                    let helpers: Vec<_> = scratch
                        .iter_mut()
                        .enumerate()
                        .map(|(t, buf)| {
                            let part = ((t + 1) * per).min(idx.len())..((t + 2) * per).min(idx.len());
                            s.spawn(move || {
                                buf.fill(0.0);
                                partial(theta, part, buf)
                            })
                        })
                        .collect();
                    let mut loss = partial(theta, 0..per.min(idx.len()), grad);
                    for h in helpers {
                        loss += h.join().expect("a training thread panicked");
                    }
                    loss
                });
                for buf in &scratch {
                    grad.iter_mut().zip(buf).for_each(|(g, b)| *g += b);
                }
                let w = &theta[..n_emb + n_lex];
                loss += l2 / 2.0 * w.iter().map(|&v| v as f64 * v as f64).sum::<f64>();
                grad[..n_emb + n_lex].iter_mut().zip(w).for_each(|(g, &v)| *g += (l2 * v as f64) as f32);
                loss
            };
            let stop = lbfgs::Stop { max_iterations: opts.max_iterations, gradient: 1e-4, relative_decrease: 1e-7 };
            let total = opts.max_iterations;
            lbfgs::minimize(&mut theta, 8, stop, objective, |it| progress("iteration", it, total));
        }
        Loss::SquaredHinge => {
            let rows: Vec<dual_cd::Row> =
                (0..idx.len()).map(|o| dual_cd::Row { dense: embs[o].unwrap_or(&[]), sparse: &xs[o] }).collect();
            let n_dense = if standard.is_some() { dim } else { 0 };
            let solutions = fit_hinge_dual(
                &rows,
                n_dense,
                used.len(),
                &idx.iter().map(|&i| y[i]).collect::<Vec<_>>(),
                c,
                &class_weight,
                opts,
            );
            for (k, sol) in solutions.into_iter().enumerate() {
                for (j, v) in sol.dense.iter().enumerate() {
                    theta[k * dim + j] = *v as f32;
                }
                for (j, v) in sol.sparse.iter().enumerate() {
                    theta[n_emb + j * c + k] = *v as f32;
                }
                theta[n_emb + n_lex + k] = sol.bias as f32;
            }
        }
    }
    progress("fit", 1, 1);
    let (w_emb, rest) = theta.split_at(n_emb);
    let (w_lex, bias) = rest.split_at(n_lex);
    head.w_emb.copy_from_slice(w_emb);
    head.bias.copy_from_slice(bias);
    if let Some(st) = &standard {
        st.fold(&mut head.w_emb, &mut head.bias, we);
    }
    for (j, &b) in used.iter().enumerate() {
        head.w_lex[b as usize * c..(b as usize + 1) * c].copy_from_slice(&w_lex[j * c..(j + 1) * c]);
    }
    head
}

/// The one-vs-rest squared hinge, one dual problem per class, the classes
/// spread over `opts.threads` threads. Class k's problem weighs message i by
/// Cᵢ = class_weight[yᵢ] / l2, which is `fit`'s objective divided by l2.
fn fit_hinge_dual(
    rows: &[dual_cd::Row],
    n_dense: usize,
    n_sparse: usize,
    y: &[usize],
    classes: usize,
    class_weight: &[f64],
    opts: &TrainOptions,
) -> Vec<dual_cd::Solution> {
    let norms = dual_cd::squared_norms(rows);
    let cost: Vec<f64> = y.iter().map(|&k| class_weight[k] / opts.l2 as f64).collect();
    let stop = dual_cd::Stop { tolerance: DUAL_TOLERANCE, max_epochs: DUAL_MAX_EPOCHS };
    let threads = opts.threads.clamp(1, classes);
    let solve = |k: usize| {
        let positive: Vec<bool> = y.iter().map(|&t| t == k).collect();
        dual_cd::solve(rows, &norms, (n_dense, n_sparse), &positive, &cost, stop, opts.seed.wrapping_add(k as u64))
    };
    let mut solutions: Vec<Option<dual_cd::Solution>> = vec![None; classes];
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let solve = &solve;
                s.spawn(move || (t..classes).step_by(threads).map(|k| (k, solve(k))).collect::<Vec<_>>())
            })
            .collect();
        for w in workers {
            for (k, sol) in w.join().expect("a training thread panicked") {
                solutions[k] = Some(sol);
            }
        }
    });
    solutions.into_iter().map(|s| s.expect("every class solved")).collect()
}

/// LIBLINEAR's stopping tolerance for this solver is 0.1 by default and
/// scikit-learn's LinearSVC uses 1e-4; on a tickets fold 1e-4 gave the same
/// figures as 1e-3 (to four decimals) in 1.3× the passes.
const DUAL_TOLERANCE: f64 = 1e-3;
/// Passes over the data at most per class (it converges in far fewer).
const DUAL_MAX_EPOCHS: usize = 1000;

/// The temperature minimising negative log-likelihood on held-out logits
/// (golden-section search over ln T in [ln 0.02, ln 50]).
pub fn fit_temperature(logits: &[Vec<f32>], y: &[usize]) -> f32 {
    let nll = |ln_t: f64| -> f64 {
        let t = ln_t.exp() as f32;
        logits.iter().zip(y).map(|(z, &k)| -(softmax(z, t)[k].max(1e-12) as f64).ln()).sum::<f64>()
    };
    let (mut a, mut b) = (0.02f64.ln(), 50f64.ln());
    let r = (5f64.sqrt() - 1.0) / 2.0;
    let (mut c, mut d) = (b - r * (b - a), a + r * (b - a));
    let (mut fc, mut fd) = (nll(c), nll(d));
    for _ in 0..60 {
        if fc < fd {
            b = d;
            d = c;
            fd = fc;
            c = b - r * (b - a);
            fc = nll(c);
        } else {
            a = c;
            c = d;
            fc = fd;
            d = a + r * (b - a);
            fd = nll(d);
        }
    }
    ((a + b) / 2.0).exp() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOY: LexicalConfig = LexicalConfig { bits: 12, word_weight: 1.0, char_weight: 1.0, word_ngrams: 3 };

    fn toy() -> Vec<Example> {
        let mut v = Vec::new();
        let billing = [
            "invoice overdue payment",
            "refund my payment please",
            "billing question about invoice",
            "charged twice on my card",
        ];
        let support =
            ["server outage error 500", "login page broken error", "app crashes on start", "cannot connect vpn error"];
        for r in 0..6 {
            for t in billing {
                v.push(Example::new(&format!("{t} {r}"), "billing", &TOY));
            }
            for t in support {
                v.push(Example::new(&format!("{t} {r}"), "support", &TOY));
            }
        }
        v
    }

    fn prov() -> Provenance {
        Provenance { label_field: "queue".into(), encoder: None, max_tokens: 256, precision: None, input_prefix: None }
    }

    #[test]
    fn learns_a_separable_toy_problem_and_is_deterministic() {
        let opts = TrainOptions { lexical: TOY, ..Default::default() };
        let (head, report) = train(&toy(), None, prov(), &opts, |_, _, _| {}).unwrap();
        assert_eq!(report.dev.accuracy, 1.0);
        let p = head.predict(None, &head.lexical("my invoice payment was refused"));
        assert_eq!(p.label, "billing");
        let p = head.predict(None, &head.lexical("error: the server is down"));
        assert_eq!(p.label, "support");
        let (again, _) = train(&toy(), None, prov(), &opts, |_, _, _| {}).unwrap();
        assert!(head.w_lex == again.w_lex, "training is not deterministic");
    }

    #[test]
    fn squared_hinge_separates_the_toy_problem_with_a_margin() {
        let opts = TrainOptions { lexical: TOY, loss: Loss::SquaredHinge, l2: 0.01, ..Default::default() };
        let (head, report) = train(&toy(), None, prov(), &opts, |_, _, _| {}).unwrap();
        assert_eq!(report.dev.accuracy, 1.0);
        assert_eq!(head.meta.dev_metrics["loss"], "squared_hinge");
        // One-vs-rest scores: near +1 for the true class, near −1 for the other.
        for e in toy() {
            let z = head.logits(None, &head.lexical_terms(&e.terms));
            let truth = usize::from(e.label == "support");
            assert!(z[truth] > 0.8 && z[1 - truth] < -0.8, "{z:?} for {}", e.label);
        }
        assert_eq!(Loss::from_name("squared_hinge"), Some(Loss::SquaredHinge));
        assert_eq!(Loss::from_name(Loss::Logistic.name()), Some(Loss::Logistic));
        assert_eq!(Loss::from_name("hinge"), None);
        let unpenalised = TrainOptions { l2: 0.0, ..opts.clone() };
        assert!(matches!(train(&toy(), None, prov(), &unpenalised, |_, _, _| {}), Err(TrainError::NoPenalty(_))));
        // The report's JSON (serde) and the head's metadata (`name`) spell it alike.
        for l in Loss::ALL {
            assert_eq!(serde_json::to_value(l).unwrap(), l.name());
        }
    }

    #[test]
    fn cascade_threshold_counts_the_full_heads_belief_not_only_the_dev_labels() {
        let labels = vec!["a".to_string(), "b".to_string()];
        let out = |truth, predicted, confidence| Outcome { truth: Some(truth), predicted, confidence };
        // The full head is sure of `a`, the lexical one of `b`, and the dev
        // labels happen to side with the lexical head: the labelled check
        // alone would hand it every message.
        let full = vec![out(1, 0, 0.9); 40];
        let full_p = vec![vec![0.9, 0.1]; 40];
        let lexical = vec![out(1, 1, 0.95); 40];
        let (t, figures) = cascade_threshold(&labels, &full, &full_p, &lexical, 0.005);
        assert!(t > 0.95, "{figures}");
        assert_eq!(figures["skipped_share"], 0.0);
        // Where the two heads agree, replacing costs nothing: lowest threshold.
        let agree = vec![out(0, 0, 0.95); 40];
        let (t, figures) = cascade_threshold(&labels, &full, &full_p, &agree, 0.005);
        assert_eq!(t, 0.30);
        assert_eq!(figures["skipped_share"], 1.0);
        assert_eq!(figures["expected_accuracy_loss"], 0.0);
    }

    #[test]
    fn search_tries_each_candidate_and_keeps_the_best() {
        let opts = TrainOptions { search: true, lexical: TOY, ..Default::default() };
        let (head, report) = train(&toy(), None, prov(), &opts, |_, _, _| {}).unwrap();
        assert_eq!(report.search.len(), 4); // char block on/off × balanced on/off, no embedding
        let best = report.search.iter().map(|(_, s)| *s).fold(f64::MIN, f64::max);
        assert_eq!(
            report
                .search
                .iter()
                .find(|(_, s)| *s == best)
                .map(|(n, _)| n.contains(&format!("char_weight={}", report.chosen.lexical.char_weight))),
            Some(true)
        );
        assert_eq!(head.meta.lexical.char_weight, report.chosen.lexical.char_weight);
    }

    #[test]
    fn learns_from_the_embedding_alone_when_the_words_say_nothing() {
        // The same words for both classes; the class is in a small coordinate
        // on top of a large shared direction, as in real sentence embeddings.
        let mut rng = Rng::new(3);
        let (mut examples, mut embeddings) = (Vec::new(), Vec::new());
        for i in 0..80 {
            let label = if i % 2 == 0 { "a" } else { "b" };
            examples.push(Example::new("hello there", label, &TOY));
            let jitter = |r: &mut Rng| (r.next_u64() % 1000) as f32 / 1e5;
            let sign = if i % 2 == 0 { 1.0 } else { -1.0 };
            embeddings.push(vec![0.9 + jitter(&mut rng), 0.05 * sign + jitter(&mut rng), jitter(&mut rng)]);
        }
        let opts = TrainOptions { lexical: TOY, cascade_tolerance: -1.0, ..Default::default() };
        let (head, report) = train(&examples, Some(&embeddings), prov(), &opts, |_, _, _| {}).unwrap();
        assert_eq!(report.dev.accuracy, 1.0);
        let terms = head.lexical("hello there");
        assert_eq!(head.predict(Some(&[0.9, 0.05, 0.0]), &terms).label, "a");
        assert_eq!(head.predict(Some(&[0.9, -0.05, 0.0]), &terms).label, "b");
    }

    #[test]
    fn folding_the_standardisation_keeps_the_logits() {
        let mut rng = Rng::new(11);
        let mut r = move || (rng.next_u64() % 2001) as f32 / 1000.0 - 1.0;
        let (dim, c) = (5, 3);
        let rows: Vec<Vec<f32>> = (0..20).map(|_| (0..dim).map(|_| 0.5 + 0.1 * r()).collect()).collect();
        let refs: Vec<Option<&[f32]>> = rows.iter().map(|v| Some(v.as_slice())).collect();
        let st = Standardiser::fit(&refs, dim, 1.0);
        let (mut w, mut b): (Vec<f32>, Vec<f32>) = ((0..c * dim).map(|_| r()).collect(), (0..c).map(|_| r()).collect());
        let standard: Vec<Vec<f32>> = rows
            .iter()
            .map(|e| {
                let x = st.apply(Some(e));
                (0..c).map(|k| b[k] + (0..dim).map(|j| w[k * dim + j] * x[j]).sum::<f32>()).collect()
            })
            .collect();
        let weight = 2.0;
        st.fold(&mut w, &mut b, weight);
        for (e, want) in rows.iter().zip(&standard) {
            for k in 0..c {
                let got = b[k] + weight * (0..dim).map(|j| w[k * dim + j] * e[j]).sum::<f32>();
                assert!((got - want[k]).abs() < 1e-3, "{got} vs {}", want[k]);
            }
        }
    }

    #[test]
    fn prior_shift_adds_the_log_class_frequencies_to_the_bias() {
        let mut examples = toy();
        // 3 billing for every support message: an imbalanced problem.
        let extra: Vec<Example> = toy().into_iter().filter(|e| e.label == "billing").collect();
        examples.extend(extra.iter().cloned().chain(extra.iter().cloned()));
        let plain = TrainOptions { lexical: TOY, ..Default::default() };
        let shifted = TrainOptions { prior_shift: 1.0, ..plain.clone() };
        let (a, _) = train(&examples, None, prov(), &plain, |_, _, _| {}).unwrap();
        let (b, _) = train(&examples, None, prov(), &shifted, |_, _, _| {}).unwrap();
        let n = examples.len() as f32;
        let billing = examples.iter().filter(|e| e.label == "billing").count() as f32;
        let want = [(billing / n).ln(), ((n - billing) / n).ln()]; // labels sorted: billing, support

        // In calibrated log-odds: scaled by the temperature fitted before the shift.
        let scale = b.meta.dev_metrics["prior_shift_scale"].as_f64().unwrap() as f32;
        assert!(scale > 0.0 && scale < 1.0, "a hinge head's scores are margins: {scale}");
        assert_eq!(a.meta.dev_metrics["prior_shift_scale"], 1.0);
        for (k, w) in want.iter().enumerate() {
            assert!((b.bias[k] - a.bias[k] - scale * w).abs() < 1e-5, "class {k}");
        }
        assert!(a.w_lex == b.w_lex);
    }

    #[test]
    fn threads_only_split_the_work() {
        let one = TrainOptions { lexical: TOY, ..Default::default() };
        let two = TrainOptions { threads: 2, ..one.clone() };
        let (a, _) = train(&toy(), None, prov(), &one, |_, _, _| {}).unwrap();
        let (b, _) = train(&toy(), None, prov(), &two, |_, _, _| {}).unwrap();
        let gap = a.w_lex.iter().zip(&b.w_lex).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(gap < 1e-3, "{gap}");
    }

    #[test]
    fn temperature_recovers_a_known_scale() {
        // Logits drawn so that the true temperature is 2: softmax(z/2) is the data distribution.
        let mut rng = Rng::new(7);
        let (mut logits, mut y) = (Vec::new(), Vec::new());
        for _ in 0..4000 {
            let z: Vec<f32> = (0..3).map(|_| (rng.next_u64() % 1000) as f32 / 100.0).collect();
            let p = softmax(&z, 2.0);
            let u = (rng.next_u64() % 1_000_000) as f32 / 1e6;
            let k = if u < p[0] {
                0
            } else if u < p[0] + p[1] {
                1
            } else {
                2
            };
            logits.push(z);
            y.push(k);
        }
        let t = fit_temperature(&logits, &y);
        assert!((t - 2.0).abs() < 0.25, "{t}");
    }

    #[test]
    fn split_is_stratified_and_keeps_every_class_in_train() {
        let y: Vec<usize> = (0..100).map(|i| if i < 90 { 0 } else { 1 }).collect();
        let (tr, dev) = stratified_split(&y, 2, 0.2, 1);
        assert_eq!(tr.len() + dev.len(), 100);
        assert_eq!(dev.iter().filter(|&&i| y[i] == 1).count(), 2);
        assert!(tr.iter().any(|&i| y[i] == 1));
        assert!(train(
            &[Example::new("x", "a", &LexicalConfig::default())],
            None,
            prov(),
            &TrainOptions::default(),
            |_, _, _| {}
        )
        .is_err());
    }
}
