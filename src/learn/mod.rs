//! Learning, offline and from staff: labeled [`dataset`]s, [`train`]ing a
//! head, [`eval`]uating one, and the [`feedback`] loop (corrections in, a
//! gated retrain out).

pub mod dataset;
pub mod dual_cd;
pub mod eval;
pub mod feedback;
pub mod lbfgs;
pub mod rng;
pub mod train;
