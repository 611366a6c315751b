//! After fitting, on the held-back dev split: the softmax temperature that
//! makes the head's confidences honest, and the lexical margin above which
//! the lexical head decides without the encoder (the cascade's gate).

use super::eval::{self, Metrics, Outcome};
use crate::model::head::{margin, softmax};

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

/// Margin bins the flip table reports (dev quantiles).
const FLIP_BINS: usize = 10;

/// Where the encoder is worth running: the lowest lexical margin at or
/// above which the lexical head's answer replaces the full head's (`INFINITY`:
/// never), chosen by what the encoder is expected to change there.
///
/// On the dev split, skipping the encoder for a message costs, in
/// expectation under the full head's calibrated belief `full_p`,
/// p(full's answer) − p(lexical's answer): zero where they agree, and where
/// they disagree the weight the full head puts on its flip being right
/// (labelled right or not, so a few hundred dev messages are not all noise).
/// That cost falls with the lexical margin, so messages are skipped from
/// the widest margin down — among the dev margins' percentiles, the lowest
/// threshold where the expected accuracy loss, the labelled accuracy loss
/// and the labelled macro-F1 loss each stay within `tolerance`.
///
/// A margin, not the top confidence: with many departments a confident
/// answer can still have a close runner-up, and a low-confidence one
/// can be far ahead of the rest (45 % against 10 % is a sure call). The
/// returned figures hold the flip table (per margin decile: share, how
/// often the encoder flips the answer, how often the flip is right or
/// wrong, the expected gain) and the cascade's dev figures at the threshold.
pub(super) fn encoder_gate(
    labels: &[String],
    full: &[Outcome],
    full_p: &[Vec<f32>],
    lexical: &[Outcome],
    lexical_p: &[Vec<f32>],
    tolerance: f64,
) -> (f32, serde_json::Value) {
    let f = eval::compute(labels, full);
    let alone = eval::compute(labels, lexical);
    let n = full.len().max(1) as f64;
    let margins: Vec<f32> = lexical_p.iter().map(|p| margin(p)).collect();
    // What running the encoder is expected to gain on each message.
    let gain: Vec<f64> =
        full.iter().zip(lexical).zip(full_p).map(|((f, l), p)| (p[f.predicted] - p[l.predicted]) as f64).collect();
    let mixed = |t: f32| -> (Metrics, usize, f64) {
        let skip = |i: usize| margins[i] >= t;
        let out: Vec<Outcome> = (0..full.len()).map(|i| if skip(i) { lexical[i] } else { full[i] }).collect();
        let expected_loss: f64 = (0..full.len()).filter(|&i| skip(i)).map(|i| gain[i]).sum::<f64>() / n;
        (eval::compute(labels, &out), (0..full.len()).filter(|&i| skip(i)).count(), expected_loss)
    };
    let mut sorted = margins.clone();
    sorted.sort_by(f32::total_cmp);
    let quantile = |q: usize| sorted.get((q * sorted.len().saturating_sub(1)) / 100).copied();
    let mut candidates: Vec<f32> = (0..=100).filter_map(quantile).collect();
    candidates.dedup();
    candidates.push(f32::INFINITY);
    let chosen = candidates
        .into_iter()
        .find(|&t| {
            let (m, _, expected_loss) = mixed(t);
            m.accuracy >= f.accuracy - tolerance && m.macro_f1 >= f.macro_f1 - tolerance && expected_loss <= tolerance
        })
        .unwrap_or(f32::INFINITY);
    let (m, skipped, expected_loss) = mixed(chosen);
    let figures = serde_json::json!({
        "n": full.len(),
        "gate": "margin",
        "margin": if chosen.is_finite() { serde_json::json!(chosen) } else { serde_json::Value::Null },
        "skipped_share": skipped as f64 / n,
        "encoder_share": 1.0 - skipped as f64 / n,
        "tolerance": tolerance,
        "expected_accuracy_loss": expected_loss,
        "full": {"accuracy": f.accuracy, "macro_f1": f.macro_f1},
        "cascade": {"accuracy": m.accuracy, "macro_f1": m.macro_f1, "ece": m.ece},
        "lexical_alone": {"accuracy": alone.accuracy, "macro_f1": alone.macro_f1, "ece": alone.ece},
        "flips": flip_table(&sorted, &margins, full, lexical, &gain),
    });
    (chosen, figures)
}

/// Per margin decile of the dev split: how often the encoder changes the
/// lexical head's answer, how often that change is right (the full head
/// right, the lexical wrong) or wrong (the other way), and the expected gain.
fn flip_table(
    sorted: &[f32],
    margins: &[f32],
    full: &[Outcome],
    lexical: &[Outcome],
    gain: &[f64],
) -> serde_json::Value {
    let n = margins.len();
    if n == 0 {
        return serde_json::json!([]);
    }
    let mut edges: Vec<f32> = (0..FLIP_BINS).map(|b| sorted[b * n / FLIP_BINS]).collect();
    edges.dedup();
    let rows: Vec<serde_json::Value> = (0..edges.len())
        .map(|b| {
            let (lo, hi) = (edges[b], edges.get(b + 1).copied().unwrap_or(f32::INFINITY));
            let members: Vec<usize> = (0..n).filter(|&i| margins[i] >= lo && margins[i] < hi).collect();
            let k = members.len().max(1) as f64;
            let count = |p: &dyn Fn(usize) -> bool| members.iter().filter(|&&i| p(i)).count() as f64 / k;
            let right = |o: &Outcome| o.truth == Some(o.predicted);
            serde_json::json!({
                "margin_from": lo,
                "share": members.len() as f64 / n as f64,
                "flips": count(&|i| full[i].predicted != lexical[i].predicted),
                "right_flips": count(&|i| right(&full[i]) && !right(&lexical[i])),
                "wrong_flips": count(&|i| right(&lexical[i]) && !right(&full[i])),
                "expected_gain": members.iter().map(|&i| gain[i]).sum::<f64>() / k,
            })
        })
        .collect();
    serde_json::Value::Array(rows)
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
