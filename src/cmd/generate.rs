//! What an admin or a packager asks of the binary itself: the effective
//! configuration (`config show`), the man page and shell completions
//! (`generate`), all derived from the code so they never drift from it.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::CommandFactory;

use crate::cli::{Cli, Generated};

/// `mailtriage generate …` to stdout (man pages: to `out_dir` when given).
pub fn print(what: Generated, out_dir: Option<&Path>) -> Result<()> {
    let mut cmd = Cli::command();
    let mut out = std::io::stdout().lock();
    let shell = match what {
        Generated::Man => {
            let mut cmd = cmd.disable_help_subcommand(true);
            cmd.build();
            return match out_dir {
                Some(dir) => man_pages(&cmd, dir),
                None => main_page(&cmd, &mut out).context("writing the man page"),
            };
        }
        Generated::CompleteBash => clap_complete::Shell::Bash,
        Generated::CompleteZsh => clap_complete::Shell::Zsh,
        Generated::CompleteFish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut cmd, "mailtriage", &mut out);
    out.flush().context("writing the completions")
}

/// mailtriage(1): clap's sections, then what clap cannot know (FILES,
/// ENVIRONMENT, EXIT STATUS, SEE ALSO). It names the subcommands' own
/// pages, which [`man_pages`] writes beside it.
fn main_page(cmd: &clap::Command, out: &mut dyn Write) -> std::io::Result<()> {
    let man = clap_mangen::Man::new(cmd.clone());
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;
    man.render_subcommands_section(out)?;
    out.write_all(MAIN_PAGE_TAIL.as_bytes())?;
    man.render_version_section(out)
}

const MAIN_PAGE_TAIL: &str = r#".SH FILES
.TP
\fI/etc/mailtriage/mailtriage.toml\fR
The configuration (a conffile). Relative paths in it are taken from its directory.
\fBmailtriage config show\fR prints what is in effect.
.TP
\fI/var/lib/mailtriage/\fR
State, owned by the \fBmailtriage\fR user: \fImodels/\fR (the encoder, trained heads),
\fIheads/\fR (head versions the retrainer promotes), \fIfeedback.db\fR, the audit trail.
Files a command run as root creates here take the directory's owner.
.TP
\fI/lib/systemd/system/mailtriage.service\fR
The service: \fBcheck\-config\fR before every start, \fBsystemctl reload\fR re\-reads the configuration.
.TP
\fI/usr/share/mailtriage/fetch\-model.sh\fR
Fetches the encoder's files: \fBrunuser \-u mailtriage \-\- /usr/share/mailtriage/fetch\-model.sh /var/lib/mailtriage/models/all\-MiniLM\-L6\-v2\fR
.TP
\fI/usr/share/doc/mailtriage/\fR
The guides: \fIdocs/first\-hour.md\fR, \fIdocs/postfix.md\fR, \fIdocs/configuration.md\fR, \fIdocs/feedback.md\fR, \fIdocs/operations.md\fR.
.SH ENVIRONMENT
.TP
\fBMAILTRIAGE_CONFIG\fR
The configuration file, as \fB\-\-config\fR.
.TP
\fBMAILTRIAGE__\fR\fISECTION\fR\fB__\fR\fIKEY\fR
Overrides one key of the file, e.g. \fBMAILTRIAGE__SERVER__MODE=enforce\fR.
.TP
\fBHF_HOME\fR, \fBHF_HUB_OFFLINE\fR
The Hugging Face cache \fBmailtriage model fetch\fR fills and \fB[model] id\fR is read from.
.SH "EXIT STATUS"
0 on success; 1 when the command failed; 2 for an invalid configuration (every problem is named);
75 when the feedback store is unavailable (retry later).
.SH "SEE ALSO"
\fBpostfix\fR(1), \fBpostconf\fR(5), \fBsystemctl\fR(1), and the pages of each subcommand,
\fBmailtriage\-serve\fR(1), \fBmailtriage\-check\-config\fR(1), \fBmailtriage\-classify\fR(1),
\fBmailtriage\-train\fR(1), \fBmailtriage\-feedback\fR(1), \fBmailtriage\-retrain\fR(1).
"#;

/// mailtriage.1 and a page for every subcommand, at any depth, named as
/// mailtriage(1) refers to them (`mailtriage-heads-list.1`).
fn man_pages(cmd: &clap::Command, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("mailtriage.1");
    let mut file = std::fs::File::create(&path).with_context(|| format!("writing {}", path.display()))?;
    main_page(cmd, &mut file).with_context(|| format!("writing {}", path.display()))?;
    fn each(cmd: &clap::Command, dir: &Path) -> Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            let man = clap_mangen::Man::new(sub.clone());
            man.generate_to(dir).with_context(|| format!("writing {}", man.get_filename()))?;
            each(sub, dir)?;
        }
        Ok(())
    }
    each(cmd, dir)
}

/// `mailtriage config show`.
pub fn show_config(path: &Path) -> Result<ExitCode> {
    let text = mailtriage::settings::effective_toml(path)?;
    std::io::stdout().lock().write_all(text.as_bytes()).context("writing to stdout")?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every page mailtriage(1) names exists beside it, and it has the
    /// sections an admin looks for.
    #[test]
    fn every_page_the_main_page_names_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Cli::command().disable_help_subcommand(true);
        cmd.build();
        man_pages(&cmd, dir.path()).unwrap();
        let main = std::fs::read_to_string(dir.path().join("mailtriage.1")).unwrap();
        for section in [".SH FILES", ".SH ENVIRONMENT", ".SH \"EXIT STATUS\"", ".SH \"SEE ALSO\""] {
            assert!(main.contains(section), "{section} missing");
        }
        assert!(main.contains("/etc/mailtriage/mailtriage.toml"));
        let mut named = 0;
        for part in main.split("mailtriage\\-").skip(1) {
            let Some((name, _)) = part.split_once("(1)") else { continue };
            let name = name.trim_start_matches("\\fR").replace("\\-", "-");
            let name = name.trim_end_matches("\\fR");
            if name.chars().all(|c| c.is_ascii_lowercase() || c == '-') {
                named += 1;
                assert!(
                    dir.path().join(format!("mailtriage-{name}.1")).exists(),
                    "mailtriage-{name}(1) is named but not written"
                );
            }
        }
        assert!(named >= 10, "only {named} pages named:\n{main}");
        // Nested subcommands get their own page too.
        assert!(dir.path().join("mailtriage-config-show.1").exists());
        assert!(!dir.path().join("mailtriage-help.1").exists());
    }
}
