//! Black-box tests against a real Postfix (started by the tests, loopback
//! only) calling the mailtriage daemon as its milter.

mod support;

use std::time::Duration;

use support::{config, header_values, mail, send, wait_for_port, Daemon, Dovecot, Mail, Postfix, DOMAIN};

fn one(values: Vec<String>, what: &str) -> String {
    assert_eq!(values.len(), 1, "{what}: expected exactly one, got {values:?}");
    values.into_iter().next().unwrap()
}

#[test]
fn enforce_mode_tags_every_message_and_routes_by_rule() {
    let metrics_port = support::free_port();
    let daemon =
        Daemon::start(&format!("{}\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n", config("enforce")), false);
    let pf = Postfix::start(Some(&daemon.postfix_address()), "tempfail", &[]);

    // Several messages over one SMTP session (one milter connection).
    let invoice = mail("Your invoice 2024-17", "", "Please pay by Friday.");
    let spoofed = mail(
        "Lunch on Friday?",
        "X-Triage-Department: billing\nX-Triage-Action: reroute\nx-triage-source: rule:invoices",
        "Pizza or sushi?",
    );
    let codes = send(pf.smtp_port, &[invoice, spoofed]).unwrap();
    assert_eq!(codes, vec![250, 250]);
    send(pf.smtp_port, &[mail("Request for a quote", "", "100 licences please")]).unwrap();
    send(pf.smtp_port, &[mail("Phishing attempt reported", "", "see attached")]).unwrap();

    let delivered = pf.wait_delivered(4, Duration::from_secs(60));
    let ctx = || format!("postfix log:\n{}\ndaemon log:\n{}", pf.log(), daemon.log());
    assert_eq!(delivered.len(), 4, "{delivered:#?}\n{}", ctx());

    // The rule-matched invoice went to billing, and not to the original recipient.
    let billing = pf.mailbox("billing");
    assert_eq!(billing.len(), 1, "{}", ctx());
    let m = &billing[0];
    assert!(m.contains("Subject: Your invoice"));
    assert_eq!(one(header_values(m, "X-Triage-Department"), "department"), "billing");
    assert_eq!(one(header_values(m, "X-Triage-Priority"), "priority"), "high");
    assert_eq!(one(header_values(m, "X-Triage-Confidence"), "confidence"), "1.00");
    assert_eq!(one(header_values(m, "X-Triage-Source"), "source"), "rule:invoices");
    assert_eq!(one(header_values(m, "X-Triage-Action"), "action"), "reroute");

    let user = pf.mailbox("user");
    assert!(
        !user.iter().any(|m| m.contains("Subject: Your invoice")),
        "rerouted mail also reached the original recipient"
    );

    // The spoofed headers are gone; only ours remain.
    let lunch = user.iter().find(|m| m.contains("Subject: Lunch")).expect("lunch message in user/");
    assert_eq!(one(header_values(lunch, "X-Triage-Department"), "department"), "general");
    assert_eq!(one(header_values(lunch, "X-Triage-Source"), "source"), "default");
    assert_eq!(one(header_values(lunch, "X-Triage-Action"), "action"), "tag");
    assert_eq!(one(header_values(lunch, "X-Triage-Confidence"), "confidence"), "0.00");
    assert_eq!(one(header_values(lunch, "X-Triage-Priority"), "priority"), "medium");

    // copy: the original recipient and the department both have it.
    assert!(user.iter().any(|m| m.contains("Subject: Request for a quote")));
    let sales = pf.mailbox("sales");
    assert_eq!(sales.len(), 1);
    assert_eq!(one(header_values(&sales[0], "X-Triage-Action"), "action"), "copy");

    // quarantine: Postfix holds the message instead of delivering it.
    assert!(!delivered.iter().any(|(_, m)| m.contains("Subject: Phishing")));
    assert_eq!(pf.queue_count("hold"), 1, "{}", ctx());
    assert!(pf.log().contains("milter triggers HOLD action"), "{}", ctx());

    // Prometheus counted every message, by department, action and source.
    let scrape = support::http_get(metrics_port, "/metrics");
    let count = |department: &str, action: &str, source: &str| -> Option<String> {
        scrape
            .lines()
            .find(|l| {
                l.starts_with("mailtriage_messages_total{")
                    && l.contains(&format!("department=\"{department}\""))
                    && l.contains(&format!("action=\"{action}\""))
                    && l.contains(&format!("source=\"{source}\""))
            })
            .and_then(|l| l.rsplit(' ').next().map(str::to_string))
    };
    assert_eq!(count("billing", "reroute", "rule:invoices").as_deref(), Some("1"), "{scrape}");
    assert_eq!(count("general", "tag", "default").as_deref(), Some("1"), "{scrape}");
    assert_eq!(count("sales", "copy", "rule:quotes").as_deref(), Some("1"), "{scrape}");
    assert_eq!(count("security", "quarantine", "rule:phishing").as_deref(), Some("1"), "{scrape}");
    assert!(scrape.contains("mailtriage_decision_seconds_bucket"), "{scrape}");
    assert!(scrape.contains("mailtriage_info{"), "{scrape}");
    assert!(support::http_get(metrics_port, "/readyz").starts_with("HTTP/1.1 200"));
}

#[test]
fn shadow_mode_over_unix_socket_changes_no_recipient() {
    let daemon = Daemon::start(&config("shadow"), true);
    let pf = Postfix::start(Some(&daemon.postfix_address()), "tempfail", &[]);
    send(pf.smtp_port, &[mail("Invoice overdue", "", "x"), mail("Request for a quote", "", "y")]).unwrap();
    send(pf.smtp_port, &[mail("phishing", "", "z")]).unwrap();
    let delivered = pf.wait_delivered(3, Duration::from_secs(60));
    assert_eq!(delivered.len(), 3, "postfix log:\n{}\ndaemon log:\n{}", pf.log(), daemon.log());
    // Everything stays with the original recipient, nothing held, and the
    // headers say what enforce mode would have done.
    assert!(delivered.iter().all(|(mbox, _)| mbox == "user"), "{delivered:?}");
    assert_eq!(pf.queue_count("hold"), 0);
    let invoice = &delivered.iter().find(|(_, m)| m.contains("Subject: Invoice")).unwrap().1;
    assert_eq!(one(header_values(invoice, "X-Triage-Action"), "action"), "reroute");
    assert_eq!(one(header_values(invoice, "X-Triage-Mode"), "mode"), "shadow");
    assert_eq!(one(header_values(invoice, "X-Triage-Department"), "department"), "billing");
}

#[test]
fn killing_the_daemon_mid_stream_loses_no_message() {
    let mut daemon = Daemon::start(&config("enforce"), false);
    let pf = Postfix::start(Some(&daemon.postfix_address()), "accept", &[]);
    const SENDERS: usize = 4;
    const EACH: usize = 15;
    let port = pf.smtp_port;
    let senders: Vec<_> = (0..SENDERS)
        .map(|t| {
            std::thread::spawn(move || {
                let mut codes = Vec::new();
                for i in 0..EACH {
                    let m = mail(&format!("stream {t}-{i}"), "", "keep me");
                    codes.extend(send(port, &[m]).expect("SMTP session failed"));
                    std::thread::sleep(Duration::from_millis(50));
                }
                codes
            })
        })
        .collect();
    // Let some mail through the milter, then kill it without warning (while
    // mail still flows: waiting for an idle queue could outlast the senders).
    let before = pf.wait_at_least(10, Duration::from_secs(60));
    assert!(before >= 10, "no mail flowed before the kill:\n{}", pf.log());
    daemon.kill();
    let codes: Vec<u16> = senders.into_iter().flat_map(|h| h.join().unwrap()).collect();
    assert!(codes.iter().all(|&c| c == 250), "some messages were not accepted: {codes:?}");
    let delivered = pf.wait_delivered(SENDERS * EACH, Duration::from_secs(60));
    let mut subjects: Vec<String> =
        delivered.iter().flat_map(|(_, m)| header_values(m, "Subject")).filter(|s| s.starts_with("stream ")).collect();
    subjects.sort();
    let n = subjects.len();
    subjects.dedup();
    assert_eq!(n, subjects.len(), "a message was delivered twice");
    assert_eq!(n, SENDERS * EACH, "messages lost after the milter died:\n{}", pf.log());
    let tagged = delivered.iter().filter(|(_, m)| !header_values(m, "X-Triage-Department").is_empty()).count();
    assert!(tagged >= 10, "the milter was not in the path before the kill ({tagged} tagged)");
    assert!(tagged < n, "the kill happened after all mail was sent; the test proved nothing");

    // Back up: mail is tagged again.
    let daemon2 = Daemon::start(&config("enforce").replace("[server]", &format!("[server]\n# restart {}", 2)), false);
    let pf2 = Postfix::start(Some(&daemon2.postfix_address()), "accept", &[]);
    send(pf2.smtp_port, &[mail("after restart", "", "x")]).unwrap();
    let d = pf2.wait_delivered(1, Duration::from_secs(30));
    assert_eq!(one(header_values(&d[0].1, "X-Triage-Department"), "department"), "general");
}

#[test]
fn large_and_eight_bit_messages_pass_intact() {
    let daemon = Daemon::start(&config("enforce"), false);
    let pf = Postfix::start(Some(&daemon.postfix_address()), "tempfail", &[]);
    // 300 KB body: several 64 KiB milter body chunks; a leading-dot line; 8-bit text.
    let body: String = (0..6000).map(|i| format!("line {i} of a long invoice body with some padding text\n")).collect();
    let body = format!(".starts with a dot\nGrüße aus Köln\n{body}");
    let mut m = mail(
        "=?utf-8?Q?Rechnung_/_invoice_f=C3=BCr_M=C3=A4rz?=",
        "MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit",
        &body,
    );
    m.rcpts.push(format!("support@{DOMAIN}"));
    let big: Mail = m;
    assert_eq!(send(pf.smtp_port, &[big]).unwrap(), vec![250]);
    let d = pf.wait_delivered(1, Duration::from_secs(60));
    assert_eq!(d.len(), 1, "{}", pf.log());
    let (mbox, msg) = &d[0];
    // Rerouted away from both original recipients to the one department mailbox.
    assert_eq!(mbox, "billing");
    assert!(msg.contains("\n.starts with a dot\n") && msg.contains("Grüße aus Köln") && msg.contains("line 5999 of"));
    assert_eq!(one(header_values(msg, "X-Triage-Source"), "source"), "rule:invoices");
}

/// With `[model]` configured, what no rule decides is decided by the trained head.
#[test]
fn model_decides_what_no_rule_decides() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("models/all-MiniLM-L6-v2");
    assert!(model.join("model.safetensors").exists(), "run scripts/fetch-model.sh");
    let work = tempfile::tempdir().unwrap();
    let head = work.path().join("department.safetensors");
    let base = format!(
        r#"
[server]
mode = "enforce"

[model]
path = "{model}"
max_tokens = 128
workers = 1
deadline = "20s"
HEAD

[[departments]]
name = "billing"
mailbox = "billing@{DOMAIN}"
action = "reroute"
[[departments]]
name = "support"
mailbox = "support@{DOMAIN}"
action = "reroute"
[[departments]]
name = "hr"
mailbox = "hr@{DOMAIN}"
action = "reroute"

[[rules]]
name = "invoices"
header = "Subject"
pattern = "(?i)\\binvoice\\b"
department = "billing"
"#,
        model = model.display()
    );
    let cfg_path = work.path().join("train.toml");
    std::fs::write(&cfg_path, base.replace("HEAD", "")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mailtriage"))
        .arg("--config")
        .arg(&cfg_path)
        .args(["train", "--data"])
        .arg(root.join("tests/fixtures/tickets-train.jsonl"))
        .args(["--label", "department", "--out"])
        .arg(&head)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let daemon = Daemon::start(&base.replace("HEAD", &format!("department_head = \"{}\"", head.display())), false);
    let pf = Postfix::start(Some(&daemon.postfix_address()), "tempfail", &[]);
    send(pf.smtp_port, &[mail("Server liefert seit heute Fehler 500", "", "Bitte dringend helfen, nichts geht mehr.")])
        .unwrap();
    send(pf.smtp_port, &[mail("Your invoice 99", "", "rule decides this one")]).unwrap();
    let delivered = pf.wait_delivered(2, Duration::from_secs(60));
    assert_eq!(delivered.len(), 2, "postfix log:\n{}\ndaemon log:\n{}", pf.log(), daemon.log());
    let support = pf.mailbox("support");
    assert_eq!(support.len(), 1, "daemon log:\n{}", daemon.log());
    let m = &support[0];
    // The full head, or the cascade's lexical head when it is sure of itself.
    let source = one(header_values(m, "X-Triage-Source"), "source");
    assert!(
        ["model:sentence-transformers/all-MiniLM-L6-v2", "model:sentence-transformers/all-MiniLM-L6-v2/lexical"]
            .contains(&source.as_str()),
        "{source}"
    );
    assert_eq!(one(header_values(m, "X-Triage-Department"), "department"), "support");
    let confidence: f64 = one(header_values(m, "X-Triage-Confidence"), "confidence").parse().unwrap();
    assert!((0.0..=1.0).contains(&confidence));
    let billing = pf.mailbox("billing");
    assert_eq!(one(header_values(&billing[0], "X-Triage-Source"), "source"), "rule:invoices");

    // Fault: the head file is replaced by a half-written one under the running
    // daemon. A reload refuses it, naming the file, and the old head keeps serving.
    let bytes = std::fs::read(&head).unwrap();
    std::fs::write(&head, &bytes[..bytes.len() / 2]).unwrap();
    daemon.signal("HUP");
    assert!(daemon.wait_log("reload failed", 1), "{}", daemon.log());
    let failed = daemon.log().lines().find(|l| l.contains("reload failed")).unwrap().to_string();
    assert!(failed.contains("department.safetensors"), "the error names the file: {failed}");
    send(pf.smtp_port, &[mail("Server liefert seit heute Fehler 500", "", "Bitte dringend helfen, nichts geht mehr.")])
        .unwrap();
    pf.wait_delivered(3, Duration::from_secs(60));
    let support = pf.mailbox("support");
    assert_eq!(support.len(), 2, "the old head still routes: {}", daemon.log());
    assert!(support.iter().all(|m| one(header_values(m, "X-Triage-Source"), "source").starts_with("model:")));
}

/// Mail full of personal data goes through the daemon at debug log level;
/// none of it may appear in the log or the audit trail, which still records
/// the decision with domains only.
#[test]
fn no_personal_data_in_logs_or_audit_trail() {
    let audit_dir = tempfile::tempdir().unwrap();
    let audit = audit_dir.path().join("audit.jsonl");
    let config = format!(
        "{}\n[audit]\npath = \"{}\"\nkey_file = \"{}\"\n",
        config("enforce"),
        audit.display(),
        audit_dir.path().join("audit.key").display()
    );
    let daemon = Daemon::start(&config, false);
    let pf = Postfix::start(Some(&daemon.postfix_address()), "tempfail", &[]);
    let secrets = [
        "Invoice for Jane Roe",
        "jane.roe@private.example",
        "4111 1111 1111 1111",
        "DE89 3704 0044 0532 0130 00",
        "123-45-6789",
        "+49 30 1234 5678",
        "diagnosis: hypertension",
    ];
    let mut m = mail(
        secrets[0],
        &format!("Reply-To: {}\nX-Triage-Department: spoofed", secrets[1]),
        &format!("Card {} IBAN {} SSN {} phone {} {}", secrets[2], secrets[3], secrets[4], secrets[5], secrets[6]),
    );
    m.rcpts = vec![format!("user@{DOMAIN}")];
    send(pf.smtp_port, &[m, mail("Lunch with jane.roe@private.example?", "", "no rule here")]).unwrap();
    assert_eq!(pf.wait_delivered(2, Duration::from_secs(60)).len(), 2, "{}", pf.log());

    let log = daemon.log();
    let trail = std::fs::read_to_string(&audit).unwrap();
    assert!(log.contains("decided"), "debug log has the decisions:\n{log}");
    for s in secrets.iter().chain(&["user@test.example", "bench@test.example", "Jane", "Lunch"]) {
        assert!(!log.contains(s), "log leaks {s:?}:\n{log}");
        assert!(!trail.contains(s), "audit trail leaks {s:?}:\n{trail}");
    }
    let lines: Vec<serde_json::Value> = trail.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{trail}");
    let first = &lines[0];
    assert_eq!(first["sender_domain"], "test.example");
    assert_eq!(first["recipient_domains"], serde_json::json!(["test.example"]));
    assert_eq!(first["department"], "billing");
    assert_eq!(first["source"], "rule:invoices");
    assert_eq!(first["outcome"], "decided");
    assert_eq!(first["message_id_hash"].as_str().unwrap().len(), 64);
    assert!(first["queue_id"].as_str().is_some_and(|q| !q.is_empty()), "{first}");
    assert_eq!(first["config_version"].as_str().unwrap().len(), 12);
}

/// SIGHUP re-reads the rules: a new rule decides the next message; a broken
/// file is refused and the running rules stay.
#[test]
fn sighup_reloads_rules_and_a_broken_file_keeps_the_old_ones() {
    let mut daemon = Daemon::start(&config("enforce"), false);
    let pf = Postfix::start(Some(&daemon.postfix_address()), "tempfail", &[]);
    let department_of = |subject: &str, n: usize| {
        send(pf.smtp_port, &[mail(subject, "", "x")]).unwrap();
        let d = pf.wait_delivered(n, Duration::from_secs(60));
        let m = d
            .iter()
            .find(|(_, m)| header_values(m, "Subject").first().map(String::as_str) == Some(subject))
            .expect("delivered");
        one(header_values(&m.1, "X-Triage-Department"), "department")
    };
    assert_eq!(department_of("Parking permit 1", 1), "general");

    let with_rule = config("enforce")
        + "\n[[rules]]\nname = \"parking\"\nheader = \"Subject\"\npattern = \"(?i)parking\"\ndepartment = \"billing\"\n";
    // A rule placed after the existing ones; billing reroutes, so the message lands in billing/.
    daemon.rewrite_config(&with_rule);
    daemon.signal("HUP");
    assert!(daemon.wait_log("reloaded", 1), "{}", daemon.log());
    assert_eq!(department_of("Parking permit 2", 2), "billing");

    daemon.rewrite_config("[server]\nmode = \"loud\"\n");
    daemon.signal("HUP");
    assert!(daemon.wait_log("reload failed", 1), "{}", daemon.log());
    assert!(daemon.log().contains("loud"), "the error names the bad value");
    assert_eq!(department_of("Parking permit 3", 3), "billing");
    assert!(daemon.child.try_wait().unwrap().is_none(), "daemon still running");
}

/// SIGTERM in the middle of a 200-message run: Postfix (milter_default_action
/// = tempfail) retries what the daemon could not take, and with the daemon
/// back every message is delivered exactly once.
#[test]
fn sigterm_during_a_run_loses_no_message() {
    let mut daemon = Daemon::start(&config("enforce"), false);
    let pf = Postfix::start(
        Some(&daemon.postfix_address()),
        "tempfail",
        &["queue_run_delay = 1s", "minimal_backoff_time = 1s", "maximal_backoff_time = 2s"],
    );
    let port = pf.smtp_port;
    let senders: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                (0..50)
                    .map(|i| {
                        // A 4xx from Postfix (milter down, tempfail) means: try again, as a real MTA would.
                        for _ in 0..200 {
                            if let Ok(codes) = send(port, &[mail(&format!("term {t}-{i}"), "", "x")]) {
                                if codes == vec![250] {
                                    return true;
                                }
                            }
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        false
                    })
                    .filter(|ok| *ok)
                    .count()
            })
        })
        .collect();
    let before = pf.wait_at_least(40, Duration::from_secs(60));
    assert!(before >= 40, "{}", pf.log());
    daemon.signal("TERM");
    let status = daemon.child.wait().unwrap();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}\n{}", daemon.log());
    assert!(daemon.log().contains("stopped"), "{}", daemon.log());
    // Back up on the same address: the senders' retries go through.
    let restarted = std::process::Command::new(env!("CARGO_BIN_EXE_mailtriage"))
        .arg("--config")
        .arg(daemon.dir.path().join("mailtriage.toml"))
        .arg("serve")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    daemon.child = restarted;
    let accepted: usize = senders.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(accepted, 200, "every message eventually accepted");
    let delivered = pf.wait_delivered(200, Duration::from_secs(120));
    let mut subjects: Vec<String> =
        delivered.iter().flat_map(|(_, m)| header_values(m, "Subject")).filter(|s| s.starts_with("term ")).collect();
    subjects.sort();
    subjects.dedup();
    assert_eq!(subjects.len(), 200, "lost messages:\n{}", pf.log());
    assert_eq!(delivered.len(), 200, "duplicates");
}

/// SIGTERM starts a drain: `/readyz` answers 503 at once, while a message
/// is still in flight, and the daemon exits once that connection is done
/// (here: once the grace period ends, since the client never finishes).
#[test]
fn a_drain_reports_not_ready_at_once_while_messages_finish() {
    use std::io::{Read, Write};
    let metrics_port = support::free_port();
    let cfg = config("enforce").replacen("[server]\n", "[server]\nshutdown_grace = \"4s\"\n", 1)
        + &format!("\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n");
    let mut daemon = Daemon::start(&cfg, false);
    assert!(support::http_get(metrics_port, "/readyz").starts_with("HTTP/1.1 200"));
    // A milter client half-way through a message (negotiated, MAIL sent).
    let packet = |cmd: u8, payload: &[u8]| {
        let mut p = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
        p.push(cmd);
        p.extend_from_slice(payload);
        p
    };
    let mut milter = std::net::TcpStream::connect(("127.0.0.1", daemon.port.unwrap())).unwrap();
    milter.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let optneg: Vec<u8> = [6u32, 0x1ff, 0x1f_ffff].iter().flat_map(|v| v.to_be_bytes()).collect();
    milter.write_all(&packet(b'O', &optneg)).unwrap();
    let mut len = [0u8; 4];
    milter.read_exact(&mut len).unwrap();
    let mut reply = vec![0u8; u32::from_be_bytes(len) as usize];
    milter.read_exact(&mut reply).unwrap();
    assert_eq!(reply[0], b'O', "negotiation answered");
    milter.write_all(&packet(b'M', b"<a@example.com>\0")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    daemon.signal("TERM");
    let started = std::time::Instant::now();
    let mut answer = String::new();
    while started.elapsed() < Duration::from_secs(3) {
        answer = support::http_get(metrics_port, "/readyz");
        if answer.starts_with("HTTP/1.1 503") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(answer.starts_with("HTTP/1.1 503"), "not ready once draining: {answer}\n{}", daemon.log());
    assert!(daemon.child.try_wait().unwrap().is_none(), "still draining the message in flight");
    let status = daemon.child.wait().unwrap();
    assert!(status.success(), "clean exit after the drain: {status:?}\n{}", daemon.log());
    drop(milter);
}

/// `mailtriage_skipped_total{reason}` from a scrape, 0 when absent.
fn skipped(scrape: &str, reason: &str) -> u64 {
    scrape
        .lines()
        .find(|l| l.starts_with("mailtriage_skipped_total{") && l.contains(&format!("reason=\"{reason}\"")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// A message from `from` to `rcpts` (all at the test domain).
fn mail_to<'a>(from: &'a str, rcpts: &[&str], subject: &str, extra_headers: &str) -> Mail<'a> {
    let mut m = mail(subject, extra_headers, "Please see below.");
    m.from = from;
    m.rcpts = rcpts.iter().map(|r| format!("{r}@{DOMAIN}")).collect();
    m
}

/// `[scope] recipients`: a reroute replaces only the recipients the scope
/// owns (each named in X-Triage-Original-Recipient), the others keep the
/// message, the department gets it once; mail to nobody in scope, bounces,
/// auto-replies and list mail are skipped (spoofed headers still removed),
/// and with `skip_auto = false` (a reload) automatic mail is tagged, never
/// rerouted.
#[test]
fn scope_reroutes_only_the_recipients_it_owns_and_never_automatic_mail() {
    let metrics_port = support::free_port();
    let scoped = |skip_auto: bool| {
        format!(
            "{}\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n[scope]\nrecipients = [\"info@{DOMAIN}\", \"User@{DOMAIN}\"]\n\
             skip_auto = {skip_auto}\n",
            config("enforce")
        )
    };
    let daemon = Daemon::start(&scoped(true), false);
    let pf = Postfix::start(Some(&daemon.postfix_address()), "tempfail", &[]);
    let sender = "customer@test.example";
    let spoof = "X-Triage-Action: reroute\nX-Triage-Department: ceo";
    let codes = send(
        pf.smtp_port,
        &[
            mail_to(sender, &["info", "user", "ceo"], "Your invoice 1", ""),
            mail_to(sender, &["ceo"], "Your invoice 2", spoof),
            mail_to("", &["info"], "Undelivered Mail: invoice 3", ""),
            mail_to(sender, &["info"], "Out of office: invoice 4", "Auto-Submitted: auto-replied"),
            mail_to(sender, &["info"], "[list] invoice 5", "List-Id: <billing-news.lists.example>"),
        ],
    )
    .unwrap();
    assert_eq!(codes, vec![250; 5]);
    let delivered = pf.wait_delivered(6, Duration::from_secs(60));
    let ctx = || format!("postfix log:\n{}\ndaemon log:\n{}", pf.log(), daemon.log());
    assert_eq!(delivered.len(), 6, "{delivered:#?}\n{}", ctx());

    // The in-scope recipients were replaced by billing, once; the CEO kept it.
    let billing = pf.mailbox("billing");
    assert_eq!(billing.len(), 1, "{}", ctx());
    assert_eq!(
        header_values(&billing[0], "X-Triage-Original-Recipient"),
        [format!("info@{DOMAIN}"), format!("user@{DOMAIN}")]
    );
    assert!(pf.mailbox("user").is_empty(), "{}", ctx());
    let ceo = pf.mailbox("ceo");
    assert_eq!(ceo.len(), 2, "{}", ctx());
    let first = ceo.iter().find(|m| m.contains("invoice 1")).unwrap();
    assert_eq!(one(header_values(first, "X-Triage-Action"), "action"), "reroute");
    // Out of scope: passed unchanged, and the sender's fake verdict is gone.
    let second = ceo.iter().find(|m| m.contains("invoice 2")).unwrap();
    assert!(!second.to_ascii_lowercase().contains("x-triage-"), "{second}");
    // Bounce, auto-reply, list mail: left with their recipient, untouched.
    let info = pf.mailbox("info");
    assert_eq!(info.len(), 3, "{}", ctx());
    assert!(info.iter().all(|m| !m.contains("X-Triage-")), "{info:#?}");

    let scrape = support::http_get(metrics_port, "/metrics");
    for reason in ["recipients", "null_sender", "auto_submitted", "mailing_list"] {
        assert_eq!(skipped(&scrape, reason), 1, "{reason}: {scrape}");
    }

    // skip_auto = false: triaged and tagged, still never rerouted.
    daemon.rewrite_config(&scoped(false));
    daemon.signal("HUP");
    assert!(daemon.wait_log("reloaded", 1), "{}", daemon.log());
    send(pf.smtp_port, &[mail_to(sender, &["info"], "Auto: invoice 6", "Auto-Submitted: auto-generated")]).unwrap();
    pf.wait_delivered(7, Duration::from_secs(60));
    let info = pf.mailbox("info");
    let sixth = info.iter().find(|m| m.contains("invoice 6")).expect("kept by info@");
    assert_eq!(one(header_values(sixth, "X-Triage-Department"), "department"), "billing");
    assert_eq!(one(header_values(sixth, "X-Triage-Action"), "action"), "tag");
    assert_eq!(pf.mailbox("billing").len(), 1, "not rerouted");
}

/// Sends one message with swaks, optionally authenticated and from another
/// loopback source address; panics with swaks' transcript on failure.
fn swaks(port: u16, subject: &str, auth: bool, source: &str) {
    swaks_with(port, subject, auth, source, &[]);
}

fn swaks_with(port: u16, subject: &str, auth: bool, source: &str, headers: &[&str]) {
    support::require("swaks", "swaks");
    let mut cmd = std::process::Command::new("swaks");
    cmd.args(["--server", &format!("127.0.0.1:{port}"), "--local-interface", source])
        .args(["--from", &format!("staff@{DOMAIN}"), "--to", &format!("user@{DOMAIN}")])
        .args(["--header", &format!("Subject: {subject}"), "--body", "Please find it attached."]);
    for h in headers {
        cmd.args(["--add-header", h]);
    }
    if auth {
        cmd.args(["--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "secret"]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "swaks failed:\n{}", String::from_utf8_lossy(&out.stdout));
}

/// The facts the milter asks Postfix for: `{auth_authen}` (a real SASL
/// login through Dovecot on a `submission` listener), `{daemon_name}`
/// (`milter_macro_daemon_name`), the client address of the connect event.
/// Each skips what the scope says, and a reload switches which.
#[test]
fn authenticated_senders_office_networks_and_submission_listener_are_skipped() {
    let dovecot = Dovecot::start_sasl(&["alice"]); // dropped after Postfix
    let metrics_port = support::free_port();
    let with_scope = |scope: &str| {
        format!("{}\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n[scope]\n{scope}\n", config("enforce"))
    };
    let daemon = Daemon::start(&with_scope("skip_networks = [\"127.0.0.2\"]"), false);
    let pf = Postfix::start(Some(&daemon.postfix_address()), "tempfail", &[]);
    let submission = support::free_port();
    pf.add_submission_listener(submission, &dovecot.sasl_path());
    pf.reload();
    assert!(wait_for_port(submission, Duration::from_secs(30)), "submission listener not up:\n{}", pf.log());
    let ctx = || format!("postfix log:\n{}\ndaemon log:\n{}\ndovecot log:\n{}", pf.log(), daemon.log(), dovecot.log());

    swaks(submission, "Your invoice A (staff, authenticated)", true, "127.0.0.1");
    swaks(pf.smtp_port, "Your invoice B (customer)", false, "127.0.0.1");
    swaks(pf.smtp_port, "Your invoice C (office network)", false, "127.0.0.2");
    pf.wait_delivered(3, Duration::from_secs(60));
    let subjects = |mailbox: &str| -> Vec<String> {
        let mut s: Vec<String> = pf.mailbox(mailbox).iter().flat_map(|m| header_values(m, "Subject")).collect();
        s.sort();
        s
    };
    assert_eq!(subjects("billing"), ["Your invoice B (customer)"], "{}", ctx());
    assert_eq!(subjects("user"), ["Your invoice A (staff, authenticated)", "Your invoice C (office network)"]);
    assert!(pf.mailbox("user").iter().all(|m| !m.contains("X-Triage-")));
    assert!(pf.mailbox("user").iter().any(|m| m.contains("with ESMTPA")), "the login really happened\n{}", ctx());

    // Authenticated mail is triaged again, but not from the submission listener;
    // 127.0.0.3 is an earlier mailtriage hop whose headers are trusted.
    daemon.rewrite_config(&with_scope(
        "skip_authenticated = false\nskip_listeners = [\"submission\"]\ntrusted_relays = [\"127.0.0.3\"]",
    ));
    daemon.signal("HUP");
    assert!(daemon.wait_log("reloaded", 1), "{}", daemon.log());
    swaks(submission, "Your invoice D (staff, submission)", true, "127.0.0.1");
    swaks(pf.smtp_port, "Your invoice E (former office network)", false, "127.0.0.2");
    let triaged = ["X-Triage-Department: general", "X-Triage-Action: tag"];
    swaks_with(pf.smtp_port, "Your invoice F (triaged by the MX)", false, "127.0.0.3", &triaged);
    swaks_with(pf.smtp_port, "Your invoice G (forged headers)", false, "127.0.0.2", &triaged);
    pf.wait_delivered(7, Duration::from_secs(60));
    assert_eq!(
        subjects("billing"),
        ["Your invoice B (customer)", "Your invoice E (former office network)", "Your invoice G (forged headers)"]
    );
    assert_eq!(subjects("user").len(), 4, "{}", ctx());
    let from_mx = pf.mailbox("user").into_iter().find(|m| m.contains("invoice F")).unwrap();
    assert_eq!(one(header_values(&from_mx, "X-Triage-Action"), "the MX's own verdict, kept"), "tag");
    let forged = pf.mailbox("billing").into_iter().find(|m| m.contains("invoice G")).unwrap();
    assert_eq!(one(header_values(&forged, "X-Triage-Department"), "ours, not the forgery"), "billing");

    let scrape = support::http_get(metrics_port, "/metrics");
    for reason in ["authenticated", "network", "listener", "triaged"] {
        assert_eq!(skipped(&scrape, reason), 1, "{reason}: {scrape}");
    }
}

/// Fault injection: the audit file system fills up. Mail keeps flowing (an
/// audit line is a record, not a gate), each lost line is counted, the
/// error is logged once per interval rather than per message, no half line
/// is left in the file, and auditing resumes by itself when space returns.
#[test]
fn a_full_audit_disk_stops_no_mail_and_auditing_resumes_when_space_returns() {
    let dir = tempfile::Builder::new().prefix("mt-auditfull.").tempdir_in("/tmp").unwrap();
    let mount = dir.path().join("audit");
    std::fs::create_dir(&mount).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs"])
        .arg(&mount)
        .status()
        .unwrap();
    assert!(mounted.success(), "mounting a 64 KiB tmpfs for the audit trail needs root");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mount.clone());
    let metrics_port = support::free_port();
    let audit = mount.join("audit.jsonl");
    let config = format!(
        "{}\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n[audit]\npath = \"{}\"\nkey_file = \"{}\"\n",
        config("enforce"),
        audit.display(),
        dir.path().join("audit.key").display()
    );
    let daemon = Daemon::start(&config, false);
    let pf = Postfix::start(Some(&daemon.postfix_address()), "tempfail", &[]);
    let batch =
        |subject: &str| -> Vec<Mail> { (0..10).map(|i| mail(&format!("{subject} {i}"), "", "hello")).collect() };
    assert!(send(pf.smtp_port, &batch("before")).unwrap().iter().all(|&c| c == 250));
    pf.wait_delivered(10, Duration::from_secs(60));
    let count = || std::fs::read_to_string(&audit).unwrap().lines().count();
    assert_eq!(count(), 10);

    // Fill the rest of the file system.
    let filler = mount.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    while std::io::Write::write_all(&mut f, &[0u8; 4096]).is_ok() {}
    drop(f);
    assert!(send(pf.smtp_port, &batch("full")).unwrap().iter().all(|&c| c == 250));
    assert!(send(pf.smtp_port, &batch("still full")).unwrap().iter().all(|&c| c == 250));
    let delivered = pf.wait_delivered(30, Duration::from_secs(60));
    assert_eq!(delivered.len(), 30, "every message is delivered with a full audit disk");
    assert!(delivered.iter().all(|(_, m)| !header_values(m, "X-Triage-Department").is_empty()));
    let trail = std::fs::read_to_string(&audit).unwrap();
    assert!(
        trail.is_empty() || trail.ends_with('\n'),
        "a half line was left: {:?}",
        &trail[trail.len().saturating_sub(80)..]
    );
    assert!(trail.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
    let lost = 30 - trail.lines().count() as u64;
    assert!(lost > 0, "the disk never filled");
    let scrape = support::http_get(metrics_port, "/metrics");
    let counted: u64 = scrape
        .lines()
        .find_map(|l| l.strip_prefix("mailtriage_audit_failures_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no audit failure counter:\n{scrape}"));
    assert_eq!(counted, lost, "every lost line is counted");
    assert_eq!(daemon.log().matches("audit records not written").count(), 1, "logged once per interval");

    std::fs::remove_file(&filler).unwrap();
    let before = count();
    assert!(send(pf.smtp_port, &batch("after")).unwrap().iter().all(|&c| c == 250));
    pf.wait_delivered(40, Duration::from_secs(60));
    assert_eq!(count(), before + 10, "auditing resumed");
}

/// The main.cf blocks of the README and docs/postfix.md, applied as an admin
/// pastes them (`postconf -e` per line, `postfix check`, `postfix reload`):
/// mail then passes the milter, and Postfix logs no warning about them
/// (a trailing `# comment` after a value once made every connection warn
/// `Milter service needs transport:endpoint instead of "#"`).
#[test]
fn the_documented_main_cf_works_as_pasted() {
    let daemon = Daemon::start(&config("shadow"), false);
    for doc in ["README.md", "docs/postfix.md"] {
        let pf = Postfix::start(None, "tempfail", &[]);
        for setting in support::documented_main_cf(doc) {
            let setting = setting.replace("inet:127.0.0.1:8890", &daemon.postfix_address());
            pf.postconf(&["-e", &setting]);
        }
        pf.check();
        pf.reload();
        std::thread::sleep(Duration::from_millis(500));
        // What Postfix says once it runs on the documented lines (the
        // harness's own edits, made while it started, are not the doc's).
        let before = pf.log().len();
        send(pf.smtp_port, &[mail("Your invoice 2024-17", "", "Please pay by Friday.")]).unwrap();
        let delivered = pf.wait_delivered(1, Duration::from_secs(60));
        let ctx = || format!("{doc}\npostfix log:\n{}\ndaemon log:\n{}", pf.log(), daemon.log());
        assert_eq!(delivered.len(), 1, "{}", ctx());
        assert_eq!(one(header_values(&delivered[0].1, "X-Triage-Department"), "department"), "billing", "{}", ctx());
        let log = pf.log()[before..].to_string();
        assert!(log.contains("status=sent"), "the message is not in the log after the reload:\n{log}");
        // The host's own clock skew is Postfix talking about the machine,
        // not about the pasted lines (CI once saw "file system clock is 1
        // seconds ahead" from cleanup).
        let host_noise = ["file system clock is", "resetting file time stamps"];
        let warnings: Vec<&str> =
            log.lines().filter(|l| l.contains("warning:") && !host_noise.iter().any(|n| l.contains(n))).collect();
        assert!(warnings.is_empty(), "{doc}: Postfix warns: {warnings:#?}");
    }
}
