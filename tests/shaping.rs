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
        // Connections that wait long for the limiter close, and come back only if needed.
        .idle_timeout(Duration::from_millis(200))
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
    // Connections waiting for the limiter are enough: none beyond the window (20) is opened
    // to wait beside them.
    assert!(
        d.stats().connections_opened <= 20,
        "{} connections for a rate-limited destination",
        d.stats().connections_opened
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

/// One reading of the destination's adaptive window, and how many connections the sink had
/// refused with 421 by then. The refusals are read after the window, so a sample that shows
/// none was taken before any 421 could have shrunk the window.
#[derive(Debug, Clone, Copy)]
struct WindowSample {
    at: Duration,
    concurrency_limit: u64,
    refused: u64,
}

/// The first 200 samples where something changed, one per line, for failure messages.
fn window_trace(samples: &[WindowSample]) -> String {
    let mut changes = Vec::new();
    let mut last = None;
    for s in samples {
        if last != Some((s.concurrency_limit, s.refused)) {
            changes.push(format!(
                "{:>9.1?} limit={:<2} refused={}",
                s.at, s.concurrency_limit, s.refused
            ));
            last = Some((s.concurrency_limit, s.refused));
        }
    }
    let more = changes.len().saturating_sub(200);
    changes.truncate(200);
    if more > 0 {
        changes.push(format!("... {more} more changes"));
    }
    changes.join("\n")
}

#[test]
fn a_421_for_the_tenth_connection_shrinks_the_window_then_it_grows_back() {
    const MESSAGES: usize = 1_000;
    // Nine connections at once are served; a tenth is greeted with
    // "421 4.7.0 Too many connections, try again later" and closed, every time. Each reply
    // takes 10 ms, so that the window's changes last long enough to be seen from outside.
    let sink = Sink::start(SinkConfig {
        faults: Faults {
            max_connections: Some(9),
            reply_delay: Some(Duration::from_millis(10)),
            ..Faults::default()
        },
        ..SinkConfig::default()
    })
    .unwrap();
    let name = sink.local_addr().to_string();
    let d = Dispatcher::builder()
        .relay(&name)
        .max_connections_per_destination(20)
        .adaptive(Adaptive {
            initial_concurrency: 5.0,
            // Should a burst of refusals mark the destination dead, it is left alone for a
            // second, not the default five minutes; the retries then still deliver everything.
            dead_for: Duration::from_secs(1),
            ..Adaptive::default()
        })
        .retry(retry(60_000))
        .start()
        .unwrap();

    let start = Instant::now();
    let mut samples: Vec<WindowSample> = Vec::new();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for i in 0..MESSAGES {
                let rcpt = format!("r{i}@x.test");
                d.submit_timeout(
                    Message::new("s@mxpipe.test", [rcpt.as_str()], b"x\r\n").unwrap(),
                    Duration::from_secs(10),
                )
                .unwrap();
            }
        });
        // The window as a user watching destination_stats() sees it, every millisecond until
        // every recipient is final: at most 60 s and 60,000 samples.
        let deadline = start + Duration::from_secs(60);
        while samples.len() < 60_000 && Instant::now() < deadline {
            let limit = d
                .destination_stats()
                .iter()
                .find(|p| p.name == name)
                .map(|p| p.concurrency_limit);
            let refused = sink.stats().refused_connections;
            if let Some(concurrency_limit) = limit {
                samples.push(WindowSample {
                    at: start.elapsed(),
                    concurrency_limit,
                    refused,
                });
            }
            let s = d.stats();
            if s.submitted_recipients == MESSAGES as u64 && s.in_flight == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    assert!(
        d.wait_final(Duration::from_secs(30)),
        "not all final: {:?}",
        d.stats()
    );

    // Everything delivered: each recipient exactly once, nothing bounced or expired, and the
    // sink took each message once.
    let events: Vec<Event> = d.events().unwrap().try_iter().collect();
    let mut delivered: HashMap<&str, u32> = HashMap::new();
    for e in &events {
        match e.kind {
            EventKind::Delivered => *delivered.entry(e.recipient.as_str()).or_default() += 1,
            EventKind::Deferred => {}
            EventKind::Bounced | EventKind::Expired => panic!("not delivered: {e:?}"),
        }
    }
    for i in 0..MESSAGES {
        let rcpt = format!("r{i}@x.test");
        assert_eq!(delivered.get(rcpt.as_str()), Some(&1), "{rcpt} delivered");
    }
    assert_eq!(delivered.len(), MESSAGES);
    let s = d.stats();
    assert_eq!((s.delivered, s.in_flight), (MESSAGES as u64, 0), "{s:?}");
    let sink_stats = sink.stop();
    assert_eq!(
        (sink_stats.messages, sink_stats.recipients),
        (MESSAGES as u64, MESSAGES as u64),
        "{sink_stats:?}"
    );
    // The fault fired: the dispatcher did try a tenth connection and was refused. A connection
    // refused at its greeting carries no recipients, so its 421 reaches an event only when no
    // other connection to the destination is working: here the sink's count is where it shows.
    assert!(sink_stats.refused_connections >= 1, "{sink_stats:?}");

    // The window went down only after a 421 ...
    let trace = window_trace(&samples);
    let mut peak = 0;
    let drop_at = samples.iter().position(|s| {
        let dropped = s.concurrency_limit < peak;
        peak = peak.max(s.concurrency_limit);
        dropped
    });
    let Some(drop_at) = drop_at else {
        panic!("the window never went down:\n{trace}");
    };
    assert!(
        samples[drop_at].refused >= 1,
        "the window went down before any 421:\n{trace}"
    );
    // ... and grew back afterwards.
    let low = samples[drop_at].concurrency_limit;
    assert!(
        samples[drop_at..].iter().any(|s| s.concurrency_limit > low),
        "the window did not grow back from {low}:\n{trace}"
    );
    // It grows back only to what the server accepted (nine), for a while: the tenth
    // connection is not tried again and again.
    assert!(
        samples[drop_at..].iter().all(|s| s.concurrency_limit <= 9),
        "the window grew past nine again:\n{trace}"
    );
    let throttled = d
        .destination_stats()
        .iter()
        .find(|p| p.name == name)
        .map(|p| p.throttled);
    assert_eq!(
        throttled,
        Some(sink_stats.refused_connections),
        "every 421 counted as a throttle"
    );
    assert!(
        sink_stats.refused_connections <= 5,
        "{} connections refused: the 421 was not remembered",
        sink_stats.refused_connections
    );
}

#[test]
fn a_recipient_domain_override_gets_its_own_connections_and_limits() {
    // One smarthost (Postfix's smtp-sink) for everything; recipients at slow.test get at most
    // one connection and 50 messages a second of their own, the others the defaults.
    let sink = SmtpSink::start(&[], 1024);
    let relay = format!("127.0.0.1:{}", sink.addr().port());
    let d = Dispatcher::builder()
        .relay(&relay)
        .max_connections_per_destination(10)
        .limit_override(LimitOverride {
            pattern: "slow.test".into(),
            recipient_domain: true,
            max_connections: Some(1),
            messages_per_second: Some(50.0),
            ..LimitOverride::default()
        })
        .start()
        .unwrap();
    for i in 0..500 {
        let domain = if i % 5 == 0 { "slow.test" } else { "fast.test" };
        let rcpt = format!("r{i}@{domain}");
        d.submit_timeout(
            Message::new("s@mxpipe.test", [rcpt.as_str()], b"x\r\n").unwrap(),
            Duration::from_secs(10),
        )
        .unwrap();
    }
    assert!(d.wait_final(Duration::from_secs(30)), "{:?}", d.stats());
    let events: Vec<Event> = d.events().unwrap().try_iter().collect();
    let outcomes = finals(&events);
    assert_eq!(outcomes.len(), 500);
    assert!(outcomes.values().all(|e| e.kind == EventKind::Delivered));

    // The slow domain's rate, from each outcome's time since submission (all were submitted
    // within moments of each other): within any one second at most the limit plus its burst
    // (a tenth), and a little for the spread of submissions.
    let mut slow: Vec<Duration> = outcomes
        .values()
        .filter(|e| e.recipient.domain() == "slow.test")
        .map(|e| e.elapsed)
        .collect();
    slow.sort_unstable();
    assert_eq!(slow.len(), 100);
    for (i, &t) in slow.iter().enumerate() {
        let in_window = slow[i..]
            .iter()
            .take_while(|&&u| u < t + Duration::from_secs(1))
            .count();
        assert!(
            in_window <= 58,
            "{in_window} slow.test messages within one second"
        );
    }
    // 100 messages at 50 a second, after a burst of 5, take at least 1.9 s.
    assert!(slow[99] >= Duration::from_millis(1800), "{:?}", slow[99]);

    let per = d.destination_stats();
    let grouped = format!("{relay} for @slow.test");
    let find = |name: &str| {
        per.iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no destination {name}: {per:?}"))
    };
    assert_eq!(per.len(), 2, "{per:?}");
    assert_eq!(find(&relay).delivered, 400);
    assert_eq!(find(&grouped).delivered, 100);
    assert_eq!(find(&grouped).concurrency_limit, 1);
    assert_eq!(find(&grouped).rate_limit, Some(50.0));
    assert_eq!(find(&relay).rate_limit, None);
}

/// An idle timeout of zero (which the builder and `mxp_config_set` accept) with a rate limit
/// and replies that take 3 ms, so that transactions end in the turns where the limiter's wake
/// is due: an idle connection kept for the limiter must not be rescheduled for the same
/// instant again and again.
#[test]
fn an_idle_timeout_of_zero_with_a_rate_limit_does_not_hang_the_loop() {
    let sink = Sink::start(SinkConfig {
        faults: Faults {
            reply_delay: Some(Duration::from_millis(3)),
            ..Faults::default()
        },
        ..SinkConfig::default()
    })
    .unwrap();
    let d = Dispatcher::builder()
        .relay(&sink.local_addr().to_string())
        .messages_per_second(1000.0)
        .idle_timeout(Duration::ZERO)
        .record_events(false)
        .start()
        .unwrap();
    for i in 0..3000 {
        d.submit_timeout(
            Message::new("s@mxpipe.test", [format!("r{i}@x.test").as_str()], b"x\r\n").unwrap(),
            Duration::from_secs(10),
        )
        .unwrap();
    }
    let ok = d.wait_final(Duration::from_secs(30));
    let stats = d.stats();
    if !ok {
        std::mem::forget(d);
    }
    assert!(ok, "not final after 30 s: {stats:?}");
    assert_eq!(stats.delivered, 3000, "{stats:?}");
    assert_eq!(sink.stats().messages, 3000);
}

/// A slow limit (one message every 500 ms, longer than the idle timeout): each wake of the
/// limiter must not open a window's worth of connections for the one message it lets go.
#[test]
fn a_slow_rate_limit_opens_a_connection_per_message_at_most() {
    let sink = Sink::start(SinkConfig::default()).unwrap();
    let d = Dispatcher::builder()
        .relay(&sink.local_addr().to_string())
        .messages_per_second(2.0)
        .idle_timeout(Duration::from_millis(200))
        .record_events(false)
        .start()
        .unwrap();
    for i in 0..8 {
        d.submit(
            Message::new("s@mxpipe.test", [format!("r{i}@x.test").as_str()], b"x\r\n").unwrap(),
        )
        .unwrap();
    }
    assert!(d.wait_final(Duration::from_secs(30)));
    let s = d.stats();
    assert_eq!(s.delivered, 8, "{s:?}");
    assert_eq!(sink.stats().messages, 8);
    // One connection per message, give or take the odd one on a loaded machine: a message
    // released just as its connection closes for idleness (or fails the reuse probe) moves to
    // a new one. A window's worth per wake (the defect) would be dozens.
    assert!(
        s.connections_opened <= 10,
        "{} connections for {} messages",
        s.connections_opened,
        s.transactions
    );
}

#[test]
fn rates_that_are_not_numbers_above_zero_are_refused_at_start() {
    use mxpipe::error::Error;
    let refused = |builder: mxpipe::engine::DispatcherBuilder| match builder.start() {
        Err(Error::InvalidConfig { key, problem }) => (key, problem),
        Err(other) => panic!("another error: {other}"),
        Ok(_) => panic!("started"),
    };
    let base = || Dispatcher::builder().relay("127.0.0.1:2525");
    let (key, problem) = refused(base().messages_per_hour(0.0));
    assert_eq!(key, "rates");
    assert_eq!(
        problem,
        "messages per second, minute or hour and connections per minute must be numbers above zero"
    );
    let (key, _) = refused(base().limit_override(LimitOverride {
        pattern: "x.test".into(),
        recipient_domain: true,
        messages_per_minute: Some(f64::NAN),
        ..LimitOverride::default()
    }));
    assert_eq!(key, "rates");
    assert!(base().messages_per_minute(0.5).start().is_ok());
}

#[test]
fn recipients_expire_at_their_maximum_age_while_their_destination_is_paused() {
    // Every connection is greeted with 421: the destination pauses for 60 s after the first.
    let sink = Sink::start(SinkConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        faults: Faults {
            greeting: Some("421 4.7.0 slow down".into()),
            ..Faults::default()
        },
        ..SinkConfig::default()
    })
    .unwrap();
    let d = Dispatcher::builder()
        .relay(&sink.local_addr().to_string())
        .adaptive(Adaptive {
            pause: Duration::from_secs(60),
            max_pause: Duration::from_secs(60),
            dead_after: 1_000,
            ..Adaptive::default()
        })
        .retry(retry(2_000))
        .start()
        .unwrap();
    let rcpts: Vec<String> = (0..30).map(|i| format!("p{i}@x.test")).collect();
    for r in &rcpts {
        d.submit(Message::new("s@mxpipe.test", [r.as_str()], b"x\r\n").unwrap())
            .unwrap();
    }
    // Final at the 2 s maximum age, not after the 60 s pause.
    assert!(d.wait_final(Duration::from_secs(30)));
    let events: Vec<Event> = d.events().unwrap().try_iter().collect();
    let f = finals(&events);
    assert_eq!(f.len(), 30);
    for e in f.values() {
        assert_eq!(e.kind, EventKind::Expired, "{e:?}");
        // With the server's own reason, as a deferral would report it.
        assert_eq!(
            (e.reply.code, e.reply.text.as_str()),
            (421, "slow down"),
            "{e:?}"
        );
    }
    assert_eq!(d.stats().in_flight, 0);
}
