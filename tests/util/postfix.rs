//! A private Postfix instance for the tests: `postfix -c DIR` with its own configuration,
//! queue, data and log in a fresh directory, `smtpd` on one loopback port. Started by the test
//! and stopped (`postfix -c DIR stop`) when the handle drops; never touches /etc/postfix.
//!
//! Two set-ups: [`Postfix::start`] is a relay that takes mail only from clients that
//! authenticated over STARTTLS (Cyrus SASL, PLAIN and LOGIN against a sasldb the test fills)
//! and discards it once queued; [`Postfix::start_local`] delivers locally for `example.test`,
//! whose recipients are the system's users (so `root` exists and `nosuch` does not).
//!
//! Needs root (Postfix's master runs as root), Debian's `postfix`, and for the first set-up
//! `sasl2-bin` (saslpasswd2) and `libsasl2-modules`; `tests/run.sh` installs them.

use super::{free_port, fresh_temp_dir, is_listening, require_tool, running_as_root};
use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const POSTFIX: &str = "/usr/sbin/postfix";
const SASLPASSWD2: &str = "/usr/sbin/saslpasswd2";
/// The SASL realm: users log in as `user` and Postfix logs `user@postfix.test`.
pub const REALM: &str = "postfix.test";

/// A running private Postfix.
pub struct Postfix {
    dir: PathBuf,
    addr: SocketAddr,
}

/// The `main.cf` lines every instance has: its own directories and log, loopback only.
fn base_main_cf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "compatibility_level = 3.6\n\
         queue_directory = {d}/queue\n\
         data_directory = {d}/data\n\
         mail_owner = postfix\n\
         maillog_file = {d}/maillog\n\
         maillog_file_prefixes = {d}\n\
         inet_interfaces = 127.0.0.1\n\
         inet_protocols = ipv4\n\
         alias_maps =\n\
         alias_database =\n"
    )
}

fn chown_postfix(path: &Path) {
    let ok = Command::new("chown")
        .arg("postfix")
        .arg(path)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "chown postfix {}", path.display());
}

impl Postfix {
    /// Starts a relay with STARTTLS (`cert`, `key`: PEM) that takes mail only from these SASL
    /// users and discards it.
    pub fn start(cert: &Path, key: &Path, users: &[(&str, &str)]) -> Postfix {
        require_tool(SASLPASSWD2);
        let (dir, port) = Self::prepare();
        let d = dir.display();
        fs::create_dir_all(dir.join("sasl")).unwrap();
        let main_cf = format!(
            "{}myhostname = {REALM}\n\
             mydomain = {REALM}\n\
             mydestination =\n\
             relay_domains =\n\
             mynetworks = 127.0.0.1/32\n\
             smtpd_relay_restrictions = permit_sasl_authenticated, reject\n\
             default_transport = discard:\n\
             local_recipient_maps =\n\
             smtpd_tls_security_level = may\n\
             smtpd_tls_cert_file = {}\n\
             smtpd_tls_key_file = {}\n\
             smtpd_tls_auth_only = yes\n\
             smtpd_sasl_auth_enable = yes\n\
             smtpd_sasl_type = cyrus\n\
             smtpd_sasl_path = smtpd\n\
             cyrus_sasl_config_path = {d}/sasl\n\
             smtpd_sasl_local_domain = {REALM}\n",
            base_main_cf(&dir),
            cert.display(),
            key.display()
        );
        let services = [
            format!("127.0.0.1:{port} inet n - n - - smtpd"),
            "pickup unix n - n 60 1 pickup".into(),
            "cleanup unix n - n - 0 cleanup".into(),
            "qmgr unix n - n 300 1 qmgr".into(),
            "tlsmgr unix - - n 1000? 1 tlsmgr".into(),
            "rewrite unix - - n - - trivial-rewrite".into(),
            "bounce unix - - n - 0 bounce".into(),
            "defer unix - - n - 0 bounce".into(),
            "trace unix - - n - 0 bounce".into(),
            "verify unix - - n - 1 verify".into(),
            "flush unix n - n 1000? 0 flush".into(),
            "proxymap unix - - n - - proxymap".into(),
            "showq unix n - n - - showq".into(),
            "error unix - - n - - error".into(),
            "retry unix - - n - - error".into(),
            "discard unix - - n - - discard".into(),
            "anvil unix - - n - 1 anvil".into(),
            "scache unix - - n - 1 scache".into(),
            "postlog unix-dgram n - n - 1 postlogd".into(),
        ];
        fs::write(
            dir.join("sasl/smtpd.conf"),
            format!(
                "pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\n\
                 sasldb_path: {d}/sasldb2\n"
            ),
        )
        .unwrap();
        for (user, password) in users {
            let mut child = Command::new(SASLPASSWD2)
                .args(["-f", &format!("{d}/sasldb2"), "-c", "-p", "-u", REALM, user])
                .stdin(Stdio::piped())
                .spawn()
                .expect("run saslpasswd2");
            child
                .stdin
                .take()
                .unwrap()
                .write_all(password.as_bytes())
                .unwrap();
            assert!(child.wait().unwrap().success(), "saslpasswd2 failed");
        }
        // smtpd reads the sasldb as the mail owner.
        if !users.is_empty() {
            chown_postfix(&dir.join("sasldb2"));
        }
        Self::launch(dir, port, main_cf, services.join("\n") + "\n")
    }

    /// Starts Postfix delivering locally for `example.test`, with the extra `main.cf` lines
    /// given (e.g. "disable_vrfy_command = yes").
    pub fn start_local(main_cf_extra: &str) -> Postfix {
        let (dir, port) = Self::prepare();
        let main_cf = format!(
            "{}myhostname = mx.example.test\n\
             mydestination = example.test\n\
             smtpd_banner = $myhostname ESMTP\n\
             {main_cf_extra}\n",
            base_main_cf(&dir)
        );
        // Debian's master.cf with smtpd on our port and no chroot (the queue directory has no
        // copy of /etc).
        let master = fs::read_to_string("/etc/postfix/master.cf").expect("read master.cf");
        let master: String = master
            .lines()
            .map(|line| {
                let mut fields: Vec<&str> = line.split_whitespace().collect();
                if line.starts_with(|c: char| c.is_ascii_alphanumeric()) && fields.len() >= 8 {
                    let service = format!("127.0.0.1:{port}");
                    if fields[0] == "smtp" && fields[1] == "inet" {
                        fields[0] = &service;
                    }
                    fields[4] = "n";
                    return fields.join(" ") + "\n";
                }
                format!("{line}\n")
            })
            .collect();
        Self::launch(dir, port, main_cf, master)
    }

    /// A fresh directory with `queue` and `data`, and a free port.
    fn prepare() -> (PathBuf, u16) {
        require_tool(POSTFIX);
        assert!(running_as_root(), "a private Postfix needs root");
        let dir = fresh_temp_dir("postfix");
        for sub in ["queue", "data"] {
            fs::create_dir_all(dir.join(sub)).unwrap();
        }
        (dir, free_port("127.0.0.1"))
    }

    fn launch(dir: PathBuf, port: u16, main_cf: String, master_cf: String) -> Postfix {
        fs::write(dir.join("main.cf"), main_cf).unwrap();
        fs::write(dir.join("master.cf"), master_cf).unwrap();
        chown_postfix(&dir.join("data"));
        let out = Command::new(POSTFIX)
            .arg("-c")
            .arg(&dir)
            .arg("start")
            .stdin(Stdio::null())
            .output()
            .expect("run postfix start");
        let postfix = Postfix {
            dir,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        assert!(
            out.status.success(),
            "postfix start failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            postfix.log()
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_listening(postfix.addr) {
            assert!(
                Instant::now() < deadline,
                "Postfix did not listen on {}: {}",
                postfix.addr,
                postfix.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        postfix
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops `defer_transports` from `main.cf`, reloads, and flushes the queue: what was
    /// deferred is delivered now (for benchmarks that queue first and time the flush).
    pub fn release_deferred(&self) {
        let main_cf = self.dir.join("main.cf");
        let text = fs::read_to_string(&main_cf).unwrap();
        let text: String = text
            .lines()
            .filter(|line| !line.starts_with("defer_transports"))
            .map(|line| format!("{line}\n"))
            .collect();
        fs::write(&main_cf, text).unwrap();
        for (program, verb) in [(POSTFIX, "reload"), ("/usr/sbin/postqueue", "-f")] {
            let ok = Command::new(program)
                .arg("-c")
                .arg(&self.dir)
                .arg(verb)
                .stdin(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "{program} {verb}");
        }
    }

    /// Asks the queue manager to try every deferred message now (`postqueue -f`).
    pub fn flush(&self) {
        let ok = Command::new("/usr/sbin/postqueue")
            .arg("-c")
            .arg(&self.dir)
            .arg("-f")
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "postqueue -f");
    }

    /// The instance's mail log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("maillog")).unwrap_or_default()
    }

    /// Waits until the log holds `n` lines containing `needle` (smtpd logs asynchronously
    /// through postlogd); returns the log.
    pub fn wait_for_log(&self, needle: &str, n: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.matches(needle).count() >= n || Instant::now() >= deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new(POSTFIX)
            .arg("-c")
            .arg(&self.dir)
            .arg("stop")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while is_listening(self.addr) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
