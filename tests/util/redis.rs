//! Redis servers for the scale-out tests: `redis-server` (Debian's, installed by tests/run.sh)
//! as a child process on a free loopback port with a directory of its own, alone (optionally
//! with an append-only file, and restartable on the same port and data) or as the masters of a
//! Redis Cluster. Every process is stopped by its own PID when its handle drops.

use super::{free_port, fresh_temp_dir, kill_and_reap, read_log, require_tool};
use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

pub const REDIS_SERVER: &str = "/usr/bin/redis-server";
pub const REDIS_CLI: &str = "/usr/bin/redis-cli";

/// One `redis-server`.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    args: Vec<String>,
}

impl RedisServer {
    /// A server without persistence.
    pub fn start() -> RedisServer {
        RedisServer::spawn(&["--appendonly", "no"])
    }

    /// A server that logs every write to an append-only file, fsynced every write, so that a
    /// restart loses nothing it acknowledged.
    pub fn start_with_aof() -> RedisServer {
        RedisServer::spawn(&["--appendonly", "yes", "--appendfsync", "always"])
    }

    /// A cluster-enabled server (a master once `create_cluster` has run).
    pub fn start_cluster_node() -> RedisServer {
        RedisServer::spawn(&[
            "--appendonly",
            "no",
            "--cluster-enabled",
            "yes",
            "--cluster-node-timeout",
            "5000",
        ])
    }

    fn spawn(extra: &[&str]) -> RedisServer {
        require_tool(REDIS_SERVER);
        let dir = fresh_temp_dir("redis");
        let port = free_port("127.0.0.1");
        let mut server = RedisServer {
            child: None,
            port,
            dir,
            args: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.launch();
        server
    }

    fn launch(&mut self) {
        let log = fs::File::create(self.dir.join("redis.log")).expect("create redis log");
        let child = Command::new(REDIS_SERVER)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--daemonize", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {REDIS_SERVER}: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.answers_ping() {
            if Instant::now() > deadline {
                panic!(
                    "redis-server on port {} did not answer within 20 s; its log:\n{}",
                    self.port,
                    read_log(&self.dir.join("redis.log"))
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn answers_ping(&self) -> bool {
        Command::new(REDIS_CLI)
            .args(["-p", &self.port.to_string(), "ping"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG")
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Stops the server, waits `down_for`, and starts it again on the same port with the same
    /// data.
    pub fn restart(&mut self, down_for: Duration) {
        self.stop();
        thread::sleep(down_for);
        self.start_again();
    }

    /// Stops the server (SIGTERM: with an append-only file it is flushed first) and waits for
    /// it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's PID.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    /// Starts a stopped server again on the same port with the same data.
    pub fn start_again(&mut self) {
        self.launch();
    }

    /// Runs `redis-cli ARGS` against this server and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(REDIS_CLI)
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Makes the servers the masters of one Redis Cluster (the 16384 slots split between them) and
/// waits until the cluster says it is ok.
pub fn create_cluster(nodes: &[RedisServer]) {
    let addrs: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let out = Command::new(REDIS_CLI)
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("run redis-cli --cluster create");
    assert!(
        out.status.success(),
        "redis-cli --cluster create failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !nodes
        .iter()
        .all(|n| n.cli(&["cluster", "info"]).contains("cluster_state:ok"))
    {
        assert!(
            Instant::now() < deadline,
            "the cluster did not become ok in 30 s"
        );
        thread::sleep(Duration::from_millis(100));
    }
}
