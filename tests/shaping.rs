//! Deliverability control against real servers: rate limits, a tarpit beside a fast
//! destination, expiry, and a destination that refuses connections beyond a limit. Timings are
//! never asserted as speeds; where a rate is checked it is an upper bound the dispatcher must
//! respect, which a slow machine cannot break.

mod util;

use mxpipe::engine::classify::Category;
use mxpipe::engine::shaping::{Adaptive, LimitOverride};
use mxpipe::engine::{Dispatcher, Event, EventKind};
use mxpipe::message::Message;
use mxpipe::queue::RetryPolicy;
use mxpipe::sink::{Faults, Sink, SinkConfig};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use util::SmtpSink;

fn retry(max_age_ms: u64) -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(100),
        max_interval: Duration::from_millis(300),
        multiplier: 2.0,
        jitter: 0.2,
        max_age: Duration::from_millis(max_age_ms),
    }
}

fn finals(events: &[Event]) -> HashMap<String, Event> {
    let mut out = HashMap::new();
    for e in events.iter().filter(|e| e.kind.is_final()) {
        assert!(
            out.insert(e.recipient.as_str().to_string(), e.clone())
                .is_none(),
            "two final outcomes for {}",
            e.recipient
        );
    }
    out
}

#[test]
fn message_rate_limit_is_respected() {
    let sink = SmtpSink::start(&[], 1024);
    let d = Dispatcher::builder()
        .relay(&sink.addr().to_string())
        .messages_per_second(100.0)
        .start()
        .unwrap();
    let start = Instant::now();
    for i in 0..200 {
        d.submit(
            Message::new("s@mxpipe.test", [format!("r{i}@x.test").as_str()], b"x\r\n").unwrap(),
        )
        .unwrap();
    }
    assert!(d.wait_final(Duration::from_secs(60)));
    let events: Vec<Event> = d.events().unwrap().try_iter().collect();
    assert_eq!(events.len(), 200);
    assert!(events.iter().all(|e| e.kind == EventKind::Delivered));
    // 200 messages at 100/s with a burst of 10 cannot be done in under 1.9 s.
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1850),
        "too fast: {elapsed:?}"
    );
    // No one-second window holds more than the rate plus the burst.
    let mut times: Vec<Duration> = events.iter().map(|e| e.elapsed).collect();
    times.sort();
    for (i, &t) in times.iter().enumerate() {
        let in_window = times[i..]
            .iter()
            .take_while(|&&u| u < t + Duration::from_secs(1))
            .count();
        assert!(in_window <= 111, "{in_window} messages within one second");
    }
}

#[test]
fn a_tarpit_does_not_hold_back_a_fast_destination() {
    // Every reply of the tarpit takes 2 s; the fast destination is Postfix's smtp-sink.
    let tarpit = Sink::start(SinkConfig {
        faults: Faults {
            reply_delay: Some(Duration::from_secs(2)),
            ..Faults::default()
        },
        ..SinkConfig::default()
    })
    .unwrap();
    let fast = SmtpSink::start(&[], 1024);
    let d = Dispatcher::builder()
        .relay(&fast.addr().to_string())
        .route("slow.test", &tarpit.local_addr().to_string())
        .retry(retry(60_000))
        .start()
        .unwrap();
    for i in 0..10 {
        d.submit(
            Message::new(
                "s@mxpipe.test",
                [format!("t{i}@slow.test").as_str()],
                b"x\r\n",
            )
            .unwrap(),
        )
        .unwrap();
    }
    let start = Instant::now();
    for i in 0..2_000 {
        d.submit_timeout(
            Message::new(
                "s@mxpipe.test",
                [format!("f{i}@fast.test").as_str()],
                b"x\r\n",
            )
            .unwrap(),
            Duration::from_secs(10),
        )
        .unwrap();
    }
    let events = d.events().unwrap();
    let mut fast_done = 0;
    let mut slow_done = 0;
    let mut fast_finished_while_slow_pending = false;
    while fast_done + slow_done < 2_010 {
        let e = events
            .recv_timeout(Duration::from_secs(60))
            .expect("an outcome");
        assert_eq!(e.kind, EventKind::Delivered, "{e:?}");
        if e.recipient.domain() == "fast.test" {
            fast_done += 1;
            if fast_done == 2_000 && slow_done < 10 {
                fast_finished_while_slow_pending = true;
            }
        } else {
            slow_done += 1;
        }
    }
    assert!(
        fast_finished_while_slow_pending,
        "the fast destination finished before the tarpit ({:?})",
        start.elapsed()
    );
    assert_eq!(d.stats().delivered, 2_010);
}

#[test]
fn expiry_gives_each_recipient_one_expired_outcome() {
    let sink = SmtpSink::start(&["-r", "rcpt"], 64);
    let d = Dispatcher::builder()
        .relay(&sink.addr().to_string())
        .retry(retry(800))
        .start()
        .unwrap();
    let rcpts: Vec<String> = (0..20).map(|i| format!("e{i}@x.test")).collect();
    d.submit(Message::new("s@mxpipe.test", rcpts.iter().map(String::as_str), b"x\r\n").unwrap())
        .unwrap();
    assert!(d.wait_final(Duration::from_secs(30)));
    let events: Vec<Event> = d.events().unwrap().try_iter().collect();
    let f = finals(&events);
    assert_eq!(f.len(), 20);
    for e in f.values() {
        assert_eq!(e.kind, EventKind::Expired);
        assert!(e.attempts >= 2, "{e:?}");
        assert!(e.reply.code >= 400 && e.reply.code < 500, "{e:?}");
    }
    let s = d.stats();
    assert_eq!(
        (s.expired, s.delivered, s.bounced, s.in_flight),
        (20, 0, 0, 0)
    );
}

#[test]
fn a_dead_destination_defers_without_hammering() {
    let port = util::free_port("127.0.0.1");
    let d = Dispatcher::builder()
        .relay(&format!("127.0.0.1:{port}"))
        .adaptive(Adaptive {
            dead_after: 1,
            dead_for: Duration::from_secs(30),
            ..Adaptive::default()
        })
        .retry(RetryPolicy {
            max_age: Duration::from_secs(2),
            ..retry(2_000)
        })
        .start()
        .unwrap();
    for i in 0..50 {
        d.submit(
            Message::new("s@mxpipe.test", [format!("d{i}@x.test").as_str()], b"x\r\n").unwrap(),
        )
        .unwrap();
    }
    assert!(d.wait_final(Duration::from_secs(30)));
    let events: Vec<Event> = d.events().unwrap().try_iter().collect();
    let f = finals(&events);
    assert_eq!(f.len(), 50);
    assert!(f.values().all(|e| e.kind == EventKind::Expired));
    assert!(f.values().all(|e| e.category == Some(Category::Connection)));
    // Marked dead after the first refusal: the 50 recipients did not cost 50 connections.
    let opened = d.stats().connections_opened;
    assert!(opened <= 5, "{opened} connection attempts");
    assert!(events.iter().any(|e| e.reply.text.contains("marked dead")));
}

#[test]
fn overrides_apply_by_host() {
    let sink = SmtpSink::start(&[], 1024);
    let d = Dispatcher::builder()
        .relay(&format!("localhost:{}", sink.addr().port()))
        .max_connections_per_destination(20)
        .limit_override(LimitOverride {
            pattern: "localhost".into(),
            max_connections: Some(1),
            ..LimitOverride::default()
        })
        .record_events(false)
        .start()
        .unwrap();
    for i in 0..300 {
        d.submit(
            Message::new("s@mxpipe.test", [format!("o{i}@x.test").as_str()], b"x\r\n").unwrap(),
        )
        .unwrap();
    }
    assert!(d.wait_final(Duration::from_secs(30)));
    let s = d.stats();
    assert_eq!(s.delivered, 300);
    assert_eq!(s.connections_opened, 1);
    let name = format!("localhost:{}", sink.addr().port());
    let per = d.destination_stats();
    assert_eq!(per.len(), 1);
    assert_eq!(
        (
            per[0].name.as_str(),
            per[0].delivered,
            per[0].queued,
            per[0].in_flight
        ),
        (name.as_str(), 300, 0, 0)
    );
    assert_eq!(per[0].concurrency_limit, 1);
    let text = d.prometheus();
    assert!(text.contains("mxpipe_delivered_total 300\n"), "{text}");
    assert!(
        text.contains(&format!(
            "mxpipe_destination_delivered_total{{destination=\"{name}\"}} 300\n"
        )),
        "{text}"
    );
}

#[test]
fn a_full_connection_table_serves_destinations_in_turn() {
    let sinks: Vec<SmtpSink> = (0..3).map(|_| SmtpSink::start(&[], 64)).collect();
    let mut builder = Dispatcher::builder()
        .relay(&sinks[0].addr().to_string())
        .max_connections(1)
        // Without reclaiming idle connections this would wait a minute per destination.
        .idle_timeout(Duration::from_secs(60));
    for (i, sink) in sinks.iter().enumerate().skip(1) {
        builder = builder.route(&format!("d{i}.test"), &sink.addr().to_string());
    }
    let d = builder.start().unwrap();
    for round in 0..3 {
        for i in 0..3 {
            let rcpt = format!("r{round}@d{i}.test");
            d.submit(Message::new("s@mxpipe.test", [rcpt.as_str()], b"x\r\n").unwrap())
                .unwrap();
        }
    }
    assert!(d.wait_final(Duration::from_secs(30)), "{:?}", d.stats());
    let s = d.stats();
    assert_eq!(s.delivered, 9);
    assert!(s.connections_open <= 1);
    let per = d.destination_stats();
    assert!(per.iter().all(|p| p.delivered == 3), "{per:?}");
}
