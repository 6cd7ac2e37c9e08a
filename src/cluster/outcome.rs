//! The outcomes stream's record format, written by nodes and read by campaigns (and by any
//! producer that wants to know what happened).
//!
//! Every entry of `{NS}:outcomes` has one field, `outcomes`: a JSON array of records, each
//! `{"entry", "recipient", "status", "code", "enhanced", "text", "attempts", "retry_after_s",
//! "destination", "tag", "node"}`. `status` is `delivered`, `bounced`, `expired`, `deferred`
//! or `invalid` (an entry that was not sent at all: `recipient` is then empty unless one handed-back recipient was at fault, and `text`
//! names the field at fault). Strings borrow when written and are owned when read. This module
//! only describes the format; it neither talks to Redis nor decides outcomes.

use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// One record of the outcomes stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutcomeRecord<'a> {
    /// The work entry's stream ID.
    pub entry: Cow<'a, str>,
    #[serde(default)]
    pub recipient: Cow<'a, str>,
    pub status: Cow<'a, str>,
    /// The SMTP reply code; 0 when no server answered.
    #[serde(default)]
    pub code: u16,
    #[serde(default)]
    pub enhanced: Option<Cow<'a, str>>,
    #[serde(default)]
    pub text: Cow<'a, str>,
    #[serde(default)]
    pub attempts: u32,
    /// For a deferral: when it is tried again, in seconds.
    #[serde(default)]
    pub retry_after_s: Option<f64>,
    #[serde(default)]
    pub destination: Cow<'a, str>,
    /// The entry's `tag`.
    #[serde(default)]
    pub tag: u64,
    /// The consumer name of the node that decided it.
    #[serde(default)]
    pub node: Cow<'a, str>,
}

impl OutcomeRecord<'_> {
    /// Whether the recipient is done: delivered, bounced or expired.
    pub fn is_final(&self) -> bool {
        matches!(&*self.status, "delivered" | "bounced" | "expired")
    }
}

/// Reads the `outcomes` field of an outcomes-stream entry.
pub fn parse(field: &[u8]) -> Result<Vec<OutcomeRecord<'static>>, serde_json::Error> {
    serde_json::from_slice(field)
}
