//! The milter listener: one [`Session`] per MTA connection, on the shared
//! accept loop of [`crate::frontdoor::net`].

use tokio::sync::watch;

use super::session::{Session, SessionConfig, SessionEnd};
use crate::frontdoor::net::{self, Listener, QuickAck, Stream};
use crate::frontdoor::{Filter, Live};

/// Serves milter connections until `shutdown`, then drains them for `grace`.
pub async fn serve<F: Filter + Clone>(
    listener: Listener,
    filter: F,
    cfg: Live<SessionConfig>,
    max_connections: usize,
    grace: std::time::Duration,
    shutdown: watch::Receiver<bool>,
) {
    net::serve(listener, "milter", max_connections, grace, shutdown, move |stream, peer, rx| {
        // A connection keeps the settings it started with (reloads apply to new ones).
        let (filter, cfg) = (filter.clone(), cfg.current());
        async move {
            let result = match stream {
                Stream::Tcp(s) => {
                    let _ = s.set_nodelay(true);
                    Session::new(&filter, &cfg).run(QuickAck(s), rx).await
                }
                Stream::Unix(s) => Session::new(&filter, &cfg).run(s, rx).await,
            };
            match result {
                Ok(SessionEnd::Quit) => tracing::debug!(%peer, "milter connection closed"),
                Ok(SessionEnd::Shutdown) => tracing::debug!(%peer, "milter connection closed for shutdown"),
                Err(e) => {
                    let error = crate::redact::redact(&e.to_string()).into_owned();
                    tracing::warn!(%peer, error, "milter connection dropped")
                }
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::act::Plan;
    use crate::frontdoor::net::Listener;
    use crate::frontdoor::{FilterError, MessageInput};
    use crate::milter::codec::{self, Command, Negotiation, Reply};
    use crate::settings::ListenAddress;

    #[derive(Clone)]
    struct TagAll;

    impl Filter for TagAll {
        async fn filter(&self, _msg: MessageInput) -> Result<Plan, FilterError> {
            Ok(Plan { changes: vec![crate::act::Change::AddHeader { name: "X-T".into(), value: "1".into() }] })
        }
    }

    fn cfg() -> SessionConfig {
        let d = std::time::Duration::from_secs(5);
        SessionConfig {
            max_frame_bytes: 1 << 20,
            max_message_bytes: 1 << 20,
            max_recipients: 10,
            idle_timeout: d,
            decision: crate::frontdoor::decide::DecisionSettings {
                timeout: d,
                keepalive: d,
                on_error: crate::settings::OnError::Accept,
            },
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
        let server = tokio::spawn(serve(listener, TagAll, Live::new(cfg()), 4, std::time::Duration::from_secs(5), rx));

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
        tokio::spawn(serve(listener, TagAll, Live::new(cfg()), 4, std::time::Duration::from_secs(1), rx));
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
}
