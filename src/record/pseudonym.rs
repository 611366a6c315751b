//! Pseudonyms: what the audit trail and the feedback store write instead of
//! a Message-ID or a sender address.
//!
//! With the audit key they are HMAC-SHA256, so a Message-ID (which is
//! guessable) cannot be tested against them by anyone without the key, yet
//! whoever holds it (an auditor, `mailtriage forget`) finds every trace of
//! one message or one person. Without an audit trail there is no key: a
//! Message-ID becomes a plain SHA-256 (corrections of one message still
//! replace each other) and a sender only its domain.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Turns Message-IDs and addresses into the strings that are stored.
#[derive(Clone)]
pub struct Pseudonyms {
    key: Option<Vec<u8>>,
}

impl std::fmt::Debug for Pseudonyms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.key.is_some() { "Pseudonyms(keyed)" } else { "Pseudonyms(unkeyed)" })
    }
}

impl Pseudonyms {
    /// Keyed with the audit key.
    pub fn keyed(key: Vec<u8>) -> Self {
        Pseudonyms { key: Some(key) }
    }

    /// No audit key configured.
    pub fn unkeyed() -> Self {
        Pseudonyms { key: None }
    }

    pub fn is_keyed(&self) -> bool {
        self.key.is_some()
    }

    /// A Message-ID, hex: angle brackets, surrounding space and the case of
    /// the domain part do not matter (RFC 5322 domains are case-insensitive).
    pub fn message_id(&self, message_id: &str) -> String {
        let id = message_id.trim().trim_start_matches('<').trim_end_matches('>');
        let normal = match id.rsplit_once('@') {
            Some((local, domain)) => format!("{local}@{}", domain.to_ascii_lowercase()),
            None => id.to_string(),
        };
        match &self.key {
            Some(key) => hex(&hmac(key, &normal)),
            None => hex(&Sha256::digest(normal.as_bytes())[..16]),
        }
    }

    /// Who sent a correction: `hmac:<hex>` of the lower-cased address, or
    /// without a key `domain:<domain>` (then nothing names the person).
    pub fn actor(&self, address: &str) -> String {
        match &self.key {
            Some(key) => format!("hmac:{}", hex(&hmac(key, &address.trim().to_lowercase()))),
            None => format!("domain:{}", crate::message::envelope::domain_of(address)),
        }
    }
}

fn hmac(key: &[u8], text: &str) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(text.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_normalised_and_keyed() {
        let p = Pseudonyms::keyed(b"0123456789abcdef".to_vec());
        let h = p.message_id("<abc@Example.COM>");
        assert_eq!(h, p.message_id(" abc@example.com "));
        assert_ne!(h, p.message_id("ABC@example.com"), "the local part is case-sensitive");
        assert_eq!(h.len(), 64);
        assert_ne!(h, Pseudonyms::keyed(b"another key, 16+".to_vec()).message_id("abc@example.com"));
        let u = Pseudonyms::unkeyed();
        assert_eq!(u.message_id("<abc@EXAMPLE.com>"), u.message_id("abc@example.com"));
        assert_eq!(u.message_id("x@y").len(), 32);
    }

    #[test]
    fn actors_are_a_keyed_hash_of_the_address_or_only_its_domain() {
        let p = Pseudonyms::keyed(b"0123456789abcdef".to_vec());
        assert_eq!(p.actor("Jo@Shop.example"), p.actor("jo@shop.example"));
        assert!(p.actor("jo@shop.example").starts_with("hmac:"));
        assert_eq!(Pseudonyms::unkeyed().actor("jo@Shop.example"), "domain:shop.example");
    }
}
