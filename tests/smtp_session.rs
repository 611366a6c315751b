//! The SMTP/LMTP session against a scripted client on an in-memory pipe
//! and the fake next hop of `mailtriage::fuzz::hop`: replies, pipelining,
//! rerouting by restarting the hop's transaction, XFORWARD, LMTP's
//! per-recipient answers, bad input, a dead hop, timeouts and shutdown.
//! Postfix and Dovecot as real peers are in tests/smtp.rs.
//!
//! The fake hop is built with the `fuzzing` feature (scripts/test.sh
//! passes it); without it this file says so and fails.

#[cfg(not(feature = "fuzzing"))]
#[test]
fn needs_the_fuzzing_feature() {
    panic!(
        "the SMTP session tests use mailtriage::fuzz::hop: run with `--features fuzzing` (scripts/test.sh passes it)"
    );
}

#[cfg(feature = "fuzzing")]
mod session {
    use std::sync::Arc;
    use std::time::Duration;

    use mailtriage::act::Plan;
    use mailtriage::frontdoor::budget::ByteBudget;
    use mailtriage::frontdoor::{Filter, FilterError, MessageInput};
    use mailtriage::fuzz::hop::FakeHop;
    use mailtriage::learn::filter::layer::FeedbackLayer;
    use mailtriage::pipeline::Triage;
    use mailtriage::settings::{Config, ListenAddress, NextHop, OnError};
    use mailtriage::smtp::relay::RelaySettings;
    use mailtriage::smtp::session::{Session, SmtpSettings};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream};
    use tokio::net::TcpListener;
    use tokio::sync::watch;

    async fn fake_hop(lmtp: bool) -> FakeHop {
        FakeHop::start(&ListenAddress::Inet("127.0.0.1:0".into()), lmtp).await.unwrap()
    }

    fn settings(lmtp: bool, hop: &str, extra: &str) -> (SmtpSettings, Arc<FeedbackLayer>) {
        let scheme = if lmtp { "lmtp" } else { "smtp" };
        let hop = if hop.starts_with('/') { format!("unix:{hop}") } else { format!("//{hop}") };
        let cfg = Config::from_toml(
            &format!(
                r#"
    [server]
    smtp = "127.0.0.1:0"
    smtp_timeout = "2s"
    hostname = "filter.test"
    {extra}
    [limits]
    max_recipients = 3
    max_smtp_message_bytes = 2000
    [relay]
    next_hop = "{scheme}:{hop}"
    timeout = "2s"
    [[departments]]
    name = "billing"
    mailbox = "billing@example.com"
    action = "reroute"
    [[rules]]
    name = "invoices"
    header = "Subject"
    pattern = "(?i)invoice"
    department = "billing"
    "#
            ),
            "t",
        )
        .unwrap();
        let relay = RelaySettings::from_config(&cfg).unwrap().unwrap();
        let s = SmtpSettings::new(&cfg, lmtp, None, ByteBudget::new(1 << 20), relay);
        (s, Arc::new(FeedbackLayer::new(Triage::new(&cfg).unwrap(), &cfg, None)))
    }

    /// Starts a session on an in-memory pipe; returns the client's end.
    fn start(s: SmtpSettings, t: Arc<FeedbackLayer>) -> (BufReader<DuplexStream>, watch::Sender<bool>) {
        start_from(s, t, "test")
    }

    /// A session whose client is `peer` (`IP:PORT` for TCP, else a socket path).
    fn start_from(
        s: SmtpSettings,
        t: Arc<FeedbackLayer>,
        peer: &str,
    ) -> (BufReader<DuplexStream>, watch::Sender<bool>) {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (tx, rx) = watch::channel(false);
        let peer = peer.to_string();
        tokio::spawn(async move {
            let _ = Session::new(&t, &s, Box::new(server), peer).run(rx).await;
        });
        (BufReader::new(client), tx)
    }

    /// Reads one (possibly multi-line) reply.
    async fn reply(c: &mut BufReader<DuplexStream>) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if c.read_line(&mut line).await.unwrap() == 0 {
                return all;
            }
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    async fn say(c: &mut BufReader<DuplexStream>, line: &str) -> String {
        c.get_mut().write_all(format!("{line}\r\n").as_bytes()).await.unwrap();
        reply(c).await
    }

    /// MAIL, one RCPT and DATA, each expected to succeed; returns the reply
    /// to the message (`message` is sent with the terminating dot line).
    async fn transaction(c: &mut BufReader<DuplexStream>, from: &str, to: &str, message: &str) -> String {
        assert!(say(c, &format!("MAIL FROM:<{from}>")).await.starts_with("250"), "MAIL FROM:<{from}>");
        assert!(say(c, &format!("RCPT TO:<{to}>")).await.starts_with("250"), "RCPT TO:<{to}>");
        assert!(say(c, "DATA").await.starts_with("354"));
        say(c, &format!("{message}\r\n.")).await
    }

    #[tokio::test]
    async fn smtp_relays_decided_messages_and_reroutes_by_restarting_the_hop_transaction() {
        let hop = fake_hop(false).await;
        let (s, t) = settings(false, &hop.address, "");
        let (mut c, _stop) = start(s, t);
        assert!(reply(&mut c).await.starts_with("220 filter.test ESMTP"));
        let caps = say(&mut c, "EHLO client.test").await;
        for cap in ["PIPELINING", "SIZE 2000", "8BITMIME", "ENHANCEDSTATUSCODES"] {
            assert!(caps.contains(cap), "{caps}");
        }
        assert!(!caps.contains("STARTTLS"), "no certificate, no STARTTLS: {caps}");
        assert!(say(&mut c, "MAIL FROM:<a@x.test>").await.starts_with("250"));
        assert!(say(&mut c, "RCPT TO:<u@y.test>").await.starts_with("250"));
        assert!(say(&mut c, "RCPT TO:<unknown@y.test>").await.starts_with("550 5.1.1"), "hop's refusal passed back");
        assert!(say(&mut c, "DATA").await.starts_with("354"));
        let r = say(&mut c, "Subject: invoice 7\r\nX-Triage-Department: ceo\r\n\r\n..dotted\r\nbody\r\n.").await;
        assert!(r.starts_with("250 2.0.0 queued"), "{r}");
        // Pipelined: a tag-only message on the same connection.
        c.get_mut()
            .write_all(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<u@y.test>\r\nRCPT TO:<v@y.test>\r\nDATA\r\n")
            .await
            .unwrap();
        for want in ["250", "250", "250", "354"] {
            assert!(reply(&mut c).await.starts_with(want));
        }
        assert!(say(&mut c, "Subject: hello\r\n\r\nhi\r\n.").await.starts_with("250"));
        assert!(say(&mut c, "QUIT").await.starts_with("221"));
        let got = hop.deliveries();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].rcpts, ["billing@example.com"], "rerouted: only the department mailbox");
        assert!(got[0].message.contains("X-Triage-Department: billing\n"), "{}", got[0].message);
        assert!(!got[0].message.contains("ceo"), "inbound X-Triage header removed");
        assert!(got[0].message.contains("\n.dotted\n"), "dot-stuffing round trip");
        assert_eq!(got[1].rcpts, ["u@y.test", "v@y.test"]);
        assert!(got[1].message.contains("X-Triage-Department: general"));
    }

    /// A filter that never answers in time.
    struct Stalled;

    impl Filter for Stalled {
        async fn filter(&self, _msg: MessageInput) -> Result<Plan, FilterError> {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            unreachable!("the session stops waiting first")
        }
    }

    #[tokio::test]
    async fn a_decision_timeout_is_counted_and_the_message_goes_through_unrouted() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Current-thread runtime: the session task records on this thread.
        let _local = metrics::set_default_local_recorder(&recorder);
        let hop = fake_hop(false).await;
        let (mut s, _) = settings(false, &hop.address, "decision_timeout = \"300ms\"");
        assert_eq!(s.decision.timeout, Duration::from_millis(300));
        let (client, server) = tokio::io::duplex(1 << 16);
        let (_stop, rx) = watch::channel(false);
        s.decision.on_error = OnError::Accept;
        tokio::spawn(async move {
            let _ = Session::new(&Stalled, &s, Box::new(server), "test".into()).run(rx).await;
        });
        let mut c = BufReader::new(client);
        assert!(reply(&mut c).await.starts_with("220"));
        assert!(say(&mut c, "EHLO client.test").await.starts_with("250"));
        let r =
            transaction(&mut c, "a@x.test", "u@y.test", "Subject: invoice\r\nX-Triage-Source: forged\r\n\r\nhi").await;
        assert!(r.starts_with("250"), "on_error = accept relays the message: {r}");
        let got = hop.deliveries();
        assert_eq!(got.len(), 1);
        assert!(!got[0].message.contains("forged"), "inbound X-Triage headers still removed: {}", got[0].message);
        let text = handle.render();
        assert!(
            text.lines().any(|l| l.starts_with(mailtriage::record::metrics::name::FAILED_OPEN)
                && l.contains("reason=\"timeout\"")
                && l.contains("front=\"smtp\"")
                && l.ends_with(" 1")),
            "{text}"
        );
    }

    #[tokio::test]
    async fn xforward_from_a_trusted_client_reaches_the_hop_before_every_mail() {
        let hop = fake_hop(false).await;
        let (s, t) = settings(false, &hop.address, "");
        let (mut c, _stop) = start_from(s, t, "127.0.0.1:40000");
        reply(&mut c).await;
        assert!(say(&mut c, "XFORWARD ADDR=192.0.2.7").await.starts_with("503"), "before EHLO");
        let caps = say(&mut c, "EHLO postfix.test").await;
        assert!(caps.contains("250 XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE\r\n"), "{caps}");
        // Postfix splits the attributes over two commands; pipelined with MAIL.
        c.get_mut()
                .write_all(b"XFORWARD NAME=client.example ADDR=192.0.2.7 PORT=5000\r\nxforward HELO=client.example PROTO=ESMTP\r\n")
                .await
                .unwrap();
        assert!(reply(&mut c).await.starts_with("250 2.0.0"));
        assert!(reply(&mut c).await.starts_with("250 2.0.0"));
        assert!(say(&mut c, "XFORWARD COLOUR=red").await.starts_with("501 5.5.4"));
        // A command split over two reads is still one XFORWARD.
        c.get_mut().write_all(b"XFORW").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(say(&mut c, "ARD IDENT=Q1").await.starts_with("250 2.0.0"));
        assert!(say(&mut c, "MAIL FROM:<a@x.test>").await.starts_with("250"));
        assert!(say(&mut c, "XFORWARD NAME=late.example").await.starts_with("503"), "inside a transaction");
        assert!(say(&mut c, "RCPT TO:<u@y.test>").await.starts_with("250"));
        assert!(say(&mut c, "DATA").await.starts_with("354"));
        // Rerouted: the hop's transaction is restarted, XFORWARD said again.
        assert!(say(&mut c, "Subject: invoice 9\r\n\r\nbody\r\n.").await.starts_with("250"));
        // The next transaction starts without them.
        assert!(transaction(&mut c, "b@x.test", "u@y.test", "Subject: hello\r\n\r\nhi").await.starts_with("250"));
        say(&mut c, "QUIT").await;
        let got = hop.deliveries();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].rcpts, ["billing@example.com"]);
        assert!(
            got[0].message.starts_with("XFORWARD NAME=client.example ADDR=192.0.2.7 HELO=client.example\n"),
            "only what the hop announced, after the restart: {}",
            got[0].message
        );
        assert!(!got[1].message.contains("XFORWARD"), "attributes last one transaction: {}", got[1].message);
    }

    #[tokio::test]
    async fn a_hop_that_refuses_xforward_still_gets_the_mail_and_is_not_asked_again() {
        let hop = fake_hop(false).await;
        let (s, t) = settings(false, &hop.address, "");
        let (mut c, _stop) = start_from(s, t, "127.0.0.1:40000");
        reply(&mut c).await;
        say(&mut c, "EHLO postfix.test").await;
        for _ in 0..2 {
            assert!(say(&mut c, "XFORWARD NAME=refused.example ADDR=192.0.2.7").await.starts_with("250"));
            assert!(transaction(&mut c, "a@x.test", "u@y.test", "Subject: hello\r\n\r\nhi").await.starts_with("250"));
        }
        say(&mut c, "QUIT").await;
        let got = hop.deliveries();
        assert_eq!(got.len(), 2, "both delivered despite the refusal");
        assert!(
            got[0].message.starts_with("REFUSED XFORWARD NAME=refused.example ADDR=192.0.2.7\n"),
            "{}",
            got[0].message
        );
        assert!(!got[1].message.contains("XFORWARD"), "not asked again on this connection: {}", got[1].message);
    }

    #[tokio::test]
    async fn xforward_from_an_untrusted_client_is_refused_and_not_offered() {
        let hop = fake_hop(false).await;
        let (s, t) = settings(false, &hop.address, "xforward_hosts = [\"10.0.0.0/8\"]");
        let (mut c, _stop) = start_from(s, t, "192.0.2.1:25000");
        reply(&mut c).await;
        let caps = say(&mut c, "EHLO elsewhere.test").await;
        assert!(!caps.contains("XFORWARD"), "{caps}");
        assert!(say(&mut c, "XFORWARD NAME=spoofed.example").await.starts_with("550 5.7.0"));
        assert!(transaction(&mut c, "a@x.test", "u@y.test", "Subject: hello\r\n\r\nhi").await.starts_with("250"));
        say(&mut c, "QUIT").await;
        assert!(!hop.deliveries()[0].message.contains("XFORWARD"));
    }

    #[tokio::test]
    async fn feedback_mail_is_accepted_and_relayed_to_nobody() {
        let hop = fake_hop(false).await;
        let (s, t) = settings(
            false,
            &hop.address,
            "[feedback]\nstore = \"sqlite:///nonexistent/unused.db\"\naddress = \"fb@example.com\"\n",
        );
        let (mut c, _stop) = start(s, t);
        reply(&mut c).await;
        say(&mut c, "EHLO client.test").await;
        assert!(transaction(
            &mut c,
            "agent@x.test",
            "fb+billing@example.com",
            "Subject: Fwd: refund\r\n\r\nplease refund"
        )
        .await
        .starts_with("250"));
        // The hop transaction was reset: the next message goes through normally.
        assert!(transaction(&mut c, "a@x.test", "u@y.test", "Subject: hello\r\n\r\nhi").await.starts_with("250"));
        let got = hop.deliveries();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].rcpts, ["u@y.test"]);
    }

    #[tokio::test]
    async fn lmtp_answers_each_recipient_with_the_hop_answer_for_it() {
        let hop = fake_hop(true).await;
        let (s, t) = settings(true, &hop.address, "");
        let (mut c, _stop) = start(s, t);
        assert!(reply(&mut c).await.contains("LMTP"));
        assert!(say(&mut c, "EHLO x").await.starts_with("500"), "LMTP wants LHLO");
        assert!(say(&mut c, "LHLO client.test").await.starts_with("250"));
        assert!(say(&mut c, "MAIL FROM:<a@x.test>").await.starts_with("250"));
        for (to, want) in [("a@y.test", "250"), ("unknown@y.test", "550"), ("full@y.test", "250"), ("b@y.test", "250")]
        {
            assert!(say(&mut c, &format!("RCPT TO:<{to}>")).await.starts_with(want), "{to}");
        }
        assert!(say(&mut c, "DATA").await.starts_with("354"));
        c.get_mut().write_all(b"Subject: hi\r\n\r\nbody\r\n.\r\n").await.unwrap();
        let replies = [reply(&mut c).await, reply(&mut c).await, reply(&mut c).await];
        assert!(replies[0].starts_with("250"), "{replies:?}");
        assert!(replies[1].starts_with("452 4.2.2"), "{replies:?}");
        assert!(replies[2].starts_with("250"), "{replies:?}");
        assert_eq!(hop.deliveries()[0].rcpts, ["a@y.test", "b@y.test"]);
    }

    #[tokio::test]
    async fn the_next_hop_may_be_a_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lmtp.sock");
        let hop = FakeHop::start(&ListenAddress::Unix(path.clone()), true).await.unwrap();
        let (s, t) = settings(true, path.to_str().unwrap(), "");
        let (mut c, _stop) = start(s, t);
        reply(&mut c).await;
        assert!(say(&mut c, "LHLO client.test").await.starts_with("250"));
        assert!(transaction(&mut c, "a@x.test", "a@y.test", "Subject: hi\r\n\r\nbody").await.starts_with("250"));
        assert_eq!(hop.deliveries()[0].rcpts, ["a@y.test"]);
    }

    #[tokio::test]
    async fn bad_input_gets_proper_replies() {
        let hop = fake_hop(false).await;
        let (s, t) = settings(false, &hop.address, "");
        let (mut c, _stop) = start(s, t);
        reply(&mut c).await;
        assert!(say(&mut c, "MAIL FROM:<a@x.test>").await.starts_with("503"), "MAIL before EHLO");
        assert!(say(&mut c, "LHLO x").await.starts_with("500"));
        assert!(say(&mut c, "EHLO client.test").await.starts_with("250"));
        assert!(say(&mut c, "RCPT TO:<u@y.test>").await.starts_with("503"), "RCPT before MAIL");
        assert!(say(&mut c, "DATA").await.starts_with("503"), "DATA before MAIL");
        assert!(say(&mut c, "FROB").await.starts_with("500"));
        let r = say(&mut c, &format!("NOOP {}", "x".repeat(5000))).await;
        assert!(r.starts_with("500 5.5.2 line too long"), "{r}");
        assert!(say(&mut c, "MAIL FROM:<a@x.test> SIZE=999999").await.starts_with("552"));
        assert!(say(&mut c, "MAIL FROM:<a@x.test>").await.starts_with("250"));
        assert!(say(&mut c, "MAIL FROM:<a@x.test>").await.starts_with("503"), "nested MAIL");
        assert!(say(&mut c, "DATA").await.starts_with("554"), "no recipients yet");
        for i in 0..3 {
            assert!(say(&mut c, &format!("RCPT TO:<u{i}@y.test>")).await.starts_with("250"));
        }
        assert!(say(&mut c, "RCPT TO:<u9@y.test>").await.starts_with("452 4.5.3"));
        assert!(say(&mut c, "DATA").await.starts_with("354"));
        let big = format!("Subject: x\r\n\r\n{}\r\n.", "y".repeat(3000));
        assert!(say(&mut c, &big).await.starts_with("552 5.3.4"));
        assert!(say(&mut c, "MAIL FROM:<a@x.test>").await.starts_with("250"), "the session goes on");
        assert!(say(&mut c, "RCPT TO:<u@y.test>").await.starts_with("250"));
        assert!(say(&mut c, "DATA").await.starts_with("354"));
        assert!(say(&mut c, "Subject: x\r\n\nsmuggled\n.\r\n.").await.starts_with("550 5.6.0"));
        assert!(say(&mut c, "RSET").await.starts_with("250"));
        assert!(hop.deliveries().is_empty(), "nothing refused was relayed");
    }

    #[tokio::test]
    async fn a_dead_next_hop_is_a_temporary_failure() {
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().to_string();
        let (s, t) = settings(false, &closed, "");
        let (mut c, _stop) = start(s, t);
        reply(&mut c).await;
        say(&mut c, "EHLO client.test").await;
        let r = say(&mut c, "MAIL FROM:<a@x.test>").await;
        assert!(r.starts_with("451 4.4.1"), "{r}");
    }

    #[tokio::test]
    async fn a_silent_client_is_told_421_and_shutdown_waits_for_no_transaction() {
        let hop = fake_hop(false).await;
        let (s, t) = settings(false, &hop.address, "");
        let (mut c, stop) = start(s.clone(), t.clone());
        reply(&mut c).await;
        let r = tokio::time::timeout(Duration::from_secs(5), reply(&mut c)).await.unwrap();
        assert!(r.starts_with("421 4.4.2"), "{r}");
        let (mut c, stop2) = start(s, t);
        drop(stop);
        reply(&mut c).await;
        say(&mut c, "EHLO client.test").await;
        stop2.send(true).unwrap();
        assert!(reply(&mut c).await.starts_with("421 4.3.2"));
    }

    #[test]
    fn a_next_hop_reads_back_as_written() {
        let hop: NextHop = "lmtp://127.0.0.1:24".parse().unwrap();
        assert_eq!(hop.to_string(), "lmtp://127.0.0.1:24");
    }
}
