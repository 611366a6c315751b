//! The `mailtriage` binary: parses the command line, loads the
//! configuration, and runs one subcommand. Errors become one readable line
//! on stderr and a non-zero exit status.

mod cli;
mod offline;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use mailtriage::config::{Config, LogFormat};
use mailtriage::milter::server;
use mailtriage::milter::session::SessionConfig;
use mailtriage::net::Listener;
use mailtriage::pipeline::{SharedTriage, Triage};
use tokio::sync::watch;

use cli::{Cli, Command, ModelCommand};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config_path = cli.config_path();
    let cfg = match Config::load(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mailtriage: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    single_threaded_candle_per_worker(&cli.command, &cfg);
    let result = match cli.command {
        Command::CheckConfig => match Triage::new(&cfg) {
            Ok(t) => {
                println!(
                    "{}: OK ({} departments, {} rules, model {}, mode {:?}, milter {})",
                    config_path.display(),
                    cfg.departments.len(),
                    cfg.rules.len(),
                    t.model_summary(),
                    cfg.server.mode,
                    cfg.server.milter
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("mailtriage: invalid configuration: {}: {e}", config_path.display());
                return ExitCode::from(2);
            }
        },
        Command::Classify { mail_from, rcpts, files } => offline::classify(&cfg, &mail_from, &rcpts, &files),
        Command::Train(args) => offline::train(&cfg, &args),
        Command::Eval(args) => offline::eval(&cfg, &args),
        Command::Replay { maildir } => offline::replay(&cfg, &maildir),
        Command::Model(ModelCommand::Fetch) => offline::model_fetch(&cfg),
        Command::Serve => serve(cfg, config_path.clone()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mailtriage: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// With several inference threads, each must run Candle single-threaded:
/// otherwise every worker's matrix multiply fans out to its own pool of one
/// thread per core and they fight over the same cores (measured: 300 mails
/// embedded by 2 workers on 2 cores in 35.2 s oversubscribed, 22.2 s like
/// this). An explicit RAYON_NUM_THREADS still wins.
fn single_threaded_candle_per_worker(command: &Command, cfg: &Config) {
    let workers = match command {
        Command::Serve => cfg.model.as_ref().map_or(1, |m| m.workers),
        Command::Train(a) => a.data.threads(),
        Command::Eval(a) => a.data.threads(),
        _ => 1,
    };
    if workers > 1 && std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // Still single-threaded here: nothing else reads the environment yet.
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
}

fn init_logging(cfg: &Config) {
    // RUST_LOG, when set, wins over the configured level (handy for one debugging run).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.logging.level));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match cfg.logging.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn serve(cfg: Config, config_path: std::path::PathBuf) -> Result<ExitCode> {
    init_logging(&cfg);
    // Before anything records: metrics recorded earlier would be lost.
    let prometheus = cfg.metrics.as_ref().map(|_| mailtriage::metrics::install()).transpose()?;
    let triage = Triage::new(&cfg).context("loading rules and model")?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    rt.block_on(async move {
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if let (Some(m), Some(handle)) = (&cfg.metrics, prometheus) {
            let http = mailtriage::metrics::bind(&m.listen).await?;
            tracing::info!(listen = %m.listen, "metrics on /metrics, /healthz, /readyz");
            tokio::spawn(mailtriage::metrics::serve(http, handle, ready.clone()));
        }
        let listener = Listener::bind(&cfg.server.milter, cfg.server.milter_socket_mode).await?;
        mailtriage::metrics::set_info(&cfg.version, &triage.model_summary(), None);
        ready.store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            milter = %listener.local_addr(),
            mode = ?cfg.server.mode,
            on_error = ?cfg.server.on_error,
            rules = triage.rule_count(),
            model = %triage.model_summary(),
            departments = cfg.departments.len(),
            config = %cfg.source.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            "mailtriage listening"
        );
        let shared = SharedTriage::new(triage);
        tokio::spawn(reload_on_sighup(shared.clone(), config_path, cfg.clone()));
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            wait_for_stop_signal().await;
            tracing::info!("stopping: no new connections, finishing messages in flight");
            let _ = stop_tx.send(true);
        });
        server::serve(
            listener,
            shared,
            SessionConfig::from(&cfg),
            cfg.server.max_connections,
            cfg.server.shutdown_grace,
            stop_rx,
        )
        .await;
        tracing::info!("stopped");
        Ok(ExitCode::SUCCESS)
    })
}

/// SIGHUP: re-read the config, rules, model and heads, validate them, and
/// swap them in. A bad file is logged and the running set stays. Settings
/// that only a restart can apply (listen address, limits, timeouts) are named.
async fn reload_on_sighup(shared: SharedTriage, path: std::path::PathBuf, mut running: Config) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler; reload needs a restart");
        return;
    };
    while hup.recv().await.is_some() {
        let p = path.clone();
        let loaded = tokio::task::spawn_blocking(move || -> Result<(Config, Triage), String> {
            let cfg = Config::load(&p).map_err(|e| e.to_string())?;
            let t = Triage::new(&cfg).map_err(|e| e.to_string())?;
            Ok((cfg, t))
        })
        .await
        .unwrap_or_else(|e| Err(format!("reload task failed: {e}")));
        match loaded {
            Ok((cfg, triage)) => {
                let restart_only: Vec<&str> = [
                    ("server.milter", cfg.server.milter != running.server.milter),
                    ("server.max_connections", cfg.server.max_connections != running.server.max_connections),
                    ("limits", format!("{:?}", cfg.limits) != format!("{:?}", running.limits)),
                    ("metrics", cfg.metrics.as_ref().map(|m| &m.listen) != running.metrics.as_ref().map(|m| &m.listen)),
                ]
                .into_iter()
                .filter_map(|(k, changed)| changed.then_some(k))
                .collect();
                if !restart_only.is_empty() {
                    tracing::warn!(settings = ?restart_only, "changed settings that apply only after a restart");
                }
                let replaced = shared.current().model_summary();
                mailtriage::metrics::set_info(
                    &cfg.version,
                    &triage.model_summary(),
                    Some((&running.version, &replaced)),
                );
                tracing::info!(config_version = %cfg.version, rules = triage.rule_count(), model = %triage.model_summary(), "reloaded");
                shared.replace(triage);
                running = cfg;
            }
            Err(e) => {
                tracing::error!(error = %e, config_version = %running.version, "reload failed; keeping the running configuration")
            }
        }
    }
}

async fn wait_for_stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            std::future::pending::<()>().await
        }
    }
}
