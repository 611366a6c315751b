//! The words every stage shares: which department, which priority, what
//! happens to the message, and whether recipients may change. Types, not
//! strings: serde writes the strings (headers, audit lines, metrics labels,
//! the TOML file), and nothing here imports the rest of the crate.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Declares a string id: a name from the configuration, compared and
/// printed as its text.
macro_rules! id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn new(name: impl Into<String>) -> Self {
                $name(name.into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name(s.to_string())
            }
        }
    };
}

id!(
    /// A configured department (`[[departments]] name`, or `defaults.department`).
    DepartmentId
);
id!(
    /// A priority, one of `defaults.priorities`.
    PriorityId
);

/// What happens to a message routed to a department.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Add headers only.
    #[default]
    Tag,
    /// Replace the envelope recipients with the department mailbox.
    Reroute,
    /// Add the department mailbox to the recipients.
    Copy,
    /// Send to the human review mailbox: the decision is unsure
    /// (`policy.review_below`). Never a department's own action.
    Review,
    /// Ask the MTA to hold the message (an SMTP filter delivers it to
    /// `relay.quarantine_mailbox`).
    Quarantine,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Tag => "tag",
            Action::Reroute => "reroute",
            Action::Copy => "copy",
            Action::Review => "review",
            Action::Quarantine => "quarantine",
        }
    }
}

/// `enforce` changes recipients; `shadow` only adds headers.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    Shadow,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_writes_the_plain_strings() {
        let v = serde_json::json!({
            "d": DepartmentId::new("billing"),
            "p": PriorityId::from("high"),
            "a": Action::Review,
            "m": Mode::Shadow,
        });
        assert_eq!(v.to_string(), r#"{"a":"review","d":"billing","m":"shadow","p":"high"}"#);
        let a: Action = serde_json::from_str("\"quarantine\"").unwrap();
        assert_eq!(a, Action::Quarantine);
        assert_eq!(DepartmentId::new("x"), "x");
    }
}
