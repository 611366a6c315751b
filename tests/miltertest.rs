//! OpenDKIM's `miltertest` (a libmilter-based MTA simulator, Debian package
//! `miltertest`) drives the daemon through scripted Lua conversations.

mod support;

use std::process::Command;

use support::{config, Daemon};

fn run_script(daemon: &Daemon, body: &str) -> String {
    support::require("miltertest", "miltertest");
    let port = daemon.port.expect("inet daemon");
    let script = format!(
        r#"
mt.set_timeout(15)
local conn = mt.connect("inet:{port}@127.0.0.1", 20, 0.25)
if conn == nil then error("cannot connect to mailtriage") end
function check(cond, what) if not cond then error("FAILED: " .. what) end end
{body}
mt.disconnect(conn)
mt.echo("ALL CHECKS PASSED")
"#
    );
    let path = daemon.dir.path().join("test.lua");
    std::fs::write(&path, script).unwrap();
    let out = Command::new("miltertest").arg("-s").arg(&path).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && text.contains("ALL CHECKS PASSED"),
        "miltertest failed:\n{text}\ndaemon log:\n{}",
        daemon.log()
    );
    text
}

#[test]
fn miltertest_reroute_with_spoofed_headers_removed() {
    let daemon = Daemon::start(&config("enforce"), false);
    run_script(
        &daemon,
        r#"
-- We want the connect event (the client's address, for [scope]) but no reply to it, and skip HELO.
check(not mt.test_option(conn, SMFIP_NOCONNECT), "connect event wanted")
check(mt.test_option(conn, SMFIP_NR_CONN), "no reply to connect")
check(mt.test_option(conn, SMFIP_NOHELO), "NOHELO negotiated")
check(mt.conninfo(conn, "client.example.net", "192.0.2.7") == nil, "connect")
check(not mt.test_action(conn, SMFIF_CHGBODY), "body changes not requested")
check(mt.test_action(conn, SMFIF_ADDRCPT) and mt.test_action(conn, SMFIF_DELRCPT), "recipient actions requested")
check(mt.macro(conn, SMFIC_MAIL, "i", "4A1B2C3D") == nil, "macro")
check(mt.mailfrom(conn, "<shop@example.net>") == nil, "mailfrom")
check(mt.rcptto(conn, "<alice@example.com>") == nil, "rcpt 1")
check(mt.rcptto(conn, "<bob@example.com>") == nil, "rcpt 2")
check(mt.header(conn, "From", "Shop <shop@example.net>") == nil, "header")
check(mt.header(conn, "Subject", "Your invoice #77") == nil, "header")
check(mt.header(conn, "X-Triage-Department", "ceo") == nil, "header")
check(mt.eoh(conn) == nil, "eoh")
check(mt.bodystring(conn, "Amount due: 10 EUR\r\n") == nil, "body")
check(mt.eom(conn) == nil, "eom")
check(mt.getreply(conn) == SMFIR_ACCEPT, "eom verdict")
check(mt.eom_check(conn, MT_HDRDELETE, "X-Triage-Department"), "spoofed header deleted")
check(mt.eom_check(conn, MT_HDRADD, "X-Triage-Department", "billing"), "department header")
check(mt.eom_check(conn, MT_HDRADD, "X-Triage-Priority", "high"), "priority header")
check(mt.eom_check(conn, MT_HDRADD, "X-Triage-Confidence", "1.00"), "confidence header")
check(mt.eom_check(conn, MT_HDRADD, "X-Triage-Source", "rule:invoices"), "source header")
check(mt.eom_check(conn, MT_HDRADD, "X-Triage-Action", "reroute"), "action header")
check(mt.eom_check(conn, MT_RCPTDELETE, "<alice@example.com>"), "alice removed")
check(mt.eom_check(conn, MT_RCPTDELETE, "<bob@example.com>"), "bob removed")
check(mt.eom_check(conn, MT_RCPTADD, "<billing@test.example>"), "billing added")
"#,
    );
}

#[test]
fn miltertest_several_messages_abort_and_quarantine() {
    let daemon = Daemon::start(&config("enforce"), false);
    run_script(
        &daemon,
        r#"
-- first transaction aborted half-way
check(mt.mailfrom(conn, "<a@example.net>") == nil, "mailfrom 1")
check(mt.rcptto(conn, "<alice@example.com>") == nil, "rcpt 1")
check(mt.abort(conn) == nil, "abort")
-- second: no rule matches, default department, no recipient change
check(mt.mailfrom(conn, "<b@example.net>") == nil, "mailfrom 2")
check(mt.rcptto(conn, "<carol@example.com>") == nil, "rcpt 2")
check(mt.header(conn, "Subject", "Hello there") == nil, "header")
check(mt.eoh(conn) == nil, "eoh")
check(mt.bodystring(conn, "hi\r\n") == nil, "body")
check(mt.eom(conn) == nil, "eom")
check(mt.getreply(conn) == SMFIR_ACCEPT, "eom verdict 2")
check(mt.eom_check(conn, MT_HDRADD, "X-Triage-Department", "general"), "default department")
check(mt.eom_check(conn, MT_HDRADD, "X-Triage-Source", "default"), "default source")
check(not mt.eom_check(conn, MT_RCPTDELETE, "<carol@example.com>"), "recipient kept")
check(not mt.eom_check(conn, MT_RCPTADD, "<billing@test.example>"), "no recipient added")
check(not mt.eom_check(conn, MT_HDRDELETE), "nothing deleted")
-- third: quarantine
check(mt.mailfrom(conn, "<c@example.net>") == nil, "mailfrom 3")
check(mt.rcptto(conn, "<dave@example.com>") == nil, "rcpt 3")
check(mt.header(conn, "Subject", "Phishing report") == nil, "header")
check(mt.eoh(conn) == nil, "eoh")
check(mt.bodyrandom(conn, 200000) == nil, "big random body")
check(mt.eom(conn) == nil, "eom")
check(mt.getreply(conn) == SMFIR_ACCEPT, "eom verdict 3")
check(mt.eom_check(conn, MT_QUARANTINE), "quarantined")
check(mt.eom_check(conn, MT_HDRADD, "X-Triage-Action", "quarantine"), "action header")
"#,
    );
}

/// A milter client of our own (the library's codec), for what miltertest
/// cannot do: send one byte at a time, stop mid-frame, run 100 at once.
mod raw {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    use mailtriage::milter::codec::{self, Command, ConnectAddress, Negotiation, Reply};

    pub fn conversation(subject: &str) -> Vec<Command> {
        vec![
            // No protocol flags: every command but MACRO gets a reply.
            Command::Negotiate(Negotiation { version: 6, actions: 0x1ff, protocol: 0, macros: Default::default() }),
            Command::Connect { hostname: "client.example".into(), address: ConnectAddress::Unknown },
            Command::Helo("client.example".into()),
            Command::Mail(vec!["<jo@client.example>".into()]),
            Command::Rcpt(vec!["<user@test.example>".into()]),
            Command::Header { name: "From".into(), value: "jo@client.example".into() },
            Command::Header { name: "Subject".into(), value: subject.into() },
            Command::EndOfHeaders,
            Command::Body(b"Please pay.\r\n".to_vec()),
            Command::EndOfMessage(Vec::new()),
        ]
    }

    fn read_reply(s: &mut TcpStream) -> std::io::Result<Reply> {
        let mut len = [0u8; 4];
        s.read_exact(&mut len)?;
        let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut frame)?;
        let (code, payload) = frame.split_first().ok_or_else(|| std::io::Error::other("empty frame"))?;
        codec::decode_reply(*code, payload).map_err(|e| std::io::Error::other(e.to_string()))
    }

    /// Sends each command (byte by byte with `pause` when given) and reads
    /// its replies; returns the replies to end-of-message.
    pub fn run(port: u16, commands: &[Command], pause: Option<Duration>) -> std::io::Result<Vec<Reply>> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut last = Vec::new();
        for c in commands {
            let frame = codec::encode_command(c);
            match pause {
                Some(p) => {
                    for b in &frame {
                        s.write_all(std::slice::from_ref(b))?;
                        std::thread::sleep(p);
                    }
                }
                None => s.write_all(&frame)?,
            }
            last.clear();
            loop {
                let r = read_reply(&mut s)?;
                // Modifications and progress come before the final answer.
                let done = matches!(
                    r,
                    Reply::Negotiate(_)
                        | Reply::Continue
                        | Reply::Accept
                        | Reply::Reject
                        | Reply::Tempfail
                        | Reply::Discard
                        | Reply::Skip
                        | Reply::ReplyCode(_)
                );
                last.push(r);
                if done {
                    break;
                }
            }
        }
        s.write_all(&codec::encode_command(&Command::Quit))?;
        Ok(last)
    }
}

/// Fault injection on the milter port: one client sends its frames a byte
/// at a time, another stops in the middle of a frame, while 100 others run
/// whole conversations at once. Every conversation gets its right answer,
/// the slow one too; the stalled one is closed at `idle_timeout`, holding
/// nothing up meanwhile; the daemon serves on.
#[test]
fn byte_by_byte_and_stalled_clients_hold_up_no_one() {
    use std::io::{Read, Write};
    let config = config("enforce").replacen("[server]", "[server]\nidle_timeout = \"4s\"", 1);
    let daemon = Daemon::start(&config, false);
    let port = daemon.port.unwrap();
    let rerouted = |replies: &[mailtriage::milter::codec::Reply]| {
        use mailtriage::milter::codec::Reply;
        replies.iter().any(|r| matches!(r, Reply::AddRcpt(a) if a.contains("billing@")))
            && matches!(replies.last(), Some(Reply::Accept | Reply::Continue))
    };

    // Stalled: negotiated, then half of the CONNECT frame, then nothing.
    let mut stalled = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let frames = raw::conversation("Invoice");
    stalled.write_all(&mailtriage::milter::codec::encode_command(&frames[0])).unwrap();
    let mut optneg = [0u8; 4];
    stalled.read_exact(&mut optneg).unwrap();
    let mut rest = vec![0u8; u32::from_be_bytes(optneg) as usize];
    stalled.read_exact(&mut rest).unwrap();
    let connect = mailtriage::milter::codec::encode_command(&frames[1]);
    stalled.write_all(&connect[..connect.len() / 2]).unwrap();
    let stalled_at = std::time::Instant::now();

    let slow = std::thread::spawn(move || {
        raw::run(port, &raw::conversation("Invoice slow"), Some(std::time::Duration::from_millis(2)))
    });
    let many: Vec<_> = (0..100)
        .map(|i| std::thread::spawn(move || raw::run(port, &raw::conversation(&format!("Invoice {i}")), None)))
        .collect();
    for (i, t) in many.into_iter().enumerate() {
        let replies = t.join().unwrap().unwrap_or_else(|e| panic!("conversation {i}: {e}\n{}", daemon.log()));
        assert!(rerouted(&replies), "conversation {i}: {replies:?}");
    }
    let slow = slow.join().unwrap().unwrap();
    assert!(rerouted(&slow), "byte by byte: {slow:?}");

    // The stalled connection is closed by the daemon, not before idle_timeout.
    stalled.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 16];
    let n = stalled.read(&mut buf).unwrap_or(0);
    let waited = stalled_at.elapsed();
    assert_eq!(n, 0, "the stalled client got an answer instead of a close");
    assert!(waited >= std::time::Duration::from_secs(3), "closed after {waited:?}, before idle_timeout");
    assert!(raw::run(port, &raw::conversation("Invoice after"), None).is_ok_and(|r| rerouted(&r)));
}
