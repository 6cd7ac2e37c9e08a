//! The door into the event loop: any thread submits, the loop drains.
//!
//! A bounded `crossbeam` channel (a lock-free ring buffer) carries submissions; a full channel is
//! backpressure, reported at once or after a caller's timeout. The loop is woken through
//! `mio::Waker` only when it is not already due to look, so a burst of submissions costs one
//! wake-up syscall, not one each, and submissions the loop has left queued for its next turn
//! cost none.

use crate::error::{Error, Result};
use crate::message::Message;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A message with the identifier it was given.
#[derive(Debug)]
pub struct Submission {
    pub id: u64,
    pub message: Message,
    /// For work a source resumes (recovered from a spool): what earlier processes did.
    /// Boxed, since it is rare and the channel's slots stay small.
    pub resumed: Option<Box<Resumed>>,
}

/// What earlier attempts left of a resumed submission.
#[derive(Debug, Clone, Copy)]
pub struct Resumed {
    /// Delivery attempts already made.
    pub attempts: u32,
    /// When the message was first submitted: the maximum age counts from then.
    pub submitted: std::time::Instant,
}

impl Submission {
    /// A new message: no attempts yet, submitted now.
    pub fn new(id: u64, message: Message) -> Self {
        Submission {
            id,
            message,
            resumed: None,
        }
    }
}

/// The sending side, shared by every caller thread.
#[derive(Debug)]
pub struct Ingress {
    sender: Sender<Submission>,
    wake_pending: AtomicBool,
    waker: Arc<mio::Waker>,
}

impl Ingress {
    /// A channel holding at most `capacity` messages; the receiver belongs to the loop.
    pub fn new(capacity: usize, waker: Arc<mio::Waker>) -> (Self, Receiver<Submission>) {
        let (sender, receiver) = crossbeam_channel::bounded(capacity);
        let ingress = Ingress {
            sender,
            wake_pending: AtomicBool::new(false),
            waker,
        };
        (ingress, receiver)
    }

    /// Queues without waiting; [`Error::QueueFull`] when at capacity. On error the message is
    /// handed back so that nothing is lost.
    // The refused submission comes back by value (nothing is lost); boxing it would cost an
    // allocation per submission on the hot path.
    #[allow(clippy::result_large_err)]
    pub fn try_submit(
        &self,
        submission: Submission,
    ) -> std::result::Result<(), (Error, Submission)> {
        match self.sender.try_send(submission) {
            Ok(()) => {
                self.wake();
                Ok(())
            }
            Err(TrySendError::Full(s)) => Err((Error::QueueFull, s)),
            Err(TrySendError::Disconnected(s)) => Err((Error::ShutDown, s)),
        }
    }

    /// Queues, waiting up to `timeout` for room.
    // The refused submission comes back by value (nothing is lost); boxing it would cost an
    // allocation per submission on the hot path.
    #[allow(clippy::result_large_err)]
    pub fn submit_timeout(
        &self,
        submission: Submission,
        timeout: Duration,
    ) -> std::result::Result<(), (Error, Submission)> {
        use crossbeam_channel::SendTimeoutError;
        match self.sender.send_timeout(submission, timeout) {
            Ok(()) => {
                self.wake();
                Ok(())
            }
            Err(SendTimeoutError::Timeout(s)) => Err((Error::QueueFull, s)),
            Err(SendTimeoutError::Disconnected(s)) => Err((Error::ShutDown, s)),
        }
    }

    /// Messages waiting for the loop.
    pub fn len(&self) -> usize {
        self.sender.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sender.is_empty()
    }

    /// Wakes the loop unless a wake-up is already pending.
    pub fn wake(&self) {
        // The load keeps the common case (a wake-up already pending) free of a write to the
        // shared flag.
        if !self.wake_pending.load(Ordering::Acquire)
            && !self.wake_pending.swap(true, Ordering::AcqRel)
        {
            // A failed wake means the loop is gone; submissions then stay unread and the
            // dispatcher reports ShutDown on the next call.
            let _ = self.waker.wake();
        }
    }

    /// Called by the loop before it drains, so that a submission racing with the drain wakes
    /// it again.
    pub fn clear_wake(&self) {
        self.wake_pending.store(false, Ordering::Release);
    }

    /// Called by the loop when it leaves submissions queued that it will come back for on its
    /// next turn anyway (a slice of a burst, or the bound on held recipients): submitters then
    /// skip the wake-up syscall, which would cost each of them more than the submission itself.
    pub fn expect_next_turn(&self) {
        self.wake_pending.store(true, Ordering::Release);
    }

    /// Forces a wake-up (shutdown, flush).
    pub fn wake_now(&self) -> Result<()> {
        self.waker.wake().map_err(Error::from)
    }
}
