//! The next hop: an SMTP or LMTP server we hand each filtered message to,
//! through `mail-send`'s client.
//!
//! One [`Hop`] connection follows one client session, so a client that sends
//! many messages over one connection costs one connection here too. Every
//! reply the hop gives is returned, not judged: the session decides what the
//! client hears, so a hop's 4xx reaches the client as a 4xx.

use std::sync::Arc;
use std::time::Duration;

use mail_send::SmtpClient;
use smtp_proto::{EhloResponse, EXT_8BIT_MIME, EXT_SIZE, EXT_START_TLS};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsConnector;

use super::reply::Reply;
use super::tls::{self, TlsError};
use super::xforward::{self, Xforward};
use crate::settings::{Config, HopProtocol, ListenAddress, NextHop, RelayTls};

/// A byte stream of any kind (TCP, unix, TLS over either).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// How to reach the next hop; built once from `[relay]`.
pub struct RelaySettings {
    pub hop: NextHop,
    pub tls: RelayTls,
    pub connector: Option<TlsConnector>,
    pub timeout: Duration,
    pub data_timeout: Duration,
    /// Our name in EHLO/LHLO.
    pub helo: String,
}

impl RelaySettings {
    /// `None` when no `[relay]` is configured.
    pub fn from_config(cfg: &Config) -> Result<Option<Arc<RelaySettings>>, TlsError> {
        let Some(r) = &cfg.relay else { return Ok(None) };
        Ok(Some(Arc::new(RelaySettings {
            hop: r.next_hop.clone(),
            tls: r.tls,
            connector: tls::connector(r.tls, r.tls_ca_file.as_deref())?,
            timeout: r.timeout,
            data_timeout: r.data_timeout,
            helo: cfg.server.hostname.clone(),
        })))
    }
}

/// The next hop could not be used; the client gets a 4xx and retries.
#[derive(Debug, Error)]
pub enum RelayError {
    #[error("next hop {hop}: cannot connect: {source}")]
    Connect { hop: String, source: std::io::Error },
    #[error("next hop {hop}: no reply to {what} within {secs} s")]
    Timeout { hop: String, what: &'static str, secs: u64 },
    #[error("next hop {hop}: {what}: {detail}")]
    Protocol { hop: String, what: &'static str, detail: String },
    #[error("next hop {hop}: STARTTLS is required (tls = \"{mode}\") but not offered")]
    NoStartTls { hop: String, mode: &'static str },
}

/// An open connection to the next hop, greeted and (per `tls`) encrypted.
pub struct Hop {
    client: SmtpClient<Box<dyn Io>>,
    settings: Arc<RelaySettings>,
    /// The hop's SIZE limit (0: none announced).
    size_limit: usize,
    eight_bit: bool,
    announced_size: bool,
    /// XFORWARD attributes the hop announced (none: it does not take XFORWARD).
    xforward: Vec<String>,
}

impl Hop {
    pub async fn connect(settings: &Arc<RelaySettings>) -> Result<Hop, RelayError> {
        let hop = settings.hop.to_string();
        let connect_err = |source| RelayError::Connect { hop: hop.clone(), source };
        let stream: Box<dyn Io> = match &settings.hop.address {
            ListenAddress::Inet(a) => {
                let s = within(settings.timeout, &hop, "connect", tokio::net::TcpStream::connect(a))
                    .await?
                    .map_err(connect_err)?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
            ListenAddress::Unix(p) => Box::new(
                within(settings.timeout, &hop, "connect", tokio::net::UnixStream::connect(p))
                    .await?
                    .map_err(connect_err)?,
            ),
        };
        let mut client = SmtpClient { stream, timeout: settings.timeout };
        let greeting = within(settings.timeout, &hop, "the greeting", client.read())
            .await?
            .map_err(|e| proto(&hop, "greeting", e))?;
        if greeting.code != 220 {
            return Err(RelayError::Protocol {
                hop,
                what: "greeting",
                detail: Reply::from_hop(&greeting).to_string().trim_end().into(),
            });
        }
        let mut h = Hop {
            client,
            settings: settings.clone(),
            size_limit: 0,
            eight_bit: false,
            announced_size: false,
            xforward: Vec::new(),
        };
        let caps = h.hello().await?;
        let offered = caps & EXT_START_TLS != 0;
        match (settings.tls, &settings.connector) {
            (RelayTls::None, _) | (_, None) => {}
            (RelayTls::May, Some(_)) if !offered => {}
            (mode, Some(_)) if !offered => {
                let mode = if mode == RelayTls::Verify { "verify" } else { "encrypt" };
                return Err(RelayError::NoStartTls { hop, mode });
            }
            (_, Some(connector)) => {
                let r = h.command("STARTTLS", "STARTTLS\r\n").await?;
                if r.code != 220 {
                    return Err(RelayError::Protocol {
                        hop,
                        what: "STARTTLS",
                        detail: r.to_string().trim_end().into(),
                    });
                }
                let host = match &settings.hop.address {
                    ListenAddress::Inet(a) => {
                        a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h).trim_matches(['[', ']']).to_string()
                    }
                    ListenAddress::Unix(_) => "localhost".to_string(),
                };
                let name = rustls_pki_types::ServerName::try_from(host.clone()).map_err(|e| RelayError::Protocol {
                    hop: hop.clone(),
                    what: "TLS name",
                    detail: format!("{host}: {e}"),
                })?;
                let plain = std::mem::replace(
                    &mut h.client.stream,
                    Box::new(tokio::io::join(tokio::io::empty(), tokio::io::sink())),
                );
                let tls = within(settings.timeout, &hop, "the TLS handshake", connector.connect(name, plain))
                    .await?
                    .map_err(|e| RelayError::Protocol {
                        hop: hop.clone(),
                        what: "TLS handshake",
                        detail: e.to_string(),
                    })?;
                h.client.stream = Box::new(tls);
                // RFC 3207: forget what was said before TLS and greet again.
                h.hello().await?;
            }
        }
        Ok(h)
    }

    /// EHLO or LHLO; keeps what we use of the answer and returns the capabilities.
    async fn hello(&mut self) -> Result<u32, RelayError> {
        let verb = match self.settings.hop.protocol {
            HopProtocol::Smtp => "EHLO",
            HopProtocol::Lmtp => "LHLO",
        };
        // Sent as a plain command so the whole answer is seen: mail-send's
        // EHLO parser drops extensions it does not know, XFORWARD among them.
        let line = format!("{verb} {}\r\n", self.settings.helo);
        let hop = self.settings.hop.to_string();
        let resp = match self.client.cmd(line.as_bytes()).await {
            Ok(r) => r,
            Err(mail_send::Error::Timeout) => {
                return Err(RelayError::Timeout { hop, what: "EHLO/LHLO", secs: self.settings.timeout.as_secs() })
            }
            Err(e) => return Err(proto(&hop, "EHLO/LHLO", e)),
        };
        if resp.code != 250 {
            return Err(RelayError::Protocol {
                hop,
                what: "EHLO/LHLO",
                detail: Reply::from_hop(&resp).to_string().trim_end().into(),
            });
        }
        let ehlo = parse_ehlo(&resp.message).ok_or_else(|| RelayError::Protocol {
            hop: hop.clone(),
            what: "EHLO/LHLO",
            detail: format!("unreadable answer: {}", Reply::from_hop(&resp).to_string().trim_end()),
        })?;
        self.size_limit = ehlo.size;
        self.announced_size = ehlo.capabilities & EXT_SIZE != 0;
        self.eight_bit = ehlo.capabilities & EXT_8BIT_MIME != 0;
        self.xforward = xforward::offered_by(&resp.message);
        Ok(ehlo.capabilities)
    }

    async fn command(&mut self, what: &'static str, line: &str) -> Result<Reply, RelayError> {
        let hop = self.settings.hop.to_string();
        match self.client.cmd(line.as_bytes()).await {
            Ok(r) => Ok(Reply::from_hop(&r)),
            Err(mail_send::Error::Timeout) => {
                Err(RelayError::Timeout { hop, what, secs: self.settings.timeout.as_secs() })
            }
            Err(e) => Err(proto(&hop, what, e)),
        }
    }

    /// The hop's own SIZE limit, if it announced one.
    pub fn size_limit(&self) -> Option<usize> {
        (self.announced_size && self.size_limit > 0).then_some(self.size_limit)
    }

    /// Starts a transaction: XFORWARD first when the hop takes it, then MAIL.
    /// A refusal is not fatal (the message matters more than its provenance):
    /// it is logged once, and this connection sends no more XFORWARD.
    pub async fn mail(
        &mut self,
        from: &str,
        size: usize,
        eight_bit: bool,
        fwd: &Xforward,
    ) -> Result<Reply, RelayError> {
        for line in fwd.commands_for(&self.xforward) {
            let r = self.command("XFORWARD", &line).await?;
            if !r.is_positive() {
                tracing::warn!(hop = %self.settings.hop, reply = %r.to_string().trim_end(),
                    "next hop refused XFORWARD (Postfix: add us to smtpd_authorized_xforward_hosts); the original client is not passed on");
                self.xforward.clear();
                break;
            }
        }
        let mut line = format!("MAIL FROM:<{from}>");
        if self.announced_size && size > 0 {
            line.push_str(&format!(" SIZE={size}"));
        }
        if eight_bit && self.eight_bit {
            line.push_str(" BODY=8BITMIME");
        }
        line.push_str("\r\n");
        self.command("MAIL", &line).await
    }

    pub async fn rcpt(&mut self, to: &str) -> Result<Reply, RelayError> {
        self.command("RCPT", &format!("RCPT TO:<{to}>\r\n")).await
    }

    pub async fn rset(&mut self) -> Result<Reply, RelayError> {
        self.command("RSET", "RSET\r\n").await
    }

    /// Sends the message; returns one reply per recipient (LMTP) or one
    /// reply repeated for each (SMTP), so callers read both the same way.
    /// A refused DATA command is likewise that reply for everyone.
    pub async fn data(&mut self, message: &[u8], recipients: usize) -> Result<Vec<Reply>, RelayError> {
        let go = self.command("DATA", "DATA\r\n").await?;
        if go.code != 354 {
            return Ok(vec![go; recipients]);
        }
        let hop = self.settings.hop.to_string();
        let secs = self.settings.data_timeout.as_secs();
        let stuffed = dot_stuff(message);
        let lmtp = self.settings.hop.protocol == HopProtocol::Lmtp;
        let client = &mut self.client;
        let exchange = async {
            client.stream.write_all(&stuffed).await.map_err(mail_send::Error::Io)?;
            client.stream.flush().await.map_err(mail_send::Error::Io)?;
            if lmtp {
                client.read_many(recipients).await
            } else {
                client.read().await.map(|r| vec![r])
            }
        };
        let replies = tokio::time::timeout(self.settings.data_timeout, exchange)
            .await
            .map_err(|_| RelayError::Timeout { hop: hop.clone(), what: "the end of DATA", secs })?
            .map_err(|e| proto(&hop, "DATA", e))?;
        let replies: Vec<Reply> = replies.iter().map(Reply::from_hop).collect();
        Ok(if lmtp { replies } else { vec![replies[0].clone(); recipients] })
    }

    /// Says goodbye; errors do not matter any more.
    pub async fn quit(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.client.cmd(b"QUIT\r\n")).await;
    }
}

/// What smtp-proto reads from an EHLO answer (unknown extensions skipped),
/// given the answer's text as a plain reply carries it: lines joined by LF.
fn parse_ehlo(message: &str) -> Option<EhloResponse<String>> {
    let lines: Vec<&str> = message.lines().collect();
    let mut raw = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let sep = if i + 1 == lines.len() { ' ' } else { '-' };
        raw.extend_from_slice(format!("250{sep}{l}\r\n").as_bytes());
    }
    EhloResponse::parse(&mut raw.iter()).ok()
}

/// The message in DATA form: a dot doubled at the start of every line, CRLF
/// at the end, then the terminating `.`.
fn dot_stuff(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + message.len() / 64 + 8);
    let mut line_start = true;
    for &b in message {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
    }
    if !message.is_empty() && !message.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

async fn within<T>(
    limit: Duration,
    hop: &str,
    what: &'static str,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, RelayError> {
    tokio::time::timeout(limit, fut).await.map_err(|_| RelayError::Timeout {
        hop: hop.into(),
        what,
        secs: limit.as_secs(),
    })
}

fn proto(hop: &str, what: &'static str, e: mail_send::Error) -> RelayError {
    let detail = match e {
        mail_send::Error::UnexpectedReply(r) => Reply::from_hop(&r).to_string().trim_end().to_string(),
        other => other.to_string(),
    };
    RelayError::Protocol { hop: hop.into(), what, detail }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ehlo_answers_are_read_with_their_extensions() {
        // As the hop sends it, read as a plain reply the way `Hop::hello` does.
        let wire = b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-XFORWARD NAME ADDR\r\n\
                     250-STARTTLS\r\n250 8BITMIME\r\n";
        let reply = smtp_proto::response::parser::ResponseReceiver::default().parse(&mut wire.iter()).unwrap();
        let e = parse_ehlo(&reply.message).unwrap();
        assert_eq!(e.size, 10_240_000);
        assert_ne!(e.capabilities & EXT_8BIT_MIME, 0, "{:?}", reply.message);
        assert_ne!(e.capabilities & EXT_START_TLS, 0);
        assert_eq!(xforward::offered_by(&reply.message), ["NAME", "ADDR"]);
        assert_eq!(parse_ehlo("mx.example").unwrap().capabilities, 0);
    }

    #[test]
    fn dot_stuffing() {
        assert_eq!(dot_stuff(b".a\r\nb\r\n.\r\n..c\r\n"), b"..a\r\nb\r\n..\r\n...c\r\n.\r\n");
        assert_eq!(dot_stuff(b"no newline"), b"no newline\r\n.\r\n");
        assert_eq!(dot_stuff(b""), b".\r\n");
    }
}
