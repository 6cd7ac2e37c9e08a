//! Storing accepted messages on disk, for tests that check what arrived.
//!
//! Each message becomes `<seq:08>.eml` (the content the client meant to send, dot-stuffing
//! undone) and `<seq:08>.json` (the envelope). The JSON file is written last and appears by
//! rename, so a reader that sees it also sees a complete `.eml`. This must not be used on the
//! throughput path: it is synchronous file IO on the event loop thread.

use std::fs;
use std::io;
use std::path::PathBuf;

use serde::Serialize;

use crate::server::Via;

fn via_name(via: Via) -> &'static str {
    match via {
        Via::Data => "DATA",
        Via::Bdat => "BDAT",
    }
}

/// The envelope of one accepted message, as it is written to the `.json` file.
pub(super) struct Envelope<'a> {
    pub(super) mail_from: &'a str,
    pub(super) rcpt_to: &'a [String],
    pub(super) mail_params: &'a str,
    pub(super) via: Via,
}

#[derive(Serialize)]
struct Record<'a> {
    mail_from: &'a str,
    rcpt_to: &'a [String],
    mail_params: &'a str,
    via: &'static str,
    size: usize,
}

/// The directory messages are captured into.
#[derive(Debug)]
pub(super) struct Capture {
    dir: PathBuf,
}

impl Capture {
    /// Uses `dir`, creating it when missing, so that a bad path fails at start and not at the
    /// first message.
    pub(super) fn create(dir: PathBuf) -> io::Result<Capture> {
        fs::create_dir_all(&dir)?;
        Ok(Capture { dir })
    }

    /// Writes message `seq`.
    pub(super) fn store(
        &self,
        seq: u64,
        envelope: &Envelope<'_>,
        content: &[u8],
    ) -> io::Result<()> {
        fs::write(self.dir.join(format!("{seq:08}.eml")), content)?;
        let record = Record {
            mail_from: envelope.mail_from,
            rcpt_to: envelope.rcpt_to,
            mail_params: envelope.mail_params,
            via: via_name(envelope.via),
            size: content.len(),
        };
        let json = serde_json::to_vec(&record).map_err(io::Error::other)?;
        let temporary = self.dir.join(format!(".{seq:08}.json.tmp"));
        fs::write(&temporary, json)?;
        fs::rename(&temporary, self.dir.join(format!("{seq:08}.json")))
    }
}
