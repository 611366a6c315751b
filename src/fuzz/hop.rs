//! A next hop for the SMTP front door's tests and the `smtp` fuzz target:
//! a small MTA on loopback or a unix socket that records what it was given.
//!
//! It refuses RCPT for `unknown@…` (550), refuses XFORWARD carrying
//! `NAME=refused.example` (550), and as an LMTP server refuses the message
//! for `full@…` after DATA (452). Input is read as bytes, so any client (a
//! fuzzer's included) gets an answer, never a panic.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

use crate::frontdoor::net::{self, Listener, ServerError, Stream};
use crate::settings::ListenAddress;

/// One message the hop accepted.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub from: String,
    /// The recipients it was delivered to.
    pub rcpts: Vec<String>,
    /// The XFORWARD lines of its transaction (`REFUSED ` in front of a
    /// refused one), then the message with `\n` line ends, dots unstuffed.
    pub message: String,
}

pub type Delivered = Arc<Mutex<Vec<Delivery>>>;

pub struct FakeHop {
    /// Where it listens: `IP:PORT` or the socket's path.
    pub address: String,
    pub delivered: Delivered,
}

impl FakeHop {
    /// Listens at `addr` and answers every connection as SMTP, or LMTP.
    pub async fn start(addr: &ListenAddress, lmtp: bool) -> Result<FakeHop, ServerError> {
        let listener = Listener::bind(addr, 0o600).await?;
        let address = listener.local_addr().trim_start_matches("inet:").trim_start_matches("unix:").to_string();
        let delivered = Delivered::default();
        let store = delivered.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = net::accept(&listener).await {
                match stream {
                    Stream::Tcp(s) => tokio::spawn(converse(s, lmtp, Some(store.clone()))),
                    Stream::Unix(s) => tokio::spawn(converse(s, lmtp, Some(store.clone()))),
                };
            }
        });
        Ok(FakeHop { address, delivered })
    }

    /// What it accepted so far.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.delivered.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// One connection, to its end. `store: None` keeps nothing (fuzzing runs
/// millions of messages through one hop).
pub async fn converse<S: AsyncRead + AsyncWrite + Send + 'static>(s: S, lmtp: bool, store: Option<Delivered>) {
    let (r, mut w) = tokio::io::split(s);
    let mut input = BufReader::new(r);
    if w.write_all(b"220 hop ready\r\n").await.is_err() {
        return;
    }
    let (mut from, mut rcpts) = (String::new(), Vec::<String>::new());
    // XFORWARD lines of the current transaction, stored in front of the message.
    let mut xforward = String::new();
    let mut raw = Vec::new();
    loop {
        raw.clear();
        match input.read_until(b'\n', &mut raw).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&raw).trim_end_matches(['\r', '\n']).to_string();
        let upper = line.to_ascii_uppercase();
        let reply: String = if upper.starts_with("EHLO") || upper.starts_with("LHLO") {
            xforward.clear();
            "250-hop\r\n250-SIZE 1000000\r\n250-XFORWARD NAME ADDR HELO\r\n250 8BITMIME\r\n".into()
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
            from = line[10..].trim_matches(['<', '>', ' ']).split('>').next().unwrap_or_default().into();
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
            if w.write_all(b"354 go\r\n").await.is_err() {
                return;
            }
            let mut msg = String::new();
            loop {
                raw.clear();
                match input.read_until(b'\n', &mut raw).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let l = String::from_utf8_lossy(&raw);
                let l = l.trim_end_matches(['\r', '\n']);
                if l == "." {
                    break;
                }
                if store.is_some() {
                    msg.push_str(l.strip_prefix('.').unwrap_or(l));
                    msg.push('\n');
                }
            }
            let refused = |r: &String| lmtp && r.starts_with("full@");
            if let Some(store) = &store {
                let ok: Vec<String> = rcpts.iter().filter(|r| !refused(r)).cloned().collect();
                let message = std::mem::take(&mut xforward) + &msg;
                store.lock().unwrap_or_else(|e| e.into_inner()).push(Delivery {
                    from: from.clone(),
                    rcpts: ok,
                    message,
                });
            }
            if lmtp {
                rcpts
                    .iter()
                    .map(|r| if refused(r) { "452 4.2.2 mailbox full\r\n" } else { "250 2.0.0 delivered\r\n" })
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
            return;
        } else {
            "502 5.5.1 what\r\n".into()
        };
        if w.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}
