//! Heap allocations per message on the send path of a shared-body bulk send, counted by a
//! global allocator that wraps the system's: through the SMTP session alone (no I/O; pipelined
//! BDAT and pipelined DATA, each transaction built as the engine builds it, its recipient list
//! in a buffer the session recycled), and through the event loop to mxpipe's sink in a child process
//! (every thread but the submitting one counts as the engine's; the submitting thread's, which
//! builds each `Message`, are printed apart as the caller's).
//!
//! Run: `cargo bench --bench allocations` (prints one `allocs_per_msg` line per case). With
//! `MXPIPE_ALLOC_SITES=N` (and `MXPIPE_ALLOC_STRIDE=K`: one in every K) it prints the
//! backtraces of N allocations the engine made in steady state.

use mxpipe::engine::Dispatcher;
use mxpipe::error::Field;
use mxpipe::message::{Address, Body, Message};
use mxpipe::smtp::{Session, SessionConfig, SessionEvent, Transaction};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Counts every allocation and reallocation, in total and per thread.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static THREAD_ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    // A backtrace being taken is the bench's own work (resolving symbols allocates a lot).
    if TRACING.try_with(Cell::get).unwrap_or(false) {
        return;
    }
    ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    // `with` can fail while the thread is being torn down; such an allocation still counts
    // in the total.
    let _ = THREAD_ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
    if SITES_LEFT.load(Ordering::Relaxed) > 0 {
        record_site();
    }
}

/// With `MXPIPE_ALLOC_SITES=N`: backtraces of N allocations the engine's threads make in
/// steady state (with `MXPIPE_ALLOC_STRIDE=K`, one in every K, to spread them over the case),
/// printed after the case: how an allocation on the send path is found.
static SITES_LEFT: AtomicU64 = AtomicU64::new(0);
static SITES_STRIDE: AtomicU64 = AtomicU64::new(1);
static SEEN: AtomicU64 = AtomicU64::new(0);
static SITES: Mutex<Vec<String>> = Mutex::new(Vec::new());

thread_local! {
    /// Set on the submitting thread, whose allocations are the caller's.
    static SUBMITTING: Cell<bool> = const { Cell::new(false) };
    /// Set while a backtrace is taken: its own allocations are neither counted nor sites.
    static TRACING: Cell<bool> = const { Cell::new(false) };
}

fn record_site() {
    if SUBMITTING.try_with(Cell::get).unwrap_or(true) {
        return;
    }
    TRACING.with(|t| t.set(true));
    if SEEN
        .fetch_add(1, Ordering::Relaxed)
        .is_multiple_of(SITES_STRIDE.load(Ordering::Relaxed))
        && SITES_LEFT
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    {
        let trace = std::backtrace::Backtrace::force_capture().to_string();
        SITES.lock().expect("sites").push(trace);
    }
    TRACING.with(|t| t.set(false));
}

// SAFETY: every call is passed on unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn total() -> u64 {
    ALLOCATIONS.load(Ordering::Relaxed)
}

fn this_thread() -> u64 {
    THREAD_ALLOCATIONS.with(Cell::get)
}

/// A 2 KB newsletter-like body.
fn body() -> Arc<Body> {
    let mut content = b"From: news@b.example\r\nSubject: bench\r\n\r\n".to_vec();
    while content.len() < 2048 {
        content.extend_from_slice(b"The quick brown fox jumps over the lazy dog, again.\r\n");
    }
    Arc::new(Body::new(&content).expect("a valid body"))
}

/// Drives `n` single-recipient transactions through an established session, answering every
/// write at once, and giving back result and recipient lists as the engine does; returns the
/// allocations made per transaction, after `warmup` transactions.
fn session_allocations(caps: &str, n: usize, warmup: usize, delivery_reply_text: bool) -> f64 {
    let config = Arc::new(SessionConfig {
        delivery_reply_text,
        ..SessionConfig::default()
    });
    let body = body();
    let sender = Address::parse("s@b.example", Field::Sender).expect("sender");
    let rcpt = Address::parse("r@c.example", Field::Recipient(0)).expect("recipient");
    let now = Instant::now();
    let mut s = Session::new(config, now);
    s.handle_input(b"220 mx\r\n", now);
    s.consume_output(s.output_len());
    s.handle_input(caps.as_bytes(), now);
    let bdat = caps.contains("CHUNKING");
    let (mut done, mut before) = (0, 0);
    while done < n {
        if done >= warmup && before == 0 {
            before = total();
        }
        let mut started = 0;
        while s.can_accept() {
            if started + done == n {
                break;
            }
            // As the engine does: the recipient list in a buffer of a finished transaction.
            let mut recipients = s.recipient_buffer();
            recipients.push(rcpt.clone());
            let t = Transaction {
                tag: (done + started) as u64,
                sender: sender.clone(),
                recipients,
                body: Arc::clone(&body),
                dsn: None,
            };
            s.start_transaction(t, now);
            started += 1;
        }
        s.consume_output(s.output_len());
        if bdat {
            for _ in 0..started {
                s.handle_input(
                    b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: queued\r\n",
                    now,
                );
            }
        } else {
            s.handle_input(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n", now);
            s.consume_output(s.output_len());
            s.handle_input(b"250 2.0.0 Ok: queued\r\n", now);
        }
        while let Some(e) = s.poll_event() {
            if let SessionEvent::TransactionDone { results, .. } = e {
                done += 1;
                s.recycle_results(black_box(results));
            }
        }
    }
    (total() - before) as f64 / (n - warmup) as f64
}

/// A free loopback port (bound, then released for the child to take).
fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("local addr")
}

struct ChildSink(Child);

impl Drop for ChildSink {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends `n` messages with one shared body through the engine to `mxpipe sink` in a child
/// process; returns the allocations per message of the caller (this thread: building and
/// submitting each message) and of the engine (every other thread).
/// `max_queued`: the loop's bound on held recipients (`None`: the default, a million, so the
/// whole case is held at once).
fn loop_allocations(n: u64, connections: usize, max_queued: Option<usize>) -> (f64, f64) {
    let addr = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_mxpipe"))
        .args(["sink", "--listen", &addr.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mxpipe sink");
    let _sink = ChildSink(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "the sink did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut builder = Dispatcher::builder()
        .relay(&addr.to_string())
        .max_connections_per_destination(connections)
        .record_events(false);
    if let Some(max) = max_queued {
        builder = builder.max_queued_recipients(max);
    }
    let d = builder.start().expect("dispatcher starts");
    let body = body();
    let sender = Address::parse("news@b.example", Field::Sender).expect("sender");
    let send = |from: u64, to: u64| {
        for i in from..to {
            let rcpt =
                Address::parse(&format!("u{i}@c.example"), Field::Recipient(0)).expect("recipient");
            let m = Message::from_parts(sender.clone(), vec![rcpt], Arc::clone(&body))
                .expect("message");
            d.submit_timeout(m, Duration::from_secs(60))
                .expect("submitted");
        }
        d.flush();
    };
    SUBMITTING.with(|s| s.set(true));
    // Warm up: connections open, buffers and queues at their steady size.
    send(0, n / 10);
    let sites = std::env::var("MXPIPE_ALLOC_SITES").map_or(0, |v| v.parse().unwrap_or(0));
    let stride = std::env::var("MXPIPE_ALLOC_STRIDE").map_or(1, |v| v.parse().unwrap_or(1));
    SITES_STRIDE.store(stride.max(1), Ordering::Relaxed);
    SITES_LEFT.store(sites, Ordering::Relaxed);
    let (all, mine) = (total(), this_thread());
    send(n / 10, n + n / 10);
    let caller = this_thread() - mine;
    let engine = (total() - all) - caller;
    SITES_LEFT.store(0, Ordering::Relaxed);
    for site in SITES.lock().expect("sites").drain(..) {
        eprintln!("allocation in steady state:\n{site}");
    }
    let stats = d.stats();
    assert_eq!(stats.delivered, n + n / 10, "{stats:?}");
    (caller as f64 / n as f64, engine as f64 / n as f64)
}

fn main() {
    // `cargo bench` passes --bench; a filter is not supported, every case runs.
    // With the text of the reply to the content kept (a caller that reads events: one copy
    // per message), and without (the engine's choice when no events are recorded).
    for text in [true, false] {
        let bdat = session_allocations(
            "250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n",
            20_000,
            2_000,
            text,
        );
        println!("session pipelined_bdat delivery_reply_text={text} allocs_per_msg={bdat:.2}");
        let data = session_allocations("250-mx\r\n250 PIPELINING\r\n", 20_000, 2_000, text);
        println!("session pipelined_data delivery_reply_text={text} allocs_per_msg={data:.2}");
    }
    // The whole case held at once (every message needs an envelope of its own), and a bulk
    // send held back by the loop's bound (each finished message makes room for the next, whose
    // envelope it passes on).
    for (connections, max_queued) in [(1, None), (20, None), (20, Some(2_000))] {
        let (caller, engine) = loop_allocations(50_000, connections, max_queued);
        let held = max_queued.map_or("1000000".to_string(), |m| m.to_string());
        println!(
            "loop_to_sink connections={connections} max_queued_recipients={held} \
             allocs_per_msg={engine:.2} caller_allocs_per_msg={caller:.2}"
        );
    }
}
