//! Feedback as a layer around the pipeline: a [`Filter`] that wraps
//! [`Triage`]. Mail to the feedback address is a correction (recorded, then
//! discarded or copied to the audit mailbox), not a message to triage;
//! every other message is triaged as usual, and what the model read of it
//! is kept in the recent-decisions window for a correction that later names
//! only its Message-ID.

use std::sync::Arc;

use super::intake::{self, FeedbackAddress, Requested};
use super::recent::RecentDecisions;
use super::FeedbackError;
use crate::act::{Change, Plan};
use crate::decide::engine::Evidence;
use crate::learn::correction::{Channel, MessageFeatures, Recorded};
use crate::learn::store::Store;
use crate::message::language;
use crate::model::lexical::{LexicalConfig, TermCounts};
use crate::model::{encoder_text, ModelError};
use crate::pipeline::{Filter, FilterError, MessageInput, Triage};
use crate::record::audit::FeedbackHandling;
use crate::record::pseudonym::Pseudonyms;
use crate::record::recorder::Recorder;
use crate::settings::{Catalog, Config};

/// What outlives a reload: the store connection and the recent decisions.
#[derive(Clone)]
pub struct FeedbackLink {
    pub store: Arc<Store>,
    pub recent: Arc<RecentDecisions>,
}

/// The pipeline with the feedback channels around it.
pub struct FeedbackLayer {
    triage: Arc<Triage>,
    /// `None` without `[feedback]`: then this layer only passes messages on.
    address: Option<FeedbackAddress>,
    audit_copy: Option<String>,
    /// For resolving department names to head labels.
    catalog: Catalog,
    link: Option<FeedbackLink>,
    pseudonyms: Pseudonyms,
}

impl FeedbackLayer {
    /// Wraps `triage`. Without a `link` (no store) corrections are refused
    /// with [`FeedbackError::NotConfigured`].
    pub fn new(triage: Triage, cfg: &Config, link: Option<FeedbackLink>) -> Self {
        let fb = cfg.feedback.as_ref();
        FeedbackLayer {
            pseudonyms: triage.audit().map_or_else(Pseudonyms::unkeyed, |a| a.pseudonyms().clone()),
            triage: Arc::new(triage),
            address: fb.and_then(|f| f.address.as_deref()).and_then(FeedbackAddress::parse),
            audit_copy: fb.and_then(|f| f.audit_copy.clone()),
            catalog: cfg.catalog.clone(),
            link: link.filter(|_| fb.is_some()),
        }
    }

    pub fn triage(&self) -> &Arc<Triage> {
        &self.triage
    }

    /// The feedback recipients of a message and what each asks for; `None`
    /// when it is ordinary mail.
    fn feedback_recipients(&self, rcpts: &[String]) -> Option<Vec<(String, Requested)>> {
        let address = self.address.as_ref()?;
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
        let pending = self.triage.audit().map(|a| a.begin(&envelope, self.triage.audit_context()));
        let requested =
            requests.iter().map(|(_, q)| q.clone()).find(|q| *q != Requested::default()).unwrap_or_default();
        let limits = self.triage.engine().limits();
        let intake::Forwarded { text, attached_id: forwarded_id, .. } =
            self.triage.run(move || intake::forwarded(&raw, limits)).await?;
        let actor = self.actor(&envelope.mail_from);
        let recorded = match self.message_features(text).await {
            Ok(features) => {
                let hash = forwarded_id.as_deref().map(|id| self.message_hash(id));
                let layer = Arc::clone(self);
                match self.triage.run(move || layer.record(&features, &requested, Channel::Mail, actor, hash)).await? {
                    // The store is down: Postfix keeps the correction and retries, rather than
                    // it being discarded unrecorded.
                    Err(FeedbackError::Store(e)) if e.is_retryable() => {
                        if let Some(p) = pending {
                            p.finish(|r| r.failed("feedback store unavailable"));
                        }
                        return Err(FilterError::Retry(e.to_string()));
                    }
                    other => other.map_err(|e| e.to_string()),
                }
            }
            Err(e) => {
                Recorder::refused(Channel::Mail.as_str(), "features");
                Err(e.to_string())
            }
        };
        let status = match &recorded {
            Ok(r) => r.to_string(),
            Err(e) => {
                tracing::warn!(queue_id = envelope.queue_id.as_deref().unwrap_or("-"), error = %e, "feedback mail not recorded");
                format!("not recorded: {e}")
            }
        };
        let handling = if self.audit_copy.is_some() { FeedbackHandling::AuditCopy } else { FeedbackHandling::Discard };
        if let Some(p) = pending {
            p.finish(|r| r.feedback(&status, handling));
        }
        let mut plan = Plan::strip_inbound(&header_names);
        plan.changes.push(Change::AddHeader { name: "X-Triage-Feedback".into(), value: status });
        let others = envelope.rcpts.iter().filter(|r| !requests.iter().any(|(f, _)| f == *r)).count();
        match (&self.audit_copy, others) {
            (None, 0) => plan.changes.push(Change::Discard { reason: "feedback recorded".into() }),
            (copy, _) => {
                for (r, _) in &requests {
                    plan.changes.push(Change::DeleteRecipient { address: r.clone() });
                }
                if let Some(c) = copy.as_ref().filter(|c| !envelope.rcpts.iter().any(|r| r.eq_ignore_ascii_case(c))) {
                    plan.changes.push(Change::AddRecipient { address: c.clone() });
                }
            }
        }
        Ok(plan)
    }

    /// The features a correction keeps of a message text: term counts, a
    /// language guess, and the embedding when the heads read one (from the
    /// encoder through the queue; missing if it is busy).
    async fn message_features(self: &Arc<Self>, text: String) -> Result<MessageFeatures, FilterError> {
        let layer = Arc::clone(self);
        let (terms, lang, for_encoder) = self
            .triage
            .run(move || {
                let (terms, lang) = layer.lexical_part(&text);
                let needs = layer.triage.engine().classifier().is_some_and(|c| c.needs_embedding());
                (terms, lang, needs.then(|| encoder_text(&text)))
            })
            .await?;
        let embedding = match for_encoder {
            Some(t) => self.triage.embed_queued(t).await,
            None => None,
        };
        Ok(MessageFeatures { terms, language: lang, embedding })
    }

    /// Stores one correction (blocking: call off the reactor). Returns what
    /// was recorded: its id, the department it counts for and the head
    /// label it trains. A refusal is counted, with its reason.
    pub fn record(
        &self,
        features: &MessageFeatures,
        requested: &Requested,
        channel: Channel,
        actor: String,
        message_hash: Option<String>,
    ) -> Result<Recorded, FeedbackError> {
        self.store_correction(features, requested, channel, actor, message_hash)
            .inspect_err(|e| Recorder::refused(channel.as_str(), e.reason()))
    }

    fn store_correction(
        &self,
        features: &MessageFeatures,
        requested: &Requested,
        channel: Channel,
        actor: String,
        message_hash: Option<String>,
    ) -> Result<Recorded, FeedbackError> {
        let link = self.link.as_ref().ok_or(FeedbackError::NotConfigured)?;
        let engine = self.triage.engine();
        let (department_labels, priority_labels) = match engine.classifier() {
            Some(c) => (c.department_labels(), c.priority.as_ref().map(|h| h.meta.labels.clone()).unwrap_or_default()),
            None => (Vec::new(), Vec::new()),
        };
        let labels = intake::resolve(&self.catalog, &department_labels, &priority_labels, requested)?;
        let correction = features.correction(labels.clone(), channel, actor, message_hash);
        let id = link.store.insert(&correction)?;
        // The department as the metrics and the report name it: the one that claims the label.
        let department = labels
            .department
            .as_deref()
            .map(|l| self.catalog.for_label(l).map_or_else(|| l.to_string(), |d| d.to_string()));
        self.triage.recorder().correction(department.as_deref().unwrap_or_default(), channel.as_str());
        tracing::info!(
            id,
            department = department.as_deref().unwrap_or("-"),
            label = labels.department.as_deref().unwrap_or("-"),
            priority = labels.priority.as_deref().unwrap_or("-"),
            channel = channel.as_str(),
            "correction recorded"
        );
        Ok(Recorded { id, department, label: labels.department, priority: labels.priority })
    }

    /// A correction naming only the Message-ID of a recent decision
    /// (blocking). A refusal is counted, with its reason.
    pub fn correct_by_message_id(
        &self,
        message_id: &str,
        requested: &Requested,
        channel: Channel,
        actor: String,
    ) -> Result<Recorded, FeedbackError> {
        let found = self.link.as_ref().ok_or(FeedbackError::NotConfigured).and_then(|link| {
            let hash = self.message_hash(message_id);
            let features = link.recent.find(&hash)?.ok_or(FeedbackError::NotRecent)?;
            Ok((features, hash))
        });
        let (features, hash) = found.inspect_err(|e| Recorder::refused(channel.as_str(), e.reason()))?;
        self.record(&features, requested, channel, actor, Some(hash))
    }

    /// The features of a whole message given by a person (the pipe and CLI
    /// channels), computed on this thread.
    pub fn features_of(&self, raw: &[u8]) -> Result<(MessageFeatures, Option<String>), ModelError> {
        let engine = self.triage.engine();
        let intake::Forwarded { text, outer_id: own_id, .. } = intake::forwarded(raw, engine.limits());
        let (terms, language) = self.lexical_part(&text);
        let embedding = match (engine.classifier(), engine.encoder()) {
            (Some(c), Some(enc)) if c.needs_embedding() => Some((c.id.clone(), enc.embed(&encoder_text(&text))?)),
            _ => None,
        };
        Ok((MessageFeatures { terms, language, embedding }, own_id))
    }

    /// The term counts a correction keeps (hashed as the heads hash) and the language guess.
    fn lexical_part(&self, text: &str) -> (TermCounts, &'static str) {
        let bits = self.triage.engine().classifier().and_then(|c| c.lexical_bits());
        (TermCounts::of(text, bits.unwrap_or(LexicalConfig::default().bits)), language::detect(text))
    }

    /// A pseudonym for a sender: HMAC with the audit key, else only the domain.
    pub fn actor(&self, address: &str) -> String {
        self.pseudonyms.actor(address)
    }

    /// The Message-ID as the audit trail names it (HMAC with the audit key, else SHA-256).
    pub fn message_hash(&self, message_id: &str) -> String {
        self.pseudonyms.message_id(message_id)
    }

    /// How Message-IDs and senders are stored (keyed with the audit key).
    pub fn pseudonyms(&self) -> &Pseudonyms {
        &self.pseudonyms
    }

    /// The store and the recent decisions, when feedback is configured.
    pub fn link(&self) -> Option<&FeedbackLink> {
        self.link.as_ref()
    }
}

impl Filter for Arc<FeedbackLayer> {
    async fn filter(&self, msg: MessageInput) -> Result<Plan, FilterError> {
        if let Some(requests) = self.feedback_recipients(&msg.envelope.rcpts) {
            return self.take_feedback(msg, requests).await;
        }
        let (plan, evidence) = self.triage.triage(msg, self.link.is_some()).await?;
        if let (Some((message_id, e)), Some(link)) = (evidence, &self.link) {
            link.recent.remember(&self.message_hash(&message_id), e.into());
        }
        Ok(plan)
    }
}

/// A decision's evidence as a correction keeps it.
impl From<Evidence> for MessageFeatures {
    fn from(e: Evidence) -> Self {
        MessageFeatures { terms: e.terms, language: e.language, embedding: e.embedding.map(|(id, v)| (id, v.to_vec())) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::metrics::name;

    /// A layer over rules only, with a SQLite store in `dir` and a recent-decisions window.
    fn layer(dir: &std::path::Path) -> FeedbackLayer {
        let cfg = Config::from_toml(
            &format!(
                r#"
[[departments]]
name = "billing"
labels = ["Billing and Payments", "Refunds"]
[[departments]]
name = "legal"
[feedback]
store = "sqlite://{}/feedback.db"
heads_dir = "{}/heads"
"#,
                dir.display(),
                dir.display()
            ),
            "t",
        )
        .unwrap();
        let fb = cfg.feedback.as_ref().unwrap();
        let link = FeedbackLink {
            store: Arc::new(Store::for_config(fb, true).unwrap()),
            recent: Arc::new(RecentDecisions::new(1 << 20)),
        };
        FeedbackLayer::new(Triage::new(&cfg).unwrap(), &cfg, Some(link))
    }

    fn features() -> MessageFeatures {
        MessageFeatures { terms: TermCounts::of("refund my invoice", 18), language: "en", embedding: None }
    }

    fn requested(department: &str) -> Requested {
        Requested { department: Some(department.into()), priority: None }
    }

    /// `mailtriage_feedback_refused_total` by reason, as Prometheus shows it.
    fn refused(text: &str) -> Vec<(String, f64)> {
        text.lines()
            .filter(|l| l.starts_with(name::FEEDBACK_REFUSED))
            .filter_map(|l| {
                let reason = l.split("reason=\"").nth(1)?.split('"').next()?.to_string();
                Some((reason, l.rsplit(' ').next()?.parse().ok()?))
            })
            .collect()
    }

    #[test]
    fn every_refused_correction_is_counted_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let layer = layer(dir.path());
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            // What answers 404 over HTTP: a Message-ID not among the recent decisions.
            let e = layer.correct_by_message_id("<never@x>", &requested("billing"), Channel::Http, "t".into());
            assert!(matches!(e, Err(FeedbackError::NotRecent)), "{e:?}");
            // What answers 422: a department nobody configured.
            layer.link().unwrap().recent.remember(&layer.message_hash("<known@x>"), features());
            let e = layer.correct_by_message_id("<known@x>", &requested("hr"), Channel::Http, "t".into());
            assert!(matches!(e, Err(FeedbackError::UnknownDepartment(..))), "{e:?}");
            // The pipe's way in, refused too.
            let e = layer.record(&features(), &Requested::default(), Channel::Pipe, "t".into(), None);
            assert!(matches!(e, Err(FeedbackError::NoLabel)), "{e:?}");
        });
        let mut got = refused(&handle.render());
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            got,
            [("no_label".to_string(), 1.0), ("not_recent".into(), 1.0), ("unknown_department".into(), 1.0)]
        );
    }

    #[test]
    fn a_correction_naming_a_department_says_which_label_it_trains_and_counts_for_the_department() {
        let dir = tempfile::tempdir().unwrap();
        let layer = layer(dir.path());
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        layer.link().unwrap().recent.remember(&layer.message_hash("<known@x>"), features());
        let by_name = metrics::with_local_recorder(&recorder, || {
            layer.correct_by_message_id("<known@x>", &requested("Billing"), Channel::Cli, "t".into()).unwrap()
        });
        assert_eq!(
            (by_name.department.as_deref(), by_name.label.as_deref()),
            (Some("billing"), Some("Billing and Payments")),
            "a department trains its first label"
        );
        assert_eq!(
            by_name.to_string(),
            format!(r#"recorded correction {}: department billing, label "Billing and Payments""#, by_name.id)
        );
        let text = handle.render();
        assert!(text.contains(&format!("{}{{department=\"billing\",channel=\"cli\"}} 1", name::FEEDBACK)), "{text}");
    }
}
