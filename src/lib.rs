//! mailtriage: routes every message crossing a mail relay to the right
//! department before delivery.
//!
//! A message flows one way, and so does this map:
//!
//! 1. **Front doors** turn a protocol into a [`MessageInput`] (envelope +
//!    raw bytes) and a verdict back into the protocol: [`milter`] (Postfix
//!    `smtpd_milters`, protocol v6) and [`smtp`] (SMTP/LMTP content filter,
//!    relaying to a next hop). What they share is in [`frontdoor`]: the
//!    [`Filter`] they call, the timed decision (deadline, keepalive,
//!    `on_error`, one metric and one log line), the listeners and the
//!    byte budget.
//! 2. **Scope**: [`scope`] says whether a message is triaged at all
//!    (recipients, authenticated senders, networks, listeners, automatic
//!    mail, a trusted hop's own headers) and which recipients a reroute may
//!    replace.
//! 3. **Message**: [`message`] holds the envelope and extracts features
//!    from MIME (text of every part, HTML → text, bounded, never panics).
//! 4. **Decide**: [`decide`] runs one cascade, rules → lexical heads →
//!    embedding cache → encoder ([`model`]) → heads → policy, into a typed
//!    decision.
//! 5. **Act**: [`act`] turns the decision into a plan of header and
//!    recipient changes (plain data, so `classify` prints it).
//! 6. **Record**: [`record`] writes the audit line (no content) and the
//!    metrics, and masks personal data in what must be logged.
//!
//! The words all stages share (department and priority ids, actions,
//! mode) are in [`domain`]; who and where the process runs (its user, the
//! owner of what it creates, the host name) and permission errors worded
//! for an admin, in [`access`]; masking personal data and credentials in
//! what must be logged, in [`redact`]. Every layer may use these three.
//!
//! [`pipeline`] chains 2–6 behind the [`Filter`] trait. Around it,
//! [`learn`], by lifetime: the feedback filter on the message path
//! (`learn::filter`, corrections in), what outlives the process
//! (`learn::store`: corrections, shared recent window, versioned heads) and
//! training (`learn::train`: datasets, fitting, evaluation, the gated
//! retrain). [`daemon`] builds all of it from the [`settings`], serves,
//! reloads and drains. With the `fuzzing` feature only, `fuzz` holds the
//! fuzz targets and the fake next hop the SMTP tests share.
//!
//! [`MessageInput`]: frontdoor::MessageInput
//! [`Filter`]: frontdoor::Filter

pub mod access;
pub mod act;
pub mod daemon;
pub(crate) mod decide;
pub mod domain;
pub mod frontdoor;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzz;
pub mod learn;
pub mod message;
pub mod milter;
pub mod model;
pub mod pipeline;
pub mod record;
pub mod redact;
pub mod scope;
pub mod settings;
pub mod smtp;
