//! The milter session against a scripted MTA on an in-memory pipe:
//! negotiation, stages and no-reply flags, macros, several messages per
//! connection, bounds (body, byte budget, header flood, idle clients), the
//! decision's timeout and failure verdicts, recipient changes and shutdown.
//! Postfix and miltertest as real peers are in tests/postfix.rs and
//! tests/miltertest.rs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mailtriage::act::{Change, Plan};
use mailtriage::frontdoor::decide::DecisionSettings;
use mailtriage::frontdoor::{Filter, FilterError, MessageInput};
use mailtriage::milter::codec::{self, action, proto, CodecError, Command, MacroStage, Negotiation, Reply};
use mailtriage::milter::session::*;
use mailtriage::settings::OnError;
use tokio::io::{duplex, AsyncWriteExt, DuplexStream};
use tokio::sync::watch;

/// A filter that records what it was given and answers a fixed plan.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<MessageInput>>,
    delay: Option<Duration>,
    fail: bool,
    calls: AtomicUsize,
}

impl Filter for Recorder {
    async fn filter(&self, msg: MessageInput) -> Result<Plan, FilterError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(d) = self.delay {
            tokio::time::sleep(d).await;
        }
        if self.fail {
            return Err(FilterError::Failed("boom".into()));
        }
        let mut plan = Plan::strip_inbound(&msg.header_names);
        plan.changes.push(Change::AddHeader { name: "X-Triage-Department".into(), value: "billing".into() });
        for r in &msg.envelope.rcpts {
            plan.changes.push(Change::DeleteRecipient { address: r.clone() });
        }
        plan.changes.push(Change::AddRecipient { address: "billing@example.com".into() });
        self.seen.lock().unwrap().push(msg);
        Ok(plan)
    }
}

fn cfg() -> SessionConfig {
    SessionConfig {
        max_frame_bytes: 1 << 20,
        max_message_bytes: 1 << 20,
        max_recipients: 100,
        idle_timeout: Duration::from_secs(5),
        decision: DecisionSettings {
            timeout: Duration::from_secs(5),
            keepalive: Duration::from_secs(1),
            on_error: OnError::Accept,
        },
        budget: ByteBudget::new(1 << 30),
    }
}

/// Plays the MTA: sends commands, reads replies.
struct Mta(DuplexStream);

impl Mta {
    async fn send(&mut self, cmd: Command) {
        self.0.write_all(&codec::encode_command(&cmd)).await.unwrap();
    }
    async fn reply(&mut self) -> Reply {
        let (code, payload) = codec::read_frame(&mut self.0, 1 << 20).await.unwrap().expect("reply");
        codec::decode_reply(code, &payload).unwrap()
    }
    /// Replies up to and including the final verdict of end-of-message.
    async fn eom_replies(&mut self) -> Vec<Reply> {
        let mut out = Vec::new();
        loop {
            let r = self.reply().await;
            let done = matches!(r, Reply::Accept | Reply::Tempfail | Reply::Reject | Reply::Continue | Reply::Discard);
            out.push(r);
            if done {
                return out;
            }
        }
    }
    async fn negotiate(&mut self, actions: u32, protocol: u32) -> Negotiation {
        self.send(Command::Negotiate(Negotiation { version: 6, actions, protocol, macros: Default::default() })).await;
        match self.reply().await {
            Reply::Negotiate(n) => n,
            other => panic!("expected OPTNEG reply, got {other:?}"),
        }
    }
    /// One message as Postfix sends it when we negotiated no-reply for headers.
    async fn message(&mut self, rcpts: &[&str], headers: &[(&str, &str)], body: &[u8]) -> Vec<Reply> {
        self.send(Command::Mail(vec!["<s@example.com>".into()])).await;
        for r in rcpts {
            self.send(Command::Rcpt(vec![format!("<{r}>")])).await;
        }
        for (n, v) in headers {
            self.send(Command::Header { name: n.to_string(), value: v.to_string() }).await;
        }
        self.send(Command::EndOfHeaders).await;
        self.send(Command::Body(body.to_vec())).await;
        assert_eq!(self.reply().await, Reply::Continue, "body chunk reply");
        self.send(Command::Macros { stage: b'E', pairs: vec![("i".into(), "QID1".into())] }).await;
        self.send(Command::EndOfMessage(Vec::new())).await;
        self.eom_replies().await
    }
}

fn start(
    filter: Arc<Recorder>,
    cfg: SessionConfig,
) -> (Mta, tokio::task::JoinHandle<Result<SessionEnd, SessionError>>, watch::Sender<bool>) {
    let (a, b) = duplex(1 << 16);
    let (tx, rx) = watch::channel(false);
    let handle = tokio::spawn(async move { Session::new(&*filter, &cfg).run(b, rx).await });
    (Mta(a), handle, tx)
}

#[tokio::test]
async fn negotiates_only_what_we_use_from_postfix_offer() {
    let (mut mta, handle, _tx) = start(Arc::default(), cfg());
    let n = mta.negotiate(0x1ff, 0x1f_ffff).await;
    assert_eq!(n.version, 6);
    assert_eq!(n.actions, WANTED_ACTIONS);
    assert_eq!(n.protocol, WANTED_PROTOCOL);
    assert_eq!(n.macros.get(&MacroStage::EndOfMessage).map(String::as_str), Some("i"));
    assert_eq!(n.macros.get(&MacroStage::Connect).map(String::as_str), Some("{daemon_name} {client_addr}"));
    assert_eq!(n.macros.get(&MacroStage::Mail).map(String::as_str), Some("{auth_authen}"));
    // An older MTA that offers less gets only the intersection, and no macro list.
    let (mut old, _h, _t) = start(Arc::default(), cfg());
    old.send(Command::Negotiate(Negotiation { version: 2, actions: 0x3f, protocol: 0x7f, macros: Default::default() }))
        .await;
    let Reply::Negotiate(n) = old.reply().await else { panic!() };
    assert_eq!((n.version, n.actions, n.protocol), (2, WANTED_ACTIONS & 0x3f, WANTED_PROTOCOL & 0x7f));
    assert!(n.macros.is_empty());
    mta.send(Command::Quit).await;
    assert_eq!(handle.await.unwrap().unwrap(), SessionEnd::Quit);
}

#[tokio::test]
async fn several_messages_on_one_connection_with_abort_between() {
    let rec = Arc::new(Recorder::default());
    let (mut mta, handle, _tx) = start(rec.clone(), cfg());
    mta.negotiate(0x1ff, 0x1f_ffff).await;
    let replies =
        mta.message(&["u@example.com"], &[("Subject", "one"), ("X-Triage-Department", "ceo")], b"body one\r\n").await;
    assert_eq!(
        replies,
        vec![
            Reply::ChangeHeader { index: 1, name: "X-Triage-Department".into(), value: String::new() },
            Reply::AddHeader { name: "X-Triage-Department".into(), value: "billing".into() },
            Reply::DelRcpt("<u@example.com>".into()),
            Reply::AddRcpt("<billing@example.com>".into()),
            Reply::Accept,
        ]
    );
    // An aborted transaction leaves nothing behind.
    mta.send(Command::Mail(vec!["<x@example.com>".into()])).await;
    mta.send(Command::Rcpt(vec!["<gone@example.com>".into()])).await;
    mta.send(Command::Abort).await;
    mta.message(&["v@example.com"], &[("Subject", "two\n\tfolded")], b"body two\r\n").await;
    mta.send(Command::QuitNewConnection).await;
    mta.message(&["w@example.com"], &[("Subject", "three")], b"3").await;
    mta.send(Command::Quit).await;
    handle.await.unwrap().unwrap();
    let seen = rec.seen.lock().unwrap();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0].envelope.rcpts, vec!["u@example.com"]);
    assert_eq!(seen[0].envelope.queue_id.as_deref(), Some("QID1"));
    assert_eq!(seen[0].raw, b"Subject: one\r\nX-Triage-Department: ceo\r\n\r\nbody one\r\n");
    assert_eq!(seen[1].envelope.rcpts, vec!["v@example.com"]);
    assert_eq!(seen[1].raw, b"Subject: two\r\n\tfolded\r\n\r\nbody two\r\n");
    assert_eq!(seen[2].envelope.mail_from, "s@example.com");
}

#[tokio::test]
async fn stages_get_replies_unless_no_reply_was_negotiated() {
    let (mut mta, _h, _tx) = start(Arc::default(), cfg());
    // An MTA that offers no no-reply flags must get an answer at every stage.
    mta.negotiate(0x1ff, 0).await;
    mta.send(Command::Connect { hostname: "h".into(), address: codec::ConnectAddress::Unknown }).await;
    assert_eq!(mta.reply().await, Reply::Continue);
    mta.send(Command::Helo("h".into())).await;
    assert_eq!(mta.reply().await, Reply::Continue);
    mta.send(Command::Mail(vec!["<a@b.example>".into(), "SIZE=10".into()])).await;
    assert_eq!(mta.reply().await, Reply::Continue);
    mta.send(Command::Rcpt(vec!["<c@d.example>".into()])).await;
    assert_eq!(mta.reply().await, Reply::Continue);
    mta.send(Command::Data).await;
    assert_eq!(mta.reply().await, Reply::Continue);
    mta.send(Command::Header { name: "Subject".into(), value: "x".into() }).await;
    assert_eq!(mta.reply().await, Reply::Continue);
    mta.send(Command::EndOfHeaders).await;
    assert_eq!(mta.reply().await, Reply::Continue);
    mta.send(Command::Unknown("XYZZY".into())).await;
    assert_eq!(mta.reply().await, Reply::Continue);
}

#[tokio::test]
async fn macros_sent_before_a_command_survive_it() {
    let rec = Arc::new(Recorder::default());
    let (mut mta, _h, _tx) = start(rec.clone(), cfg());
    mta.negotiate(0x1ff, 0).await;
    mta.send(Command::Macros { stage: b'C', pairs: vec![("i".into(), "FROM-CONNECT".into())] }).await;
    mta.send(Command::Connect { hostname: "h".into(), address: codec::ConnectAddress::Unknown }).await;
    assert_eq!(mta.reply().await, Reply::Continue);
    mta.send(Command::Mail(vec!["<a@b.example>".into()])).await;
    assert_eq!(mta.reply().await, Reply::Continue);
    mta.send(Command::EndOfHeaders).await;
    assert_eq!(mta.reply().await, Reply::Continue);
    mta.send(Command::EndOfMessage(b"tail".to_vec())).await;
    mta.eom_replies().await;
    let seen = rec.seen.lock().unwrap();
    assert_eq!(seen[0].envelope.queue_id.as_deref(), Some("FROM-CONNECT"));
    assert_eq!(seen[0].raw, b"\r\ntail");
}

#[tokio::test]
async fn the_client_address_login_and_listener_reach_the_envelope() {
    let rec = Arc::new(Recorder::default());
    let (mut mta, _h, _tx) = start(rec.clone(), cfg());
    let n = mta.negotiate(0x1ff, 0x1f_ffff).await;
    assert_ne!(n.protocol & proto::NR_CONNECT, 0, "no reply to connect");
    assert_eq!(n.protocol & proto::NO_CONNECT, 0, "the connect event is wanted");
    mta.send(Command::Macros {
        stage: b'C',
        pairs: vec![("{daemon_name}".into(), "submission".into()), ("{client_addr}".into(), "192.0.2.9".into())],
    })
    .await;
    let address = codec::ConnectAddress::Inet6 { port: 4000, addr: "2001:db8::7".into() };
    mta.send(Command::Connect { hostname: "[2001:db8::7]".into(), address }).await;
    mta.send(Command::Macros { stage: b'M', pairs: vec![("{auth_authen}".into(), "alice".into())] }).await;
    mta.message(&["u@example.com"], &[("Subject", "s")], b"b").await;
    // Next message on the same connection: no login this time (Postfix sends an empty list).
    mta.send(Command::Macros { stage: b'M', pairs: vec![] }).await;
    mta.message(&["u@example.com"], &[("Subject", "s")], b"b").await;
    // A new SMTP session without a connect event: the macro's address.
    mta.send(Command::QuitNewConnection).await;
    mta.send(Command::Macros { stage: b'C', pairs: vec![("{client_addr}".into(), "192.0.2.9".into())] }).await;
    mta.message(&["u@example.com"], &[("Subject", "s")], b"b").await;
    let seen = rec.seen.lock().unwrap();
    let c = &seen[0].envelope.client;
    assert_eq!(
        (c.addr, c.authenticated, c.listener.as_deref()),
        (Some("2001:db8::7".parse().unwrap()), true, Some("submission"))
    );
    assert!(!seen[1].envelope.client.authenticated, "the login belongs to its own transaction");
    assert_eq!(seen[1].envelope.client.listener.as_deref(), Some("submission"));
    let c = &seen[2].envelope.client;
    assert_eq!((c.addr, c.authenticated, c.listener.as_deref()), (Some("192.0.2.9".parse().unwrap()), false, None));
}

#[tokio::test]
async fn a_header_name_cut_inside_a_utf8_character_is_no_panic() {
    let rec = Arc::new(Recorder::default());
    let (mut mta, h, _tx) = start(rec.clone(), cfg());
    mta.negotiate(0x1ff, 0x1f_ffff).await;
    // The 9th byte (the prefix length) falls inside "é".
    let r = mta.message(&["u@example.com"], &[("X-Triageé-x", "v"), ("X-Tri", "v")], b"b").await;
    assert_eq!(r.last(), Some(&Reply::Accept));
    mta.send(Command::Quit).await;
    assert_eq!(h.await.unwrap().unwrap(), SessionEnd::Quit);
    assert!(rec.seen.lock().unwrap()[0].header_names.is_empty());
}

#[tokio::test]
async fn oversized_body_is_cut_and_skipped() {
    let rec = Arc::new(Recorder::default());
    let mut c = cfg();
    c.max_message_bytes = 100;
    let (mut mta, _h, _tx) = start(rec.clone(), c);
    mta.negotiate(0x1ff, 0x1f_ffff).await;
    mta.send(Command::Mail(vec!["<a@b.example>".into()])).await;
    mta.send(Command::Rcpt(vec!["<c@d.example>".into()])).await;
    mta.send(Command::Header { name: "Subject".into(), value: "big".into() }).await;
    mta.send(Command::EndOfHeaders).await;
    mta.send(Command::Body(vec![b'x'; 500])).await;
    assert_eq!(mta.reply().await, Reply::Skip);
    mta.send(Command::EndOfMessage(Vec::new())).await;
    assert_eq!(mta.eom_replies().await.last(), Some(&Reply::Accept));
    assert_eq!(rec.seen.lock().unwrap()[0].raw.len(), 100);
}

#[tokio::test]
async fn global_byte_budget_bounds_all_sessions_and_is_given_back() {
    let rec = Arc::new(Recorder::default());
    let mut c = cfg();
    c.budget = ByteBudget::new(150);
    let budget = c.budget.clone();
    let (mut a, _ha, _ta) = start(rec.clone(), c.clone());
    let (mut b, _hb, _tb) = start(rec.clone(), c);
    for m in [&mut a, &mut b] {
        m.negotiate(0x1ff, 0x1f_ffff).await;
        m.send(Command::Mail(vec!["<s@x.example>".into()])).await;
        m.send(Command::EndOfHeaders).await;
        m.send(Command::Body(vec![b'x'; 100])).await;
        m.reply().await;
    }
    // 100 bytes for the first, only the remaining 48 for the second (2 went to the EOH line each).
    assert_eq!(budget.available(), 0);
    for m in [&mut a, &mut b] {
        m.send(Command::EndOfMessage(Vec::new())).await;
        assert_eq!(m.eom_replies().await.last(), Some(&Reply::Accept));
    }
    let buffered: usize = rec.seen.lock().unwrap().iter().map(|m| m.raw.len()).sum();
    assert_eq!(buffered, 150);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(budget.available(), 150, "budget given back when messages end");
}

#[tokio::test(start_paused = true)]
async fn a_client_that_dribbles_a_frame_is_cut_off_at_the_idle_timeout() {
    let mut c = cfg();
    c.idle_timeout = Duration::from_secs(30);
    let (mut mta, h, _tx) = start(Arc::default(), c);
    mta.negotiate(0x1ff, 0x1f_ffff).await;
    // Half a length prefix, then one byte a minute: the frame never completes.
    mta.0.write_all(&[0, 0]).await.unwrap();
    tokio::time::sleep(Duration::from_secs(29)).await;
    mta.0.write_all(&[0]).await.unwrap();
    assert!(matches!(h.await.unwrap(), Err(SessionError::Idle(_))));
}

#[tokio::test]
async fn a_header_flood_keeps_only_triage_names_and_bounded() {
    let rec = Arc::new(Recorder::default());
    let (mut mta, _h, _tx) = start(rec.clone(), cfg());
    mta.negotiate(0x1ff, 0x1f_ffff).await;
    mta.send(Command::Mail(vec!["<s@x.example>".into()])).await;
    for i in 0..5000 {
        let name = if i % 2 == 0 { format!("X-Junk-{i}") } else { "x-triage-department".to_string() };
        mta.send(Command::Header { name, value: "v".into() }).await;
    }
    mta.send(Command::EndOfHeaders).await;
    mta.send(Command::EndOfMessage(Vec::new())).await;
    let replies = mta.eom_replies().await;
    let names = rec.seen.lock().unwrap()[0].header_names.clone();
    assert_eq!(names.len(), MAX_TRACKED_TRIAGE_HEADERS);
    assert!(names.iter().all(|n| n == "x-triage-department"));
    // the highest tracked index is removed first
    assert_eq!(
        replies[0],
        Reply::ChangeHeader { index: 1000, name: "x-triage-department".into(), value: String::new() }
    );
}

#[tokio::test]
async fn failed_decision_gets_on_error_verdict_and_still_strips_spoofed_headers() {
    let rec = Arc::new(Recorder { fail: true, ..Default::default() });
    let (mut mta, _h, _tx) = start(rec.clone(), cfg());
    mta.negotiate(0x1ff, 0x1f_ffff).await;
    let r = mta.message(&["u@example.com"], &[("X-Triage-Action", "reroute")], b"b").await;
    assert_eq!(
        r,
        vec![Reply::ChangeHeader { index: 1, name: "X-Triage-Action".into(), value: String::new() }, Reply::Accept]
    );

    let mut c = cfg();
    c.decision.on_error = OnError::Tempfail;
    let (mut mta, _h, _tx) = start(rec, c);
    mta.negotiate(0x1ff, 0x1f_ffff).await;
    assert_eq!(mta.message(&["u@example.com"], &[("Subject", "s")], b"b").await, vec![Reply::Tempfail]);
}

#[tokio::test(start_paused = true)]
async fn slow_decision_sends_progress_then_times_out() {
    let rec = Arc::new(Recorder { delay: Some(Duration::from_secs(60)), ..Default::default() });
    let mut c = cfg();
    c.decision.timeout = Duration::from_millis(3500);
    let (mut mta, _h, _tx) = start(rec, c);
    mta.negotiate(0x1ff, 0x1f_ffff).await;
    let r = mta.message(&["u@example.com"], &[("Subject", "s")], b"b").await;
    assert_eq!(r, vec![Reply::Progress, Reply::Progress, Reply::Progress, Reply::Accept]);
}

#[tokio::test]
async fn recipient_changes_need_both_rcpt_actions() {
    let (mut mta, _h, _tx) = start(Arc::default(), cfg());
    // The MTA lets us add headers but not touch recipients.
    mta.negotiate(action::ADD_HEADERS | action::CHANGE_HEADERS, 0x1f_ffff).await;
    let r = mta.message(&["u@example.com"], &[("Subject", "s")], b"b").await;
    assert_eq!(
        r,
        vec![Reply::AddHeader { name: "X-Triage-Department".into(), value: "billing".into() }, Reply::Accept]
    );
}

#[tokio::test]
async fn protocol_errors_close_the_connection() {
    let (mut mta, h, _tx) = start(Arc::default(), cfg());
    mta.send(Command::Mail(vec!["<a@b>".into()])).await;
    assert!(matches!(h.await.unwrap(), Err(SessionError::Protocol(_))));

    let (mut mta, h, _tx) = start(Arc::default(), cfg());
    mta.negotiate(0x1ff, 0x1f_ffff).await;
    mta.send(Command::Header { name: "Subject".into(), value: "no MAIL".into() }).await;
    assert!(matches!(h.await.unwrap(), Err(SessionError::Protocol(_))));

    let (mut mta, h, _tx) = start(Arc::default(), cfg());
    mta.0.write_all(&[0x7f, 0xff, 0xff, 0xff, b'B']).await.unwrap();
    assert!(matches!(h.await.unwrap(), Err(SessionError::Codec(CodecError::Oversized { .. }))));

    let (mut mta, h, _tx) = start(Arc::default(), cfg());
    mta.0.write_all(&[0, 0, 0, 2, b'Z', 0]).await.unwrap();
    assert!(matches!(h.await.unwrap(), Err(SessionError::Codec(CodecError::UnknownCommand(b'Z')))));
}

#[tokio::test]
async fn shutdown_waits_for_the_message_in_flight() {
    let rec = Arc::new(Recorder::default());
    let (mut mta, h, tx) = start(rec.clone(), cfg());
    mta.negotiate(0x1ff, 0x1f_ffff).await;
    mta.send(Command::Mail(vec!["<a@b.example>".into()])).await;
    mta.send(Command::Rcpt(vec!["<c@d.example>".into()])).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    tx.send(true).unwrap();
    mta.send(Command::EndOfHeaders).await;
    mta.send(Command::EndOfMessage(Vec::new())).await;
    assert_eq!(mta.eom_replies().await.last(), Some(&Reply::Accept));
    assert_eq!(h.await.unwrap().unwrap(), SessionEnd::Shutdown);
    assert_eq!(rec.calls.load(Ordering::SeqCst), 1);
}
