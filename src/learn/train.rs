//! Learning a head from labeled mail.
//!
//! Multinomial logistic regression over `[embedding · w_e ; word n-grams ;
//! char n-grams]`, trained with per-coordinate AdaGrad (sparse-friendly: a
//! step touches only the buckets a message has), L2 regularisation and
//! class weights for imbalance. A stratified dev split is held back to fit the
//! softmax temperature (calibration) and to report figures; the head is then
//! refitted on all the data with the same settings and that temperature.

use std::collections::BTreeSet;

use serde::Serialize;
use thiserror::Error;

use crate::learn::eval::{self, Metrics, Outcome};
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

#[derive(Debug, Clone, Serialize)]
pub struct TrainOptions {
    pub epochs: usize,
    pub learning_rate: f32,
    pub l2: f32,
    /// Share of each class held back for calibration and dev figures.
    pub dev_fraction: f32,
    pub seed: u64,
    /// Weight classes by n / (classes · n_class), so small departments count.
    pub balanced: bool,
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
            epochs: 12,
            learning_rate: 0.3,
            l2: 1e-6,
            dev_fraction: 0.15,
            seed: 42,
            balanced: true,
            embedding_weight: 1.0,
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
                let weights: &[f32] = if with_embedding { &[1.0, 3.0] } else { &[1.0] };
                for &embedding_weight in weights {
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

/// A tiny deterministic PRNG (xorshift64*): the split and the example order
/// must be reproducible from the seed alone.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

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
/// a lexical-only head. `progress(done, total)` is called once per epoch.
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
    let buckets: Vec<Vec<u32>> = examples.iter().map(|e| e.terms.buckets()).collect();

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
    let (_, chosen, mut head, dev_logits) = best.expect("at least one candidate");

    // 2. Calibrate on the dev part and measure there.
    let temperature = if dev_idx.is_empty() { 1.0 } else { fit_temperature(&dev_logits, &dev_y) };
    let dev_outcomes = outcomes(&dev_logits, temperature);
    let dev = eval::compute(&labels, &dev_outcomes);

    // 3. The cascade: a lexical-only head with the same settings, and the
    //    lowest confidence at which it may decide alone.
    let lexical_meta = HeadMeta { encoder: None, embedding_dim: 0, lexical: chosen.lexical, ..base_meta.clone() };
    let no_embedding = |_: usize| -> Option<&[f32]> { None };
    let cascade = (dim > 0 && !dev_idx.is_empty() && opts.cascade_tolerance >= 0.0).then(|| {
        let lexical =
            fit(examples, &buckets, &y, &train_idx, no_embedding, lexical_meta.clone(), &chosen, &mut progress);
        let lexical_logits = dev_logits_of(&lexical);
        let t = fit_temperature(&lexical_logits, &dev_y);
        let (full, alone) = (outcomes(&dev_logits, temperature), outcomes(&lexical_logits, t));
        let (threshold, dev_figures) = cascade_threshold(&labels, &full, &alone, opts.cascade_tolerance);
        CascadeMeta { temperature: t, threshold, dev: dev_figures }
    });

    // 4. Refit on everything with the chosen settings, keep the temperatures.
    let all: Vec<usize> = (0..examples.len()).collect();
    let refit = chosen.refit && !dev_idx.is_empty();
    if refit {
        let meta = HeadMeta { embedding_weight: chosen.embedding_weight, lexical: chosen.lexical, ..base_meta };
        head = fit(examples, &buckets, &y, &all, emb_of, meta, &chosen, &mut progress);
    }
    if cascade.is_some() {
        let rows = if refit { &all } else { &train_idx };
        let lexical = fit(examples, &buckets, &y, rows, no_embedding, lexical_meta, &chosen, &mut progress);
        debug_assert_eq!(lexical.idf, head.idf, "both heads see the same documents");
        head.lexical_only = Some((lexical.w_lex, lexical.bias));
        head.meta.cascade = cascade.clone();
    }
    head.meta.temperature = temperature;
    head.meta.risk_coverage = eval::risk_coverage(&dev_outcomes);
    head.meta.dev_metrics = serde_json::json!({
        "n": dev.n, "accuracy": dev.accuracy, "macro_f1": dev.macro_f1, "ece": dev.ece,
        "balanced": chosen.balanced,
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
/// accuracy and macro-F1 each at most `tolerance` below the full head's.
/// Returns it with the dev figures at that threshold.
fn cascade_threshold(
    labels: &[String],
    full: &[Outcome],
    lexical: &[Outcome],
    tolerance: f64,
) -> (f32, serde_json::Value) {
    let f = eval::compute(labels, full);
    let alone = eval::compute(labels, lexical);
    let mixed = |t: f32| -> (Metrics, usize) {
        let out: Vec<Outcome> =
            full.iter().zip(lexical).map(|(f, l)| if l.confidence >= t { *l } else { *f }).collect();
        (eval::compute(labels, &out), lexical.iter().filter(|l| l.confidence >= t).count())
    };
    let chosen = (30..=101)
        .map(|p| p as f32 / 100.0)
        .find(|&t| {
            let (m, _) = mixed(t);
            m.accuracy >= f.accuracy - tolerance && m.macro_f1 >= f.macro_f1 - tolerance
        })
        .unwrap_or(1.01);
    let (m, skipped) = mixed(chosen);
    let figures = serde_json::json!({
        "n": full.len(),
        "skipped_share": skipped as f64 / full.len().max(1) as f64,
        "tolerance": tolerance,
        "full": {"accuracy": f.accuracy, "macro_f1": f.macro_f1},
        "cascade": {"accuracy": m.accuracy, "macro_f1": m.macro_f1, "ece": m.ece},
        "lexical_alone": {"accuracy": alone.accuracy, "macro_f1": alone.macro_f1, "ece": alone.ece},
    });
    (chosen, figures)
}

/// AdaGrad on the examples `idx`, IDF from those examples only.
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
    let xs: Vec<Sparse> = idx.iter().map(|&i| head.lexical_terms(&examples[i].terms)).collect();

    let mut counts = vec![0usize; c];
    idx.iter().for_each(|&i| counts[y[i]] += 1);
    let class_weight: Vec<f32> = counts
        .iter()
        .map(|&n| if opts.balanced && n > 0 { idx.len() as f32 / (c as f32 * n as f32) } else { 1.0 })
        .collect();

    // AdaGrad accumulators, started at a small value so the first steps are bounded.
    let (mut g_emb, mut g_lex, mut g_b) = (vec![1e-2f32; c * dim], vec![1e-2f32; lexdim * c], vec![1e-2f32; c]);
    let lr = opts.learning_rate;
    let we = head.meta.embedding_weight;
    let mut order: Vec<usize> = (0..idx.len()).collect();
    let mut rng = Rng::new(opts.seed ^ 0x5eed);
    for epoch in 0..opts.epochs {
        rng.shuffle(&mut order);
        for &o in &order {
            let i = idx[o];
            let e = emb_of(i);
            let p = softmax(&head.logits(e, &xs[o]), 1.0);
            let cw = class_weight[y[i]];
            for k in 0..c {
                let g = cw * (p[k] - (k == y[i]) as u8 as f32);
                g_b[k] += g * g;
                head.bias[k] -= lr * g / g_b[k].sqrt();
                if let Some(e) = e {
                    for j in 0..dim {
                        let w = &mut head.w_emb[k * dim + j];
                        let gj = g * we * e[j] + opts.l2 * *w;
                        let acc = &mut g_emb[k * dim + j];
                        *acc += gj * gj;
                        *w -= lr * gj / acc.sqrt();
                    }
                }
                for &(b, v) in &xs[o] {
                    let at = b as usize * c + k;
                    let gj = g * v + opts.l2 * head.w_lex[at];
                    g_lex[at] += gj * gj;
                    head.w_lex[at] -= lr * gj / g_lex[at].sqrt();
                }
            }
        }
        progress("epoch", epoch + 1, opts.epochs);
    }
    head
}

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

    const TOY: LexicalConfig = LexicalConfig { bits: 12, word_weight: 1.0, char_weight: 1.0 };

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
