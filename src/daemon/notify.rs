//! systemd's service notification protocol (sd_notify(3)), a few lines over
//! the socket rather than a crate: one datagram per state change to the
//! socket named by `$NOTIFY_SOCKET` (a path, or `@name` in the abstract
//! namespace). Outside systemd (no variable) every call does nothing.
//!
//! The unit is `Type=notify`: systemd counts the service as started only at
//! `READY=1` (model loaded, listeners bound), so `After=mailtriage.service`
//! orders Postfix behind a filter that really answers. `STOPPING=1` starts
//! the drain; with `WatchdogSec=` the daemon pings at half the interval from
//! its runtime, so a wedged reactor is restarted.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where notifications go, read once from the environment.
#[derive(Debug, Default)]
pub struct Notifier {
    socket: Option<(UnixDatagram, String)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET` and `$WATCHDOG_USEC` (honoured only when
    /// `$WATCHDOG_PID` is unset or names this process, as sd_notify does).
    pub fn from_env() -> Notifier {
        let Some(path) = std::env::var("NOTIFY_SOCKET").ok().filter(|p| !p.is_empty()) else {
            return Notifier::default();
        };
        let socket = match UnixDatagram::unbound() {
            Ok(s) => Some((s, path)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot create the systemd notification socket; readiness is not reported");
                None
            }
        };
        let ours = std::env::var("WATCHDOG_PID").map_or(true, |p| p.trim() == std::process::id().to_string());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|u| *u > 0 && ours)
            .map(Duration::from_micros);
        Notifier { socket, watchdog }
    }

    /// Sends one notification (`KEY=value` lines).
    fn send(&self, state: &str) {
        let Some((socket, path)) = &self.socket else { return };
        let sent = match path.strip_prefix('@') {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                    .and_then(|a| socket.send_to_addr(state.as_bytes(), &a))
            }
            None => socket.send_to(state.as_bytes(), path),
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, socket = %path, "systemd notification not sent");
        }
    }

    /// The service is up: configuration and model loaded, listeners bound.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}\nMAINPID={}\n", std::process::id()));
    }

    /// The drain has begun (SIGTERM).
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=draining: finishing messages in flight\n");
    }

    /// A one-line status shown by `systemctl status`.
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}\n"));
    }

    /// Pings the watchdog at half its interval for as long as the runtime
    /// runs; nothing when no watchdog is configured.
    pub fn spawn_watchdog(self: &std::sync::Arc<Self>) {
        let Some(interval) = self.watchdog else { return };
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval / 2);
            loop {
                tick.tick().await;
                me.send("WATCHDOG=1\n");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_reach_a_path_socket_and_nothing_breaks_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n =
            Notifier { socket: Some((UnixDatagram::unbound().unwrap(), path.display().to_string())), watchdog: None };
        n.ready("milter inet:127.0.0.1:8890");
        n.stopping();
        let mut buf = [0u8; 512];
        let got = |buf: &mut [u8]| {
            let len = listener.recv(buf).unwrap();
            String::from_utf8_lossy(&buf[..len]).into_owned()
        };
        let ready = got(&mut buf);
        assert!(ready.starts_with("READY=1\nSTATUS=milter inet:127.0.0.1:8890\nMAINPID="), "{ready}");
        assert!(got(&mut buf).starts_with("STOPPING=1\n"));
        // Outside systemd: silently nothing.
        Notifier::default().ready("x");
    }

    #[test]
    fn abstract_socket_names_start_with_an_at_sign() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("mailtriage-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier { socket: Some((UnixDatagram::unbound().unwrap(), format!("@{name}"))), watchdog: None };
        n.status("warming up");
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STATUS=warming up\n");
    }
}
