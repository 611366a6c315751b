//! The SMTP and LMTP front doors: mailtriage as a content filter that
//! receives a message, decides it, and relays it to the next hop.
//!
//! - [`session`]: one client connection (ESMTP or LMTP, STARTTLS, pipelining).
//! - [`relay`]: the connection to the next hop, through `mail-send`.
//! - [`reply`]: the replies we write.
//! - [`tls`]: certificates for STARTTLS and the hop's TLS settings.
//! - [`server`]: the listener.
//! - [`xforward`]: the original client's identity, passed on to the hop.
//!
//! Nothing is stored on disk: a client hears 250 for a recipient only once
//! the next hop has accepted the message for it, so the client keeps every
//! message it could not hand over, and retries.

pub mod relay;
pub mod reply;
pub mod server;
pub mod session;
pub mod tls;
pub mod xforward;
