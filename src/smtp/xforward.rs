//! XFORWARD: who the original SMTP client was, passed along a filter chain.
//!
//! Postfix, sending to a content filter with `smtp_send_xforward_command =
//! yes`, tells the filter the original client's name, address, HELO name and
//! so on before MAIL. A filter that does not pass this on makes every message
//! look, in the re-injecting MTA's log, as if it came from the filter on
//! localhost, and the two queue ids of one message cannot be tied together
//! (Postfix uses XFORWARD for logging). We accept XFORWARD from trusted
//! clients (`server.xforward_hosts`)
//! and repeat the attributes to the next hop before each MAIL, as far as the
//! hop announces them. Reference: Postfix's XFORWARD_README.
//!
//! The scope reads two facts from here: the original client's address
//! (`ADDR`), and whether it authenticated, which XFORWARD does not carry:
//! that comes from the `Received:` line the trusted MTA put on top
//! ([`authenticated_per_mta`]).

use std::net::IpAddr;

use crate::message::headers;

use super::reply::Reply;

/// The attributes we accept and announce, in Postfix's order.
pub const ATTRIBUTES: [&str; 7] = ["NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE"];

/// Longest attribute value kept (Postfix caps host names at 255 as well).
const MAX_VALUE: usize = 255;

/// Longest XFORWARD command line we send (RFC 5321's 512, CRLF included).
const MAX_LINE: usize = 512;

/// The attributes given for the next transaction; values stay xtext-encoded,
/// exactly as received, since they are sent on in the same encoding.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Xforward {
    attrs: Vec<(&'static str, String)>,
}

impl Xforward {
    /// The value of one attribute, xtext as received.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.attrs.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The original client's address (`ADDR`; Postfix writes IPv6 as
    /// `IPv6:…` and an unknown one as `[UNAVAILABLE]`, which gives `None`).
    pub fn client_addr(&self) -> Option<IpAddr> {
        let v = self.get("ADDR")?;
        let v = v.strip_prefix("IPv6:").or_else(|| v.strip_prefix("ipv6:")).unwrap_or(v);
        v.parse().ok()
    }

    /// Takes the arguments of one `XFORWARD` command. All or nothing: a bad
    /// pair leaves the earlier attributes as they were. A later value of an
    /// attribute replaces the earlier one (Postfix may split them over
    /// several commands).
    pub fn update(&mut self, args: &str) -> Result<(), Reply> {
        let mut parsed = Vec::new();
        for pair in args.split_ascii_whitespace() {
            let Some((name, value)) = pair.split_once('=') else {
                return Err(Reply::syntax("Syntax: XFORWARD attribute=value..."));
            };
            let Some(name) = ATTRIBUTES.iter().find(|a| a.eq_ignore_ascii_case(name)) else {
                return Err(Reply::syntax(&format!("bad XFORWARD attribute name: {}", printable(name))));
            };
            if value.len() > MAX_VALUE || !is_xtext(value) {
                return Err(Reply::syntax(&format!("bad XFORWARD attribute value for {name}")));
            }
            parsed.push((*name, value.to_string()));
        }
        if parsed.is_empty() {
            return Err(Reply::syntax("Syntax: XFORWARD attribute=value..."));
        }
        for (name, value) in parsed {
            match self.attrs.iter_mut().find(|(n, _)| *n == name) {
                Some(slot) => slot.1 = value,
                None => self.attrs.push((name, value)),
            }
        }
        Ok(())
    }

    /// The XFORWARD command lines (CRLF-terminated) that tell a hop which
    /// announced `offered` attributes what we know; nothing when it offers
    /// none. Each line stays within 512 octets.
    pub fn commands_for(&self, offered: &[String]) -> Vec<String> {
        let mut lines = Vec::new();
        let mut line = String::new();
        for (name, value) in &self.attrs {
            if !offered.iter().any(|o| o.eq_ignore_ascii_case(name)) {
                continue;
            }
            let pair = format!(" {name}={value}");
            if !line.is_empty() && line.len() + pair.len() + 2 > MAX_LINE {
                lines.push(std::mem::take(&mut line) + "\r\n");
            }
            if line.is_empty() {
                line.push_str("XFORWARD");
            }
            line.push_str(&pair);
        }
        if !line.is_empty() {
            lines.push(line + "\r\n");
        }
        lines
    }
}

/// Whether the MTA that handed us this message says its client
/// authenticated: the topmost `Received:` (the MTA's own) names an RFC 3848
/// protocol with `A` (`ESMTPA`, `ESMTPSA`, `UTF8SMTPSA`, `LMTPA`…), as
/// Postfix writes for SASL-authenticated mail. Only meaningful when the
/// peer is the trusted MTA (`server.xforward_hosts`).
pub fn authenticated_per_mta(raw: &[u8]) -> bool {
    const AUTHENTICATED: [&str; 8] =
        ["ESMTPA", "ESMTPSA", "LMTPA", "LMTPSA", "UTF8SMTPA", "UTF8SMTPSA", "UTF8LMTPA", "UTF8LMTPSA"];
    let Some(top) = headers::values(raw, "Received").into_iter().next() else { return false };
    let text = String::from_utf8_lossy(&top);
    let mut words = text.split_ascii_whitespace();
    while let Some(w) = words.next() {
        if w.eq_ignore_ascii_case("with") {
            let protocol = words.next().unwrap_or_default().trim_end_matches(';');
            return AUTHENTICATED.iter().any(|p| p.eq_ignore_ascii_case(protocol));
        }
    }
    false
}

/// The attribute names a server announced in its `XFORWARD` EHLO line.
pub fn offered_by(ehlo_lines: &str) -> Vec<String> {
    ehlo_lines
        .lines()
        .skip(1)
        .find_map(|l| {
            let mut words = l.split_ascii_whitespace();
            words.next().filter(|w| w.eq_ignore_ascii_case("XFORWARD")).map(|_| words.map(str::to_string).collect())
        })
        .unwrap_or_default()
}

/// RFC 3461 xtext: printable ASCII without `=`, with `+XX` hex escapes.
fn is_xtext(v: &str) -> bool {
    let b = v.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                let hex = |c: u8| c.is_ascii_digit() || (b'A'..=b'F').contains(&c);
                if !(b.get(i + 1).copied().is_some_and(hex) && b.get(i + 2).copied().is_some_and(hex)) {
                    return false;
                }
                i += 3;
            }
            b'!'..=b'~' if b[i] != b'=' => i += 1,
            _ => return false,
        }
    }
    true
}

/// A client's text made safe to echo in one reply line.
fn printable(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_graphic()).take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_accumulate_and_later_values_win() {
        let mut x = Xforward::default();
        x.update("NAME=mail.example.org ADDR=192.0.2.7").unwrap();
        x.update("helo=mail.example.org PROTO=ESMTP ADDR=192.0.2.8").unwrap();
        assert_eq!(x.get("addr"), Some("192.0.2.8"));
        assert_eq!(x.get("HELO"), Some("mail.example.org"));
        assert_eq!(x.get("IDENT"), None);
        x.update("NAME=[UNAVAILABLE] SOURCE=REMOTE").unwrap();
        assert_eq!(x.get("NAME"), Some("[UNAVAILABLE]"));
    }

    #[test]
    fn client_address_and_authentication() {
        let mut x = Xforward::default();
        assert_eq!(x.client_addr(), None);
        x.update("ADDR=192.0.2.7").unwrap();
        assert_eq!(x.client_addr(), Some("192.0.2.7".parse().unwrap()));
        x.update("ADDR=IPv6:2001:db8::7").unwrap();
        assert_eq!(x.client_addr(), Some("2001:db8::7".parse().unwrap()));
        x.update("ADDR=[UNAVAILABLE]").unwrap();
        assert_eq!(x.client_addr(), None);

        let by = |with: &str| {
            format!(
                "Received: from c.example (c.example [192.0.2.7])\r\n\tby mx.example (Postfix) with {with} id 4Q;\r\n\t\
                 Mon, 30 Nov 2026 10:00:00 +0000 (UTC)\r\nReceived: from x by y with ESMTPSA;\r\nSubject: s\r\n\r\n"
            )
        };
        assert!(authenticated_per_mta(by("ESMTPSA").as_bytes()));
        assert!(authenticated_per_mta(by("esmtpa").as_bytes()));
        assert!(authenticated_per_mta(by("UTF8SMTPSA").as_bytes()));
        assert!(!authenticated_per_mta(by("ESMTPS").as_bytes()));
        assert!(!authenticated_per_mta(by("ESMTP").as_bytes()), "only the topmost line counts");
        assert!(!authenticated_per_mta(b"Subject: with ESMTPA\r\n\r\n"));
        assert!(!authenticated_per_mta(b"Received: from x by y; date\r\n\r\n"));
    }

    #[test]
    fn bad_commands_are_refused_whole_with_501() {
        let mut x = Xforward::default();
        x.update("ADDR=192.0.2.7").unwrap();
        for bad in ["", "   ", "ADDR", "COLOUR=red", "NAME=a=b", "HELO=bad+zz", "HELO=tail+4", "NAME=ok ADDR=\u{e9}"] {
            let r = x.update(bad).unwrap_err();
            assert_eq!((r.code, r.esc), (501, Some([5, 5, 4])), "{bad:?}");
        }
        x.update(&format!("HELO={}", "a".repeat(256))).unwrap_err();
        assert_eq!(x.get("ADDR"), Some("192.0.2.7"), "a refused command changes nothing");
        assert_eq!(x.get("NAME"), None);
        x.update("HELO=with+20space").unwrap();
        assert_eq!(x.get("HELO"), Some("with+20space"), "xtext kept as received");
    }

    #[test]
    fn only_what_the_hop_offers_is_sent_in_short_lines() {
        let mut x = Xforward::default();
        x.update("NAME=client.example ADDR=192.0.2.7 HELO=client.example IDENT=Q1").unwrap();
        let offered = offered_by("mx.example\nPIPELINING\nXFORWARD NAME ADDR PROTO HELO SOURCE PORT\n8BITMIME");
        assert_eq!(offered, ["NAME", "ADDR", "PROTO", "HELO", "SOURCE", "PORT"]);
        assert_eq!(x.commands_for(&offered), ["XFORWARD NAME=client.example ADDR=192.0.2.7 HELO=client.example\r\n"]);
        assert!(x.commands_for(&[]).is_empty(), "a hop without XFORWARD hears nothing");
        assert!(Xforward::default().commands_for(&offered).is_empty());
        assert!(offered_by("mx.example\nXFORWARDED\n").is_empty());

        let mut long = Xforward::default();
        let v = "h".repeat(255);
        long.update(&format!("NAME={v} HELO={v} IDENT={v}")).unwrap();
        let lines = long.commands_for(&ATTRIBUTES.map(String::from));
        assert_eq!(lines.len(), 3);
        assert!(lines.iter().all(|l| l.len() <= MAX_LINE && l.starts_with("XFORWARD ") && l.ends_with("\r\n")));
    }
}
