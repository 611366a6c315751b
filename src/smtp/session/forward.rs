//! After the final dot: the decision, the message rewritten, and the relay,
//! restarting the hop's transaction when the recipients changed (reroute,
//! copy, review, quarantine into its mailbox).

use super::super::relay::RelayError;
use super::super::reply::{map_replies, Reply};
use super::super::xforward;
use super::{Session, Transaction};
use crate::act::Change;
use crate::frontdoor::decide::{decide, Caller, Silent, Verdict};
use crate::frontdoor::{Filter, MessageInput};
use crate::message::envelope::{Client, Envelope};
use crate::message::headers::is_triage_header;
use crate::record::metrics::name;

impl<F: Filter> Session<'_, F> {
    /// Decides the message and relays it; one reply per client recipient.
    pub(super) async fn deliver(&mut self, tx: &Transaction, msg: Vec<u8>) -> Vec<Reply> {
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
    pub(super) fn client(&self, tx: &Transaction, msg: &[u8]) -> Client {
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
}
