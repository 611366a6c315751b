//! What the model reads of a message.
//!
//! The lexical features read [`model_text`]: the subject and the whole body,
//! quotes included (the quoted thread names the topic too: dropping it cost
//! 3 points of accuracy on 20 Newsgroups). The encoder reads only its first
//! `max_tokens`, so it gets [`encoder_text`]: the subject, the sender's own
//! words first, then the quoted thread, and never the signature; a long quote
//! can no longer push the new words out of the budget. Training and the daemon
//! both derive their texts through these functions, so they agree.

use crate::message::extract::Features;

/// Subject, newline, body.
pub fn model_text(subject: &str, body: &str) -> String {
    let mut t = String::with_capacity(subject.len() + body.len() + 2);
    t.push_str(subject.trim());
    t.push('\n');
    t.push_str(body.trim());
    t
}

pub fn features_text(f: &Features) -> String {
    model_text(&f.subject, &f.text)
}

/// The encoder's view of a [`model_text`]: subject, own words, then the
/// quoted or forwarded original, without signatures.
pub fn encoder_text(model_text: &str) -> String {
    let (subject, body) = model_text.split_once('\n').unwrap_or((model_text, ""));
    let (own, quoted) = split_body(body);
    let mut t = String::with_capacity(model_text.len());
    t.push_str(subject);
    t.push('\n');
    t.push_str(own.trim());
    if !quoted.trim().is_empty() {
        t.push('\n');
        t.push_str(quoted.trim());
    }
    t
}

/// The body's own words, and what it quotes or forwards (`>` lines, the "…
/// wrote:" line introducing them, everything below an "Original Message"
/// separator). Signatures (RFC 3676 `-- `) are in neither.
pub fn split_body(body: &str) -> (String, String) {
    let lines: Vec<&str> = body.lines().collect();
    let (mut own, mut quoted) = (String::with_capacity(body.len()), String::new());
    let mut in_original = false;
    let mut in_signature = false;
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim();
        if is_signature_delimiter(t) {
            in_signature = true;
            continue;
        }
        if starts_original(t) {
            in_original = true;
            in_signature = false;
            continue;
        }
        if in_signature {
            continue;
        }
        let next_is_quote =
            || lines[i + 1..].iter().map(|l| l.trim()).find(|l| !l.is_empty()).is_some_and(|l| l.starts_with('>'));
        let target = if in_original || t.starts_with('>') || (introduces_quote(t) && next_is_quote()) {
            &mut quoted
        } else {
            &mut own
        };
        target.push_str(line);
        target.push('\n');
    }
    (own, quoted)
}

fn is_signature_delimiter(t: &str) -> bool {
    t == "--"
}

/// The separator mail clients put above a forwarded or replied-to original.
fn starts_original(t: &str) -> bool {
    let lower = t.to_lowercase();
    (lower.starts_with("-----")
        && [
            "original message",
            "ursprüngliche nachricht",
            "message d'origine",
            "forwarded message",
            "weitergeleitete nachricht",
        ]
        .iter()
        .any(|m| lower.contains(m)))
        || (t.len() >= 20 && t.chars().all(|c| c == '_'))
}

/// "On Mon, … Jane wrote:", "jane@x (Jane) writes:", "Am … schrieb Jane:".
fn introduces_quote(t: &str) -> bool {
    let lower = t.to_lowercase();
    t.len() <= 300
        && lower.ends_with(':')
        && ["wrote", "writes", "schrieb", "a écrit", "escribió", "ha scritto", "skrev"]
            .iter()
            .any(|w| lower.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_words_come_first_and_signatures_go() {
        let body = "On Mon, 1 Jan 2024, Jane <j@x> wrote:\n> Please pay\n> now\n\nThe invoice is wrong.\n-- \nJohn Doe\nACME Corp";
        let (own, quoted) = split_body(body);
        assert_eq!(own, "\nThe invoice is wrong.\n");
        assert_eq!(quoted, "On Mon, 1 Jan 2024, Jane <j@x> wrote:\n> Please pay\n> now\n");
        assert_eq!(
            encoder_text(&model_text("Re: bill", body)),
            "Re: bill\nThe invoice is wrong.\nOn Mon, 1 Jan 2024, Jane <j@x> wrote:\n> Please pay\n> now"
        );
        let outlook = "Bitte prüfen.\n\n-----Ursprüngliche Nachricht-----\nVon: x\nBetreff: y";
        assert_eq!(split_body(outlook), ("Bitte prüfen.\n\n".into(), "Von: x\nBetreff: y\n".into()));
        let underscores = "See below.\n________________________________\nFrom: x";
        assert_eq!(split_body(underscores).1, "From: x\n");
        // A line ending in "wrote:" that introduces no quote is the sender's own.
        assert_eq!(
            split_body("Here is what the customer wrote:\nit broke").0,
            "Here is what the customer wrote:\nit broke\n"
        );
        // No quotes, no signature: the text is unchanged.
        assert_eq!(encoder_text("Subject\nline one\nline two"), "Subject\nline one\nline two");
        assert_eq!(encoder_text("only a subject"), "only a subject\n");
    }
}
