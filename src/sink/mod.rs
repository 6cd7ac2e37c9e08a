//! mxpipe's own SMTP sink: a fast, scriptable receiving server for benchmarks and tests.
//!
//! `mxpipe sink` and `mxpipe bench` use it as the throughput target, so it is built to cost the
//! machine little: one `mio` thread, one read and one write per pipelined batch, content
//! scanned in place and not copied unless it is captured. Integration tests use it as a server
//! whose failures can be scripted ([`Faults`]) and whose received messages can be checked on
//! disk ([`SinkConfig::capture_dir`]). It speaks the receiving side of RFC 5321 with PIPELINING
//! (RFC 2920), CHUNKING (RFC 3030), SIZE (RFC 1870) and 8BITMIME (RFC 6152), and, when given a
//! certificate ([`SinkConfig::tls`]), STARTTLS (RFC 3207) or implicit TLS (RFC 8314). It is not
//! a mail server: it must not relay, store anything outside the capture directory, or offer
//! AUTH.
//!
//! ```no_run
//! use mxpipe::sink::{Sink, SinkConfig};
//!
//! let sink = Sink::start(SinkConfig::default())?;
//! println!("listening on {}", sink.local_addr());
//! let stats = sink.stop();
//! println!("{} messages", stats.messages);
//! # Ok::<(), std::io::Error>(())
//! ```

mod capture;
mod policy;
#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::thread::JoinHandleExt as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use mio::Waker;

use crate::server::listener::Server;
use crate::server::{tls, Counters, Settings};
use policy::SinkPolicy;

/// How a sink listens and what it advertises.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Where to listen; port 0 picks a free port (see [`SinkHandle::local_addr`]).
    pub listen: SocketAddr,
    /// More addresses served by the same loop, as if by one host with several addresses
    /// (a benchmark's MX hosts on 127.0.0.2, .3, ...). Their ports are used as given.
    pub also_listen: Vec<SocketAddr>,
    /// The name in the greeting and in the EHLO/HELO reply.
    pub hostname: String,
    /// When set, every accepted message is written there as `<seq:08>.eml` (the content after
    /// dot-stuffing is undone) and then `<seq:08>.json` (the envelope: `mail_from`, `rcpt_to`,
    /// `mail_params`, `via` = "DATA" or "BDAT", `size` of the `.eml`). The JSON appears last,
    /// by rename: wait for it. `seq` starts at 1 and is also the queue id in the 250 reply.
    pub capture_dir: Option<PathBuf>,
    /// The advertised SIZE (RFC 1870); larger messages get 552 5.3.4.
    pub max_size: usize,
    /// Advertise CHUNKING (BDAT is answered either way).
    pub chunking: bool,
    /// Advertise PIPELINING (commands are batched either way).
    pub pipelining: bool,
    /// Scripted misbehaviour, for tests.
    pub faults: Faults,
    /// Offer STARTTLS, or speak TLS from the first octet, with this certificate. `None`: plain
    /// SMTP only, and STARTTLS is answered 502.
    pub tls: Option<SinkTls>,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            also_listen: Vec::new(),
            hostname: "mxpipe-sink".to_owned(),
            capture_dir: None,
            max_size: 50 * 1024 * 1024,
            chunking: true,
            pipelining: true,
            faults: Faults::default(),
            tls: None,
        }
    }
}

/// The sink's TLS certificate, and how TLS starts.
#[derive(Clone)]
pub struct SinkTls {
    /// PEM: the server certificate first, then any intermediates.
    pub cert_chain_pem: Vec<u8>,
    /// PEM: the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: Vec<u8>,
    /// TLS from the first octet, as on port 465 (RFC 8314 3.3), with no STARTTLS offered.
    /// Otherwise the connection starts in plaintext and EHLO offers STARTTLS (RFC 3207).
    pub implicit: bool,
}

impl SinkTls {
    /// A fixed, self-signed certificate for `localhost`, 127.0.0.1 and ::1 (ECDSA P-256, valid
    /// from 2025 to 2125), with STARTTLS; set `implicit` for implicit TLS. It is checked in as
    /// `src/sink/bench_cert.pem` and `bench_key.pem` and compiled in, so that `mxpipe bench`
    /// can measure TLS without any files.
    ///
    /// For benchmarks and tests only: the private key is public, so the certificate proves
    /// nothing. A client must trust it explicitly (its PEM is
    /// [`cert_chain_pem`](SinkTls::cert_chain_pem)) or not verify. Never use it for real mail.
    pub fn self_signed_for_benchmarks() -> SinkTls {
        SinkTls {
            cert_chain_pem: include_bytes!("bench_cert.pem").to_vec(),
            key_pem: include_bytes!("bench_key.pem").to_vec(),
            implicit: false,
        }
    }
}

/// Shows the certificate's size but never the private key, so that configurations can be
/// logged.
impl fmt::Debug for SinkTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SinkTls")
            .field(
                "cert_chain_pem",
                &format_args!("{} octets", self.cert_chain_pem.len()),
            )
            .field("key_pem", &format_args!("<hidden>"))
            .field("implicit", &self.implicit)
            .finish()
    }
}

/// Scripted misbehaviour. The default is a well-behaved server.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// The whole greeting, one or more lines without line endings, instead of
    /// `220 <host> ESMTP mxpipe-sink`. A 421 greeting closes the connection; any other
    /// non-2xx one (554) is followed by 503 to every command but QUIT (RFC 5321 3.1).
    pub greeting: Option<String>,
    /// Raw octets sent right after the greeting, in the same write (response injection).
    pub after_greeting: Option<Vec<u8>>,
    /// RCPT of an address containing any of these gets
    /// `550 5.1.1 <addr>: Recipient address rejected: User unknown`.
    pub reject_rcpt: Vec<String>,
    /// RCPT of an address containing any of these gets
    /// `450 4.2.1 <addr>: Mailbox busy, try again later`.
    pub tempfail_rcpt: Vec<String>,
    /// The first N transactions of the sink (over all connections) get
    /// `451 4.3.0 Temporary failure, try again` at the end of their content.
    pub tempfail_first_transactions: u32,
    /// RCPT beyond this many accepted recipients in one transaction gets
    /// `452 4.5.3 Too many recipients`.
    pub max_recipients: Option<usize>,
    /// After N transactions on one connection, the next command gets
    /// `421 4.7.0 closing connection` and the connection is closed.
    pub close_after_transactions: Option<u32>,
    /// Close the connection, without a reply, as soon as message content (DATA or BDAT) starts
    /// to arrive. Replies to the commands before it are still sent.
    pub drop_during_data: bool,
    /// Hold every reply after the greeting this long (a tarpit). Replies to a pipelined batch
    /// are released together; other connections are served meanwhile.
    pub reply_delay: Option<Duration>,
    /// Answer EHLO with `502 5.5.2 Command not recognized`, so the client must use HELO.
    pub no_ehlo: bool,
    /// A connection accepted while this many are open gets the greeting
    /// `421 4.7.0 Too many connections, try again later` and is closed (RFC 5321 3.8). With
    /// implicit TLS that greeting comes after the handshake, as every octet does.
    pub max_connections: Option<usize>,
}

/// What a sink has received so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SinkStats {
    /// Connections accepted, refused ones included.
    pub connections: u64,
    /// Connections refused with 421 because `Faults::max_connections` were open.
    pub refused_connections: u64,
    /// TLS handshakes completed (STARTTLS or implicit).
    pub tls_handshakes: u64,
    /// Messages accepted (250 at the end of the content).
    pub messages: u64,
    /// Recipients of the accepted messages.
    pub recipients: u64,
    /// Content octets of the accepted messages as they arrived (DATA: still dot-stuffed,
    /// without the final ".CRLF").
    pub bytes: u64,
    /// RCPT commands refused (550, 450 or 452).
    pub rejected_recipients: u64,
}

impl SinkStats {
    fn of(counters: &Counters) -> SinkStats {
        SinkStats {
            connections: counters.connections.load(Ordering::Relaxed),
            refused_connections: counters.refused_connections.load(Ordering::Relaxed),
            tls_handshakes: counters.tls_handshakes.load(Ordering::Relaxed),
            messages: counters.messages.load(Ordering::Relaxed),
            recipients: counters.recipients.load(Ordering::Relaxed),
            bytes: counters.bytes.load(Ordering::Relaxed),
            rejected_recipients: counters.rejected_recipients.load(Ordering::Relaxed),
        }
    }
}

/// The shared server, set up as this sink's configuration says.
fn bind(config: SinkConfig, counters: Arc<Counters>) -> io::Result<Server<SinkPolicy>> {
    let mut settings = Settings::new(&config.hostname, config.max_size as u64);
    settings.pipelining = config.pipelining;
    settings.chunking = config.chunking;
    if let Some(sink_tls) = &config.tls {
        settings.tls = Some(tls::server_config(
            "sink",
            &sink_tls.cert_chain_pem,
            &sink_tls.key_pem,
        )?);
        settings.implicit_tls = sink_tls.implicit;
    }
    let faults = &config.faults;
    settings.greeting = Some(
        faults
            .greeting
            .clone()
            .unwrap_or_else(|| format!("220 {} ESMTP mxpipe-sink", config.hostname)),
    );
    settings.after_greeting = faults.after_greeting.clone();
    settings.no_ehlo = faults.no_ehlo;
    settings.max_recipients = faults.max_recipients;
    settings.close_after_transactions = faults.close_after_transactions;
    settings.drop_during_data = faults.drop_during_data;
    settings.reply_delay = faults.reply_delay;
    settings.max_connections = faults.max_connections;
    settings.keep_content = config.capture_dir.is_some();
    let mut addrs = vec![config.listen];
    addrs.extend_from_slice(&config.also_listen);
    let policy = SinkPolicy::new(&config, Arc::clone(&counters))?;
    Server::bind(&addrs, settings, policy, counters)
}

/// Starts sinks.
pub struct Sink;

impl Sink {
    /// Binds `cfg.listen` and serves on a new thread until the handle is stopped or dropped.
    /// Errors are those of binding, of creating the poller, of creating the capture
    /// directory, or (`InvalidInput`) of a TLS certificate or key that cannot be used.
    pub fn start(cfg: SinkConfig) -> io::Result<SinkHandle> {
        let counters = Arc::new(Counters::default());
        let server = bind(cfg, Arc::clone(&counters))?;
        let local_addr = server.local_addr()?;
        let waker = server.waker();
        let stop = Arc::new(AtomicBool::new(false));
        let final_cpu_nanos = Arc::new(AtomicU64::new(0));
        let thread = std::thread::Builder::new()
            .name("mxpipe-sink".to_owned())
            .spawn({
                let stop = Arc::clone(&stop);
                let final_cpu_nanos = Arc::clone(&final_cpu_nanos);
                move || {
                    let result = server.run(&stop);
                    // The thread's CPU clock disappears with it: keep the last reading.
                    if let Some(cpu) = cpu_time_of(libc::CLOCK_THREAD_CPUTIME_ID) {
                        final_cpu_nanos.store(cpu.as_nanos() as u64, Ordering::Relaxed);
                    }
                    result
                }
            })?;
        Ok(SinkHandle {
            local_addr,
            counters,
            stop,
            waker,
            final_cpu_nanos,
            thread: Some(thread),
        })
    }
}

/// A running sink. Dropping it stops the sink.
pub struct SinkHandle {
    local_addr: SocketAddr,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    final_cpu_nanos: Arc<AtomicU64>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl SinkHandle {
    /// The address the sink listens on, with the port it was given.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The statistics so far.
    pub fn stats(&self) -> SinkStats {
        SinkStats::of(&self.counters)
    }

    /// CPU time (user + system) the sink's thread has used so far, so that a benchmark can
    /// subtract it from the process's CPU time. Read from the thread's CPU clock
    /// (`pthread_getcpuclockid`), which costs the sink thread nothing.
    pub fn cpu_time(&self) -> Duration {
        let live = self.thread.as_ref().and_then(|thread| {
            let mut clock: libc::clockid_t = 0;
            // SAFETY: the pthread_t is valid until the thread is joined, and the JoinHandle that
            // joins it is borrowed here; a thread that has already exited is reported as an
            // error (ESRCH), not undefined behaviour.
            let status = unsafe { libc::pthread_getcpuclockid(thread.as_pthread_t(), &mut clock) };
            if status == 0 {
                cpu_time_of(clock)
            } else {
                None
            }
        });
        live.unwrap_or_else(|| Duration::from_nanos(self.final_cpu_nanos.load(Ordering::Relaxed)))
    }

    /// Stops the sink: closes the listener and every connection, joins the thread, and
    /// returns the final statistics.
    pub fn stop(mut self) -> SinkStats {
        self.shut_down();
        self.stats()
    }

    fn shut_down(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.stop.store(true, Ordering::Release);
            // If waking fails the loop is already gone (it returned an error), so joining
            // does not block.
            let _ = self.waker.wake();
            let _ = thread.join();
        }
    }
}

impl Drop for SinkHandle {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Serves on the calling thread until an IO error ends the loop; prints nothing itself.
/// For `mxpipe sink`.
pub fn run_forever(cfg: SinkConfig) -> io::Result<()> {
    let server = bind(cfg, Arc::new(Counters::default()))?;
    server.run(&AtomicBool::new(false))
}

/// Reads a CPU-time clock.
fn cpu_time_of(clock: libc::clockid_t) -> Option<Duration> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec.
    if unsafe { libc::clock_gettime(clock, &mut now) } != 0 {
        return None;
    }
    Some(Duration::new(now.tv_sec as u64, now.tv_nsec as u32))
}
