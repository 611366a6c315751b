//! Command-line interface: the subcommands and their arguments.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Routes each message crossing your mail relay to the right department.
#[derive(Debug, Parser)]
#[command(name = "mailtriage", version, about)]
pub struct Cli {
    /// Configuration file (TOML).
    #[arg(short, long, global = true, env = "MAILTRIAGE_CONFIG", default_value = "/etc/mailtriage/mailtriage.toml")]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: listen as a milter and decide every message.
    Serve,
    /// Decide message files offline and print, per file, one JSON object with
    /// the decision and the exact changes the milter would make.
    Classify {
        /// Envelope sender to assume (default: none, the null sender).
        #[arg(long, default_value = "")]
        mail_from: String,
        /// Envelope recipient to assume; repeat for several. Default: the
        /// addresses in To and Cc.
        #[arg(long = "rcpt")]
        rcpts: Vec<String>,
        /// RFC 5322 message files (.eml; a leading mbox "From " line is skipped).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Validate the configuration and exit: 0 if valid, 2 with the offending
    /// key, rule or regex named if not.
    CheckConfig,
}
