//! Custody on disk: a durable spool, so that nothing accepted is lost across restarts and
//! crashes.
//!
//! The spool is a source of work for the engine (see [`crate::engine::custody`]). A submission
//! goes to a writer thread, which takes everything waiting (group commit), appends it to the
//! current segment ([`log`]), fsyncs the file (and the directory after creating one), and only
//! then advances the durable watermark ([`Spool::durable_id`], [`Spool::sync`]) and hands the
//! messages to the engine. The engine reports every deferral and final outcome back, once per
//! loop turn; the writer appends them as checkpoints with its next batch. A body shared by
//! many messages is written once per segment.
//!
//! Opening a spool ([`Spool::open`]) locks its directory (one process at a time), reads every
//! segment ([`store::State::load`]), writes what is still pending into a fresh segment and
//! deletes the old ones; the writer then re-queues every pending recipient with its attempts,
//! holding back those whose retry is not yet due. While it runs, each rotation to a new
//! segment (past `segment_bytes`) starts a compaction on a thread of its own: the segments
//! before the one just left are read, what is live in them is written as one segment (into a
//! number every rotation skips, so that it sorts before the checkpoints written since) and
//! they are deleted, so finished mail gives its space back without a restart. A write or fsync error stops the spool
//! taking anything more (an fsync that failed is never retried and trusted); the size limit
//! and the free-space floor refuse new submissions at the door. Nothing here touches a socket.

pub mod admin;
pub mod control;
pub mod log;
pub mod store;

use crate::engine::custody::{Counted, Custody, Intake, Outcomes};
use crate::engine::orders::QueueOrder;
use crate::engine::EventKind;
use crate::error::{Error, Field, Result, SpoolProblem};
use crate::message::dsn::DsnEnvelope;
use crate::message::{Address, Body, Message};
use crate::queue::{Resumed, Submission};
use crossbeam_channel::{Receiver, Sender};
use log::{Mark, Record};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The spool's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolConfig {
    /// The spool directory (created if missing).
    pub dir: PathBuf,
    /// Submissions are refused once the segments hold this many octets (default 16 GiB).
    pub max_bytes: u64,
    /// Submissions are refused while the file system has less free space than this (default
    /// 256 MiB).
    pub min_free_bytes: u64,
    /// A new segment is started past this size.
    pub segment_bytes: u64,
    /// Messages waiting for the writer at most; a full queue is backpressure (`QueueFull`).
    pub queue_capacity: usize,
    /// Recipients waiting for the writer at most (default 100,000: the writer's next batch
    /// and the one after; a message larger than this alone is still taken when nothing
    /// waits): backpressure for bursts of long lists, so that a caller
    /// submitting faster than the disk takes them does not hold them all in memory at once.
    pub queue_recipients: u64,
}

impl SpoolConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SpoolConfig {
            dir: dir.into(),
            max_bytes: 16 << 30,
            min_free_bytes: 256 << 20,
            segment_bytes: 256 << 20,
            queue_capacity: 65_536,
            queue_recipients: 2 * BATCH_RECIPIENTS as u64,
        }
    }
}

/// What opening the spool found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Messages with recipients still pending, re-queued.
    pub messages: usize,
    /// Recipients re-queued (pending), of which some wait for their retry time.
    pub recipients: usize,
    /// Of those, recipients whose retry is not due yet.
    pub held: usize,
    /// Messages dropped because every recipient was final (or they were deleted).
    pub removed: usize,
    /// Records cut short by a crash (dropped: they were never acknowledged).
    pub torn: usize,
    /// Corrupt records set aside.
    pub corrupt: usize,
    /// Messages kept in the spool but not sent: their body was set aside as corrupt, or they
    /// fail the checks of this version (see `mxpipe queue show`, `delete`).
    pub unusable: usize,
    /// Where the corrupt records were copied.
    pub set_aside: Vec<PathBuf>,
    /// Why the control socket ([`control`]) could not be served, if it could not (e.g. a
    /// directory path too long for a Unix socket): the spool works, the queue tools cannot
    /// reach it while this process holds it.
    pub control_unavailable: Option<String>,
}

impl std::fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "spool recovered: {} messages, {} recipients pending ({} waiting for their retry time), {} finished messages removed, {} torn records dropped, {} corrupt records set aside, {} messages unusable",
            self.messages, self.recipients, self.held, self.removed, self.torn, self.corrupt, self.unusable
        )?;
        for p in &self.set_aside {
            write!(f, "\n  set aside: {}", p.display())?;
        }
        if let Some(why) = &self.control_unavailable {
            write!(f, "\n  no control socket for the queue tools: {why}")?;
        }
        Ok(())
    }
}

/// Figures of the writer, for the bench.
#[derive(Debug, Default)]
pub struct SpoolStats {
    /// fsyncs of segment files.
    pub fsyncs: AtomicU64,
    /// Messages made durable.
    pub messages: AtomicU64,
    /// Recipients checkpointed (deferrals and final outcomes).
    pub checkpoints: AtomicU64,
    /// Octets of those checkpoints written.
    pub checkpoint_bytes: AtomicU64,
    /// Compactions of the running spool finished (sealed segments rewritten and deleted).
    pub compactions: AtomicU64,
    /// Octets those compactions gave back (segments deleted less the segment written).
    pub reclaimed_bytes: AtomicU64,
    /// Compactions that stopped on an error (the segments they read are kept).
    pub compaction_errors: AtomicU64,
}

/// What the writer shares with submitters.
#[derive(Debug)]
struct Shared {
    /// Every identifier up to this is durable.
    durable: AtomicU64,
    /// Set once a write or fsync failed; never cleared.
    failed: Mutex<Option<SpoolProblem>>,
    changed: Condvar,
    /// Octets in the segments.
    bytes: AtomicU64,
    /// Recipients of the submissions waiting for the writer (`SpoolConfig::queue_recipients`).
    queued_recipients: AtomicU64,
    low_space: AtomicBool,
    /// A loop told the writer of checkpoints it wrote, and the writer has not fsynced since:
    /// later checkpoints are covered by that fsync and need not wake the writer again (one
    /// wake-up per loop turn cost the loop a context switch every turn).
    checkpoints_told: AtomicBool,
    stats: SpoolStats,
    /// The segment being appended to, shared by the writer thread (submissions) and the loops
    /// (checkpoints, written on the loop thread at the end of the turn that decided them, so
    /// that a kill loses at most one turn's outcomes whatever the scheduler does).
    segment: Mutex<Segment>,
}

/// The current segment file and its size.
#[derive(Debug)]
struct Segment {
    file: Arc<File>,
    size: u64,
}

impl Shared {
    fn failed(&self) -> Option<SpoolProblem> {
        *self.failed.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail(&self, problem: SpoolProblem) {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        failed.get_or_insert(problem);
        self.changed.notify_all();
    }

    /// Appends `buf` to the current segment; on error cuts the segment back and fails the
    /// spool. Returns the file (for an fsync outside the lock).
    fn append(&self, buf: &[u8]) -> Option<Arc<File>> {
        self.append_vectored(&mut [IoSlice::new(buf)])
    }

    /// [`Shared::append`] of the slices in order, in as few `writev` calls as they take.
    fn append_vectored(&self, slices: &mut [IoSlice<'_>]) -> Option<Arc<File>> {
        let len: u64 = slices.iter().map(|s| s.len() as u64).sum();
        let mut segment = self.segment.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = write_batch(&segment.file, slices) {
            // Nothing partial may remain: cut the segment back to where the batch began.
            let _ = segment.file.set_len(segment.size);
            self.fail(SpoolProblem::WriteFailed(errno(&e)));
            return None;
        }
        segment.size += len;
        self.bytes.fetch_add(len, Ordering::Relaxed);
        Some(Arc::clone(&segment.file))
    }
}

/// A submission on its way to disk.
struct Pending {
    id: u64,
    message: Message,
    submitted_ms: u64,
}

enum Work {
    /// Checkpoints were written: the writer fsyncs them within `CHECKPOINT_SYNC`.
    Written,
    /// A queue administrator's order (from the control socket).
    Order(QueueOrder),
    Stop,
}

/// The engine's custody, as the spool implements it: a loop turn's outcomes are appended to
/// the segment at once (one write, no fsync: the writer thread fsyncs them soon after).
#[derive(Debug)]
struct SpoolCustody {
    shared: Arc<Shared>,
    work: Sender<Work>,
}

impl Custody for SpoolCustody {
    fn record(&self, outcomes: &mut Outcomes) {
        // After a failure the spool acknowledges nothing more: checkpoints are dropped (a
        // lost checkpoint means a resend after restart, never a loss).
        if self.shared.failed().is_some() {
            return;
        }
        // One buffer per loop thread, kept between turns: a fresh one per turn (a megabyte
        // for a turn that finishes 20,000 recipients) cost a page fault per 4 KiB every time.
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        BUF.with_borrow_mut(|buf| self.record_into(buf, outcomes));
    }
}

impl SpoolCustody {
    fn record_into(&self, buf: &mut Vec<u8>, outcomes: &Outcomes) {
        buf.clear();
        let mut recipients = 0;
        for o in &outcomes.list {
            let mark = match o.kind {
                EventKind::Deferred => Mark::Deferred,
                EventKind::Delivered => Mark::Delivered,
                EventKind::Bounced => Mark::Bounced,
                EventKind::Expired => Mark::Expired,
            };
            log::encode_packed_checkpoint(
                o.is_positional(),
                o.message_id,
                mark,
                o.attempts,
                o.retry_at.map_or(0, unix_ms),
                o.len(),
                outcomes.packed(o),
                buf,
            );
            recipients += o.len() as u64;
        }
        if self.shared.append(buf).is_some() {
            self.shared
                .stats
                .checkpoints
                .fetch_add(recipients, Ordering::Relaxed);
            self.shared
                .stats
                .checkpoint_bytes
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
            if !self.shared.checkpoints_told.swap(true, Ordering::AcqRel) {
                let _ = self.work.send(Work::Written);
            }
        }
        // A burst's buffer is not kept for ever.
        if buf.capacity() > 4 << 20 {
            *buf = Vec::new();
        }
    }
}

/// An open spool (its directory locked by this process).
pub struct Spool {
    config: SpoolConfig,
    _lock: File,
    shared: Arc<Shared>,
    /// The next identifier, given under this lock together with the send, so that the writer
    /// sees identifiers in order and the watermark means "everything up to here".
    next_id: Mutex<u64>,
    /// The last identifier given (read by `sync` without waiting for a blocked submitter).
    given: AtomicU64,
    submit_tx: Sender<Pending>,
    submit_rx: Option<Receiver<Pending>>,
    work_tx: Sender<Work>,
    work_rx: Option<Receiver<Work>>,
    recovered: Option<store::State>,
    report: RecoveryReport,
    intake: Option<Intake>,
    writer: Option<JoinHandle<()>>,
    control: Option<control::Server>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.config.dir)
            .field("durable", &self.durable_id())
            .finish()
    }
}

/// Locks `dir` for this process (released when the file closes, also on a crash).
pub(crate) fn lock_dir(dir: &Path) -> Result<File> {
    std::fs::create_dir_all(dir)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("LOCK"))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(Error::Spool(SpoolProblem::Locked));
    }
    Ok(file)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn free_bytes(dir: &Path) -> Option<u64> {
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct it is given; the path is NUL-terminated.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(path.as_ptr(), &mut s) == 0).then(|| s.f_bavail as u64 * s.f_frsize as u64)
    }
}

impl Spool {
    /// Locks the directory, reads what it holds and compacts it. The engine gets the
    /// recovered work when [`Spool::start`] runs.
    pub fn open(config: SpoolConfig) -> Result<Spool> {
        let lock = lock_dir(&config.dir)?;
        // A compaction the last process did not finish: its segments are all still there.
        for entry in std::fs::read_dir(&config.dir)?.flatten() {
            if entry.file_name().to_string_lossy().ends_with(".log.tmp") {
                std::fs::remove_file(entry.path())?;
            }
        }
        let mut state = store::State::load(&config.dir)?;
        let (_, file, size) = state.compact(&config.dir)?;
        let report = RecoveryReport {
            messages: state.messages.len(),
            recipients: state.messages.values().map(|m| m.recipients.len()).sum(),
            held: 0,
            removed: state.removed,
            torn: state.issues.torn,
            corrupt: state.issues.corrupt,
            unusable: 0,
            set_aside: state.issues.set_aside.clone(),
            control_unavailable: None,
        };
        let (submit_tx, submit_rx) = crossbeam_channel::bounded(config.queue_capacity);
        let (work_tx, work_rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared {
            durable: AtomicU64::new(state.next_id - 1),
            failed: Mutex::new(None),
            changed: Condvar::new(),
            bytes: AtomicU64::new(size),
            queued_recipients: AtomicU64::new(0),
            low_space: AtomicBool::new(
                free_bytes(&config.dir).is_some_and(|free| free < config.min_free_bytes),
            ),
            checkpoints_told: AtomicBool::new(false),
            stats: SpoolStats::default(),
            segment: Mutex::new(Segment {
                file: Arc::new(file),
                size,
            }),
        });
        Ok(Spool {
            next_id: Mutex::new(state.next_id),
            given: AtomicU64::new(state.next_id - 1),
            config,
            _lock: lock,
            shared,
            submit_tx,
            submit_rx: Some(submit_rx),
            work_tx,
            work_rx: Some(work_rx),
            recovered: Some(state),
            report,
            intake: None,
            writer: None,
            control: None,
        })
    }

    /// The engine's view of this spool: where outcomes go.
    pub fn custody(&self) -> Arc<dyn Custody> {
        Arc::new(SpoolCustody {
            shared: Arc::clone(&self.shared),
            work: self.work_tx.clone(),
        })
    }

    /// What opening found (counts of recovered, removed, torn and corrupt records).
    /// Runs a queue command (list, show, retry, delete, stats) on this running spool: what its
    /// control socket answers, for other endpoints (HTTP) to serve.
    pub fn control(&self, command: admin::QueueCommand) -> control::Response {
        let orders = self.work_tx.clone();
        control::handle(command, &self.config.dir, &move |order| {
            let _ = orders.send(Work::Order(order));
        })
    }

    pub fn report(&self) -> &RecoveryReport {
        &self.report
    }

    /// The writer's figures: fsyncs, messages made durable, checkpoints written.
    pub fn stats(&self) -> &SpoolStats {
        &self.shared.stats
    }

    /// Starts the writer, which first hands the recovered work to the engine.
    pub fn start(&mut self, intake: Intake) -> Result<()> {
        let state = self.recovered.take().expect("started once");
        let next_body_id = state.next_body_id;
        let recovered = recovered_submissions(state, &mut self.report.unusable);
        self.report.held = recovered
            .iter()
            .filter(|(due, _)| due.is_some())
            .map(|(_, s)| s.message.recipients.len())
            .sum();
        // Counted as unfinished before this returns, so that a caller's wait_final waits for
        // the recovered work too.
        self.report.recipients = recovered
            .iter()
            .map(|(_, s)| s.message.recipients.len())
            .sum();
        let due = self.report.recipients - self.report.held;
        intake.count_submitted(due as u64, true);
        intake.count_held(self.report.held as u64, true);
        let mut writer = Writer {
            dir: self.config.dir.clone(),
            config: self.config.clone(),
            shared: Arc::clone(&self.shared),
            intake: intake.clone(),
            submissions: self.submit_rx.take().expect("started once"),
            work: self.work_rx.take().expect("started once"),
            segment_number: 0,
            dir_dirty: false,
            bodies: HashMap::new(),
            bodies_prune_at: MIN_BODIES_PRUNE,
            next_body_id,
            held: BinaryHeap::new(),
            held_jobs: HashMap::new(),
            held_seq: 0,
            buf: Vec::with_capacity(1 << 20),
            unsynced_since: None,
            compaction: None,
            compacted_into: 0,
        };
        writer.segment_number = log::segments(&self.config.dir)?
            .last()
            .map_or(1, |(n, _)| *n);
        self.intake = Some(intake);
        self.writer = Some(
            std::thread::Builder::new()
                .name("mxpipe-spool".into())
                .spawn(move || writer.run(recovered))?,
        );
        let orders = self.work_tx.clone();
        // The queue tools are an aid: a spool whose socket cannot be bound still takes custody.
        match control::Server::start(
            &self.config.dir,
            Box::new(move |order| {
                let _ = orders.send(Work::Order(order));
            }),
        ) {
            Ok(server) => self.control = Some(server),
            Err(e) => self.report.control_unavailable = Some(e.to_string()),
        }
        Ok(())
    }

    /// Queues `message` for the writer; its identifier is returned at once, durability comes
    /// with [`Spool::sync`] or [`Spool::durable_id`]. The counts of the dispatcher include it
    /// from here on (a message refused later is taken out of them again).
    pub fn submit(
        &self,
        message: Message,
        timeout: Option<Duration>,
    ) -> std::result::Result<u64, (Error, Message)> {
        if let Some(problem) = *self.shared.failed.lock().unwrap_or_else(|e| e.into_inner()) {
            return Err((Error::Spool(problem), message));
        }
        if self.shared.bytes.load(Ordering::Relaxed) >= self.config.max_bytes {
            return Err((Error::Spool(SpoolProblem::Full), message));
        }
        if self.shared.low_space.load(Ordering::Relaxed) {
            return Err((Error::Spool(SpoolProblem::LowSpace), message));
        }
        let intake = self.intake.as_ref().expect("spool started");
        let n = message.recipients.len() as u64;
        if let Err(e) = self.room_for(n, timeout) {
            return Err((e, message));
        }
        intake.count_submitted(n, true);
        let mut next = self.next_id.lock().unwrap_or_else(|e| e.into_inner());
        let pending = Pending {
            id: *next,
            message,
            submitted_ms: unix_ms(SystemTime::now()),
        };
        let sent = match timeout {
            None => self.submit_tx.try_send(pending).map_err(|e| e.into_inner()),
            Some(t) => self
                .submit_tx
                .send_timeout(pending, t)
                .map_err(|e| e.into_inner()),
        };
        match sent {
            Ok(()) => {
                let id = *next;
                *next += 1;
                self.given.store(id, Ordering::Release);
                Ok(id)
            }
            Err(pending) => {
                drop(next);
                self.shared.queued_recipients.fetch_sub(n, Ordering::AcqRel);
                intake.count_submitted(n, false);
                Err((Error::QueueFull, pending.message))
            }
        }
    }

    /// Reserves room for `n` recipients in the writer's queue, waiting up to `timeout` (`None`:
    /// not at all). A message is always taken when nothing waits, however large.
    fn room_for(&self, n: u64, timeout: Option<Duration>) -> Result<()> {
        let limit = self.config.queue_recipients;
        let queued = &self.shared.queued_recipients;
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let reserved = queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q == 0 || q + n <= limit).then_some(q + n)
            });
            if reserved.is_ok() {
                return Ok(());
            }
            let now = Instant::now();
            let Some(deadline) = deadline.filter(|d| *d > now) else {
                return Err(Error::QueueFull);
            };
            // The writer notifies after every batch; the timeout covers a batch of nothing
            // but taken submissions (and a spool that failed, which refuses at the door).
            let failed = self.shared.failed.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(problem) = *failed {
                return Err(Error::Spool(problem));
            }
            let wait = (deadline - now).min(Duration::from_millis(5));
            drop(self.shared.changed.wait_timeout(failed, wait));
        }
    }

    /// Every identifier up to this is durable.
    pub fn durable_id(&self) -> u64 {
        self.shared.durable.load(Ordering::Acquire)
    }

    /// Waits until every message submitted before the call is durable, or the spool failed.
    pub fn sync(&self) -> Result<()> {
        let target = self.given.load(Ordering::Acquire);
        let mut failed = self.shared.failed.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.shared.durable.load(Ordering::Acquire) >= target {
                return Ok(());
            }
            if let Some(problem) = *failed {
                return Err(Error::Spool(problem));
            }
            failed = self
                .shared
                .changed
                .wait_timeout(failed, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Writes the last checkpoints and stops the writer (after the loops stopped).
    pub fn close(mut self) {
        if let Some(control) = self.control.take() {
            control.stop();
        }
        let _ = self.work_tx.send(Work::Stop);
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// The recovered messages as submissions, grouped by attempts and retry time; each with the
/// instant it is due (`None`: now). A message that can no longer be sent (its body record was
/// set aside, or it fails today's checks) is skipped and counted in `unusable`, never an error:
/// one bad message must not stop every later start.
fn recovered_submissions(
    state: store::State,
    unusable: &mut usize,
) -> Vec<(Option<Instant>, Submission)> {
    let now_ms = unix_ms(SystemTime::now());
    let now = Instant::now();
    let mut bodies: HashMap<u64, Arc<Body>> = HashMap::new();
    let mut out = Vec::new();
    for (id, m) in state.messages {
        match recovered_message(id, m, &state.bodies, &mut bodies, now, now_ms) {
            Some(mut list) => out.append(&mut list),
            None => *unusable += 1,
        }
    }
    out
}

/// One recovered message as submissions (see [`recovered_submissions`]).
fn recovered_message(
    id: u64,
    m: store::StoredMessage,
    stored: &HashMap<u64, Vec<u8>>,
    bodies: &mut HashMap<u64, Arc<Body>>,
    now: Instant,
    now_ms: u64,
) -> Option<Vec<(Option<Instant>, Submission)>> {
    let mut out = Vec::new();
    {
        let body = match bodies.get(&m.body_id) {
            Some(b) => Arc::clone(b),
            None => {
                // A body whose record was set aside as corrupt cannot be sent.
                let bytes = stored.get(&m.body_id)?;
                let body = Arc::new(Body::new(bytes).ok()?);
                bodies.insert(m.body_id, Arc::clone(&body));
                body
            }
        };
        let sender = if m.sender.is_empty() {
            Address::null()
        } else {
            Address::parse(&m.sender, Field::Sender).ok()?
        };
        // A request that no longer reads (it passed the checks when stored) is dropped, not
        // the message.
        let dsn = m
            .dsn
            .as_ref()
            .and_then(|(mail, rcpts)| DsnEnvelope::from_stored(mail, rcpts).ok())
            .map(Arc::new);
        let age = Duration::from_millis(now_ms.saturating_sub(m.submitted_ms));
        let submitted = now.checked_sub(age).unwrap_or(now);
        let mut groups: HashMap<(u32, u64), Vec<Address>> = HashMap::new();
        for (i, (position, recipient, checkpoint)) in m.pending_placed().enumerate() {
            let (attempts, retry_at_ms) =
                checkpoint.map_or((0, 0), |c| (c.attempts, c.retry_at_ms));
            let due_ms = if retry_at_ms > now_ms { retry_at_ms } else { 0 };
            let mut address = Address::parse(recipient, Field::Recipient(i)).ok()?;
            // Where the message's record put it: the checkpoints after this restart name it
            // by that position too.
            if let Some(p) = position {
                address.set_position(p);
            }
            groups.entry((attempts, due_ms)).or_default().push(address);
        }
        let mut groups: Vec<_> = groups.into_iter().collect();
        groups.sort_by_key(|(k, _)| *k);
        for ((attempts, due_ms), recipients) in groups {
            let due = (due_ms > 0).then(|| now + Duration::from_millis(due_ms - now_ms));
            let mut message =
                Message::from_parts(sender.clone(), recipients, Arc::clone(&body)).ok()?;
            message.dsn = dsn.clone();
            out.push((
                due,
                Submission {
                    id,
                    message,
                    resumed: Some(Box::new(Resumed {
                        attempts,
                        submitted,
                    })),
                },
            ));
        }
    }
    Some(out)
}

/// The writer thread's state.
struct Writer {
    dir: PathBuf,
    config: SpoolConfig,
    shared: Arc<Shared>,
    intake: Intake,
    submissions: Receiver<Pending>,
    work: Receiver<Work>,
    segment_number: u64,
    /// A segment was created since the directory was last fsynced.
    dir_dirty: bool,
    /// Bodies written to the current segment, by the address of their allocation (checked
    /// against the live `Arc`, so a reused address is never mistaken for the old body).
    bodies: HashMap<usize, (Weak<Body>, u64)>,
    /// The size of `bodies` at which entries of dropped bodies are removed next: twice what
    /// was left after the last time, so that with many bodies alive (unique bodies in flight)
    /// the sweep costs O(1) per body amortized instead of O(n) per body.
    bodies_prune_at: usize,
    next_body_id: u64,
    /// Recovered work not yet due.
    held: BinaryHeap<Reverse<(Instant, u64)>>,
    held_jobs: HashMap<u64, Submission>,
    held_seq: u64,
    buf: Vec<u8>,
    /// Checkpoints were written (not yet fsynced) since then.
    unsynced_since: Option<Instant>,
    /// The compaction under way, on a thread of its own.
    compaction: Option<JoinHandle<io::Result<Option<Compacted>>>>,
    /// The segment the last compaction started wrote into.
    compacted_into: u64,
}

/// What a compaction of the running spool did.
struct Compacted {
    /// Octets in the segments it deleted.
    deleted: u64,
    /// Octets in the segment it wrote.
    written: u64,
}

/// `Writer::bodies` is never swept below this size.
const MIN_BODIES_PRUNE: usize = 4096;

/// How often the writer looks whether a compaction has finished.
const COMPACTION_POLL: Duration = Duration::from_millis(50);

/// Messages one batch takes at most.
const BATCH: usize = 8192;
/// Recipients one batch takes at most (then about a megabyte of envelopes): a burst of large
/// lists is written in several batches through one buffer of that size, instead of one
/// buffer as large as the burst, freshly allocated and faulted in.
const BATCH_RECIPIENTS: usize = 50_000;
/// Checkpoints alone are written at once but fsynced at most this long after: a kill loses
/// nothing written, only a power failure can lose them, and a lost checkpoint means a resend,
/// never a loss. Submissions are always fsynced before they are acknowledged.
const CHECKPOINT_SYNC: Duration = Duration::from_millis(100);

impl Writer {
    fn run(mut self, recovered: Vec<(Option<Instant>, Submission)>) {
        for (due, submission) in recovered {
            match due {
                Some(due) => self.hold(due, submission),
                None => self.hand_over(submission, Counted::Both),
            }
        }
        let mut batch: Vec<Pending> = Vec::new();
        loop {
            let mut written = false;
            let now = Instant::now();
            let timeout = [
                self.held.peek().map(|Reverse((t, _))| *t),
                self.unsynced_since.map(|t| t + CHECKPOINT_SYNC),
                // A compaction under way is looked at again soon (its result, and the next
                // one the rotations since may call for).
                self.compaction.as_ref().map(|_| now + COMPACTION_POLL),
            ]
            .into_iter()
            .flatten()
            .min()
            .map_or(Duration::from_secs(3600), |t| {
                t.saturating_duration_since(now)
            });
            let mut stop = false;
            crossbeam_channel::select! {
                recv(self.submissions) -> p => if let Ok(p) = p { self.take(&mut batch, p) },
                recv(self.work) -> w => match w {
                    Ok(Work::Written) => written = true,
                    Ok(Work::Order(order)) => self.order(order),
                    Ok(Work::Stop) | Err(_) => stop = true,
                },
                default(timeout) => {}
            }
            let mut recipients: usize = batch.iter().map(|p| p.message.recipients().len()).sum();
            while batch.len() < BATCH && recipients < BATCH_RECIPIENTS {
                match self.submissions.try_recv() {
                    Ok(p) => {
                        recipients += p.message.recipients().len();
                        self.take(&mut batch, p);
                    }
                    Err(_) => break,
                }
            }
            while let Ok(w) = self.work.try_recv() {
                match w {
                    Work::Written => written = true,
                    Work::Order(order) => self.order(order),
                    Work::Stop => stop = true,
                }
            }
            if written {
                self.unsynced_since.get_or_insert_with(Instant::now);
            }
            self.commit(&mut batch, stop);
            self.release_due();
            self.reap_compaction(stop);
            if stop {
                break;
            }
        }
    }

    /// Takes a submission off the queue into `batch`: its recipients leave the queue's count.
    fn take(&self, batch: &mut Vec<Pending>, p: Pending) {
        self.shared
            .queued_recipients
            .fetch_sub(p.message.recipients().len() as u64, Ordering::AcqRel);
        batch.push(p);
    }

    /// Takes the result of a finished compaction (waits for it when `wait`): the octets it
    /// gave back leave the size count.
    fn reap_compaction(&mut self, wait: bool) {
        if !wait && !self.compaction.as_ref().is_some_and(|c| c.is_finished()) {
            return;
        }
        let Some(handle) = self.compaction.take() else {
            return;
        };
        let stats = &self.shared.stats;
        match handle.join() {
            Ok(Ok(None)) => {}
            Ok(Ok(Some(done))) => {
                let bytes = &self.shared.bytes;
                bytes.fetch_add(done.written, Ordering::Relaxed);
                let _ = bytes.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                    Some(b.saturating_sub(done.deleted))
                });
                stats.compactions.fetch_add(1, Ordering::Relaxed);
                stats
                    .reclaimed_bytes
                    .fetch_add(done.deleted.saturating_sub(done.written), Ordering::Relaxed);
            }
            Ok(Err(_)) | Err(_) => {
                stats.compaction_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Rotations while it ran left segments for the next one.
        if !wait {
            self.compact_if_due();
        }
    }

    /// Starts a compaction unless one is under way or the last one covered everything it
    /// may: every segment before the one sealed last (which still holds mail in flight) goes
    /// into the number skipped when that one was started.
    fn compact_if_due(&mut self) {
        // Called after a rotation, which skipped one number: the segment left is two back.
        let sealed = self.segment_number.saturating_sub(2);
        if self.compaction.is_some() || sealed < 3 || self.compacted_into >= sealed - 1 {
            return;
        }
        self.compacted_into = sealed - 1;
        self.start_compaction(sealed - 2, sealed - 1);
    }

    /// Starts compacting every segment numbered up to `last` into segment `into`, which sorts
    /// after them and before every segment written since.
    fn start_compaction(&mut self, last: u64, into: u64) {
        let dir = self.dir.clone();
        let spawned = std::thread::Builder::new()
            .name("mxpipe-compact".into())
            .spawn(move || compact_sealed(&dir, last, into));
        if let Ok(handle) = spawned {
            self.compaction = Some(handle);
        }
    }

    fn failed(&self) -> Option<SpoolProblem> {
        self.shared.failed()
    }

    fn fail(&self, problem: SpoolProblem) {
        self.shared.fail(problem)
    }

    /// Writes and fsyncs one batch; then acknowledges and hands over its messages.
    fn commit(&mut self, batch: &mut Vec<Pending>, stop: bool) {
        let sync_due = self
            .unsynced_since
            .is_some_and(|t| stop || t.elapsed() >= CHECKPOINT_SYNC);
        if batch.is_empty() && !sync_due {
            return;
        }
        if self.failed().is_some() {
            self.refuse(batch);
            return;
        }
        self.buf.clear();
        // Each recipient learns its position in the list its message record stores: the
        // engine's checkpoints name it by that (4 octets) instead of its address.
        for p in batch.iter_mut() {
            for (i, r) in p.message.recipients.iter_mut().enumerate() {
                if let Ok(i) = u32::try_from(i) {
                    r.set_position(i);
                }
            }
        }
        // Bodies are written from where they are (a vectored write), never copied into the
        // batch: `self.buf` holds the rest, and each body follows the head at its offset.
        let mut bodies: Vec<(usize, &[u8])> = Vec::new();
        for p in batch.iter() {
            let body = p.message.body();
            let key = Arc::as_ptr(body) as usize;
            let known = self
                .bodies
                .get(&key)
                .filter(|(weak, _)| weak.upgrade().is_some_and(|b| Arc::ptr_eq(&b, body)))
                .map(|(_, id)| *id);
            let body_id = match known {
                Some(id) => id,
                None => {
                    let id = self.next_body_id;
                    self.next_body_id += 1;
                    log::encode_body_head(id, body.as_bytes(), &mut self.buf);
                    bodies.push((self.buf.len(), body.as_bytes()));
                    if self.bodies.len() >= self.bodies_prune_at {
                        self.bodies.retain(|_, (weak, _)| weak.strong_count() > 0);
                        self.bodies_prune_at = (2 * self.bodies.len()).max(MIN_BODIES_PRUNE);
                    }
                    self.bodies.insert(key, (Arc::downgrade(body), id));
                    id
                }
            };
            log::encode_message(
                p.id,
                body_id,
                p.submitted_ms,
                p.message.sender().as_str(),
                p.message.recipients().iter().map(Address::as_str),
                &mut self.buf,
            );
            if let Some(dsn) = p.message.dsn() {
                let (mail, recipients) = dsn.to_stored();
                log::encode(
                    &Record::Dsn {
                        id: p.id,
                        mail,
                        recipients,
                    },
                    &mut self.buf,
                );
            }
        }
        let file = if self.buf.is_empty() {
            Arc::clone(
                &self
                    .shared
                    .segment
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .file,
            )
        } else {
            let mut slices = Vec::with_capacity(2 * bodies.len() + 1);
            let mut from = 0;
            for (at, body) in bodies {
                slices.push(IoSlice::new(&self.buf[from..at]));
                slices.push(IoSlice::new(body));
                from = at;
            }
            slices.push(IoSlice::new(&self.buf[from..]));
            match self.shared.append_vectored(&mut slices) {
                Some(file) => file,
                None => {
                    self.refuse(batch);
                    return;
                }
            }
        };
        let stats = &self.shared.stats;
        // Checkpoints written from here on wake the writer again; those before are in this
        // fsync.
        self.shared.checkpoints_told.store(false, Ordering::Release);
        if let Err(e) = sync_file(&file) {
            // Never retried: the pages the kernel failed to write may be gone while the
            // cache says clean (fsyncgate). Nothing more is acknowledged.
            self.fail(SpoolProblem::SyncFailed(errno(&e)));
            self.refuse(batch);
            return;
        }
        self.unsynced_since = None;
        if self.dir_dirty {
            if let Err(e) = log::sync_dir(&self.dir) {
                self.fail(SpoolProblem::SyncFailed(errno(&e)));
                self.refuse(batch);
                return;
            }
            self.dir_dirty = false;
        }
        stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        stats
            .messages
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        if let Some(last) = batch.last() {
            self.shared.durable.store(last.id, Ordering::Release);
            let _guard = self.shared.failed.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.changed.notify_all();
        }
        let low = free_bytes(&self.dir).is_some_and(|free| free < self.config.min_free_bytes);
        self.shared.low_space.store(low, Ordering::Relaxed);
        for p in batch.drain(..) {
            self.hand_over(Submission::new(p.id, p.message), Counted::Both);
        }
        let size = self
            .shared
            .segment
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .size;
        if size >= self.config.segment_bytes {
            self.rotate();
        }
    }

    /// Starts a new segment (fsynced with the directory at the next batch).
    fn rotate(&mut self) {
        // Under the lock: checkpoints written to the old segment since its last fsync are
        // synced before it is left (rotation is rare; the loops wait this once).
        let mut segment = self
            .shared
            .segment
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.shared.checkpoints_told.store(false, Ordering::Release);
        if let Err(e) = sync_file(&segment.file) {
            drop(segment);
            self.fail(SpoolProblem::SyncFailed(errno(&e)));
            return;
        }
        self.unsynced_since = None;
        // Every rotation skips a number, for a later compaction to write into: a compacted
        // segment must sort after the segments it replaces and before the ones written since.
        let number = self.segment_number + 2;
        match std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(log::segment_path(&self.dir, number))
        {
            Ok(file) => {
                *segment = Segment {
                    file: Arc::new(file),
                    size: 0,
                };
                self.segment_number = number;
                self.dir_dirty = true;
                self.bodies.clear();
                self.bodies_prune_at = MIN_BODIES_PRUNE;
                drop(segment);
                self.compact_if_due();
            }
            Err(e) => {
                drop(segment);
                self.fail(SpoolProblem::WriteFailed(errno(&e)));
            }
        }
    }

    /// Messages of a batch that could not be made durable: out of the counts, never sent.
    fn refuse(&self, batch: &mut Vec<Pending>) {
        for p in batch.drain(..) {
            self.intake
                .count_submitted(p.message.recipients.len() as u64, false);
        }
    }

    /// Applies a queue administrator's order to the recovered work held here, records a
    /// deletion (so that no later start sends the message), and passes the order to the loops.
    fn order(&mut self, order: QueueOrder) {
        let named = |s: &Submission, id: Option<u64>| id.is_none_or(|id| s.id == id);
        match order {
            QueueOrder::Retry(id) => {
                let now = Instant::now();
                let jobs = &self.held_jobs;
                self.held = std::mem::take(&mut self.held)
                    .into_iter()
                    .map(|Reverse((due, seq))| {
                        let due_now = jobs.get(&seq).is_some_and(|s| named(s, id));
                        Reverse((if due_now { now } else { due }, seq))
                    })
                    .collect();
            }
            QueueOrder::Delete(id) => {
                let mut dropped = 0;
                self.held_jobs.retain(|_, s| {
                    let keep = !named(s, Some(id));
                    if !keep {
                        dropped += s.message.recipients.len() as u64;
                    }
                    keep
                });
                if dropped > 0 {
                    self.intake.count_held(dropped, false);
                }
                if self.failed().is_none() {
                    let mut buf = Vec::new();
                    log::encode(&Record::Delete { id }, &mut buf);
                    if self.shared.append(&buf).is_some() {
                        self.unsynced_since.get_or_insert_with(Instant::now);
                    }
                }
            }
        }
        self.intake.order(order);
    }

    fn hold(&mut self, due: Instant, submission: Submission) {
        self.held_seq += 1;
        self.held.push(Reverse((due, self.held_seq)));
        self.held_jobs.insert(self.held_seq, submission);
    }

    fn release_due(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((due, seq))) = self.held.peek().copied() {
            if due > now {
                break;
            }
            self.held.pop();
            if let Some(s) = self.held_jobs.remove(&seq) {
                self.hand_over(s, Counted::Unfinished);
            }
        }
    }

    /// Hands a durable submission to the engine, waiting for room; when the engine is
    /// shutting down it stays in the spool for the next process.
    fn hand_over(&self, mut submission: Submission, counted: Counted) {
        loop {
            match self
                .intake
                .hand_over(submission, Some(Duration::from_millis(100)), counted)
            {
                Ok(()) => return,
                Err((_, back)) => {
                    if self.intake.is_shutting_down() {
                        let n = back.message.recipients.len() as u64;
                        match counted {
                            Counted::Both => self.intake.count_submitted(n, false),
                            Counted::Unfinished | Counted::No => self.intake.count_held(n, false),
                        }
                        return;
                    }
                    submission = back;
                }
            }
        }
    }
}

/// Compacts the running spool: reads the sealed segments (numbered up to `last`, fsynced and
/// never appended to again), writes what is live in them as segment `into` and deletes them.
/// A segment with a torn or corrupt record is left alone for the next start, which reports it.
/// With nothing to compact, or `into` taken, it does nothing.
fn compact_sealed(dir: &Path, last: u64, into: u64) -> io::Result<Option<Compacted>> {
    let segments = log::segments(dir)?;
    let sealed: Vec<(u64, PathBuf)> = segments
        .iter()
        .filter(|(n, _)| *n <= last)
        .cloned()
        .collect();
    if sealed.is_empty() || segments.iter().any(|(n, _)| *n == into) {
        return Ok(None);
    }
    let state = store::State::load_segments(dir, sealed)?;
    if state.issues.torn > 0 || state.issues.corrupt > 0 {
        return Err(io::Error::other("a sealed segment has a damaged record"));
    }
    let written = state.rewrite_as(dir, into)?;
    Ok(Some(Compacted {
        deleted: state.bytes,
        written,
    }))
}

/// The OS error number of `e` (0 when it has none).
fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

fn write_batch(file: &File, slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    #[cfg(feature = "failpoints")]
    if failpoint_hits("spool-write", file) {
        // The disk fills halfway through the batch.
        use std::io::Write;
        let whole = slices
            .iter()
            .flat_map(|s| s.iter().copied())
            .collect::<Vec<u8>>();
        let mut file = file;
        file.write_all(&whole[..whole.len() / 2])?;
        return Err(io::Error::from_raw_os_error(libc::ENOSPC));
    }
    log::write_all_vectored(file, slices)
}

fn sync_file(file: &File) -> io::Result<()> {
    #[cfg(feature = "failpoints")]
    if failpoint_hits("spool-fsync", file) {
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }
    file.sync_data()
}

/// Whether the failpoint `name` is set for `file`: its action is `return(DIR)`, and it
/// acts only on files under DIR, so that a fault test never reaches the spools of the tests
/// running beside it in the same process (failpoints are process-wide).
#[cfg(feature = "failpoints")]
fn failpoint_hits(name: &str, file: &File) -> bool {
    use std::os::fd::AsRawFd;
    let Some(Some(dir)) = fail::eval(name, |arg| arg) else {
        return false;
    };
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .is_ok_and(|path| path.starts_with(&dir))
}

#[cfg(test)]
mod tests;
