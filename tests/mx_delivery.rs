//! Direct-to-MX delivery end to end: a real DNS server (dnsmasq) on loopback answers MX and A
//! queries for `.test` domains whose exchangers are Postfix `smtp-sink`s on other loopback
//! addresses (127.0.0.2, 127.0.0.3, ...), all on one port that the resolver is told to use.

mod util;

use mxpipe::engine::classify::Category;
use mxpipe::engine::shaping::LimitOverride;
use mxpipe::engine::{Dispatcher, Event, EventKind};
use mxpipe::message::{Body, Message};
use mxpipe::queue::RetryPolicy;
use mxpipe::route::mx::MxConfig;
use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;
use util::dns::{Dnsmasq, SilentNameserver};
use util::SmtpSink;

/// A port free on every loopback address the test uses.
fn common_port(ips: &[&str]) -> u16 {
    for _ in 0..50 {
        let port = util::free_port(ips[0]);
        if ips.iter().all(|ip| TcpListener::bind((*ip, port)).is_ok()) {
            return port;
        }
    }
    panic!("no common free port");
}

fn mx_config(nameserver: std::net::SocketAddr, port: u16) -> MxConfig {
    MxConfig {
        nameservers: Some(vec![nameserver]),
        smtp_port: port,
        ipv6: false,
        timeout: Duration::from_millis(300),
        // Every MX host here is on loopback: mail to them would otherwise loop back.
        allow_loopback: true,
        ..MxConfig::default()
    }
}

fn retry(max_age_ms: u64) -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(100),
        max_interval: Duration::from_millis(300),
        multiplier: 2.0,
        jitter: 0.1,
        max_age: Duration::from_millis(max_age_ms),
    }
}

fn run(d: &Dispatcher) -> HashMap<String, Event> {
    assert!(d.wait_final(Duration::from_secs(60)), "{:?}", d.stats());
    let mut finals = HashMap::new();
    for e in d.events().unwrap().try_iter().filter(|e| e.kind.is_final()) {
        assert!(
            finals.insert(e.recipient.to_string(), e.clone()).is_none(),
            "two finals"
        );
    }
    finals
}

fn send(d: &Dispatcher, rcpts: &[&str]) {
    d.submit(
        Message::new(
            "s@mxpipe.test",
            rcpts.iter().copied(),
            b"Subject: mx\r\n\r\nx\r\n",
        )
        .unwrap(),
    )
    .unwrap();
}

#[test]
fn preference_order_and_fallback_to_the_second_mx() {
    let port = common_port(&["127.0.0.2", "127.0.0.3"]);
    // mx1 (preference 10) refuses connections: nothing listens on 127.0.0.2.
    let second = SmtpSink::start_on_port("127.0.0.3", port, &[]);
    let dns = Dnsmasq::builder()
        .mx("fallback.test", "mx1.fallback.test", 10)
        .mx("fallback.test", "mx2.fallback.test", 20)
        .host("mx1.fallback.test", "127.0.0.2")
        .host("mx2.fallback.test", "127.0.0.3")
        .start();
    let d = Dispatcher::builder()
        .direct_mx(mx_config(dns.addr(), port))
        .retry(retry(10_000))
        .start()
        .unwrap();
    send(&d, &["a@fallback.test", "b@fallback.test"]);
    let f = run(&d);
    for e in f.values() {
        assert_eq!(e.kind, EventKind::Delivered, "{e:?}");
        assert_eq!(
            &*e.destination,
            format!("mx2.fallback.test[127.0.0.3]:{port}")
        );
        assert_eq!(e.attempts, 1, "moving to the next MX is not a new attempt");
    }
    drop(second);
}

#[test]
fn implicit_mx_null_mx_and_nxdomain() {
    let port = common_port(&["127.0.0.4"]);
    let sink = SmtpSink::start_on_port("127.0.0.4", port, &[]);
    let dns = Dnsmasq::builder()
        .host("implicit.test", "127.0.0.4")
        .null_mx("null.test")
        .host("null.test", "127.0.0.4")
        .start();
    let d = Dispatcher::builder()
        .direct_mx(mx_config(dns.addr(), port))
        .retry(retry(5_000))
        .start()
        .unwrap();
    send(&d, &["i@implicit.test", "n@null.test", "x@nowhere.test"]);
    let f = run(&d);
    assert_eq!(f["i@implicit.test"].kind, EventKind::Delivered);
    assert_eq!(
        &*f["i@implicit.test"].destination,
        format!("implicit.test[127.0.0.4]:{port}")
    );
    let null = &f["n@null.test"];
    assert_eq!(null.kind, EventKind::Bounced);
    assert_eq!(null.reply.enhanced.unwrap().to_string(), "5.1.10");
    assert_eq!(
        null.reply.text,
        "null.test does not accept mail (null MX, RFC 7505)"
    );
    assert_eq!(null.category, Some(Category::NoSuchDomain));
    let nx = &f["x@nowhere.test"];
    assert_eq!(nx.kind, EventKind::Bounced);
    assert_eq!(nx.reply.enhanced.unwrap().to_string(), "5.1.2");
    assert_eq!(nx.category, Some(Category::NoSuchDomain));
    // Only the implicit MX was connected to.
    assert_eq!(d.stats().connections_opened, 1);
    drop(sink);
}

#[test]
fn a_nameserver_that_does_not_answer_defers() {
    let silent = SilentNameserver::start();
    let d = Dispatcher::builder()
        .direct_mx(mx_config(silent.addr(), 2525))
        .retry(retry(1_500))
        .start()
        .unwrap();
    send(&d, &["t@timeout.test"]);
    assert!(d.wait_final(Duration::from_secs(60)));
    let events: Vec<Event> = d.events().unwrap().try_iter().collect();
    assert_eq!(events[0].kind, EventKind::Deferred);
    assert!(
        events[0]
            .reply
            .text
            .starts_with("DNS lookup for timeout.test failed"),
        "{}",
        events[0].reply.text
    );
    assert_eq!(events[0].category, Some(Category::Dns));
    let last = events.last().unwrap();
    assert_eq!(last.kind, EventKind::Expired);
    assert_eq!(d.stats().connections_opened, 0);
}

/// one.test and two.test, both with the MX host mx.hosted.test: an smtp-sink on 127.0.0.5.
fn two_domains_on_one_mx_host() -> (u16, SmtpSink, Dnsmasq) {
    let port = common_port(&["127.0.0.5"]);
    let sink = SmtpSink::start_on_port("127.0.0.5", port, &[]);
    // Routes live as long as their TTL: long enough to be shared by the messages of a test.
    let dns = Dnsmasq::builder()
        .ttl(300)
        .mx("one.test", "mx.hosted.test", 10)
        .mx("two.test", "mx.hosted.test", 10)
        .host("mx.hosted.test", "127.0.0.5")
        .start();
    (port, sink, dns)
}

#[test]
fn domains_sharing_an_mx_host_share_its_pool_and_transactions() {
    let (port, sink, dns) = two_domains_on_one_mx_host();
    let d = Dispatcher::builder()
        .direct_mx(mx_config(dns.addr(), port))
        .max_connections_per_destination(2)
        .retry(retry(5_000))
        .start()
        .unwrap();
    // Resolve both domains first, so that the next message finds both routes ready.
    send(&d, &["warm@one.test", "warm@two.test"]);
    run(&d);
    let before = d.stats().transactions;
    send(&d, &["a@one.test", "b@two.test"]);
    let f = run(&d);
    assert!(f.values().all(|e| e.kind == EventKind::Delivered));
    assert_eq!(
        d.stats().transactions - before,
        1,
        "one transaction for both domains"
    );
    let per = d.destination_stats();
    let hosted: Vec<_> = per
        .iter()
        .filter(|s| s.name.starts_with("mx.hosted.test"))
        .collect();
    assert_eq!(hosted.len(), 1, "{per:?}");
    assert_eq!(hosted[0].delivered, 4);
    assert!(d.stats().connections_opened <= 2);
    drop(sink);
}

#[test]
fn a_recipient_domain_override_separates_its_domain_on_a_shared_mx_host() {
    let (port, sink, dns) = two_domains_on_one_mx_host();
    let d = Dispatcher::builder()
        .direct_mx(mx_config(dns.addr(), port))
        .limit_override(LimitOverride {
            pattern: "two.test".into(),
            recipient_domain: true,
            max_connections: Some(1),
            messages_per_minute: Some(6000.0),
            ..LimitOverride::default()
        })
        .retry(retry(5_000))
        .start()
        .unwrap();
    send(&d, &["a@one.test", "b@two.test"]);
    let f = run(&d);
    assert!(f.values().all(|e| e.kind == EventKind::Delivered), "{f:?}");
    assert_eq!(d.stats().transactions, 2, "one transaction per limit group");
    let per = d.destination_stats();
    let hosted = |suffix: &str| {
        per.iter()
            .find(|s| s.name.starts_with("mx.hosted.test") && s.name.ends_with(suffix))
            .unwrap_or_else(|| panic!("no destination ending {suffix:?}: {per:?}"))
    };
    let shared = hosted(&format!(":{port}"));
    let own = hosted(" for @two.test");
    assert_eq!((shared.delivered, own.delivered), (1, 1));
    assert_eq!(own.concurrency_limit, 1);
    assert_eq!(own.rate_limit, Some(100.0), "6000 a minute is 100 a second");
    assert_eq!(shared.rate_limit, None);
    drop(sink);
}

#[test]
fn ten_thousand_recipients_over_a_thousand_domains() {
    let ips = ["127.0.0.6", "127.0.0.7", "127.0.0.8", "127.0.0.9"];
    let port = common_port(&ips);
    let sinks: Vec<SmtpSink> = ips
        .iter()
        .map(|ip| SmtpSink::start_on_port(ip, port, &[]))
        .collect();
    let mut dns = Dnsmasq::builder();
    for (i, ip) in ips.iter().enumerate() {
        dns = dns.host(&format!("mx{i}.bulk.test"), ip);
    }
    for n in 0..1_000 {
        dns = dns.mx(
            &format!("d{n}.test"),
            &format!("mx{}.bulk.test", n % ips.len()),
            10,
        );
    }
    let dns = dns.start();
    let d = Dispatcher::builder()
        .direct_mx(mx_config(dns.addr(), port))
        .record_events(false)
        .retry(retry(30_000))
        .start()
        .unwrap();
    let body = Arc::new(Body::new(b"Subject: bulk\r\n\r\nhello\r\n").unwrap());
    for n in 0..1_000 {
        let rcpts: Vec<String> = (0..10).map(|i| format!("u{i}@d{n}.test")).collect();
        let m = Message::with_body(
            "s@mxpipe.test",
            rcpts.iter().map(String::as_str),
            Arc::clone(&body),
        )
        .unwrap();
        d.submit_timeout(m, Duration::from_secs(10)).unwrap();
    }
    assert!(d.wait_final(Duration::from_secs(120)), "{:?}", d.stats());
    let s = d.stats();
    assert_eq!((s.delivered, s.bounced, s.expired), (10_000, 0, 0));
    let per = d.destination_stats();
    for (i, ip) in ips.iter().enumerate() {
        let name = format!("mx{i}.bulk.test[{ip}]:{port}");
        let host = per
            .iter()
            .find(|p| p.name == name)
            .expect("destination per MX host");
        assert_eq!(host.delivered, 2_500, "{name}");
    }
    drop(sinks);
}

/// The addresses of this machine's network interfaces other than loopback, as `hostname -I`
/// lists them (none when the tool is missing).
fn own_addresses() -> Vec<String> {
    std::process::Command::new("hostname")
        .arg("-I")
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter(|a| a.parse::<std::net::Ipv4Addr>().is_ok())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn mx_hosts_on_this_machine_bounce_as_a_mail_loop() {
    // Postfix: "mail for X loops back to myself" (5.4.6) when the best MX is this host.
    let port = common_port(&["127.0.0.12"]);
    let sink = SmtpSink::start_on_port("127.0.0.12", port, &[]);
    let mut dns = Dnsmasq::builder()
        .mx("loop.test", "mx.loop.test", 10)
        .host("mx.loop.test", "127.0.0.12")
        .host("zero.test", "0.0.0.0");
    let own = own_addresses();
    if let Some(ip) = own.first() {
        dns = dns
            .mx("own.test", "mx.own.test", 10)
            .host("mx.own.test", ip);
    }
    let dns = dns.start();
    let d = Dispatcher::builder()
        .direct_mx(MxConfig {
            allow_loopback: false,
            ..mx_config(dns.addr(), port)
        })
        .retry(retry(5_000))
        .start()
        .unwrap();
    let mut rcpts = vec!["a@loop.test", "z@zero.test"];
    if !own.is_empty() {
        rcpts.push("o@own.test");
    }
    send(&d, &rcpts);
    let f = run(&d);
    for r in rcpts {
        let e = &f[r];
        let domain = r.split('@').nth(1).unwrap();
        assert_eq!(e.kind, EventKind::Bounced, "{e:?}");
        assert_eq!(
            e.reply.enhanced,
            Some(mxpipe::smtp::EnhancedCode::new(5, 4, 6)),
            "{e:?}"
        );
        assert_eq!(
            e.reply.text,
            format!("mail for {domain} loops back to myself")
        );
    }
    assert_eq!(d.stats().connections_opened, 0);
    // With loopback allowed (as every other test here), the same host takes the mail.
    let d = Dispatcher::builder()
        .direct_mx(mx_config(dns.addr(), port))
        .retry(retry(5_000))
        .start()
        .unwrap();
    send(&d, &["a@loop.test"]);
    assert_eq!(run(&d)["a@loop.test"].kind, EventKind::Delivered);
    drop(sink);
}

#[test]
fn equal_preference_mx_hosts_share_one_domains_connections() {
    // RFC 5321 5.1: equal preferences are picked at random to spread the load.
    let ips = [
        "127.0.0.13",
        "127.0.0.14",
        "127.0.0.15",
        "127.0.0.16",
        "127.0.0.17",
    ];
    let port = common_port(&ips);
    let sinks: Vec<SmtpSink> = ips
        .iter()
        .map(|ip| SmtpSink::start_on_port(ip, port, &[]))
        .collect();
    let mut dns = Dnsmasq::builder().ttl(300);
    for (i, ip) in ips.iter().enumerate() {
        dns = dns
            .mx("spread.test", &format!("mx{i}.spread.test"), 10)
            .host(&format!("mx{i}.spread.test"), ip);
    }
    let dns = dns.start();
    let d = Dispatcher::builder()
        .direct_mx(mx_config(dns.addr(), port))
        .retry(retry(10_000))
        .start()
        .unwrap();
    for i in 0..60 {
        send(&d, &[&format!("u{i}@spread.test")]);
    }
    let f = run(&d);
    assert_eq!(f.len(), 60);
    let mut hosts = std::collections::HashSet::new();
    for e in f.values() {
        assert_eq!(e.kind, EventKind::Delivered, "{e:?}");
        hosts.insert(e.destination.to_string());
    }
    // All 60 at one host, or two, would happen by chance less than once in 10^20 runs.
    assert!(hosts.len() >= 3, "60 messages went to {hosts:?}");
    drop(sinks);
}

/// A nameserver (authoritative, no recursion) for `move.test`: MX `mx.move.test`, whose A
/// record says 127.0.0.18 until `moved` is set, then 127.0.0.19; every TTL is 1 s.
fn moving_mx(
    moved: Arc<std::sync::atomic::AtomicBool>,
) -> impl Fn(&hickory_resolver::proto::op::Message) -> Vec<Vec<u8>> + Send + 'static {
    use hickory_resolver::proto::op::{Message as Dns, MessageType, OpCode, ResponseCode};
    use hickory_resolver::proto::rr::rdata::{A, MX};
    use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
    move |query: &Dns| {
        let mut reply = Dns::new(query.metadata.id, MessageType::Response, OpCode::Query);
        reply.metadata.authoritative = true;
        reply.metadata.response_code = ResponseCode::NoError;
        let Some(q) = query.queries.first() else {
            return Vec::new();
        };
        reply.add_query(q.clone());
        let asked = q.name.to_ascii().to_ascii_lowercase();
        let data = match (asked.as_str(), q.query_type) {
            ("move.test.", RecordType::MX) => Some(RData::MX(MX::new(
                10,
                Name::from_ascii("mx.move.test.").unwrap(),
            ))),
            ("mx.move.test.", RecordType::A) => {
                let last = if moved.load(std::sync::atomic::Ordering::SeqCst) {
                    19
                } else {
                    18
                };
                Some(RData::A(A::new(127, 0, 0, last)))
            }
            _ => None,
        };
        if let Some(data) = data {
            reply.add_answer(Record::from_rdata(q.name.clone(), 1, data));
        }
        vec![reply.to_vec().unwrap()]
    }
}

#[test]
fn retries_follow_an_mx_host_that_moved_when_its_ttl_ran_out() {
    let port = common_port(&["127.0.0.18", "127.0.0.19"]);
    // The old address answers every RCPT with 4xx; the new one takes the mail.
    let old = SmtpSink::start_on_port("127.0.0.18", port, &["-r", "rcpt"]);
    let new = SmtpSink::start_on_port("127.0.0.19", port, &[]);
    let moved = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dns =
        util::dns::ScriptedNameserver::start("127.0.0.1:0", moving_mx(Arc::clone(&moved))).unwrap();
    let d = Dispatcher::builder()
        .direct_mx(mx_config(dns.addr(), port))
        .retry(retry(8_000))
        .start()
        .unwrap();
    send(&d, &["a@move.test"]);
    let events = d.events().unwrap();
    let first = events.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(first.kind, EventKind::Deferred, "{first:?}");
    assert!(first.destination.contains("127.0.0.18"), "{first:?}");
    moved.store(true, std::sync::atomic::Ordering::SeqCst);
    let f = run(&d);
    let e = &f["a@move.test"];
    assert_eq!(e.kind, EventKind::Delivered, "{e:?}");
    assert_eq!(&*e.destination, format!("mx.move.test[127.0.0.19]:{port}"));
    drop((old, new));
}
