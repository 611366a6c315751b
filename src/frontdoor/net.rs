//! Listening sockets shared by the front doors: bind a TCP or unix address,
//! accept connections up to a bound, and drain them on shutdown.
//!
//! Each front door (milter, SMTP, LMTP) passes a handler that serves one
//! connection; this module knows nothing of the protocols.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::settings::ListenAddress;

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

/// Accepts connections until `shutdown` turns true, running `handler` for
/// each on its own task, at most `max_connections` at a time; then waits up
/// to `grace` for the handlers still running (they see `shutdown` too, and
/// finish the message in flight) and aborts what is left.
///
/// `front` labels the open-connections gauge and the log lines.
pub async fn serve<H, Fut>(
    listener: Listener,
    front: &'static str,
    max_connections: usize,
    grace: Duration,
    mut shutdown: watch::Receiver<bool>,
    handler: H,
) where
    H: Fn(Stream, String, watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
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
                tracing::warn!(front, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let session = handler(stream, peer, shutdown.clone());
        sessions.spawn(async move {
            let _permit = permit;
            let open = metrics::gauge!(crate::record::metrics::name::CONNECTIONS, "front" => front);
            open.increment(1.0);
            session.await;
            open.decrement(1.0);
        });
    }
    drop(listener);
    let open = sessions.len();
    if open > 0 {
        tracing::info!(front, open, grace_s = grace.as_secs_f64(), "waiting for sessions to finish");
        if tokio::time::timeout(grace, async { while sessions.join_next().await.is_some() {} }).await.is_err() {
            tracing::warn!(front, left = sessions.len(), "grace period over; closing remaining sessions");
            sessions.abort_all();
        }
    }
}

/// An accepted connection.
pub enum Stream {
    Tcp(TcpStream),
    Unix(tokio::net::UnixStream),
}

pub async fn accept(l: &Listener) -> std::io::Result<(Stream, String)> {
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
pub struct QuickAck(pub TcpStream);

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
    use super::*;

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
