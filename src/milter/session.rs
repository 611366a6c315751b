//! One milter connection: negotiation, macros, the stages of each message,
//! and the end-of-message reply that carries our changes.
//!
//! The MTA drives; we answer only where the negotiated protocol expects an
//! answer. One connection carries one SMTP session, which may carry several
//! messages, and after `SMFIC_QUIT_NC` a further SMTP session.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::watch;
use tokio::time::timeout;

use super::codec::{self, action, proto, CodecError, Command, ConnectAddress, MacroStage, Negotiation, Reply};
use crate::act::{Change, Plan};
pub use crate::frontdoor::budget::ByteBudget;
use crate::frontdoor::budget::Reservation;
use crate::frontdoor::decide::{decide, Caller, DecisionSettings, KeepAlive, Verdict};
use crate::frontdoor::{Filter, MessageInput};
use crate::message::envelope::{strip_brackets, Client};
use crate::message::headers::is_triage_header;
use crate::settings::Config;

/// Actions we may use at end-of-message. We never change the body or the
/// sender, so we do not ask for those.
pub const WANTED_ACTIONS: u32 = action::ADD_HEADERS
    | action::CHANGE_HEADERS
    | action::ADD_RCPT
    | action::DEL_RCPT
    | action::QUARANTINE
    | action::SET_SYMLIST;

/// Stages we do not need, and commands we answer with "continue" anyway, so
/// the MTA need not wait for the answer (one round trip per header saved).
/// The connect event is wanted (the client's address, for `[scope]`), its
/// reply not.
pub const WANTED_PROTOCOL: u32 = proto::NR_CONNECT
    | proto::NO_HELO
    | proto::NO_UNKNOWN
    | proto::NO_DATA
    | proto::NR_MAIL
    | proto::NR_RCPT
    | proto::NR_HEADER
    | proto::NR_EOH
    | proto::SKIP;

/// Inbound `X-Triage-*` headers tracked per message for removal.
pub const MAX_TRACKED_TRIAGE_HEADERS: usize = 1000;

/// Macros we ask for, per stage (milter v6 lets the filter choose; Postfix
/// then sends exactly these for the stage, its `milter_*_macros` for the
/// others). Connect: the listener's name and the client's address (also in
/// the connect event; the macro covers MTAs that send it only there).
/// MAIL: the SASL login, of which only its presence is kept. End of
/// message: the queue id, for logs and the audit trail.
const CONNECT_MACROS: &str = "{daemon_name} {client_addr}";
const MAIL_MACROS: &str = "{auth_authen}";
const EOM_MACROS: &str = "i";

/// Said once per process: without macro negotiation the MTA sends only what
/// its own configuration lists.
static MACROS_NOT_NEGOTIATED: std::sync::Once = std::sync::Once::new();

/// Per-connection settings, taken from the configuration once.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub max_frame_bytes: usize,
    pub max_message_bytes: usize,
    pub max_recipients: usize,
    pub idle_timeout: Duration,
    /// Deadline, progress interval, `on_error`.
    pub decision: DecisionSettings,
    /// Bytes all sessions together may hold; shared by every connection.
    pub budget: Arc<ByteBudget>,
}

impl From<&Config> for SessionConfig {
    fn from(c: &Config) -> Self {
        Self {
            max_frame_bytes: c.limits.max_frame_bytes,
            max_message_bytes: c.limits.max_message_bytes,
            max_recipients: c.limits.max_recipients,
            idle_timeout: c.server.idle_timeout,
            decision: DecisionSettings::from(c),
            budget: ByteBudget::new(c.limits.max_total_bytes),
        }
    }
}

/// SMFIR_PROGRESS while a decision runs: restarts the MTA's content timeout.
struct Progress<'w, W>(&'w mut W);

impl<W: AsyncWrite + Unpin> KeepAlive for Progress<'_, W> {
    type Error = SessionError;
    async fn alive(&mut self) -> Result<(), SessionError> {
        self.0.write_all(&Reply::Progress.encode()).await.map_err(SessionError::Write)?;
        self.0.flush().await.map_err(SessionError::Write)
    }
}

/// Why a session ended abnormally. The connection is closed; other
/// connections are unaffected.
#[derive(Debug, Error)]
pub enum SessionError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("writing to the MTA: {0}")]
    Write(std::io::Error),
    #[error("no command for {0:?}; closing idle connection")]
    Idle(Duration),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// How a session ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The MTA sent QUIT or closed the connection.
    Quit,
    /// We are shutting down and no message was in flight.
    Shutdown,
}

/// The message being received, from MAIL to end-of-message or abort.
#[derive(Debug, Default)]
struct MessageState {
    input: MessageInput,
    /// Recipients beyond `max_recipients` were seen: the list is incomplete,
    /// so recipient changes would be partial and are not made.
    rcpts_overflow: bool,
    /// `raw` reached `max_message_bytes` (or the global budget); later bytes are not kept.
    truncated: bool,
    /// Bytes taken from the global budget, given back when the message ends.
    reservation: Option<Reservation>,
}

pub struct Session<'a, F> {
    filter: &'a F,
    cfg: &'a SessionConfig,
    /// Negotiated action and protocol flags; `None` before `SMFIC_OPTNEG`.
    negotiated: Option<(u32, u32)>,
    conn_macros: HashMap<String, String>,
    msg_macros: HashMap<String, String>,
    /// The client's address from the connect event.
    client_addr: Option<std::net::IpAddr>,
    msg: Option<MessageState>,
}

enum Flow {
    Continue,
    Close,
}

impl<'a, F: Filter> Session<'a, F> {
    pub fn new(filter: &'a F, cfg: &'a SessionConfig) -> Self {
        Self {
            filter,
            cfg,
            negotiated: None,
            conn_macros: HashMap::new(),
            msg_macros: HashMap::new(),
            client_addr: None,
            msg: None,
        }
    }

    /// Serves the connection until QUIT, EOF, an error, or shutdown between messages.
    pub async fn run<S: AsyncRead + AsyncWrite>(
        mut self,
        stream: S,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<SessionEnd, SessionError> {
        let (reader, writer) = tokio::io::split(stream);
        // Postfix pipelines no-reply packets (headers); read them in bulk.
        let mut reader = BufReader::with_capacity(16 * 1024, reader);
        let mut writer = BufWriter::new(writer);
        loop {
            let idle = self.msg.is_none();
            let frame = tokio::select! {
                biased;
                _ = shutdown_requested(&mut shutdown), if idle => return Ok(SessionEnd::Shutdown),
                r = timeout(self.cfg.idle_timeout, codec::read_frame(&mut reader, self.cfg.max_frame_bytes)) => r,
            };
            let Some((code, payload)) = frame.map_err(|_| SessionError::Idle(self.cfg.idle_timeout))?? else {
                return Ok(SessionEnd::Quit);
            };
            let cmd = codec::decode_command(code, &payload)?;
            match self.handle(cmd, &mut writer).await? {
                Flow::Continue => {}
                Flow::Close => return Ok(SessionEnd::Quit),
            }
            writer.flush().await.map_err(SessionError::Write)?;
        }
    }

    fn has_proto(&self, flag: u32) -> bool {
        self.negotiated.is_some_and(|(_, p)| p & flag != 0)
    }

    /// The reply a stage gets unless the MTA agreed not to wait for one.
    fn ack(&self, no_reply: u32) -> Option<Reply> {
        if self.has_proto(no_reply) {
            None
        } else {
            Some(Reply::Continue)
        }
    }

    fn has_action(&self, flag: u32) -> bool {
        self.negotiated.is_some_and(|(a, _)| a & flag != 0)
    }

    async fn handle<W: AsyncWrite + Unpin>(&mut self, cmd: Command, w: &mut W) -> Result<Flow, SessionError> {
        if self.negotiated.is_none() && !matches!(cmd, Command::Negotiate(_) | Command::Quit) {
            return Err(SessionError::Protocol(format!("{} before option negotiation", cmd_name(&cmd))));
        }
        let reply = match cmd {
            Command::Negotiate(offer) => Some(self.negotiate(offer)?),
            Command::Macros { stage, pairs } => {
                let into = if matches!(stage, b'C' | b'H') { &mut self.conn_macros } else { &mut self.msg_macros };
                into.extend(pairs);
                None
            }
            // Its macros arrived just before it, in SMFIC_MACRO; keep them.
            Command::Connect { address, .. } => {
                self.client_addr = match address {
                    ConnectAddress::Inet { addr, .. } | ConnectAddress::Inet6 { addr, .. } => {
                        addr.trim_matches(['[', ']']).trim_start_matches("IPv6:").parse().ok()
                    }
                    ConnectAddress::Unix { .. } | ConnectAddress::Unknown => None,
                };
                self.ack(proto::NR_CONNECT)
            }
            Command::Helo(_) => self.ack(proto::NR_HELO),
            Command::Mail(args) => {
                // A new transaction; anything unfinished was implicitly aborted.
                let mut state =
                    MessageState { reservation: Some(Reservation::new(self.cfg.budget.clone())), ..Default::default() };
                state.input.envelope.mail_from = strip_brackets(&args[0]);
                self.msg = Some(state);
                self.ack(proto::NR_MAIL)
            }
            Command::Rcpt(args) => {
                let max = self.cfg.max_recipients;
                let msg = self.message("SMFIC_RCPT")?;
                if msg.input.envelope.rcpts.len() < max {
                    msg.input.envelope.rcpts.push(strip_brackets(&args[0]));
                } else {
                    msg.rcpts_overflow = true;
                }
                self.ack(proto::NR_RCPT)
            }
            Command::Data => self.ack(proto::NR_DATA),
            Command::Header { name, value } => {
                let max = self.cfg.max_message_bytes;
                let msg = self.message("SMFIC_HEADER")?;
                let line = format!("{name}: {}\r\n", crlf(&value));
                msg.append(line.as_bytes(), max);
                // Only our own header names are needed (to remove spoofed ones); keeping
                // every name would let a hostile client grow this without bound.
                if is_triage_header(&name) && msg.input.header_names.len() < MAX_TRACKED_TRIAGE_HEADERS {
                    msg.input.header_names.push(name);
                }
                self.ack(proto::NR_HEADER)
            }
            Command::EndOfHeaders => {
                let max = self.cfg.max_message_bytes;
                self.message("SMFIC_EOH")?.append(b"\r\n", max);
                self.ack(proto::NR_EOH)
            }
            Command::Body(chunk) => {
                let max = self.cfg.max_message_bytes;
                let msg = self.message("SMFIC_BODY")?;
                msg.append(&chunk, max);
                let full = msg.truncated;
                if self.has_proto(proto::NR_BODY) {
                    None
                } else if full && self.has_proto(proto::SKIP) {
                    // We have read all we will look at; spare the MTA the rest.
                    Some(Reply::Skip)
                } else {
                    Some(Reply::Continue)
                }
            }
            Command::EndOfMessage(tail) => {
                let max = self.cfg.max_message_bytes;
                let mut msg =
                    self.msg.take().ok_or_else(|| SessionError::Protocol("SMFIC_BODYEOB outside a message".into()))?;
                msg.append(&tail, max);
                self.end_of_message(msg, w).await?;
                self.msg_macros.clear();
                return Ok(Flow::Continue);
            }
            Command::Abort => {
                self.msg = None;
                self.msg_macros.clear();
                None
            }
            Command::Quit => return Ok(Flow::Close),
            Command::QuitNewConnection => {
                // The MTA reuses this connection for a new SMTP session.
                self.msg = None;
                self.msg_macros.clear();
                self.conn_macros.clear();
                self.client_addr = None;
                None
            }
            Command::Unknown(_) => self.ack(proto::NR_UNKNOWN),
        };
        if let Some(r) = reply {
            w.write_all(&r.encode()).await.map_err(SessionError::Write)?;
        }
        Ok(Flow::Continue)
    }

    fn message(&mut self, stage: &str) -> Result<&mut MessageState, SessionError> {
        self.msg.as_mut().ok_or_else(|| SessionError::Protocol(format!("{stage} before SMFIC_MAIL")))
    }

    /// Agrees to the MTA's offer, asking only for what we use.
    fn negotiate(&mut self, offer: Negotiation) -> Result<Reply, SessionError> {
        if offer.version < 2 {
            return Err(SessionError::Protocol(format!(
                "milter protocol version {} is too old (need 2 to 6)",
                offer.version
            )));
        }
        let version = offer.version.min(codec::PROTOCOL_VERSION);
        let mut actions = WANTED_ACTIONS & offer.actions;
        let protocol = WANTED_PROTOCOL & offer.protocol;
        let mut macros = Default::default();
        if version >= 6 && actions & action::SET_SYMLIST != 0 {
            macros = [
                (MacroStage::Connect, CONNECT_MACROS.to_string()),
                (MacroStage::Mail, MAIL_MACROS.to_string()),
                (MacroStage::EndOfMessage, EOM_MACROS.to_string()),
            ]
            .into();
        } else {
            actions &= !action::SET_SYMLIST;
            MACROS_NOT_NEGOTIATED.call_once(|| {
                tracing::warn!(
                    version,
                    "the MTA cannot be asked for macros (it offers no SMFIF_SETSYMLIST, or protocol < 6): mail counts \
                     as unauthenticated and \
                     from no named listener unless the MTA sends {{auth_authen}} and {{daemon_name}} by its own \
                     configuration (Sendmail: confMILTER_MACROS_ENVFROM, confMILTER_MACROS_CONNECT)"
                )
            });
        }
        self.negotiated = Some((actions, protocol));
        tracing::debug!(
            version,
            actions = format!("{actions:#x}"),
            protocol = format!("{protocol:#x}"),
            "milter negotiated"
        );
        Ok(Reply::Negotiate(Negotiation { version, actions, protocol, macros }))
    }

    /// Decides the message and sends its changes and the final verdict.
    async fn end_of_message<W: AsyncWrite + Unpin>(
        &mut self,
        mut msg: MessageState,
        w: &mut W,
    ) -> Result<(), SessionError> {
        let queue_id = self.msg_macros.get("i").or_else(|| self.conn_macros.get("i")).cloned();
        msg.input.envelope.queue_id = queue_id.clone();
        msg.input.envelope.client = self.client();
        let caller = Caller { front: "milter", queue_id: queue_id.as_deref() };
        let input = std::mem::take(&mut msg.input);
        let verdict = decide(self.filter, input, &self.cfg.decision, caller, &mut Progress(&mut *w)).await?;
        let queue_id = queue_id.as_deref().unwrap_or("-");
        let (plan, verdict) = match verdict {
            Verdict::Deliver(plan) => (plan, Reply::Accept),
            Verdict::Discard => (Plan::default(), Reply::Discard),
            Verdict::Tempfail => (Plan::default(), Reply::Tempfail),
        };
        for reply in self.replies_for(&plan, msg.rcpts_overflow, queue_id) {
            w.write_all(&reply.encode()).await.map_err(SessionError::Write)?;
        }
        w.write_all(&verdict.encode()).await.map_err(SessionError::Write)?;
        Ok(())
    }

    /// Milter modification replies for a plan, limited to what the MTA allowed.
    /// Recipient changes are all-or-nothing: half a reroute is a copy.
    fn replies_for(&self, plan: &Plan, rcpts_overflow: bool, queue_id: &str) -> Vec<Reply> {
        let rcpt_ok = self.has_action(action::ADD_RCPT) && self.has_action(action::DEL_RCPT) && !rcpts_overflow;
        if plan.changes_recipients() && !rcpt_ok {
            tracing::warn!(
                queue_id,
                reason =
                    if rcpts_overflow { "too many recipients to track" } else { "MTA did not allow recipient changes" },
                "recipient changes skipped; headers only"
            );
        }
        let mut out = Vec::with_capacity(plan.changes.len());
        for change in &plan.changes {
            let (allowed, reply) = match change {
                Change::RemoveHeader { name, index } => (
                    self.has_action(action::CHANGE_HEADERS),
                    Reply::ChangeHeader { index: *index, name: name.clone(), value: String::new() },
                ),
                Change::AddHeader { name, value } => (
                    self.has_action(action::ADD_HEADERS),
                    Reply::AddHeader { name: name.clone(), value: value.clone() },
                ),
                Change::DeleteRecipient { address } => (rcpt_ok, Reply::DelRcpt(format!("<{address}>"))),
                Change::AddRecipient { address } => (rcpt_ok, Reply::AddRcpt(format!("<{address}>"))),
                Change::Quarantine { reason } => {
                    (self.has_action(action::QUARANTINE), Reply::Quarantine(reason.clone()))
                }
                // Answered by the verdict, not a modification.
                Change::Discard { .. } => continue,
            };
            if allowed {
                out.push(reply);
            } else if !matches!(change, Change::DeleteRecipient { .. } | Change::AddRecipient { .. }) {
                tracing::warn!(queue_id, change = ?reply.code() as char, "MTA did not allow this change; skipped");
            }
        }
        out
    }
}

impl<F> Session<'_, F> {
    /// What the MTA told us of the SMTP client: the connect event's address
    /// (else `{client_addr}`), a non-empty `{auth_authen}` (Postfix sends it
    /// only for a SASL login), `{daemon_name}`.
    fn client(&self) -> Client {
        let macro_value = |name: &str| {
            let bare = name.trim_matches(['{', '}']);
            [&self.msg_macros, &self.conn_macros]
                .into_iter()
                .find_map(|m| m.get(name).or_else(|| m.get(bare)))
                .map(|v| v.trim())
                .filter(|v| !v.is_empty())
        };
        Client {
            addr: self
                .client_addr
                .or_else(|| macro_value("{client_addr}").and_then(|a| a.trim_start_matches("IPv6:").parse().ok())),
            authenticated: macro_value("{auth_authen}").is_some(),
            listener: macro_value("{daemon_name}").map(str::to_string),
        }
    }
}

impl MessageState {
    /// Keeps bytes up to the limit; past it, only notes that we stopped.
    fn append(&mut self, bytes: &[u8], max: usize) {
        let mut room = max.saturating_sub(self.input.raw.len()).min(bytes.len());
        if let Some(r) = &mut self.reservation {
            room = r.take(room);
        }
        if bytes.len() > room {
            self.truncated = true;
        }
        self.input.raw.extend_from_slice(&bytes[..room]);
    }
}

/// Header values arrive with bare LF between folded lines.
fn crlf(value: &str) -> String {
    value.replace("\r\n", "\n").replace('\n', "\r\n")
}

async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|stop| *stop).await.is_err() {
        // The sender is gone: nobody will ever ask us to stop.
        std::future::pending::<()>().await;
    }
}

fn cmd_name(cmd: &Command) -> &'static str {
    match cmd {
        Command::Negotiate(_) => "SMFIC_OPTNEG",
        Command::Macros { .. } => "SMFIC_MACRO",
        Command::Connect { .. } => "SMFIC_CONNECT",
        Command::Helo(_) => "SMFIC_HELO",
        Command::Mail(_) => "SMFIC_MAIL",
        Command::Rcpt(_) => "SMFIC_RCPT",
        Command::Data => "SMFIC_DATA",
        Command::Header { .. } => "SMFIC_HEADER",
        Command::EndOfHeaders => "SMFIC_EOH",
        Command::Body(_) => "SMFIC_BODY",
        Command::EndOfMessage(_) => "SMFIC_BODYEOB",
        Command::Abort => "SMFIC_ABORT",
        Command::Quit => "SMFIC_QUIT",
        Command::QuitNewConnection => "SMFIC_QUIT_NC",
        Command::Unknown(_) => "SMFIC_UNKNOWN",
    }
}
