//! Black-box tests of the SMTP/LMTP content-filter front door against real
//! peers on loopback: Postfix with `content_filter` and a reinjection
//! listener, Dovecot LMTP as the next hop, swaks over STARTTLS, and a next
//! hop that is down and comes back.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{config, free_port, header_values, mail, send, wait_for_port, Client, Daemon, Dovecot, Postfix, DOMAIN};

/// The shared test config with an SMTP or LMTP listener on `port` relaying to `next_hop`.
fn filter_config(listener: &str, port: u16, next_hop: &str, server_extra: &str) -> String {
    config("enforce").replacen(
        "[server]",
        &format!("[server]\n{listener} = \"127.0.0.1:{port}\"\nhostname = \"filter.{DOMAIN}\"\n{server_extra}"),
        1,
    ) + &format!("\n[relay]\nnext_hop = \"{next_hop}\"\nquarantine_mailbox = \"quarantine@{DOMAIN}\"\n")
}

fn start_filter(config: &str, port: u16) -> Daemon {
    let d = Daemon::start(config, false);
    assert!(wait_for_port(port, Duration::from_secs(20)), "filter port not listening; log:\n{}", d.log());
    d
}

/// Postfix whose mail all passes through the filter on `filter_port` and
/// comes back on `reinject` (the listener is added only when `reinject_up`).
fn postfix_with_content_filter(filter_port: u16, reinject: u16, reinject_up: bool) -> Postfix {
    let pf = Postfix::start(None, "accept", &[&format!("content_filter = scan:[127.0.0.1]:{filter_port}")]);
    pf.add_scan_transport();
    if reinject_up {
        pf.add_reinjection_listener(reinject);
    }
    pf.reload();
    if reinject_up {
        assert!(wait_for_port(reinject, Duration::from_secs(30)), "reinjection listener not up:\n{}", pf.log());
    }
    pf
}

fn one(values: Vec<String>, what: &str) -> String {
    assert_eq!(values.len(), 1, "{what}: expected exactly one, got {values:?}");
    values.into_iter().next().unwrap()
}

#[test]
fn postfix_content_filter_tags_routes_and_reinjects() {
    let (port, reinject) = (free_port(), free_port());
    let daemon = start_filter(&filter_config("smtp", port, &format!("smtp://127.0.0.1:{reinject}"), ""), port);
    let pf = postfix_with_content_filter(port, reinject, true);

    let spoofed = mail("Lunch on Friday?", "X-Triage-Department: billing\nX-Triage-Action: reroute", "Pizza?");
    let codes = send(
        pf.smtp_port,
        &[
            mail("Your invoice 2024-17", "", "Please pay by Friday.\n.leading dot line"),
            spoofed,
            mail("Request for a quote", "", "100 licences please"),
            mail("Phishing attempt reported", "", "see attached"),
        ],
    )
    .unwrap();
    assert_eq!(codes, vec![250; 4]);
    // invoice → billing; lunch → user; quote → user + sales (copy); phishing → quarantine mailbox.
    let delivered = pf.wait_delivered(5, Duration::from_secs(60));
    let ctx = || format!("postfix log:\n{}\ndaemon log:\n{}", pf.log(), daemon.log());
    assert_eq!(delivered.len(), 5, "{delivered:#?}\n{}", ctx());

    let billing = pf.mailbox("billing");
    assert_eq!(billing.len(), 1, "{}", ctx());
    assert_eq!(one(header_values(&billing[0], "X-Triage-Department"), "department"), "billing");
    assert_eq!(one(header_values(&billing[0], "X-Triage-Source"), "source"), "rule:invoices");
    assert!(billing[0].contains("\n.leading dot line"), "dot-stuffing survived both hops");
    // XFORWARD: the reinjection listener logs each message with the original
    // client and the first queue's id, not as mail from the filter.
    let log = pf.log();
    let reinjected: Vec<&str> =
        log.lines().filter(|l| l.contains("postfix-reinject/smtpd") && l.contains(": client=")).collect();
    assert!(reinjected.len() >= 4, "{}", ctx());
    assert!(
        reinjected.iter().all(|l| l.contains("orig_queue_id=") && l.contains("orig_client=unknown[127.0.0.1]")),
        "{reinjected:#?}"
    );
    let user = pf.mailbox("user");
    assert_eq!(user.len(), 2, "{}", ctx());
    assert!(!user.iter().any(|m| m.contains("Subject: Your invoice")), "rerouted mail reached the original recipient");
    let lunch = user.iter().find(|m| m.contains("Subject: Lunch")).unwrap();
    assert_eq!(one(header_values(lunch, "X-Triage-Department"), "department"), "general");
    assert_eq!(one(header_values(lunch, "X-Triage-Action"), "action"), "tag");
    assert_eq!(pf.mailbox("sales").len(), 1, "copy to sales");
    // The quarantine mailbox is not a listed one: Postfix files it under other/.
    let held = pf.mailbox("other");
    assert_eq!(held.len(), 1, "{}", ctx());
    assert_eq!(one(header_values(&held[0], "X-Triage-Action"), "action"), "quarantine");
    // Every message went through the filter and back in.
    assert_eq!(pf.log().matches("relay=127.0.0.1[127.0.0.1]:").count(), 4, "{}", ctx());
    assert!(pf.log().contains("postfix-reinject/smtpd"), "{}", ctx());
}

#[test]
fn dovecot_lmtp_next_hop_answers_each_recipient() {
    let dovecot = Dovecot::start(&["alice", "bob"]);
    let port = free_port();
    let daemon = start_filter(&filter_config("lmtp", port, &format!("lmtp://127.0.0.1:{}", dovecot.port), ""), port);
    let ctx = || format!("dovecot log:\n{}\ndaemon log:\n{}", dovecot.log(), daemon.log());

    let (mut c, greeting) = Client::connect(port);
    assert_eq!(greeting, 220);
    assert_eq!(c.cmd(&format!("LHLO client.{DOMAIN}")).0, 250);
    assert_eq!(c.cmd(&format!("MAIL FROM:<bench@{DOMAIN}>")).0, 250);
    assert_eq!(c.cmd(&format!("RCPT TO:<alice@{DOMAIN}>")).0, 250, "{}", ctx());
    let (code, text) = c.cmd(&format!("RCPT TO:<carol@{DOMAIN}>"));
    assert_eq!(code, 550, "Dovecot's refusal of an unknown user, passed back: {text}");
    assert!(text.contains("5.1.1"), "{text}");
    assert_eq!(c.cmd(&format!("RCPT TO:<bob@{DOMAIN}>")).0, 250);
    assert_eq!(c.cmd("DATA").0, 354);
    c.send_data("Subject: Request for a quote\nMessage-ID: <q1@test.example>\n\nten seats\n");
    // LMTP: one reply per accepted recipient (alice, bob).
    let replies = [c.reply(), c.reply()];
    assert!(replies.iter().all(|(code, _)| *code == 250), "{replies:?}\n{}", ctx());
    assert_eq!(c.cmd("QUIT").0, 221);

    for user in ["alice", "bob"] {
        let got = dovecot.mailbox(user);
        assert_eq!(got.len(), 1, "{user}: delivered exactly once\n{}", ctx());
        assert_eq!(one(header_values(&got[0], "X-Triage-Department"), "department"), "sales");
    }
    assert!(dovecot.mailbox("carol").is_empty());
    // `copy` adds sales@, which this Dovecot does not know: the refused copy
    // is dropped (and logged), the original recipients still get the message.
    assert!(daemon.log().contains("refused the department copy"), "{}", ctx());
    assert!(dovecot.mailbox("sales").is_empty());
}

/// Through Postfix's content_filter and back: the per-recipient reroute of
/// `[scope] recipients`, and an authenticated submission (recognised by the
/// `with ESMTPA` Postfix writes, since XFORWARD does not carry it) skipped.
#[test]
fn content_filter_reroutes_per_recipient_and_skips_authenticated_submissions() {
    let dovecot = Dovecot::start_sasl(&["alice"]); // dropped after Postfix
    let (port, reinject) = (free_port(), free_port());
    let cfg = filter_config("smtp", port, &format!("smtp://127.0.0.1:{reinject}"), "")
        + &format!("\n[scope]\nrecipients = [\"info@{DOMAIN}\", \"user@{DOMAIN}\"]\n");
    let daemon = start_filter(&cfg, port);
    let pf = postfix_with_content_filter(port, reinject, true);
    let submission = free_port();
    pf.add_submission_listener(submission, &dovecot.sasl_path());
    pf.reload();
    assert!(wait_for_port(submission, Duration::from_secs(30)), "submission listener not up:\n{}", pf.log());
    let ctx = || format!("postfix log:\n{}\ndaemon log:\n{}", pf.log(), daemon.log());

    let mut invoice = mail("Your invoice 2024-18", "", "Please pay.");
    invoice.rcpts = ["info", "user", "ceo"].iter().map(|r| format!("{r}@{DOMAIN}")).collect();
    assert_eq!(send(pf.smtp_port, &[invoice]).unwrap(), [250]);
    let out = Command::new("swaks")
        .args(["--server", &format!("127.0.0.1:{submission}"), "--from", &format!("staff@{DOMAIN}")])
        .args(["--to", &format!("user@{DOMAIN}"), "--header", "Subject: Your invoice, as promised"])
        .args(["--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "secret"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));

    let delivered = pf.wait_delivered(3, Duration::from_secs(60));
    assert_eq!(delivered.len(), 3, "{delivered:#?}\n{}", ctx());
    let billing = pf.mailbox("billing");
    assert_eq!(billing.len(), 1, "the department gets it once\n{}", ctx());
    assert_eq!(
        header_values(&billing[0], "X-Triage-Original-Recipient"),
        [format!("info@{DOMAIN}"), format!("user@{DOMAIN}")]
    );
    assert_eq!(pf.mailbox("ceo").len(), 1, "the recipient out of scope keeps it\n{}", ctx());
    assert!(pf.mailbox("info").is_empty());
    let user = pf.mailbox("user");
    assert_eq!(user.len(), 1, "{}", ctx());
    assert!(user[0].contains("as promised") && user[0].contains("with ESMTPA"), "{}", user[0]);
    assert!(!user[0].contains("X-Triage-"), "authenticated mail is not triaged:\n{}", user[0]);
}

/// LMTP into Dovecot: a reroute replaces only the in-scope recipient, and
/// each client recipient hears the reply Dovecot gave for the mailbox its
/// message went to.
#[test]
fn lmtp_reroute_of_one_recipient_gets_each_recipient_dovecots_own_reply() {
    let dovecot = Dovecot::start(&["alice", "bob", "billing"]);
    let port = free_port();
    let cfg = filter_config("lmtp", port, &format!("lmtp://127.0.0.1:{}", dovecot.port), "")
        + &format!("\n[scope]\nrecipients = [\"alice@{DOMAIN}\"]\n");
    let daemon = start_filter(&cfg, port);
    let ctx = || format!("dovecot log:\n{}\ndaemon log:\n{}", dovecot.log(), daemon.log());

    let (mut c, _) = Client::connect(port);
    assert_eq!(c.cmd(&format!("LHLO client.{DOMAIN}")).0, 250);
    assert_eq!(c.cmd(&format!("MAIL FROM:<customer@{DOMAIN}>")).0, 250);
    assert_eq!(c.cmd(&format!("RCPT TO:<alice@{DOMAIN}>")).0, 250, "{}", ctx());
    assert_eq!(c.cmd(&format!("RCPT TO:<bob@{DOMAIN}>")).0, 250, "{}", ctx());
    assert_eq!(c.cmd("DATA").0, 354);
    c.send_data("Subject: Your invoice 7\nMessage-ID: <i7@test.example>\n\nplease pay\n");
    let (alice, bob) = (c.reply(), c.reply());
    assert_eq!(c.cmd("QUIT").0, 221);
    // Dovecot names the mailbox it saved to: alice's message went to billing.
    assert_eq!(alice.0, 250, "{alice:?}\n{}", ctx());
    assert!(alice.1.contains(&format!("<billing@{DOMAIN}>")), "{alice:?}");
    assert_eq!(bob.0, 250, "{bob:?}");
    assert!(bob.1.contains(&format!("<bob@{DOMAIN}>")), "{bob:?}");
    let billing = dovecot.mailbox("billing");
    assert_eq!(billing.len(), 1, "{}", ctx());
    assert_eq!(header_values(&billing[0], "X-Triage-Original-Recipient"), [format!("alice@{DOMAIN}")]);
    assert_eq!(dovecot.mailbox("bob").len(), 1);
    assert!(dovecot.mailbox("alice").is_empty());
}

#[test]
fn swaks_through_starttls_relayed_over_starttls_and_plaintext_refused_when_tls_is_required() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    support::require("swaks", "swaks");
    // The next hop offers STARTTLS too, and the relay requires it (`tls = "encrypt"`).
    let pf = Postfix::start(
        None,
        "accept",
        &[
            &format!("smtpd_tls_cert_file = {}", cert.display()),
            &format!("smtpd_tls_key_file = {}", key.display()),
            "smtpd_tls_security_level = may",
            "smtpd_tls_loglevel = 1",
        ],
    );
    let port = free_port();
    let tls = format!("tls_cert = \"{}\"\ntls_key = \"{}\"\nrequire_tls = true\n", cert.display(), key.display());
    let config =
        filter_config("smtp", port, &format!("smtp://127.0.0.1:{}", pf.smtp_port), &tls) + "tls = \"encrypt\"\n";
    let daemon = start_filter(&config, port);

    let (mut c, _) = Client::connect(port);
    let (code, caps) = c.cmd("EHLO client.test.example");
    assert_eq!(code, 250);
    assert!(caps.contains("STARTTLS"), "{caps}");
    assert_eq!(c.cmd(&format!("MAIL FROM:<bench@{DOMAIN}>")).0, 530, "MAIL before STARTTLS");

    let out = Command::new("swaks")
        .args(["--tls", "--server", "127.0.0.1", "--port", &port.to_string()])
        .args(["--from", &format!("bench@{DOMAIN}"), "--to", &format!("user@{DOMAIN}")])
        .args(["--ehlo", "client.test.example", "--header", "Subject: your invoice 77", "--body", "pay"])
        .output()
        .expect("swaks");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "swaks failed:\n{text}\ndaemon log:\n{}", daemon.log());
    assert!(text.contains("TLS started"), "{text}");
    let delivered = pf.wait_delivered(1, Duration::from_secs(60));
    assert_eq!(delivered.len(), 1, "{}", pf.log());
    let billing = pf.mailbox("billing");
    assert_eq!(one(header_values(&billing[0], "X-Triage-Department"), "department"), "billing");
    // Both hops were encrypted: swaks → mailtriage, and mailtriage → Postfix.
    assert!(pf.log().contains("TLS connection established from"), "{}", pf.log());
}

#[test]
fn next_hop_down_keeps_mail_queued_until_it_returns() {
    let (port, reinject) = (free_port(), free_port());
    let daemon = start_filter(&filter_config("smtp", port, &format!("smtp://127.0.0.1:{reinject}"), ""), port);
    let pf = postfix_with_content_filter(port, reinject, false);
    assert_eq!(send(pf.smtp_port, &[mail("Hello there", "", "one message")]).unwrap(), vec![250]);

    let deadline = Instant::now() + Duration::from_secs(60);
    while !(pf.log().contains("status=deferred") && pf.queue_count("deferred") == 1) {
        assert!(Instant::now() < deadline, "not deferred:\n{}\n{}", pf.log(), daemon.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(pf.log().contains("4.4.1"), "the client heard our 4xx:\n{}", pf.log());
    assert!(pf.all_delivered().is_empty());

    pf.add_reinjection_listener(reinject);
    pf.reload();
    assert!(wait_for_port(reinject, Duration::from_secs(30)));
    pf.flush();
    let delivered = pf.wait_delivered(1, Duration::from_secs(60));
    assert_eq!(delivered.len(), 1, "{}\n{}", pf.log(), daemon.log());
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(pf.all_delivered().len(), 1, "delivered exactly once");
    assert_eq!(pf.queue_count("deferred"), 0);
    assert_eq!(one(header_values(&delivered[0].1, "X-Triage-Department"), "department"), "general");
}

/// A next hop between mailtriage and Postfix's reinjection listener that
/// passes connections through, refuses them (421), or accepts and says
/// nothing (the relay times out), as the test switches it.
struct FlakyHop {
    port: u16,
    mode: std::sync::Arc<std::sync::atomic::AtomicU8>,
    /// The passed-through connections (mailtriage keeps its hop connection
    /// between messages): cut when the hop stops passing.
    live: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

const PASS: u8 = 0;
const REFUSE: u8 = 1;
const HANG: u8 = 2;

impl FlakyHop {
    fn start(upstream: u16) -> FlakyHop {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(PASS));
        let live = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (m, l) = (mode.clone(), live.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                match m.load(Ordering::SeqCst) {
                    PASS => {
                        let Ok(up) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                        l.lock().unwrap().push(conn.try_clone().unwrap());
                        let (mut a, b) = (conn.try_clone().unwrap(), up.try_clone().unwrap());
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut a, &mut &b);
                            let _ = b.shutdown(std::net::Shutdown::Write);
                        });
                        let (mut up, mut conn) = (up, conn);
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut up, &mut conn);
                            let _ = conn.shutdown(std::net::Shutdown::Both);
                        });
                    }
                    REFUSE => {
                        let mut conn = conn;
                        let _ = std::io::Write::write_all(&mut conn, b"421 4.3.2 hop busy, try later\r\n");
                    }
                    _ => {
                        std::thread::spawn(move || {
                            std::thread::sleep(Duration::from_secs(30));
                            drop(conn);
                        });
                    }
                }
            }
        });
        FlakyHop { port, mode, live }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, std::sync::atomic::Ordering::SeqCst);
        if mode != PASS {
            for c in self.live.lock().unwrap().drain(..) {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// Fault injection: 1,000 messages through Postfix's content filter while
/// the next hop refuses, then hangs, then comes back. Postfix hears a 4xx
/// for each message that could not be relayed, keeps it queued, and every
/// message is delivered exactly once in the end. The hop changes only while
/// no message is in flight (Postfix's active queue empty): cutting a relay
/// between the hop's 250 and our reading it would be SMTP's own duplicate
/// window (RFC 1047), not a defect.
#[test]
fn a_flapping_next_hop_during_a_thousand_messages_loses_and_duplicates_none() {
    let (port, reinject) = (free_port(), free_port());
    let metrics = free_port();
    let pf = postfix_with_content_filter(port, reinject, true);
    let hop = FlakyHop::start(reinject);
    let config = filter_config("smtp", port, &format!("smtp://127.0.0.1:{}", hop.port), "")
        .replace("[relay]\n", "[relay]\ntimeout = \"2s\"\n")
        + &format!("\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n");
    let daemon = start_filter(&config, port);
    let started = Instant::now();
    let idle = || {
        let deadline = Instant::now() + Duration::from_secs(120);
        while pf.queue_count("active") + pf.queue_count("incoming") > 0 {
            assert!(Instant::now() < deadline, "Postfix never went idle:\n{}", daemon.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let mut batch = 0;
    let mut send_batches = |n: usize| {
        for _ in 0..n {
            let mails: Vec<_> = (0..100).map(|i| mail(&format!("Message {batch}-{i}"), "", "flapping hop")).collect();
            let codes = send(pf.smtp_port, &mails).unwrap();
            assert!(codes.iter().all(|&c| c == 250), "{codes:?}");
            batch += 1;
        }
    };
    // Pass, refuse (421), pass, hang (accept, say nothing: the relay times out), pass.
    for (mode, batches) in [(PASS, 3), (REFUSE, 2), (PASS, 2), (HANG, 1), (PASS, 2)] {
        idle();
        hop.set(mode);
        send_batches(batches);
    }
    assert_eq!(batch, 10);
    // Deferred mail is retried at once rather than after Postfix's backoff.
    let deadline = Instant::now() + Duration::from_secs(300);
    let ids =
        || -> Vec<String> { pf.all_delivered().iter().flat_map(|(_, m)| header_values(m, "Message-ID")).collect() };
    while ids().len() < 1000 {
        assert!(Instant::now() < deadline, "{} of 1000 delivered:\n{}", ids().len(), daemon.log());
        pf.flush();
        std::thread::sleep(Duration::from_secs(2));
    }
    std::thread::sleep(Duration::from_secs(3));
    let ids = ids();
    let unique: std::collections::BTreeSet<&String> = ids.iter().collect();
    assert_eq!((ids.len(), unique.len()), (1000, 1000), "each message exactly once");
    let deferred = pf.log().matches("status=deferred").count();
    let scrape = support::http_get(metrics, "/metrics");
    let relay: Vec<&str> = scrape.lines().filter(|l| l.starts_with("mailtriage_relay_total")).collect();
    eprintln!(
        "1000 messages delivered once each in {:.1?}; Postfix deferred {deferred} deliveries to the filter; {relay:?}",
        started.elapsed()
    );
    assert!(deferred >= 300, "the refused and hung batches were not all deferred ({deferred}):\n{}", pf.log());
    assert!(relay.iter().any(|l| l.contains("hop_error")), "{relay:?}");
}
