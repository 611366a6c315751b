//! The one-way path every message takes once a front door has it:
//! extract → rules → model → policy → plan.
//!
//! Front doors see only the [`Filter`] trait: they hand over an envelope and
//! raw bytes and get a [`Plan`] back, knowing nothing of how it was decided.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use thiserror::Error;

use crate::actions::Plan;
use crate::audit::{AuditError, AuditLog, Record};
use crate::config::{Config, Mode};
use crate::envelope::{domain_of, Envelope};
use crate::extract::{extract, ExtractLimits, Features};
use crate::feedback::heads::{self, Role};
use crate::feedback::intake::{self, FeedbackAddress, Requested};
use crate::feedback::recent::RecentDecisions;
use crate::feedback::store::Store;
use crate::feedback::{language, Channel, FeedbackError, MessageFeatures};
use crate::metrics::name;
use crate::model::batcher::{Batcher, EmbedFn};
use crate::model::cache::EmbeddingCache;
use crate::model::lexical::{LexicalConfig, TermCounts};
use crate::model::{self, encoder_text, features_text, Classifier, LexicalFeatures, ModelError, ModelVerdict};
use crate::policy::{Decision, Policy};
use crate::rules::{RuleError, RuleSet};

/// One message as a front door collected it.
#[derive(Debug, Clone, Default)]
pub struct MessageInput {
    pub envelope: Envelope,
    /// Header block and body, possibly cut at `limits.max_message_bytes`.
    pub raw: Vec<u8>,
    /// Names of the inbound `X-Triage-*` headers, in order, for anti-spoofing
    /// removal (other names may be included; they are ignored).
    pub header_names: Vec<String>,
}

/// Why no plan could be made. The front door then applies `on_error`.
#[derive(Debug, Error)]
pub enum FilterError {
    #[error("decision task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// What a front door calls to decide a message.
pub trait Filter: Send + Sync + 'static {
    fn filter(&self, msg: MessageInput) -> impl Future<Output = Result<Plan, FilterError>> + Send;
}

/// A decision with what led to it, for `classify` and for logs.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub decision: Decision,
    pub plan: Plan,
    #[serde(skip)]
    pub features: Features,
}

/// The configuration could not be turned into a working pipeline.
#[derive(Debug, Error)]
pub enum TriageError {
    #[error(transparent)]
    Rules(#[from] RuleError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(
        "the department head predicts {0:?}, which no department claims: name departments after them, \
         or list them in a department's `labels`"
    )]
    UnmappedLabels(Vec<String>),
}

/// Rules, model and policy built from one configuration.
pub struct Triage {
    rules: RuleSet,
    policy: Policy,
    limits: ExtractLimits,
    model: Option<ModelStage>,
    audit: Option<AuditLog>,
    config_version: String,
    mode: Mode,
    feedback: Option<FeedbackStage>,
    /// Staff minutes a message routed without review saves (`[kpi]`).
    minutes_per_message: f64,
}

/// Corrections: the feedback address and, once [`Triage::connect_feedback`]
/// is called, the store and the recent-decisions window.
struct FeedbackStage {
    address: Option<FeedbackAddress>,
    audit_copy: Option<String>,
    /// For resolving department names to head labels.
    cfg: Config,
    link: Option<FeedbackLink>,
}

/// What outlives a reload: the store connection and the recent decisions.
#[derive(Clone)]
pub struct FeedbackLink {
    pub store: Arc<Store>,
    pub recent: Arc<RecentDecisions>,
}

impl Triage {
    /// The configuration version this set was built from.
    pub fn config_version(&self) -> &str {
        &self.config_version
    }
}

struct ModelStage {
    classifier: Arc<Classifier>,
    batcher: Option<Batcher>,
    cache: EmbeddingCache,
    /// Head label → configured department.
    departments: HashMap<String, String>,
}

impl Triage {
    /// Builds the pipeline, loading the model when `[model]` is configured.
    pub fn new(cfg: &Config) -> Result<Self, TriageError> {
        let model = match &cfg.model {
            None => None,
            Some(m) => {
                let descriptions: Vec<(String, Vec<String>)> = cfg
                    .departments
                    .iter()
                    .map(|d| {
                        (d.name.clone(), std::iter::once(d.description.clone()).chain(d.examples.clone()).collect())
                    })
                    .collect();
                // A promoted head version, when there is one, wins over the configured file.
                let mut m = m.clone();
                m.department_head = heads::in_use(cfg, Role::Department);
                m.priority_head = heads::in_use(cfg, Role::Priority);
                let m = &m;
                let classifier = Arc::new(model::load(m, &descriptions)?);
                let mut departments = HashMap::new();
                let mut unmapped = Vec::new();
                for label in classifier.department_labels() {
                    match cfg.department_for_label(&label) {
                        Some(d) => {
                            departments.insert(label, d.to_string());
                        }
                        None => unmapped.push(label),
                    }
                }
                if !unmapped.is_empty() {
                    return Err(TriageError::UnmappedLabels(unmapped));
                }
                let batcher = classifier.encoder.clone().filter(|_| classifier.needs_embedding()).map(|enc| {
                    let embed: EmbedFn = Arc::new(move |text: &str| enc.embed(text));
                    Batcher::start(embed, m.workers, m.queue_depth, m.deadline)
                });
                Some(ModelStage { classifier, batcher, departments, cache: EmbeddingCache::new(m.cache_entries) })
            }
        };
        Ok(Self {
            rules: RuleSet::new(&cfg.rules)?,
            policy: Policy::new(cfg),
            limits: ExtractLimits::from(&cfg.limits),
            model,
            audit: cfg.audit.as_ref().map(AuditLog::open).transpose()?,
            config_version: cfg.version.clone(),
            mode: cfg.server.mode,
            feedback: cfg.feedback.as_ref().map(|f| FeedbackStage {
                address: f.address.as_deref().and_then(FeedbackAddress::parse),
                audit_copy: f.audit_copy.clone(),
                cfg: cfg.clone(),
                link: None,
            }),
            minutes_per_message: cfg.kpi.minutes_per_manual_triage,
        })
    }

    /// Gives the feedback channels their store and recent-decisions window
    /// (both outlive reloads, so they are made once by the daemon).
    pub fn connect_feedback(&mut self, link: FeedbackLink) {
        if let Some(f) = &mut self.feedback {
            f.link = Some(link);
        }
    }

    fn link(&self) -> Option<&FeedbackLink> {
        self.feedback.as_ref()?.link.as_ref()
    }

    /// The encoder in use, for retraining beside the daemon.
    pub fn encoder(&self) -> Option<Arc<crate::model::encoder::Encoder>> {
        self.model.as_ref()?.classifier.encoder.clone()
    }

    /// Publishes each head's version number (`v3` → 3; 0 for a head not
    /// promoted by retraining) as `mailtriage_head_version{head}`.
    pub fn publish_head_versions(&self) {
        let Some(m) = &self.model else { return };
        let number = |v: &str| v.strip_prefix('v').and_then(|n| n.parse::<f64>().ok()).unwrap_or(0.0);
        if let model::DepartmentModel::Trained(h) = &m.classifier.department {
            metrics::gauge!(name::HEAD_VERSION, "head" => "department").set(number(&h.meta.version));
        }
        if let Some(h) = &m.classifier.priority {
            metrics::gauge!(name::HEAD_VERSION, "head" => "priority").set(number(&h.meta.version));
        }
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
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

    /// Decides one message synchronously, embedding on this thread if needed
    /// (for `classify` and `replay`; the daemon goes through the batcher).
    pub fn decide(&self, envelope: &Envelope, raw: &[u8], header_names: &[String]) -> Result<Outcome, ModelError> {
        self.decide_extracted(envelope, self.extract(raw), header_names)
    }

    /// As [`decide`](Self::decide), from features already extracted.
    pub fn decide_extracted(
        &self,
        envelope: &Envelope,
        features: Features,
        header_names: &[String],
    ) -> Result<Outcome, ModelError> {
        let decision = match (self.rule_decision(envelope, &features), &self.model) {
            (Some(d), _) => d,
            (None, None) => self.policy.decide(None),
            (None, Some(m)) => {
                let text = features_text(&features);
                let lex = m.classifier.lexical_features(&text);
                match self.cascade(m, &lex) {
                    Some(d) => d,
                    None => {
                        let embedding = match &m.classifier.encoder {
                            Some(enc) if m.classifier.needs_embedding() => Some(enc.embed(&encoder_text(&text))?),
                            _ => None,
                        };
                        self.model_decision(m, &lex, embedding.as_deref())
                    }
                }
            }
        };
        let plan = Plan::for_decision(&decision, envelope, header_names);
        Ok(Outcome { decision, plan, features })
    }

    fn rule_decision(&self, envelope: &Envelope, features: &Features) -> Option<Decision> {
        self.rules.first_match(envelope, features).map(|m| self.policy.decide(Some(m)))
    }

    /// The cascade's lexical decision, when its heads are sure enough that the
    /// encoder would not change the outcome measurably (see `train`).
    fn cascade(&self, m: &ModelStage, lex: &LexicalFeatures) -> Option<Decision> {
        if !m.classifier.needs_embedding() {
            return None;
        }
        match m.classifier.predict_lexical(lex)? {
            (verdict, true) => Some(self.verdict_decision(m, verdict, true)),
            _ => None,
        }
    }

    /// The lexical heads' decision whatever their confidence: what a message
    /// gets when the encoder cannot take it in time.
    fn lexical_fallback(&self, m: &ModelStage, lex: &LexicalFeatures) -> Option<Decision> {
        m.classifier.predict_lexical(lex).map(|(verdict, _)| self.verdict_decision(m, verdict, true))
    }

    fn verdict_decision(&self, m: &ModelStage, verdict: ModelVerdict, lexical: bool) -> Decision {
        let ModelVerdict { department, priority } = verdict;
        let id = if lexical { format!("{}/lexical", m.classifier.id) } else { m.classifier.id.clone() };
        let mut d = self.policy.decide_model(
            &m.departments[&department.label],
            department.confidence,
            priority.as_ref().map(|p| p.label.as_str()),
            &id,
        );
        d.model_version = Some(m.classifier.versions());
        d
    }

    /// The full heads' decision (embedding given when they use one).
    fn model_decision(&self, m: &ModelStage, lex: &LexicalFeatures, embedding: Option<&[f32]>) -> Decision {
        self.verdict_decision(m, m.classifier.predict(lex, embedding), false)
    }
}

impl Filter for Arc<Triage> {
    async fn filter(&self, msg: MessageInput) -> Result<Plan, FilterError> {
        if let Some(requests) = self.feedback_recipients(&msg.envelope.rcpts) {
            return self.take_feedback(msg, requests).await;
        }
        let started = Instant::now();
        let queue_id = msg.envelope.queue_id.clone();
        // Armed until the decision ends here: a front door that stops waiting
        // (its decision_timeout, or the MTA hanging up) drops this future,
        // and the guard then writes the line, so every message is audited.
        let mut pending = PendingAudit {
            audit: self.audit.as_ref(),
            record: self.audit.as_ref().map(|_| self.audit_line(&msg.envelope, "failed")),
            started,
        };
        let result = self.decide_async(msg).await;
        let line = pending.record.take();
        let latency_ms = started.elapsed().as_secs_f64() * 1e3;
        metrics::histogram!(name::DECISION_SECONDS).record(latency_ms / 1e3);
        match &result {
            Ok((d, _, _)) => {
                metrics::counter!(
                    name::MESSAGES,
                    "department" => d.department.clone(),
                    "action" => d.action.as_str(),
                    "source" => d.source.to_string()
                )
                .increment(1);
                if d.action != crate::policy::Action::Review {
                    metrics::gauge!(name::MINUTES_SAVED).increment(self.minutes_per_message);
                }
            }
            Err(e) => metrics::counter!(name::FAILED_OPEN, "reason" => failure_kind(e)).increment(1),
        }
        if let (Some(audit), Some(mut record)) = (&self.audit, line) {
            let (d, message_id) = match &result {
                Ok((d, _, f)) => (Some(d), f.message_id.as_deref().map(|m| audit.hash_message_id(m))),
                Err(_) => (None, None),
            };
            record.message_id_hash = message_id;
            record.outcome = if d.is_some() { "decided" } else { "failed" };
            record.reason = result.as_ref().err().map(failure_kind);
            record.department = d.map(|d| d.department.clone());
            record.priority = d.map(|d| d.priority.clone());
            record.confidence = d.map(|d| d.confidence);
            record.source = d.map(|d| d.source.to_string());
            record.action = d.map(|d| d.action.as_str().to_string());
            record.latency_ms = latency_ms;
            write_audit(audit, record);
        }
        let (decision, plan, features) = result?;
        // Names, scores and ids only: never subject, body or addresses.
        tracing::info!(
            queue_id = queue_id.as_deref().unwrap_or("-"),
            department = %decision.department,
            priority = %decision.priority,
            confidence = format!("{:.2}", decision.confidence),
            source = %decision.source,
            action = decision.action.as_str(),
            mode = ?decision.mode,
            changes = plan.changes.len(),
            truncated = features.truncated,
            ms = format!("{latency_ms:.2}"),
            "decided"
        );
        Ok(plan)
    }
}

/// The running [`Triage`], swappable at run time (SIGHUP). Each message takes
/// the current one when its decision starts, so messages in flight finish on
/// the set they started with, and the old set is dropped after the last one.
#[derive(Clone)]
pub struct SharedTriage(Arc<std::sync::RwLock<Arc<Triage>>>);

impl SharedTriage {
    pub fn new(t: Triage) -> Self {
        SharedTriage(Arc::new(std::sync::RwLock::new(Arc::new(t))))
    }

    pub fn current(&self) -> Arc<Triage> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn replace(&self, t: Triage) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(t);
    }
}

impl Filter for SharedTriage {
    async fn filter(&self, msg: MessageInput) -> Result<Plan, FilterError> {
        self.current().filter(msg).await
    }
}

impl Triage {
    /// An audit line for a message: its envelope's domains, this set's mode
    /// and versions. The caller fills in what happened; the time is stamped
    /// when it is written.
    fn audit_line(&self, envelope: &Envelope, outcome: &'static str) -> Record {
        let mut recipient_domains: Vec<String> = envelope.rcpts.iter().map(|r| domain_of(r)).collect();
        recipient_domains.sort();
        recipient_domains.dedup();
        Record {
            time: String::new(),
            queue_id: envelope.queue_id.clone(),
            message_id_hash: None,
            sender_domain: domain_of(&envelope.mail_from),
            recipient_domains,
            outcome,
            reason: None,
            department: None,
            priority: None,
            confidence: None,
            source: None,
            action: None,
            mode: format!("{:?}", self.mode).to_lowercase(),
            config_version: self.config_version.clone(),
            model_version: self.model_summary(),
            latency_ms: 0.0,
        }
    }
}

/// The audit line of a decision in progress; written as `failed`, reason
/// `abandoned`, if the decision is dropped before it ends.
struct PendingAudit<'a> {
    audit: Option<&'a AuditLog>,
    record: Option<Record>,
    started: Instant,
}

impl Drop for PendingAudit<'_> {
    fn drop(&mut self) {
        if let (Some(audit), Some(mut record)) = (self.audit, self.record.take()) {
            record.reason = Some("abandoned".into());
            record.latency_ms = self.started.elapsed().as_secs_f64() * 1e3;
            write_audit(audit, record);
        }
    }
}

fn write_audit(audit: &AuditLog, mut record: Record) {
    record.time = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    if let Err(e) = audit.write(&record) {
        tracing::error!(error = %e, "audit record not written");
    }
}

/// A short, content-free name for why a decision failed.
fn failure_kind(e: &FilterError) -> String {
    match e {
        FilterError::Model(ModelError::Overloaded(_)) => "overload",
        FilterError::Model(ModelError::Timeout(_)) => "timeout",
        _ => "error",
    }
    .to_string()
}

impl Triage {
    /// Extract and rules off the reactor, then (if needed) the model through
    /// the bounded queue.
    async fn decide_async(self: &Arc<Self>, msg: MessageInput) -> Result<(Decision, Plan, Features), FilterError> {
        let MessageInput { envelope, raw, header_names } = msg;
        // Parsing a 1 MiB message takes milliseconds: keep it off the reactor.
        // A panic in there surfaces as a JoinError, not a dead daemon.
        let triage = Arc::clone(self);
        let (features, ruled, envelope) = blocking(move || {
            let t = Instant::now();
            let features = triage.extract(&raw);
            metrics::histogram!(name::EXTRACT_SECONDS).record(t.elapsed().as_secs_f64());
            let ruled = triage.rule_decision(&envelope, &features);
            (features, ruled, envelope)
        })
        .await?;
        let decision = match ruled {
            Some(d) => d,
            None => {
                // Built once: the encoder and the lexical features read the same text.
                let text = features_text(&features);
                self.model_decide_async(text, features.message_id.clone()).await?
            }
        };
        let plan = Plan::for_decision(&decision, &envelope, &header_names);
        Ok((decision, plan, features))
    }
}

impl Triage {
    /// The model's part, cheapest first: the cascade's lexical heads, then
    /// an embedding from the cache, then the encoder through the bounded
    /// queue; when the queue is full or the deadline passes, the lexical
    /// heads decide rather than nobody.
    async fn model_decide_async(
        self: &Arc<Self>,
        text: String,
        message_id: Option<String>,
    ) -> Result<Decision, FilterError> {
        let Some(m) = &self.model else { return Ok(self.policy.decide(None)) };
        // Kept for corrections by Message-ID, when that channel is connected.
        let remember = message_id.filter(|_| self.link().is_some());
        // The text work (lexical features once for every head, the encoder's
        // text and its hash) runs off the reactor; what follows is arithmetic.
        let triage = Arc::clone(self);
        let step = blocking(move || {
            let m = triage.model.as_ref().expect("checked above");
            let lex = m.classifier.lexical_features(&text);
            let recent = remember.map(|id| (id, language::detect(&text)));
            let remember = |lex: &LexicalFeatures, embedding: Option<&[f32]>| {
                if let (Some((id, lang)), Some(link), Some(terms)) = (&recent, triage.link(), &lex.terms) {
                    let embedding = embedding.map(|e| (m.classifier.id.clone(), e.to_vec()));
                    link.recent.insert(id, MessageFeatures { terms: terms.clone(), language: lang, embedding });
                }
            };
            if !m.classifier.needs_embedding() {
                remember(&lex, None);
                return Step::Decided(triage.model_decision(m, &lex, None), None);
            }
            if let Some(d) = triage.cascade(m, &lex) {
                remember(&lex, None);
                return Step::Decided(d, Some("lexical"));
            }
            let for_encoder = encoder_text(&text);
            let key = EmbeddingCache::key(&for_encoder);
            Step::Embed { lex, for_encoder, key, recent }
        })
        .await?;
        let path = |p: &'static str| metrics::counter!(name::MODEL_PATH, "path" => p).increment(1);
        let (lex, for_encoder, key, recent) = match step {
            Step::Decided(d, p) => {
                p.into_iter().for_each(path);
                return Ok(d);
            }
            Step::Embed { lex, for_encoder, key, recent } => (lex, for_encoder, key, recent),
        };
        let embedding: Arc<[f32]> = match (m.cache.get(&key), &m.batcher) {
            (Some(e), _) => {
                path("cache");
                e
            }
            (None, Some(b)) => match b.embed(for_encoder).await {
                Ok(e) => {
                    path("encoder");
                    let e: Arc<[f32]> = Arc::from(e);
                    m.cache.insert(key, e.clone());
                    e
                }
                Err(e @ (ModelError::Overloaded(_) | ModelError::Timeout(_))) => {
                    return match self.lexical_fallback(m, &lex) {
                        Some(d) => {
                            path("overload");
                            tracing::debug!(reason = %e, "encoder unavailable in time; the lexical head decided");
                            Ok(d)
                        }
                        None => Err(e.into()),
                    };
                }
                Err(e) => return Err(e.into()),
            },
            (None, None) => return Err(FilterError::Task("the model needs embeddings but has no encoder".into())),
        };
        if let (Some((id, language)), Some(link), Some(terms)) = (recent, self.link(), &lex.terms) {
            let embedding = Some((m.classifier.id.clone(), embedding.to_vec()));
            link.recent.insert(&id, MessageFeatures { terms: terms.clone(), language, embedding });
        }
        Ok(self.model_decision(m, &lex, Some(&embedding)))
    }
}

/// Where the off-reactor part of a model decision left off.
enum Step {
    /// Decided without an embedding (and by which path, for the metric).
    Decided(Decision, Option<&'static str>),
    /// The encoder is needed for this text.
    Embed { lex: LexicalFeatures, for_encoder: String, key: [u8; 16], recent: Option<(String, &'static str)> },
}

/// Feedback: mail to the feedback address, and corrections by Message-ID.
impl Triage {
    /// The feedback recipients of a message and what each asks for; `None`
    /// when it is ordinary mail.
    fn feedback_recipients(&self, rcpts: &[String]) -> Option<Vec<(String, Requested)>> {
        let address = self.feedback.as_ref()?.address.as_ref()?;
        let found: Vec<(String, Requested)> =
            rcpts.iter().filter_map(|r| address.requested(r).map(|q| (r.clone(), q))).collect();
        (!found.is_empty()).then_some(found)
    }

    /// Records the correction a feedback mail carries, and plans its delivery:
    /// to the other recipients (if any) and the audit copy, never onward to
    /// the feedback address; with neither, the message is discarded.
    async fn take_feedback(
        self: &Arc<Self>,
        msg: MessageInput,
        requests: Vec<(String, Requested)>,
    ) -> Result<Plan, FilterError> {
        let MessageInput { envelope, raw, header_names } = msg;
        let fb = self.feedback.as_ref().expect("feedback recipients imply a feedback stage");
        let requested =
            requests.iter().map(|(_, q)| q.clone()).find(|q| *q != Requested::default()).unwrap_or_default();
        let limits = self.limits;
        let intake::Forwarded { text, attached_id: forwarded_id, .. } =
            blocking(move || intake::forwarded(&raw, limits)).await?;
        let actor = self.actor(&envelope.mail_from);
        let recorded = match self.message_features(text).await {
            Ok(features) => {
                let hash = forwarded_id.as_deref().map(|id| self.message_hash(id));
                let triage = Arc::clone(self);
                blocking(move || triage.record(&features, &requested, Channel::Mail, actor, hash))
                    .await?
                    .map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        let status = match &recorded {
            Ok(id) => format!("recorded {id}"),
            Err(e) => {
                tracing::warn!(queue_id = envelope.queue_id.as_deref().unwrap_or("-"), error = %e, "feedback mail not recorded");
                format!("not recorded: {e}")
            }
        };
        if let Some(audit) = &self.audit {
            let mut record = self.audit_line(&envelope, "feedback");
            record.reason = Some(crate::redact::redact(&status).into_owned());
            record.source = Some("feedback".into());
            record.action = Some(if fb.audit_copy.is_some() { "audit_copy" } else { "discard" }.into());
            write_audit(audit, record);
        }
        let mut plan = Plan::strip_inbound(&header_names);
        plan.changes.push(crate::actions::Change::AddHeader { name: "X-Triage-Feedback".into(), value: status });
        let others = envelope.rcpts.iter().filter(|r| !requests.iter().any(|(f, _)| f == *r)).count();
        match (&fb.audit_copy, others) {
            (None, 0) => plan.changes.push(crate::actions::Change::Discard { reason: "feedback recorded".into() }),
            (copy, _) => {
                for (r, _) in &requests {
                    plan.changes.push(crate::actions::Change::DeleteRecipient { address: r.clone() });
                }
                if let Some(c) = copy.as_ref().filter(|c| !envelope.rcpts.iter().any(|r| r.eq_ignore_ascii_case(c))) {
                    plan.changes.push(crate::actions::Change::AddRecipient { address: c.clone() });
                }
            }
        }
        Ok(plan)
    }

    /// The features a correction keeps of a message text: term counts, a
    /// language guess, and the embedding when the heads read one (from the
    /// cache, else the encoder through the queue; missing if it is busy).
    async fn message_features(self: &Arc<Self>, text: String) -> Result<MessageFeatures, FilterError> {
        let triage = Arc::clone(self);
        let (terms, lang, for_encoder) = blocking(move || {
            let (terms, lang) = triage.lexical_part(&text);
            let needs = triage.model.as_ref().is_some_and(|m| m.classifier.needs_embedding());
            (terms, lang, needs.then(|| encoder_text(&text)))
        })
        .await?;
        let mut embedding = None;
        if let (Some(m), Some(t)) = (&self.model, for_encoder) {
            let key = EmbeddingCache::key(&t);
            let e = match (m.cache.get(&key), &m.batcher) {
                (Some(e), _) => Some(e.to_vec()),
                (None, Some(b)) => b.embed(t).await.ok(),
                (None, None) => None,
            };
            embedding = e.map(|e| (m.classifier.id.clone(), e));
        }
        Ok(MessageFeatures { terms, language: lang, embedding })
    }

    /// Stores one correction (blocking: call off the reactor). Returns its id.
    pub fn record(
        &self,
        features: &MessageFeatures,
        requested: &Requested,
        channel: Channel,
        actor: String,
        message_hash: Option<String>,
    ) -> Result<i64, FeedbackError> {
        let fb = self.feedback.as_ref().ok_or(FeedbackError::NotConfigured)?;
        let link = fb.link.as_ref().ok_or(FeedbackError::NotConfigured)?;
        let (department_labels, priority_labels) = match &self.model {
            Some(m) => (
                m.classifier.department_labels(),
                m.classifier.priority.as_ref().map(|h| h.meta.labels.clone()).unwrap_or_default(),
            ),
            None => (Vec::new(), Vec::new()),
        };
        let labels = match intake::resolve(&fb.cfg, &department_labels, &priority_labels, requested) {
            Ok(l) => l,
            Err(e) => {
                metrics::counter!(name::FEEDBACK_REFUSED, "channel" => channel.as_str()).increment(1);
                return Err(e);
            }
        };
        let correction = features.correction(labels.clone(), channel, actor, message_hash);
        let id = link.store.insert(&correction)?;
        let department = labels.department.clone().unwrap_or_default();
        let department = match &self.model {
            Some(m) => m.departments.get(&department).cloned().unwrap_or(department),
            None => department,
        };
        metrics::counter!(name::FEEDBACK, "department" => department.clone(), "channel" => channel.as_str())
            .increment(1);
        // A correction means a person triaged this message after all.
        metrics::gauge!(name::MINUTES_SAVED).decrement(self.minutes_per_message);
        tracing::info!(
            id,
            department,
            priority = labels.priority.as_deref().unwrap_or("-"),
            channel = channel.as_str(),
            "correction recorded"
        );
        Ok(id)
    }

    /// A correction naming only the Message-ID of a recent decision (blocking).
    pub fn correct_by_message_id(
        &self,
        message_id: &str,
        requested: &Requested,
        channel: Channel,
        actor: String,
    ) -> Result<i64, FeedbackError> {
        let link = self.link().ok_or(FeedbackError::NotConfigured)?;
        let features = link.recent.get(message_id).ok_or(FeedbackError::NotRecent)?;
        self.record(&features, requested, channel, actor, Some(self.message_hash(message_id)))
    }

    /// The features of a whole message given by a person (the pipe and CLI
    /// channels), computed on this thread.
    pub fn features_of(&self, raw: &[u8]) -> Result<(MessageFeatures, Option<String>), ModelError> {
        let intake::Forwarded { text, outer_id: own_id, .. } = intake::forwarded(raw, self.limits);
        let (terms, language) = self.lexical_part(&text);
        let embedding = match &self.model {
            Some(m) if m.classifier.needs_embedding() => match &m.classifier.encoder {
                Some(enc) => Some((m.classifier.id.clone(), enc.embed(&encoder_text(&text))?)),
                None => None,
            },
            _ => None,
        };
        Ok((MessageFeatures { terms, language, embedding }, own_id))
    }

    /// The term counts a correction keeps (hashed as the heads hash) and the language guess.
    fn lexical_part(&self, text: &str) -> (TermCounts, &'static str) {
        let bits = self.model.as_ref().and_then(|m| m.classifier.lexical_bits());
        (TermCounts::of(text, bits.unwrap_or(LexicalConfig::default().bits)), language::detect(text))
    }

    /// A pseudonym for a sender: HMAC with the audit key, else only the domain.
    pub fn actor(&self, address: &str) -> String {
        match &self.audit {
            Some(a) => format!("hmac:{}", a.hash_message_id(&address.to_lowercase())),
            None => format!("domain:{}", domain_of(address)),
        }
    }

    /// The Message-ID as the audit trail names it (HMAC with the audit key, else SHA-256).
    pub fn message_hash(&self, message_id: &str) -> String {
        let id = message_id.trim().trim_matches(['<', '>']);
        match &self.audit {
            Some(a) => a.hash_message_id(id),
            None => {
                use sha2::Digest;
                let d = sha2::Sha256::digest(id.as_bytes());
                d[..16].iter().map(|b| format!("{b:02x}")).collect()
            }
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, FilterError> {
    static CPU_SLOTS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    let slots = CPU_SLOTS.get_or_init(|| {
        tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get))
    });
    let _slot = slots.acquire().await.map_err(|e| FilterError::Task(e.to_string()))?;
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FilterError::Task(if e.is_panic() { "panicked".into() } else { e.to_string() }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actions::Change;

    #[tokio::test]
    async fn filter_decides_by_rule_and_strips_spoofed_headers() {
        let cfg = Config::from_toml(
            r#"
[[departments]]
name = "billing"
mailbox = "billing@example.com"
action = "reroute"
[[rules]]
name = "invoices"
header = "Subject"
pattern = "(?i)invoice"
department = "billing"
"#,
            "t",
        )
        .unwrap();
        let triage = Arc::new(Triage::new(&cfg).unwrap());
        let msg = MessageInput {
            envelope: Envelope {
                mail_from: "a@x.example".into(),
                rcpts: vec!["u@y.example".into()],
                queue_id: Some("Q1".into()),
            },
            raw: b"Subject: invoice 7\r\nX-Triage-Department: ceo\r\n\r\nhello\r\n".to_vec(),
            header_names: vec!["Subject".into(), "X-Triage-Department".into()],
        };
        let plan = triage.filter(msg).await.unwrap();
        assert_eq!(plan.changes[0], Change::RemoveHeader { name: "X-Triage-Department".into(), index: 1 });
        assert!(plan
            .changes
            .contains(&Change::AddHeader { name: "X-Triage-Department".into(), value: "billing".into() }));
        assert!(plan.changes.contains(&Change::AddRecipient { address: "billing@example.com".into() }));
        assert!(plan.changes.contains(&Change::DeleteRecipient { address: "u@y.example".into() }));
    }

    #[tokio::test]
    async fn a_decision_the_front_door_stops_waiting_for_is_still_audited() {
        let dir = tempfile::tempdir().unwrap();
        let (path, key) = (dir.path().join("audit.jsonl"), dir.path().join("key"));
        let cfg = Config::from_toml(
            &format!("[audit]\npath = \"{}\"\nkey_file = \"{}\"\n", path.display(), key.display()),
            "t",
        )
        .unwrap();
        let triage = Arc::new(Triage::new(&cfg).unwrap());
        let msg = || MessageInput {
            envelope: Envelope { mail_from: "a@x.example".into(), rcpts: vec!["u@y.example".into()], queue_id: None },
            raw: b"Subject: hi\r\n\r\nhello\r\n".to_vec(),
            header_names: vec!["Subject".into()],
        };
        {
            // Polled once (extraction is then running on a blocking thread), then dropped.
            use std::future::Future;
            let mut fut = std::pin::pin!(triage.filter(msg()));
            let first = std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx).is_pending())).await;
            assert!(first, "the decision is still running");
        }
        triage.filter(msg()).await.unwrap();
        let lines: Vec<serde_json::Value> =
            std::fs::read_to_string(&path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2, "one line per message: {lines:?}");
        assert_eq!((lines[0]["outcome"].as_str(), lines[0]["reason"].as_str()), (Some("failed"), Some("abandoned")));
        assert_eq!(lines[0]["recipient_domains"][0], "y.example");
        assert_eq!((lines[1]["outcome"].as_str(), lines[1]["department"].as_str()), (Some("decided"), Some("general")));
    }
}
