//! When to try again: exponential backoff with jitter up to a maximum age, and the heap of
//! deferred jobs ordered by due time.
//!
//! Jitter spreads the retries of recipients that failed together, so that a destination that
//! recovers is not hit by all of them at the same instant.

use super::Job;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// The retry schedule's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Delay after the first failed attempt.
    pub initial: Duration,
    /// The delay never grows past this.
    pub max_interval: Duration,
    /// Each failure multiplies the delay by this.
    pub multiplier: f64,
    /// Each delay is scaled by a random factor in `1 ± jitter`.
    pub jitter: f64,
    /// After this long since submission a recipient is given up (Expired).
    pub max_age: Duration,
}

impl Default for RetryPolicy {
    /// Like Postfix's defaults in spirit: minutes between tries, hours at most, days in all.
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_secs(300),
            max_interval: Duration::from_secs(3600),
            multiplier: 2.0,
            jitter: 0.2,
            max_age: Duration::from_secs(3 * 24 * 3600),
        }
    }
}

impl RetryPolicy {
    /// The delay before attempt `attempts + 1`, after `attempts` failed ones (at least 1).
    pub fn delay(&self, attempts: u32) -> Duration {
        let exponent = attempts.saturating_sub(1).min(60) as i32;
        let base = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        let capped = base.min(self.max_interval.as_secs_f64());
        let factor = 1.0 + self.jitter * (fastrand::f64() * 2.0 - 1.0);
        Duration::from_secs_f64((capped * factor).max(0.0))
    }
}

/// Deferred jobs, earliest first.
#[derive(Debug, Default)]
pub struct RetrySchedule {
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    jobs: std::collections::HashMap<u64, Job>,
    next: u64,
    recipients: usize,
}

impl RetrySchedule {
    pub fn push(&mut self, due: Instant, job: Job) {
        let key = self.next;
        self.next += 1;
        self.recipients += job.recipients.len();
        self.heap.push(Reverse((due, key)));
        self.jobs.insert(key, job);
    }

    /// When the earliest job is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((due, _))| *due)
    }

    /// Takes one job due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<Job> {
        match self.heap.peek() {
            Some(Reverse((due, _))) if *due <= now => {
                let Reverse((_, key)) = self.heap.pop()?;
                let job = self.jobs.remove(&key)?;
                self.recipients -= job.recipients.len();
                Some(job)
            }
            _ => None,
        }
    }

    /// Makes every job that `matches` due at `now` (a queue administrator's retry).
    pub fn make_due(&mut self, now: Instant, matches: impl Fn(&Job) -> bool) {
        let heap = std::mem::take(&mut self.heap);
        self.heap = heap
            .into_iter()
            .map(|Reverse((due, key))| {
                let due = match self.jobs.get(&key) {
                    Some(job) if matches(job) => due.min(now),
                    _ => due,
                };
                Reverse((due, key))
            })
            .collect();
    }

    /// Takes every job, due or not (shutdown).
    pub fn drain_all(&mut self) -> Vec<Job> {
        self.heap.clear();
        self.recipients = 0;
        self.jobs.drain().map(|(_, j)| j).collect()
    }

    /// Recipients waiting for a retry.
    pub fn recipients(&self) -> usize {
        self.recipients
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let p = RetryPolicy {
            initial: Duration::from_secs(10),
            max_interval: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: 0.1,
            max_age: Duration::from_secs(600),
        };
        for _ in 0..100 {
            let d1 = p.delay(1).as_secs_f64();
            assert!((9.0..=11.0).contains(&d1), "{d1}");
            let d3 = p.delay(3).as_secs_f64();
            assert!((36.0..=44.0).contains(&d3), "{d3}");
            let d9 = p.delay(9).as_secs_f64();
            assert!((54.0..=66.0).contains(&d9), "{d9}");
        }
        let spread: std::collections::HashSet<u64> =
            (0..50).map(|_| p.delay(1).as_millis() as u64).collect();
        assert!(spread.len() > 10, "retries must not be synchronised");
    }
}
