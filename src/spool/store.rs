//! What a spool holds, rebuilt from its segments: every message with at least one recipient
//! that is not final, with each recipient's attempts and retry time.
//!
//! [`State::load`] reads the segments in order and applies the records; [`State::compact`]
//! writes the live part into a fresh segment, fsyncs it and its directory, and only then
//! deletes the old segments (a crash between the two leaves both, and reading both gives the
//! same state: a message record met again replaces the recipient list, checkpoints stay).
//! [`State::rewrite_as`] does the same for a running spool, over the sealed segments only.

use super::log::{self, Mark, ReadIssues, Record};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A recipient's last checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub mark: Mark,
    pub attempts: u32,
    /// For a deferral: when the next attempt is due (Unix milliseconds; 0: now).
    pub retry_at_ms: u64,
}

/// One stored message.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub body_id: u64,
    pub submitted_ms: u64,
    pub sender: String,
    pub recipients: Vec<String>,
    /// Checkpoints by recipient address (a recipient named twice in one message is one
    /// recipient to the spool: the first final outcome ends both).
    pub checkpoints: HashMap<String, Checkpoint>,
    /// The DSN request, as stored ([`Record::Dsn`]): MAIL parameters, RCPT parameters.
    pub dsn: Option<(String, Vec<(String, String)>)>,
    /// Where each of `recipients` was in the message's list as first stored, when a compaction
    /// left only some ([`Record::PlacedMessage`]); `None`: `recipients` is that list.
    pub positions: Option<Vec<u32>>,
    /// A position map did not fit the list: checkpoints by position name nobody here (they
    /// are dropped: a resend, never a loss), and the recipients go back to the engine without
    /// positions, so that it names them by address.
    pub unplaced: bool,
}

impl StoredMessage {
    /// A message as its record gives it: no checkpoints, no DSN request yet.
    pub fn new(body_id: u64, submitted_ms: u64, sender: String, recipients: Vec<String>) -> Self {
        StoredMessage {
            body_id,
            submitted_ms,
            sender,
            recipients,
            checkpoints: HashMap::new(),
            dsn: None,
            positions: None,
            unplaced: false,
        }
    }

    /// Recipients without a final outcome, with their last deferral if any.
    pub fn pending(&self) -> impl Iterator<Item = (&str, Option<Checkpoint>)> {
        self.pending_placed().map(|(_, r, c)| (r, c))
    }

    /// [`StoredMessage::pending`], each with its position in the message's list as first
    /// stored (what the engine's checkpoints name it by; `None` when it is not known).
    pub fn pending_placed(&self) -> impl Iterator<Item = (Option<u32>, &str, Option<Checkpoint>)> {
        self.recipients
            .iter()
            .enumerate()
            .filter_map(|(i, r)| match self.checkpoints.get(r) {
                Some(c) if c.mark.is_final() => None,
                c => Some((self.position_of(i), r.as_str(), c.copied())),
            })
    }

    /// The position in the list as first stored of `recipients[index]`.
    fn position_of(&self, index: usize) -> Option<u32> {
        if self.unplaced {
            return None;
        }
        match &self.positions {
            Some(p) => p.get(index).copied(),
            None => u32::try_from(index).ok(),
        }
    }

    /// The first positions of the pending recipients, when a record of only those needs them
    /// (see [`Record::PlacedMessage`]): `None` when they are the list as first stored or a
    /// start of it, or when they are not known (an unplaced message's recipients went to the
    /// engine without positions, so none of its checkpoints names one).
    fn pending_moved(&self) -> Option<Vec<u32>> {
        let positions: Vec<u32> = self
            .pending_placed()
            .map(|(p, _, _)| p)
            .collect::<Option<_>>()?;
        positions
            .iter()
            .enumerate()
            .any(|(i, &p)| p != i as u32)
            .then_some(positions)
    }

    /// The recipient at `position` of the list as first stored, if it is still listed.
    fn at_position(&self, position: u32) -> Option<&String> {
        if self.unplaced {
            return None;
        }
        let index = match &self.positions {
            Some(p) => p.binary_search(&position).ok()?,
            None => position as usize,
        };
        self.recipients.get(index)
    }

    /// Applies a recipient's checkpoint: a final outcome is never undone by a later deferral.
    fn checkpoint(&mut self, recipient: String, checkpoint: Checkpoint) {
        match self.checkpoints.get_mut(&recipient) {
            Some(old) if old.mark.is_final() => {}
            Some(old) => *old = checkpoint,
            None => {
                self.checkpoints.insert(recipient, checkpoint);
            }
        }
    }

    /// Whether every recipient is final.
    pub fn is_done(&self) -> bool {
        self.pending().next().is_none()
    }
}

/// The spool's contents.
#[derive(Debug, Default)]
pub struct State {
    /// Messages by identifier, in order.
    pub messages: BTreeMap<u64, StoredMessage>,
    pub bodies: HashMap<u64, Vec<u8>>,
    /// The next identifier to give.
    pub next_id: u64,
    /// The next body identifier to give.
    pub next_body_id: u64,
    pub issues: ReadIssues,
    /// Messages read that were all final (or deleted): not kept.
    pub removed: usize,
    /// Segments read, in order.
    pub segments: Vec<(u64, PathBuf)>,
    /// Octets in those segments.
    pub bytes: u64,
}

impl State {
    /// Reads every segment of `dir`. A segment that a running compaction deletes while this
    /// reads (the queue tools on a running spool) starts the reading over.
    pub fn load(dir: &Path) -> io::Result<State> {
        let mut tries = 0;
        loop {
            match State::load_segments(dir, log::segments(dir)?) {
                Err(e) if e.kind() == io::ErrorKind::NotFound && tries < 10 => tries += 1,
                other => return other,
            }
        }
    }

    /// Reads the given segments of `dir`, in order.
    pub fn load_segments(dir: &Path, segments: Vec<(u64, PathBuf)>) -> io::Result<State> {
        let mut state = State {
            next_id: 1,
            next_body_id: 1,
            ..State::default()
        };
        let mut issues = ReadIssues::default();
        for (_, path) in &segments {
            state.bytes += fs::metadata(path)?.len();
            log::read_segment(dir, path, &mut issues, |r| state.apply(r))?;
        }
        state.segments = segments;
        state.issues = issues;
        let before = state.messages.len();
        let bodies_used: std::collections::HashSet<u64> = {
            state.messages.retain(|_, m| !m.is_done());
            state.messages.values().map(|m| m.body_id).collect()
        };
        state.removed += before - state.messages.len();
        state.bodies.retain(|id, _| bodies_used.contains(id));
        Ok(state)
    }

    /// Applies one checkpoint to each of `recipients` of message `id` (if it is still known).
    fn checkpoint(
        &mut self,
        id: u64,
        mark: Mark,
        attempts: u32,
        retry_at_ms: u64,
        recipients: impl IntoIterator<Item = String>,
    ) {
        if let Some(m) = self.messages.get_mut(&id) {
            let checkpoint = Checkpoint {
                mark,
                attempts,
                retry_at_ms,
            };
            for recipient in recipients {
                m.checkpoint(recipient, checkpoint);
            }
        }
    }

    /// A message record, with the positions of its recipients when a compaction wrote it.
    fn message(
        &mut self,
        id: u64,
        body_id: u64,
        submitted_ms: u64,
        sender: String,
        recipients: Vec<String>,
        positions: Option<Vec<u32>>,
    ) {
        self.next_id = self.next_id.max(id + 1);
        // Positions that do not fit the list (one each, ascending) name nobody: see
        // `unplaced`.
        let fits = positions
            .as_ref()
            .is_none_or(|p| p.len() == recipients.len() && p.windows(2).all(|w| w[0] < w[1]));
        let m = match self.messages.entry(id) {
            // Met again after a compaction that did not finish deleting: the newer list holds
            // the recipients that were still pending.
            std::collections::btree_map::Entry::Occupied(e) => {
                let m = e.into_mut();
                m.recipients = recipients;
                m
            }
            std::collections::btree_map::Entry::Vacant(e) => e.insert(StoredMessage::new(
                body_id,
                submitted_ms,
                sender,
                recipients,
            )),
        };
        m.unplaced = !fits;
        m.positions = positions.filter(|_| fits);
    }

    fn apply(&mut self, record: Record) {
        match record {
            Record::Body { body_id, bytes } => {
                self.next_body_id = self.next_body_id.max(body_id + 1);
                self.bodies.insert(body_id, bytes);
            }
            Record::Message {
                id,
                body_id,
                submitted_ms,
                sender,
                recipients,
            } => self.message(id, body_id, submitted_ms, sender, recipients, None),
            Record::PlacedMessage {
                id,
                body_id,
                submitted_ms,
                sender,
                recipients,
                positions,
            } => self.message(
                id,
                body_id,
                submitted_ms,
                sender,
                recipients,
                Some(positions),
            ),
            // A spool written before runs of recipients had one record per recipient.
            Record::Outcome {
                id,
                mark,
                attempts,
                retry_at_ms,
                recipient,
            } => self.checkpoint(id, mark, attempts, retry_at_ms, [recipient]),
            Record::Outcomes {
                id,
                mark,
                attempts,
                retry_at_ms,
                recipients,
            } => self.checkpoint(id, mark, attempts, retry_at_ms, recipients),
            Record::OutcomePositions {
                id,
                mark,
                attempts,
                retry_at_ms,
                positions,
            } => {
                // Named by position: the address is the one at that position now. A position
                // no longer listed was final when a compaction wrote the list.
                let recipients: Vec<String> = match self.messages.get(&id) {
                    Some(m) => positions
                        .iter()
                        .filter_map(|&p| m.at_position(p).cloned())
                        .collect(),
                    None => Vec::new(),
                };
                self.checkpoint(id, mark, attempts, retry_at_ms, recipients)
            }
            Record::Retry { id } => {
                let due_now = |m: &mut StoredMessage| {
                    for c in m.checkpoints.values_mut() {
                        c.retry_at_ms = 0;
                    }
                };
                if id == 0 {
                    self.messages.values_mut().for_each(due_now);
                } else if let Some(m) = self.messages.get_mut(&id) {
                    due_now(m);
                }
            }
            Record::Delete { id } => {
                if self.messages.remove(&id).is_some() {
                    self.removed += 1;
                }
            }
            Record::IdFloor { next_id } => self.next_id = self.next_id.max(next_id),
            Record::Dsn {
                id,
                mail,
                recipients,
            } => {
                if let Some(m) = self.messages.get_mut(&id) {
                    m.dsn = Some((mail, recipients));
                }
            }
        }
    }

    /// Writes the live state to a new segment after the last one read (fsynced, directory
    /// too) and deletes the segments read. Returns the new segment, open for appending, and its
    /// size.
    pub fn compact(&mut self, dir: &Path) -> io::Result<(u64, File, u64)> {
        let number = self.segments.last().map_or(1, |(n, _)| n + 1);
        let path = log::segment_path(dir, number);
        let mut file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        let size = self.encode_live(|buf| file.write_all(buf))?;
        file.sync_all()?;
        log::sync_dir(dir)?;
        self.delete_segments_read(dir)?;
        // The live state is now what the new segment says: forget what was dropped.
        for m in self.messages.values_mut() {
            let moved = m.pending_moved();
            let StoredMessage {
                recipients,
                checkpoints,
                positions,
                ..
            } = m;
            recipients.retain(|r| !checkpoints.get(r).is_some_and(|c| c.mark.is_final()));
            checkpoints.retain(|_, c| !c.mark.is_final());
            // As the new segment says (see `encode_live`).
            *positions = moved;
        }
        self.segments.push((number, path));
        self.bytes = size;
        Ok((number, file, size))
    }

    /// The compaction of a running spool: writes the live state of the segments read as
    /// segment `number` (under a temporary name, fsynced, then renamed and the directory
    /// fsynced), then deletes the segments read. `number` must sort after every segment read
    /// and before every segment written since they were read, so that the checkpoints written
    /// since then still come after the messages they name. A crash before the rename leaves
    /// the old segments; after it, old and new together read as the same state (a message
    /// record met again replaces the recipient list, checkpoints stay). Returns the size of
    /// the new segment.
    pub fn rewrite_as(&self, dir: &Path, number: u64) -> io::Result<u64> {
        let path = log::segment_path(dir, number);
        let temporary = path.with_extension("log.tmp");
        let written: io::Result<u64> = (|| {
            let mut file = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&temporary)?;
            let size = self.encode_live(|buf| file.write_all(buf))?;
            file.sync_all()?;
            fs::rename(&temporary, &path)?;
            log::sync_dir(dir)?;
            Ok(size)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&temporary);
        }
        let size = written?;
        self.delete_segments_read(dir)?;
        Ok(size)
    }

    fn delete_segments_read(&self, dir: &Path) -> io::Result<()> {
        for (_, old) in &self.segments {
            fs::remove_file(old)?;
        }
        log::sync_dir(dir)
    }

    /// Encodes what is live (the identifier floor; each pending message with its body, DSN
    /// request and the last deferral of each pending recipient), handing `out` about 1 MiB at
    /// a time. Returns the octets handed.
    fn encode_live(&self, mut out: impl FnMut(&[u8]) -> io::Result<()>) -> io::Result<u64> {
        let mut buf = Vec::with_capacity(1 << 20);
        let mut size = 0u64;
        log::encode(
            &Record::IdFloor {
                next_id: self.next_id,
            },
            &mut buf,
        );
        let mut written_bodies = std::collections::HashSet::new();
        for (&id, m) in &self.messages {
            if written_bodies.insert(m.body_id) {
                if let Some(bytes) = self.bodies.get(&m.body_id) {
                    log::encode_body(m.body_id, bytes, &mut buf);
                }
            }
            let pending: Vec<(&str, Option<Checkpoint>)> = m.pending().collect();
            // Where those recipients were first, when the engine's checkpoints by position need
            // it: in the same record as the list (read or set aside together).
            match m.pending_moved() {
                Some(positions) => log::encode_placed_message(
                    id,
                    m.body_id,
                    m.submitted_ms,
                    &m.sender,
                    pending.iter().map(|(r, _)| *r),
                    &positions,
                    &mut buf,
                ),
                None => log::encode_message(
                    id,
                    m.body_id,
                    m.submitted_ms,
                    &m.sender,
                    pending.iter().map(|(r, _)| *r),
                    &mut buf,
                ),
            }
            if let Some((mail, recipients)) = &m.dsn {
                log::encode(
                    &Record::Dsn {
                        id,
                        mail: mail.clone(),
                        recipients: recipients.clone(),
                    },
                    &mut buf,
                );
            }
            // The deferrals, one record per attempts and retry time.
            let mut deferrals: BTreeMap<(u32, u64), Vec<&str>> = BTreeMap::new();
            for (recipient, checkpoint) in &pending {
                if let Some(c) = checkpoint {
                    deferrals
                        .entry((c.attempts, c.retry_at_ms))
                        .or_default()
                        .push(recipient);
                }
            }
            for ((attempts, retry_at_ms), recipients) in deferrals {
                // Pending recipients are never final: every checkpoint left is a deferral.
                log::encode_outcomes(
                    id,
                    Mark::Deferred,
                    attempts,
                    retry_at_ms,
                    recipients.into_iter(),
                    &mut buf,
                );
            }
            if buf.len() >= 1 << 20 {
                out(&buf)?;
                size += buf.len() as u64;
                buf.clear();
            }
        }
        out(&buf)?;
        size += buf.len() as u64;
        Ok(size)
    }
}

/// Appends `records` to a new segment (the queue tools' way to write: they never append to a
/// segment whose tail may be torn), fsyncing it and the directory.
pub fn append_segment(dir: &Path, state: &State, records: &[Record]) -> io::Result<PathBuf> {
    let number = state.segments.last().map_or(1, |(n, _)| n + 1);
    let path = log::segment_path(dir, number);
    let mut buf = Vec::new();
    for r in records {
        log::encode(r, &mut buf);
    }
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)?;
    file.write_all(&buf)?;
    file.sync_all()?;
    log::sync_dir(dir)?;
    Ok(path)
}
