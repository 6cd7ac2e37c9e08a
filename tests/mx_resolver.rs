//! The MX resolver against a real DNS server: `dnsmasq` on loopback serving names under `.test`
//! (tests/util/dns.rs), plus a nameserver that never answers. Answers are read the way the
//! event loop reads them: only after the resolver has woken a real `mio::Poll`.
//!
//! Run with `cargo test --test mx_resolver` (needs `/usr/sbin/dnsmasq`: tests/run.sh installs it).

mod util;

use crossbeam_channel::Receiver;
use hickory_resolver::proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_resolver::proto::rr::rdata::A;
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use mio::{Events, Poll, Token, Waker};
use mxpipe::route::mx::{MxConfig, MxHost, MxResolver, Resolution};
use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use util::dns::{Dnsmasq, ScriptedNameserver, SilentNameserver};

/// The port the resolver puts on every address it returns.
const SMTP_PORT: u16 = 2525;
/// How long to wait for an answer before the test fails; far beyond any lookup here.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
const WAKER: Token = Token(7);

/// A resolver and its answers, as the event loop would hold them.
struct Client {
    resolver: MxResolver,
    answers: Receiver<(String, Resolution, Instant)>,
    poll: Poll,
    events: Events,
    /// Answers taken from the channel after a wake and not yet returned.
    woken: VecDeque<(String, Resolution)>,
}

impl Client {
    fn start(config: MxConfig) -> Client {
        let poll = Poll::new().expect("create a mio Poll");
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).expect("create a mio Waker"));
        let (resolver, answers) = MxResolver::start(config, waker).expect("start the resolver");
        Client {
            resolver,
            answers,
            poll,
            events: Events::with_capacity(16),
            woken: VecDeque::new(),
        }
    }

    /// The test settings, asking `nameserver`.
    fn config(nameserver: SocketAddr) -> MxConfig {
        MxConfig {
            nameservers: Some(vec![nameserver]),
            smtp_port: SMTP_PORT,
            timeout: Duration::from_secs(2),
            allow_loopback: true,
            ..MxConfig::default()
        }
    }

    fn of(dns: &Dnsmasq) -> Client {
        Client::start(Client::config(dns.addr()))
    }

    /// The next answer. The channel is read only after the waker has fired, so an answer sent
    /// without a wake makes this fail.
    fn next(&mut self) -> (String, Resolution) {
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            if let Some(answer) = self.woken.pop_front() {
                return answer;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no wake with an answer within {ANSWER_TIMEOUT:?}"
            );
            self.poll
                .poll(&mut self.events, Some(left))
                .expect("poll for the waker");
            if self.events.iter().any(|event| event.token() == WAKER) {
                let answers = self.answers.try_iter();
                self.woken
                    .extend(answers.map(|(key, resolution, _)| (key, resolution)));
            }
        }
    }

    /// Asks for one domain and returns its answer, checking that it is keyed as expected.
    fn resolve(&mut self, domain: &str) -> Resolution {
        self.resolver.resolve(domain);
        let (key, resolution) = self.next();
        assert_eq!(
            key,
            MxResolver::domain_key(domain),
            "answer for another domain"
        );
        resolution
    }

    /// Fails if any answer arrives within `quiet`.
    fn assert_no_answer_within(&mut self, quiet: Duration) {
        assert!(
            self.woken.is_empty(),
            "unexpected answers: {:?}",
            self.woken
        );
        let _ = self.poll.poll(&mut self.events, Some(quiet));
        let late: Vec<_> = self.answers.try_iter().collect();
        assert!(late.is_empty(), "unexpected answers: {late:?}");
    }
}

fn hosts(resolution: Resolution) -> Vec<MxHost> {
    match resolution {
        Resolution::Hosts(hosts) => {
            assert!(!hosts.is_empty(), "Hosts is never empty");
            hosts.to_vec()
        }
        other => panic!("expected hosts, got {other:?}"),
    }
}

fn names(hosts: &[MxHost]) -> Vec<&str> {
    hosts.iter().map(|h| h.name.as_str()).collect()
}

fn addr(ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("an IP"), SMTP_PORT)
}

fn host(name: &str, preference: u16, ips: &[&str]) -> MxHost {
    MxHost {
        name: name.to_string(),
        preference,
        addrs: ips.iter().map(|ip| addr(ip)).collect(),
        mta_sts: None,
    }
}

#[test]
fn hosts_come_in_preference_order() {
    let dns = Dnsmasq::builder()
        .mx("a.test", "mx3.a.test", 30)
        .mx("a.test", "mx1.a.test", 10)
        .mx("a.test", "mx2.a.test", 20)
        .host("mx1.a.test", "127.0.0.2")
        .host("mx2.a.test", "127.0.0.3")
        .host("mx3.a.test", "127.0.0.4")
        .start();
    let mut client = Client::of(&dns);
    assert_eq!(
        hosts(client.resolve("a.test")),
        [
            host("mx1.a.test", 10, &["127.0.0.2"]),
            host("mx2.a.test", 20, &["127.0.0.3"]),
            host("mx3.a.test", 30, &["127.0.0.4"]),
        ]
    );
    // Case and the root dot do not matter; the answer is keyed by the normalised name.
    assert_eq!(hosts(client.resolve("A.Test.")).len(), 3);
}

#[test]
fn equal_preferences_are_shuffled() {
    let dns = Dnsmasq::builder()
        .mx("b.test", "mx1.b.test", 10)
        .mx("b.test", "mx2.b.test", 10)
        .mx("b.test", "backup.b.test", 20)
        .host("mx1.b.test", "127.0.0.2")
        .host("mx2.b.test", "127.0.0.3")
        .host("backup.b.test", "127.0.0.4")
        .start();
    // Without a cache every answer is a fresh lookup.
    let mut client = Client::start(MxConfig {
        cache_capacity: 0,
        ..Client::config(dns.addr())
    });
    let mut orders = HashSet::new();
    for _ in 0..40 {
        let hosts = hosts(client.resolve("b.test"));
        assert_eq!(hosts[2].name, "backup.b.test");
        orders.insert([hosts[0].name.clone(), hosts[1].name.clone()]);
    }
    assert_eq!(
        orders.len(),
        2,
        "both orders of the preference-10 hosts: {orders:?}"
    );
}

#[test]
fn a_domain_without_mx_is_its_own_mail_exchanger() {
    let dns = Dnsmasq::builder()
        .host("c.test", "127.0.0.5")
        .host("c.test", "::5")
        .start();
    let mut client = Client::of(&dns);
    // IPv4 first, then IPv6.
    assert_eq!(
        hosts(client.resolve("c.test")),
        [host("c.test", 0, &["127.0.0.5", "::5"])]
    );
}

#[test]
fn null_mx_is_its_own_answer() {
    let dns = Dnsmasq::builder()
        .null_mx("null.test")
        .host("null.test", "127.0.0.6")
        .start();
    let mut client = Client::of(&dns);
    // The A record is no implicit MX: RFC 7505 says the domain takes no mail at all.
    assert_eq!(client.resolve("null.test"), Resolution::NullMx);
}

#[test]
fn null_mx_beside_a_real_mx_is_still_null_mx() {
    // RFC 7505 section 3 forbids mixing them; Postfix bounces such a domain.
    let dns = Dnsmasq::builder()
        .null_mx("mixed.test")
        .mx("mixed.test", "mx.mixed.test", 10)
        .host("mx.mixed.test", "127.0.0.6")
        .start();
    let mut client = Client::of(&dns);
    assert_eq!(client.resolve("mixed.test"), Resolution::NullMx);
}

#[test]
fn nonexistent_domains_bounce_and_say_why() {
    let dns = Dnsmasq::builder().host("v6only.test", "::6").start();
    let mut client = Client::of(&dns);
    match client.resolve("nx.test") {
        Resolution::NoSuchDomain(text) => {
            assert_eq!(text, "nx.test: no such domain (NXDOMAIN)")
        }
        other => panic!("expected NoSuchDomain, got {other:?}"),
    }

    // A domain that exists but has neither MX nor a usable address.
    let mut v4_only = Client::start(MxConfig {
        ipv6: false,
        ..Client::config(dns.addr())
    });
    match v4_only.resolve("v6only.test") {
        Resolution::NoSuchDomain(text) => {
            assert_eq!(text, "v6only.test: no MX records and no A records")
        }
        other => panic!("expected NoSuchDomain, got {other:?}"),
    }
    assert_eq!(
        hosts(client.resolve("v6only.test")),
        [host("v6only.test", 0, &["::6"])]
    );
}

#[test]
fn mx_hosts_without_addresses_defer() {
    let dns = Dnsmasq::builder()
        .mx("ghost.test", "nowhere.ghost.test", 10)
        .start();
    let mut client = Client::of(&dns);
    match client.resolve("ghost.test") {
        Resolution::TempFail(text) => assert_eq!(
            text,
            "ghost.test: its MX hosts have no A or AAAA records (nowhere.ghost.test)"
        ),
        other => panic!("expected TempFail, got {other:?}"),
    }
}

#[test]
fn cnames_are_followed() {
    let dns = Dnsmasq::builder()
        .mx("d.test", "alias.d.test", 10)
        .cname("alias.d.test", "real.d.test")
        .host("real.d.test", "127.0.0.7")
        .host("e.test", "127.0.0.8")
        .cname("www.e.test", "e.test")
        .start();
    let mut client = Client::of(&dns);
    // An MX target that is a CNAME: the host keeps the MX's name, with the target's addresses.
    assert_eq!(
        hosts(client.resolve("d.test")),
        [host("alias.d.test", 10, &["127.0.0.7"])]
    );
    // A domain that is a CNAME to one without MX: its implicit MX has the target's address.
    assert_eq!(
        hosts(client.resolve("www.e.test")),
        [host("www.e.test", 0, &["127.0.0.8"])]
    );
}

#[test]
fn hosts_and_addresses_are_capped() {
    let mut builder = Dnsmasq::builder();
    for (i, preference) in [(1, 10), (2, 20), (3, 30), (4, 40)] {
        let name = format!("m{i}.many.test");
        builder = builder
            .mx("many.test", &name, preference)
            .host(&name, &format!("127.0.{i}.1"))
            .host(&name, &format!("127.0.{i}.2"));
    }
    let dns = builder.start();
    let mut client = Client::start(MxConfig {
        max_hosts: 3,
        max_addresses: 5,
        ..Client::config(dns.addr())
    });
    let found = hosts(client.resolve("many.test"));
    assert_eq!(
        names(&found),
        ["m1.many.test", "m2.many.test", "m3.many.test"]
    );
    let counts: Vec<usize> = found.iter().map(|h| h.addrs.len()).collect();
    assert_eq!(counts, [2, 2, 1]);
    // The host past the cap is not even looked up.
    assert!(
        !dns.queries().iter().any(|(_, name)| name == "m4.many.test"),
        "{:?}",
        dns.queries()
    );
}

#[test]
fn answers_are_cached_for_their_ttl() {
    let mut dns = Dnsmasq::builder()
        .ttl(300)
        .mx("f.test", "mx1.f.test", 10)
        .mx("f.test", "mx2.f.test", 10)
        .host("mx1.f.test", "127.0.0.2")
        .host("mx2.f.test", "127.0.0.3")
        .start();
    let mut cached = Client::of(&dns);
    let mut uncached = Client::start(MxConfig {
        cache_capacity: 0,
        // Only its failure after `stop` waits for timeouts.
        timeout: Duration::from_millis(300),
        ..Client::config(dns.addr())
    });
    let mx_queries = |dns: &Dnsmasq| {
        let queries = dns.queries();
        queries
            .iter()
            .filter(|q| q.0 == "MX" && q.1 == "f.test")
            .count()
    };

    let first = hosts(cached.resolve("f.test"));
    assert_eq!(mx_queries(&dns), 1);
    let mut sorted = first.clone();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut orders = HashSet::new();
    for _ in 0..40 {
        let again = hosts(cached.resolve("f.test"));
        orders.insert(again[0].name.clone());
        let mut again_sorted = again;
        again_sorted.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(again_sorted, sorted);
    }
    assert_eq!(mx_queries(&dns), 1, "answered from the cache");
    assert_eq!(
        orders.len(),
        2,
        "cached answers are shuffled anew: {orders:?}"
    );

    assert_eq!(hosts(uncached.resolve("f.test")).len(), 2);
    assert_eq!(mx_queries(&dns), 2, "no cache: a second query");

    // With the server gone, only the cache can answer.
    dns.stop();
    assert_eq!(hosts(cached.resolve("f.test")).len(), 2);
    assert!(matches!(
        uncached.resolve("f.test"),
        Resolution::TempFail(_)
    ));
}

#[test]
fn ipv4_only_drops_aaaa_and_ipv6_only_drops_a() {
    let dns = Dnsmasq::builder()
        .mx("dual.test", "mx.dual.test", 10)
        .host("mx.dual.test", "127.0.0.9")
        .host("mx.dual.test", "::9")
        .start();
    let mut both = Client::of(&dns);
    assert_eq!(
        hosts(both.resolve("dual.test")),
        [host("mx.dual.test", 10, &["127.0.0.9", "::9"])]
    );

    let dns = Dnsmasq::builder()
        .mx("dual.test", "mx.dual.test", 10)
        .host("mx.dual.test", "127.0.0.9")
        .host("mx.dual.test", "::9")
        .start();
    let mut v4 = Client::start(MxConfig {
        ipv6: false,
        ..Client::config(dns.addr())
    });
    assert_eq!(
        hosts(v4.resolve("dual.test")),
        [host("mx.dual.test", 10, &["127.0.0.9"])]
    );
    assert!(
        !dns.queries().iter().any(|(kind, _)| kind == "AAAA"),
        "no AAAA query when IPv6 is off: {:?}",
        dns.queries()
    );
    let mut v6 = Client::start(MxConfig {
        ipv4: false,
        ..Client::config(dns.addr())
    });
    assert_eq!(
        hosts(v6.resolve("dual.test")),
        [host("mx.dual.test", 10, &["::9"])]
    );
}

#[test]
fn a_silent_nameserver_defers_and_requests_for_a_domain_share_one_answer() {
    let silent = SilentNameserver::start();
    let mut client = Client::start(MxConfig {
        timeout: Duration::from_millis(300),
        ..Client::config(silent.addr())
    });
    // The lookup takes two timeouts: all ten requests arrive while it runs.
    for _ in 0..10 {
        client.resolver.resolve("slow.test");
    }
    let (domain, resolution) = client.next();
    assert_eq!(domain, "slow.test");
    match resolution {
        Resolution::TempFail(text) => {
            assert!(text.starts_with("slow.test: MX lookup failed: "), "{text}")
        }
        other => panic!("expected TempFail, got {other:?}"),
    }
    client.assert_no_answer_within(Duration::from_millis(300));
    // The failure is remembered briefly: the next request is answered at once, from the cache.
    assert!(matches!(
        client.resolve("slow.test"),
        Resolution::TempFail(_)
    ));
}

#[test]
fn many_domains_at_once_each_get_one_answer() {
    let mut builder = Dnsmasq::builder();
    for i in 0..300 {
        builder = builder.mx(&format!("d{i}.bulk.test"), "mx.hosting.test", 10);
    }
    let dns = builder.host("mx.hosting.test", "127.0.0.10").start();
    let mut client = Client::of(&dns);
    // More than the lookups allowed at once (256): the rest wait their turn.
    for i in 0..300 {
        client.resolver.resolve(&format!("d{i}.bulk.test"));
    }
    let mut answered = HashSet::new();
    for _ in 0..300 {
        let (domain, resolution) = client.next();
        assert_eq!(
            hosts(resolution),
            [host("mx.hosting.test", 10, &["127.0.0.10"])]
        );
        assert!(answered.insert(domain.clone()), "{domain} answered twice");
    }
    client.assert_no_answer_within(Duration::from_millis(200));
}

#[test]
fn address_literals_and_idns() {
    let dns = Dnsmasq::builder()
        .mx("xn--bcher-kva.test", "mx.xn--bcher-kva.test", 10)
        .host("mx.xn--bcher-kva.test", "127.0.0.11")
        .start();
    let mut client = Client::of(&dns);
    assert_eq!(
        hosts(client.resolve("[127.0.0.12]")),
        [host("127.0.0.12", 0, &["127.0.0.12"])]
    );
    assert_eq!(
        hosts(client.resolve("[IPv6:::1]")),
        [host("::1", 0, &["::1"])]
    );
    assert!(
        dns.queries().is_empty(),
        "literals need no DNS: {:?}",
        dns.queries()
    );
    // A U-label domain is looked up by its A-label form; the answer keeps the caller's key.
    assert_eq!(
        hosts(client.resolve("Bücher.test")),
        [host("mx.xn--bcher-kva.test", 10, &["127.0.0.11"])]
    );
}

#[test]
fn after_shutdown_requests_are_ignored() {
    let dns = Dnsmasq::builder().host("g.test", "127.0.0.13").start();
    let mut client = Client::of(&dns);
    assert_eq!(hosts(client.resolve("g.test")).len(), 1);
    let clone = client.resolver.clone();
    clone.shutdown();
    client.resolver.resolve("g.test");
    client.assert_no_answer_within(Duration::from_millis(200));
}

#[test]
fn an_answer_too_big_for_a_datagram_is_asked_again_over_tcp() {
    // 40 MX records with long names: about 3 KB, more than the 1,232 octets offered over UDP,
    // so dnsmasq truncates the UDP answer and the whole set comes only over TCP.
    let label = "a-long-label-that-fills-the-datagram-quickly";
    let mut builder = Dnsmasq::builder();
    let mut expected = Vec::new();
    for i in 0..40 {
        let name = format!("mx{i:02}.{label}.big.test");
        builder = builder
            .mx("big.test", &name, 10 + i)
            .host(&name, &format!("127.0.1.{}", i + 1));
        expected.push(name);
    }
    let dns = builder.start();
    let mut client = Client::start(MxConfig {
        max_hosts: 40,
        max_addresses: 40,
        ..Client::config(dns.addr())
    });
    let found = hosts(client.resolve("big.test"));
    assert_eq!(names(&found), expected);
    assert_eq!(found[39].addrs, ["127.0.1.40:2525".parse().unwrap()]);
}

#[test]
fn a_nameserver_port_with_nothing_listening_fails_fast() {
    // A UDP port that was just free: the kernel answers our datagrams with ICMP port
    // unreachable, which must fail the lookup at once rather than after the timeouts.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut client = Client::start(MxConfig {
        timeout: Duration::from_secs(10),
        ..Client::config(SocketAddr::from(([127, 0, 0, 1], port)))
    });
    let start = Instant::now();
    match client.resolve("refused.test") {
        Resolution::TempFail(text) => assert!(
            text.starts_with("refused.test: MX lookup failed: ") && text.contains("refused"),
            "{text}"
        ),
        other => panic!("expected TempFail, got {other:?}"),
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}: the refusal was not noticed",
        start.elapsed()
    );
}

/// An answer to `query` with `code`, its question echoed, from a recursive server.
fn reply_to(query: &Message, code: ResponseCode) -> Message {
    let mut reply = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
    reply.metadata.recursion_desired = true;
    reply.metadata.recursion_available = true;
    reply.metadata.response_code = code;
    for question in &query.queries {
        reply.add_query(question.clone());
    }
    reply
}

/// The answer to `query` of a server where every name has one A record and nothing else.
fn a_record_for_every_name(query: &Message) -> Message {
    let mut reply = reply_to(query, ResponseCode::NoError);
    if let Some(q) = query.queries.first() {
        if q.query_type == RecordType::A {
            let a = RData::A(A::new(127, 0, 0, 9));
            reply.add_answer(Record::from_rdata(q.name.clone(), 300, a));
        }
    }
    reply
}

#[test]
fn a_dead_first_nameserver_costs_healthy_domains_nothing_more_than_a_timeout() {
    let silent = SilentNameserver::start();
    let mut builder = Dnsmasq::builder();
    for i in 0..300 {
        builder = builder.host(&format!("d{i}.dead-first.test"), "127.0.0.9");
    }
    let dns = builder.start();
    let mut client = Client::start(MxConfig {
        nameservers: Some(vec![silent.addr(), dns.addr()]),
        // Wide enough that dnsmasq answers 300 queries within it on a busy 2-core machine
        // (at 500 ms one lookup timed out there during a full test run, and at 1 s two did
        // beside a Postfix benchmark at a load average of 8).
        timeout: Duration::from_millis(2000),
        ..Client::config(dns.addr())
    });
    for i in 0..300 {
        client.resolver.resolve(&format!("d{i}.dead-first.test"));
    }
    let start = Instant::now();
    let mut failed = Vec::new();
    for _ in 0..300 {
        let (domain, resolution) = client.next();
        if !matches!(resolution, Resolution::Hosts(_)) {
            failed.push((domain, resolution));
        }
    }
    assert!(
        failed.is_empty(),
        "{} failed, e.g. {:?}",
        failed.len(),
        failed[0]
    );
    // The first queries wait out one timeout at the silent server; then it is avoided.
    assert!(
        start.elapsed() < Duration::from_secs(6),
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn a_stray_datagram_with_the_right_id_does_not_cost_the_answer() {
    // Every query first gets a datagram with its ID but another question, then the answer.
    let server = ScriptedNameserver::start("127.0.0.1:0", |query| {
        let mut stray = reply_to(query, ResponseCode::NoError);
        stray.queries.clear();
        stray.add_query(Query::query(
            Name::from_ascii("other.test.").unwrap(),
            RecordType::A,
        ));
        let real = reply_to(query, ResponseCode::NXDomain);
        vec![stray.to_vec().unwrap(), real.to_vec().unwrap()]
    })
    .unwrap();
    let mut client = Client::start(Client::config(server.addr()));
    match client.resolve("gone.test") {
        Resolution::NoSuchDomain(text) => assert_eq!(text, "gone.test: no such domain (NXDOMAIN)"),
        other => panic!("expected NoSuchDomain, got {other:?}"),
    }
}

#[test]
fn an_ipv6_nameserver_is_asked_over_ipv6() {
    let server = match ScriptedNameserver::start("[::1]:0", |query| {
        vec![a_record_for_every_name(query).to_vec().unwrap()]
    }) {
        Ok(server) => server,
        // A machine without IPv6 loopback has nothing to test here.
        Err(error) => return eprintln!("skipped: no ::1 ({error})"),
    };
    let mut client = Client::start(Client::config(server.addr()));
    let found = hosts(client.resolve("v6.test"));
    assert_eq!(found[0].addrs, ["127.0.0.9:2525".parse().unwrap()]);
}

#[test]
fn domains_whose_nameservers_never_answer_do_not_hold_up_the_others() {
    // A recursive server still waiting on unreachable authoritative servers stays silent.
    let server = ScriptedNameserver::start("127.0.0.1:0", |query| {
        let dead = query
            .queries
            .first()
            .is_some_and(|q| q.name.to_ascii().starts_with("dead"));
        match dead {
            true => Vec::new(),
            false => vec![a_record_for_every_name(query).to_vec().unwrap()],
        }
    })
    .unwrap();
    let mut client = Client::start(MxConfig {
        timeout: Duration::from_secs(1),
        ..Client::config(server.addr())
    });
    // More silent domains than queries allowed in flight at once.
    for i in 0..240 {
        client.resolver.resolve(&format!("dead{i}.test"));
    }
    let start = Instant::now();
    for i in 0..10 {
        client.resolver.resolve(&format!("live{i}.test"));
    }
    let mut live = 0;
    while live < 10 {
        let (domain, resolution) = client.next();
        if domain.starts_with("live") {
            assert!(matches!(resolution, Resolution::Hosts(_)), "{resolution:?}");
            live += 1;
        }
    }
    assert!(
        start.elapsed() < Duration::from_millis(900),
        "the live domains waited {:?} behind the silent ones",
        start.elapsed()
    );
}

/// An authoritative server (no recursion) for `chain.test`, whose MX host is reached through
/// nine CNAMEs, and `loop.test`, whose MX host's CNAMEs go round in a circle. Every answer
/// holds one record, as an authoritative server gives them when the chain crosses zones.
fn one_cname_per_answer(query: &Message) -> Vec<Vec<u8>> {
    use hickory_resolver::proto::rr::rdata::{CNAME, MX};
    let mut reply = reply_to(query, ResponseCode::NoError);
    reply.metadata.recursion_available = false;
    reply.metadata.authoritative = true;
    let Some(q) = query.queries.first() else {
        return Vec::new();
    };
    let asked = q.name.to_ascii().to_ascii_lowercase();
    let name = |n: &str| Name::from_ascii(n).unwrap();
    let cname = |target: &str| RData::CNAME(CNAME(name(target)));
    let data = match (asked.as_str(), q.query_type) {
        ("chain.test." | "loop.test.", RecordType::MX) => {
            Some(RData::MX(MX::new(10, name(&format!("mx.{}", asked)))))
        }
        ("mx.chain.test.", _) => Some(cname("c1.chain.test.")),
        ("c9.chain.test.", RecordType::A) => Some(RData::A(A::new(127, 0, 0, 7))),
        ("c9.chain.test.", _) => None,
        (n, _) if n.starts_with('c') && n.ends_with(".chain.test.") => {
            let hop: u32 = n[1..n.len() - ".chain.test.".len()].parse().unwrap();
            Some(cname(&format!("c{}.chain.test.", hop + 1)))
        }
        ("mx.loop.test." | "l2.loop.test.", _) => Some(cname("l1.loop.test.")),
        ("l1.loop.test.", _) => Some(cname("l2.loop.test.")),
        _ => None,
    };
    if let Some(data) = data {
        reply.add_answer(Record::from_rdata(q.name.clone(), 300, data));
    }
    vec![reply.to_vec().unwrap()]
}

#[test]
fn cname_chains_of_nine_hops_are_followed_and_loops_named() {
    let server = ScriptedNameserver::start("127.0.0.1:0", one_cname_per_answer).unwrap();
    let mut client = Client::start(Client::config(server.addr()));
    let found = hosts(client.resolve("chain.test"));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].name, "mx.chain.test");
    assert_eq!(found[0].addrs, ["127.0.0.7:2525".parse().unwrap()]);
    match client.resolve("loop.test") {
        Resolution::TempFail(text) => assert!(text.contains("CNAME loop"), "{text}"),
        other => panic!("expected TempFail, got {other:?}"),
    }
}
