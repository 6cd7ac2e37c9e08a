//! Per-destination message rates shared by every node through Redis: a GCRA in a Lua script,
//! taken in batches, and a shared "slow down".
//!
//! The engine's shaper draws a permit per message from a [`PermitPool`]; this limiter's thread
//! refills each pool that ran dry with one script call that grants up to a tenth of a second's
//! budget (the GCRA's burst) at once, so Redis sees one round trip per batch, not per message.
//! A 421 on one node halves the destination's shared rate for every node for a while (the
//! factor lives in Redis and expires). Nothing here runs on an engine loop.

use super::leases::LeaseKeeper;
use super::{Keys, Link, Target};
use crate::engine::shaping::{ConnectionLeases, PermitPool, SharedLimiter};
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a shared throttle halves a destination's rate (each new one halves it again).
const THROTTLE_FOR: Duration = Duration::from_secs(60);

/// KEYS: the GCRA's theoretical arrival time, the throttle factor. ARGV: interval (ms),
/// burst, permits wanted, "1" when a throttle is reported, throttle lifetime (ms).
/// Returns {granted, ms until the next permit}. Time is the server's, the same for every node.
const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local factor = tonumber(redis.call('GET', KEYS[2]) or '1')
if ARGV[4] == '1' then
  factor = math.max(factor / 2, 0.01)
  redis.call('SET', KEYS[2], tostring(factor), 'PX', ARGV[5])
end
local interval = tonumber(ARGV[1]) / factor
local burst = tonumber(ARGV[2])
local tolerance = interval * (burst - 1)
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local room = math.floor((now + tolerance - tat) / interval) + 1
local granted = math.max(0, math.min(tonumber(ARGV[3]), room))
if granted > 0 then
  tat = tat + granted * interval
  redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil(tat - now + tolerance) + 1000)
end
local wait = math.max(0, tat - tolerance - now)
return {granted, math.ceil(wait)}
"#;

#[derive(Debug)]
struct Shared {
    pool: Arc<PermitPool>,
    per_second: f64,
    gcra_key: String,
    throttle_key: String,
    /// No permit before this (the script said so).
    not_before: Option<Instant>,
}

/// The shared limiter: pools by destination and the thread that fills them.
#[derive(Debug)]
pub struct RedisLimiter {
    pools: Arc<Mutex<HashMap<String, Shared>>>,
    thread: std::thread::Thread,
    keys: Keys,
    /// The connection leases of this node (see [`super::leases`]).
    pub leases: Arc<LeaseKeeper>,
}

impl RedisLimiter {
    /// Starts the refilling thread (it runs as long as the process and holds no engine state)
    /// and the lease thread of node `node`, whose leases live `lease_ttl` unless renewed.
    pub fn start(target: Target, keys: Keys, node: &str, lease_ttl: Duration) -> Arc<RedisLimiter> {
        let leases = LeaseKeeper::start(target.clone(), keys.clone(), node.to_string(), lease_ttl);
        let pools: Arc<Mutex<HashMap<String, Shared>>> = Arc::default();
        let thread_pools = Arc::clone(&pools);
        let thread_keys = keys.clone();
        let handle = std::thread::Builder::new()
            .name("mxpipe-limits".into())
            .spawn(move || refill(target, thread_keys, thread_pools))
            .expect("spawn the limiter thread");
        Arc::new(RedisLimiter {
            pools,
            thread: handle.thread().clone(),
            keys,
            leases,
        })
    }
}

impl SharedLimiter for RedisLimiter {
    fn pool(&self, destination: &str, per_second: f64) -> Arc<PermitPool> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let keys_prefix = destination.to_string();
        let shared = pools.entry(keys_prefix).or_insert_with(|| {
            let pool = Arc::new(PermitPool::default());
            let _ = pool.refiller.set(self.thread.clone());
            Shared {
                pool,
                per_second,
                gcra_key: String::new(),
                throttle_key: String::new(),
                not_before: None,
            }
        });
        shared.per_second = shared.per_second.min(per_second);
        Arc::clone(&shared.pool)
    }

    fn connections(&self, destination: &str, max: usize) -> Option<Arc<ConnectionLeases>> {
        Some(self.leases.connections(&self.keys, destination, max))
    }
}

/// Permits asked for at once: a tenth of a second's budget (the burst), 1 to 100.
fn batch_for(per_second: f64) -> u64 {
    ((per_second / 10.0).ceil() as u64).clamp(1, 100)
}

fn refill(target: Target, keys: Keys, pools: Arc<Mutex<HashMap<String, Shared>>>) {
    let mut link = Link::new(target, &keys);
    let script = redis::Script::new(GCRA);
    let never = AtomicBool::new(false);
    loop {
        let mut next_wake: Option<Instant> = None;
        let work: Vec<(String, Arc<PermitPool>, f64, bool, String, String)> = {
            let mut pools = pools.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            pools
                .iter_mut()
                .filter_map(|(name, s)| {
                    if s.gcra_key.is_empty() {
                        s.gcra_key = keys.limit(name, "gcra");
                        s.throttle_key = keys.limit(name, "throttle");
                    }
                    let throttled = s.pool.take_throttled();
                    if let Some(t) = s.not_before.filter(|&t| t > now) {
                        if !throttled {
                            next_wake = Some(next_wake.map_or(t, |w| w.min(t)));
                            return None;
                        }
                    }
                    // Refilled only when the shaper found the pool dry: an idle destination
                    // does not hoard permits.
                    let wanted = s.pool.take_wanted() && s.pool.available() == 0;
                    (wanted || throttled).then(|| {
                        (
                            name.clone(),
                            Arc::clone(&s.pool),
                            s.per_second,
                            throttled,
                            s.gcra_key.clone(),
                            s.throttle_key.clone(),
                        )
                    })
                })
                .collect()
        };
        for (name, pool, per_second, throttled, gcra_key, throttle_key) in work {
            let burst = batch_for(per_second);
            let want = if pool.available() == 0 { burst } else { 0 };
            if want > 0 && throttled {
                // Ask again after the throttle is recorded, so the grant is at the new rate.
                pool.ask();
            }
            let reply = link.call_until_done(&never, |c| {
                script
                    .key(&gcra_key)
                    .key(&throttle_key)
                    .arg(1000.0 / per_second)
                    .arg(burst)
                    .arg(want)
                    .arg(if throttled { "1" } else { "0" })
                    .arg(THROTTLE_FOR.as_millis() as u64)
                    .invoke::<(u64, u64)>(c)
            });
            let (granted, wait_ms) = match reply {
                Some(Ok(r)) => r,
                Some(Err(e)) => {
                    eprintln!("mxpipe: shared limit of {name}: {e}");
                    (0, 100)
                }
                None => (0, 100),
            };
            pool.add(granted);
            let mut pools = pools.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = pools.get_mut(&name) {
                s.not_before = (granted == 0 && want > 0)
                    .then(|| Instant::now() + Duration::from_millis(wait_ms.max(1)));
                if let Some(t) = s.not_before {
                    next_wake = Some(next_wake.map_or(t, |w| w.min(t)));
                    // The shaper keeps asking meanwhile; the grant comes when it is due.
                    pool.ask();
                }
            }
        }
        match next_wake {
            Some(t) => std::thread::park_timeout(t.saturating_duration_since(Instant::now())),
            None => std::thread::park_timeout(Duration::from_millis(200)),
        }
    }
}
