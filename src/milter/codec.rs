//! Milter protocol v6 wire format: frames ⇄ typed commands and replies.
//!
//! Every packet is `u32 length (big-endian) | u8 code | payload`, where the
//! length counts the code byte plus the payload. Strings are NUL-terminated.
//! The codec is sans-IO: [`decode_command`] parses one complete frame held in
//! a buffer, [`read_frame`] reads one frame from an async stream with a size
//! bound, and [`Reply::encode`] serialises what we send back.
//!
//! Written from the public protocol descriptions (the Sendmail milter protocol
//! notes and the libmilter API documentation); no libmilter code is used.

use std::collections::BTreeMap;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Highest protocol version we speak.
pub const PROTOCOL_VERSION: u32 = 6;

/// Action flags (`SMFIF_*`): what the filter may change at end-of-message.
pub mod action {
    pub const ADD_HEADERS: u32 = 0x0001;
    pub const CHANGE_BODY: u32 = 0x0002;
    pub const ADD_RCPT: u32 = 0x0004;
    pub const DEL_RCPT: u32 = 0x0008;
    pub const CHANGE_HEADERS: u32 = 0x0010;
    pub const QUARANTINE: u32 = 0x0020;
    pub const CHANGE_FROM: u32 = 0x0040;
    pub const ADD_RCPT_PAR: u32 = 0x0080;
    pub const SET_SYMLIST: u32 = 0x0100;
}

/// Protocol flags (`SMFIP_*`): stages the MTA skips, and commands it sends
/// without waiting for a reply.
pub mod proto {
    pub const NO_CONNECT: u32 = 0x0000_0001;
    pub const NO_HELO: u32 = 0x0000_0002;
    pub const NO_MAIL: u32 = 0x0000_0004;
    pub const NO_RCPT: u32 = 0x0000_0008;
    pub const NO_BODY: u32 = 0x0000_0010;
    pub const NO_HEADERS: u32 = 0x0000_0020;
    pub const NO_EOH: u32 = 0x0000_0040;
    pub const NR_HEADER: u32 = 0x0000_0080;
    pub const NO_UNKNOWN: u32 = 0x0000_0100;
    pub const NO_DATA: u32 = 0x0000_0200;
    pub const SKIP: u32 = 0x0000_0400;
    pub const RCPT_REJ: u32 = 0x0000_0800;
    pub const NR_CONNECT: u32 = 0x0000_1000;
    pub const NR_HELO: u32 = 0x0000_2000;
    pub const NR_MAIL: u32 = 0x0000_4000;
    pub const NR_RCPT: u32 = 0x0000_8000;
    pub const NR_DATA: u32 = 0x0001_0000;
    pub const NR_UNKNOWN: u32 = 0x0002_0000;
    pub const NR_EOH: u32 = 0x0004_0000;
    pub const NR_BODY: u32 = 0x0008_0000;
    pub const HEADER_LEADING_SPACE: u32 = 0x0010_0000;
}

/// Macro stages (`SMFIM_*`), used to request macro lists at negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum MacroStage {
    Connect = 0,
    Helo = 1,
    Mail = 2,
    Rcpt = 3,
    Data = 4,
    EndOfMessage = 5,
    EndOfHeaders = 6,
}

impl MacroStage {
    fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => Self::Connect,
            1 => Self::Helo,
            2 => Self::Mail,
            3 => Self::Rcpt,
            4 => Self::Data,
            5 => Self::EndOfMessage,
            6 => Self::EndOfHeaders,
            _ => return None,
        })
    }
}

/// The option negotiation packet, both directions (`SMFIC_OPTNEG` / `SMFIR_OPTNEG`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Negotiation {
    pub version: u32,
    pub actions: u32,
    pub protocol: u32,
    /// Macro names requested per stage (reply direction only, v6).
    pub macros: BTreeMap<MacroStage, String>,
}

/// The peer address sent with `SMFIC_CONNECT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectAddress {
    Inet { port: u16, addr: String },
    Inet6 { port: u16, addr: String },
    Unix { path: String },
    Unknown,
}

/// A command from the MTA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Negotiate(Negotiation),
    /// Macro values for the command whose code is given (`SMFIC_MACRO`).
    Macros {
        stage: u8,
        pairs: Vec<(String, String)>,
    },
    Connect {
        hostname: String,
        address: ConnectAddress,
    },
    Helo(String),
    /// `args[0]` is the sender in angle brackets, the rest are ESMTP parameters.
    Mail(Vec<String>),
    Rcpt(Vec<String>),
    Data,
    Header {
        name: String,
        value: String,
    },
    EndOfHeaders,
    Body(Vec<u8>),
    /// End of message; some MTAs carry a last body chunk here.
    EndOfMessage(Vec<u8>),
    Abort,
    Quit,
    /// Quit, but a new SMTP connection reuses this milter connection.
    QuitNewConnection,
    Unknown(String),
}

/// A reply or modification we send to the MTA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Negotiate(Negotiation),
    Continue,
    Accept,
    Reject,
    Tempfail,
    Discard,
    /// Stop sending body chunks (only if the MTA offered `SMFIP_SKIP`).
    Skip,
    /// A custom SMTP reply, e.g. `550 5.7.1 Rejected by policy`.
    ReplyCode(String),
    Progress,
    AddHeader {
        name: String,
        value: String,
    },
    /// Insert a header at a 0-based position in the header list.
    InsertHeader {
        index: u32,
        name: String,
        value: String,
    },
    /// Change the `index`-th (1-based) occurrence of `name`; an empty value deletes it.
    ChangeHeader {
        index: u32,
        name: String,
        value: String,
    },
    AddRcpt(String),
    AddRcptWithArgs {
        rcpt: String,
        args: Vec<String>,
    },
    DelRcpt(String),
    ChangeFrom {
        sender: String,
        args: Vec<String>,
    },
    ReplaceBody(Vec<u8>),
    Quarantine(String),
}

/// Why a frame could not be read or understood.
#[derive(Debug, Error)]
pub enum CodecError {
    #[error("milter frame of {len} bytes exceeds the limit of {max} bytes")]
    Oversized { len: usize, max: usize },
    #[error("empty milter frame (length 0)")]
    Empty,
    #[error("connection closed in the middle of a milter frame")]
    Truncated,
    #[error("malformed {command} packet: {reason}")]
    Malformed { command: &'static str, reason: &'static str },
    #[error("unknown milter command code 0x{0:02x}")]
    UnknownCommand(u8),
    #[error("reading milter frame: {0}")]
    Io(#[from] std::io::Error),
}

fn malformed(command: &'static str, reason: &'static str) -> CodecError {
    CodecError::Malformed { command, reason }
}

/// Reads one frame (code byte + payload). `Ok(None)` means the peer closed the
/// connection cleanly between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    max_len: usize,
) -> Result<Option<(u8, Vec<u8>)>, CodecError> {
    let mut len_buf = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = reader.read(&mut len_buf[got..]).await?;
        if n == 0 {
            return if got == 0 { Ok(None) } else { Err(CodecError::Truncated) };
        }
        got += n;
    }
    let len = u32::from_be_bytes(len_buf) as usize;
    if len == 0 {
        return Err(CodecError::Empty);
    }
    if len > max_len {
        return Err(CodecError::Oversized { len, max: max_len });
    }
    let eof = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => CodecError::Truncated,
        _ => CodecError::Io(e),
    };
    let code = reader.read_u8().await.map_err(eof)?;
    let mut payload = vec![0u8; len - 1];
    reader.read_exact(&mut payload).await.map_err(eof)?;
    Ok(Some((code, payload)))
}

/// A cursor over a payload with the primitive readers the protocol needs.
struct Payload<'a> {
    data: &'a [u8],
    command: &'static str,
}

impl<'a> Payload<'a> {
    fn u32(&mut self) -> Result<u32, CodecError> {
        if self.data.len() < 4 {
            return Err(malformed(self.command, "short integer"));
        }
        let (head, rest) = self.data.split_at(4);
        self.data = rest;
        Ok(u32::from_be_bytes([head[0], head[1], head[2], head[3]]))
    }

    fn u16(&mut self) -> Result<u16, CodecError> {
        if self.data.len() < 2 {
            return Err(malformed(self.command, "short port number"));
        }
        let (head, rest) = self.data.split_at(2);
        self.data = rest;
        Ok(u16::from_be_bytes([head[0], head[1]]))
    }

    fn u8(&mut self) -> Result<u8, CodecError> {
        let (&b, rest) = self.data.split_first().ok_or_else(|| malformed(self.command, "missing byte"))?;
        self.data = rest;
        Ok(b)
    }

    /// A NUL-terminated string. Non-UTF-8 bytes (8-bit headers) are replaced,
    /// never rejected: mail in the wild is not always valid UTF-8.
    fn cstr(&mut self) -> Result<String, CodecError> {
        let end = self
            .data
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| malformed(self.command, "string not NUL-terminated"))?;
        let s = String::from_utf8_lossy(&self.data[..end]).into_owned();
        self.data = &self.data[end + 1..];
        Ok(s)
    }

    /// Every remaining NUL-terminated string.
    fn cstrs(&mut self) -> Result<Vec<String>, CodecError> {
        let mut out = Vec::new();
        while !self.data.is_empty() {
            out.push(self.cstr()?);
        }
        Ok(out)
    }
}

/// Parses a command frame (as returned by [`read_frame`]).
pub fn decode_command(code: u8, payload: &[u8]) -> Result<Command, CodecError> {
    let name = command_name(code);
    let mut p = Payload { data: payload, command: name };
    let cmd = match code {
        b'O' => {
            let version = p.u32()?;
            let actions = p.u32()?;
            let protocol = p.u32()?;
            Command::Negotiate(Negotiation { version, actions, protocol, macros: BTreeMap::new() })
        }
        b'D' => {
            let stage = p.u8()?;
            let items = p.cstrs()?;
            if items.len() % 2 != 0 {
                return Err(malformed(name, "macro name without value"));
            }
            let mut pairs = Vec::with_capacity(items.len() / 2);
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                pairs.push((k, v));
            }
            Command::Macros { stage, pairs }
        }
        b'C' => {
            let hostname = p.cstr()?;
            let family = p.u8()?;
            let address = match family {
                b'U' => ConnectAddress::Unknown,
                b'L' => {
                    let _port = p.u16()?;
                    ConnectAddress::Unix { path: p.cstr()? }
                }
                b'4' => ConnectAddress::Inet { port: p.u16()?, addr: p.cstr()? },
                b'6' => ConnectAddress::Inet6 { port: p.u16()?, addr: p.cstr()? },
                _ => return Err(malformed(name, "unknown address family")),
            };
            Command::Connect { hostname, address }
        }
        b'H' => Command::Helo(p.cstr()?),
        b'M' | b'R' => {
            let args = p.cstrs()?;
            if args.is_empty() {
                return Err(malformed(name, "no address"));
            }
            if code == b'M' {
                Command::Mail(args)
            } else {
                Command::Rcpt(args)
            }
        }
        b'T' => Command::Data,
        b'L' => {
            let hname = p.cstr()?;
            let value = p.cstr()?;
            if hname.is_empty() {
                return Err(malformed(name, "empty header name"));
            }
            Command::Header { name: hname, value }
        }
        b'N' => Command::EndOfHeaders,
        b'B' => Command::Body(payload.to_vec()),
        b'E' => Command::EndOfMessage(payload.to_vec()),
        b'A' => Command::Abort,
        b'Q' => Command::Quit,
        b'K' => Command::QuitNewConnection,
        b'U' => Command::Unknown(p.cstr().unwrap_or_default()),
        other => return Err(CodecError::UnknownCommand(other)),
    };
    Ok(cmd)
}

fn command_name(code: u8) -> &'static str {
    match code {
        b'O' => "SMFIC_OPTNEG",
        b'D' => "SMFIC_MACRO",
        b'C' => "SMFIC_CONNECT",
        b'H' => "SMFIC_HELO",
        b'M' => "SMFIC_MAIL",
        b'R' => "SMFIC_RCPT",
        b'T' => "SMFIC_DATA",
        b'L' => "SMFIC_HEADER",
        b'N' => "SMFIC_EOH",
        b'B' => "SMFIC_BODY",
        b'E' => "SMFIC_BODYEOB",
        b'A' => "SMFIC_ABORT",
        b'Q' => "SMFIC_QUIT",
        b'K' => "SMFIC_QUIT_NC",
        b'U' => "SMFIC_UNKNOWN",
        _ => "unknown",
    }
}

fn put_cstr(buf: &mut Vec<u8>, s: &str) {
    // An embedded NUL would split the string on the wire; drop it.
    buf.extend(s.bytes().filter(|&b| b != 0));
    buf.push(0);
}

impl Reply {
    /// The reply's code byte.
    pub fn code(&self) -> u8 {
        match self {
            Reply::Negotiate(_) => b'O',
            Reply::Continue => b'c',
            Reply::Accept => b'a',
            Reply::Reject => b'r',
            Reply::Tempfail => b't',
            Reply::Discard => b'd',
            Reply::Skip => b's',
            Reply::ReplyCode(_) => b'y',
            Reply::Progress => b'p',
            Reply::AddHeader { .. } => b'h',
            Reply::InsertHeader { .. } => b'i',
            Reply::ChangeHeader { .. } => b'm',
            Reply::AddRcpt(_) => b'+',
            Reply::AddRcptWithArgs { .. } => b'2',
            Reply::DelRcpt(_) => b'-',
            Reply::ChangeFrom { .. } => b'e',
            Reply::ReplaceBody(_) => b'b',
            Reply::Quarantine(_) => b'q',
        }
    }

    /// Serialises the reply as a complete frame (length prefix included).
    pub fn encode(&self) -> Vec<u8> {
        let mut body = vec![self.code()];
        match self {
            Reply::Negotiate(n) => {
                body.extend(n.version.to_be_bytes());
                body.extend(n.actions.to_be_bytes());
                body.extend(n.protocol.to_be_bytes());
                for (stage, names) in &n.macros {
                    body.extend((*stage as u32).to_be_bytes());
                    put_cstr(&mut body, names);
                }
            }
            Reply::Continue
            | Reply::Accept
            | Reply::Reject
            | Reply::Tempfail
            | Reply::Discard
            | Reply::Skip
            | Reply::Progress => {}
            Reply::ReplyCode(text) | Reply::AddRcpt(text) | Reply::DelRcpt(text) | Reply::Quarantine(text) => {
                put_cstr(&mut body, text)
            }
            Reply::AddHeader { name, value } => {
                put_cstr(&mut body, name);
                put_cstr(&mut body, value);
            }
            Reply::InsertHeader { index, name, value } | Reply::ChangeHeader { index, name, value } => {
                body.extend(index.to_be_bytes());
                put_cstr(&mut body, name);
                put_cstr(&mut body, value);
            }
            Reply::AddRcptWithArgs { rcpt: addr, args } | Reply::ChangeFrom { sender: addr, args } => {
                put_cstr(&mut body, addr);
                if !args.is_empty() {
                    put_cstr(&mut body, &args.join(" "));
                }
            }
            Reply::ReplaceBody(bytes) => body.extend_from_slice(bytes),
        }
        let mut frame = Vec::with_capacity(body.len() + 4);
        frame.extend((body.len() as u32).to_be_bytes());
        frame.extend(body);
        frame
    }
}

/// Parses a reply frame. The daemon never needs this; it exists so the codec
/// can be tested in both directions and so test peers can read our replies.
pub fn decode_reply(code: u8, payload: &[u8]) -> Result<Reply, CodecError> {
    let mut p = Payload { data: payload, command: "reply" };
    Ok(match code {
        b'O' => {
            let version = p.u32()?;
            let actions = p.u32()?;
            let protocol = p.u32()?;
            let mut macros = BTreeMap::new();
            while !p.data.is_empty() {
                let stage =
                    MacroStage::from_u32(p.u32()?).ok_or_else(|| malformed("SMFIR_OPTNEG", "bad macro stage"))?;
                macros.insert(stage, p.cstr()?);
            }
            Reply::Negotiate(Negotiation { version, actions, protocol, macros })
        }
        b'c' => Reply::Continue,
        b'a' => Reply::Accept,
        b'r' => Reply::Reject,
        b't' => Reply::Tempfail,
        b'd' => Reply::Discard,
        b's' => Reply::Skip,
        b'p' => Reply::Progress,
        b'y' => Reply::ReplyCode(p.cstr()?),
        b'+' => Reply::AddRcpt(p.cstr()?),
        b'-' => Reply::DelRcpt(p.cstr()?),
        b'q' => Reply::Quarantine(p.cstr()?),
        b'h' => Reply::AddHeader { name: p.cstr()?, value: p.cstr()? },
        b'i' => Reply::InsertHeader { index: p.u32()?, name: p.cstr()?, value: p.cstr()? },
        b'm' => Reply::ChangeHeader { index: p.u32()?, name: p.cstr()?, value: p.cstr()? },
        b'2' | b'e' => {
            let addr = p.cstr()?;
            let args = if p.data.is_empty() {
                Vec::new()
            } else {
                p.cstr()?.split(' ').filter(|s| !s.is_empty()).map(str::to_owned).collect()
            };
            if code == b'2' {
                Reply::AddRcptWithArgs { rcpt: addr, args }
            } else {
                Reply::ChangeFrom { sender: addr, args }
            }
        }
        b'b' => Reply::ReplaceBody(payload.to_vec()),
        other => return Err(CodecError::UnknownCommand(other)),
    })
}

/// Serialises a command as a frame: the MTA side of the protocol, used by
/// tests and by anything that needs to drive a milter.
pub fn encode_command(cmd: &Command) -> Vec<u8> {
    let (code, mut body): (u8, Vec<u8>) = match cmd {
        Command::Negotiate(n) => {
            let mut b = Vec::new();
            b.extend(n.version.to_be_bytes());
            b.extend(n.actions.to_be_bytes());
            b.extend(n.protocol.to_be_bytes());
            (b'O', b)
        }
        Command::Macros { stage, pairs } => {
            let mut b = vec![*stage];
            for (k, v) in pairs {
                put_cstr(&mut b, k);
                put_cstr(&mut b, v);
            }
            (b'D', b)
        }
        Command::Connect { hostname, address } => {
            let mut b = Vec::new();
            put_cstr(&mut b, hostname);
            match address {
                ConnectAddress::Unknown => b.push(b'U'),
                ConnectAddress::Unix { path } => {
                    b.push(b'L');
                    b.extend(0u16.to_be_bytes());
                    put_cstr(&mut b, path);
                }
                ConnectAddress::Inet { port, addr } | ConnectAddress::Inet6 { port, addr } => {
                    b.push(if matches!(address, ConnectAddress::Inet { .. }) { b'4' } else { b'6' });
                    b.extend(port.to_be_bytes());
                    put_cstr(&mut b, addr);
                }
            }
            (b'C', b)
        }
        Command::Helo(h) => {
            let mut b = Vec::new();
            put_cstr(&mut b, h);
            (b'H', b)
        }
        Command::Mail(args) | Command::Rcpt(args) => {
            let mut b = Vec::new();
            for a in args {
                put_cstr(&mut b, a);
            }
            (if matches!(cmd, Command::Mail(_)) { b'M' } else { b'R' }, b)
        }
        Command::Data => (b'T', Vec::new()),
        Command::Header { name, value } => {
            let mut b = Vec::new();
            put_cstr(&mut b, name);
            put_cstr(&mut b, value);
            (b'L', b)
        }
        Command::EndOfHeaders => (b'N', Vec::new()),
        Command::Body(bytes) => (b'B', bytes.clone()),
        Command::EndOfMessage(bytes) => (b'E', bytes.clone()),
        Command::Abort => (b'A', Vec::new()),
        Command::Quit => (b'Q', Vec::new()),
        Command::QuitNewConnection => (b'K', Vec::new()),
        Command::Unknown(s) => {
            let mut b = Vec::new();
            put_cstr(&mut b, s);
            (b'U', b)
        }
    };
    let mut frame = Vec::with_capacity(body.len() + 5);
    frame.extend(((body.len() + 1) as u32).to_be_bytes());
    frame.push(code);
    frame.append(&mut body);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_one(bytes: &[u8], max: usize) -> Result<Option<(u8, Vec<u8>)>, CodecError> {
        let mut r = bytes;
        read_frame(&mut r, max).await
    }

    fn all_commands() -> Vec<Command> {
        vec![
            Command::Negotiate(Negotiation { version: 6, actions: 0x1ff, protocol: 0x1fffff, macros: BTreeMap::new() }),
            Command::Macros {
                stage: b'C',
                pairs: vec![("j".into(), "mx.example".into()), ("{daemon_name}".into(), "smtpd".into())],
            },
            Command::Connect {
                hostname: "client.example".into(),
                address: ConnectAddress::Inet { port: 4711, addr: "192.0.2.1".into() },
            },
            Command::Connect {
                hostname: "v6".into(),
                address: ConnectAddress::Inet6 { port: 25, addr: "2001:db8::1".into() },
            },
            Command::Connect { hostname: "local".into(), address: ConnectAddress::Unix { path: "/run/x.sock".into() } },
            Command::Connect { hostname: "unknown".into(), address: ConnectAddress::Unknown },
            Command::Helo("client.example".into()),
            Command::Mail(vec!["<a@example.com>".into(), "SIZE=100".into(), "BODY=8BITMIME".into()]),
            Command::Rcpt(vec!["<b@example.com>".into()]),
            Command::Data,
            Command::Header { name: "Subject".into(), value: "hello\n\tworld".into() },
            Command::EndOfHeaders,
            Command::Body(b"line 1\r\nline 2\r\n".to_vec()),
            Command::Body(Vec::new()),
            Command::EndOfMessage(Vec::new()),
            Command::EndOfMessage(b"tail".to_vec()),
            Command::Abort,
            Command::Quit,
            Command::QuitNewConnection,
            Command::Unknown("XFOO bar".into()),
        ]
    }

    #[tokio::test]
    async fn every_command_round_trips() {
        for cmd in all_commands() {
            let frame = encode_command(&cmd);
            let (code, payload) = read_one(&frame, 1 << 20).await.unwrap().unwrap();
            assert_eq!(decode_command(code, &payload).unwrap(), cmd, "frame {frame:?}");
        }
    }

    fn all_replies() -> Vec<Reply> {
        let mut macros = BTreeMap::new();
        macros.insert(MacroStage::EndOfMessage, "i".to_string());
        macros.insert(MacroStage::Mail, "{auth_authen}".to_string());
        vec![
            Reply::Negotiate(Negotiation { version: 6, actions: 0x13d, protocol: 0x1000, macros }),
            Reply::Negotiate(Negotiation { version: 2, actions: 1, protocol: 0, macros: BTreeMap::new() }),
            Reply::Continue,
            Reply::Accept,
            Reply::Reject,
            Reply::Tempfail,
            Reply::Discard,
            Reply::Skip,
            Reply::Progress,
            Reply::ReplyCode("550 5.7.1 Rejected by policy".into()),
            Reply::AddHeader { name: "X-Triage-Department".into(), value: "billing".into() },
            Reply::InsertHeader { index: 0, name: "X-First".into(), value: "1".into() },
            Reply::ChangeHeader { index: 2, name: "X-Triage-Department".into(), value: String::new() },
            Reply::AddRcpt("<billing@example.com>".into()),
            Reply::AddRcptWithArgs {
                rcpt: "<b@example.com>".into(),
                args: vec!["NOTIFY=NEVER".into(), "ORCPT=rfc822;x@y".into()],
            },
            Reply::DelRcpt("<user@example.com>".into()),
            Reply::ChangeFrom { sender: "<bounce@example.com>".into(), args: vec![] },
            Reply::ChangeFrom { sender: "<bounce@example.com>".into(), args: vec!["SIZE=10".into()] },
            Reply::ReplaceBody(b"new body\r\n".to_vec()),
            Reply::Quarantine("held for review".into()),
        ]
    }

    #[tokio::test]
    async fn every_reply_round_trips() {
        for reply in all_replies() {
            let frame = reply.encode();
            let (code, payload) = read_one(&frame, 1 << 20).await.unwrap().unwrap();
            assert_eq!(decode_reply(code, &payload).unwrap(), reply);
        }
    }

    #[test]
    fn length_prefix_counts_code_byte() {
        assert_eq!(Reply::Continue.encode(), vec![0, 0, 0, 1, b'c']);
        assert_eq!(encode_command(&Command::Abort), vec![0, 0, 0, 1, b'A']);
    }

    #[tokio::test]
    async fn oversized_frame_is_refused_before_reading_it() {
        let frame = encode_command(&Command::Body(vec![b'x'; 2000]));
        match read_one(&frame, 1000).await {
            Err(CodecError::Oversized { len: 2001, max: 1000 }) => {}
            other => panic!("expected oversize error, got {other:?}"),
        }
        // A huge announced length with no data behind it must not allocate it.
        let bogus = [0xff, 0xff, 0xff, 0xff, b'B'];
        assert!(matches!(read_one(&bogus, 1 << 20).await, Err(CodecError::Oversized { .. })));
    }

    #[tokio::test]
    async fn truncated_frames_are_errors_and_clean_eof_is_none() {
        assert!(read_one(&[], 100).await.unwrap().is_none());
        assert!(matches!(read_one(&[0, 0], 100).await, Err(CodecError::Truncated)));
        let frame = encode_command(&Command::Helo("client.example".into()));
        assert!(matches!(read_one(&frame[..frame.len() - 3], 100).await, Err(CodecError::Truncated)));
        assert!(matches!(read_one(&[0, 0, 0, 0], 100).await, Err(CodecError::Empty)));
    }

    #[test]
    fn malformed_payloads_name_the_command() {
        let err = decode_command(b'O', &[0, 0, 0, 6]).unwrap_err();
        assert!(err.to_string().contains("SMFIC_OPTNEG"), "{err}");
        let err = decode_command(b'L', b"Subject\0no terminator").unwrap_err();
        assert!(err.to_string().contains("SMFIC_HEADER"), "{err}");
        assert!(decode_command(b'M', b"").is_err());
        assert!(decode_command(b'C', b"host\0X").is_err());
        assert!(decode_command(b'D', b"Cj\0").is_err());
        assert!(matches!(decode_command(b'Z', b""), Err(CodecError::UnknownCommand(b'Z'))));
    }

    #[test]
    fn eight_bit_header_values_are_kept_lossily() {
        let cmd = decode_command(b'L', b"Subject\0caf\xe9\0").unwrap();
        assert_eq!(cmd, Command::Header { name: "Subject".into(), value: "caf\u{fffd}".into() });
    }
}
