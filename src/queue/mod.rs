//! Work waiting to be sent: the lock-free ingress from callers, the per-destination queues
//! inside the loop, and the retry schedule.
//!
//! Every queue is bounded or drained by something bounded: the ingress by its capacity, the
//! loop's queues by the number of recipients it agrees to hold. Nothing here touches a socket.

pub mod ingress;
pub mod retry;

pub use ingress::{Ingress, Resumed, Submission};
pub use retry::{RetryPolicy, RetrySchedule};

use crate::message::{Address, Body};
use std::sync::Arc;
use std::time::Instant;

/// What every part of one submitted message shares.
#[derive(Debug)]
pub struct Envelope {
    pub id: u64,
    pub sender: Address,
    pub body: Arc<Body>,
    pub submitted: Instant,
}

/// Recipients of one message bound for one destination: the unit of a transaction.
#[derive(Debug)]
pub struct Job {
    pub envelope: Arc<Envelope>,
    pub recipients: Vec<Address>,
    /// Index of the destination (target) in the engine's table.
    pub destination: usize,
    /// Delivery attempts already made for these recipients.
    pub attempts: u32,
    /// For direct-to-MX delivery: the domain and its mail exchangers.
    pub mx: Option<MxJob>,
}

/// Where an MX-routed job may go: the candidates (destination indices: one per MX host and
/// address, most preferred first), shared by every job of the domain.
#[derive(Debug, PartialEq, Eq)]
pub struct MxRoute {
    pub candidates: Vec<usize>,
}

/// The MX part of a job: its domain, the route once resolved, and which candidate it is at.
#[derive(Debug, Clone)]
pub struct MxJob {
    /// The recipient domain, as the resolver keys it.
    pub domain: Arc<str>,
    /// `None` until resolved (or after a DNS failure: resolved again on retry).
    pub route: Option<Arc<MxRoute>>,
    pub candidate: usize,
}
