//! One destination's share of the loop: its queue of jobs and its pool of connections.
//!
//! The pool counts connections (connecting and established) against the destination's limit and
//! keeps the list of connections that can take a transaction now, most recently used first, so
//! that a busy destination keeps few connections warm rather than many lukewarm. It owns no
//! sockets: connections live in the reactor's table and are named here by token.

use super::metrics::DestinationMetrics;
use super::shaping::{Adaptive, Shaper};
use crate::queue::Job;
use crate::route::Target;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// A connection's slot in the reactor's table: the token and the generation that guards against
/// a slot reused by a later connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnRef {
    pub token: usize,
    pub generation: u64,
}

#[derive(Debug)]
pub struct Destination {
    pub target: Target,
    /// `target.name`, shared with every event.
    pub name: Arc<str>,
    /// Use the methods below to change it: they keep the recipient count and metrics.
    pub queue: VecDeque<Job>,
    queued_recipients: usize,
    pub metrics: Arc<DestinationMetrics>,
    /// Connections that may be able to take a transaction (checked when taken).
    pub ready: Vec<ConnRef>,
    /// Connections counted against the limit: connecting or established.
    pub open: usize,
    pub connecting: usize,
    pub established: usize,
    /// Which of the target's addresses the next connection tries.
    pub next_addr: usize,
    /// Opportunistic TLS failed here: connections until then skip STARTTLS.
    pub plaintext_until: Option<std::time::Instant>,
    /// A session broke with pipelined BDAT in flight: this destination's connections wait
    /// for the RCPT replies before BDAT content from now on.
    pub no_pipelined_bdat: bool,
    /// Limits and the adaptive window.
    pub shaper: Shaper,
    /// Held back (rate limit, pause, dead) until then: nothing is dispatched before.
    pub wake_at: Option<std::time::Instant>,
    /// What its sessions do about TLS (part of what makes a destination: two routes that
    /// differ here never share connections).
    pub tls: super::tls::DestinationTls,
    /// The connection failure that marked the destination dead, reported with the recipients
    /// it holds back (the cause, not only "dead").
    pub dead_because: Option<crate::smtp::Reply>,
    /// The last reply that asked to slow down, reported with the recipients that expire while
    /// the destination is paused.
    pub throttled_by: Option<crate::smtp::Reply>,
}

impl Destination {
    pub fn new(
        target: Target,
        shaper: Shaper,
        metrics: Arc<DestinationMetrics>,
        tls: super::tls::DestinationTls,
    ) -> Self {
        let d = Destination {
            name: Arc::from(target.name.as_str()),
            target,
            queue: VecDeque::new(),
            ready: Vec::new(),
            open: 0,
            connecting: 0,
            established: 0,
            next_addr: 0,
            plaintext_until: None,
            no_pipelined_bdat: false,
            queued_recipients: 0,
            metrics,
            shaper,
            wake_at: None,
            tls,
            dead_because: None,
            throttled_by: None,
        };
        d.publish_shaping();
        d
    }

    pub fn push_back(&mut self, job: Job) {
        self.queued_recipients += job.recipients.len();
        self.queue.push_back(job);
        self.publish_queue();
    }

    pub fn push_front(&mut self, job: Job) {
        self.queued_recipients += job.recipients.len();
        self.queue.push_front(job);
        self.publish_queue();
    }

    pub fn pop_front(&mut self) -> Option<Job> {
        let job = self.queue.pop_front()?;
        self.queued_recipients -= job.recipients.len();
        self.publish_queue();
        Some(job)
    }

    pub fn drain(&mut self) -> Vec<Job> {
        self.queued_recipients = 0;
        self.publish_queue();
        self.queue.drain(..).collect()
    }

    fn publish_queue(&self) {
        self.metrics
            .queued
            .store(self.queued_recipients as u64, Ordering::Relaxed);
    }

    /// The destination said "slow down" while `open` other connections were working: the
    /// shaper shrinks, and the metrics count it.
    pub fn throttled(
        &mut self,
        now: Instant,
        open: usize,
        adaptive: &Adaptive,
        reply: &crate::smtp::Reply,
    ) {
        self.throttled_by = Some(reply.clone());
        self.shaper.on_throttle(now, open, adaptive);
        self.metrics.throttled.fetch_add(1, Ordering::Relaxed);
        self.publish_shaping();
    }

    /// Publishes the adaptive window and rate after they change.
    pub fn publish_shaping(&self) {
        self.metrics
            .concurrency_limit
            .store(self.shaper.concurrency() as u64, Ordering::Relaxed);
        let rate = self
            .shaper
            .message_rate()
            .map_or(0, |r| (r * 1000.0) as u64);
        self.metrics.rate_limit_milli.store(rate, Ordering::Relaxed);
    }

    /// The address for a new connection; failures move on to the next one.
    pub fn address(&self) -> std::net::SocketAddr {
        self.target.addrs[self.next_addr % self.target.addrs.len()]
    }

    /// A connection attempt failed: try the next address next time.
    pub fn rotate_address(&mut self) {
        self.next_addr = (self.next_addr + 1) % self.target.addrs.len();
    }

    /// Connections worth opening now for the queued work, within the adaptive window.
    pub fn connections_wanted(&self) -> usize {
        let room = self.shaper.concurrency().saturating_sub(self.open);
        let uncovered = self.queue.len().saturating_sub(self.connecting);
        room.min(uncovered)
    }
}
