//! One SMTP or LMTP client connection, from greeting to QUIT.
//!
//! Commands are parsed by `smtp-proto` (sans-IO) over the bytes
//! `framing` buffers; one file per stage adds the
//! session's answers: `greeting` (EHLO/LHLO, STARTTLS, XFORWARD),
//! `transaction` (MAIL, RCPT, RSET) and `data` (DATA, then
//! `forward`: the decision and the relay).
//!
//! Each transaction is mirrored on the next hop as it happens: MAIL and
//! every RCPT are forwarded at once and the hop's answer is the client's
//! answer, so an unknown mailbox is refused at RCPT time exactly as the
//! final server would. After the final dot the message is decided, its
//! headers are rewritten, and it is sent on; when the decision changes the
//! recipients (reroute, copy, review, quarantine) the hop's transaction is
//! restarted with the new ones before any byte of the message is sent. The
//! client hears 250 only after the hop accepted the message; a hop failure
//! is a 4xx, so the client keeps the message and retries.

mod data;
mod forward;
mod greeting;
mod transaction;

use std::sync::Arc;
use std::time::Duration;

use smtp_proto::request::receiver::RequestReceiver;
use smtp_proto::Request;
use thiserror::Error;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::framing::{is_xforward, Framed, Stop, Wire};
use super::intake;
use super::relay::{Hop, Io, RelaySettings};
use super::reply::Reply;
use super::xforward::Xforward;
use crate::frontdoor::budget::ByteBudget;
use crate::frontdoor::decide::DecisionSettings;
use crate::frontdoor::Filter;
use crate::settings::Config;

/// Bad commands tolerated per connection before we hang up (Postfix's
/// `smtpd_hard_error_limit` is 20).
const MAX_ERRORS: u32 = 20;

/// Per-listener settings, taken from the configuration once.
#[derive(Clone)]
pub struct SmtpSettings {
    /// LMTP (RFC 2033): LHLO, and one reply per recipient after DATA.
    pub lmtp: bool,
    pub hostname: String,
    /// Largest message accepted (announced as SIZE).
    pub max_size: usize,
    /// Bytes of the message the decision reads.
    pub max_decide_bytes: usize,
    pub max_recipients: usize,
    pub timeout: Duration,
    /// Deadline and `on_error` (SMTP has no keepalive).
    pub decision: DecisionSettings,
    pub tls: Option<TlsAcceptor>,
    pub require_tls: bool,
    pub budget: Arc<ByteBudget>,
    pub relay: Arc<RelaySettings>,
    pub quarantine_mailbox: Option<String>,
    /// Clients allowed to send XFORWARD (unix-socket clients always are).
    pub xforward_hosts: Vec<crate::settings::Cidr>,
}

impl SmtpSettings {
    pub fn new(
        cfg: &Config,
        lmtp: bool,
        tls: Option<TlsAcceptor>,
        budget: Arc<ByteBudget>,
        relay: Arc<RelaySettings>,
    ) -> SmtpSettings {
        SmtpSettings {
            lmtp,
            hostname: cfg.server.hostname.clone(),
            max_size: cfg.limits.max_smtp_message_bytes,
            max_decide_bytes: cfg.limits.max_message_bytes,
            max_recipients: cfg.limits.max_recipients,
            timeout: cfg.server.smtp_timeout,
            decision: DecisionSettings::from(cfg),
            tls,
            require_tls: cfg.server.require_tls,
            budget,
            relay,
            quarantine_mailbox: cfg.relay.as_ref().and_then(|r| r.quarantine_mailbox.clone()),
            xforward_hosts: cfg.server.xforward_hosts.clone(),
        }
    }

    fn front(&self) -> &'static str {
        if self.lmtp {
            "lmtp"
        } else {
            "smtp"
        }
    }
}

/// How a session ended without a transport error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    Quit,
    /// The client closed the connection without QUIT.
    Closed,
    /// The client was silent past `smtp_timeout`; it got a 421.
    Timeout,
    /// Too many bad commands; it got a 421.
    TooManyErrors,
    /// We are stopping; it got a 421 between transactions.
    Shutdown,
}

#[derive(Debug, Error)]
pub enum SessionError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("TLS handshake timed out")]
    TlsTimeout,
}

/// The transaction between MAIL and the end of DATA (or RSET).
struct Transaction {
    from: String,
    eight_bit: bool,
    /// Recipients the next hop accepted, in RCPT order.
    rcpts: Vec<String>,
    /// The hop connection failed during this transaction: nothing more can
    /// be relayed, every further command of it gets 4xx.
    hop_lost: bool,
    /// The original client, as XFORWARD told us before this MAIL; repeated
    /// to the hop whenever its transaction is (re)started.
    xforward: Xforward,
}

pub struct Session<'a, F> {
    filter: &'a F,
    cfg: &'a SmtpSettings,
    wire: Wire,
    peer: String,
    greeted: bool,
    tls_active: bool,
    tx: Option<Transaction>,
    hop: Option<Hop>,
    errors: u32,
    /// May this client send XFORWARD (`server.xforward_hosts`)?
    xforward_trusted: bool,
    /// XFORWARD attributes given for the next MAIL.
    xforward: Xforward,
}

impl<'a, F: Filter> Session<'a, F> {
    pub fn new(filter: &'a F, cfg: &'a SmtpSettings, io: Box<dyn Io>, peer: String) -> Self {
        // A TCP peer reads `IP:PORT`; anything else is a unix socket's path.
        let xforward_trusted = match peer.parse::<std::net::SocketAddr>() {
            Ok(a) => cfg.xforward_hosts.iter().any(|net| net.contains(a.ip())),
            Err(_) => true,
        };
        Session {
            filter,
            cfg,
            wire: Wire::new(io, cfg.timeout),
            peer,
            greeted: false,
            tls_active: false,
            tx: None,
            hop: None,
            errors: 0,
            xforward_trusted,
            xforward: Xforward::default(),
        }
    }

    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<SessionEnd, SessionError> {
        let banner = if self.cfg.lmtp { "LMTP" } else { "ESMTP" };
        self.reply(Reply::bare(220, vec![format!("{} {banner} mailtriage", self.cfg.hostname)]));
        let mut receiver = RequestReceiver::default();
        let end = loop {
            let line_end = match self.wire.next_line(&mut shutdown, self.tx.is_none()).await? {
                Framed::Line(end) => end,
                Framed::Overlong => {
                    receiver = RequestReceiver::default();
                    if self.bad_command(Reply::line_too_long()) {
                        break SessionEnd::TooManyErrors;
                    }
                    continue;
                }
                Framed::Stopped(stop) => break self.stopped(stop),
            };
            if is_xforward(&self.wire.pending[..line_end]) {
                let line = self.wire.take_line(line_end);
                let args = String::from_utf8_lossy(&line["XFORWARD".len()..]).into_owned();
                let reply = self.xforward_command(&args);
                if self.answer(reply) {
                    break SessionEnd::TooManyErrors;
                }
                continue;
            }
            let request = match self.wire.feed(|bytes| receiver.ingest(bytes).map(|r| r.into_owned())) {
                Ok(r) => r,
                Err(smtp_proto::Error::NeedsMoreData { .. }) => continue,
                Err(e) => {
                    if self.bad_command(parse_error_reply(e)) {
                        break SessionEnd::TooManyErrors;
                    }
                    continue;
                }
            };
            match request {
                Request::Quit => {
                    self.reply(Reply::new(221, [2, 0, 0], "bye"));
                    break SessionEnd::Quit;
                }
                Request::StartTls => {
                    if self.starttls().await? {
                        receiver = RequestReceiver::default();
                    }
                }
                Request::Data => {
                    if let Some(stop) = self.data().await? {
                        break self.stopped(stop);
                    }
                }
                Request::Bdat { chunk_size, .. } => {
                    // Not offered; the chunk is skipped so its bytes are not read as commands.
                    if let Some(stop) = intake::skip_chunk(&mut self.wire, chunk_size).await? {
                        break self.stopped(stop);
                    }
                    self.abort_transaction().await;
                    if self.bad_command(Reply::not_implemented()) {
                        break SessionEnd::TooManyErrors;
                    }
                }
                other => {
                    let reply = self.command(other).await;
                    if self.answer(reply) {
                        break SessionEnd::TooManyErrors;
                    }
                }
            }
        };
        if matches!(end, SessionEnd::TooManyErrors) {
            self.reply(Reply::new(421, [4, 7, 0], "too many errors, closing connection"));
        }
        let _ = self.wire.flush().await;
        if let Some(hop) = self.hop.take() {
            hop.quit().await;
        }
        Ok(end)
    }

    /// Every command that is answered at once (no data follows it).
    async fn command(&mut self, request: Request<String>) -> Reply {
        match request {
            Request::Ehlo { host } | Request::Lhlo { host } | Request::Helo { host } if host.is_empty() => {
                Reply::syntax("a host name is required")
            }
            Request::Lhlo { .. } if !self.cfg.lmtp => Reply::new(500, [5, 5, 1], "this is SMTP: use EHLO"),
            Request::Ehlo { .. } | Request::Helo { .. } if self.cfg.lmtp => {
                Reply::new(500, [5, 5, 1], "this is LMTP: use LHLO")
            }
            Request::Ehlo { .. } | Request::Lhlo { .. } => {
                self.abort_transaction().await;
                self.xforward = Xforward::default();
                self.greeted = true;
                self.capabilities()
            }
            Request::Helo { .. } => {
                self.abort_transaction().await;
                self.xforward = Xforward::default();
                self.greeted = true;
                Reply::bare(250, vec![self.cfg.hostname.clone()])
            }
            Request::Mail { from } => self.mail(from).await,
            Request::Rcpt { to } => self.rcpt(to.address).await,
            Request::Rset => {
                self.abort_transaction().await;
                self.xforward = Xforward::default();
                Reply::ok([2, 0, 0])
            }
            Request::Noop { .. } => Reply::ok([2, 0, 0]),
            Request::Vrfy { .. } => Reply::new(252, [2, 5, 2], "cannot VRFY user, but will accept the message"),
            Request::Help { .. } => Reply::new(214, [2, 0, 0], "see RFC 5321 (SMTP) or RFC 2033 (LMTP)"),
            Request::Auth { .. }
            | Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => Reply::not_implemented(),
            // Handled by `run`.
            Request::Quit | Request::StartTls | Request::Data | Request::Bdat { .. } => Reply::unrecognised(),
        }
    }

    /// How the session ends when input stopped, with the reply it owes.
    fn stopped(&mut self, stop: Stop) -> SessionEnd {
        match stop {
            Stop::Closed => SessionEnd::Closed,
            Stop::Timeout => {
                self.reply(Reply::timeout());
                SessionEnd::Timeout
            }
            Stop::Shutdown => {
                self.reply(Reply::new(421, [4, 3, 2], "service shutting down, try again later"));
                SessionEnd::Shutdown
            }
        }
    }

    fn reply(&mut self, r: Reply) {
        self.wire.reply(r);
    }

    /// Queues a command's reply; true when it was a 5xx that reached the error limit.
    fn answer(&mut self, r: Reply) -> bool {
        let failed = r.code >= 500;
        self.reply(r);
        failed && self.count_error()
    }

    /// Answers a bad command; true when the error limit is reached.
    fn bad_command(&mut self, r: Reply) -> bool {
        self.reply(r);
        self.count_error()
    }

    fn count_error(&mut self) -> bool {
        self.errors += 1;
        self.errors >= MAX_ERRORS
    }
}

/// The reply for a command `smtp-proto` could not parse.
fn parse_error_reply(e: smtp_proto::Error) -> Reply {
    use smtp_proto::Error as E;
    match e {
        E::UnknownCommand => Reply::unrecognised(),
        E::ResponseTooLong => Reply::line_too_long(),
        E::InvalidSenderAddress => Reply::new(501, [5, 1, 7], "bad sender address syntax"),
        E::InvalidRecipientAddress => Reply::new(501, [5, 1, 3], "bad recipient address syntax"),
        E::SyntaxError { syntax } => Reply::syntax(&format!("syntax: {syntax}")),
        E::InvalidParameter { param } => Reply::syntax(&format!("invalid parameter {param}")),
        E::UnsupportedParameter { param } => {
            let param: String = param.chars().filter(|c| c.is_ascii_graphic()).take(64).collect();
            Reply::new(555, [5, 5, 4], format!("unsupported parameter {param}"))
        }
        E::NeedsMoreData { .. } | E::InvalidResponse { .. } => Reply::unrecognised(),
    }
}
