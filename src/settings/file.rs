//! The settings file's root, [`Config`]: one TOML file plus `MAILTRIAGE__SECTION__KEY`
//! environment overrides, typed by serde, then checked whole (`check.rs`)
//! and turned into the department catalog (`catalog.rs`) before anything
//! starts.
//!
//! Unknown keys are errors (a misspelt `mdoe = "shadow"` must not silently
//! leave a filter in enforce mode), and every error names the file, the key
//! and, for TOML syntax or type errors, the line and column.
//!
//! We parse with `toml` directly rather than through the `config` crate: its
//! errors carry the span of the offending key, which the `config` crate's
//! merged-source model loses.

use std::path::PathBuf;

use serde::Deserialize;

use super::feedback::FeedbackConfig;
use super::model::ModelConfig;
use super::observe::{AuditConfig, KpiConfig, LoggingConfig, MetricsConfig};
use super::relay::RelayConfig;
use super::routing::{DefaultsConfig, DepartmentConfig, PolicyConfig, RuleConfig, ScopeConfig};
use super::section::{optional_changes, Apply, Section};
use super::server::{LimitsConfig, ServerConfig};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub limits: LimitsConfig,
    pub defaults: DefaultsConfig,
    pub departments: Vec<DepartmentConfig>,
    pub scope: ScopeConfig,
    pub rules: Vec<RuleConfig>,
    pub model: Option<ModelConfig>,
    pub policy: PolicyConfig,
    pub audit: Option<AuditConfig>,
    pub metrics: Option<MetricsConfig>,
    pub relay: Option<RelayConfig>,
    pub feedback: Option<FeedbackConfig>,
    pub kpi: KpiConfig,
    pub logging: LoggingConfig,
    /// Where this configuration came from (for messages), not a key.
    #[serde(skip)]
    pub source: Option<PathBuf>,
    /// First 12 hex digits of the SHA-256 of the file: names this exact
    /// configuration in the audit trail and logs.
    #[serde(skip)]
    pub version: String,
    /// The departments and priorities as typed ids, built once the file
    /// is valid (the second stage of the settings).
    #[serde(skip)]
    pub catalog: super::Catalog,
}

impl Config {
    /// Every key of the file as `section.key`, with how a reload applies it.
    pub fn keys() -> Vec<(&'static str, Apply)> {
        [
            ServerConfig::keys(),
            LimitsConfig::keys(),
            DefaultsConfig::keys(),
            DepartmentConfig::keys(),
            ScopeConfig::keys(),
            RuleConfig::keys(),
            ModelConfig::keys(),
            PolicyConfig::keys(),
            AuditConfig::keys(),
            MetricsConfig::keys(),
            RelayConfig::keys(),
            FeedbackConfig::keys(),
            KpiConfig::keys(),
            LoggingConfig::keys(),
        ]
        .concat()
    }

    /// How a reload applies `section.key`; `None` for a key the file does not have.
    pub fn apply_of(key: &str) -> Option<Apply> {
        Config::keys().into_iter().find(|(k, _)| *k == key).map(|(_, a)| a)
    }

    /// The restart-only keys whose value differs between this (running)
    /// configuration and `new`, in the file's order.
    pub fn restart_needed(&self, new: &Config) -> Vec<&'static str> {
        [
            self.server.restart_changes(&new.server, false),
            self.limits.restart_changes(&new.limits, false),
            optional_changes(self.model.as_ref(), new.model.as_ref()),
            optional_changes(self.audit.as_ref(), new.audit.as_ref()),
            optional_changes(self.metrics.as_ref(), new.metrics.as_ref()),
            optional_changes(self.relay.as_ref(), new.relay.as_ref()),
            optional_changes(self.feedback.as_ref(), new.feedback.as_ref()),
            self.logging.restart_changes(&new.logging, false),
        ]
        .concat()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use std::time::Duration;

    use super::super::load::{mask_secrets, ConfigError, Problem};
    use super::super::*;

    #[test]
    fn secrets_are_masked_in_what_config_show_prints() {
        let mut t: toml::Table =
            "[feedback]\nstore = \"postgres://u:pw@h/d\"\nhttp_token_file = \"/etc/t\"\n[x]\napi_token = \"abc\"\n"
                .parse()
                .unwrap();
        mask_secrets(&mut t);
        assert_eq!(t["feedback"]["store"].as_str(), Some("postgres://u:****@h/d"));
        assert_eq!(t["feedback"]["http_token_file"].as_str(), Some("/etc/t"), "a path is not a secret");
        assert_eq!(t["x"]["api_token"].as_str(), Some("****"));
    }

    const GOOD: &str = r#"
[server]
milter = "inet:127.0.0.1:8890"
mode = "shadow"
decision_timeout = "5s"

[defaults]
department = "general"
priority = "medium"

[[departments]]
name = "billing"
mailbox = "billing@example.com"
action = "reroute"
description = "Invoices"

[[rules]]
name = "invoices"
header = "Subject"
pattern = "(?i)\\binvoice\\b"
department = "billing"
priority = "high"
"#;

    #[test]
    fn good_config_loads() {
        let c = Config::from_toml(GOOD, "test.toml").unwrap();
        assert_eq!(c.server.mode, Mode::Shadow);
        assert_eq!(c.server.decision_timeout, Duration::from_secs(5));
        assert_eq!(c.rules[0].priority.as_deref(), Some("high"));
        assert_eq!(c.catalog.department("billing").unwrap().action, Action::Reroute);
    }

    #[test]
    fn shipped_default_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/mailtriage.toml");
        Config::load(&path).unwrap();
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = Config::from_toml("[server]\nmdoe = \"shadow\"\n", "x.toml").unwrap_err().to_string();
        assert!(err.contains("mdoe") && err.contains("line 2"), "{err}");
        let err = Config::from_toml("[sever]\n", "x.toml").unwrap_err().to_string();
        assert!(err.contains("sever"), "{err}");
    }

    fn problems(text: &str, env: &[(&str, &str)]) -> Vec<Problem> {
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        match Config::from_toml_with_env(text, "x.toml", &env) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn every_unknown_key_and_bad_type_is_named_in_one_run_with_its_line() {
        let text = "[server]\nmdoe = \"shadow\"\nmax_connections = \"many\"\n\n[limits]\nmax_framebytes = 5\n\n\
                    [sever]\nx = 1\n\n[[departments]]\nname = \"a\"\nmailbx = \"a@b.example\"\n";
        let found = problems(text, &[]);
        let keys: Vec<(&str, Option<usize>)> = found.iter().map(|p| (p.key.as_str(), p.line)).collect();
        assert_eq!(
            keys,
            [
                ("server.mdoe", Some(2)),
                ("server.max_connections", Some(3)),
                ("limits.max_framebytes", Some(6)),
                ("sever", Some(8)),
                ("departments[0] (a).mailbx", Some(13)),
            ],
            "{found:#?}"
        );
        assert!(found[0].message.contains("unknown field `mdoe`"), "{found:#?}");
        assert_eq!(found[0].located("x.toml").split(": ").next(), Some("x.toml, line 2"));
    }

    #[test]
    fn a_missing_required_key_is_named_beside_the_typos() {
        let text = "[server]  # the front doors\nmdoe = \"shadow\"  # a typo\n[audit]\npath = \"a.jsonl\"\n\
                    [[departments]]\nmailbox = \"x@y.example\"\nactoin = \"tag\"\n";
        let found = problems(text, &[]);
        let keys: Vec<(&str, Option<usize>)> = found.iter().map(|p| (p.key.as_str(), p.line)).collect();
        assert_eq!(
            keys,
            [
                ("server.mdoe", Some(2)),
                ("audit", Some(3)),
                ("departments[0]", Some(5)),
                ("departments[0].actoin", Some(7))
            ],
            "{found:#?}"
        );
        assert!(found[1].message.contains("missing field `key_file`"), "{found:#?}");
        assert!(found[2].message.contains("missing field `name`"), "{found:#?}");
    }

    #[test]
    fn a_problem_set_by_the_environment_names_the_variable_not_the_file() {
        let found = problems("[server]\nmode = \"shadow\"\n", &[("MAILTRIAGE__SERVER__MODEE", "enforce")]);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].env.as_deref(), Some("MAILTRIAGE__SERVER__MODEE"));
        let said = found[0].located("x.toml");
        assert!(said.starts_with("environment variable MAILTRIAGE__SERVER__MODEE (`server.modee`)"), "{said}");
        assert!(!said.contains("x.toml"), "{said}");
        // A value that validation refuses is blamed on its variable too.
        let found = problems("[server]\nmode = \"shadow\"\n", &[("MAILTRIAGE__SERVER__MODE", "loud")]);
        assert_eq!(found[0].env.as_deref(), Some("MAILTRIAGE__SERVER__MODE"), "{found:#?}");
        // The file's own problems stay the file's.
        let found = problems("[server]\nmdoe = 1\n", &[("MAILTRIAGE__SERVER__MODE", "shadow")]);
        assert_eq!((found[0].key.as_str(), found[0].env.as_deref()), ("server.mdoe", None));
    }

    #[test]
    fn relative_paths_are_taken_from_the_configuration_files_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mailtriage.toml");
        std::fs::write(
            &file,
            "[model]\npath = \"../models/m\"\ndepartment_head = \"/abs/d.safetensors\"\n\
             priority_head = \"heads/p.safetensors\"\n[feedback]\nstore = \"sqlite://fb.db\"\n\
             [audit]\npath = \"audit.jsonl\"\nkey_file = \"keys/audit.key\"\n",
        )
        .unwrap();
        let cfg = Config::load(&file).unwrap();
        let m = cfg.model.as_ref().unwrap();
        assert_eq!(m.path.as_deref(), Some(dir.path().join("../models/m").as_path()));
        assert_eq!(m.department_head.as_deref(), Some(Path::new("/abs/d.safetensors")));
        assert_eq!(m.priority_head.as_deref(), Some(dir.path().join("heads/p.safetensors").as_path()));
        let f = cfg.feedback.as_ref().unwrap();
        assert_eq!(f.store, format!("sqlite://{}", dir.path().join("fb.db").display()));
        assert_eq!(f.heads_dir, Path::new("/var/lib/mailtriage/heads"), "an absolute default stays");
        assert_eq!(cfg.audit.as_ref().unwrap().key_file, dir.path().join("keys/audit.key"));
    }

    #[test]
    fn bad_regex_names_the_rule() {
        let bad = GOOD.replace(r#"(?i)\\binvoice\\b"#, "(unclosed");
        let err = Config::from_toml(&bad, "x.toml").unwrap_err().to_string();
        assert!(err.contains("rules[0] (invoices).pattern") && err.contains("regular expression"), "{err}");
    }

    #[test]
    fn dangling_references_are_named() {
        let bad = GOOD.replace("department = \"billing\"", "department = \"biling\"");
        let err = Config::from_toml(&bad, "x.toml").unwrap_err().to_string();
        assert!(err.contains("rules[0] (invoices).department") && err.contains("biling"), "{err}");
        let bad = GOOD.replace("priority = \"high\"", "priority = \"urgent\"");
        let err = Config::from_toml(&bad, "x.toml").unwrap_err().to_string();
        assert!(err.contains("priority") && err.contains("urgent"), "{err}");
        let bad = GOOD.replace("mailbox = \"billing@example.com\"\n", "");
        let err = Config::from_toml(&bad, "x.toml").unwrap_err().to_string();
        assert!(err.contains("departments[0] (billing).mailbox") && err.contains("reroute"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        for (text, needle) in [
            ("[server]\nmilter = \"tcp:1.2.3.4\"\n", "inet:HOST:PORT"),
            ("[server]\nmilter = \"inet:127.0.0.1:99999\"\n", "port number"),
            ("[server]\nmode = \"loud\"\n", "loud"),
            ("[server]\ndecision_timeout = \"5 fortnights\"\n", "unit"),
            ("[server]\nmilter_socket_mode = \"999\"\n", "octal"),
            ("[limits]\nmax_frame_bytes = 100\n", "limits.max_frame_bytes"),
            ("[[departments]]\nname = \"a b\"\n", "departments[0] (a b).name"),
            ("[[departments]]\nname = \"x\"\nmailbox = \"not-an-address\"\n", "mailbox"),
            ("[logging]\nlevel = \"=== nope\"\n", "logging.level"),
        ] {
            let err = Config::from_toml(text, "x.toml").unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn every_problem_in_a_file_is_reported_at_once() {
        let text = "[server]\ndecision_timeout = \"0s\"\nrequire_tls = true\n\
                    [policy]\nreview_below = 2.0\n\
                    [[departments]]\nname = \"billing\"\naction = \"reroute\"\n\
                    [[rules]]\nname = \"r\"\nheader = \"Subject\"\npattern = \"(\"\ndepartment = \"nobody\"\n";
        let err = Config::from_toml(text, "x.toml").unwrap_err();
        let ConfigError::Invalid { problems, .. } = &err else { panic!("{err}") };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for want in [
            "server.decision_timeout",
            "server.require_tls",
            "policy.review_below",
            "departments[0] (billing).mailbox",
            "rules[0] (r).pattern",
            "rules[0] (r).department",
        ] {
            assert!(keys.contains(&want), "{want} missing from {keys:?}");
        }
        // One entry per problem, each naming the file and the key (a regex
        // error explains itself over several lines).
        let text = err.to_string();
        let entries = text.lines().filter(|l| l.starts_with("x.toml") && l.contains(": `")).count();
        assert_eq!(entries, problems.len(), "{text}");
    }

    #[test]
    fn a_rule_pattern_is_compiled_once_by_validation() {
        let c = Config::from_toml(
            "[[departments]]\nname = \"b\"\n[[rules]]\nname = \"r\"\nheader = \"Subject\"\npattern = \"x+\"\ndepartment = \"b\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.rules[0].compiled.get().map(|r| r.as_str()), Some("x+"));
    }

    #[test]
    fn smtp_front_door_settings() {
        let c = Config::from_toml(
            "[server]\nsmtp = \"127.0.0.1:10025\"\nlmtp = \"unix:/run/mt/lmtp\"\n\
             [relay]\nnext_hop = \"lmtp://127.0.0.1:24\"\n",
            "x.toml",
        )
        .unwrap();
        assert_eq!(c.server.smtp, Some(ListenAddress::Inet("127.0.0.1:10025".into())));
        assert_eq!(c.server.lmtp, Some(ListenAddress::Unix("/run/mt/lmtp".into())));
        assert_eq!(c.server.milter_listen(), None, "only SMTP/LMTP configured: no milter");
        let hop = &c.relay.as_ref().unwrap().next_hop;
        assert_eq!(hop.protocol, HopProtocol::Lmtp);
        assert_eq!(hop.to_string(), "lmtp://127.0.0.1:24");
        assert_eq!(
            "smtp:unix:/var/spool/postfix/private/in".parse::<NextHop>().unwrap().address,
            ListenAddress::Unix("/var/spool/postfix/private/in".into())
        );
        assert_eq!(Config::default().server.milter_listen().unwrap().to_string(), DEFAULT_MILTER);
        let loopback = &Config::default().server.xforward_hosts;
        assert!(["127.0.0.1", "::1"].iter().all(|ip| loopback.iter().any(|n| n.contains(ip.parse().unwrap()))));
        assert!(!loopback.iter().any(|n| n.contains("192.0.2.1".parse().unwrap())));
        for (text, needle) in [
            ("[server]\nsmtp = \"127.0.0.1:10025\"\n", "relay.next_hop"),
            ("[relay]\nnext_hop = \"http://x:1\"\n", "smtp://HOST:PORT"),
            ("[server]\ntls_cert = \"/c.pem\"\n", "server.tls_key"),
            ("[server]\nrequire_tls = true\n", "server.require_tls"),
            ("[server]\nxforward_hosts = [\"10.0.0.0/40\"]\n", "`10.0.0.0/40`: bad prefix length"),
            ("[server]\nxforward_hosts = [\"mx.example\"]\n", "`mx.example`: not an IP address"),
            (
                "[server]\nsmtp = \"127.0.0.1:1\"\n[relay]\nnext_hop = \"smtp://127.0.0.1:2\"\n\
                 [[departments]]\nname = \"sec\"\naction = \"quarantine\"\n",
                "relay.quarantine_mailbox",
            ),
        ] {
            let err = Config::from_toml(text, "x.toml").unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn listen_addresses() {
        assert_eq!("inet:127.0.0.1:8890".parse(), Ok(ListenAddress::Inet("127.0.0.1:8890".into())));
        assert_eq!("inet:8890@localhost".parse(), Ok(ListenAddress::Inet("localhost:8890".into())));
        assert_eq!("unix:/run/m.sock".parse(), Ok(ListenAddress::Unix("/run/m.sock".into())));
        assert!("unix:relative.sock".parse::<ListenAddress>().is_err());
    }

    #[test]
    fn env_overrides_apply_and_are_checked() {
        let env = vec![("MAILTRIAGE__SERVER__MODE".to_string(), "enforce".to_string())];
        let c = Config::from_toml_with_env(GOOD, "x.toml", &env).unwrap();
        assert_eq!(c.server.mode, Mode::Enforce);
        let env = vec![("MAILTRIAGE__LIMITS__MAX_HEADERS".to_string(), "7".to_string())];
        assert_eq!(Config::from_toml_with_env(GOOD, "x.toml", &env).unwrap().limits.max_headers, 7);
        let env = vec![("MAILTRIAGE__SERVER__BOGUS".to_string(), "1".to_string())];
        assert!(Config::from_toml_with_env(GOOD, "x.toml", &env).unwrap_err().to_string().contains("bogus"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("-1s").is_err());
        assert_eq!(parse_duration("3d").unwrap(), Duration::from_secs(3 * 86_400));
        let e = parse_duration("99999999999999999999999h").unwrap_err();
        assert!(e.contains("too long"), "{e}");
    }
}
