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
use mailtriage::milter::server::{self, Listener};
use mailtriage::milter::session::SessionConfig;
use mailtriage::pipeline::Triage;
use tokio::sync::watch;

use cli::{Cli, Command, ModelCommand};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mailtriage: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::CheckConfig => match Triage::new(&cfg) {
            Ok(t) => {
                println!(
                    "{}: OK ({} departments, {} rules, model {}, mode {:?}, milter {})",
                    cli.config.display(),
                    cfg.departments.len(),
                    cfg.rules.len(),
                    t.model_summary(),
                    cfg.server.mode,
                    cfg.server.milter
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("mailtriage: invalid configuration: {}: {e}", cli.config.display());
                return ExitCode::from(2);
            }
        },
        Command::Classify { mail_from, rcpts, files } => offline::classify(&cfg, &mail_from, &rcpts, &files),
        Command::Train(args) => offline::train(&cfg, &args),
        Command::Eval(args) => offline::eval(&cfg, &args),
        Command::Replay { maildir } => offline::replay(&cfg, &maildir),
        Command::Model(ModelCommand::Fetch) => offline::model_fetch(&cfg),
        Command::Serve => serve(cfg),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mailtriage: {e:#}");
            ExitCode::FAILURE
        }
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

fn serve(cfg: Config) -> Result<ExitCode> {
    init_logging(&cfg);
    let triage = Arc::new(Triage::new(&cfg).context("loading rules and model")?);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = Listener::bind(&cfg.server.milter, cfg.server.milter_socket_mode).await?;
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
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            wait_for_stop_signal().await;
            tracing::info!("stopping: no new connections, finishing messages in flight");
            let _ = stop_tx.send(true);
        });
        server::serve(
            listener,
            triage,
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
