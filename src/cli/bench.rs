//! `mxpipe bench`: end-to-end throughput over loopback to a sink (the built-in one in a child
//! process by default), ending with one parseable `result` line.
//!
//! This module measures; it must not change how the engine delivers.

use super::options::{serve_metrics, DeliveryArgs};
use super::{raise_fd_limit, CliResult};
use mxpipe::engine::Dispatcher;
use mxpipe::message::{Address, Body, Message};
use mxpipe::queue::RetryPolicy;
use std::io::{BufRead, BufReader};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A body of about `size` bytes: headers and 76-column lines.
pub(crate) fn bench_body(size: usize) -> Vec<u8> {
    let mut body = b"From: bench@mxpipe.example\r\nTo: sink@mxpipe.example\r\nSubject: mxpipe bench\r\nMessage-ID: <bench@mxpipe.example>\r\n\r\n".to_vec();
    let line =
        b"The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.\r\n";
    while body.len() + line.len() <= size.max(body.len() + line.len()) && body.len() < size {
        body.extend_from_slice(line);
    }
    body
}

pub(crate) struct ChildSink {
    pub(crate) child: std::process::Child,
    pub(crate) addr: String,
}

impl ChildSink {
    fn start(tls: bool) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut command = std::process::Command::new(exe);
        command.arg("bench-sink");
        if tls {
            command.arg("--tls");
        }
        let mut child = command
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the sink: {e}"))?;
        let stdout = child.stdout.take().expect("piped");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| format!("sink: {e}"))?;
        Ok(ChildSink {
            child,
            addr: line.trim().to_string(),
        })
    }
}

impl Drop for ChildSink {
    fn drop(&mut self) {
        // Closing stdin tells the sink to stop; wait for it so no process is left behind.
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

pub(crate) fn rusage_self() -> (Duration, u64) {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (
        tv(usage.ru_utime) + tv(usage.ru_stime),
        usage.ru_maxrss as u64,
    )
}

/// When each destination had its first delivery, sampled every 200 ms by a thread of its own.
pub(crate) struct FirstDeliveries {
    pub(crate) stop: Arc<std::sync::atomic::AtomicBool>,
    pub(crate) thread: std::thread::JoinHandle<Vec<Duration>>,
}

impl FirstDeliveries {
    fn start(dispatcher: Arc<Dispatcher>, start: Instant) -> FirstDeliveries {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = Arc::clone(&stop);
            move || {
                let mut first: std::collections::HashMap<String, Duration> = Default::default();
                loop {
                    let last = stop.load(std::sync::atomic::Ordering::Acquire);
                    let now = start.elapsed();
                    for d in dispatcher.destination_stats() {
                        if d.delivered > 0 && !first.contains_key(&d.name) {
                            first.insert(d.name, now);
                        }
                    }
                    if last {
                        return first.into_values().collect();
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        });
        FirstDeliveries { stop, thread }
    }

    /// Every destination served so far: the time of its first delivery (to within 200 ms).
    fn finish(self) -> Vec<Duration> {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.thread.join().unwrap_or_default()
    }
}

pub(crate) struct BenchArgs {
    pub(crate) messages: u64,
    pub(crate) size: usize,
    pub(crate) connections: usize,
    pub(crate) to: Option<String>,
    pub(crate) recipients: usize,
    pub(crate) loops: usize,
    pub(crate) messages_per_connection: Option<u32>,
    pub(crate) tls: bool,
    pub(crate) domains: usize,
    /// A slow destination and how many messages go there beside the measured ones.
    pub(crate) tarpit: Option<(String, u64)>,
    /// Every message gets a body of its own (default: one body shared by all).
    pub(crate) unique_bodies: bool,
    /// Every message gets recipients of its own (default: the same list for all).
    pub(crate) distinct_recipients: bool,
    pub(crate) delivery: DeliveryArgs,
}

/// The domain whose recipients `bench --tarpit` routes to the tarpit.
pub(crate) const TARPIT_DOMAIN: &str = "tarpit.bench.test";

/// A destination's name in the metrics: its target without `smtp://`; implicit TLS keeps its
/// `smtps://` (see `route::Target`).
pub(crate) fn destination_name(target: &str) -> &str {
    target.strip_prefix("smtp://").unwrap_or(target)
}

/// Recipients with a final outcome, and recipients delivered.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Tally {
    pub(crate) finals: u64,
    pub(crate) delivered: u64,
}

/// The outcomes so far at the measured destinations, and at the tarpit (none without one).
pub(crate) fn tally(dispatcher: &Dispatcher, tarpit: Option<&str>) -> (Tally, Tally) {
    // The loop counts an outcome for its destination before the global one, so the global
    // counters are read first: an outcome caught in between undercounts the measured side
    // rather than stopping the clock early.
    let s = dispatcher.stats();
    let at_tarpit = tarpit
        .and_then(|name| {
            dispatcher
                .destination_stats()
                .into_iter()
                .find(|d| d.name == name)
        })
        .map_or(Tally::default(), |d| Tally {
            finals: d.delivered + d.bounced + d.expired,
            delivered: d.delivered,
        });
    let measured = Tally {
        finals: (s.delivered + s.bounced + s.expired).saturating_sub(at_tarpit.finals),
        delivered: s.delivered.saturating_sub(at_tarpit.delivered),
    };
    (measured, at_tarpit)
}

pub(crate) fn run_bench(args: BenchArgs) -> CliResult {
    let BenchArgs {
        messages,
        size,
        connections,
        recipients,
        loops,
        ..
    } = args;
    if messages == 0 || recipients == 0 || args.domains == 0 {
        return Err("--messages, --recipients and --domains must be at least 1".into());
    }
    raise_fd_limit();
    let direct = args.delivery.direct_mx;
    let sink = match (&args.to, direct) {
        (None, false) => Some(ChildSink::start(args.tls)?),
        _ => None,
    };
    let mut builder = args.delivery.base_builder()?;
    let mut relay = None;
    if !direct {
        let target = args
            .to
            .clone()
            .unwrap_or_else(|| sink.as_ref().expect("started").addr.clone());
        builder = builder.relay(&target);
        relay = Some(target);
    }
    let tarpit = args
        .tarpit
        .as_ref()
        .map(|(target, _)| destination_name(target));
    if let Some((target, _)) = &args.tarpit {
        if tarpit == relay.as_deref().map(destination_name) {
            return Err("--tarpit must be another server than the one measured".into());
        }
        builder = builder.route(TARPIT_DOMAIN, target);
    }
    let mut builder = args.delivery.apply(builder)?;
    if args.tls && args.delivery.tls_verify.is_none() {
        // The built-in sink's benchmark certificate is self-signed: encrypt without verifying.
        builder = builder.tls_verify(false);
    }
    let dispatcher = builder
        // A benchmark reports failures; it does not wait days for retries.
        .retry(RetryPolicy {
            initial: Duration::from_secs(1),
            max_age: Duration::from_secs(30),
            ..RetryPolicy::default()
        })
        .ehlo_name("bench.mxpipe.example")
        .max_connections_per_destination(connections)
        .max_messages_per_connection(args.messages_per_connection.unwrap_or(u32::MAX))
        .record_events(false)
        .loops(loops)
        .start()
        .map_err(|e| e.to_string())?;
    let dispatcher = Arc::new(dispatcher);
    if let Some(addr) = args.delivery.metrics {
        serve_metrics(addr, &dispatcher)?;
    }
    let body = Arc::new(Body::new(&bench_body(size)).map_err(|e| e.to_string())?);
    let sender =
        Address::parse("bench@mxpipe.example", mxpipe::error::Field::Sender).expect("valid");
    // One recipient list per domain (a single one without --direct-mx), or with
    // --distinct-recipients one per message, in the same domains in turn.
    let list = |d: usize, prefix: &str| -> Vec<Address> {
        let domain = if direct {
            format!("d{d}.bench.test")
        } else {
            "sink.example".to_string()
        };
        (0..recipients)
            .map(|i| {
                Address::parse(
                    &format!("user{prefix}{i}@{domain}"),
                    mxpipe::error::Field::Recipient(i),
                )
                .expect("valid")
            })
            .collect()
    };
    let mut lists: Vec<Vec<Address>> = if args.distinct_recipients {
        (0..messages as usize)
            .map(|n| list(n % args.domains, &format!("{n}.")))
            .collect()
    } else {
        (0..args.domains).map(|d| list(d, "")).collect()
    };
    let tarpit_rcpt = Address::parse(
        &format!("user@{TARPIT_DOMAIN}"),
        mxpipe::error::Field::Recipient(0),
    )
    .expect("valid");
    let tarpit_messages = args.tarpit.as_ref().map_or(0, |&(_, n)| n);
    let mut tarpit_submitted = 0u64;
    let (cpu0, _) = rusage_self();
    let start = Instant::now();
    let first_deliveries =
        (args.domains > 1).then(|| FirstDeliveries::start(Arc::clone(&dispatcher), start));
    for n in 0..messages {
        // The tarpit's messages are spread evenly over the measured ones.
        while tarpit_submitted < tarpit_messages
            && tarpit_submitted * messages <= n * tarpit_messages
        {
            let m =
                Message::from_parts(sender.clone(), vec![tarpit_rcpt.clone()], Arc::clone(&body))
                    .map_err(|e| e.to_string())?;
            dispatcher
                .submit_timeout(m, Duration::from_secs(60))
                .map_err(|e| e.to_string())?;
            tarpit_submitted += 1;
        }
        let rcpts = if args.distinct_recipients {
            std::mem::take(&mut lists[n as usize])
        } else {
            lists[n as usize % lists.len()].clone()
        };
        let body = if args.unique_bodies {
            Arc::new(Body::new(&unique_body(&body, n)).map_err(|e| e.to_string())?)
        } else {
            Arc::clone(&body)
        };
        let m = Message::from_parts(sender.clone(), rcpts, body).map_err(|e| e.to_string())?;
        dispatcher
            .submit_timeout(m, Duration::from_secs(60))
            .map_err(|e| e.to_string())?;
    }
    let submitted_in = start.elapsed();
    let limit = Duration::from_secs(600);
    let not_final = || format!("bench: not every message was final after {limit:?}");
    let wanted = messages * recipients as u64;
    // With a tarpit the clock stops when the other destinations' recipients are final: they
    // must not wait for it.
    if tarpit.is_some() {
        while tally(&dispatcher, tarpit).0.finals < wanted {
            if start.elapsed() > limit {
                return Err(not_final());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    } else {
        // Progress on stderr every 10 s, so that a long run shows where it stands.
        while !dispatcher.wait_final(Duration::from_secs(10)) {
            let s = dispatcher.stats();
            eprintln!(
                "bench: {:.0} s: delivered={} deferred={} bounced={} unfinished={} connections_open={}",
                start.elapsed().as_secs_f64(),
                s.delivered,
                s.deferred,
                s.bounced,
                s.in_flight,
                s.connections_open
            );
            if start.elapsed() > limit {
                return Err(not_final());
            }
        }
    }
    let elapsed = start.elapsed();
    let (cpu1, peak_rss_kb) = rusage_self();
    if let Some(spool) = dispatcher.spool_stats() {
        use std::sync::atomic::Ordering::Relaxed;
        let fsyncs = spool.fsyncs.load(Relaxed);
        println!(
            "spool fsyncs={fsyncs} fsyncs_per_s={:.0} messages_per_fsync={:.1} checkpoints={} checkpoint_octets_per_recipient={:.1}",
            fsyncs as f64 / elapsed.as_secs_f64(),
            spool.messages.load(Relaxed) as f64 / fsyncs.max(1) as f64,
            spool.checkpoints.load(Relaxed),
            spool.checkpoint_bytes.load(Relaxed) as f64
                / spool.checkpoints.load(Relaxed).max(1) as f64
        );
    }
    let (measured, at_tarpit) = tally(&dispatcher, tarpit);
    let s = dispatcher.stats();
    let destinations = dispatcher.destination_stats().len();
    if let Some(first) = first_deliveries {
        // Starvation shows as destinations whose first delivery comes late.
        let mut times = first.finish();
        times.sort_unstable();
        let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize].as_secs_f64();
        if !times.is_empty() {
            println!(
                "fairness destinations_served={} first_delivery_s p50={:.1} p99={:.1} max={:.1} of total_s={:.1}",
                times.len(),
                at(0.5),
                at(0.99),
                at(1.0),
                elapsed.as_secs_f64()
            );
        }
    }
    if tarpit.is_some() {
        println!(
            "tarpit messages={tarpit_messages} final={} abandoned={}",
            at_tarpit.finals,
            tarpit_messages - at_tarpit.finals
        );
        // Dropping the dispatcher would wait for the tarpit (shutdown flushes first). A
        // benchmark does not: its messages are abandoned, and the loops end with the process.
        std::mem::forget(dispatcher);
    } else {
        drop(dispatcher);
    }
    drop(sink);
    let cpu = cpu1 - cpu0;
    // Diagnostics on their own line; the result line keeps its fixed form for scripts.
    println!(
        "loop longest_turn_us={} submitted_in_ms={} destinations={destinations} transactions={} connections_per_s={:.0} recipients_per_s={:.0}",
        s.longest_turn_us,
        submitted_in.as_millis(),
        s.transactions,
        s.connections_opened as f64 / elapsed.as_secs_f64(),
        measured.delivered as f64 / elapsed.as_secs_f64()
    );
    println!(
        "result messages={messages} delivered={} msgs_per_s={:.0} cpu_us_per_msg={:.2} peak_rss_kb={peak_rss_kb} connections={}",
        measured.delivered / recipients as u64,
        messages as f64 / elapsed.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / messages as f64,
        s.connections_opened,
    );
    Ok(if measured.delivered == wanted {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The shared bench body with a header naming message `n`: as large, but a body of its own.
fn unique_body(shared: &Body, n: u64) -> Vec<u8> {
    let mut content = format!("X-Bench-Message: {n}\r\n").into_bytes();
    content.extend_from_slice(shared.as_bytes());
    content
}
