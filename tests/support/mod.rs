//! Real peers for black-box tests, all on loopback: a private Postfix
//! instance delivering into Maildirs, the mailtriage daemon as a child
//! process, and a small SMTP client.
//!
//! The Postfix setup follows ../shared/bench/mailstack.sh: its own config,
//! queue and data directories under a temp dir; nothing can leave the machine
//! (every non-local transport is `error:`); `<local>@test.example` is a
//! Maildir under `mail/<local>/`, unknown local parts land in `other/`.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const DOMAIN: &str = "test.example";
const MAILBOXES: &[&str] =
    &["user", "billing", "support", "sales", "security", "hr", "general", "postmaster", "bench", "info", "ceo"];

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Fails the test with instructions when a peer is missing: these tests must
/// run (CI installs the peers), so they never skip silently.
pub fn require(tool: &str, package: &str) {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists())).unwrap_or(false)
            || Path::new("/usr/sbin").join(tool).exists();
    assert!(found, "`{tool}` not found: install the Debian package `{package}` (scripts/test.sh does this)");
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc_geteuid() }, 0, "Postfix tests must run as root (master and virtual(8) switch users)");
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// Postfix with `maillog_file` logs through postlogd's datagram socket, and
/// postlogd sends its own messages to that same socket: once more than
/// `net.unix.max_dgram_qlen` datagrams wait there (10 by default, a burst at
/// start-up can do it), postlogd blocks sending to itself, and every Postfix
/// command that logs (`postfix reload`, `postfix stop`) blocks behind it
/// forever (seen once in a local `.ci/run`). A longer queue makes that
/// burst harmless; where the setting cannot be raised, the tests run as
/// before.
fn roomy_log_socket() {
    const QLEN: &str = "/proc/sys/net/unix/max_dgram_qlen";
    let current = std::fs::read_to_string(QLEN).ok().and_then(|v| v.trim().parse::<u32>().ok());
    if current.is_some_and(|q| q < 512) {
        let _ = std::fs::write(QLEN, "512");
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

/// A private Postfix instance.
pub struct Postfix {
    pub dir: tempfile::TempDir,
    pub smtp_port: u16,
    conf: PathBuf,
}

impl Postfix {
    /// Starts Postfix on a free port with `smtpd_milters = milter` (if any)
    /// and the given `milter_default_action`; `extra` are more main.cf lines.
    pub fn start(milter: Option<&str>, default_action: &str, extra: &[&str]) -> Postfix {
        require("postfix", "postfix");
        roomy_log_socket();
        let dir = tempfile::Builder::new().prefix("mt-postfix.").tempdir_in("/tmp").unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let root = dir.path();
        let (conf, queue, data, mail) = (root.join("etc"), root.join("spool"), root.join("data"), root.join("mail"));
        for d in [&conf, &queue, &data, &mail] {
            std::fs::create_dir_all(d).unwrap();
        }
        run(Command::new("chown").arg("postfix:postfix").arg(&data));
        run(Command::new("chown").arg("65534:65534").arg(&mail));
        std::fs::copy("/etc/postfix/master.cf", conf.join("master.cf")).unwrap();
        let _ = std::fs::copy("/etc/postfix/dynamicmaps.cf", conf.join("dynamicmaps.cf"));
        let mut vmailbox: String = MAILBOXES.iter().map(|m| format!("{m}@{DOMAIN}\t{m}/\n")).collect();
        vmailbox.push_str(&format!("@{DOMAIN}\tother/\n"));
        std::fs::write(conf.join("vmailbox"), vmailbox).unwrap();
        let smtp_port = free_port();
        let main_cf = format!(
            "compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
myhostname = mx.{DOMAIN}
mydomain = {DOMAIN}
myorigin = {DOMAIN}
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_peername_lookup = no
biff = no
append_dot_mydomain = no
alias_maps =
alias_database =
smtputf8_enable = no
default_transport = error:5.7.1 test: external delivery disabled
relay_transport = error:5.7.1 test: relay disabled
local_transport = error:5.7.1 test: local delivery disabled
relay_domains =
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_base = {mail}
virtual_mailbox_maps = texthash:{conf}/vmailbox
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
smtpd_milters = {milters}
non_smtpd_milters =
milter_protocol = 6
milter_default_action = {default_action}
milter_connect_timeout = 5s
milter_command_timeout = 10s
milter_content_timeout = 30s
{extra}
",
            queue = queue.display(),
            data = data.display(),
            root = root.display(),
            mail = mail.display(),
            conf = conf.display(),
            milters = milter.unwrap_or(""),
            extra = extra.join("\n"),
        );
        std::fs::write(conf.join("main.cf"), main_cf).unwrap();
        let postconf = |args: &[&str]| run(Command::new("postconf").arg("-c").arg(&conf).args(args));
        postconf(&["-F", "*/*/chroot = n"]);
        for svc in ["smtp/inet", "submission/inet", "smtps/inet"] {
            let _ = Command::new("postconf").arg("-c").arg(&conf).args(["-MX", svc]).output();
        }
        postconf(&["-M", &format!("127.0.0.1:{smtp_port}/inet = 127.0.0.1:{smtp_port} inet n - n - - smtpd")]);
        run(Command::new("postfix").arg("-c").arg(&conf).arg("check"));
        run(Command::new("postfix").arg("-c").arg(&conf).arg("start").stdin(Stdio::null()));
        let pf = Postfix { dir, smtp_port, conf };
        assert!(wait_for_port(smtp_port, Duration::from_secs(30)), "postfix smtpd not listening; log:\n{}", pf.log());
        pf
    }

    /// Runs `postconf -c <our conf> ARGS…` (e.g. `-M` and `-P` to add a master.cf service).
    pub fn postconf(&self, args: &[&str]) {
        run(Command::new("postconf").arg("-c").arg(&self.conf).args(args));
    }

    /// `postfix check`: the configuration is sound.
    pub fn check(&self) {
        run(Command::new("postfix").arg("-c").arg(&self.conf).arg("check"));
    }

    /// `postfix reload`, after which new master.cf services listen.
    pub fn reload(&self) {
        run(Command::new("postfix").arg("-c").arg(&self.conf).arg("reload"));
    }

    /// `postqueue -f`: retry deferred mail now.
    pub fn flush(&self) {
        run(Command::new("postqueue").arg("-c").arg(&self.conf).arg("-f"));
    }

    /// Adds an smtpd listener on a free port that takes mail back from a
    /// content filter: no filter, no milter, no header checks on it.
    pub fn add_reinjection_listener(&self, port: u16) {
        let svc = format!("127.0.0.1:{port}/inet");
        self.postconf(&["-M", &format!("{svc} = 127.0.0.1:{port} inet n - n - 10 smtpd")]);
        self.postconf(&[
            "-P",
            &format!("{svc}/content_filter="),
            &format!("{svc}/smtpd_milters="),
            &format!("{svc}/receive_override_options=no_unknown_recipient_checks,no_header_body_checks,no_milters"),
            &format!("{svc}/syslog_name=postfix-reinject"),
            &format!("{svc}/smtpd_authorized_xforward_hosts=127.0.0.0/8"),
        ]);
    }

    /// Adds a second smtpd listener on `port` that Postfix names `submission`
    /// to milters (`{daemon_name}`), offering SMTP AUTH through Dovecot's
    /// SASL socket at `sasl_path` (plaintext: loopback only) and relaying only
    /// for authenticated clients.
    pub fn add_submission_listener(&self, port: u16, sasl_path: &Path) {
        let svc = format!("127.0.0.1:{port}/inet");
        self.postconf(&["-M", &format!("{svc} = 127.0.0.1:{port} inet n - n - - smtpd")]);
        self.postconf(&[
            "-P",
            &format!("{svc}/syslog_name=postfix/submission"),
            &format!("{svc}/smtpd_tls_security_level=none"),
            &format!("{svc}/smtpd_sasl_auth_enable=yes"),
            &format!("{svc}/smtpd_sasl_type=dovecot"),
            &format!("{svc}/smtpd_sasl_path={}", sasl_path.display()),
            &format!("{svc}/smtpd_sasl_security_options=noanonymous"),
            &format!("{svc}/smtpd_client_restrictions=permit_sasl_authenticated,reject"),
            &format!("{svc}/smtpd_recipient_restrictions=permit_sasl_authenticated,reject"),
            &format!("{svc}/smtpd_relay_restrictions=permit_sasl_authenticated,reject"),
            &format!("{svc}/milter_macro_daemon_name=submission"),
        ]);
    }

    /// Adds the `scan` transport (an smtp client) that `content_filter = scan:[127.0.0.1]:PORT` uses.
    pub fn add_scan_transport(&self) {
        self.postconf(&["-M", "scan/unix = scan unix - - n - 10 smtp"]);
        self.postconf(&[
            "-P",
            "scan/unix/disable_mime_output_conversion=yes",
            "scan/unix/smtp_dns_support_level=disabled",
            "scan/unix/smtp_send_xforward_command=yes",
        ]);
    }

    pub fn mail_dir(&self) -> PathBuf {
        self.dir.path().join("mail")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    /// Messages delivered to a mailbox (`new/` and `cur/`), as text.
    pub fn mailbox(&self, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        for sub in ["new", "cur"] {
            if let Ok(rd) = std::fs::read_dir(self.mail_dir().join(name).join(sub)) {
                for e in rd.flatten() {
                    out.push(String::from_utf8_lossy(&std::fs::read(e.path()).unwrap()).into_owned());
                }
            }
        }
        out
    }

    /// Every delivered message, with the mailbox it landed in.
    pub fn all_delivered(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.mail_dir()) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                out.extend(self.mailbox(&name).into_iter().map(|m| (name.clone(), m)));
            }
        }
        out
    }

    /// Files in a queue directory (`hold`, `deferred`, `active`, `incoming`).
    pub fn queue_count(&self, queue: &str) -> usize {
        fn count(p: &Path) -> usize {
            std::fs::read_dir(p)
                .map(|rd| rd.flatten().map(|e| if e.path().is_dir() { count(&e.path()) } else { 1 }).sum())
                .unwrap_or(0)
        }
        count(&self.dir.path().join("spool").join(queue))
    }

    /// Waits until `n` messages are delivered (or the timeout passes), and the
    /// queue has drained. Returns what was delivered.
    /// Waits until at least `n` messages are delivered, busy queue or not
    /// (for acting while mail still flows).
    pub fn wait_at_least(&self, n: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.all_delivered().len();
            if got >= n || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until at least `n` messages are delivered and the queue is idle.
    pub fn wait_delivered(&self, n: usize, timeout: Duration) -> Vec<(String, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.all_delivered();
            let busy = self.queue_count("incoming") + self.queue_count("active");
            if (got.len() >= n && busy == 0) || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new("postfix").arg("-c").arg(&self.conf).arg("stop").output();
        // master exits after its children; wait a bounded time so the temp dir can go.
        let pid_file = self.dir.path().join("spool/pid/master.pid");
        let pid = std::fs::read_to_string(pid_file).ok().and_then(|s| s.trim().parse::<u32>().ok());
        if let Some(pid) = pid {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).output();
        }
        if std::env::var_os("MAILTRIAGE_KEEP_TEST_DIRS").is_some() {
            let path = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap()).keep();
            eprintln!("kept postfix dir {}", path.display());
        }
    }
}

/// A private Dovecot serving LMTP (or IMAP) on a free port, delivering into
/// Maildirs under `mail/<user>/`, and knowing only `users` (others are
/// refused at RCPT).
pub struct Dovecot {
    pub dir: tempfile::TempDir,
    pub port: u16,
}

impl Dovecot {
    pub fn start(users: &[&str]) -> Dovecot {
        Dovecot::start_with(users, "lmtp", "", |_| {})
    }

    /// Dovecot as Postfix's SASL server only: `users` log in with the
    /// password `secret` through the socket at [`Dovecot::sasl_path`]. Drop
    /// it after the Postfix that uses it (declare it first): smtpd holds the
    /// auth process open.
    pub fn start_sasl(users: &[&str]) -> Dovecot {
        Dovecot::start_with(users, "sasl", "", |_| {})
    }

    /// The SASL socket of a [`Dovecot::start_sasl`] instance.
    pub fn sasl_path(&self) -> PathBuf {
        self.dir.path().join("auth-postfix")
    }

    /// Dovecot with `protocol` (`lmtp`, `imap`, or `sasl` for authentication
    /// only) on the port, `extra` appended to its config, and
    /// `prepare(config file)` run before it starts.
    pub fn start_with(users: &[&str], protocol: &str, extra: &str, prepare: impl FnOnce(&Path)) -> Dovecot {
        require("dovecot", "dovecot-core and dovecot-lmtpd");
        let dir = tempfile::Builder::new().prefix("mt-dovecot.").tempdir_in("/tmp").unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let root = dir.path();
        for d in ["run", "state", "mail"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        run(Command::new("chown").arg("65534:65534").arg(root.join("mail")));
        let mail = root.join("mail");
        let passwd: String = users.iter().map(|u| format!("{u}::65534:65534::{}/{u}\n", mail.display())).collect();
        std::fs::write(root.join("users"), passwd).unwrap();
        let secrets: String = users.iter().map(|u| format!("{u}:{{PLAIN}}secret::::::\n")).collect();
        std::fs::write(root.join("passwords"), secrets).unwrap();
        let port = free_port();
        let mut passdb = "driver = static\n  args = nopassword=y".to_string();
        let mut protocols = protocol;
        let service = match protocol {
            "lmtp" => format!(
                "service lmtp {{\n  inet_listener lmtp {{\n    address = 127.0.0.1\n    port = {port}\n  }}\n}}\n\
                 protocol lmtp {{\n  postmaster_address = postmaster@{DOMAIN}\n}}\n"
            ),
            "imap" => format!(
                "disable_plaintext_auth = no\n\
                 service imap-login {{\n  inet_listener imap {{\n    address = 127.0.0.1\n    port = {port}\n  }}\n}}\n"
            ),
            "sasl" => {
                protocols = "none";
                passdb = format!("driver = passwd-file\n  args = scheme=PLAIN {}/passwords", root.display());
                format!(
                    "service auth {{\n  unix_listener {}/auth-postfix {{\n    mode = 0666\n  }}\n}}\n",
                    root.display()
                )
            }
            other => panic!("no test setup for Dovecot protocol {other}"),
        };
        let conf = format!(
            "base_dir = {root}/run
state_dir = {root}/state
instance_name = mt-dovecot-{port}
protocols = {protocols}
listen = 127.0.0.1
log_path = {root}/dovecot.log
ssl = no
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = 100
mail_location = maildir:{mail}/%n
auth_username_format = %Ln
userdb {{
  driver = passwd-file
  args = {root}/users
}}
passdb {{
  {passdb}
}}
{service}{extra}
",
            root = root.display(),
            mail = mail.display(),
        );
        std::fs::write(root.join("dovecot.conf"), conf).unwrap();
        prepare(&root.join("dovecot.conf"));
        // Not `output()`: the daemon keeps the inherited pipes open.
        let started = Command::new("dovecot")
            .arg("-c")
            .arg(root.join("dovecot.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(
            started.success(),
            "dovecot failed to start; log:\n{}",
            std::fs::read_to_string(root.join("dovecot.log")).unwrap_or_default()
        );
        let d = Dovecot { dir, port };
        if protocol == "sasl" {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !d.sasl_path().exists() {
                assert!(Instant::now() < deadline, "dovecot auth socket missing; log:\n{}", d.log());
                std::thread::sleep(Duration::from_millis(50));
            }
        } else {
            assert!(
                wait_for_port(port, Duration::from_secs(30)),
                "dovecot {protocol} not listening; log:\n{}",
                d.log()
            );
        }
        d
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dovecot.log")).unwrap_or_default()
    }

    /// Messages delivered to `user`'s Maildir.
    pub fn mailbox(&self, user: &str) -> Vec<String> {
        let mut out = Vec::new();
        for sub in ["new", "cur"] {
            if let Ok(rd) = std::fs::read_dir(self.dir.path().join("mail").join(user).join(sub)) {
                for e in rd.flatten() {
                    out.push(String::from_utf8_lossy(&std::fs::read(e.path()).unwrap()).into_owned());
                }
            }
        }
        out
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(self.dir.path().join("run/master.pid")).unwrap_or_default();
        if let Ok(pid) = pid.trim().parse::<u32>() {
            let _ = Command::new("kill").arg(pid.to_string()).output();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).output();
        }
    }
}

/// A line-at-a-time SMTP/LMTP client for tests that check each reply.
pub struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Client {
    /// Connects and returns the greeting's code alongside.
    pub fn connect(port: u16) -> (Client, u16) {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut c = Client { r: BufReader::new(s.try_clone().unwrap()), w: s };
        let (code, _) = c.reply();
        (c, code)
    }

    /// One reply: its code and its whole text.
    pub fn reply(&mut self) -> (u16, String) {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line).unwrap_or(0) == 0 {
                return (0, all);
            }
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return (line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0), all);
            }
        }
    }

    /// Sends one command line, returns its reply.
    pub fn cmd(&mut self, line: &str) -> (u16, String) {
        write!(self.w, "{line}\r\n").unwrap();
        self.reply()
    }

    /// Sends a message body (LF or CRLF) after a 354, dot-stuffed, and the final dot.
    pub fn send_data(&mut self, data: &str) {
        for line in data.replace("\r\n", "\n").lines() {
            let dot = if line.starts_with('.') { "." } else { "" };
            write!(self.w, "{dot}{line}\r\n").unwrap();
        }
        write!(self.w, ".\r\n").unwrap();
    }
}

/// The mailtriage daemon, started from the binary under test.
pub struct Daemon {
    pub child: Child,
    pub dir: tempfile::TempDir,
    /// `inet:127.0.0.1:PORT` or `unix:/path`.
    pub milter: String,
    pub port: Option<u16>,
}

impl Daemon {
    /// Starts `mailtriage serve` with `config` (TOML), which must not set
    /// `[server] milter`: a free port (or `unix_socket`) is filled in.
    pub fn start(config: &str, unix_socket: bool) -> Daemon {
        let dir = tempfile::Builder::new().prefix("mt-daemon.").tempdir_in("/tmp").unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let (milter, port) = if unix_socket {
            (format!("unix:{}", dir.path().join("milter.sock").display()), None)
        } else {
            let p = free_port();
            (format!("inet:127.0.0.1:{p}"), Some(p))
        };
        let config = config.replacen("[server]", &format!("[server]\nmilter = \"{milter}\""), 1);
        assert!(config.contains(&milter), "test config needs a [server] section");
        let cfg_path = dir.path().join("mailtriage.toml");
        std::fs::write(&cfg_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_mailtriage"))
            .arg("--config")
            .arg(&cfg_path)
            .arg("serve")
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let d = Daemon { child, dir, milter, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let up = match d.port {
                Some(p) => TcpStream::connect(("127.0.0.1", p)).is_ok(),
                None => d.dir.path().join("milter.sock").exists(),
            };
            if up {
                break;
            }
            assert!(Instant::now() < deadline, "daemon did not start; log:\n{}", d.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    /// Rewrites the config file (same milter address) for a reload.
    pub fn rewrite_config(&self, config: &str) {
        let config = config.replacen("[server]", &format!("[server]\nmilter = \"{}\"", self.milter), 1);
        std::fs::write(self.dir.path().join("mailtriage.toml"), config).unwrap();
    }

    /// Sends a signal (`HUP`, `TERM`…) to the daemon.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(ok.success());
    }

    /// Waits until the log contains `needle` `count` times (bounded).
    pub fn wait_log(&self, needle: &str, count: usize) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.log().matches(needle).count() >= count {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// The address in Postfix's `smtpd_milters` notation.
    pub fn postfix_address(&self) -> String {
        self.milter.clone()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The daemon configuration the black-box tests share: billing reroutes,
/// sales copies, security quarantines; each has a Subject rule.
pub fn config(mode: &str) -> String {
    format!(
        r#"
[server]
mode = "{mode}"
milter_socket_mode = "0666"
progress_interval = "1s"

[defaults]
department = "general"
priority = "medium"

[[departments]]
name = "billing"
mailbox = "billing@{DOMAIN}"
action = "reroute"

[[departments]]
name = "sales"
mailbox = "sales@{DOMAIN}"
action = "copy"

[[departments]]
name = "security"
mailbox = "security@{DOMAIN}"
action = "quarantine"

[[rules]]
name = "invoices"
header = "Subject"
pattern = "(?i)\\binvoice\\b"
department = "billing"
priority = "high"

[[rules]]
name = "quotes"
header = "Subject"
pattern = "(?i)\\bquote\\b"
department = "sales"

[[rules]]
name = "phishing"
header = "Subject"
pattern = "(?i)phishing"
department = "security"
"#
    )
}

/// A plain HTTP/1.1 GET on loopback; the whole response as text.
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::Read;
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// A message to send: envelope and RFC 5322 text (LF or CRLF line ends).
pub struct Mail<'a> {
    pub from: &'a str,
    pub rcpts: Vec<String>,
    pub data: String,
}

/// Sends messages over one SMTP connection; returns the final reply code of
/// each message's DATA.
pub fn send(port: u16, mails: &[Mail<'_>]) -> std::io::Result<Vec<u16>> {
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut r = BufReader::new(stream.try_clone()?);
    // Buffered, flushed before each reply is read: line-by-line writes would
    // meet Nagle and delayed ACKs (tens of ms per message).
    let mut w = std::io::BufWriter::new(stream);
    let reply = |r: &mut BufReader<TcpStream>, w: &mut std::io::BufWriter<TcpStream>| -> std::io::Result<u16> {
        w.flush()?;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "server closed"));
            }
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return line.get(..3).and_then(|c| c.parse().ok()).ok_or_else(|| std::io::Error::other(line.clone()));
            }
        }
    };
    let expect = |code: u16, want: u16, what: &str| {
        if code / 100 == want / 100 {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("{what}: got {code}")))
        }
    };
    expect(reply(&mut r, &mut w)?, 220, "banner")?;
    write!(w, "EHLO client.{DOMAIN}\r\n")?;
    expect(reply(&mut r, &mut w)?, 250, "EHLO")?;
    let mut codes = Vec::new();
    for m in mails {
        write!(w, "MAIL FROM:<{}>\r\n", m.from)?;
        expect(reply(&mut r, &mut w)?, 250, "MAIL")?;
        for rc in &m.rcpts {
            write!(w, "RCPT TO:<{rc}>\r\n")?;
            expect(reply(&mut r, &mut w)?, 250, "RCPT")?;
        }
        write!(w, "DATA\r\n")?;
        expect(reply(&mut r, &mut w)?, 354, "DATA")?;
        for line in m.data.replace("\r\n", "\n").lines() {
            let dot = if line.starts_with('.') { "." } else { "" };
            write!(w, "{dot}{line}\r\n")?;
        }
        write!(w, ".\r\n")?;
        codes.push(reply(&mut r, &mut w)?);
    }
    write!(w, "QUIT\r\n")?;
    let _ = reply(&mut r, &mut w);
    Ok(codes)
}

/// A simple message to `user@test.example`.
pub fn mail<'a>(subject: &str, extra_headers: &str, body: &str) -> Mail<'a> {
    let id = format!("{}.{}", std::process::id(), COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
    Mail {
        from: "bench@test.example",
        rcpts: vec![format!("user@{DOMAIN}")],
        data: format!(
            "From: Sender <bench@{DOMAIN}>\nTo: user@{DOMAIN}\nSubject: {subject}\nMessage-ID: <{id}@{DOMAIN}>\n{extra_headers}\n{body}\n"
        ),
    }
}

static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Values of header `name` in a delivered message's header block, unfolded.
pub fn header_values(message: &str, name: &str) -> Vec<String> {
    let head = message.split("\n\n").next().unwrap_or("");
    let mut out: Vec<String> = Vec::new();
    let mut in_match = false;
    for line in head.lines() {
        if line.starts_with([' ', '\t']) {
            if in_match {
                let last = out.last_mut().expect("a match precedes its continuation");
                last.push(' ');
                last.push_str(line.trim());
            }
            continue;
        }
        in_match = matches!(line.split_once(':'), Some((n, _)) if n.eq_ignore_ascii_case(name));
        if in_match {
            out.push(line.split_once(':').map(|(_, v)| v.trim().to_string()).unwrap_or_default());
        }
    }
    out
}

/// The `main.cf` settings of every fenced block in a Markdown file that
/// starts with `# /etc/postfix/main.cf`, one `name = value` each, exactly as
/// written (continuation lines joined): what an admin pastes.
pub fn documented_main_cf(markdown: &str) -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(markdown)).unwrap();
    let mut settings: Vec<String> = Vec::new();
    for block in text.split("```").skip(1).step_by(2) {
        let body = block.split_once('\n').map_or("", |(_, b)| b);
        if !body.starts_with("# /etc/postfix/main.cf") {
            continue;
        }
        for line in body.lines() {
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            match settings.last_mut() {
                Some(last) if line.starts_with(char::is_whitespace) => last.push_str(line),
                _ => settings.push(line.to_string()),
            }
        }
    }
    assert!(!settings.is_empty(), "{markdown} has no `# /etc/postfix/main.cf` block");
    settings
}

/// Fails unless no mailtriage package is installed here: the package tests
/// install and purge their own.
pub fn require_no_installed_package() {
    let already = Command::new("dpkg-query").args(["-W", "-f", "${Status}", "mailtriage"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&already.stdout).contains("install ok installed"),
        "a mailtriage package is already installed here; this test installs and purges its own: remove it first"
    );
}

/// `scripts/build-deb.sh` around the binary under test, into `out`: the
/// package's path.
pub fn build_deb(out: &Path) -> PathBuf {
    require("dpkg-shlibdeps", "dpkg-dev");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let built =
        run(Command::new("bash").arg(root.join("scripts/build-deb.sh")).arg(env!("CARGO_BIN_EXE_mailtriage")).arg(out));
    let deb = PathBuf::from(built.lines().rev().find(|l| l.trim().ends_with(".deb")).unwrap_or("").trim());
    assert!(deb.exists(), "build-deb.sh named no package:\n{built}");
    deb
}
