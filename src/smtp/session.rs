//! One SMTP or LMTP client connection, from greeting to QUIT.
//!
//! Commands are parsed by `smtp-proto` (sans-IO); we own the socket. Each
//! transaction is mirrored on the next hop as it happens: MAIL and every
//! RCPT are forwarded at once and the hop's answer is the client's answer,
//! so an unknown mailbox is refused at RCPT time exactly as the final server
//! would. After the final dot the message is decided, its headers are
//! rewritten, and it is sent on; when the decision changes the recipients
//! (reroute, copy, review, quarantine) the hop's transaction is restarted with
//! the new ones before any byte of the message is sent. The client hears 250
//! only after the hop accepted the message; a hop failure is a 4xx, so the
//! client keeps the message and retries.

use std::sync::Arc;
use std::time::Duration;

use smtp_proto::request::receiver::{DataReceiver, DummyDataReceiver, RequestReceiver, MAX_LINE_LENGTH};
use smtp_proto::{Request, MAIL_BODY_8BITMIME};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::relay::{Hop, Io, RelayError, RelaySettings};
use super::reply::Reply;
use super::xforward::{self, Xforward};
use crate::act::Change;
use crate::frontdoor::budget::{ByteBudget, Reservation};
use crate::frontdoor::decide::{decide, Caller, DecisionSettings, Silent, Verdict};
use crate::frontdoor::{Filter, MessageInput};
use crate::message::envelope::{Client, Envelope};
use crate::message::headers::is_triage_header;
use crate::record::metrics::name;
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

/// A message as DATA delivered it.
enum Received {
    Message(Vec<u8>, Reservation),
    TooBig,
    OverBudget,
}

enum Input {
    Data,
    Closed,
    Timeout,
    Shutdown,
}

pub struct Session<'a, F> {
    filter: &'a F,
    cfg: &'a SmtpSettings,
    io: Box<dyn Io>,
    peer: String,
    /// Read but not yet parsed.
    pending: Vec<u8>,
    out: Vec<u8>,
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
            io,
            peer,
            pending: Vec::new(),
            out: Vec::new(),
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
        let mut skipping_line = false;
        let end = 'session: loop {
            // Commands are parsed whole lines at a time (XFORWARD is read
            // before smtp-proto, which does not know it, sees the line):
            // read until a line is complete, or too long to be one.
            let line_end = self.pending.iter().position(|&b| b == b'\n');
            if line_end.is_none() && self.pending.len() <= MAX_LINE_LENGTH {
                match self.fill(&mut shutdown).await? {
                    Input::Data => continue,
                    Input::Closed => break SessionEnd::Closed,
                    Input::Timeout => {
                        self.reply(Reply::timeout());
                        break SessionEnd::Timeout;
                    }
                    Input::Shutdown => {
                        self.reply(Reply::new(421, [4, 3, 2], "service shutting down, try again later"));
                        break SessionEnd::Shutdown;
                    }
                }
            }
            // RFC 5321 allows 512 octets; extensions add parameters. Past
            // MAX_LINE_LENGTH the line is skipped and answered once.
            if line_end.unwrap_or(self.pending.len()) > MAX_LINE_LENGTH {
                match line_end {
                    Some(end) => {
                        self.pending.drain(..=end);
                        if std::mem::take(&mut skipping_line) {
                            continue;
                        }
                    }
                    None if skipping_line => {
                        self.pending.clear();
                        continue;
                    }
                    None => {
                        self.pending.clear();
                        skipping_line = true;
                    }
                }
                receiver = RequestReceiver::default();
                if self.bad_command(Reply::line_too_long()) {
                    break SessionEnd::TooManyErrors;
                }
                continue;
            }
            if skipping_line {
                // The tail of an overlong line.
                if let Some(end) = line_end {
                    self.pending.drain(..=end);
                    skipping_line = false;
                } else {
                    self.pending.clear();
                }
                continue;
            }
            if let Some(end) = line_end.filter(|&end| is_xforward(&self.pending[..end])) {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                let args = String::from_utf8_lossy(&line["XFORWARD".len()..]).into_owned();
                let reply = self.xforward_command(&args);
                let failed = reply.code >= 500;
                self.reply(reply);
                if failed && self.count_error() {
                    break SessionEnd::TooManyErrors;
                }
                continue;
            }
            let parsed = feed(&mut self.pending, |bytes| receiver.ingest(bytes).map(|r| r.into_owned()));
            let request = match parsed {
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
                    if self.starttls(&mut receiver).await? {
                        continue;
                    }
                }
                Request::Data => {
                    if let Some(end) = self.data().await? {
                        break end;
                    }
                }
                Request::Bdat { chunk_size, .. } => {
                    // Not offered; skip the chunk so its bytes are not read as commands.
                    let mut skip = DummyDataReceiver::new_bdat(chunk_size);
                    loop {
                        if feed(&mut self.pending, |bytes| skip.ingest(bytes)) {
                            break;
                        }
                        match self.fill_within_message().await? {
                            Input::Data => {}
                            Input::Timeout => {
                                self.reply(Reply::timeout());
                                break 'session SessionEnd::Timeout;
                            }
                            _ => break 'session SessionEnd::Closed,
                        }
                    }
                    self.abort_transaction().await;
                    if self.bad_command(Reply::not_implemented()) {
                        break SessionEnd::TooManyErrors;
                    }
                }
                other => {
                    let reply = self.command(other).await;
                    let failed = reply.code >= 500;
                    self.reply(reply);
                    if failed && self.count_error() {
                        break SessionEnd::TooManyErrors;
                    }
                }
            }
        };
        if matches!(end, SessionEnd::TooManyErrors) {
            self.reply(Reply::new(421, [4, 7, 0], "too many errors, closing connection"));
        }
        let _ = self.flush().await;
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

    fn capabilities(&self) -> Reply {
        let mut lines = vec![
            self.cfg.hostname.clone(),
            "PIPELINING".into(),
            format!("SIZE {}", self.cfg.max_size),
            "8BITMIME".into(),
            "ENHANCEDSTATUSCODES".into(),
        ];
        if self.cfg.tls.is_some() && !self.tls_active {
            lines.push("STARTTLS".into());
        }
        if self.xforward_trusted {
            lines.push(format!("XFORWARD {}", xforward::ATTRIBUTES.join(" ")));
        }
        Reply::bare(250, lines)
    }

    /// `XFORWARD attr=value…`: answered as Postfix's smtpd answers it.
    fn xforward_command(&mut self, args: &str) -> Reply {
        if !self.greeted {
            return Reply::bad_sequence(if self.cfg.lmtp { "send LHLO first" } else { "send EHLO first" });
        }
        if !self.xforward_trusted {
            tracing::info!(peer = %self.peer, "XFORWARD refused: client not in server.xforward_hosts");
            return Reply::new(550, [5, 7, 0], "insufficient authorization for XFORWARD");
        }
        if self.tx.is_some() {
            return Reply::bad_sequence("MAIL transaction in progress");
        }
        match self.xforward.update(args) {
            Ok(()) => Reply::ok([2, 0, 0]),
            Err(r) => r,
        }
    }

    async fn mail(&mut self, from: smtp_proto::MailFrom<String>) -> Reply {
        if !self.greeted {
            return Reply::bad_sequence(if self.cfg.lmtp { "send LHLO first" } else { "send EHLO first" });
        }
        if self.cfg.require_tls && !self.tls_active {
            return Reply::new(530, [5, 7, 0], "must issue a STARTTLS command first");
        }
        if self.tx.is_some() {
            return Reply::bad_sequence("nested MAIL command");
        }
        if from.size > self.cfg.max_size {
            return Reply::too_big(self.cfg.max_size);
        }
        let eight_bit = from.flags & MAIL_BODY_8BITMIME != 0;
        // A connection kept from an earlier transaction may have been closed
        // by the hop meanwhile: one fresh attempt before giving up.
        let reused = self.hop.is_some();
        for attempt in 0..2 {
            let hop = match self.hop.as_mut() {
                Some(h) => h,
                None => match Hop::connect(&self.cfg.relay).await {
                    Ok(h) => self.hop.insert(h),
                    Err(e) => return self.hop_failed(e),
                },
            };
            match hop.mail(&from.address, from.size, eight_bit, &self.xforward).await {
                Ok(r) => {
                    if r.code == 421 {
                        // The hop is closing the connection.
                        self.hop = None;
                    } else if r.is_positive() {
                        self.tx = Some(Transaction {
                            from: from.address,
                            eight_bit,
                            rcpts: Vec::new(),
                            hop_lost: false,
                            xforward: std::mem::take(&mut self.xforward),
                        });
                    }
                    return r;
                }
                Err(e) if reused && attempt == 0 => {
                    tracing::debug!(error = %e, "kept next-hop connection is gone; reconnecting");
                    self.hop = None;
                }
                Err(e) => return self.hop_failed(e),
            }
        }
        Reply::hop_unavailable()
    }

    async fn rcpt(&mut self, to: String) -> Reply {
        let Some(tx) = self.tx.as_mut() else { return Reply::bad_sequence("need MAIL before RCPT") };
        if tx.hop_lost {
            return Reply::hop_unavailable();
        }
        if tx.rcpts.len() >= self.cfg.max_recipients {
            return Reply::new(452, [4, 5, 3], "too many recipients");
        }
        let Some(hop) = self.hop.as_mut() else {
            tx.hop_lost = true;
            return Reply::hop_unavailable();
        };
        match hop.rcpt(&to).await {
            Ok(r) => {
                if r.code == 421 {
                    // The hop is closing the connection: this transaction is over.
                    tx.hop_lost = true;
                    self.hop = None;
                } else if r.is_positive() {
                    tx.rcpts.push(to);
                }
                r
            }
            Err(e) => {
                tx.hop_lost = true;
                self.hop_failed(e)
            }
        }
    }

    /// Drops the hop connection after a failure; the client gets a 4xx.
    fn hop_failed(&mut self, e: RelayError) -> Reply {
        tracing::warn!(front = self.cfg.front(), peer = %self.peer, error = %e, "next hop failed");
        metrics::counter!(name::RELAY, "result" => "hop_error").increment(1);
        self.hop = None;
        Reply::hop_unavailable()
    }

    /// STARTTLS. Returns true when the session continues on TLS.
    async fn starttls(&mut self, receiver: &mut RequestReceiver) -> Result<bool, SessionError> {
        let Some(acceptor) = self.cfg.tls.clone() else {
            self.reply(Reply::not_implemented());
            return Ok(false);
        };
        if self.tls_active {
            self.reply(Reply::bad_sequence("TLS already active"));
            return Ok(false);
        }
        self.reply(Reply::new(220, [2, 0, 0], "ready to start TLS"));
        self.flush().await?;
        // RFC 3207: whatever the client pipelined after STARTTLS is discarded,
        // and the session starts over.
        self.pending.clear();
        *receiver = RequestReceiver::default();
        self.abort_transaction().await;
        self.greeted = false;
        let plain = std::mem::replace(&mut self.io, Box::new(tokio::io::join(tokio::io::empty(), tokio::io::sink())));
        let tls = tokio::time::timeout(self.cfg.timeout, acceptor.accept(plain))
            .await
            .map_err(|_| SessionError::TlsTimeout)?
            .map_err(SessionError::Tls)?;
        self.io = Box::new(tls);
        self.tls_active = true;
        Ok(true)
    }

    /// DATA: checks, 354, the message, then its fate. Returns how the
    /// session ends when the client vanished or stalled inside the message.
    async fn data(&mut self) -> Result<Option<SessionEnd>, SessionError> {
        let refusal = match &self.tx {
            None => Some(Reply::bad_sequence("need MAIL and RCPT before DATA")),
            Some(tx) if tx.hop_lost => Some(Reply::hop_unavailable()),
            // RFC 2033 §4.2 requires 503 in LMTP; RFC 5321 allows 554 in SMTP.
            Some(tx) if tx.rcpts.is_empty() => {
                Some(Reply::new(if self.cfg.lmtp { 503 } else { 554 }, [5, 5, 1], "no valid recipients"))
            }
            _ => None,
        };
        if let Some(r) = refusal {
            self.reply(r);
            return Ok(None);
        }
        self.reply(Reply::bare(354, vec!["end data with <CR><LF>.<CR><LF>".into()]));
        let received = match self.receive_message().await? {
            Ok(r) => r,
            Err(end) => return Ok(Some(end)),
        };
        let tx = self.tx.take().expect("checked above");
        let n = tx.rcpts.len();
        let refused = |r: Reply| vec![r; n];
        let per_rcpt = match received {
            Received::TooBig => refused(Reply::too_big(self.cfg.max_size)),
            Received::OverBudget => refused(Reply::new(452, [4, 3, 1], "insufficient system storage, try again later")),
            Received::Message(msg, _reservation) if has_bare_lf(&msg) => {
                refused(Reply::new(550, [5, 6, 0], "message contains a bare <LF>; lines must end with <CR><LF>"))
            }
            Received::Message(msg, _reservation) => self.deliver(&tx, msg).await,
        };
        if per_rcpt.iter().all(|r| !r.is_positive()) {
            // Nothing was delivered: the hop may still hold the transaction.
            self.reset_hop().await;
        }
        if self.cfg.lmtp {
            for r in per_rcpt {
                self.reply(r);
            }
        } else {
            let one = combine(&per_rcpt);
            if per_rcpt.iter().any(|r| r.is_positive()) && !one.is_positive() {
                tracing::warn!(
                    peer = %self.peer,
                    accepted = per_rcpt.iter().filter(|r| r.is_positive()).count(),
                    recipients = n,
                    "next hop accepted the message for some recipients only; the client is told it failed \
                     (it retries, so those recipients may see it twice: use LMTP on both sides for per-recipient replies)"
                );
            }
            self.reply(one);
        }
        Ok(None)
    }

    /// Reads the message after 354 up to the final dot, within the size
    /// limit and the global byte budget.
    async fn receive_message(&mut self) -> Result<Result<Received, SessionEnd>, SessionError> {
        let mut receiver = DataReceiver::new();
        let mut msg = Vec::new();
        let mut reservation = Reservation::new(self.cfg.budget.clone());
        let (mut total, mut too_big, mut over_budget) = (0usize, false, false);
        let mut chunk = Vec::new();
        loop {
            if self.pending.is_empty() {
                match self.fill_within_message().await? {
                    Input::Data => {}
                    Input::Timeout => {
                        self.reply(Reply::timeout());
                        return Ok(Err(SessionEnd::Timeout));
                    }
                    _ => return Ok(Err(SessionEnd::Closed)),
                }
            }
            chunk.clear();
            let done = feed(&mut self.pending, |bytes| receiver.ingest(bytes, &mut chunk));
            total += chunk.len();
            if too_big || over_budget {
                // Read to the end so the reply lands where the client expects it.
            } else if total > self.cfg.max_size {
                too_big = true;
                msg = Vec::new();
            } else if reservation.take(chunk.len()) < chunk.len() {
                over_budget = true;
                msg = Vec::new();
            } else {
                msg.extend_from_slice(&chunk);
            }
            if done {
                break;
            }
        }
        Ok(Ok(if too_big {
            Received::TooBig
        } else if over_budget {
            Received::OverBudget
        } else {
            Received::Message(msg, reservation)
        }))
    }

    /// Decides the message and relays it; one reply per client recipient.
    async fn deliver(&mut self, tx: &Transaction, msg: Vec<u8>) -> Vec<Reply> {
        let n = tx.rcpts.len();
        let triage_headers: Vec<String> =
            crate::message::headers::names(&msg).into_iter().filter(|h| is_triage_header(h)).collect();
        let input = MessageInput {
            envelope: Envelope {
                mail_from: tx.from.clone(),
                rcpts: tx.rcpts.clone(),
                queue_id: None,
                client: self.client(tx, &msg),
            },
            raw: msg[..msg.len().min(self.cfg.max_decide_bytes)].to_vec(),
            header_names: triage_headers.clone(),
        };
        let caller = Caller { front: self.cfg.front(), queue_id: None };
        let Ok(verdict) = decide(self.filter, input, &self.cfg.decision, caller, &mut Silent).await;
        let plan = match verdict {
            Verdict::Deliver(plan) => plan,
            Verdict::Tempfail => return vec![Reply::tempfail("triage unavailable, try again later"); n],
            Verdict::Discard => {
                // Accepted and dropped on purpose (recorded feedback): the client is done.
                metrics::counter!(name::RELAY, "result" => "discarded").increment(1);
                self.reset_hop().await;
                return vec![Reply::new(250, [2, 0, 0], "accepted"); n];
            }
        };
        let message = plan.apply_to_message(&msg);
        drop(msg);
        let mut rcpts = plan.apply_to_recipients(&tx.rcpts);
        if plan.changes.iter().any(|c| matches!(c, Change::Quarantine { .. })) {
            // A relay has no hold queue: quarantine is a mailbox.
            if let Some(q) = &self.cfg.quarantine_mailbox {
                rcpts = vec![q.clone()];
            }
        }
        let Some(hop) = self.hop.as_mut() else { return vec![Reply::hop_unavailable(); n] };
        let result = async move {
            if rcpts != tx.rcpts {
                // Restart the hop's transaction with the new recipients; send
                // nothing unless the ones the message now belongs to are accepted.
                hop.rset().await?;
                let r = hop.mail(&tx.from, message.len(), tx.eight_bit, &tx.xforward).await?;
                if !r.is_positive() {
                    let n = rcpts.len();
                    return Ok((rcpts, vec![r; n]));
                }
                let mut accepted = Vec::with_capacity(rcpts.len());
                for to in &rcpts {
                    let r = hop.rcpt(to).await?;
                    let original = tx.rcpts.iter().any(|o| o.eq_ignore_ascii_case(to));
                    let kept = rcpts.iter().any(|x| tx.rcpts.iter().any(|o| o.eq_ignore_ascii_case(x)));
                    if r.is_positive() {
                        accepted.push(to.clone());
                    } else if !original && kept {
                        // A copy the hop refuses: the original recipients
                        // still get the message; failing it would bounce them.
                        tracing::warn!(reply = %r.to_string().trim_end(), "next hop refused the department copy; delivering to the original recipients only");
                        metrics::counter!(name::RELAY, "result" => "copy_refused").increment(1);
                    } else {
                        let n = rcpts.len();
                        return Ok((rcpts, vec![r; n]));
                    }
                }
                rcpts = accepted;
            }
            let replies = hop.data(&message, rcpts.len()).await?;
            Ok::<_, RelayError>((rcpts, replies))
        }
        .await;
        let (rcpts, replies) = match result {
            Ok(r) => r,
            Err(e) => return vec![self.hop_failed(e); n],
        };
        let per_client = map_replies(&tx.rcpts, &rcpts, &replies);
        let delivered = per_client.iter().filter(|r| r.is_positive()).count();
        let result = match delivered {
            d if d == n => "delivered",
            0 if per_client.iter().any(Reply::is_transient) => "tempfail",
            0 => "rejected",
            _ => "partial",
        };
        metrics::counter!(name::RELAY, "result" => result).increment(1);
        tracing::debug!(front = self.cfg.front(), recipients = n, relayed_to = rcpts.len(), result, "relayed");
        per_client
    }

    /// Who the message came from. From the trusted MTA (a content filter's
    /// usual client): XFORWARD's original client, and its `Received:` line
    /// for authentication. From anyone else: the peer itself, never
    /// authenticated (we offer no AUTH).
    fn client(&self, tx: &Transaction, msg: &[u8]) -> Client {
        let peer = self.peer.parse::<std::net::SocketAddr>().ok().map(|a| a.ip());
        if self.xforward_trusted {
            Client {
                addr: tx.xforward.client_addr().or(peer),
                authenticated: xforward::authenticated_per_mta(msg),
                listener: None,
            }
        } else {
            Client { addr: peer, authenticated: false, listener: None }
        }
    }

    async fn reset_hop(&mut self) {
        if let Some(hop) = self.hop.as_mut() {
            if hop.rset().await.is_err() {
                self.hop = None;
            }
        }
    }

    /// Ends the current transaction here and on the hop.
    async fn abort_transaction(&mut self) {
        if self.tx.take().is_some() {
            self.reset_hop().await;
        }
    }

    fn reply(&mut self, r: Reply) {
        self.out.extend_from_slice(r.to_string().as_bytes());
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

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            self.io.write_all(&self.out).await?;
            self.io.flush().await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Writes what is queued, then waits for more input between commands
    /// (where a shutdown may end the session).
    async fn fill(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<Input, SessionError> {
        self.flush().await?;
        if self.tx.is_none() && *shutdown.borrow() {
            return Ok(Input::Shutdown);
        }
        let mut buf = [0u8; 16 * 1024];
        let read = tokio::select! {
            r = tokio::time::timeout(self.cfg.timeout, self.io.read(&mut buf)) => r,
            _ = shutdown.wait_for(|s| *s), if self.tx.is_none() => return Ok(Input::Shutdown),
        };
        self.take_read(read, &buf)
    }

    /// As [`fill`](Self::fill), inside a message: a shutdown waits for it.
    async fn fill_within_message(&mut self) -> Result<Input, SessionError> {
        self.flush().await?;
        let mut buf = [0u8; 16 * 1024];
        let read = tokio::time::timeout(self.cfg.timeout, self.io.read(&mut buf)).await;
        self.take_read(read, &buf)
    }

    fn take_read(
        &mut self,
        read: Result<std::io::Result<usize>, tokio::time::error::Elapsed>,
        buf: &[u8],
    ) -> Result<Input, SessionError> {
        match read {
            Err(_) => Ok(Input::Timeout),
            Ok(Ok(0)) => Ok(Input::Closed),
            Ok(Ok(n)) => {
                self.pending.extend_from_slice(&buf[..n]);
                Ok(Input::Data)
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(Input::Closed),
            Ok(Err(e)) => Err(e.into()),
        }
    }
}

/// Whether a command line is `XFORWARD …`.
fn is_xforward(line: &[u8]) -> bool {
    line.len() >= 8
        && line[..8].eq_ignore_ascii_case(b"XFORWARD")
        && line.get(8).is_none_or(|c| matches!(c, b' ' | b'\t' | b'\r'))
}

/// Lets one of `smtp-proto`'s sans-IO receivers read the unparsed input,
/// then drops the bytes it consumed.
fn feed<T>(pending: &mut Vec<u8>, parse: impl FnOnce(&mut std::slice::Iter<'_, u8>) -> T) -> T {
    let mut bytes = pending.iter();
    let out = parse(&mut bytes);
    let consumed = pending.len() - bytes.as_slice().len();
    pending.drain(..consumed);
    out
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

/// An LF not preceded by CR. RFC 5321 §2.3.8 forbids them, and accepting them
/// is what SMTP smuggling relies on.
fn has_bare_lf(msg: &[u8]) -> bool {
    msg.iter().enumerate().any(|(i, &b)| b == b'\n' && (i == 0 || msg[i - 1] != b'\r'))
}

/// The hop's replies (one per relayed recipient) as replies to the client's
/// recipients: a kept recipient gets its own; one replaced by the decision
/// (reroute, review, quarantine) gets the replacement's, since its message
/// went there.
fn map_replies(client: &[String], relayed: &[String], replies: &[Reply]) -> Vec<Reply> {
    let pos = |r: &str| relayed.iter().position(|x| x.eq_ignore_ascii_case(r));
    let replacements: Vec<Reply> = relayed
        .iter()
        .zip(replies)
        .filter(|(r, _)| !client.iter().any(|c| c.eq_ignore_ascii_case(r)))
        .map(|(_, reply)| reply.clone())
        .collect();
    let fallback = combine(if replacements.is_empty() { replies } else { &replacements });
    client.iter().map(|c| pos(c).and_then(|i| replies.get(i).cloned()).unwrap_or_else(|| fallback.clone())).collect()
}

/// One reply for several: success only if all succeeded; else a transient
/// failure if there is one (the client retries), else the first failure.
fn combine(replies: &[Reply]) -> Reply {
    replies
        .iter()
        .find(|r| r.is_transient())
        .or_else(|| replies.iter().find(|r| !r.is_positive()))
        .or_else(|| replies.first())
        .cloned()
        .unwrap_or_else(Reply::hop_unavailable)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream};
    use tokio::net::TcpListener;

    use super::*;
    use crate::frontdoor::net::{Listener, Stream};
    use crate::learn::feedback::layer::FeedbackLayer;
    use crate::pipeline::Triage;
    use crate::settings::{ListenAddress, NextHop};

    /// What the fake next hop received: sender, recipients, message.
    type Delivered = Arc<Mutex<Vec<(String, Vec<String>, String)>>>;

    /// A next hop at `addr` (TCP or unix socket): refuses RCPT for
    /// `unknown@…` (550), and in LMTP mode refuses the message for `full@…`
    /// after DATA (452). Returns the bound address and what it received.
    async fn fake_hop_at(addr: ListenAddress, lmtp: bool) -> (String, Delivered) {
        let listener = Listener::bind(&addr, 0o600).await.unwrap();
        let bound = listener.local_addr();
        let delivered: Delivered = Default::default();
        let store = delivered.clone();
        tokio::spawn(async move {
            loop {
                match crate::frontdoor::net::accept(&listener).await.unwrap().0 {
                    Stream::Tcp(s) => tokio::spawn(hop_conversation(s, lmtp, store.clone())),
                    Stream::Unix(s) => tokio::spawn(hop_conversation(s, lmtp, store.clone())),
                };
            }
        });
        (bound, delivered)
    }

    async fn fake_hop(lmtp: bool) -> (String, Delivered) {
        let (bound, delivered) = fake_hop_at(ListenAddress::Inet("127.0.0.1:0".into()), lmtp).await;
        (bound.trim_start_matches("inet:").to_string(), delivered)
    }

    async fn hop_conversation<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static>(
        s: S,
        lmtp: bool,
        store: Delivered,
    ) {
        let (r, mut w) = tokio::io::split(s);
        let mut lines = BufReader::new(r).lines();
        w.write_all(b"220 hop ready\r\n").await.unwrap();
        let (mut from, mut rcpts) = (String::new(), Vec::<String>::new());
        // XFORWARD lines of the current transaction, stored in front of the message.
        let mut xforward = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            let upper = line.to_ascii_uppercase();
            let reply: String = if upper.starts_with("EHLO") || upper.starts_with("LHLO") {
                xforward.clear();
                "250-hop\r\n250-SIZE 100000\r\n250-XFORWARD NAME ADDR HELO\r\n250 8BITMIME\r\n".into()
            } else if upper.starts_with("XFORWARD ") {
                let refused = line.contains("NAME=refused.example");
                xforward.push_str(if refused { "REFUSED " } else { "" });
                xforward.push_str(&line);
                xforward.push('\n');
                if refused {
                    "550 5.7.0 insufficient authorization\r\n".into()
                } else {
                    "250 2.0.0 Ok\r\n".into()
                }
            } else if upper.starts_with("MAIL FROM:") {
                from = line[10..].trim_matches(['<', '>', ' ']).split('>').next().unwrap().into();
                rcpts.clear();
                "250 2.1.0 ok\r\n".into()
            } else if upper.starts_with("RCPT TO:") {
                let to = line[8..].trim_matches(['<', '>', ' ']).to_string();
                if to.starts_with("unknown@") {
                    "550 5.1.1 no such user\r\n".into()
                } else {
                    rcpts.push(to);
                    "250 2.1.5 ok\r\n".into()
                }
            } else if upper == "DATA" {
                w.write_all(b"354 go\r\n").await.unwrap();
                let mut msg = String::new();
                while let Ok(Some(l)) = lines.next_line().await {
                    if l == "." {
                        break;
                    }
                    msg.push_str(l.strip_prefix('.').unwrap_or(&l));
                    msg.push('\n');
                }
                let ok: Vec<String> = rcpts.iter().filter(|r| !(lmtp && r.starts_with("full@"))).cloned().collect();
                store.lock().unwrap().push((from.clone(), ok, std::mem::take(&mut xforward) + &msg));
                if lmtp {
                    rcpts
                        .iter()
                        .map(|r| {
                            if r.starts_with("full@") {
                                "452 4.2.2 mailbox full\r\n"
                            } else {
                                "250 2.0.0 delivered\r\n"
                            }
                        })
                        .collect()
                } else {
                    "250 2.0.0 queued\r\n".into()
                }
            } else if upper == "RSET" {
                rcpts.clear();
                xforward.clear();
                "250 2.0.0 ok\r\n".into()
            } else if upper == "QUIT" {
                let _ = w.write_all(b"221 bye\r\n").await;
                break;
            } else {
                "502 5.5.1 what\r\n".into()
            };
            if w.write_all(reply.as_bytes()).await.is_err() {
                break;
            }
        }
    }

    fn settings(lmtp: bool, hop: &str, extra: &str) -> (SmtpSettings, Arc<FeedbackLayer>) {
        let scheme = if lmtp { "lmtp" } else { "smtp" };
        let hop = if hop.starts_with('/') { format!("unix:{hop}") } else { format!("//{hop}") };
        let cfg = Config::from_toml(
            &format!(
                r#"
[server]
smtp = "127.0.0.1:0"
smtp_timeout = "2s"
hostname = "filter.test"
{extra}
[limits]
max_recipients = 3
max_smtp_message_bytes = 2000
[relay]
next_hop = "{scheme}:{hop}"
timeout = "2s"
[[departments]]
name = "billing"
mailbox = "billing@example.com"
action = "reroute"
[[rules]]
name = "invoices"
header = "Subject"
pattern = "(?i)invoice"
department = "billing"
"#
            ),
            "t",
        )
        .unwrap();
        let relay = RelaySettings::from_config(&cfg).unwrap().unwrap();
        let s = SmtpSettings::new(&cfg, lmtp, None, ByteBudget::new(1 << 20), relay);
        (s, Arc::new(FeedbackLayer::new(Triage::new(&cfg).unwrap(), &cfg, None)))
    }

    /// Starts a session on an in-memory pipe; returns the client's end.
    fn start(s: SmtpSettings, t: Arc<FeedbackLayer>) -> (BufReader<DuplexStream>, watch::Sender<bool>) {
        start_from(s, t, "test")
    }

    /// A session whose client is `peer` (`IP:PORT` for TCP, else a socket path).
    fn start_from(
        s: SmtpSettings,
        t: Arc<FeedbackLayer>,
        peer: &str,
    ) -> (BufReader<DuplexStream>, watch::Sender<bool>) {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (tx, rx) = watch::channel(false);
        let peer = peer.to_string();
        tokio::spawn(async move {
            let _ = Session::new(&t, &s, Box::new(server), peer).run(rx).await;
        });
        (BufReader::new(client), tx)
    }

    /// Reads one (possibly multi-line) reply.
    async fn reply(c: &mut BufReader<DuplexStream>) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if c.read_line(&mut line).await.unwrap() == 0 {
                return all;
            }
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    async fn say(c: &mut BufReader<DuplexStream>, line: &str) -> String {
        c.get_mut().write_all(format!("{line}\r\n").as_bytes()).await.unwrap();
        reply(c).await
    }

    /// MAIL, one RCPT and DATA, each expected to succeed; returns the reply
    /// to the message (`message` is sent with the terminating dot line).
    async fn transaction(c: &mut BufReader<DuplexStream>, from: &str, to: &str, message: &str) -> String {
        assert!(say(c, &format!("MAIL FROM:<{from}>")).await.starts_with("250"), "MAIL FROM:<{from}>");
        assert!(say(c, &format!("RCPT TO:<{to}>")).await.starts_with("250"), "RCPT TO:<{to}>");
        assert!(say(c, "DATA").await.starts_with("354"));
        say(c, &format!("{message}\r\n.")).await
    }

    #[tokio::test]
    async fn smtp_relays_decided_messages_and_reroutes_by_restarting_the_hop_transaction() {
        let (hop, delivered) = fake_hop(false).await;
        let (s, t) = settings(false, &hop, "");
        let (mut c, _stop) = start(s, t);
        assert!(reply(&mut c).await.starts_with("220 filter.test ESMTP"));
        let caps = say(&mut c, "EHLO client.test").await;
        for cap in ["PIPELINING", "SIZE 2000", "8BITMIME", "ENHANCEDSTATUSCODES"] {
            assert!(caps.contains(cap), "{caps}");
        }
        assert!(!caps.contains("STARTTLS"), "no certificate, no STARTTLS: {caps}");
        assert!(say(&mut c, "MAIL FROM:<a@x.test>").await.starts_with("250"));
        assert!(say(&mut c, "RCPT TO:<u@y.test>").await.starts_with("250"));
        assert!(say(&mut c, "RCPT TO:<unknown@y.test>").await.starts_with("550 5.1.1"), "hop's refusal passed back");
        assert!(say(&mut c, "DATA").await.starts_with("354"));
        let r = say(&mut c, "Subject: invoice 7\r\nX-Triage-Department: ceo\r\n\r\n..dotted\r\nbody\r\n.").await;
        assert!(r.starts_with("250 2.0.0 queued"), "{r}");
        // Pipelined: a tag-only message on the same connection.
        c.get_mut()
            .write_all(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<u@y.test>\r\nRCPT TO:<v@y.test>\r\nDATA\r\n")
            .await
            .unwrap();
        for want in ["250", "250", "250", "354"] {
            assert!(reply(&mut c).await.starts_with(want));
        }
        assert!(say(&mut c, "Subject: hello\r\n\r\nhi\r\n.").await.starts_with("250"));
        assert!(say(&mut c, "QUIT").await.starts_with("221"));
        let got = delivered.lock().unwrap().clone();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].1, ["billing@example.com"], "rerouted: only the department mailbox");
        assert!(got[0].2.contains("X-Triage-Department: billing\n"), "{}", got[0].2);
        assert!(!got[0].2.contains("ceo"), "inbound X-Triage header removed");
        assert!(got[0].2.contains("\n.dotted\n"), "dot-stuffing round trip");
        assert_eq!(got[1].1, ["u@y.test", "v@y.test"]);
        assert!(got[1].2.contains("X-Triage-Department: general"));
    }

    /// A filter that never answers in time.
    struct Stalled;

    impl Filter for Stalled {
        async fn filter(&self, _msg: MessageInput) -> Result<crate::act::Plan, crate::frontdoor::FilterError> {
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
            unreachable!("the session stops waiting first")
        }
    }

    #[tokio::test]
    async fn a_decision_timeout_is_counted_and_the_message_goes_through_unrouted() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Current-thread runtime: the session task records on this thread.
        let _local = metrics::set_default_local_recorder(&recorder);
        let (hop, delivered) = fake_hop(false).await;
        let (mut s, _) = settings(false, &hop, "decision_timeout = \"300ms\"");
        assert_eq!(s.decision.timeout, std::time::Duration::from_millis(300));
        let (client, server) = tokio::io::duplex(1 << 16);
        let (_stop, rx) = watch::channel(false);
        s.decision.on_error = crate::settings::OnError::Accept;
        tokio::spawn(async move {
            let _ = Session::new(&Stalled, &s, Box::new(server), "test".into()).run(rx).await;
        });
        let mut c = BufReader::new(client);
        assert!(reply(&mut c).await.starts_with("220"));
        assert!(say(&mut c, "EHLO client.test").await.starts_with("250"));
        let r =
            transaction(&mut c, "a@x.test", "u@y.test", "Subject: invoice\r\nX-Triage-Source: forged\r\n\r\nhi").await;
        assert!(r.starts_with("250"), "on_error = accept relays the message: {r}");
        let got = delivered.lock().unwrap().clone();
        assert_eq!(got.len(), 1);
        assert!(!got[0].2.contains("forged"), "inbound X-Triage headers still removed: {}", got[0].2);
        let text = handle.render();
        assert!(
            text.lines().any(|l| l.starts_with(crate::record::metrics::name::FAILED_OPEN)
                && l.contains("reason=\"timeout\"")
                && l.contains("front=\"smtp\"")
                && l.ends_with(" 1")),
            "{text}"
        );
    }

    #[tokio::test]
    async fn xforward_from_a_trusted_client_reaches_the_hop_before_every_mail() {
        let (hop, delivered) = fake_hop(false).await;
        let (s, t) = settings(false, &hop, "");
        let (mut c, _stop) = start_from(s, t, "127.0.0.1:40000");
        reply(&mut c).await;
        assert!(say(&mut c, "XFORWARD ADDR=192.0.2.7").await.starts_with("503"), "before EHLO");
        let caps = say(&mut c, "EHLO postfix.test").await;
        assert!(caps.contains("250 XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE\r\n"), "{caps}");
        // Postfix splits the attributes over two commands; pipelined with MAIL.
        c.get_mut()
            .write_all(b"XFORWARD NAME=client.example ADDR=192.0.2.7 PORT=5000\r\nxforward HELO=client.example PROTO=ESMTP\r\n")
            .await
            .unwrap();
        assert!(reply(&mut c).await.starts_with("250 2.0.0"));
        assert!(reply(&mut c).await.starts_with("250 2.0.0"));
        assert!(say(&mut c, "XFORWARD COLOUR=red").await.starts_with("501 5.5.4"));
        // A command split over two reads is still one XFORWARD.
        c.get_mut().write_all(b"XFORW").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(say(&mut c, "ARD IDENT=Q1").await.starts_with("250 2.0.0"));
        assert!(say(&mut c, "MAIL FROM:<a@x.test>").await.starts_with("250"));
        assert!(say(&mut c, "XFORWARD NAME=late.example").await.starts_with("503"), "inside a transaction");
        assert!(say(&mut c, "RCPT TO:<u@y.test>").await.starts_with("250"));
        assert!(say(&mut c, "DATA").await.starts_with("354"));
        // Rerouted: the hop's transaction is restarted, XFORWARD said again.
        assert!(say(&mut c, "Subject: invoice 9\r\n\r\nbody\r\n.").await.starts_with("250"));
        // The next transaction starts without them.
        assert!(transaction(&mut c, "b@x.test", "u@y.test", "Subject: hello\r\n\r\nhi").await.starts_with("250"));
        say(&mut c, "QUIT").await;
        let got = delivered.lock().unwrap().clone();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].1, ["billing@example.com"]);
        assert!(
            got[0].2.starts_with("XFORWARD NAME=client.example ADDR=192.0.2.7 HELO=client.example\n"),
            "only what the hop announced, after the restart: {}",
            got[0].2
        );
        assert!(!got[1].2.contains("XFORWARD"), "attributes last one transaction: {}", got[1].2);
    }

    #[tokio::test]
    async fn a_hop_that_refuses_xforward_still_gets_the_mail_and_is_not_asked_again() {
        let (hop, delivered) = fake_hop(false).await;
        let (s, t) = settings(false, &hop, "");
        let (mut c, _stop) = start_from(s, t, "127.0.0.1:40000");
        reply(&mut c).await;
        say(&mut c, "EHLO postfix.test").await;
        for _ in 0..2 {
            assert!(say(&mut c, "XFORWARD NAME=refused.example ADDR=192.0.2.7").await.starts_with("250"));
            assert!(transaction(&mut c, "a@x.test", "u@y.test", "Subject: hello\r\n\r\nhi").await.starts_with("250"));
        }
        say(&mut c, "QUIT").await;
        let got = delivered.lock().unwrap().clone();
        assert_eq!(got.len(), 2, "both delivered despite the refusal");
        assert!(got[0].2.starts_with("REFUSED XFORWARD NAME=refused.example ADDR=192.0.2.7\n"), "{}", got[0].2);
        assert!(!got[1].2.contains("XFORWARD"), "not asked again on this connection: {}", got[1].2);
    }

    #[tokio::test]
    async fn xforward_from_an_untrusted_client_is_refused_and_not_offered() {
        let (hop, delivered) = fake_hop(false).await;
        let (s, t) = settings(false, &hop, "xforward_hosts = [\"10.0.0.0/8\"]");
        let (mut c, _stop) = start_from(s, t, "192.0.2.1:25000");
        reply(&mut c).await;
        let caps = say(&mut c, "EHLO elsewhere.test").await;
        assert!(!caps.contains("XFORWARD"), "{caps}");
        assert!(say(&mut c, "XFORWARD NAME=spoofed.example").await.starts_with("550 5.7.0"));
        assert!(transaction(&mut c, "a@x.test", "u@y.test", "Subject: hello\r\n\r\nhi").await.starts_with("250"));
        say(&mut c, "QUIT").await;
        assert!(!delivered.lock().unwrap()[0].2.contains("XFORWARD"));
    }

    #[tokio::test]
    async fn feedback_mail_is_accepted_and_relayed_to_nobody() {
        let (hop, delivered) = fake_hop(false).await;
        let (s, t) = settings(
            false,
            &hop,
            "[feedback]\nstore = \"sqlite:///nonexistent/unused.db\"\naddress = \"fb@example.com\"\n",
        );
        let (mut c, _stop) = start(s, t);
        reply(&mut c).await;
        say(&mut c, "EHLO client.test").await;
        assert!(transaction(
            &mut c,
            "agent@x.test",
            "fb+billing@example.com",
            "Subject: Fwd: refund\r\n\r\nplease refund"
        )
        .await
        .starts_with("250"));
        // The hop transaction was reset: the next message goes through normally.
        assert!(transaction(&mut c, "a@x.test", "u@y.test", "Subject: hello\r\n\r\nhi").await.starts_with("250"));
        let got = delivered.lock().unwrap().clone();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].1, ["u@y.test"]);
    }

    #[tokio::test]
    async fn lmtp_answers_each_recipient_with_the_hop_answer_for_it() {
        let (hop, delivered) = fake_hop(true).await;
        let (s, t) = settings(true, &hop, "");
        let (mut c, _stop) = start(s, t);
        assert!(reply(&mut c).await.contains("LMTP"));
        assert!(say(&mut c, "EHLO x").await.starts_with("500"), "LMTP wants LHLO");
        assert!(say(&mut c, "LHLO client.test").await.starts_with("250"));
        assert!(say(&mut c, "MAIL FROM:<a@x.test>").await.starts_with("250"));
        for (to, want) in [("a@y.test", "250"), ("unknown@y.test", "550"), ("full@y.test", "250"), ("b@y.test", "250")]
        {
            assert!(say(&mut c, &format!("RCPT TO:<{to}>")).await.starts_with(want), "{to}");
        }
        assert!(say(&mut c, "DATA").await.starts_with("354"));
        c.get_mut().write_all(b"Subject: hi\r\n\r\nbody\r\n.\r\n").await.unwrap();
        let replies = [reply(&mut c).await, reply(&mut c).await, reply(&mut c).await];
        assert!(replies[0].starts_with("250"), "{replies:?}");
        assert!(replies[1].starts_with("452 4.2.2"), "{replies:?}");
        assert!(replies[2].starts_with("250"), "{replies:?}");
        assert_eq!(delivered.lock().unwrap()[0].1, ["a@y.test", "b@y.test"]);
    }

    #[tokio::test]
    async fn the_next_hop_may_be_a_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lmtp.sock");
        let (_, delivered) = fake_hop_at(ListenAddress::Unix(path.clone()), true).await;
        let (s, t) = settings(true, path.to_str().unwrap(), "");
        let (mut c, _stop) = start(s, t);
        reply(&mut c).await;
        assert!(say(&mut c, "LHLO client.test").await.starts_with("250"));
        assert!(transaction(&mut c, "a@x.test", "a@y.test", "Subject: hi\r\n\r\nbody").await.starts_with("250"));
        assert_eq!(delivered.lock().unwrap()[0].1, ["a@y.test"]);
    }

    #[tokio::test]
    async fn bad_input_gets_proper_replies() {
        let (hop, delivered) = fake_hop(false).await;
        let (s, t) = settings(false, &hop, "");
        let (mut c, _stop) = start(s, t);
        reply(&mut c).await;
        assert!(say(&mut c, "MAIL FROM:<a@x.test>").await.starts_with("503"), "MAIL before EHLO");
        assert!(say(&mut c, "LHLO x").await.starts_with("500"));
        assert!(say(&mut c, "EHLO client.test").await.starts_with("250"));
        assert!(say(&mut c, "RCPT TO:<u@y.test>").await.starts_with("503"), "RCPT before MAIL");
        assert!(say(&mut c, "DATA").await.starts_with("503"), "DATA before MAIL");
        assert!(say(&mut c, "FROB").await.starts_with("500"));
        let r = say(&mut c, &format!("NOOP {}", "x".repeat(5000))).await;
        assert!(r.starts_with("500 5.5.2 line too long"), "{r}");
        assert!(say(&mut c, "MAIL FROM:<a@x.test> SIZE=999999").await.starts_with("552"));
        assert!(say(&mut c, "MAIL FROM:<a@x.test>").await.starts_with("250"));
        assert!(say(&mut c, "MAIL FROM:<a@x.test>").await.starts_with("503"), "nested MAIL");
        assert!(say(&mut c, "DATA").await.starts_with("554"), "no recipients yet");
        for i in 0..3 {
            assert!(say(&mut c, &format!("RCPT TO:<u{i}@y.test>")).await.starts_with("250"));
        }
        assert!(say(&mut c, "RCPT TO:<u9@y.test>").await.starts_with("452 4.5.3"));
        assert!(say(&mut c, "DATA").await.starts_with("354"));
        let big = format!("Subject: x\r\n\r\n{}\r\n.", "y".repeat(3000));
        assert!(say(&mut c, &big).await.starts_with("552 5.3.4"));
        assert!(say(&mut c, "MAIL FROM:<a@x.test>").await.starts_with("250"), "the session goes on");
        assert!(say(&mut c, "RCPT TO:<u@y.test>").await.starts_with("250"));
        assert!(say(&mut c, "DATA").await.starts_with("354"));
        assert!(say(&mut c, "Subject: x\r\n\nsmuggled\n.\r\n.").await.starts_with("550 5.6.0"));
        assert!(say(&mut c, "RSET").await.starts_with("250"));
        assert!(delivered.lock().unwrap().is_empty(), "nothing refused was relayed");
    }

    #[tokio::test]
    async fn a_dead_next_hop_is_a_temporary_failure() {
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().to_string();
        let (s, t) = settings(false, &closed, "");
        let (mut c, _stop) = start(s, t);
        reply(&mut c).await;
        say(&mut c, "EHLO client.test").await;
        let r = say(&mut c, "MAIL FROM:<a@x.test>").await;
        assert!(r.starts_with("451 4.4.1"), "{r}");
    }

    #[tokio::test]
    async fn a_silent_client_is_told_421_and_shutdown_waits_for_no_transaction() {
        let (hop, _) = fake_hop(false).await;
        let (s, t) = settings(false, &hop, "");
        let (mut c, stop) = start(s.clone(), t.clone());
        reply(&mut c).await;
        let r = tokio::time::timeout(Duration::from_secs(5), reply(&mut c)).await.unwrap();
        assert!(r.starts_with("421 4.4.2"), "{r}");
        let (mut c, stop2) = start(s, t);
        drop(stop);
        reply(&mut c).await;
        say(&mut c, "EHLO client.test").await;
        stop2.send(true).unwrap();
        assert!(reply(&mut c).await.starts_with("421 4.3.2"));
    }

    #[test]
    fn replies_map_back_to_the_client_recipients() {
        let ok = Reply::new(250, [2, 0, 0], "ok");
        let full = Reply::new(452, [4, 2, 2], "full");
        let client = vec!["a@x".to_string(), "b@x".to_string()];
        // Rerouted: both get the department mailbox's answer.
        assert_eq!(
            map_replies(&client, &["d@x".into()], std::slice::from_ref(&full)),
            vec![full.clone(), full.clone()]
        );
        // Copied: each keeps its own; the copy's failure does not fail them.
        let relayed = vec!["a@x".into(), "b@x".into(), "d@x".into()];
        assert_eq!(
            map_replies(&client, &relayed, &[ok.clone(), full.clone(), full.clone()]),
            vec![ok.clone(), full.clone()]
        );
        assert_eq!(combine(&[ok.clone(), full.clone()]), full);
        assert_eq!(combine(&[ok.clone(), ok.clone()]), ok);
        let hop: NextHop = "lmtp://127.0.0.1:24".parse().unwrap();
        assert_eq!(hop.to_string(), "lmtp://127.0.0.1:24");
    }
}
