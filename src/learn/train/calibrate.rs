//! After fitting, on the held-back dev split: the softmax temperature that
//! makes the head's confidences honest, and the confidence above which the
//! lexical head may decide without the encoder (the cascade).

use super::eval::{self, Metrics, Outcome};
use crate::model::head::softmax;

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
pub(super) fn cascade_threshold(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learn::train::rng::Rng;

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
}
