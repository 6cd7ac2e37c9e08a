//! The dispatcher: configuration, the public handle, outcome events and counters.
//!
//! [`Dispatcher::builder`] collects settings; [`DispatcherBuilder::start`] resolves routes and
//! starts one or more event-loop threads ([`reactor`]). Any thread may [`Dispatcher::submit`];
//! outcomes arrive as [`Event`]s on a channel and are counted in [`Stats`]. The handle itself never
//! touches a socket.

pub mod classify;
mod conn;
pub mod custody;
pub mod metrics;
pub mod orders;
mod pool;
mod reactor;
pub mod reports;
pub mod shaping;
pub(crate) mod tls;
pub use tls::TlsPolicy;
mod trace;
pub use trace::Trace;

use crate::error::{Error, Result};
use crate::message::{Address, Message};
use crate::queue::{RetryPolicy, Submission};
use crate::route::{Routes, Target};
use crate::smtp::{Credentials, Reply, SessionConfig, StartTls, Timeouts};
use crossbeam_channel::Receiver;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What happened to one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The destination accepted the message (final).
    Delivered,
    /// A temporary failure; the recipient will be tried again after `retry_after`.
    Deferred,
    /// A permanent failure (final).
    Bounced,
    /// Temporary failures until the maximum age passed (final).
    Expired,
}

impl EventKind {
    /// Delivered, Bounced and Expired end a recipient's story.
    pub fn is_final(self) -> bool {
        !matches!(self, EventKind::Deferred)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Delivered => "delivered",
            EventKind::Deferred => "deferred",
            EventKind::Bounced => "bounced",
            EventKind::Expired => "expired",
        }
    }
}

/// One outcome for one recipient.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: EventKind,
    /// The identifier [`Dispatcher::submit`] returned.
    pub message_id: u64,
    /// The message's tag ([`Message::with_tag`]; 0 unless set).
    pub tag: u64,
    pub recipient: Address,
    /// The server's reply; code 0 when the outcome was decided without one (connection failure,
    /// timeout, a message the server cannot take), with the reason in the text. Shared by the
    /// events of the recipients it answered (a failed connection's reply is one for all of
    /// them): a million events of one attempt hold one copy of the text.
    pub reply: Arc<Reply>,
    /// The destination (`host:port`) the attempt went to.
    pub destination: Arc<str>,
    /// Delivery attempts made so far, this one included.
    pub attempts: u32,
    /// For Deferred: when the next attempt is due, from now; `None` when no attempt will
    /// follow (a [`Dispatcher::shutdown_timeout`] cut it short).
    pub retry_after: Option<Duration>,
    /// Why it was not delivered (None for Delivered); see [`classify`].
    pub category: Option<classify::Category>,
    /// Time since the message was submitted.
    pub elapsed: Duration,
    /// For an outcome a server gave in a transaction (Delivered, Bounced): how that session
    /// was protected. `None` when no transaction gave it.
    pub tls: Option<TlsUse>,
}

/// How the session of a transaction was protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsUse {
    /// "TLSv1.3" or "TLSv1.2"; `None`: plaintext.
    pub version: Option<&'static str>,
    /// The server's certificate was verified (chain and name, as `policy` says).
    pub verified: bool,
    /// The destination's TLS policy.
    pub policy: TlsPolicy,
}

/// Counters, shared by the loops and readable from any thread.
#[derive(Debug, Default)]
pub struct Stats {
    pub submitted_messages: AtomicU64,
    pub submitted_recipients: AtomicU64,
    pub delivered: AtomicU64,
    pub deferred: AtomicU64,
    pub bounced: AtomicU64,
    pub expired: AtomicU64,
    pub connections_opened: AtomicU64,
    pub connections_open: AtomicU64,
    pub transactions: AtomicU64,
    /// The longest time one loop turn took (microseconds): how long any socket may have
    /// waited for the loop.
    pub longest_turn_us: AtomicU64,
    /// Recipients being worked on now: not final and not waiting for a retry.
    pub(crate) active: AtomicU64,
    /// Recipients without a final outcome yet.
    pub(crate) unfinished: AtomicU64,
}

/// A snapshot of [`Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub submitted_messages: u64,
    pub submitted_recipients: u64,
    pub delivered: u64,
    pub deferred: u64,
    pub bounced: u64,
    pub expired: u64,
    /// Recipients without a final outcome (queued, in a transaction, or waiting to retry).
    pub in_flight: u64,
    pub connections_opened: u64,
    pub connections_open: u64,
    pub transactions: u64,
    /// The longest loop turn so far, in microseconds.
    pub longest_turn_us: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            submitted_messages: get(&self.submitted_messages),
            submitted_recipients: get(&self.submitted_recipients),
            delivered: get(&self.delivered),
            deferred: get(&self.deferred),
            bounced: get(&self.bounced),
            expired: get(&self.expired),
            in_flight: get(&self.unfinished),
            connections_opened: get(&self.connections_opened),
            connections_open: get(&self.connections_open),
            transactions: get(&self.transactions),
            longest_turn_us: get(&self.longest_turn_us),
        }
    }
}

/// Everything the loops share with the handle.
#[derive(Debug)]
pub(crate) struct Shared {
    pub stats: Stats,
    pub events: Option<crossbeam_channel::Sender<Event>>,
    /// Events sent on `events` by every loop: with the channel's length, what the reader took.
    pub events_sent: AtomicU64,
    /// Final outcomes already counted whose event a loop is still sending: `flush` and
    /// `wait_final` wait for them too.
    pub sending: AtomicU64,
    pub shutting_down: AtomicBool,
    /// Set by [`Dispatcher::shutdown_timeout`] when its deadline passes: the loops report
    /// every recipient not yet final as Deferred and stop at once, without QUIT.
    pub abandon: AtomicBool,
    pub registry: metrics::Registry,
    /// A queue administrator's orders to the loops.
    pub orders: orders::Orders,
    idle_lock: Mutex<()>,
    idle: Condvar,
}

impl Shared {
    /// Wakes threads blocked in `flush` or `wait_final`.
    pub fn notify(&self) {
        let _guard = self.idle_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.idle.notify_all();
    }

    fn wait_until(&self, deadline: Option<Instant>, done: impl Fn() -> bool) -> bool {
        let mut guard = self.idle_lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if done() {
                return true;
            }
            let mut step = Duration::from_millis(50);
            if let Some(deadline) = deadline {
                let now = Instant::now();
                if now >= deadline {
                    return false;
                }
                step = step.min(deadline - now);
            }
            // The timeout covers a notification that raced with the check above.
            guard = self
                .idle
                .wait_timeout(guard, step)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The dispatcher's settings. Build with [`Dispatcher::builder`].
#[derive(Debug, Clone)]
pub struct Config {
    pub routes: Routes,
    pub session: SessionConfig,
    /// Connections open at once to one destination.
    pub max_connections_per_destination: usize,
    /// Connections open at once in one loop, over all destinations (file descriptors are
    /// finite). When reached, destinations wait in turn and idle connections are closed
    /// early to make room.
    pub max_connections: usize,
    /// Transactions on one connection before it is closed and replaced.
    pub max_messages_per_connection: u32,
    /// Recipients in one transaction (RFC 5321 4.5.3.1.8: servers must take at least 100).
    pub max_recipients_per_transaction: usize,
    /// An unused pooled connection is closed (QUIT) after this long.
    pub idle_timeout: Duration,
    /// Messages the ingress queue holds before `submit` reports it full.
    pub queue_capacity: usize,
    /// Recipients one loop holds (queued, in flight, or waiting to retry) before it stops
    /// taking from the ingress queue.
    pub max_queued_recipients: usize,
    pub retry: RetryPolicy,
    /// Event-loop threads; work is spread over them by recipient domain.
    pub loops: usize,
    /// Send events on the channel of [`Dispatcher::events`]. Events wait there until read;
    /// while a reader takes them but falls behind by more than 65,536, a loop waits for it
    /// (backpressure), and goes on without waiting when the reader takes nothing for 200 ms.
    /// No event is ever dropped.
    pub record_events: bool,
    /// Verify the server's certificate chain and name. `None` (the default) verifies under
    /// `StartTls::Required`, implicit TLS, and whenever credentials are set (AUTH goes only
    /// over verified TLS), and not otherwise under opportunistic STARTTLS, where, as with
    /// Postfix's "may" level, an unverified encrypted session beats plaintext. A certificate
    /// that fails a check that was asked for defers the mail; only a failed handshake lets
    /// opportunistic STARTTLS fall back to plaintext.
    pub tls_verify: Option<bool>,
    /// Extra trust anchors (PEM) beside the Mozilla roots.
    pub tls_ca_file: Option<PathBuf>,
    /// How outcomes are put into categories.
    pub classifier: classify::Classifier,
    /// Transactions per second per destination; `None`: unlimited.
    pub messages_per_second: Option<f64>,
    /// Transactions per minute per destination; `None`: unlimited.
    pub messages_per_minute: Option<f64>,
    /// Transactions per hour per destination; `None`: unlimited.
    pub messages_per_hour: Option<f64>,
    /// New connections per minute per destination; `None`: unlimited.
    pub connections_per_minute: Option<f64>,
    /// Replacements of the limits above, for destination hosts (host name or `.suffix`) or for
    /// recipient domains (`LimitOverride::recipient_domain`).
    pub limit_overrides: Vec<shaping::LimitOverride>,
    /// Slow start, backoff and dead-destination settings.
    pub adaptive: shaping::Adaptive,
    /// Deliver straight to each domain's mail exchangers (RFC 5321 5.1) when no relay or
    /// route applies.
    pub mx: Option<crate::route::mx::MxConfig>,
    /// Local addresses to send from (egress IPs), used in turn for new connections of the
    /// same address family; empty: the system chooses.
    pub source_addresses: Vec<std::net::IpAddr>,
    /// Write every connection's SMTP dialogue here (secrets and content redacted).
    pub trace: Option<Arc<Trace>>,
    /// Keep custody of every submission in this spool (see [`crate::spool`]).
    pub spool: Option<crate::spool::SpoolConfig>,
    /// Who learns every deferral and final outcome (a source that keeps custody). Set by
    /// `start` when `spool` is; a source of another kind may set its own.
    pub custody: Option<Arc<dyn custody::Custody>>,
    /// With a spool: send the sender a delivery status notification (RFC 3464) for every
    /// recipient that bounces or expires, as its NOTIFY asks (see [`reports`]). On by default.
    pub dsn_reports: bool,
    /// A deferral whose retry is due later than this leaves the loop after its Deferred event:
    /// a source that shares work (Redis) retries it, on whichever node is free. `None`: every
    /// deferral is retried here.
    pub hand_off_deferrals: Option<Duration>,
    /// Message rate limits shared with other processes (Redis), on top of the local ones.
    pub shared_limits: Option<Arc<dyn shaping::SharedLimiter>>,
}

impl Config {
    /// The limits that apply to a destination host: the defaults with the host overrides that
    /// match it, and then, for the recipients of a domain override's group, that override.
    pub fn limits_for(&self, host: &str, group: Option<usize>) -> shaping::Limits {
        let defaults = shaping::Limits {
            max_connections: self.max_connections_per_destination,
            max_messages_per_connection: self.max_messages_per_connection,
            max_recipients_per_transaction: self.max_recipients_per_transaction,
            messages_per_second: self.messages_per_second,
            messages_per_minute: self.messages_per_minute,
            messages_per_hour: self.messages_per_hour,
            connections_per_minute: self.connections_per_minute,
        };
        let mut limits = shaping::limits_for(host, defaults, &self.limit_overrides);
        if let Some(o) = group.and_then(|g| self.limit_overrides.get(g)) {
            o.apply(&mut limits);
        }
        limits
    }

    /// The recipient-domain override whose limits `domain`'s recipients get (the last one that
    /// matches), as its index: they travel in their own destinations, with its limits.
    pub fn domain_group(&self, domain: &str) -> Option<usize> {
        self.limit_overrides
            .iter()
            .rposition(|o| o.recipient_domain && o.matches(domain))
    }

    /// Whether any override is for recipient domains.
    pub fn has_domain_overrides(&self) -> bool {
        self.limit_overrides.iter().any(|o| o.recipient_domain)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            routes: Routes::default(),
            session: SessionConfig::default(),
            max_connections_per_destination: 20,
            max_connections: 8192,
            max_messages_per_connection: 10_000,
            max_recipients_per_transaction: 100,
            idle_timeout: Duration::from_secs(5),
            queue_capacity: 65_536,
            max_queued_recipients: 1_000_000,
            retry: RetryPolicy::default(),
            loops: 1,
            record_events: true,
            tls_verify: None,
            tls_ca_file: None,
            classifier: classify::Classifier::default(),
            messages_per_second: None,
            messages_per_minute: None,
            messages_per_hour: None,
            connections_per_minute: None,
            limit_overrides: Vec::new(),
            adaptive: shaping::Adaptive::default(),
            mx: None,
            source_addresses: Vec::new(),
            trace: None,
            spool: None,
            custody: None,
            dsn_reports: true,
            hand_off_deferrals: None,
            shared_limits: None,
        }
    }
}

/// Collects settings; `start` checks them and starts the loops.
#[derive(Debug, Default)]
pub struct DispatcherBuilder {
    config: Config,
    relay: Option<String>,
    routes: Vec<(String, String)>,
}

impl DispatcherBuilder {
    /// Sends everything without a specific route to this smarthost (`host:port`).
    pub fn relay(mut self, host_port: &str) -> Self {
        self.relay = Some(host_port.to_string());
        self
    }

    /// Sends mail for `domain` to `host_port`.
    pub fn route(mut self, domain: &str, host_port: &str) -> Self {
        self.routes
            .push((domain.to_string(), host_port.to_string()));
        self
    }

    /// The name sent in EHLO.
    pub fn ehlo_name(mut self, name: &str) -> Self {
        self.config.session.ehlo_name = name.to_string();
        self
    }

    pub fn timeouts(mut self, timeouts: Timeouts) -> Self {
        self.config.session.timeouts = timeouts;
        self
    }

    /// Use BDAT when offered (default true).
    pub fn chunking(mut self, on: bool) -> Self {
        self.config.session.use_chunking = on;
        self
    }

    /// With CHUNKING and PIPELINING, at most how many whole transactions (MAIL, RCPTs, BDAT
    /// LAST and content, sent without waiting for replies) may be in flight on a connection,
    /// and how many content octets (default 32 and 1 MiB; the window adapts from 4 up to
    /// this). 0 transactions: BDAT content waits for the RCPT replies.
    pub fn bdat_window(mut self, transactions: usize, octets: usize) -> Self {
        self.config.session.bdat_window = transactions;
        self.config.session.bdat_window_bytes = octets;
        self
    }

    pub fn max_connections_per_destination(mut self, n: usize) -> Self {
        self.config.max_connections_per_destination = n;
        self
    }

    /// Connections open at once per loop, over all destinations.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.config.max_connections = n;
        self
    }

    pub fn max_messages_per_connection(mut self, n: u32) -> Self {
        self.config.max_messages_per_connection = n;
        self
    }

    pub fn max_recipients_per_transaction(mut self, n: usize) -> Self {
        self.config.max_recipients_per_transaction = n;
        self
    }

    pub fn idle_timeout(mut self, d: Duration) -> Self {
        self.config.idle_timeout = d;
        self
    }

    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.config.queue_capacity = n;
        self
    }

    pub fn max_queued_recipients(mut self, n: usize) -> Self {
        self.config.max_queued_recipients = n;
        self
    }

    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.config.retry = policy;
        self
    }

    pub fn loops(mut self, n: usize) -> Self {
        self.config.loops = n;
        self
    }

    pub fn record_events(mut self, on: bool) -> Self {
        self.config.record_events = on;
        self
    }

    /// STARTTLS policy (default opportunistic). Implicit TLS is chosen per target by writing
    /// it `smtps://host:port`.
    pub fn starttls(mut self, policy: StartTls) -> Self {
        self.config.session.starttls = policy;
        self
    }

    /// Whether to verify certificates; see [`Config::tls_verify`].
    pub fn tls_verify(mut self, verify: bool) -> Self {
        self.config.tls_verify = Some(verify);
        self
    }

    /// Trust the CA certificates in this PEM file as well as the Mozilla roots.
    pub fn tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.tls_ca_file = Some(path.into());
        self
    }

    /// Log in with these credentials (RFC 4954) after EHLO, only over TLS whose certificate
    /// was verified (which credentials turn on by default, see [`Config::tls_verify`]) unless
    /// [`DispatcherBuilder::allow_plaintext_auth`] is set.
    pub fn credentials(mut self, credentials: Credentials) -> Self {
        self.config.session.credentials = Some(credentials);
        self
    }

    /// Deliver directly to each recipient domain's MX hosts (for domains without a route, and
    /// instead of a relay). Lookups run on a resolver thread per loop.
    pub fn direct_mx(mut self, mx: crate::route::mx::MxConfig) -> Self {
        self.config.mx = Some(mx);
        self
    }

    /// Writes every connection's SMTP dialogue to `trace` (see [`Trace`]).
    pub fn trace(mut self, trace: Arc<Trace>) -> Self {
        self.config.trace = Some(trace);
        self
    }

    /// Sends from this local address (call again to add more: they are used in turn).
    pub fn source_address(mut self, ip: std::net::IpAddr) -> Self {
        self.config.source_addresses.push(ip);
        self
    }

    /// At most this many transactions per second to each destination.
    pub fn messages_per_second(mut self, rate: f64) -> Self {
        self.config.messages_per_second = Some(rate);
        self
    }

    /// At most this many transactions per minute to each destination.
    pub fn messages_per_minute(mut self, rate: f64) -> Self {
        self.config.messages_per_minute = Some(rate);
        self
    }

    /// At most this many transactions per hour to each destination.
    pub fn messages_per_hour(mut self, rate: f64) -> Self {
        self.config.messages_per_hour = Some(rate);
        self
    }

    /// At most this many new connections per minute to each destination.
    pub fn connections_per_minute(mut self, rate: f64) -> Self {
        self.config.connections_per_minute = Some(rate);
        self
    }

    /// Different limits for destinations whose host matches `o.pattern`, or, with
    /// `o.recipient_domain`, for recipients whose domain does (later overrides win).
    pub fn limit_override(mut self, o: shaping::LimitOverride) -> Self {
        self.config.limit_overrides.push(o);
        self
    }

    pub fn adaptive(mut self, adaptive: shaping::Adaptive) -> Self {
        self.config.adaptive = adaptive;
        self
    }

    /// Classification rules tried before the built-in table.
    pub fn classify_rules(mut self, rules: Vec<classify::Rule>) -> Self {
        self.config.classifier = classify::Classifier::with_rules(rules);
        self
    }

    /// Send credentials over a connection that is not encrypted, or encrypted with a
    /// certificate that was not verified: anyone in the middle can read them.
    pub fn allow_plaintext_auth(mut self, allow: bool) -> Self {
        self.config.session.allow_plaintext_auth = allow;
        self
    }

    /// Takes custody of every submission in the spool at `dir` (created if missing): a
    /// submission is acknowledged ([`Dispatcher::sync`], [`Dispatcher::durable_id`]) only once
    /// it is on disk, and whatever is not final when the process ends is sent by the next one
    /// that opens the spool.
    pub fn spool(mut self, dir: impl Into<PathBuf>) -> Self {
        // Sizes set before (a config file's, when `--spool` names the directory) stay.
        match &mut self.config.spool {
            Some(spool) => spool.dir = dir.into(),
            None => self.config.spool = Some(crate::spool::SpoolConfig::new(dir)),
        }
        self
    }

    /// With a spool: whether senders get a delivery status notification (RFC 3464) for
    /// recipients that bounce or expire (default true; NOTIFY=NEVER and the null sender never
    /// get one).
    pub fn dsn_reports(mut self, on: bool) -> Self {
        self.config.dsn_reports = on;
        self
    }

    /// The settings as they stand (before `start` checks them).
    pub fn config_mut(&mut self) -> &mut Config {
        &mut self.config
    }

    /// Checks the settings, resolves the routes and starts the loops.
    pub fn start(mut self) -> Result<Dispatcher> {
        if let Some(relay) = &self.relay {
            self.config
                .routes
                .set_default(Target::resolve(relay, "relay")?);
        }
        for (domain, host_port) in &self.routes {
            self.config
                .routes
                .add_route(domain, Target::resolve(host_port, "route")?);
        }
        validate(&self.config)?;
        Dispatcher::start(self.config)
    }
}

fn validate(c: &Config) -> Result<()> {
    tls::check_overrides(&c.limit_overrides)?;
    let check = |ok: bool, key, problem| {
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidConfig { key, problem })
        }
    };
    check(
        !c.routes.is_empty() || c.mx.is_some(),
        "relay",
        "no relay, route or direct MX delivery is configured",
    )?;
    let name = &c.session.ehlo_name;
    check(
        !name.is_empty()
            && name.len() <= 255
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b)),
        "ehlo_name",
        "must be a domain name or an address literal",
    )?;
    check(
        c.max_connections_per_destination > 0,
        "max_connections_per_destination",
        "must be at least 1",
    )?;
    check(
        c.max_connections > 0,
        "max_connections",
        "must be at least 1",
    )?;
    check(
        c.max_messages_per_connection > 0,
        "max_messages_per_connection",
        "must be at least 1",
    )?;
    check(
        c.max_recipients_per_transaction > 0,
        "max_recipients_per_transaction",
        "must be at least 1",
    )?;
    check(c.queue_capacity > 0, "queue_capacity", "must be at least 1")?;
    check(
        c.max_queued_recipients > 0,
        "max_queued_recipients",
        "must be at least 1",
    )?;
    check((1..=64).contains(&c.loops), "loops", "must be from 1 to 64")?;
    check(
        c.retry.multiplier >= 1.0 && (0.0..1.0).contains(&c.retry.jitter),
        "retry",
        "multiplier must be at least 1 and jitter in [0, 1)",
    )?;
    let t = &c.session.timeouts;
    check(
        [
            t.connect,
            t.greeting,
            t.command,
            t.data_end,
            t.tls_handshake,
        ]
        .iter()
        .all(|d| !d.is_zero()),
        "timeouts",
        "every timeout must be above zero",
    )?;
    // Rates: the defaults, and each override applied to them.
    let defaults = c.limits_for("", None);
    let with_override = |o: &shaping::LimitOverride| {
        let mut limits = defaults;
        o.apply(&mut limits);
        limits
    };
    check(
        defaults.rates_valid()
            && c.limit_overrides
                .iter()
                .all(|o| with_override(o).rates_valid()),
        "rates",
        "messages per second, minute or hour and connections per minute must be numbers above zero",
    )
}

/// A message refused by `submit`, handed back so that nothing is lost.
#[derive(Debug)]
pub struct SubmitError {
    pub error: Error,
    pub message: Message,
}

impl fmt::Display for SubmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for SubmitError {}

/// The running dispatcher. Cheap to share by reference between threads (`Sync`).
pub struct Dispatcher {
    intake: custody::Intake,
    /// The loops' threads, behind locks so that a shutdown through `&self` can join them.
    threads: Vec<Mutex<Option<JoinHandle<()>>>>,
    shared: Arc<Shared>,
    events: Option<Receiver<Event>>,
    next_id: AtomicU64,
    stopped: AtomicBool,
    /// New submissions are refused ([`Dispatcher::shutdown_timeout`] has begun).
    refusing: AtomicBool,
    spool: Option<crate::spool::Spool>,
}

impl fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatcher")
            .field("loops", &self.threads.len())
            .field("stats", &self.shared.stats.snapshot())
            .finish()
    }
}

impl Dispatcher {
    pub fn builder() -> DispatcherBuilder {
        DispatcherBuilder::default()
    }

    /// Starts with settings checked by the caller (the builder checks them).
    pub fn start(mut config: Config) -> Result<Dispatcher> {
        validate(&config)?;
        // The spool is opened (and recovered) before the loops start, since they report to it.
        let spool = match &config.spool {
            Some(spool_config) => {
                let spool = crate::spool::Spool::open(spool_config.clone())?;
                config.custody = Some(spool.custody());
                Some(spool)
            }
            None => None,
        };
        let reports = match &config.custody {
            Some(inner) if config.dsn_reports && spool.is_some() => {
                let reports =
                    reports::DsnReports::new(Arc::clone(inner), &config.session.ehlo_name);
                config.custody = Some(Arc::clone(&reports) as Arc<dyn custody::Custody>);
                Some(reports)
            }
            _ => None,
        };
        // Without events, nobody reads a delivered recipient's reply text: not copied.
        config.session.delivery_reply_text &= config.record_events;
        let (events_tx, events_rx) = if config.record_events {
            let (tx, rx) = crossbeam_channel::unbounded();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let shared = Arc::new(Shared {
            stats: Stats::default(),
            events: events_tx,
            events_sent: AtomicU64::new(0),
            sending: AtomicU64::new(0),
            shutting_down: AtomicBool::new(false),
            abandon: AtomicBool::new(false),
            registry: metrics::Registry::default(),
            orders: orders::Orders::default(),
            idle_lock: Mutex::new(()),
            idle: Condvar::new(),
        });
        let by_domain = !config.routes.is_single_target();
        let override_ca_files: Vec<&std::path::Path> = config
            .limit_overrides
            .iter()
            .filter_map(|o| o.tls_ca_file.as_deref())
            .collect();
        let tls = tls::TlsConfigs::new(config.tls_ca_file.as_deref(), &override_ca_files)?;
        let config = Arc::new(config);
        let mut ingresses = Vec::with_capacity(config.loops);
        let mut threads = Vec::with_capacity(config.loops);
        for index in 0..config.loops {
            let (ingress, thread) =
                reactor::spawn(index, Arc::clone(&config), Arc::clone(&shared), tls.clone())?;
            ingresses.push(ingress);
            threads.push(Mutex::new(Some(thread)));
        }
        let intake = custody::Intake {
            ingresses: ingresses.into(),
            shared: Arc::clone(&shared),
            by_domain,
        };
        let mut dispatcher = Dispatcher {
            intake,
            threads,
            shared,
            events: events_rx,
            next_id: AtomicU64::new(1),
            stopped: AtomicBool::new(false),
            refusing: AtomicBool::new(false),
            spool: None,
        };
        if let Some(reports) = reports {
            reports.start(dispatcher.intake.clone())?;
        }
        if let Some(mut spool) = spool {
            spool.start(dispatcher.intake.clone())?;
            dispatcher.spool = Some(spool);
        }
        Ok(dispatcher)
    }

    /// Queues a message without waiting. Returns its identifier, or the message back with
    /// [`Error::QueueFull`] or [`Error::ShutDown`].
    pub fn submit(&self, message: Message) -> std::result::Result<u64, SubmitError> {
        self.submit_inner(message, None)
    }

    /// Queues a message, waiting up to `timeout` for room in the queue.
    pub fn submit_timeout(
        &self,
        message: Message,
        timeout: Duration,
    ) -> std::result::Result<u64, SubmitError> {
        self.submit_inner(message, Some(timeout))
    }

    fn submit_inner(
        &self,
        message: Message,
        timeout: Option<Duration>,
    ) -> std::result::Result<u64, SubmitError> {
        if self.shared.shutting_down.load(Ordering::Acquire)
            || self.refusing.load(Ordering::Acquire)
        {
            return Err(SubmitError {
                error: Error::ShutDown,
                message,
            });
        }
        if let Some(spool) = &self.spool {
            // The spool gives identifiers (persistent ones) and hands the message to the
            // engine once it is on disk.
            return spool
                .submit(message, timeout)
                .map_err(|(error, message)| SubmitError { error, message });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.intake
            .hand_over(Submission::new(id, message), timeout, custody::Counted::No)
            .map(|()| id)
            .map_err(|(error, submission)| SubmitError {
                error,
                message: submission.message,
            })
    }

    /// With a spool: waits until every message submitted before the call is durable (written
    /// and fsynced) and may be acknowledged upstream. Fails, naming the problem, when the spool
    /// refused a batch or an fsync failed (the spool then takes nothing more); identifiers up
    /// to [`Dispatcher::durable_id`] are durable all the same. Without a spool: returns at once.
    pub fn sync(&self) -> Result<()> {
        match &self.spool {
            Some(spool) => spool.sync(),
            None => Ok(()),
        }
    }

    /// With a spool: runs a queue command on it (as `mxpipe queue` through its control
    /// socket); `None` without a spool.
    pub fn queue_control(
        &self,
        command: crate::spool::admin::QueueCommand,
    ) -> Option<crate::spool::control::Response> {
        self.spool.as_ref().map(|s| s.control(command))
    }

    /// With a spool: what opening it found (work recovered, records torn or set aside).
    pub fn spool_report(&self) -> Option<&crate::spool::RecoveryReport> {
        self.spool.as_ref().map(|s| s.report())
    }

    /// With a spool: its writer's figures (fsyncs, messages made durable, checkpoints).
    pub fn spool_stats(&self) -> Option<&crate::spool::SpoolStats> {
        self.spool.as_ref().map(|s| s.stats())
    }

    /// With a spool: every message whose identifier is at most this is durable (the spool
    /// gives identifiers in order, across restarts). Without a spool: 0.
    pub fn durable_id(&self) -> u64 {
        self.spool.as_ref().map_or(0, |s| s.durable_id())
    }

    /// The outcome events (a clone of the one receiver; each event is seen by one reader).
    /// `None` when events were turned off.
    pub fn events(&self) -> Option<Receiver<Event>> {
        self.events.clone()
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Per-destination figures: queue, in flight, outcomes, connections, current limits.
    pub fn destination_stats(&self) -> Vec<metrics::DestinationStats> {
        self.shared.registry.snapshot()
    }

    /// Everything [`Dispatcher::stats`] and [`Dispatcher::destination_stats`] report, as
    /// Prometheus text.
    pub fn prometheus(&self) -> String {
        metrics::prometheus(&self.stats(), &self.destination_stats())
    }

    /// Waits until every submitted recipient is final or waiting for a retry.
    pub fn flush(&self) {
        let stats = &self.shared.stats;
        let sending = &self.shared.sending;
        self.shared.wait_until(None, || {
            stats.active.load(Ordering::Acquire) == 0 && sending.load(Ordering::Acquire) == 0
        });
    }

    /// Waits until every submitted recipient has a final outcome, or the timeout passes
    /// (returns false then).
    pub fn wait_final(&self, timeout: Duration) -> bool {
        let stats = &self.shared.stats;
        let sending = &self.shared.sending;
        self.shared.wait_until(Some(Instant::now() + timeout), || {
            stats.unfinished.load(Ordering::Acquire) == 0 && sending.load(Ordering::Acquire) == 0
        })
    }

    /// Flushes, then ends every session with QUIT and stops the loops. Recipients still waiting
    /// for a retry stay deferred (their Deferred event was sent). Later submissions fail with
    /// [`Error::ShutDown`].
    pub fn shutdown(&self) {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        self.flush();
        self.shared.shutting_down.store(true, Ordering::Release);
        self.wake_loops();
    }

    /// A shutdown with a deadline: refuses new submissions at once, lets the transactions
    /// under way and the queued work go on until `timeout` passes, then ends every session with
    /// QUIT. What is still not final at the deadline (queued, waiting for DNS, or in a
    /// transaction the deadline cut short) gets a Deferred event with code 0 and the reason,
    /// its connections are closed without QUIT, and the loops stop. Recipients waiting for a
    /// retry stay deferred, as after [`Dispatcher::shutdown`]. Returns when the loops have
    /// stopped (shortly after the deadline at the latest): true when nothing had to be cut
    /// short. Any thread may call it, also while [`Dispatcher::shutdown`] runs elsewhere, which
    /// it then cuts short as well; `Duration::MAX` waits as long as that takes.
    pub fn shutdown_timeout(&self, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        self.refusing.store(true, Ordering::Release);
        let stats = &self.shared.stats;
        let drained = self
            .shared
            .wait_until(deadline, || stats.active.load(Ordering::Acquire) == 0);
        self.stopped.store(true, Ordering::Release);
        if !drained {
            self.shared.abandon.store(true, Ordering::Release);
        }
        self.shared.shutting_down.store(true, Ordering::Release);
        self.wake_loops();
        // The loops end every session politely unless the deadline passes first.
        let mut clean = drained;
        while !self.loops_finished() {
            if clean && deadline.is_some_and(|d| Instant::now() >= d) {
                clean = false;
                self.shared.abandon.store(true, Ordering::Release);
                self.wake_loops();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.join();
        // Waiters of flush and wait_final see the counters the loops left.
        self.shared.notify();
        clean
    }

    fn wake_loops(&self) {
        for ingress in self.intake.ingresses.iter() {
            let _ = ingress.wake_now();
        }
    }

    fn loops_finished(&self) -> bool {
        self.threads.iter().all(|thread| {
            thread
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .is_none_or(JoinHandle::is_finished)
        })
    }

    fn join(&self) {
        for thread in &self.threads {
            // Held while joining, so a second caller returns only when the loop has ended.
            let mut thread = thread.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        self.shutdown();
        self.join();
        // After the loops: their last outcomes are written before the spool closes.
        if let Some(spool) = self.spool.take() {
            spool.close();
        }
    }
}

/// FNV-1a over the lower-cased domain: stable, cheap, good enough to spread domains over loops.
fn domain_hash(domain: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in domain.bytes() {
        h ^= u64::from(b.to_ascii_lowercase());
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_name_the_key() {
        let e = Dispatcher::builder().start().unwrap_err();
        assert_eq!(
            e.to_string(),
            "config relay: no relay, route or direct MX delivery is configured"
        );
        let e = Dispatcher::builder()
            .relay("127.0.0.1:2525")
            .ehlo_name("bad name\r\n")
            .start()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "config ehlo_name: must be a domain name or an address literal"
        );
        let e = Dispatcher::builder()
            .relay("127.0.0.1:2525")
            .max_connections_per_destination(0)
            .start()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "config max_connections_per_destination: must be at least 1"
        );
    }

    #[test]
    fn submit_after_shutdown_hands_the_message_back() {
        let d = Dispatcher::builder().relay("127.0.0.1:9").start().unwrap();
        d.shutdown();
        let m = Message::new("a@b.example", ["c@d.example"], b"x").unwrap();
        let e = d.submit(m).unwrap_err();
        assert_eq!(e.error, Error::ShutDown);
        assert_eq!(e.message.recipients()[0].as_str(), "c@d.example");
    }
}
