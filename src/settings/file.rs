//! The settings file's shape: one TOML file plus `MAILTRIAGE__SECTION__KEY`
//! environment overrides, typed by serde, then checked whole (`check.rs`)
//! and turned into the department catalog (`catalog.rs`) before anything
//! starts.
//!
//! Unknown keys are errors (a misspelt `mdoe = "shadow"` must not silently
//! leave a filter in enforce mode), and every error names the file, the key
//! and, for TOML syntax or type errors, the line and column.
//!
//! We parse with `toml` directly rather than through the `config` crate: its
//! errors carry the span of the offending key, which the `config` crate's
//! merged-source model loses.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use regex::Regex;
use serde::{Deserialize, Deserializer, Serialize};

pub use crate::domain::{Action, Mode};

/// Where `serve` listens, and what it tells the MTA.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// `inet:HOST:PORT` or `unix:/path/to.sock`, as Postfix writes milter
    /// addresses. Unset: `inet:127.0.0.1:8890`, unless only `smtp`/`lmtp` are set.
    pub milter: Option<ListenAddress>,
    /// Permissions of the unix sockets we listen on (milter, SMTP, LMTP), octal.
    #[serde(deserialize_with = "de_octal")]
    pub milter_socket_mode: u32,
    /// SMTP content-filter listener (`HOST:PORT` or `unix:/path`); needs `[relay]`.
    #[serde(deserialize_with = "de_front_address")]
    pub smtp: Option<ListenAddress>,
    /// LMTP listener (`HOST:PORT` or `unix:/path`); needs `[relay]`.
    #[serde(deserialize_with = "de_front_address")]
    pub lmtp: Option<ListenAddress>,
    /// The name we greet SMTP/LMTP clients with and say in EHLO to the next hop.
    pub hostname: String,
    /// PEM certificate chain and private key: STARTTLS is offered when both are set.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Refuse MAIL until the client has started TLS.
    pub require_tls: bool,
    /// SMTP/LMTP clients whose XFORWARD (the original client's name, address,
    /// HELO…) we believe and pass on; Postfix's `smtpd_authorized_xforward_hosts`.
    /// Clients on a unix socket are always local and trusted.
    pub xforward_hosts: Vec<crate::settings::Cidr>,
    /// An SMTP/LMTP client silent this long (for a command, or within DATA)
    /// is disconnected with 421 (RFC 5321 §4.5.3.2 asks for at least 5 minutes).
    #[serde(deserialize_with = "de_duration")]
    pub smtp_timeout: Duration,
    pub mode: Mode,
    pub on_error: OnError,
    /// The whole decision at end-of-message must finish within this, else `on_error`.
    #[serde(deserialize_with = "de_duration")]
    pub decision_timeout: Duration,
    /// While a decision runs, tell the MTA we are alive this often.
    #[serde(deserialize_with = "de_duration")]
    pub progress_interval: Duration,
    /// A milter connection idle longer than this is closed.
    #[serde(deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    /// Concurrent connections per listener; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// On SIGTERM, how long sessions in flight may take to finish.
    #[serde(deserialize_with = "de_duration")]
    pub shutdown_grace: Duration,
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

/// The next hop of the SMTP/LMTP front doors: where filtered mail goes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// `smtp://HOST:PORT`, `lmtp://HOST:PORT`, or `smtp:unix:/path` / `lmtp:unix:/path`.
    pub next_hop: NextHop,
    /// STARTTLS to the next hop, in Postfix's words: `none`, `may`
    /// (if offered, certificate not checked), `encrypt` (required, not
    /// checked), `verify` (required, checked against `tls_ca_file` or the system roots).
    #[serde(default)]
    pub tls: RelayTls,
    /// PEM file of the CAs `verify` trusts instead of the system's.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// Longest wait for the greeting or a reply to one command.
    #[serde(default = "default_relay_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Longest wait for the reply(s) after the message's final dot.
    #[serde(default = "default_relay_data_timeout", deserialize_with = "de_duration")]
    pub data_timeout: Duration,
    /// Where `quarantine` decisions go in SMTP/LMTP mode (a relay has no hold queue).
    #[serde(default)]
    pub quarantine_mailbox: Option<String>,
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

/// `HOST:PORT` as well as Postfix's `inet:HOST:PORT` / `unix:/path`.
fn de_front_address<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ListenAddress>, D::Error> {
    let s = String::deserialize(d)?;
    let full = if s.starts_with("inet:") || s.starts_with("unix:") { s } else { format!("inet:{s}") };
    full.parse().map(Some).map_err(serde::de::Error::custom)
}

/// Bounds on what one message or connection may cost us.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest milter frame accepted; Postfix sends body chunks of at most 64 KiB.
    pub max_frame_bytes: usize,
    /// Bytes of a message (headers + body) kept for the decision; the rest is
    /// delivered untouched but not read.
    pub max_message_bytes: usize,
    /// Characters of plain text kept after MIME decoding.
    pub max_text_chars: usize,
    /// Headers kept per message; more are passed through but not inspected.
    pub max_headers: usize,
    /// Recipients tracked per message.
    pub max_recipients: usize,
    /// Message bytes all connections together may buffer; past it, milter
    /// messages are decided on what they hold (as if truncated) and SMTP/LMTP
    /// messages are refused with 452 (the client retries).
    pub max_total_bytes: usize,
    /// Largest message the SMTP/LMTP listener accepts (announced as SIZE),
    /// since it holds each message whole in memory to relay it.
    pub max_smtp_message_bytes: usize,
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DefaultsConfig {
    /// Department for a message nothing else decides.
    pub department: String,
    pub priority: String,
    /// The priority names admins may use, lowest first.
    pub priorities: Vec<String>,
}

impl Default for DefaultsConfig {
    fn default() -> Self {
        Self {
            department: "general".into(),
            priority: "medium".into(),
            priorities: vec!["low".into(), "medium".into(), "high".into()],
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DepartmentConfig {
    pub name: String,
    /// Where `reroute` and `copy` send the message.
    #[serde(default)]
    pub mailbox: Option<String>,
    #[serde(default)]
    pub action: Action,
    #[serde(default)]
    pub description: String,
    /// Sample messages for the cold-start classifier (before any head is trained).
    #[serde(default)]
    pub examples: Vec<String>,
    /// Head labels that mean this department, when the training data names
    /// it differently (e.g. a helpdesk queue "Billing and Payments").
    #[serde(default)]
    pub labels: Vec<String>,
}

/// The embedded classifier. Absent section: rules and the default only.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Hugging Face model id; also shown in `X-Triage-Source: model:<id>`.
    pub id: String,
    /// A local directory with config.json, tokenizer.json, model.safetensors; wins over the hub cache.
    pub path: Option<PathBuf>,
    /// Trained department head; without one, departments' descriptions give a cold-start classifier.
    pub department_head: Option<PathBuf>,
    pub priority_head: Option<PathBuf>,
    /// Tokens per message given to the encoder ([CLS] and [SEP] included).
    pub max_tokens: usize,
    /// Text put before every message for the encoder: `"query: "` for the e5
    /// models (their model card asks for it); empty for MiniLM.
    pub input_prefix: String,
    /// Dedicated inference threads.
    pub workers: usize,
    /// Messages that may wait for inference; beyond, a message fails open at once.
    pub queue_depth: usize,
    /// Longest a message waits for its embedding before it fails open.
    #[serde(deserialize_with = "de_duration")]
    pub deadline: Duration,
    /// `cpu`, or `cuda` (needs a build with the `cuda` feature).
    pub device: Device,
    /// `auto`, `f32` or `int8` (CPU only; `auto` is int8 where the CPU has VNNI).
    pub precision: Precision,
    /// Embeddings kept for identical text (bulk mail); 0 disables the cache.
    pub cache_entries: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            id: "sentence-transformers/all-MiniLM-L6-v2".into(),
            path: None,
            department_head: None,
            priority_head: None,
            max_tokens: 128,
            input_prefix: String::new(),
            workers: 2,
            queue_depth: 64,
            deadline: Duration::from_secs(2),
            device: Device::Cpu,
            precision: Precision::Auto,
            cache_entries: 10_000,
        }
    }
}

/// Prometheus metrics and health endpoints.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `HOST:PORT` serving /metrics, /healthz and /readyz.
    pub listen: String,
}

/// The audit trail (one JSON line per decision, no personal data).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    pub path: PathBuf,
    /// Rotate when the file would grow past this.
    #[serde(default = "default_audit_max_bytes")]
    pub max_bytes: u64,
    /// Rotated files older than this are deleted.
    #[serde(default = "default_audit_retention_days")]
    pub retention_days: u64,
    /// Key of the Message-ID hash; created (32 random bytes, mode 0600) if missing.
    pub key_file: PathBuf,
}

fn default_audit_max_bytes() -> u64 {
    100 * 1024 * 1024
}

fn default_audit_retention_days() -> u64 {
    90
}

/// What to do with unsure model decisions.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// A model decision whose department confidence is below this goes to
    /// `review_mailbox` with `X-Triage-Action: review`. 0 disables review.
    /// Set, it wins over `target_accuracy` (the manual override).
    pub review_below: Option<f32>,
    /// The accuracy automatic decisions must keep: the department head's
    /// threshold for it (its dev-split risk-coverage curve) sends the rest
    /// to review.
    pub target_accuracy: Option<f32>,
    pub review_mailbox: Option<String>,
    /// Add `X-Triage-Reason` to model decisions: the runner-up department
    /// and the message's strongest terms (message content, in the message
    /// only: never in logs or the audit trail).
    pub reason_header: bool,
}

/// Continuous learning: corrections from staff and gated retraining.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeedbackConfig {
    /// Where corrections are kept: `sqlite:///path.db` or `postgres://…`.
    pub store: String,
    /// File holding the PostgreSQL password (first line), so it is not in
    /// this file or the URL; wins over a password in the URL.
    pub store_password_file: Option<PathBuf>,
    /// Mail to `local+department[+priority]@domain` of this address is a correction.
    pub address: Option<String>,
    /// Feedback mail is delivered to nobody but this mailbox (none: discarded once recorded).
    pub audit_copy: Option<String>,
    /// Corrections older than this are deleted.
    pub retention_days: u64,
    /// File holding the bearer token `POST /feedback` requires (no file: no HTTP channel).
    pub http_token_file: Option<PathBuf>,
    /// Memory for recent decisions' features (corrections by Message-ID).
    pub recent_bytes: usize,
    /// With a PostgreSQL store, recent decisions are shared in the database
    /// for this long…
    #[serde(deserialize_with = "de_duration")]
    pub recent_max_age: Duration,
    /// …and at most this many rows (the newest kept).
    pub recent_max_rows: u64,
    /// This instance retrains (set false on all but one instance sharing a store).
    pub retrain: bool,
    /// Retrain this often…
    #[serde(deserialize_with = "de_duration")]
    pub retrain_every: Duration,
    /// …or once this many new corrections arrived.
    pub retrain_after: u64,
    /// Versioned head files and their pointers.
    pub heads_dir: PathBuf,
    /// The original labeled data (JSONL, as for `train`) retraining starts from.
    pub training_data: Option<PathBuf>,
    /// The original dev split: part of the gate's evaluation.
    pub dev_data: Option<PathBuf>,
    /// Embeddings of the original data, so retraining does not re-embed it.
    pub embedding_cache: Option<PathBuf>,
    /// A department new to the head joins only with at least this many corrections.
    pub min_per_class: usize,
    /// The newest this many corrections per class form the reservoir.
    pub max_per_class: usize,
    /// Share of corrections (by id) held back for the gate, in percent.
    pub holdout_percent: u8,
    /// The gate refuses a head when any language slice's macro-F1 drops more than this.
    pub max_slice_drop: f64,
    /// Slices smaller than this are reported but not gated (too noisy).
    pub min_slice: usize,
}

impl Default for FeedbackConfig {
    fn default() -> Self {
        Self {
            store: "sqlite:///var/lib/mailtriage/feedback.db".into(),
            store_password_file: None,
            address: None,
            audit_copy: None,
            retention_days: 180,
            http_token_file: None,
            recent_bytes: 256 << 20,
            recent_max_age: Duration::from_secs(3 * 86_400),
            recent_max_rows: 1_000_000,
            retrain: true,
            retrain_every: Duration::from_secs(6 * 3600),
            retrain_after: 500,
            heads_dir: PathBuf::from("/var/lib/mailtriage/heads"),
            training_data: None,
            dev_data: None,
            embedding_cache: None,
            min_per_class: 5,
            max_per_class: 2000,
            holdout_percent: 20,
            max_slice_drop: 0.02,
            min_slice: 200,
        }
    }
}

/// Figures for the people paying for it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KpiConfig {
    /// Staff minutes one message costs when triaged by hand.
    pub minutes_per_manual_triage: f64,
}

impl Default for KpiConfig {
    fn default() -> Self {
        Self { minutes_per_manual_triage: 2.0 }
    }
}

/// Which mail is triaged at all (`[scope]`). Out-of-scope mail passes
/// unchanged but for the removal of inbound `X-Triage-*` headers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScopeConfig {
    /// Recipients whose mail is triaged: `info@example.com`, or `@example.com`
    /// for a whole domain. Empty: every recipient. Only these recipients are
    /// replaced by a reroute; the others keep the message.
    pub recipients: Vec<String>,
    /// Skip mail from SASL-authenticated senders (staff sending out).
    pub skip_authenticated: bool,
    /// Skip mail from these client networks.
    pub skip_networks: Vec<crate::settings::Cidr>,
    /// Skip mail taken by these MTA listeners (milter `{daemon_name}`).
    pub skip_listeners: Vec<String>,
    /// Skip automatic mail: the null sender, `Auto-Submitted` other than
    /// `no`, `List-Id`, `Precedence: bulk|list|junk`. When off, such mail is
    /// tagged but never rerouted.
    pub skip_auto: bool,
    /// Relays whose `X-Triage-*` headers are ours (a mailtriage hop before
    /// this one): mail from them that carries our headers was triaged
    /// already and passes unchanged, headers kept.
    pub trusted_relays: Vec<crate::settings::Cidr>,
}

impl Default for ScopeConfig {
    fn default() -> Self {
        Self {
            recipients: Vec::new(),
            skip_authenticated: true,
            skip_networks: Vec::new(),
            skip_listeners: Vec::new(),
            skip_auto: true,
            trusted_relays: Vec::new(),
        }
    }
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    /// Route to the rule's `department`.
    #[default]
    Route,
    /// Leave the message untriaged (out of scope).
    Skip,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    /// A header name (case-insensitive), or `envelope-from` / `envelope-to`.
    pub header: String,
    pub pattern: String,
    /// Required unless `action = "skip"`.
    #[serde(default)]
    pub department: Option<String>,
    #[serde(default)]
    pub action: RuleAction,
    #[serde(default)]
    pub priority: Option<String>,
    /// `pattern` compiled by validation, so the rule set reuses it rather
    /// than compiling it again.
    #[serde(skip)]
    pub compiled: std::sync::OnceLock<Regex>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// A `tracing` filter: `info`, `debug`, `mailtriage=debug,warn`…
    pub level: String,
    pub format: LogFormat,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self { level: "info".into(), format: LogFormat::Text }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub limits: LimitsConfig,
    pub defaults: DefaultsConfig,
    pub departments: Vec<DepartmentConfig>,
    pub scope: ScopeConfig,
    pub rules: Vec<RuleConfig>,
    pub model: Option<ModelConfig>,
    pub policy: PolicyConfig,
    pub audit: Option<AuditConfig>,
    pub metrics: Option<MetricsConfig>,
    pub relay: Option<RelayConfig>,
    pub feedback: Option<FeedbackConfig>,
    pub kpi: KpiConfig,
    pub logging: LoggingConfig,
    /// Where this configuration came from (for messages), not a key.
    #[serde(skip)]
    pub source: Option<PathBuf>,
    /// First 12 hex digits of the SHA-256 of the file: names this exact
    /// configuration in the audit trail and logs.
    #[serde(skip)]
    pub version: String,
    /// The departments and priorities as typed ids, built once the file
    /// is valid (the second stage of the settings).
    #[serde(skip)]
    pub catalog: super::Catalog,
}

/// Where the encoder runs.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    #[default]
    Cpu,
    /// Candle's CUDA backend (a build with the `cuda` feature).
    Cuda,
}

/// The arithmetic of the encoder's linear layers on CPU.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// `int8` where the CPU has an integer dot-product instruction (AVX-512
    /// VNNI or AVX-VNNI), else `f32`.
    #[default]
    Auto,
    /// Exact f32 everywhere (the reference).
    F32,
    /// 8-bit weights (per output channel) and activations (per token),
    /// 32-bit accumulation; word embeddings in 8 bits per row.
    Int8,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Auto => "auto",
            Precision::F32 => "f32",
            Precision::Int8 => "int8",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
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

/// Parses `250ms`, `30s`, `5m`, `1h` (a bare number means seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("`{s}` is not a duration (e.g. 500ms, 30s, 5m)"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        other => return Err(format!("unknown duration unit `{other}` in `{s}` (use ms, s, m, h or d)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("`{s}` is not a valid duration"));
    }
    // Finite is not enough: from_secs_f64 panics beyond u64 seconds (found by fuzzing the config loader).
    Duration::try_from_secs_f64(secs).map_err(|_| format!("`{s}` is too long a duration"))
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Str(String),
    }
    match Raw::deserialize(d)? {
        Raw::Int(n) => Ok(Duration::from_secs(n)),
        Raw::Str(s) => parse_duration(&s).map_err(serde::de::Error::custom),
    }
}

fn de_octal<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let s = String::deserialize(d)?;
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| serde::de::Error::custom(format!("`{s}` is not an octal file mode such as \"0660\"")))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::load::{mask_secrets, ConfigError, Problem};
    use super::*;

    #[test]
    fn secrets_are_masked_in_what_config_show_prints() {
        let mut t: toml::Table =
            "[feedback]\nstore = \"postgres://u:pw@h/d\"\nhttp_token_file = \"/etc/t\"\n[x]\napi_token = \"abc\"\n"
                .parse()
                .unwrap();
        mask_secrets(&mut t);
        assert_eq!(t["feedback"]["store"].as_str(), Some("postgres://u:****@h/d"));
        assert_eq!(t["feedback"]["http_token_file"].as_str(), Some("/etc/t"), "a path is not a secret");
        assert_eq!(t["x"]["api_token"].as_str(), Some("****"));
    }

    const GOOD: &str = r#"
[server]
milter = "inet:127.0.0.1:8890"
mode = "shadow"
decision_timeout = "5s"

[defaults]
department = "general"
priority = "medium"

[[departments]]
name = "billing"
mailbox = "billing@example.com"
action = "reroute"
description = "Invoices"

[[rules]]
name = "invoices"
header = "Subject"
pattern = "(?i)\\binvoice\\b"
department = "billing"
priority = "high"
"#;

    #[test]
    fn good_config_loads() {
        let c = Config::from_toml(GOOD, "test.toml").unwrap();
        assert_eq!(c.server.mode, Mode::Shadow);
        assert_eq!(c.server.decision_timeout, Duration::from_secs(5));
        assert_eq!(c.rules[0].priority.as_deref(), Some("high"));
        assert_eq!(c.catalog.department("billing").unwrap().action, Action::Reroute);
    }

    #[test]
    fn shipped_default_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/mailtriage.toml");
        Config::load(&path).unwrap();
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = Config::from_toml("[server]\nmdoe = \"shadow\"\n", "x.toml").unwrap_err().to_string();
        assert!(err.contains("mdoe") && err.contains("line 2"), "{err}");
        let err = Config::from_toml("[sever]\n", "x.toml").unwrap_err().to_string();
        assert!(err.contains("sever"), "{err}");
    }

    fn problems(text: &str, env: &[(&str, &str)]) -> Vec<Problem> {
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        match Config::from_toml_with_env(text, "x.toml", &env) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn every_unknown_key_and_bad_type_is_named_in_one_run_with_its_line() {
        let text = "[server]\nmdoe = \"shadow\"\nmax_connections = \"many\"\n\n[limits]\nmax_framebytes = 5\n\n\
                    [sever]\nx = 1\n\n[[departments]]\nname = \"a\"\nmailbx = \"a@b.example\"\n";
        let found = problems(text, &[]);
        let keys: Vec<(&str, Option<usize>)> = found.iter().map(|p| (p.key.as_str(), p.line)).collect();
        assert_eq!(
            keys,
            [
                ("server.mdoe", Some(2)),
                ("server.max_connections", Some(3)),
                ("limits.max_framebytes", Some(6)),
                ("sever", Some(8)),
                ("departments[0] (a).mailbx", Some(13)),
            ],
            "{found:#?}"
        );
        assert!(found[0].message.contains("unknown field `mdoe`"), "{found:#?}");
        assert_eq!(found[0].located("x.toml").split(": ").next(), Some("x.toml, line 2"));
    }

    #[test]
    fn a_missing_required_key_is_named_beside_the_typos() {
        let text = "[server]  # the front doors\nmdoe = \"shadow\"  # a typo\n[audit]\npath = \"a.jsonl\"\n\
                    [[departments]]\nmailbox = \"x@y.example\"\nactoin = \"tag\"\n";
        let found = problems(text, &[]);
        let keys: Vec<(&str, Option<usize>)> = found.iter().map(|p| (p.key.as_str(), p.line)).collect();
        assert_eq!(
            keys,
            [
                ("server.mdoe", Some(2)),
                ("audit", Some(3)),
                ("departments[0]", Some(5)),
                ("departments[0].actoin", Some(7))
            ],
            "{found:#?}"
        );
        assert!(found[1].message.contains("missing field `key_file`"), "{found:#?}");
        assert!(found[2].message.contains("missing field `name`"), "{found:#?}");
    }

    #[test]
    fn a_problem_set_by_the_environment_names_the_variable_not_the_file() {
        let found = problems("[server]\nmode = \"shadow\"\n", &[("MAILTRIAGE__SERVER__MODEE", "enforce")]);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].env.as_deref(), Some("MAILTRIAGE__SERVER__MODEE"));
        let said = found[0].located("x.toml");
        assert!(said.starts_with("environment variable MAILTRIAGE__SERVER__MODEE (`server.modee`)"), "{said}");
        assert!(!said.contains("x.toml"), "{said}");
        // A value that validation refuses is blamed on its variable too.
        let found = problems("[server]\nmode = \"shadow\"\n", &[("MAILTRIAGE__SERVER__MODE", "loud")]);
        assert_eq!(found[0].env.as_deref(), Some("MAILTRIAGE__SERVER__MODE"), "{found:#?}");
        // The file's own problems stay the file's.
        let found = problems("[server]\nmdoe = 1\n", &[("MAILTRIAGE__SERVER__MODE", "shadow")]);
        assert_eq!((found[0].key.as_str(), found[0].env.as_deref()), ("server.mdoe", None));
    }

    #[test]
    fn relative_paths_are_taken_from_the_configuration_files_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mailtriage.toml");
        std::fs::write(
            &file,
            "[model]\npath = \"../models/m\"\ndepartment_head = \"/abs/d.safetensors\"\n\
             priority_head = \"heads/p.safetensors\"\n[feedback]\nstore = \"sqlite://fb.db\"\n\
             [audit]\npath = \"audit.jsonl\"\nkey_file = \"keys/audit.key\"\n",
        )
        .unwrap();
        let cfg = Config::load(&file).unwrap();
        let m = cfg.model.as_ref().unwrap();
        assert_eq!(m.path.as_deref(), Some(dir.path().join("../models/m").as_path()));
        assert_eq!(m.department_head.as_deref(), Some(Path::new("/abs/d.safetensors")));
        assert_eq!(m.priority_head.as_deref(), Some(dir.path().join("heads/p.safetensors").as_path()));
        let f = cfg.feedback.as_ref().unwrap();
        assert_eq!(f.store, format!("sqlite://{}", dir.path().join("fb.db").display()));
        assert_eq!(f.heads_dir, Path::new("/var/lib/mailtriage/heads"), "an absolute default stays");
        assert_eq!(cfg.audit.as_ref().unwrap().key_file, dir.path().join("keys/audit.key"));
    }

    #[test]
    fn bad_regex_names_the_rule() {
        let bad = GOOD.replace(r#"(?i)\\binvoice\\b"#, "(unclosed");
        let err = Config::from_toml(&bad, "x.toml").unwrap_err().to_string();
        assert!(err.contains("rules[0] (invoices).pattern") && err.contains("regular expression"), "{err}");
    }

    #[test]
    fn dangling_references_are_named() {
        let bad = GOOD.replace("department = \"billing\"", "department = \"biling\"");
        let err = Config::from_toml(&bad, "x.toml").unwrap_err().to_string();
        assert!(err.contains("rules[0] (invoices).department") && err.contains("biling"), "{err}");
        let bad = GOOD.replace("priority = \"high\"", "priority = \"urgent\"");
        let err = Config::from_toml(&bad, "x.toml").unwrap_err().to_string();
        assert!(err.contains("priority") && err.contains("urgent"), "{err}");
        let bad = GOOD.replace("mailbox = \"billing@example.com\"\n", "");
        let err = Config::from_toml(&bad, "x.toml").unwrap_err().to_string();
        assert!(err.contains("departments[0] (billing).mailbox") && err.contains("reroute"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        for (text, needle) in [
            ("[server]\nmilter = \"tcp:1.2.3.4\"\n", "inet:HOST:PORT"),
            ("[server]\nmilter = \"inet:127.0.0.1:99999\"\n", "port number"),
            ("[server]\nmode = \"loud\"\n", "loud"),
            ("[server]\ndecision_timeout = \"5 fortnights\"\n", "unit"),
            ("[server]\nmilter_socket_mode = \"999\"\n", "octal"),
            ("[limits]\nmax_frame_bytes = 100\n", "limits.max_frame_bytes"),
            ("[[departments]]\nname = \"a b\"\n", "departments[0] (a b).name"),
            ("[[departments]]\nname = \"x\"\nmailbox = \"not-an-address\"\n", "mailbox"),
            ("[logging]\nlevel = \"=== nope\"\n", "logging.level"),
        ] {
            let err = Config::from_toml(text, "x.toml").unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn every_problem_in_a_file_is_reported_at_once() {
        let text = "[server]\ndecision_timeout = \"0s\"\nrequire_tls = true\n\
                    [policy]\nreview_below = 2.0\n\
                    [[departments]]\nname = \"billing\"\naction = \"reroute\"\n\
                    [[rules]]\nname = \"r\"\nheader = \"Subject\"\npattern = \"(\"\ndepartment = \"nobody\"\n";
        let err = Config::from_toml(text, "x.toml").unwrap_err();
        let ConfigError::Invalid { problems, .. } = &err else { panic!("{err}") };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for want in [
            "server.decision_timeout",
            "server.require_tls",
            "policy.review_below",
            "departments[0] (billing).mailbox",
            "rules[0] (r).pattern",
            "rules[0] (r).department",
        ] {
            assert!(keys.contains(&want), "{want} missing from {keys:?}");
        }
        // One entry per problem, each naming the file and the key (a regex
        // error explains itself over several lines).
        let text = err.to_string();
        let entries = text.lines().filter(|l| l.starts_with("x.toml") && l.contains(": `")).count();
        assert_eq!(entries, problems.len(), "{text}");
    }

    #[test]
    fn a_rule_pattern_is_compiled_once_by_validation() {
        let c = Config::from_toml(
            "[[departments]]\nname = \"b\"\n[[rules]]\nname = \"r\"\nheader = \"Subject\"\npattern = \"x+\"\ndepartment = \"b\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.rules[0].compiled.get().map(|r| r.as_str()), Some("x+"));
    }

    #[test]
    fn smtp_front_door_settings() {
        let c = Config::from_toml(
            "[server]\nsmtp = \"127.0.0.1:10025\"\nlmtp = \"unix:/run/mt/lmtp\"\n\
             [relay]\nnext_hop = \"lmtp://127.0.0.1:24\"\n",
            "x.toml",
        )
        .unwrap();
        assert_eq!(c.server.smtp, Some(ListenAddress::Inet("127.0.0.1:10025".into())));
        assert_eq!(c.server.lmtp, Some(ListenAddress::Unix("/run/mt/lmtp".into())));
        assert_eq!(c.server.milter_listen(), None, "only SMTP/LMTP configured: no milter");
        let hop = &c.relay.as_ref().unwrap().next_hop;
        assert_eq!(hop.protocol, HopProtocol::Lmtp);
        assert_eq!(hop.to_string(), "lmtp://127.0.0.1:24");
        assert_eq!(
            "smtp:unix:/var/spool/postfix/private/in".parse::<NextHop>().unwrap().address,
            ListenAddress::Unix("/var/spool/postfix/private/in".into())
        );
        assert_eq!(Config::default().server.milter_listen().unwrap().to_string(), DEFAULT_MILTER);
        let loopback = &Config::default().server.xforward_hosts;
        assert!(["127.0.0.1", "::1"].iter().all(|ip| loopback.iter().any(|n| n.contains(ip.parse().unwrap()))));
        assert!(!loopback.iter().any(|n| n.contains("192.0.2.1".parse().unwrap())));
        for (text, needle) in [
            ("[server]\nsmtp = \"127.0.0.1:10025\"\n", "relay.next_hop"),
            ("[relay]\nnext_hop = \"http://x:1\"\n", "smtp://HOST:PORT"),
            ("[server]\ntls_cert = \"/c.pem\"\n", "server.tls_key"),
            ("[server]\nrequire_tls = true\n", "server.require_tls"),
            ("[server]\nxforward_hosts = [\"10.0.0.0/40\"]\n", "`10.0.0.0/40`: bad prefix length"),
            ("[server]\nxforward_hosts = [\"mx.example\"]\n", "`mx.example`: not an IP address"),
            (
                "[server]\nsmtp = \"127.0.0.1:1\"\n[relay]\nnext_hop = \"smtp://127.0.0.1:2\"\n\
                 [[departments]]\nname = \"sec\"\naction = \"quarantine\"\n",
                "relay.quarantine_mailbox",
            ),
        ] {
            let err = Config::from_toml(text, "x.toml").unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn listen_addresses() {
        assert_eq!("inet:127.0.0.1:8890".parse(), Ok(ListenAddress::Inet("127.0.0.1:8890".into())));
        assert_eq!("inet:8890@localhost".parse(), Ok(ListenAddress::Inet("localhost:8890".into())));
        assert_eq!("unix:/run/m.sock".parse(), Ok(ListenAddress::Unix("/run/m.sock".into())));
        assert!("unix:relative.sock".parse::<ListenAddress>().is_err());
    }

    #[test]
    fn env_overrides_apply_and_are_checked() {
        let env = vec![("MAILTRIAGE__SERVER__MODE".to_string(), "enforce".to_string())];
        let c = Config::from_toml_with_env(GOOD, "x.toml", &env).unwrap();
        assert_eq!(c.server.mode, Mode::Enforce);
        let env = vec![("MAILTRIAGE__LIMITS__MAX_HEADERS".to_string(), "7".to_string())];
        assert_eq!(Config::from_toml_with_env(GOOD, "x.toml", &env).unwrap().limits.max_headers, 7);
        let env = vec![("MAILTRIAGE__SERVER__BOGUS".to_string(), "1".to_string())];
        assert!(Config::from_toml_with_env(GOOD, "x.toml", &env).unwrap_err().to_string().contains("bogus"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("-1s").is_err());
        assert_eq!(parse_duration("3d").unwrap(), Duration::from_secs(3 * 86_400));
        let e = parse_duration("99999999999999999999999h").unwrap_err();
        assert!(e.contains("too long"), "{e}");
    }
}
