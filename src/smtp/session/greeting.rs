//! Greeting and connection state: EHLO/LHLO/HELO and what we announce,
//! STARTTLS, and XFORWARD from the MTA in front of us.

use super::super::reply::Reply;
use super::super::xforward;
use super::{Session, SessionError};
use crate::frontdoor::Filter;

impl<F: Filter> Session<'_, F> {
    pub(super) fn capabilities(&self) -> Reply {
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
    pub(super) fn xforward_command(&mut self, args: &str) -> Reply {
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

    /// STARTTLS. Returns true when the session continues on TLS (the
    /// caller then parses afresh).
    pub(super) async fn starttls(&mut self) -> Result<bool, SessionError> {
        let Some(acceptor) = self.cfg.tls.clone() else {
            self.reply(Reply::not_implemented());
            return Ok(false);
        };
        if self.tls_active {
            self.reply(Reply::bad_sequence("TLS already active"));
            return Ok(false);
        }
        self.reply(Reply::new(220, [2, 0, 0], "ready to start TLS"));
        self.wire.flush().await?;
        // RFC 3207: whatever the client pipelined after STARTTLS is discarded,
        // and the session starts over.
        self.wire.discard_pending();
        self.abort_transaction().await;
        self.greeted = false;
        let plain =
            std::mem::replace(&mut self.wire.io, Box::new(tokio::io::join(tokio::io::empty(), tokio::io::sink())));
        let tls = tokio::time::timeout(self.cfg.timeout, acceptor.accept(plain))
            .await
            .map_err(|_| SessionError::TlsTimeout)?
            .map_err(SessionError::Tls)?;
        self.wire.io = Box::new(tls);
        self.tls_active = true;
        Ok(true)
    }
}
