//! One domain's mail exchangers: from DNS answers to a [`Resolution`] and how long it may be
//! reused (RFC 5321 section 5.1, RFC 7505 null MX, RFC 2308 negative caching).
//!
//! [`Dns`] asks the nameservers: through the lean UDP transport of `stub` first, and through
//! hickory's resolver when that is not enough (a truncated answer, which needs TCP, or a CNAME
//! chain the answer does not complete). MX hosts' address answers are shared by every domain
//! they serve: cached for their TTL, with one query in flight per host and family. Domain
//! results are cached by the resolver thread, not here. Nothing here knows about channels or
//! threads, or blocks.

use super::cache::ExpiringCache;
use super::stub::{Reply, Stub};
use super::{MxHost, Resolution};
use hickory_resolver::lookup::Lookup;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::{Message, ResponseCode};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use hickory_resolver::TokioResolver;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

/// How long a temporary failure (timeout, SERVFAIL, ...) is remembered: long enough that a burst
/// of recipients at a broken domain costs one lookup, short enough to notice a quick repair.
pub(super) const TEMPORARY_FAILURE_TTL: Duration = Duration::from_secs(30);
/// An MX host's failed address lookup is shared by the domains asking meanwhile, and kept only
/// this long: their own answers are cached for `TEMPORARY_FAILURE_TTL` anyway.
const HOST_FAILURE_TTL: Duration = Duration::from_secs(5);
/// Negative answers are kept for the SOA's negative TTL (RFC 2308 section 5), at most this long.
const MAX_NEGATIVE_TTL: Duration = Duration::from_secs(3600);
/// A negative answer without an SOA has no TTL; RFC 2308 section 5 says not to cache it, which
/// would send one query per recipient of a mistyped domain, so it is kept only briefly.
const UNSOURCED_NEGATIVE_TTL: Duration = Duration::from_secs(30);
/// Hickory caps positive TTLs at a day; results are never kept longer either.
pub(super) const MAX_POSITIVE_TTL: Duration = Duration::from_secs(hickory_resolver::MAX_TTL as u64);
/// CNAMEs followed from the name asked, over one answer or several, before the lookup fails
/// (Postfix follows as many).
const MAX_CNAME_HOPS: usize = 9;

/// The resolver thread's way of asking DNS questions.
pub(super) struct Dns {
    stub: Stub,
    hickory: TokioResolver,
    hosts: Mutex<HostQueries>,
}

/// Address answers of MX hosts, by "name type", and the questions under way.
struct HostQueries {
    cache: ExpiringCache<Query>,
    running: HashMap<String, Vec<oneshot::Sender<Query>>>,
}

impl std::fmt::Debug for Dns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dns").field("stub", &self.stub).finish()
    }
}

impl Dns {
    /// `stub` and `hickory` ask the same nameservers; `cache_capacity` bounds the MX hosts'
    /// address answers kept (0 keeps none).
    pub(super) fn new(stub: Stub, hickory: TokioResolver, cache_capacity: usize) -> Dns {
        Dns {
            stub,
            hickory,
            hosts: Mutex::new(HostQueries {
                cache: ExpiringCache::new(cache_capacity),
                running: HashMap::new(),
            }),
        }
    }

    /// How many times one query may be sent (each within the timeout).
    pub(super) fn tries(&self) -> usize {
        self.stub.tries()
    }

    /// The `record_type` records of `name`, uncached. A CNAME chain that an answer leaves
    /// open (a server that does not recurse, one CNAME per answer) is followed here, name by
    /// name, up to `MAX_CNAME_HOPS` in all; a name met twice is a CNAME loop.
    pub(super) async fn query(&self, name: &Name, record_type: RecordType) -> Query {
        let mut chain = CnameChain::new(name);
        loop {
            let current = chain.current().clone();
            let query = match self.stub.query(&current, record_type).await {
                // A server that does not take EDNS queries (RFC 6891 section 7) gets hickory's,
                // which follow resolv.conf's `options edns0`.
                Reply::Answer(message)
                    if matches!(
                        message.metadata.response_code,
                        ResponseCode::FormErr | ResponseCode::NotImp
                    ) =>
                {
                    self.ask_hickory(&current, record_type).await
                }
                Reply::Answer(message) => match from_answer(&message, &mut chain, record_type) {
                    Step::Done(query) => query,
                    Step::Follow => continue,
                },
                Reply::Truncated => self.ask_hickory(&current, record_type).await,
                Reply::Failed(why) => Query::Failed(why),
            };
            return chain.bound(query);
        }
    }

    async fn ask_hickory(&self, name: &Name, record_type: RecordType) -> Query {
        classify(self.hickory.lookup(name.clone(), record_type).await)
    }

    fn hosts(&self) -> MutexGuard<'_, HostQueries> {
        // Held only for map operations that cannot panic.
        self.hosts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// An MX host's cached answer for `record_type`, if there is one.
    fn cached_address(&self, name: &Name, record_type: RecordType) -> Option<Query> {
        self.hosts()
            .cache
            .get(&host_key(name, record_type), Instant::now())
            .cloned()
    }

    /// An MX host's `record_type` (A or AAAA) records: from the cache, from the query already
    /// under way, or asked now and then shared.
    async fn address_query(&self, name: &Name, record_type: RecordType) -> Query {
        let key = host_key(name, record_type);
        // A query shared with another domain's lookup that gave up (its own deadline) is
        // started anew rather than failing this domain too; bounded, as every round waits for
        // a query that ran.
        for _ in 0..3 {
            match self.shared_address_query(&key, name, record_type).await {
                Some(query) => return query,
                None => continue,
            }
        }
        Query::Failed(format!("the lookup of {name} was interrupted"))
    }

    /// One round of `address_query`: `None` when the query waited for was dropped unfinished.
    async fn shared_address_query(
        &self,
        key: &str,
        name: &Name,
        record_type: RecordType,
    ) -> Option<Query> {
        let wait = {
            let mut hosts = self.hosts();
            if let Some(query) = hosts.cache.get(key, Instant::now()) {
                return Some(query.clone());
            }
            match hosts.running.get_mut(key) {
                Some(waiters) => {
                    let (sender, receiver) = oneshot::channel();
                    waiters.push(sender);
                    Some(receiver)
                }
                None => {
                    hosts.running.insert(key.to_string(), Vec::new());
                    None
                }
            }
        };
        if let Some(receiver) = wait {
            return receiver.await.ok();
        }
        // Should this future be dropped, the waiters' senders go with the entry.
        let running = RunningQuery {
            dns: self,
            key: key.to_string(),
            finished: false,
        };
        let query = self.query(name, record_type).await;
        running.finish(&query);
        Some(query)
    }
}

/// A host query under way; when dropped unfinished, its waiters are told it was interrupted.
struct RunningQuery<'a> {
    dns: &'a Dns,
    key: String,
    finished: bool,
}

impl RunningQuery<'_> {
    fn finish(mut self, query: &Query) {
        let now = Instant::now();
        let expires = match query {
            Query::Records { until, .. } => *until,
            Query::NoSuchName(until) | Query::NoRecords(until) => *until,
            Query::Failed(_) => now + HOST_FAILURE_TTL,
        };
        let waiters = {
            let mut hosts = self.dns.hosts();
            hosts
                .cache
                .insert(self.key.clone(), query.clone(), expires, now);
            hosts.running.remove(&self.key)
        };
        self.finished = true;
        for waiter in waiters.into_iter().flatten() {
            let _ = waiter.send(query.clone());
        }
    }
}

impl Drop for RunningQuery<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.dns.hosts().running.remove(&self.key);
        }
    }
}

fn host_key(name: &Name, record_type: RecordType) -> String {
    format!("{} {record_type}", name.to_ascii().to_ascii_lowercase())
}

/// The settings a lookup applies (from `MxConfig`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Policy {
    pub smtp_port: u16,
    pub ipv4: bool,
    pub ipv6: bool,
    pub max_hosts: usize,
    pub max_addresses: usize,
}

impl Policy {
    /// The address records asked for, for error texts.
    fn families(&self) -> &'static str {
        match (self.ipv4, self.ipv6) {
            (true, false) => "A",
            (false, true) => "AAAA",
            _ => "A or AAAA",
        }
    }
}

/// A resolution and the instant until which it may be reused.
#[derive(Debug)]
pub(super) struct Answer {
    pub resolution: Resolution,
    pub expires: Instant,
}

impl Answer {
    pub(super) fn temporary(text: String) -> Answer {
        Answer {
            resolution: Resolution::TempFail(text),
            expires: Instant::now() + TEMPORARY_FAILURE_TTL,
        }
    }
}

/// Answers a domain that is an address literal (`[192.0.2.1]`, `[ipv6:2001:db8::1]`, RFC 5321
/// section 4.1.3) without DNS; `None` for any other domain. `domain` is already lower-cased.
pub(super) fn address_literal(domain: &str, policy: &Policy) -> Option<Resolution> {
    let inner = domain.strip_prefix('[')?.strip_suffix(']')?;
    let ip = match inner.strip_prefix("ipv6:") {
        Some(v6) => v6.parse::<Ipv6Addr>().ok().map(IpAddr::V6),
        None => inner.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
    };
    let Some(ip) = ip else {
        return Some(Resolution::NoSuchDomain(format!(
            "{domain} is not a valid address literal (RFC 5321 section 4.1.3)"
        )));
    };
    let (allowed, family) = match ip {
        IpAddr::V4(_) => (policy.ipv4, "IPv4"),
        IpAddr::V6(_) => (policy.ipv6, "IPv6"),
    };
    if !allowed {
        return Some(Resolution::NoSuchDomain(format!(
            "{domain} is an {family} address, and {family} is disabled"
        )));
    }
    Some(Resolution::Hosts(Arc::from([MxHost {
        name: ip.to_string(),
        preference: 0,
        addrs: vec![SocketAddr::new(ip, policy.smtp_port)],
        mta_sts: None,
    }])))
}

/// Shuffles each run of equal preferences in place; `items` must be sorted by preference.
/// RFC 5321 section 5.1: "If there are multiple destinations with the same preference and there
/// is no clear reason to favor one [...], the SMTP client SHOULD pick one at random to spread the
/// load across multiple mail exchangers".
pub(super) fn shuffle_ties<T>(items: &mut [T], preference: impl Fn(&T) -> u16) {
    let mut start = 0;
    while start < items.len() {
        let tie = preference(&items[start]);
        let len = items[start..]
            .iter()
            .take_while(|item| preference(item) == tie)
            .count();
        fastrand::shuffle(&mut items[start..start + len]);
        start += len;
    }
}

/// Resolves `domain` (lower-case, no trailing dot, not an address literal) to the hosts to try.
pub(super) async fn resolve(dns: &Arc<Dns>, policy: &Policy, domain: &str) -> Answer {
    let Some(name) = dns_name(domain) else {
        return Answer {
            resolution: Resolution::NoSuchDomain(format!("{domain:?} is not a valid domain name")),
            expires: Instant::now() + UNSOURCED_NEGATIVE_TTL,
        };
    };
    let expires = Instant::now() + MAX_POSITIVE_TTL;
    match dns.query(&name, RecordType::MX).await {
        Query::Records { records, until } => {
            let exchangers: Vec<(u16, Name)> = records
                .iter()
                .filter_map(|record| match &record.data {
                    RData::MX(mx) => Some((mx.preference, mx.exchange.clone())),
                    _ => None,
                })
                .collect();
            let expires = expires.min(until);
            if exchangers.is_empty() {
                // Only CNAMEs came back for the MX query, which is NODATA at the end of the chain.
                implicit_mx(dns, policy, domain, &name, expires).await
            } else {
                exchangers_of(dns, policy, domain, exchangers, expires).await
            }
        }
        Query::NoSuchName(until) => Answer {
            resolution: Resolution::NoSuchDomain(format!("{domain}: no such domain (NXDOMAIN)")),
            expires: until,
        },
        // RFC 5321 section 5.1: no MX records means an implicit MX, the domain itself.
        Query::NoRecords(until) => {
            implicit_mx(dns, policy, domain, &name, expires.min(until)).await
        }
        Query::Failed(why) => Answer::temporary(format!("{domain}: MX lookup failed: {why}")),
    }
}

/// The domain as a fully qualified DNS name. `Name::from_utf8` applies IDNA (UTS #46), turning
/// U-labels into A-labels (`bücher.example` → `xn--bcher-kva.example`), so IDNs need nothing more;
/// labels IDNA refuses (an underscore, say) are taken as they are. The trailing dot stops
/// hickory from trying the search domains of resolv.conf.
fn dns_name(domain: &str) -> Option<Name> {
    let fqdn = format!("{domain}.");
    Name::from_utf8(&fqdn)
        .or_else(|_| Name::from_ascii(&fqdn))
        .ok()
        .filter(|name| !name.is_root())
}

/// A DNS name as `MxHost::name` spells it: A-labels, lower case, no trailing dot.
fn host_name(name: &Name) -> String {
    name.to_ascii().trim_end_matches('.').to_ascii_lowercase()
}

/// The MX records' hosts, in the order to try, with their addresses.
async fn exchangers_of(
    dns: &Arc<Dns>,
    policy: &Policy,
    domain: &str,
    mut exchangers: Vec<(u16, Name)>,
    mut expires: Instant,
) -> Answer {
    // RFC 7505 section 3: a null MX ("MX 0 .") says the domain accepts no mail, and a domain
    // that publishes one must publish no other MX. One in the set, whatever else is there,
    // makes the domain a null-MX domain, as Postfix treats it: no mail goes to the others.
    if exchangers.iter().any(|(_, name)| name.is_root()) {
        return Answer {
            resolution: Resolution::NullMx,
            expires,
        };
    }
    exchangers.sort_by_key(|(preference, _)| *preference);
    let mut seen = HashSet::new();
    exchangers.retain(|(_, name)| seen.insert(host_name(name)));
    // Shuffled before the cap, so that the hosts it leaves out are not always the same ones.
    shuffle_ties(&mut exchangers, |(preference, _)| *preference);
    exchangers.truncate(policy.max_hosts);

    // Hosts shared by many domains are usually cached: only the others are looked up, at once.
    let mut found: Vec<Option<HostAddresses>> = exchangers
        .iter()
        .map(|(_, name)| cached_host_addresses(dns, policy, name))
        .collect();
    let mut lookups = JoinSet::new();
    for (index, (_, name)) in exchangers.iter().enumerate() {
        if found[index].is_none() {
            let (dns, policy, name) = (dns.clone(), *policy, name.clone());
            lookups.spawn(async move { (index, host_addresses(&dns, &policy, &name).await) });
        }
    }
    while let Some(joined) = lookups.join_next().await {
        // A lookup task that panicked leaves its host unresolved, reported below.
        if let Ok((index, host)) = joined {
            found[index] = Some(host);
        }
    }

    let mut hosts = Vec::new();
    let mut failures = Vec::new();
    let mut budget = policy.max_addresses;
    for ((preference, name), host) in exchangers.iter().zip(found) {
        let name = host_name(name);
        let Some(host) = host else {
            failures.push(format!("{name}: the lookup was interrupted"));
            expires = expires.min(Instant::now() + TEMPORARY_FAILURE_TTL);
            continue;
        };
        expires = expires.min(host.expires);
        if let Some(why) = host.failure {
            failures.push(format!("{name}: {why}"));
        }
        let addrs: Vec<SocketAddr> = host
            .addrs
            .into_iter()
            .take(budget)
            .map(|ip| SocketAddr::new(ip, policy.smtp_port))
            .collect();
        budget -= addrs.len();
        if !addrs.is_empty() {
            hosts.push(MxHost {
                name,
                preference: *preference,
                addrs,
                mta_sts: None,
            });
        }
    }
    if hosts.is_empty() {
        // RFC 5321 section 5.1 makes unusable MX records an error, not a reason to fall back
        // to the domain's own address. It is taken as temporary: the hosts may get addresses.
        let text = if failures.is_empty() {
            let names: Vec<String> = exchangers.iter().map(|(_, n)| host_name(n)).collect();
            format!(
                "{domain}: its MX hosts have no {} records ({})",
                policy.families(),
                names.join(", ")
            )
        } else {
            format!(
                "{domain}: could not resolve its MX hosts: {}",
                failures.join("; ")
            )
        };
        return Answer::temporary(text);
    }
    Answer {
        resolution: Resolution::Hosts(hosts.into()),
        expires,
    }
}

/// The implicit MX of a domain without MX records: the domain itself, preference 0.
async fn implicit_mx(
    dns: &Dns,
    policy: &Policy,
    domain: &str,
    name: &Name,
    expires: Instant,
) -> Answer {
    let host = host_addresses(dns, policy, name).await;
    let expires = expires.min(host.expires);
    if !host.addrs.is_empty() {
        let addrs = host
            .addrs
            .into_iter()
            .take(policy.max_addresses)
            .map(|ip| SocketAddr::new(ip, policy.smtp_port))
            .collect();
        return Answer {
            resolution: Resolution::Hosts(Arc::from([MxHost {
                name: host_name(name),
                preference: 0,
                addrs,
                mta_sts: None,
            }])),
            expires,
        };
    }
    if let Some(why) = host.failure {
        return Answer::temporary(format!(
            "{domain}: no MX records, and its address lookup failed: {why}"
        ));
    }
    let text = if host.no_such_name {
        format!("{domain}: no such domain (NXDOMAIN)")
    } else {
        format!(
            "{domain}: no MX records and no {} records",
            policy.families()
        )
    };
    Answer {
        resolution: Resolution::NoSuchDomain(text),
        expires,
    }
}

/// A host's addresses in the enabled families, and what went wrong when there are none.
#[derive(Debug)]
struct HostAddresses {
    /// IPv4 first: it is the family receiving MTAs are most reliably reachable over, and
    /// IPv6 addresses still follow as fallbacks.
    addrs: Vec<IpAddr>,
    expires: Instant,
    /// The first family lookup that failed temporarily, if any.
    failure: Option<String>,
    /// Every family queried answered NXDOMAIN.
    no_such_name: bool,
}

/// Looks up A and AAAA (as enabled) at once; CNAMEs are followed to their target.
async fn host_addresses(dns: &Dns, policy: &Policy, name: &Name) -> HostAddresses {
    let family = |enabled: bool, record_type: RecordType| async move {
        match enabled {
            true => Some(dns.address_query(name, record_type).await),
            false => None,
        }
    };
    let (v4, v6) = tokio::join!(
        family(policy.ipv4, RecordType::A),
        family(policy.ipv6, RecordType::AAAA)
    );
    combine_families([v4, v6])
}

/// A host's addresses when every enabled family's answer is cached.
fn cached_host_addresses(dns: &Dns, policy: &Policy, name: &Name) -> Option<HostAddresses> {
    let family = |enabled: bool, record_type: RecordType| match enabled {
        true => dns.cached_address(name, record_type).map(Some),
        false => Some(None),
    };
    Some(combine_families([
        family(policy.ipv4, RecordType::A)?,
        family(policy.ipv6, RecordType::AAAA)?,
    ]))
}

/// The A then AAAA answers (`None`: not asked) as one host's addresses.
fn combine_families(answers: [Option<Query>; 2]) -> HostAddresses {
    let mut host = HostAddresses {
        addrs: Vec::new(),
        expires: Instant::now() + MAX_POSITIVE_TTL,
        failure: None,
        no_such_name: true,
    };
    for answer in answers.into_iter().flatten() {
        match answer {
            Query::Records { records, until } => {
                host.no_such_name = false;
                host.expires = host.expires.min(until);
                host.addrs
                    .extend(records.iter().filter_map(|record| match &record.data {
                        RData::A(a) => Some(IpAddr::V4(a.0)),
                        RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                        _ => None,
                    }));
            }
            Query::NoSuchName(until) => host.expires = host.expires.min(until),
            Query::NoRecords(until) => {
                host.no_such_name = false;
                host.expires = host.expires.min(until);
            }
            Query::Failed(why) => {
                host.no_such_name = false;
                host.failure.get_or_insert(why);
                host.expires = host.expires.min(Instant::now() + TEMPORARY_FAILURE_TTL);
            }
        }
    }
    host
}

/// What the answer to one query amounts to.
#[derive(Debug, Clone)]
pub(super) enum Query {
    /// Records of the type asked (found at the end of any CNAME chain), usable until `until`.
    Records {
        records: Arc<[Record]>,
        until: Instant,
    },
    /// NXDOMAIN: the name does not exist, as may be remembered until then.
    NoSuchName(Instant),
    /// NODATA: the name exists without records of this type, as may be remembered until then.
    NoRecords(Instant),
    /// No usable answer (timeout, SERVFAIL, REFUSED, a malformed reply): the text says which.
    Failed(String),
}

/// The CNAMEs followed so far from the name asked: every name met, and the least TTL.
struct CnameChain {
    names: Vec<Name>,
    ttl: u64,
}

impl CnameChain {
    fn new(name: &Name) -> CnameChain {
        CnameChain {
            names: vec![name.clone()],
            ttl: MAX_POSITIVE_TTL.as_secs(),
        }
    }

    /// The name at the end of the chain so far.
    fn current(&self) -> &Name {
        self.names.last().expect("the name asked is always there")
    }

    /// One more hop, to `target`; a failure when it loops or makes the chain too long.
    fn follow(&mut self, target: &Name, ttl: u32) -> Result<(), Query> {
        let asked = &self.names[0];
        if self.names.contains(target) {
            return Err(Query::Failed(format!(
                "CNAME loop: {asked} leads back to {target}"
            )));
        }
        if self.names.len() > MAX_CNAME_HOPS {
            return Err(Query::Failed(format!(
                "the CNAME chain of {asked} is longer than {MAX_CNAME_HOPS} hops"
            )));
        }
        self.names.push(target.clone());
        self.ttl = self.ttl.min(ttl.into());
        Ok(())
    }

    /// `query` kept no longer than the chain's records may be.
    fn bound(&self, query: Query) -> Query {
        let limit = Instant::now() + Duration::from_secs(self.ttl);
        match query {
            Query::Records { records, until } => Query::Records {
                records,
                until: until.min(limit),
            },
            Query::NoSuchName(until) => Query::NoSuchName(until.min(limit)),
            Query::NoRecords(until) => Query::NoRecords(until.min(limit)),
            failed => failed,
        }
    }
}

/// What one answer amounts to, for a chain being followed.
enum Step {
    Done(Query),
    /// The chain stops short at a server that does not recurse: ask for its last name.
    Follow,
}

/// What a nameserver's answer to the end of `chain`, for `record_type`, amounts to; its CNAMEs
/// extend the chain.
fn from_answer(message: &Message, chain: &mut CnameChain, record_type: RecordType) -> Step {
    let now = Instant::now();
    match message.metadata.response_code {
        ResponseCode::NoError => {}
        ResponseCode::NXDomain => {
            return Step::Done(Query::NoSuchName(now + negative_ttl(message)))
        }
        code => return Step::Done(Query::Failed(format!("the nameserver answered {code}"))),
    }
    // Follow the chain from the name asked: each step's records must be for the current name.
    let asked = chain.current().clone();
    loop {
        let current = chain.current().clone();
        let records: Vec<Record> = message
            .answers
            .iter()
            .filter(|r| r.record_type() == record_type && r.name == current)
            .cloned()
            .collect();
        if !records.is_empty() {
            let ttl = records.iter().fold(chain.ttl, |t, r| t.min(r.ttl.into()));
            return Step::Done(Query::Records {
                records: records.into(),
                until: now + Duration::from_secs(ttl),
            });
        }
        let cname = message.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(target) if r.name == current => Some((target.0.clone(), r.ttl)),
            _ => None,
        });
        match cname {
            Some((target, ttl)) => {
                if let Err(failed) = chain.follow(&target, ttl) {
                    return Step::Done(failed);
                }
            }
            // A chain that stops short at a server that does not recurse (an authoritative
            // one, say) is not NODATA: its last name is asked next.
            None if current != asked && !message.metadata.recursion_available => {
                return Step::Follow
            }
            // NODATA, for the name asked or at the end of the chain the recursive server
            // followed: the chain's records count toward how long it may be remembered.
            None => {
                let ttl = negative_ttl(message).min(Duration::from_secs(chain.ttl));
                return Step::Done(Query::NoRecords(now + ttl));
            }
        }
    }
}

/// RFC 2308 section 5: a negative answer is kept for the lesser of its SOA's TTL and MINIMUM.
fn negative_ttl(message: &Message) -> Duration {
    message
        .authorities
        .iter()
        .find_map(|r| match &r.data {
            RData::SOA(soa) => Some(Duration::from_secs(r.ttl.min(soa.minimum).into())),
            _ => None,
        })
        .map_or(UNSOURCED_NEGATIVE_TTL, |ttl| ttl.min(MAX_NEGATIVE_TTL))
}

fn classify(result: Result<Lookup, NetError>) -> Query {
    let error = match result {
        Ok(lookup) => {
            return Query::Records {
                records: lookup.answers().into(),
                until: lookup.valid_until(),
            }
        }
        Err(error) => error,
    };
    match &error {
        NetError::Dns(DnsError::NoRecordsFound(no_records)) => {
            let ttl = match no_records.negative_ttl {
                Some(secs) => Duration::from_secs(secs.into()).min(MAX_NEGATIVE_TTL),
                None => UNSOURCED_NEGATIVE_TTL,
            };
            let until = Instant::now() + ttl;
            match no_records.response_code {
                ResponseCode::NXDomain => Query::NoSuchName(until),
                ResponseCode::NoError => Query::NoRecords(until),
                code => Query::Failed(format!("the nameserver answered {code}")),
            }
        }
        NetError::Dns(DnsError::ResponseCode(code)) => {
            Query::Failed(format!("the nameserver answered {code}"))
        }
        _ => Query::Failed(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        smtp_port: 2525,
        ipv4: true,
        ipv6: true,
        max_hosts: 5,
        max_addresses: 10,
    };

    #[test]
    fn address_literals_skip_dns() {
        let hosts = |r: Option<Resolution>| match r {
            Some(Resolution::Hosts(hosts)) => hosts.to_vec(),
            other => panic!("expected hosts, got {other:?}"),
        };
        let v4 = hosts(address_literal("[127.0.0.1]", &POLICY));
        assert_eq!(v4.len(), 1);
        assert_eq!(v4[0].name, "127.0.0.1");
        assert_eq!(v4[0].addrs, vec!["127.0.0.1:2525".parse().unwrap()]);
        let v6 = hosts(address_literal("[ipv6:::1]", &POLICY));
        assert_eq!(v6[0].addrs, vec!["[::1]:2525".parse().unwrap()]);
        assert_eq!(address_literal("example.org", &POLICY), None);
    }

    #[test]
    fn bad_or_disabled_address_literals_bounce() {
        for literal in [
            "[300.0.0.1]",
            "[::1]",
            "[ipv6:1.2.3.4]",
            "[tag:whatever]",
            "[]",
        ] {
            match address_literal(literal, &POLICY) {
                Some(Resolution::NoSuchDomain(text)) => assert!(text.contains("not a valid")),
                other => panic!("{literal}: {other:?}"),
            }
        }
        let v4_only = Policy {
            ipv6: false,
            ..POLICY
        };
        assert_eq!(
            address_literal("[ipv6:::1]", &v4_only),
            Some(Resolution::NoSuchDomain(
                "[ipv6:::1] is an IPv6 address, and IPv6 is disabled".into()
            ))
        );
    }

    #[test]
    fn shuffle_ties_keeps_preference_order() {
        let mut saw_swap = false;
        for _ in 0..200 {
            let mut items = [
                (10, 'a'),
                (10, 'b'),
                (20, 'c'),
                (30, 'd'),
                (30, 'e'),
                (30, 'f'),
            ];
            shuffle_ties(&mut items, |(preference, _)| *preference);
            let preferences: Vec<u16> = items.iter().map(|(p, _)| *p).collect();
            assert_eq!(preferences, [10, 10, 20, 30, 30, 30]);
            let mut last: Vec<char> = items[3..].iter().map(|(_, c)| *c).collect();
            last.sort_unstable();
            assert_eq!(last, ['d', 'e', 'f']);
            saw_swap |= items[0].1 == 'b';
        }
        assert!(saw_swap, "equal preferences were never reordered");
    }

    #[test]
    fn idn_domains_become_a_labels() {
        let name = dns_name("bücher.example").expect("valid IDN");
        assert_eq!(host_name(&name), "xn--bcher-kva.example");
        assert!(name.is_fqdn());
        assert_eq!(dns_name(""), None);
        assert_eq!(
            host_name(&dns_name("_dmarc.example").unwrap()),
            "_dmarc.example"
        );
    }
}
