//! A private Postfix instance for the TLS and AUTH tests: `postfix -c DIR` with its own
//! configuration, queue, data and log in a fresh directory, an `smtpd` on one loopback port
//! with STARTTLS (the certificate the test gives) and Cyrus SASL (PLAIN and LOGIN against a
//! sasldb the test fills), accepting mail only from authenticated clients and discarding it
//! once queued. Started and stopped by the test; never touches /etc/postfix.
//!
//! Needs root (Postfix's master runs as root), Debian's `postfix`, `sasl2-bin` (saslpasswd2)
//! and `libsasl2-modules`; `tests/run.sh` installs them.

use super::{free_port, fresh_temp_dir, is_listening, require_tool};
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

pub struct Postfix {
    dir: PathBuf,
    addr: SocketAddr,
}

impl Postfix {
    /// Starts an instance with STARTTLS (`cert`, `key`: PEM) and these SASL users.
    pub fn start(cert: &Path, key: &Path, users: &[(&str, &str)]) -> Postfix {
        require_tool(POSTFIX);
        require_tool(SASLPASSWD2);
        assert!(super::running_as_root(), "a private Postfix needs root");
        let dir = fresh_temp_dir("postfix");
        let port = free_port("127.0.0.1");
        let d = dir.display();
        for sub in ["queue", "data", "sasl"] {
            fs::create_dir_all(dir.join(sub)).unwrap();
        }
        fs::write(
            dir.join("main.cf"),
            format!(
                "compatibility_level = 3.6\n\
                 queue_directory = {d}/queue\n\
                 data_directory = {d}/data\n\
                 mail_owner = postfix\n\
                 maillog_file = {d}/maillog\n\
                 maillog_file_prefixes = {d}\n\
                 inet_interfaces = 127.0.0.1\n\
                 inet_protocols = ipv4\n\
                 myhostname = {REALM}\n\
                 mydomain = {REALM}\n\
                 mydestination =\n\
                 relay_domains =\n\
                 mynetworks = 127.0.0.1/32\n\
                 smtpd_relay_restrictions = permit_sasl_authenticated, reject\n\
                 default_transport = discard:\n\
                 alias_maps =\n\
                 alias_database =\n\
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
                cert.display(),
                key.display()
            ),
        )
        .unwrap();
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
        fs::write(dir.join("master.cf"), services.join("\n") + "\n").unwrap();
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
        // smtpd reads the sasldb as the mail owner; the data directory is its own.
        let chown = |path: &str| {
            let ok = Command::new("chown")
                .args(["postfix", path])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown postfix {path}");
        };
        if !users.is_empty() {
            chown(&format!("{d}/sasldb2"));
        }
        chown(&format!("{d}/data"));
        let out = Command::new(POSTFIX)
            .args(["-c", &d.to_string(), "start"])
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
            .args(["-c", &self.dir.display().to_string(), "stop"])
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
