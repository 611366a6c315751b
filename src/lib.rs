//! mailtriage: routes every message crossing a mail relay to the right
//! department before delivery.
//!
//! A message flows one way: a front door ([`milter`]) collects the
//! [`envelope`] and raw bytes; [`extract`] turns them into features;
//! [`rules`], the [`model`] and [`policy`] make a decision; [`actions`] turns it into a
//! plan of header and recipient changes that the front door applies.
//! [`pipeline`] wires those stages together behind the [`pipeline::Filter`]
//! trait, the only thing a front door sees.
//!
//! Offline tools share the same code: [`dataset`] reads labeled mail,
//! [`train`] fits heads, [`eval`] measures them. [`feedback`] takes staff
//! corrections back and retrains the heads behind a gate.

pub mod actions;
pub mod audit;
pub mod budget;
pub mod config;
pub mod dataset;
pub mod envelope;
pub mod eval;
pub mod extract;
pub mod feedback;
pub mod html;
pub mod metrics;
pub mod milter;
pub mod model;
pub mod net;
pub mod pipeline;
pub mod policy;
pub mod redact;
pub mod rules;
pub mod smtp;
pub mod train;
