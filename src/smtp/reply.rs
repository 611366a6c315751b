//! SMTP replies we send: a code, an enhanced status code (RFC 3463) and text.

use std::fmt;

/// One reply line (or several, for EHLO), ready to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Enhanced status code, e.g. `[2, 1, 0]`; omitted for 220/221/354 and the EHLO lines.
    pub esc: Option<[u8; 3]>,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn new(code: u16, esc: [u8; 3], text: impl Into<String>) -> Reply {
        Reply { code, esc: Some(esc), lines: vec![text.into()] }
    }

    /// A reply without an enhanced status code (greeting, 354, EHLO).
    pub fn bare(code: u16, lines: Vec<String>) -> Reply {
        Reply { code, esc: None, lines }
    }

    /// A next hop's reply, passed back with its code and text so the client
    /// sees what the final server said. Control characters are dropped: a
    /// hop's text must not break our framing.
    pub fn from_hop(r: &smtp_proto::Response<String>) -> Reply {
        let esc = (r.esc[0] != 0).then_some(r.esc);
        let clean = |l: &str| l.chars().filter(|c| !c.is_control()).collect::<String>();
        let lines: Vec<String> = r.message.lines().map(clean).filter(|l| !l.is_empty()).collect();
        let code = if (200..600).contains(&r.code) { r.code } else { 451 };
        Reply { code, esc, lines: if lines.is_empty() { vec!["next hop replied".into()] } else { lines } }
    }

    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// 4xx: the client keeps the message and retries.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    // The replies the session uses, in one place.

    pub fn ok(esc: [u8; 3]) -> Reply {
        Reply::new(250, esc, "OK")
    }
    pub fn bad_sequence(what: &str) -> Reply {
        Reply::new(503, [5, 5, 1], what)
    }
    pub fn syntax(what: &str) -> Reply {
        Reply::new(501, [5, 5, 4], what)
    }
    pub fn unrecognised() -> Reply {
        Reply::new(500, [5, 5, 2], "command not recognized")
    }
    pub fn not_implemented() -> Reply {
        Reply::new(502, [5, 5, 1], "command not implemented")
    }
    pub fn line_too_long() -> Reply {
        Reply::new(500, [5, 5, 2], "line too long")
    }
    pub fn too_big(limit: usize) -> Reply {
        Reply::new(552, [5, 3, 4], format!("message size exceeds fixed limit of {limit} bytes"))
    }
    pub fn hop_unavailable() -> Reply {
        Reply::new(451, [4, 4, 1], "next hop unavailable, try again later")
    }
    pub fn tempfail(text: &str) -> Reply {
        Reply::new(451, [4, 3, 0], text)
    }
    pub fn timeout() -> Reply {
        Reply::new(421, [4, 4, 2], "timeout exceeded, closing connection")
    }
}

impl fmt::Display for Reply {
    /// Wire form: `250-first\r\n250 last\r\n`, enhanced code after the number.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.lines.len().max(1);
        for i in 0..n {
            let sep = if i + 1 == n { ' ' } else { '-' };
            write!(f, "{}{sep}", self.code)?;
            if let Some([a, b, c]) = self.esc {
                write!(f, "{a}.{b}.{c} ")?;
            }
            write!(f, "{}\r\n", self.lines.get(i).map_or("", |s| s.as_str()))?;
        }
        Ok(())
    }
}

/// The hop's replies (one per relayed recipient) as replies to the client's
/// recipients: a kept recipient gets its own; one replaced by the decision
/// (reroute, review, quarantine) gets the replacement's, since its message
/// went there.
pub fn map_replies(client: &[String], relayed: &[String], replies: &[Reply]) -> Vec<Reply> {
    let pos = |r: &str| relayed.iter().position(|x| x.eq_ignore_ascii_case(r));
    let replacements: Vec<Reply> = relayed
        .iter()
        .zip(replies)
        .filter(|(r, _)| !client.iter().any(|c| c.eq_ignore_ascii_case(r)))
        .map(|(_, reply)| reply.clone())
        .collect();
    let fallback = combine(if replacements.is_empty() { replies } else { &replacements });
    client.iter().map(|c| pos(c).and_then(|i| replies.get(i).cloned()).unwrap_or_else(|| fallback.clone())).collect()
}

/// One reply for several: success only if all succeeded; else a transient
/// failure if there is one (the client retries), else the first failure.
pub fn combine(replies: &[Reply]) -> Reply {
    replies
        .iter()
        .find(|r| r.is_transient())
        .or_else(|| replies.iter().find(|r| !r.is_positive()))
        .or_else(|| replies.first())
        .cloned()
        .unwrap_or_else(Reply::hop_unavailable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form() {
        assert_eq!(Reply::ok([2, 1, 0]).to_string(), "250 2.1.0 OK\r\n");
        assert_eq!(Reply::bare(250, vec!["mx".into(), "SIZE 10".into()]).to_string(), "250-mx\r\n250 SIZE 10\r\n");
        let hop = smtp_proto::Response { code: 550, esc: [5, 1, 1], message: "no such user\r\nbye\x07".to_string() };
        assert_eq!(Reply::from_hop(&hop).to_string(), "550-5.1.1 no such user\r\n550 5.1.1 bye\r\n");
        let odd = smtp_proto::Response { code: 999, esc: [0, 0, 0], message: String::new() };
        assert_eq!(Reply::from_hop(&odd).code, 451);
    }

    #[test]
    fn replies_map_back_to_the_client_recipients() {
        let ok = Reply::new(250, [2, 0, 0], "ok");
        let full = Reply::new(452, [4, 2, 2], "full");
        let client = vec!["a@x".to_string(), "b@x".to_string()];
        // Rerouted: both get the department mailbox's answer.
        assert_eq!(
            map_replies(&client, &["d@x".into()], std::slice::from_ref(&full)),
            vec![full.clone(), full.clone()]
        );
        // Copied: each keeps its own; the copy's failure does not fail them.
        let relayed = vec!["a@x".into(), "b@x".into(), "d@x".into()];
        assert_eq!(
            map_replies(&client, &relayed, &[ok.clone(), full.clone(), full.clone()]),
            vec![ok.clone(), full.clone()]
        );
        assert_eq!(combine(&[ok.clone(), full.clone()]), full);
        assert_eq!(combine(&[ok.clone(), ok.clone()]), ok);
    }
}
