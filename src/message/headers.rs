//! The header block of a raw message, read without a MIME parser: where
//! each field starts and ends, and its name and (unfolded) value. Cheap
//! enough to run on the reactor, so scope checks and header edits need no
//! extraction.

/// Every header mailtriage adds starts with this; inbound ones are removed
/// first. Here, below scope and act, because both read it.
pub const HEADER_PREFIX: &str = "X-Triage-";

/// Whether a header name is one of ours (`X-Triage-*`, any case). Compared
/// as bytes: a peer's name may cut a UTF-8 character at the prefix length.
pub fn is_triage_header(name: &str) -> bool {
    name.as_bytes().get(..HEADER_PREFIX.len()).is_some_and(|p| p.eq_ignore_ascii_case(HEADER_PREFIX.as_bytes()))
}

/// One header field in a raw message: its bytes `start..end`, continuation
/// lines and line ending included.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub start: usize,
    pub end: usize,
}

impl Field {
    /// The field name, trimmed.
    pub fn name<'a>(&self, raw: &'a [u8]) -> &'a [u8] {
        let line = &raw[self.start..self.end];
        let colon = line.iter().position(|&b| b == b':').unwrap_or(line.len());
        trim_ascii(&line[..colon])
    }

    /// The value after the colon: folding removed, outer space trimmed.
    /// Bytes, not text: values are compared as ASCII and never decoded here.
    pub fn value(&self, raw: &[u8]) -> Vec<u8> {
        let line = &raw[self.start..self.end];
        let colon = line.iter().position(|&b| b == b':').map_or(line.len(), |c| c + 1);
        let unfolded: Vec<u8> = line[colon..].iter().copied().filter(|&b| b != b'\r' && b != b'\n').collect();
        trim_ascii(&unfolded).to_vec()
    }
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(b.len());
    let end = b.iter().rposition(|c| !c.is_ascii_whitespace()).map_or(start, |e| e + 1);
    &b[start..end]
}

/// The header fields of a raw message, up to the empty line (or the first
/// line that is neither a field nor a continuation: the body starts there).
pub fn fields(raw: &[u8]) -> Vec<Field> {
    let mut fields: Vec<Field> = Vec::new();
    let mut pos = 0;
    while pos < raw.len() {
        let line_end = raw[pos..].iter().position(|&b| b == b'\n').map_or(raw.len(), |p| pos + p + 1);
        let line = &raw[pos..line_end];
        let content = line.strip_suffix(b"\n").map(|l| l.strip_suffix(b"\r").unwrap_or(l)).unwrap_or(line);
        if content.is_empty() {
            break;
        }
        if matches!(content[0], b' ' | b'\t') {
            match fields.last_mut() {
                Some(f) => f.end = line_end,
                None => break,
            }
        } else if content.iter().position(|&b| b == b':').is_some_and(|c| c > 0) {
            fields.push(Field { start: pos, end: line_end });
        } else {
            break;
        }
        pos = line_end;
    }
    fields
}

/// The values of every field called `name` (ASCII case-insensitive), in order.
pub fn values(raw: &[u8], name: &str) -> Vec<Vec<u8>> {
    fields(raw).iter().filter(|f| f.name(raw).eq_ignore_ascii_case(name.as_bytes())).map(|f| f.value(raw)).collect()
}

/// Names of a raw message's header fields, in order (what
/// `Plan::strip_inbound` and `Plan::for_decision` count removals against).
pub fn names(raw: &[u8]) -> Vec<String> {
    fields(raw).iter().map(|f| String::from_utf8_lossy(f.name(raw)).into_owned()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_names_and_unfolded_values() {
        let raw = b"Received: a\r\nSubject: hi\r\n there\r\nX: \r\nno colon line\r\n\r\nbody: no\r\n";
        assert_eq!(names(raw), ["Received", "Subject", "X"]);
        assert_eq!(values(raw, "subject"), [b"hi there".to_vec()]);
        assert_eq!(values(raw, "x"), [Vec::<u8>::new()]);
        assert!(values(raw, "body").is_empty());
        // A continuation before any field ends the block; LF-only works.
        assert!(fields(b" folded\r\nA: b\r\n\r\n").is_empty());
        assert_eq!(values(b"A: 1\nA: 2\n\nb", "a"), [b"1".to_vec(), b"2".to_vec()]);
        // Bytes that are not UTF-8 stay bytes.
        assert_eq!(values(b"A: \xff\xfe\r\n\r\n", "A"), [vec![0xff, 0xfe]]);
    }
}
