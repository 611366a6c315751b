//! `[server]` and `[limits]`: where the front doors listen, what they tell
//! the MTA, and what one message or connection may cost.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::section::section;
use super::values::{de_duration, de_octal};

use crate::domain::Mode;

section! {
    /// Where `serve` listens, and what it tells the MTA.
    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct ServerConfig in "server" {
        /// `inet:HOST:PORT` or `unix:/path/to.sock`, as Postfix writes milter
        /// addresses. Unset: `inet:127.0.0.1:8890`, unless only `smtp`/`lmtp` are set.
        restart milter: Option<ListenAddress>,
        /// Permissions of the unix sockets we listen on (milter, SMTP, LMTP), octal.
        #[serde(deserialize_with = "de_octal")]
        restart milter_socket_mode: u32,
        /// SMTP content-filter listener (`HOST:PORT` or `unix:/path`); needs `[relay]`.
        #[serde(deserialize_with = "de_front_address")]
        restart smtp: Option<ListenAddress>,
        /// LMTP listener (`HOST:PORT` or `unix:/path`); needs `[relay]`.
        #[serde(deserialize_with = "de_front_address")]
        restart lmtp: Option<ListenAddress>,
        /// The name we greet SMTP/LMTP clients with and say in EHLO to the next hop.
        live hostname: String,
        /// PEM certificate chain and private key: STARTTLS is offered when both are set.
        restart tls_cert: Option<PathBuf>,
        restart tls_key: Option<PathBuf>,
        /// Refuse MAIL until the client has started TLS.
        live require_tls: bool,
        /// SMTP/LMTP clients whose XFORWARD (the original client's name, address,
        /// HELO…) we believe and pass on; Postfix's `smtpd_authorized_xforward_hosts`.
        /// Clients on a unix socket are always local and trusted.
        live xforward_hosts: Vec<crate::settings::Cidr>,
        /// An SMTP/LMTP client silent this long (for a command, or within DATA)
        /// is disconnected with 421 (RFC 5321 §4.5.3.2 asks for at least 5 minutes).
        #[serde(deserialize_with = "de_duration")]
        live smtp_timeout: Duration,
        live mode: Mode,
        live on_error: OnError,
        /// The whole decision at end-of-message must finish within this, else `on_error`.
        #[serde(deserialize_with = "de_duration")]
        live decision_timeout: Duration,
        /// While a decision runs, tell the MTA we are alive this often.
        #[serde(deserialize_with = "de_duration")]
        live progress_interval: Duration,
        /// A milter connection idle longer than this is closed.
        #[serde(deserialize_with = "de_duration")]
        live idle_timeout: Duration,
        /// Concurrent connections per listener; more wait in the kernel's backlog.
        restart max_connections: usize,
        /// On SIGTERM, how long sessions in flight may take to finish.
        #[serde(deserialize_with = "de_duration")]
        restart shutdown_grace: Duration,
    }
}

/// The milter address used when none is configured and no SMTP/LMTP listener is.
pub const DEFAULT_MILTER: &str = "inet:127.0.0.1:8890";

impl ServerConfig {
    /// The milter listener to start, if any.
    pub fn milter_listen(&self) -> Option<ListenAddress> {
        match (&self.milter, &self.smtp, &self.lmtp) {
            (Some(m), _, _) => Some(m.clone()),
            (None, None, None) => Some(DEFAULT_MILTER.parse().expect("the default milter address parses")),
            _ => None,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            milter: None,
            milter_socket_mode: 0o660,
            smtp: None,
            lmtp: None,
            hostname: system_hostname(),
            tls_cert: None,
            tls_key: None,
            require_tls: false,
            xforward_hosts: ["127.0.0.0/8", "::1"].iter().map(|c| c.parse().expect("valid block")).collect(),
            smtp_timeout: Duration::from_secs(300),
            mode: Mode::Enforce,
            on_error: OnError::Accept,
            decision_timeout: Duration::from_secs(20),
            progress_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(600),
            max_connections: 512,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

fn system_hostname() -> String {
    crate::access::host_name().unwrap_or_else(|| "mailtriage".into())
}

section! {
    /// Bounds on what one message or connection may cost us.
    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct LimitsConfig in "limits" {
        /// Largest milter frame accepted; Postfix sends body chunks of at most 64 KiB.
        live max_frame_bytes: usize,
        /// Bytes of a message (headers + body) kept for the decision; the rest is
        /// delivered untouched but not read.
        live max_message_bytes: usize,
        /// Characters of plain text kept after MIME decoding.
        live max_text_chars: usize,
        /// Headers kept per message; more are passed through but not inspected.
        live max_headers: usize,
        /// Recipients tracked per message.
        live max_recipients: usize,
        /// Message bytes all connections together may buffer; past it, milter
        /// messages are decided on what they hold (as if truncated) and SMTP/LMTP
        /// messages are refused with 452 (the client retries).
        restart max_total_bytes: usize,
        /// Largest message the SMTP/LMTP listener accepts (announced as SIZE),
        /// since it holds each message whole in memory to relay it.
        live max_smtp_message_bytes: usize,
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_frame_bytes: 1024 * 1024,
            max_message_bytes: 1024 * 1024,
            max_text_chars: 100_000,
            max_headers: 1000,
            max_recipients: 1000,
            max_total_bytes: 256 * 1024 * 1024,
            // Postfix's message_size_limit default.
            max_smtp_message_bytes: 10_240_000,
        }
    }
}

/// What the MTA is told when we fail internally.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    Accept,
    Tempfail,
}

/// A milter listen address in Postfix notation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddress {
    /// `HOST:PORT`, ready for `TcpListener::bind`.
    Inet(String),
    Unix(PathBuf),
}

impl FromStr for ListenAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("inet:") {
            // Postfix also accepts inet:PORT@HOST (Sendmail style).
            let hostport = match rest.split_once('@') {
                Some((port, host)) => format!("{host}:{port}"),
                None => rest.to_string(),
            };
            let (host, port) = hostport.rsplit_once(':').ok_or_else(|| format!("`{s}`: expected inet:HOST:PORT"))?;
            port.parse::<u16>().map_err(|_| format!("`{s}`: `{port}` is not a port number"))?;
            if host.is_empty() {
                return Err(format!("`{s}`: missing host"));
            }
            Ok(ListenAddress::Inet(hostport))
        } else if let Some(path) = s.strip_prefix("unix:").or_else(|| s.strip_prefix("local:")) {
            if !path.starts_with('/') {
                return Err(format!("`{s}`: the socket path must be absolute"));
            }
            Ok(ListenAddress::Unix(PathBuf::from(path)))
        } else {
            Err(format!("`{s}`: expected inet:HOST:PORT or unix:/path"))
        }
    }
}

impl fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddress::Inet(a) => write!(f, "inet:{a}"),
            ListenAddress::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl<'de> Deserialize<'de> for ListenAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `HOST:PORT` as well as Postfix's `inet:HOST:PORT` / `unix:/path`.
fn de_front_address<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ListenAddress>, D::Error> {
    let s = String::deserialize(d)?;
    let full = if s.starts_with("inet:") || s.starts_with("unix:") { s } else { format!("inet:{s}") };
    full.parse().map(Some).map_err(serde::de::Error::custom)
}
