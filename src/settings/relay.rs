//! `[relay]`: the next hop of the SMTP/LMTP front doors.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::section::section;
use super::server::ListenAddress;
use super::values::de_duration;

section! {
    /// The next hop of the SMTP/LMTP front doors: where filtered mail goes.
    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct RelayConfig in "relay" {
        /// `smtp://HOST:PORT`, `lmtp://HOST:PORT`, or `smtp:unix:/path` / `lmtp:unix:/path`.
        restart_with_section next_hop: NextHop,
        /// STARTTLS to the next hop, in Postfix's words: `none`, `may`
        /// (if offered, certificate not checked), `encrypt` (required, not
        /// checked), `verify` (required, checked against `tls_ca_file` or the system roots).
        #[serde(default)]
        restart tls: RelayTls,
        /// PEM file of the CAs `verify` trusts instead of the system's.
        #[serde(default)]
        restart tls_ca_file: Option<PathBuf>,
        /// Longest wait for the greeting or a reply to one command.
        #[serde(default = "default_relay_timeout", deserialize_with = "de_duration")]
        restart timeout: Duration,
        /// Longest wait for the reply(s) after the message's final dot.
        #[serde(default = "default_relay_data_timeout", deserialize_with = "de_duration")]
        restart data_timeout: Duration,
        /// Where `quarantine` decisions go in SMTP/LMTP mode (a relay has no hold queue).
        #[serde(default)]
        restart quarantine_mailbox: Option<String>,
    }
}

/// What an absent `[relay]`'s keys compare as in a reload (`next_hop`,
/// which the file must give, is a placeholder never compared).
impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            next_hop: NextHop { protocol: HopProtocol::Smtp, address: ListenAddress::Inet("127.0.0.1:25".into()) },
            tls: RelayTls::default(),
            tls_ca_file: None,
            timeout: default_relay_timeout(),
            data_timeout: default_relay_data_timeout(),
            quarantine_mailbox: None,
        }
    }
}

fn default_relay_timeout() -> Duration {
    Duration::from_secs(300)
}

fn default_relay_data_timeout() -> Duration {
    Duration::from_secs(600)
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum RelayTls {
    #[default]
    None,
    May,
    Encrypt,
    Verify,
}

/// Which protocol the next hop speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HopProtocol {
    Smtp,
    Lmtp,
}

/// A parsed `[relay] next_hop`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextHop {
    pub protocol: HopProtocol,
    pub address: ListenAddress,
}

impl FromStr for NextHop {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}`: expected smtp://HOST:PORT, lmtp://HOST:PORT, or lmtp:unix:/path");
        let (protocol, rest) = if let Some(r) = s.strip_prefix("smtp:") {
            (HopProtocol::Smtp, r)
        } else if let Some(r) = s.strip_prefix("lmtp:") {
            (HopProtocol::Lmtp, r)
        } else {
            return Err(bad());
        };
        let address = if let Some(hostport) = rest.strip_prefix("//") {
            format!("inet:{}", hostport.trim_end_matches('/')).parse().map_err(|_| bad())?
        } else if rest.starts_with("unix:") || rest.starts_with("inet:") {
            rest.parse().map_err(|e: String| format!("`{s}`: {e}"))?
        } else {
            return Err(bad());
        };
        Ok(NextHop { protocol, address })
    }
}

impl fmt::Display for NextHop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = match self.protocol {
            HopProtocol::Smtp => "smtp",
            HopProtocol::Lmtp => "lmtp",
        };
        match &self.address {
            ListenAddress::Inet(a) => write!(f, "{p}://{a}"),
            ListenAddress::Unix(path) => write!(f, "{p}:unix:{}", path.display()),
        }
    }
}

impl<'de> Deserialize<'de> for NextHop {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}
