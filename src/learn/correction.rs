//! What a staff correction is, wherever it came from and wherever it is
//! kept: the [`Correction`] row, its [`Channel`], the labels it names, and
//! the errors every channel answers with.
//!
//! Privacy by construction: a [`Correction`] holds hashed term counts, an
//! embedding, labels, a channel, a pseudonymous actor and times — never a
//! subject, a body or an address.

use std::str::FromStr;

use crate::model::lexical::TermCounts;

/// How a correction reached us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Mail forwarded to the feedback address.
    Mail,
    /// `mailtriage feedback < message` (a Dovecot IMAPSieve pipe, a script).
    Pipe,
    /// `POST /feedback` (helpdesk webhooks).
    Http,
    /// `mailtriage feedback --message-id`.
    Cli,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Mail => "mail",
            Channel::Pipe => "pipe",
            Channel::Http => "http",
            Channel::Cli => "cli",
        }
    }
}

impl FromStr for Channel {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Ok(match s {
            "mail" => Channel::Mail,
            "pipe" => Channel::Pipe,
            "http" => Channel::Http,
            "cli" => Channel::Cli,
            _ => return Err(()),
        })
    }
}

/// One correction: what the heads need to learn from it, and no content.
#[derive(Debug, Clone, PartialEq)]
pub struct Correction {
    /// Store id (0 before it is stored).
    pub id: i64,
    /// Unix seconds.
    pub created_at: i64,
    pub channel: Channel,
    /// Who: an HMAC of the sender (with the audit key), a token name, a Unix user.
    pub actor: String,
    /// HMAC of the corrected message's Message-ID, when known: a later
    /// correction of the same message replaces an earlier one.
    pub message_hash: Option<String>,
    /// The department head's label and/or the priority head's.
    pub department: Option<String>,
    pub priority: Option<String>,
    pub language: String,
    pub terms: TermCounts,
    /// The encoder the embedding came from; `None` with no embedding.
    pub encoder: Option<String>,
    pub embedding: Option<Vec<f32>>,
}

/// Features of one message, as the feedback path records them.
#[derive(Debug, Clone)]
pub struct MessageFeatures {
    pub terms: TermCounts,
    pub language: &'static str,
    pub embedding: Option<(String, Vec<f32>)>,
}

impl MessageFeatures {
    /// The correction these features make with the given labels.
    pub fn correction(
        &self,
        labels: Labels,
        channel: Channel,
        actor: String,
        message_hash: Option<String>,
    ) -> Correction {
        Correction {
            id: 0,
            created_at: now(),
            channel,
            actor,
            message_hash,
            department: labels.department,
            priority: labels.priority,
            language: self.language.to_string(),
            terms: self.terms.clone(),
            encoder: self.embedding.as_ref().map(|(id, _)| id.clone()),
            embedding: self.embedding.as_ref().map(|(_, e)| e.clone()),
        }
    }
}

/// The right answer, as head labels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels {
    pub department: Option<String>,
    pub priority: Option<String>,
}

/// A correction as stored, told back to whoever made it: the HTTP answer
/// (`{"recorded": 7, "department": "billing", "label": "Billing and
/// Payments", "priority": null}`) and, as [`Display`](std::fmt::Display),
/// the line every channel prints (`recorded correction 7: department
/// billing, label "Billing and Payments"`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Recorded {
    /// The correction's id in the store.
    #[serde(rename = "recorded")]
    pub id: i64,
    /// The configured department it counts for (as the metrics name it).
    pub department: Option<String>,
    /// The department head's label it trains (a department named in the
    /// correction trains its first `labels` entry).
    pub label: Option<String>,
    pub priority: Option<String>,
}

impl std::fmt::Display for Recorded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "recorded correction {}:", self.id)?;
        let mut sep = "";
        if let Some(d) = &self.department {
            write!(f, " department {d}")?;
            sep = ",";
        }
        if let Some(l) = &self.label {
            write!(f, "{sep} label {l:?}")?;
            sep = ",";
        }
        if let Some(p) = &self.priority {
            write!(f, "{sep} priority {p}")?;
        }
        Ok(())
    }
}

/// Unix seconds now.
pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_correction_reads_the_same_as_text_and_as_json() {
        let r = Recorded {
            id: 7,
            department: Some("billing".into()),
            label: Some("Billing and Payments".into()),
            priority: Some("high".into()),
        };
        assert_eq!(
            r.to_string(),
            r#"recorded correction 7: department billing, label "Billing and Payments", priority high"#
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["recorded"], 7);
        assert_eq!(serde_json::from_value::<Recorded>(json).unwrap(), r);
        let priority_only = Recorded { id: 8, department: None, label: None, priority: Some("low".into()) };
        assert_eq!(priority_only.to_string(), "recorded correction 8: priority low");
    }
}
