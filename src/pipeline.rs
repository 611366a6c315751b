//! The one-way path of a message once a front door has it: scope
//! ([`Scope`]) → extract → decide (the [`Engine`]) → plan
//! ([`act`](crate::act)) → record (audit line, metrics, one log line).
//! Mail out of scope (or skipped by a rule) is only recorded; its plan
//! strips inbound `X-Triage-*` headers.
//!
//! [`Triage`] is the [`Filter`] a front door calls. The feedback layer
//! (`learn::filter::layer`) wraps it; it knows nothing of feedback.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use serde::Serialize;
use thiserror::Error;

use crate::act::Plan;
use crate::decide::engine::{Decided, Embedder, Engine, EngineError, Evidence, Message, ModelPath, Queued, Ruling};
use crate::decide::policy::{Decision, Explanation};
pub use crate::frontdoor::{Filter, FilterError, MessageInput};
use crate::message::envelope::Envelope;
use crate::message::extract::Features;
use crate::model::ModelError;
use crate::record::audit::{self, AuditError, AuditLog};
use crate::record::recorder::Recorder;
use crate::scope::{InScope, Scope, Scoped, Skip};
use crate::settings::{Config, ModelConfig};

/// A decision (or why there was none) with what led to it, for `classify`.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// `None` when the message was skipped.
    pub decision: Option<Decision>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<Skip>,
    pub plan: Plan,
    #[serde(skip)]
    pub features: Features,
}

/// The configuration could not be turned into a working pipeline.
#[derive(Debug, Error)]
pub enum TriageError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Audit(#[from] AuditError),
}

/// The engine with what a decision leaves behind, built from one configuration.
pub struct Triage {
    scope: Scope,
    engine: Arc<Engine>,
    /// The inference queue, started on the first message that needs it (so
    /// `classify` and `replay` never start threads).
    queued: OnceLock<Queued>,
    model_cfg: Option<ModelConfig>,
    audit: Option<AuditLog>,
    context: audit::Context,
    recorder: Recorder,
    /// `[policy] reason_header`: add `X-Triage-Reason` to model decisions.
    reason_header: bool,
}

impl From<ModelError> for FilterError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Overloaded(_) => FilterError::Overload(e.to_string()),
            ModelError::Timeout(_) => FilterError::Timeout(e.to_string()),
            e => FilterError::Failed(e.to_string()),
        }
    }
}

impl Triage {
    /// Builds the engine (loading the model when `[model]` is configured,
    /// with the heads it names) and opens the audit trail.
    pub fn new(cfg: &Config) -> Result<Self, TriageError> {
        let engine = Arc::new(Engine::new(cfg)?);
        let context = audit::Context {
            mode: cfg.server.mode,
            config_version: cfg.version.clone(),
            model_version: engine.model_summary(),
            instance: crate::record::host_name(),
        };
        Ok(Self {
            scope: Scope::from(&cfg.scope),
            engine,
            queued: OnceLock::new(),
            model_cfg: cfg.model.clone(),
            audit: cfg.audit.as_ref().map(AuditLog::open).transpose()?,
            context,
            recorder: Recorder { minutes_per_message: cfg.kpi.minutes_per_manual_triage },
            reason_header: cfg.policy.reason_header,
        })
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn audit(&self) -> Option<&AuditLog> {
        self.audit.as_ref()
    }

    pub fn audit_context(&self) -> &audit::Context {
        &self.context
    }

    pub fn recorder(&self) -> Recorder {
        self.recorder
    }

    pub fn rule_count(&self) -> usize {
        self.engine.rule_count()
    }

    /// `model:<id> (department=…, priority=…)`, or `none`.
    pub fn model_summary(&self) -> String {
        self.engine.model_summary()
    }

    /// The encoder in use, for retraining beside the daemon.
    pub fn encoder(&self) -> Option<Arc<dyn crate::model::encoder::TextEncoder>> {
        self.engine.encoder()
    }

    /// Publishes the heads' versions as `mailtriage_head_version{head}`,
    /// and their cascades' dev figures.
    pub fn publish_head_versions(&self) {
        let Some(c) = self.engine.classifier() else { return };
        let department = match &c.department {
            crate::model::DepartmentModel::Trained(h) => Some(&**h),
            crate::model::DepartmentModel::ColdStart(_) => None,
        };
        self.recorder.head_versions(
            department.map(|h| h.meta.version.as_str()),
            c.priority.as_ref().map(|h| h.meta.version.as_str()),
        );
        for (name, head) in [("department", department), ("priority", c.priority.as_ref())] {
            if let Some(dev) = head.and_then(|h| h.meta.cascade.as_ref()).map(|c| &c.dev) {
                let share = dev["encoder_share"].as_f64().or_else(|| dev["skipped_share"].as_f64().map(|s| 1.0 - s));
                let cost =
                    dev["full"]["accuracy"].as_f64().zip(dev["cascade"]["accuracy"].as_f64()).map(|(f, c)| f - c);
                if let (Some(share), Some(cost)) = (share, cost) {
                    self.recorder.cascade(name, share, cost);
                }
            }
        }
    }

    /// Decides one message on this thread (`classify`, `replay`): the same
    /// cascade as the daemon, the encoder called directly.
    pub fn decide(&self, envelope: &Envelope, raw: &[u8], header_names: &[String]) -> Result<Outcome, ModelError> {
        self.decide_message(envelope, Message::Raw(raw.to_vec()), header_names)
    }

    /// As [`decide`](Self::decide), from features already extracted.
    pub fn decide_extracted(
        &self,
        envelope: &Envelope,
        features: Features,
        header_names: &[String],
    ) -> Result<Outcome, ModelError> {
        self.decide_message(envelope, Message::Extracted(Box::new(features)), header_names)
    }

    /// `classify` and `replay`: [`flow`](Self::flow) on this thread, the
    /// encoder called directly (its futures never wait), nothing recorded.
    fn decide_message(&self, envelope: &Envelope, m: Message, header_names: &[String]) -> Result<Outcome, ModelError> {
        let raw_headers = match &m {
            Message::Raw(_) => None,
            // The scope reads the header block only; rebuild it from the decoded headers.
            Message::Extracted(f) => {
                Some(f.headers.iter().flat_map(|(n, v)| format!("{n}: {v}\r\n").into_bytes()).collect::<Vec<u8>>())
            }
        };
        let direct = self.engine.direct();
        let flowed =
            crate::decide::engine::now(self.flow(envelope, m, raw_headers.as_deref(), header_names, false, &direct))?;
        let (decision, skipped, plan, features) = match flowed.end {
            End::Skipped { skip, plan, features } => {
                // Out of scope before extraction: classify shows what was extracted all the same.
                let features = match features {
                    Seen::Extracted(f) => f,
                    Seen::Raw(raw) => self.extract(&raw),
                };
                (None, Some(skip), plan, features)
            }
            End::Decided { decision, plan, features, .. } => (Some(decision), None, plan, features),
        };
        Ok(Outcome { decision, skipped, plan, features })
    }

    /// The one way of a message from scope to plan, for the daemon and for
    /// `classify`/`replay` alike (they differ in the embedder and in what
    /// they record, which [`triage`](Self::triage) does): scope, then the
    /// engine's cascade, then automatic mail held back to a tag, then the
    /// plan. `header_block` is the raw header block when `m` is already
    /// extracted (the scope reads headers only).
    async fn flow<E: Embedder>(
        &self,
        envelope: &Envelope,
        m: Message,
        header_block: Option<&[u8]>,
        header_names: &[String],
        evidence: bool,
        embedder: &E,
    ) -> Result<Flowed, ModelError> {
        let scoped = match (&m, header_block) {
            (Message::Raw(raw), _) => self.scope.check(envelope, header_names, raw),
            (Message::Extracted(_), Some(block)) => self.scope.check(envelope, header_names, block),
            (Message::Extracted(_), None) => self.scope.check(envelope, header_names, &[]),
        };
        let in_scope = match scoped {
            Scoped::Triage(s) => s,
            Scoped::Skip(skip) => {
                let features = match m {
                    Message::Extracted(f) => Seen::Extracted(*f),
                    Message::Raw(raw) => Seen::Raw(raw),
                };
                let plan = Self::skip_plan(&skip, header_names);
                return Ok(Flowed { end: End::Skipped { skip, plan, features }, path: None, extract_seconds: None });
            }
        };
        let Decided { ruling, features, evidence, path, extract_seconds } =
            self.engine.decide(envelope.clone(), m, evidence, embedder).await?;
        let end = match ruling {
            Ruling::Skip(rule) => {
                let skip = Skip::Rule(rule);
                End::Skipped { plan: Self::skip_plan(&skip, header_names), skip, features: Seen::Extracted(features) }
            }
            Ruling::Decision(mut decision) => {
                hold_back(&mut decision, &in_scope);
                let plan = self.plan(&decision, envelope, &in_scope, header_names, &features);
                End::Decided { decision, plan, features, evidence, in_scope }
            }
        };
        Ok(Flowed { end, path, extract_seconds })
    }

    /// The decision's plan, with `X-Triage-Reason` when configured.
    fn plan(
        &self,
        decision: &Decision,
        envelope: &Envelope,
        in_scope: &InScope,
        header_names: &[String],
        features: &Features,
    ) -> Plan {
        let mut plan = Plan::for_decision(decision, envelope, in_scope, header_names);
        if self.reason_header {
            if let Some(e) = self.engine.explain(features, decision) {
                plan.add_reason(&e);
            }
        }
        plan
    }

    /// Each rule tried on this message and why it did or did not match
    /// (`classify --explain`). Message content: never for logs.
    pub fn rule_trace(&self, envelope: &Envelope, features: &Features) -> Vec<crate::decide::rules::RuleTrace> {
        self.engine.rule_trace(envelope, features)
    }

    /// Why the model decided as it did (`classify --explain`); `None` for
    /// rules and the default.
    pub fn explain(&self, features: &Features, decision: &Decision) -> Option<Explanation> {
        self.engine.explain(features, decision)
    }

    /// What a skipped message gets: inbound `X-Triage-*` headers removed,
    /// unless they are a trusted hop's own.
    fn skip_plan(skip: &Skip, header_names: &[String]) -> Plan {
        if skip.keeps_headers() {
            Plan::default()
        } else {
            Plan::strip_inbound(header_names)
        }
    }

    /// Records a skipped message: the audit line, the metric, one log line.
    fn skipped(&self, envelope: &Envelope, skip: &Skip, pending: Option<audit::Pending<'_>>) {
        self.recorder.skipped(skip);
        if let Some(p) = pending {
            p.finish(|r| r.skipped(skip));
        }
        tracing::info!(
            queue_id = envelope.queue_id.as_deref().unwrap_or("-"),
            reason = %skip,
            "skipped"
        );
    }

    /// Extraction under this configuration's limits.
    pub fn extract(&self, raw: &[u8]) -> Features {
        self.engine.extract(raw)
    }

    fn queued(&self) -> &Queued {
        self.queued.get_or_init(|| {
            self.engine.queued_for(self.model_cfg.as_ref(), Arc::new(crate::record::recorder::QueueMetrics))
        })
    }

    /// Runs CPU-bound work off the reactor, as the decisions' own work runs.
    pub async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, FilterError> {
        Ok(self.queued().run(work).await?)
    }

    /// The embedding of an encoder text (cache, else the inference queue),
    /// with the encoder's id; `None` when busy or when no encoder is loaded.
    pub async fn embed_queued(&self, text: String) -> Option<(String, Vec<f32>)> {
        self.engine.embedding(text, self.queued()).await
    }

    /// Decides one message in the daemon and records it: the audit line
    /// (written even if this future is dropped half-way), the metrics and
    /// one log line. Returns what the model read when `evidence` is asked.
    pub async fn triage(
        self: &Arc<Self>,
        msg: MessageInput,
        evidence: bool,
    ) -> Result<(Plan, Option<(String, Evidence)>), FilterError> {
        let MessageInput { envelope, raw, header_names } = msg;
        let started = Instant::now();
        let pending = self.audit.as_ref().map(|a| a.begin(&envelope, &self.context));
        let result = self.flow(&envelope, Message::Raw(raw), None, &header_names, evidence, self.queued()).await;
        let seconds = started.elapsed().as_secs_f64();
        let Flowed { end, path, extract_seconds } = match result {
            Ok(f) => f,
            Err(e) => {
                self.recorder.failed(seconds);
                let e = FilterError::from(e);
                if let Some(p) = pending {
                    p.finish(|r| r.failed(e.reason()));
                }
                return Err(e);
            }
        };
        let (decision, plan, features, evidence, in_scope) = match end {
            End::Skipped { skip, plan, .. } => {
                self.skipped(&envelope, &skip, pending);
                return Ok((plan, None));
            }
            End::Decided { decision, plan, features, evidence, in_scope } => {
                (decision, plan, features, evidence, in_scope)
            }
        };
        self.recorder.decided(&decision, path, extract_seconds, seconds);
        if let (Some(p), Some(a)) = (pending, &self.audit) {
            let hash = features.message_id.as_deref().map(|m| a.pseudonyms().message_id(m));
            p.finish(|r| r.decided(&decision, hash).auto(in_scope.auto));
        }
        // Names, scores and ids only: never subject, body or addresses.
        tracing::info!(
            queue_id = envelope.queue_id.as_deref().unwrap_or("-"),
            department = %decision.department,
            priority = %decision.priority,
            confidence = format!("{:.2}", decision.confidence),
            source = %decision.source,
            action = decision.action.as_str(),
            mode = ?decision.mode,
            changes = plan.changes.len(),
            truncated = features.truncated,
            ms = format!("{:.2}", seconds * 1e3),
            "decided"
        );
        let evidence = evidence.and_then(|e| Some((features.message_id?, e)));
        Ok((plan, evidence))
    }
}

/// Where [`Triage::flow`] ended, with what the recording needs.
struct Flowed {
    end: End,
    path: Option<ModelPath>,
    extract_seconds: Option<f64>,
}

/// What a skipped message was when it left the flow: extracted on the way
/// (a rule skip, or `classify`'s own extraction), or still raw (the scope
/// skipped it first; the daemon never extracts it, `classify` does).
// Made and moved once per message: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Seen {
    Extracted(Features),
    Raw(Vec<u8>),
}

#[allow(clippy::large_enum_variant)]
enum End {
    /// Out of scope, or a `skip` rule.
    Skipped {
        skip: Skip,
        plan: Plan,
        features: Seen,
    },
    Decided {
        decision: Decision,
        plan: Plan,
        features: Features,
        evidence: Option<Evidence>,
        in_scope: InScope,
    },
}

/// Automatic mail that is triaged is only tagged: a rerouted bounce or
/// vacation reply can loop between a department and the outside.
fn hold_back(decision: &mut Decision, scope: &InScope) {
    if scope.auto.is_some() && decision.action != crate::domain::Action::Tag {
        decision.action = crate::domain::Action::Tag;
        decision.mailbox = None;
    }
}

impl Filter for Arc<Triage> {
    async fn filter(&self, msg: MessageInput) -> Result<Plan, FilterError> {
        self.triage(msg, false).await.map(|(plan, _)| plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act::Change;

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
                ..Default::default()
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
            envelope: Envelope {
                mail_from: "a@x.example".into(),
                rcpts: vec!["u@y.example".into()],
                ..Default::default()
            },
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
        assert_eq!((lines[1]["source"].as_str(), lines[1]["action"].as_str()), (Some("default"), Some("tag")));
        assert_eq!(lines[1]["mode"].as_str(), Some("enforce"));
    }
}
