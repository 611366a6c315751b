//! The SMTP and LMTP front doors: mailtriage as a content filter that
//! receives a message, decides it, and relays it to the next hop.
//!
//! - [`session`]: one client connection (ESMTP or LMTP, STARTTLS, pipelining),
//!   a file per stage, over `framing` (bytes in, command lines, replies
//!   out) and `intake` (the message after 354, within size and budget).
//! - [`relay`]: the connection to the next hop, through `mail-send`.
//! - [`reply`]: the replies we write, and the hop's mapped back to the client.
//! - [`tls`]: certificates for STARTTLS and the hop's TLS settings.
//! - [`server`]: the listener.
//! - [`xforward`]: the original client's identity, passed on to the hop.
//!
//! Nothing is stored on disk: a client hears 250 for a recipient only once
//! the next hop has accepted the message for it, so the client keeps every
//! message it could not hand over, and retries.

pub(crate) mod framing;
pub(crate) mod intake;
pub mod relay;
pub mod reply;
pub mod server;
pub mod session;
pub mod tls;
pub mod xforward;
