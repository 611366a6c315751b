//! Feedback on a message's path: the [`layer`] around the pipeline that
//! takes mail to the feedback address as a correction, [`intake`] (which
//! recipients are the feedback address, and what message is corrected), and
//! the [`recent`] decisions window a correction by Message-ID is learned
//! from. It writes corrections to the [`store`](super::store) and never
//! trains.

pub mod error;
pub mod intake;
pub mod layer;
pub mod recent;

pub use error::FeedbackError;
