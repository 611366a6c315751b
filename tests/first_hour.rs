//! docs/first-hour.md, run as an admin pastes it: every `sh` block, in order,
//! in one root shell, on this machine's Postfix and the Debian package built
//! from this checkout, then the mail it sent is looked for where the page says
//! it lands.
//!
//! The sandbox: a private mount and network namespace (`unshare`), where
//! `/etc/postfix`, `/var/spool/postfix`, `/var/lib/postfix`, `/var/mail` and
//! `/srv` are this test's own directories and 127.0.0.1:25 is free, so the
//! page's paths and ports are used as written and nothing leaves the test.
//! The package itself is installed for real (`apt install ./…deb`) and purged
//! at the end. There is no systemd here: `systemctl` is a stand-in that runs
//! the installed unit's own `User=`, `ExecStartPre=`, `ExecStart=` and
//! `ExecReload=` lines. The encoder's files are put in place before the page
//! runs, so its fetch command finds them (fetch-model.sh itself is run by
//! scripts/test.sh). Blocks marked `sh systemd` run with the stand-in; the
//! `sh no-systemd` ones after it is stopped; other blocks are not run.

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The page's runnable blocks, in order, with their kind (`sh`, `sh systemd`, `sh no-systemd`).
fn blocks(markdown: &str) -> Vec<(String, String)> {
    markdown
        .split("```")
        .skip(1)
        .step_by(2)
        .filter_map(|b| {
            let (info, body) = b.split_once('\n')?;
            ["sh", "sh systemd", "sh no-systemd"]
                .contains(&info.trim())
                .then(|| (info.trim().to_string(), body.to_string()))
        })
        .collect()
}

/// A fresh Debian Postfix as `Local only` leaves it: no virtual domains, no
/// milters; smtpd on 127.0.0.1:25; chroot off (nothing is copied into the spool).
const MAIN_CF: &str = "compatibility_level = 3.6
myhostname = mx.example.net
mydomain = example.net
myorigin = $myhostname
mydestination = $myhostname, localhost
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_peername_lookup = no
alias_maps =
alias_database =
smtputf8_enable = no
default_transport = error:5.7.1 test: external delivery disabled
relay_transport = error:5.7.1 test: relay disabled
maillog_file = /var/log/postfix-sandbox.log
";

/// What runs before the page, in the namespace: the sandbox's mounts, the
/// model in place, Postfix started, and the `systemctl` stand-in.
const PRELUDE: &str = r#"set -euo pipefail
ip link set lo up
mount --bind "$SB/etc" /etc/postfix
mount --bind "$SB/spool" /var/spool/postfix
mount --bind "$SB/lib" /var/lib/postfix
mount --bind "$SB/mail" /var/mail
mkdir -p /srv && mount --bind "$SB/srv" /srv
mkdir -p "$SB/log/apt" && mount --bind "$SB/log" /var/log
postconf -F '*/*/chroot = n'
postfix start
trap 'set +e; pkill -TERM -u mailtriage -x mailtriage; postfix stop >/dev/null 2>&1; sleep 1' EXIT
mkdir -p /var/lib/mailtriage/models && cp -r "$MODEL" /var/lib/mailtriage/models/

UNIT=/lib/systemd/system/mailtriage.service
unit() { sed -n "s/^$1=//p" "$UNIT"; }
milter_up() { (exec 3<>/dev/tcp/127.0.0.1/8890) 2>/dev/null; }
wait_for() { local i; for i in $(seq 1200); do "$@" && return 0; sleep 0.1; done; echo "timed out: $*" >&2; return 1; }
reloads() { grep -c 'reloaded' /var/log/mailtriage-unit.log || true; }
reloaded_since() { [ "$(reloads)" -gt "$1" ]; }
# systemctl for the mailtriage unit: its commands, as its user, as systemd would run them.
systemctl() {
  local verb=$1; shift
  if [[ ${1-} == --now ]]; then
    shift
    if [[ $verb == enable ]]; then verb=start; fi
  fi
  case $verb in
    enable|daemon-reload) ;;
    start)
      local as=(setpriv --reuid="$(unit User)" --regid="$(unit Group)" --init-groups --)
      "${as[@]}" $(unit ExecStartPre)
      (cd "$(unit WorkingDirectory)" && umask "$(unit UMask)" && exec "${as[@]}" $(unit ExecStart)) \
        >>/var/log/mailtriage-unit.log 2>&1 &
      echo $! >"$SB/unit.pid"
      wait_for milter_up ;;
    reload)
      local before MAINPID; before=$(reloads); MAINPID=$(cat "$SB/unit.pid")
      eval "$(unit ExecReload)"
      wait_for reloaded_since "$before" ;;
    stop) kill -TERM "$(cat "$SB/unit.pid")"; wait_for bash -c '! kill -0 $(cat "$SB/unit.pid") 2>/dev/null' ;;
    is-active) kill -0 "$(cat "$SB/unit.pid")" && echo active ;;
    *) echo "systemctl stand-in: $verb not known" >&2; return 1 ;;
  esac
}
journalctl() { cat /var/log/mailtriage-unit.log; }
# "A moment later": Postfix has delivered what it took.
settle() {
  wait_for bash -c '[ -z "$(find /var/spool/postfix/incoming /var/spool/postfix/active /var/spool/postfix/maildrop -type f 2>/dev/null)" ]'
}
cd "$DEB_DIR"
"#;

#[test]
fn the_first_hour_page_works_as_pasted() {
    support::require("postfix", "postfix");
    support::require("swaks", "swaks");
    support::require("unshare", "util-linux");
    support::require_no_installed_package();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let page = std::fs::read_to_string(root.join("docs/first-hour.md")).unwrap();
    let blocks = blocks(&page);
    assert!(blocks.iter().filter(|(k, _)| k == "sh systemd").count() >= 2, "{blocks:#?}");
    assert!(blocks.iter().any(|(k, _)| k == "sh no-systemd"), "{blocks:#?}");

    let sb = tempfile::Builder::new().prefix("mt-first-hour.").tempdir_in("/tmp").unwrap();
    let sb_path = sb.path().to_owned();
    std::fs::set_permissions(&sb_path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let dir = |d: &str| -> PathBuf {
        let p = sb_path.join(d);
        std::fs::create_dir_all(&p).unwrap();
        p
    };
    let (etc, deb_dir) = (dir("etc"), dir("deb"));
    for d in ["spool", "mail", "log", "srv"] {
        dir(d);
    }
    let lib = dir("lib");
    Command::new("chown").arg("postfix:postfix").arg(&lib).status().unwrap();
    // Debian's /etc/postfix as installed (master.cf, postfix-files…), our main.cf.
    let copied = Command::new("cp").arg("-a").arg("/etc/postfix/.").arg(&etc).status().unwrap();
    assert!(copied.success());
    std::fs::write(etc.join("main.cf"), MAIN_CF).unwrap();
    archive(&dir("srv/triage-archive"), &root.join("tests/fixtures/tickets-train.jsonl"));

    let deb = support::build_deb(&deb_dir);
    assert!(deb.ends_with("mailtriage_0.1.0_amd64.deb"), "the page installs mailtriage_0.1.0_amd64.deb, not {deb:?}");

    // The page, block by block, "a moment later" between blocks; the
    // stand-in daemon stops before the first block without systemd.
    let mut script = String::from(PRELUDE);
    let mut systemd_stopped = false;
    for (i, (kind, body)) in blocks.iter().enumerate() {
        if kind == "sh no-systemd" && !systemd_stopped {
            script.push_str("systemctl stop mailtriage\n");
            systemd_stopped = true;
        }
        script.push_str(&format!("echo '>>> block {i} ({kind})' >&2\n{body}\nsettle\n"));
        if kind == "sh no-systemd" && body.contains(" serve ") {
            script.push_str("wait_for milter_up\n");
        }
    }
    let out = Command::new("unshare")
        .args(["--mount", "--net", "--fork", "bash", "-c", &script])
        .env("SB", &sb_path)
        .env("DEB_DIR", &deb_dir)
        .env("MODEL", root.join("models/all-MiniLM-L6-v2"))
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap();
    let said = format!(
        "{}{}\n--- postfix log:\n{}\n--- mailtriage log (systemd stand-in):\n{}\n--- mailtriage log (without systemd):\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        read(&sb_path.join("log/postfix-sandbox.log")),
        read(&sb_path.join("log/mailtriage-unit.log")),
        read(&sb_path.join("log/mailtriage.log")),
    );
    let checked = std::panic::catch_unwind(|| {
        assert!(out.status.success(), "a block of docs/first-hour.md failed:\n{said}");
        let mailbox = |name: &str| -> Vec<String> {
            std::fs::read_dir(sb_path.join("mail/triage-test").join(name).join("new"))
                .map(|rd| rd.flatten().map(|e| read(&e.path())).collect())
                .unwrap_or_default()
        };
        let (info, billing, support) = (mailbox("info"), mailbox("billing"), mailbox("support"));
        // Shadow: the invoice stayed with info, with what enforce would do.
        let shadow = info.iter().find(|m| m.contains("Subject: Invoice 4711")).unwrap_or_else(|| panic!("{said}"));
        assert_eq!(support::header_values(shadow, "X-Triage-Mode"), ["shadow"]);
        assert_eq!(support::header_values(shadow, "X-Triage-Action"), ["reroute"]);
        assert_eq!(support::header_values(shadow, "X-Triage-Department"), ["billing"]);
        // Enforce: rerouted to billing, and only there.
        let refund =
            billing.iter().find(|m| m.contains("Subject: Refund for order 815")).unwrap_or_else(|| panic!("{said}"));
        assert_eq!(support::header_values(refund, "X-Triage-Original-Recipient"), ["info@example.com"]);
        assert!(!info.iter().any(|m| m.contains("Refund for order 815")), "rerouted mail reached info too");
        // The trained head decided what no rule did.
        let head = support.iter().find(|m| m.contains("Passwort-Reset")).unwrap_or_else(|| panic!("{said}"));
        let source = support::header_values(head, "X-Triage-Source");
        assert!(source.len() == 1 && source[0].starts_with("model:"), "{source:?}");
        // Without systemd: the hand-started daemon rerouted too.
        assert!(billing.iter().any(|m| m.contains("Second invoice reminder")), "{said}");
        // What root's commands left in the state directory is the service's.
        let svc = mailtriage::access::user_by_name("mailtriage").unwrap().expect("the package's user");
        for f in ["audit.key", "audit.jsonl", "models/heads", "models/heads/department.safetensors"] {
            let m = std::fs::metadata(Path::new("/var/lib/mailtriage").join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert_eq!(m.uid(), svc.uid, "/var/lib/mailtriage/{f} is not the service user's");
        }
    });
    let purge = Command::new("dpkg").args(["--purge", "mailtriage"]).output().unwrap();
    assert!(purge.status.success(), "{}", String::from_utf8_lossy(&purge.stderr));
    if let Err(panic) = checked {
        std::panic::resume_unwind(panic);
    }
}

fn read(p: &Path) -> String {
    std::fs::read(p).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
}

/// `/srv/triage-archive/<department>/NNN.eml` from the labeled fixture: the
/// "few dozen messages per department" the page trains on.
fn archive(dir: &Path, jsonl: &Path) {
    for (i, line) in read(jsonl).lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let department = v["department"].as_str().unwrap();
        let folder = dir.join(department);
        std::fs::create_dir_all(&folder).unwrap();
        let message = format!(
            "From: customer{i}@client.example\r\nTo: info@example.com\r\nSubject: {}\r\n\
             Content-Type: text/plain; charset=utf-8\r\n\r\n{}\r\n",
            v["subject"].as_str().unwrap(),
            v["body"].as_str().unwrap()
        );
        std::fs::write(folder.join(format!("{i:03}.eml")), message).unwrap();
    }
}
