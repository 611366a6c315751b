//! Settings, in two stages (as ripgrep reads its flags). First the file's
//! shape: TOML plus `MAILTRIAGE__SECTION__KEY` overrides (`load`), typed
//! by serde into one struct per section, in files by concern — `server`
//! (listeners, limits), `relay`, `routing` (defaults, departments, scope,
//! rules, policy), `model`, `feedback`, `observe` (metrics, audit, KPI,
//! logging), `values` (durations, modes) — under the [`Config`] root
//! (`file`); then checked as a whole (`check`) so that every problem is
//! reported at once, each naming its key. Every field says beside it
//! whether a reload applies it ([`section`]). Then what is built once from
//! a valid file: the department [`Catalog`] with typed ids, and each rule's
//! compiled pattern. What needs I/O (model files, certificates, the
//! feedback store) is checked by `daemon::check` for `check-config`.

mod address;
mod catalog;
mod check;
mod feedback;
mod file;
mod load;
mod model;
mod observe;
mod relay;
mod routing;
pub mod section;
mod server;
mod values;

pub use crate::domain::{Action, Mode};
pub use address::Cidr;
pub use catalog::{Catalog, Department};
pub use feedback::FeedbackConfig;
pub use file::Config;
pub use load::{config_dir, effective_toml, ConfigError, Problem, ENV_PREFIX};
pub use model::{Device, ModelConfig, Precision};
pub use observe::{AuditConfig, KpiConfig, LogFormat, LoggingConfig, MetricsConfig};
pub use relay::{HopProtocol, NextHop, RelayConfig, RelayTls};
pub use routing::{DefaultsConfig, DepartmentConfig, PolicyConfig, RuleAction, RuleConfig, ScopeConfig};
pub use server::{LimitsConfig, ListenAddress, OnError, ServerConfig, DEFAULT_MILTER};
pub use values::parse_duration;
