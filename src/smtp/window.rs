//! The adaptive window of pipelined BDAT transactions on one connection: how many whole
//! transactions (MAIL, RCPTs, `BDAT <n> LAST`, content) may be in flight before their replies.
//!
//! A deep window lets many messages share one write and one read, which is what makes a fast
//! server cheap to feed; but a server that works through a burst one message at a time (Postfix
//! `smtpd` hands each message to `cleanup` and answers a pipelined burst only once it has read
//! it all) just holds the replies longer, and a deep window then only delays them. So the window
//! starts at four transactions (measured on par with no pipelined BDAT against Postfix) and
//! grows, in the manner of TCP Vegas, while the server keeps up: a round (a window's worth of
//! replies) whose mean reply latency stayed close to the least latency seen on the connection
//! doubles it (until the first shrink) or adds one; a round whose latency grew well beyond
//! that takes one away, down to the starting four. Latency alone never takes it lower: Postfix
//! writes the replies to MAIL and RCPT in separate segments, and with a single transaction in
//! flight its Nagle delay and the client's delayed ACK stall the connection for 40 ms at a
//! time (seen in traces), which a latency rule would answer with a still smaller window. A
//! temporary failure of MAIL or of the content (a server short of resources) halves it, down
//! to one. It never exceeds the configured maximum.
//!
//! Pure arithmetic over the durations the session measures: no clock is read here.

use std::time::Duration;

/// Latency up to `KEEP_UP_FACTOR` × the least seen (plus `KEEP_UP_SLACK`, for the scheduling
/// jitter of a busy machine) means the server kept up with the round.
const KEEP_UP_FACTOR: f64 = 1.5;
const KEEP_UP_SLACK: Duration = Duration::from_micros(500);
/// Latency beyond `BEHIND_FACTOR` × the least seen (plus `BEHIND_SLACK`) means replies are
/// being held for the window: it shrinks.
const BEHIND_FACTOR: f64 = 2.0;
const BEHIND_SLACK: Duration = Duration::from_millis(1);

/// Where the window starts, and the least that latency alone shrinks it to.
const INITIAL: usize = 4;

/// The window of one connection.
#[derive(Debug, Clone)]
pub(crate) struct BdatWindow {
    max: usize,
    current: usize,
    /// The least that latency shrinks it to.
    floor: usize,
    /// Doubling until the first sign of a server falling behind.
    slow_start: bool,
    least_latency: Option<Duration>,
    round_replies: usize,
    round_latency: Duration,
    /// The window was full at some point of this round: growing it can be judged.
    round_full: bool,
}

impl BdatWindow {
    /// A window that may grow up to `max` transactions (at least one).
    pub(crate) fn new(max: usize) -> Self {
        let max = max.max(1);
        BdatWindow {
            max,
            current: INITIAL.min(max),
            floor: INITIAL.min(max),
            slow_start: true,
            least_latency: None,
            round_replies: 0,
            round_latency: Duration::ZERO,
            round_full: false,
        }
    }

    /// A window already grown to its maximum, for transcripts that fill it at once.
    #[cfg(test)]
    pub(crate) fn grown(max: usize) -> Self {
        let mut w = BdatWindow::new(max);
        w.current = w.max;
        w
    }

    /// Transactions that may be in flight now.
    pub(crate) fn current(&self) -> usize {
        self.current
    }

    /// The window is full: no further transaction went out for want of room.
    pub(crate) fn note_full(&mut self) {
        self.round_full = true;
    }

    /// The reply that ends a pipelined transaction arrived `latency` after its content was
    /// written. At the end of a round, the window grows, holds or shrinks.
    pub(crate) fn on_reply(&mut self, latency: Duration) {
        let least = *self.least_latency.get_or_insert(latency);
        if latency < least {
            self.least_latency = Some(latency);
        }
        self.round_replies += 1;
        self.round_latency += latency;
        if self.round_replies < self.current {
            return;
        }
        let least = self.least_latency.unwrap_or(latency);
        let mean = self.round_latency / self.round_replies as u32;
        if mean > least.mul_f64(BEHIND_FACTOR) + BEHIND_SLACK {
            self.slow_start = false;
            if self.current > self.floor {
                self.current -= 1;
            }
        } else if self.round_full && mean <= least.mul_f64(KEEP_UP_FACTOR) + KEEP_UP_SLACK {
            let step = if self.slow_start { self.current } else { 1 };
            self.current = (self.current + step).min(self.max);
        }
        self.new_round();
    }

    /// A temporary failure of MAIL or of the content: the server may be short of resources.
    pub(crate) fn on_failure(&mut self) {
        self.slow_start = false;
        self.current = (self.current / 2).max(1);
        self.new_round();
    }

    fn new_round(&mut self) {
        self.round_replies = 0;
        self.round_latency = Duration::ZERO;
        self.round_full = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Runs one full round with every reply at `latency`.
    fn round(w: &mut BdatWindow, latency: Duration) {
        w.note_full();
        for _ in 0..w.current() {
            w.on_reply(latency);
        }
    }

    #[test]
    fn grows_by_doubling_to_the_maximum_while_the_server_keeps_up() {
        let mut w = BdatWindow::new(32);
        let mut seen = vec![w.current()];
        for _ in 0..5 {
            round(&mut w, Duration::from_micros(200));
            seen.push(w.current());
        }
        assert_eq!(seen, [4, 8, 16, 32, 32, 32]);
    }

    #[test]
    fn does_not_grow_when_the_window_was_never_full() {
        let mut w = BdatWindow::new(32);
        for _ in 0..20 {
            w.on_reply(ms(1));
        }
        assert_eq!(w.current(), 4);
    }

    #[test]
    fn settles_where_a_server_holds_replies_for_the_burst() {
        // A server that takes 2 ms per message and answers a burst once it has all of it: a
        // window of w sees w × 2 ms.
        let mut w = BdatWindow::new(64);
        let mut seen = Vec::new();
        for _ in 0..12 {
            let latency = ms(2) * w.current() as u32;
            round(&mut w, latency);
            seen.push(w.current());
        }
        // 4 → 8 (8 ms, then 16 ms: neither kept up nor fallen behind), and it stays there.
        assert_eq!(seen, [8; 12]);
        // A server that slows down: one fewer each round, but latency alone never goes
        // below the starting window.
        let mut seen = Vec::new();
        for _ in 0..6 {
            round(&mut w, ms(40));
            seen.push(w.current());
        }
        assert_eq!(seen, [7, 6, 5, 4, 4, 4]);
    }

    #[test]
    fn additive_after_the_first_shrink_and_halved_on_failure() {
        let mut w = BdatWindow::new(64);
        for _ in 0..2 {
            round(&mut w, Duration::from_micros(100));
        }
        assert_eq!(w.current(), 16);
        round(&mut w, ms(5));
        assert_eq!(w.current(), 15);
        round(&mut w, Duration::from_micros(100));
        assert_eq!(w.current(), 16);
        w.on_failure();
        assert_eq!(w.current(), 8);
        for _ in 0..10 {
            w.on_failure();
        }
        assert_eq!(w.current(), 1);
        // From there it grows again, one at a time, while the server keeps up.
        round(&mut w, Duration::from_micros(100));
        assert_eq!(w.current(), 2);
    }

    #[test]
    fn never_exceeds_a_small_maximum() {
        let mut w = BdatWindow::new(3);
        for _ in 0..5 {
            round(&mut w, Duration::from_micros(100));
        }
        assert_eq!(w.current(), 3);
        assert_eq!(BdatWindow::new(0).current(), 1);
    }
}
