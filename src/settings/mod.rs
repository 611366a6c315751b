//! Settings, in two stages (as ripgrep reads its flags). First the file's
//! shape (`file`, read by `load`): TOML plus `MAILTRIAGE__SECTION__KEY` overrides, typed by
//! serde (durations, listen addresses, networks, actions, the device), then
//! checked as a whole (`check`) so that every problem is reported at once,
//! each naming its key. Then what is built once from a valid file: the
//! department [`Catalog`] with typed ids, and each rule's compiled pattern.
//! What needs I/O (model files, certificates, the feedback store) is checked
//! by `daemon::check` for `check-config`.

mod address;
mod catalog;
mod check;
mod file;
mod load;

pub use address::Cidr;
pub use catalog::{Catalog, Department};
pub use file::*;
pub use load::{config_dir, effective_toml, ConfigError, Problem, ENV_PREFIX};
