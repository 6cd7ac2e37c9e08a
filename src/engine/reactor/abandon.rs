//! The end of a bounded shutdown ([`crate::engine::Dispatcher::shutdown_timeout`]): when its
//! deadline passes, every recipient this loop still holds that is not final and not already
//! waiting for a retry gets a Deferred event saying why, and every connection is closed at once.
//!
//! Nothing here guesses an outcome: a transaction cut short may or may not have been accepted
//! by the server, so it is reported as deferred (never delivered), with a text that says so.
//! Recipients waiting for a retry already had their Deferred event and are left as they are.

use super::Reactor;
use crate::engine::{Event, EventKind};
use crate::message::Address;
use crate::queue::Envelope;
use crate::smtp::{EnhancedCode, Reply};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Why a recipient that was never tried is left deferred.
const NOT_TRIED: &str = "mxpipe shut down before this recipient was tried";
/// Why a recipient in a transaction the deadline cut short is left deferred.
const CUT_SHORT: &str = "mxpipe shut down during the transaction; the server may or may not \
                         have accepted the message";

impl Reactor {
    /// Reports everything not final as deferred and closes every connection without QUIT.
    pub(super) fn abandon_all(&mut self, now: Instant) {
        let tokens: Vec<usize> = self.conns.iter().map(|(token, _)| token).collect();
        for token in tokens {
            let mut conn = self.remove(token);
            let d = conn.destination;
            for (_, job) in conn.jobs.drain(..) {
                self.destinations[d]
                    .metrics
                    .in_flight
                    .fetch_sub(job.recipients.len() as u64, Ordering::Relaxed);
                self.abandon(
                    &job.envelope,
                    job.recipients,
                    Some(d),
                    job.attempts + 1,
                    CUT_SHORT,
                    now,
                );
            }
        }
        for d in 0..self.destinations.len() {
            for job in self.destinations[d].drain() {
                self.abandon(
                    &job.envelope,
                    job.recipients,
                    Some(d),
                    job.attempts,
                    NOT_TRIED,
                    now,
                );
            }
        }
        if let Some(mx) = self.mx.as_mut() {
            for (envelope, recipients, attempts) in mx.take_pending() {
                self.abandon(&envelope, recipients, None, attempts, NOT_TRIED, now);
            }
        }
        while let Ok(submission) = self.receiver.try_recv() {
            let envelope = Envelope {
                id: submission.id,
                sender: submission.message.sender,
                body: submission.message.body,
                submitted: now,
                tag: submission.message.tag,
                dsn: submission.message.dsn,
            };
            self.abandon(
                &Arc::new(envelope),
                submission.message.recipients,
                None,
                0,
                NOT_TRIED,
                now,
            );
        }
        self.shared.notify();
    }

    fn abandon(
        &mut self,
        envelope: &Arc<Envelope>,
        recipients: Vec<Address>,
        destination: Option<usize>,
        attempts: u32,
        why: &str,
        now: Instant,
    ) {
        let name: Arc<str> = match destination {
            Some(d) => Arc::clone(&self.destinations[d].name),
            None => Arc::from(""),
        };
        let n = recipients.len() as u64;
        // RFC 3463 4.3.2: the system is not accepting messages (it is shutting down).
        let reply = Arc::new(Reply::new(
            0,
            Some(EnhancedCode::new(4, 3, 2)),
            why.to_string(),
        ));
        let category = Some(self.config.classifier.classify(&reply));
        for recipient in recipients {
            self.send_event(Event {
                kind: EventKind::Deferred,
                message_id: envelope.id,
                tag: envelope.tag,
                recipient,
                reply: Arc::clone(&reply),
                destination: Arc::clone(&name),
                attempts,
                retry_after: None,
                category,
                elapsed: now.saturating_duration_since(envelope.submitted),
                tls: None,
            });
        }
        let stats = &self.shared.stats;
        stats.deferred.fetch_add(n, Ordering::Relaxed);
        stats.active.fetch_sub(n, Ordering::AcqRel);
        if let Some(d) = destination {
            self.destinations[d]
                .metrics
                .deferred
                .fetch_add(n, Ordering::Relaxed);
        }
    }
}
