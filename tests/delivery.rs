//! The engine over loopback against SMTP servers this project did not write: Postfix's
//! `smtp-sink` and `aiosmtpd` (capturing what arrived), plus mxpipe's own sink where a fault must
//! be scripted. Each test asserts what a user would check: the bytes that arrived, every
//! recipient's outcome, the error text.

mod util;

use mxpipe::engine::classify::Category;
use mxpipe::engine::{Dispatcher, Event, EventKind};
use mxpipe::message::{Body, Message};
use mxpipe::queue::RetryPolicy;
use mxpipe::sink::{Faults, Sink, SinkConfig};
use mxpipe::smtp::Timeouts;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use util::{CaptureServer, SmtpSink};

fn quick_retry(max_age_ms: u64) -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(100),
        max_interval: Duration::from_millis(400),
        multiplier: 2.0,
        jitter: 0.1,
        max_age: Duration::from_millis(max_age_ms),
    }
}

fn dispatcher(relay: &str, retry: RetryPolicy) -> Dispatcher {
    Dispatcher::builder()
        .relay(relay)
        .ehlo_name("client.mxpipe.test")
        .max_connections_per_destination(4)
        .retry(retry)
        .start()
        .expect("dispatcher starts")
}

/// Waits for every recipient to be final and returns all events, in order.
fn finish(d: &Dispatcher) -> Vec<Event> {
    assert!(
        d.wait_final(Duration::from_secs(60)),
        "not final: {:?}",
        d.stats()
    );
    d.events().expect("events on").try_iter().collect()
}

/// The final event of each recipient, checking that there is exactly one.
fn finals(events: &[Event]) -> HashMap<String, Event> {
    let mut out = HashMap::new();
    for e in events.iter().filter(|e| e.kind.is_final()) {
        let old = out.insert(e.recipient.as_str().to_string(), e.clone());
        assert!(old.is_none(), "two final outcomes for {}", e.recipient);
    }
    out
}

#[test]
fn bodies_arrive_byte_exact_at_aiosmtpd() {
    let server = CaptureServer::start();
    let d = dispatcher(&server.addr().to_string(), quick_retry(5_000));
    let big: Vec<u8> = (0..(1 << 20) / 64)
        .flat_map(|i| format!("{i:061}\r\n").into_bytes().into_iter().chain(*b"."))
        .collect();
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        (
            "dots",
            b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nafter a lone dot\r\n".to_vec(),
            b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nafter a lone dot\r\n".to_vec(),
        ),
        (
            "bare-lf",
            b"Subject: lf\n\nline one\n.\nline three\rno final newline".to_vec(),
            b"Subject: lf\r\n\r\nline one\r\n.\r\nline three\r\nno final newline\r\n".to_vec(),
        ),
        (
            "8bit",
            "Subject: =?utf-8?q?caf=C3=A9?=\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nCafé, naïve, Grüße — ☃\r\n".as_bytes().to_vec(),
            "Subject: =?utf-8?q?caf=C3=A9?=\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nCafé, naïve, Grüße — ☃\r\n".as_bytes().to_vec(),
        ),
        ("1mib", big.clone(), {
            let mut b = big.clone();
            b.extend_from_slice(b"\r\n");
            b
        }),
    ];
    for (name, input, _) in &cases {
        let m = Message::new(
            "sender@mxpipe.test",
            [format!("{name}@rcpt.test").as_str()],
            input,
        )
        .unwrap();
        d.submit(m).unwrap();
    }
    let events = finish(&d);
    assert!(
        events.iter().all(|e| e.kind == EventKind::Delivered),
        "{events:?}"
    );
    let got = server.wait_for_messages(cases.len(), Duration::from_secs(30));
    for (name, _, expected) in &cases {
        let rcpt = format!("{name}@rcpt.test");
        let m = got
            .iter()
            .find(|m| m.rcpt_tos == [rcpt.clone()])
            .expect("captured");
        assert_eq!(m.mail_from, "sender@mxpipe.test");
        assert!(
            m.data == *expected,
            "{name}: content differs ({} vs {} bytes)",
            m.data.len(),
            expected.len()
        );
        assert_eq!(m.helo.as_deref(), Some("client.mxpipe.test"));
        if *name == "8bit" {
            assert!(
                m.mail_options.iter().any(|o| o == "BODY=8BITMIME"),
                "{:?}",
                m.mail_options
            );
        }
    }
}

#[test]
fn rejected_recipients_get_their_own_outcomes() {
    let server = CaptureServer::builder()
        .reject_rcpt("unknown")
        .tempfail_rcpt("busy")
        .start();
    let d = dispatcher(&server.addr().to_string(), quick_retry(600));
    let rcpts = ["ok1@r.test", "unknown@r.test", "busy@r.test", "ok2@r.test"];
    let id = d
        .submit(Message::new("s@mxpipe.test", rcpts, b"Subject: x\r\n\r\nhello\r\n").unwrap())
        .unwrap();
    let events = finish(&d);
    let f = finals(&events);
    assert_eq!(f.len(), 4);
    assert_eq!(f["ok1@r.test"].kind, EventKind::Delivered);
    assert_eq!(f["ok2@r.test"].kind, EventKind::Delivered);
    assert_eq!(f["ok1@r.test"].message_id, id);
    let bounced = &f["unknown@r.test"];
    assert_eq!(bounced.kind, EventKind::Bounced);
    assert_eq!(bounced.reply.code, 550);
    assert_eq!(bounced.reply.enhanced.unwrap().to_string(), "5.1.1");
    assert_eq!(bounced.attempts, 1);
    assert_eq!(bounced.category, Some(Category::BadMailbox));
    assert_eq!(f["ok1@r.test"].category, None);
    let busy = &f["busy@r.test"];
    assert_eq!(busy.kind, EventKind::Expired);
    assert_eq!(busy.reply.code, 450);
    assert!(busy.attempts >= 2, "retried before expiring: {busy:?}");
    // Deferred events came first, each with a retry time.
    let deferred: Vec<_> = events
        .iter()
        .filter(|e| e.kind == EventKind::Deferred)
        .collect();
    assert!(!deferred.is_empty());
    assert!(deferred
        .iter()
        .all(|e| e.recipient.as_str() == "busy@r.test" && e.retry_after.is_some()));
    // The good recipients arrived in one message (one transaction), once.
    let got = server.messages();
    let delivered: Vec<&String> = got.iter().flat_map(|m| m.rcpt_tos.iter()).collect();
    assert_eq!(delivered, ["ok1@r.test", "ok2@r.test"]);
    let s = d.stats();
    assert_eq!(
        (s.delivered, s.bounced, s.expired, s.in_flight),
        (2, 1, 1, 0)
    );
}

#[test]
fn temporary_failure_then_success_on_retry() {
    let server = CaptureServer::builder().tempfail_first(1).start();
    let d = dispatcher(&server.addr().to_string(), quick_retry(20_000));
    d.submit(
        Message::new(
            "s@mxpipe.test",
            ["a@r.test"],
            b"Subject: retry\r\n\r\nx\r\n",
        )
        .unwrap(),
    )
    .unwrap();
    let events = finish(&d);
    let kinds: Vec<EventKind> = events.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [EventKind::Deferred, EventKind::Delivered]);
    assert_eq!(events[0].reply.code, 451);
    assert_eq!(events[0].attempts, 1);
    assert_eq!(events[1].attempts, 2);
    assert_eq!(server.messages().len(), 1);
}

#[test]
fn many_messages_through_postfix_smtp_sink_reuse_connections() {
    let sink = SmtpSink::start(&[], 1024);
    let d = Dispatcher::builder()
        .relay(&sink.addr().to_string())
        .max_connections_per_destination(8)
        .record_events(false)
        .start()
        .unwrap();
    let body =
        Arc::new(Body::new(&b"0123456789012345678901234567890123456789\r\n".repeat(48)).unwrap());
    for i in 0..10_000 {
        let rcpts = [format!("u{i}@a.test"), format!("v{i}@b.test")];
        let m = Message::with_body(
            "s@mxpipe.test",
            rcpts.iter().map(String::as_str),
            Arc::clone(&body),
        )
        .unwrap();
        d.submit_timeout(m, Duration::from_secs(10)).unwrap();
    }
    assert!(d.wait_final(Duration::from_secs(120)));
    let s = d.stats();
    assert_eq!(s.delivered, 20_000);
    assert_eq!(s.transactions, 10_000);
    assert!(
        s.connections_opened <= 8,
        "pooled: {} connections",
        s.connections_opened
    );
}

#[test]
fn service_closing_421_mid_session_defers_then_expires() {
    // smtp-sink -Q rcpt: answers RCPT with 421 and hangs up.
    let sink = SmtpSink::start(&["-Q", "rcpt"], 64);
    let d = dispatcher(&sink.addr().to_string(), quick_retry(700));
    d.submit(Message::new("s@mxpipe.test", ["a@r.test", "b@r.test"], b"x\r\n").unwrap())
        .unwrap();
    let events = finish(&d);
    let f = finals(&events);
    assert_eq!(f.len(), 2);
    for e in f.values() {
        assert_eq!(e.kind, EventKind::Expired);
        assert_eq!(e.reply.code, 421, "{e:?}");
    }
    assert!(events
        .iter()
        .any(|e| e.kind == EventKind::Deferred && e.reply.code == 421));
}

#[test]
fn connection_refused_is_deferred_with_the_reason() {
    let port = util::free_port("127.0.0.1");
    let d = dispatcher(&format!("127.0.0.1:{port}"), quick_retry(500));
    d.submit(Message::new("s@mxpipe.test", ["a@r.test"], b"x\r\n").unwrap())
        .unwrap();
    let events = finish(&d);
    assert_eq!(events[0].kind, EventKind::Deferred);
    assert_eq!(events[0].reply.code, 0);
    assert!(
        events[0]
            .reply
            .text
            .contains(&format!("connect to 127.0.0.1:{port} failed"))
            && events[0].reply.text.to_lowercase().contains("refused"),
        "{:?}",
        events[0].reply.text
    );
    assert_eq!(events[0].category, Some(Category::Connection));
    assert_eq!(events.last().unwrap().kind, EventKind::Expired);
    assert_eq!(finals(&events).len(), 1);
}

#[test]
fn server_closing_during_data_defers_and_warns_of_duplicates() {
    let server = CaptureServer::builder().close_in_data().start();
    let d = dispatcher(&server.addr().to_string(), quick_retry(300));
    d.submit(Message::new("s@mxpipe.test", ["a@r.test"], b"Subject: x\r\n\r\nbody\r\n").unwrap())
        .unwrap();
    let events = finish(&d);
    let first = &events[0];
    assert_eq!(first.kind, EventKind::Deferred);
    assert!(
        first.reply.text.contains("connection lost"),
        "{:?}",
        first.reply.text
    );
    assert_eq!(finals(&events)["a@r.test"].kind, EventKind::Expired);
    assert!(server.messages().is_empty());
}

#[test]
fn message_over_server_size_bounces_without_touching_the_wire() {
    let server = CaptureServer::builder().size_limit(1000).start();
    let d = dispatcher(&server.addr().to_string(), quick_retry(5_000));
    d.submit(Message::new("s@mxpipe.test", ["big@r.test"], &b"y\r\n".repeat(2500)).unwrap())
        .unwrap();
    d.submit(Message::new("s@mxpipe.test", ["small@r.test"], b"small\r\n").unwrap())
        .unwrap();
    let f = finals(&finish(&d));
    let big = &f["big@r.test"];
    assert_eq!(big.kind, EventKind::Bounced);
    assert_eq!(big.reply.enhanced.unwrap().to_string(), "5.3.4");
    assert!(
        big.reply.text.contains("the server accepts at most 1000"),
        "{}",
        big.reply.text
    );
    assert_eq!(f["small@r.test"].kind, EventKind::Delivered);
    let got = server.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpt_tos, ["small@r.test"]);
}

#[test]
fn too_many_recipients_moves_the_rest_to_new_transactions() {
    let capture = util::fresh_temp_dir("too-many");
    let sink = Sink::start(SinkConfig {
        capture_dir: Some(capture.clone()),
        faults: Faults {
            max_recipients: Some(3),
            ..Faults::default()
        },
        ..SinkConfig::default()
    })
    .unwrap();
    let d = dispatcher(&sink.local_addr().to_string(), quick_retry(5_000));
    let rcpts: Vec<String> = (0..8).map(|i| format!("r{i}@x.test")).collect();
    d.submit(Message::new("s@mxpipe.test", rcpts.iter().map(String::as_str), b"hi\r\n").unwrap())
        .unwrap();
    let events = finish(&d);
    assert_eq!(
        events.len(),
        8,
        "one final event each and no deferral: {events:?}"
    );
    assert!(events
        .iter()
        .all(|e| e.kind == EventKind::Delivered && e.attempts == 1));
    let stats = sink.stop();
    assert_eq!(stats.messages, 3, "3 + 3 + 2 recipients");
    assert_eq!(stats.recipients, 8);
    let _ = std::fs::remove_dir_all(capture);
}

#[test]
fn slow_server_times_out_per_request() {
    // Every reply after the greeting takes 3 s; the command timeout is 1 s.
    let sink = Sink::start(SinkConfig {
        faults: Faults {
            reply_delay: Some(Duration::from_secs(3)),
            ..Faults::default()
        },
        ..SinkConfig::default()
    })
    .unwrap();
    let d = Dispatcher::builder()
        .relay(&sink.local_addr().to_string())
        .timeouts(Timeouts {
            command: Duration::from_secs(1),
            ..Timeouts::default()
        })
        .retry(quick_retry(200))
        .start()
        .unwrap();
    d.submit(Message::new("s@mxpipe.test", ["a@r.test"], b"x\r\n").unwrap())
        .unwrap();
    let events = finish(&d);
    let last = events.last().unwrap();
    assert_eq!(last.kind, EventKind::Expired);
    let addr = sink.local_addr();
    assert_eq!(
        last.reply.text,
        format!("{addr}: timed out waiting for reply to EHLO")
    );
}

#[test]
fn helo_fallback_when_ehlo_is_refused() {
    let capture = util::fresh_temp_dir("helo");
    let sink = Sink::start(SinkConfig {
        capture_dir: Some(capture.clone()),
        faults: Faults {
            no_ehlo: true,
            ..Faults::default()
        },
        ..SinkConfig::default()
    })
    .unwrap();
    let d = dispatcher(&sink.local_addr().to_string(), quick_retry(5_000));
    d.submit(Message::new("s@mxpipe.test", ["a@r.test", "b@r.test"], b".x\r\n").unwrap())
        .unwrap();
    let f = finals(&finish(&d));
    assert!(f.values().all(|e| e.kind == EventKind::Delivered));
    let eml = std::fs::read(capture.join("00000001.eml")).unwrap();
    assert_eq!(eml, b".x\r\n");
    let _ = std::fs::remove_dir_all(capture);
}

#[test]
fn full_queue_is_reported_and_the_message_handed_back() {
    // A tarpit keeps the loop's one permitted recipient busy, so the ingress fills up.
    let sink = Sink::start(SinkConfig {
        faults: Faults {
            reply_delay: Some(Duration::from_millis(700)),
            ..Faults::default()
        },
        ..SinkConfig::default()
    })
    .unwrap();
    let d = Dispatcher::builder()
        .relay(&sink.local_addr().to_string())
        .queue_capacity(2)
        .max_queued_recipients(1)
        .retry(quick_retry(100))
        .start()
        .unwrap();
    let message = |i: usize| {
        Message::new("s@mxpipe.test", [format!("r{i}@x.test").as_str()], b"x\r\n").unwrap()
    };
    d.submit(message(0)).unwrap();
    // Give the loop time to take the first message and stop at its bound.
    std::thread::sleep(Duration::from_millis(200));
    d.submit(message(1)).unwrap();
    d.submit(message(2)).unwrap();
    let refused = d.submit(message(3)).unwrap_err();
    assert_eq!(refused.error, mxpipe::Error::QueueFull);
    assert_eq!(
        refused.to_string(),
        "queue full: the dispatcher's ingress queue is at capacity"
    );
    assert_eq!(refused.message.recipients()[0].as_str(), "r3@x.test");
    let waited = d
        .submit_timeout(refused.message, Duration::from_millis(100))
        .unwrap_err();
    assert_eq!(waited.error, mxpipe::Error::QueueFull);
    assert_eq!(d.stats().submitted_messages, 3);
    // The three accepted messages still end with one final outcome each.
    let f = finals(&finish(&d));
    assert_eq!(f.len(), 3);
}

#[test]
fn static_routes_send_each_domain_to_its_host() {
    let special = CaptureServer::start();
    let default = CaptureServer::start();
    let d = Dispatcher::builder()
        .relay(&default.addr().to_string())
        .route("special.test", &special.addr().to_string())
        .retry(quick_retry(5_000))
        .start()
        .unwrap();
    let rcpts = ["a@special.test", "b@other.test", "c@SPECIAL.test"];
    d.submit(Message::new("s@mxpipe.test", rcpts, b"Subject: r\r\n\r\nx\r\n").unwrap())
        .unwrap();
    let f = finals(&finish(&d));
    assert_eq!(
        &*f["a@special.test"].destination,
        special.addr().to_string()
    );
    assert_eq!(&*f["b@other.test"].destination, default.addr().to_string());
    let at_special = special.wait_for_messages(1, Duration::from_secs(10));
    assert_eq!(
        at_special[0].rcpt_tos,
        ["a@special.test", "c@SPECIAL.test"],
        "one transaction"
    );
    let at_default = default.wait_for_messages(1, Duration::from_secs(10));
    assert_eq!(at_default[0].rcpt_tos, ["b@other.test"]);
}

#[test]
fn several_loops_deliver_everything() {
    let sink = SmtpSink::start(&[], 1024);
    let d = Dispatcher::builder()
        .relay(&sink.addr().to_string())
        .loops(2)
        .max_connections_per_destination(4)
        .start()
        .unwrap();
    for i in 0..2_000 {
        d.submit_timeout(
            Message::new("s@mxpipe.test", [format!("u{i}@x.test").as_str()], b"x\r\n").unwrap(),
            Duration::from_secs(10),
        )
        .unwrap();
    }
    let f = finals(&finish(&d));
    assert_eq!(f.len(), 2_000);
    assert!(f.values().all(|e| e.kind == EventKind::Delivered));
    assert!(d.stats().connections_opened <= 8);
}

#[test]
fn connections_come_from_the_configured_source_addresses() {
    let sink = SmtpSink::start_dumping("127.0.0.1", &[]);
    let d = Dispatcher::builder()
        .relay(&sink.addr().to_string())
        .source_address("127.0.0.42".parse().unwrap())
        .max_connections_per_destination(1)
        .retry(quick_retry(5_000))
        .start()
        .unwrap();
    d.submit(Message::new("s@mxpipe.test", ["a@r.test"], b"Subject: src\r\n\r\nx\r\n").unwrap())
        .unwrap();
    let f = finals(&finish(&d));
    assert_eq!(f["a@r.test"].kind, EventKind::Delivered);
    let dumps = sink.dumps();
    assert_eq!(dumps.len(), 1);
    assert_eq!(dumps[0].client_addr, "127.0.0.42");
}

#[test]
fn shutdown_returns_when_the_loop_is_full_of_deferred_work() {
    // A relay that refuses connections, room for one recipient in the loop, two messages:
    // the second must still be taken (and deferred) so that flush and shutdown return.
    let port = util::free_port("127.0.0.1");
    let d = Dispatcher::builder()
        .relay(&format!("127.0.0.1:{port}"))
        .queue_capacity(1)
        .max_queued_recipients(1)
        .retry(RetryPolicy {
            initial: Duration::from_secs(3600),
            ..RetryPolicy::default()
        })
        .start()
        .unwrap();
    for i in 0..2 {
        d.submit_timeout(
            Message::new("s@mxpipe.test", [format!("r{i}@x.test").as_str()], b"x\r\n").unwrap(),
            Duration::from_secs(10),
        )
        .unwrap();
    }
    d.flush();
    let events: Vec<Event> = d.events().unwrap().try_iter().collect();
    assert_eq!(events.len(), 2);
    assert!(events.iter().all(|e| e.kind == EventKind::Deferred));
    d.shutdown();
}

#[test]
fn refusal_in_the_same_write_as_354_bounces_without_retry() {
    // smtp-sink -A 0: answers DATA with 354 and, at once, 550, then hangs up; nothing of the
    // content is read. Postfix calls this a premature reply and bounces with it.
    let sink = SmtpSink::start(&["-A", "0"], 64);
    let d = dispatcher(&sink.addr().to_string(), quick_retry(3_000));
    d.submit(Message::new("s@mxpipe.test", ["a@r.test", "b@r.test"], b"x\r\n").unwrap())
        .unwrap();
    let events = finish(&d);
    assert!(
        events.iter().all(|e| e.kind != EventKind::Deferred),
        "{events:?}"
    );
    let f = finals(&events);
    assert_eq!(f.len(), 2);
    for e in f.values() {
        assert_eq!(e.kind, EventKind::Bounced, "{e:?}");
        assert_eq!(e.reply.code, 550, "{e:?}");
        assert_eq!(e.attempts, 1);
        assert!(
            !e.reply.text.contains("may have been delivered"),
            "{:?}",
            e.reply.text
        );
    }
}

/// Serves `answer` behind a greeting of `greeting`, sends one message with `builder`'s
/// settings, and returns every recipient's final event and what each connection sent.
fn scripted_session(
    greeting: &str,
    answer: impl Fn(&str) -> Option<String> + Send + 'static,
    builder: impl FnOnce(mxpipe::engine::DispatcherBuilder) -> mxpipe::engine::DispatcherBuilder,
) -> (Event, Vec<String>) {
    let server = util::ScriptedSmtpServer::start(greeting, answer);
    let d = builder(
        Dispatcher::builder()
            .relay(&server.addr().to_string())
            .ehlo_name("client.mxpipe.test")
            .retry(quick_retry(150)),
    )
    .start()
    .unwrap();
    d.submit(Message::new("s@mxpipe.test", ["a@r.test"], b"x\r\n").unwrap())
        .unwrap();
    let events = finish(&d);
    let f = finals(&events);
    let event = f["a@r.test"].clone();
    drop(d);
    let sessions = server.wait_sessions(1);
    (event, sessions)
}

#[test]
fn quit_is_sent_whenever_the_session_fails_in_sync() {
    use mxpipe::smtp::{Credentials, StartTls};
    let ehlo = |caps: &'static str| {
        move |line: &str| {
            if line.starts_with("EHLO") {
                Some(format!("250-scripted.test\r\n{caps}"))
            } else if line == "STARTTLS" {
                Some("454 4.7.0 TLS not available due to temporary reason\r\n".into())
            } else if line.starts_with("AUTH") {
                Some("535 5.7.8 Authentication credentials invalid\r\n".into())
            } else {
                Some("502 5.5.2 unexpected\r\n".into())
            }
        }
    };
    let required = |b: mxpipe::engine::DispatcherBuilder| b.starttls(StartTls::Required);
    let auth = |b: mxpipe::engine::DispatcherBuilder| {
        b.credentials(Credentials::password("u", "p").unwrap())
            .allow_plaintext_auth(true)
    };
    type Case = (&'static str, (Event, Vec<String>), &'static str);
    let cases: Vec<Case> = vec![
        (
            "5xx greeting",
            scripted_session("554 5.3.2 no service here\r\n", ehlo("250 OK\r\n"), |b| b),
            "no service here",
        ),
        (
            "TLS required, not offered",
            scripted_session(
                "220 scripted.test\r\n",
                ehlo("250 PIPELINING\r\n"),
                required,
            ),
            "does not offer STARTTLS",
        ),
        (
            "454 to STARTTLS",
            scripted_session("220 scripted.test\r\n", ehlo("250 STARTTLS\r\n"), required),
            "STARTTLS refused",
        ),
        (
            "535",
            scripted_session("220 scripted.test\r\n", ehlo("250 AUTH PLAIN\r\n"), auth),
            "authentication failed: 535",
        ),
        (
            "no usable mechanism",
            scripted_session("220 scripted.test\r\n", ehlo("250 AUTH CRAM-MD5\r\n"), auth),
            "no AUTH mechanism",
        ),
    ];
    for (case, (event, sessions), text) in cases {
        assert_eq!(event.kind, EventKind::Expired, "{case}: {event:?}");
        assert!(
            event.reply.text.contains(text),
            "{case}: {:?}",
            event.reply.text
        );
        assert!(!sessions.is_empty(), "{case}: no session ended");
        for s in &sessions {
            assert!(s.ends_with("QUIT\r\n"), "{case}: the client sent {s:?}");
        }
    }
}

#[test]
fn silent_pooled_connection_costs_the_message_nothing() {
    // A server that goes silent on a reused connection: the RSET that probes it after idling
    // never gets a reply (the first transaction of a connection has no probe).
    let server = util::ScriptedSmtpServer::start("220 scripted.test\r\n", |line: &str| {
        let upper = line.to_ascii_uppercase();
        Some(if upper.starts_with("EHLO") {
            "250-scripted.test\r\n250 PIPELINING\r\n".to_string()
        } else if upper == "RSET" {
            String::new()
        } else if upper == "DATA" {
            "354 go ahead\r\n".to_string()
        } else {
            "250 2.0.0 Ok\r\n".to_string()
        })
    });
    let mut b = Dispatcher::builder()
        .relay(&server.addr().to_string())
        .ehlo_name("client.mxpipe.test")
        .max_connections_per_destination(1)
        .timeouts(Timeouts {
            command: Duration::from_secs(1),
            ..Timeouts::default()
        })
        .idle_timeout(Duration::from_secs(30))
        .retry(quick_retry(20_000));
    b.config_mut().session.probe_after_idle = Duration::from_millis(100);
    let d = b.start().unwrap();
    d.submit(Message::new("s@mxpipe.test", ["a@r.test"], b"x\r\n").unwrap())
        .unwrap();
    assert!(d.wait_final(Duration::from_secs(10)));
    std::thread::sleep(Duration::from_millis(300));
    d.submit(Message::new("s@mxpipe.test", ["b@r.test"], b"y\r\n").unwrap())
        .unwrap();
    let events = finish(&d);
    assert!(
        events.iter().all(|e| e.kind != EventKind::Deferred),
        "{events:?}"
    );
    let f = finals(&events);
    for r in ["a@r.test", "b@r.test"] {
        assert_eq!(f[r].kind, EventKind::Delivered, "{:?}", f[r]);
        assert_eq!(f[r].attempts, 1, "{:?}", f[r]);
    }
    drop(d);
    let sessions = server.wait_sessions(2);
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    assert!(
        sessions[0].contains("RSET\r\nMAIL FROM:<s@mxpipe.test>"),
        "{sessions:?}"
    );
    assert!(
        sessions[1].contains("RCPT TO:<b@r.test>\r\nDATA\r\ny\r\n.\r\n"),
        "{sessions:?}"
    );
}

#[test]
fn recipients_of_a_dead_destination_expire_at_max_age_not_before() {
    // Nothing listens: three refused connections mark the destination dead for 5 minutes,
    // far beyond the 2.5 s maximum age. The recipients still wait until max age.
    let port = util::free_port("127.0.0.1");
    let max_age = Duration::from_millis(2_500);
    let d = dispatcher(&format!("127.0.0.1:{port}"), quick_retry(2_500));
    for i in 0..3 {
        let to = format!("r{i}@r.test");
        d.submit(Message::new("s@mxpipe.test", [to.as_str()], b"x\r\n").unwrap())
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    let events = finish(&d);
    let f = finals(&events);
    assert_eq!(f.len(), 3);
    for e in f.values() {
        assert_eq!(e.kind, EventKind::Expired, "{e:?}");
        assert!(
            e.elapsed >= max_age,
            "{} expired after {:?}, before the maximum age {max_age:?}",
            e.recipient,
            e.elapsed
        );
    }
    assert!(
        events
            .iter()
            .any(|e| e.reply.text.contains("destination marked dead")),
        "{events:?}"
    );
}
