//! The shipped systemd unit must rate 2.0 or lower ("OK" or better) in
//! `systemd-analyze security --offline=yes` (Debian package `systemd`), and
//! the daemon speaks its readiness protocol the way `Type=notify` expects.

use std::path::Path;
use std::process::Command;

#[test]
fn systemd_unit_security_exposure_is_at_most_2() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/mailtriage.service");
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze not found: install the Debian package `systemd` (scripts/test.sh does)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let level: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for mailtriage.service:").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(level <= 2.0, "exposure {level} > 2.0:\n{text}");
}

#[test]
fn systemd_unit_reloads_with_sighup_and_runs_unprivileged() {
    let unit =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/mailtriage.service")).unwrap();
    for line in [
        "Type=notify",
        "NotifyAccess=main",
        "ExecStartPre=/usr/bin/mailtriage --config /etc/mailtriage/mailtriage.toml check-config",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "User=mailtriage",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "RuntimeDirectory=mailtriage",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "Restart=on-failure",
    ] {
        assert!(unit.lines().any(|l| l.trim() == line), "missing `{line}`");
    }
}

/// As systemd sees it: `READY=1` only once the milter port accepts, a
/// watchdog ping within the interval, `STOPPING=1` when SIGTERM starts the drain.
#[test]
fn readiness_watchdog_and_stopping_reach_notify_socket() {
    use std::os::unix::net::UnixDatagram;
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("notify");
    let systemd = UnixDatagram::bind(&sock).unwrap();
    systemd.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = dir.path().join("mailtriage.toml");
    std::fs::write(&cfg, format!("[server]\nmilter = \"inet:127.0.0.1:{port}\"\n")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mailtriage"))
        .arg("--config")
        .arg(&cfg)
        .arg("serve")
        .env("NOTIFY_SOCKET", &sock)
        .env("WATCHDOG_USEC", "400000")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 1024];
    let mut next = || {
        let n = systemd.recv(&mut buf).expect("a notification within 30 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = next();
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    assert!(ready.contains(&format!("MAINPID={}", child.id())), "{ready}");
    assert!(ready.contains("STATUS=milter inet:127.0.0.1:"), "{ready}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(), "ready before the listener was bound");
    assert_eq!(next(), "WATCHDOG=1\n");
    let ok = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(ok.success());
    let stopping = loop {
        let m = next();
        if m != "WATCHDOG=1\n" {
            break m;
        }
    };
    assert!(stopping.starts_with("STOPPING=1\n"), "{stopping}");
    assert!(child.wait().unwrap().success());
}
