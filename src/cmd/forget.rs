//! `mailtriage forget`: erasure on request. Asks the running daemon (it
//! alone holds the recent decisions) and, when none runs, erases from the
//! store and the audit trail itself. See `mailtriage::daemon::forget`.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use mailtriage::daemon::forget::{self, Erased, Places, Subject};
use mailtriage::learn::store::Store;
use mailtriage::record::audit::{self, AuditError};
use mailtriage::record::pseudonym::Pseudonyms;
use mailtriage::settings::Config;

use crate::cli::ForgetArgs;

pub fn forget(cfg: &Config, args: &ForgetArgs) -> Result<ExitCode> {
    let subject = match (&args.message_id, &args.sender) {
        (Some(id), None) => Subject::MessageId(id.clone()),
        (None, Some(sender)) => Subject::Sender(sender.clone()),
        _ => bail!("say whose traces to erase: --message-id ID or --sender ADDRESS"),
    };
    let mut notes = Vec::new();
    if let (Some(m), Some(token)) = (&cfg.metrics, super::learn::token(cfg)?) {
        match super::post_to_daemon(&m.listen, &token, "/forget", &subject.to_json()) {
            Ok((200, body)) => {
                let erased: Erased = serde_json::from_str(&body).context("reading the daemon's answer")?;
                print(&erased, args.json);
                return Ok(ExitCode::SUCCESS);
            }
            Ok((503, body)) => {
                eprintln!("mailtriage: nothing erased yet, retry later: {}", body.trim());
                return Ok(ExitCode::from(super::EX_TEMPFAIL));
            }
            Ok((status, body)) => bail!("the daemon at {} refused: {status} {}", m.listen, body.trim()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => notes.push(format!(
                "no daemon listens on {}: it holds no recent decisions, the store and audit trail were erased here",
                m.listen
            )),
            Err(e) => return Err(e).with_context(|| format!("asking the daemon at {}", m.listen)),
        }
    }
    let pseudonyms = match &cfg.audit {
        Some(a) => match audit::read_key(&a.key_file) {
            Ok(key) => Pseudonyms::keyed(key),
            // The daemon creates the key with the first audit line: nothing was hashed with one.
            Err(AuditError::Io { error: source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                notes.push(format!("no audit key at {}: nothing was ever written with one", a.key_file.display()));
                Pseudonyms::unkeyed()
            }
            Err(e) => return Err(e.into()),
        },
        None => Pseudonyms::unkeyed(),
    };
    let store = cfg.feedback.as_ref().map(|f| Store::for_config(f, true)).transpose()?;
    let places = Places {
        pseudonyms: &pseudonyms,
        store: store.as_ref(),
        recent: None,
        audit: cfg.audit.as_ref().map(|a| a.path.as_path()),
    };
    match forget::erase(&subject, &places) {
        Ok(mut erased) => {
            erased.notes.extend(notes);
            print(&erased, args.json);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) if e.is_retryable() => {
            eprintln!("mailtriage: nothing erased yet, retry later: {e}");
            Ok(ExitCode::from(super::EX_TEMPFAIL))
        }
        Err(e) => Err(e.into()),
    }
}

fn print(e: &Erased, json: bool) {
    if json {
        println!("{}", serde_json::to_string(e).expect("serialisable"));
        return;
    }
    if let Some(n) = e.corrections {
        println!("feedback store: {n} correction(s) deleted");
    }
    if let Some(found) = e.recent_decision {
        println!("recent decisions: {}", if found { "1 deleted" } else { "none held" });
    }
    if let Some(files) = &e.audit {
        let lines: usize = files.iter().map(|f| f.lines).sum();
        println!("audit trail: {lines} line(s) deleted");
        for f in files {
            println!("  {}: {}", f.file.display(), f.lines);
        }
    }
    for n in &e.notes {
        println!("note: {n}");
    }
}
