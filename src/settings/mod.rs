//! Settings, in two stages (as ripgrep reads its flags): [`file`] is the
//! TOML shape plus `MAILTRIAGE__SECTION__KEY` overrides, checked as a whole
//! so that every problem in a file is reported at once.

mod address;
mod catalog;
mod file;

pub use address::Cidr;
pub use catalog::{Catalog, Department};
pub use file::*;
