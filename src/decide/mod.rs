//! Deciding: the admins' [`rules`], the model's cascade, and the [`policy`]
//! that turns "which department" into what happens to the message.

pub mod engine;
pub mod policy;
pub mod rules;
