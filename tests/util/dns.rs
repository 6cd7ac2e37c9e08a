//! DNS servers for the tests: a real `dnsmasq` (Debian's `dnsmasq-base`) serving MX, A, AAAA, TXT and
//! CNAME records for names under `.test` on a loopback port, and a nameserver that never answers.
//!
//! Like the rest of `tests/util`, nothing here uses the mxpipe crate. dnsmasq answers only from
//! its command line (`--no-resolv --no-hosts --conf-file=/dev/null`) and, thanks to
//! `--local=/test/`, gives NXDOMAIN for every other name under `.test`; it never forwards a query
//! off the machine. Each server is a child process killed by its own PID when its handle drops.

use super::{free_port, fresh_temp_dir, is_listening, kill_and_reap, read_log, running_as_root};
use super::{require_tool, START_TIMEOUT};
use std::collections::BTreeMap;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Where Debian's `dnsmasq-base` puts the server.
pub const DNSMASQ: &str = "/usr/sbin/dnsmasq";

/// What a [`Dnsmasq`] will serve; [`DnsmasqBuilder::start`] starts it.
#[derive(Debug, Clone, Default)]
pub struct DnsmasqBuilder {
    mx: Vec<String>,
    hosts: BTreeMap<String, Vec<IpAddr>>,
    cnames: Vec<String>,
    txts: Vec<String>,
    ttl: u32,
}

impl DnsmasqBuilder {
    /// `domain MX preference target` (dnsmasq `--mx-host`).
    pub fn mx(mut self, domain: &str, target: &str, preference: u16) -> Self {
        self.mx.push(format!("{domain},{target},{preference}"));
        self
    }

    /// The RFC 7505 null MX, `domain MX 0 .`: dnsmasq sends a zero-length (root) exchange.
    pub fn null_mx(self, domain: &str) -> Self {
        self.mx(domain, ".", 0)
    }

    /// An A or AAAA record for `name` (repeatable: every address is served).
    pub fn host(mut self, name: &str, ip: &str) -> Self {
        let ip: IpAddr = ip.parse().unwrap_or_else(|e| panic!("bad IP {ip:?}: {e}"));
        self.hosts.entry(name.to_string()).or_default().push(ip);
        self
    }

    /// `alias CNAME target`; dnsmasq serves it only when it knows `target` (from `host`).
    pub fn cname(mut self, alias: &str, target: &str) -> Self {
        self.cnames.push(format!("{alias},{target}"));
        self
    }

    /// A TXT record of `name` holding `text` as one string (dnsmasq `--txt-record`; `text`
    /// must not contain a comma, which would split it into several strings).
    pub fn txt(mut self, name: &str, text: &str) -> Self {
        assert!(!text.contains(','), "one TXT string: {text:?}");
        self.txts.push(format!("{name},{text}"));
        self
    }

    /// The TTL of every record served (`--local-ttl`); the default 0 means "do not cache".
    pub fn ttl(mut self, seconds: u32) -> Self {
        self.ttl = seconds;
        self
    }

    /// Starts dnsmasq on 127.0.0.1 and a free port (UDP and TCP) and waits until it listens.
    pub fn start(self) -> Dnsmasq {
        require_tool(DNSMASQ);
        let dir = fresh_temp_dir("dnsmasq");
        let log_path = dir.join("dnsmasq.log");
        let mut last_log = String::new();
        // A free port can be taken between free_port() and dnsmasq's bind: retry a few times.
        for _attempt in 0..5 {
            let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), free_port("127.0.0.1"));
            let mut cmd = Command::new(DNSMASQ);
            cmd.args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--local=/test/",
                "--log-queries",
            ])
            .arg(format!("--port={}", addr.port()))
            .arg(format!("--local-ttl={}", self.ttl))
            .arg(format!("--log-facility={}", log_path.display()))
            .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()));
            if running_as_root() {
                // Otherwise it switches to `nobody`, which cannot write the log in our directory.
                cmd.arg("--user=root");
            }
            for mx in &self.mx {
                cmd.arg(format!("--mx-host={mx}"));
            }
            // One --host-record per address: a record takes at most one of each family.
            for (name, ips) in &self.hosts {
                for ip in ips {
                    cmd.arg(format!("--host-record={name},{ip}"));
                }
            }
            for cname in &self.cnames {
                cmd.arg(format!("--cname={cname}"));
            }
            for txt in &self.txts {
                cmd.arg(format!("--txt-record={txt}"));
            }
            let _ = fs::remove_file(&log_path);
            let stderr = fs::File::create(dir.join("stderr.log")).expect("create dnsmasq stderr");
            let mut child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {DNSMASQ}: {e}"));
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                if is_listening(addr) {
                    return Dnsmasq {
                        child: Some(child),
                        addr,
                        dir,
                    };
                }
                if let Ok(Some(_status)) = child.try_wait() {
                    break; // most likely lost the port race: try another port
                }
                if Instant::now() > deadline {
                    kill_and_reap(&mut child);
                    let log = read_log(&dir.join("stderr.log")) + &read_log(&log_path);
                    let _ = fs::remove_dir_all(&dir);
                    panic!("dnsmasq did not listen on {addr} within {START_TIMEOUT:?}:\n{log}");
                }
                thread::sleep(Duration::from_millis(10));
            }
            last_log = read_log(&dir.join("stderr.log")) + &read_log(&log_path);
        }
        let _ = fs::remove_dir_all(&dir);
        panic!("dnsmasq exited before listening, five times; its last output:\n{last_log}");
    }
}

/// A running dnsmasq; see [`DnsmasqBuilder`].
pub struct Dnsmasq {
    child: Option<Child>,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Dnsmasq {
    /// Records first, then [`DnsmasqBuilder::start`].
    pub fn builder() -> DnsmasqBuilder {
        DnsmasqBuilder::default()
    }

    /// Where it answers, over UDP and TCP.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The queries it received so far, as `(type, name)`, e.g. `("MX", "a.test")`, read from
    /// its `--log-queries` log.
    pub fn queries(&self) -> Vec<(String, String)> {
        read_log(&self.dir.join("dnsmasq.log"))
            .lines()
            .filter_map(|line| {
                // "Nov 26 14:47:03 dnsmasq[11686]: query[MX] a.test from 127.0.0.1"
                let rest = &line[line.find(": query[")? + ": query[".len()..];
                let (record_type, rest) = rest.split_once("] ")?;
                let name = rest.split_whitespace().next()?;
                Some((record_type.to_string(), name.to_string()))
            })
            .collect()
    }

    /// Kills the server now (before the handle drops): its port then answers nothing.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A nameserver that receives queries and never answers: a UDP socket on a loopback port that
/// is never read (TCP to that port is refused, as nothing listens there).
pub struct SilentNameserver {
    socket: UdpSocket,
}

impl SilentNameserver {
    pub fn start() -> SilentNameserver {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP socket on 127.0.0.1");
        SilentNameserver { socket }
    }

    pub fn addr(&self) -> SocketAddr {
        self.socket
            .local_addr()
            .expect("local_addr of a bound socket")
    }
}

/// A nameserver on 127.0.0.1 (or `::1`) that answers each query with the datagrams `script`
/// returns for it (none: silence), for tests of what the resolver does with unusual answers.
/// Stops when dropped.
pub struct ScriptedNameserver {
    addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ScriptedNameserver {
    pub fn start(
        bind: &str,
        script: impl Fn(&hickory_resolver::proto::op::Message) -> Vec<Vec<u8>> + Send + 'static,
    ) -> std::io::Result<ScriptedNameserver> {
        use std::sync::atomic::Ordering;
        let socket = UdpSocket::bind(bind)?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let addr = socket.local_addr()?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = std::sync::Arc::clone(&stop);
            move || {
                let mut buffer = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((len, peer)) = socket.recv_from(&mut buffer) else {
                        continue;
                    };
                    let Ok(query) = hickory_resolver::proto::op::Message::from_vec(&buffer[..len])
                    else {
                        continue;
                    };
                    for datagram in script(&query) {
                        let _ = socket.send_to(&datagram, peer);
                    }
                }
            }
        });
        Ok(ScriptedNameserver {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for ScriptedNameserver {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
