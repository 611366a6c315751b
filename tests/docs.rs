//! Every configuration key that exists in the code is documented in
//! docs/configuration.md. The keys come from the types themselves: each
//! section rejects an unknown key with a message listing all its real ones.

use std::path::Path;

use mailtriage::settings::Config;

/// All keys of a section, as the deserializer lists them.
fn keys_of(section: &str, array: bool) -> Vec<String> {
    let toml = match (section, array) {
        ("", _) => "zz_not_a_key = 1\n".to_string(),
        (s, true) => format!("[[{s}]]\nzz_not_a_key = 1\n"),
        (s, false) => format!("[{s}]\nzz_not_a_key = 1\n"),
    };
    let err = Config::from_toml(&toml, "probe").unwrap_err().to_string();
    let expected = err.split("expected").nth(1).unwrap_or_else(|| panic!("[{section}]: no key list in {err}"));
    let keys: Vec<String> = expected.split('`').skip(1).step_by(2).map(str::to_string).collect();
    assert!(!keys.is_empty(), "[{section}]: {err}");
    keys
}

#[test]
fn every_config_key_is_documented() {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md")).unwrap();
    let sections = keys_of("", false);
    let mut missing = Vec::new();
    let mut checked = 0;
    for section in &sections {
        let array = section == "departments" || section == "rules";
        for key in keys_of(section, array) {
            checked += 1;
            if !doc.contains(&format!("`{section}.{key}`")) {
                missing.push(format!("{section}.{key}"));
            }
        }
    }
    assert!(checked > 40, "only {checked} keys found: the probe is broken");
    assert!(missing.is_empty(), "undocumented keys in docs/configuration.md: {missing:?}");
}

#[test]
fn grafana_dashboard_is_valid_json_over_metrics_we_export() {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/grafana-dashboard.json")).unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).unwrap();
    let exported = [
        mailtriage::record::metrics::name::MESSAGES,
        mailtriage::record::metrics::name::SKIPPED,
        mailtriage::record::metrics::name::FAILED_OPEN,
        mailtriage::record::metrics::name::DECISION_SECONDS,
        mailtriage::record::metrics::name::INFERENCE_SECONDS,
        mailtriage::record::metrics::name::QUEUE_DEPTH,
        mailtriage::record::metrics::name::CONNECTIONS,
        mailtriage::record::metrics::name::INFO,
        mailtriage::record::metrics::name::MODEL_PATH,
        mailtriage::record::metrics::name::RELAY,
        mailtriage::record::metrics::name::FEEDBACK,
        mailtriage::record::metrics::name::RETRAIN,
        mailtriage::record::metrics::name::HEAD_VERSION,
        mailtriage::record::metrics::name::MINUTES_SAVED,
    ];
    for panel in d["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            assert!(
                exported.iter().any(|m| expr.contains(m)),
                "panel {:?} queries no exported metric: {expr}",
                panel["title"]
            );
        }
    }
}

#[test]
fn the_restart_only_keys_are_the_ones_the_operations_guide_names() {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md")).unwrap();
    let start = doc.find("What only a restart applies").expect("docs/operations.md lists the restart-only keys");
    let section = &doc[start..start + doc[start..].find("\n- `systemctl stop`").unwrap()];
    let named: Vec<&str> = section.split('`').skip(1).step_by(2).filter(|k| k.contains('.')).collect();
    use mailtriage::settings::{section::Apply, Config};
    let mut named: Vec<&str> = named;
    let mut restart: Vec<&str> =
        Config::keys().into_iter().filter(|(_, a)| *a == Apply::Restart).map(|(k, _)| k).collect();
    named.sort_unstable();
    restart.sort_unstable();
    assert_eq!(named, restart, "docs/operations.md and the restart keys of settings disagree");
}

#[test]
fn every_key_of_the_file_says_how_a_reload_applies_it() {
    use mailtriage::settings::Config;
    let mut unknown = Vec::new();
    let mut seen = Vec::new();
    for section in keys_of("", false) {
        let array = section == "departments" || section == "rules";
        for key in keys_of(&section, array) {
            let key = format!("{section}.{key}");
            if Config::apply_of(&key).is_none() {
                unknown.push(key.clone());
            }
            seen.push(key);
        }
    }
    assert!(seen.len() > 60, "only {} keys found: the probe is broken", seen.len());
    assert!(unknown.is_empty(), "keys the file accepts but settings does not declare: {unknown:?}");
    // And every declared key is one the file accepts.
    for (k, _) in Config::keys() {
        assert!(seen.iter().any(|s| s == k), "{k} is declared but not a key of the file");
    }
}

/// The README's head measuring example, pasted as it stands, on the shipped
/// configuration (which configures no head): the head the README's own
/// `train` line wrote is measured, in text and as JSON.
#[test]
fn the_readme_eval_example_runs_as_pasted_on_the_shipped_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("models/all-MiniLM-L6-v2");
    assert!(model.join("model.safetensors").exists(), "run scripts/fetch-model.sh first");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    // What an admin pastes: the command, without a trailing comment.
    let commands = |prefix: &str| -> Vec<Vec<String>> {
        readme
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(|l| l.split(" #").next().unwrap().split_whitespace().skip(1).map(str::to_string).collect())
            .collect()
    };
    let train = commands("mailtriage --config conf/mailtriage.toml train --data labeled.jsonl --label queue ");
    let evals = commands("mailtriage --config conf/mailtriage.toml eval ");
    assert_eq!((train.len(), evals.len()), (1, 2), "the README's train and eval examples moved");

    // A checkout's layout: conf/ with the shipped file, models/ with the encoder.
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    std::fs::create_dir_all(w.join("conf")).unwrap();
    std::fs::create_dir_all(w.join("models")).unwrap();
    std::fs::copy(root.join("conf/mailtriage.toml"), w.join("conf/mailtriage.toml")).unwrap();
    std::os::unix::fs::symlink(&model, w.join("models/all-MiniLM-L6-v2")).unwrap();
    let topics = [
        ("Billing and Payments", ["invoice", "payment", "charged", "bank transfer", "receipt"]),
        ("Technical Support", ["crash", "error", "login fails", "server down", "bug"]),
        ("Sales", ["quote", "pricing", "discount", "offer", "purchase"]),
    ];
    for (file, n) in [("labeled.jsonl", 16), ("test.jsonl", 6)] {
        let mut text = String::new();
        for (label, words) in topics {
            for i in 0..n {
                let (a, b) = (words[i % 5], words[(i + 2) % 5]);
                let line = serde_json::json!({
                    "subject": format!("{a} question {i}"),
                    "body": format!("Hello, about the {a} and the {b}: please help, ticket {i}."),
                    "queue": label,
                    "language": if i % 2 == 0 { "de" } else { "en" },
                });
                text.push_str(&format!("{line}\n"));
            }
        }
        std::fs::write(w.join(file), text).unwrap();
    }
    let run = |args: &[String]| {
        let out =
            std::process::Command::new(env!("CARGO_BIN_EXE_mailtriage")).args(args).current_dir(w).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "mailtriage {}:\n{text}", args.join(" "));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&train[0]);
    for args in &evals {
        let out = run(args);
        if args.iter().any(|a| a == "--json") {
            let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
            assert_eq!(v["n"], 18, "{v}");
            assert!(v["macro_f1"].as_f64().is_some(), "{v}");
        } else {
            assert!(out.contains("by language"), "{out}");
        }
    }
}
