//! The enqueue path from C: one one-recipient message per call through
//! `mxp_dispatcher_enqueue_body` (a prepared body shared by every message) and through
//! `mxp_dispatcher_enqueue` (the body bytes copied and normalised with each message), and the
//! same submission through the Rust API. Reported as time per message.
//!
//! Run: `cargo bench --bench enqueue`
//!
//! As `bindings/c/examples/bench_enqueue.c` in its "idle" mode: the queue holds every message of
//! a sample and the event loop takes one at a time (`max_queued_recipients = 1`), here towards a
//! listener that never answers, so the loop stays idle and only enqueueing is measured. The
//! time reported is the enqueueing thread's CPU time, which other load on a shared machine
//! does not inflate (as `cpu_ns_per_msg` of the C bench).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mxpipe::engine::Dispatcher;
use mxpipe::error::Field;
use mxpipe::ffi::{
    mxp_body, mxp_body_free, mxp_body_new, mxp_config_free, mxp_config_new, mxp_config_set,
    mxp_dispatcher, mxp_dispatcher_enqueue, mxp_dispatcher_enqueue_body, mxp_dispatcher_free,
    mxp_dispatcher_new, mxp_dispatcher_shutdown_timeout, mxp_result,
};
use mxpipe::message::{Address, Body, Message};
use std::ffi::{c_char, CString};
use std::hint::black_box;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

const BODY: &[u8] = b"From: bench@mxpipe.example\r\nSubject: bench\r\n\r\nHello.\r\n";
const SENDER: &[u8] = b"bench@mxpipe.example\0";
const RECIPIENT: &[u8] = b"user0@sink.example\0";

/// CPU time the calling thread has used.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a pointer to a local.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn ok(result: mxp_result, what: &str) {
    assert_eq!(result, mxp_result::MXP_OK, "{what}");
}

/// A dispatcher whose queue holds `capacity` messages, relaying to `relay`.
fn dispatcher(relay: &str, capacity: u64) -> *mut mxp_dispatcher {
    let settings = [
        ("relay", relay.to_string()),
        ("ehlo_name", "bench.mxpipe.example".into()),
        ("record_events", "false".into()),
        ("queue_capacity", capacity.to_string()),
        ("max_queued_recipients", "1".into()),
    ];
    let mut config = std::ptr::null_mut();
    // SAFETY: out-pointers to locals, NUL-terminated strings that outlive the calls.
    unsafe {
        ok(mxp_config_new(&mut config), "mxp_config_new");
        for (key, value) in settings {
            let (key, value) = (CString::new(key).unwrap(), CString::new(value).unwrap());
            ok(
                mxp_config_set(config, key.as_ptr(), value.as_ptr()),
                "mxp_config_set",
            );
        }
        let mut dispatcher = std::ptr::null_mut();
        ok(
            mxp_dispatcher_new(config, &mut dispatcher),
            "mxp_dispatcher_new",
        );
        ok(mxp_config_free(config), "mxp_config_free");
        dispatcher
    }
}

/// Ends a dispatcher without delivering what it holds.
fn discard(dispatcher: *mut mxp_dispatcher) {
    // SAFETY: a live handle from `dispatcher`.
    unsafe {
        // Timing out is expected: the queued messages were never meant to be delivered.
        let _ = mxp_dispatcher_shutdown_timeout(dispatcher, 0);
        ok(mxp_dispatcher_free(dispatcher), "mxp_dispatcher_free");
    }
}

fn enqueue(c: &mut Criterion) {
    // Accepts connections (the kernel does) but never greets: the loop waits, idle.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay = listener.local_addr().unwrap().to_string();
    let sender = SENDER.as_ptr().cast::<c_char>();
    let recipients = [RECIPIENT.as_ptr().cast::<c_char>()];
    let mut body: *mut mxp_body = std::ptr::null_mut();
    // SAFETY: a valid buffer and out-pointer.
    ok(
        unsafe { mxp_body_new(BODY.as_ptr(), BODY.len(), &mut body) },
        "mxp_body_new",
    );

    let mut g = c.benchmark_group("enqueue");
    g.throughput(Throughput::Elements(1));
    g.bench_function("c_shared_body", |b| {
        b.iter_custom(|iters| {
            let d = dispatcher(&relay, iters + 1);
            let start = thread_cpu();
            for _ in 0..iters {
                let mut id = 0;
                // SAFETY: live handles, valid strings and out-pointer.
                let rc = unsafe {
                    mxp_dispatcher_enqueue_body(d, sender, recipients.as_ptr(), 1, body, 0, &mut id)
                };
                ok(rc, "mxp_dispatcher_enqueue_body");
                black_box(id);
            }
            let elapsed = thread_cpu() - start;
            discard(d);
            elapsed
        })
    });
    g.bench_function("c_bytes", |b| {
        b.iter_custom(|iters| {
            let d = dispatcher(&relay, iters + 1);
            let start = thread_cpu();
            for _ in 0..iters {
                let mut id = 0;
                // SAFETY: live handle, valid strings, buffer and out-pointer.
                let rc = unsafe {
                    mxp_dispatcher_enqueue(
                        d,
                        sender,
                        recipients.as_ptr(),
                        1,
                        black_box(BODY).as_ptr(),
                        BODY.len(),
                        0,
                        &mut id,
                    )
                };
                ok(rc, "mxp_dispatcher_enqueue");
                black_box(id);
            }
            let elapsed = thread_cpu() - start;
            discard(d);
            elapsed
        })
    });
    g.bench_function("rust_shared_body", |b| {
        let shared = Arc::new(Body::new(BODY).unwrap());
        let from = Address::parse("bench@mxpipe.example", Field::Sender).unwrap();
        b.iter_custom(|iters| {
            let d = Dispatcher::builder()
                .relay(&relay)
                .ehlo_name("bench.mxpipe.example")
                .record_events(false)
                .queue_capacity(iters as usize + 1)
                .max_queued_recipients(1)
                .start()
                .unwrap();
            let start = thread_cpu();
            for _ in 0..iters {
                let to = Address::parse(black_box("user0@sink.example"), Field::Recipient(0));
                let message =
                    Message::from_parts(from.clone(), vec![to.unwrap()], Arc::clone(&shared));
                black_box(d.submit(message.unwrap()).unwrap());
            }
            let elapsed = thread_cpu() - start;
            d.shutdown_timeout(Duration::ZERO);
            elapsed
        })
    });
    g.finish();
    // SAFETY: a live body handle.
    ok(unsafe { mxp_body_free(body) }, "mxp_body_free");
    drop(listener);
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(4));
    targets = enqueue
}
criterion_main!(benches);
