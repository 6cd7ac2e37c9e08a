//! Per-destination connection limits shared by every node through Redis: leases.
//!
//! A node holds a number of leases per destination (a field of the hash
//! `{NS}:limit:DEST:conns`, node name to count) and opens a connection only while it has fewer
//! open than it holds. A Lua script sets what a node holds, in one round trip: at most what
//! the destination's limit leaves after every other live node's leases. Each node's leases live
//! until a time in the sorted set `{NS}:limit:DEST:conns:alive` (the server's clock); this
//! module's thread renews them every third of the time to live, so a node killed -9 loses them
//! once the time to live has passed and the others take them over. Leases are taken in small
//! batches (a quarter of the limit) when the engine wants one, and given back when connections
//! close. Nothing here runs on an engine loop.

use super::{Keys, Link, Target};
use crate::engine::shaping::ConnectionLeases;
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// KEYS: the holders (hash node -> count), their lives (sorted set node -> expiry in ms).
/// ARGV: node, leases wanted, the destination's limit, time to live (ms).
/// Forgets the nodes whose leases expired, then holds for this node as many as it wants within
/// what the others leave; returns that number.
const LEASE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, node in ipairs(dead) do
  redis.call('HDEL', KEYS[1], node)
  redis.call('ZREM', KEYS[2], node)
end
local others = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if all[i] ~= ARGV[1] then others = others + tonumber(all[i + 1]) end
end
local ttl = tonumber(ARGV[4])
local held = math.max(0, math.min(tonumber(ARGV[2]), tonumber(ARGV[3]) - others))
if held > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], held)
  redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
else
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
end
redis.call('PEXPIRE', KEYS[1], ttl * 2)
redis.call('PEXPIRE', KEYS[2], ttl * 2)
return held
"#;

/// Unused leases are given back once they stayed unused this long (the engine often opens the
/// connection a lease was taken for a moment later).
const GIVE_BACK_AFTER: Duration = Duration::from_millis(200);

/// After an ask that other nodes' leases left short, the next one waits this long.
const RETRY_REFUSED: Duration = Duration::from_millis(20);

#[derive(Debug)]
struct Destination {
    leases: Arc<ConnectionLeases>,
    max: usize,
    holders_key: String,
    alive_key: String,
    renewed: Instant,
    /// Since when more leases are held than connections open.
    surplus_since: Option<Instant>,
    /// No new ask before this (the last one was refused for want of leases).
    quiet_until: Option<Instant>,
}

/// The leases of this node, by destination, and the thread that keeps them.
#[derive(Debug)]
pub struct LeaseKeeper {
    destinations: Arc<Mutex<HashMap<String, Destination>>>,
    thread: std::thread::Thread,
    stop: Arc<AtomicBool>,
    joined: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl LeaseKeeper {
    /// Starts the thread that takes, renews and gives back the leases of `node`, each living
    /// `ttl` unless renewed.
    pub fn start(target: Target, keys: Keys, node: String, ttl: Duration) -> Arc<LeaseKeeper> {
        let destinations: Arc<Mutex<HashMap<String, Destination>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let keeper = Keeper {
            link: Link::new(target, &keys),
            script: redis::Script::new(LEASE),
            node,
            ttl,
            destinations: Arc::clone(&destinations),
            stop: Arc::clone(&stop),
        };
        let handle = std::thread::Builder::new()
            .name("mxpipe-leases".into())
            .spawn(move || keeper.run())
            .expect("spawn the lease thread");
        Arc::new(LeaseKeeper {
            destinations,
            thread: handle.thread().clone(),
            stop,
            joined: Mutex::new(Some(handle)),
        })
    }

    /// The leases of `destination`, whose connections are limited to `max` over every node.
    pub fn connections(&self, keys: &Keys, destination: &str, max: usize) -> Arc<ConnectionLeases> {
        let mut destinations = self.destinations.lock().unwrap_or_else(|e| e.into_inner());
        let d = destinations
            .entry(destination.to_string())
            .or_insert_with(|| {
                let leases = Arc::new(ConnectionLeases::default());
                let _ = leases.refiller.set(self.thread.clone());
                Destination {
                    leases,
                    max,
                    holders_key: keys.limit(destination, "conns"),
                    alive_key: keys.limit(destination, "conns:alive"),
                    renewed: Instant::now(),
                    surplus_since: None,
                    quiet_until: None,
                }
            });
        d.max = d.max.min(max);
        Arc::clone(&d.leases)
    }

    /// Gives back every lease (the node stops) and ends the thread, waiting for it; a lease
    /// that cannot be given back now (Redis is away) expires after its time to live.
    pub fn release_all(&self) {
        let mut destinations = self.destinations.lock().unwrap_or_else(|e| e.into_inner());
        for d in destinations.values_mut() {
            d.max = 0;
        }
        drop(destinations);
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.thread.unpark();
        let handle = self.joined.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

struct Keeper {
    link: Link,
    script: redis::Script,
    node: String,
    ttl: Duration,
    destinations: Arc<Mutex<HashMap<String, Destination>>>,
    stop: Arc<AtomicBool>,
}

impl Keeper {
    fn run(mut self) {
        let renew_every = self.ttl / 3;
        loop {
            let stopping = self.stop.load(std::sync::atomic::Ordering::Acquire);
            let now = Instant::now();
            let mut next_wake = now + renew_every.min(Duration::from_millis(100));
            // What each destination should hold now, decided under the lock, asked outside it.
            let asks: Vec<Ask> = {
                let mut destinations = self.destinations.lock().unwrap_or_else(|e| e.into_inner());
                destinations
                    .iter_mut()
                    .filter_map(|(name, d)| {
                        let target = d.target(now, stopping, &mut next_wake);
                        let granted = d.leases.granted();
                        let renew = granted > 0 && now.duration_since(d.renewed) >= renew_every;
                        (target != granted || renew).then(|| {
                            d.renewed = now;
                            Ask {
                                name: name.clone(),
                                leases: Arc::clone(&d.leases),
                                target,
                                max: d.max as u64,
                                holders_key: d.holders_key.clone(),
                                alive_key: d.alive_key.clone(),
                            }
                        })
                    })
                    .collect()
            };
            for ask in asks {
                // Retried while Redis is away, until the node stops.
                let reply = self.link.call_until_done(&self.stop, |c| {
                    self.script
                        .key(&ask.holders_key)
                        .key(&ask.alive_key)
                        .arg(&self.node)
                        .arg(ask.target)
                        .arg(ask.max)
                        .arg(self.ttl.as_millis() as u64)
                        .invoke::<u64>(c)
                });
                match reply {
                    Some(Ok(held)) => {
                        ask.leases.set_granted(held);
                        if held < ask.target {
                            // Other nodes hold the rest: ask again a little later, not at the
                            // pace of the engine's polls.
                            let quiet = Instant::now() + RETRY_REFUSED;
                            next_wake = next_wake.min(quiet);
                            let mut destinations =
                                self.destinations.lock().unwrap_or_else(|e| e.into_inner());
                            if let Some(d) = destinations.get_mut(&ask.name) {
                                d.quiet_until = Some(quiet);
                            }
                        }
                    }
                    Some(Err(e)) => eprintln!("mxpipe: connection leases of {}: {e}", ask.name),
                    None => {}
                }
            }
            if stopping {
                return;
            }
            std::thread::park_timeout(next_wake.saturating_duration_since(Instant::now()));
        }
    }
}

/// One call of the script to make.
struct Ask {
    name: String,
    leases: Arc<ConnectionLeases>,
    target: u64,
    max: u64,
    holders_key: String,
    alive_key: String,
}

impl Destination {
    /// How many leases this node should hold now.
    fn target(&mut self, now: Instant, stopping: bool, next_wake: &mut Instant) -> u64 {
        if stopping {
            return 0;
        }
        let max = self.max as u64;
        let (granted, open) = (self.leases.granted(), self.leases.open());
        let quiet = self.quiet_until.filter(|&t| t > now);
        if let Some(t) = quiet {
            *next_wake = (*next_wake).min(t);
        }
        if quiet.is_none() && self.leases.take_wanted() && granted < max {
            self.surplus_since = None;
            // A batch at once: a quarter of the limit, at least one.
            return (granted.max(open) + max.div_ceil(4).max(1)).min(max);
        }
        if granted <= open {
            self.surplus_since = None;
            return granted;
        }
        let since = *self.surplus_since.get_or_insert(now);
        if now.duration_since(since) >= GIVE_BACK_AFTER {
            self.surplus_since = None;
            open
        } else {
            *next_wake = (*next_wake).min(since + GIVE_BACK_AFTER);
            granted
        }
    }
}
