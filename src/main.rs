//! The `mailtriage` binary: parses the command line, loads the
//! configuration, and runs one subcommand. Errors become one readable line
//! on stderr and a non-zero exit status.

mod cli;
mod learn;
mod offline;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use mailtriage::budget::ByteBudget;
use mailtriage::config::{Config, LogFormat};
use mailtriage::milter::server;
use mailtriage::milter::session::SessionConfig;
use mailtriage::net::Listener;
use mailtriage::pipeline::{SharedTriage, Triage};
use mailtriage::smtp::relay::RelaySettings;
use mailtriage::smtp::server as smtp_server;
use mailtriage::smtp::session::SmtpSettings;
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
        Command::CheckConfig => match Triage::new(&cfg).map_err(anyhow::Error::from).and_then(|t| {
            FrontDoorSetup::new(&cfg)?;
            if let Some(f) = &cfg.feedback {
                mailtriage::feedback::store::Store::open(&f.store)?;
            }
            Ok(t)
        }) {
            Ok(t) => {
                println!(
                    "{}: OK ({} departments, {} rules, model {}, mode {:?}, {})",
                    config_path.display(),
                    cfg.departments.len(),
                    cfg.rules.len(),
                    t.model_summary(),
                    cfg.server.mode,
                    front_doors(&cfg)
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("mailtriage: invalid configuration: {}: {e:#}", config_path.display());
                return ExitCode::from(2);
            }
        },
        Command::Classify { mail_from, rcpts, files } => offline::classify(&cfg, &mail_from, &rcpts, &files),
        Command::Train(args) => offline::train(&cfg, &args),
        Command::Eval(args) => offline::eval(&cfg, &args),
        Command::Replay { maildir } => offline::replay(&cfg, &maildir),
        Command::Model(ModelCommand::Fetch) => offline::model_fetch(&cfg),
        Command::Serve => serve(cfg, config_path.clone()),
        Command::Feedback(args) => learn::feedback(&cfg, &args),
        Command::Retrain { head, json } => learn::retrain(&cfg, head, json),
        Command::Heads(cmd) => learn::heads(&cfg, &cmd),
        Command::Report { days, json } => learn::report(&cfg, days, json),
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
    let mut triage = Triage::new(&cfg).context("loading rules and model")?;
    let shared_slot = Arc::new(std::sync::OnceLock::new());
    let feedback = learn::start(&cfg, shared_slot.clone())?;
    if let Some(link) = &feedback.link {
        triage.connect_feedback(link.clone());
    }
    triage.publish_head_versions();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    rt.block_on(async move {
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if let (Some(m), Some(handle)) = (&cfg.metrics, prometheus) {
            let http = mailtriage::metrics::bind(&m.listen).await?;
            tracing::info!(listen = %m.listen, feedback = feedback.endpoint.is_some(), "metrics on /metrics, /healthz, /readyz");
            tokio::spawn(mailtriage::metrics::serve(http, handle, ready.clone(), feedback.endpoint.clone()));
        }
        let setup = FrontDoorSetup::new(&cfg)?;
        let mode = cfg.server.milter_socket_mode;
        let milter = match cfg.server.milter_listen() {
            Some(a) => Some(Listener::bind(&a, mode).await?),
            None => None,
        };
        let smtp = match &cfg.server.smtp {
            Some(a) => Some(Listener::bind(a, mode).await?),
            None => None,
        };
        let lmtp = match &cfg.server.lmtp {
            Some(a) => Some(Listener::bind(a, mode).await?),
            None => None,
        };
        mailtriage::metrics::set_info(&cfg.version, &triage.model_summary(), None);
        ready.store(true, std::sync::atomic::Ordering::Relaxed);
        let bound = |l: &Option<Listener>| l.as_ref().map(|l| l.local_addr()).unwrap_or_else(|| "-".into());
        tracing::info!(
            milter = %bound(&milter),
            smtp = %bound(&smtp),
            lmtp = %bound(&lmtp),
            next_hop = %cfg.relay.as_ref().map(|r| r.next_hop.to_string()).unwrap_or_else(|| "-".into()),
            mode = ?cfg.server.mode,
            on_error = ?cfg.server.on_error,
            rules = triage.rule_count(),
            model = %triage.model_summary(),
            departments = cfg.departments.len(),
            config = %cfg.source.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            "mailtriage listening"
        );
        let shared = SharedTriage::new(triage);
        let _ = shared_slot.set(shared.clone());
        let reload = Arc::new(tokio::sync::Notify::new());
        if let Some(link) = &feedback.link {
            learn::spawn_retrainer(config_path.clone(), &cfg, link, shared.clone(), reload.clone());
            tokio::spawn(learn::watch_heads(cfg.clone(), reload.clone()));
        }
        tokio::spawn(reload_on_request(shared.clone(), config_path, cfg.clone(), reload, feedback.link.clone()));
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            wait_for_stop_signal().await;
            tracing::info!("stopping: no new connections, finishing messages in flight");
            let _ = stop_tx.send(true);
        });
        let (max, grace) = (cfg.server.max_connections, cfg.server.shutdown_grace);
        let mut doors = tokio::task::JoinSet::new();
        if let Some(l) = milter {
            let mut session = SessionConfig::from(&cfg);
            session.budget = setup.budget.clone();
            doors.spawn(server::serve(l, shared.clone(), session, max, grace, stop_rx.clone()));
        }
        for (listener, lmtp) in [(smtp, false), (lmtp, true)] {
            let (Some(l), Some(relay)) = (listener, setup.relay.clone()) else { continue };
            let settings = SmtpSettings::new(&cfg, lmtp, setup.tls.clone(), setup.budget.clone(), relay);
            doors.spawn(smtp_server::serve(l, shared.clone(), settings, max, grace, stop_rx.clone()));
        }
        while doors.join_next().await.is_some() {}
        tracing::info!("stopped");
        Ok(ExitCode::SUCCESS)
    })
}

/// What the front doors share, built (and checked) before anything listens:
/// one byte budget for all of them, the STARTTLS certificate, the next hop.
struct FrontDoorSetup {
    budget: Arc<ByteBudget>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    relay: Option<Arc<RelaySettings>>,
}

impl FrontDoorSetup {
    fn new(cfg: &Config) -> Result<Self> {
        let tls = match (&cfg.server.tls_cert, &cfg.server.tls_key) {
            (Some(cert), Some(key)) => Some(mailtriage::smtp::tls::acceptor(cert, key)?),
            _ => None,
        };
        Ok(FrontDoorSetup {
            budget: ByteBudget::new(cfg.limits.max_total_bytes),
            tls,
            relay: RelaySettings::from_config(cfg)?,
        })
    }
}

/// `milter inet:…, smtp inet:… → smtp://…` for check-config.
fn front_doors(cfg: &Config) -> String {
    let mut doors = Vec::new();
    if let Some(m) = cfg.server.milter_listen() {
        doors.push(format!("milter {m}"));
    }
    for (name, addr) in [("smtp", &cfg.server.smtp), ("lmtp", &cfg.server.lmtp)] {
        if let Some(a) = addr {
            doors.push(format!("{name} {a}"));
        }
    }
    let mut out = doors.join(", ");
    if let Some(r) = &cfg.relay {
        out.push_str(&format!(" → {}", r.next_hop));
    }
    out
}

/// SIGHUP, or a new head version: re-read the config, rules, model and
/// heads, validate them, and swap them in. A bad file is logged and the
/// running set stays. Settings that only a restart can apply (listen
/// address, limits, timeouts) are named.
async fn reload_on_request(
    shared: SharedTriage,
    path: std::path::PathBuf,
    mut running: Config,
    requested: Arc<tokio::sync::Notify>,
    link: Option<mailtriage::pipeline::FeedbackLink>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler; reload needs a restart");
        return;
    };
    loop {
        tokio::select! {
            r = hup.recv() => if r.is_none() { return },
            _ = requested.notified() => {}
        }
        let p = path.clone();
        let link = link.clone();
        let loaded = tokio::task::spawn_blocking(move || -> Result<(Config, Triage), String> {
            let cfg = Config::load(&p).map_err(|e| e.to_string())?;
            let mut t = Triage::new(&cfg).map_err(|e| e.to_string())?;
            if let Some(l) = link {
                t.connect_feedback(l);
            }
            Ok((cfg, t))
        })
        .await
        .unwrap_or_else(|e| Err(format!("reload task failed: {e}")));
        match loaded {
            Ok((cfg, triage)) => {
                let restart_only: Vec<&str> = [
                    ("server.milter", cfg.server.milter != running.server.milter),
                    ("server.smtp", cfg.server.smtp != running.server.smtp),
                    ("server.lmtp", cfg.server.lmtp != running.server.lmtp),
                    (
                        "server.tls_cert/tls_key/require_tls/hostname/smtp_timeout",
                        (
                            &cfg.server.tls_cert,
                            &cfg.server.tls_key,
                            cfg.server.require_tls,
                            &cfg.server.hostname,
                            cfg.server.smtp_timeout,
                        ) != (
                            &running.server.tls_cert,
                            &running.server.tls_key,
                            running.server.require_tls,
                            &running.server.hostname,
                            running.server.smtp_timeout,
                        ),
                    ),
                    ("relay", format!("{:?}", cfg.relay) != format!("{:?}", running.relay)),
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
                triage.publish_head_versions();
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
