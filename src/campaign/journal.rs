//! The resume journal: every final outcome appended (one JSON line) as soon as it is known, so
//! that a send killed at any point can be started again and skip the recipients already final.
//!
//! Lines are written and handed to the operating system after each batch of outcomes, and
//! `fsync`ed at most once a second: a killed process loses nothing written, a machine crash at
//! most the last second. What can be sent twice after a restart is what was in flight: a
//! message the server accepted whose outcome had not reached the journal yet. A torn last line
//! (the process died inside a write) is cut off when the journal is opened again. The first line
//! names the campaign (`{"campaign":"<identity>"}`, see [`super::Campaign::identity`]): a journal
//! is refused by another campaign unless the caller says otherwise. A campaign sent through
//! Redis also records each message it put into the work stream (`{"enqueued":"<entry ID>",
//! "recipient":"..."}`, an empty ID when the entry came back invalid), so that a resumed run waits
//! for those outcomes instead of enqueueing the recipients again. This module must not decide
//! what is sent; it only remembers.

use super::report::Outcome;
use super::CampaignError;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const SYNC_EVERY: Duration = Duration::from_secs(1);

/// A line of the journal after the first.
#[derive(Debug)]
pub(crate) enum Line {
    /// A final outcome.
    Outcome(Outcome),
    /// The recipient's message is (or, with an empty ID, is no longer) in the Redis work
    /// stream as entry `enqueued`.
    Enqueued { enqueued: String, recipient: String },
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EnqueuedLine<S> {
    enqueued: S,
    recipient: S,
}

/// The first line of a journal.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    campaign: String,
}

pub(crate) struct Journal {
    path: PathBuf,
    out: BufWriter<File>,
    last_sync: Instant,
}

impl Journal {
    /// Opens (or creates) the journal at `path` for the campaign `identity`, calls `seen` with
    /// each line already in it, and positions it for appending. A journal of another
    /// campaign (or of none: written before journals named their campaign) is refused unless
    /// `any_campaign`.
    pub fn open(
        path: &Path,
        identity: &str,
        any_campaign: bool,
        mut seen: impl FnMut(Line) -> Result<(), CampaignError>,
    ) -> Result<Journal, CampaignError> {
        let fail = |line: Option<u64>, e: String| CampaignError::input(path, line, e);
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| fail(None, format!("cannot open: {e}")))?;
        let mut reader = BufReader::new(&file);
        let mut line = Vec::new();
        let mut complete = 0u64;
        let mut number = 0u64;
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| fail(Some(number + 1), format!("cannot read: {e}")))?;
            if n == 0 || line.last() != Some(&b'\n') {
                break;
            }
            number += 1;
            if number == 1 {
                let header = serde_json::from_slice::<Header>(&line).ok();
                if !any_campaign && header.as_ref().map(|h| h.campaign.as_str()) != Some(identity) {
                    return Err(fail(
                        None,
                        "the journal of another campaign (its campaign file, recipients or \
                         templates differ); give another --journal, or --journal-any-campaign \
                         to use it anyway"
                            .into(),
                    ));
                }
                if header.is_some() {
                    complete += n as u64;
                    continue;
                }
            }
            let entry = match serde_json::from_slice::<Outcome>(&line) {
                Ok(outcome) => Line::Outcome(outcome),
                Err(e) => match serde_json::from_slice::<EnqueuedLine<String>>(&line) {
                    Ok(l) => Line::Enqueued {
                        enqueued: l.enqueued,
                        recipient: l.recipient,
                    },
                    Err(_) => {
                        return Err(fail(
                            Some(number),
                            format!("not a journal line ({e}); is this the journal of a campaign?"),
                        ))
                    }
                },
            };
            seen(entry)?;
            complete += n as u64;
        }
        drop(reader);
        // Cut a line the previous run did not finish writing; its recipient was not recorded as
        // final and is sent again.
        file.set_len(complete)
            .map_err(|e| fail(None, format!("cannot truncate a torn last line: {e}")))?;
        let mut journal = Journal {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
            last_sync: Instant::now(),
        };
        if complete == 0 {
            let header = Header {
                campaign: identity.to_string(),
            };
            serde_json::to_writer(&mut journal.out, &header)
                .map_err(std::io::Error::from)
                .and_then(|()| journal.out.write_all(b"\n"))
                .map_err(|e| fail(None, format!("cannot write: {e}")))?;
            journal.flush()?;
        }
        Ok(journal)
    }

    pub fn append(&mut self, outcome: &Outcome) -> Result<(), CampaignError> {
        serde_json::to_writer(&mut self.out, outcome)
            .map_err(std::io::Error::from)
            .and_then(|()| self.out.write_all(b"\n"))
            .map_err(|e| CampaignError::input(&self.path, None, format!("cannot write: {e}")))
    }

    /// Records that `recipient`'s message is entry `id` of the Redis work stream (`""`: it is
    /// not any more, and a later run sends it again).
    pub fn append_enqueued(&mut self, id: &str, recipient: &str) -> Result<(), CampaignError> {
        let line = EnqueuedLine {
            enqueued: id,
            recipient,
        };
        serde_json::to_writer(&mut self.out, &line)
            .map_err(std::io::Error::from)
            .and_then(|()| self.out.write_all(b"\n"))
            .map_err(|e| CampaignError::input(&self.path, None, format!("cannot write: {e}")))
    }

    /// Hands what was appended to the operating system (it survives the process being
    /// killed), and syncs it to disk when the last sync is a second old.
    pub fn flush(&mut self) -> Result<(), CampaignError> {
        let fail = |e: std::io::Error| {
            CampaignError::input(&self.path, None, format!("cannot write: {e}"))
        };
        self.out.flush().map_err(fail)?;
        if self.last_sync.elapsed() >= SYNC_EVERY {
            self.out.get_ref().sync_data().map_err(fail)?;
            self.last_sync = Instant::now();
        }
        Ok(())
    }
}
