//! The transaction's envelope: MAIL and RCPT, each forwarded to the next
//! hop at once so its answer is the client's.

use smtp_proto::MAIL_BODY_8BITMIME;

use super::super::relay::{Hop, RelayError};
use super::super::reply::Reply;
use super::{Session, Transaction};
use crate::frontdoor::Filter;
use crate::record::metrics::name;

impl<F: Filter> Session<'_, F> {
    pub(super) async fn mail(&mut self, from: smtp_proto::MailFrom<String>) -> Reply {
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

    pub(super) async fn rcpt(&mut self, to: String) -> Reply {
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
    pub(super) fn hop_failed(&mut self, e: RelayError) -> Reply {
        tracing::warn!(front = self.cfg.front(), peer = %self.peer, error = %e, "next hop failed");
        metrics::counter!(name::RELAY, "result" => "hop_error").increment(1);
        self.hop = None;
        Reply::hop_unavailable()
    }

    pub(super) async fn reset_hop(&mut self) {
        if let Some(hop) = self.hop.as_mut() {
            if hop.rset().await.is_err() {
                self.hop = None;
            }
        }
    }

    /// Ends the current transaction here and on the hop.
    pub(super) async fn abort_transaction(&mut self) {
        if self.tx.take().is_some() {
            self.reset_hop().await;
        }
    }
}
