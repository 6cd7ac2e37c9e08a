//! Work waiting to be sent: the lock-free ingress from callers, the per-destination queues
//! inside the loop, and the retry schedule.
//!
//! Every queue is bounded or drained by something bounded: the ingress by its capacity, the
//! loop's queues by the number of recipients it agrees to hold. Nothing here touches a socket.

pub mod ingress;
pub mod retry;

pub use ingress::{Ingress, Resumed, Submission};
pub use retry::{RetryPolicy, RetrySchedule};

use crate::message::dsn::DsnEnvelope;
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
    /// The caller's tag ([`crate::message::Message::with_tag`]).
    pub tag: u64,
    /// The DSN request ([`crate::message::Message::with_dsn`]).
    pub dsn: Option<Arc<DsnEnvelope>>,
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
/// address, most preferred first), shared by every job of the domain, and each one's MX
/// preference.
#[derive(Debug, PartialEq, Eq)]
pub struct MxRoute {
    pub candidates: Vec<usize>,
    pub preferences: Vec<u16>,
}

impl MxRoute {
    /// This route with each run of equal preferences in a new random order (RFC 5321 5.1:
    /// pick among equal exchangers at random to spread the load), or the route itself when
    /// nothing is to choose.
    pub fn spread(self: &Arc<Self>) -> Arc<MxRoute> {
        let p = &self.preferences;
        if !p.windows(2).any(|pair| pair[0] == pair[1]) {
            return Arc::clone(self);
        }
        let mut candidates = self.candidates.clone();
        let mut start = 0;
        while start < p.len() {
            let len = p[start..].iter().take_while(|&&x| x == p[start]).count();
            fastrand::shuffle(&mut candidates[start..start + len]);
            start += len;
        }
        Arc::new(MxRoute {
            candidates,
            preferences: self.preferences.clone(),
        })
    }
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

/// Splits `recipients` into transactions of at most `max` (at least 1) recipients, in order.
/// Each piece owns only its own recipients: memory stays linear in the list, whatever the
/// number of pieces.
pub fn split_recipients(
    recipients: Vec<Address>,
    max: usize,
) -> impl Iterator<Item = Vec<Address>> {
    let max = max.max(1);
    let mut rest = recipients.into_iter();
    std::iter::from_fn(move || {
        let piece: Vec<Address> = rest.by_ref().take(max).collect();
        (!piece.is_empty()).then_some(piece)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Field;

    #[test]
    fn split_pieces_hold_only_their_own_recipients() {
        let list: Vec<Address> = (0..1000)
            .map(|i| Address::parse(&format!("u{i}@r.example"), Field::Recipient(i)).unwrap())
            .collect();
        let pieces: Vec<Vec<Address>> = split_recipients(list.clone(), 3).collect();
        assert_eq!(pieces.len(), 334);
        assert_eq!(pieces.concat(), list);
        for piece in &pieces {
            assert!(piece.len() <= 3);
            assert!(
                piece.capacity() <= 3,
                "a piece of {} keeps room for {}",
                piece.len(),
                piece.capacity()
            );
        }
        assert_eq!(split_recipients(list, 0).count(), 1000);
    }
}
