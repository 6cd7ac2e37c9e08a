//! The spool's on-disk format: numbered segment files of framed, checksummed records.
//!
//! A record is `[payload length: u32 LE][CRC-32 of the payload: u32 LE][payload]`, the payload
//! starting with a tag byte. Records are only ever appended; a segment is never rewritten in
//! place (recovery writes a fresh one and deletes the old). Reading tolerates a torn record
//! (its length runs past the end of the file: a write the crash cut short) and sets aside a
//! corrupt one (a checksum that does not match) into `corrupt/`, so that one bad record is
//! reported once and never stops the next start. Nothing here knows about the engine.

use std::fs::{self, File};
use std::io::{self, BufReader, IoSlice, Read, Write};
use std::path::{Path, PathBuf};

/// The largest payload a reader believes: a length above it is corruption, not a record.
pub const MAX_RECORD: usize = 1 << 30;
const HEADER: usize = 8;

const TAG_BODY: u8 = 1;
const TAG_MESSAGE: u8 = 2;
const TAG_OUTCOME: u8 = 3;
const TAG_RETRY: u8 = 4;
const TAG_DELETE: u8 = 5;
const TAG_ID_FLOOR: u8 = 6;
/// Added with DSN requests: a spool without them reads as before.
const TAG_DSN: u8 = 7;
/// One checkpoint for several recipients of a message (written since; `TAG_OUTCOME` records
/// of an older spool are still read).
const TAG_OUTCOMES: u8 = 8;
/// One checkpoint for several recipients of a message named by their positions in its stored
/// list (4 octets each instead of an address; written since, the older tags still read).
const TAG_POSITIONS: u8 = 9;
/// A message record written by a compaction that kept only some of its recipients, with the
/// position each one had in the list as first stored: one record, so that the list and its
/// positions are read, or set aside, together.
const TAG_PLACED_MESSAGE: u8 = 10;

/// What a checkpoint says about one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    Deferred,
    Delivered,
    Bounced,
    Expired,
}

impl Mark {
    fn code(self) -> u8 {
        match self {
            Mark::Deferred => 0,
            Mark::Delivered => 1,
            Mark::Bounced => 2,
            Mark::Expired => 3,
        }
    }

    fn from_code(code: u8) -> Option<Mark> {
        Some(match code {
            0 => Mark::Deferred,
            1 => Mark::Delivered,
            2 => Mark::Bounced,
            3 => Mark::Expired,
            _ => return None,
        })
    }

    pub fn is_final(self) -> bool {
        self != Mark::Deferred
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mark::Deferred => "deferred",
            Mark::Delivered => "delivered",
            Mark::Bounced => "bounced",
            Mark::Expired => "expired",
        }
    }
}

/// One decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A body, stored once however many messages use it.
    Body { body_id: u64, bytes: Vec<u8> },
    /// A message's envelope; `submitted_ms` is wall-clock milliseconds since the Unix epoch.
    Message {
        id: u64,
        body_id: u64,
        submitted_ms: u64,
        sender: String,
        recipients: Vec<String>,
    },
    /// A checkpoint for one recipient (named by address within the message).
    Outcome {
        id: u64,
        mark: Mark,
        attempts: u32,
        retry_at_ms: u64,
        recipient: String,
    },
    /// One checkpoint for several recipients of a message (each named by address), as the
    /// engine decides them: a transaction's accepted recipients are one record.
    Outcomes {
        id: u64,
        mark: Mark,
        attempts: u32,
        retry_at_ms: u64,
        recipients: Vec<String>,
    },
    /// One checkpoint for several recipients of a message, each named by its position in the
    /// message's list as first stored (0 for the first; see [`Record::PlacedMessage`]).
    OutcomePositions {
        id: u64,
        mark: Mark,
        attempts: u32,
        retry_at_ms: u64,
        positions: Vec<u32>,
    },
    /// A message record written by a compaction that kept only some of the message's
    /// recipients, with the position each of them had in the list as first stored (ascending,
    /// one per recipient), which checkpoints by position name. A [`Record::Message`] is a list
    /// as first stored.
    PlacedMessage {
        id: u64,
        body_id: u64,
        submitted_ms: u64,
        sender: String,
        recipients: Vec<String>,
        positions: Vec<u32>,
    },
    /// `mxpipe queue retry`: every deferred recipient of `id` (0: of every message) is due now.
    Retry { id: u64 },
    /// `mxpipe queue delete`: the message is dropped without further attempts.
    Delete { id: u64 },
    /// Identifiers below this were given already (kept across compactions).
    IdFloor { next_id: u64 },
    /// The DSN request of message `id` (RFC 3461), written after its message record: the MAIL
    /// parameters and each recipient's RCPT parameters, as
    /// [`crate::message::dsn::DsnEnvelope::to_stored`] gives them.
    Dsn {
        id: u64,
        mail: String,
        recipients: Vec<(String, String)>,
    },
}

/// Appends `record`, framed, to `out`.
pub fn encode(record: &Record, out: &mut Vec<u8>) {
    match record {
        Record::Body { body_id, bytes } => encode_body(*body_id, bytes, out),
        Record::Message {
            id,
            body_id,
            submitted_ms,
            sender,
            recipients,
        } => encode_message(
            *id,
            *body_id,
            *submitted_ms,
            sender,
            recipients.iter().map(String::as_str),
            out,
        ),
        Record::Outcome {
            id,
            mark,
            attempts,
            retry_at_ms,
            recipient,
        } => encode_outcome(*id, *mark, *attempts, *retry_at_ms, recipient, out),
        Record::Outcomes {
            id,
            mark,
            attempts,
            retry_at_ms,
            recipients,
        } => encode_outcomes(
            *id,
            *mark,
            *attempts,
            *retry_at_ms,
            recipients.iter().map(String::as_str),
            out,
        ),
        Record::OutcomePositions {
            id,
            mark,
            attempts,
            retry_at_ms,
            positions,
        } => framed(out, |out| {
            checkpoint_head(out, TAG_POSITIONS, *id, *mark, *attempts, *retry_at_ms);
            put_positions(out, positions);
        }),
        Record::PlacedMessage {
            id,
            body_id,
            submitted_ms,
            sender,
            recipients,
            positions,
        } => encode_placed_message(
            *id,
            *body_id,
            *submitted_ms,
            sender,
            recipients.iter().map(String::as_str),
            positions,
            out,
        ),
        Record::Retry { id } => framed(out, |out| {
            out.push(TAG_RETRY);
            out.extend_from_slice(&id.to_le_bytes());
        }),
        Record::Delete { id } => framed(out, |out| {
            out.push(TAG_DELETE);
            out.extend_from_slice(&id.to_le_bytes());
        }),
        Record::IdFloor { next_id } => framed(out, |out| {
            out.push(TAG_ID_FLOOR);
            out.extend_from_slice(&next_id.to_le_bytes());
        }),
        Record::Dsn {
            id,
            mail,
            recipients,
        } => framed(out, |out| {
            out.push(TAG_DSN);
            out.extend_from_slice(&id.to_le_bytes());
            put_str(out, mail);
            out.extend_from_slice(&(recipients.len() as u32).to_le_bytes());
            for (address, params) in recipients {
                put_str(out, address);
                put_str(out, params);
            }
        }),
    }
}

/// Appends the record whose payload `payload` writes, with its length and checksum.
fn framed(out: &mut Vec<u8>, payload: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER]);
    payload(out);
    frame(out, start);
}

/// Encodes a message record from borrowed parts (the writer's hot path: no copies).
pub fn encode_message<'a>(
    id: u64,
    body_id: u64,
    submitted_ms: u64,
    sender: &str,
    recipients: impl ExactSizeIterator<Item = &'a str>,
    out: &mut Vec<u8>,
) {
    framed(out, |out| {
        message_head(
            out,
            TAG_MESSAGE,
            id,
            body_id,
            submitted_ms,
            sender,
            recipients,
        )
    })
}

/// Encodes a compacted message record ([`Record::PlacedMessage`]) from borrowed parts.
pub fn encode_placed_message<'a>(
    id: u64,
    body_id: u64,
    submitted_ms: u64,
    sender: &str,
    recipients: impl ExactSizeIterator<Item = &'a str>,
    positions: &[u32],
    out: &mut Vec<u8>,
) {
    framed(out, |out| {
        message_head(
            out,
            TAG_PLACED_MESSAGE,
            id,
            body_id,
            submitted_ms,
            sender,
            recipients,
        );
        put_positions(out, positions);
    })
}

/// What a message record of either kind starts with.
fn message_head<'a>(
    out: &mut Vec<u8>,
    tag: u8,
    id: u64,
    body_id: u64,
    submitted_ms: u64,
    sender: &str,
    recipients: impl ExactSizeIterator<Item = &'a str>,
) {
    out.push(tag);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&body_id.to_le_bytes());
    out.extend_from_slice(&submitted_ms.to_le_bytes());
    put_str(out, sender);
    put_list(out, recipients);
}

/// Encodes an outcome record from a borrowed recipient (the checkpoints' hot path).
pub fn encode_outcome(
    id: u64,
    mark: Mark,
    attempts: u32,
    retry_at_ms: u64,
    recipient: &str,
    out: &mut Vec<u8>,
) {
    framed(out, |out| {
        checkpoint_head(out, TAG_OUTCOME, id, mark, attempts, retry_at_ms);
        put_str(out, recipient);
    })
}

/// What a checkpoint record of either kind starts with.
fn checkpoint_head(
    out: &mut Vec<u8>,
    tag: u8,
    id: u64,
    mark: Mark,
    attempts: u32,
    retry_at_ms: u64,
) {
    out.push(tag);
    out.extend_from_slice(&id.to_le_bytes());
    out.push(mark.code());
    out.extend_from_slice(&attempts.to_le_bytes());
    out.extend_from_slice(&retry_at_ms.to_le_bytes());
}

/// Encodes one checkpoint for several recipients from borrowed addresses (the checkpoints'
/// hot path: 4 octets and the address per recipient, the rest once per record).
pub fn encode_outcomes<'a>(
    id: u64,
    mark: Mark,
    attempts: u32,
    retry_at_ms: u64,
    recipients: impl ExactSizeIterator<Item = &'a str>,
    out: &mut Vec<u8>,
) {
    framed(out, |out| {
        checkpoint_head(out, TAG_OUTCOMES, id, mark, attempts, retry_at_ms);
        put_list(out, recipients);
    })
}

/// A checkpoint of `count` recipients already in the record's layout, as the loop's
/// [`Outcomes`](crate::engine::custody::Outcomes) hold them: one copy. `by_position`: each is
/// a position (`u32`, little-endian; [`Record::OutcomePositions`]), else an address's length
/// (`u32`, little-endian) and its octets ([`Record::Outcomes`]).
#[allow(clippy::too_many_arguments)]
pub fn encode_packed_checkpoint(
    by_position: bool,
    id: u64,
    mark: Mark,
    attempts: u32,
    retry_at_ms: u64,
    count: usize,
    packed: &[u8],
    out: &mut Vec<u8>,
) {
    let tag = if by_position {
        debug_assert_eq!(packed.len(), 4 * count);
        TAG_POSITIONS
    } else {
        TAG_OUTCOMES
    };
    framed(out, |out| {
        checkpoint_head(out, tag, id, mark, attempts, retry_at_ms);
        out.extend_from_slice(&(count as u32).to_le_bytes());
        out.extend_from_slice(packed);
    })
}

/// Encodes a body record from a borrowed body.
pub fn encode_body(body_id: u64, bytes: &[u8], out: &mut Vec<u8>) {
    encode_body_head(body_id, bytes, out);
    out.extend_from_slice(bytes);
}

/// Encodes a body record without its body: the framing (length and checksum cover `bytes`)
/// and the body's identifier. The record is complete once `bytes` follow it on disk; the
/// writer sends them from where they are with a vectored write ([`write_all_vectored`]), so
/// a body is never copied into the batch.
pub fn encode_body_head(body_id: u64, bytes: &[u8], out: &mut Vec<u8>) {
    let mut head = [0u8; HEADER + 9];
    head[HEADER] = TAG_BODY;
    head[HEADER + 1..].copy_from_slice(&body_id.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head[HEADER..]);
    crc.update(bytes);
    let len = (9 + bytes.len()) as u32;
    head[..4].copy_from_slice(&len.to_le_bytes());
    head[4..HEADER].copy_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(&head);
}

/// Writes every slice in order, as many at a time as one `writev` takes.
pub fn write_all_vectored(mut file: &File, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    // Linux's IOV_MAX: a longer list is refused (EINVAL), not shortened.
    const IOV_MAX: usize = 1024;
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match file.write_vectored(&slices[..slices.len().min(IOV_MAX)]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn frame(out: &mut [u8], start: usize) {
    let payload = &out[start + HEADER..];
    let len = payload.len() as u32;
    let crc = crc32fast::hash(payload);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A count (`u32`), then each position (`u32`), all little-endian.
fn put_positions(out: &mut Vec<u8>, positions: &[u32]) {
    out.extend_from_slice(&(positions.len() as u32).to_le_bytes());
    for p in positions {
        out.extend_from_slice(&p.to_le_bytes());
    }
}

/// A count (`u32`), then each string as [`put_str`] writes it.
fn put_list<'a>(out: &mut Vec<u8>, list: impl ExactSizeIterator<Item = &'a str>) {
    out.extend_from_slice(&(list.len() as u32).to_le_bytes());
    for s in list {
        put_str(out, s);
    }
}

/// A cursor over a payload; every read is bounds-checked (a payload that passed its checksum
/// may still come from a newer, unknown format).
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    }
    fn string(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
    /// What a message record starts with ([`encode_message`]): id, body id, submission time,
    /// sender, recipients.
    fn message(&mut self) -> Option<(u64, u64, u64, String, Vec<String>)> {
        Some((
            self.u64()?,
            self.u64()?,
            self.u64()?,
            self.string()?,
            self.strings()?,
        ))
    }
    /// What a checkpoint record starts with after its tag ([`checkpoint_head`]): id, mark,
    /// attempts, retry time.
    fn checkpoint(&mut self) -> Option<(u64, Mark, u32, u64)> {
        Some((
            self.u64()?,
            Mark::from_code(self.u8()?)?,
            self.u32()?,
            self.u64()?,
        ))
    }
    /// A count, then that many positions.
    fn positions(&mut self) -> Option<Vec<u32>> {
        let n = self.u32()? as usize;
        let bytes = self.take(n.checked_mul(4)?)?;
        Some(
            bytes
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
        )
    }
    /// A count, then that many strings.
    fn strings(&mut self) -> Option<Vec<String>> {
        let n = self.u32()? as usize;
        // Every string takes at least its 4-octet length.
        if n > self.0.len() / 4 {
            return None;
        }
        (0..n).map(|_| self.string()).collect()
    }
}

/// Decodes a payload whose checksum matched; `None` when it makes no sense.
pub fn decode(payload: &[u8]) -> Option<Record> {
    let mut c = Cursor(payload);
    let record = match c.u8()? {
        TAG_BODY => Record::Body {
            body_id: c.u64()?,
            bytes: c.take(c.0.len())?.to_vec(),
        },
        TAG_MESSAGE => {
            let (id, body_id, submitted_ms, sender, recipients) = c.message()?;
            Record::Message {
                id,
                body_id,
                submitted_ms,
                sender,
                recipients,
            }
        }
        TAG_OUTCOME => Record::Outcome {
            id: c.u64()?,
            mark: Mark::from_code(c.u8()?)?,
            attempts: c.u32()?,
            retry_at_ms: c.u64()?,
            recipient: c.string()?,
        },
        TAG_OUTCOMES => {
            let (id, mark, attempts, retry_at_ms) = c.checkpoint()?;
            let recipients = c.strings()?;
            Record::Outcomes {
                id,
                mark,
                attempts,
                retry_at_ms,
                recipients,
            }
        }
        TAG_POSITIONS => {
            let (id, mark, attempts, retry_at_ms) = c.checkpoint()?;
            let positions = c.positions()?;
            Record::OutcomePositions {
                id,
                mark,
                attempts,
                retry_at_ms,
                positions,
            }
        }
        TAG_PLACED_MESSAGE => {
            let (id, body_id, submitted_ms, sender, recipients) = c.message()?;
            let positions = c.positions()?;
            Record::PlacedMessage {
                id,
                body_id,
                submitted_ms,
                sender,
                recipients,
                positions,
            }
        }
        TAG_RETRY => Record::Retry { id: c.u64()? },
        TAG_DELETE => Record::Delete { id: c.u64()? },
        TAG_ID_FLOOR => Record::IdFloor { next_id: c.u64()? },
        TAG_DSN => {
            let id = c.u64()?;
            let mail = c.string()?;
            let n = c.u32()? as usize;
            // Every recipient takes at least its two 4-octet lengths.
            if n > c.0.len() / 8 {
                return None;
            }
            let mut recipients = Vec::with_capacity(n);
            for _ in 0..n {
                recipients.push((c.string()?, c.string()?));
            }
            Record::Dsn {
                id,
                mail,
                recipients,
            }
        }
        _ => return None,
    };
    c.0.is_empty().then_some(record)
}

/// What reading the segments found wrong.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReadIssues {
    /// Records cut short at the end of a segment (a write a crash interrupted): dropped.
    pub torn: usize,
    /// Records whose checksum or content was wrong: copied to `corrupt/` and skipped.
    pub corrupt: usize,
    /// Where the corrupt bytes were set aside.
    pub set_aside: Vec<PathBuf>,
}

/// The segment files of a spool, in order.
pub fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let number = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(number) = number {
            found.push((number, path));
        }
    }
    found.sort();
    Ok(found)
}

/// The path of segment `number`.
pub fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:016}.log"))
}

/// Reads every record of one segment in order, handing each to `each`. Torn and corrupt
/// records are counted in `issues`; corrupt bytes are copied under `dir/corrupt/`.
pub fn read_segment(
    dir: &Path,
    path: &Path,
    issues: &mut ReadIssues,
    mut each: impl FnMut(Record),
) -> io::Result<()> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut offset: u64 = 0;
    let mut payload = Vec::new();
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("segment");
    while offset < size {
        let mut header = [0u8; HEADER];
        if size - offset < HEADER as u64 {
            issues.torn += 1;
            break;
        }
        reader.read_exact(&mut header)?;
        let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(header[4..].try_into().unwrap());
        let rest = size - offset - HEADER as u64;
        if len > MAX_RECORD || len as u64 > rest {
            if len <= MAX_RECORD {
                // A length that runs past the end: the last write was cut short.
                issues.torn += 1;
                break;
            }
            // A length no writer produced: nothing after it can be framed again. The rest of
            // the segment is set aside whole.
            let mut tail = header.to_vec();
            reader.read_to_end(&mut tail)?;
            set_aside(dir, name, offset, &tail, issues)?;
            break;
        }
        payload.resize(len, 0);
        reader.read_exact(&mut payload)?;
        match (crc32fast::hash(&payload) == crc)
            .then(|| decode(&payload))
            .flatten()
        {
            Some(record) => each(record),
            None => {
                let mut raw = header.to_vec();
                raw.extend_from_slice(&payload);
                set_aside(dir, name, offset, &raw, issues)?;
            }
        }
        offset += (HEADER + len) as u64;
    }
    Ok(())
}

fn set_aside(
    dir: &Path,
    segment: &str,
    offset: u64,
    bytes: &[u8],
    issues: &mut ReadIssues,
) -> io::Result<()> {
    let corrupt = dir.join("corrupt");
    fs::create_dir_all(&corrupt)?;
    let path = corrupt.join(format!("{segment}@{offset}"));
    fs::write(&path, bytes)?;
    File::open(&path)?.sync_all()?;
    File::open(&corrupt)?.sync_all()?;
    issues.corrupt += 1;
    issues.set_aside.push(path);
    Ok(())
}

/// fsync of a directory, so that a file created or removed in it survives a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Address;

    fn records() -> Vec<Record> {
        vec![
            Record::IdFloor { next_id: 7 },
            Record::Body {
                body_id: 1,
                bytes: b"Subject: x\r\n\r\nhi\r\n".to_vec(),
            },
            Record::Message {
                id: 7,
                body_id: 1,
                submitted_ms: 1_700_000_000_000,
                sender: "a@b.example".into(),
                recipients: vec!["c@d.example".into(), "e@f.example".into()],
            },
            Record::Outcome {
                id: 7,
                mark: Mark::Deferred,
                attempts: 2,
                retry_at_ms: 1_700_000_300_000,
                recipient: "c@d.example".into(),
            },
            Record::Outcomes {
                id: 7,
                mark: Mark::Delivered,
                attempts: 3,
                retry_at_ms: 0,
                recipients: vec!["e@f.example".into(), "g@h.example".into()],
            },
            Record::OutcomePositions {
                id: 7,
                mark: Mark::Deferred,
                attempts: 1,
                retry_at_ms: 1_700_000_600_000,
                positions: vec![0, 5, 70_000],
            },
            Record::PlacedMessage {
                id: 8,
                body_id: 1,
                submitted_ms: 1_700_000_000_000,
                sender: "a@b.example".into(),
                recipients: vec!["e@f.example".into(), "g@h.example".into()],
                positions: vec![4, 9],
            },
            Record::Retry { id: 0 },
            Record::Delete { id: 7 },
        ]
    }

    #[test]
    fn packed_outcomes_are_the_same_record_as_outcomes_from_strings() {
        use crate::engine::{custody::Outcomes, EventKind};
        let addresses = [
            "e@f.example",
            "g@h.example",
            "\u{e9}l\u{e8}ve@\u{e9}cole.example",
            "",
        ];
        let address = |a: &str| {
            if a.is_empty() {
                Address::null()
            } else {
                Address::parse(a, crate::error::Field::Sender).unwrap()
            }
        };
        let mut outcomes = Outcomes::default();
        // Another message's outcome first: the run's recipients start inside the buffer.
        outcomes.note(
            6,
            &address("x@y.example"),
            EventKind::Delivered,
            1,
            None,
            None,
        );
        for a in addresses {
            outcomes.note(7, &address(a), EventKind::Bounced, 3, None, None);
        }
        assert_eq!(outcomes.list.len(), 2);
        let run = &outcomes.list[1];
        assert_eq!(outcomes.recipients(run).collect::<Vec<_>>(), addresses);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        encode_outcomes(7, Mark::Bounced, 3, 42, addresses.into_iter(), &mut a);
        encode_packed_checkpoint(
            false,
            7,
            Mark::Bounced,
            3,
            42,
            run.len(),
            outcomes.packed(run),
            &mut b,
        );
        assert_eq!(a, b);
    }

    #[test]
    fn outcomes_of_placed_recipients_are_checkpoints_by_position() {
        use crate::engine::{custody::Outcomes, EventKind};
        let placed = |a: &str, p: u32| {
            let mut a = Address::parse(a, crate::error::Field::Sender).unwrap();
            a.set_position(p);
            a
        };
        let mut outcomes = Outcomes::default();
        outcomes.note(
            7,
            &placed("a@x.example", 3),
            EventKind::Delivered,
            1,
            None,
            None,
        );
        outcomes.note(
            7,
            &placed("b@x.example", 9),
            EventKind::Delivered,
            1,
            None,
            None,
        );
        // Not placed by a spool: an outcome of its own, by address.
        let plain = Address::parse("c@x.example", crate::error::Field::Sender).unwrap();
        outcomes.note(7, &plain, EventKind::Delivered, 1, None, None);
        outcomes.note(
            7,
            &placed("d@x.example", 0),
            EventKind::Delivered,
            1,
            None,
            None,
        );
        assert_eq!(outcomes.list.len(), 3);
        let run = &outcomes.list[0];
        assert!(run.is_positional());
        assert_eq!(outcomes.positions(run).collect::<Vec<_>>(), [3, 9]);
        assert_eq!(outcomes.recipients(run).count(), 0);
        assert!(!outcomes.list[1].is_positional());
        assert_eq!(
            outcomes.recipients(&outcomes.list[1]).collect::<Vec<_>>(),
            ["c@x.example"]
        );
        assert_eq!(outcomes.positions(&outcomes.list[1]).count(), 0);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        encode_packed_checkpoint(
            true,
            7,
            Mark::Delivered,
            1,
            0,
            2,
            outcomes.packed(run),
            &mut a,
        );
        encode(
            &Record::OutcomePositions {
                id: 7,
                mark: Mark::Delivered,
                attempts: 1,
                retry_at_ms: 0,
                positions: vec![3, 9],
            },
            &mut b,
        );
        assert_eq!(a, b);
        // 4 octets a recipient where the address took 4 and its length.
        assert_eq!(a.len(), HEADER + 1 + 8 + 1 + 4 + 8 + 4 + 8);
    }

    fn read_all(dir: &Path, path: &Path) -> (Vec<Record>, ReadIssues) {
        let mut issues = ReadIssues::default();
        let mut out = Vec::new();
        read_segment(dir, path, &mut issues, |r| out.push(r)).unwrap();
        (out, issues)
    }

    #[test]
    fn records_round_trip() {
        let dir = tempdir("round");
        let mut buf = Vec::new();
        for r in records() {
            encode(&r, &mut buf);
        }
        let path = segment_path(&dir, 1);
        fs::write(&path, &buf).unwrap();
        let (read, issues) = read_all(&dir, &path);
        assert_eq!(read, records());
        assert_eq!(issues, ReadIssues::default());
    }

    #[test]
    fn a_body_head_and_its_body_written_vectored_read_as_one_record() {
        let dir = tempdir("vectored");
        let bodies: Vec<Vec<u8>> = (0..3000u32)
            .map(|n| {
                format!("Subject: {n}\r\n\r\n{}\r\n", "x".repeat(n as usize % 97)).into_bytes()
            })
            .collect();
        // Heads and envelopes in one buffer, each body where it lies: more slices than one
        // writev takes.
        let mut small = Vec::new();
        let mut ends = Vec::new();
        let mut copied = Vec::new();
        for (n, body) in bodies.iter().enumerate() {
            let n = n as u64 + 1;
            encode_body_head(n, body, &mut small);
            ends.push(small.len());
            encode_message(
                n,
                n,
                5,
                "a@b.example",
                ["c@d.example"].into_iter(),
                &mut small,
            );
            encode_body(n, body, &mut copied);
            encode_message(
                n,
                n,
                5,
                "a@b.example",
                ["c@d.example"].into_iter(),
                &mut copied,
            );
        }
        let mut slices = Vec::new();
        let mut from = 0;
        for (end, body) in ends.iter().zip(&bodies) {
            slices.push(IoSlice::new(&small[from..*end]));
            slices.push(IoSlice::new(body));
            from = *end;
        }
        slices.push(IoSlice::new(&small[from..]));
        let path = segment_path(&dir, 1);
        let file = File::create(&path).unwrap();
        write_all_vectored(&file, &mut slices).unwrap();
        assert_eq!(fs::read(&path).unwrap(), copied);
        let (read, issues) = read_all(&dir, &path);
        assert_eq!(issues, ReadIssues::default());
        assert_eq!(read.len(), 2 * bodies.len());
        assert_eq!(
            read[2 * 2999],
            Record::Body {
                body_id: 3000,
                bytes: bodies[2999].clone()
            }
        );
    }

    #[test]
    fn a_torn_last_record_is_dropped_and_a_corrupt_one_set_aside() {
        let dir = tempdir("damage");
        let mut buf = Vec::new();
        let mut ends = Vec::new();
        for r in records() {
            encode(&r, &mut buf);
            ends.push(buf.len());
        }
        // Torn: the last record cut in the middle.
        let path = segment_path(&dir, 1);
        fs::write(&path, &buf[..buf.len() - 3]).unwrap();
        let (read, issues) = read_all(&dir, &path);
        assert_eq!(read, records()[..records().len() - 1]);
        assert_eq!((issues.torn, issues.corrupt), (1, 0));
        // Corrupt: one octet of the message record (the third) flipped.
        let mut bad = buf.clone();
        bad[ends[1] + 20] ^= 0x40;
        fs::write(&path, &bad).unwrap();
        let (read, issues) = read_all(&dir, &path);
        let mut expected = records();
        let lost = expected.remove(2);
        assert_eq!(read, expected);
        assert_eq!((issues.torn, issues.corrupt), (0, 1));
        let aside = fs::read(&issues.set_aside[0]).unwrap();
        assert_eq!(aside, bad[ends[1]..ends[2]]);
        assert!(matches!(lost, Record::Message { .. }));
        // A length no writer produced: the rest of the segment is set aside.
        let mut bad = buf.clone();
        bad[ends[2]..ends[2] + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        fs::write(&path, &bad).unwrap();
        let (read, issues) = read_all(&dir, &path);
        assert_eq!(read, records()[..3]);
        assert_eq!((issues.torn, issues.corrupt), (0, 1));
    }

    pub(crate) fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "mxpipe-spool-log-{name}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }
}
