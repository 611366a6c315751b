//! The Debian package, as an admin gets it: built from this checkout by
//! `scripts/build-deb.sh` around the binary under test, checked with
//! `lintian` (no errors), installed with `dpkg -i` on this machine (which
//! must not start a daemon), `check-config` on the packaged configuration
//! (the missing model named with how to get it; then OK once the model is
//! in place, as the service user), and purged without a trace: with the
//! feedback token the admin put under /etc/mailtriage as documented, the
//! configuration directory and the system user and group go too.

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

/// Processes running the installed binary: the same file (device and
/// inode), so a container's own `/usr/bin/mailtriage` does not count.
fn installed_daemons() -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let Ok(installed) = std::fs::metadata("/usr/bin/mailtriage") else { return Vec::new() };
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::metadata(e.path().join("exe"))
                .is_ok_and(|m| (m.dev(), m.ino()) == (installed.dev(), installed.ino()))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn debian_package_builds_lints_installs_checks_and_purges() {
    support::require("lintian", "lintian");
    support::require_no_installed_package();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().unwrap();
    let deb = support::build_deb(out.path());

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
        // Every page mailtriage(1) refers to is installed, and it says where things are.
        assert!(man.contains(".SH FILES") && man.contains("/etc/mailtriage/mailtriage.toml"), "{man}");
        let mut referred = 0;
        for part in man.split("mailtriage\\-").skip(1) {
            let Some((name, _)) = part.split_once("(1)") else { continue };
            let name = name.trim_end_matches("\\fR").replace("\\-", "-");
            if name.chars().all(|c| c.is_ascii_lowercase() || c == '-') {
                referred += 1;
                let page = format!("/usr/share/man/man1/mailtriage-{name}.1.gz");
                assert!(Path::new(&page).exists(), "mailtriage(1) refers to {page}, which is not installed");
            }
        }
        assert!(referred >= 10, "{man}");
        // The admin's own file where the shipped config points `http_token_file`.
        let shipped = std::fs::read_to_string("/etc/mailtriage/mailtriage.toml").unwrap();
        assert!(shipped.contains("/etc/mailtriage/feedback.token"), "the documented token path moved");
        std::fs::write("/etc/mailtriage/feedback.token", "0123456789abcdef-token\n").unwrap();
        run(Command::new("chown").args(["root:mailtriage", "/etc/mailtriage/feedback.token"]));
        run(Command::new("chmod").args(["0640", "/etc/mailtriage/feedback.token"]));
    });
    purge();
    for gone in
        ["/usr/bin/mailtriage", "/etc/mailtriage", "/var/lib/mailtriage", "/lib/systemd/system/mailtriage.service"]
    {
        assert!(!Path::new(gone).exists(), "{gone} left after purge");
    }
    for db in ["passwd", "group"] {
        let left = Command::new("getent").args([db, "mailtriage"]).output().unwrap();
        assert!(!left.status.success(), "the mailtriage {db} entry is left after purge: {}", text(&left));
    }
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// The container image, built without a registry (`deploy/container/build.sh`:
/// a Debian minbase from mmdebstrap, the Containerfile on top) around the
/// binary under test, run read-only as its non-root user with the model as
/// a read-only volume, asked for readiness, fed mail by a real Postfix
/// through its milter port, and stopped with SIGTERM.
///
/// These machines are Firecracker VMs with hybrid cgroups, which crun
/// refuses ("cgroups in hybrid mode not supported"), and a raised
/// RLIMIT_NPROC is refused too: the run uses runc with explicit ulimits, and
/// host networking on loopback ports (no CNI plugins; traffic stays local).
#[test]
fn container_image_runs_read_only_and_serves_postfix() {
    support::require("podman", "podman");
    support::require("mmdebstrap", "mmdebstrap");
    support::require("runc", "runc");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tag = format!("localhost/mailtriage-test:{}", std::process::id());
    let built = run(Command::new("bash")
        .arg(root.join("deploy/container/build.sh"))
        .arg(env!("CARGO_BIN_EXE_mailtriage"))
        .arg(&tag));
    assert!(text(&built).contains(&tag), "{}", text(&built));
    let inspect = text(&run(Command::new("podman").args(["image", "inspect", "--format", "{{.Config.User}}", &tag])));
    assert_eq!(inspect.trim(), "10001:10001", "the image runs as its own user, not root");

    let (milter, metrics) = (support::free_port(), support::free_port());
    let name = format!("mailtriage-test-{}", std::process::id());
    let model = root.join("models/all-MiniLM-L6-v2");
    let started = run(Command::new("podman")
        .args(["--runtime", "runc", "run", "-d", "--name", &name, "--read-only", "--network=host"])
        .args(["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"])
        .arg("-v")
        .arg(format!("{}:/var/lib/mailtriage/models/all-MiniLM-L6-v2:ro", model.display()))
        .args(["-e", &format!("MAILTRIAGE__SERVER__MILTER=inet:127.0.0.1:{milter}")])
        .args(["-e", &format!("MAILTRIAGE__METRICS__LISTEN=127.0.0.1:{metrics}")])
        .arg(&tag));
    let cleanup = || {
        let _ = Command::new("podman").args(["rm", "-f", &name]).output();
        let _ = Command::new("podman").args(["rmi", "-f", &tag]).output();
    };
    let logs = || text(&Command::new("podman").args(["logs", &name]).output().unwrap());
    let result = std::panic::catch_unwind(|| {
        assert!(!text(&started).trim().is_empty());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !support::wait_for_port(metrics, std::time::Duration::from_millis(200))
            || !support::http_get(metrics, "/readyz").starts_with("HTTP/1.1 200")
        {
            assert!(std::time::Instant::now() < deadline, "not ready within 60 s:\n{}", logs());
        }
        let pf = support::Postfix::start(Some(&format!("inet:127.0.0.1:{milter}")), "tempfail", &[]);
        let codes = support::send(pf.smtp_port, &[support::mail("Your invoice 2024-99", "", "Please pay.")]).unwrap();
        assert_eq!(codes, [250]);
        let delivered = pf.wait_delivered(1, std::time::Duration::from_secs(60));
        assert_eq!(delivered.len(), 1, "postfix log:\n{}\ncontainer log:\n{}", pf.log(), logs());
        // The shipped default config's rule, decided inside the container (shadow mode: headers only).
        assert_eq!(support::header_values(&delivered[0].1, "X-Triage-Mode"), ["shadow"]);
        assert_eq!(support::header_values(&delivered[0].1, "X-Triage-Department"), ["billing"]);
        assert_eq!(support::header_values(&delivered[0].1, "X-Triage-Source"), ["rule:invoices"]);
        // SIGTERM: the drain ends well inside a pod's grace period, exit status 0.
        let t = std::time::Instant::now();
        run(Command::new("podman").args(["stop", "-t", "30", &name]));
        assert!(t.elapsed() < std::time::Duration::from_secs(25), "stop took {:?}", t.elapsed());
        let status = text(&run(Command::new("podman").args(["inspect", "--format", "{{.State.ExitCode}}", &name])));
        assert_eq!(status.trim(), "0", "{}", logs());
        assert!(logs().contains("stopped"), "{}", logs());
    });
    cleanup();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// The Kubernetes manifests validate offline against the current Kubernetes
/// API (`kubernetes-validate --strict`, PyPI; scripts/test.sh installs it in
/// a venv), a broken one is refused, and they agree with the image and the
/// product: the ConfigMap's file is a valid configuration under the image's
/// environment, the probes are the daemon's endpoints, the pod's grace period
/// outlasts the drain.
#[test]
fn kubernetes_manifests_validate_and_agree_with_the_image() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let k8s = root.join("deploy/kubernetes");
    let validator = std::env::var("MAILTRIAGE_KUBERNETES_VALIDATE").unwrap_or_else(|_| "kubernetes-validate".into());
    let manifests: Vec<PathBuf> = std::fs::read_dir(&k8s)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("kustomization.yaml"))
        .collect();
    assert!(manifests.len() >= 6, "{manifests:?}");
    let validate = |files: &[PathBuf]| {
        Command::new(&validator).arg("--strict").args(files).output().unwrap_or_else(|e| {
            panic!("{validator}: {e} (pip install kubernetes-validate; scripts/test.sh does, in target/tools)")
        })
    };
    let checked = validate(&manifests);
    assert!(checked.status.success(), "{}", text(&checked));
    assert_eq!(text(&checked).matches(" passed for resource ").count(), manifests.len(), "{}", text(&checked));
    // The validator can fail: a port that is not a number.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("deployment.yaml");
    let deployment = std::fs::read_to_string(k8s.join("deployment.yaml")).unwrap();
    std::fs::write(&broken, deployment.replacen("containerPort: 8890", "containerPort: milter-port", 1)).unwrap();
    assert!(!validate(&[broken]).status.success(), "a broken manifest passed");

    let kustomization = std::fs::read_to_string(k8s.join("kustomization.yaml")).unwrap();
    for line in kustomization.lines().filter_map(|l| l.trim().strip_prefix("- ")) {
        let file = line.rsplit('=').next().unwrap();
        if file.ends_with(".yaml") || file.ends_with(".toml") || file.ends_with(".example") {
            assert!(k8s.join(file).exists(), "kustomization names a missing file: {file}");
        }
    }
    // The image's environment, as the Containerfile sets it, over the ConfigMap's file.
    let containerfile = std::fs::read_to_string(root.join("deploy/container/Containerfile")).unwrap();
    let env: Vec<(String, String)> = containerfile
        .split("ENV ")
        .nth(1)
        .unwrap()
        .lines()
        .map(|l| l.trim().trim_end_matches('\\').trim())
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    assert!(env.iter().any(|(k, _)| k == "MAILTRIAGE__SERVER__MILTER"), "{env:?}");
    let shown = run(Command::new(env!("CARGO_BIN_EXE_mailtriage"))
        .args(["--config"])
        .arg(k8s.join("mailtriage.toml"))
        .args(["config", "show"])
        .env_remove("MAILTRIAGE_CONFIG")
        .envs(env.iter().filter(|(k, _)| k.starts_with("MAILTRIAGE__")).cloned()));
    let shown = text(&shown);
    assert!(shown.contains("milter = \"inet:0.0.0.0:8890\"") && shown.contains("listen = \"0.0.0.0:9090\""), "{shown}");
    let grace: u64 = env
        .iter()
        .find(|(k, _)| k == "MAILTRIAGE__SERVER__SHUTDOWN_GRACE")
        .unwrap()
        .1
        .trim_end_matches('s')
        .parse()
        .unwrap();
    let pod_grace: u64 = deployment
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(grace + 10 <= pod_grace, "drain {grace}s vs pod grace {pod_grace}s");
    for probe in [
        "path: /readyz",
        "path: /healthz",
        "containerPort: 8890",
        "containerPort: 9090",
        "readOnlyRootFilesystem: true",
    ] {
        assert!(deployment.contains(probe), "{probe} missing from deployment.yaml");
    }
}

/// The minimum Rust version the package states (Cargo.toml `rust-version`,
/// the README) is the highest any locked dependency built for this platform
/// declares: not lower (the build would fail there), not higher (a claim
/// nobody checked).
#[test]
fn stated_rust_version_is_what_the_locked_dependencies_need() {
    let host = text(&run(Command::new("rustc").arg("-vV")));
    let host = host.lines().find_map(|l| l.strip_prefix("host: ")).unwrap().trim().to_string();
    let meta = run(Command::new("cargo")
        .args(["metadata", "--locked", "--format-version", "1", "--filter-platform", &host])
        .current_dir(env!("CARGO_MANIFEST_DIR")));
    let meta: serde_json::Value = serde_json::from_slice(&meta.stdout).unwrap();
    let in_build: std::collections::HashSet<&str> =
        meta["resolve"]["nodes"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap()).collect();
    let version = |v: &str| -> Vec<u32> { v.split('.').map(|x| x.parse().unwrap()).collect() };
    let mut ours = None;
    let mut needed: (Vec<u32>, String) = (vec![0], String::new());
    for p in meta["packages"].as_array().unwrap() {
        let Some(rv) = p["rust_version"].as_str() else { continue };
        if p["name"] == "mailtriage" {
            ours = Some(rv.to_string());
        } else if in_build.contains(p["id"].as_str().unwrap()) && version(rv) > needed.0 {
            needed = (version(rv), format!("{} {}", p["name"], p["version"]));
        }
    }
    let ours = ours.expect("Cargo.toml states a rust-version");
    assert_eq!(version(&ours), needed.0, "Cargo.toml says {ours}, {} needs {:?}", needed.1, needed.0);
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    assert!(readme.contains(&format!("Rust toolchain ({ours} or newer")), "README states another minimum");
}
