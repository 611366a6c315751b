//! The Debian package, as an admin gets it: built from this checkout by
//! `scripts/build-deb.sh` around the binary under test, checked with
//! `lintian` (no errors), installed with `dpkg -i` on this machine (which
//! must not start a daemon), `check-config` on the packaged configuration
//! (the missing model named with how to get it; then OK once the model is
//! in place, as the service user), and purged without a trace.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Processes running the installed binary.
fn installed_daemons() -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_link(e.path().join("exe")).is_ok_and(|x| x == Path::new("/usr/bin/mailtriage")))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn debian_package_builds_lints_installs_checks_and_purges() {
    support::require("lintian", "lintian");
    support::require("dpkg-shlibdeps", "dpkg-dev");
    let already = Command::new("dpkg-query").args(["-W", "-f", "${Status}", "mailtriage"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&already.stdout).contains("installed"),
        "a mailtriage package is already installed here; this test installs and purges its own: remove it first"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().unwrap();
    let built = run(Command::new("bash")
        .arg(root.join("scripts/build-deb.sh"))
        .arg(env!("CARGO_BIN_EXE_mailtriage"))
        .arg(out.path()));
    let deb = PathBuf::from(String::from_utf8_lossy(&built.stdout).lines().last().unwrap().trim());
    assert!(deb.exists(), "{}", text(&built));

    let contents = text(&run(Command::new("dpkg-deb").arg("--contents").arg(&deb)));
    for path in [
        "./usr/bin/mailtriage",
        "./etc/mailtriage/mailtriage.toml",
        "./lib/systemd/system/mailtriage.service",
        "./usr/lib/sysusers.d/mailtriage.conf",
        "./usr/lib/tmpfiles.d/mailtriage.conf",
        "./usr/share/man/man1/mailtriage.1.gz",
        "./usr/share/bash-completion/completions/mailtriage",
        "./usr/share/zsh/vendor-completions/_mailtriage",
        "./usr/share/fish/vendor_completions.d/mailtriage.fish",
        "./usr/share/doc/mailtriage/copyright",
        "./usr/share/doc/mailtriage/THIRD-PARTY-LICENSES.gz",
        "./usr/share/doc/mailtriage/docs/postfix.md",
        "./usr/share/mailtriage/fetch-model.sh",
    ] {
        assert!(contents.lines().any(|l| l.ends_with(path)), "{path} not in the package:\n{contents}");
    }
    let conffiles = text(&run(Command::new("dpkg-deb").arg("--info").arg(&deb).arg("conffiles")));
    assert_eq!(conffiles.trim(), "/etc/mailtriage/mailtriage.toml");
    let lint = Command::new("lintian").args(["--fail-on", "error"]).arg(&deb).output().unwrap();
    assert!(lint.status.success(), "lintian reports errors:\n{}", text(&lint));
    assert!(!text(&lint).lines().any(|l| l.starts_with("E: ")), "{}", text(&lint));

    let installed = run(Command::new("dpkg").arg("-i").arg(&deb));
    let purge = || run(Command::new("dpkg").args(["--purge", "mailtriage"]));
    let result = std::panic::catch_unwind(|| {
        assert!(text(&installed).contains("mailtriage is installed but not started"), "{}", text(&installed));
        run(Command::new("getent").args(["passwd", "mailtriage"]));
        assert!(installed_daemons().is_empty(), "installing started a daemon");
        // What the packaged file would listen on: loopback only.
        let cfg = mailtriage::settings::Config::load(Path::new("/etc/mailtriage/mailtriage.toml")).unwrap();
        match cfg.server.milter_listen() {
            Some(mailtriage::settings::ListenAddress::Inet(a)) => {
                let addr: std::net::SocketAddr = a.parse().unwrap();
                assert!(addr.ip().is_loopback(), "the packaged milter listens on {addr}");
            }
            other => panic!("the packaged config's milter: {other:?}"),
        }
        let shown = text(&run(Command::new("/usr/bin/mailtriage").args(["config", "show"]).current_dir("/")));
        assert!(shown.contains("milter = \"inet:127.0.0.1:8890\""), "{shown}");
        assert!(cfg.server.smtp.is_none() && cfg.server.lmtp.is_none() && cfg.metrics.is_none());

        // Without the model: refused, and the message says how to get it.
        let check = Command::new("/usr/bin/mailtriage").arg("check-config").current_dir("/").output().unwrap();
        assert_eq!(check.status.code(), Some(2), "{}", text(&check));
        assert!(text(&check).contains("/var/lib/mailtriage/models/all-MiniLM-L6-v2"), "{}", text(&check));
        assert!(text(&check).contains("fetch-model.sh"), "{}", text(&check));
        // The model where the package expects it (what fetch-model.sh writes), as the service user.
        let model = root.join("models/all-MiniLM-L6-v2");
        run(Command::new("cp").arg("-r").arg(&model).arg("/var/lib/mailtriage/models/"));
        run(Command::new("chown").args(["-R", "mailtriage:mailtriage", "/var/lib/mailtriage/models"]));
        let ok = run(Command::new("runuser")
            .args(["-u", "mailtriage", "--", "/usr/bin/mailtriage", "check-config"])
            .current_dir("/"));
        assert!(text(&ok).contains("/etc/mailtriage/mailtriage.toml: OK"), "{}", text(&ok));
        let man = text(&run(Command::new("sh").arg("-c").arg("zcat /usr/share/man/man1/mailtriage.1.gz")));
        assert!(man.contains(".TH mailtriage 1") && man.contains("check\\-config"), "{man}");
    });
    purge();
    for gone in
        ["/usr/bin/mailtriage", "/etc/mailtriage", "/var/lib/mailtriage", "/lib/systemd/system/mailtriage.service"]
    {
        assert!(!Path::new(gone).exists(), "{gone} left after purge");
    }
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
