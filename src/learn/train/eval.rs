//! Classification figures: accuracy, macro-F1, per-class precision/recall/F1,
//! the confusion matrix, expected calibration error (10 equal-width bins), and
//! the risk-coverage curve (how much mail can be decided automatically at a
//! given accuracy, the rest going to review).

use serde::Serialize;

/// Accuracies for which `eval` reports the automatically decided share.
pub const TARGETS: [f64; 3] = [0.80, 0.90, 0.95];

/// Step of the thresholds the curve is sampled at.
const CURVE_STEP: f32 = 0.005;

pub use crate::model::head::{threshold_for, CoveragePoint};

/// What a target accuracy costs: the share decided automatically.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct AtTarget {
    pub target: f64,
    /// `None`: no threshold reaches the target (everything would go to review).
    pub point: Option<CoveragePoint>,
}

/// The curve at thresholds 0, 0.005, … 1.0 (201 points, ascending threshold;
/// repeated points are dropped).
pub fn risk_coverage(outcomes: &[Outcome]) -> Vec<CoveragePoint> {
    let n = outcomes.len();
    let mut points: Vec<CoveragePoint> = Vec::new();
    if n == 0 {
        return points;
    }
    let steps = (1.0 / CURVE_STEP).round() as usize;
    for i in 0..=steps {
        let threshold = i as f32 * CURVE_STEP;
        let (mut covered, mut correct) = (0usize, 0usize);
        for o in outcomes.iter().filter(|o| o.confidence >= threshold) {
            covered += 1;
            correct += usize::from(o.truth == Some(o.predicted));
        }
        if covered == 0 {
            break;
        }
        if points.last().is_some_and(|p| p.coverage == covered as f64 / n as f64) {
            continue;
        }
        points.push(CoveragePoint {
            threshold,
            coverage: covered as f64 / n as f64,
            accuracy: correct as f64 / covered as f64,
        });
    }
    points
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClassMetrics {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Metrics {
    pub n: usize,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub ece: f64,
    pub per_class: Vec<ClassMetrics>,
    /// `confusion[truth][predicted]`, in `labels` order; a last row/column
    /// `(other)` counts truths the classifier cannot predict.
    pub confusion: Vec<Vec<usize>>,
    pub labels: Vec<String>,
    /// Share decided automatically at 80, 90 and 95 % accuracy.
    pub coverage: Vec<AtTarget>,
}

/// One evaluated example: true class, predicted class, confidence in the prediction.
/// `truth == None` means a label the classifier does not know.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub truth: Option<usize>,
    pub predicted: usize,
    pub confidence: f32,
}

pub fn compute(labels: &[String], outcomes: &[Outcome]) -> Metrics {
    let c = labels.len();
    let mut confusion = vec![vec![0usize; c + 1]; c + 1];
    for o in outcomes {
        confusion[o.truth.unwrap_or(c)][o.predicted.min(c)] += 1;
    }
    let n = outcomes.len();
    let correct = outcomes.iter().filter(|o| o.truth == Some(o.predicted)).count();
    let mut per_class = Vec::with_capacity(c);
    for (k, label) in labels.iter().enumerate() {
        let tp = confusion[k][k] as f64;
        let predicted: usize = (0..=c).map(|t| confusion[t][k]).sum();
        let support: usize = confusion[k].iter().sum();
        let precision = if predicted > 0 { tp / predicted as f64 } else { 0.0 };
        let recall = if support > 0 { tp / support as f64 } else { 0.0 };
        let f1 = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
        per_class.push(ClassMetrics { label: label.clone(), precision, recall, f1, support });
    }
    // Macro-F1 over classes present in the data (as scikit-learn does with the labels seen).
    let present: Vec<&ClassMetrics> = per_class.iter().filter(|m| m.support > 0).collect();
    let macro_f1 =
        if present.is_empty() { 0.0 } else { present.iter().map(|m| m.f1).sum::<f64>() / present.len() as f64 };
    let mut label_names = labels.to_vec();
    if confusion[c].iter().sum::<usize>() == 0 {
        confusion.pop();
        confusion.iter_mut().for_each(|row| {
            row.pop();
        });
    } else {
        label_names.push("(other)".into());
    }
    Metrics {
        n,
        accuracy: if n > 0 { correct as f64 / n as f64 } else { 0.0 },
        macro_f1,
        ece: ece(outcomes, 10),
        per_class,
        confusion,
        labels: label_names,
        coverage: {
            let curve = risk_coverage(outcomes);
            TARGETS.iter().map(|&target| AtTarget { target, point: threshold_for(&curve, target) }).collect()
        },
    }
}

/// Expected calibration error: Σ_b (n_b / n) · |accuracy_b − mean confidence_b|.
pub fn ece(outcomes: &[Outcome], bins: usize) -> f64 {
    let mut count = vec![0usize; bins];
    let mut conf = vec![0f64; bins];
    let mut acc = vec![0f64; bins];
    for o in outcomes {
        let b = ((o.confidence as f64 * bins as f64) as usize).min(bins - 1);
        count[b] += 1;
        conf[b] += o.confidence as f64;
        acc[b] += (o.truth == Some(o.predicted)) as u8 as f64;
    }
    let n = outcomes.len().max(1) as f64;
    (0..bins).filter(|&b| count[b] > 0).map(|b| (acc[b] - conf[b]).abs() / n).sum()
}

impl Metrics {
    /// A human-readable report.
    pub fn render(&self) -> String {
        let mut s = format!(
            "n={}  accuracy={:.4}  macro-F1={:.4}  ECE={:.4}\n\n{:<32} {:>9} {:>9} {:>9} {:>8}\n",
            self.n, self.accuracy, self.macro_f1, self.ece, "class", "precision", "recall", "f1", "support"
        );
        for m in &self.per_class {
            s += &format!("{:<32} {:>9.3} {:>9.3} {:>9.3} {:>8}\n", m.label, m.precision, m.recall, m.f1, m.support);
        }
        s += "\nrisk-coverage (decide automatically at confidence ≥ threshold, the rest to review)\n";
        for t in &self.coverage {
            s += &match t.point {
                Some(p) => format!(
                    "  at {:.0} % accuracy: {:.1} % decided automatically (threshold {:.3}, accuracy there {:.4})\n",
                    t.target * 100.0,
                    p.coverage * 100.0,
                    p.threshold,
                    p.accuracy
                ),
                None => format!("  at {:.0} % accuracy: not reachable (everything to review)\n", t.target * 100.0),
            };
        }
        s += "\nconfusion (rows: truth, columns: predicted, in class order above)\n";
        for (label, row) in self.labels.iter().zip(&self.confusion) {
            s += &format!("{:<32} {}\n", label, row.iter().map(|v| format!("{v:>5}")).collect::<String>());
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(truth: usize, predicted: usize, confidence: f32) -> Outcome {
        Outcome { truth: Some(truth), predicted, confidence }
    }

    #[test]
    fn figures_match_hand_computation() {
        let labels = vec!["a".to_string(), "b".to_string()];
        // Confidences away from bin edges (0.7f32 is 0.6999…, which is bin 6).
        let m = compute(&labels, &[o(0, 0, 0.95), o(0, 1, 0.65), o(1, 1, 0.85), o(1, 1, 0.75)]);
        assert_eq!(m.accuracy, 0.75);
        // a: p=1, r=0.5, f1=2/3 ; b: p=2/3, r=1, f1=0.8
        assert!((m.per_class[0].f1 - 2.0 / 3.0).abs() < 1e-9);
        assert!((m.per_class[1].f1 - 0.8).abs() < 1e-9);
        assert!((m.macro_f1 - (2.0 / 3.0 + 0.8) / 2.0).abs() < 1e-9);
        assert_eq!(m.confusion, vec![vec![1, 1], vec![0, 2]]);
        // one per bin: |1-.95| + |0-.65| + |1-.85| + |1-.75|, each weighted 1/4
        let expect = (0.05 + 0.65 + 0.15 + 0.25) / 4.0;
        assert!((m.ece - expect).abs() < 1e-6, "{}", m.ece);
    }

    #[test]
    fn risk_coverage_finds_the_lowest_threshold_that_keeps_the_target() {
        // Confident answers right, unsure ones half wrong.
        let outcomes = [o(0, 0, 0.95), o(1, 1, 0.9), o(0, 0, 0.8), o(1, 1, 0.7), o(0, 1, 0.5), o(1, 1, 0.4)];
        let curve = risk_coverage(&outcomes);
        assert_eq!(curve.first().unwrap().coverage, 1.0);
        assert!((curve.first().unwrap().accuracy - 5.0 / 6.0).abs() < 1e-9);
        let p = threshold_for(&curve, 0.9).unwrap();
        assert!((p.coverage - 4.0 / 6.0).abs() < 1e-9 && p.accuracy == 1.0, "{p:?}");
        assert!(p.threshold > 0.5 && p.threshold <= 0.7, "{p:?}");
        assert_eq!(threshold_for(&curve, 0.8).unwrap().coverage, 1.0);
        assert!(threshold_for(&risk_coverage(&[o(0, 1, 0.9)]), 0.5).is_none());
        let m = compute(&["a".into(), "b".into()], &outcomes);
        assert_eq!(m.coverage.len(), 3);
        assert!(m.render().contains("at 90 % accuracy: 66.7 % decided automatically"), "{}", m.render());
    }

    #[test]
    fn unknown_truths_count_as_errors_in_an_other_row() {
        let labels = vec!["a".to_string(), "b".to_string()];
        let m = compute(&labels, &[o(0, 0, 0.9), Outcome { truth: None, predicted: 1, confidence: 0.5 }]);
        assert_eq!(m.accuracy, 0.5);
        assert_eq!(m.labels.last().unwrap(), "(other)");
        assert_eq!(m.confusion[2], vec![0, 1, 0]);
    }
}
