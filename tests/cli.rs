//! The binary as an admin meets it first: `check-config` on a broken file.

use std::process::Command;

/// `train` on the shipped fixture, lexical only (quick): `--out` is added.
const TRAIN_LEXICAL_HEAD: &[&str] =
    &["train", "--data", "tests/fixtures/tickets-train.jsonl", "--label", "department", "--no-embeddings"];

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
        assert!(
            entries.iter().any(|l| l.contains("bad.toml, line ") && l.contains(&format!(": `{key}`: "))),
            "{key} not named with its line:\n{stderr}"
        );
    }
    // The regex's own explanation is indented under its entry, not a problem of its own.
    assert!(stderr.lines().any(|l| l.starts_with("    ") && l.contains("unclosed group")), "{stderr}");
}

/// Typos are all named in one run, each with its line, and a typo in an
/// environment variable names the variable, not the file.
#[test]
fn every_typo_is_named_in_one_run_and_the_environment_is_blamed_for_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typos.toml");
    std::fs::write(&path, "[server]\nmdoe = \"shadow\"\n[limits]\nmax_framebytes = 5\n[polcy]\nreview_below = 0.5\n")
        .unwrap();
    let run = |env: &[(&str, &str)]| {
        let out = Command::new(env!("CARGO_BIN_EXE_mailtriage"))
            .arg("--config")
            .arg(&path)
            .arg("check-config")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = run(&[]);
    for (line, key) in [(2, "server.mdoe"), (4, "limits.max_framebytes"), (5, "polcy")] {
        assert!(stderr.contains(&format!("typos.toml, line {line}: `{key}`: ")), "{key}:\n{stderr}");
    }
    std::fs::write(&path, "[server]\nmode = \"shadow\"\n").unwrap();
    let stderr = run(&[("MAILTRIAGE__SERVER__MODEE", "enforce")]);
    assert!(
        stderr.contains("invalid configuration: environment variable MAILTRIAGE__SERVER__MODEE (`server.modee`): "),
        "{stderr}"
    );
    assert!(!stderr.contains("typos.toml"), "the file is not to blame:\n{stderr}");
}

/// `classify` dry-runs the scope with the facts the MTA would give: the
/// same message is rerouted for a customer, skipped for an authenticated
/// sender, a client in an office network or the submission listener, and
/// a bad scope entry is named by `check-config`.
#[test]
fn classify_dry_runs_the_scope_with_the_client_facts_as_flags() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("scope.toml");
    std::fs::write(
        &cfg,
        "[server]\nmode = \"enforce\"\n\
         [scope]\nrecipients = [\"info@example.com\"]\nskip_networks = [\"10.0.0.0/8\"]\nskip_listeners = [\"submission\"]\n\
         [[departments]]\nname = \"billing\"\nmailbox = \"billing@example.com\"\naction = \"reroute\"\n\
         [[rules]]\nname = \"newsletters\"\nheader = \"List-Unsubscribe\"\npattern = \".\"\naction = \"skip\"\n\
         [[rules]]\nname = \"invoices\"\nheader = \"Subject\"\npattern = \"(?i)invoice\"\ndepartment = \"billing\"\n",
    )
    .unwrap();
    let msg = dir.path().join("m.eml");
    std::fs::write(
        &msg,
        "From: customer@outside.example\r\nTo: info@example.com\r\nCc: ceo@example.com\r\nSubject: Invoice 7\r\n\r\nx\r\n",
    )
    .unwrap();
    let newsletter = dir.path().join("n.eml");
    std::fs::write(&newsletter, "From: news@shop.example\r\nTo: info@example.com\r\nList-Unsubscribe: <https://u>\r\nSubject: Invoice news\r\n\r\nx\r\n").unwrap();
    let classify = |extra: &[&str], file: &std::path::Path| -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_mailtriage"))
            .arg("--config")
            .arg(&cfg)
            .arg("classify")
            .args(extra)
            .arg(file)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let v = classify(&[], &msg);
    assert_eq!(v["envelope"]["mail_from"], "customer@outside.example", "the sender defaults to From");
    assert_eq!(v["decision"]["department"], "billing");
    let plan = v["plan"].as_array().unwrap();
    let ops = |op: &str| -> Vec<String> {
        plan.iter().filter(|c| c["op"] == op).map(|c| c["address"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(ops("delete_recipient"), ["info@example.com"], "ceo@ (out of scope) keeps it: {v}");
    assert_eq!(ops("add_recipient"), ["billing@example.com"]);
    assert!(plan.iter().any(|c| c["name"] == "X-Triage-Original-Recipient" && c["value"] == "info@example.com"));

    for (flags, reason) in [
        (&["--authenticated"][..], "authenticated"),
        (&["--client-addr", "10.1.2.3"][..], "network"),
        (&["--listener", "submission"][..], "listener"),
        (&["--mail-from", ""][..], "null_sender"),
        (&["--rcpt", "ceo@example.com"][..], "recipients"),
    ] {
        let v = classify(flags, &msg);
        assert_eq!(v["skipped"], reason, "{flags:?}: {v}");
        assert!(v["decision"].is_null() && v["plan"].as_array().unwrap().is_empty(), "{v}");
    }
    assert_eq!(classify(&["--client-addr", "192.0.2.1"], &msg)["decision"]["department"], "billing");
    assert_eq!(classify(&[], &newsletter)["skipped"], "rule:newsletters");

    // The sender: a message without From is from an unknown sender, not a
    // bounce; a delivered message's Return-Path wins over From, and `<>`
    // there (or given) is a real bounce.
    let no_from = dir.path().join("no-from.eml");
    std::fs::write(&no_from, "To: info@example.com\r\nSubject: Invoice 8\r\n\r\nx\r\n").unwrap();
    let v = classify(&[], &no_from);
    assert!(v["skipped"].is_null() && v["envelope"]["mail_from"].is_null(), "{v}");
    assert_eq!(v["decision"]["department"], "billing", "{v}");
    let bounce = dir.path().join("bounce.eml");
    std::fs::write(&bounce, "Return-Path: <>\r\nFrom: MAILER-DAEMON@mx.example\r\nTo: info@example.com\r\nSubject: Invoice undeliverable\r\n\r\nx\r\n").unwrap();
    assert_eq!(classify(&[], &bounce)["skipped"], "null_sender");
    assert_eq!(classify(&["--mail-from", "<>"], &no_from)["skipped"], "null_sender");
    let delivered = dir.path().join("delivered.eml");
    std::fs::write(&delivered, "Return-Path: <bounces@list.example>\r\nFrom: Customer <customer@outside.example>\r\nTo: info@example.com\r\nSubject: Invoice 9\r\n\r\nx\r\n").unwrap();
    assert_eq!(classify(&[], &delivered)["envelope"]["mail_from"], "bounces@list.example");

    // --explain lists every rule tried and why it did or did not match.
    let v = classify(&["--explain"], &msg);
    let rules = v["explain"]["rules"].as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(rules.len(), 2, "{v}");
    assert_eq!((&rules[0]["rule"], &rules[0]["result"]), (&"newsletters".into(), &"absent".into()), "{v}");
    assert_eq!((&rules[1]["rule"], &rules[1]["result"]), (&"invoices".into(), &"matched".into()), "{v}");
    assert_eq!(rules[1]["value"], "Invoice 7");
    let v = classify(&["--explain", "--authenticated"], &msg);
    assert!(v["explain"]["rules"].as_str().unwrap().contains("out of scope (authenticated)"), "{v}");

    std::fs::write(&cfg, "[scope]\nrecipients = [\"info\"]\nskip_listeners = [\"sub mission\"]\n[[rules]]\nname = \"s\"\nheader = \"Subject\"\npattern = \"x\"\naction = \"skip\"\ndepartment = \"billing\"\n").unwrap();
    let out =
        Command::new(env!("CARGO_BIN_EXE_mailtriage")).arg("--config").arg(&cfg).arg("check-config").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in ["scope.recipients[0]", "scope.skip_listeners[0]", "rules[0] (s).department"] {
        assert!(stderr.contains(&format!("`{key}`")), "{key} not named:\n{stderr}");
    }
}

/// What an admin's commands run as root leave in the service's state
/// directory belongs to the service user (here `nobody`, who owns the
/// directory), so the service can still write it; and a file it cannot
/// write is reported as a permission problem with the path, its owner and
/// the fix, not as an invalid configuration.
#[test]
fn commands_run_as_root_leave_state_the_service_user_owns() {
    use std::os::unix::fs::MetadataExt;
    assert_eq!(mailtriage::access::euid(), 0, "run as root (scripts/test.sh): the test gives files away");
    let nobody = mailtriage::access::user_by_name("nobody").unwrap().expect("a `nobody` account");
    let top = tempfile::Builder::new().prefix("mt-owner.").tempdir_in("/tmp").unwrap();
    std::fs::set_permissions(top.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let state = top.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(nobody.uid), Some(nobody.gid)).unwrap();
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
    let cfg = top.path().join("mailtriage.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = \"{}\"\nworkers = 1\n\
             [audit]\npath = \"state/audit/audit.jsonl\"\nkey_file = \"state/audit.key\"\n\
             [feedback]\nstore = \"sqlite://state/feedback.db\"\nheads_dir = \"state/heads\"\n\
             [[departments]]\nname = \"billing\"\ndescription = \"Invoices and payments\"\n\
             [[departments]]\nname = \"support\"\ndescription = \"Technical problems\"\n",
            model.display()
        ),
    )
    .unwrap();
    let msg = top.path().join("m.eml");
    std::fs::write(&msg, "From: a@client.example\r\nTo: info@example.com\r\nMessage-ID: <m1@client.example>\r\nSubject: Invoice 7 is wrong\r\n\r\nPlease fix the amount.\r\n").unwrap();
    let trained = state.join("trained/department.safetensors");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_mailtriage")).arg("--config").arg(&cfg).args(args).output().unwrap();
        let said =
            format!("{args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.code(), said)
    };
    for args in [
        &["check-config"][..],
        &["feedback", "--department", "billing", msg.to_str().unwrap()],
        &["report"],
        &["heads", "list"],
        &["retrain"],
        &["forget", "--message-id", "<m1@client.example>"],
        &[TRAIN_LEXICAL_HEAD, &["--out", trained.to_str().unwrap()]].concat(),
    ] {
        let (code, said) = run(args);
        // `retrain` has no trained head to start from here: it says so (exit 1); every other command succeeds.
        let expected = if args[0] == "retrain" { 1 } else { 0 };
        assert_eq!(code, Some(expected), "{said}");
    }
    let mut files = Vec::new();
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            out.push(e.path());
            if e.path().is_dir() {
                walk(&e.path(), out);
            }
        }
    }
    walk(&state, &mut files);
    for must in ["audit.key", "audit", "feedback.db", "trained/department.safetensors"] {
        assert!(files.iter().any(|f| f.ends_with(must)), "{must} not created: {files:?}");
    }
    for f in &files {
        let m = std::fs::symlink_metadata(f).unwrap();
        assert_eq!((m.uid(), m.gid()), (nobody.uid, nobody.gid), "{} is not the service user's", f.display());
    }

    // A root-owned directory where the service writes: said as a permission
    // problem, by the service user's check-config, with the fix.
    let heads = state.join("heads");
    std::fs::create_dir_all(&heads).unwrap();
    std::os::unix::fs::chown(&heads, Some(0), Some(0)).unwrap();
    // The checkout may sit where `nobody` cannot go (a mktemp -d clone is
    // 0700): the binary and a configuration without the model, beside the state.
    let bin = top.path().join("mailtriage");
    std::fs::copy(env!("CARGO_BIN_EXE_mailtriage"), &bin).unwrap();
    let service_cfg = top.path().join("service.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&service_cfg, &text[text.find("[audit]").unwrap()..]).unwrap();
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(&bin)
        .arg("--config")
        .arg(&service_cfg)
        .arg("check-config")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let line = stderr.lines().find(|l| l.contains("permission denied")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(!line.contains("invalid configuration"), "{line}");
    assert!(line.contains(&heads.display().to_string()) && line.contains("owned by root:root"), "{line}");
    assert!(line.contains(&format!("chown -R nobody: {}", heads.display())), "{line}");
    assert_eq!(stderr.matches("Permission denied").count(), 0, "the OS's words are not repeated: {stderr}");
}

/// A relative head path is taken from the configuration file's directory,
/// whatever directory the command runs in, and a missing head is named by
/// its full path with how to make one (not with how to fetch the encoder).
#[test]
fn a_relative_head_path_is_read_beside_the_config_and_a_missing_one_says_how_to_train_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
    let cfg = dir.path().join("mailtriage.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = \"{}\"\ndepartment_head = \"heads/department.safetensors\"\n\
             [[departments]]\nname = \"billing\"\ndescription = \"Invoices\"\n",
            model.display()
        ),
    )
    .unwrap();
    let check = || {
        Command::new(env!("CARGO_BIN_EXE_mailtriage"))
            .arg("--config")
            .arg(&cfg)
            .arg("check-config")
            .current_dir("/")
            .output()
            .unwrap()
    };
    let out = check();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let resolved = dir.path().join("heads/department.safetensors");
    assert!(stderr.contains(&format!("head file {} is missing", resolved.display())), "{stderr}");
    assert!(stderr.contains("mailtriage train") && !stderr.contains("fetch-model"), "{stderr}");
    // Trained where the file says, it is found from any directory.
    let trained = Command::new(env!("CARGO_BIN_EXE_mailtriage"))
        .arg("--config")
        .arg(&cfg)
        .args(TRAIN_LEXICAL_HEAD)
        .arg("--out")
        .arg(&resolved)
        .output()
        .unwrap();
    assert!(trained.status.success(), "{}", String::from_utf8_lossy(&trained.stderr));
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg).unwrap().replace(
            "name = \"billing\"",
            "name = \"billing\"\n[[departments]]\nname = \"support\"\n[[departments]]\nname = \"hr\"",
        ),
    )
    .unwrap();
    let out = check();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
