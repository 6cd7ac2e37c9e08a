//! The event loop makes no heap allocation per message in steady state: a shared-body bulk
//! send to Postfix's `smtp-sink`, counted by a global allocator that wraps the system's. What
//! the caller's thread allocates (building each `Message`) is the caller's and left out; every
//! other thread (the loop) is counted. `cargo bench --bench allocations` prints the figures.

mod util;

use mxpipe::engine::Dispatcher;
use mxpipe::error::Field;
use mxpipe::message::{Address, Body, Message};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use util::SmtpSink;

/// Counts every allocation and reallocation, in total and on the calling thread.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static THREAD_ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    let _ = THREAD_ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
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

#[test]
fn the_loop_allocates_nothing_per_message_in_steady_state() {
    let sink = SmtpSink::start(&[], 1024);
    let d = Dispatcher::builder()
        .relay(&sink.addr().to_string())
        .max_connections_per_destination(2)
        .record_events(false)
        .start()
        .expect("dispatcher starts");
    let body = Arc::new(
        Body::new(&b"Subject: steady\r\n\r\nThe same body for everyone.\r\n".repeat(40))
            .expect("a valid body"),
    );
    let sender = Address::parse("news@b.example", Field::Sender).expect("sender");
    // Batches of a fixed size, each flushed: the loop's queues reach their size in the
    // warm-up and never need to grow after it.
    const BATCH: u64 = 200;
    let send = |batches: u64| {
        for b in 0..batches {
            for i in 0..BATCH {
                let rcpt = Address::parse(&format!("u{b}x{i}@c.example"), Field::Recipient(0))
                    .expect("recipient");
                let m = Message::from_parts(sender.clone(), vec![rcpt], Arc::clone(&body))
                    .expect("message");
                d.submit_timeout(m, Duration::from_secs(30))
                    .expect("submitted");
            }
            d.flush();
        }
    };
    send(5);
    let (all, mine) = (
        ALLOCATIONS.load(Ordering::Relaxed),
        THREAD_ALLOCATIONS.with(Cell::get),
    );
    let batches = 20;
    send(batches);
    let caller = THREAD_ALLOCATIONS.with(Cell::get) - mine;
    let engine = ALLOCATIONS.load(Ordering::Relaxed) - all - caller;
    let stats = d.stats();
    assert_eq!(stats.delivered, 25 * BATCH, "{stats:?}");
    assert_eq!(
        stats.deferred + stats.bounced + stats.expired,
        0,
        "{stats:?}"
    );
    let messages = batches * BATCH;
    // One allocation per message would be `messages`; a few stray ones (a buffer that grows
    // once) are not per message.
    assert!(
        engine < messages / 20,
        "the engine made {engine} allocations for {messages} messages in steady state"
    );
}
