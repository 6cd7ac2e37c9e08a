//! Traffic shaping per destination: configured limits, a GCRA rate limiter, and the adaptive
//! window that shrinks when a destination says "slow down" and grows back on success.
//!
//! Modelled on Postfix's queue manager (a concurrency window per destination with slow start and
//! a dead-destination cohort) and on KumoMTA's traffic shaping (rates as a generic cell rate
//! algorithm, per-provider overrides). Everything here is arithmetic on `Instant`s: no I/O, no
//! clocks of its own.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Message limits shared with other processes (several nodes through Redis): a destination
/// whose messages are rate-limited draws a permit per message from a [`PermitPool`] as well
/// as from its own limiters. The limiter refills pools in batches on a thread of its own, so
/// the loop never waits for it and round trips stay far below one per message.
pub trait SharedLimiter: Send + Sync + std::fmt::Debug {
    /// The pool of `destination`, whose messages are limited to `per_second` in all.
    fn pool(&self, destination: &str, per_second: f64) -> Arc<PermitPool>;

    /// The connection leases of `destination`, whose connections are limited to `max` in all
    /// (`None`: connections are limited by this process alone).
    fn connections(&self, _destination: &str, _max: usize) -> Option<Arc<ConnectionLeases>> {
        None
    }
}

/// Connections one destination may have open now, as leased from a [`SharedLimiter`]: the
/// limiter holds `granted` leases for this process (renewed while it lives, expiring when it
/// dies) and the loop opens a connection only while it has fewer open than that. The loop
/// reports how many it has open; the limiter takes more leases when asked and gives back
/// the ones no connection uses.
#[derive(Debug, Default)]
pub struct ConnectionLeases {
    granted: AtomicU64,
    open: AtomicU64,
    wanted: AtomicBool,
    /// The leasing thread, woken when the loop wants a lease or closed a connection.
    pub refiller: OnceLock<std::thread::Thread>,
}

impl ConnectionLeases {
    /// With `open` connections open, may one more open? If not, asks for a lease.
    pub fn take(&self, open: usize) -> bool {
        let open = open as u64;
        if open < self.granted.load(Ordering::Acquire) {
            self.open.store(open + 1, Ordering::Release);
            return true;
        }
        self.open.store(open, Ordering::Release);
        if !self.wanted.swap(true, Ordering::AcqRel) {
            self.wake();
        }
        false
    }

    /// A connection closed; `open` are left.
    pub fn closed(&self, open: usize) {
        self.open.store(open as u64, Ordering::Release);
        self.wake();
    }

    fn wake(&self) {
        if let Some(t) = self.refiller.get() {
            t.unpark();
        }
    }

    /// Connections open (or being opened) under these leases.
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Acquire)
    }

    /// Leases held for this process.
    pub fn granted(&self) -> u64 {
        self.granted.load(Ordering::Acquire)
    }

    /// The limiter now holds `n` leases for this process.
    pub fn set_granted(&self, n: u64) {
        self.granted.store(n, Ordering::Release);
    }

    /// Whether the loop wanted a lease since the last call (for the limiter).
    pub fn take_wanted(&self) -> bool {
        self.wanted.swap(false, Ordering::AcqRel)
    }
}

/// Permits one destination may use now, refilled by a [`SharedLimiter`].
#[derive(Debug, Default)]
pub struct PermitPool {
    permits: AtomicU64,
    wanted: AtomicBool,
    throttled: AtomicBool,
    /// The refilling thread, woken when the pool runs dry.
    pub refiller: OnceLock<std::thread::Thread>,
}

/// How soon a destination whose pool ran dry looks again.
const SHARED_POLL: Duration = Duration::from_millis(5);

impl PermitPool {
    /// Takes a permit, or asks for more and says no.
    pub fn take(&self) -> bool {
        let taken = self
            .permits
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if !taken {
            self.ask();
        }
        taken
    }

    /// Asks the limiter for more permits.
    pub fn ask(&self) {
        if !self.wanted.swap(true, Ordering::AcqRel) {
            if let Some(t) = self.refiller.get() {
                t.unpark();
            }
        }
    }

    pub fn available(&self) -> u64 {
        self.permits.load(Ordering::Acquire)
    }

    /// The limiter granted `n` permits.
    pub fn add(&self, n: u64) {
        self.permits.fetch_add(n, Ordering::AcqRel);
    }

    /// Whether the pool ran dry since the last call (for the limiter).
    pub fn take_wanted(&self) -> bool {
        self.wanted.swap(false, Ordering::AcqRel)
    }

    /// The destination said "slow down" here: every process sharing it slows down.
    pub fn note_throttle(&self) {
        self.throttled.store(true, Ordering::Release);
        if let Some(t) = self.refiller.get() {
            t.unpark();
        }
    }

    /// Whether a throttle was noted since the last call (for the limiter).
    pub fn take_throttled(&self) -> bool {
        self.throttled.swap(false, Ordering::AcqRel)
    }
}

/// Limits that apply to one destination (a smarthost, a route target, or an MX host).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub max_connections: usize,
    pub max_messages_per_connection: u32,
    pub max_recipients_per_transaction: usize,
    /// Transactions (messages) per second at most; `None`: no limit. Each message limit allows
    /// a burst of a tenth of its window's budget: over any second, minute or hour at most 1.1
    /// times the limit goes out, and the rest of the time the pace is even.
    pub messages_per_second: Option<f64>,
    /// Transactions per minute at most; `None`: no limit.
    pub messages_per_minute: Option<f64>,
    /// Transactions per hour at most (a provider's hourly cap); `None`: no limit.
    pub messages_per_hour: Option<f64>,
    /// New connections per minute at most; `None`: no limit.
    pub connections_per_minute: Option<f64>,
}

impl Limits {
    /// Every rate set is a finite number above zero.
    pub fn rates_valid(&self) -> bool {
        [
            self.messages_per_second,
            self.messages_per_minute,
            self.messages_per_hour,
            self.connections_per_minute,
        ]
        .into_iter()
        .flatten()
        .all(|rate| rate.is_finite() && rate > 0.0)
    }

    /// Each configured message limit as (cells per second, burst).
    fn message_rates(&self) -> Vec<(f64, u32)> {
        [
            (self.messages_per_second, 1.0),
            (self.messages_per_minute, 60.0),
            (self.messages_per_hour, 3600.0),
        ]
        .into_iter()
        .filter_map(|(limit, window)| limit.map(|n| (n / window, burst_for(n))))
        .collect()
    }
}

/// A per-destination override: every `Some` field replaces the default. `pattern` matches the
/// destination's host name (a smarthost's, or an MX host's, so that every domain a provider
/// hosts shares its limits) exactly, or as a suffix when it starts with a dot (`.outlook.com`
/// matches `mx1.outlook.com`), case-insensitively.
///
/// With `recipient_domain`, `pattern` matches recipient domains instead (`yahoo.com`,
/// `.yahoo.co.jp`): their recipients travel in connections of their own to whatever host
/// serves them, under these limits (applied after the host's), like a PowerMTA domain
/// directive. Where several match a domain, the last one applies.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LimitOverride {
    pub pattern: String,
    pub recipient_domain: bool,
    pub max_connections: Option<usize>,
    pub max_messages_per_connection: Option<u32>,
    pub max_recipients_per_transaction: Option<usize>,
    pub messages_per_second: Option<f64>,
    pub messages_per_minute: Option<f64>,
    pub messages_per_hour: Option<f64>,
    pub connections_per_minute: Option<f64>,
    /// The TLS level for these destinations (see [`super::TlsPolicy`]).
    pub tls_policy: Option<super::TlsPolicy>,
    /// Trust anchors (PEM) for these destinations, beside the Mozilla roots and `tls_ca_file`.
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// Log in with these instead of the dispatcher's credentials (same AUTH rule).
    pub credentials: Option<crate::smtp::Credentials>,
}

impl LimitOverride {
    pub fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.');
        let pattern = self.pattern.trim_end_matches('.');
        if let Some(suffix) = pattern.strip_prefix('.') {
            host.len() > suffix.len()
                && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
        } else {
            host.eq_ignore_ascii_case(pattern)
        }
    }

    pub fn apply(&self, limits: &mut Limits) {
        if let Some(v) = self.max_connections {
            limits.max_connections = v;
        }
        if let Some(v) = self.max_messages_per_connection {
            limits.max_messages_per_connection = v;
        }
        if let Some(v) = self.max_recipients_per_transaction {
            limits.max_recipients_per_transaction = v;
        }
        if self.messages_per_second.is_some() {
            limits.messages_per_second = self.messages_per_second;
        }
        if self.messages_per_minute.is_some() {
            limits.messages_per_minute = self.messages_per_minute;
        }
        if self.messages_per_hour.is_some() {
            limits.messages_per_hour = self.messages_per_hour;
        }
        if self.connections_per_minute.is_some() {
            limits.connections_per_minute = self.connections_per_minute;
        }
    }
}

/// The limits for `host`: the defaults with every matching host override applied in order.
pub fn limits_for(host: &str, defaults: Limits, overrides: &[LimitOverride]) -> Limits {
    let mut limits = defaults;
    for o in overrides
        .iter()
        .filter(|o| !o.recipient_domain && o.matches(host))
    {
        o.apply(&mut limits);
    }
    limits
}

/// The generic cell rate algorithm: one cell every `interval`, with a burst of `burst` cells.
/// Equivalent to a token bucket, but one `Instant` of state.
#[derive(Debug, Clone, Copy)]
pub struct Gcra {
    interval: Duration,
    tolerance: Duration,
    /// Theoretical arrival time of the next cell.
    tat: Option<Instant>,
}

impl Gcra {
    /// `per_second` cells per second; bursts of up to `burst` cells (at least 1).
    pub fn new(per_second: f64, burst: u32) -> Self {
        let interval = Duration::from_secs_f64(1.0 / per_second.max(1e-6));
        Gcra {
            interval,
            tolerance: interval * burst.max(1).saturating_sub(1),
            tat: None,
        }
    }

    /// Takes a cell now, or says when one will be available.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Instant> {
        match self.next_allowed(now) {
            Some(at) => Err(at),
            None => {
                self.take(now);
                Ok(())
            }
        }
    }

    /// When a cell will be available, or `None` if one is now (nothing is taken).
    pub fn next_allowed(&self, now: Instant) -> Option<Instant> {
        let tat = self.tat.unwrap_or(now).max(now);
        let allowed_at = tat.checked_sub(self.tolerance).unwrap_or(now);
        (now < allowed_at).then_some(allowed_at)
    }

    /// Takes a cell, allowed or not (after `next_allowed` said it is).
    pub fn take(&mut self, now: Instant) {
        let tat = self.tat.unwrap_or(now).max(now);
        self.tat = Some(tat + self.interval);
    }

    /// How many cells could be taken now, one after another.
    pub fn available(&self, now: Instant) -> usize {
        let tat = self.tat.unwrap_or(now).max(now);
        let room = (now + self.tolerance).saturating_duration_since(tat);
        if now + self.tolerance < tat {
            return 0;
        }
        (room.as_secs_f64() / self.interval.as_secs_f64()) as usize + 1
    }

    /// Changes the rate (adaptive backoff), keeping the schedule already promised.
    pub fn set_rate(&mut self, per_second: f64, now: Instant) {
        let burst = (self.tolerance.as_secs_f64() / self.interval.as_secs_f64()).round() as u32 + 1;
        let old_interval = self.interval;
        let tat = self.tat;
        *self = Gcra::new(per_second, burst);
        // The cells already used stay used: their debt is rescaled to the new interval.
        self.tat = tat.map(|t| {
            let owed = t.max(now) - now;
            now + owed.mul_f64(self.interval.as_secs_f64() / old_interval.as_secs_f64())
        });
    }
}

/// How a destination's concurrency and rate adapt to its replies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Adaptive {
    /// Connections allowed at first; the window grows from here (slow start).
    pub initial_concurrency: f64,
    /// The first pause after the window is down to one connection; doubles each time.
    pub pause: Duration,
    pub max_pause: Duration,
    /// Consecutive connection failures (no success between) that mark a destination dead.
    pub dead_after: u32,
    /// How long a dead destination is left alone; its queued recipients are deferred.
    pub dead_for: Duration,
    /// After a throttle, the window grows back only up to one connection fewer than were open
    /// when it came, for this long: a server that refuses its 10th connection is not sent a
    /// 10th again every few milliseconds. Past it, growth probes higher again.
    pub throttle_memory: Duration,
}

impl Default for Adaptive {
    fn default() -> Self {
        Adaptive {
            initial_concurrency: 5.0,
            pause: Duration::from_secs(1),
            max_pause: Duration::from_secs(300),
            dead_after: 3,
            dead_for: Duration::from_secs(300),
            throttle_memory: Duration::from_secs(300),
        }
    }
}

/// A destination's shaping state.
#[derive(Debug, Clone)]
pub struct Shaper {
    pub limits: Limits,
    /// The adaptive concurrency window, between 1 and `limits.max_connections`.
    pub window: f64,
    /// Multiplies the configured message rate (1 = as configured).
    rate_factor: f64,
    /// One limiter per configured message limit (per second, minute, hour), with its rate.
    messages: Vec<(Gcra, f64)>,
    connections: Option<Gcra>,
    pub paused_until: Option<Instant>,
    pauses_in_row: u32,
    pub failures_in_row: u32,
    pub dead_until: Option<Instant>,
    /// The window's ceiling after a throttle, and until when it holds.
    ceiling: Option<(f64, Instant)>,
    /// Permits shared with other processes ([`SharedLimiter`]), for a rate-limited destination.
    shared: Option<Arc<PermitPool>>,
    /// Connection leases shared with other processes ([`SharedLimiter`]).
    leases: Option<Arc<ConnectionLeases>>,
}

impl Shaper {
    pub fn new(limits: Limits, adaptive: &Adaptive) -> Self {
        let max = limits.max_connections.max(1) as f64;
        Shaper {
            window: adaptive.initial_concurrency.clamp(1.0, max),
            rate_factor: 1.0,
            messages: limits
                .message_rates()
                .into_iter()
                .map(|(rate, burst)| (Gcra::new(rate, burst), rate))
                .collect(),
            connections: limits
                .connections_per_minute
                .map(|r| Gcra::new(r / 60.0, burst_for(r / 60.0))),
            limits,
            paused_until: None,
            pauses_in_row: 0,
            failures_in_row: 0,
            dead_until: None,
            ceiling: None,
            shared: None,
            leases: None,
        }
    }

    /// Draws this destination's messages from `limiter` too, when they are rate-limited.
    pub fn share(&mut self, limiter: &dyn SharedLimiter, destination: &str) {
        if let Some(rate) = self.message_rate() {
            self.shared = Some(limiter.pool(destination, rate));
        }
        self.leases = limiter.connections(destination, self.limits.max_connections.max(1));
    }

    /// With `open` connections open, whether the shared connection limit lets one more open
    /// (`None`) or when to ask again. Without shared leases, always `None`.
    pub fn take_connection_lease(&self, now: Instant, open: usize) -> Option<Instant> {
        match &self.leases {
            Some(leases) if !leases.take(open) => Some(now + SHARED_POLL),
            _ => None,
        }
    }

    /// A connection of this destination closed; `open` are left.
    pub fn connection_closed(&self, open: usize) {
        if let Some(leases) = &self.leases {
            leases.closed(open);
        }
    }

    /// Connections the window allows now.
    pub fn concurrency(&self) -> usize {
        (self.window.floor() as usize).clamp(1, self.limits.max_connections.max(1))
    }

    /// The current message rate limit in messages per second (the tightest of the configured
    /// limits, as adapted), if any.
    pub fn message_rate(&self) -> Option<f64> {
        self.messages
            .iter()
            .map(|(_, rate)| rate * self.rate_factor)
            .reduce(f64::min)
    }

    /// How many transactions every message limit would let start now (`usize::MAX` without
    /// limits).
    pub fn messages_available(&self, now: Instant) -> usize {
        let local = self
            .messages
            .iter()
            .map(|(g, _)| g.available(now))
            .min()
            .unwrap_or(usize::MAX);
        match &self.shared {
            Some(pool) => local.min(pool.available() as usize),
            None => local,
        }
    }

    /// When every message limit will allow the next transaction (`None`: now).
    pub fn next_message_at(&self, now: Instant) -> Option<Instant> {
        let local = self
            .messages
            .iter()
            .filter_map(|(g, _)| g.next_allowed(now))
            .max();
        match &self.shared {
            Some(pool) if pool.available() == 0 => {
                pool.ask();
                Some(local.unwrap_or(now).max(now + SHARED_POLL))
            }
            _ => local,
        }
    }

    /// When this destination may next start a transaction, or `None` if it may now (and a
    /// cell was taken).
    pub fn take_message(&mut self, now: Instant) -> Option<Instant> {
        if let Some(until) = self.blocked_until(now) {
            return Some(until);
        }
        // A message goes only when every limit allows it, and then counts against each.
        let wait = self
            .messages
            .iter()
            .filter_map(|(g, _)| g.next_allowed(now))
            .max();
        if wait.is_some() {
            return wait;
        }
        if let Some(pool) = &self.shared {
            if !pool.take() {
                return Some(now + SHARED_POLL);
            }
        }
        for (g, _) in &mut self.messages {
            g.take(now);
        }
        None
    }

    /// When this destination may next open a connection, or `None` if it may now.
    pub fn take_connection(&mut self, now: Instant) -> Option<Instant> {
        if let Some(until) = self.blocked_until(now) {
            return Some(until);
        }
        self.connections
            .as_mut()
            .and_then(|g| g.try_take(now).err())
    }

    fn blocked_until(&self, now: Instant) -> Option<Instant> {
        [self.paused_until, self.dead_until]
            .into_iter()
            .flatten()
            .filter(|&t| t > now)
            .max()
    }

    /// A queue administrator asked for a retry now (as Postfix's `postqueue -f` flushes its
    /// dead-site cache): forget the dead mark, the pause and the failures in a row.
    pub fn forget_failures(&mut self) {
        self.dead_until = None;
        self.paused_until = None;
        self.failures_in_row = 0;
        self.pauses_in_row = 0;
    }

    pub fn is_dead(&self, now: Instant) -> bool {
        self.dead_until.is_some_and(|t| t > now)
    }

    /// A transaction was accepted: grow the window by one connection per window's worth of
    /// successes (additive increase), up to the ceiling of a recent throttle, and the rate back
    /// toward the configured one.
    pub fn on_success(&mut self, now: Instant) {
        let mut max = self.limits.max_connections.max(1) as f64;
        match self.ceiling {
            Some((ceiling, until)) if until > now => max = max.min(ceiling),
            Some(_) => self.ceiling = None,
            None => {}
        }
        if self.window < max {
            self.window = (self.window + 1.0 / self.window).min(max);
        }
        self.failures_in_row = 0;
        self.pauses_in_row = 0;
        if self.rate_factor < 1.0 {
            self.rate_factor = (self.rate_factor * 1.05).min(1.0);
            self.apply_rate(now);
        }
    }

    /// The destination said "slow down" while `open` connections (not counting one it
    /// refused) were open: halve the window and the rate, and keep the window below `open + 1`
    /// for `Adaptive::throttle_memory`; when the window is already one connection, pause
    /// (doubling each time, up to the maximum).
    pub fn on_throttle(&mut self, now: Instant, open: usize, adaptive: &Adaptive) {
        let ceiling = open.max(1) as f64;
        self.ceiling = Some((ceiling, now + adaptive.throttle_memory));
        if self.window <= 1.0 {
            let pause = adaptive
                .pause
                .saturating_mul(1 << self.pauses_in_row.min(16))
                .min(adaptive.max_pause);
            self.pauses_in_row += 1;
            self.paused_until = Some(now + pause);
        }
        self.window = (self.window / 2.0).max(1.0);
        if let Some(pool) = &self.shared {
            pool.note_throttle();
        }
        if !self.messages.is_empty() {
            self.rate_factor = (self.rate_factor / 2.0).max(0.01);
            self.apply_rate(now);
        }
    }

    /// A connection failed (refused, timed out, greeting refused). Returns true when this
    /// failure marked the destination dead.
    pub fn on_connection_failure(&mut self, now: Instant, adaptive: &Adaptive) -> bool {
        self.failures_in_row += 1;
        self.window = (self.window / 2.0).max(1.0);
        if self.failures_in_row >= adaptive.dead_after {
            self.dead_until = Some(now + adaptive.dead_for);
            self.failures_in_row = 0;
            return true;
        }
        false
    }

    fn apply_rate(&mut self, now: Instant) {
        for (g, rate) in &mut self.messages {
            g.set_rate(*rate * self.rate_factor, now);
        }
    }
}

/// A short burst (a tenth of the window's budget, at least one) keeps rates smooth.
fn burst_for(per_window: f64) -> u32 {
    ((per_window / 10.0).ceil() as u32).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_connections: 8,
            max_messages_per_connection: 100,
            max_recipients_per_transaction: 50,
            messages_per_second: None,
            messages_per_minute: None,
            messages_per_hour: None,
            connections_per_minute: None,
        }
    }

    #[test]
    fn overrides_match_host_or_suffix() {
        let o = LimitOverride {
            pattern: ".outlook.com".into(),
            max_connections: Some(2),
            ..LimitOverride::default()
        };
        assert!(o.matches("mx1.OUTLOOK.com"));
        assert!(!o.matches("outlook.com"));
        assert!(!o.matches("eviloutlook.com"));
        let exact = LimitOverride {
            pattern: "smtp.example.org".into(),
            messages_per_second: Some(10.0),
            ..LimitOverride::default()
        };
        let l = limits_for("mx1.outlook.com", limits(), &[o.clone(), exact.clone()]);
        assert_eq!(l.max_connections, 2);
        assert_eq!(l.messages_per_second, None);
        let l = limits_for("smtp.example.org", limits(), &[o, exact]);
        assert_eq!((l.max_connections, l.messages_per_second), (8, Some(10.0)));
    }

    #[test]
    fn gcra_holds_the_rate_over_any_window() {
        let start = Instant::now();
        let mut g = Gcra::new(100.0, 10);
        let mut taken = Vec::new();
        let mut now = start;
        // Ask every millisecond for two seconds.
        for _ in 0..2000 {
            if g.try_take(now).is_ok() {
                taken.push(now);
            }
            now += Duration::from_millis(1);
        }
        // 100/s for 2 s plus the burst of 10.
        assert!((200..=211).contains(&taken.len()), "{}", taken.len());
        // Any one-second window holds at most rate + burst.
        for (i, &t) in taken.iter().enumerate() {
            let in_window = taken[i..]
                .iter()
                .take_while(|&&u| u < t + Duration::from_secs(1))
                .count();
            assert!(in_window <= 110, "{in_window}");
        }
    }

    #[test]
    fn window_halves_on_throttle_pauses_at_one_and_recovers() {
        let adaptive = Adaptive::default();
        let now = Instant::now();
        let mut s = Shaper::new(limits(), &adaptive);
        assert_eq!(s.concurrency(), 5);
        for _ in 0..100 {
            s.on_success(now);
        }
        assert_eq!(s.concurrency(), 8, "grows to the limit");
        s.on_throttle(now, 8, &adaptive);
        assert_eq!(s.concurrency(), 4);
        s.on_throttle(now, 4, &adaptive);
        s.on_throttle(now, 2, &adaptive);
        assert_eq!(s.concurrency(), 1);
        assert_eq!(s.paused_until, None);
        s.on_throttle(now, 1, &adaptive);
        assert_eq!(s.paused_until, Some(now + Duration::from_secs(1)));
        assert_eq!(s.take_message(now), Some(now + Duration::from_secs(1)));
        s.on_throttle(now, 1, &adaptive);
        assert_eq!(
            s.paused_until,
            Some(now + Duration::from_secs(2)),
            "pauses double"
        );
        // Past the throttle memory, the window grows back gradually.
        let later = now + adaptive.throttle_memory;
        for _ in 0..20 {
            s.on_success(later);
        }
        assert!(s.concurrency() > 1, "recovers gradually");
    }

    #[test]
    fn after_a_throttle_the_window_stays_below_the_connections_refused() {
        let adaptive = Adaptive::default();
        let now = Instant::now();
        let mut s = Shaper::new(limits(), &adaptive);
        for _ in 0..100 {
            s.on_success(now);
        }
        assert_eq!(s.concurrency(), 8);
        // The 7th connection was refused while 6 were open.
        s.on_throttle(now, 6, &adaptive);
        assert_eq!(s.concurrency(), 4);
        for _ in 0..1000 {
            s.on_success(now + Duration::from_secs(1));
        }
        assert_eq!(s.concurrency(), 6, "grows back to what the server accepted");
        let later = now + adaptive.throttle_memory + Duration::from_secs(1);
        for _ in 0..100 {
            s.on_success(later);
        }
        assert_eq!(
            s.concurrency(),
            8,
            "probes higher once the memory has passed"
        );
    }

    #[test]
    fn every_message_limit_holds_and_the_tightest_sets_the_pace() {
        let adaptive = Adaptive::default();
        let mut l = limits();
        l.messages_per_second = Some(100.0);
        l.messages_per_hour = Some(360.0);
        let mut s = Shaper::new(l, &adaptive);
        assert_eq!(s.message_rate(), Some(0.1), "360 an hour is one every 10 s");
        let start = Instant::now();
        // The hourly budget's burst (a tenth: 36) goes at once, then one every 10 s.
        let mut now = start;
        let mut sent = 0;
        while now < start + Duration::from_secs(3600) {
            match s.take_message(now) {
                None => sent += 1,
                Some(at) => now = at,
            }
        }
        assert!((360..=360 + 36).contains(&sent), "{sent} in the first hour");
        // Within the first second, the per-second burst (10) is the tighter limit.
        let mut s = Shaper::new(l, &adaptive);
        let burst = (0..100).filter(|_| s.take_message(start).is_none()).count();
        assert_eq!(burst, 10);
    }

    #[test]
    fn repeated_connection_failures_mark_dead() {
        let adaptive = Adaptive::default();
        let now = Instant::now();
        let mut s = Shaper::new(limits(), &adaptive);
        assert!(!s.on_connection_failure(now, &adaptive));
        assert!(!s.on_connection_failure(now, &adaptive));
        assert!(s.on_connection_failure(now, &adaptive));
        assert!(s.is_dead(now));
        assert_eq!(s.take_connection(now), Some(now + adaptive.dead_for));
        assert!(!s.is_dead(now + adaptive.dead_for));
    }

    #[test]
    fn rate_shrinks_and_grows_back() {
        let adaptive = Adaptive::default();
        let mut l = limits();
        l.messages_per_second = Some(100.0);
        let mut s = Shaper::new(l, &adaptive);
        let now = Instant::now();
        s.on_throttle(now, 8, &adaptive);
        assert_eq!(s.message_rate(), Some(50.0));
        for _ in 0..200 {
            s.on_success(now);
        }
        assert_eq!(s.message_rate(), Some(100.0));
    }

    #[test]
    fn a_burst_of_refusals_keeps_the_ceiling_at_what_was_accepted() {
        let adaptive = Adaptive::default();
        let now = Instant::now();
        let mut l = limits();
        l.max_connections = 16;
        let mut s = Shaper::new(l, &adaptive);
        for _ in 0..1000 {
            s.on_success(now);
        }
        assert_eq!(s.concurrency(), 16);
        // 12 connections opened at once; the server takes 9 and refuses the other three.
        for open in [11, 10, 9] {
            s.on_throttle(now, open, &adaptive);
        }
        for _ in 0..10_000 {
            s.on_success(now + Duration::from_secs(1));
        }
        assert_eq!(s.concurrency(), 9, "the server accepted 9 connections");
    }

    #[test]
    fn a_throttle_does_not_release_an_hourly_burst() {
        let adaptive = Adaptive::default();
        let now = Instant::now();
        let mut l = limits();
        l.messages_per_hour = Some(10_000.0);
        let mut s = Shaper::new(l, &adaptive);
        let burst = (0..5000).filter(|_| s.take_message(now).is_none()).count();
        assert_eq!(burst, 1000);
        s.on_throttle(now, 4, &adaptive);
        let after = (0..5000).filter(|_| s.take_message(now).is_none()).count();
        assert_eq!(after, 0, "\"slow down\" released {after} messages at once");
    }
}
