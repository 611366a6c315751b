//! The shipped systemd unit must rate 2.0 or lower ("OK" or better) in
//! `systemd-analyze security --offline=yes` (Debian package `systemd`).

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
