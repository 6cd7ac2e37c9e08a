//! The MX resolver's memory: each domain's last [`Resolution`] (and each MX host's address
//! answers), kept until its DNS TTL runs out.
//!
//! It lives on the resolver thread alone (no locks) and is bounded: at capacity, expired entries
//! go first, then the entry closest to expiry. It must never hand out an entry past its expiry
//! and never grow past its capacity; it performs no I/O and reads no clock (callers pass `now`).

use super::Resolution;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Instant;

/// Domain → resolution, each until an expiry instant.
pub(super) type ResolutionCache = ExpiringCache<Resolution>;

/// Key → value, each until an expiry instant.
#[derive(Debug)]
pub(super) struct ExpiringCache<V> {
    capacity: usize,
    entries: HashMap<String, Entry<V>>,
    /// Every entry's expiry, soonest first. An element whose expiry no longer matches its
    /// domain's entry is stale (the entry was replaced or removed) and is skipped when popped.
    expiries: BinaryHeap<Reverse<(Instant, String)>>,
}

#[derive(Debug)]
struct Entry<V> {
    resolution: V,
    expires: Instant,
}

impl<V> ExpiringCache<V> {
    /// A cache holding at most `capacity` domains; 0 keeps nothing.
    pub(super) fn new(capacity: usize) -> Self {
        ExpiringCache {
            capacity,
            entries: HashMap::new(),
            expiries: BinaryHeap::new(),
        }
    }

    /// The resolution of `domain` when it has not expired at `now`.
    pub(super) fn get(&self, domain: &str, now: Instant) -> Option<&V> {
        self.entries
            .get(domain)
            .filter(|entry| entry.expires > now)
            .map(|entry| &entry.resolution)
    }

    /// Like [`ExpiringCache::get`], with the instant the value expires.
    pub(super) fn get_until(&self, domain: &str, now: Instant) -> Option<(&V, Instant)> {
        self.entries
            .get(domain)
            .filter(|entry| entry.expires > now)
            .map(|entry| (&entry.resolution, entry.expires))
    }

    /// Remembers `resolution` for `domain` until `expires`, making room when the cache is full.
    pub(super) fn insert(&mut self, domain: String, resolution: V, expires: Instant, now: Instant) {
        self.remove_expired(now);
        if self.capacity == 0 || expires <= now {
            self.entries.remove(&domain);
            return;
        }
        if !self.entries.contains_key(&domain) && self.entries.len() >= self.capacity {
            self.evict_soonest();
        }
        self.expiries.push(Reverse((expires, domain.clone())));
        self.entries.insert(
            domain,
            Entry {
                resolution,
                expires,
            },
        );
        // Replaced and removed entries leave stale heap elements behind; rebuilding once they
        // outnumber the live ones keeps the heap within a constant factor of the capacity.
        if self.expiries.len() > 2 * self.entries.len() + 16 {
            self.expiries = self
                .entries
                .iter()
                .map(|(domain, entry)| Reverse((entry.expires, domain.clone())))
                .collect();
        }
    }

    /// How many domains are cached, expired or not.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn remove_expired(&mut self, now: Instant) {
        while let Some(Reverse((expires, _))) = self.expiries.peek() {
            if *expires > now {
                break;
            }
            if let Some(Reverse((expires, domain))) = self.expiries.pop() {
                self.remove_if_expires_at(&domain, expires);
            }
        }
    }

    fn evict_soonest(&mut self) {
        while let Some(Reverse((expires, domain))) = self.expiries.pop() {
            if self.remove_if_expires_at(&domain, expires) {
                return;
            }
        }
    }

    /// Removes `domain` if its entry is the one that expires at `expires` (not a newer one).
    fn remove_if_expires_at(&mut self, domain: &str, expires: Instant) -> bool {
        let current = self
            .entries
            .get(domain)
            .is_some_and(|e| e.expires == expires);
        if current {
            self.entries.remove(domain);
        }
        current
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn temp(text: &str) -> Resolution {
        Resolution::TempFail(text.to_string())
    }

    #[test]
    fn entries_expire() {
        let now = Instant::now();
        let mut cache = ResolutionCache::new(10);
        cache.insert(
            "a.test".into(),
            temp("a"),
            now + Duration::from_secs(5),
            now,
        );
        assert_eq!(cache.get("a.test", now), Some(&temp("a")));
        assert_eq!(cache.get("a.test", now + Duration::from_secs(5)), None);
        assert_eq!(cache.get("b.test", now), None);
    }

    #[test]
    fn already_expired_answers_are_not_kept_and_replace_older_ones() {
        let now = Instant::now();
        let mut cache = ResolutionCache::new(10);
        cache.insert(
            "a.test".into(),
            temp("old"),
            now + Duration::from_secs(5),
            now,
        );
        cache.insert("a.test".into(), temp("ttl 0"), now, now);
        assert_eq!(cache.get("a.test", now), None);
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn full_cache_drops_expired_then_soonest_to_expire() {
        let now = Instant::now();
        let secs = |s| now + Duration::from_secs(s);
        let mut cache = ResolutionCache::new(2);
        cache.insert("long.test".into(), temp("long"), secs(100), now);
        cache.insert("short.test".into(), temp("short"), secs(10), now);
        cache.insert("new.test".into(), temp("new"), secs(50), now);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get("short.test", now), None);
        assert!(cache.get("long.test", now).is_some());
        assert!(cache.get("new.test", now).is_some());

        // Later, "new" has expired: it goes, and "long" stays.
        let later = secs(60);
        cache.insert("next.test".into(), temp("next"), secs(200), later);
        assert_eq!(cache.len(), 2);
        assert!(cache.get("long.test", later).is_some());
        assert!(cache.get("next.test", later).is_some());
    }

    #[test]
    fn replacing_an_entry_keeps_the_newest_and_the_heap_bounded() {
        let now = Instant::now();
        let secs = |s| now + Duration::from_secs(s);
        let mut cache = ResolutionCache::new(3);
        for i in 0..1000u64 {
            cache.insert("a.test".into(), temp(&i.to_string()), secs(10 + i), now);
        }
        assert_eq!(cache.get("a.test", now), Some(&temp("999")));
        assert!(cache.expiries.len() <= 2 * cache.len() + 17);

        // A stale heap element of "a.test" (expiring at 10 s) is the soonest; it must not evict
        // the live entry (1000 s): "b.test" is the one to go.
        let mut cache = ResolutionCache::new(3);
        cache.insert("a.test".into(), temp("old"), secs(10), now);
        cache.insert("a.test".into(), temp("999"), secs(1000), now);
        cache.insert("b.test".into(), temp("b"), secs(100), now);
        cache.insert("c.test".into(), temp("c"), secs(200), now);
        cache.insert("d.test".into(), temp("d"), secs(300), now);
        assert_eq!(cache.get("a.test", now), Some(&temp("999")));
        assert_eq!(cache.get("b.test", now), None);
        assert!(cache.get("c.test", now).is_some());
        assert!(cache.get("d.test", now).is_some());
    }

    #[test]
    fn capacity_zero_keeps_nothing() {
        let now = Instant::now();
        let mut cache = ResolutionCache::new(0);
        cache.insert(
            "a.test".into(),
            temp("a"),
            now + Duration::from_secs(5),
            now,
        );
        assert_eq!(cache.get("a.test", now), None);
    }
}
