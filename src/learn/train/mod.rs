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

pub mod calibrate;
pub mod dataset;
pub mod dual_cd;
pub mod eval;
pub mod fit;
pub mod lbfgs;
pub mod options;
pub mod retrain;
pub mod rng;
pub mod split;

use std::collections::BTreeSet;

use self::eval::Outcome;
use crate::model::head::{softmax, CascadeMeta, Head, HeadMeta};

pub use calibrate::fit_temperature;
pub use options::{Example, Loss, Provenance, TrainError, TrainOptions, TrainReport};
pub use split::stratified_split;

use calibrate::encoder_gate;
use fit::fit;

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
    //    lexical margin from which the encoder is not worth running.
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
        let lexical_p: Vec<Vec<f32>> = lexical_logits.iter().map(|z| softmax(z, t)).collect();
        let (margin, dev_figures) = encoder_gate(&labels, &full, &full_p, &alone, &lexical_p, opts.cascade_tolerance);
        // Above 1 no confidence passes: a binary that predates the margin
        // gate runs the encoder on every message rather than misread it.
        CascadeMeta { temperature: t, threshold: 1.01, margin: margin.is_finite().then_some(margin), dev: dev_figures }
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

#[cfg(test)]
mod tests {
    use super::fit::Standardiser;
    use super::rng::Rng;
    use super::*;
    use crate::model::lexical::LexicalConfig;

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
    fn the_encoder_gate_counts_the_full_heads_belief_not_only_the_dev_labels() {
        let labels = vec!["a".to_string(), "b".to_string()];
        let out = |truth, predicted, confidence| Outcome { truth: Some(truth), predicted, confidence };
        // The full head is sure of `a`, the lexical one of `b`, and the dev
        // labels happen to side with the lexical head: the labelled check
        // alone would hand it every message.
        let full = vec![out(1, 0, 0.9); 40];
        let full_p = vec![vec![0.9, 0.1]; 40];
        let lexical = vec![out(1, 1, 0.95); 40];
        let lexical_p = vec![vec![0.05, 0.95]; 40];
        let (m, figures) = encoder_gate(&labels, &full, &full_p, &lexical, &lexical_p, 0.005);
        assert!(m.is_infinite(), "{figures}");
        assert_eq!(figures["encoder_share"], 1.0);
        // Where the two heads agree, skipping costs nothing: every message.
        let agree = vec![out(0, 0, 0.95); 40];
        let agree_p = vec![vec![0.95, 0.05]; 40];
        let (m, figures) = encoder_gate(&labels, &full, &full_p, &agree, &agree_p, 0.005);
        assert!((m - 0.9).abs() < 1e-6, "{figures}");
        assert_eq!(figures["skipped_share"], 1.0);
        assert_eq!(figures["expected_accuracy_loss"], 0.0);
    }

    #[test]
    fn the_encoder_runs_where_the_lexical_margin_is_narrow_and_it_flips_answers() {
        let labels = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let out = |truth, predicted, confidence| Outcome { truth: Some(truth), predicted, confidence };
        let (mut full, mut full_p, mut lexical, mut lexical_p) = (vec![], vec![], vec![], vec![]);
        for i in 0..100 {
            if i % 2 == 0 {
                // Wide margin at a low confidence (0.5 against 0.25): they agree.
                full.push(out(0, 0, 0.9));
                full_p.push(vec![0.9, 0.05, 0.05]);
                lexical.push(out(0, 0, 0.5));
                lexical_p.push(vec![0.5, 0.25, 0.25]);
            } else {
                // Narrow margin (0.45 against 0.40): the encoder flips it, rightly.
                full.push(out(2, 2, 0.8));
                full_p.push(vec![0.1, 0.1, 0.8]);
                lexical.push(out(2, 1, 0.45));
                lexical_p.push(vec![0.15, 0.45, 0.40]);
            }
        }
        let (m, figures) = encoder_gate(&labels, &full, &full_p, &lexical, &lexical_p, 0.003);
        assert!((m - 0.25).abs() < 1e-6, "skip from the wide margins: {figures}");
        assert_eq!(figures["encoder_share"], 0.5);
        assert_eq!(figures["cascade"]["accuracy"], figures["full"]["accuracy"]);
        let flips = figures["flips"].as_array().unwrap();
        let narrow = &flips[0];
        assert_eq!(narrow["flips"], 1.0, "{figures}");
        assert_eq!(narrow["right_flips"], 1.0);
        assert_eq!(flips.last().unwrap()["flips"], 0.0);
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
    fn one_class_is_not_enough() {
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
