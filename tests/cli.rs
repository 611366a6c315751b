//! The binary as an admin meets it first: `check-config` on a broken file.

use std::process::Command;

#[test]
fn check_config_names_every_problem_of_a_broken_file_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[server]\ndecision_timeout = \"0s\"\n[policy]\nreview_below = 3\n\
         [[rules]]\nname = \"x\"\nheader = \"Subject\"\npattern = \"(\"\ndepartment = \"nobody\"\n",
    )
    .unwrap();
    let out =
        Command::new(env!("CARGO_BIN_EXE_mailtriage")).arg("--config").arg(&path).arg("check-config").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let entries: Vec<&str> = stderr.lines().filter(|l| l.starts_with("mailtriage: invalid configuration: ")).collect();
    for key in ["rules[0] (x).pattern", "rules[0] (x).department", "policy.review_below", "server.decision_timeout"] {
        assert!(entries.iter().any(|l| l.contains(&format!("bad.toml: `{key}`: "))), "{key} not named:\n{stderr}");
    }
    // The regex's own explanation is indented under its entry, not a problem of its own.
    assert!(stderr.lines().any(|l| l.starts_with("    ") && l.contains("unclosed group")), "{stderr}");
}
