//! A node: reads work from the Redis stream, delivers it with the local engine, and writes
//! outcomes back.
//!
//! Two threads of the node's own talk to Redis, never an engine loop: the reader (new entries
//! with `XREADGROUP`, a dead node's with `XAUTOCLAIM`, due deferrals from the sorted set, and a
//! heartbeat that keeps this node's entries from looking idle) and the writer (the engine's
//! events, written every `flush_every`, or sooner when the engine goes quiet, in one atomic
//! pipeline: the outcomes as one stream entry, the finals of entries still partly open, long
//! deferrals into the sorted set, `XACK` of entries whose every recipient is final or handed
//! back, and the removal of acknowledged entries from the stream, `TRIM_ACKED`). A kill loses at
//! most what was decided since the last flush and what was in a transaction: those recipients
//! are sent again by the node that claims the entry.

use super::outcome::OutcomeRecord;
use super::work::{self, Content, Entry, Recipient};
use super::{Keys, Link, Target, ROUND_TRIPS};
use crate::engine::{Dispatcher, DispatcherBuilder, Event, EventKind};
use crate::message::Body;
use redis::streams::StreamAutoClaimReply;
use redis::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A node's settings.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub target: Target,
    /// The hash tag of every key (`{mxpipe}` by default).
    pub namespace: String,
    /// This node's name in the consumer group (unique per node).
    pub consumer: String,
    /// Entries per `XREADGROUP` / `XAUTOCLAIM`.
    pub batch: usize,
    /// Recipients this node holds at most before it stops reading.
    pub max_in_flight: usize,
    /// An entry pending this long on another node (which stopped renewing it) is claimed.
    pub claim_idle: Duration,
    /// A deferral whose retry is due later than this goes back to Redis for any node.
    pub hand_off_after: Duration,
    /// How often decided outcomes are written.
    pub flush_every: Duration,
    /// Exit once nothing is pending in Redis and nothing came for this long.
    pub exit_when_idle: Option<Duration>,
    /// After a stop, how long the writer keeps trying to write the last outcomes while Redis
    /// is unreachable; then it gives up, and their entries stay pending for another node.
    pub flush_deadline: Duration,
    /// How long this node's connection leases outlive its last renewal (a node killed -9
    /// holds its share of a destination's connection limit this long).
    pub lease_ttl: Duration,
}

impl NodeConfig {
    pub fn new(target: Target, consumer: &str) -> NodeConfig {
        NodeConfig {
            target,
            namespace: "mxpipe".into(),
            consumer: consumer.into(),
            batch: 500,
            max_in_flight: 50_000,
            claim_idle: Duration::from_secs(60),
            hand_off_after: Duration::from_secs(60),
            flush_every: Duration::from_millis(100),
            exit_when_idle: None,
            lease_ttl: Duration::from_secs(30),
            flush_deadline: Duration::from_secs(10),
        }
    }
}

/// What a node did, for its summary line.
#[derive(Debug, Default)]
pub struct NodeReport {
    pub entries: AtomicU64,
    pub claimed: AtomicU64,
    pub taken_deferred: AtomicU64,
    pub recipients: AtomicU64,
    pub delivered: AtomicU64,
    pub bounced: AtomicU64,
    pub expired: AtomicU64,
    pub handed_off: AtomicU64,
    pub flushes: AtomicU64,
    /// Outcomes the node could not write before it gave up (Redis unreachable after a stop):
    /// their entries stay pending, and another node delivers them again.
    pub unwritten: AtomicU64,
    /// When the first read brought entries (milliseconds since the Unix epoch; 0: none yet),
    /// so that a bench can clock a node that drains a backlog from its first entry.
    pub first_read_ms: AtomicU64,
    /// Where the node's own threads spend their time.
    pub timings: Timings,
}

/// Wall time per stage of the node's own threads (the engine's loops not counted), in
/// microseconds, summed over the run: cheap (two clock reads per batch, none per entry).
/// With `MXPIPE_NODE_TRACE=1` in the environment each batch is also traced on stderr.
#[derive(Debug, Default)]
pub struct Timings {
    /// Waiting for `XREADGROUP` replies that brought entries (the round trip and the parse
    /// of the reply into values).
    pub read_us: AtomicU64,
    /// Reading entries from those values and submitting them to the engine (waiting for room
    /// included).
    pub start_us: AtomicU64,
    /// The writer taking events and encoding outcomes.
    pub note_us: AtomicU64,
    /// The writer's flushes to Redis (one atomic pipeline each).
    pub flush_us: AtomicU64,
}

impl Timings {
    fn add(&self, counter: &AtomicU64, d: Duration) {
        counter.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

/// Whether `MXPIPE_NODE_TRACE` asks for a line per batch on stderr.
fn tracing() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("MXPIPE_NODE_TRACE").is_some_and(|v| v != "0"))
}

/// A trace line (milliseconds since the first trace), when tracing.
fn trace(what: std::fmt::Arguments<'_>) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    if tracing() {
        let t = START.get_or_init(Instant::now).elapsed();
        eprintln!("mxpipe: node trace +{}ms {what}", t.as_millis());
    }
}

impl std::fmt::Display for NodeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        write!(
            f,
            "node entries={} claimed={} taken_deferred={} recipients={} delivered={} bounced={} \
             expired={} handed_off={} flushes={} unwritten={} round_trips={} read_ms={} \
             parse_submit_ms={} note_ms={} flush_ms={} first_read_at_ms={}",
            g(&self.entries),
            g(&self.claimed),
            g(&self.taken_deferred),
            g(&self.recipients),
            g(&self.delivered),
            g(&self.bounced),
            g(&self.expired),
            g(&self.handed_off),
            g(&self.flushes),
            g(&self.unwritten),
            ROUND_TRIPS.load(Ordering::Relaxed),
            g(&self.timings.read_us) / 1000,
            g(&self.timings.start_us) / 1000,
            g(&self.timings.note_us) / 1000,
            g(&self.timings.flush_us) / 1000,
            g(&self.first_read_ms),
        )
    }
}

/// Where a local message's recipients came from.
#[derive(Debug, Clone)]
enum Origin {
    /// An entry of the work stream.
    Entry(Arc<str>),
    /// A deferred recipient taken from the sorted set (its member).
    Deferred(String),
}

/// A message handed to the local engine.
#[derive(Debug)]
struct Sent {
    origin: Origin,
    from: String,
    recipients: Vec<Recipient>,
    /// The body's name in Redis, for a recipient handed back.
    body_ref: String,
    tag: u64,
    attempts_before: u32,
    first_ms: u64,
    left: usize,
}

/// An entry this node works on.
#[derive(Debug)]
struct OpenEntry {
    /// Recipients neither final nor handed back.
    left: usize,
    /// Some of its finals are in its `done` hash.
    has_done_hash: bool,
    /// The inline body, until it has been stored for a recipient handed back.
    inline_body: Option<Arc<Body>>,
}

#[derive(Debug, Default)]
struct State {
    sent: HashMap<u64, Sent>,
    entries: HashMap<Arc<str>, OpenEntry>,
    in_flight: usize,
    next_tag: u64,
}

/// What the writer sends in its next flush. Its buffers are kept from one flush to the next.
#[derive(Debug, Default)]
struct Batch {
    /// The outcomes as the JSON array's items, comma-separated (written in place, no value
    /// tree per outcome).
    outcomes: Vec<u8>,
    /// How many outcomes `outcomes` holds.
    outcome_count: u64,
    done: HashMap<Arc<str>, Vec<(String, &'static str)>>,
    acks: Vec<Arc<str>>,
    /// Entries acknowledged by an earlier flush, to delete from the work stream unless
    /// trimmed.
    deletes: Vec<Arc<str>>,
    drop_done: Vec<Arc<str>>,
    park: Vec<(String, u64, String)>,
    bodies: Vec<(String, Arc<Body>)>,
    unpark: Vec<String>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.outcome_count == 0
            && self.done.is_empty()
            && self.acks.is_empty()
            && self.deletes.is_empty()
            && self.park.is_empty()
            && self.unpark.is_empty()
    }

    /// Empties the batch, keeping the outcome buffer's capacity.
    fn clear(&mut self) {
        let mut outcomes = std::mem::take(&mut self.outcomes);
        outcomes.clear();
        *self = Batch {
            outcomes,
            ..Batch::default()
        };
    }

    /// Appends one outcome to the JSON array.
    fn push_outcome(&mut self, record: &OutcomeRecord<'_>) {
        if self.outcome_count > 0 {
            self.outcomes.push(b',');
        }
        serde_json::to_writer(&mut self.outcomes, record).expect("an outcome serialises");
        self.outcome_count += 1;
    }
}

/// How often the writer looks at the events waiting.
const WRITER_POLL: Duration = Duration::from_millis(5);
/// The least time between two flushes made because the engine went quiet.
const QUIET_FLUSH: Duration = Duration::from_millis(20);
/// How long an acknowledged entry waits for a trim (`TRIM_ACKED`) before it is deleted by ID.
const LAZY_DELETE: Duration = Duration::from_secs(2);

/// Removes acknowledged entries from the work stream (KEYS[1]; ARGV[1]: the group): first
/// every entry older than the oldest one pending in the group (or, when none is pending, up to
/// the last one the group read) with one `XTRIM MINID`, which drops whole nodes of the stream
/// at once; then, by ID, those of ARGV[2..] (acknowledged entries) the trim did not reach.
/// `XDEL` alone costs Redis several microseconds per entry (it walks the stream node for
/// each); entries acknowledged a little while ago are nearly all behind the oldest pending one.
/// Returns {trimmed, deleted, the trim's MINID or ""}: every entry below that ID is gone
/// (the point only moves forward), so the node sends no ID below it again.
const TRIM_ACKED: &str = r#"
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local minid
local pending = redis.pcall('XPENDING', KEYS[1], ARGV[1])
if type(pending) == 'table' and not pending.err then
  if tonumber(pending[1]) > 0 then
    minid = pending[2]
  else
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
      local name, last
      for i = 1, #g, 2 do
        if g[i] == 'name' then name = g[i + 1] end
        if g[i] == 'last-delivered-id' then last = g[i + 1] end
      end
      if name == ARGV[1] and last then
        local ms, seq = string.match(last, '^(%d+)-(%d+)$')
        if ms and #seq < 14 then
          minid = ms .. '-' .. string.format('%d', tonumber(seq) + 1)
        elseif ms then
          minid = last
        end
      end
    end
  end
end
local trimmed = 0
local mms, mseq
if minid then
  trimmed = redis.call('XTRIM', KEYS[1], 'MINID', minid)
  mms, mseq = parse(minid)
end
local deleted, batch = 0, {}
for i = 2, #ARGV do
  local ms, seq = parse(ARGV[i])
  if not mms or not ms or ms > mms or (ms == mms and seq >= mseq) then
    batch[#batch + 1] = ARGV[i]
    if #batch == 500 then
      deleted = deleted + redis.call('XDEL', KEYS[1], unpack(batch))
      batch = {}
    end
  end
end
if #batch > 0 then
  deleted = deleted + redis.call('XDEL', KEYS[1], unpack(batch))
end
return {trimmed, deleted, minid or ''}
"#;

/// Takes up to ARGV[2] due members and leases them for ARGV[3] ms (they come back if this
/// node dies before their outcome is written).
const TAKE_DUE: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[3]), member)
  out[#out + 1] = member
  out[#out + 1] = redis.call('HGET', KEYS[2], member) or ''
end
return out
"#;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A running node.
pub struct Node {
    config: NodeConfig,
    keys: Keys,
    dispatcher: Arc<Dispatcher>,
    state: Arc<Mutex<State>>,
    report: Arc<NodeReport>,
    max_age: Duration,
    limiter: Arc<super::limits::RedisLimiter>,
}

impl Node {
    /// Starts the local engine from `builder` (deferrals longer than `hand_off_after` leave
    /// it for Redis) and checks that Redis answers, creating the consumer group if needed.
    pub fn start(config: NodeConfig, mut builder: DispatcherBuilder) -> Result<Node, String> {
        let engine = builder.config_mut();
        engine.hand_off_deferrals = Some(config.hand_off_after);
        engine.record_events = true;
        let max_age = engine.retry.max_age;
        let keys = Keys::new(&config.namespace);
        let limiter = super::limits::RedisLimiter::start(
            config.target.clone(),
            keys.clone(),
            &config.consumer,
            config.lease_ttl,
        );
        engine.shared_limits = Some(limiter.clone());
        let mut link = Link::new(config.target.clone(), &keys);
        link.call(|c| ensure_group(c, &keys))
            .map_err(|e| format!("redis {}: {e}", config.target.urls.join(",")))?;
        let dispatcher = Arc::new(builder.start().map_err(|e| e.to_string())?);
        Ok(Node {
            config,
            keys,
            dispatcher,
            state: Arc::default(),
            report: Arc::default(),
            max_age,
            limiter,
        })
    }

    pub fn report(&self) -> &NodeReport {
        &self.report
    }

    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    /// Runs until `stop` is set (or, with `exit_when_idle`, until the work is done); then gives
    /// what is in flight `grace` to finish, writes the last outcomes and returns. What is not
    /// final stays pending in Redis for another node.
    pub fn run(&self, stop: &AtomicBool, grace: Duration) {
        let writer_done = Arc::new(AtomicBool::new(false));
        let give_up = Arc::new(AtomicBool::new(false));
        let writer = {
            let writer = Writer {
                config: self.config.clone(),
                keys: self.keys.clone(),
                state: Arc::clone(&self.state),
                report: Arc::clone(&self.report),
                events: self.dispatcher.events().expect("the node records events"),
                done: Arc::clone(&writer_done),
                give_up: Arc::clone(&give_up),
            };
            std::thread::spawn(move || writer.run())
        };
        let reading = AtomicBool::new(true);
        std::thread::scope(|s| {
            // The heartbeat has a thread of its own: a reader that waits for room in the
            // engine's queue must not let its entries look idle to other nodes.
            s.spawn(|| {
                let mut link = Link::new(self.config.target.clone(), &self.keys);
                let every = (self.config.claim_idle / 4).max(Duration::from_millis(100));
                while reading.load(Ordering::Acquire) {
                    let started = Instant::now();
                    self.heartbeat(&mut link, stop);
                    while reading.load(Ordering::Acquire) && started.elapsed() < every {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            });
            self.read_loop(stop);
            self.dispatcher.shutdown_timeout(grace);
            reading.store(false, Ordering::Release);
        });
        writer_done.store(true, Ordering::Release);
        // The last outcomes get `flush_deadline` to reach Redis; then the writer gives up on
        // an unreachable Redis (after its current try) and what it held stays pending there.
        let deadline = Instant::now() + self.config.flush_deadline;
        while !writer.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        give_up.store(true, Ordering::Release);
        let _ = writer.join();
        self.limiter.leases.release_all();
    }

    fn read_loop(&self, stop: &AtomicBool) {
        let mut link = Link::new(self.config.target.clone(), &self.keys);
        let take_due = redis::Script::new(TAKE_DUE);
        let mut bodies: HashMap<String, Arc<Body>> = HashMap::new();
        let claim_every = (self.config.claim_idle / 3).max(Duration::from_millis(100));
        let mut last_claim = Instant::now();
        let mut last_due = Instant::now() - Duration::from_secs(1);
        let mut last_work = Instant::now();
        while !stop.load(Ordering::Acquire) {
            let room = self.room();
            if room == 0 {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            // Entries are read by count, the room is in recipients: estimate from what came.
            let per_entry = (self.report.recipients.load(Ordering::Relaxed) as usize)
                .checked_div(self.report.entries.load(Ordering::Relaxed) as usize)
                .unwrap_or(1)
                .max(1);
            let count = self.config.batch.min(room.div_ceil(per_entry)).max(1);
            let mut got = 0;
            if last_claim.elapsed() >= claim_every {
                got += self.claim(&mut link, stop, count, &mut bodies);
                last_claim = Instant::now();
            }
            if last_due.elapsed() >= Duration::from_secs(1) {
                got += self.take_deferred(&mut link, stop, &take_due, count, &mut bodies);
                last_due = Instant::now();
            }
            let consumer = self.config.consumer.clone();
            let work_key = self.keys.work();
            let asked = Instant::now();
            let read = link.call_until_done(stop, |c| {
                let reply: redis::RedisResult<Value> = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(Keys::GROUP)
                    .arg(&consumer)
                    .arg("COUNT")
                    .arg(count)
                    .arg("BLOCK")
                    .arg(250)
                    .arg("STREAMS")
                    .arg(&work_key)
                    .arg(">")
                    .query(c);
                match reply {
                    Err(e) if e.code() == Some("NOGROUP") => {
                        ensure_group(c, &self.keys)?;
                        Ok(Value::Nil)
                    }
                    other => other,
                }
            });
            let answered = Instant::now();
            let entries: Vec<(String, EntryRead)> = match read {
                None => break,
                Some(Ok(reply)) => read_reply(reply),
                Some(Err(e)) => {
                    eprintln!("mxpipe: node: XREADGROUP: {e}");
                    std::thread::sleep(Duration::from_millis(500));
                    Vec::new()
                }
            };
            got += entries.len();
            if !entries.is_empty() && self.report.first_read_ms.load(Ordering::Relaxed) == 0 {
                self.report.first_read_ms.store(now_ms(), Ordering::Relaxed);
            }
            self.report
                .entries
                .fetch_add(entries.len() as u64, Ordering::Relaxed);
            let n = entries.len();
            if !entries.is_empty() {
                self.start_entries(&mut link, stop, entries, false, &mut bodies);
            }
            if n > 0 {
                let t = &self.report.timings;
                t.add(&t.read_us, answered - asked);
                t.add(&t.start_us, answered.elapsed());
                trace(format_args!(
                    "read entries={n} xreadgroup_us={} parse_submit_us={}",
                    (answered - asked).as_micros(),
                    answered.elapsed().as_micros()
                ));
            }
            if got > 0 {
                last_work = Instant::now();
            } else if let Some(idle) = self.config.exit_when_idle {
                if last_work.elapsed() >= idle && self.all_done(&mut link) {
                    break;
                }
            }
        }
    }

    /// An outcome record of `entry` decided by this node without a server's reply (the
    /// caller fills in what it knows).
    fn record_of<'a>(&'a self, entry: &'a str) -> OutcomeRecord<'a> {
        OutcomeRecord {
            entry: entry.into(),
            recipient: "".into(),
            status: "".into(),
            code: 0,
            enhanced: None,
            text: "".into(),
            attempts: 0,
            retry_after_s: None,
            destination: "".into(),
            tag: 0,
            node: self.config.consumer.as_str().into(),
        }
    }

    /// Recipients this node may still take.
    fn room(&self) -> usize {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.config.max_in_flight.saturating_sub(state.in_flight)
    }

    /// Nothing open here, nothing pending in the group, nothing deferred.
    fn all_done(&self, link: &mut Link) -> bool {
        {
            let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if !state.sent.is_empty() || !state.entries.is_empty() {
                return false;
            }
        }
        let (work, deferred) = (self.keys.work(), self.keys.deferred());
        let counts: redis::RedisResult<(Value, usize)> = link.call(|c| {
            redis::pipe()
                .cmd("XPENDING")
                .arg(&work)
                .arg(Keys::GROUP)
                .cmd("ZCARD")
                .arg(&deferred)
                .query(c)
        });
        match counts {
            Ok((Value::Array(summary), 0)) => {
                matches!(summary.first(), Some(Value::Int(0)))
            }
            _ => false,
        }
    }

    /// Keeps this node's entries from looking idle to others, and its leased deferrals leased.
    fn heartbeat(&self, link: &mut Link, stop: &AtomicBool) {
        let (entries, members): (Vec<Arc<str>>, Vec<String>) = {
            let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            (
                state.entries.keys().cloned().collect(),
                state
                    .sent
                    .values()
                    .filter_map(|s| match &s.origin {
                        Origin::Deferred(m) => Some(m.clone()),
                        Origin::Entry(_) => None,
                    })
                    .collect(),
            )
        };
        if entries.is_empty() && members.is_empty() {
            return;
        }
        let lease_until = now_ms() + self.config.claim_idle.as_millis() as u64;
        let mut pipe = redis::pipe();
        for chunk in entries.chunks(1000) {
            pipe.cmd("XCLAIM")
                .arg(self.keys.work())
                .arg(Keys::GROUP)
                .arg(&self.config.consumer)
                .arg(0)
                .arg(chunk.iter().map(|e| &**e).collect::<Vec<_>>())
                .arg("JUSTID")
                .ignore();
        }
        for chunk in members.chunks(1000) {
            let mut cmd = redis::cmd("ZADD");
            cmd.arg(self.keys.deferred()).arg("XX");
            for m in chunk {
                cmd.arg(lease_until).arg(m);
            }
            pipe.add_command(cmd).ignore();
        }
        if let Some(Err(e)) = link.call_until_done(stop, |c| pipe.query::<()>(c)) {
            eprintln!("mxpipe: node: heartbeat: {e}");
        }
    }

    /// Claims entries another node left idle for `claim_idle`.
    fn claim(
        &self,
        link: &mut Link,
        stop: &AtomicBool,
        count: usize,
        bodies: &mut HashMap<String, Arc<Body>>,
    ) -> usize {
        let idle_ms = self.config.claim_idle.as_millis() as u64;
        let reply: Option<redis::RedisResult<StreamAutoClaimReply>> =
            link.call_until_done(stop, |c| {
                redis::cmd("XAUTOCLAIM")
                    .arg(self.keys.work())
                    .arg(Keys::GROUP)
                    .arg(&self.config.consumer)
                    .arg(idle_ms)
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(count)
                    .query(c)
            });
        let claimed = match reply {
            Some(Ok(r)) => r.claimed,
            Some(Err(e)) => {
                eprintln!("mxpipe: node: XAUTOCLAIM: {e}");
                return 0;
            }
            None => return 0,
        };
        let claimed: Vec<(String, EntryRead)> = {
            let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            claimed
                .into_iter()
                .filter(|s| !state.entries.contains_key(s.id.as_str()))
                .map(|s| {
                    let entry = Entry::from_fields(&s.map);
                    (s.id, entry)
                })
                .collect()
        };
        let n = claimed.len();
        if n > 0 {
            self.report.claimed.fetch_add(n as u64, Ordering::Relaxed);
            self.start_entries(link, stop, claimed, true, bodies);
        }
        n
    }

    /// Hands entries to the engine: only their recipients not final yet (`claimed`: another
    /// node may have finished some).
    fn start_entries(
        &self,
        link: &mut Link,
        stop: &AtomicBool,
        ids: Vec<(String, EntryRead)>,
        claimed: bool,
        bodies: &mut HashMap<String, Arc<Body>>,
    ) {
        let mut parsed = Vec::with_capacity(ids.len());
        let mut invalid = Vec::new();
        for (id, entry) in ids {
            match entry {
                Ok(entry) => parsed.push((id, entry)),
                Err(e) => invalid.push((id, e.to_string())),
            }
        }
        // Bodies stored once: fetched once per node (one round trip for the batch).
        let mut missing: Vec<String> = parsed
            .iter()
            .filter_map(|(_, e)| match &e.content {
                Content::Reference(name) if !bodies.contains_key(name) => Some(name.clone()),
                _ => None,
            })
            .collect();
        missing.sort();
        missing.dedup();
        if !missing.is_empty() {
            if bodies.len() > 1000 {
                bodies.clear();
            }
            let keys: Vec<String> = missing.iter().map(|n| self.keys.body(n)).collect();
            let got: Option<redis::RedisResult<Vec<Option<Vec<u8>>>>> =
                link.call_until_done(stop, |c| redis::cmd("MGET").arg(&keys).query(c));
            let Some(Ok(got)) = got else {
                return;
            };
            for (name, value) in missing.into_iter().zip(got) {
                if let Some(bytes) = value {
                    match Body::new(&bytes) {
                        Ok(body) => {
                            bodies.insert(name, Arc::new(body));
                        }
                        Err(e) => eprintln!("mxpipe: node: body {name}: {e}"),
                    }
                }
            }
        }
        // Finals recorded by a node that had the entry before.
        let done: Vec<HashMap<String, String>> = if claimed && !parsed.is_empty() {
            let mut pipe = redis::pipe();
            for (id, _) in &parsed {
                pipe.cmd("HGETALL").arg(self.keys.done(id));
            }
            match link.call_until_done(stop, |c| pipe.query(c)) {
                Some(Ok(done)) => done,
                _ => return,
            }
        } else {
            vec![HashMap::new(); parsed.len()]
        };
        let mut finished = Vec::new();
        for ((id, entry), done) in parsed.into_iter().zip(done) {
            let body = match &entry.content {
                Content::Inline(bytes) => {
                    Body::new(bytes)
                        .map(Arc::new)
                        .map_err(|e| work::EntryError {
                            field: "body",
                            problem: e.to_string(),
                        })
                }
                Content::Reference(name) => bodies.get(name).cloned().ok_or(work::EntryError {
                    field: "body_ref",
                    problem: format!("no body stored under {}", self.keys.body(name)),
                }),
            };
            let body = match body {
                Ok(b) => b,
                Err(e) => {
                    invalid.push((id, e.to_string()));
                    continue;
                }
            };
            let todo: Vec<&Recipient> = entry
                .to
                .iter()
                .filter(|r| !done.contains_key(r.address()))
                .collect();
            if todo.is_empty() {
                finished.push(id);
                continue;
            }
            let messages = match work::messages(&entry.from, &todo, &body) {
                Ok(m) => m,
                Err(e) => {
                    invalid.push((id, e.to_string()));
                    continue;
                }
            };
            let id: Arc<str> = Arc::from(id);
            let body_ref = match &entry.content {
                Content::Reference(name) => name.clone(),
                Content::Inline(_) => format!("entry:{id}"),
            };
            {
                let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                state.entries.insert(
                    Arc::clone(&id),
                    OpenEntry {
                        left: todo.len(),
                        has_done_hash: !done.is_empty(),
                        inline_body: matches!(entry.content, Content::Inline(_))
                            .then(|| Arc::clone(&body)),
                    },
                );
            }
            let first_ms = id
                .split('-')
                .next()
                .and_then(|ms| ms.parse().ok())
                .unwrap_or_else(now_ms);
            for (message, indexes) in messages {
                let sent = Sent {
                    origin: Origin::Entry(Arc::clone(&id)),
                    from: entry.from.clone(),
                    recipients: indexes.iter().map(|&i| todo[i].clone()).collect(),
                    body_ref: body_ref.clone(),
                    tag: entry.tag,
                    attempts_before: 0,
                    first_ms,
                    left: indexes.len(),
                };
                if !self.submit(message, sent, stop) {
                    return;
                }
            }
        }
        if !finished.is_empty() || !invalid.is_empty() {
            self.close_directly(link, stop, finished, invalid);
        }
    }

    /// Hands one message to the engine, waiting for room; false when stopping.
    fn submit(&self, message: crate::message::Message, sent: Sent, stop: &AtomicBool) -> bool {
        let n = sent.left;
        let tag = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.next_tag += 1;
            let tag = state.next_tag;
            state.sent.insert(tag, sent);
            state.in_flight += n;
            tag
        };
        self.report
            .recipients
            .fetch_add(n as u64, Ordering::Relaxed);
        let mut message = message.with_tag(tag);
        loop {
            match self
                .dispatcher
                .submit_timeout(message, Duration::from_millis(200))
            {
                Ok(_) => return true,
                Err(e) if e.error == crate::error::Error::QueueFull => {
                    message = e.message;
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                }
                Err(e) => {
                    eprintln!("mxpipe: node: submit: {e}");
                    break;
                }
            }
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.sent.remove(&tag);
        state.in_flight -= n;
        false
    }

    /// Acknowledges entries with nothing left to do, and bad entries with an `invalid` outcome
    /// that names the field.
    fn close_directly(
        &self,
        link: &mut Link,
        stop: &AtomicBool,
        finished: Vec<String>,
        invalid: Vec<(String, String)>,
    ) {
        let mut pipe = redis::pipe();
        pipe.atomic();
        if !invalid.is_empty() {
            let outcomes: Vec<OutcomeRecord> = invalid
                .iter()
                .map(|(id, e)| OutcomeRecord {
                    status: "invalid".into(),
                    text: e.as_str().into(),
                    ..self.record_of(id)
                })
                .collect();
            pipe.cmd("XADD")
                .arg(self.keys.outcomes())
                .arg("*")
                .arg("outcomes")
                .arg(serde_json::to_string(&outcomes).expect("outcomes serialise"))
                .ignore();
            for (id, e) in &invalid {
                eprintln!("mxpipe: node: entry {id}: {e}");
            }
        }
        let ids: Vec<&str> = finished
            .iter()
            .chain(invalid.iter().map(|(id, _)| id))
            .map(String::as_str)
            .collect();
        pipe.cmd("XACK")
            .arg(self.keys.work())
            .arg(Keys::GROUP)
            .arg(&ids)
            .ignore();
        pipe.cmd("XDEL").arg(self.keys.work()).arg(&ids).ignore();
        for id in &ids {
            pipe.cmd("DEL").arg(self.keys.done(id)).ignore();
        }
        if let Some(Err(e)) = link.call_until_done(stop, |c| pipe.query::<()>(c)) {
            eprintln!("mxpipe: node: acknowledging: {e}");
        }
    }

    /// Takes due deferred recipients (leased, so that they come back if this node dies).
    fn take_deferred(
        &self,
        link: &mut Link,
        stop: &AtomicBool,
        script: &redis::Script,
        count: usize,
        bodies: &mut HashMap<String, Arc<Body>>,
    ) -> usize {
        let lease = self.config.claim_idle.as_millis() as u64;
        let now = now_ms();
        let reply: Option<redis::RedisResult<Vec<String>>> = link.call_until_done(stop, |c| {
            script
                .key(self.keys.deferred())
                .key(self.keys.deferred_data())
                .arg(now)
                .arg(count)
                .arg(lease)
                .invoke(c)
        });
        let flat = match reply {
            Some(Ok(flat)) => flat,
            Some(Err(e)) => {
                eprintln!("mxpipe: node: taking deferred recipients: {e}");
                return 0;
            }
            None => return 0,
        };
        let n = flat.len() / 2;
        self.report
            .taken_deferred
            .fetch_add(n as u64, Ordering::Relaxed);
        for pair in flat.chunks_exact(2) {
            let (member, payload) = (&pair[0], &pair[1]);
            let Ok(parked) = serde_json::from_str::<Parked>(payload) else {
                eprintln!("mxpipe: node: deferred {member}: unreadable, dropped");
                let mut pipe = redis::pipe();
                self.keys.unpark(&mut pipe, member);
                let _ = link.call(|c| pipe.query::<()>(c));
                continue;
            };
            let body = match bodies.get(&parked.body_ref) {
                Some(b) => Some(Arc::clone(b)),
                None => {
                    let key = self.keys.body(&parked.body_ref);
                    match link.call_until_done(stop, |c| {
                        redis::cmd("GET").arg(&key).query::<Option<Vec<u8>>>(c)
                    }) {
                        Some(Ok(Some(bytes))) => Body::new(&bytes).ok().map(Arc::new),
                        _ => None,
                    }
                }
            };
            let expired = now.saturating_sub(parked.first_ms) >= self.max_age.as_millis() as u64;
            let messages = body
                .as_ref()
                .ok_or_else(|| format!("body {} is gone", parked.body_ref))
                .and_then(|b| {
                    work::messages(&parked.from, &[&parked.to], b).map_err(|e| e.to_string())
                });
            match messages {
                Ok(messages) if !expired => {
                    for (message, _) in messages {
                        let sent = Sent {
                            origin: Origin::Deferred(member.clone()),
                            from: parked.from.clone(),
                            recipients: vec![parked.to.clone()],
                            body_ref: parked.body_ref.clone(),
                            tag: parked.tag,
                            attempts_before: parked.attempts,
                            first_ms: parked.first_ms,
                            left: 1,
                        };
                        if !self.submit(message, sent, stop) {
                            return n;
                        }
                    }
                }
                other => {
                    let (status, text) = match other {
                        Err(e) => ("invalid", e),
                        Ok(_) => ("expired", "deferred past the maximum age".to_string()),
                    };
                    let outcome = [OutcomeRecord {
                        recipient: parked.to.address().into(),
                        status: status.into(),
                        text: text.into(),
                        attempts: parked.attempts,
                        tag: parked.tag,
                        ..self.record_of(&parked.entry)
                    }];
                    let mut pipe = redis::pipe();
                    pipe.atomic()
                        .cmd("XADD")
                        .arg(self.keys.outcomes())
                        .arg("*")
                        .arg("outcomes")
                        .arg(serde_json::to_string(&outcome).expect("outcomes serialise"))
                        .ignore();
                    self.keys.unpark(&mut pipe, member);
                    let _ = link.call_until_done(stop, |c| pipe.query::<()>(c));
                }
            }
        }
        n
    }
}

/// A deferred recipient in Redis: everything a node needs to try it again.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Parked {
    entry: String,
    from: String,
    to: Recipient,
    body_ref: String,
    tag: u64,
    attempts: u32,
    first_ms: u64,
}

/// A stream ID `MS-SEQ` as numbers (they order as the IDs do).
fn stream_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// An entry read from the work stream: parsed, or what is wrong with it.
type EntryRead = Result<Entry, work::EntryError>;

/// The entries of an `XREADGROUP` reply (one stream), read straight from the reply's values:
/// no map per entry, and field values are moved, not copied. RESP2 (arrays) and RESP3 (a map
/// of streams) alike; an entry without fields (deleted since) is skipped.
fn read_reply(reply: Value) -> Vec<(String, EntryRead)> {
    let streams = match reply {
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(mut pair) if pair.len() == 2 => pair.pop(),
                _ => None,
            })
            .collect(),
        Value::Map(streams) => streams.into_iter().map(|(_, v)| v).collect(),
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    for stream in streams {
        let Value::Array(entries) = stream else {
            continue;
        };
        out.reserve(entries.len());
        for entry in entries {
            let Value::Array(mut pair) = entry else {
                continue;
            };
            if pair.len() != 2 {
                continue;
            }
            let fields = pair.pop();
            let id = match pair.pop() {
                Some(Value::BulkString(id)) => String::from_utf8(id).ok(),
                Some(Value::SimpleString(id)) => Some(id),
                _ => None,
            };
            if let (Some(id), Some(Value::Array(fields))) = (id, fields) {
                out.push((id, Entry::from_field_list(fields)));
            }
        }
    }
    out
}

/// Creates the consumer group (and the stream) unless it exists.
pub(crate) fn ensure_group(
    c: &mut dyn redis::ConnectionLike,
    keys: &Keys,
) -> redis::RedisResult<()> {
    let created: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(keys.work())
        .arg(Keys::GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query(c);
    match created {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

/// One MULTI/EXEC, encoded (RESP) into a buffer kept from one flush to the next: a flush of
/// thousands of outcomes is one copy into memory already there, not a fresh command buffer and
/// a fresh pipeline buffer (each grown, and its pages faulted in, every time).
#[derive(Debug, Default)]
struct Packed {
    buf: Vec<u8>,
    /// Commands between MULTI and EXEC.
    count: usize,
}

impl Packed {
    fn clear(&mut self) {
        self.buf.clear();
        self.buf.extend_from_slice(b"*1\r\n$5\r\nMULTI\r\n");
        self.count = 0;
    }

    /// Adds a command; returns its place among the transaction's replies.
    fn add(&mut self, cmd: &redis::Cmd) -> usize {
        cmd.write_packed_command(&mut self.buf);
        self.count += 1;
        self.count - 1
    }

    /// Starts a command of `args` arguments, each added with [`Packed::bulk`].
    fn command(&mut self, args: usize) {
        use std::io::Write as _;
        write!(self.buf, "*{args}\r\n").expect("writes to memory");
        self.count += 1;
    }

    /// One argument, the concatenation of `parts`.
    fn bulk(&mut self, parts: &[&[u8]]) {
        use std::io::Write as _;
        let len: usize = parts.iter().map(|p| p.len()).sum();
        write!(self.buf, "${len}\r\n").expect("writes to memory");
        for part in parts {
            self.buf.extend_from_slice(part);
        }
        self.buf.extend_from_slice(b"\r\n");
    }

    /// Ends the transaction (after the last command).
    fn seal(&mut self) {
        self.buf.extend_from_slice(b"*1\r\n$4\r\nEXEC\r\n");
    }

    /// Sends the sealed transaction and returns its replies, one per command; an error when
    /// Redis refused a command (the others ran: a transaction does not roll back).
    fn run(&self, c: &mut dyn redis::ConnectionLike) -> redis::RedisResult<Vec<Value>> {
        let mut replies = c.req_packed_commands(&self.buf, self.count + 1, 1)?;
        match replies.pop() {
            Some(Value::Array(items)) => {
                if let Some(Value::ServerError(e)) =
                    items.iter().find(|v| matches!(v, Value::ServerError(_)))
                {
                    return Err(e.clone().into());
                }
                Ok(items)
            }
            Some(Value::ServerError(e)) => Err(e.into()),
            other => Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "the transaction did not run",
                format!("{other:?}"),
            ))),
        }
    }
}

/// The writer thread: the engine's events become one atomic pipeline per flush.
struct Writer {
    config: NodeConfig,
    keys: Keys,
    state: Arc<Mutex<State>>,
    report: Arc<NodeReport>,
    events: crossbeam_channel::Receiver<Event>,
    done: Arc<AtomicBool>,
    /// Set when a stopping node stops waiting for Redis.
    give_up: Arc<AtomicBool>,
}

impl Writer {
    fn run(self) {
        let mut link = Link::new(self.config.target.clone(), &self.keys);
        let mut batch = Batch::default();
        let mut last_flush = Instant::now();
        // Entries acknowledged by this node, by when: deleted from the work stream after
        // `LAZY_DELETE`, unless a trim took them first (see `TRIM_ACKED`).
        let mut acked: VecDeque<(Instant, Arc<str>)> = VecDeque::new();
        // The last trim's point: every entry below it is gone already.
        let mut trimmed_to: Option<(u64, u64)> = None;
        let mut packed = Packed::default();
        // Events waiting at the last look.
        let mut seen = 0;
        // Events wait in the channel until the next flush: the writer sleeps instead of
        // blocking on it, so the engine never wakes this thread (nor does it spin) per event.
        const MOST_PER_FLUSH: usize = 20_000;
        loop {
            let finishing = self.done.load(Ordering::Acquire);
            let since = last_flush.elapsed();
            let waiting = self.events.len();
            // Nothing new since the last look while outcomes wait, and nothing else in flight
            // here: the tail of a run (or a lone entry), whose outcomes are written now rather
            // than at the end of the period (at most one such flush per QUIET_FLUSH). Work still
            // queued in the engine (a paced destination) waits for the period as before.
            let quiet = waiting > 0
                && waiting == seen
                && since >= QUIET_FLUSH
                && self
                    .state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .in_flight
                    <= waiting;
            if !finishing && since < self.config.flush_every && waiting < MOST_PER_FLUSH && !quiet {
                seen = waiting;
                std::thread::sleep((self.config.flush_every - since).min(WRITER_POLL));
                continue;
            }
            seen = 0;
            let mut disconnected = false;
            let noting = Instant::now();
            {
                // One lock for every event waiting.
                let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                for _ in 0..MOST_PER_FLUSH {
                    match self.events.try_recv() {
                        Ok(event) => self.note(&mut state, event, &mut batch),
                        Err(crossbeam_channel::TryRecvError::Empty) => break,
                        Err(crossbeam_channel::TryRecvError::Disconnected) => {
                            disconnected = true;
                            break;
                        }
                    }
                }
            }
            let last = disconnected || (finishing && self.events.is_empty());
            // Acknowledged entries whose trim had its chance (all of them on the way out).
            let now = Instant::now();
            while let Some((at, _)) = acked.front() {
                if !last && now.duration_since(*at) < LAZY_DELETE {
                    break;
                }
                let (_, id) = acked.pop_front().expect("looked at above");
                if trimmed_to.is_none_or(|t| stream_id(&id).is_none_or(|i| i >= t)) {
                    batch.deletes.push(id);
                }
            }
            let flushing = Instant::now();
            let timings = &self.report.timings;
            timings.add(&timings.note_us, flushing - noting);
            if !batch.is_empty() {
                match self.flush(&mut link, &batch, &mut packed) {
                    None => {
                        // Given up: what is still to come is not written either.
                        let left = self.events.try_iter().count();
                        self.report
                            .unwritten
                            .fetch_add(left as u64, Ordering::Relaxed);
                        break;
                    }
                    Some((written, trim)) => {
                        if let Some(t) = trim.as_deref().and_then(stream_id) {
                            trimmed_to = trimmed_to.max(Some(t));
                        }
                        timings.add(&timings.flush_us, flushing.elapsed());
                        trace(format_args!(
                            "flush outcomes={} acks={} deletes={} waited_ms={} note_us={} \
                             flush_us={} written={written} trimmed_to={trim:?}",
                            batch.outcome_count,
                            batch.acks.len(),
                            batch.deletes.len(),
                            since.as_millis(),
                            (flushing - noting).as_micros(),
                            flushing.elapsed().as_micros()
                        ));
                        if written {
                            let at = Instant::now();
                            acked.extend(batch.acks.drain(..).map(|id| (at, id)));
                        } else {
                            // Not written: the deletions are tried again with the next flush
                            // (the acknowledgements were not made; those entries stay pending).
                            acked.extend(batch.deletes.drain(..).map(|id| (now, id)));
                        }
                    }
                }
            }
            batch.clear();
            last_flush = Instant::now();
            if last {
                break;
            }
        }
    }

    /// Notes one event in the batch.
    fn note(&self, state: &mut State, event: Event, batch: &mut Batch) {
        let tag = event.tag;
        let Some(sent) = state.sent.get_mut(&tag) else {
            return;
        };
        let address = event.recipient.as_str();
        let attempts = sent.attempts_before + event.attempts;
        let entry_id: &str = match &sent.origin {
            Origin::Entry(id) => id,
            Origin::Deferred(member) => member.rsplit_once('|').map_or(member, |(e, _)| e),
        };
        let status = event.kind.as_str();
        // A deferral that leaves this node (handed back), or a final outcome, ends the
        // recipient's time here; a shorter deferral stays with the local engine; one cut short
        // by a shutdown (no retry time) stays pending in Redis for another node.
        let handed_off = event.kind == EventKind::Deferred
            && event
                .retry_after
                .is_some_and(|d| d > self.config.hand_off_after);
        let cut_short = event.kind == EventKind::Deferred && event.retry_after.is_none();
        batch.push_outcome(&OutcomeRecord {
            entry: entry_id.into(),
            recipient: address.into(),
            status: status.into(),
            code: event.reply.code,
            enhanced: event.reply.enhanced.map(|c| c.to_string().into()),
            text: event.reply.text.as_str().into(),
            attempts,
            retry_after_s: event.retry_after.map(|d| d.as_secs_f64()),
            destination: (&*event.destination).into(),
            tag: sent.tag,
            node: self.config.consumer.as_str().into(),
        });
        if !event.kind.is_final() && !handed_off {
            if cut_short {
                sent.left -= 1;
                state.in_flight -= 1;
                if sent.left == 0 {
                    state.sent.remove(&tag);
                }
            }
            return;
        }
        match event.kind {
            EventKind::Delivered => &self.report.delivered,
            EventKind::Bounced => &self.report.bounced,
            EventKind::Expired => &self.report.expired,
            EventKind::Deferred => &self.report.handed_off,
        }
        .fetch_add(1, Ordering::Relaxed);
        if handed_off {
            let member = match &sent.origin {
                Origin::Entry(id) => format!("{id}|{address}"),
                Origin::Deferred(m) => m.clone(),
            };
            let recipient = sent
                .recipients
                .iter()
                .find(|r| r.address().eq_ignore_ascii_case(address))
                .cloned()
                .unwrap_or_else(|| Recipient::Plain(address.to_string()));
            let due = now_ms() + event.retry_after.unwrap_or_default().as_millis() as u64;
            let parked = Parked {
                entry: entry_id.to_string(),
                from: sent.from.clone(),
                to: recipient,
                body_ref: sent.body_ref.clone(),
                tag: sent.tag,
                attempts,
                first_ms: sent.first_ms,
            };
            batch.park.push((
                member,
                due,
                serde_json::to_string(&parked).expect("serialises"),
            ));
        }
        sent.left -= 1;
        // The sent message is done with: its origin moves out instead of being cloned.
        let origin = if sent.left == 0 {
            state.sent.remove(&tag).expect("looked up above").origin
        } else {
            sent.origin.clone()
        };
        state.in_flight -= 1;
        match origin {
            Origin::Deferred(member) => {
                if !handed_off {
                    batch.unpark.push(member);
                }
            }
            Origin::Entry(id) => {
                let Some(open) = state.entries.get_mut(&id) else {
                    return;
                };
                if handed_off {
                    if let Some(body) = open.inline_body.take() {
                        batch.bodies.push((format!("entry:{id}"), body));
                    }
                }
                open.left -= 1;
                let final_word = if handed_off { "handed-off" } else { status };
                if open.left == 0 {
                    if open.has_done_hash {
                        batch.drop_done.push(Arc::clone(&id));
                    }
                    state.entries.remove(&id);
                    batch.done.remove(&id);
                    batch.acks.push(id);
                } else {
                    batch
                        .done
                        .entry(id)
                        .or_default()
                        .push((address.to_string(), final_word));
                }
            }
        }
    }

    /// Writes a batch in one atomic pipeline, retrying (reconnecting) until Redis takes it or
    /// the node gives up waiting (`None`: nothing of it was written). Otherwise whether Redis
    /// took it (an error is logged), and the point the work stream was trimmed to.
    fn flush(
        &self,
        link: &mut Link,
        batch: &Batch,
        packed: &mut Packed,
    ) -> Option<(bool, Option<String>)> {
        let outcomes = batch.outcome_count;
        packed.clear();
        let max_age_s = 7 * 24 * 3600;
        for (name, body) in &batch.bodies {
            let mut cmd = redis::cmd("SET");
            cmd.arg(self.keys.body(name))
                .arg(body.as_bytes())
                .arg("EX")
                .arg(max_age_s);
            packed.add(&cmd);
        }
        if batch.outcome_count > 0 {
            // The field is the array: its items, bracketed, copied once into the buffer.
            packed.command(5);
            packed.bulk(&[b"XADD"]);
            packed.bulk(&[self.keys.outcomes().as_bytes()]);
            packed.bulk(&[b"*"]);
            packed.bulk(&[b"outcomes"]);
            packed.bulk(&[b"[", &batch.outcomes, b"]"]);
        }
        let mut marked = Vec::new();
        for (id, finals) in &batch.done {
            let mut cmd = redis::cmd("HSET");
            cmd.arg(self.keys.done(id));
            for (address, word) in finals {
                cmd.arg(address).arg(*word);
            }
            packed.add(&cmd);
            marked.push(Arc::clone(id));
        }
        for (member, due, payload) in &batch.park {
            let mut cmd = redis::cmd("ZADD");
            cmd.arg(self.keys.deferred()).arg(due).arg(member);
            packed.add(&cmd);
            let mut cmd = redis::cmd("HSET");
            cmd.arg(self.keys.deferred_data()).arg(member).arg(payload);
            packed.add(&cmd);
        }
        if !batch.unpark.is_empty() {
            let mut cmd = redis::cmd("ZREM");
            cmd.arg(self.keys.deferred()).arg(&batch.unpark);
            packed.add(&cmd);
            let mut cmd = redis::cmd("HDEL");
            cmd.arg(self.keys.deferred_data()).arg(&batch.unpark);
            packed.add(&cmd);
        }
        if !batch.acks.is_empty() {
            // Encoded in place too: thousands of IDs.
            packed.command(3 + batch.acks.len());
            packed.bulk(&[b"XACK"]);
            packed.bulk(&[self.keys.work().as_bytes()]);
            packed.bulk(&[Keys::GROUP.as_bytes()]);
            for id in &batch.acks {
                packed.bulk(&[id.as_bytes()]);
            }
        }
        // After the XACK: the trim sees these entries acknowledged.
        let trim_at = (!batch.acks.is_empty() || !batch.deletes.is_empty()).then(|| {
            let deletes: Vec<&str> = batch.deletes.iter().map(|a| &**a).collect();
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(TRIM_ACKED)
                .arg(1)
                .arg(self.keys.work())
                .arg(Keys::GROUP)
                .arg(&deletes);
            packed.add(&cmd)
        });
        if !batch.drop_done.is_empty() {
            let keys: Vec<String> = batch.drop_done.iter().map(|e| self.keys.done(e)).collect();
            let mut cmd = redis::cmd("DEL");
            cmd.arg(keys);
            packed.add(&cmd);
        }
        packed.seal();
        let packed = &*packed;
        let replies = link.call_until_done(&self.give_up, |c| packed.run(c));
        let (written, trim) = match replies {
            Some(Ok(replies)) => {
                let trim = trim_at.and_then(|i| match replies.into_iter().nth(i) {
                    Some(Value::Array(v)) => match v.into_iter().nth(2) {
                        Some(Value::BulkString(id)) => String::from_utf8(id).ok(),
                        _ => None,
                    },
                    _ => None,
                });
                (true, trim)
            }
            Some(Err(e)) => {
                eprintln!("mxpipe: node: writing outcomes: {e}");
                (false, None)
            }
            None => {
                self.report.unwritten.fetch_add(outcomes, Ordering::Relaxed);
                return None;
            }
        };
        self.report.flushes.fetch_add(1, Ordering::Relaxed);
        if !marked.is_empty() {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            for id in marked {
                if let Some(open) = state.entries.get_mut(&id) {
                    open.has_done_hash = true;
                }
            }
        }
        Some((written, trim))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn entry(id: &str, fields: &[(&str, &str)]) -> Value {
        Value::Array(vec![
            bulk(id),
            Value::Array(
                fields
                    .iter()
                    .flat_map(|(k, v)| [bulk(k), bulk(v)])
                    .collect(),
            ),
        ])
    }

    #[test]
    fn xreadgroup_replies_are_read_from_values_in_resp2_and_resp3() {
        let good = entry(
            "1-0",
            &[
                ("from", "a@b.example"),
                ("to", r#"["c@d.example"]"#),
                ("body_ref", "x"),
            ],
        );
        let bad = entry("1-1", &[("from", "a@b.example"), ("body", "x")]);
        let deleted = Value::Array(vec![bulk("1-2"), Value::Nil]);
        let entries = Value::Array(vec![good, bad, deleted]);
        let resp2 = Value::Array(vec![Value::Array(vec![
            bulk("{mxpipe}:work"),
            entries.clone(),
        ])]);
        let resp3 = Value::Map(vec![(bulk("{mxpipe}:work"), entries)]);
        for reply in [resp2, resp3] {
            let read = read_reply(reply);
            assert_eq!(read.len(), 2);
            assert_eq!(read[0].0, "1-0");
            let e = read[0].1.as_ref().unwrap();
            assert_eq!(e.content, Content::Reference("x".into()));
            assert_eq!(e.to, vec![Recipient::Plain("c@d.example".into())]);
            assert_eq!(read[1].0, "1-1");
            assert_eq!(read[1].1.as_ref().unwrap_err().field, "to");
        }
        assert!(read_reply(Value::Nil).is_empty());
    }

    #[test]
    fn stream_ids_order_as_numbers() {
        assert_eq!(stream_id("1764570000000-12"), Some((1764570000000, 12)));
        assert!(stream_id("9-10") > stream_id("9-9"));
        assert!(stream_id("10-0") > stream_id("9-99"));
        assert_eq!(stream_id("x"), None);
    }
}
