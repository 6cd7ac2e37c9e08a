//! The spool's own workload on two stores, side by side on the same disk: mxpipe's segment log
//! (`src/spool/log.rs`, as the spool's writer uses it) and the embedded store `redb` (issue 15
//! asks for a well-kept store unless a benchmark shows the log is needed). It prints a table.
//!
//! Run: `cargo bench --bench spool_store` (the directory: `SPOOL_STORE_DIR`, default the
//! system's temporary directory; runs per figure: `SPOOL_STORE_RUNS`, default 3, the median
//! printed).
//!
//! - `commit N`: unique 2 KB messages (body and envelope of one recipient), N per durable
//!   commit (N = 1, 64, 1024). Ours: `log::encode_body` + `log::encode_message`, one `write`,
//!   one `sync_data` per batch (and the directory once, after creating the segment), as
//!   `Writer::commit` does. redb: one write transaction per batch, `Durability::Immediate`,
//!   a table of bodies and a table of envelopes.
//! - `checkpoints`: 100,000 per-recipient outcomes, 1,000 per durable commit, on a store
//!   holding their 1,000 messages of 100 recipients. Ours: outcome records appended; redb: an
//!   insert per recipient into a table keyed by (message, recipient).
//! - `recovery`: 1,000,000 pending recipients (10,000 messages of 100, half of them with a
//!   deferral checkpoint, one body) read back into `store::State`'s map of messages in a child
//!   process: ours with `store::State::load`, redb with a full scan of its three tables. Time and
//!   the child's peak RSS (VmHWM); the files are in the page cache (written just before).
//!
//! Figures per message: fsyncs (ours counted; redb's through a storage backend that counts its
//! `sync_data` calls), octets handed to the file system (`write`), and octets the kernel
//! reports this process wrote to the disk (`write_bytes` of /proc/self/io, the write
//! amplification a device sees; the file system's journal is not in it).

use mxpipe::spool::log::{self, Mark, Record};
use mxpipe::spool::store::{Checkpoint, State, StoredMessage};
use redb::backends::FileBackend;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, StorageBackend, TableDefinition,
};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{IoSlice, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BODIES: TableDefinition<u64, &[u8]> = TableDefinition::new("bodies");
/// Message id -> envelope (body id, submission time, sender, recipients).
const MESSAGES: TableDefinition<u64, &[u8]> = TableDefinition::new("messages");
/// (message id, recipient) -> (mark, attempts, retry time in Unix ms).
const OUTCOMES: TableDefinition<(u64, &str), (u8, u32, u64)> = TableDefinition::new("outcomes");

const SENDER: &str = "bench@mxpipe.example";
const SUBMITTED_MS: u64 = 1_790_000_000_000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("recover-child") {
        recover_child(&args[2], Path::new(&args[3]));
        return;
    }
    // `cargo test --all-targets` runs benches without --bench: this one fsyncs thousands of
    // times and recovers a million recipients, which is a measurement, not a test.
    if !args.iter().any(|a| a == "--bench") {
        println!("spool_store: a measurement; run it with `cargo bench --bench spool_store`");
        return;
    }
    let root = std::env::var_os("SPOOL_STORE_DIR")
        .map_or_else(std::env::temp_dir, PathBuf::from)
        .join(format!("mxpipe-spool-store-{}", std::process::id()));
    let runs: usize = std::env::var("SPOOL_STORE_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3)
        .max(1);
    println!(
        "spool_store: {} (median of {runs} runs, a fresh directory each)",
        root.display()
    );
    println!(
        "{:<22} {:<5} {:>12} {:>9} {:>13} {:>13} {:>12}",
        "workload", "store", "msgs_per_s", "fsyncs", "fsyncs_per_m", "written_per_m", "disk_per_m"
    );
    let mut run = 0;
    let mut fresh = || {
        run += 1;
        let dir = root.join(run.to_string());
        fs::create_dir_all(&dir).unwrap();
        dir
    };
    for per_commit in [1usize, 64, 1024] {
        // Enough commits to take a few seconds on a disk with ~1 ms fsyncs, no more.
        let commits = match per_commit {
            1 => 500,
            64 => 100,
            _ => 16,
        };
        let name = format!("commit {per_commit}/fsync");
        let ours = median_of(runs, || {
            let dir = fresh();
            let figures = commit_ours(&dir, per_commit, commits);
            fs::remove_dir_all(&dir).unwrap();
            figures
        });
        ours.print(&name, "ours");
        let redb = median_of(runs, || {
            let dir = fresh();
            let figures = commit_redb(&dir, per_commit, commits);
            fs::remove_dir_all(&dir).unwrap();
            figures
        });
        redb.print(&name, "redb");
    }
    let ours = median_of(runs, || {
        let dir = fresh();
        let figures = checkpoints_ours(&dir);
        fs::remove_dir_all(&dir).unwrap();
        figures
    });
    ours.print("checkpoints 1000/fsync", "ours");
    let redb = median_of(runs, || {
        let dir = fresh();
        let figures = checkpoints_redb(&dir);
        fs::remove_dir_all(&dir).unwrap();
        figures
    });
    redb.print("checkpoints 1000/fsync", "redb");
    println!(
        "{:<22} {:<5} {:>12} {:>12} {:>12}",
        "recovery 1M pending", "store", "seconds", "peak_rss_mb", "file_mb"
    );
    for store in ["ours", "redb"] {
        let dir = fresh();
        let file_bytes = if store == "ours" {
            recovery_data_ours(&dir)
        } else {
            recovery_data_redb(&dir)
        };
        let mut results: Vec<(f64, u64)> = (0..runs)
            .map(|_| {
                let out = std::process::Command::new(std::env::current_exe().unwrap())
                    .args(["recover-child", store])
                    .arg(&dir)
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{out:?}");
                let text = String::from_utf8(out.stdout).unwrap();
                let mut words = text.split_whitespace();
                let seconds: f64 = words.next().unwrap().parse().unwrap();
                let peak_kb: u64 = words.next().unwrap().parse().unwrap();
                (seconds, peak_kb)
            })
            .collect();
        results.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (seconds, peak_kb) = results[results.len() / 2];
        println!(
            "{:<22} {:<5} {:>12.2} {:>12.0} {:>12.1}",
            "recovery 1M pending",
            store,
            seconds,
            peak_kb as f64 / 1024.0,
            file_bytes as f64 / (1 << 20) as f64
        );
        fs::remove_dir_all(&dir).unwrap();
    }
    let _ = fs::remove_dir_all(&root);
}

/// What one run of a write workload measured.
#[derive(Debug, Clone, Copy)]
struct Figures {
    messages: u64,
    elapsed: Duration,
    fsyncs: u64,
    /// Octets handed to `write` (ours) or to the storage backend (redb).
    written: u64,
    /// Octets the kernel wrote to the disk for this process.
    disk: u64,
}

impl Figures {
    fn per_second(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }

    fn print(&self, workload: &str, store: &str) {
        let m = self.messages as f64;
        println!(
            "{workload:<22} {store:<5} {:>12.0} {:>9} {:>13.4} {:>13.0} {:>12.0}",
            self.per_second(),
            self.fsyncs,
            self.fsyncs as f64 / m,
            self.written as f64 / m,
            self.disk as f64 / m
        );
    }
}

/// The run with the median rate.
fn median_of(runs: usize, mut once: impl FnMut() -> Figures) -> Figures {
    let mut all: Vec<Figures> = (0..runs).map(|_| once()).collect();
    all.sort_by(|a, b| a.per_second().total_cmp(&b.per_second()));
    all[all.len() / 2]
}

/// Octets this process has had written to storage (`write_bytes` of /proc/self/io).
fn disk_written() -> u64 {
    fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("write_bytes: "))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// A unique body of about 2 KB: the bench's 2 KB body behind a header naming message `n`.
fn body(n: u64) -> Vec<u8> {
    let mut body = format!(
        "X-Bench-Message: {n}\r\nFrom: bench@mxpipe.example\r\nTo: sink@mxpipe.example\r\nSubject: mxpipe bench\r\n\r\n"
    )
    .into_bytes();
    let line =
        b"The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.\r\n";
    while body.len() < 2048 {
        body.extend_from_slice(line);
    }
    body
}

fn recipient(message: u64, i: usize) -> String {
    format!("user{i}.{message}@sink.example")
}

/// redb's value for an envelope: body id, submission time, sender and recipients.
fn envelope(body_id: u64, recipients: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + recipients.len() * 32);
    out.extend_from_slice(&body_id.to_le_bytes());
    out.extend_from_slice(&SUBMITTED_MS.to_le_bytes());
    for s in std::iter::once(SENDER).chain(recipients.iter().map(String::as_str)) {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    out
}

/// `envelope` read back: body id, submission time, sender, recipients.
fn read_envelope(bytes: &[u8]) -> (u64, u64, String, Vec<String>) {
    let body_id = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    let submitted = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    let mut rest = &bytes[16..];
    let mut strings = Vec::new();
    while !rest.is_empty() {
        let n = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        strings.push(String::from_utf8(rest[4..4 + n].to_vec()).unwrap());
        rest = &rest[4 + n..];
    }
    let sender = strings.remove(0);
    (body_id, submitted, sender, strings)
}

/// A new segment, created as the spool's writer creates one.
fn new_segment(dir: &Path) -> File {
    OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(log::segment_path(dir, 1))
        .unwrap()
}

fn commit_ours(dir: &Path, per_commit: usize, commits: usize) -> Figures {
    let bodies: Vec<Vec<u8>> = (0..(per_commit * commits) as u64).map(body).collect();
    let recipients: Vec<String> = (0..bodies.len() as u64).map(|n| recipient(n, 0)).collect();
    let disk0 = disk_written();
    let start = Instant::now();
    let file = new_segment(dir);
    let mut buf = Vec::with_capacity(1 << 20);
    let (mut fsyncs, mut written, mut id) = (0, 0, 0u64);
    for batch in bodies.chunks(per_commit) {
        // As `Writer::commit`: heads and envelopes in one buffer, each body written from
        // where it is.
        buf.clear();
        let mut heads = Vec::with_capacity(batch.len());
        for body in batch {
            id += 1;
            log::encode_body_head(id, body, &mut buf);
            heads.push(buf.len());
            let to = [recipients[id as usize - 1].as_str()];
            log::encode_message(id, id, SUBMITTED_MS, SENDER, to.into_iter(), &mut buf);
        }
        let mut slices = Vec::with_capacity(2 * batch.len() + 1);
        let mut from = 0;
        for (at, body) in heads.into_iter().zip(batch) {
            slices.push(IoSlice::new(&buf[from..at]));
            slices.push(IoSlice::new(body));
            from = at;
        }
        slices.push(IoSlice::new(&buf[from..]));
        let len: usize = slices.iter().map(|s| s.len()).sum();
        log::write_all_vectored(&file, &mut slices).unwrap();
        file.sync_data().unwrap();
        written += len as u64;
        fsyncs += 1;
        if fsyncs == 1 {
            // The segment was created: its directory entry is made durable once.
            log::sync_dir(dir).unwrap();
            fsyncs += 1;
        }
    }
    Figures {
        messages: id,
        elapsed: start.elapsed(),
        fsyncs,
        written,
        disk: disk_written() - disk0,
    }
}

/// redb's file backend, counting what it is asked to write and sync.
#[derive(Debug)]
struct Counting {
    inner: FileBackend,
    syncs: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl StorageBackend for Counting {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> Result<(), std::io::Error> {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.written.fetch_add(data.len() as u64, Ordering::Relaxed);
        self.inner.write(offset, data)
    }
    fn close(&self) -> Result<(), std::io::Error> {
        self.inner.close()
    }
}

/// A redb database in `dir` with its counters (fsyncs, octets written).
fn open_redb(dir: &Path) -> (Database, Arc<AtomicU64>, Arc<AtomicU64>) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join("spool.redb"))
        .unwrap();
    let syncs = Arc::new(AtomicU64::new(0));
    let written = Arc::new(AtomicU64::new(0));
    let backend = Counting {
        inner: FileBackend::new(file).unwrap(),
        syncs: Arc::clone(&syncs),
        written: Arc::clone(&written),
    };
    let db = Database::builder().create_with_backend(backend).unwrap();
    (db, syncs, written)
}

fn commit_redb(dir: &Path, per_commit: usize, commits: usize) -> Figures {
    let bodies: Vec<Vec<u8>> = (0..(per_commit * commits) as u64).map(body).collect();
    let recipients: Vec<String> = (0..bodies.len() as u64).map(|n| recipient(n, 0)).collect();
    let disk0 = disk_written();
    let start = Instant::now();
    let (db, syncs, written) = open_redb(dir);
    // Creating the database is the log's creating its segment: counted from here, as there.
    let mut id = 0u64;
    for batch in bodies.chunks(per_commit) {
        let mut txn = db.begin_write().unwrap();
        txn.set_durability(Durability::Immediate).unwrap();
        {
            let mut body_table = txn.open_table(BODIES).unwrap();
            let mut message_table = txn.open_table(MESSAGES).unwrap();
            for body in batch {
                id += 1;
                body_table.insert(id, body.as_slice()).unwrap();
                let to = std::slice::from_ref(&recipients[id as usize - 1]);
                message_table
                    .insert(id, envelope(id, to).as_slice())
                    .unwrap();
            }
        }
        txn.commit().unwrap();
    }
    Figures {
        messages: id,
        elapsed: start.elapsed(),
        fsyncs: syncs.load(Ordering::Relaxed),
        written: written.load(Ordering::Relaxed),
        disk: disk_written() - disk0,
    }
}

const CHECKPOINT_MESSAGES: u64 = 1_000;
const CHECKPOINT_RECIPIENTS: usize = 100;
const CHECKPOINTS_PER_COMMIT: usize = 1_000;

/// Every (message, recipient) of the checkpoint workload, in the order outcomes come.
fn checkpoint_targets() -> Vec<(u64, String)> {
    (1..=CHECKPOINT_MESSAGES)
        .flat_map(|id| (0..CHECKPOINT_RECIPIENTS).map(move |i| (id, recipient(id, i))))
        .collect()
}

fn checkpoints_ours(dir: &Path) -> Figures {
    let targets = checkpoint_targets();
    let mut file = new_segment(dir);
    let mut buf = Vec::new();
    log::encode_body(1, &body(0), &mut buf);
    for id in 1..=CHECKPOINT_MESSAGES {
        let to: Vec<String> = (0..CHECKPOINT_RECIPIENTS)
            .map(|i| recipient(id, i))
            .collect();
        log::encode_message(
            id,
            1,
            SUBMITTED_MS,
            SENDER,
            to.iter().map(String::as_str),
            &mut buf,
        );
    }
    file.write_all(&buf).unwrap();
    file.sync_all().unwrap();
    log::sync_dir(dir).unwrap();
    let disk0 = disk_written();
    let start = Instant::now();
    let (mut fsyncs, mut written) = (0, 0);
    for batch in targets.chunks(CHECKPOINTS_PER_COMMIT) {
        buf.clear();
        for (id, recipient) in batch {
            log::encode_outcome(*id, Mark::Delivered, 1, 0, recipient, &mut buf);
        }
        file.write_all(&buf).unwrap();
        file.sync_data().unwrap();
        written += buf.len() as u64;
        fsyncs += 1;
    }
    Figures {
        messages: targets.len() as u64,
        elapsed: start.elapsed(),
        fsyncs,
        written,
        disk: disk_written() - disk0,
    }
}

fn checkpoints_redb(dir: &Path) -> Figures {
    let targets = checkpoint_targets();
    let (db, syncs, written) = open_redb(dir);
    {
        let txn = db.begin_write().unwrap();
        {
            let mut bodies = txn.open_table(BODIES).unwrap();
            bodies.insert(1, body(0).as_slice()).unwrap();
            let mut messages = txn.open_table(MESSAGES).unwrap();
            for id in 1..=CHECKPOINT_MESSAGES {
                let to: Vec<String> = (0..CHECKPOINT_RECIPIENTS)
                    .map(|i| recipient(id, i))
                    .collect();
                messages.insert(id, envelope(1, &to).as_slice()).unwrap();
            }
            txn.open_table(OUTCOMES).unwrap();
        }
        txn.commit().unwrap();
    }
    let (syncs0, written0) = (
        syncs.load(Ordering::Relaxed),
        written.load(Ordering::Relaxed),
    );
    let disk0 = disk_written();
    let start = Instant::now();
    for batch in targets.chunks(CHECKPOINTS_PER_COMMIT) {
        let mut txn = db.begin_write().unwrap();
        txn.set_durability(Durability::Immediate).unwrap();
        {
            let mut outcomes = txn.open_table(OUTCOMES).unwrap();
            for (id, recipient) in batch {
                outcomes
                    .insert((*id, recipient.as_str()), (1u8, 1u32, 0u64))
                    .unwrap();
            }
        }
        txn.commit().unwrap();
    }
    Figures {
        messages: targets.len() as u64,
        elapsed: start.elapsed(),
        fsyncs: syncs.load(Ordering::Relaxed) - syncs0,
        written: written.load(Ordering::Relaxed) - written0,
        disk: disk_written() - disk0,
    }
}

const RECOVERY_MESSAGES: u64 = 10_000;
const RECOVERY_RECIPIENTS: usize = 100;
const RETRY_AT_MS: u64 = SUBMITTED_MS + 3_600_000;

fn recovery_recipients(id: u64) -> Vec<String> {
    (0..RECOVERY_RECIPIENTS).map(|i| recipient(id, i)).collect()
}

/// The spool of `recovery_scale_write` (src/spool/tests.rs); returns its size.
fn recovery_data_ours(dir: &Path) -> u64 {
    let mut file = new_segment(dir);
    let mut buf = Vec::new();
    log::encode_body(1, &body(0), &mut buf);
    for id in 1..=RECOVERY_MESSAGES {
        let recipients = recovery_recipients(id);
        log::encode_message(
            id,
            1,
            SUBMITTED_MS,
            SENDER,
            recipients.iter().map(String::as_str),
            &mut buf,
        );
        for r in recipients.iter().step_by(2) {
            log::encode(
                &Record::Outcome {
                    id,
                    mark: Mark::Deferred,
                    attempts: 1,
                    retry_at_ms: RETRY_AT_MS,
                    recipient: r.clone(),
                },
                &mut buf,
            );
        }
        file.write_all(&buf).unwrap();
        buf.clear();
    }
    file.sync_all().unwrap();
    file.metadata().unwrap().len()
}

/// The same content in redb; returns the file's size.
fn recovery_data_redb(dir: &Path) -> u64 {
    let (db, _, _) = open_redb(dir);
    for chunk in (1..=RECOVERY_MESSAGES).collect::<Vec<_>>().chunks(1_000) {
        let txn = db.begin_write().unwrap();
        {
            let mut bodies = txn.open_table(BODIES).unwrap();
            if chunk[0] == 1 {
                bodies.insert(1, body(0).as_slice()).unwrap();
            }
            let mut messages = txn.open_table(MESSAGES).unwrap();
            let mut outcomes = txn.open_table(OUTCOMES).unwrap();
            for &id in chunk {
                let recipients = recovery_recipients(id);
                messages
                    .insert(id, envelope(1, &recipients).as_slice())
                    .unwrap();
                for r in recipients.iter().step_by(2) {
                    outcomes
                        .insert((id, r.as_str()), (0u8, 1u32, RETRY_AT_MS))
                        .unwrap();
                }
            }
        }
        txn.commit().unwrap();
    }
    drop(db);
    fs::metadata(dir.join("spool.redb")).unwrap().len()
}

/// In the child: reads the store in `dir` back into `State`'s map of messages and prints the
/// seconds it took and the peak RSS in KiB.
fn recover_child(store: &str, dir: &Path) {
    let start = Instant::now();
    let state = match store {
        "ours" => State::load(dir).unwrap(),
        _ => load_redb(dir),
    };
    let pending: usize = state.messages.values().map(|m| m.pending().count()).sum();
    let seconds = start.elapsed().as_secs_f64();
    assert_eq!(pending, RECOVERY_MESSAGES as usize * RECOVERY_RECIPIENTS);
    let peak_kb: u64 = fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap();
    println!("{seconds:.3} {peak_kb}");
}

/// A full scan of the redb tables into the map `State::load` builds.
fn load_redb(dir: &Path) -> State {
    let db = Database::open(dir.join("spool.redb")).unwrap();
    let txn = db.begin_read().unwrap();
    let mut messages: BTreeMap<u64, StoredMessage> = BTreeMap::new();
    for entry in txn.open_table(MESSAGES).unwrap().iter().unwrap() {
        let (id, value) = entry.unwrap();
        let (body_id, submitted_ms, sender, recipients) = read_envelope(value.value());
        messages.insert(
            id.value(),
            StoredMessage::new(body_id, submitted_ms, sender, recipients),
        );
    }
    for entry in txn.open_table(OUTCOMES).unwrap().iter().unwrap() {
        let (key, value) = entry.unwrap();
        let (id, recipient) = key.value();
        let (mark, attempts, retry_at_ms) = value.value();
        if let Some(m) = messages.get_mut(&id) {
            let mark = match mark {
                0 => Mark::Deferred,
                1 => Mark::Delivered,
                2 => Mark::Bounced,
                _ => Mark::Expired,
            };
            m.checkpoints.insert(
                recipient.to_string(),
                Checkpoint {
                    mark,
                    attempts,
                    retry_at_ms,
                },
            );
        }
    }
    let mut bodies = HashMap::new();
    for entry in txn.open_table(BODIES).unwrap().iter().unwrap() {
        let (id, bytes) = entry.unwrap();
        bodies.insert(id.value(), bytes.value().to_vec());
    }
    messages.retain(|_, m| !m.is_done());
    State {
        messages,
        bodies,
        next_id: RECOVERY_MESSAGES + 1,
        next_body_id: 2,
        ..State::default()
    }
}
