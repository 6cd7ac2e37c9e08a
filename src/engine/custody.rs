//! The boundary between the engine and the sources of its work (the in-process API, the
//! spool, later an SMTP listener or a Redis stream).
//!
//! A source hands the engine submissions through an [`Intake`] once it may (for a durable
//! source: once the submission is on disk; acknowledging it upstream is the source's business).
//! The engine reports back through one [`Custody`] registered in the [`Config`](super::Config):
//! every deferral and every final outcome, in batches of one loop turn. The loop never learns
//! which source a message came from, and adding a source never touches the loop.

use super::{EventKind, Shared};
use crate::error::Error;
use crate::message::Address;
use crate::queue::{Envelope, Ingress, Submission};
use crate::smtp::reply::Reply;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// What the engine decided for a run of recipients of one message: a deferral (with the
/// attempts so far and when the next is due) or a final outcome. Recipients decided one after
/// the other with the same message, kind, attempts and retry time share one outcome (a
/// transaction's accepted recipients are one), so a custody writes and the loop builds one
/// entry per run, not per recipient. Its recipients are in the [`Outcomes`] it came in.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The submission's identifier (a durable source's own, persistent one).
    pub message_id: u64,
    /// Where its recipients are in [`Outcomes::packed`].
    packed: std::ops::Range<usize>,
    /// How many recipients: never 0; exactly 1 when `failure` is set.
    count: usize,
    /// Its recipients are named by their positions in the message as a spool stored it
    /// (`u32` each), not by address: see [`Outcomes::positions`].
    positional: bool,
    pub kind: EventKind,
    /// Delivery attempts made so far.
    pub attempts: u32,
    /// For a deferral: when the next attempt is due (wall clock, so that it survives a restart).
    pub retry_at: Option<SystemTime>,
    /// For a bounce or an expiry, when the custody [`Custody::wants_failures`]: what a report
    /// to the sender needs. An outcome with a failure is never shared (each recipient has its
    /// own reply).
    pub failure: Option<Box<Failure>>,
}

impl Outcome {
    /// How many recipients share this outcome.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Never true (an outcome has a recipient); for symmetry with `len`.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether its recipients are named by position ([`Outcomes::positions`]) rather than by
    /// address ([`Outcomes::recipients`]).
    pub fn is_positional(&self) -> bool {
        self.positional
    }
}

/// A loop turn's outcomes, in the order decided, handed to the custody at the end of the turn
/// and then reused. Their recipients are written into one buffer shared by the turn, in the
/// layout a spool checkpoint stores, so that writing one is one copy:
/// - a recipient a spool placed (its [`Address`](crate::message::Address) has a position) as
///   that position, a `u32` (little-endian): 4 octets, and the address's text is not read;
/// - any other recipient, and every one whose outcome carries a [`Failure`], as its address:
///   its length (`u32`, little-endian) and its octets.
///
/// One outcome holds recipients of one kind of naming. Copying a few octets is cheaper for the
/// loop than cloning an address (an atomic increment, and a decrement later, on a count the
/// submitting thread touched last), and memory kept from turn to turn makes no allocation per
/// outcome.
#[derive(Debug, Default)]
pub struct Outcomes {
    pub list: Vec<Outcome>,
    packed: Vec<u8>,
}

/// What is kept between turns at most (octets of addresses, outcomes): a busy turn's worth,
/// not that of a turn that decided a huge list at once.
const KEEP_PACKED: usize = 1 << 20;
const KEEP_OUTCOMES: usize = 8192;

impl Outcomes {
    /// `outcome`'s recipients as stored: each one's position (`u32`, little-endian) when the
    /// outcome [`is_positional`](Outcome::is_positional), else each address's length (`u32`,
    /// little-endian), then its octets.
    pub fn packed(&self, outcome: &Outcome) -> &[u8] {
        &self.packed[outcome.packed.clone()]
    }

    /// The positions of a positional outcome's recipients, in order (none for an outcome
    /// named by address).
    #[cfg(test)]
    pub(crate) fn positions<'a>(&'a self, outcome: &Outcome) -> impl Iterator<Item = u32> + 'a {
        let packed = if outcome.positional {
            self.packed(outcome)
        } else {
            &[]
        };
        packed
            .chunks_exact(4)
            .map(|p| u32::from_le_bytes(p.try_into().expect("4 octets")))
    }

    /// The one recipient of an outcome that carries a failure, with that failure.
    pub fn failed_recipient<'a>(&'a self, outcome: &'a Outcome) -> Option<(&'a str, &'a Failure)> {
        let failure = outcome.failure.as_deref()?;
        Some((self.recipients(outcome).next()?, failure))
    }

    /// The addresses of an outcome named by address, in order (none for a positional one;
    /// an outcome with a failure is always named by address).
    pub fn recipients<'a>(
        &'a self,
        outcome: &Outcome,
    ) -> impl ExactSizeIterator<Item = &'a str> + 'a {
        let mut rest = self.packed(outcome);
        let count = if outcome.positional { 0 } else { outcome.count };
        (0..count).map(move |_| {
            let (len, tail) = rest.split_at(4);
            let len = u32::from_le_bytes(len.try_into().expect("4 octets")) as usize;
            let (address, tail) = tail.split_at(len);
            rest = tail;
            std::str::from_utf8(address).expect("an address noted as a str")
        })
    }

    /// Notes one recipient's outcome: it joins the last entry when that is of the same
    /// message, kind, attempts and retry time, names its recipients the same way, and neither
    /// carries a failure; else it starts one. Returns the entry it is in.
    pub fn note(
        &mut self,
        message_id: u64,
        recipient: &Address,
        kind: EventKind,
        attempts: u32,
        retry_at: Option<SystemTime>,
        failure: Option<Box<Failure>>,
    ) -> &Outcome {
        let start = self.packed.len();
        let position = recipient.position().filter(|_| failure.is_none());
        match position {
            Some(p) => self.packed.extend_from_slice(&p.to_le_bytes()),
            None => {
                let text = recipient.as_str();
                self.packed
                    .extend_from_slice(&(text.len() as u32).to_le_bytes());
                self.packed.extend_from_slice(text.as_bytes());
            }
        }
        let end = self.packed.len();
        let positional = position.is_some();
        let joins = |last: &Outcome| {
            failure.is_none()
                && last.failure.is_none()
                && last.positional == positional
                && last.message_id == message_id
                && last.kind == kind
                && last.attempts == attempts
                && last.retry_at == retry_at
        };
        match self.list.last_mut() {
            // The last outcome's recipients end where this one's began.
            Some(last) if joins(last) => {
                last.packed.end = end;
                last.count += 1;
            }
            _ => self.list.push(Outcome {
                message_id,
                packed: start..end,
                count: 1,
                positional,
                kind,
                attempts,
                retry_at,
                failure,
            }),
        }
        self.list.last().expect("noted")
    }

    /// Hands the outcomes to `custody` and empties them, keeping the memory for the next turn.
    pub(super) fn report(&mut self, custody: &dyn Custody) {
        if self.list.is_empty() {
            return;
        }
        custody.record(self);
        self.list.clear();
        self.packed.clear();
        if self.packed.capacity() > KEEP_PACKED {
            self.packed = Vec::new();
        }
        if self.list.capacity() > KEEP_OUTCOMES {
            self.list = Vec::new();
        }
    }
}

/// The message, last reply and destination of a recipient that bounced or expired (the
/// recipient is the outcome's one).
#[derive(Debug, Clone)]
pub struct Failure {
    pub envelope: Arc<Envelope>,
    /// The last reply (code 0: decided without a server's reply, the reason in its text),
    /// shared with the other recipients it failed.
    pub reply: Arc<Reply>,
    /// The destination of the last attempt (empty when none was made).
    pub destination: Arc<str>,
}

/// Whoever keeps custody of submitted work and must learn what became of it.
///
/// `record` is called on the loop thread at the end of every turn that decided something, with
/// that turn's outcomes in order (runs of recipients that share one, see [`Outcome`]). It may
/// take what it keeps out of them (a failure, say) and remove entries from `list`; the loop
/// empties them afterwards and reuses their memory. It must not wait: one write to the page cache is
/// fine (the spool does that, so that a kill loses at most one turn's checkpoints), an fsync
/// or a network round trip is not (hand those to another thread).
pub trait Custody: Send + Sync + fmt::Debug {
    fn record(&self, outcomes: &mut Outcomes);

    /// Called on the loop thread for each recipient whose outcome carries a [`Failure`] (only
    /// when [`Custody::wants_failures`]) as it is decided (before `record`, and before the
    /// dispatcher's counts change), with that outcome: a custody that will answer it with new
    /// work (a failure report) counts that work here. Must be cheap.
    fn decided(&self, _outcome: &Outcome, _recipient: &str) {}

    /// Whether outcomes of bounced and expired recipients should carry their [`Failure`].
    fn wants_failures(&self) -> bool {
        false
    }
}

/// The engine's door for sources: hands a submission to the loop that serves its recipients.
#[derive(Clone)]
pub struct Intake {
    pub(super) ingresses: Arc<[Arc<Ingress>]>,
    pub(super) shared: Arc<Shared>,
    pub(super) by_domain: bool,
}

impl fmt::Debug for Intake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Intake")
            .field("loops", &self.ingresses.len())
            .finish()
    }
}

/// How a submission's recipients are already counted in the dispatcher's figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Not at all (a new submission).
    No,
    /// As unfinished only (work a source held back until it was due).
    Unfinished,
    /// As unfinished and active (counted when the caller submitted it).
    Both,
}

impl Intake {
    /// Queues `submission` on its loop, waiting up to `wait` for room (`None`: not at all).
    /// On error the submission is handed back and the counts are as they were.
    // The refused submission comes back by value (nothing is lost); boxing it would cost an
    // allocation per submission on the hot path.
    #[allow(clippy::result_large_err)]
    pub fn hand_over(
        &self,
        submission: Submission,
        wait: Option<Duration>,
        counted: Counted,
    ) -> Result<(), (Error, Submission)> {
        let n = submission.message.recipients.len() as u64;
        let loops = self.ingresses.len();
        let index = if loops == 1 {
            0
        } else if self.by_domain {
            super::domain_hash(submission.message.recipients[0].domain()) as usize % loops
        } else {
            submission.id as usize % loops
        };
        let stats = &self.shared.stats;
        // Counted before the loop can see the message, so that flush never misses it.
        if counted != Counted::Both {
            stats.active.fetch_add(n, Ordering::AcqRel);
        }
        if counted == Counted::No {
            stats.unfinished.fetch_add(n, Ordering::AcqRel);
        }
        let ingress = &self.ingresses[index];
        let result = match wait {
            None => ingress.try_submit(submission),
            Some(t) => ingress.submit_timeout(submission, t),
        };
        match result {
            Ok(()) => {
                if counted != Counted::Unfinished {
                    stats.submitted_messages.fetch_add(1, Ordering::Relaxed);
                    stats.submitted_recipients.fetch_add(n, Ordering::Relaxed);
                }
                Ok(())
            }
            Err(e) => {
                if counted != Counted::Both {
                    stats.active.fetch_sub(n, Ordering::AcqRel);
                }
                if counted == Counted::No {
                    stats.unfinished.fetch_sub(n, Ordering::AcqRel);
                }
                Err(e)
            }
        }
    }

    /// Counts recipients a source holds for later (not active, not yet final), or stops
    /// counting them (`add` false) when they are dropped.
    pub fn count_held(&self, n: u64, add: bool) {
        let unfinished = &self.shared.stats.unfinished;
        if add {
            unfinished.fetch_add(n, Ordering::AcqRel);
        } else {
            unfinished.fetch_sub(n, Ordering::AcqRel);
            self.shared.notify();
        }
    }

    /// Counts recipients a caller submitted (active and unfinished) before a durable source
    /// has them on disk, or takes them back when it refused them.
    pub fn count_submitted(&self, n: u64, add: bool) {
        let stats = &self.shared.stats;
        if add {
            stats.active.fetch_add(n, Ordering::AcqRel);
            stats.unfinished.fetch_add(n, Ordering::AcqRel);
        } else {
            stats.active.fetch_sub(n, Ordering::AcqRel);
            stats.unfinished.fetch_sub(n, Ordering::AcqRel);
            self.shared.notify();
        }
    }

    /// Passes a queue administrator's order to every loop and wakes them.
    pub fn order(&self, order: super::orders::QueueOrder) {
        self.shared.orders.give(order);
        for ingress in self.ingresses.iter() {
            let _ = ingress.wake_now();
        }
    }

    /// The dispatcher is shutting down: a source stops handing over.
    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutting_down.load(Ordering::Acquire)
    }
}
