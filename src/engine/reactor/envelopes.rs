//! Envelopes the loop reuses: the `Arc<Envelope>` a submission gets on arrival is the loop's
//! one heap allocation per message, so the envelope of a message whose last transaction is
//! done goes back to a bounded pool and carries the next submission instead of being freed.
//!
//! Only an envelope nobody else holds is taken back (a retry, a pending MX lookup or a custody
//! record may still hold it). A pooled envelope keeps no body or sender: they are let go when
//! it is taken back, so the pool never holds a message's memory.

use crate::message::{Address, Body};
use crate::queue::Envelope;
use std::sync::Arc;

/// Envelopes kept for reuse at most: enough for the transactions a loop has in flight at
/// once in a bulk send, and a few kilobytes of memory.
const CAPACITY: usize = 1024;

/// The loop's spare envelopes.
#[derive(Debug)]
pub(super) struct EnvelopePool {
    spare: Vec<Arc<Envelope>>,
    /// What a spare envelope holds instead of a sender and a body (clones cost no allocation).
    blank_sender: Address,
    blank_body: Arc<Body>,
}

impl EnvelopePool {
    pub(super) fn new() -> Self {
        EnvelopePool {
            spare: Vec::with_capacity(CAPACITY),
            blank_sender: Address::null(),
            blank_body: Arc::new(Body::new(b"").expect("an empty body is valid")),
        }
    }

    /// `envelope` behind an `Arc`: a spare one refilled, or a new one when none is spare.
    pub(super) fn make(&mut self, envelope: Envelope) -> Arc<Envelope> {
        match self.spare.pop() {
            Some(mut spare) => {
                // Only unshared envelopes are put back (see `recycle`), and none is shared
                // out of the pool.
                let slot = Arc::get_mut(&mut spare).expect("a spare envelope is unshared");
                *slot = envelope;
                spare
            }
            None => Arc::new(envelope),
        }
    }

    /// Takes back an envelope the loop is done with, if nothing else holds it and the pool
    /// has room; otherwise it is simply dropped.
    pub(super) fn recycle(&mut self, mut envelope: Arc<Envelope>) {
        if self.spare.len() == CAPACITY {
            return;
        }
        if let Some(slot) = Arc::get_mut(&mut envelope) {
            slot.sender = self.blank_sender.clone();
            slot.body = Arc::clone(&self.blank_body);
            slot.dsn = None;
            self.spare.push(envelope);
        }
    }

    /// Spare envelopes now.
    #[cfg(test)]
    fn spare(&self) -> usize {
        self.spare.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Field;
    use std::time::Instant;

    fn envelope(id: u64, body: &Arc<Body>) -> Envelope {
        Envelope {
            id,
            sender: Address::parse("s@b.example", Field::Sender).unwrap(),
            body: Arc::clone(body),
            submitted: Instant::now(),
            tag: id * 10,
            dsn: None,
        }
    }

    #[test]
    fn an_envelope_done_with_carries_the_next_submission() {
        let mut pool = EnvelopePool::new();
        let body = Arc::new(Body::new(b"Subject: a\r\n\r\nbody\r\n").unwrap());
        let first = pool.make(envelope(1, &body));
        let at = Arc::as_ptr(&first);
        pool.recycle(first);
        assert_eq!(pool.spare(), 1);
        // The body is let go as soon as the envelope is back: only the test holds it.
        assert_eq!(Arc::strong_count(&body), 1);
        let second = pool.make(envelope(2, &body));
        assert_eq!(Arc::as_ptr(&second), at, "the same allocation");
        assert_eq!((second.id, second.tag), (2, 20));
        assert_eq!(second.sender.as_str(), "s@b.example");
        assert_eq!(second.body.as_bytes(), body.as_bytes());
        assert_eq!(pool.spare(), 0);
    }

    #[test]
    fn an_envelope_still_held_elsewhere_is_not_taken_back() {
        let mut pool = EnvelopePool::new();
        let body = Arc::new(Body::new(b"x\r\n").unwrap());
        let envelope = pool.make(envelope(1, &body));
        let retry = Arc::clone(&envelope);
        pool.recycle(envelope);
        assert_eq!(pool.spare(), 0);
        // The holder still sees the message as it was.
        assert_eq!((retry.id, retry.sender.as_str()), (1, "s@b.example"));
        assert_eq!(retry.body.as_bytes(), b"x\r\n");
    }

    #[test]
    fn the_pool_is_bounded() {
        let mut pool = EnvelopePool::new();
        let body = Arc::new(Body::new(b"x\r\n").unwrap());
        let many: Vec<_> = (0..CAPACITY as u64 + 10)
            .map(|i| pool.make(envelope(i, &body)))
            .collect();
        for e in many {
            pool.recycle(e);
        }
        assert_eq!(pool.spare(), CAPACITY);
        assert_eq!(Arc::strong_count(&body), 1);
    }
}
