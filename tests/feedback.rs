//! Continuous learning against real peers: corrections forwarded through a
//! real Postfix to the milter, retraining in the daemon after each batch,
//! the gate refusing a poisoned batch, expiry, and PostgreSQL beside SQLite.
//!
//! Data: ../shared/data/support_tickets/train.jsonl, split by id into a dev
//! part (id % 5 == 1, as in the model figures) and a train part; 20 % of the
//! train part trains the first head, the rest comes back as corrections.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailtriage::learn::correction::{Channel, Correction};
use mailtriage::learn::store::{RecentRow, Store};
use mailtriage::model::lexical::TermCounts;
use serde_json::Value;
use support::{Daemon, Mail, Postfix, DOMAIN};

const TICKETS: &str = "../shared/data/support_tickets/train.jsonl";
const BATCHES: usize = 5;

struct Ticket {
    json: Value,
    id: u64,
}

impl Ticket {
    fn queue(&self) -> &str {
        self.json["queue"].as_str().unwrap()
    }
    fn subject(&self) -> &str {
        self.json["subject"].as_str().unwrap_or("")
    }
    fn body(&self) -> &str {
        self.json["body"].as_str().unwrap_or("")
    }
}

/// (initial 20 % of train, the other 80 %, all of train, dev).
fn splits() -> (Vec<Ticket>, Vec<Ticket>, Vec<Ticket>, Vec<Ticket>) {
    let text = std::fs::read_to_string(TICKETS)
        .unwrap_or_else(|e| panic!("{TICKETS}: {e} (CI has ../shared beside the clone)"));
    let (mut initial, mut rest, mut all, mut dev) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let json: Value = serde_json::from_str(line).unwrap();
        let id = u64::from_str_radix(json["id"].as_str().unwrap(), 16).unwrap();
        let t = || Ticket { json: json.clone(), id };
        if id % 5 == 1 {
            dev.push(t());
            continue;
        }
        all.push(t());
        if (id / 5).is_multiple_of(5) {
            initial.push(t());
        } else {
            rest.push(t());
        }
    }
    (initial, rest, all, dev)
}

fn write_jsonl(path: &Path, tickets: &[Ticket]) {
    let text: String = tickets.iter().map(|t| format!("{}\n", t.json)).collect();
    std::fs::write(path, text).unwrap();
}

fn slug(queue: &str) -> String {
    queue.to_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect()
}

/// One department per queue, each named by its slug and mapped to the queue label.
fn departments(tickets: &[Ticket]) -> String {
    let queues: BTreeSet<&str> = tickets.iter().map(Ticket::queue).collect();
    queues.iter().map(|q| format!("[[departments]]\nname = \"{}\"\nlabels = [\"{q}\"]\n\n", slug(q))).collect()
}

fn mailtriage(config: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_mailtriage")).arg("--config").arg(config).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "mailtriage {args:?} failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    text
}

fn macro_f1(config: &Path, head: &Path, dev: &Path) -> f64 {
    let out = mailtriage(
        config,
        &["eval", "--data", dev.to_str().unwrap(), "--label", "queue", "--head", head.to_str().unwrap(), "--json"],
    );
    let v: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    v["macro_f1"].as_f64().unwrap()
}

/// Lexical heads with the logistic loss, not the default hinge
/// (tests/model.rs trains with the defaults): retraining must keep the loss
/// a head records, and the gate test checks that with the one that is not
/// the default.
fn train(config: &Path, data: &Path, out: &Path) {
    mailtriage(
        config,
        &[
            "train",
            "--data",
            data.to_str().unwrap(),
            "--label",
            "queue",
            "--no-embeddings",
            "--loss",
            "logistic",
            "--out",
            out.to_str().unwrap(),
        ],
    );
}

/// A ticket forwarded as an attachment by a member of staff to the feedback
/// address of its right department.
fn forward(t: &Ticket, department: &str) -> Mail<'static> {
    let inner = format!(
        "From: Customer <customer{n}@client.example>\nTo: support@{DOMAIN}\nSubject: {subject}\nMessage-ID: <{n}@client.example>\n\
         Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n{body}\n",
        n = t.id,
        subject = t.subject(),
        body = t.body(),
    );
    Mail {
        from: "agent@test.example",
        rcpts: vec![format!("triage-feedback+{}@{DOMAIN}", slug(department))],
        data: format!(
            "From: Agent <agent@{DOMAIN}>\nTo: triage-feedback+{d}@{DOMAIN}\nSubject: Fwd: {subject}\nMIME-Version: 1.0\n\
             Content-Type: multipart/mixed; boundary=\"fwd-{n}\"\n\n--fwd-{n}\nContent-Type: text/plain\n\nwrong desk\n\
             --fwd-{n}\nContent-Type: message/rfc822\n\n{inner}\n--fwd-{n}--\n",
            d = slug(department),
            subject = t.subject(),
            n = t.id,
        ),
    }
}

/// The complete lines of a JSONL file another process is appending to (a
/// last line without its newline is still being written).
fn lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool, log: impl Fn() -> String) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}; daemon log tail:\n{}", tail(&log()));
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[test]
fn corrections_by_mail_retrain_the_head_in_five_batches_up_to_the_full_data_figure() {
    let (initial, rest, all, dev) = splits();
    let work = tempfile::Builder::new().prefix("mt-feedback.").tempdir_in("/tmp").unwrap();
    let w = work.path();
    let (initial_path, all_path, dev_path) = (w.join("initial.jsonl"), w.join("all.jsonl"), w.join("dev.jsonl"));
    write_jsonl(&initial_path, &initial);
    write_jsonl(&all_path, &all);
    write_jsonl(&dev_path, &dev);
    let heads = w.join("heads");
    let metrics_port = support::free_port();
    let token_file = w.join("token");
    std::fs::write(&token_file, "0123456789abcdef-token\n").unwrap();
    let batch_len = rest.len().div_ceil(BATCHES);
    let config = daemon_config(
        w,
        &all,
        metrics_port,
        &format!(
            r#"store = "sqlite://{w}/feedback.db"
heads_dir = "{heads}"
training_data = "{initial}"
dev_data = "{dev}"
retrain_after = {batch_len}
retrain_every = "1h"
http_token_file = "{token}""#,
            w = w.display(),
            heads = heads.display(),
            initial = initial_path.display(),
            dev = dev_path.display(),
            token = token_file.display(),
        ),
    );
    let config_path = w.join("mailtriage.toml");
    std::fs::write(&config_path, &config).unwrap();
    train(&config_path, &initial_path, &w.join("initial.safetensors"));
    train(&config_path, &all_path, &w.join("full.safetensors"));
    let f1_initial = macro_f1(&config_path, &w.join("initial.safetensors"), &dev_path);
    let f1_full = macro_f1(&config_path, &w.join("full.safetensors"), &dev_path);
    eprintln!("dev macro-F1: initial head (20 %) {f1_initial:.4}, all at once {f1_full:.4}");

    let daemon = Daemon::start(&config, false);
    // Discarded mail never reaches the queue manager, so it returns no
    // in-flow tokens: Postfix would pace a burst of feedback mail to one
    // message per second per connection (in_flow_delay).
    let postfix = Postfix::start(Some(&daemon.postfix_address()), "tempfail", &["in_flow_delay = 0s"]);
    let store = Store::open(&format!("sqlite://{}/feedback.db", w.display())).unwrap();
    let history = heads.join("history.jsonl");
    for (b, batch) in rest.chunks(batch_len).enumerate() {
        let mails: Vec<Mail> = batch.iter().map(|t| forward(t, t.queue())).collect();
        for chunk in mails.chunks(100) {
            let codes = support::send(postfix.smtp_port, chunk).unwrap();
            assert!(codes.iter().all(|&c| c == 250), "batch {b}: {codes:?}");
        }
        let expected = rest[..(b * batch_len + batch.len()).min(rest.len())].len();
        wait_until(
            "the corrections to be stored",
            Duration::from_secs(600),
            || store.load(0).unwrap().len() >= expected,
            || daemon.log(),
        );
        wait_until("the retraining", Duration::from_secs(600), || lines(&history).len() > b, || daemon.log());
        let h = &lines(&history)[b];
        eprintln!(
            "batch {b}: {} corrections stored; retraining {} ({}), dev macro-F1 {:.4} → {:.4}",
            expected,
            if h["promoted"] == true { "promoted" } else { "refused" },
            h["reason"],
            h["current"]["dev_macro_f1"].as_f64().unwrap(),
            h["candidate"]["dev_macro_f1"].as_f64().unwrap()
        );
    }
    // Feedback mail is recorded and delivered to nobody.
    assert!(postfix.all_delivered().is_empty(), "feedback mail was delivered");
    assert_eq!(store.load(0).unwrap().len(), rest.len());
    assert!(store.load(0).unwrap().iter().all(|c| c.channel == Channel::Mail && c.department.is_some()));

    // Every promoted version, measured independently, never drops; the last
    // is within 0.02 of the head trained on everything at once.
    let listed = mailtriage(&config_path, &["heads", "list", "--json"]);
    let versions: Vec<Value> = listed.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(!versions.is_empty(), "nothing was promoted:\n{}", tail(&daemon.log()));
    let mut previous = f1_initial;
    for v in &versions {
        let f1 = macro_f1(&config_path, Path::new(v["path"].as_str().unwrap()), &dev_path);
        eprintln!("{}: dev macro-F1 {f1:.4}", v["version"]);
        assert!(f1 >= previous - 1e-9, "{} dropped: {previous:.4} → {f1:.4}", v["version"]);
        previous = f1;
    }
    let last = versions.last().unwrap();
    assert_eq!(last["current"], true);
    assert!(previous > f1_initial, "no improvement over the initial head ({f1_initial:.4})");
    assert!(previous >= f1_full - 0.02, "final {previous:.4} is not within 0.02 of all-at-once {f1_full:.4}");

    // The daemon swapped the last version in without a restart.
    let n = last["number"].as_u64().unwrap();
    wait_until(
        "the promoted head to be in use",
        Duration::from_secs(60),
        || {
            support::http_get(metrics_port, "/metrics")
                .contains(&format!("mailtriage_head_version{{head=\"department\"}} {n}"))
        },
        || daemon.log(),
    );
    let metrics = support::http_get(metrics_port, "/metrics");
    assert!(metrics.contains("mailtriage_feedback_corrections_total{"), "{metrics}");
    assert!(metrics.contains("mailtriage_retrain_total{head=\"department\",result=\"promoted\"}"), "{metrics}");

    // Ordinary mail now carries the version; a correction by its Message-ID
    // (CLI → daemon over HTTP) is learned from the recent decision's features.
    let t = &dev[0];
    let ordinary = Mail {
        from: "customer@client.example",
        rcpts: vec![format!("user@{DOMAIN}")],
        data: format!(
            "From: c@client.example\nTo: user@{DOMAIN}\nSubject: {}\nMessage-ID: <recent-1@client.example>\n\n{}\n",
            t.subject(),
            t.body()
        ),
    };
    assert_eq!(support::send(postfix.smtp_port, &[ordinary]).unwrap(), [250]);
    let delivered = postfix.wait_delivered(1, Duration::from_secs(30));
    let version = support::header_values(&delivered[0].1, "X-Triage-Model-Version");
    assert_eq!(version, [format!("department=v{n} priority=none")]);
    let out = mailtriage(
        &config_path,
        &["feedback", "--message-id", "<recent-1@client.example>", "--department", &slug(t.queue())],
    );
    assert!(out.contains("recorded"), "{out}");
    let newest = store.load(0).unwrap().pop().unwrap();
    assert_eq!((newest.channel, newest.department.as_deref()), (Channel::Cli, Some(t.queue())));
    // An unknown Message-ID and a wrong token are refused.
    let refused = Command::new(env!("CARGO_BIN_EXE_mailtriage"))
        .arg("--config")
        .arg(&config_path)
        .args(["feedback", "--message-id", "never-seen@x", "--department", &slug(t.queue())])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("404"), "{}", String::from_utf8_lossy(&refused.stderr));

    // The report counts the decided message and every correction.
    let report: Value = serde_json::from_str(&mailtriage(&config_path, &["report", "--days", "1", "--json"])).unwrap();
    assert_eq!(report["messages"], 1, "{report}");
    assert_eq!(report["corrections"], rest.len() + 1, "{report}");
    assert_eq!(report["by_model"].as_u64().unwrap() + report["review"].as_u64().unwrap(), 1, "{report}");

    // Erasure on request (SQLite): the corrected message leaves no trace.
    let erased: Value = serde_json::from_str(&mailtriage(
        &config_path,
        &["forget", "--message-id", "<recent-1@client.example>", "--json"],
    ))
    .unwrap();
    assert_eq!(
        (&erased["corrections"], &erased["recent_decision"], &erased["audit"][0]["lines"]),
        (&Value::from(1), &Value::from(true), &Value::from(1)),
        "{erased}"
    );
    assert_eq!(store.load(0).unwrap().len(), rest.len());
    let report: Value = serde_json::from_str(&mailtriage(&config_path, &["report", "--days", "1", "--json"])).unwrap();
    assert_eq!(report["messages"], 0, "{report}");
}

fn correction(t: &Ticket, label: &str, created_at: i64) -> Correction {
    let text = format!("{}\n{}", t.subject().trim(), t.body().trim());
    Correction {
        id: 0,
        created_at,
        channel: Channel::Pipe,
        actor: "user:test".into(),
        message_hash: Some(format!("{:x}", t.id)),
        department: Some(label.to_string()),
        priority: None,
        language: mailtriage::message::language::detect(&text).to_string(),
        terms: TermCounts::of(&text, 18),
        encoder: None,
        embedding: None,
    }
}

/// A work directory the PostgreSQL server's user can read (0755), holding
/// initial.jsonl and dev.jsonl.
fn shared_workdir(prefix: &str, initial: &[Ticket], dev: &[Ticket]) -> tempfile::TempDir {
    let work = tempfile::Builder::new().prefix(prefix).tempdir_in("/tmp").unwrap();
    std::fs::set_permissions(work.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    write_jsonl(&work.path().join("initial.jsonl"), initial);
    write_jsonl(&work.path().join("dev.jsonl"), dev);
    work
}

/// The daemon's config in `w`: the tickets' departments, the initial head,
/// metrics, an audit trail in `w/audit/`, and `[feedback]` with the feedback
/// address plus `feedback` (store, heads, data, retraining, token).
fn daemon_config(w: &Path, all: &[Ticket], metrics_port: u16, feedback: &str) -> String {
    format!(
        r#"
[server]
milter_socket_mode = "0666"
progress_interval = "1s"

[defaults]
department = "general"

{departments}
[model]
department_head = "{w}/initial.safetensors"

[metrics]
listen = "127.0.0.1:{metrics_port}"

[audit]
path = "{w}/audit/audit.jsonl"
key_file = "{w}/audit.key"

[feedback]
address = "triage-feedback@{DOMAIN}"
{feedback}
"#,
        departments = departments(all),
        w = w.display(),
    )
}

/// A config for offline retraining against `store`.
fn offline_config(w: &Path, all: &[Ticket], store: &str, heads: &Path) -> PathBuf {
    let config = format!(
        r#"
[defaults]
department = "general"

{departments}
[model]
department_head = "{w}/initial.safetensors"

[feedback]
store = "{store}"
heads_dir = "{heads}"
training_data = "{w}/initial.jsonl"
dev_data = "{w}/dev.jsonl"
retrain = false
"#,
        departments = departments(all),
        w = w.display(),
        heads = heads.display(),
    );
    let path = heads.with_extension("toml");
    std::fs::write(&path, config).unwrap();
    path
}

fn retrain_json(config: &Path) -> Value {
    serde_json::from_str(mailtriage(config, &["retrain", "--json"]).lines().last().unwrap()).unwrap()
}

#[test]
fn the_gate_refuses_a_poisoned_batch_and_expired_corrections_are_deleted() {
    let (initial, rest, all, dev) = splits();
    let work = tempfile::Builder::new().prefix("mt-gate.").tempdir_in("/tmp").unwrap();
    let w = work.path();
    write_jsonl(&w.join("initial.jsonl"), &initial);
    write_jsonl(&w.join("dev.jsonl"), &dev);
    let store_url = format!("sqlite://{}/feedback.db", w.display());
    let config = offline_config(w, &all, &store_url, &w.join("heads"));
    train(&config, &w.join("initial.jsonl"), &w.join("initial.safetensors"));

    let batch = &rest[..rest.len() / BATCHES];
    let store = Store::open(&store_url).unwrap();
    let now = mailtriage::learn::correction::now();
    // Poisoned: every label moved to another class.
    let queues: Vec<&str> = all.iter().map(Ticket::queue).collect::<BTreeSet<_>>().into_iter().collect();
    for (i, t) in batch.iter().enumerate() {
        let k = queues.iter().position(|q| *q == t.queue()).unwrap();
        store.insert(&correction(t, queues[(k + 1 + i % (queues.len() - 1)) % queues.len()], now)).unwrap();
    }
    // One correction past the retention (180 days).
    store.insert(&correction(&rest[rest.len() - 1], rest[rest.len() - 1].queue(), now - 200 * 86_400)).unwrap();
    let poisoned = retrain_json(&config);
    assert_eq!(poisoned["promoted"], false, "{poisoned}");
    assert!(poisoned["reason"].as_str().unwrap().contains("drop"), "{poisoned}");
    assert!(
        store.load(0).unwrap().iter().all(|c| c.created_at >= now - 180 * 86_400),
        "the expired correction is still stored"
    );
    assert_eq!(store.load(0).unwrap().len(), batch.len());

    // The same messages with their right labels replace the poisoned ones
    // (same message, newer correction) and pass.
    for t in batch {
        store.insert(&correction(t, t.queue(), now)).unwrap();
    }
    let clean = retrain_json(&config);
    assert_eq!(clean["promoted"], true, "{clean}");
    assert!(clean["candidate"]["dev_macro_f1"].as_f64() >= clean["current"]["dev_macro_f1"].as_f64());
    let listed = mailtriage(&config, &["heads", "list"]);
    assert!(listed.contains("* department v1"), "{listed}");
    // The candidate was refitted with the loss the initial head records.
    assert_eq!(head_loss(&w.join("heads/department-v1.safetensors")), "logistic");
    mailtriage(&config, &["heads", "rollback", "v1"]);
}

/// The training loss a head file records (safetensors header → metadata).
fn head_loss(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let meta: Value = serde_json::from_str(header["__metadata__"]["meta"].as_str().unwrap()).unwrap();
    meta["dev_metrics"]["loss"].as_str().unwrap_or_else(|| panic!("no loss in {meta}")).to_string()
}

/// A private PostgreSQL server (Debian's `postgresql` package) on a free port.
struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

fn as_postgres(args: &[&str]) {
    let out = Command::new("runuser").args(["-u", "postgres", "--"]).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What [`Postgres::start_tls`] made: the CA that signed the server's
/// certificate (for `localhost` only), a second CA that signed nothing of
/// it, and the password file of the `postgres` role.
struct Tls {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    other_ca: PathBuf,
    password_file: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().expect("openssl (Debian package openssl)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Postgres {
    fn start() -> Postgres {
        Self::start_with(None)
    }

    /// A server that speaks TLS only (pg_hba rejects plain TCP), with
    /// SCRAM passwords; its certificate names `localhost`, not 127.0.0.1.
    fn start_tls() -> (Postgres, Tls) {
        let certs = tempfile::Builder::new().prefix("mt-pgtls.").tempdir_in("/tmp").unwrap();
        let c = certs.path();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        for ca in ["ca", "other-ca"] {
            let (key, pem, subj) = (format!("{ca}.key"), format!("{ca}.pem"), format!("/CN=mailtriage test {ca}"));
            openssl(
                c,
                &[&["req", "-x509"][..], &ec, &["-keyout", &key, "-out", &pem, "-days", "2", "-subj", &subj]].concat(),
            );
        }
        openssl(
            c,
            &[&["req"][..], &ec, &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]].concat(),
        );
        std::fs::write(c.join("san.ext"), "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n").unwrap();
        openssl(
            c,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "2",
                "-extfile",
                "san.ext",
            ],
        );
        let (ca, other_ca, password_file) = (c.join("ca.pem"), c.join("other-ca.pem"), c.join("pgpass"));
        std::fs::write(&password_file, "s3cret-for-the-cluster\n").unwrap();
        let pg = Self::start_with(Some(&|data: &Path| {
            for f in ["server.crt", "server.key"] {
                std::fs::copy(c.join(f), data.join(f)).unwrap();
            }
            let conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
            std::fs::write(
                data.join("postgresql.conf"),
                format!("{conf}\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\npassword_encryption = 'scram-sha-256'\n"),
            )
            .unwrap();
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\nhostnossl all all 127.0.0.1/32 reject\n",
            )
            .unwrap();
        }));
        let socket = pg.dir.path().display().to_string();
        let port = pg.port.to_string();
        as_postgres(&[
            pg.bin.join("psql").to_str().unwrap(),
            "-h",
            &socket,
            "-p",
            &port,
            "-U",
            "postgres",
            "-c",
            "ALTER ROLE postgres PASSWORD 's3cret-for-the-cluster'",
        ]);
        (pg, Tls { _dir: certs, ca, other_ca, password_file })
    }

    /// initdb, then `setup(data_dir)` (as root, before the files go to the
    /// server's user), then start.
    fn start_with(setup: Option<&dyn Fn(&Path)>) -> Postgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|rd| rd.flatten().map(|e| e.path().join("bin")).find(|b| b.join("initdb").exists()))
            .expect("PostgreSQL not found: install the Debian package `postgresql` (scripts/test.sh does this)");
        let dir = tempfile::Builder::new().prefix("mt-pg.").tempdir_in("/tmp").unwrap();
        let data = dir.path().join("data");
        let chown = Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()).status().unwrap();
        assert!(chown.success());
        as_postgres(&[
            bin.join("initdb").to_str().unwrap(),
            "-D",
            data.to_str().unwrap(),
            "-U",
            "postgres",
            "--auth=trust",
        ]);
        if let Some(setup) = setup {
            setup(&data);
            let chown = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&data).status().unwrap();
            assert!(chown.success());
            let key = data.join("server.key");
            if key.exists() {
                std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
            }
        }
        let pg = Postgres { dir, bin, port: support::free_port() };
        pg.up();
        pg
    }

    /// Starts the server (again) on its port.
    fn up(&self) {
        let opts = format!("-p {} -k {} -c listen_addresses=127.0.0.1", self.port, self.dir.path().display());
        as_postgres(&[
            self.bin.join("pg_ctl").to_str().unwrap(),
            "-D",
            self.dir.path().join("data").to_str().unwrap(),
            "-o",
            &opts,
            "-l",
            self.dir.path().join("log").to_str().unwrap(),
            "-w",
            "start",
        ]);
    }

    /// Stops the server at once, as a crash or a failover would.
    fn down(&self) {
        as_postgres(&[
            self.bin.join("pg_ctl").to_str().unwrap(),
            "-D",
            self.dir.path().join("data").to_str().unwrap(),
            "-m",
            "immediate",
            "stop",
        ]);
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

#[test]
fn postgresql_store_gives_the_same_retraining_as_sqlite() {
    support::require("postfix", "postfix"); // root, as the server switches users
    let (initial, rest, all, dev) = splits();
    let work = shared_workdir("mt-pgsq.", &initial, &dev);
    let w = work.path();
    let pg = Postgres::start();
    let sqlite_url = format!("sqlite://{}/feedback.db", w.display());
    let sqlite_cfg = offline_config(w, &all, &sqlite_url, &w.join("heads-sqlite"));
    let pg_cfg = offline_config(w, &all, &pg.url(), &w.join("heads-pg"));
    train(&sqlite_cfg, &w.join("initial.jsonl"), &w.join("initial.safetensors"));
    let now = mailtriage::learn::correction::now();
    let stores = [Store::open(&sqlite_url).unwrap(), Store::open(&pg.url()).unwrap()];
    for t in &rest[..rest.len() / BATCHES] {
        for s in &stores {
            s.insert(&correction(t, t.queue(), now)).unwrap();
        }
    }
    assert_eq!(stores[0].load(0).unwrap(), stores[1].load(0).unwrap());
    // The daemon calls the store from tokio's blocking pool; the synchronous
    // PostgreSQL client runs its own runtime there without complaint.
    let url = pg.url();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let n = rt.block_on(async move {
        tokio::task::spawn_blocking(move || Store::open(&url).unwrap().count_after(0).unwrap()).await.unwrap()
    });
    assert_eq!(n as usize, rest.len() / BATCHES);
    let (a, b) = (retrain_json(&sqlite_cfg), retrain_json(&pg_cfg));
    for key in ["promoted", "reason", "current", "candidate", "reservoir", "held_back"] {
        assert_eq!(a[key], b[key], "{key} differs: sqlite {a} vs postgres {b}");
    }
}

/// The fenced code blocks of docs/feedback.md's Dovecot section, in order.
fn dovecot_recipe() -> Vec<String> {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/feedback.md")).unwrap();
    let section = doc.split("## Dovecot: learn from").nth(1).unwrap().split("\n## ").next().unwrap();
    section
        .split("```")
        .skip(1)
        .step_by(2)
        .map(|b| b.split_once('\n').map_or(b, |(_, body)| body).to_string())
        .collect()
}

/// Sends one IMAP command and reads to its tagged reply; returns everything read.
fn imap(r: &mut std::io::BufReader<std::net::TcpStream>, tag: &str, command: &[u8]) -> String {
    use std::io::{BufRead, Write};
    r.get_mut().write_all(command).unwrap();
    let mut all = String::new();
    loop {
        let mut line = String::new();
        assert!(r.read_line(&mut line).unwrap() > 0, "IMAP server closed after {all}");
        all.push_str(&line);
        if line.starts_with(&format!("{tag} ")) {
            assert!(line.starts_with(&format!("{tag} OK")), "{all}");
            return all;
        }
    }
}

#[test]
fn the_documented_dovecot_imapsieve_recipe_records_a_moved_message() {
    support::require("dovecot", "dovecot-core");
    assert!(Path::new("/usr/lib/dovecot/imap").exists(), "install the Debian package `dovecot-imapd`");
    assert!(Path::new("/usr/bin/sievec").exists(), "install the Debian package `dovecot-sieve`");
    let (initial, _, all, _) = splits();
    let work = tempfile::Builder::new().prefix("mt-imapsieve.").tempdir_in("/tmp").unwrap();
    let root = work.path();
    std::fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    for d in ["sieve-pipe", "store"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    // The pipe runs as the mail user (here nobody): it writes the store.
    assert!(Command::new("chown").arg("65534:65534").arg(root.join("store")).status().unwrap().success());
    write_jsonl(&root.join("initial.jsonl"), &initial[..200]);
    let config = root.join("mailtriage.toml");
    std::fs::write(
        &config,
        format!(
            "[defaults]\ndepartment = \"general\"\n\n{}[model]\ndepartment_head = \"{r}/head.safetensors\"\n\n\
             [feedback]\nstore = \"sqlite://{r}/store/feedback.db\"\nheads_dir = \"{r}/heads\"\nretrain = false\n",
            departments(&all),
            r = root.display()
        ),
    )
    .unwrap();
    train(&config, &root.join("initial.jsonl"), &root.join("head.safetensors"));

    // The recipe, as documented, with this machine's paths.
    let blocks = dovecot_recipe();
    assert_eq!(blocks.len(), 3, "docs/feedback.md: expected the Dovecot config, the sieve script and the pipe script");
    let sieve = root.join("mailtriage-feedback.sieve");
    let pipe_dir = root.join("sieve-pipe");
    let recipe_conf = blocks[0]
        .replace("/etc/dovecot/sieve/mailtriage-feedback.sieve", sieve.to_str().unwrap())
        .replace("/usr/local/lib/dovecot/sieve-pipe", pipe_dir.to_str().unwrap());
    std::fs::write(&sieve, &blocks[1]).unwrap();
    // The mail user must be able to run the binary: the checkout may sit in a
    // directory only its owner can enter (a CI clone in a `mktemp -d`).
    let binary = root.join("mailtriage");
    std::fs::copy(env!("CARGO_BIN_EXE_mailtriage"), &binary).unwrap();
    std::fs::set_permissions(&binary, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let script = blocks[2]
        .replace("/usr/bin/mailtriage", binary.to_str().unwrap())
        .replace("/etc/mailtriage/mailtriage.toml", config.to_str().unwrap());
    let script_path = pipe_dir.join("mailtriage-feedback");
    std::fs::write(&script_path, script).unwrap();
    std::fs::set_permissions(&script_path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let extra = format!("namespace inbox {{\n  inbox = yes\n  separator = /\n}}\n{recipe_conf}");
    let dovecot = support::Dovecot::start_with(&["alice"], "imap", &extra, |conf| {
        // As `sievec script` does with the system's dovecot.conf and conf.d.
        let compiled = Command::new("sievec").arg("-c").arg(conf).arg(&sieve).output().unwrap();
        assert!(compiled.status.success(), "sievec: {}", String::from_utf8_lossy(&compiled.stderr));
    });
    let port = dovecot.port;
    let log = || dovecot.log();

    // A member of staff moves a ticket into Departments/<its department>.
    let t = &all[0];
    let message = format!(
        "From: c@client.example\r\nSubject: {}\r\nMessage-ID: <imap-1@client.example>\r\n\r\n{}\r\n",
        t.subject(),
        t.body().replace('\n', "\r\n")
    );
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut r = std::io::BufReader::new(stream);
    let mut greeting = String::new();
    std::io::BufRead::read_line(&mut r, &mut greeting).unwrap();
    imap(&mut r, "a", b"a LOGIN alice secret\r\n");
    let folder = format!("Departments/{}", slug(t.queue()));
    imap(&mut r, "b", format!("b CREATE \"{folder}\"\r\n").as_bytes());
    let mut append = format!("c APPEND INBOX {{{}+}}\r\n", message.len()).into_bytes();
    append.extend_from_slice(message.as_bytes());
    append.extend_from_slice(b"\r\n");
    imap(&mut r, "c", &append);
    imap(&mut r, "d", b"d SELECT INBOX\r\n");
    imap(&mut r, "e", format!("e MOVE 1 \"{folder}\"\r\n").as_bytes());
    imap(&mut r, "f", b"f LOGOUT\r\n");

    let store = Store::open(&format!("sqlite://{}/store/feedback.db", root.display())).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.load(0).unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no correction recorded; dovecot log:\n{}", log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let c = &store.load(0).unwrap()[0];
    assert_eq!((c.channel, c.department.as_deref()), (Channel::Pipe, Some(t.queue())));
    assert!(c.actor.starts_with("user:"), "{}", c.actor);
}

/// `mailtriage` with a message on stdin: (exit code, stdout + stderr).
fn mailtriage_status(config: &Path, args: &[&str], stdin: &str) -> (i32, String) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_mailtriage"))
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// `POST path` with the bearer token: the whole answer.
fn post(port: u16, token: &str, path: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "POST {path} HTTP/1.1\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n{body}", body.len())
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Lines of every audit file (current and rotated) that carry `hash`.
fn audit_lines_with(dir: &Path, hash: &str) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("audit.jsonl"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap().lines().filter(|l| l.contains(hash)).count())
        .sum()
}

/// Fault injection and erasure on the shared store: PostgreSQL dies while
/// corrections arrive by mail, HTTP, the CLI and the pipe. Each channel
/// answers "retry later" (SMTP 4xx from Postfix, HTTP 503 with Retry-After,
/// exit code 75), mail keeps being decided, nothing is half-written, and once
/// the server is back every retried correction is stored exactly once. Then
/// `forget` erases a message's every trace (store, recent window, audit
/// lines) through the daemon, a sender's corrections, and, with the daemon
/// stopped, a message on its own.
#[test]
fn postgresql_going_away_loses_no_correction_and_forget_erases_every_trace() {
    support::require("postfix", "postfix");
    let (initial, _rest, all, dev) = splits();
    let work = shared_workdir("mt-pgfault.", &initial, &dev);
    let w = work.path();
    let pg = Postgres::start();
    let metrics_port = support::free_port();
    let token = "0123456789abcdef-token";
    std::fs::write(w.join("token"), token).unwrap();
    let config = daemon_config(
        w,
        &all,
        metrics_port,
        &format!(
            r#"store = "{store}"
heads_dir = "{w}/heads"
training_data = "{w}/initial.jsonl"
dev_data = "{w}/dev.jsonl"
retrain = false
http_token_file = "{w}/token""#,
            w = w.display(),
            store = pg.url(),
        ),
    );
    let config_path = w.join("mailtriage.toml");
    std::fs::write(&config_path, &config).unwrap();
    train(&config_path, &w.join("initial.jsonl"), &w.join("initial.safetensors"));
    let daemon = Daemon::start(&config, false);
    let postfix = Postfix::start(Some(&daemon.postfix_address()), "accept", &["in_flow_delay = 0s"]);
    let store = Store::open(&pg.url()).unwrap();
    let ordinary = |n: usize| Mail {
        from: "customer@client.example",
        rcpts: vec![format!("user@{DOMAIN}")],
        data: format!(
            "From: c@client.example\nTo: user@{DOMAIN}\nSubject: {}\nMessage-ID: <pg-{n}@client.example>\n\n{}\n",
            dev[n].subject(),
            dev[n].body()
        ),
    };
    assert_eq!(support::send(postfix.smtp_port, &[ordinary(0)]).unwrap(), [250]);
    postfix.wait_delivered(1, Duration::from_secs(30));
    let label = slug(dev[0].queue());
    let by_id = format!(r#"{{"message_id":"<pg-0@client.example>","department":"{label}"}}"#);
    let piped =
        format!("From: a@{DOMAIN}\nSubject: {}\nMessage-ID: <piped@{DOMAIN}>\n\n{}\n", dev[1].subject(), dev[1].body());
    let pipe_args = ["feedback", "--department", label.as_str()];
    let cli_args = ["feedback", "--message-id", "<pg-0@client.example>", "--department", label.as_str()];

    pg.down();
    let tempfailed = support::send(postfix.smtp_port, &[forward(&dev[2], dev[2].queue())]).unwrap();
    assert!(tempfailed[0] / 100 == 4, "feedback mail while the store is down: {tempfailed:?}");
    let http = post(metrics_port, token, "/feedback", &by_id);
    assert!(http.starts_with("HTTP/1.1 503") && http.contains("Retry-After: 30"), "{http}");
    let (code, out) = mailtriage_status(&config_path, &cli_args, "");
    assert_eq!(code, 75, "{out}");
    let (code, out) = mailtriage_status(&config_path, &pipe_args, &piped);
    assert_eq!(code, 75, "{out}");
    assert!(out.contains("retry later"), "{out}");
    let (code, out) = mailtriage_status(&config_path, &["forget", "--message-id", "<pg-0@client.example>"], "");
    assert_eq!(code, 75, "{out}");
    // Mail that is not a correction is still decided and delivered.
    assert_eq!(support::send(postfix.smtp_port, &[ordinary(3)]).unwrap(), [250]);
    let delivered = postfix.wait_delivered(2, Duration::from_secs(30));
    assert!(delivered.iter().all(|(_, m)| !support::header_values(m, "X-Triage-Department").is_empty()));
    assert!(daemon.wait_log("feedback store", 1), "{}", daemon.log());

    pg.up();
    assert_eq!(support::send(postfix.smtp_port, &[forward(&dev[2], dev[2].queue())]).unwrap(), [250]);
    assert!(post(metrics_port, token, "/feedback", &by_id).starts_with("HTTP/1.1 200"));
    let (code, out) = mailtriage_status(&config_path, &pipe_args, &piped);
    assert_eq!(code, 0, "{out}");
    let stored = store.load(0).unwrap();
    let mut channels: Vec<Channel> = stored.iter().map(|c| c.channel).collect();
    channels.sort_by_key(|c| c.as_str());
    assert_eq!(channels, [Channel::Http, Channel::Mail, Channel::Pipe], "each retried correction exactly once");

    // Erasure of one message through the daemon: its correction, its recent decision, its audit lines.
    let key = std::fs::read(w.join("audit.key")).unwrap();
    let pseudonyms = mailtriage::record::pseudonym::Pseudonyms::keyed(key);
    let hash = pseudonyms.message_id("<pg-0@client.example>");
    assert_eq!(audit_lines_with(&w.join("audit"), &hash), 1);
    let out = mailtriage(&config_path, &["forget", "--message-id", "<pg-0@client.example>", "--json"]);
    let erased: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(erased["corrections"], 1, "{out}");
    assert_eq!(erased["recent_decision"], true, "{out}");
    assert_eq!(erased["audit"][0]["lines"], 1, "{out}");
    assert_eq!(audit_lines_with(&w.join("audit"), &hash), 0);
    assert!(store.load(0).unwrap().iter().all(|c| c.message_hash.as_deref() != Some(hash.as_str())));
    assert!(post(metrics_port, token, "/feedback", &by_id).starts_with("HTTP/1.1 404"), "the recent decision is gone");
    // The daemon still audits into the rewritten file.
    assert_eq!(support::send(postfix.smtp_port, &[ordinary(4)]).unwrap(), [250]);
    postfix.wait_delivered(3, Duration::from_secs(30));
    assert_eq!(audit_lines_with(&w.join("audit"), &pseudonyms.message_id("<pg-4@client.example>")), 1);
    // A sender's corrections (the forwarded mail's agent).
    let out = mailtriage(&config_path, &["forget", "--sender", "Agent@test.example"]);
    assert!(out.contains("1 correction(s) deleted"), "{out}");
    assert!(store.load(0).unwrap().iter().all(|c| c.channel != Channel::Mail));
    // With the daemon stopped, forget does it alone.
    drop(postfix);
    drop(daemon);
    let out = mailtriage(&config_path, &["forget", "--message-id", format!("<piped@{DOMAIN}>").as_str()]);
    assert!(out.contains("1 correction(s) deleted") && out.contains("no daemon listens"), "{out}");
    assert!(store.load(0).unwrap().is_empty());
}

/// The store's rows as the test reads them (psql over the server's socket).
fn psql(pg: &Postgres, sql: &str) -> String {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(pg.bin.join("psql"))
        .args(["-h", &pg.dir.path().display().to_string(), "-p", &pg.port.to_string(), "-U", "postgres"])
        .args(["-XAtq", "-c", sql])
        .output()
        .unwrap();
    assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A fake PostgreSQL server without TLS: it answers the client's SSLRequest with `N`.
fn plain_only_server() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            use std::io::{Read, Write};
            let mut s = s;
            let mut request = [0u8; 8];
            if s.read_exact(&mut request).is_ok() {
                let _ = s.write_all(b"N");
                let _ = s.read(&mut [0u8; 512]);
            }
        }
    });
    port
}

#[test]
fn three_instances_share_one_postgresql_over_tls_one_retrains_all_follow_and_a_killed_leader_is_replaced() {
    support::require("postfix", "postfix");
    let (initial, rest, all, dev) = splits();
    let work = shared_workdir("mt-cluster.", &initial, &dev);
    let w = work.path();
    let (pg, tls) = Postgres::start_tls();
    let url = |host: &str, mode: &str, ca: &Path| {
        format!("postgres://postgres@{host}:{}/postgres?sslmode={mode}&sslrootcert={}", pg.port, ca.display())
    };
    let good = url("localhost", "verify-full", &tls.ca);
    let token = "0123456789abcdef-token";
    std::fs::write(w.join("token"), token).unwrap();
    // One audit key for all: pseudonyms (and so lookups by Message-ID) must agree.
    std::fs::write(w.join("audit.key"), [7u8; 32]).unwrap();
    let batch = rest.len() / 4;
    let config_of = |i: usize, metrics_port: u16, store: &str| {
        daemon_config(
            w,
            &all,
            metrics_port,
            &format!(
                r#"store = "{store}"
store_password_file = "{pw}"
heads_dir = "{w}/heads-{i}"
training_data = "{w}/initial.jsonl"
dev_data = "{w}/dev.jsonl"
retrain_after = {batch}
retrain_every = "1h"
http_token_file = "{w}/token""#,
                w = w.display(),
                pw = tls.password_file.display(),
            ),
        )
        .replace("/audit/audit.jsonl", &format!("/audit-{i}/audit.jsonl"))
    };
    let check = |config: &str| {
        let path = w.join("check.toml");
        std::fs::write(&path, config).unwrap();
        mailtriage_status(&path, &["check-config"], "")
    };

    let config_path = w.join("mailtriage.toml");
    std::fs::write(&config_path, config_of(0, support::free_port(), &good)).unwrap();
    train(&config_path, &w.join("initial.jsonl"), &w.join("initial.safetensors"));

    // TLS as configured: verified for the name the certificate carries, and nothing less.
    let (code, out) = check(&config_of(9, support::free_port(), &good));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("PostgreSQL") && out.contains("certificate verified for `localhost`"), "{out}");
    assert!(out.contains("TLSv1.3") || out.contains("TLSv1.2"), "{out}");
    for (store, why) in [
        (url("127.0.0.1", "verify-full", &tls.ca), "invalid peer certificate"),
        (url("localhost", "verify-full", &tls.other_ca), "UnknownIssuer"),
        (format!("postgres://postgres@localhost:{}/postgres?sslmode=disable", pg.port), "no encryption"),
        (
            url("localhost", "verify-full", &tls.ca).replace(&pg.port.to_string(), &plain_only_server().to_string()),
            "TLS",
        ),
    ] {
        let (code, out) = check(&config_of(9, support::free_port(), &store));
        assert_ne!(code, 0, "{store} was accepted: {out}");
        assert!(out.contains(why), "{store}: {out}");
    }
    // verify-ca checks the chain only: the IP address is acceptable there.
    let (code, out) = check(&config_of(9, support::free_port(), &url("127.0.0.1", "verify-ca", &tls.ca)));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("name not checked"), "{out}");

    struct Instance {
        daemon: Option<Daemon>,
        postfix: Postfix,
        metrics: u16,
        config: PathBuf,
    }
    let mut cluster: Vec<Instance> = (0..3)
        .map(|i| {
            let metrics = support::free_port();
            let config = config_of(i, metrics, &good);
            let config_path = w.join(format!("instance-{i}.toml"));
            std::fs::write(&config_path, &config).unwrap();
            let daemon = Daemon::start(&config, false);
            let postfix = Postfix::start(Some(&daemon.postfix_address()), "tempfail", &["in_flow_delay = 0s"]);
            Instance { daemon: Some(daemon), postfix, metrics, config: config_path }
        })
        .collect();
    let logs = |cluster: &[Instance]| -> String {
        cluster.iter().filter_map(|c| c.daemon.as_ref()).map(|d| tail(&d.log())).collect::<Vec<_>>().join("\n----\n")
    };
    let leader_of = |cluster: &[Instance]| -> Vec<usize> {
        (0..cluster.len())
            .filter(|&i| cluster[i].daemon.as_ref().is_some_and(|d| d.log().contains("retraining leader")))
            .collect()
    };
    wait_until(
        "a leader and two followers",
        Duration::from_secs(30),
        || {
            leader_of(&cluster).len() == 1
                && cluster.iter().filter(|c| c.daemon.as_ref().unwrap().log().contains("retraining follower")).count()
                    == 2
        },
        || logs(&cluster),
    );

    // Decided by A, corrected by Message-ID through B's HTTP endpoint and C's CLI.
    let ordinary = |n: usize| Mail {
        from: "customer@client.example",
        rcpts: vec![format!("user@{DOMAIN}")],
        data: format!(
            "From: c@client.example\nTo: user@{DOMAIN}\nSubject: {}\nMessage-ID: <cl-{n}@client.example>\n\n{}\n",
            dev[n].subject(),
            dev[n].body()
        ),
    };
    assert_eq!(support::send(cluster[0].postfix.smtp_port, &[ordinary(0), ordinary(1)]).unwrap(), [250, 250]);
    cluster[0].postfix.wait_delivered(2, Duration::from_secs(30));
    let label = slug(dev[0].queue());
    let by_id = format!(r#"{{"message_id":"<cl-0@client.example>","department":"{label}"}}"#);
    let answer = std::cell::RefCell::new(String::new());
    wait_until(
        "B to find A's decision",
        Duration::from_secs(10),
        || {
            *answer.borrow_mut() = post(cluster[1].metrics, token, "/feedback", &by_id);
            answer.borrow().starts_with("HTTP/1.1 200")
        },
        || answer.borrow().clone(),
    );
    let out = mailtriage(
        &cluster[2].config,
        &["feedback", "--message-id", "<cl-1@client.example>", "--department", &slug(dev[1].queue())],
    );
    assert!(out.contains("recorded"), "{out}");
    assert_eq!(psql(&pg, "SELECT string_agg(channel, ',' ORDER BY id) FROM mailtriage_corrections"), "http,cli");

    // Erasure through C reaches A's audit trail (A decided the message) and the shared rows.
    let hash = mailtriage::record::pseudonym::Pseudonyms::keyed(vec![7u8; 32]).message_id("<cl-0@client.example>");
    assert_eq!(audit_lines_with(&w.join("audit-0"), &hash), 1);
    let out = mailtriage(&cluster[2].config, &["forget", "--message-id", "<cl-0@client.example>"]);
    assert!(out.contains("1 correction(s) deleted") && out.contains("every instance"), "{out}");
    wait_until(
        "A to erase its audit line",
        Duration::from_secs(35),
        || audit_lines_with(&w.join("audit-0"), &hash) == 0,
        || logs(&cluster),
    );
    assert_eq!(psql(&pg, &format!("SELECT COUNT(*) FROM mailtriage_recent WHERE message_hash = '{hash}'")), "0");
    assert_eq!(psql(&pg, "SELECT string_agg(channel, ',' ORDER BY id) FROM mailtriage_corrections"), "cli");

    // A batch of corrections: exactly one instance retrains, all serve the promotion.
    let store = Arc::new(Store::open_with(&good, Some(&tls.password_file)).unwrap());
    for t in &rest[..batch] {
        store.insert(&correction(t, t.queue(), mailtriage::learn::correction::now())).unwrap();
    }
    wait_until(
        "the first retraining",
        Duration::from_secs(300),
        || psql(&pg, "SELECT COUNT(*) FROM mailtriage_retrain_history") == "1",
        || logs(&cluster),
    );
    let promoted_at = Instant::now();
    assert_eq!(psql(&pg, "SELECT promoted_number FROM mailtriage_retrain_history"), "1", "{}", logs(&cluster));
    let retrained: Vec<usize> =
        (0..3).filter(|&i| cluster[i].daemon.as_ref().unwrap().log().contains("retraining started")).collect();
    assert_eq!(retrained, leader_of(&cluster), "only the leader retrains");
    let serving = |c: &Instance, v: u32| {
        support::http_get(c.metrics, "/metrics")
            .contains(&format!("mailtriage_head_version{{head=\"department\"}} {v}"))
    };
    wait_until(
        "all three to serve v1",
        Duration::from_secs(20),
        || cluster.iter().all(|c| serving(c, 1)),
        || logs(&cluster),
    );
    eprintln!("promotion to all three serving it: {:.1} s", promoted_at.elapsed().as_secs_f64());
    for (i, c) in cluster.iter().enumerate() {
        assert_eq!(support::send(c.postfix.smtp_port, &[ordinary(2 + i)]).unwrap(), [250]);
        let delivered = c.postfix.wait_delivered(if i == 0 { 3 } else { 1 }, Duration::from_secs(30));
        let last = delivered.iter().find(|(_, m)| m.contains(&format!("<cl-{}@client.example>", 2 + i))).unwrap();
        assert_eq!(support::header_values(&last.1, "X-Triage-Model-Version"), ["department=v1 priority=none"]);
    }

    // The leader is killed mid-retraining: another takes over, loses no correction, promotes at most once.
    let first = leader_of(&cluster)[0];
    for t in &rest[batch..2 * batch] {
        store.insert(&correction(t, t.queue(), mailtriage::learn::correction::now())).unwrap();
    }
    let newest = store.max_id().unwrap();
    wait_until(
        "the leader to start retraining",
        Duration::from_secs(60),
        || cluster[first].daemon.as_ref().unwrap().log().matches("retraining started").count() >= 2,
        || logs(&cluster),
    );
    cluster[first].daemon.as_mut().unwrap().kill();
    let killed_log = cluster[first].daemon.take().unwrap().log();
    eprintln!(
        "leader killed {} its second retraining",
        if killed_log.matches("retrained").count() >= 2 { "after finishing" } else { "during" }
    );
    wait_until("a new leader", Duration::from_secs(30), || !leader_of(&cluster).is_empty(), || logs(&cluster));
    wait_until(
        "the retraining of the second batch",
        Duration::from_secs(300),
        || psql(&pg, &format!("SELECT COUNT(*) FROM mailtriage_retrain_history WHERE through_id >= {newest}")) == "1",
        || format!("{}\nkilled leader:\n{}", logs(&cluster), tail(&killed_log)),
    );
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        psql(&pg, &format!("SELECT COUNT(*) FROM mailtriage_retrain_history WHERE through_id >= {newest}")),
        "1"
    );
    assert_eq!(psql(&pg, "SELECT COUNT(*) FROM mailtriage_corrections"), (2 * batch + 1).to_string());
    let versions: u32 = psql(&pg, "SELECT COUNT(*) FROM mailtriage_heads").parse().unwrap();
    assert!(versions == 1 || versions == 2, "{versions} versions");

    // A version promoted from anywhere reaches the survivors; `heads rollback` on C brings back v1 everywhere.
    let survivors: Vec<usize> = (0..3).filter(|&i| cluster[i].daemon.is_some()).collect();
    let mut head = mailtriage::model::head::Head::load(&w.join("initial.safetensors")).unwrap();
    let registry = mailtriage::learn::store::heads::Registry::with_store(w.join("heads-test"), store.clone());
    let v = registry.promote(mailtriage::learn::store::heads::Role::Department, &mut head).unwrap();
    let n: u32 = v.trim_start_matches('v').parse().unwrap();
    assert_eq!(n, versions + 1);
    wait_until(
        "the survivors to serve the new version",
        Duration::from_secs(20),
        || survivors.iter().all(|&i| serving(&cluster[i], n)),
        || logs(&cluster),
    );
    let rolled = Instant::now();
    let out = mailtriage(&cluster[2].config, &["heads", "rollback", "v1", "--head", "department"]);
    assert!(out.contains("every instance sharing the store"), "{out}");
    wait_until(
        "the survivors to serve v1 again",
        Duration::from_secs(20),
        || survivors.iter().all(|&i| serving(&cluster[i], 1)),
        || logs(&cluster),
    );
    eprintln!("rollback to all survivors serving it: {:.1} s", rolled.elapsed().as_secs_f64());

    // The daemons shared what they decided; the store's size per 10,000
    // decisions (lexical features of real tickets; with a 384-float embedding).
    assert!(store.recent_size().unwrap().0 >= 4, "four decisions (one erased) were shared");
    for dim in [0usize, 384] {
        psql(&pg, "TRUNCATE mailtriage_recent");
        let rows: Vec<RecentRow> = (0..10_000)
            .map(|i| {
                let t = &all[i % all.len()];
                RecentRow {
                    hash: format!("{i:032x}"),
                    decided_at: mailtriage::learn::correction::now(),
                    language: "en".into(),
                    terms: TermCounts::of(&format!("{}\n{}", t.subject(), t.body()), 18).to_bytes(),
                    encoder: (dim > 0).then(|| "sentence-transformers/all-MiniLM-L6-v2".into()),
                    embedding: (dim > 0).then(|| (0..dim).flat_map(|k| ((k * i) as f32).sin().to_le_bytes()).collect()),
                }
            })
            .collect();
        for chunk in rows.chunks(500) {
            store.put_recent(chunk).unwrap();
        }
        psql(&pg, "VACUUM ANALYZE mailtriage_recent");
        let (n, bytes) = store.recent_size().unwrap();
        assert_eq!(n, 10_000);
        eprintln!(
            "shared recent decisions, embedding dim {dim}: {n} rows, {:.1} MB (table + TOAST + indexes)",
            bytes as f64 / 1e6
        );
    }
}

/// Labeled tickets of three head labels, two of which one department claims
/// (`billing`: "Billing and Payments" and "Refunds"), made up here so the
/// test needs no shared data.
fn made_up_tickets() -> String {
    let topics = [
        ("Billing and Payments", ["invoice", "payment", "charged", "bank transfer", "receipt"]),
        ("Refunds", ["refund", "money back", "return", "reimburse", "cancel order"]),
        ("Technical Support", ["crash", "error", "login fails", "server down", "bug"]),
    ];
    let mut out = String::new();
    for (label, words) in topics {
        for i in 0..16 {
            let (a, b) = (words[i % 5], words[(i + 2) % 5]);
            let line = serde_json::json!({
                "subject": format!("{a} question {i}"),
                "body": format!("Hello, about the {a} and the {b}: please help, ticket {i}."),
                "queue": label,
            });
            out.push_str(&format!("{line}\n"));
        }
    }
    out
}

/// The sum of a metric's series in Prometheus text, and its lines.
fn metric(text: &str, name: &str) -> (f64, Vec<String>) {
    let lines: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .map(String::from)
        .collect();
    (lines.iter().filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum(), lines)
}

/// What the mail admin saw (issue 31, point 9), through a real Postfix:
/// every refused correction is counted (a 404 and a 422 make 2), every
/// channel answers a recorded correction with the same line naming the
/// department and the head label it trains, the staff minutes saved never
/// go negative (before a restart nor after it, with corrections of mail
/// decided before it), and `report` counts configured departments, as the
/// metrics do, with the labels as detail.
#[test]
fn refusals_are_counted_answers_name_the_label_minutes_saved_survive_a_restart_and_the_report_names_departments() {
    support::require("postfix", "postfix");
    let work = tempfile::Builder::new().prefix("mt-answers.").tempdir_in("/tmp").unwrap();
    let w = work.path();
    std::fs::set_permissions(w, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(w.join("tickets.jsonl"), made_up_tickets()).unwrap();
    std::fs::create_dir_all(w.join("audit")).unwrap();
    let token = "0123456789abcdef-token";
    std::fs::write(w.join("token"), token).unwrap();
    let metrics_port = support::free_port();
    let config = format!(
        r#"
[server]
milter_socket_mode = "0666"

[defaults]
department = "general"

[[departments]]
name = "billing"
labels = ["Billing and Payments", "Refunds"]

[[departments]]
name = "support"
labels = ["Technical Support"]

[model]
department_head = "{w}/head.safetensors"

[metrics]
listen = "127.0.0.1:{metrics_port}"

[audit]
path = "{w}/audit/audit.jsonl"
key_file = "{w}/audit.key"

[kpi]
minutes_per_manual_triage = 2.0

[feedback]
address = "triage-feedback@{DOMAIN}"
store = "sqlite://{w}/feedback.db"
heads_dir = "{w}/heads"
http_token_file = "{w}/token"
retrain = false
"#,
        w = w.display()
    );
    let config_path = w.join("mailtriage.toml");
    std::fs::write(&config_path, &config).unwrap();
    let tickets = w.join("tickets.jsonl");
    mailtriage(
        &config_path,
        &[
            "train",
            "--data",
            tickets.to_str().unwrap(),
            "--label",
            "queue",
            "--no-embeddings",
            "--out",
            w.join("head.safetensors").to_str().unwrap(),
        ],
    );
    let mut daemon = Daemon::start(&config, false);
    let postfix = Postfix::start(Some(&daemon.postfix_address()), "tempfail", &["in_flow_delay = 0s"]);
    let ordinary = Mail {
        from: "customer@client.example",
        rcpts: vec![format!("user@{DOMAIN}")],
        data: format!(
            "From: c@client.example\nTo: user@{DOMAIN}\nSubject: refund question\nMessage-ID: <m1@client.example>\n\n\
             Hello, about the refund and the return: please help.\n"
        ),
    };
    assert_eq!(support::send(postfix.smtp_port, &[ordinary]).unwrap(), [250]);
    let delivered = postfix.wait_delivered(1, Duration::from_secs(30));
    assert_eq!(support::header_values(&delivered[0].1, "X-Triage-Source").len(), 1, "{}", delivered[0].1);

    // Refused: a Message-ID the daemon never decided (404), a department nobody configured (422).
    let unknown = post(metrics_port, token, "/feedback", r#"{"message_id":"<never@x>","department":"billing"}"#);
    assert!(unknown.starts_with("HTTP/1.1 404"), "{unknown}");
    let wrong = post(metrics_port, token, "/feedback", r#"{"message_id":"<m1@client.example>","department":"hr"}"#);
    assert!(wrong.starts_with("HTTP/1.1 422"), "{wrong}");
    let text = support::http_get(metrics_port, "/metrics");
    let (refused, lines) = metric(&text, "mailtriage_feedback_refused_total");
    assert_eq!(refused, 2.0, "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("reason=\"not_recent\"")), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("reason=\"unknown_department\"")), "{lines:?}");

    // Recorded, by a department's name (its first label) and by a head label; the
    // CLI and the pipe print the same line, HTTP answers the same facts as JSON.
    let cli = mailtriage(&config_path, &["feedback", "--message-id", "<m1@client.example>", "--department", "billing"]);
    let (code, piped) = mailtriage_status(
        &config_path,
        &["feedback", "--department", "billing"],
        "Subject: Fwd: invoice question\nMessage-ID: <p1@x>\n\nabout the invoice and the payment\n",
    );
    assert_eq!(code, 0, "{piped}");
    let shape = |out: &str| {
        let line = out.trim();
        let rest = line.strip_prefix("recorded correction ").unwrap_or_else(|| panic!("{line}"));
        let (id, what) = rest.split_once(':').unwrap_or_else(|| panic!("{line}"));
        assert!(id.parse::<i64>().is_ok(), "{line}");
        what.to_string()
    };
    assert_eq!(shape(&cli), r#" department billing, label "Billing and Payments""#, "{cli}");
    assert_eq!(shape(&piped), shape(&cli), "{piped} vs {cli}");
    let http = post(metrics_port, token, "/feedback", r#"{"message_id":"<m1@client.example>","department":"Refunds"}"#);
    assert!(http.starts_with("HTTP/1.1 200"), "{http}");
    let answer: Value = serde_json::from_str(http.split("\r\n\r\n").nth(1).unwrap().trim()).unwrap();
    assert_eq!(
        (&answer["department"], &answer["label"]),
        (&Value::from("billing"), &Value::from("Refunds")),
        "{answer}"
    );
    assert!(answer["recorded"].as_i64().is_some(), "{answer}");

    // One message routed (2 minutes), two corrections through the daemon: 0, not −2.
    let text = support::http_get(metrics_port, "/metrics");
    let (saved, lines) = metric(&text, "mailtriage_staff_minutes_saved");
    assert_eq!((saved, lines.len()), (0.0, 1), "{lines:?}");

    // A restart, then a correction of mail decided before it, by mail: still not below 0.
    daemon.kill();
    let daemon = Daemon::start(&config, false);
    postfix.postconf(&["-e", &format!("smtpd_milters = {}", daemon.postfix_address())]);
    postfix.reload();
    let forward = Mail {
        from: "agent@test.example",
        rcpts: vec![format!("triage-feedback+billing@{DOMAIN}")],
        data: format!(
            "From: agent@{DOMAIN}\nTo: triage-feedback+billing@{DOMAIN}\nSubject: Fwd: refund question\n\n\
             ---------- Forwarded message ---------\nFrom: c@client.example\nSubject: refund question\n\n\
             Hello, about the refund and the return: please help.\n"
        ),
    };
    let store = Store::open(&format!("sqlite://{}/feedback.db", w.display())).unwrap();
    wait_until(
        "the forwarded correction to be stored",
        Duration::from_secs(60),
        || {
            if store.load(0).unwrap().len() < 4 {
                let _ = support::send(postfix.smtp_port, std::slice::from_ref(&forward));
                std::thread::sleep(Duration::from_secs(1));
            }
            store.load(0).unwrap().len() >= 4
        },
        || daemon.log(),
    );
    let text = support::http_get(metrics_port, "/metrics");
    assert_eq!(metric(&text, "mailtriage_feedback_corrections_total").0, 1.0, "{text}");
    let (saved, lines) = metric(&text, "mailtriage_staff_minutes_saved");
    assert_eq!((saved, lines.len()), (0.0, 1), "{lines:?}");

    // The report: corrections by configured department (4 for billing, under two labels).
    let report: Value = serde_json::from_str(&mailtriage(&config_path, &["report", "--days", "1", "--json"])).unwrap();
    assert_eq!(report["corrections"], 4, "{report}");
    assert_eq!(report["corrections_by_department"], serde_json::json!({ "billing": 4 }), "{report}");
    let per_day: Vec<&String> = report["corrections_per_day"].as_object().unwrap().keys().collect();
    assert_eq!(per_day, ["billing"], "{report}");
    assert_eq!(
        report["corrections_by_label"],
        serde_json::json!({ "billing": { "Billing and Payments": 3, "Refunds": 1 } }),
        "{report}"
    );
    let human = mailtriage(&config_path, &["report", "--days", "1"]);
    let billing = human.lines().find(|l| l.trim_start().starts_with("billing")).unwrap_or_else(|| panic!("{human}"));
    assert!(billing.contains(r#""Billing and Payments" 3"#) && billing.contains(r#""Refunds" 1"#), "{human}");
    assert!(!human.lines().any(|l| l.trim_start().starts_with("Refunds")), "{human}");
}
