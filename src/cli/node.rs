//! `mxpipe node` (deliver work from Redis with the local engine) and `mxpipe enqueue` (put a
//! message for a list of recipients into Redis as work, its body stored once).
//!
//! Both only parse the command line and call [`mxpipe::cluster`]; nothing here delivers.

use super::options::Overrides;
use super::{signal, CliResult};
use clap::Args;
use mxpipe::cluster::node::{Node, NodeConfig};
use mxpipe::cluster::work::{Content, Entry, Recipient};
use mxpipe::cluster::{produce, Keys, Link, Target};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// Where Redis is, for `node` and `enqueue`.
#[derive(Args, Clone, Debug)]
pub(crate) struct RedisArgs {
    /// Redis URL (redis://HOST:PORT/DB); with --cluster, a seed node (repeat for several).
    #[arg(long = "redis", value_name = "URL", required = true)]
    pub(crate) urls: Vec<String>,
    /// The URLs are nodes of a Redis Cluster.
    #[arg(long)]
    pub(crate) cluster: bool,
    /// The hash tag of every key: {NAMESPACE}:work, {NAMESPACE}:outcomes, ...
    #[arg(long, default_value = "mxpipe")]
    pub(crate) namespace: String,
}

impl RedisArgs {
    fn target(&self) -> Target {
        Target {
            urls: self.urls.clone(),
            cluster: self.cluster,
        }
    }
}

/// `mxpipe node`'s own options.
#[derive(Args, Clone, Debug)]
pub(crate) struct NodeArgs {
    #[command(flatten)]
    pub(crate) redis: RedisArgs,
    /// This node's name in the consumer group (default: host name and process ID).
    #[arg(long)]
    pub(crate) consumer: Option<String>,
    /// Claim another node's entries once they were idle this many seconds (the node stopped).
    #[arg(long, default_value_t = 60.0)]
    pub(crate) claim_idle: f64,
    /// Deferrals due later than this many seconds go back to Redis for any node.
    #[arg(long, default_value_t = 60.0)]
    pub(crate) hand_off_after: f64,
    /// Recipients this node holds at most.
    #[arg(long, default_value_t = 50_000)]
    pub(crate) max_in_flight: usize,
    /// Exit when nothing is pending in Redis and no work came for this many seconds.
    #[arg(long, value_name = "SECS")]
    pub(crate) exit_when_idle: Option<f64>,
    /// This node's connection leases (its share of each destination's --connections, which
    /// counts over every node) expire this many seconds after their last renewal.
    #[arg(long, default_value_t = 30.0)]
    pub(crate) lease_ttl: f64,
    /// On a stop, keep trying to write the last outcomes to an unreachable Redis this many
    /// seconds; then exit, leaving their entries pending for another node.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) flush_deadline: f64,
}

fn seconds(name: &str, value: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("--{name}: must be a number of seconds above zero"))
}

pub(crate) fn run_node(args: NodeArgs, overrides: Overrides) -> CliResult {
    signal::install()?;
    let consumer = args.consumer.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let mut config = NodeConfig::new(args.redis.target(), &consumer);
    config.namespace = args.redis.namespace.clone();
    config.claim_idle = seconds("claim-idle", args.claim_idle)?;
    config.hand_off_after = seconds("hand-off-after", args.hand_off_after)?;
    config.max_in_flight = args.max_in_flight.max(1);
    config.lease_ttl = seconds("lease-ttl", args.lease_ttl)?;
    config.flush_deadline = seconds("flush-deadline", args.flush_deadline)?;
    config.exit_when_idle = args
        .exit_when_idle
        .map(|s| seconds("exit-when-idle", s))
        .transpose()?;
    let builder = overrides.apply(overrides.delivery.base_builder()?)?;
    let node = Node::start(config, builder)?;
    eprintln!("mxpipe: node {consumer} running");
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !signal::stop_requested() && !stop.load(std::sync::atomic::Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(50));
            }
            stop.store(true, std::sync::atomic::Ordering::Release);
        });
        node.run(&stop, signal::GRACE);
        stop.store(true, std::sync::atomic::Ordering::Release);
    });
    println!("{}", node.report());
    let unwritten = node
        .report()
        .unwritten
        .load(std::sync::atomic::Ordering::Relaxed);
    if unwritten > 0 {
        return Err(format!(
            "node: {unwritten} outcomes not written: Redis was unreachable for \
             --flush-deadline {} s after the stop; their entries stay pending for another node \
             to claim",
            args.flush_deadline
        ));
    }
    Ok(if signal::stop_requested() {
        ExitCode::from(signal::INTERRUPTED)
    } else {
        ExitCode::SUCCESS
    })
}

/// `mxpipe enqueue`'s options.
#[derive(Args, Clone, Debug)]
pub(crate) struct EnqueueArgs {
    #[command(flatten)]
    pub(crate) redis: RedisArgs,
    /// Envelope sender (MAIL FROM); "" for the null sender.
    #[arg(long)]
    pub(crate) from: String,
    /// Recipients, one per line ('#' starts a comment), as for `send`.
    #[arg(long)]
    pub(crate) to_file: PathBuf,
    /// Recipients per entry (a node delivers an entry's recipients together).
    #[arg(long, default_value_t = 100)]
    pub(crate) per_entry: usize,
    /// Store the body once under {NAMESPACE}:body:NAME (default: a name from its hash).
    #[arg(long)]
    pub(crate) body_name: Option<String>,
    /// A number echoed in every outcome of these entries.
    #[arg(long, default_value_t = 0)]
    pub(crate) tag: u64,
    /// The message: RFC 5322 headers and body, sent as it is.
    #[arg(value_name = "MESSAGE.eml")]
    pub(crate) message: PathBuf,
}

pub(crate) fn run_enqueue(args: EnqueueArgs) -> CliResult {
    let content = std::fs::read(&args.message)
        .map_err(|e| format!("{}: cannot read: {e}", args.message.display()))?;
    mxpipe::message::Body::new(&content).map_err(|e| format!("{}: {e}", args.message.display()))?;
    if !args.from.is_empty() {
        mxpipe::message::Address::parse(&args.from, mxpipe::error::Field::Sender)
            .map_err(|e| format!("--from: {e}"))?;
    }
    if args.per_entry == 0 {
        return Err("--per-entry: must be at least 1".into());
    }
    let list = super::send::RecipientList::read(&args.to_file)?;
    if list.recipients.is_empty() {
        return Err(format!("{}: no valid recipients", args.to_file.display()));
    }
    let name = args.body_name.clone().unwrap_or_else(|| {
        let digest = ring::digest::digest(&ring::digest::SHA256, &content);
        digest.as_ref()[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    });
    let entries: Vec<Entry> = list
        .recipients
        .chunks(args.per_entry)
        .map(|chunk| Entry {
            from: args.from.clone(),
            to: chunk
                .iter()
                .map(|a| Recipient::Plain(a.as_str().to_string()))
                .collect(),
            content: Content::Reference(name.clone()),
            tag: args.tag,
        })
        .collect();
    let keys = Keys::new(&args.redis.namespace);
    let mut link = Link::new(args.redis.target(), &keys);
    let fail = |e: redis::RedisError| format!("redis {}: {e}", args.redis.urls.join(","));
    produce::store_body(&mut link, &keys, &name, &content).map_err(fail)?;
    let ids = produce::enqueue(&mut link, &keys, &entries).map_err(fail)?;
    println!(
        "enqueued entries={} recipients={} body={} first={} last={}",
        ids.len(),
        list.recipients.len(),
        keys.body(&name),
        ids.first().map_or("", String::as_str),
        ids.last().map_or("", String::as_str),
    );
    Ok(ExitCode::SUCCESS)
}
