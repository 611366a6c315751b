//! What training is given and gives back: the labeled [`Example`], the
//! [`Loss`], the [`TrainOptions`] and the hyper-parameter candidates,
//! the [`TrainReport`] and the head's [`Provenance`].

use serde::Serialize;
use thiserror::Error;

use super::eval::Metrics;
use crate::model::head::CascadeMeta;
use crate::model::lexical::{LexicalConfig, TermCounts};

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
    /// sooner; the squared hinge is solved in the dual, [`dual_cd`](super::dual_cd)).
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
            cascade_tolerance: 0.003,
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
