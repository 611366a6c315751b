//! The decision engine: features in, [`Decision`] out, through one cascade,
//! cheapest step first:
//!
//! 1. the admins' rules (first match decides);
//! 2. the lexical heads, when the cascade is on and they are sure;
//! 3. an embedding of the same text seen before (the cache);
//! 4. the encoder, reached through an [`Embedder`];
//! 5. the full heads over embedding and lexical features;
//! 6. the policy (department action, review threshold, mode).
//!
//! When the encoder cannot answer in time (queue full, deadline passed) the
//! lexical heads decide rather than nobody. The daemon, `classify` and
//! `replay` all go through [`Engine::decide`]; they differ only in the
//! [`Embedder`]: [`Direct`] embeds on the calling thread, [`Queued`] through
//! the bounded inference queue, with the CPU-bound half off the reactor.
//! (`eval` measures one head over a data set with bulk embeddings, not
//! decisions; it shares the heads' own cascade test, `predict_lexical`.)
//!
//! The engine loads the heads named in the `[model]` settings it is given;
//! which head version is current is the caller's business.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use thiserror::Error;

use super::policy::{ClassChoice, Decision, Explanation, Policy};
use super::rules::{Hit, RuleError, RuleSet};
use crate::domain::DepartmentId;
use crate::message::envelope::Envelope;
use crate::message::extract::{extract, ExtractLimits, Features};
use crate::message::language;
use crate::model::batcher::{Batcher, EmbedFn};
use crate::model::cache::EmbeddingCache;
use crate::model::encoder::TextEncoder;
use crate::model::lexical::TermCounts;
use crate::model::{
    self, encoder_text, features_text, Classifier, DepartmentModel, LexicalFeatures, ModelError, ModelVerdict,
};
use crate::settings::Config;

/// The configuration could not be turned into an engine.
#[derive(Debug, Error)]
pub enum EngineError {
    #[error(transparent)]
    Rules(#[from] RuleError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(
        "the department head predicts {0:?}, which no department claims: name departments after them, \
         or list them in a department's `labels`"
    )]
    UnmappedLabels(Vec<String>),
}

/// How the model part of a decision was reached (`mailtriage_model_decisions_total{path}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelPath {
    /// The cascade's lexical heads were sure.
    Lexical,
    /// The same text was embedded before.
    Cache,
    Encoder,
    /// The encoder could not answer in time: the lexical heads decided.
    Overload,
    /// Heads that read no embedding.
    Heads,
}

impl ModelPath {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelPath::Lexical => "lexical",
            ModelPath::Cache => "cache",
            ModelPath::Encoder => "encoder",
            ModelPath::Overload => "overload",
            ModelPath::Heads => "heads",
        }
    }
}

/// What the model read of a message, for a correction that later names only
/// its Message-ID: hashed term counts, a language guess, the embedding.
/// Never text.
#[derive(Debug, Clone)]
pub struct Evidence {
    pub terms: TermCounts,
    pub language: &'static str,
    /// The encoder's id and its vector, when one was computed.
    pub embedding: Option<(String, Arc<[f32]>)>,
}

/// What the engine concluded.
#[derive(Debug, Clone)]
pub enum Ruling {
    Decision(Decision),
    /// An admin's `skip` rule matched, by name: the message is not triaged.
    Skip(String),
}

/// A ruling and how it came about.
#[derive(Debug, Clone)]
pub struct Decided {
    pub ruling: Ruling,
    pub path: Option<ModelPath>,
    /// Filled when asked for and the model decided.
    pub evidence: Option<Evidence>,
    pub features: Features,
    /// How long extraction took, when the engine extracted.
    pub extract_seconds: Option<f64>,
}

/// Reaches the encoder, and runs the CPU-bound half of a decision where
/// the caller wants it.
pub trait Embedder: Send + Sync {
    /// Runs extraction and the lexical features (milliseconds for a large message).
    fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> impl Future<Output = Result<T, ModelError>> + Send;
    fn embed(&self, text: String) -> impl Future<Output = Result<Vec<f32>, ModelError>> + Send;
}

/// Everything on the calling thread: `classify` and `replay`. Its futures
/// never wait, so [`now`] drives
/// them without a runtime.
pub struct Direct(pub Option<Arc<dyn TextEncoder>>);

impl Embedder for Direct {
    async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, ModelError> {
        Ok(work())
    }

    async fn embed(&self, text: String) -> Result<Vec<f32>, ModelError> {
        match &self.0 {
            Some(enc) => enc.embed(&text),
            None => Err(ModelError::Config("the heads read embeddings but no encoder is loaded".into())),
        }
    }
}

/// Runs a future made with [`Direct`] to its end on this thread: its
/// futures never wait. Should one ever wait, this is an error, not a hang.
pub fn now<T>(fut: impl Future<Output = Result<T, ModelError>>) -> Result<T, ModelError> {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(r) => r,
        std::task::Poll::Pending => Err(ModelError::Inference("a direct decision had to wait".into())),
    }
}

/// The daemon's: CPU work on the blocking pool, at most one task per core
/// (a burst must not queue hundreds of parses on two cores), and the
/// encoder through the bounded queue with its deadline.
pub struct Queued(Option<Batcher>);

impl Embedder for Queued {
    async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, ModelError> {
        static CPU_SLOTS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
        let slots = CPU_SLOTS.get_or_init(|| {
            tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get))
        });
        let _slot = slots.acquire().await.map_err(|e| ModelError::Inference(e.to_string()))?;
        // A panic in there (a parser bug) surfaces as a JoinError: one failed decision, not a dead daemon.
        tokio::task::spawn_blocking(work).await.map_err(|e| {
            ModelError::Inference(if e.is_panic() { "decision task panicked".into() } else { e.to_string() })
        })
    }

    async fn embed(&self, text: String) -> Result<Vec<f32>, ModelError> {
        match &self.0 {
            Some(b) => b.embed(text).await,
            None => Err(ModelError::Config("the heads read embeddings but no encoder is loaded".into())),
        }
    }
}

/// The classifier with what serves it at run time.
struct ModelStage {
    classifier: Arc<Classifier>,
    cache: EmbeddingCache,
    /// Head label → configured department.
    departments: HashMap<String, DepartmentId>,
    /// The department head's classes grouped by configured department:
    /// several labels may name one department, which is then chosen by,
    /// and reports, the sum of their probabilities.
    groups: LabelGroups,
}

/// Rules, model and policy built from one configuration.
pub struct Engine {
    rules: RuleSet,
    policy: Policy,
    limits: ExtractLimits,
    model: Option<ModelStage>,
}

/// A message to decide: raw bytes (extracted under this engine's limits,
/// off the reactor), or features already extracted (`classify` derives its
/// envelope from them first).
pub enum Message {
    Raw(Vec<u8>),
    Extracted(Box<Features>),
}

/// What the CPU-bound half hands back.
struct Prepared {
    features: Features,
    extract_seconds: Option<f64>,
    step: Step,
    /// The language guess, when evidence was asked for.
    language: Option<&'static str>,
}

/// Where the cascade stands after its CPU-bound half.
enum Step {
    Done(Decision, Option<ModelPath>, Option<LexicalFeatures>),
    /// A `skip` rule matched.
    Skip(String),
    /// The encoder is needed for this text.
    Encode {
        lex: LexicalFeatures,
        text: String,
        key: [u8; 16],
    },
}

impl Engine {
    /// Builds the engine; loads the model when `[model]` is configured, with
    /// the heads its `department_head` and `priority_head` name.
    pub fn new(cfg: &Config) -> Result<Self, EngineError> {
        let model = match &cfg.model {
            None => None,
            Some(m) => {
                let descriptions: Vec<(String, Vec<String>)> = cfg
                    .catalog
                    .departments()
                    .iter()
                    .map(|d| {
                        (d.id.to_string(), std::iter::once(d.description.clone()).chain(d.examples.clone()).collect())
                    })
                    .collect();
                let classifier = Arc::new(model::load(m, &descriptions)?);
                let mut departments = HashMap::new();
                let mut unmapped = Vec::new();
                let labels = classifier.department_labels();
                for label in &labels {
                    match cfg.catalog.for_label(label) {
                        Some(d) => {
                            departments.insert(label.clone(), d.clone());
                        }
                        None => unmapped.push(label.clone()),
                    }
                }
                if !unmapped.is_empty() {
                    return Err(EngineError::UnmappedLabels(unmapped));
                }
                let groups = LabelGroups::new(labels.iter().map(|l| departments[l].clone()));
                Some(ModelStage { classifier, departments, groups, cache: EmbeddingCache::new(m.cache_entries) })
            }
        };
        let mut policy = Policy::new(cfg);
        if let (Some(target), Some(m)) = (cfg.policy.target_accuracy, &model) {
            policy = match m.classifier.review_threshold(target as f64) {
                Ok(Some(p)) => {
                    tracing::info!(
                        target_accuracy = target,
                        threshold = p.threshold,
                        dev_coverage = p.coverage,
                        dev_accuracy = p.accuracy,
                        "model decisions below the threshold go to review"
                    );
                    policy.with_target_threshold(p.threshold)
                }
                Ok(None) => {
                    tracing::warn!(
                        target_accuracy = target,
                        "the department head reaches this accuracy at no threshold on its dev split: every model \
                         decision goes to review"
                    );
                    policy.with_target_threshold(f32::INFINITY)
                }
                Err(why) => {
                    tracing::warn!(target_accuracy = target, "policy.target_accuracy is not applied: {why}");
                    policy
                }
            };
        }
        Ok(Self { rules: RuleSet::new(&cfg.rules)?, policy, limits: ExtractLimits::from(&cfg.limits), model })
    }

    /// The embedder for this engine's encoder on the calling thread.
    pub fn direct(&self) -> Direct {
        Direct(self.encoder())
    }

    /// Starts the inference threads for the daemon under `[model]`'s
    /// workers, queue depth and deadline (none when the heads read no
    /// embedding).
    pub fn queued_for(
        &self,
        cfg: Option<&crate::settings::ModelConfig>,
        observer: Arc<dyn crate::model::batcher::QueueObserver>,
    ) -> Queued {
        let batcher = match (cfg, self.model.as_ref()) {
            (Some(m), Some(stage)) if stage.classifier.needs_embedding() => {
                stage.classifier.encoder.clone().map(|enc| {
                    let embed: EmbedFn = Arc::new(move |text: &str| enc.embed(text));
                    Batcher::start(embed, m.workers, m.queue_depth, m.deadline, observer)
                })
            }
            _ => None,
        };
        Queued(batcher)
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// The encoder in use, for embedding corrections and retraining.
    pub fn encoder(&self) -> Option<Arc<dyn TextEncoder>> {
        self.model.as_ref()?.classifier.encoder.clone()
    }

    /// The classifier, when a model is configured.
    pub fn classifier(&self) -> Option<&Classifier> {
        self.model.as_ref().map(|m| m.classifier.as_ref())
    }

    /// The configured department a head label stands for.
    pub fn department_of_label(&self, label: &str) -> Option<&DepartmentId> {
        self.model.as_ref()?.departments.get(label)
    }

    /// `model:<id> (department=…, priority=…)`, or `none`.
    pub fn model_summary(&self) -> String {
        match &self.model {
            Some(m) => format!("{} ({})", m.classifier.id, m.classifier.versions()),
            None => "none".into(),
        }
    }

    /// Extraction under this configuration's limits.
    pub fn extract(&self, raw: &[u8]) -> Features {
        extract(raw, self.limits)
    }

    pub fn limits(&self) -> ExtractLimits {
        self.limits
    }

    /// The embedding of an encoder text (cache first), with the encoder's
    /// id; `None` when no encoder is loaded or it cannot answer.
    pub async fn embedding<E: Embedder>(&self, text: String, embedder: &E) -> Option<(String, Vec<f32>)> {
        let m = self.model.as_ref()?;
        let key = EmbeddingCache::key(&text);
        let (e, _) = Self::cached_or_embedded(m, key, text, embedder).await;
        Some((m.classifier.id.clone(), e.ok()?.to_vec()))
    }

    /// The embedding of `text` (its cache `key`) from the cache, else from
    /// the encoder, and which of the two answered. Only the decision path
    /// fills the cache.
    async fn cached_or_embedded<E: Embedder>(
        m: &ModelStage,
        key: [u8; 16],
        text: String,
        embedder: &E,
    ) -> (Result<Arc<[f32]>, ModelError>, ModelPath) {
        match m.cache.get(&key) {
            Some(e) => (Ok(e), ModelPath::Cache),
            None => (embedder.embed(text).await.map(Arc::from), ModelPath::Encoder),
        }
    }

    /// Decides one message: the whole cascade. `evidence` asks for what the
    /// model read (for corrections by Message-ID).
    pub async fn decide<E: Embedder>(
        self: &Arc<Self>,
        envelope: Envelope,
        message: Message,
        evidence: bool,
        embedder: &E,
    ) -> Result<Decided, ModelError> {
        let engine = Arc::clone(self);
        let Prepared { features, extract_seconds, step, language } = embedder
            .run(move || {
                let (features, extract_seconds) = match message {
                    Message::Raw(raw) => {
                        let t = Instant::now();
                        let f = engine.extract(&raw);
                        (f, Some(t.elapsed().as_secs_f64()))
                    }
                    Message::Extracted(f) => (*f, None),
                };
                let (step, text) = engine.prepare(&envelope, &features);
                let language = text.filter(|_| evidence).map(|t| language::detect(&t));
                Prepared { features, extract_seconds, step, language }
            })
            .await?;
        let (decision, path, lex, embedding) = match step {
            Step::Skip(rule) => {
                return Ok(Decided {
                    ruling: Ruling::Skip(rule),
                    path: None,
                    evidence: None,
                    features,
                    extract_seconds,
                })
            }
            Step::Done(d, path, lex) => (d, path, lex, None),
            Step::Encode { lex, text: for_encoder, key } => {
                let Some(m) = self.model.as_ref() else {
                    return Err(ModelError::Config("the encoder was asked for without a model".into()));
                };
                let (embedding, path) = Self::cached_or_embedded(m, key, for_encoder, embedder).await;
                match embedding {
                    Ok(e) => {
                        if path == ModelPath::Encoder {
                            m.cache.insert(key, e.clone());
                        }
                        (self.model_decision(m, &lex, Some(&e)), Some(path), Some(lex), Some(e))
                    }
                    Err(e @ (ModelError::Overloaded(_) | ModelError::Timeout(_))) => {
                        let Some(d) = self.lexical_fallback(m, &lex) else { return Err(e) };
                        tracing::debug!(reason = %e, "encoder unavailable in time; the lexical heads decided");
                        (d, Some(ModelPath::Overload), Some(lex), None)
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let evidence = match (evidence, lex.and_then(|l| l.terms), &self.model) {
            (true, Some(terms), Some(m)) => Some(Evidence {
                terms,
                language: language.unwrap_or("und"),
                embedding: embedding.map(|e| (m.classifier.id.clone(), e)),
            }),
            _ => None,
        };
        Ok(Decided { ruling: Ruling::Decision(decision), path, evidence, features, extract_seconds })
    }

    /// The CPU-bound half: rules, then the lexical features and the
    /// cascade's lexical heads, then the encoder text and its cache key.
    /// Returns the model text too (for the language guess).
    fn prepare(&self, envelope: &Envelope, features: &Features) -> (Step, Option<String>) {
        match self.rules.first_match(envelope, features) {
            Some(Hit::Route(m)) => return (Step::Done(self.policy.decide(Some(m)), None, None), None),
            Some(Hit::Skip(rule)) => return (Step::Skip(rule.to_string()), None),
            None => {}
        }
        let Some(m) = &self.model else { return (Step::Done(self.policy.decide(None), None, None), None) };
        // Built once: the encoder and the lexical features read the same text.
        let text = features_text(features);
        let lex = m.classifier.lexical_features(&text);
        if !m.classifier.needs_embedding() {
            return (Step::Done(self.model_decision(m, &lex, None), Some(ModelPath::Heads), Some(lex)), Some(text));
        }
        if let Some((verdict, true)) = m.classifier.predict_lexical(&lex) {
            let d = self.verdict_decision(m, verdict, true);
            return (Step::Done(d, Some(ModelPath::Lexical), Some(lex)), Some(text));
        }
        let for_encoder = encoder_text(&text);
        let key = EmbeddingCache::key(&for_encoder);
        (Step::Encode { lex, text: for_encoder, key }, Some(text))
    }

    /// The lexical heads' decision whatever their confidence: what a message
    /// gets when the encoder cannot take it in time.
    fn lexical_fallback(&self, m: &ModelStage, lex: &LexicalFeatures) -> Option<Decision> {
        m.classifier.predict_lexical(lex).map(|(verdict, _)| self.verdict_decision(m, verdict, true))
    }

    fn verdict_decision(&self, m: &ModelStage, verdict: ModelVerdict, lexical: bool) -> Decision {
        let ModelVerdict { department, priority } = verdict;
        let id = if lexical { format!("{}/lexical", m.classifier.id) } else { m.classifier.id.clone() };
        let choice = m.groups.choose(&department.probs).unwrap_or(GroupChoice {
            department: m.groups.slot_of(department.index),
            probability: department.confidence,
            label: department.index,
            runner_up: None,
        });
        let mut d = self.policy.decide_model(
            m.groups.department(choice.department).as_str(),
            choice.probability,
            priority.as_ref().map(|p| p.label.as_str()),
            &id,
        );
        d.model_version = Some(m.classifier.versions());
        d.classes =
            Some(ClassChoice { chosen: choice.label, runner_up: choice.runner_up.map(|r| (r.label, r.probability)) });
        d
    }

    /// Why the model made a decision (`None` for rules and the default):
    /// the runner-up and the message's strongest terms for the chosen class
    /// (the department head's lexical weights; a cold start names no terms).
    pub fn explain(&self, features: &Features, d: &Decision) -> Option<Explanation> {
        let (m, choice) = (self.model.as_ref()?, d.classes.as_ref()?);
        let terms = match (&m.classifier.department, choice.runner_up) {
            (DepartmentModel::Trained(h), Some((against, _))) => {
                h.strongest_terms(&features_text(features), choice.chosen, against, 3)
            }
            _ => Vec::new(),
        };
        // The runner-up is named as a department, like the decision itself.
        let runner_up = choice.runner_up.map(|(i, p)| (m.groups.department(m.groups.slot_of(i)).to_string(), p));
        Some(Explanation { runner_up, terms })
    }

    /// Each rule in order and what became of it on this message.
    pub fn rule_trace(&self, envelope: &Envelope, features: &Features) -> Vec<super::rules::RuleTrace> {
        self.rules.trace(envelope, features)
    }

    /// The full heads' decision (embedding given when they use one).
    fn model_decision(&self, m: &ModelStage, lex: &LexicalFeatures, embedding: Option<&[f32]>) -> Decision {
        self.verdict_decision(m, m.classifier.predict(lex, embedding), false)
    }
}

/// The department head's labels grouped by the department each stands for.
#[derive(Debug, Clone)]
struct LabelGroups {
    /// Label index → slot in `departments`.
    slot: Vec<usize>,
    /// Distinct departments, in the order their first label appears.
    departments: Vec<DepartmentId>,
}

/// A department chosen by the summed probability of its labels.
#[derive(Debug, Clone, Copy, PartialEq)]
struct GroupChoice {
    /// Slot of the chosen department.
    department: usize,
    /// The sum of its labels' probabilities.
    probability: f32,
    /// Its most probable label (what explanations weigh terms for).
    label: usize,
    /// The best *other* department, by the same measure.
    runner_up: Option<GroupRunnerUp>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct GroupRunnerUp {
    label: usize,
    probability: f32,
}

impl LabelGroups {
    fn new(label_departments: impl Iterator<Item = DepartmentId>) -> LabelGroups {
        let (mut slot, mut departments) = (Vec::new(), Vec::<DepartmentId>::new());
        for d in label_departments {
            let s = departments.iter().position(|x| *x == d).unwrap_or_else(|| {
                departments.push(d);
                departments.len() - 1
            });
            slot.push(s);
        }
        LabelGroups { slot, departments }
    }

    fn slot_of(&self, label: usize) -> usize {
        self.slot.get(label).copied().unwrap_or(0)
    }

    fn department(&self, slot: usize) -> &DepartmentId {
        &self.departments[slot]
    }

    /// The department with the largest summed probability (ties go to the
    /// one whose label is most probable), its best label, and the runner-up
    /// department. `None` when `probs` does not fit the labels.
    fn choose(&self, probs: &[f32]) -> Option<GroupChoice> {
        if probs.is_empty() || probs.len() != self.slot.len() {
            return None;
        }
        // (summed probability, best label, its probability) per department.
        let mut per: Vec<(f32, usize, f32)> = vec![(0.0, usize::MAX, f32::NEG_INFINITY); self.departments.len()];
        for (label, &p) in probs.iter().enumerate() {
            let e = &mut per[self.slot[label]];
            e.0 += p;
            if p > e.2 {
                (e.1, e.2) = (label, p);
            }
        }
        let better = |a: &(f32, usize, f32), b: &(f32, usize, f32)| a.0 > b.0 || (a.0 == b.0 && a.2 > b.2);
        let mut best: Option<usize> = None;
        for (s, e) in per.iter().enumerate() {
            if e.1 != usize::MAX && best.is_none_or(|b| better(e, &per[b])) {
                best = Some(s);
            }
        }
        let best = best?;
        let mut second: Option<usize> = None;
        for (s, e) in per.iter().enumerate() {
            if s != best && e.1 != usize::MAX && second.is_none_or(|b| better(e, &per[b])) {
                second = Some(s);
            }
        }
        Some(GroupChoice {
            department: best,
            probability: per[best].0.min(1.0),
            label: per[best].1,
            runner_up: second.map(|s| GroupRunnerUp { label: per[s].1, probability: per[s].0.min(1.0) }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups(of: &[&str]) -> LabelGroups {
        LabelGroups::new(of.iter().map(|d| DepartmentId::from(*d)))
    }

    #[test]
    fn a_department_is_chosen_by_the_sum_of_its_labels() {
        // Labels: billing, IT Support, Technical Support, hr; both support labels are `support`.
        let g = groups(&["billing", "support", "support", "hr"]);
        let c = g.choose(&[0.33, 0.19, 0.33, 0.15]).unwrap();
        assert_eq!(g.department(c.department).as_str(), "support");
        assert!((c.probability - 0.52).abs() < 1e-6, "{c:?}");
        assert_eq!(c.label, 2, "the department's most probable label");
        // The runner-up is another department, never a label of the same one.
        let r = c.runner_up.unwrap();
        assert_eq!(g.department(g.slot_of(r.label)).as_str(), "billing");
        assert!((r.probability - 0.33).abs() < 1e-6);
    }

    #[test]
    fn one_label_per_department_is_the_plain_argmax() {
        let g = groups(&["billing", "support", "hr"]);
        let c = g.choose(&[0.2, 0.5, 0.3]).unwrap();
        assert_eq!((c.department, c.label), (1, 1));
        assert_eq!(c.runner_up.map(|r| r.label), Some(2));
        // A single department has no runner-up; probabilities that do not fit the labels choose nothing.
        let one = groups(&["support", "support"]);
        assert_eq!(one.choose(&[0.4, 0.6]).unwrap().runner_up, None);
        assert_eq!(g.choose(&[0.5, 0.5]), None);
    }

    #[test]
    fn ties_go_to_the_department_with_the_most_probable_label() {
        let g = groups(&["a", "b", "b"]);
        let c = g.choose(&[0.5, 0.25, 0.25]).unwrap();
        assert_eq!(g.department(c.department).as_str(), "a");
    }
}
