//! Scale-out through Redis: `mxpipe node` processes share work, deferrals and outcomes through
//! a real `redis-server` (alone, with an append-only file, or as a 3-master Redis Cluster) and
//! deliver to Postfix's `smtp-sink`. What is checked is what an operator would check: every
//! recipient has exactly one final outcome in the outcomes stream, the sinks received each
//! transaction once (or, after a kill -9, at most the dead node's in-flight twice), and nothing
//! is left pending in Redis.
//!
//! `MXPIPE_CLUSTER_RECIPIENTS` sets the recipients of the large runs (default 30,000).

mod util;

use mxpipe::cluster::Target;
use redis::ConnectionLike;
use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};
use util::redis::{create_cluster, RedisServer};
use util::SmtpSink;

const PER_ENTRY: usize = 10;

fn recipients_of_large_runs() -> usize {
    std::env::var("MXPIPE_CLUSTER_RECIPIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30_000)
}

struct Setup {
    urls: Vec<String>,
    cluster: bool,
    dir: std::path::PathBuf,
}

impl Setup {
    fn new(urls: Vec<String>, cluster: bool) -> Setup {
        Setup {
            urls,
            cluster,
            dir: util::fresh_temp_dir("cluster"),
        }
    }

    fn redis_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for url in &self.urls {
            args.push("--redis".to_string());
            args.push(url.clone());
        }
        if self.cluster {
            args.push("--cluster".into());
        }
        args
    }

    fn connection(&self) -> Box<dyn ConnectionLike + Send> {
        Target {
            urls: self.urls.clone(),
            cluster: self.cluster,
        }
        .connect("{mxpipe}:work")
        .expect("connect to redis")
    }

    /// `mxpipe enqueue` of `n` recipients r{i}@example.net, PER_ENTRY an entry; returns the
    /// number of entries.
    fn enqueue(&self, n: usize) -> usize {
        self.enqueue_per_entry(n, PER_ENTRY)
    }

    fn enqueue_per_entry(&self, n: usize, per_entry: usize) -> usize {
        let list: String = (0..n).map(|i| format!("r{i}@example.net\n")).collect();
        std::fs::write(self.dir.join("list.txt"), list).unwrap();
        std::fs::write(
            self.dir.join("m.eml"),
            b"From: news@example.org\r\nSubject: work\r\n\r\nShared body.\r\n",
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_mxpipe"))
            .arg("enqueue")
            .args(self.redis_args())
            .args(["--from", "news@example.org", "--per-entry"])
            .arg(per_entry.to_string())
            .arg("--to-file")
            .arg(self.dir.join("list.txt"))
            .arg(self.dir.join("m.eml"))
            .output()
            .expect("run mxpipe enqueue");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "enqueue failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("recipients={n} ")),
            "enqueue said: {stdout}"
        );
        n.div_ceil(per_entry)
    }

    fn node(&self, name: &str, relay: &str, extra: &[&str]) -> Child {
        Command::new(env!("CARGO_BIN_EXE_mxpipe"))
            .arg("node")
            .args(self.redis_args())
            .args(["--consumer", name, "--relay", relay])
            .args(["--claim-idle", "5", "--exit-when-idle", "2"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn mxpipe node")
    }

    fn xlen(&self, key: &str) -> usize {
        redis::cmd("XLEN")
            .arg(key)
            .query(self.connection().as_mut())
            .unwrap()
    }

    /// Every outcome in the outcomes stream (each stream entry holds a JSON array of them).
    fn outcomes(&self) -> Vec<serde_json::Value> {
        let mut con = self.connection();
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg("{mxpipe}:outcomes")
            .arg("-")
            .arg("+")
            .query(con.as_mut())
            .unwrap();
        let mut out = Vec::new();
        for id in reply.ids {
            let json: String = id.get("outcomes").expect("an outcomes field");
            match serde_json::from_str(&json).unwrap() {
                serde_json::Value::Array(items) => out.extend(items),
                other => panic!("outcomes is not an array: {other}"),
            }
        }
        out
    }

    /// Nothing pending, nothing left in the work stream or the deferred set.
    fn assert_drained(&self) {
        let mut con = self.connection();
        let pending: redis::Value = redis::cmd("XPENDING")
            .arg("{mxpipe}:work")
            .arg("nodes")
            .query(con.as_mut())
            .unwrap();
        match pending {
            redis::Value::Array(v) => assert_eq!(v.first(), Some(&redis::Value::Int(0))),
            other => panic!("XPENDING said {other:?}"),
        }
        assert_eq!(
            self.xlen("{mxpipe}:work"),
            0,
            "acknowledged entries are deleted"
        );
        let deferred: usize = redis::cmd("ZCARD")
            .arg("{mxpipe}:deferred")
            .query(con.as_mut())
            .unwrap();
        assert_eq!(deferred, 0);
    }
}

/// Waits for a node to exit on its own (bounded), returning its summary line.
fn wait_node(mut child: Child, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut out = String::new();
            use std::io::Read;
            child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            assert!(status.success(), "node exited with {status}: {out}");
            return out;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("a node did not finish within {limit:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Delivered outcomes per recipient; panics on any other final outcome.
fn delivered_counts(outcomes: &[serde_json::Value]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for o in outcomes {
        let status = o["status"].as_str().unwrap();
        assert!(
            status == "delivered",
            "an outcome other than delivered: {o}"
        );
        *counts
            .entry(o["recipient"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    counts
}

/// Transactions a `smtp-sink -c` counted (its last `mesg=` figure).
fn sink_messages(sink: &SmtpSink) -> usize {
    sink.log()
        .rsplit("mesg=")
        .next()
        .and_then(|tail| {
            tail.split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// Three nodes, each with its own smtp-sink, share `n` recipients.
fn three_nodes_deliver_each_recipient_once(setup: &Setup) {
    let n = recipients_of_large_runs();
    let entries = setup.enqueue(n);
    let sinks: Vec<SmtpSink> = (0..3).map(|_| SmtpSink::start(&["-c"], 1024)).collect();
    let nodes: Vec<Child> = sinks
        .iter()
        .enumerate()
        .map(|(i, s)| setup.node(&format!("n{i}"), &s.addr().to_string(), &[]))
        .collect();
    let summaries: Vec<String> = nodes
        .into_iter()
        .map(|c| wait_node(c, Duration::from_secs(600)))
        .collect();
    let counts = delivered_counts(&setup.outcomes());
    assert_eq!(counts.len(), n, "every recipient has an outcome");
    assert!(
        counts.values().all(|&c| c == 1),
        "some recipient was delivered twice"
    );
    let transactions: usize = sinks.iter().map(sink_messages).sum();
    assert_eq!(
        transactions, entries,
        "each entry is one transaction: {summaries:?}"
    );
    setup.assert_drained();
}

#[test]
fn three_nodes_deliver_30000_recipients_each_exactly_once() {
    let redis = RedisServer::start();
    let setup = Setup::new(vec![redis.url()], false);
    three_nodes_deliver_each_recipient_once(&setup);
}

#[test]
fn a_3_master_redis_cluster_runs_the_same_work() {
    let masters: Vec<RedisServer> = (0..3).map(|_| RedisServer::start_cluster_node()).collect();
    create_cluster(&masters);
    let setup = Setup::new(masters.iter().map(RedisServer::url).collect(), true);
    three_nodes_deliver_each_recipient_once(&setup);
}

#[test]
fn a_node_killed_mid_run_leaves_every_recipient_final_and_few_duplicates() {
    let redis = RedisServer::start();
    let setup = Setup::new(vec![redis.url()], false);
    let n = 6_000;
    let entries = setup.enqueue(n);
    // The doomed node's sink answers DATA after a second: it has transactions in flight.
    let slow = SmtpSink::start(&["-c", "-w", "1"], 1024);
    let sinks: Vec<SmtpSink> = (0..2).map(|_| SmtpSink::start(&["-c"], 1024)).collect();
    let mut doomed = setup.node(
        "doomed",
        &slow.addr().to_string(),
        &["--max-in-flight", "400"],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while setup.xlen("{mxpipe}:outcomes") == 0 {
        assert!(Instant::now() < deadline, "the node delivered nothing");
        thread::sleep(Duration::from_millis(20));
    }
    let survivors: Vec<Child> = sinks
        .iter()
        .enumerate()
        .map(|(i, s)| setup.node(&format!("n{i}"), &s.addr().to_string(), &[]))
        .collect();
    thread::sleep(Duration::from_millis(300));
    doomed.kill().unwrap(); // SIGKILL
    doomed.wait().unwrap();
    // What the dead node held: its pending entries, read before anyone claims them.
    let pending: Vec<redis::Value> = redis::cmd("XPENDING")
        .arg("{mxpipe}:work")
        .arg("nodes")
        .arg("-")
        .arg("+")
        .arg(100_000)
        .arg("doomed")
        .query(setup.connection().as_mut())
        .unwrap();
    let in_flight = pending.len();
    assert!(in_flight > 0, "the node was killed with nothing in flight");
    for c in survivors {
        wait_node(c, Duration::from_secs(300));
    }
    let counts = delivered_counts(&setup.outcomes());
    assert_eq!(counts.len(), n, "every recipient is final");
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    let transactions: usize = sink_messages(&slow) + sinks.iter().map(sink_messages).sum::<usize>();
    eprintln!(
        "killed with {in_flight} entries in flight: {duplicates} recipients reported twice, \
         {} transactions more than entries",
        transactions.saturating_sub(entries)
    );
    assert!(
        duplicates <= in_flight * PER_ENTRY,
        "{duplicates} duplicates"
    );
    assert!(
        transactions >= entries && transactions <= entries + in_flight,
        "{transactions} transactions for {entries} entries, {in_flight} in flight at the kill"
    );
    setup.assert_drained();
}

#[test]
fn redis_restarted_mid_run_with_aof_loses_nothing() {
    let mut redis = RedisServer::start_with_aof();
    let setup = Setup::new(vec![redis.url()], false);
    let n = 6_000;
    let entries = setup.enqueue(n);
    let sinks: Vec<SmtpSink> = (0..2).map(|_| SmtpSink::start(&["-c"], 1024)).collect();
    // Paced, so that the restart comes mid-run.
    let nodes: Vec<Child> = sinks
        .iter()
        .enumerate()
        .map(|(i, s)| {
            setup.node(
                &format!("n{i}"),
                &s.addr().to_string(),
                &["--messages-per-second", "100"],
            )
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while setup.xlen("{mxpipe}:work") > entries * 3 / 4 {
        assert!(Instant::now() < deadline, "no progress before the restart");
        thread::sleep(Duration::from_millis(20));
    }
    redis.restart(Duration::from_secs(1));
    assert!(
        setup.xlen("{mxpipe}:work") > 0,
        "the restart came after the run"
    );
    for c in nodes {
        wait_node(c, Duration::from_secs(300));
    }
    let counts = delivered_counts(&setup.outcomes());
    assert_eq!(
        counts.len(),
        n,
        "every recipient is final after the restart"
    );
    let transactions: usize = sinks.iter().map(sink_messages).sum();
    assert!(transactions >= entries);
    setup.assert_drained();
}

#[test]
fn a_shared_limit_of_200_messages_per_second_holds_across_three_nodes() {
    let redis = RedisServer::start();
    let setup = Setup::new(vec![redis.url()], false);
    // One message per entry; more than 10 s of work at 200/s.
    let n = 3_000;
    setup.enqueue_per_entry(n, 1);
    let sink = SmtpSink::start(&["-c"], 1024);
    let relay = sink.addr().to_string();
    let nodes: Vec<Child> = (0..3)
        .map(|i| {
            setup.node(
                &format!("n{i}"),
                &relay,
                &["--messages-per-second", "200", "--max-in-flight", "1000"],
            )
        })
        .collect();
    for c in nodes {
        wait_node(c, Duration::from_secs(120));
    }
    // When each message was delivered: the outcomes stream entry (its ID is the server's time
    // in ms) that reported it, written within 100 ms.
    let mut con = setup.connection();
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg("{mxpipe}:outcomes")
        .arg("-")
        .arg("+")
        .query(con.as_mut())
        .unwrap();
    let mut times = Vec::new();
    for id in &reply.ids {
        let ms: u64 = id.id.split('-').next().unwrap().parse().unwrap();
        let json: String = id.get("outcomes").unwrap();
        let items: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
        for o in items {
            assert_eq!(o["status"], "delivered", "{o}");
            times.push(ms);
        }
    }
    assert_eq!(times.len(), n);
    times.sort();
    // The first 10 s of the run (which lasts 15 s at 200/s; without sharing, 5 s at 600/s
    // would put all 3,000 in the window).
    let start = times[0];
    let in_window = times
        .iter()
        .filter(|&&t| t >= start && t < start + 10_000)
        .count();
    let rate = in_window as f64 / 10.0;
    eprintln!("shared limit 200/s over 3 nodes: {rate} msgs/s measured over 10 s");
    assert!(
        (150.0..=250.0).contains(&rate),
        "{rate} msgs/s over 10 s for a shared limit of 200/s (each node alone allows 200/s)"
    );
}

#[test]
fn python_work_with_merge_fields_and_a_long_deferral_handed_back_to_redis() {
    let redis = RedisServer::start();
    let setup = Setup::new(vec![redis.url()], false);
    // The first transaction is refused for now (451): its recipient's retry is due in 2 s,
    // longer than the node keeps deferrals (1 s), so it goes to the deferred set in Redis.
    let capture = util::CaptureServer::builder().tempfail_first(1).start();
    let producer = format!(
        r#"
import sys, redis
sys.path.insert(0, {src:?})
import redis_work
r = redis.Redis(port={port})
redis_work.store_body(r, "greeting", b"Subject: For {{{{name}}}}\r\n\r\nHello {{{{name}}}}.\r\n")
print(redis_work.enqueue(r, "news@example.org", [
    {{"to": "ann@example.net", "fields": {{"name": "Ann"}}}},
    {{"to": "bob@example.net", "fields": {{"name": "Bob"}}}},
], body_ref="greeting", tag=42))
try:
    redis_work.enqueue(r, "news@example.org", ["bad address"], body_ref="greeting")
except ValueError as e:
    print("refused:", e)
"#,
        src = util::repo_root()
            .join("bindings/python/src/mxpipe")
            .display()
            .to_string(),
        port = redis.port
    );
    let out = Command::new(util::test_python())
        .arg("-c")
        .arg(&producer)
        .output()
        .expect("run the Python producer");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("refused: recipients[0]: not an address: 'bad address'"),
        "{stdout}"
    );
    let engine = setup.dir.join("engine.toml");
    std::fs::write(&engine, "retry_initial = \"2s\"\nretry_jitter = 0\n").unwrap();
    let node = setup.node(
        "n0",
        &capture.addr().to_string(),
        &[
            "--hand-off-after",
            "1",
            "--config",
            engine.to_str().unwrap(),
        ],
    );
    let summary = wait_node(node, Duration::from_secs(60));
    assert!(
        summary.contains("handed_off=1 ") && summary.contains("taken_deferred=1 "),
        "{summary}"
    );
    let mut bodies: Vec<(Vec<String>, String)> = capture
        .messages()
        .into_iter()
        .map(|m| (m.rcpt_tos, String::from_utf8(m.data).unwrap()))
        .collect();
    bodies.sort();
    assert_eq!(
        bodies,
        vec![
            (
                vec!["ann@example.net".to_string()],
                "Subject: For Ann\r\n\r\nHello Ann.\r\n".to_string()
            ),
            (
                vec!["bob@example.net".to_string()],
                "Subject: For Bob\r\n\r\nHello Bob.\r\n".to_string()
            ),
        ]
    );
    let outcomes = setup.outcomes();
    let statuses: Vec<(String, String, u64)> = outcomes
        .iter()
        .map(|o| {
            (
                o["recipient"].as_str().unwrap().to_string(),
                o["status"].as_str().unwrap().to_string(),
                o["tag"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(statuses.len(), 3, "{outcomes:?}");
    assert_eq!(
        statuses.iter().filter(|s| s.1 == "deferred").count(),
        1,
        "{outcomes:?}"
    );
    let deferred = outcomes.iter().find(|o| o["status"] == "deferred").unwrap();
    assert_eq!(deferred["code"], 451);
    let delivered: Vec<&str> = statuses
        .iter()
        .filter(|s| s.1 == "delivered" && s.2 == 42)
        .map(|s| s.0.as_str())
        .collect();
    assert_eq!(delivered.len(), 2, "{outcomes:?}");
    setup.assert_drained();
}

/// Connections the sink at `port` has open now, as the kernel sees them (its side of each
/// established loopback connection).
fn established_to(port: u16) -> usize {
    let out = Command::new("ss")
        .args(["-Htn", "state", "established"])
        .arg(format!("( sport = :{port} )"))
        .output()
        .expect("run ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// The connection leases each node holds for `destination`.
fn leases(setup: &Setup, destination: &str) -> HashMap<String, u64> {
    redis::cmd("HGETALL")
        .arg(format!("{{mxpipe}}:limit:{destination}:conns"))
        .query(setup.connection().as_mut())
        .unwrap()
}

#[test]
fn three_nodes_share_one_connection_limit_and_a_dead_nodes_leases_expire() {
    const LIMIT: usize = 3;
    let redis = RedisServer::start();
    let setup = Setup::new(vec![redis.url()], false);
    let n = 2_000;
    setup.enqueue_per_entry(n, 1);
    // The sink greets a connection beyond LIMIT open ones with 421 and counts it; slow replies
    // keep each node wanting more connections than its share.
    let sink = mxpipe::sink::Sink::start(mxpipe::sink::SinkConfig {
        faults: mxpipe::sink::Faults {
            max_connections: Some(LIMIT),
            reply_delay: Some(Duration::from_millis(20)),
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap();
    let relay = sink.local_addr().to_string();
    let limit = LIMIT.to_string();
    let args = [
        "--connections",
        &limit,
        "--lease-ttl",
        "2",
        "--max-in-flight",
        "50",
    ];
    let mut doomed = setup.node("doomed", &relay, &args);
    let deadline = Instant::now() + Duration::from_secs(60);
    while leases(&setup, &relay).get("doomed").copied().unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "the node took no lease");
        thread::sleep(Duration::from_millis(10));
    }
    let survivors: Vec<Child> = (0..2)
        .map(|i| setup.node(&format!("n{i}"), &relay, &args))
        .collect();
    let port = sink.local_addr().port();
    let mut peak = 0;
    let watch_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < watch_until {
        peak = peak.max(established_to(port));
        thread::sleep(Duration::from_millis(10));
    }
    doomed.kill().unwrap(); // SIGKILL: its leases stay in Redis until they expire
    doomed.wait().unwrap();
    let killed = Instant::now();
    let held_by_dead = leases(&setup, &relay).get("doomed").copied().unwrap_or(0);
    assert!(held_by_dead > 0, "the node was killed holding no lease");
    // Its leases expire after --lease-ttl (2 s) and the survivors take them over: all LIMIT
    // connections open again.
    let mut peak_after = 0;
    let mut summaries = Vec::new();
    let mut survivors: Vec<Option<Child>> = survivors.into_iter().map(Some).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while survivors.iter().any(Option::is_some) {
        let open = established_to(port);
        peak = peak.max(open);
        if killed.elapsed() > Duration::from_millis(500) {
            peak_after = peak_after.max(open);
        }
        for slot in survivors.iter_mut() {
            if slot
                .as_mut()
                .is_some_and(|c| c.try_wait().unwrap().is_some())
            {
                summaries.push(wait_node(slot.take().unwrap(), Duration::from_secs(1)));
            }
        }
        assert!(Instant::now() < deadline, "the survivors did not finish");
        thread::sleep(Duration::from_millis(10));
    }
    let stats = sink.stop();
    eprintln!(
        "peak {peak} connections seen for a limit of {LIMIT} ({peak_after} after the kill, \
         which came {:?} before the end); the dead node held {held_by_dead} leases; sink: \
         {stats:?}; {summaries:?}",
        killed.elapsed()
    );
    assert_eq!(
        stats.refused_connections, 0,
        "a connection beyond the shared limit of {LIMIT} was opened: {stats:?}"
    );
    assert!(peak <= LIMIT, "{peak} connections open at once");
    assert_eq!(
        peak_after, LIMIT,
        "the survivors took over the dead node's expired leases"
    );
    let counts = delivered_counts(&setup.outcomes());
    assert_eq!(counts.len(), n, "every recipient is final: {summaries:?}");
    assert!(
        summaries.iter().all(|s| !s.contains("delivered=0 ")),
        "each survivor delivered after the dead node's leases expired: {summaries:?}"
    );
    assert!(
        leases(&setup, &relay).is_empty(),
        "the nodes gave their leases back when they stopped"
    );
    setup.assert_drained();
}

#[test]
fn a_node_stopped_while_redis_is_down_gives_up_its_last_flush_and_another_node_finishes() {
    let mut redis = RedisServer::start_with_aof();
    let setup = Setup::new(vec![redis.url()], false);
    let n = 2_000;
    setup.enqueue_per_entry(n, 1);
    let sink = SmtpSink::start(&["-c"], 1024);
    let relay = sink.addr().to_string();
    // Paced, so that the node is mid-run when Redis goes away.
    let mut stopped = setup.node(
        "stopped",
        &relay,
        &[
            "--messages-per-second",
            "200",
            "--max-in-flight",
            "100",
            "--flush-deadline",
            "2",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while setup.xlen("{mxpipe}:outcomes") == 0 {
        assert!(Instant::now() < deadline, "the node delivered nothing");
        thread::sleep(Duration::from_millis(20));
    }
    thread::sleep(Duration::from_millis(300));
    redis.stop();
    // SAFETY: kill(2) on our own child's PID.
    unsafe { libc::kill(stopped.id() as i32, libc::SIGTERM) };
    // Its grace for what is in flight (10 s), then two seconds of trying to write the last
    // outcomes: it must exit on its own, well before this bound.
    let bound = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = stopped.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > bound {
            let _ = stopped.kill();
            let _ = stopped.wait();
            panic!("a node stopped while Redis was down did not exit");
        }
        thread::sleep(Duration::from_millis(50));
    };
    let mut summary = String::new();
    use std::io::Read;
    stopped
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut summary)
        .unwrap();
    assert_eq!(status.code(), Some(2), "{summary}");
    let unwritten: usize = summary
        .split("unwritten=")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no unwritten= in {summary:?}"));
    assert!(unwritten > 0, "{summary}");
    // What it did not write stayed pending in Redis: another node claims and delivers it.
    redis.start_again();
    let other = setup.node("other", &relay, &[]);
    wait_node(other, Duration::from_secs(120));
    let counts = delivered_counts(&setup.outcomes());
    assert_eq!(counts.len(), n, "every recipient is final");
    setup.assert_drained();
}

/// Delivered outcomes per node in `[from, to)` (milliseconds of the outcomes stream's IDs).
fn delivered_by_node_between(setup: &Setup, from: u64, to: u64) -> HashMap<String, usize> {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg("{mxpipe}:outcomes")
        .arg(from)
        .arg(format!("({to}"))
        .query(setup.connection().as_mut())
        .unwrap();
    let mut counts = HashMap::new();
    for id in &reply.ids {
        let json: String = id.get("outcomes").unwrap();
        let items: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
        for o in items.iter().filter(|o| o["status"] == "delivered") {
            *counts
                .entry(o["node"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    counts
}

/// The Redis server's clock, in the milliseconds of stream IDs.
fn redis_time_ms(setup: &Setup) -> u64 {
    let (s, us): (u64, u64) = redis::cmd("TIME")
        .query(setup.connection().as_mut())
        .unwrap();
    s * 1000 + us / 1000
}

#[test]
fn a_421_seen_by_one_node_slows_every_node_sharing_the_destination() {
    let redis = RedisServer::start();
    let setup = Setup::new(vec![redis.url()], false);
    let n = 3_000;
    setup.enqueue_per_entry(n, 1);
    // Three connections at once are served; one more is greeted with 421 and closed.
    let sink = mxpipe::sink::Sink::start(mxpipe::sink::SinkConfig {
        faults: mxpipe::sink::Faults {
            max_connections: Some(3),
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap();
    let relay = sink.local_addr().to_string();
    // b and c share 100 messages/s and one connection (the connection limit counts over the
    // nodes: whichever holds its lease delivers). They never see a 421: that connection is
    // open before the sink is full, and they open no other.
    let common = ["--messages-per-second", "100", "--max-in-flight", "100"];
    let one = [&common[..], &["--connections", "1"]].concat();
    let nodes: Vec<Child> = ["b", "c"]
        .iter()
        .map(|name| setup.node(name, &relay, &one))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while setup.xlen("{mxpipe}:outcomes") == 0 {
        assert!(Instant::now() < deadline, "b and c delivered nothing");
        thread::sleep(Duration::from_millis(20));
    }
    // The sink's other two places are taken by clients of the test's: a, whose limit of two
    // leaves it one lease beside b's or c's, opens the sink's fourth connection and gets 421.
    let fillers: Vec<util::RawSmtpClient> = (0..2)
        .map(|_| util::RawSmtpClient::connect(sink.local_addr()))
        .collect();
    thread::sleep(Duration::from_secs(3));
    let a_starts = redis_time_ms(&setup);
    let two = [&common[..], &["--connections", "2"]].concat();
    let a = setup.node("a", &relay, &two);
    let deadline = Instant::now() + Duration::from_secs(30);
    while sink.stats().refused_connections == 0 {
        assert!(
            Instant::now() < deadline,
            "node a never got its 421: {:?} {:?} {:?}",
            sink.stats(),
            delivered_by_node_between(&setup, 0, u64::MAX),
            leases(&setup, &relay)
        );
        thread::sleep(Duration::from_millis(10));
    }
    let throttled_at = redis_time_ms(&setup);
    thread::sleep(Duration::from_millis(3_500));
    let before = delivered_by_node_between(&setup, a_starts - 3_000, a_starts);
    let after = delivered_by_node_between(&setup, throttled_at + 500, throttled_at + 3_500);
    let b_c = |m: &HashMap<String, usize>| m.get("b").unwrap_or(&0) + m.get("c").unwrap_or(&0);
    eprintln!(
        "delivered over 3 s before node a: {before:?}; over 3 s after its 421: {after:?}; \
         sink: {:?}",
        sink.stats()
    );
    // The slow-down lasts (a keeps meeting the full sink): the nodes are stopped, not waited
    // for; what they did not deliver stays pending in Redis.
    drop(fillers);
    for mut c in nodes.into_iter().chain([a]) {
        // SAFETY: kill(2) on our own child's PID.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let bound = Instant::now() + Duration::from_secs(60);
        while c.try_wait().unwrap().is_none() {
            if Instant::now() > bound {
                let _ = c.kill();
                let _ = c.wait();
                panic!("a node did not stop");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
    // Before: b and c deliver 100/s (about 300 in 3 s). After a's 421 the shared rate is
    // halved for every node (again at each 421): b and c together under half of what they did
    // before. Without the sharing, a's part of the rate alone leaves them about 70%.
    assert!(b_c(&before) >= 200, "before: {before:?}");
    assert!(
        (b_c(&after) as f64) < 0.5 * b_c(&before) as f64,
        "b and c did not slow down after a's 421: before {before:?}, after {after:?}"
    );
}

/// A campaign of `n` recipients: every tenth at refuse.example (a server that refuses every
/// RCPT), the rest at example.net.
fn write_campaign(dir: &std::path::Path, n: usize) -> std::path::PathBuf {
    let mut csv = String::from("email,first_name,id\n");
    for i in 0..n {
        let domain = if i % 10 == 3 {
            "refuse.example"
        } else {
            "example.net"
        };
        csv.push_str(&format!("user{i}@{domain},Name{i},{i}\n"));
    }
    std::fs::write(dir.join("recipients.csv"), csv).unwrap();
    let path = dir.join("campaign.toml");
    std::fs::write(
        &path,
        r#"from = "News <news@example.org>"
subject = "News for {{first_name}}"
text = "Hello {{first_name}}, your id is {{id}}.\n.\nA line with a lone dot above."
recipients = "recipients.csv"
return_path = "bounces+{local}={domain}@example.org"

[list_unsubscribe]
url = "https://example.org/u/{{id}}"

[delivery]
relay = "127.0.0.1:9"

[limits]
lookahead = 100
"#,
    )
    .unwrap();
    path
}

/// The message without its Date and Message-ID lines (new at every rendering), LF line ends as
/// smtp-sink's dumps have them.
fn without_date_and_id(content: &[u8]) -> String {
    String::from_utf8_lossy(content)
        .replace("\r\n", "\n")
        .lines()
        .filter(|l| !l.starts_with("Date: ") && !l.starts_with("Message-ID: "))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_campaign_through_redis_is_delivered_by_two_nodes_and_resumes_without_enqueueing_twice() {
    let redis = RedisServer::start();
    let setup = Setup::new(vec![redis.url()], false);
    let n = 300;
    let campaign = write_campaign(&setup.dir, n);
    let journal = setup.dir.join("journal");
    let report = setup.dir.join("report.jsonl");
    let send = |deadline: &str| {
        Command::new(env!("CARGO_BIN_EXE_mxpipe"))
            .arg("send")
            .args(setup.redis_args())
            .args(["--quiet", "--json", "--deadline", deadline])
            .arg("--journal")
            .arg(&journal)
            .arg("--report")
            .arg(&report)
            .arg(&campaign)
            .output()
            .expect("run mxpipe send --redis")
    };
    // No node yet: the first run enqueues its lookahead (100) and stops at its deadline.
    let first = send("1");
    assert_eq!(
        first.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(summary["submitted"], 100, "{summary}");
    assert_eq!(summary["not_final"], 100, "{summary}");
    assert_eq!(summary["interrupted"], true);
    assert_eq!(setup.xlen("{mxpipe}:work"), 100);

    let good = SmtpSink::start_dumping("127.0.0.1", &[]);
    let refusing = SmtpSink::start(&["-f", "RCPT"], 1024);
    let config = setup.dir.join("node.toml");
    std::fs::write(
        &config,
        format!("[routes]\n\"refuse.example\" = \"{}\"\n", refusing.addr()),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let nodes: Vec<Child> = (0..2)
        .map(|i| {
            setup.node(
                &format!("n{i}"),
                &good.addr().to_string(),
                &["--config", config],
            )
        })
        .collect();
    // Resumed: the 100 already in Redis are waited for, not enqueued again.
    let second = send("120");
    for node in nodes {
        wait_node(node, Duration::from_secs(120));
    }
    assert_eq!(
        second.status.code(),
        Some(1),
        "bounces make exit status 1: {}",
        String::from_utf8_lossy(&second.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&second.stdout).unwrap();
    assert_eq!(summary["submitted"], 200, "{summary}");
    assert_eq!(summary["delivered"], 270, "{summary}");
    assert_eq!(summary["bounced"], 30, "{summary}");
    assert_eq!(summary["interrupted"], false);

    // The report has every recipient exactly once, with the server's answer.
    let mut seen: HashMap<String, serde_json::Value> = HashMap::new();
    for line in std::fs::read_to_string(&report).unwrap().lines() {
        let o: serde_json::Value = serde_json::from_str(line).unwrap();
        let r = o["recipient"].as_str().unwrap().to_string();
        assert!(seen.insert(r.clone(), o).is_none(), "{r} reported twice");
    }
    assert_eq!(seen.len(), n);
    for i in 0..n {
        let refused = i % 10 == 3;
        let domain = if refused {
            "refuse.example"
        } else {
            "example.net"
        };
        let o = &seen[&format!("user{i}@{domain}")];
        if refused {
            assert_eq!(o["status"], "bounced", "{o}");
            // smtp-sink -f RCPT: "500 5.3.0 Error: command failed".
            assert_eq!(o["code"], 500, "{o}");
            assert_eq!(o["enhanced"], "5.3.0", "{o}");
            assert_eq!(o["text"], "Error: command failed", "{o}");
            assert_eq!(o["destination"], refusing.addr().to_string(), "{o}");
        } else {
            assert_eq!(o["status"], "delivered", "{o}");
            assert_eq!(o["code"], 250, "{o}");
        }
    }

    // Each good recipient's message arrived once, and it is the message the local campaign
    // renders (`--dry-run`), from its VERP return path.
    let rendered = setup.dir.join("rendered");
    let dry = Command::new(env!("CARGO_BIN_EXE_mxpipe"))
        .args(["send", "--quiet", "--dry-run"])
        .arg(&rendered)
        .arg(&campaign)
        .output()
        .unwrap();
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    let dumps = good.dumps();
    assert_eq!(dumps.len(), 270, "each good recipient's message once");
    let mut arrived = std::collections::HashSet::new();
    for dump in dumps {
        assert_eq!(dump.rcpt_args.len(), 1);
        let rcpt = dump.rcpt_args[0].trim_matches(|c| c == '<' || c == '>');
        let i: usize = rcpt
            .strip_prefix("user")
            .and_then(|r| r.split('@').next())
            .and_then(|i| i.parse().ok())
            .unwrap_or_else(|| panic!("unexpected recipient {rcpt}"));
        assert!(arrived.insert(i), "{rcpt} arrived twice");
        assert_eq!(
            dump.mail_args,
            format!("<bounces+user{i}=example.net@example.org>"),
        );
        // The dry run names its files by the row's line in the recipients file.
        let local = std::fs::read(rendered.join(format!("{:08}.eml", i + 2))).unwrap();
        assert_eq!(
            without_date_and_id(&dump.content),
            without_date_and_id(&local),
            "the message of {rcpt}"
        );
    }
    setup.assert_drained();
}

#[test]
fn campaign_redis_flags_are_checked_before_anything_is_enqueued() {
    let dir = util::fresh_temp_dir("campaign-redis-flags");
    let campaign = write_campaign(&dir, 3);
    let send = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_mxpipe"))
            .arg("send")
            .args(args)
            .arg(&campaign)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Port 9 on loopback has no Redis: each must fail before connecting.
    assert_eq!(
        send(&["--deadline", "5"]),
        (
            Some(2),
            "mxpipe: send: --cluster, --namespace and --deadline go with --redis\n".into()
        )
    );
    assert_eq!(
        send(&["--redis", "redis://127.0.0.1:9", "--relay", "127.0.0.1:25"]),
        (
            Some(2),
            "mxpipe: send: with --redis the nodes deliver: give --relay or --direct-mx to \
             `mxpipe node`\n"
                .into()
        )
    );
    let (code, stderr) = send(&["--redis", "redis://127.0.0.1:9", "--deadline=-1"]);
    assert_eq!(code, Some(2));
    assert_eq!(
        stderr,
        "mxpipe: --deadline: -1 is not a number of seconds\n"
    );
    // A Redis that does not answer is named in the error.
    let (code, stderr) = send(&["--redis", "redis://127.0.0.1:9", "--quiet"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.starts_with("mxpipe: redis redis://127.0.0.1:9: "),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A work entry a node cannot send (a body_ref to nothing stored, and one without `to`) gets
/// one `invalid` outcome that names the field, nothing reaches the sink, and the entry is
/// acknowledged rather than retried; a good entry beside them is delivered.
#[test]
fn entries_a_node_cannot_send_are_reported_invalid_by_field_and_never_sent() {
    let redis = RedisServer::start();
    let setup = Setup::new(vec![redis.url()], false);
    let mut con = setup.connection();
    let add = |con: &mut Box<dyn ConnectionLike + Send>, fields: &[(&str, &str)]| -> String {
        let mut cmd = redis::cmd("XADD");
        cmd.arg("{mxpipe}:work").arg("*");
        for (k, v) in fields {
            cmd.arg(*k).arg(*v);
        }
        cmd.query(con.as_mut()).unwrap()
    };
    let no_body = add(
        &mut con,
        &[
            ("from", "news@example.org"),
            ("to", "[\"a@example.net\"]"),
            ("body_ref", "nothing-stored"),
        ],
    );
    let no_to = add(
        &mut con,
        &[
            ("from", "news@example.org"),
            ("body", "Subject: x\r\n\r\nx\r\n"),
        ],
    );
    let good = add(
        &mut con,
        &[
            ("from", "news@example.org"),
            ("to", "[\"b@example.net\"]"),
            ("body", "Subject: good\r\n\r\nGood.\r\n"),
        ],
    );
    let sink = SmtpSink::start(&["-c"], 1024);
    let node = setup.node("n1", &sink.addr().to_string(), &[]);
    wait_node(node, Duration::from_secs(60));
    let outcomes = setup.outcomes();
    let of = |entry: &str| -> Vec<&serde_json::Value> {
        outcomes.iter().filter(|o| o["entry"] == entry).collect()
    };
    let bad_body = of(&no_body);
    assert_eq!(bad_body.len(), 1, "{outcomes:?}");
    assert_eq!(bad_body[0]["status"], "invalid");
    assert_eq!(bad_body[0]["node"], "n1");
    let text = bad_body[0]["text"].as_str().unwrap();
    assert!(
        text.starts_with("entry field body_ref: no body stored under"),
        "{text}"
    );
    let bad_to = of(&no_to);
    assert_eq!(bad_to.len(), 1, "{outcomes:?}");
    assert_eq!(bad_to[0]["status"], "invalid");
    assert_eq!(bad_to[0]["text"], "entry field to: missing");
    let delivered = of(&good);
    assert_eq!(delivered.len(), 1, "{outcomes:?}");
    assert_eq!(delivered[0]["status"], "delivered");
    assert_eq!(delivered[0]["recipient"], "b@example.net");
    assert_eq!(sink_messages(&sink), 1, "only the good entry was sent");
    setup.assert_drained();
}
