//! Bytes in and replies out for one connection: reads with the idle
//! timeout, replies queued until the client waits for them (pipelining),
//! and the input cut into command lines, overlong ones skipped whole.

use std::time::Duration;

use smtp_proto::request::receiver::MAX_LINE_LENGTH;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::relay::Io;
use super::reply::Reply;

/// Why no more input came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    Closed,
    Timeout,
    /// We are stopping; only offered between transactions.
    Shutdown,
}

/// The next command line in the input.
pub(crate) enum Framed {
    /// A complete line; the index of its `\n` in [`Wire::pending`].
    Line(usize),
    /// A line past `MAX_LINE_LENGTH`: skipped up to its end, to be answered once.
    Overlong,
    Stopped(Stop),
}

pub(crate) struct Wire {
    pub(crate) io: Box<dyn Io>,
    /// Read but not yet parsed.
    pub(crate) pending: Vec<u8>,
    /// Replies not yet written.
    out: Vec<u8>,
    /// Inside an overlong line already answered: its tail is dropped.
    skipping_line: bool,
    timeout: Duration,
}

impl Wire {
    pub(crate) fn new(io: Box<dyn Io>, timeout: Duration) -> Wire {
        Wire { io, pending: Vec::new(), out: Vec::new(), skipping_line: false, timeout }
    }

    pub(crate) fn reply(&mut self, r: Reply) {
        self.out.extend_from_slice(r.to_string().as_bytes());
    }

    pub(crate) async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            self.io.write_all(&self.out).await?;
            self.io.flush().await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Waits until a whole command line is buffered (commands are parsed a
    /// line at a time, so XFORWARD, which `smtp-proto` does not know, is
    /// seen first). RFC 5321 allows 512 octets and extensions add
    /// parameters; past `MAX_LINE_LENGTH` the line is skipped and reported
    /// once. `idle`: no transaction is open, so a shutdown may end the wait.
    pub(crate) async fn next_line(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        idle: bool,
    ) -> std::io::Result<Framed> {
        loop {
            let line_end = self.pending.iter().position(|&b| b == b'\n');
            if line_end.is_none() && self.pending.len() <= MAX_LINE_LENGTH {
                match self.fill(if idle { Some(&mut *shutdown) } else { None }).await? {
                    None => continue,
                    Some(stop) => return Ok(Framed::Stopped(stop)),
                }
            }
            if line_end.unwrap_or(self.pending.len()) > MAX_LINE_LENGTH {
                match line_end {
                    Some(end) => {
                        self.pending.drain(..=end);
                        if std::mem::take(&mut self.skipping_line) {
                            continue;
                        }
                    }
                    None if self.skipping_line => {
                        self.pending.clear();
                        continue;
                    }
                    None => {
                        self.pending.clear();
                        self.skipping_line = true;
                    }
                }
                return Ok(Framed::Overlong);
            }
            match line_end {
                Some(end) if self.skipping_line => {
                    // The tail of an overlong line.
                    self.pending.drain(..=end);
                    self.skipping_line = false;
                }
                Some(end) => return Ok(Framed::Line(end)),
                None => self.pending.clear(),
            }
        }
    }

    /// Removes the first `end + 1` bytes (a line found by [`next_line`](Self::next_line)).
    pub(crate) fn take_line(&mut self, end: usize) -> Vec<u8> {
        self.pending.drain(..=end).collect()
    }

    /// Drops whatever was read and not parsed (STARTTLS: RFC 3207 discards
    /// what the client pipelined after it).
    pub(crate) fn discard_pending(&mut self) {
        self.pending.clear();
        self.skipping_line = false;
    }

    /// Lets one of `smtp-proto`'s sans-IO receivers read the unparsed
    /// input, then drops the bytes it consumed.
    pub(crate) fn feed<T>(&mut self, parse: impl FnOnce(&mut std::slice::Iter<'_, u8>) -> T) -> T {
        let mut bytes = self.pending.iter();
        let out = parse(&mut bytes);
        let consumed = self.pending.len() - bytes.as_slice().len();
        self.pending.drain(..consumed);
        out
    }

    /// Writes what is queued, then reads more input; `None` when some came.
    /// A shutdown ends the wait only when given (between transactions):
    /// inside a message it waits for the message.
    pub(crate) async fn fill(&mut self, shutdown: Option<&mut watch::Receiver<bool>>) -> std::io::Result<Option<Stop>> {
        self.flush().await?;
        let mut buf = [0u8; 16 * 1024];
        let read = match shutdown {
            Some(rx) if *rx.borrow() => return Ok(Some(Stop::Shutdown)),
            Some(rx) => tokio::select! {
                r = tokio::time::timeout(self.timeout, self.io.read(&mut buf)) => r,
                _ = rx.wait_for(|s| *s) => return Ok(Some(Stop::Shutdown)),
            },
            None => tokio::time::timeout(self.timeout, self.io.read(&mut buf)).await,
        };
        match read {
            Err(_) => Ok(Some(Stop::Timeout)),
            Ok(Ok(0)) => Ok(Some(Stop::Closed)),
            Ok(Ok(n)) => {
                self.pending.extend_from_slice(&buf[..n]);
                Ok(None)
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(Some(Stop::Closed)),
            Ok(Err(e)) => Err(e),
        }
    }
}

/// Whether a command line is `XFORWARD …`.
pub(crate) fn is_xforward(line: &[u8]) -> bool {
    line.len() >= 8
        && line[..8].eq_ignore_ascii_case(b"XFORWARD")
        && line.get(8).is_none_or(|c| matches!(c, b' ' | b'\t' | b'\r'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(input: &[u8]) -> (Wire, watch::Sender<bool>, watch::Receiver<bool>) {
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut w = Wire::new(Box::new(server), Duration::from_millis(200));
        w.pending.extend_from_slice(input);
        drop(client);
        let (tx, rx) = watch::channel(false);
        (w, tx, rx)
    }

    #[tokio::test]
    async fn an_overlong_line_is_reported_once_and_the_next_line_is_found() {
        let mut input = vec![b'x'; MAX_LINE_LENGTH + 10];
        input.extend_from_slice(b"tail\r\nNOOP\r\n");
        let (mut w, _tx, mut rx) = wire(&input);
        assert!(matches!(w.next_line(&mut rx, true).await.unwrap(), Framed::Overlong));
        match w.next_line(&mut rx, true).await.unwrap() {
            Framed::Line(end) => assert_eq!(w.take_line(end), b"NOOP\r\n"),
            _ => panic!("the line after the overlong one"),
        }
        assert!(matches!(w.next_line(&mut rx, true).await.unwrap(), Framed::Stopped(Stop::Closed)));
    }

    #[tokio::test]
    async fn a_shutdown_ends_the_wait_only_between_transactions() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut w = Wire::new(Box::new(server), Duration::from_millis(100));
        let (tx, mut rx) = watch::channel(true);
        assert_eq!(w.fill(Some(&mut rx)).await.unwrap(), Some(Stop::Shutdown));
        assert_eq!(w.fill(None).await.unwrap(), Some(Stop::Timeout), "inside a message it waits");
        drop((client, tx));
    }

    #[test]
    fn xforward_is_told_from_lookalikes() {
        assert!(is_xforward(b"XFORWARD NAME=a"));
        assert!(is_xforward(b"xforward\r"));
        assert!(!is_xforward(b"XFORWARDED"));
        assert!(!is_xforward(b"XFORW"));
    }
}
