//! Hot paths of the protocol core: reply parsing, content preparation and the session state
//! machine driving a full pipelined transaction without I/O.
//!
//! Run: `cargo bench --bench protocol`

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use mxpipe::message::{Address, Body};
use mxpipe::smtp::data;
use mxpipe::smtp::{ReplyLimits, ReplyParser, Session, SessionConfig, SessionEvent, Transaction};
use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

fn newsletter(size: usize) -> Vec<u8> {
    let mut body = b"From: a@b.example\r\nSubject: bench\r\n\r\n".to_vec();
    let mut i = 0;
    while body.len() < size {
        let line: &[u8] = if i % 10 == 0 {
            b".a line that starts with a dot and needs stuffing\n"
        } else {
            b"The quick brown fox jumps over the lazy dog, again and again.\n"
        };
        body.extend_from_slice(line);
        i += 1;
    }
    body
}

fn reply_parser(c: &mut Criterion) {
    let transcript: &[u8] = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as 4XkQ2x1Zz9z1\r\n250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n";
    let mut g = c.benchmark_group("reply_parser");
    g.throughput(Throughput::Bytes(transcript.len() as u64));
    g.bench_function("transcript", |b| {
        let mut p = ReplyParser::new(ReplyLimits::default());
        let mut out = VecDeque::new();
        b.iter(|| {
            p.feed(black_box(transcript), &mut out).unwrap();
            out.clear();
        })
    });
    g.finish();
}

fn content(c: &mut Criterion) {
    let body = newsletter(20 * 1024);
    let normalized = data::normalize(&body).unwrap().bytes;
    let mut g = c.benchmark_group("content");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("normalize_20k", |b| {
        b.iter(|| data::normalize(black_box(&body)).unwrap())
    });
    g.bench_function("dot_stuff_20k", |b| {
        let mut out = Vec::with_capacity(body.len() + 1024);
        b.iter(|| {
            out.clear();
            data::dot_stuff(black_box(&normalized), &mut out);
        })
    });
    g.finish();
}

fn session(c: &mut Criterion) {
    let config = Arc::new(SessionConfig::default());
    let body = Arc::new(Body::new(&newsletter(2048)).unwrap());
    let sender = Address::parse("s@b.example", mxpipe::error::Field::Sender).unwrap();
    let rcpt = Address::parse("r@c.example", mxpipe::error::Field::Recipient(0)).unwrap();
    let mut g = c.benchmark_group("session");
    // Per element: one transaction (100 per iteration).
    g.throughput(Throughput::Elements(100));
    // 100 pipelined DATA transactions per iteration on an established session.
    g.bench_function("pipelined_transaction", |b| {
        b.iter_batched_ref(
            || {
                let now = Instant::now();
                let mut s = Session::new(Arc::clone(&config), now);
                s.handle_input(b"220 mx\r\n", now);
                s.consume_output(s.output_len());
                s.handle_input(b"250-mx\r\n250 PIPELINING\r\n", now);
                (s, now)
            },
            |(s, now)| {
                for tag in 0..100u64 {
                    s.start_transaction(
                        Transaction {
                            tag,
                            sender: sender.clone(),
                            recipients: vec![rcpt.clone()],
                            body: Arc::clone(&body),
                            dsn: None,
                        },
                        *now,
                    );
                    s.consume_output(s.output_len());
                    s.handle_input(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n", *now);
                    s.consume_output(s.output_len());
                    s.handle_input(b"250 2.0.0 Ok: queued\r\n", *now);
                    while let Some(e) = s.poll_event() {
                        black_box(matches!(e, SessionEvent::TransactionDone { .. }));
                    }
                }
            },
            BatchSize::SmallInput,
        )
    });
    // 100 pipelined BDAT transactions per iteration (CHUNKING + PIPELINING): each window of
    // whole transactions is one write, and its replies arrive in one read.
    let replies: Vec<u8> =
        b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: queued\r\n".repeat(config.bdat_window);
    g.bench_function("pipelined_bdat_100", |b| {
        b.iter_batched_ref(
            || {
                let now = Instant::now();
                let mut s = Session::new(Arc::clone(&config), now);
                s.handle_input(b"220 mx\r\n", now);
                s.consume_output(s.output_len());
                s.handle_input(b"250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n", now);
                (s, now)
            },
            |(s, now)| {
                let mut tag = 0u64;
                while tag < 100 {
                    let mut window = 0;
                    while tag < 100 && s.can_accept() {
                        s.start_transaction(
                            Transaction {
                                tag,
                                sender: sender.clone(),
                                recipients: vec![rcpt.clone()],
                                body: Arc::clone(&body),
                                dsn: None,
                            },
                            *now,
                        );
                        tag += 1;
                        window += 1;
                    }
                    s.consume_output(s.output_len());
                    s.handle_input(
                        &replies[..window * replies.len() / config.bdat_window],
                        *now,
                    );
                    while let Some(e) = s.poll_event() {
                        black_box(matches!(e, SessionEvent::TransactionDone { .. }));
                    }
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, reply_parser, content, session);
criterion_main!(benches);
