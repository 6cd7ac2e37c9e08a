//! Direct-to-MX routing inside the loop (RFC 5321 5.1): recipients of unresolved domains wait
//! while the resolver thread looks them up; answers become routes over one destination per MX
//! host and address, so that every domain hosted on the same exchanger shares its pool and
//! limits. Jobs move to the next exchanger when one cannot be reached. No lookup ever runs on
//! the loop thread: answers arrive on a channel, with the loop's waker.

use super::{Reactor, RESOLUTIONS_PER_TURN};
use crate::engine::pool::Destination;
use crate::engine::shaping::Shaper;
use crate::engine::EventKind;
use crate::message::Address;
use crate::queue::{Envelope, Job, MxJob, MxRoute};
use crate::route::mta_sts::StsHost;
use crate::route::mx::{MxAnswer, MxHost, MxResolver, Resolution};
use crate::route::Target;
use crate::smtp::{EnhancedCode, Reply};
use crossbeam_channel::Receiver;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest the loop keeps a resolved route before asking the resolver again (which answers
/// from its own TTL-bound cache when it can); a route never outlives its DNS answer's TTL.
const ROUTE_LIFETIME: Duration = Duration::from_secs(60);

/// What the loop knows about a domain.
enum DomainRoute {
    /// Being resolved: the recipients waiting for the answer, per message.
    Pending(Vec<(Arc<Envelope>, Vec<Address>, u32)>),
    Ready {
        route: Arc<MxRoute>,
        until: Instant,
    },
}

pub(super) struct MxState {
    resolver: MxResolver,
    answers: Receiver<MxAnswer>,
    domains: HashMap<Arc<str>, DomainRoute>,
    /// Destinations by (recipient-domain override group, MX host, address, MTA-STS verdict).
    by_host: HashMap<(Option<usize>, String, SocketAddr, Option<StsHost>), usize>,
    /// The pseudo-destination that DNS failures are accounted to.
    pub(super) resolver_destination: usize,
    capacity: usize,
    /// Domains to ask the resolver for at the end of this turn.
    to_resolve: Vec<String>,
}

impl MxState {
    pub(super) fn new(
        resolver: MxResolver,
        answers: Receiver<MxAnswer>,
        resolver_destination: usize,
        capacity: usize,
    ) -> Self {
        MxState {
            resolver,
            answers,
            domains: HashMap::new(),
            by_host: HashMap::new(),
            resolver_destination,
            capacity: capacity.max(1024),
            to_resolve: Vec::new(),
        }
    }
}

impl MxState {
    /// Takes the recipients waiting for the resolver (a bounded shutdown abandons them).
    pub(super) fn take_pending(&mut self) -> Vec<(Arc<Envelope>, Vec<Address>, u32)> {
        let pending: Vec<Arc<str>> = self
            .domains
            .iter()
            .filter(|(_, route)| matches!(route, DomainRoute::Pending(_)))
            .map(|(domain, _)| Arc::clone(domain))
            .collect();
        let mut waiting = Vec::new();
        for domain in pending {
            if let Some(DomainRoute::Pending(list)) = self.domains.remove(&domain) {
                waiting.extend(list);
            }
        }
        waiting
    }
}

impl Drop for MxState {
    fn drop(&mut self) {
        self.resolver.shutdown();
    }
}

/// Where a domain's recipients go right now.
pub(super) enum MxChoice {
    /// The candidate to use first (the job starts there).
    Ready(Arc<MxRoute>),
    /// Waiting for the resolver; the recipients were parked.
    Parked,
}

impl Reactor {
    /// Routes one message's recipients of `domain` by MX; returns the route when known, or
    /// parks them until the resolver answers.
    pub(super) fn route_mx(
        &mut self,
        envelope: &Arc<Envelope>,
        domain: &str,
        recipients: Vec<Address>,
        attempts: u32,
        now: Instant,
    ) -> (MxChoice, Vec<Address>) {
        let mx = self.mx.as_mut().expect("MX routing is on");
        // Domains are nearly always spelled as their key already: no allocation to look up.
        let spelled_as_key = !domain.ends_with('.')
            && domain.is_ascii()
            && !domain.bytes().any(|b| b.is_ascii_uppercase());
        let owned;
        let key: &str = if spelled_as_key {
            domain
        } else {
            owned = MxResolver::domain_key(domain);
            &owned
        };
        match mx.domains.get_mut(key) {
            Some(DomainRoute::Ready { route, until }) if *until > now => {
                return (MxChoice::Ready(Arc::clone(route)), recipients);
            }
            Some(DomainRoute::Pending(waiting)) => {
                // A message's recipients at one domain arrive together, so only the last
                // entry can be the same message (a linear search was quadratic in the
                // messages waiting for one domain).
                match waiting
                    .last_mut()
                    .filter(|(e, _, a)| Arc::ptr_eq(e, envelope) && *a == attempts)
                {
                    Some((_, list, _)) => list.extend(recipients),
                    None => waiting.push((Arc::clone(envelope), recipients, attempts)),
                }
                return (MxChoice::Parked, Vec::new());
            }
            _ => {}
        }
        if mx.domains.len() >= mx.capacity {
            // Bounded: forget resolved routes (they are cheap to ask for again), never the
            // recipients waiting for an answer.
            mx.domains
                .retain(|_, r| matches!(r, DomainRoute::Pending(_)));
        }
        mx.domains.insert(
            Arc::from(key),
            DomainRoute::Pending(vec![(Arc::clone(envelope), recipients, attempts)]),
        );
        // Sent with the rest of this turn's new domains (`send_resolutions`).
        mx.to_resolve.push(key.to_string());
        (MxChoice::Parked, Vec::new())
    }

    /// Asks the resolver for this turn's new domains, in one message.
    pub(super) fn send_resolutions(&mut self) {
        if let Some(mx) = self.mx.as_mut() {
            if !mx.to_resolve.is_empty() {
                mx.resolver.resolve_keys(std::mem::take(&mut mx.to_resolve));
            }
        }
    }

    /// Takes the resolver's answers and releases the recipients that waited for them.
    pub(super) fn take_resolutions(&mut self, now: Instant) {
        let Some(mx) = self.mx.as_ref() else {
            return;
        };
        let answers: Vec<MxAnswer> = mx.answers.try_iter().take(RESOLUTIONS_PER_TURN).collect();
        if answers.len() == RESOLUTIONS_PER_TURN {
            // Perhaps more: taken on the next turn, after the sockets have been served.
            self.more_work = true;
        }
        for (domain, resolution, until) in answers {
            self.resolved(domain, resolution, until, now);
        }
    }

    fn resolved(&mut self, domain: String, resolution: Resolution, until: Instant, now: Instant) {
        let key: Arc<str> = Arc::from(domain.as_str());
        let mx = self.mx.as_mut().expect("MX routing is on");
        let waiting = match mx.domains.remove(&key) {
            Some(DomainRoute::Pending(waiting)) => waiting,
            Some(ready) => {
                // An answer nobody waits for (already resolved): keep what we had.
                mx.domains.insert(key, ready);
                return;
            }
            None => Vec::new(),
        };
        match resolution {
            Resolution::Hosts(hosts) => {
                let group = self.config.domain_group(&key);
                let mut candidates = Vec::new();
                let mut preferences = Vec::new();
                for host in hosts.iter() {
                    for &addr in &host.addrs {
                        candidates.push(self.mx_destination(group, host, addr));
                        preferences.push(host.preference);
                    }
                }
                let route = Arc::new(MxRoute {
                    candidates,
                    preferences,
                });
                let mx = self.mx.as_mut().expect("MX routing is on");
                mx.domains.insert(
                    Arc::clone(&key),
                    DomainRoute::Ready {
                        route: Arc::clone(&route),
                        until: until.min(now + ROUTE_LIFETIME),
                    },
                );
                for (envelope, recipients, attempts) in waiting {
                    self.enqueue_on_route(&envelope, &key, &route, recipients, attempts, now);
                }
            }
            Resolution::NullMx => {
                let reply = Reply::new(
                    0,
                    Some(EnhancedCode::new(5, 1, 10)),
                    format!("{domain} does not accept mail (null MX, RFC 7505)"),
                );
                self.bounce_waiting(waiting, &reply, now);
            }
            Resolution::LoopsBack => {
                let reply = Reply::new(
                    0,
                    Some(EnhancedCode::new(5, 4, 6)),
                    format!("mail for {domain} loops back to myself"),
                );
                self.bounce_waiting(waiting, &reply, now);
            }
            Resolution::NoSuchDomain(text) => {
                let reply = Reply::new(0, Some(EnhancedCode::new(5, 1, 2)), text);
                self.bounce_waiting(waiting, &reply, now);
            }
            Resolution::TempFail(text) => {
                let reply = Reply::new(
                    0,
                    Some(EnhancedCode::new(4, 4, 3)),
                    format!("DNS lookup for {domain} failed: {text}"),
                );
                self.defer_waiting(&key, waiting, &reply, now);
            }
            Resolution::MtaStsRefused(text) => {
                // RFC 8461 section 5: the mail waits rather than go to a host the policy does
                // not name.
                let reply = Reply::new(0, Some(EnhancedCode::new(4, 7, 0)), text);
                self.defer_waiting(&key, waiting, &reply, now);
            }
        }
    }

    /// Defers recipients that waited for a resolution that gives no host to try now.
    fn defer_waiting(
        &mut self,
        domain: &Arc<str>,
        waiting: Vec<(Arc<Envelope>, Vec<Address>, u32)>,
        reply: &Reply,
        now: Instant,
    ) {
        let d = self
            .mx
            .as_ref()
            .expect("MX routing is on")
            .resolver_destination;
        let reply = Arc::new(reply.clone());
        for (envelope, recipients, attempts) in waiting {
            let failures = recipients
                .into_iter()
                .map(|r| (r, Arc::clone(&reply)))
                .collect();
            let job_mx = MxJob {
                domain: Arc::clone(domain),
                route: None,
                candidate: 0,
            };
            self.defer(&envelope, failures, d, attempts + 1, Some(job_mx), now);
        }
    }

    fn bounce_waiting(
        &mut self,
        waiting: Vec<(Arc<Envelope>, Vec<Address>, u32)>,
        reply: &Reply,
        now: Instant,
    ) {
        let reply = Arc::new(reply.clone());
        for (envelope, recipients, attempts) in waiting {
            for r in recipients {
                self.finish_recipient(
                    EventKind::Bounced,
                    &envelope,
                    r,
                    Arc::clone(&reply),
                    None,
                    attempts,
                    now,
                );
            }
        }
    }

    /// The destination of one MX host and address (under its domain's MTA-STS verdict for
    /// it), created on first use.
    fn mx_destination(&mut self, group: Option<usize>, host: &MxHost, addr: SocketAddr) -> usize {
        let mx = self.mx.as_mut().expect("MX routing is on");
        let key = (group, host.name.clone(), addr, host.mta_sts);
        if let Some(&d) = mx.by_host.get(&key) {
            return d;
        }
        let mut name = format!("{}[{}]:{}", host.name, addr.ip(), addr.port());
        if let Some(o) = group.and_then(|g| self.config.limit_overrides.get(g)) {
            name = format!("{name} for @{}", o.pattern);
        }
        if let Some(sts) = host.mta_sts {
            name = format!("{name} under MTA-STS {}", sts.as_str());
        }
        let target = Target {
            name,
            host: host.name.clone(),
            addrs: vec![addr],
            implicit_tls: false,
        };
        let d = self.add_destination(target, group);
        if let Some(sts) = host.mta_sts {
            let dest = &mut self.destinations[d];
            dest.tls = dest.tls.clone().under_mta_sts(sts, &host.name);
        }
        self.mx
            .as_mut()
            .expect("MX routing is on")
            .by_host
            .insert(key, d);
        d
    }

    /// Adds a destination to the table (static targets at start, MX hosts as they appear), with
    /// the limits of its host and of its recipient-domain override group, if any.
    pub(super) fn add_destination(&mut self, target: Target, group: Option<usize>) -> usize {
        let limits = self.config.limits_for(&target.host, group);
        let metrics = self
            .shared
            .registry
            .destination(&Arc::from(target.name.as_str()));
        let tls = crate::engine::tls::DestinationTls::decide(
            &self.config,
            &self.session_config,
            &target,
            group,
            &self.tls,
        );
        let mut shaper = Shaper::new(limits, &self.config.adaptive);
        if let Some(limiter) = &self.config.shared_limits {
            shaper.share(limiter.as_ref(), &target.name);
        }
        let dest = Destination::new(target, shaper, metrics, tls);
        self.destinations.push(dest);
        self.is_dirty.push(false);
        self.waiting_slot.push(false);
        self.destinations.len() - 1
    }

    /// The first candidate at or after `from` that is not marked dead.
    pub(super) fn live_candidate(
        &self,
        route: &MxRoute,
        from: usize,
        now: Instant,
    ) -> Option<usize> {
        (from..route.candidates.len())
            .find(|&i| !self.destinations[route.candidates[i]].shaper.is_dead(now))
    }

    /// Moves an MX job to its next live exchanger; gives it back when there is none.
    pub(super) fn next_exchanger(&mut self, mut job: Job, now: Instant) -> Result<(), Job> {
        let Some(mx) = job.mx.as_mut() else {
            return Err(job);
        };
        let Some(route) = mx.route.clone() else {
            return Err(job);
        };
        match self.live_candidate(&route, mx.candidate + 1, now) {
            Some(i) => {
                mx.candidate = i;
                job.destination = route.candidates[i];
                let d = job.destination;
                self.destinations[d].push_back(job);
                self.mark_dirty(d);
                Ok(())
            }
            None => Err(job),
        }
    }

    /// Queues `recipients` of `domain` at the first exchanger of `route`.
    fn enqueue_on_route(
        &mut self,
        envelope: &Arc<Envelope>,
        domain: &Arc<str>,
        route: &Arc<MxRoute>,
        recipients: Vec<Address>,
        attempts: u32,
        now: Instant,
    ) {
        let mx_job = MxJob {
            domain: Arc::clone(domain),
            route: Some(Arc::clone(route)),
            candidate: 0,
        };
        self.enqueue_split(
            envelope,
            recipients,
            route.candidates[0],
            attempts,
            Some(mx_job),
            now,
        );
    }

    /// A job due for retry: MX jobs are routed again, through the domain's current route
    /// (which lives no longer than its DNS answer) or a new lookup, and start from its most
    /// preferred exchanger; never through the route stored in the job, which may be stale.
    pub(super) fn retry_mx(&mut self, job: Job, now: Instant) -> Option<Job> {
        let Some(mx) = job.mx.as_ref() else {
            return Some(job);
        };
        let domain = Arc::clone(&mx.domain);
        let envelope = Arc::clone(&job.envelope);
        let (choice, recipients) =
            self.route_mx(&envelope, &domain, job.recipients, job.attempts, now);
        if let MxChoice::Ready(route) = choice {
            self.enqueue_on_route(&envelope, &domain, &route, recipients, job.attempts, now);
        }
        None
    }
}

/// Gives an MX job its own order of the domain's equal-preference exchangers, so that one
/// domain's transactions (and connections) are spread over them (RFC 5321 5.1).
pub(super) fn spread_over_equal_exchangers(job: &mut Job) {
    let Some(mx) = job.mx.as_mut() else {
        return;
    };
    let Some(route) = mx.route.as_ref() else {
        return;
    };
    if mx.candidate != 0 {
        return;
    }
    let spread = route.spread();
    job.destination = spread.candidates[0];
    mx.route = Some(spread);
}
