//! The message after 354: read to the final dot within the size limit and
//! the process-wide byte budget, and checked before anything decides it.

use std::sync::Arc;

use smtp_proto::request::receiver::{DataReceiver, DummyDataReceiver};

use super::framing::{Stop, Wire};
use crate::frontdoor::budget::{ByteBudget, Reservation};

/// A message as DATA delivered it.
pub(crate) enum Received {
    Message(Vec<u8>, Reservation),
    TooBig,
    OverBudget,
}

/// Reads the message up to the final dot. Past the limit or the budget the
/// rest is still read (and dropped) so the reply lands where the client
/// expects it.
pub(crate) async fn receive(
    wire: &mut Wire,
    max_size: usize,
    budget: &Arc<ByteBudget>,
) -> std::io::Result<Result<Received, Stop>> {
    let mut receiver = DataReceiver::new();
    let mut msg = Vec::new();
    let mut reservation = Reservation::new(budget.clone());
    let (mut total, mut too_big, mut over_budget) = (0usize, false, false);
    let mut chunk = Vec::new();
    loop {
        if wire.pending.is_empty() {
            // Inside a message: no shutdown receiver, a shutdown waits for it.
            if let Some(stop) = wire.fill(None).await? {
                return Ok(Err(stop));
            }
        }
        chunk.clear();
        let done = wire.feed(|bytes| receiver.ingest(bytes, &mut chunk));
        total += chunk.len();
        if too_big || over_budget {
            // Read to the end so the reply lands where the client expects it.
        } else if total > max_size {
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

/// Skips a BDAT chunk (CHUNKING is not offered) so its bytes are not read
/// as commands.
pub(crate) async fn skip_chunk(wire: &mut Wire, size: usize) -> std::io::Result<Option<Stop>> {
    let mut skip = DummyDataReceiver::new_bdat(size);
    loop {
        if wire.feed(|bytes| skip.ingest(bytes)) {
            return Ok(None);
        }
        if let Some(stop) = wire.fill(None).await? {
            return Ok(Some(stop));
        }
    }
}

/// An LF not preceded by CR. RFC 5321 §2.3.8 forbids them, and accepting
/// them is what SMTP smuggling relies on.
pub(crate) fn has_bare_lf(msg: &[u8]) -> bool {
    msg.iter().enumerate().any(|(i, &b)| b == b'\n' && (i == 0 || msg[i - 1] != b'\r'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_line_feeds_are_found() {
        assert!(!has_bare_lf(b"a\r\nb\r\n"));
        assert!(has_bare_lf(b"a\nb\r\n"));
        assert!(has_bare_lf(b"\n"));
    }

    #[tokio::test]
    async fn a_message_past_the_limit_is_read_to_its_end_and_refused() {
        let (_client, server) = tokio::io::duplex(1 << 16);
        let mut wire = Wire::new(Box::new(server), std::time::Duration::from_millis(100));
        wire.pending.extend_from_slice(b"Subject: x\r\n\r\n0123456789\r\n.\r\nNOOP\r\n");
        let got = receive(&mut wire, 10, &ByteBudget::new(1 << 20)).await.unwrap();
        assert!(matches!(got, Ok(Received::TooBig)));
        assert_eq!(wire.pending, b"NOOP\r\n", "the next command is left for the session");
        wire.pending.extend_from_slice(b"hi\r\n.\r\n");
        wire.pending.drain(..6);
        match receive(&mut wire, 100, &ByteBudget::new(1 << 20)).await.unwrap() {
            Ok(Received::Message(m, _)) => assert_eq!(m, b"hi\r\n"),
            _ => panic!("a message within the limit"),
        }
    }
}
