//! The bounded shutdown, `Dispatcher::shutdown_timeout`, against Postfix's smtp-sink: with a
//! server that holds its reply to DATA, the deadline leaves every recipient with exactly one
//! Deferred event saying why; with a prompt server, everything is delivered and it reports a
//! clean shutdown. Events carry the message's tag.

mod util;

use mxpipe::engine::{Dispatcher, Event, EventKind};
use mxpipe::error::Error;
use mxpipe::message::Message;
use mxpipe::smtp::EnhancedCode;
use std::time::Duration;
use util::SmtpSink;

fn message(recipients: &[&str], tag: u64) -> Message {
    Message::new(
        "sender@example.org",
        recipients.iter().copied(),
        b"Subject: t\r\n\r\nx\r\n",
    )
    .unwrap()
    .with_tag(tag)
}

fn events(d: &Dispatcher) -> Vec<Event> {
    let mut events: Vec<Event> = d.events().unwrap().try_iter().collect();
    events.sort_by(|a, b| a.recipient.as_str().cmp(b.recipient.as_str()));
    events
}

#[test]
fn the_deadline_leaves_every_recipient_deferred_with_the_reason() {
    util::require_tool(util::SMTP_SINK);
    // Answers DATA after 10 s; one connection, so the second message waits in the queue.
    let sink = SmtpSink::start(&["-w", "10"], 1024);
    let d = Dispatcher::builder()
        .relay(&sink.addr().to_string())
        .max_connections_per_destination(1)
        .start()
        .unwrap();
    d.submit(message(&["a@example.net", "b@example.net"], 7))
        .unwrap();
    d.submit(message(&["c@example.net"], 8)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!d.shutdown_timeout(Duration::from_millis(200)));
    let refused = d.submit(message(&["late@example.net"], 9)).unwrap_err();
    assert_eq!(refused.error, Error::ShutDown);

    let events = events(&d);
    let seen: Vec<(&str, EventKind, u64)> = events
        .iter()
        .map(|e| (e.recipient.as_str(), e.kind, e.tag))
        .collect();
    assert_eq!(
        seen,
        [
            ("a@example.net", EventKind::Deferred, 7),
            ("b@example.net", EventKind::Deferred, 7),
            ("c@example.net", EventKind::Deferred, 8),
        ]
    );
    for event in &events {
        assert_eq!(event.reply.code, 0);
        assert_eq!(event.reply.enhanced, Some(EnhancedCode::new(4, 3, 2)));
        assert_eq!(event.retry_after, None);
    }
    assert_eq!(
        events[0].reply.text,
        "mxpipe shut down during the transaction; the server may or may not have accepted \
         the message"
    );
    assert_eq!(
        events[2].reply.text,
        "mxpipe shut down before this recipient was tried"
    );
    let stats = d.stats();
    assert_eq!(
        (stats.delivered, stats.deferred, stats.in_flight),
        (0, 3, 3)
    );
}

#[test]
fn with_time_enough_everything_is_delivered() {
    util::require_tool(util::SMTP_SINK);
    let sink = SmtpSink::start(&[], 1024);
    let d = Dispatcher::builder()
        .relay(&sink.addr().to_string())
        .start()
        .unwrap();
    d.submit(message(&["a@example.net", "b@example.net"], u64::MAX))
        .unwrap();
    assert!(d.shutdown_timeout(Duration::from_secs(30)));
    let events = events(&d);
    assert_eq!(events.len(), 2);
    assert!(events
        .iter()
        .all(|e| e.kind == EventKind::Delivered && e.tag == u64::MAX));
}
