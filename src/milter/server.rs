//! The milter listener: TCP or unix socket, one task per MTA connection,
//! bounded in number, drained on shutdown.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use super::session::{Session, SessionConfig, SessionEnd};
use crate::config::ListenAddress;
use crate::pipeline::Filter;

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}")]
    Bind { addr: String, source: std::io::Error },
    #[error("unix socket {path}")]
    Socket { path: String, source: std::io::Error },
}

/// A bound listener, ready to serve.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, std::path::PathBuf),
}

impl Listener {
    /// Binds the configured address. A stale unix socket from an earlier run
    /// is replaced; any other file at that path is an error.
    pub async fn bind(addr: &ListenAddress, unix_mode: u32) -> Result<Listener, ServerError> {
        match addr {
            ListenAddress::Inet(a) => TcpListener::bind(a)
                .await
                .map(Listener::Tcp)
                .map_err(|source| ServerError::Bind { addr: addr.to_string(), source }),
            ListenAddress::Unix(path) => {
                let shown = path.display().to_string();
                let sock_err = |source| ServerError::Socket { path: shown.clone(), source };
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    if !meta.file_type().is_socket() {
                        return Err(sock_err(std::io::Error::new(
                            std::io::ErrorKind::AlreadyExists,
                            "exists and is not a socket",
                        )));
                    }
                    // A socket someone still answers on belongs to a running daemon: never steal it.
                    if std::os::unix::net::UnixStream::connect(path).is_ok() {
                        return Err(sock_err(std::io::Error::new(
                            std::io::ErrorKind::AddrInUse,
                            "another process is listening on it (is mailtriage already running?)",
                        )));
                    }
                    std::fs::remove_file(path).map_err(sock_err)?;
                }
                let l =
                    UnixListener::bind(path).map_err(|source| ServerError::Bind { addr: addr.to_string(), source })?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(unix_mode)).map_err(sock_err)?;
                Ok(Listener::Unix(l, path.clone()))
            }
        }
    }

    /// The bound address, e.g. to log the port chosen for `:0`.
    pub fn local_addr(&self) -> String {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| format!("inet:{a}")).unwrap_or_else(|_| "inet:?".into()),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Accepts connections until `shutdown` turns true, then waits up to
/// `grace` for sessions with a message in flight.
pub async fn serve<F: Filter + Clone>(
    listener: Listener,
    filter: F,
    cfg: SessionConfig,
    max_connections: usize,
    grace: std::time::Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let cfg = Arc::new(cfg);
    let slots = Arc::new(Semaphore::new(max_connections));
    let mut sessions = JoinSet::new();
    loop {
        // Take a slot before accepting: past the bound, connections wait in the
        // kernel's backlog instead of costing us memory.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let accepted = tokio::select! {
            a = accept(&listener) => a,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        // Reap finished sessions so the set does not grow with history.
        while sessions.try_join_next().is_some() {}
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off briefly rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (filter, cfg, rx) = (filter.clone(), cfg.clone(), shutdown.clone());
        sessions.spawn(async move {
            let _permit = permit;
            let open = metrics::gauge!(crate::metrics::name::CONNECTIONS, "front" => "milter");
            open.increment(1.0);
            let result = match stream {
                Stream::Tcp(s) => {
                    let _ = s.set_nodelay(true);
                    Session::new(&filter, &cfg).run(QuickAck(s), rx).await
                }
                Stream::Unix(s) => Session::new(&filter, &cfg).run(s, rx).await,
            };
            open.decrement(1.0);
            match result {
                Ok(SessionEnd::Quit) => tracing::debug!(%peer, "milter connection closed"),
                Ok(SessionEnd::Shutdown) => tracing::debug!(%peer, "milter connection closed for shutdown"),
                Err(e) => {
                    let error = crate::redact::redact(&e.to_string()).into_owned();
                    tracing::warn!(%peer, error, "milter connection dropped")
                }
            }
        });
    }
    drop(listener);
    let open = sessions.len();
    if open > 0 {
        tracing::info!(open, grace_s = grace.as_secs_f64(), "waiting for milter sessions to finish");
        if tokio::time::timeout(grace, async { while sessions.join_next().await.is_some() {} }).await.is_err() {
            tracing::warn!(left = sessions.len(), "grace period over; closing remaining milter sessions");
            sessions.abort_all();
        }
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &Listener) -> std::io::Result<(Stream, String)> {
    match l {
        Listener::Tcp(l) => l.accept().await.map(|(s, a)| (Stream::Tcp(s), a.to_string())),
        Listener::Unix(l, p) => l.accept().await.map(|(s, _)| (Stream::Unix(s), p.display().to_string())),
    }
}

/// A TCP stream that acknowledges every read at once.
///
/// Postfix writes some milter packets back to back with no reply in between
/// (the macro packet, then end-of-message), and its socket uses Nagle: the
/// second packet waits for the first one's ACK, which Linux delays by 40 ms
/// when the receiver has nothing to send. Measured: DATA took 45 ms with the
/// milter, and the mail rate capped at ~200/s with the machine 58 % idle.
/// `TCP_QUICKACK` is not sticky, so it is re-armed after each read.
struct QuickAck(TcpStream);

impl AsyncRead for QuickAck {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.0).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) {
            let _ = socket2::SockRef::from(&self.0).set_tcp_quickack(true);
        }
        polled
    }
}

impl AsyncWrite for QuickAck {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::actions::Plan;
    use crate::milter::codec::{self, Command, Negotiation, Reply};
    use crate::pipeline::{FilterError, MessageInput};

    #[derive(Clone)]
    struct TagAll;

    impl Filter for TagAll {
        async fn filter(&self, _msg: MessageInput) -> Result<Plan, FilterError> {
            Ok(Plan { changes: vec![crate::actions::Change::AddHeader { name: "X-T".into(), value: "1".into() }] })
        }
    }

    fn cfg() -> SessionConfig {
        let d = std::time::Duration::from_secs(5);
        SessionConfig {
            max_frame_bytes: 1 << 20,
            max_message_bytes: 1 << 20,
            max_recipients: 10,
            idle_timeout: d,
            decision_timeout: d,
            progress_interval: d,
            on_error: crate::config::OnError::Accept,
            budget: crate::milter::session::ByteBudget::new(1 << 30),
        }
    }

    async fn send(s: &mut tokio::net::TcpStream, cmd: Command) {
        s.write_all(&codec::encode_command(&cmd)).await.unwrap();
    }

    async fn reply(s: &mut tokio::net::TcpStream) -> Reply {
        let (code, payload) = codec::read_frame(s, 1 << 20).await.unwrap().unwrap();
        codec::decode_reply(code, &payload).unwrap()
    }

    #[tokio::test]
    async fn a_broken_connection_does_not_disturb_the_others_and_shutdown_drains() {
        let listener = Listener::bind(&ListenAddress::Inet("127.0.0.1:0".into()), 0o660).await.unwrap();
        let addr = listener.local_addr().trim_start_matches("inet:").to_string();
        let (tx, rx) = watch::channel(false);
        let server = tokio::spawn(serve(listener, TagAll, cfg(), 4, std::time::Duration::from_secs(5), rx));

        let mut good = tokio::net::TcpStream::connect(&addr).await.unwrap();
        send(
            &mut good,
            Command::Negotiate(Negotiation {
                version: 6,
                actions: 0x1ff,
                protocol: 0x1f_ffff,
                macros: Default::default(),
            }),
        )
        .await;
        assert!(matches!(reply(&mut good).await, Reply::Negotiate(_)));

        // A peer announcing a 2 GiB frame is cut off...
        let mut bad = tokio::net::TcpStream::connect(&addr).await.unwrap();
        bad.write_all(&[0x7f, 0xff, 0xff, 0xff, b'O']).await.unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(bad.read(&mut buf).await.unwrap(), 0, "server must close the broken connection");

        // ...while the good one carries on with a whole message.
        send(&mut good, Command::Mail(vec!["<a@b.example>".into()])).await;
        send(&mut good, Command::EndOfHeaders).await;
        send(&mut good, Command::EndOfMessage(Vec::new())).await;
        assert_eq!(reply(&mut good).await, Reply::AddHeader { name: "X-T".into(), value: "1".into() });
        assert_eq!(reply(&mut good).await, Reply::Accept);

        // Shutdown closes idle sessions and returns.
        tx.send(true).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), server).await.expect("server stops").unwrap();
        assert_eq!(good.read(&mut buf).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_connection_flood_is_served_max_connections_at_a_time() {
        let listener = Listener::bind(&ListenAddress::Inet("127.0.0.1:0".into()), 0o660).await.unwrap();
        let addr = listener.local_addr().trim_start_matches("inet:").to_string();
        let (_tx, rx) = watch::channel(false);
        tokio::spawn(serve(listener, TagAll, cfg(), 4, std::time::Duration::from_secs(1), rx));
        let neg = Command::Negotiate(Negotiation {
            version: 6,
            actions: 0x1ff,
            protocol: 0x1f_ffff,
            macros: Default::default(),
        });
        let mut conns = Vec::new();
        for _ in 0..40 {
            let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
            send(&mut c, neg.clone()).await;
            conns.push(c);
        }
        // Exactly 4 are being served; the rest wait in the backlog, costing us nothing.
        let mut answered = 0;
        for c in conns.iter_mut() {
            if tokio::time::timeout(std::time::Duration::from_millis(200), reply(c)).await.is_ok() {
                answered += 1;
            }
        }
        assert_eq!(answered, 4);
        // As served ones leave, waiting ones get their turn.
        conns.drain(..4);
        let mut later = 0;
        for c in conns.iter_mut().take(4) {
            if tokio::time::timeout(std::time::Duration::from_secs(2), reply(c)).await.is_ok() {
                later += 1;
            }
        }
        assert_eq!(later, 4);
    }

    #[tokio::test]
    async fn unix_socket_replaces_a_stale_socket_but_not_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap()); // stale socket left behind
        let l = Listener::bind(&ListenAddress::Unix(path.clone()), 0o600).await.unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        drop(l);
        assert!(!path.exists(), "socket removed on drop");
        std::fs::write(&path, "precious").unwrap();
        let err = Listener::bind(&ListenAddress::Unix(path.clone()), 0o600).await.err().unwrap();
        assert!(err.to_string().contains("m.sock"));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
        // A live socket (another running daemon) is left alone.
        std::fs::remove_file(&path).unwrap();
        let live = Listener::bind(&ListenAddress::Unix(path.clone()), 0o600).await.unwrap();
        let err = Listener::bind(&ListenAddress::Unix(path.clone()), 0o600).await.err().unwrap();
        let source = std::error::Error::source(&err).map(|s| s.to_string()).unwrap_or_default();
        assert!(source.contains("already running"), "{err}: {source}");
        assert!(path.exists());
        drop(live);
    }
}
