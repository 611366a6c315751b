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
    let restart: Vec<&str> = mailtriage::daemon::reload::RESTART.iter().map(|(k, _)| *k).collect();
    assert_eq!(named, restart, "docs/operations.md and daemon::reload::RESTART disagree");
}

#[test]
fn every_key_of_the_file_is_either_applied_by_a_reload_or_named_for_a_restart() {
    use mailtriage::daemon::reload::{apply_of, LIVE, RESTART};
    let mut unknown = Vec::new();
    let mut seen = Vec::new();
    for section in keys_of("", false) {
        let array = section == "departments" || section == "rules";
        for key in keys_of(&section, array) {
            let key = format!("{section}.{key}");
            if apply_of(&key).is_none() {
                unknown.push(key.clone());
            }
            seen.push(key);
        }
    }
    assert!(seen.len() > 60, "only {} keys found: the probe is broken", seen.len());
    assert!(unknown.is_empty(), "keys neither live nor restart-only (or both): {unknown:?}");
    // And no entry names a key the file does not have.
    for k in LIVE.iter().copied().chain(RESTART.iter().map(|(k, _)| *k)) {
        let section = k.split('.').next().unwrap();
        assert!(
            k.ends_with(".*") && seen.iter().any(|s| s.starts_with(&format!("{section}.")))
                || seen.iter().any(|s| s == k),
            "{k} is not a key of the file"
        );
    }
}
