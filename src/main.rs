//! The `mailtriage` binary: parses the command line, loads the
//! configuration, and runs one subcommand. Errors become one readable line
//! on stderr and a non-zero exit status.

mod cli;
mod cmd;

use std::process::ExitCode;

use clap::Parser;
use mailtriage::daemon;
use mailtriage::message::envelope::Client;
use mailtriage::settings::{Config, ConfigError};

use cli::{Cli, Command, ConfigCommand, ModelCommand};
use cmd::{learn, offline};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve) {
        end_quietly_on_closed_pipe();
    }
    if let Command::Generate { what, out_dir } = &cli.command {
        // Needs no configuration: packagers run it at build time.
        return match cmd::generate::print(*what, out_dir.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mailtriage: {}", chain(&e));
                ExitCode::FAILURE
            }
        };
    }
    let config_path = cli.config_path();
    let cfg = match Config::load(&config_path) {
        Ok(c) => c,
        Err(ConfigError::Invalid { path, problems }) => {
            // Every problem at once: one entry each, an explanation over
            // several lines (a regex error) indented under it.
            for p in problems {
                let text = p.located(&path);
                let mut lines = text.lines();
                eprintln!("mailtriage: invalid configuration: {}", lines.next().unwrap_or(""));
                lines.for_each(|l| eprintln!("    {}", l.trim_start()));
            }
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("mailtriage: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    single_threaded_candle_per_worker(&cli.command, &cfg);
    let result = match cli.command {
        Command::CheckConfig => match daemon::check(&cfg) {
            Ok(summary) => {
                println!("{}: OK ({summary})", config_path.display());
                Ok(ExitCode::SUCCESS)
            }
            Err(problems) => {
                for p in problems {
                    // A file the service cannot write is not a fault of the configuration.
                    if p.starts_with("permission denied") || p.contains(": permission denied") {
                        eprintln!("mailtriage: {p}");
                    } else {
                        eprintln!("mailtriage: invalid configuration: {}: {p}", config_path.display());
                    }
                }
                return ExitCode::from(2);
            }
        },
        Command::Classify { mail_from, rcpts, client_addr, authenticated, listener, explain, files } => {
            let client = Client { addr: client_addr, authenticated, listener };
            offline::classify(&cfg, mail_from.as_deref(), &rcpts, &client, explain, &files)
        }
        Command::Train(args) => offline::train(&cfg, &args),
        Command::Eval(args) => offline::eval(&cfg, &args),
        Command::Replay { maildir } => offline::replay(&cfg, &maildir),
        Command::Model(ModelCommand::Fetch) => offline::model_fetch(&cfg),
        Command::Config(ConfigCommand::Show) => cmd::generate::show_config(&config_path),
        Command::Generate { what, out_dir } => {
            cmd::generate::print(what, out_dir.as_deref()).map(|()| ExitCode::SUCCESS)
        }
        Command::Serve => {
            daemon::run(cfg, config_path.clone()).map(|()| ExitCode::SUCCESS).map_err(anyhow::Error::from)
        }
        Command::Feedback(args) => learn::feedback(&cfg, &args),
        Command::Retrain { head, json } => learn::retrain(&cfg, head, json),
        Command::Heads(cmd) => learn::heads(&cfg, &cmd),
        Command::Report { days, json } => learn::report(&cfg, days, json),
        Command::Forget(args) => cmd::forget::forget(&cfg, &args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mailtriage: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each said once: many errors quote
/// their cause in their own text, and `{:#}` would repeat it.
fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
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

/// A report command whose reader goes away (`mailtriage eval --json | head`)
/// ends quietly, as Unix tools do, instead of panicking in `println!`. Only
/// for commands: the daemon keeps Rust's ignored SIGPIPE, so a peer that
/// hangs up is an error on that connection, never the end of the process.
/// (Sockets are written with MSG_NOSIGNAL either way.)
fn end_quietly_on_closed_pipe() {
    // SAFETY: called first thing in main, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
