//! Backpressure on the outcome events: a loop that decides outcomes faster than the caller
//! reads them waits for the reader, so that the events waiting in the channel stay bounded.
//!
//! One failed connection can decide a million recipients in one loop turn, each an [`Event`];
//! a reader that writes a report line per event takes seconds for them, and every event waiting
//! costs memory. [`EventPace::send`] therefore waits, while more than [`BACKLOG`] events are
//! waiting, until the reader has taken them down to half of that. It must never block the loop
//! for a reader that does not read (a caller that reads events only after `wait_final`, or
//! never): when the reader takes nothing for [`STALL`], the loop stops waiting and the channel
//! grows as it must, since no event is ever dropped; it waits again only once the reader has
//! taken events again. The loop is thus paced by an active reader and never held by an absent
//! one for longer than one `STALL`.

use crate::engine::Event;
use crossbeam_channel::Sender;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Events waiting in the channel before a loop waits for its reader (about 130 bytes each).
pub(super) const BACKLOG: usize = 65_536;

/// A reader that takes no event for this long is not reading now: the loop goes on without it.
pub(super) const STALL: Duration = Duration::from_millis(200);

/// How often a waiting loop looks at the channel.
const POLL: Duration = Duration::from_micros(200);

/// A loop's view of its reader's pace.
#[derive(Debug)]
pub(super) struct EventPace {
    /// How long the reader may take nothing before the loop goes on without it.
    stall: Duration,
    /// The reader stalled after taking this many events: the loop does not wait for it again
    /// until it has taken more.
    stalled_at: Option<u64>,
}

impl Default for EventPace {
    fn default() -> Self {
        EventPace {
            stall: STALL,
            stalled_at: None,
        }
    }
}

impl EventPace {
    /// Sends `event`, first waiting for the reader as the module documentation says; `sent`
    /// counts the events every loop of the dispatcher sent on the channel.
    pub(super) fn send(&mut self, events: &Sender<Event>, sent: &AtomicU64, event: Event) {
        let waiting = events.len();
        if waiting >= BACKLOG {
            let taken = sent.load(Ordering::Acquire).saturating_sub(waiting as u64);
            match self.stalled_at {
                Some(stalled) if taken <= stalled => {}
                _ => self.wait(events, sent),
            }
        }
        // Counted first: the reader never seems to have taken more than was sent.
        sent.fetch_add(1, Ordering::AcqRel);
        // The receiver lives in the Dispatcher, which outlives the loop.
        let _ = events.send(event);
    }

    /// Waits until the reader has taken the backlog down to half, or has stalled.
    fn wait(&mut self, events: &Sender<Event>, sent: &AtomicU64) {
        self.stalled_at = None;
        let mut waiting = events.len();
        let mut progress = Instant::now();
        while waiting > BACKLOG / 2 {
            std::thread::sleep(POLL);
            let now = events.len();
            if now < waiting {
                progress = Instant::now();
            } else if progress.elapsed() >= self.stall {
                let taken = sent.load(Ordering::Acquire).saturating_sub(now as u64);
                self.stalled_at = Some(taken);
                return;
            }
            waiting = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EventKind;
    use crate::message::Address;
    use crate::smtp::Reply;
    use std::sync::Arc;

    fn event(n: u64) -> Event {
        Event {
            kind: EventKind::Deferred,
            message_id: n,
            tag: 0,
            recipient: Address::parse("a@b.example", crate::error::Field::Recipient(0)).unwrap(),
            reply: Arc::new(Reply::new(0, None, "refused")),
            destination: Arc::from("127.0.0.1:25"),
            attempts: 1,
            retry_after: None,
            category: None,
            elapsed: Duration::ZERO,
            tls: None,
        }
    }

    #[test]
    fn an_event_is_small() {
        // The events of one failed attempt wait for the reader by the million: what one costs
        // beside its shared reply (BACKLOG's memory, the README's figure).
        assert!(
            std::mem::size_of::<Event>() <= 128,
            "{}",
            std::mem::size_of::<Event>()
        );
    }

    #[test]
    fn an_absent_reader_holds_the_loop_once_and_loses_nothing() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let sent = AtomicU64::new(0);
        let mut pace = EventPace::default();
        let total = BACKLOG as u64 * 2;
        for n in 0..total {
            pace.send(&tx, &sent, event(n));
        }
        // Waited once for STALL (nothing taken), then not again: every event is there, in
        // order.
        assert_eq!(pace.stalled_at, Some(0));
        assert_eq!(sent.load(Ordering::Acquire), total);
        let ids: Vec<u64> = rx.try_iter().map(|e| e.message_id).collect();
        assert_eq!(ids, (0..total).collect::<Vec<_>>());
    }

    #[test]
    fn an_active_reader_keeps_the_backlog_bounded_and_sees_every_event() {
        let (tx, rx) = crossbeam_channel::unbounded::<Event>();
        let total = BACKLOG as u64 * 4;
        let reader = std::thread::spawn(move || {
            let mut most = 0;
            let mut ids = Vec::new();
            while let Ok(e) = rx.recv() {
                most = most.max(rx.len());
                ids.push(e.message_id);
            }
            (most, ids)
        });
        // A reader thread that the machine does not run for a while is not a stalled reader.
        let mut pace = EventPace {
            stall: Duration::from_secs(60),
            stalled_at: None,
        };
        let sent = AtomicU64::new(0);
        for n in 0..total {
            pace.send(&tx, &sent, event(n));
        }
        assert_eq!(pace.stalled_at, None);
        drop(tx);
        let (most, ids) = reader.join().unwrap();
        assert_eq!(ids, (0..total).collect::<Vec<_>>());
        assert!(most <= BACKLOG, "{most} events waited at once");
    }
}
