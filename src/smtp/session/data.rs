//! DATA: the checks before 354, the message, and one reply per recipient
//! (LMTP) or one for all (SMTP).

use super::super::framing::Stop;
use super::super::intake::{self, has_bare_lf, Received};
use super::super::reply::{combine, Reply};
use super::{Session, SessionError};
use crate::frontdoor::Filter;

impl<F: Filter> Session<'_, F> {
    /// DATA: checks, 354, the message, then its fate. Returns why input
    /// stopped when the client vanished or stalled inside the message.
    pub(super) async fn data(&mut self) -> Result<Option<Stop>, SessionError> {
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
        let received = match intake::receive(&mut self.wire, self.cfg.max_size, &self.cfg.budget).await? {
            Ok(r) => r,
            Err(stop) => return Ok(Some(stop)),
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
}
