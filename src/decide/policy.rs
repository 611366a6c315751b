//! From "who should get this" to "what we do about it": the department's
//! action and mailbox, the mode (shadow or enforce), and the confidence that
//! goes into the headers.

use std::fmt;

use serde::Serialize;

use crate::decide::rules::RuleMatch;
pub use crate::domain::Action;
use crate::domain::{DepartmentId, Mode, PriorityId};
use crate::settings::{Catalog, Config};

/// What decided the department.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An admin's rule, by name.
    Rule(String),
    /// The classifier, by model id.
    Model(String),
    /// Nothing decided; the configured default department.
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Rule(r) => write!(f, "rule:{r}"),
            Source::Model(m) => write!(f, "model:{m}"),
            Source::Default => f.write_str("default"),
        }
    }
}

impl Serialize for Source {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The decision for one message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub department: DepartmentId,
    pub priority: PriorityId,
    /// 0.0–1.0. A rule is certain (1.0); the default department has nothing
    /// behind it (0.0).
    pub confidence: f32,
    pub source: Source,
    pub action: Action,
    /// Where `reroute`, `copy` and `review` deliver.
    pub mailbox: Option<String>,
    pub mode: Mode,
    /// Head versions behind a model decision (`department=v3 priority=v1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    /// The department head's class behind a model decision and its
    /// runner-up: what [`Explanation`]s start from. Never serialised: audit
    /// lines and logs carry no reasons.
    #[serde(skip)]
    pub classes: Option<ClassChoice>,
}

/// Which class of the department head a model decision chose, and the
/// runner-up (index, calibrated probability). Indexes only: labels are
/// looked up when an explanation is asked for, not on every decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClassChoice {
    pub chosen: usize,
    pub runner_up: Option<(usize, f32)>,
}

/// Why the model chose a department, in words staff can read: the runner-up
/// class with its probability and the message's terms that weighed most for
/// the chosen class against it. Message content: for `X-Triage-Reason` and
/// `classify --explain` only, never for logs or the audit trail.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Explanation {
    pub runner_up: Option<(String, f32)>,
    /// Terms and their contribution to the chosen class's logit over the runner-up's.
    pub terms: Vec<(String, f32)>,
}

/// Turns what the rules (and later the model) found into a [`Decision`].
#[derive(Debug, Clone)]
pub struct Policy {
    mode: Mode,
    /// The departments' mailboxes and actions, and the defaults.
    catalog: Catalog,
    review_below: f32,
    /// `review_below` was set by hand (it then wins over a target accuracy).
    review_below_set: bool,
    review_mailbox: Option<String>,
}

impl Policy {
    pub fn new(cfg: &Config) -> Self {
        Self {
            mode: cfg.server.mode,
            catalog: cfg.catalog.clone(),
            review_below: cfg.policy.review_below.unwrap_or(0.0),
            review_below_set: cfg.policy.review_below.is_some(),
            review_mailbox: cfg.policy.review_mailbox.clone(),
        }
    }

    /// Reviews below the threshold a target accuracy asks for, unless
    /// `review_below` was set by hand.
    pub fn with_target_threshold(mut self, threshold: f32) -> Self {
        if !self.review_below_set {
            self.review_below = threshold;
        }
        self
    }

    /// Decides from the classifier: `department` is already mapped to a
    /// configured department; an unsure one goes to human review.
    pub fn decide_model(&self, department: &str, confidence: f32, priority: Option<&str>, model_id: &str) -> Decision {
        let priority = priority.unwrap_or(self.catalog.default_priority().as_str());
        let mut d = self.route(department, priority, confidence, Source::Model(model_id.into()));
        if let Some(mailbox) = self.review_mailbox.as_ref().filter(|_| confidence < self.review_below) {
            d.action = Action::Review;
            d.mailbox = Some(mailbox.clone());
        }
        d
    }

    /// Decides from the first matching rule, or falls back to the default.
    pub fn decide(&self, rule: Option<RuleMatch<'_>>) -> Decision {
        match rule {
            Some(m) => {
                let priority = m.priority.unwrap_or(self.catalog.default_priority().as_str());
                self.route(m.department, priority, 1.0, Source::Rule(m.rule.into()))
            }
            None => {
                let (department, priority) = (self.catalog.default_department(), self.catalog.default_priority());
                self.route(department.as_str(), priority.as_str(), 0.0, Source::Default)
            }
        }
    }

    /// The department's configured action and mailbox. A department that is
    /// only a label (the default one need not be listed) is tagged.
    fn route(&self, department: &str, priority: &str, confidence: f32, source: Source) -> Decision {
        let (mailbox, action) =
            self.catalog.department(department).map_or((None, Action::Tag), |d| (d.mailbox.clone(), d.action));
        Decision {
            department: department.into(),
            priority: priority.into(),
            confidence,
            source,
            action,
            mailbox,
            mode: self.mode,
            model_version: None,
            classes: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(mode: &str) -> Config {
        Config::from_toml(
            &format!(
                r#"
[server]
mode = "{mode}"
[[departments]]
name = "billing"
mailbox = "billing@example.com"
action = "reroute"
"#
            ),
            "t",
        )
        .unwrap()
    }

    #[test]
    fn rule_decisions_take_the_department_action() {
        let p = Policy::new(&cfg("enforce"));
        let d = p.decide(Some(RuleMatch { rule: "inv", department: "billing", priority: Some("high") }));
        assert_eq!(d.action, Action::Reroute);
        assert_eq!(d.mailbox.as_deref(), Some("billing@example.com"));
        assert_eq!(d.priority, "high");
        assert_eq!(d.confidence, 1.0);
        assert_eq!(d.source.to_string(), "rule:inv");
    }

    #[test]
    fn unsure_model_decisions_go_to_review() {
        let mut c = cfg("enforce");
        c.policy.review_below = Some(0.6);
        c.policy.review_mailbox = Some("triage@example.com".into());
        let p = Policy::new(&c);
        let sure = p.decide_model("billing", 0.61, Some("high"), "m");
        assert_eq!((sure.action, sure.mailbox.as_deref()), (Action::Reroute, Some("billing@example.com")));
        assert_eq!(sure.source.to_string(), "model:m");
        let unsure = p.decide_model("billing", 0.59, None, "m");
        assert_eq!((unsure.action, unsure.mailbox.as_deref()), (Action::Review, Some("triage@example.com")));
        assert_eq!((unsure.department.as_str(), unsure.priority.as_str()), ("billing", "medium"));
        // review off by default
        assert_eq!(Policy::new(&cfg("enforce")).decide_model("billing", 0.01, None, "m").action, Action::Reroute);
        // A target accuracy's threshold applies, unless review_below was set by hand.
        let by_target = Policy::new(&c).with_target_threshold(0.8);
        assert_eq!(by_target.decide_model("billing", 0.7, None, "m").action, Action::Reroute);
        c.policy.review_below = None;
        let by_target = Policy::new(&c).with_target_threshold(0.8);
        assert_eq!(by_target.decide_model("billing", 0.7, None, "m").action, Action::Review);
        assert_eq!(by_target.decide_model("billing", 0.8, None, "m").action, Action::Reroute);
    }

    #[test]
    fn default_is_a_tag_with_zero_confidence() {
        let d = Policy::new(&cfg("shadow")).decide(None);
        assert_eq!((d.department.as_str(), d.priority.as_str()), ("general", "medium"));
        assert_eq!((d.action, d.source.clone(), d.mode), (Action::Tag, Source::Default, Mode::Shadow));
        assert_eq!(d.confidence, 0.0);
    }
}
