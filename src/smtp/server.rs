//! The SMTP/LMTP listener: one [`Session`] per client, on the shared accept
//! loop of [`crate::frontdoor::net`].

use tokio::sync::watch;

use super::relay::Io;
use super::session::{Session, SessionEnd, SmtpSettings};
use crate::frontdoor::net::{self, Listener, Stream};
use crate::frontdoor::{Filter, Live};

/// Serves clients until `shutdown`, then drains them for `grace`.
pub async fn serve<F: Filter + Clone>(
    listener: Listener,
    filter: F,
    cfg: Live<SmtpSettings>,
    max_connections: usize,
    grace: std::time::Duration,
    shutdown: watch::Receiver<bool>,
) {
    let front = if cfg.current().lmtp { "lmtp" } else { "smtp" };
    net::serve(listener, front, max_connections, grace, shutdown, move |stream, peer, rx| {
        // A connection keeps the settings it started with (reloads apply to new ones).
        let (filter, cfg) = (filter.clone(), cfg.current());
        async move {
            let io: Box<dyn Io> = match stream {
                Stream::Tcp(s) => {
                    let _ = s.set_nodelay(true);
                    Box::new(s)
                }
                Stream::Unix(s) => Box::new(s),
            };
            match Session::new(&filter, &cfg, io, peer.clone()).run(rx).await {
                Ok(SessionEnd::Quit | SessionEnd::Closed) => tracing::debug!(front, %peer, "connection closed"),
                Ok(end) => tracing::info!(front, %peer, ?end, "connection closed by us"),
                Err(e) => tracing::warn!(front, %peer, error = %e, "connection dropped"),
            }
        }
    })
    .await
}
