//! Scale-out through Redis: several nodes share work, deferred recipients and outcomes.
//!
//! Redis is a source and a limiter, not a second engine: a [`node::Node`] reads submissions
//! from a stream through a consumer group ([`work`]), hands them to its local
//! [`Dispatcher`](crate::engine::Dispatcher), and writes every final outcome and deferral back
//! in batches (one atomic pipeline per flush). An entry is acknowledged (`XACK`) only when every
//! recipient in it is final or handed back to Redis; per-recipient finals of an entry that is
//! only partly done are kept in a hash, so that a node that claims a dead node's entries
//! (`XAUTOCLAIM`) delivers only what is not final yet. Long deferrals go to a sorted set by due
//! time, which any node takes from.
//!
//! Every key carries the hash tag `{NAMESPACE}`, so that the same code runs on one Redis server
//! and on a Redis Cluster (every key in one slot; scripts and pipelines stay legal). Nothing
//! here runs on an engine loop thread: the node's threads make blocking calls of their own.

pub mod leases;
pub mod limits;
pub mod node;
pub mod outcome;
pub mod produce;
pub mod work;

use redis::{ConnectionLike, RedisResult};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Where the work, the bodies, the deferrals and the outcomes live.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `{namespace}:` (the braces are the hash tag).
    pub fn new(namespace: &str) -> Keys {
        Keys {
            prefix: format!("{{{namespace}}}:"),
        }
    }

    /// The stream of submissions.
    pub fn work(&self) -> String {
        format!("{}work", self.prefix)
    }

    /// The consumer group every node reads the work stream through.
    pub const GROUP: &'static str = "nodes";

    /// A body stored once under a name (`body_ref` in an entry).
    pub fn body(&self, name: &str) -> String {
        format!("{}body:{name}", self.prefix)
    }

    /// The per-recipient finals of an entry that is not done yet.
    pub fn done(&self, entry: &str) -> String {
        format!("{}done:{entry}", self.prefix)
    }

    /// Deferred recipients by due time (score: milliseconds since the epoch).
    pub fn deferred(&self) -> String {
        format!("{}deferred", self.prefix)
    }

    /// What each deferred recipient needs to be tried again (JSON by member).
    pub fn deferred_data(&self) -> String {
        format!("{}deferred:data", self.prefix)
    }

    /// Adds to `pipe` the removal of deferred recipients `members` (their entry in the sorted
    /// set and their data), replies ignored.
    pub fn unpark<M: redis::ToRedisArgs>(&self, pipe: &mut redis::Pipeline, members: M) {
        pipe.cmd("ZREM")
            .arg(self.deferred())
            .arg(&members)
            .ignore()
            .cmd("HDEL")
            .arg(self.deferred_data())
            .arg(&members)
            .ignore();
    }

    /// A shared limit's state for a destination (`what`: gcra, throttle).
    pub fn limit(&self, destination: &str, what: &str) -> String {
        format!("{}limit:{destination}:{what}", self.prefix)
    }

    /// The stream of outcomes (final ones and deferrals).
    pub fn outcomes(&self) -> String {
        format!("{}outcomes", self.prefix)
    }
}

/// How to reach Redis: one server, or the seed nodes of a Redis Cluster.
#[derive(Debug, Clone)]
pub struct Target {
    pub urls: Vec<String>,
    pub cluster: bool,
}

impl Target {
    /// Opens a connection to the server that holds `key` (every key of a namespace shares its
    /// hash tag, so on a Redis Cluster that is one master for all of them): there, pipelines
    /// and MULTI/EXEC work as on a single server. A MOVED reply later (a resharding, a
    /// failover) counts as a connection error, and the next call looks the owner up again.
    pub fn connect(&self, key: &str) -> RedisResult<Box<dyn ConnectionLike + Send>> {
        let mut last = None;
        for url in &self.urls {
            match self.connect_via(url, key) {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "no Redis URL"))
        }))
    }

    fn connect_via(&self, url: &str, key: &str) -> RedisResult<Box<dyn ConnectionLike + Send>> {
        let timeout = Duration::from_secs(2);
        let info = redis::IntoConnectionInfo::into_connection_info(url)?;
        let mut conn = redis::Client::open(info.clone())?.get_connection_with_timeout(timeout)?;
        if !self.cluster {
            return Ok(Box::new(conn));
        }
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut conn)?;
        let ranges: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query(&mut conn)?;
        for range in ranges {
            let redis::Value::Array(fields) = range else {
                continue;
            };
            let (Some(redis::Value::Int(start)), Some(redis::Value::Int(end))) =
                (fields.first(), fields.get(1))
            else {
                continue;
            };
            if !(*start..=*end).contains(&slot) {
                continue;
            }
            if let Some(redis::Value::Array(master)) = fields.get(2) {
                let host = match master.first() {
                    Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                    _ => break,
                };
                let Some(redis::Value::Int(port)) = master.get(1) else {
                    break;
                };
                let addr = redis::ConnectionAddr::Tcp(host, *port as u16);
                let owner = redis::Client::open(info.set_addr(addr))?;
                return Ok(Box::new(owner.get_connection_with_timeout(timeout)?));
            }
        }
        Err(redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown),
            "no master serves the slot of the namespace",
        )))
    }
}

/// A connection that reopens itself: a call that fails on the connection drops it, and the
/// next call connects again. Counts round trips (one per command or pipeline sent).
pub struct Link {
    target: Target,
    conn: Option<Box<dyn ConnectionLike + Send>>,
    /// A key of the namespace: on a cluster, the connection goes to the master that holds it.
    probe: String,
    round_trips: &'static AtomicU64,
}

/// Round trips to Redis made by this process.
pub static ROUND_TRIPS: AtomicU64 = AtomicU64::new(0);

impl Link {
    pub fn new(target: Target, keys: &Keys) -> Link {
        Link {
            target,
            conn: None,
            probe: keys.work(),
            round_trips: &ROUND_TRIPS,
        }
    }

    /// Runs `f` on the connection (connecting first if needed), once.
    pub fn call<T>(
        &mut self,
        f: impl FnOnce(&mut dyn ConnectionLike) -> RedisResult<T>,
    ) -> RedisResult<T> {
        if self.conn.is_none() {
            self.conn = Some(self.target.connect(&self.probe)?);
        }
        let conn = self.conn.as_mut().expect("connected above");
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        let result = f(conn.as_mut());
        if let Err(e) = &result {
            if is_connection_error(e) {
                self.conn = None;
            }
        }
        result
    }

    /// Runs `f` until it succeeds, reconnecting with a growing pause (up to 1 s) after a
    /// connection error, until `stop` is set (then `None`). Any other error is returned at once.
    pub fn call_until_done<T>(
        &mut self,
        stop: &AtomicBool,
        mut f: impl FnMut(&mut dyn ConnectionLike) -> RedisResult<T>,
    ) -> Option<RedisResult<T>> {
        let mut pause = Duration::from_millis(50);
        loop {
            match self.call(&mut f) {
                Err(e) if is_connection_error(&e) => {
                    if stop.load(Ordering::Acquire) {
                        return None;
                    }
                    eprintln!("mxpipe: redis: {e}; reconnecting");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                other => return Some(other),
            }
        }
    }
}

/// Whether an error means the connection (or the server behind it) is gone, rather than a
/// command being wrong.
pub fn is_connection_error(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_cluster_error()
        || matches!(
            e.kind(),
            redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading)
                | redis::ErrorKind::Server(redis::ServerErrorKind::TryAgain)
                | redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown)
                | redis::ErrorKind::Server(redis::ServerErrorKind::MasterDown)
                | redis::ErrorKind::Server(redis::ServerErrorKind::Moved)
                | redis::ErrorKind::Server(redis::ServerErrorKind::Ask)
        )
}
