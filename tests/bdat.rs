//! Pipelined BDAT (RFC 3030 with RFC 2920) against real servers: a private Postfix `smtpd`,
//! which offers CHUNKING and PIPELINING, with recipients refused inside a window of whole
//! transactions; and mxpipe's own sink where a connection must break with BDAT in flight.
//! `aiosmtpd` (1.4) does not offer CHUNKING, so it only sees the DATA path (tests/delivery.rs).

mod util;

use mxpipe::engine::{Dispatcher, Event, EventKind};
use mxpipe::message::Message;
use mxpipe::queue::RetryPolicy;
use mxpipe::sink::{Faults, Sink, SinkConfig};
use std::collections::HashMap;
use std::time::Duration;
use util::postfix::Postfix;

fn quick_retry(max_age_ms: u64) -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(100),
        max_interval: Duration::from_millis(400),
        multiplier: 2.0,
        jitter: 0.1,
        max_age: Duration::from_millis(max_age_ms),
    }
}

/// Every recipient's one final event.
fn finals(d: &Dispatcher) -> HashMap<String, Event> {
    assert!(d.wait_final(Duration::from_secs(60)), "{:?}", d.stats());
    let mut out = HashMap::new();
    for e in d.events().unwrap().try_iter().filter(|e| e.kind.is_final()) {
        let old = out.insert(e.recipient.as_str().to_string(), e.clone());
        assert!(old.is_none(), "two final outcomes for {}", e.recipient);
    }
    out
}

#[test]
fn postfix_pipelined_bdat_keeps_every_recipient_exact() {
    let (mails, bdat_ok, bdats) = postfix_window(None);
    // Every transaction carried its BDAT, also those whose recipients were all refused:
    // as many BDATs as MAILs, of which only the 20 deliverable ones were taken.
    assert!(mails >= 30, "{mails}");
    assert_eq!((bdat_ok, bdats), (20, mails));
}

#[test]
fn postfix_without_a_bdat_window_waits_for_rcpt_replies() {
    let (mails, bdat_ok, bdats) = postfix_window(Some((0, 0)));
    // No content where every recipient was refused: BDATs only for the 20 deliverable ones.
    assert!(mails >= 30, "{mails}");
    assert_eq!((bdat_ok, bdats), (20, 20));
}

/// Sends 30 messages over one connection to a private Postfix `smtpd`, with the default BDAT
/// window or this one, checks every recipient's outcome, and returns what Postfix counted:
/// MAIL commands, BDAT commands accepted, BDAT commands.
fn postfix_window(window: Option<(usize, usize)>) -> (u32, u32, u32) {
    // Postfix accepts any recipient of example.test and discards the mail, except two refused
    // by policy; its error limits are raised so that the retries of `busy` meet 450, not a
    // 421 for too many errors on the connection.
    let postfix = Postfix::start_local(
        "local_recipient_maps =\n\
         local_transport = discard:\n\
         smtpd_recipient_restrictions = check_recipient_access \
         inline:{ { refused@example.test = 550 5.7.1 refused by policy }, \
         { busy@example.test = 450 4.2.1 busy now } }, permit_mynetworks, reject\n\
         mynetworks = 127.0.0.0/8\n\
         smtpd_soft_error_limit = 1000\n\
         smtpd_hard_error_limit = 1000",
    );
    let mut builder = Dispatcher::builder()
        .relay(&postfix.addr().to_string())
        .ehlo_name("client.mxpipe.test")
        .max_connections_per_destination(1)
        .retry(quick_retry(300));
    if let Some((transactions, octets)) = window {
        builder = builder.bdat_window(transactions, octets);
    }
    let d = builder.start().unwrap();
    // 30 messages on one connection: plain ones, ones with one refused recipient of two, and
    // ones whose only recipient is refused (their BDAT must fail without a desync).
    let mut expected: Vec<(String, u64, &str, usize)> = Vec::new();
    for i in 0..30 {
        let rcpts: Vec<String> = match i % 3 {
            0 => vec![format!("u{i}@example.test")],
            1 => vec![format!("u{i}@example.test"), "refused@example.test".into()],
            _ => vec!["busy@example.test".into()],
        };
        let body = format!("Subject: m{i}\r\n\r\nmessage {i}\r\n.\r\n");
        let id = d
            .submit(
                Message::new(
                    "s@mxpipe.test",
                    rcpts.iter().map(String::as_str),
                    body.as_bytes(),
                )
                .unwrap(),
            )
            .unwrap();
        for r in rcpts {
            let outcome = match r.as_str() {
                "refused@example.test" => "bounced",
                "busy@example.test" => "expired",
                _ => "delivered",
            };
            expected.push((r, id, outcome, body.len()));
        }
    }
    assert!(d.wait_final(Duration::from_secs(60)), "{:?}", d.stats());
    let events: Vec<Event> = d.events().unwrap().try_iter().collect();
    for (rcpt, id, outcome, size) in &expected {
        let e = events
            .iter()
            .find(|e| e.kind.is_final() && e.recipient.as_str() == rcpt && e.message_id == *id)
            .unwrap_or_else(|| panic!("no outcome for {rcpt} of message {id}"));
        assert_eq!(e.kind.as_str(), *outcome, "{rcpt}: {e:?}");
        match *outcome {
            "delivered" => {
                assert_eq!(e.reply.code, 250, "{e:?}");
                // Postfix counts the octets of the chunk it took: the body, not dot-stuffed.
                let prefix = format!("Ok: {size} bytes queued as ");
                assert!(e.reply.text.starts_with(&prefix), "{e:?}");
            }
            "bounced" => {
                assert_eq!(e.reply.code, 550);
                assert_eq!(
                    e.reply.text,
                    "<refused@example.test>: Recipient address rejected: refused by policy"
                );
                assert_eq!(e.attempts, 1);
            }
            _ => {
                assert_eq!(e.reply.code, 450);
                assert_eq!(
                    e.reply.text,
                    "<busy@example.test>: Recipient address rejected: busy now"
                );
            }
        }
    }
    let finals = events.iter().filter(|e| e.kind.is_final()).count();
    assert_eq!(finals, expected.len(), "one final outcome each");
    let stats = &d.destination_stats()[0];
    assert_eq!(stats.bdat_fallbacks, 0, "{stats:?}");
    drop(d);
    // Postfix queued the 20 deliverable messages, saw BDAT and never DATA, and no pipelining
    // complaint.
    let log = postfix.wait_for_log("status=sent", 20, Duration::from_secs(20));
    assert_eq!(log.matches("status=sent").count(), 20, "{log}");
    let log = postfix.wait_for_log("disconnect from", 1, Duration::from_secs(20));
    let (mut mails, mut bdat_ok, mut bdats) = (0, 0, 0);
    for line in log.lines().filter(|l| l.contains("disconnect from")) {
        for field in line.split_whitespace() {
            let counts = |v: &str| -> (u32, u32) {
                match v.split_once('/') {
                    Some((ok, all)) => (ok.parse().unwrap(), all.parse().unwrap()),
                    None => (v.parse().unwrap(), v.parse().unwrap()),
                }
            };
            if let Some(v) = field.strip_prefix("mail=") {
                mails += counts(v).1;
            } else if let Some(v) = field.strip_prefix("bdat=") {
                let (ok, all) = counts(v);
                bdat_ok += ok;
                bdats += all;
            }
        }
    }
    assert!(!log.contains(" data="), "{log}");
    assert!(!log.contains("improper command pipelining"), "{log}");
    (mails, bdat_ok, bdats)
}

#[test]
fn connection_lost_with_pipelined_bdat_in_flight_falls_back_and_is_counted() {
    let sink = Sink::start(SinkConfig {
        faults: Faults {
            drop_during_data: true,
            ..Faults::default()
        },
        ..SinkConfig::default()
    })
    .unwrap();
    let d = Dispatcher::builder()
        .relay(&sink.local_addr().to_string())
        .ehlo_name("client.mxpipe.test")
        .retry(quick_retry(600))
        .start()
        .unwrap();
    d.submit(Message::new("s@mxpipe.test", ["a@r.test"], b"x\r\n").unwrap())
        .unwrap();
    let f = finals(&d);
    let e = &f["a@r.test"];
    assert_eq!(e.kind, EventKind::Expired, "{e:?}");
    assert!(e.reply.text.contains("connection lost"), "{e:?}");
    assert!(e.attempts >= 2, "{e:?}");
    // The first broken session made the destination fall back, once.
    assert_eq!(d.destination_stats()[0].bdat_fallbacks, 1);
    let prometheus = d.prometheus();
    assert!(
        prometheus.contains("destination_bdat_fallbacks_total{"),
        "{prometheus}"
    );
}
