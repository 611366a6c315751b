//! The SMTP envelope of one message, as a front door saw it.
//!
//! Front doors fill this in from their protocol (milter macros and commands,
//! or SMTP/LMTP MAIL and RCPT); everything after them reads it.

use serde::Serialize;

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Envelope {
    /// Reverse path without angle brackets; empty for the null sender `<>`.
    pub mail_from: String,
    /// Forward paths without angle brackets, in RCPT order.
    pub rcpts: Vec<String>,
    /// The MTA's queue id, when it told us (milter macro `i`).
    pub queue_id: Option<String>,
    /// Who handed the message to the MTA, as far as the front door knows.
    pub client: Client,
}

/// The SMTP client the message came from: what scope decisions read
/// (`[scope] skip_*`). Facts, not identities: the authenticated name itself
/// is never kept.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Client {
    /// The client's IP address (milter connect event; for a content filter,
    /// XFORWARD ADDR from the MTA, else the peer). `None` for a local
    /// submission or when the MTA did not say.
    pub addr: Option<std::net::IpAddr>,
    /// The client authenticated (SMTP AUTH) to the MTA.
    pub authenticated: bool,
    /// The MTA's name for the listener that took the message (milter macro
    /// `{daemon_name}`; Postfix: `milter_macro_daemon_name`).
    pub listener: Option<String>,
}

/// `<user@example.com>` → `user@example.com`; tolerates a missing bracket pair.
pub fn strip_brackets(addr: &str) -> String {
    let a = addr.trim();
    a.strip_prefix('<').and_then(|a| a.strip_suffix('>')).unwrap_or(a).to_string()
}

/// The domain part of an address, lower-cased (empty when there is none).
pub fn domain_of(addr: &str) -> String {
    addr.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brackets_and_domains() {
        assert_eq!(strip_brackets("<a@B.example>"), "a@B.example");
        assert_eq!(strip_brackets(" a@b "), "a@b");
        assert_eq!(strip_brackets("<>"), "");
        assert_eq!(domain_of("a@B.Example"), "b.example");
        assert_eq!(domain_of("postmaster"), "");
    }
}
