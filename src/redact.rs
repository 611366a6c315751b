//! Masks personal data in free text that must be logged (an error quoting a
//! header, say): e-mail addresses, IBANs (mod-97 checked), payment card
//! numbers (Luhn checked), national ID numbers (US SSN, UK NINO) and phone
//! numbers. Checked formats are masked only when the checksum holds, so
//! order numbers and timestamps stay readable.

use std::borrow::Cow;
use std::sync::LazyLock;

use regex::{Captures, Regex};

static EMAIL: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)[a-z0-9._%+\-]+@[a-z0-9\-]+(?:\.[a-z0-9\-]+)*\.[a-z]{2,}").expect("valid"));
static IBAN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?\b").expect("valid"));
static CARD: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\b(?:\d[ \-]?){12,18}\d\b").expect("valid"));
static SSN: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\b\d{3}-\d{2}-\d{4}\b").expect("valid"));
static NINO: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)\b[A-CEGHJ-PR-TW-Z]{2} ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b").expect("valid"));
static PHONE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?:\+|\b00|\b0|\(0)[\d\s()./\-]{6,20}\d").expect("valid"));

/// A connection string without its password: `scheme://user:password@host/…`
/// → `scheme://user:****@host/…` (only the authority's password: an `@` in
/// the path or query is left alone), and `password=…` of a key/value string
/// (`host=db password=… dbname=m`). Borrowed when there is nothing to mask.
pub fn credentials(s: &str) -> Cow<'_, str> {
    if let Some((scheme, rest)) = s.split_once("://") {
        let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
        if let Some((userinfo, host)) = authority.rsplit_once('@') {
            if let Some((user, _)) = userinfo.split_once(':') {
                return Cow::Owned(format!("{scheme}://{user}:****@{host}{tail}"));
            }
        }
    }
    match s.to_ascii_lowercase().find("password=") {
        Some(i) => {
            let end = s[i..].find([' ', '&']).map_or(s.len(), |e| i + e);
            Cow::Owned(format!("{}password=****{}", &s[..i], &s[end..]))
        }
        None => Cow::Borrowed(s),
    }
}

/// The text with personal data replaced by `[email]`, `[iban]`, `[card]`,
/// `[national-id]` and `[phone]`.
pub fn redact(text: &str) -> Cow<'_, str> {
    let t = EMAIL.replace_all(text, "[email]");
    let t = replace_checked(t, &IBAN, "[iban]", iban_valid);
    let t = replace_checked(t, &CARD, "[card]", luhn_valid);
    let t = replace_checked(t, &SSN, "[national-id]", |_| true);
    let t = replace_checked(t, &NINO, "[national-id]", |_| true);
    replace_checked(t, &PHONE, "[phone]", |m| (7..=15).contains(&m.chars().filter(char::is_ascii_digit).count()))
}

fn replace_checked<'a>(text: Cow<'a, str>, re: &Regex, mask: &str, check: impl Fn(&str) -> bool) -> Cow<'a, str> {
    if !re.is_match(&text) {
        return text;
    }
    let out = re.replace_all(&text, |c: &Captures<'_>| if check(&c[0]) { mask.to_string() } else { c[0].to_string() });
    Cow::Owned(out.into_owned())
}

/// Luhn checksum over the digits of `s` (13–19 of them).
pub fn luhn_valid(s: &str) -> bool {
    let digits: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                if d * 2 > 9 {
                    d * 2 - 9
                } else {
                    d * 2
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// ISO 13616 check: move the first four characters to the end, letters to
/// numbers (A=10…), and the result mod 97 must be 1.
pub fn iban_valid(s: &str) -> bool {
    let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if !(15..=34).contains(&compact.len()) {
        return false;
    }
    let (head, tail) = compact.split_at(4);
    let mut rem: u32 = 0;
    for c in tail.chars().chain(head.chars()) {
        let v = match c.to_digit(36) {
            Some(v) => v,
            None => return false,
        };
        rem = if v >= 10 { (rem * 100 + v) % 97 } else { (rem * 10 + v) % 97 };
    }
    rem == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings_lose_their_password_only() {
        assert_eq!(
            credentials("postgres://triage:s3cret@db.example:5432/mail?sslmode=verify-full"),
            "postgres://triage:****@db.example:5432/mail?sslmode=verify-full"
        );
        assert_eq!(
            credentials("postgres://u:p@h/db?application_name=a@b"),
            "postgres://u:****@h/db?application_name=a@b"
        );
        assert!(matches!(credentials("postgres://triage@db/mail"), Cow::Borrowed(_)), "no password, nothing to mask");
        assert!(matches!(credentials("/var/lib/mailtriage/feedback.sqlite"), Cow::Borrowed(_)));
        assert_eq!(credentials("host=db user=t password=s3cret dbname=m"), "host=db user=t password=**** dbname=m");
    }

    #[test]
    fn masks_each_kind_and_keeps_the_rest() {
        let s =
            "From Jane <jane.doe+x@mail.example.co.uk>: card 4111 1111 1111 1111, IBAN DE89 3704 0044 0532 0130 00, \
                 SSN 123-45-6789, NI AB 12 34 56 C, call +49 (0)30 1234-5678 re order 20241122 at 10:15";
        let r = redact(s);
        assert!(!r.contains("jane") && r.contains("[email]"), "{r}");
        assert!(!r.contains("4111") && r.contains("[card]"), "{r}");
        assert!(!r.contains("DE89") && r.contains("[iban]"), "{r}");
        assert!(!r.contains("123-45-6789") && !r.contains("AB 12"), "{r}");
        assert!(!r.contains("1234-5678") && r.contains("[phone]"), "{r}");
        assert!(r.contains("order 20241122 at 10:15"), "{r}");
    }

    #[test]
    fn checksums_decide_for_cards_and_ibans() {
        assert!(luhn_valid("4111-1111-1111-1111"));
        assert!(!luhn_valid("4111 1111 1111 1112"));
        assert!(iban_valid("GB82 WEST 1234 5698 7654 32"));
        assert!(!iban_valid("GB83 WEST 1234 5698 7654 32"));
        // A non-Luhn 16-digit number is not masked as a card.
        assert!(redact("tracking 1234 5678 9012 3456").contains("tracking 1234"));
    }

    #[test]
    fn clean_text_is_borrowed_unchanged() {
        assert!(matches!(redact("department billing, action reroute"), Cow::Borrowed(_)));
    }
}
