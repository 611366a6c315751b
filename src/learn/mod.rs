//! Learning, split by lifetime:
//!
//! - [`filter`]: on every message's path — feedback mail recognised and
//!   recorded, recent decisions kept for corrections by Message-ID.
//! - [`store`]: what outlives a process — corrections, the shared recent
//!   window, erasures, versioned heads and who may promote them (SQLite or
//!   PostgreSQL, every table in [`store::schema`]).
//! - [`train`]: offline or in the background — datasets, fitting and
//!   calibrating a head, evaluating it, and the gated retrain.
//!
//! [`correction`] is what all three share: what a staff correction is.
//! Data flows filter → store → train; none imports from a later one's
//! caller (train never imports the filter, the store neither).

pub mod correction;
pub mod filter;
pub mod store;
pub mod train;
