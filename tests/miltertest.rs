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
