//! Per-recipient outcomes and the report file they are written to.
//!
//! An [`Outcome`] is one line of the report and of the journal: recipient, status, the server's
//! code, enhanced code and text, attempts, destination, time, and how the session was protected
//! (TLS version, certificate verified, TLS policy). The report is CSV when its
//! name ends in `.csv` and JSON Lines otherwise. This module only writes what it is given; it
//! must not decide outcomes.

use super::CampaignError;
use crate::engine::Event;
use crate::message::mime::CivilTime;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The columns of a report (and the fields of a journal line), with what they hold: the
/// reference `mxpipe campaign keys` prints. A unit test checks it against [`Outcome`].
pub const COLUMNS: &[(&str, &str)] = &[
    ("recipient", "the address"),
    ("status", "delivered, bounced or expired (from the server or the engine); failed (could not be rendered); invalid or suppressed (never sent)"),
    ("code", "the SMTP reply code; 0 when no server answered"),
    ("enhanced", "the enhanced status code (RFC 3463), empty when the server gave none"),
    ("text", "the server's reply text, or why mxpipe decided"),
    ("attempts", "delivery attempts made"),
    ("destination", "host:port of the last attempt, empty when never sent"),
    ("time", "when the outcome was known, RFC 3339 UTC"),
    ("tls", "for an outcome a server gave: TLSv1.3, TLSv1.2 or plaintext; empty otherwise"),
    ("tls_verified", "for an outcome over TLS: yes when the certificate was verified, else no"),
    ("tls_policy", "for an outcome a server gave: the destination's TLS policy (none, opportunistic, required, verify, secure; mta-sts, mta-sts-testing, mta-sts-testing-mx-mismatch under a domain's MTA-STS policy)"),
];

/// What happened to one recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub recipient: String,
    /// `delivered`, `bounced`, `expired` (from the server or the engine); `failed` (the message
    /// could not be rendered); `invalid` or `suppressed` (never sent).
    pub status: String,
    /// The SMTP reply code; 0 when no server answered.
    pub code: u16,
    /// The enhanced status code (RFC 3463), empty when the server gave none.
    pub enhanced: String,
    pub text: String,
    pub attempts: u32,
    /// The `host:port` of the last attempt, empty when never sent.
    pub destination: String,
    /// When the outcome was known, RFC 3339 UTC.
    pub time: String,
    /// For an outcome a server gave: `TLSv1.3`, `TLSv1.2` or `plaintext`; empty otherwise.
    #[serde(default)]
    pub tls: String,
    /// For an outcome over TLS: `yes` when the certificate was verified, else `no`.
    #[serde(default)]
    pub tls_verified: String,
    /// For an outcome a server gave: the destination's TLS policy (none, opportunistic,
    /// required, verify, secure, or an MTA-STS one).
    #[serde(default)]
    pub tls_policy: String,
}

impl Outcome {
    /// The outcome a final delivery event reports.
    pub fn from_event(event: &Event) -> Outcome {
        Outcome {
            recipient: event.recipient.as_str().to_string(),
            status: event.kind.as_str().to_string(),
            code: event.reply.code,
            enhanced: event
                .reply
                .enhanced
                .map(|e| e.to_string())
                .unwrap_or_default(),
            text: event.reply.text.clone(),
            attempts: event.attempts,
            destination: event.destination.to_string(),
            time: now_rfc3339(),
            tls: event.tls.map_or(String::new(), |t| {
                t.version.unwrap_or("plaintext").to_string()
            }),
            tls_verified: match event.tls {
                Some(t) if t.version.is_some() => (if t.verified { "yes" } else { "no" }).into(),
                _ => String::new(),
            },
            tls_policy: event
                .tls
                .map_or(String::new(), |t| t.policy.as_str().to_string()),
        }
    }

    /// An outcome decided without a server (skipped or unrenderable rows).
    pub fn local(recipient: &str, status: &str, text: String) -> Outcome {
        Outcome {
            recipient: recipient.to_string(),
            status: status.to_string(),
            code: 0,
            enhanced: String::new(),
            text,
            attempts: 0,
            destination: String::new(),
            time: now_rfc3339(),
            tls: String::new(),
            tls_verified: String::new(),
            tls_policy: String::new(),
        }
    }
}

/// The time now as `2026-05-05T16:53:20Z`.
pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let c = CivilTime::from_unix(secs);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        c.year, c.month, c.day, c.hour, c.minute, c.second
    )
}

enum Sink {
    Csv(Box<csv::Writer<BufWriter<File>>>),
    JsonLines(BufWriter<File>),
}

/// The report file, written as outcomes arrive.
pub(crate) struct Report {
    path: PathBuf,
    sink: Sink,
}

impl Report {
    /// Creates (or truncates) the report at `path`.
    pub fn create(path: &Path) -> Result<Report, CampaignError> {
        let file = File::create(path)
            .map_err(|e| CampaignError::input(path, None, format!("cannot create: {e}")))?;
        let out = BufWriter::new(file);
        let is_csv = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
        let sink = if is_csv {
            // The header row comes from Outcome's field names with the first record.
            Sink::Csv(Box::new(csv::Writer::from_writer(out)))
        } else {
            Sink::JsonLines(out)
        };
        Ok(Report {
            path: path.to_path_buf(),
            sink,
        })
    }

    pub fn write(&mut self, outcome: &Outcome) -> Result<(), CampaignError> {
        let result = match &mut self.sink {
            Sink::Csv(w) => w.serialize(outcome).map_err(|e| e.to_string()),
            Sink::JsonLines(w) => serde_json::to_writer(&mut *w, outcome)
                .map_err(|e| e.to_string())
                .and_then(|()| w.write_all(b"\n").map_err(|e| e.to_string())),
        };
        result.map_err(|e| CampaignError::input(&self.path, None, format!("cannot write: {e}")))
    }

    pub fn flush(&mut self) -> Result<(), CampaignError> {
        let result = match &mut self.sink {
            Sink::Csv(w) => w.flush(),
            Sink::JsonLines(w) => w.flush(),
        };
        result.map_err(|e| CampaignError::input(&self.path, None, format!("cannot write: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_column_reference_names_every_field() {
        let value =
            serde_json::to_value(Outcome::local("a@example.org", "failed", String::new())).unwrap();
        let mut fields: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        fields.sort_unstable();
        let mut documented: Vec<&str> = COLUMNS.iter().map(|(c, _)| *c).collect();
        documented.sort_unstable();
        assert_eq!(documented, fields);
    }
}
