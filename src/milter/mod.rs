//! The milter front door: Postfix (or Sendmail) calls us over protocol v6.
//!
//! - [`codec`]: frames ⇄ typed commands and replies, with a size bound.
//! - [`session`]: one connection's state machine; applies a [`Plan`](crate::act::Plan).
//! - [`server`]: the listener, connection bound, graceful shutdown.
//!
//! Nothing here knows how a message is decided: a session hands the envelope
//! and bytes to a [`Filter`](crate::frontdoor::Filter) and applies what comes back.

pub mod codec;
pub mod server;
pub mod session;
