//! Shared helpers for the integration tests: start real SMTP servers that this project did not
//! write (Postfix's `smtp-sink`, an `aiosmtpd` capture server) on loopback, read back what they
//! received, and talk SMTP by hand.
//!
//! Each test file says `mod util;`. Nothing here depends on the mxpipe crate, so a test of the
//! engine never passes because a helper shares its bugs. Every server is a child process that is
//! killed by its own PID and reaped when its handle drops; `tests/run.sh` installs the servers
//! and sets `MXPIPE_TEST_PYTHON`.
#![allow(dead_code)] // each test binary uses a different subset of these helpers

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub mod dns;
pub mod postfix;
pub mod redis;

/// Where Debian's `postfix` package puts the sink.
pub const SMTP_SINK: &str = "/usr/sbin/smtp-sink";

/// How long a server may take to start listening before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Python has to import aiosmtpd first, which is slow on a loaded CI machine.
const PYTHON_START_TIMEOUT: Duration = Duration::from_secs(30);

/// The crate root, where `tests/` lives.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Panics with a clear message when a tool the tests need is not installed.
pub fn require_tool(path: &str) {
    if !Path::new(path).exists() {
        panic!("missing {path}: run tests/run.sh, which installs the test servers");
    }
}

/// A port that was free on `ip` a moment ago: bind port 0, read the port, drop the socket.
/// Another process may take it before the caller binds it (the server starters here retry);
/// within this test process no port is handed out twice, so parallel tests do not collide.
pub fn free_port(ip: &str) -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let ip: IpAddr = ip.parse().unwrap_or_else(|e| panic!("bad IP {ip:?}: {e}"));
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..100 {
        let port = TcpListener::bind((ip, 0))
            .unwrap_or_else(|e| panic!("cannot bind {ip}:0: {e}"))
            .local_addr()
            .expect("local_addr of a bound socket")
            .port();
        if handed_out.insert(port) {
            return port;
        }
    }
    panic!("no port on {ip} that this process has not handed out already");
}

/// Whether the tests run as root (then `smtp-sink` needs `-u nobody`). Asked of `id -u` so that
/// the helpers need no libc.
pub fn running_as_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        let out = Command::new("id").arg("-u").output().expect("run `id -u`");
        String::from_utf8_lossy(&out.stdout).trim() == "0"
    })
}

/// A fresh, empty directory under `std::env::temp_dir()`, unique within this machine.
/// The caller removes it (the server handles here do so on drop).
pub fn fresh_temp_dir(label: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "mxpipe-{label}-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// Whether a TCP socket is in LISTEN state on `addr`, read from `/proc/net/tcp{,6}`. Unlike a
/// probe connection, this does not open a session, so it does not disturb servers that count
/// sessions (`smtp-sink -n`) or script the connect (`-q CONNECT`).
fn is_listening(addr: SocketAddr) -> bool {
    // The kernel prints each 32-bit word of the address as a native-endian hex number, then the
    // port in hex; state 0A is LISTEN.
    let (table, words): (&str, Vec<u32>) = match addr.ip() {
        IpAddr::V4(ip) => ("/proc/net/tcp", vec![u32::from_ne_bytes(ip.octets())]),
        IpAddr::V6(ip) => (
            "/proc/net/tcp6",
            ip.octets()
                .chunks(4)
                .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
    };
    let want_ip: String = words.iter().map(|w| format!("{w:08X}")).collect();
    let want = format!("{want_ip}:{:04X}", addr.port());
    let any_ip = "0".repeat(want_ip.len());
    let want_any = format!("{any_ip}:{:04X}", addr.port());
    let Ok(text) = fs::read_to_string(table) else {
        return false;
    };
    text.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace();
        let local = fields.nth(1).unwrap_or("");
        let state = fields.nth(1).unwrap_or("");
        state == "0A" && (local == want || local == want_any)
    })
}

fn read_log(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn kill_and_reap(child: &mut Child) {
    // kill() on a child that already exited is an error we can ignore; wait() reaps it either way.
    let _ = child.kill();
    let _ = child.wait();
}

// ------------------------------------------------------------------------------------------------
// smtp-sink

/// Postfix's `smtp-sink`, started as a child process on a loopback address.
///
/// It answers every command with success unless told otherwise by its flags (`man 1 smtp-sink`):
/// `-r CMD,..`/`-f CMD,..` reject with 4xx/5xx (both imply `-p`, no PIPELINING), `-q CMD,..`
/// disconnects without a reply, `-Q CMD,..` replies 421 and disconnects, `-w delay` delays the
/// DATA reply, `-W CMD:delay[:odds]` delays any reply, `-A delay` answers 550 after DATA and
/// hangs up, `-M n`/`-n n` exit after n messages/sessions, `-8` hides 8BITMIME, `-E` hides
/// ENHANCEDSTATUSCODES, `-p` hides PIPELINING, `-c` prints counters (to this sink's log). Its
/// EHLO advertises PIPELINING, 8BITMIME, AUTH PLAIN LOGIN, XCLIENT, XFORWARD,
/// ENHANCEDSTATUSCODES and DSN; never SIZE, SMTPUTF8, STARTTLS or CHUNKING.
pub struct SmtpSink {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
    dump_dir: Option<PathBuf>,
}

impl SmtpSink {
    /// Starts `smtp-sink [-u nobody] ARGS 127.0.0.1:PORT BACKLOG` on a free port.
    pub fn start(args: &[&str], backlog: u32) -> SmtpSink {
        SmtpSink::spawn("127.0.0.1", args, backlog, false)
    }

    /// Like [`SmtpSink::start`] on another loopback address (e.g. "127.0.0.2" or "::1"),
    /// backlog 1024.
    pub fn start_on(ip: &str, args: &[&str]) -> SmtpSink {
        SmtpSink::spawn(ip, args, 1024, false)
    }

    /// Like [`SmtpSink::start_on`], and every mail transaction is written to its own file
    /// (`-d DIR/msg.`), read back with [`SmtpSink::dumps`]. Disk writes make the sink orders of
    /// magnitude slower: use it for content checks, not for load.
    pub fn start_dumping(ip: &str, args: &[&str]) -> SmtpSink {
        SmtpSink::spawn(ip, args, 1024, true)
    }

    /// Like [`SmtpSink::start_on`] on a given port (MX tests need every exchanger on the
    /// port the resolver is told to use).
    pub fn start_on_port(ip: &str, port: u16, args: &[&str]) -> SmtpSink {
        SmtpSink::spawn_on(ip, Some(port), args, 1024, false)
    }

    /// Like [`SmtpSink::start_dumping`] on a given port (a relay that was down comes up).
    pub fn start_dumping_on_port(ip: &str, port: u16, args: &[&str]) -> SmtpSink {
        SmtpSink::spawn_on(ip, Some(port), args, 1024, true)
    }

    fn spawn(ip: &str, args: &[&str], backlog: u32, dump: bool) -> SmtpSink {
        SmtpSink::spawn_on(ip, None, args, backlog, dump)
    }

    fn spawn_on(ip: &str, port: Option<u16>, args: &[&str], backlog: u32, dump: bool) -> SmtpSink {
        require_tool(SMTP_SINK);
        let ip_addr: IpAddr = ip.parse().unwrap_or_else(|e| panic!("bad IP {ip:?}: {e}"));
        let dir = fresh_temp_dir("smtp-sink");
        let dump_dir = dump.then(|| {
            let d = dir.join("dump");
            fs::create_dir(&d).expect("create dump dir");
            // smtp-sink drops to `nobody` after binding; it must still be able to write here.
            make_world_writable(&dir);
            make_world_writable(&d);
            d
        });
        let log_path = dir.join("smtp-sink.log");
        let mut last_log = String::new();
        // A free port can be taken between free_port() and smtp-sink's bind: retry a few times.
        for _attempt in 0..5 {
            let addr = SocketAddr::new(ip_addr, port.unwrap_or_else(|| free_port(ip)));
            let listen = match ip_addr {
                IpAddr::V4(_) => format!("{ip_addr}:{}", addr.port()),
                IpAddr::V6(_) => format!("[{ip_addr}]:{}", addr.port()),
            };
            let mut cmd = Command::new(SMTP_SINK);
            if running_as_root() {
                cmd.args(["-u", "nobody"]);
            }
            if let Some(d) = &dump_dir {
                cmd.arg("-d").arg(d.join("msg."));
            }
            let log = fs::File::create(&log_path).expect("create smtp-sink log");
            cmd.args(args)
                .arg(&listen)
                .arg(backlog.to_string())
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone log handle"))
                .stderr(log);
            let mut child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {SMTP_SINK}: {e}"));
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                if is_listening(addr) {
                    return SmtpSink {
                        child,
                        addr,
                        dir,
                        dump_dir,
                    };
                }
                if let Ok(Some(_status)) = child.try_wait() {
                    break; // most likely lost the port race: try another port
                }
                if Instant::now() > deadline {
                    kill_and_reap(&mut child);
                    let log = read_log(&log_path);
                    let _ = fs::remove_dir_all(&dir);
                    panic!("smtp-sink did not listen on {listen} within {START_TIMEOUT:?}; its output:\n{log}");
                }
                thread::sleep(Duration::from_millis(10));
            }
            last_log = read_log(&log_path);
        }
        let _ = fs::remove_dir_all(&dir);
        panic!("smtp-sink exited before listening, 5 times; last output:\n{last_log}");
    }

    /// Where the sink listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The process ID, e.g. to check it is still running.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the sink printed so far (with `-c`, its counters; with `-v`, the conversations).
    pub fn log(&self) -> String {
        read_log(&self.dir.join("smtp-sink.log"))
    }

    /// The dump directory of a sink started with [`SmtpSink::start_dumping`].
    pub fn dump_dir(&self) -> &Path {
        self.dump_dir
            .as_deref()
            .expect("this SmtpSink was not started with start_dumping")
    }

    /// Every mail transaction the sink has dumped, oldest file first (smtp-sink names the files
    /// with a random number, so the order is by modification time; transactions finishing
    /// within the file system's time resolution may swap).
    ///
    /// A file is created at MAIL FROM, filled as the transaction goes, closed before the sink
    /// replies to the final dot, and deleted if the transaction is reset (RSET, HELO/EHLO, or
    /// the connection ending before the dot). So read after the client has seen its replies;
    /// a transaction still in progress shows as a partial dump.
    pub fn dumps(&self) -> Vec<SinkDump> {
        let mut files: Vec<(SystemTime, PathBuf)> = fs::read_dir(self.dump_dir())
            .expect("read dump dir")
            .filter_map(|e| e.ok())
            .map(|e| {
                let mtime = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(UNIX_EPOCH);
                (mtime, e.path())
            })
            .collect();
        files.sort();
        files
            .into_iter()
            .map(|(_, path)| {
                let bytes =
                    fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
                SinkDump::parse(&bytes)
                    .unwrap_or_else(|e| panic!("dump {} unreadable: {e}", path.display()))
            })
            .collect()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn make_world_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o777))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.display()));
}

/// One mail transaction as `smtp-sink -d` writes it.
///
/// The dump is NOT the bytes on the wire: smtp-sink drops every CR (so lines end in bare LF,
/// and a bare CR inside a line vanishes too), removes the first dot of each line
/// (dot-unstuffing), and writes a final empty line for the terminating dot; `content` has that
/// last LF removed again. Use [`CaptureServer`] where exact bytes matter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkDump {
    /// `X-Client-Addr`: the client IP without brackets (IPv6 prefixed "ipv6:").
    pub client_addr: String,
    /// `X-Client-Proto`: SMTP, ESMTP or LMTP.
    pub client_proto: String,
    /// `X-Helo-Args`: the argument of the last HELO/EHLO, if one was sent.
    pub helo_args: Option<String>,
    /// `X-Mail-Args`: everything after "MAIL FROM:", e.g. "<a@b.test> BODY=8BITMIME".
    pub mail_args: String,
    /// `X-Rcpt-Args`: everything after "RCPT TO:", one per RCPT, in the order sent. smtp-sink
    /// accepts every RCPT unless `-r`/`-f RCPT` is given.
    pub rcpt_args: Vec<String>,
    /// The message as received, LF line ends (see above).
    pub content: Vec<u8>,
}

impl SinkDump {
    /// Parses a dump: the `X-*` records, the three-line `Received:` header smtp-sink adds, then
    /// the message. Assumes no `-S` start string.
    pub fn parse(bytes: &[u8]) -> Result<SinkDump, String> {
        let mut dump = SinkDump {
            client_addr: String::new(),
            client_proto: String::new(),
            helo_args: None,
            mail_args: String::new(),
            rcpt_args: Vec::new(),
            content: Vec::new(),
        };
        let mut rest = bytes;
        loop {
            let end = rest
                .iter()
                .position(|&b| b == b'\n')
                .ok_or("dump ends inside its headers")?;
            let line = String::from_utf8_lossy(&rest[..end]).into_owned();
            rest = &rest[end + 1..];
            let (name, value) = line
                .split_once(": ")
                .ok_or_else(|| format!("unexpected dump header line {line:?}"))?;
            match name {
                "X-Client-Addr" => dump.client_addr = value.to_string(),
                "X-Client-Proto" => dump.client_proto = value.to_string(),
                "X-Helo-Args" => dump.helo_args = Some(value.to_string()),
                "X-Mail-Args" => dump.mail_args = value.to_string(),
                "X-Rcpt-Args" => dump.rcpt_args.push(value.to_string()),
                "Received" => break,
                _ => return Err(format!("unexpected dump header {name:?}")),
            }
        }
        // The rest of the Received header: "\tby HOST (smtp-sink) with PROTO id ID;" and
        // "\tDATE".
        for _ in 0..2 {
            if rest.first() != Some(&b'\t') {
                return Err("Received header of the dump is not three lines".into());
            }
            let end = rest
                .iter()
                .position(|&b| b == b'\n')
                .ok_or("dump ends inside its Received header")?;
            rest = &rest[end + 1..];
        }
        let content = rest
            .strip_suffix(b"\n")
            .ok_or("dump has no final empty line: transaction still in progress?")?;
        dump.content = content.to_vec();
        Ok(dump)
    }
}

// ------------------------------------------------------------------------------------------------
// aiosmtpd capture server

/// The Python that has aiosmtpd: `$MXPIPE_TEST_PYTHON`, else `tests/.venv/bin/python`.
pub fn test_python() -> PathBuf {
    if let Some(p) = std::env::var_os("MXPIPE_TEST_PYTHON").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let venv = repo_root().join("tests/.venv/bin/python");
    if venv.exists() {
        return venv;
    }
    panic!(
        "no Python with aiosmtpd: MXPIPE_TEST_PYTHON is unset and {} is missing; \
         run tests/run.sh first",
        venv.display()
    );
}

/// A message the capture server accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    /// 1-based, in the order the server accepted the messages.
    pub seq: u32,
    /// The reverse-path without angle brackets; "<>" for the null sender.
    pub mail_from: String,
    pub rcpt_tos: Vec<String>,
    /// MAIL FROM parameters as aiosmtpd records them: upper-cased, e.g. "BODY=8BITMIME".
    pub mail_options: Vec<String>,
    pub rcpt_options: Vec<String>,
    /// The message exactly as received after dot-unstuffing, CRLF line ends kept.
    pub data: Vec<u8>,
    /// Whether the transaction ran over TLS (STARTTLS or implicit).
    pub tls: bool,
    /// The user name of a successful AUTH on this connection.
    pub auth_login: Option<String>,
    /// The HELO/EHLO argument.
    pub helo: Option<String>,
}

/// Options for [`CaptureServer`], mirroring the flags of `tests/servers/capture_server.py`.
#[derive(Debug, Clone)]
pub struct CaptureServerBuilder {
    host: String,
    port: u16,
    args: Vec<OsString>,
}

impl CaptureServerBuilder {
    /// Listen address (default 127.0.0.1).
    pub fn host(mut self, ip: &str) -> Self {
        self.host = ip.to_string();
        self
    }

    /// Port (default 0: the server picks a free one).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    fn flag(mut self, flag: &str) -> Self {
        self.args.push(flag.into());
        self
    }

    fn option(mut self, flag: &str, value: impl Into<OsString>) -> Self {
        self.args.push(flag.into());
        self.args.push(value.into());
        self
    }

    /// Answer `550 5.1.1 User unknown` to recipients containing `substring` (repeatable).
    pub fn reject_rcpt(self, substring: &str) -> Self {
        self.option("--reject-rcpt", substring)
    }

    /// Answer `450 4.2.1 Mailbox temporarily unavailable` to recipients containing `substring`
    /// (repeatable).
    pub fn tempfail_rcpt(self, substring: &str) -> Self {
        self.option("--tempfail-rcpt", substring)
    }

    /// Answer `451 4.3.0` to the first `n` transactions that reach the end of DATA.
    pub fn tempfail_first(self, n: u32) -> Self {
        self.option("--tempfail-first", n.to_string())
    }

    /// Drop the connection when a message's content has arrived, without replying to the dot.
    pub fn close_in_data(self) -> Self {
        self.flag("--close-in-data")
    }

    /// Require AUTH (PLAIN or LOGIN) with these credentials before MAIL (530 otherwise).
    /// Without TLS options AUTH is offered in the clear; with STARTTLS only after it.
    pub fn auth(self, user: &str, pass: &str) -> Self {
        self.option("--auth-user", user).option("--auth-pass", pass)
    }

    /// With [`auth`](Self::auth): do not offer this SASL mechanism (e.g. "PLAIN").
    pub fn auth_exclude(self, mechanism: &str) -> Self {
        self.option("--auth-exclude", mechanism)
    }

    /// Offer STARTTLS with this certificate chain and key (see [`TestCert`]).
    pub fn tls(self, cert: &Path, key: &Path) -> Self {
        self.option("--tls-cert", cert.as_os_str())
            .option("--tls-key", key.as_os_str())
    }

    /// With [`tls`](Self::tls): answer `530 Must issue a STARTTLS command first` before STARTTLS.
    pub fn require_starttls(self) -> Self {
        self.flag("--require-starttls")
    }

    /// With [`tls`](Self::tls): TLS from the first byte (RFC 8314) instead of STARTTLS.
    pub fn implicit_tls(self) -> Self {
        self.flag("--implicit-tls")
    }

    /// The SIZE limit (default 64 MiB; 0 = none). Larger messages get `552`.
    pub fn size_limit(self, bytes: u64) -> Self {
        self.option("--size-limit", bytes.to_string())
    }

    /// Starts the server and waits for it to listen.
    pub fn start(self) -> CaptureServer {
        CaptureServer::spawn(self)
    }
}

/// The `aiosmtpd` capture server (`tests/servers/capture_server.py`) as a child process: it
/// keeps every accepted message with its envelope, byte for byte.
///
/// Advertises SIZE (64 MiB unless set), 8BITMIME, SMTPUTF8, and STARTTLS/AUTH when configured;
/// no PIPELINING, no CHUNKING. It refuses MAIL parameters other than SIZE/BODY/SMTPUTF8 and every
/// RCPT parameter (DSN's NOTIFY=, ORCPT=) with 555, and lines over 1,000 bytes plus CRLF with
/// 500 after the dot. About 1,600 messages/s: for correctness, not throughput.
pub struct CaptureServer {
    child: Child,
    // Held open so the server sees EOF on stdin, and stops, if this process dies without Drop.
    _stdin: ChildStdin,
    addr: SocketAddr,
    dir: PathBuf,
}

impl CaptureServer {
    /// A server with default options on 127.0.0.1 and a free port.
    pub fn start() -> CaptureServer {
        CaptureServer::builder().start()
    }

    /// Options first, then [`CaptureServerBuilder::start`].
    pub fn builder() -> CaptureServerBuilder {
        CaptureServerBuilder {
            host: "127.0.0.1".to_string(),
            port: 0,
            args: Vec::new(),
        }
    }

    fn spawn(options: CaptureServerBuilder) -> CaptureServer {
        let python = test_python();
        let script = repo_root().join("tests/servers/capture_server.py");
        let dir = fresh_temp_dir("capture");
        let out = dir.join("out");
        let log_path = dir.join("server.log");
        let log = fs::File::create(&log_path).expect("create capture server log");
        let mut child = Command::new(&python)
            .arg(&script)
            .arg("--host")
            .arg(&options.host)
            .arg("--port")
            .arg(options.port.to_string())
            .arg("--out")
            .arg(&out)
            .arg("--stop-on-stdin-eof")
            .args(&options.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} {}: {e}", python.display(), script.display()));
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");

        // Read the READY line on a thread so the wait is bounded; the thread then drains stdout
        // until the server exits.
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let line = rx.recv_timeout(PYTHON_START_TIMEOUT).unwrap_or_default();
        let port = line
            .strip_prefix("READY ")
            .and_then(|p| p.trim().parse::<u16>().ok());
        let Some(port) = port else {
            kill_and_reap(&mut child);
            let log = read_log(&log_path);
            let _ = fs::remove_dir_all(&dir);
            panic!(
                "capture server did not print READY <port> within {PYTHON_START_TIMEOUT:?} \
                 (got {line:?}); its stderr:\n{log}"
            );
        };
        let ip: IpAddr = options
            .host
            .parse()
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        CaptureServer {
            child,
            _stdin: stdin,
            addr: SocketAddr::new(ip, port),
            dir,
        }
    }

    /// Where the server listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The directory the server writes `<seq:06>.eml` and `<seq:06>.json` into.
    pub fn out_dir(&self) -> PathBuf {
        self.dir.join("out")
    }

    /// What the server wrote to stderr (errors and tracebacks).
    pub fn log(&self) -> String {
        read_log(&self.dir.join("server.log"))
    }

    /// Every message accepted so far, by sequence number.
    pub fn messages(&self) -> Vec<Captured> {
        let out = self.out_dir();
        let mut seqs: Vec<u32> = match fs::read_dir(&out) {
            Ok(entries) => entries
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().into_string().ok()?;
                    name.strip_suffix(".json")?.parse().ok()
                })
                .collect(),
            Err(_) => Vec::new(), // not created yet: nothing accepted
        };
        seqs.sort_unstable();
        seqs.into_iter()
            .map(|seq| read_captured(&out, seq))
            .collect()
    }

    /// Waits until at least `n` messages have been accepted and returns them all; panics after
    /// `timeout` with what did arrive and the server's stderr.
    pub fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<Captured> {
        let deadline = Instant::now() + timeout;
        loop {
            let messages = self.messages();
            if messages.len() >= n {
                return messages;
            }
            if Instant::now() > deadline {
                panic!(
                    "capture server got {} of {n} messages within {timeout:?}: {:?}\nits stderr:\n{}",
                    messages.len(),
                    messages
                        .iter()
                        .map(|m| (&m.mail_from, &m.rcpt_tos))
                        .collect::<Vec<_>>(),
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for CaptureServer {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn read_captured(out: &Path, seq: u32) -> Captured {
    let json_path = out.join(format!("{seq:06}.json"));
    let eml_path = out.join(format!("{seq:06}.eml"));
    let text = fs::read_to_string(&json_path)
        .unwrap_or_else(|e| panic!("read {}: {e}", json_path.display()));
    let meta: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("parse {}: {e}", json_path.display()));
    let data = fs::read(&eml_path).unwrap_or_else(|e| panic!("read {}: {e}", eml_path.display()));
    let string = |key: &str| meta[key].as_str().map(str::to_string);
    let strings = |key: &str| -> Vec<String> {
        meta[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let size = meta["size"].as_u64();
    assert_eq!(
        size,
        Some(data.len() as u64),
        "{} disagrees with {}",
        json_path.display(),
        eml_path.display()
    );
    Captured {
        seq,
        mail_from: string("mail_from").unwrap_or_default(),
        rcpt_tos: strings("rcpt_tos"),
        mail_options: strings("mail_options"),
        rcpt_options: strings("rcpt_options"),
        data,
        tls: meta["tls"].as_bool().unwrap_or(false),
        auth_login: string("auth_login"),
        helo: string("helo"),
    }
}

/// A throwaway CA and a server certificate it signed (`tests/servers/make_cert.py`), for
/// localhost, 127.0.0.1 and ::1. Removed on drop.
pub struct TestCert {
    dir: PathBuf,
}

impl TestCert {
    pub fn generate() -> TestCert {
        let dir = fresh_temp_dir("cert");
        let script = repo_root().join("tests/servers/make_cert.py");
        let out = Command::new(test_python())
            .arg(&script)
            .arg("--out")
            .arg(&dir)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
        if !out.status.success() {
            let _ = fs::remove_dir_all(&dir);
            panic!(
                "make_cert.py failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        TestCert { dir }
    }

    /// The CA certificate (PEM) a client should trust.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The server certificate (PEM).
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    /// The server's private key (PEM, PKCS#8).
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
}

impl Drop for TestCert {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

// ------------------------------------------------------------------------------------------------
// SMTP by hand

/// One SMTP reply: the code and the text of each line (without code and separator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    /// All lines joined with "\n", for `contains` checks.
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
}

/// A plain-TCP SMTP client for tests that script the conversation byte by byte, independent of
/// the crate's own client. Every read has a 10 s timeout.
pub struct RawSmtpClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl RawSmtpClient {
    /// Connects and reads the greeting, which must be 220.
    pub fn connect(addr: SocketAddr) -> RawSmtpClient {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("set read timeout");
        let writer = stream.try_clone().expect("clone stream");
        let mut client = RawSmtpClient {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = client.read_reply();
        assert_eq!(greeting.code, 220, "greeting from {addr}: {greeting:?}");
        client
    }

    /// Writes the bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("write to server");
    }

    /// Sends `line` + CRLF and reads one reply.
    pub fn command(&mut self, line: &str) -> Reply {
        self.send_raw(format!("{line}\r\n").as_bytes());
        self.read_reply()
    }

    /// Reads one (possibly multi-line) reply.
    pub fn read_reply(&mut self) -> Reply {
        let mut lines = Vec::new();
        loop {
            let mut raw = Vec::new();
            self.reader
                .read_until(b'\n', &mut raw)
                .expect("read reply line");
            assert!(
                raw.ends_with(b"\r\n"),
                "reply line not ended by CRLF (connection closed?): {:?}",
                String::from_utf8_lossy(&raw)
            );
            let line = String::from_utf8_lossy(&raw[..raw.len() - 2]).into_owned();
            let code: u16 = line
                .get(..3)
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| panic!("bad reply line {line:?}"));
            let more = line.as_bytes().get(3) == Some(&b'-');
            lines.push(line.get(4..).unwrap_or("").to_string());
            if !more {
                return Reply { code, lines };
            }
        }
    }

    /// Whether the server has closed the connection (reads EOF, or a reset, within the read
    /// timeout).
    pub fn is_closed_by_server(&mut self) -> bool {
        let mut buf = [0u8; 1];
        matches!(self.reader.read(&mut buf), Ok(0) | Err(_))
    }
}

/// Dot-stuffs `body` for DATA (RFC 5321 section 4.5.2) and appends the terminating
/// `CRLF.CRLF`. `body` must use CRLF line ends; a body not ending in CRLF gets one.
pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 8);
    let mut at_line_start = true;
    for &b in body {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    if !body.is_empty() && !body.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

// ------------------------------------------------------------------------------------------------
// A scripted SMTP server, for faults no real server can be told to produce

/// An SMTP server in a thread of the test that answers from a script: `greeting` on connect,
/// then every command line goes to `answer`, which returns the reply to write (CRLF-ended
/// lines, possibly several replies in one write; empty to go silent until the client hangs up) or `None` to hang up.
/// After a reply starting with 354 the content is read up to its final dot, and `answer(".")`
/// gives the reply to it. `QUIT` is always
/// answered with 221 and a close. Everything each connection sent is kept, for tests that
/// check how the client ended a session. Connections are served one at a time; the server
/// stops when the handle drops.
pub struct ScriptedSmtpServer {
    addr: SocketAddr,
    sessions: std::sync::Arc<Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl ScriptedSmtpServer {
    pub fn start(
        greeting: &str,
        answer: impl Fn(&str) -> Option<String> + Send + 'static,
    ) -> ScriptedSmtpServer {
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("local_addr");
        let sessions = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let greeting = greeting.to_string();
        let (sessions2, stop2) = (Arc::clone(&sessions), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let stream = match listener.accept() {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                let received = serve_scripted(stream, &greeting, &answer);
                sessions2
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(received);
            }
        });
        ScriptedSmtpServer {
            addr,
            sessions,
            stop,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What each finished connection sent, in order.
    pub fn sessions(&self) -> Vec<String> {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits up to 10 s for `n` connections to have ended and returns what they sent.
    pub fn wait_sessions(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.sessions().len() < n && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        self.sessions()
    }
}

fn serve_scripted(
    stream: TcpStream,
    greeting: &str,
    answer: &dyn Fn(&str) -> Option<String>,
) -> String {
    let mut received = String::new();
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(mut writer) = stream.try_clone() else {
        return received;
    };
    let mut reader = BufReader::new(stream);
    if writer.write_all(greeting.as_bytes()).is_err() {
        return received;
    }
    loop {
        let mut line = Vec::new();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return received,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&line).into_owned();
        received.push_str(&line);
        let command = line.trim_end_matches(['\r', '\n']);
        if command.eq_ignore_ascii_case("QUIT") {
            let _ = writer.write_all(b"221 2.0.0 Bye\r\n");
            return received;
        }
        let Some(mut reply) = answer(command) else {
            return received;
        };
        if reply.is_empty() {
            // A peer gone silent: whatever follows is read and never answered.
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest);
            received.push_str(&String::from_utf8_lossy(&rest));
            return received;
        }
        if reply.starts_with("354") {
            if writer.write_all(reply.as_bytes()).is_err() {
                return received;
            }
            // The content, up to and including its final dot, is kept with the commands.
            loop {
                let mut line = Vec::new();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => return received,
                    Ok(_) => {}
                }
                received.push_str(&String::from_utf8_lossy(&line));
                if line == b".\r\n" {
                    break;
                }
            }
            let Some(end) = answer(".") else {
                return received;
            };
            reply = end;
        }
        if writer.write_all(reply.as_bytes()).is_err() {
            return received;
        }
    }
}

impl Drop for ScriptedSmtpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
