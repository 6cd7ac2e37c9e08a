//! The event loop: one thread, one `mio::Poll`, thousands of connections.
//!
//! Each turn: wait for sockets, the waker or the next deadline; feed readable sockets to their
//! sessions; take new submissions from the ingress; fire due timers and retries; then hand queued
//! jobs to connections that can take them, opening new connections within each destination's
//! limit. Outcomes become events and counters here. Nothing in the loop blocks: name resolution
//! happened before it started, and a full event channel is impossible (it is unbounded; the
//! ingress bound limits what is in flight).

use super::classify::Category;
mod abandon;
mod envelopes;
mod mx;
mod pace;

use super::conn::{Conn, ReadOutcome};
use super::metrics::DestinationMetrics;
use super::orders::LoopOrders;
use super::pool::{ConnRef, Destination};
use super::tls::{server_name, TlsConfigs, TlsPolicy};
use super::{Config, Event, EventKind, Shared, TlsUse};
use crate::error::Result;
use crate::message::Address;
use crate::queue::{Envelope, Ingress, Job, MxJob, RetrySchedule, Submission};
use crate::route::mx::MxResolver;
use crate::route::Target;
use crate::smtp::{
    EnhancedCode, RcptResult, Reply, Session, SessionConfig, SessionEvent, StartTls, Transaction,
};
use crossbeam_channel::Receiver;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const WAKER: Token = Token(usize::MAX);
const READ_BUFFER: usize = 64 * 1024;
/// Submissions taken from the ingress in one turn of the loop at most, and for at most
/// `SUBMISSION_TIME_PER_TURN` (checked every 64): a turn with few sockets to serve takes
/// a big slice, a busy one a small slice.
const SUBMISSIONS_PER_TURN: usize = 4096;
const SUBMISSION_TIME_PER_TURN: Duration = Duration::from_millis(2);
/// Connections opened per turn at most. A connect on loopback runs the whole handshake inside
/// the syscall; thousands of new destinations at once would otherwise hold the loop for
/// a tenth of a second. The rest are opened on the next turns, which come at once.
const CONNECTS_PER_TURN: usize = 128;
const EVENTS_PER_TURN: usize = 256;
/// Resolver answers taken per turn at most (each may release many recipients).
pub(super) const RESOLUTIONS_PER_TURN: usize = 256;
/// How long a destination whose opportunistic TLS handshake failed (not its certificate
/// check) is sent to in plaintext.
const PLAINTEXT_AFTER_TLS_FAILURE: Duration = Duration::from_secs(3600);

/// Starts loop number `index`; returns its ingress and thread.
pub(super) fn spawn(
    index: usize,
    config: Arc<Config>,
    shared: Arc<Shared>,
    tls: TlsConfigs,
) -> Result<(Arc<Ingress>, JoinHandle<()>)> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let (ingress, receiver) = Ingress::new(config.queue_capacity, Arc::clone(&waker));
    let ingress = Arc::new(ingress);
    let resolver = match &config.mx {
        Some(mx) => Some(MxResolver::start_with_https(
            mx.clone(),
            Arc::clone(&waker),
            Arc::clone(&tls.verifying),
        )?),
        None => None,
    };
    let mut reactor = Reactor::new(poll, receiver, Arc::clone(&ingress), config, shared, tls);
    if let Some((resolver, answers)) = resolver {
        // DNS failures are accounted to a destination that is never connected to.
        let d = reactor.add_destination(
            Target {
                name: "(dns)".into(),
                host: String::new(),
                addrs: Vec::new(),
                implicit_tls: false,
            },
            None,
        );
        let capacity = reactor.config.mx.as_ref().map_or(0, |m| m.cache_capacity);
        reactor.mx = Some(mx::MxState::new(resolver, answers, d, capacity));
    }
    let thread = std::thread::Builder::new()
        .name(format!("mxpipe-loop-{index}"))
        .spawn(move || reactor.run())?;
    Ok((ingress, thread))
}

struct Reactor {
    poll: Poll,
    receiver: Receiver<Submission>,
    ingress: Arc<Ingress>,
    config: Arc<Config>,
    session_config: Arc<SessionConfig>,
    shared: Arc<Shared>,
    destinations: Vec<Destination>,
    conns: Slab<Conn>,
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    /// Destinations held back by a rate limit or a pause, and when to look again.
    wakes: BinaryHeap<Reverse<(Instant, usize)>>,
    retries: RetrySchedule,
    read_buf: Box<[u8]>,
    /// Transactions a session finished, by tag, while `drive` handles them (kept for its
    /// capacity).
    done: Vec<(u64, Vec<RcptResult>)>,
    /// Destinations with queued work to hand out this turn.
    /// First in, first out: when a turn's budget runs out, the rest wait their turn.
    dirty: std::collections::VecDeque<usize>,
    is_dirty: Vec<bool>,
    /// Recipients this loop holds (queued, in flight, waiting to retry).
    held: usize,
    /// A queue administrator's orders (retry now, delete).
    orders: LoopOrders,
    next_tag: u64,
    next_generation: u64,
    /// Counters changed this turn: waiters may need waking.
    changed: bool,
    stop_by: Option<Instant>,
    tls: TlsConfigs,
    mx: Option<mx::MxState>,
    /// Round-robin position in the source addresses.
    next_source: usize,
    /// Submissions were left in the ingress for the next turn.
    backlog: bool,
    /// A per-turn budget ran out with work left (connections to open, resolver answers): the
    /// next turn comes without waiting.
    pub(super) more_work: bool,
    /// Destinations waiting for a connection slot (the loop is at `max_connections`), in
    /// the order they asked: first come, first served, so none starves.
    slot_waiters: std::collections::VecDeque<usize>,
    waiting_slot: Vec<bool>,
    /// Connections that went idle, oldest first: reclaimed for waiting destinations.
    idle: std::collections::VecDeque<ConnRef>,
    /// A static destination's copy for the recipients of a domain override's group, by
    /// (destination, override index).
    grouped: HashMap<(usize, usize), usize>,
    /// Some override is for recipient domains (`Config::has_domain_overrides`, read once).
    domain_overrides: bool,
    /// This turn's deferrals and final outcomes for the custody (`Config::custody`), if any.
    outcomes: super::custody::Outcomes,
    /// The last reply classified and its category: the recipients of a failed connection
    /// or transaction share one reply, classified once instead of once per recipient.
    last_category: Option<(Arc<Reply>, Category)>,
    /// The destination of outcomes decided without an attempt (empty), shared by their events.
    no_destination: Arc<str>,
    /// Waits for a reader that falls behind the events (see [`pace`]).
    pace: pace::EventPace,
    /// Envelopes of finished messages, reused for new submissions.
    envelopes: envelopes::EnvelopePool,
    /// The last transaction's shared reply (see `on_transaction`).
    last_reply: Option<Arc<Reply>>,
}

/// Where a connection event came from, decoded from the mio event.
struct Readiness {
    readable: bool,
    /// The peer's FIN is in: reads go on to it even after a short one.
    read_closed: bool,
    writable: bool,
    error: bool,
}

impl Reactor {
    fn new(
        poll: Poll,
        receiver: Receiver<Submission>,
        ingress: Arc<Ingress>,
        config: Arc<Config>,
        shared: Arc<Shared>,
        tls: TlsConfigs,
    ) -> Self {
        let targets: Vec<Target> = config.routes.targets().to_vec();
        let domain_overrides = config.has_domain_overrides();
        let mut reactor = Reactor {
            poll,
            receiver,
            ingress,
            session_config: Arc::new(config.session.clone()),
            config,
            shared,
            destinations: Vec::new(),
            conns: Slab::with_capacity(1024),
            timers: BinaryHeap::new(),
            wakes: BinaryHeap::new(),
            retries: RetrySchedule::default(),
            read_buf: vec![0u8; READ_BUFFER].into_boxed_slice(),
            done: Vec::new(),
            dirty: std::collections::VecDeque::new(),
            is_dirty: Vec::new(),
            held: 0,
            last_category: None,
            no_destination: Arc::from(""),
            pace: pace::EventPace::default(),
            envelopes: envelopes::EnvelopePool::new(),
            last_reply: None,
            next_tag: 1,
            next_generation: 1,
            changed: false,
            stop_by: None,
            tls,
            mx: None,
            next_source: 0,
            backlog: false,
            more_work: false,
            slot_waiters: std::collections::VecDeque::new(),
            waiting_slot: Vec::new(),
            idle: std::collections::VecDeque::new(),
            grouped: HashMap::new(),
            domain_overrides,
            outcomes: Default::default(),
            orders: LoopOrders::default(),
        };
        for target in targets {
            reactor.add_destination(target, None);
        }
        reactor
    }

    fn run(&mut self) {
        // Events handled per turn at most: the rest stay ready for the next turn, so that one
        // turn (each event may mean a read, a parse and a write) stays short.
        let mut events = Events::with_capacity(EVENTS_PER_TURN);
        loop {
            let timeout = self.next_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                // The poller itself failed: nothing more can be sent from this loop.
                break;
            }
            let now = Instant::now();
            for event in events.iter() {
                if event.token() == WAKER {
                    continue;
                }
                let readiness = Readiness {
                    readable: event.is_readable() || event.is_read_closed(),
                    read_closed: event.is_read_closed(),
                    writable: event.is_writable() || event.is_write_closed(),
                    error: event.is_error(),
                };
                self.on_socket(event.token().0, readiness, now);
            }
            self.more_work = false;
            self.take_submissions(now);
            if self
                .orders
                .apply(&self.shared.orders, &mut self.retries, now)
            {
                // A retry ordered by hand: held-back destinations may try again at once (a
                // rate limit holds them back again when they do).
                for d in &mut self.destinations {
                    d.shaper.forget_failures();
                    d.wake_at = None;
                }
            }
            self.take_resolutions(now);
            self.on_timers(now);
            self.on_wakes(now);
            self.on_retries(now);
            self.dispatch(now);
            self.send_resolutions();
            self.report_outcomes();
            let turn = now.elapsed().as_micros() as u64;
            self.shared
                .stats
                .longest_turn_us
                .fetch_max(turn, Ordering::Relaxed);
            if self.changed {
                self.changed = false;
                // Waiters only care about reaching zero; waking them on every turn would cost
                // a futex call and a context switch per turn.
                let stats = &self.shared.stats;
                if stats.active.load(Ordering::Acquire) == 0
                    || stats.unfinished.load(Ordering::Acquire) == 0
                {
                    self.shared.notify();
                }
            }
            if self.shared.abandon.load(Ordering::Acquire) {
                self.abandon_all(now);
                break;
            }
            if self.shared.shutting_down.load(Ordering::Acquire) {
                let stop_by = *self
                    .stop_by
                    .get_or_insert_with(|| now + self.config.session.timeouts.command);
                self.retire_all(now);
                if self.conns.is_empty() || now >= stop_by {
                    break;
                }
            }
        }
        self.report_outcomes();
        self.shared
            .stats
            .connections_open
            .fetch_sub(self.conns.len() as u64, Ordering::Relaxed);
    }

    /// Hands the turn's outcomes to the custody in one batch.
    fn report_outcomes(&mut self) {
        if let Some(custody) = &self.config.custody {
            self.outcomes.report(custody.as_ref());
        }
    }

    /// Notes an outcome for the custody, when there is one; `failure`: the last reply and
    /// destination of a recipient that bounced or expired.
    fn custody_outcome(
        &mut self,
        envelope: &Arc<Envelope>,
        recipient: &Address,
        kind: EventKind,
        attempts: u32,
        retry_at: Option<std::time::SystemTime>,
        failure: Option<(&Arc<Reply>, &Arc<str>)>,
    ) {
        if let Some(custody) = &self.config.custody {
            let deleted = self.orders.is_deleted(envelope.id);
            let failure = failure
                .filter(|_| custody.wants_failures() && !deleted)
                .map(|(reply, destination)| {
                    Box::new(super::custody::Failure {
                        envelope: Arc::clone(envelope),
                        reply: Arc::clone(reply),
                        destination: Arc::clone(destination),
                    })
                });
            let outcome =
                self.outcomes
                    .note(envelope.id, recipient, kind, attempts, retry_at, failure);
            if outcome.failure.is_some() {
                custody.decided(outcome, recipient.as_str());
            }
        }
    }

    fn next_timeout(&self) -> Option<Duration> {
        let next = [
            self.timers.peek().map(|Reverse((t, _, _))| *t),
            self.wakes.peek().map(|Reverse((t, _))| *t),
            self.retries.next_due(),
        ]
        .into_iter()
        .flatten()
        .min();
        let mut timeout = next.map(|t| t.saturating_duration_since(Instant::now()));
        if self.stop_by.is_some() {
            timeout = Some(timeout.map_or(Duration::from_millis(20), |t| {
                t.min(Duration::from_millis(20))
            }));
        }
        if self.backlog || self.more_work {
            return Some(Duration::ZERO);
        }
        // Submissions held back by the recipient bound are retried on every turn.
        if self.held >= self.config.max_queued_recipients && !self.receiver.is_empty() {
            timeout = Some(timeout.map_or(Duration::from_millis(10), |t| {
                t.min(Duration::from_millis(10))
            }));
        }
        timeout
    }

    // ----- submissions -------------------------------------------------------------------

    fn take_submissions(&mut self, now: Instant) {
        self.ingress.clear_wake();
        self.backlog = false;
        let started = Instant::now();
        for taken in 0.. {
            // A burst of submissions is taken in slices, so that sockets are served between
            // them: no turn of the loop runs long.
            let out_of_time = taken % 64 == 63 && started.elapsed() >= SUBMISSION_TIME_PER_TURN;
            if taken == SUBMISSIONS_PER_TURN || out_of_time {
                self.backlog = !self.receiver.is_empty();
                if self.backlog {
                    // The next turn comes at once (see next_timeout): waking for more is
                    // useless. Not when the queue is empty, or a submission could wait for
                    // the next deadline.
                    self.ingress.expect_next_turn();
                }
                break;
            }
            // At the bound, one more message is still taken when everything held is only
            // waiting for a retry: otherwise the queue behind could wait days (and flush()
            // with it) for work that is not in progress.
            let working = self.held - self.retries.recipients();
            if self.held >= self.config.max_queued_recipients && working > 0 {
                if !self.receiver.is_empty() {
                    // Retried on every turn (see next_timeout): waking for more is useless.
                    self.ingress.expect_next_turn();
                }
                break;
            }
            match self.receiver.try_recv() {
                Ok(submission) => self.accept(submission, now),
                Err(_) => break,
            }
        }
    }

    fn accept(&mut self, submission: Submission, now: Instant) {
        let Submission {
            id,
            message,
            resumed,
        } = submission;
        let (attempts, submitted) = resumed.map_or((0, now), |r| (r.attempts, r.submitted));
        let envelope = self.envelopes.make(Envelope {
            id,
            sender: message.sender,
            body: message.body,
            submitted,
            tag: message.tag,
            dsn: message.dsn,
        });
        self.held += message.recipients.len();
        let config = Arc::clone(&self.config);
        let routes = &config.routes;
        if routes.is_single_target() && !self.domain_overrides {
            if let Some(destination) = routes.lookup("") {
                self.enqueue_split(
                    &envelope,
                    message.recipients,
                    destination,
                    attempts,
                    None,
                    now,
                );
                return;
            }
        }
        // Static routes first; then MX; recipients sharing a destination (and, for MX, the
        // same list of exchangers) share a transaction.
        let mut groups: Vec<(usize, Option<MxJob>, Vec<Address>)> = Vec::new();
        let mut by_domain: Vec<(String, Vec<Address>)> = Vec::new();
        for recipient in message.recipients {
            if let Some(d) = routes.lookup(recipient.domain()) {
                let group = if self.domain_overrides {
                    config.domain_group(recipient.domain())
                } else {
                    None
                };
                let d = match group {
                    Some(group) => self.grouped_destination(d, group),
                    None => d,
                };
                match groups.iter_mut().find(|(g, mx, _)| *g == d && mx.is_none()) {
                    Some((_, _, list)) => list.push(recipient),
                    None => groups.push((d, None, vec![recipient])),
                }
                continue;
            }
            if self.mx.is_some() {
                let domain = recipient.domain().to_ascii_lowercase();
                match by_domain.iter_mut().find(|(d, _)| *d == domain) {
                    Some((_, list)) => list.push(recipient),
                    None => by_domain.push((domain, vec![recipient])),
                }
                continue;
            }
            let reply = Arc::new(Reply::new(
                0,
                Some(EnhancedCode::new(5, 4, 4)),
                format!("no route to domain {}", recipient.domain()),
            ));
            self.finish_recipient(
                EventKind::Bounced,
                &envelope,
                recipient,
                reply,
                None,
                0,
                now,
            );
        }
        for (domain, list) in by_domain {
            let (choice, list) = self.route_mx(&envelope, &domain, list, attempts, now);
            if let mx::MxChoice::Ready(route) = choice {
                let same = groups.iter_mut().find(|(_, mx, _)| {
                    mx.as_ref()
                        .and_then(|m| m.route.as_ref())
                        .is_some_and(|r| r.candidates == route.candidates)
                });
                match same {
                    Some((_, _, existing)) => existing.extend(list),
                    None => {
                        let mx_job = MxJob {
                            domain: Arc::from(domain.as_str()),
                            route: Some(Arc::clone(&route)),
                            candidate: 0,
                        };
                        groups.push((route.candidates[0], Some(mx_job), list));
                    }
                }
            }
        }
        for (destination, mx_job, list) in groups {
            self.enqueue_split(&envelope, list, destination, attempts, mx_job, now);
        }
    }

    /// Static destination `d` for the recipients of domain override `group`: a destination
    /// of its own (same host, own connections and limits), made on first use.
    fn grouped_destination(&mut self, d: usize, group: usize) -> usize {
        if let Some(&g) = self.grouped.get(&(d, group)) {
            return g;
        }
        let mut target = self.destinations[d].target.clone();
        let pattern = &self.config.limit_overrides[group].pattern;
        target.name = format!("{} for @{pattern}", target.name);
        let g = self.add_destination(target, Some(group));
        self.grouped.insert((d, group), g);
        g
    }

    fn enqueue_split(
        &mut self,
        envelope: &Arc<Envelope>,
        recipients: Vec<Address>,
        destination: usize,
        attempts: u32,
        mx_job: Option<MxJob>,
        now: Instant,
    ) {
        let max = self.destinations[destination]
            .shaper
            .limits
            .max_recipients_per_transaction;
        if recipients.len() <= max {
            let mut job = Job {
                envelope: Arc::clone(envelope),
                recipients,
                destination,
                attempts,
                mx: mx_job,
            };
            mx::spread_over_equal_exchangers(&mut job);
            return self.enqueue(job, now);
        }
        for piece in crate::queue::split_recipients(recipients, max) {
            let mut job = Job {
                envelope: Arc::clone(envelope),
                recipients: piece,
                destination,
                attempts,
                mx: mx_job.clone(),
            };
            mx::spread_over_equal_exchangers(&mut job);
            self.enqueue(job, now);
        }
    }

    /// Queues a job for its destination; a dead destination defers it until it may be tried
    /// again, without a connection attempt.
    fn enqueue(&mut self, job: Job, now: Instant) {
        let d = job.destination;
        if let Some(until) = self.destinations[d].shaper.dead_until.filter(|&t| t > now) {
            // Another exchanger of the domain may be alive.
            let Err(job) = self.next_exchanger(job, now) else {
                return;
            };
            let dest = &self.destinations[d];
            let dead = format!(
                "destination marked dead after repeated connection failures; next try in {:?}",
                until - now
            );
            let reply = Arc::new(match &dest.dead_because {
                Some(cause) => Reply::new(
                    cause.code,
                    cause.enhanced,
                    format!("{} ({dead})", cause.text),
                ),
                None => Reply::new(
                    0,
                    Some(EnhancedCode::new(4, 4, 1)),
                    format!("{}: {dead}", dest.name),
                ),
            });
            // One reply for the job's recipients: their events share it.
            let failures = job
                .recipients
                .into_iter()
                .map(|r| (r, Arc::clone(&reply)))
                .collect();
            let due = until + self.config.retry.delay(1).mul_f64(0.1);
            self.defer_until(&job.envelope, failures, d, job.attempts, job.mx, due, now);
            return;
        }
        self.destinations[d].push_back(job);
        self.mark_dirty(d);
    }

    /// The next job for a connection of destination `d`, if the shaper lets one go now.
    fn take_job(&mut self, d: usize, now: Instant) -> Option<Job> {
        let dest = &mut self.destinations[d];
        if dest.queue.is_empty() || dest.wake_at.is_some() {
            return None;
        }
        if let Some(at) = dest.shaper.take_message(now) {
            self.hold(d, at);
            return None;
        }
        dest.pop_front()
    }

    /// Holds destination `d` back until `at` (a rate limit, a pause, a dead period).
    fn hold(&mut self, d: usize, at: Instant) {
        let dest = &mut self.destinations[d];
        if dest.wake_at.is_none_or(|w| at < w) {
            dest.wake_at = Some(at);
            self.wakes.push(Reverse((at, d)));
        }
    }

    fn mark_dirty(&mut self, d: usize) {
        if !self.is_dirty[d] {
            self.is_dirty[d] = true;
            self.dirty.push_back(d);
        }
    }

    // ----- scheduling --------------------------------------------------------------------

    /// Hands queued jobs to connections that can take them; opens connections for the rest.
    fn dispatch(&mut self, now: Instant) {
        let mut connects = 0;
        while let Some(d) = self.dirty.pop_front() {
            self.is_dirty[d] = false;
            if self.stop_by.is_some() {
                continue;
            }
            if self.destinations[d].wake_at.is_some() {
                // Work queued while paused (retries, new submissions) must wake it at its
                // maximum age at the latest.
                self.hold_if_paused(d, now);
                continue;
            }
            while !self.destinations[d].queue.is_empty() && self.destinations[d].wake_at.is_none() {
                let Some(conn) = self.destinations[d].ready.pop() else {
                    break;
                };
                let usable = self.conns.get_mut(conn.token).is_some_and(|c| {
                    c.this == conn && {
                        c.listed = false;
                        !c.retiring && c.session.as_ref().is_some_and(Session::can_accept)
                    }
                });
                if usable {
                    self.drive(conn.token, now);
                }
            }
            // Held by a rate limit (or a pause): the connections it has are waiting for the
            // limiter, and more would only wait beside them.
            if self.destinations[d].wake_at.is_some() {
                continue;
            }
            // No more connections than the rate limits would let messages go now: under a
            // slow limit, a connection per message allowed, not a window's worth waiting.
            let allowed = self.destinations[d].shaper.messages_available(now);
            let wanted = self.destinations[d].connections_wanted();
            if wanted > 0 && allowed == 0 && self.destinations[d].open == 0 {
                // Nothing left to wake it when the limiter allows the next message: a hold.
                if let Some(at) = self.destinations[d].shaper.next_message_at(now) {
                    self.hold(d, at);
                }
                continue;
            }
            for _ in 0..wanted.min(allowed) {
                if connects == CONNECTS_PER_TURN {
                    self.mark_dirty(d);
                    self.more_work = true;
                    return;
                }
                if self.conns.len() >= self.config.max_connections {
                    self.wait_for_slot(d, now);
                    break;
                }
                if let Some(at) = self.destinations[d].shaper.take_connection(now) {
                    self.hold(d, at);
                    break;
                }
                let open = self.destinations[d].open;
                if let Some(at) = self.destinations[d].shaper.take_connection_lease(now, open) {
                    // No lease of the shared limit free: the destination's own connections
                    // bring it back here as they finish work; without any, a hold does.
                    if open == 0 {
                        self.hold(d, at);
                    }
                    break;
                }
                self.open(d, now);
                connects += 1;
            }
        }
    }

    /// Queues `d` for the next free connection slot, and frees one by retiring the
    /// longest-idle connection, if any.
    fn wait_for_slot(&mut self, d: usize, now: Instant) {
        if !self.waiting_slot[d] {
            self.waiting_slot[d] = true;
            self.slot_waiters.push_back(d);
        }
        while let Some(conn) = self.idle.pop_front() {
            let reclaimable = self.conns.get_mut(conn.token).is_some_and(|c| {
                c.this == conn && !c.retiring && c.session.as_ref().is_some_and(Session::is_idle)
            });
            if reclaimable {
                self.conns[conn.token].retiring = true;
                self.drive(conn.token, now);
                return;
            }
        }
    }

    fn open(&mut self, d: usize, now: Instant) {
        let addr = self.destinations[d].address();
        let stream = match self.connect(addr) {
            Ok(s) => s,
            Err(e) => {
                self.destinations[d].rotate_address();
                let reply = connect_reply(&format!("connect to {addr} failed: {e}"));
                self.destination_failed(d, reply, now);
                return;
            }
        };
        let entry = self.conns.vacant_entry();
        let token = entry.key();
        let this = ConnRef {
            token,
            generation: self.next_generation,
        };
        self.next_generation += 1;
        let mut conn = Conn {
            stream,
            this,
            destination: d,
            session: None,
            connect_deadline: now + self.config.session.timeouts.connect,
            idle_since: None,
            scheduled: None,
            jobs: Vec::with_capacity(2),
            retiring: false,
            listed: false,
            established: false,
            tls: None,
            tls_ready: false,
            trace: self
                .config
                .trace
                .as_ref()
                .map(|t| t.connection(&addr.to_string())),
        };
        if let Err(e) = self.poll.registry().register(
            &mut conn.stream,
            Token(token),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            let reply = connect_reply(&format!("cannot register socket: {e}"));
            self.destination_failed(d, reply, now);
            return;
        }
        entry.insert(conn);
        let dest = &mut self.destinations[d];
        dest.open += 1;
        dest.connecting += 1;
        dest.metrics
            .connections_open
            .fetch_add(1, Ordering::Relaxed);
        let stats = &self.shared.stats;
        stats.connections_opened.fetch_add(1, Ordering::Relaxed);
        stats.connections_open.fetch_add(1, Ordering::Relaxed);
        self.schedule(token);
    }

    // ----- sockets -----------------------------------------------------------------------

    fn on_socket(&mut self, token: usize, readiness: Readiness, now: Instant) {
        let Some(conn) = self.conns.get_mut(token) else {
            return;
        };
        if conn.session.is_none() {
            if !(readiness.writable || readiness.error || readiness.readable) {
                return;
            }
            let failure = match conn.stream.take_error() {
                Ok(Some(e)) | Err(e) => Some(e.to_string()),
                Ok(None) => match conn.stream.peer_addr() {
                    Ok(_) => None,
                    // Not connected yet: a spurious wake-up.
                    Err(e) if e.kind() == std::io::ErrorKind::NotConnected => return,
                    Err(e) => Some(e.to_string()),
                },
            };
            if let Some(why) = failure {
                return self.connect_failed(token, &why, now);
            }
            // Commands are small and written in groups: Nagle would only add delay.
            let _ = conn.stream.set_nodelay(true);
            let d = conn.destination;
            let dest = &mut self.destinations[d];
            let mut session = Session::new(Arc::clone(&dest.tls.session), now);
            if dest.no_pipelined_bdat {
                session.forbid_pipelined_bdat();
            }
            dest.connecting -= 1;
            if dest.target.implicit_tls {
                session.set_implicit_tls(now);
                if self.verifies(d) {
                    session.set_certificate_verified();
                }
                match self.tls_client(d) {
                    Ok(tls) => self.conns[token].tls = Some(tls),
                    Err(why) => session.tls_failed(&why),
                }
            } else if dest.plaintext_until.is_some_and(|until| now < until) {
                session.forbid_starttls();
            }
            self.conns[token].session = Some(session);
        }
        if readiness.readable || readiness.error {
            let conn = self.conns.get_mut(token).expect("connection exists");
            let outcome = conn.read(&mut self.read_buf, readiness.read_closed, now);
            let d = conn.destination;
            let Some(session) = conn.session.as_mut() else {
                return;
            };
            match outcome {
                ReadOutcome::Drained => {}
                ReadOutcome::Closed => session.handle_close("connection closed by the server"),
                ReadOutcome::Failed(e) => session.handle_close(&e.to_string()),
                ReadOutcome::TlsFailed { why, certificate } => {
                    let dest = &mut self.destinations[d];
                    let opportunistic = !dest.target.implicit_tls
                        && dest.tls.session.starttls == StartTls::Opportunistic;
                    if !opportunistic {
                        session.tls_failed(&why);
                    } else if certificate {
                        // RFC 7435: the certificate check was asked for and failed; plaintext
                        // would be weaker still, so the mail waits.
                        session.tls_failed(&format!(
                            "{why} (opportunistic TLS with verification: deferred, not sent in plaintext)"
                        ));
                    } else {
                        // A handshake that cannot complete is not retried at once: the next
                        // connections to this destination go in plaintext for a while.
                        session.tls_failed(&format!(
                            "{why} (opportunistic TLS: the next connections go in plaintext for {}s)",
                            PLAINTEXT_AFTER_TLS_FAILURE.as_secs()
                        ));
                        dest.plaintext_until = Some(now + PLAINTEXT_AFTER_TLS_FAILURE);
                    }
                }
            }
        }
        self.drive(token, now);
    }

    fn connect_failed(&mut self, token: usize, why: &str, now: Instant) {
        let conn = self.remove(token);
        let d = conn.destination;
        let dest = &mut self.destinations[d];
        dest.connecting -= 1;
        let addr = dest.address();
        dest.rotate_address();
        let reply = connect_reply(&format!("connect to {addr} failed: {why}"));
        self.connection_failed(d, reply, now);
    }

    /// A connection to `d` failed before it could carry mail. With no other connection
    /// working, the destination's queued jobs are deferred; repeated failures mark it dead.
    fn connection_failed(&mut self, d: usize, reply: Reply, now: Instant) {
        let adaptive = self.config.adaptive;
        let dest = &mut self.destinations[d];
        let dead = dest.shaper.on_connection_failure(now, &adaptive);
        if dead {
            dest.dead_because = Some(reply.clone());
            if let Some(until) = dest.shaper.dead_until {
                self.hold(d, until);
            }
        }
        self.destinations[d].publish_shaping();
        if dead || self.destinations[d].established == 0 {
            self.destination_failed(d, reply, now);
        }
        self.mark_dirty(d);
    }

    /// Moves a connection's session forward: outcomes, new work, bytes out, timers.
    fn drive(&mut self, token: usize, now: Instant) {
        let stopping = self.stop_by.is_some();
        loop {
            // Kept between calls, so that finished transactions cost no allocation.
            let mut done = std::mem::take(&mut self.done);
            let mut closed = None;
            let mut start_tls = false;
            {
                let Some(conn) = self.conns.get_mut(token) else {
                    return;
                };
                let Some(session) = conn.session.as_mut() else {
                    return;
                };
                while let Some(event) = session.poll_event() {
                    match event {
                        SessionEvent::TransactionDone { tag, results } => done.push((tag, results)),
                        SessionEvent::StartTls => start_tls = true,
                        SessionEvent::Closed(closure) => closed = Some(closure),
                    }
                }
                if !conn.established && session.is_established() {
                    conn.established = true;
                    self.destinations[conn.destination].established += 1;
                }
            }
            if start_tls {
                let d = self.conns[token].destination;
                let tls = self.tls_client(d);
                let verifies = self.verifies(d);
                let conn = &mut self.conns[token];
                match tls {
                    Ok(tls) => {
                        conn.tls = Some(tls);
                        if let Some(session) = conn.session.as_mut().filter(|_| verifies) {
                            session.set_certificate_verified();
                        }
                    }
                    Err(why) => {
                        if let Some(session) = conn.session.as_mut() {
                            session.tls_failed(&why);
                        }
                        continue;
                    }
                }
            }
            let tls_use = (!done.is_empty()).then(|| self.tls_use(token));
            for (tag, mut results) in done.drain(..) {
                let job = self.conns[token].take_job(tag);
                if let Some(job) = job {
                    self.on_transaction(job, &mut results, tls_use, now);
                }
                if let Some(session) = self.conns[token].session.as_mut() {
                    session.recycle_results(results);
                }
            }
            self.done = done;
            if let Some(closure) = closed {
                let conn = self.remove(token);
                let d = conn.destination;
                if closure.pipelined_bdat_failed && !self.destinations[d].no_pipelined_bdat {
                    self.destinations[d].no_pipelined_bdat = true;
                    self.destinations[d]
                        .metrics
                        .bdat_fallbacks
                        .fetch_add(1, Ordering::Relaxed);
                }
                if !closure.graceful && self.is_throttle(&closure.reply) {
                    // The connection that got the throttle is gone already: the others
                    // are what the server accepts.
                    let open = self.destinations[d].open;
                    self.destinations[d].throttled(
                        now,
                        open,
                        &self.config.adaptive,
                        &closure.reply,
                    );
                    self.hold_if_paused(d, now);
                }
                if !closure.established {
                    let mut reply = closure.reply;
                    reply.text = format!("{}: {}", self.destinations[d].name, reply.text);
                    self.connection_failed(d, reply, now);
                }
                for (_, job) in conn.jobs {
                    self.destinations[d]
                        .metrics
                        .in_flight
                        .fetch_sub(job.recipients.len() as u64, Ordering::Relaxed);
                    self.requeue(job);
                }
                self.mark_dirty(d);
                return;
            }
            // Feed the session while it can take a transaction.
            let conn = &self.conns[token];
            let session = conn.session.as_ref().expect("session exists");
            let d = conn.destination;
            let max_messages = self.destinations[d]
                .shaper
                .limits
                .max_messages_per_connection;
            let wants_job = !conn.retiring && !stopping && session.can_accept();
            let job = if wants_job && session.transactions_started() < max_messages {
                self.take_job(d, now)
            } else {
                None
            };
            let conn = self.conns.get_mut(token).expect("connection exists");
            let session = conn.session.as_mut().expect("session exists");
            if wants_job {
                if session.transactions_started() >= max_messages {
                    conn.retiring = true;
                } else if let Some(job) = job {
                    let tag = self.next_tag;
                    self.next_tag += 1;
                    let mut recipients = session.recipient_buffer();
                    recipients.extend_from_slice(&job.recipients);
                    let txn = Transaction {
                        tag,
                        sender: job.envelope.sender.clone(),
                        recipients,
                        body: Arc::clone(&job.envelope.body),
                        dsn: job.envelope.dsn.clone(),
                    };
                    self.destinations[d]
                        .metrics
                        .in_flight
                        .fetch_add(job.recipients.len() as u64, Ordering::Relaxed);
                    conn.jobs.push((tag, job));
                    conn.idle_since = None;
                    session.start_transaction(txn, now);
                    continue;
                }
            }
            // Other destinations wait for a connection slot: an idle connection with nothing
            // queued for it gives its slot up at once.
            let slot_wanted =
                !self.slot_waiters.is_empty() && self.destinations[d].queue.is_empty();
            if session.is_idle() && (conn.retiring || stopping || slot_wanted) {
                conn.retiring = true;
                session.quit(now);
            }
            if let Err(e) = conn.flush() {
                if let Some(session) = conn.session.as_mut() {
                    session.handle_close(&format!("write failed: {e}"));
                }
                continue;
            }
            break;
        }
        let conn = self.conns.get_mut(token).expect("connection exists");
        let session = conn.session.as_ref().expect("session exists");
        if session.is_idle() && conn.idle_since.is_none() {
            conn.idle_since = Some(now);
            if !conn.retiring {
                self.idle.push_back(conn.this);
            }
        }
        if session.can_accept() && !conn.retiring && !conn.listed {
            conn.listed = true;
            let this = conn.this;
            let d = conn.destination;
            self.destinations[d].ready.push(this);
            if !self.destinations[d].queue.is_empty() && self.destinations[d].wake_at.is_none() {
                self.mark_dirty(d);
            }
        }
        self.schedule(token);
        // Stale idle entries (connections busy again or gone) are dropped now and then, so
        // the list stays proportional to the connections.
        if self.idle.len() > 2 * self.conns.len() + 64 {
            let conns = &self.conns;
            self.idle.retain(|c| {
                conns.get(c.token).is_some_and(|x| {
                    x.this == *c && x.session.as_ref().is_some_and(Session::is_idle)
                })
            });
        }
    }

    /// Starts a non-blocking connect, from the next configured source address of the same
    /// family when there are any.
    fn connect(&mut self, addr: SocketAddr) -> std::io::Result<mio::net::TcpStream> {
        let sources: Vec<std::net::IpAddr> = self
            .config
            .source_addresses
            .iter()
            .copied()
            .filter(|ip| ip.is_ipv4() == addr.is_ipv4())
            .collect();
        if sources.is_empty() {
            return mio::net::TcpStream::connect(addr);
        }
        let source = sources[self.next_source % sources.len()];
        self.next_source = self.next_source.wrapping_add(1);
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_nonblocking(true)?;
        socket.bind(&SocketAddr::new(source, 0).into())?;
        match socket.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        Ok(mio::net::TcpStream::from_std(socket.into()))
    }

    /// Whether TLS to destination `d` verifies the certificate (see `DestinationTls::decide`).
    fn verifies(&self, d: usize) -> bool {
        self.destinations[d].tls.verify
    }

    /// A TLS client for a new handshake with destination `d`.
    fn tls_client(&self, d: usize) -> std::result::Result<rustls::ClientConnection, String> {
        let tls = &self.destinations[d].tls;
        let config = match (tls.verify, tls.ca) {
            (false, _) => &self.tls.encrypt_only,
            (true, None) => &self.tls.verifying,
            (true, Some(i)) => &self.tls.with_ca[i].1,
        };
        let name = server_name(&tls.name)
            .ok_or_else(|| format!("{:?} is not a valid TLS server name", tls.name))?;
        rustls::ClientConnection::new(Arc::clone(config), name).map_err(|e| e.to_string())
    }

    /// Takes a connection out of every table and closes its socket.
    fn remove(&mut self, token: usize) -> Conn {
        let mut conn = self.conns.remove(token);
        let _ = self.poll.registry().deregister(&mut conn.stream);
        let dest = &mut self.destinations[conn.destination];
        dest.open -= 1;
        dest.shaper.connection_closed(dest.open);
        dest.metrics
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
        if conn.established {
            dest.established -= 1;
        }
        self.shared
            .stats
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
        // The freed slot goes to the first waiting destination that still has work.
        while let Some(waiter) = self.slot_waiters.pop_front() {
            self.waiting_slot[waiter] = false;
            if !self.destinations[waiter].queue.is_empty() {
                self.mark_dirty(waiter);
                break;
            }
        }
        conn
    }

    fn retire_all(&mut self, now: Instant) {
        let tokens: Vec<usize> = self.conns.iter().map(|(t, _)| t).collect();
        for token in tokens {
            let conn = &mut self.conns[token];
            if conn.retiring {
                continue;
            }
            conn.retiring = true;
            if conn.session.is_none() {
                let conn = self.remove(token);
                self.destinations[conn.destination].connecting -= 1;
                continue;
            }
            self.drive(token, now);
        }
    }

    // ----- time --------------------------------------------------------------------------

    fn schedule(&mut self, token: usize) {
        let idle = self.config.idle_timeout;
        let Some(conn) = self.conns.get_mut(token) else {
            return;
        };
        if let Some(deadline) = conn.deadline(idle) {
            if conn.scheduled.is_none_or(|s| deadline < s) {
                conn.scheduled = Some(deadline);
                self.timers
                    .push(Reverse((deadline, token, conn.this.generation)));
            }
        }
    }

    fn on_timers(&mut self, now: Instant) {
        let idle = self.config.idle_timeout;
        while let Some(&Reverse((at, token, generation))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(conn) = self.conns.get_mut(token) else {
                continue;
            };
            if conn.this.generation != generation {
                continue;
            }
            conn.scheduled = None;
            match conn.deadline(idle) {
                Some(d) if d <= now => {}
                _ => {
                    self.schedule(token);
                    continue;
                }
            }
            match conn.session.as_mut() {
                None => {
                    let limit = self.config.session.timeouts.connect;
                    self.connect_failed(token, &format!("timed out after {limit:?}"), now);
                    continue;
                }
                Some(session) => {
                    if session.deadline().is_some() {
                        session.handle_timeout(now);
                    } else {
                        let dest = &self.destinations[conn.destination];
                        // Idle only because a rate limit holds work back a moment: the
                        // connection is still wanted, and closing it would mean opening another.
                        let rate_held = !idle.is_zero()
                            && !dest.queue.is_empty()
                            && dest.wake_at.is_some_and(|w| w <= now + idle);
                        if rate_held {
                            conn.idle_since = Some(now);
                            self.schedule(token);
                            continue;
                        }
                        // Idle for too long: retire politely.
                        conn.retiring = true;
                    }
                }
            }
            self.drive(token, now);
        }
    }

    fn on_wakes(&mut self, now: Instant) {
        while let Some(&Reverse((at, d))) = self.wakes.peek() {
            if at > now {
                break;
            }
            self.wakes.pop();
            let dest = &mut self.destinations[d];
            if dest.wake_at.is_some_and(|w| w <= now) {
                dest.wake_at = None;
                if self.paused_until(d, now).is_some() {
                    self.expire_while_paused(d, now);
                } else {
                    self.mark_dirty(d);
                }
            }
        }
    }

    fn on_retries(&mut self, now: Instant) {
        while let Some(job) = self.retries.pop_due(now) {
            self.shared
                .stats
                .active
                .fetch_add(job.recipients.len() as u64, Ordering::AcqRel);
            if let Some((kind, reply)) = self.orders.deleted(&job) {
                let reply = Arc::new(reply);
                for recipient in job.recipients {
                    let (reply, envelope) = (Arc::clone(&reply), &job.envelope);
                    self.finish_recipient_over(
                        kind,
                        envelope,
                        recipient,
                        reply,
                        None,
                        job.attempts,
                        None,
                        now,
                    );
                }
                continue;
            }
            if let Some(job) = self.retry_mx(job, now) {
                self.enqueue(job, now);
            }
        }
    }

    // ----- outcomes ----------------------------------------------------------------------

    /// How connection `token`'s session is protected now.
    fn tls_use(&self, token: usize) -> TlsUse {
        let conn = &self.conns[token];
        let dest = &self.destinations[conn.destination].tls;
        let version = conn
            .tls
            .as_ref()
            .filter(|_| conn.tls_ready)
            .and_then(|t| t.protocol_version())
            .map(|v| match v {
                rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
                rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
                _ => "TLS (other version)",
            });
        let verified = match dest.policy {
            // MTA-STS testing reports whether enforce would have taken this certificate.
            TlsPolicy::MtaStsTesting | TlsPolicy::MtaStsTestingMismatch if !dest.verify => {
                version.is_some() && self.would_verify(token)
            }
            // The handshake completes only with a valid certificate when it verifies.
            _ => version.is_some() && dest.verify,
        };
        TlsUse {
            version,
            verified,
            policy: dest.policy,
        }
    }

    /// Whether connection `token`'s server certificate verifies for the destination's TLS name
    /// (the Mozilla roots and `tls_ca_file`), although the session did not ask.
    fn would_verify(&self, token: usize) -> bool {
        let conn = &self.conns[token];
        let dest = &self.destinations[conn.destination].tls;
        let (Some(certs), Some(name)) = (
            conn.tls.as_ref().and_then(|t| t.peer_certificates()),
            server_name(&dest.name),
        ) else {
            return false;
        };
        let Some((end_entity, intermediates)) = certs.split_first() else {
            return false;
        };
        use rustls::client::danger::ServerCertVerifier;
        self.tls
            .verifier
            .verify_server_cert(
                end_entity,
                intermediates,
                &name,
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .is_ok()
    }

    /// The outcome of a transaction; `results` (one per recipient, in order) is emptied.
    fn on_transaction(
        &mut self,
        job: Job,
        results: &mut Vec<RcptResult>,
        tls: Option<TlsUse>,
        now: Instant,
    ) {
        self.shared
            .stats
            .transactions
            .fetch_add(1, Ordering::Relaxed);
        let attempts = job.attempts + 1;
        let d = job.destination;
        self.destinations[d]
            .metrics
            .in_flight
            .fetch_sub(job.recipients.len() as u64, Ordering::Relaxed);
        let throttled = results.iter().find_map(|r| match r {
            RcptResult::Failed { reply, .. } if self.is_throttle(reply) => Some(reply.clone()),
            _ => None,
        });
        if let Some(reply) = throttled {
            // A transaction was refused, not a connection: one connection fewer is the
            // ceiling.
            let open = self.destinations[d].open.saturating_sub(1);
            self.destinations[d].throttled(now, open, &self.config.adaptive, &reply);
            self.hold_if_paused(d, now);
        } else if results
            .iter()
            .any(|r| matches!(r, RcptResult::Delivered(_)))
        {
            let dest = &mut self.destinations[d];
            dest.shaper.on_success(now);
            // The window may now allow another connection for the queued work.
            if dest.connections_wanted() > 0 {
                self.mark_dirty(d);
            }
        }
        self.destinations[d].publish_shaping();
        let mut transient: Vec<(Address, Arc<Reply>)> = Vec::new();
        let mut again: Vec<Address> = Vec::new();
        // The recipients of a transaction mostly share one reply (the one to the end of the
        // data): their events share one copy of it. Kept from one transaction to the next:
        // when the session drops delivered replies' texts (no events), every transaction's
        // reply is the same, and sharing it costs no allocation per message.
        let mut last = self.last_reply.take();
        let mut share = |reply: Reply| match &last {
            Some(l) if **l == reply => Arc::clone(l),
            _ => Arc::clone(last.insert(Arc::new(reply))),
        };
        for (recipient, result) in job.recipients.into_iter().zip(results.drain(..)) {
            match result {
                RcptResult::Delivered(reply) => self.finish_recipient_over(
                    EventKind::Delivered,
                    &job.envelope,
                    recipient,
                    share(reply),
                    Some(d),
                    attempts,
                    tls,
                    now,
                ),
                RcptResult::Failed {
                    reply,
                    permanent: true,
                } => self.finish_recipient_over(
                    EventKind::Bounced,
                    &job.envelope,
                    recipient,
                    share(reply),
                    Some(d),
                    attempts,
                    tls,
                    now,
                ),
                RcptResult::Failed { reply, .. } => transient.push((recipient, share(reply))),
                RcptResult::Retry(_) => again.push(recipient),
            }
        }
        if !again.is_empty() {
            self.requeue(Job {
                envelope: Arc::clone(&job.envelope),
                recipients: again,
                destination: job.destination,
                attempts: job.attempts,
                mx: job.mx.clone(),
            });
        }
        if !transient.is_empty() {
            self.defer(
                &job.envelope,
                transient,
                job.destination,
                attempts,
                job.mx,
                now,
            );
        }
        self.envelopes.recycle(job.envelope);
        self.last_reply = last;
    }

    /// Replies that ask the sender to slow down (421, throttling texts and codes).
    fn is_throttle(&self, reply: &Reply) -> bool {
        reply.code == 421 || self.config.classifier.classify(reply) == Category::Throttled
    }

    fn hold_if_paused(&mut self, d: usize, now: Instant) {
        if let Some(until) = self.paused_until(d, now) {
            // Recipients whose maximum age passes during the pause expire then, not after it
            // (a pause can last minutes): the destination wakes at the first such moment.
            let max_age = self.config.retry.max_age;
            let first_expiry = self.destinations[d]
                .queue
                .iter()
                .map(|job| job.envelope.submitted + max_age)
                .min();
            self.hold(d, first_expiry.map_or(until, |e| e.clamp(now, until)));
        }
    }

    fn paused_until(&self, d: usize, now: Instant) -> Option<Instant> {
        self.destinations[d]
            .shaper
            .paused_until
            .filter(|&t| t > now)
    }

    /// A paused destination woke before its pause ends: its queued recipients past their
    /// maximum age expire, and it sleeps again until the pause ends or the next one expires.
    fn expire_while_paused(&mut self, d: usize, now: Instant) {
        let max_age = self.config.retry.max_age;
        let dest = &mut self.destinations[d];
        // The server's own words when it has them (as a deferral would report them).
        let reply = Arc::new(dest.throttled_by.clone().unwrap_or_else(|| Reply {
            code: 0,
            enhanced: None,
            text: format!(
                "{} is paused after it asked to slow down, past the maximum age",
                dest.name
            ),
        }));
        for job in dest.drain() {
            if job.envelope.submitted + max_age > now {
                self.destinations[d].push_back(job);
                continue;
            }
            for recipient in job.recipients {
                self.finish_recipient(
                    EventKind::Expired,
                    &job.envelope,
                    recipient,
                    Arc::clone(&reply),
                    Some(d),
                    job.attempts,
                    now,
                );
            }
        }
        self.hold_if_paused(d, now);
    }

    /// A job goes back to the front of its queue without counting an attempt.
    fn requeue(&mut self, job: Job) {
        let d = job.destination;
        self.destinations[d].push_front(job);
        self.mark_dirty(d);
    }

    /// Every job queued for a destination that cannot be reached moves to its domain's next
    /// exchanger (MX), or is deferred with `reply`.
    fn destination_failed(&mut self, d: usize, reply: Reply, now: Instant) {
        // One reply for every recipient queued: their events share it.
        let reply = Arc::new(reply);
        let jobs: Vec<Job> = self.destinations[d].drain();
        for job in jobs {
            let Err(job) = self.next_exchanger(job, now) else {
                continue;
            };
            let attempts = job.attempts + 1;
            let failures = job
                .recipients
                .into_iter()
                .map(|r| (r, Arc::clone(&reply)))
                .collect();
            self.defer(&job.envelope, failures, d, attempts, job.mx, now);
        }
    }

    /// Temporary failures: Deferred with a retry time from the schedule, or Expired past the
    /// maximum age.
    #[allow(clippy::too_many_arguments)]
    fn defer(
        &mut self,
        envelope: &Arc<Envelope>,
        failures: Vec<(Address, Arc<Reply>)>,
        destination: usize,
        attempts: u32,
        mx: Option<MxJob>,
        now: Instant,
    ) {
        let due = now + self.config.retry.delay(attempts);
        self.defer_until(envelope, failures, destination, attempts, mx, due, now);
    }

    /// Temporary failures retried at `due` (at the latest at the maximum age), or Expired
    /// when the maximum age has passed.
    #[allow(clippy::too_many_arguments)]
    fn defer_until(
        &mut self,
        envelope: &Arc<Envelope>,
        failures: Vec<(Address, Arc<Reply>)>,
        destination: usize,
        attempts: u32,
        mx: Option<MxJob>,
        due: Instant,
        now: Instant,
    ) {
        let name = Arc::clone(&self.destinations[destination].name);
        let expires = envelope.submitted + self.config.retry.max_age;
        // A retry due after the maximum age becomes a last try at it; only a failure at or
        // after the maximum age expires a recipient, never one before it.
        let due = due.min(expires);
        let delay = due.saturating_duration_since(now);
        if now >= expires {
            for (recipient, reply) in failures {
                self.finish_recipient(
                    EventKind::Expired,
                    envelope,
                    recipient,
                    reply,
                    Some(destination),
                    attempts,
                    now,
                );
            }
            return;
        }
        let n = failures.len() as u64;
        let mut recipients = Vec::with_capacity(failures.len());
        // One wall-clock retry time for them all, so that they share one outcome.
        let retry_at = Some(std::time::SystemTime::now() + delay);
        for (recipient, reply) in failures {
            self.custody_outcome(
                envelope,
                &recipient,
                EventKind::Deferred,
                attempts,
                retry_at,
                None,
            );
            if self.shared.events.is_some() {
                let category = Some(self.category(&reply));
                self.send_event(Event {
                    kind: EventKind::Deferred,
                    message_id: envelope.id,
                    tag: envelope.tag,
                    recipient: recipient.clone(),
                    reply,
                    destination: Arc::clone(&name),
                    attempts,
                    retry_after: Some(delay),
                    category,
                    elapsed: now.saturating_duration_since(envelope.submitted),
                    tls: None,
                });
            }
            recipients.push(recipient);
        }
        let stats = &self.shared.stats;
        stats.deferred.fetch_add(n, Ordering::Relaxed);
        stats.active.fetch_sub(n, Ordering::AcqRel);
        self.destinations[destination]
            .metrics
            .deferred
            .fetch_add(n, Ordering::Relaxed);
        self.changed = true;
        if self.config.hand_off_deferrals.is_some_and(|t| delay > t) {
            // The source retries these (Config::hand_off_deferrals): they leave the loop.
            stats.unfinished.fetch_sub(n, Ordering::AcqRel);
            self.held -= recipients.len();
            return;
        }
        self.retries.push(
            self.orders.due(envelope.id, due, now),
            Job {
                envelope: Arc::clone(envelope),
                recipients,
                destination,
                attempts,
                mx,
            },
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_recipient(
        &mut self,
        kind: EventKind,
        envelope: &Arc<Envelope>,
        recipient: Address,
        reply: Arc<Reply>,
        destination: Option<usize>,
        attempts: u32,
        now: Instant,
    ) {
        self.finish_recipient_over(
            kind,
            envelope,
            recipient,
            reply,
            destination,
            attempts,
            None,
            now,
        );
    }

    /// A final outcome; `tls`: the session's, when a transaction gave it.
    #[allow(clippy::too_many_arguments)]
    fn finish_recipient_over(
        &mut self,
        kind: EventKind,
        envelope: &Arc<Envelope>,
        recipient: Address,
        reply: Arc<Reply>,
        destination: Option<usize>,
        attempts: u32,
        tls: Option<TlsUse>,
        now: Instant,
    ) {
        type Field = fn(&DestinationMetrics) -> &std::sync::atomic::AtomicU64;
        let per_destination: Field = match kind {
            EventKind::Delivered => |m: &DestinationMetrics| &m.delivered,
            EventKind::Bounced => |m: &DestinationMetrics| &m.bounced,
            EventKind::Expired => |m: &DestinationMetrics| &m.expired,
            EventKind::Deferred => unreachable!("deferrals are not final"),
        };
        let name = match destination {
            Some(d) => {
                let dest = &self.destinations[d];
                per_destination(&dest.metrics).fetch_add(1, Ordering::Relaxed);
                if kind == EventKind::Delivered {
                    let how = match tls.and_then(|t| t.version) {
                        Some(_) => &dest.metrics.delivered_tls,
                        None => &dest.metrics.delivered_plaintext,
                    };
                    how.fetch_add(1, Ordering::Relaxed);
                }
                Arc::clone(&dest.name)
            }
            None => Arc::clone(&self.no_destination),
        };
        // Before the counts drop: a custody that answers the outcome with new work (a DSN)
        // counts it in `decided`, so that waiters never see zero in between.
        let failure = (kind != EventKind::Delivered).then_some((&reply, &name));
        self.custody_outcome(envelope, &recipient, kind, attempts, None, failure);
        let stats = &self.shared.stats;
        let counter = match kind {
            EventKind::Delivered => &stats.delivered,
            EventKind::Bounced => &stats.bounced,
            EventKind::Expired | EventKind::Deferred => &stats.expired,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.held -= 1;
        self.changed = true;
        // The counts drop before the event is sent, so that a reader who has the event finds
        // the counts with it; `sending` keeps `flush` and `wait_final` waiting until the event
        // is on the channel (sending may wait for the reader), so that whoever sees the
        // recipient final there finds its event too.
        let stats = &self.shared.stats;
        self.shared.sending.fetch_add(1, Ordering::AcqRel);
        stats.active.fetch_sub(1, Ordering::AcqRel);
        stats.unfinished.fetch_sub(1, Ordering::AcqRel);
        if self.shared.events.is_some() {
            let category = (kind != EventKind::Delivered).then(|| self.category(&reply));
            self.send_event(Event {
                kind,
                message_id: envelope.id,
                tag: envelope.tag,
                recipient,
                reply,
                destination: name,
                attempts,
                retry_after: None,
                category,
                elapsed: now.saturating_duration_since(envelope.submitted),
                tls,
            });
        }
        // Waiters are woken at the end of the turn, after every event of it is sent.
        self.shared.sending.fetch_sub(1, Ordering::AcqRel);
    }

    /// Why `reply` failed, classified once for a run of recipients with the same reply.
    fn category(&mut self, reply: &Arc<Reply>) -> Category {
        match &self.last_category {
            Some((last, category)) if Arc::ptr_eq(last, reply) || last == reply => *category,
            _ => {
                let category = self.config.classifier.classify(reply);
                self.last_category = Some((Arc::clone(reply), category));
                category
            }
        }
    }

    fn send_event(&mut self, event: Event) {
        if let Some(events) = &self.shared.events {
            self.pace.send(events, &self.shared.events_sent, event);
        }
    }
}

fn connect_reply(text: &str) -> Reply {
    Reply::new(0, Some(EnhancedCode::new(4, 4, 1)), text)
}
