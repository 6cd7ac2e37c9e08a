//! Direct-to-MX routing: which hosts, in which order, receive a recipient domain's mail
//! (RFC 5321 section 5.1, RFC 7505 null MX).
//!
//! [`MxResolver`] runs DNS lookups on a thread of its own (a current-thread tokio runtime): over
//! a few long-lived UDP sockets for the common case, with hickory's async resolver for the rest
//! (TCP after a truncated answer, CNAME chains), and hands each answer back through a `crossbeam` channel,
//! waking the event loop's `mio::Waker`. It must never block its caller: a request is a message
//! to that thread, and the event loop never waits for DNS. It remembers answers for their TTL in
//! a bounded cache, coalesces concurrent lookups of a domain, and bounds the lookups in flight.
//! It does not connect to the hosts it finds: trying them in order is the engine's job.

mod cache;
mod lookup;
mod sts;
mod stub;

use crate::route::mta_sts::StsHost;
use cache::ResolutionCache;
use crossbeam_channel::{Receiver, Sender};
use hickory_resolver::config::{
    NameServerConfig, ProtocolConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::system_conf::read_system_conf;
use hickory_resolver::TokioResolver;
use lookup::{Answer, Dns, Policy};
use std::collections::{HashSet, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{self, error::TryRecvError, UnboundedReceiver, UnboundedSender};

/// Domains whose lookups may run at once; further requests wait in a queue. It bounds the
/// sockets and memory one burst of new domains can take, and the load on the nameservers.
const MAX_CONCURRENT_LOOKUPS: usize = 256;
/// Requests and finished lookups handled before the waker is woken for the answers so far:
/// one wake covers a batch, and a flood of requests cannot delay answers for long.
const BATCH: usize = 1024;
/// A DNS query is sent at least this many times (once, then one retry after a timeout), and at
/// least once to each nameserver.
const QUERY_TRIES: usize = 2;
/// A domain's lookup is an MX query, then its hosts' A and AAAA queries in parallel, then maybe
/// a CNAME hop: at most this many query rounds, each within the tries × `timeout`. Past that,
/// the domain gets a TempFail whatever hickory is still doing.
const QUERY_ROUNDS_PER_LOOKUP: u32 = 3;

/// Settings of an [`MxResolver`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxConfig {
    /// The nameservers to ask, each over UDP (and TCP for truncated answers). `None`: those of
    /// the system's `/etc/resolv.conf`. Must not be an empty list.
    pub nameservers: Option<Vec<SocketAddr>>,
    /// The port to connect to on MX hosts (default 25, the SMTP port).
    pub smtp_port: u16,
    /// Use IPv4 addresses (A records). At least one of `ipv4` and `ipv6` must be on.
    pub ipv4: bool,
    /// Use IPv6 addresses (AAAA records).
    pub ipv6: bool,
    /// The MX hosts kept per domain, the most preferred first (default 5; at least 1).
    pub max_hosts: usize,
    /// The addresses kept per domain, over all its hosts in order (default 10; at least 1).
    pub max_addresses: usize,
    /// How long one DNS query may take before it is retried once (default 5 s).
    pub timeout: Duration,
    /// The domains whose answers are remembered (default 100,000; 0 disables caching, also in
    /// hickory). Answers are kept for their DNS TTL; negative ones for the SOA's negative TTL, at
    /// most an hour; temporary failures for 30 s.
    pub cache_capacity: usize,
    /// Deliver to MX hosts on this machine: loopback, unspecified (0.0.0.0, ::) or one of its
    /// interfaces' addresses. Off (the default), such a host is mail looping back to its
    /// sender: it and every host of its preference or worse are dropped, and a domain left
    /// with none gets [`Resolution::LoopsBack`], as Postfix does. Tests and local setups
    /// with exchangers on loopback turn it on.
    pub allow_loopback: bool,
    /// Apply the recipient domains' MTA-STS policies (RFC 8461; default on): the
    /// `_mta-sts` TXT record is asked with the MX records, and the policy fetched over HTTPS.
    pub mta_sts: bool,
    /// The HTTPS port of MTA-STS policy hosts (default 443; another only for tests).
    pub mta_sts_port: u16,
}

impl Default for MxConfig {
    fn default() -> Self {
        MxConfig {
            nameservers: None,
            smtp_port: 25,
            ipv4: true,
            ipv6: true,
            max_hosts: 5,
            max_addresses: 10,
            timeout: Duration::from_secs(5),
            cache_capacity: 100_000,
            allow_loopback: false,
            mta_sts: true,
            mta_sts_port: 443,
        }
    }
}

/// One mail exchanger of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxHost {
    /// The host name, in A-labels, lower case, without the trailing dot (for an address literal,
    /// the address).
    pub name: String,
    /// The MX preference, lower first (0 for an implicit MX or an address literal).
    pub preference: u16,
    /// Its addresses to connect to, with `MxConfig::smtp_port`: IPv4 first, then IPv6.
    pub addrs: Vec<SocketAddr>,
    /// What the domain's MTA-STS policy says about this host; `None`: no policy applies.
    pub mta_sts: Option<StsHost>,
}

/// What a domain resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Hosts in the order to try: by preference, equal preferences shuffled anew for every answer
    /// (RFC 5321 section 5.1), each with its addresses (A and AAAA, CNAMEs followed), within
    /// `max_hosts` and `max_addresses`. When the domain has no MX records, the implicit MX: the
    /// domain itself with its A/AAAA (RFC 5321 section 5.1). Hosts without any address are left
    /// out. Never empty.
    Hosts(Arc<[MxHost]>),
    /// RFC 7505 null MX (an MX with target ".", alone or not): bounce with 5.1.10 at once, no
    /// connection.
    NullMx,
    /// The most preferred MX host is this machine (see [`MxConfig::allow_loopback`]): bounce
    /// with 5.4.6 "mail for DOMAIN loops back to myself", no connection.
    LoopsBack,
    /// NXDOMAIN, no MX and no A/AAAA records, an invalid domain name or address literal: bounce;
    /// the text says which.
    NoSuchDomain(String),
    /// The domain's MTA-STS policy is `enforce` and names none of its MX hosts: defer with
    /// this text.
    MtaStsRefused(String),
    /// SERVFAIL, timeout, refused, a malformed answer, MX hosts that resolve to no address:
    /// defer with this text.
    TempFail(String),
}

/// One answer of the resolver: the domain (as [`MxResolver::domain_key`] spells it), its
/// resolution, and the instant past which the resolution must not be used.
pub type MxAnswer = (String, Resolution, Instant);

/// A handle on the resolver thread: `Send + Sync`, cheap to clone. The thread stops at
/// [`MxResolver::shutdown`] or when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct MxResolver {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    requests: UnboundedSender<Request>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug)]
enum Request {
    Resolve(Vec<String>),
    Shutdown,
}

impl MxResolver {
    /// Starts a thread (`mxpipe-mx`) running a current-thread tokio runtime with hickory's async
    /// resolver. Answers arrive on the returned channel as `(domain, resolution, until)`,
    /// `domain` as [`MxResolver::domain_key`] spells it, `until` the instant past which the
    /// answer must not be used (its shortest DNS TTL); `waker` is woken after answers are sent (one wake
    /// may cover several answers, and no answer is sent without a wake following it). The thread
    /// also stops when it finds the receiver dropped (at its next answer).
    ///
    /// Fails with `InvalidInput` on a setting out of range, or when the system's resolver
    /// configuration cannot be read.
    pub fn start(
        config: MxConfig,
        waker: Arc<mio::Waker>,
    ) -> io::Result<(MxResolver, Receiver<MxAnswer>)> {
        let https = crate::engine::tls::TlsConfigs::new(None, &[])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?
            .verifying;
        MxResolver::start_with_https(config, waker, https)
    }

    /// [`MxResolver::start`], fetching MTA-STS policies with `https` (verifying client
    /// settings: the engine passes its own, with the configured `tls_ca_file`).
    pub fn start_with_https(
        config: MxConfig,
        waker: Arc<mio::Waker>,
        https: Arc<rustls::ClientConfig>,
    ) -> io::Result<(MxResolver, Receiver<MxAnswer>)> {
        let dns = Arc::new(dns(&config)?);
        let sts = config.mta_sts.then(|| {
            Arc::new(sts::Sts::new(
                config.mta_sts_port,
                https,
                config.cache_capacity,
            ))
        });
        // Every nameserver gets a try, so more servers may take longer.
        let deadline = config.timeout * dns.tries() as u32 * QUERY_ROUNDS_PER_LOOKUP;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (requests, request_rx) = mpsc::unbounded_channel();
        let (answers, answer_rx) = crossbeam_channel::unbounded();
        let (finished, finished_rx) = mpsc::unbounded_channel();
        let worker = Worker {
            dns,
            sts,
            policy: Policy {
                smtp_port: config.smtp_port,
                ipv4: config.ipv4,
                ipv6: config.ipv6,
                max_hosts: config.max_hosts,
                max_addresses: config.max_addresses,
            },
            deadline,
            cache: ResolutionCache::new(config.cache_capacity),
            own_addresses: (!config.allow_loopback).then(own_addresses),
            pending: HashSet::new(),
            queued: VecDeque::new(),
            running: 0,
            finished,
            answers,
            waker,
            wake_due: false,
            receiver_gone: false,
        };
        let thread = std::thread::Builder::new()
            .name("mxpipe-mx".into())
            .spawn(move || {
                runtime.block_on(worker.run(request_rx, finished_rx));
                // A policy fetch still running on a blocking thread ends by its own timeout;
                // shutting down does not wait for it.
                runtime.shutdown_background();
            })?;
        let shared = Arc::new(Shared {
            requests,
            thread: Mutex::new(Some(thread)),
        });
        Ok((MxResolver { shared }, answer_rx))
    }

    /// Asks for the hosts of `domain`; never blocks. The answer arrives later on the channel,
    /// keyed by [`MxResolver::domain_key`]`(domain)`, even when it comes from the cache, so the
    /// caller has a single path.
    ///
    /// Answers are per domain, not per call: calls for a domain whose lookup is already under
    /// way (or queued) share its one answer, so the caller keeps its own list of waiters per
    /// domain. Every call is followed by at least one answer for its domain, sent after the call
    /// (unless the resolver has shut down, after which calls are ignored).
    pub fn resolve(&self, domain: &str) {
        // A send fails only once the thread has stopped, when no answer is due any more.
        let _ = self
            .shared
            .requests
            .send(Request::Resolve(vec![MxResolver::domain_key(domain)]));
    }

    /// [`MxResolver::resolve`] for many domains at once, each already spelled as
    /// [`MxResolver::domain_key`] spells it: one message to the resolver thread, so one wake of
    /// it, however many domains (the event loop sends each turn's new domains together).
    pub fn resolve_keys(&self, domains: Vec<String>) {
        if !domains.is_empty() {
            let _ = self.shared.requests.send(Request::Resolve(domains));
        }
    }

    /// The key answers carry for `domain`: lower case, without the trailing dot.
    pub fn domain_key(domain: &str) -> String {
        domain.trim_end_matches('.').to_lowercase()
    }

    /// Stops the thread and waits for it (a moment: lookups in flight are abandoned, and
    /// their answers never come). Later calls to [`MxResolver::resolve`] are ignored. Also done
    /// when the last clone is dropped.
    pub fn shutdown(&self) {
        self.shared.shutdown();
    }
}

impl Shared {
    fn shutdown(&self) {
        let _ = self.requests.send(Request::Shutdown);
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(thread) = thread {
            // The thread only runs our code and hickory's; a panic there has nothing to report
            // that the missing answers do not already show.
            let _ = thread.join();
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The lean transport and hickory's resolver, both asking the nameservers of `config`.
fn dns(config: &MxConfig) -> io::Result<Dns> {
    let invalid = |problem: &str| {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("MX resolver: {problem}"),
        ))
    };
    if !config.ipv4 && !config.ipv6 {
        return invalid("at least one of ipv4 and ipv6 must be enabled");
    }
    if config.max_hosts == 0 || config.max_addresses == 0 {
        return invalid("max_hosts and max_addresses must be at least 1");
    }
    if config.timeout.is_zero() {
        return invalid("the DNS timeout must be more than zero");
    }
    let (resolver_config, system_options) = match &config.nameservers {
        None => {
            let (resolver_config, options) = read_system_conf().map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("MX resolver: cannot read the system's resolver configuration: {e}"),
                )
            })?;
            (resolver_config, Some(options))
        }
        Some(servers) if servers.is_empty() => return invalid("the nameserver list is empty"),
        Some(servers) => {
            let servers = servers
                .iter()
                .map(|server| {
                    let mut ns = NameServerConfig::udp_and_tcp(server.ip());
                    for connection in &mut ns.connections {
                        connection.port = server.port();
                    }
                    ns
                })
                .collect();
            (ResolverConfig::from_name_servers(servers), None)
        }
    };
    // The lean transport asks the same servers over UDP, at their UDP port; configured ones
    // as given (an IPv6 link-local server keeps its scope).
    let servers: Vec<SocketAddr> = match &config.nameservers {
        Some(servers) => servers.clone(),
        None => system_servers(&resolver_config),
    };
    if servers.is_empty() {
        return invalid("the system's resolver configuration names no nameserver");
    }
    let mut builder =
        TokioResolver::builder_with_config(resolver_config, TokioRuntimeProvider::default());
    let options: &mut ResolverOpts = builder.options_mut();
    if let Some(system) = system_options {
        *options = system;
    }
    options.timeout = config.timeout;
    // Hickory counts retries after the first try.
    options.attempts = QUERY_TRIES - 1;
    // Mail routing goes by DNS alone: an /etc/hosts entry is no mail exchanger.
    options.use_hosts_file = ResolveHosts::Never;
    options.cache_size = u64::try_from(config.cache_capacity).unwrap_or(u64::MAX);
    options.negative_max_ttl = Some(Duration::from_secs(3600));
    let hickory = builder
        .build()
        .map_err(|e| io::Error::other(format!("MX resolver: {e}")))?;
    let stub = stub::Stub::new(&servers, config.timeout, QUERY_TRIES);
    Ok(Dns::new(stub, hickory, config.cache_capacity))
}

/// The UDP address of each nameserver of a system configuration.
fn system_servers(config: &ResolverConfig) -> Vec<SocketAddr> {
    config
        .name_servers()
        .iter()
        .map(|ns| {
            let port = ns
                .connections
                .iter()
                .find(|c| matches!(c.protocol, ProtocolConfig::Udp))
                .map_or(53, |c| c.port);
            SocketAddr::new(ns.ip, port)
        })
        .collect()
}

/// A lookup that has finished (or was cut short), on its way back to the worker.
struct Finished {
    domain: String,
    answer: Answer,
}

/// Reports a lookup's answer to the worker exactly once, even when its task is dropped before
/// the end (a panic): then the domain gets a TempFail instead of waiting forever.
struct Completion {
    domain: Option<String>,
    finished: UnboundedSender<Finished>,
}

impl Completion {
    fn finish(mut self, answer: Answer) {
        if let Some(domain) = self.domain.take() {
            let _ = self.finished.send(Finished { domain, answer });
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(domain) = self.domain.take() {
            let answer = Answer::temporary(format!("{domain}: the MX lookup failed unexpectedly"));
            // Fails only when the worker is gone, at shutdown.
            let _ = self.finished.send(Finished { domain, answer });
        }
    }
}

/// The resolver thread's state; all of it lives on that thread.
struct Worker {
    dns: Arc<Dns>,
    /// MTA-STS, when on.
    sts: Option<Arc<sts::Sts>>,
    policy: Policy,
    /// The most a domain's lookup may take in all.
    deadline: Duration,
    cache: ResolutionCache,
    /// Domains with a lookup running or queued; further requests for them are absorbed.
    pending: HashSet<String>,
    queued: VecDeque<String>,
    running: usize,
    finished: UnboundedSender<Finished>,
    answers: Sender<MxAnswer>,
    /// This machine's interface addresses, read at start; `None` when loopback is allowed.
    own_addresses: Option<Vec<IpAddr>>,
    waker: Arc<mio::Waker>,
    wake_due: bool,
    receiver_gone: bool,
}

impl Worker {
    async fn run(
        mut self,
        mut requests: UnboundedReceiver<Request>,
        mut finished: UnboundedReceiver<Finished>,
    ) {
        loop {
            tokio::select! {
                // The worker holds a sender of `finished`, so this never yields `None`.
                Some(done) = finished.recv() => self.finish(done),
                request = requests.recv() => match request {
                    Some(Request::Resolve(domains)) => domains.into_iter().for_each(|d| self.request(d)),
                    Some(Request::Shutdown) | None => return,
                },
            }
            for _ in 0..BATCH {
                if let Ok(done) = finished.try_recv() {
                    self.finish(done);
                    continue;
                }
                match requests.try_recv() {
                    Ok(Request::Resolve(domains)) => {
                        domains.into_iter().for_each(|d| self.request(d))
                    }
                    Ok(Request::Shutdown) | Err(TryRecvError::Disconnected) => return,
                    Err(TryRecvError::Empty) => break,
                }
            }
            if self.wake_due {
                self.wake_due = false;
                // The answers are in the channel already; should the wake fail, the loop still
                // finds them the next time it looks.
                let _ = self.waker.wake();
            }
            if self.receiver_gone {
                return;
            }
        }
    }

    fn request(&mut self, domain: String) {
        if self.pending.contains(&domain) {
            return;
        }
        if let Some(resolution) = lookup::address_literal(&domain, &self.policy) {
            // No DNS, nothing that expires: as long as any positive answer may be kept.
            let until = Instant::now() + lookup::MAX_POSITIVE_TTL;
            self.answer(domain, resolution, until);
            return;
        }
        if let Some((resolution, until)) = self.cache.get_until(&domain, Instant::now()) {
            let resolution = reshuffled(resolution);
            self.answer(domain, resolution, until);
            return;
        }
        self.pending.insert(domain.clone());
        if self.running < MAX_CONCURRENT_LOOKUPS {
            self.spawn(domain);
        } else {
            self.queued.push_back(domain);
        }
    }

    fn spawn(&mut self, domain: String) {
        self.running += 1;
        let (dns, policy, deadline) = (self.dns.clone(), self.policy, self.deadline);
        let sts = self.sts.clone();
        let completion = Completion {
            domain: Some(domain.clone()),
            finished: self.finished.clone(),
        };
        tokio::spawn(async move {
            // The `_mta-sts` TXT record is asked beside the MX records, not after them.
            let lookup = async {
                let announced = async {
                    match &sts {
                        Some(_) => sts::Sts::announced_id(&dns, &domain).await,
                        None => None,
                    }
                };
                tokio::join!(lookup::resolve(&dns, &policy, &domain), announced)
            };
            let answer = match tokio::time::timeout(deadline, lookup).await {
                Ok((answer, announced)) => match &sts {
                    Some(sts) => sts.apply(&dns, &policy, &domain, announced, answer).await,
                    None => answer,
                },
                Err(_) => Answer::temporary(format!(
                    "{domain}: the DNS lookup did not finish within {} s",
                    deadline.as_secs_f32()
                )),
            };
            completion.finish(answer);
        });
    }

    fn finish(&mut self, done: Finished) {
        self.running -= 1;
        self.pending.remove(&done.domain);
        let Finished { domain, answer } = done;
        self.cache.insert(
            domain.clone(),
            answer.resolution.clone(),
            answer.expires,
            Instant::now(),
        );
        self.answer(domain, answer.resolution, answer.expires);
        while self.running < MAX_CONCURRENT_LOOKUPS {
            let Some(next) = self.queued.pop_front() else {
                break;
            };
            self.spawn(next);
        }
    }

    fn answer(&mut self, domain: String, resolution: Resolution, until: Instant) {
        let resolution = match &self.own_addresses {
            Some(own) => without_self(resolution, own),
            None => resolution,
        };
        if self.answers.send((domain, resolution, until)).is_err() {
            self.receiver_gone = true;
        }
        self.wake_due = true;
    }
}

/// This machine's interface addresses (loopback ones included); none when they cannot be read.
fn own_addresses() -> Vec<IpAddr> {
    if_addrs::get_if_addrs()
        .map(|interfaces| interfaces.iter().map(|i| i.ip()).collect())
        .unwrap_or_default()
}

/// Postfix's `smtp_find_self`: the first MX host (in preference order) with an address of this
/// machine, and every host of its preference or worse, are dropped, since mail sent there
/// would come back to this host. Nothing left: the mail loops back.
fn without_self(resolution: Resolution, own: &[IpAddr]) -> Resolution {
    let Resolution::Hosts(hosts) = &resolution else {
        return resolution;
    };
    let is_self = |ip: IpAddr| {
        let ip = ip.to_canonical();
        ip.is_loopback() || ip.is_unspecified() || own.contains(&ip)
    };
    let Some(first_self) = hosts
        .iter()
        .position(|host| host.addrs.iter().any(|a| is_self(a.ip())))
    else {
        return resolution;
    };
    let preference = hosts[first_self].preference;
    let kept: Vec<MxHost> = hosts
        .iter()
        .take_while(|host| host.preference < preference)
        .cloned()
        .collect();
    if kept.is_empty() {
        Resolution::LoopsBack
    } else {
        Resolution::Hosts(kept.into())
    }
}

/// A cached resolution with its equal preferences shuffled again, so that a domain's load is
/// spread over its equal MX hosts for as long as its answer is cached (RFC 5321 section 5.1).
fn reshuffled(resolution: &Resolution) -> Resolution {
    match resolution {
        Resolution::Hosts(hosts)
            if hosts
                .windows(2)
                .any(|pair| pair[0].preference == pair[1].preference) =>
        {
            let mut hosts = hosts.to_vec();
            lookup::shuffle_ties(&mut hosts, |host| host.preference);
            Resolution::Hosts(hosts.into())
        }
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_keys_are_lower_case_without_the_root_dot() {
        assert_eq!(MxResolver::domain_key("Example.ORG."), "example.org");
        assert_eq!(MxResolver::domain_key("BÜCHER.example"), "bücher.example");
        assert_eq!(MxResolver::domain_key("[IPv6:::1]"), "[ipv6:::1]");
    }

    #[test]
    fn settings_out_of_range_are_refused() {
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let local = Some(vec!["127.0.0.1:53".parse().unwrap()]);
        let bad = [
            MxConfig {
                ipv4: false,
                ipv6: false,
                ..MxConfig::default()
            },
            MxConfig {
                max_hosts: 0,
                ..MxConfig::default()
            },
            MxConfig {
                timeout: Duration::ZERO,
                ..MxConfig::default()
            },
            MxConfig {
                nameservers: Some(Vec::new()),
                ..MxConfig::default()
            },
        ];
        for config in bad {
            let config = MxConfig {
                nameservers: config.nameservers.or(local.clone()),
                ..config
            };
            let error = MxResolver::start(config.clone(), waker.clone())
                .map(|_| ())
                .expect_err(&format!("{config:?}"));
            assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        }
    }

    #[test]
    fn hosts_of_this_machine_and_worse_ones_are_dropped() {
        let host = |name: &str, preference, ip: &str| MxHost {
            name: name.into(),
            preference,
            addrs: vec![SocketAddr::new(ip.parse().unwrap(), 25)],
            mta_sts: None,
        };
        let own: Vec<IpAddr> = vec!["192.0.2.7".parse().unwrap()];
        let hosts = |list: Vec<MxHost>| Resolution::Hosts(list.into());
        // A remote backup MX beside the best one being this host: nothing better is left.
        let looping = hosts(vec![
            host("me", 10, "192.0.2.7"),
            host("b", 20, "198.51.100.1"),
        ]);
        assert_eq!(without_self(looping, &own), Resolution::LoopsBack);
        // This host as a backup: only the better hosts remain.
        let backup = hosts(vec![
            host("a", 10, "198.51.100.1"),
            host("me", 20, "192.0.2.7"),
            host("c", 30, "198.51.100.3"),
        ]);
        assert_eq!(
            without_self(backup, &own),
            hosts(vec![host("a", 10, "198.51.100.1")])
        );
        for ip in [
            "127.0.0.1",
            "127.9.9.9",
            "0.0.0.0",
            "::1",
            "::",
            "::ffff:127.0.0.1",
        ] {
            let single = hosts(vec![host("x", 0, ip)]);
            assert_eq!(without_self(single, &[]), Resolution::LoopsBack, "{ip}");
        }
        let remote = hosts(vec![host("a", 10, "198.51.100.1")]);
        assert_eq!(without_self(remote.clone(), &own), remote);
    }

    #[test]
    fn reshuffling_reorders_only_equal_preferences() {
        let host = |name: &str, preference| MxHost {
            name: name.into(),
            preference,
            addrs: Vec::new(),
            mta_sts: None,
        };
        let hosts: Arc<[MxHost]> = Arc::from([host("a", 10), host("b", 10), host("c", 20)]);
        let mut firsts = HashSet::new();
        for _ in 0..200 {
            let Resolution::Hosts(shuffled) = reshuffled(&Resolution::Hosts(hosts.clone())) else {
                panic!("hosts stay hosts");
            };
            assert_eq!(shuffled[2], hosts[2]);
            firsts.insert(shuffled[0].name.clone());
        }
        assert_eq!(firsts.len(), 2);
        let single: Arc<[MxHost]> = Arc::from([host("a", 10), host("c", 20)]);
        let Resolution::Hosts(same) = reshuffled(&Resolution::Hosts(single.clone())) else {
            panic!("hosts stay hosts");
        };
        assert!(
            Arc::ptr_eq(&same, &single),
            "nothing to shuffle: the answer is shared"
        );
    }
}
