//! Logging to stderr (journald picks it up), as text or JSON, with a level
//! that a reload can change while the daemon runs.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use crate::settings::{LogFormat, LoggingConfig};

/// Changes the running log level (`[logging] level` after a reload).
pub struct Level(Option<reload::Handle<EnvFilter, Registry>>);

impl Level {
    pub fn set(&self, level: &str) {
        // RUST_LOG set at start wins for the whole run.
        let Some(handle) = &self.0 else { return };
        match EnvFilter::try_new(level) {
            Ok(f) => {
                if let Err(e) = handle.reload(f) {
                    tracing::warn!(error = %e, "log level not changed");
                }
            }
            Err(e) => tracing::warn!(level, error = %e, "log level not changed: not a level or filter"),
        }
    }
}

/// Installs the subscriber. RUST_LOG, when set, wins over the configured
/// level (handy for one debugging run).
pub fn init(cfg: &LoggingConfig) -> Level {
    let from_env = EnvFilter::try_from_default_env().ok();
    let pinned = from_env.is_some();
    let (filter, handle) = reload::Layer::new(from_env.unwrap_or_else(|| EnvFilter::new(&cfg.level)));
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let fmt = match cfg.format {
        LogFormat::Json => fmt.json().boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    // A second init (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry().with(filter).with(fmt).try_init();
    Level((!pinned).then_some(handle))
}
