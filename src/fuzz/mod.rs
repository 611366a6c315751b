//! Entry points for fuzzing every parser of untrusted bytes.
//!
//! Each target takes arbitrary bytes and must return: no panic, no hang, no
//! unbounded memory. `fuzz/` runs them under AFL++ (`scripts/fuzz.sh`);
//! tests/corpus.rs replays their seeds and regression inputs in every test
//! run. [`seeds`] makes the starting corpora from real mail.
//!
//! The milter and SMTP targets drive the real sessions over an in-memory
//! stream into the real pipeline (rules only: the encoder is not a parser
//! of untrusted bytes and would make each run cost milliseconds). The SMTP
//! one relays to [`hop`], the next hop tests/smtp_session.rs uses too.

pub mod hop;

use std::path::Path;
use std::sync::OnceLock;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::daemon;
use crate::learn::filter::layer::FeedbackLayer;
use crate::message::extract::{self, ExtractLimits};
use crate::milter::codec;
use crate::milter::session::{Session as MilterSession, SessionConfig};
use crate::settings::Config;
use crate::smtp::relay::RelaySettings;
use crate::smtp::session::{Session as SmtpSession, SmtpSettings};

/// The targets, by the name `scripts/fuzz.sh` and `fuzz/` use.
pub const TARGETS: [&str; 6] = ["mime", "intake", "config", "head", "milter", "smtp"];

/// Runs target `name` on `data`; `false` for an unknown name.
pub fn run(name: &str, data: &[u8]) -> bool {
    match name {
        "mime" => mime(data),
        "intake" => intake(data),
        "config" => config(data),
        "head" => head(data),
        "milter" => milter(data),
        "smtp" => smtp(data),
        _ => return false,
    }
    true
}

fn limits() -> ExtractLimits {
    ExtractLimits::from(&crate::settings::LimitsConfig::default())
}

/// MIME extraction (every part's text, HTML to text) and the raw header scanner.
pub fn mime(data: &[u8]) {
    let features = extract::extract(data, limits());
    let _ = crate::message::language::detect(&features.text);
    let _ = crate::message::headers::names(data);
    let _ = crate::message::html::to_text(&String::from_utf8_lossy(data));
}

/// Feedback intake: finding the corrected message inside a forwarded one.
pub fn intake(data: &[u8]) {
    let _ = crate::learn::filter::intake::forwarded(data, limits());
}

/// The configuration loader: TOML, validation, and (without a model, which
/// would read files) building the rules and scope.
pub fn config(data: &[u8]) {
    let Ok(cfg) = Config::from_toml(&String::from_utf8_lossy(data), "fuzz.toml") else { return };
    if cfg.model.is_none() && cfg.feedback.is_none() && cfg.audit.is_none() {
        let _ = daemon::build(&cfg, None);
    }
}

/// The head file loader, and a prediction with what it loaded.
pub fn head(data: &[u8]) {
    if let Ok(h) = crate::model::head::Head::from_bytes(Path::new("fuzz.safetensors"), data) {
        if !h.uses_embedding() {
            let _ = h.predict(None, &h.lexical("Invoice overdue, please pay"));
        }
    }
}

/// The rules-only pipeline and settings both session targets use.
struct Bench {
    rt: tokio::runtime::Runtime,
    filter: FeedbackLayerArc,
    milter: SessionConfig,
    smtp: SmtpSettings,
    lmtp: SmtpSettings,
}

type FeedbackLayerArc = std::sync::Arc<FeedbackLayer>;

const BENCH_CONFIG: &str = r#"
[server]
decision_timeout = "5s"
idle_timeout = "5s"
smtp_timeout = "5s"
hostname = "fuzz.example"

[limits]
max_message_bytes = 65536
max_smtp_message_bytes = 65536

[defaults]
department = "general"

[[departments]]
name = "billing"
mailbox = "billing@corp.example"
action = "reroute"

[[departments]]
name = "security"
mailbox = "security@corp.example"
action = "quarantine"

[[rules]]
name = "invoices"
header = "Subject"
pattern = "(?i)invoice"
department = "billing"

[[rules]]
name = "phishing"
header = "Subject"
pattern = "(?i)phish"
department = "security"

[relay]
next_hop = "smtp:unix:HOP"
quarantine_mailbox = "quarantine@corp.example"
"#;

fn bench() -> &'static Bench {
    static BENCH: OnceLock<Bench> = OnceLock::new();
    BENCH.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
        let hop = std::env::temp_dir().join(format!("mailtriage-fuzz-hop-{}.sock", std::process::id()));
        let cfg = Config::from_toml(&BENCH_CONFIG.replace("HOP", &hop.display().to_string()), "fuzz")
            .expect("the fuzz configuration is valid");
        let filter = std::sync::Arc::new(daemon::build(&cfg, None).expect("a rules-only pipeline"));
        let relay = RelaySettings::from_config(&cfg).expect("no TLS").expect("a relay");
        let budget = crate::frontdoor::budget::ByteBudget::new(cfg.limits.max_total_bytes);
        let smtp = SmtpSettings::new(&cfg, false, None, budget.clone(), relay.clone());
        let lmtp = SmtpSettings::new(&cfg, true, None, budget, relay);
        let _ = std::fs::remove_file(&hop);
        let listener = rt.block_on(async { tokio::net::UnixListener::bind(&hop) }).expect("the fake hop's socket");
        rt.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(hop::converse(stream, false, None));
            }
        });
        Bench { rt, filter, milter: SessionConfig::from(&cfg), smtp, lmtp }
    })
}

/// Milter frames from fuzz input: records of `[code][len u16 BE][payload]`
/// become well-framed packets (so mutations reach the commands, not only the
/// length check); code `0xFF` inserts its payload as raw bytes, framing and all.
pub fn milter_stream(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 2);
    let mut rest = data;
    while let [code, hi, lo, tail @ ..] = rest {
        let n = (usize::from(*hi) << 8 | usize::from(*lo)).min(tail.len());
        let (payload, next) = tail.split_at(n);
        if *code == 0xFF {
            out.extend_from_slice(payload);
        } else {
            out.extend_from_slice(&(payload.len() as u32 + 1).to_be_bytes());
            out.push(*code);
            out.extend_from_slice(payload);
        }
        rest = next;
    }
    out
}

/// The milter session: decoding and the state machine, fed any sequence of frames.
pub fn milter(data: &[u8]) {
    milter_answers(data);
}

/// [`milter`], returning what the session answered.
fn milter_answers(data: &[u8]) -> Vec<u8> {
    let b = bench();
    let stream = milter_stream(data);
    b.rt.block_on(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (_keep, shutdown) = tokio::sync::watch::channel(false);
        converse(client, &stream, MilterSession::new(&b.filter, &b.milter).run(server, shutdown)).await
    })
}

/// The SMTP or LMTP session (first byte odd: LMTP) fed any command and DATA
/// bytes, relaying to the fake hop.
pub fn smtp(data: &[u8]) {
    smtp_answers(data);
}

/// [`smtp`], returning what the session answered.
fn smtp_answers(data: &[u8]) -> Vec<u8> {
    let b = bench();
    let (settings, input) = match data.split_first() {
        Some((first, rest)) if first & 1 == 1 => (&b.lmtp, rest),
        Some((_, rest)) => (&b.smtp, rest),
        None => (&b.smtp, data),
    };
    b.rt.block_on(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (_keep, shutdown) = tokio::sync::watch::channel(false);
        let session = SmtpSession::new(&b.filter, settings, Box::new(server), "127.0.0.1:25".into());
        converse(client, input, session.run(shutdown)).await
    })
}

/// Writes `input` to the session and reads its answers until it ends; keeps
/// the first 64 KiB of them.
async fn converse<T>(
    client: tokio::io::DuplexStream,
    input: &[u8],
    session: impl std::future::Future<Output = T>,
) -> Vec<u8> {
    let (mut from_session, mut to_session) = tokio::io::split(client);
    let feed = async move {
        let _ = to_session.write_all(input).await;
        let _ = to_session.shutdown().await;
    };
    let drain = async move {
        let (mut kept, mut buf) = (Vec::new(), [0u8; 4096]);
        while let Ok(n @ 1..) = from_session.read(&mut buf).await {
            if kept.len() < 64 * 1024 {
                kept.extend_from_slice(&buf[..n]);
            }
        }
        kept
    };
    let (_, (), answers) = tokio::join!(session, feed, drain);
    answers
}

/// Starting inputs for `target`, made from real mail (`corpus`: a directory
/// of RFC 822 files, such as ../shared/data/spamassassin_mime) and the
/// shipped configuration; at most `max` of them.
pub fn seeds(target: &str, corpus: &Path, max: usize) -> Vec<Vec<u8>> {
    let mut files: Vec<_> = walk(corpus);
    files.sort();
    let messages: Vec<Vec<u8>> =
        files.iter().filter_map(|p| std::fs::read(p).ok()).filter(|m| m.len() < 64 * 1024).take(max).collect();
    match target {
        "mime" => messages,
        "intake" => messages.iter().map(|m| forward(m)).collect(),
        "smtp" => messages.iter().enumerate().map(|(i, m)| smtp_conversation(i % 2 == 1, m)).collect(),
        "milter" => messages.iter().map(|m| milter_conversation(m)).collect(),
        "config" => {
            let shipped = include_str!("../../conf/mailtriage.toml");
            vec![shipped.as_bytes().to_vec(), BENCH_CONFIG.as_bytes().to_vec()]
        }
        "head" => vec![tiny_head_file()],
        _ => Vec::new(),
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_none_or(|x| x != "jsonl" && x != "md") {
            out.push(p);
        }
    }
    out
}

fn forward(message: &[u8]) -> Vec<u8> {
    let mut out = b"From: Agent <agent@corp.example>\r\nTo: triage-feedback+billing@corp.example\r\n\
Subject: Fwd: wrong desk\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n\
--b\r\nContent-Type: text/plain\r\n\r\nwrong desk\r\n--b\r\nContent-Type: message/rfc822\r\n\r\n"
        .to_vec();
    out.extend_from_slice(message);
    out.extend_from_slice(b"\r\n--b--\r\n");
    out
}

fn smtp_conversation(lmtp: bool, message: &[u8]) -> Vec<u8> {
    let hello = if lmtp { "LHLO" } else { "EHLO" };
    let mut out = vec![u8::from(lmtp)];
    out.extend_from_slice(
        format!("{hello} client.example\r\nMAIL FROM:<a@client.example> BODY=8BITMIME\r\nRCPT TO:<user@corp.example>\r\nRCPT TO:<b@corp.example>\r\nDATA\r\n").as_bytes(),
    );
    for line in message.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\nRSET\r\nNOOP\r\nQUIT\r\n");
    out
}

/// A conversation as Postfix holds it, in [`milter_stream`]'s record format.
fn milter_conversation(message: &[u8]) -> Vec<u8> {
    use codec::{Command, ConnectAddress, Negotiation};
    let (head, body) = match message.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => (&message[..i], &message[i + 4..]),
        None => match message.windows(2).position(|w| w == b"\n\n") {
            Some(i) => (&message[..i], &message[i + 2..]),
            None => (message, &[][..]),
        },
    };
    let mut commands = vec![
        Command::Negotiate(Negotiation { version: 6, actions: 0x1ff, protocol: 0x1fffff, macros: Default::default() }),
        Command::Macros {
            stage: b'C',
            pairs: vec![("{daemon_name}".into(), "mx".into()), ("{client_addr}".into(), "192.0.2.7".into())],
        },
        Command::Connect { hostname: "client.example".into(), address: ConnectAddress::Unknown },
        Command::Helo("client.example".into()),
        Command::Mail(vec!["<a@client.example>".into()]),
        Command::Rcpt(vec!["<user@corp.example>".into()]),
        Command::Data,
    ];
    for field in crate::message::headers::fields(head) {
        let name = String::from_utf8_lossy(field.name(head)).into_owned();
        let value = String::from_utf8_lossy(&field.value(head)).trim_start().to_string();
        commands.push(Command::Header { name, value });
    }
    commands.push(Command::EndOfHeaders);
    for chunk in body.chunks(16 * 1024) {
        commands.push(Command::Body(chunk.to_vec()));
    }
    commands.extend([Command::EndOfMessage(Vec::new()), Command::Abort, Command::Quit]);
    let mut out = Vec::new();
    for c in &commands {
        let frame = codec::encode_command(c);
        let payload = &frame[5..];
        out.push(frame[4]);
        out.extend_from_slice(&(payload.len().min(0xFFFF) as u16).to_be_bytes());
        out.extend_from_slice(&payload[..payload.len().min(0xFFFF)]);
    }
    out
}

/// A small lexical head file (two labels, 2^6 buckets).
fn tiny_head_file() -> Vec<u8> {
    use crate::model::head::{Head, HeadMeta};
    use crate::model::lexical::LexicalConfig;
    let lexical = LexicalConfig { bits: 6, ..Default::default() };
    let (dim, c) = (lexical.dim(), 2);
    let head = Head {
        meta: HeadMeta {
            labels: vec!["billing".into(), "support".into()],
            label_field: "queue".into(),
            encoder: None,
            embedding_dim: 0,
            embedding_weight: 1.0,
            max_tokens: 128,
            precision: None,
            input_prefix: None,
            lexical,
            temperature: 1.0,
            trained_at: "2026-11-30T00:00:00Z".into(),
            train_examples: 2,
            dev_metrics: serde_json::json!({}),
            version: "v1".into(),
            cascade: None,
            risk_coverage: Vec::new(),
        },
        w_emb: Vec::new(),
        w_lex: (0..dim * c).map(|i| (i % 7) as f32 * 0.1).collect(),
        bias: vec![0.1, -0.1],
        idf: vec![1.0; dim],
        lexical_only: None,
    };
    let dir = std::env::temp_dir().join(format!("mailtriage-fuzz-seed-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("head.safetensors");
    let bytes = head.save(&path).ok().and_then(|()| std::fs::read(&path).ok()).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESSAGE: &[u8] = b"From: Jo <jo@client.example>\r\nTo: user@corp.example\r\nSubject: Invoice 42\r\n\
Message-ID: <s1@client.example>\r\n\r\nPlease pay.\r\n.leading dot\r\n";

    /// The seeds reach the end of a conversation, so mutations start deep.
    #[test]
    fn seed_conversations_reach_a_decision() {
        let answers = milter_answers(&milter_conversation(MESSAGE));
        let text = String::from_utf8_lossy(&answers);
        assert!(text.contains("billing@corp.example"), "no reroute in the milter answers: {text:?}");
        let answers = smtp_answers(&smtp_conversation(false, MESSAGE));
        let text = String::from_utf8_lossy(&answers);
        assert!(text.contains("354 ") && text.contains("250 2.0.0 queued"), "not relayed to the hop: {text}");
        assert!(text.contains("221"), "the session ended with QUIT: {text}");
        for t in TARGETS {
            assert!(run(t, b"") && run(t, &[0xFF; 7]));
        }
        assert!(!run("nope", b""));
    }
}
