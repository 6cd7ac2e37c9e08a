//! A private Postfix instance for the tests: its own configuration, queue and data directories
//! under a temporary directory (`postfix -c DIR`, never /etc/postfix), `smtpd` on a loopback
//! port, local delivery for one domain whose recipients are the system's users (so `root` exists
//! and `nosuch` does not). Needs root, as Postfix's master does; stopped with `postfix -c DIR
//! stop` when the handle drops.

use super::{free_port, fresh_temp_dir, is_listening, read_log, running_as_root, START_TIMEOUT};
use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

pub const POSTFIX: &str = "/usr/sbin/postfix";

/// A running private Postfix.
pub struct PrivatePostfix {
    dir: PathBuf,
    addr: SocketAddr,
}

impl PrivatePostfix {
    /// Starts Postfix for the domain `example.test` on a free port of 127.0.0.1, with the
    /// extra `main.cf` lines given (e.g. "disable_vrfy_command = yes").
    pub fn start(main_cf_extra: &str) -> PrivatePostfix {
        super::require_tool(POSTFIX);
        assert!(running_as_root(), "a private Postfix needs root");
        let dir = fresh_temp_dir("postfix");
        fs::create_dir_all(dir.join("queue")).expect("queue dir");
        fs::create_dir_all(dir.join("data")).expect("data dir");
        let port = free_port("127.0.0.1");
        let d = dir.display();
        fs::write(
            dir.join("main.cf"),
            format!(
                "compatibility_level = 3.6\n\
                 queue_directory = {d}/queue\n\
                 data_directory = {d}/data\n\
                 mail_owner = postfix\n\
                 inet_interfaces = 127.0.0.1\n\
                 inet_protocols = ipv4\n\
                 myhostname = mx.example.test\n\
                 mydestination = example.test\n\
                 alias_maps =\n\
                 alias_database =\n\
                 maillog_file_prefixes = {d}\n\
                 maillog_file = {d}/maillog\n\
                 smtpd_banner = $myhostname ESMTP\n\
                 {main_cf_extra}\n"
            ),
        )
        .expect("write main.cf");
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
                        fields[4] = "n";
                        return fields.join(" ") + "\n";
                    }
                    fields[4] = "n";
                    return fields.join(" ") + "\n";
                }
                format!("{line}\n")
            })
            .collect();
        fs::write(dir.join("master.cf"), master).expect("write master.cf");
        let chown = Command::new("chown")
            .arg("postfix")
            .arg(dir.join("data"))
            .status()
            .expect("chown");
        assert!(chown.success());
        let out = Command::new(POSTFIX)
            .arg("-c")
            .arg(&dir)
            .arg("start")
            .stdin(Stdio::null())
            .output()
            .expect("run postfix start");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let postfix = PrivatePostfix { dir, addr };
        assert!(
            out.status.success(),
            "postfix start failed: {}",
            read_log(&postfix.dir.join("maillog"))
        );
        let deadline = Instant::now() + START_TIMEOUT;
        while !is_listening(addr) {
            assert!(
                Instant::now() < deadline,
                "Postfix does not listen on {addr}: {}",
                read_log(&postfix.dir.join("maillog"))
            );
            thread::sleep(Duration::from_millis(20));
        }
        postfix
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Postfix's log so far.
    pub fn log(&self) -> String {
        read_log(&self.dir.join("maillog"))
    }
}

impl Drop for PrivatePostfix {
    fn drop(&mut self) {
        let _ = Command::new(POSTFIX)
            .arg("-c")
            .arg(&self.dir)
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
