//! Orders from a queue administrator to the running loops: make deferred recipients due now,
//! or delete a message (its recipients waiting for a retry get the final outcome "deleted by
//! admin" and are never sent again).
//!
//! Orders are rare (a person typing `mxpipe queue retry`), so they are kept in one shared list
//! that every loop reads from where it left off; a loop looks at a counter each turn and takes
//! the lock only when it moved. Orders never touch a connection: a transaction under way ends
//! as it would have.

use super::EventKind;
use crate::queue::{Job, RetrySchedule};
use crate::smtp::Reply;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// One order to the loops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueOrder {
    /// Deferred recipients of this message (`None`: of every message) are due now.
    Retry(Option<u64>),
    /// Recipients of this message are not sent again: those waiting for a retry, and those
    /// deferred later, get the final outcome "deleted by admin".
    Delete(u64),
}

/// The orders given so far, shared by the loops.
#[derive(Debug, Default)]
pub(crate) struct Orders {
    list: Mutex<Vec<QueueOrder>>,
    given: AtomicUsize,
}

impl Orders {
    pub fn give(&self, order: QueueOrder) {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.push(order);
        self.given.store(list.len(), Ordering::Release);
    }

    /// The orders after the first `seen` (empty without taking the lock when there are none).
    fn since(&self, seen: usize) -> Vec<QueueOrder> {
        if self.given.load(Ordering::Acquire) <= seen {
            return Vec::new();
        }
        let list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list[seen.min(list.len())..].to_vec()
    }
}

/// One loop's side of the orders: where it is in the list, and the messages deleted.
#[derive(Debug, Default)]
pub(super) struct LoopOrders {
    seen: usize,
    deleted: HashSet<u64>,
}

impl LoopOrders {
    /// Applies new orders to `retries`: the jobs they name become due at `now` (a deleted
    /// message's jobs too, so that the loop finishes them as deleted when it takes them).
    /// Returns true when a retry was ordered: the caller then forgets which destinations
    /// failed, or a destination marked dead would defer the retried work again at once.
    pub fn apply(&mut self, orders: &Orders, retries: &mut RetrySchedule, now: Instant) -> bool {
        let mut retried = false;
        for order in orders.since(self.seen) {
            self.seen += 1;
            match order {
                QueueOrder::Retry(id) => {
                    retried = true;
                    retries.make_due(now, |job| id.is_none_or(|id| job.envelope.id == id))
                }
                QueueOrder::Delete(id) => {
                    self.deleted.insert(id);
                    retries.make_due(now, |job| job.envelope.id == id);
                }
            }
        }
        retried
    }

    /// When a deferred job of message `id` is due: at once when the message was deleted, so
    /// that the loop finishes it as deleted.
    pub fn due(&self, id: u64, due: Instant, now: Instant) -> Instant {
        if self.deleted.contains(&id) {
            now
        } else {
            due
        }
    }

    /// Whether an administrator deleted message `id` (its recipients get no DSN, as with
    /// Postfix's `postsuper -d`).
    pub fn is_deleted(&self, id: u64) -> bool {
        self.deleted.contains(&id)
    }

    /// The final outcome for `job`'s recipients when its message was deleted.
    pub fn deleted(&self, job: &Job) -> Option<(EventKind, Reply)> {
        self.deleted
            .contains(&job.envelope.id)
            .then(|| (EventKind::Bounced, Reply::new(0, None, "deleted by admin")))
    }
}
