//! What an admin or a packager asks of the binary itself: the effective
//! configuration (`config show`), the man page and shell completions
//! (`generate`), all derived from the code so they never drift from it.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::CommandFactory;

use crate::cli::{Cli, Generated};

/// `mailtriage generate …` to stdout.
pub fn print(what: Generated) -> Result<()> {
    let mut cmd = Cli::command();
    let mut out = std::io::stdout().lock();
    let shell = match what {
        Generated::Man => {
            return clap_mangen::Man::new(cmd).render(&mut out).context("writing the man page");
        }
        Generated::CompleteBash => clap_complete::Shell::Bash,
        Generated::CompleteZsh => clap_complete::Shell::Zsh,
        Generated::CompleteFish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut cmd, "mailtriage", &mut out);
    out.flush().context("writing the completions")
}

/// `mailtriage config show`.
pub fn show_config(path: &Path) -> Result<ExitCode> {
    let text = mailtriage::settings::effective_toml(path)?;
    std::io::stdout().lock().write_all(text.as_bytes()).context("writing to stdout")?;
    Ok(ExitCode::SUCCESS)
}
