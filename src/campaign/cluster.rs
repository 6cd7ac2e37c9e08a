//! Sending a campaign through Redis: each rendered message goes into the work stream for
//! `mxpipe node` processes to deliver, and the report is built from the outcomes stream.
//!
//! The calling thread renders rows in file order, at most `limits.lookahead` ahead of the
//! outcomes, and adds them with [`crate::cluster::produce::enqueue`] (one entry per recipient,
//! the message inline, the same format `mxpipe enqueue` writes). With a journal, every entry ID
//! is journaled as soon as Redis has it, so a resumed run waits for those recipients' outcomes
//! instead of enqueueing them again; only a batch whose XADDs had been sent when the process
//! was killed, but not yet journaled, can go twice. Outcomes are matched to rows by entry ID;
//! a recipient's first final outcome counts, and a second one (a node killed -9 delivers again
//! what was in flight) is ignored. This module must not deliver mail or speak SMTP.

use super::progress::Progress;
use super::report::{now_rfc3339, Outcome};
use super::send::{finish_timing, prepare, Prepared, SendOptions, Summary, Tally};
use super::{Campaign, CampaignError};
use crate::cluster::outcome::{self, OutcomeRecord};
use crate::cluster::work::{Content, Entry, Recipient};
use crate::cluster::{produce, Keys, Link, Target};
use redis::streams::StreamReadReply;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Where the work goes and how long to wait for its outcomes.
#[derive(Debug, Clone)]
pub struct RedisTarget {
    pub target: Target,
    /// The hash tag of every key (`mxpipe` by default).
    pub namespace: String,
    /// Stop waiting for outcomes after this long: what is not final then stays in Redis (the
    /// nodes still deliver it), and the summary says the run was interrupted.
    pub deadline: Option<Duration>,
}

/// Rows rendered and enqueued per round trip.
const BATCH: usize = 500;

/// The run's state on the calling thread.
struct Run<'a> {
    campaign: &'a Campaign,
    target: &'a Target,
    link: Link,
    keys: Keys,
    /// Entry ID → row, for every row waiting for its final outcome.
    waiting: HashMap<String, usize>,
    tally: Tally,
    /// The outcomes stream is read after this ID.
    cursor: Option<String>,
}

/// A Redis error, naming the server.
fn redis_error(target: &Target, e: redis::RedisError) -> CampaignError {
    CampaignError::Redis(format!("{}: {e}", target.urls.join(",")))
}

/// The outcomes stream position just before a work entry's ID (`MS-SEQ`): the outcomes of that
/// entry are written later, but may carry the same millisecond.
fn before(entry: &str) -> String {
    let ms: u64 = entry
        .split('-')
        .next()
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(0);
    format!("{}-0", ms.saturating_sub(1))
}

pub(super) fn send(
    campaign: &Campaign,
    redis: &RedisTarget,
    options: &SendOptions,
) -> Result<Summary, CampaignError> {
    let start = Instant::now();
    let mut summary = Summary::new(campaign);
    let Prepared {
        report,
        journal,
        todo,
        enqueued,
    } = prepare(campaign, options, &mut summary)?;
    let to_send = todo.iter().filter(|&&t| t).count() as u64;
    let keys = Keys::new(&redis.namespace);
    // Rows to render and enqueue: those to send less those already in the work stream.
    let mut fresh = todo;
    for &row in enqueued.keys() {
        fresh[row] = false;
    }
    let mut run = Run {
        target: &redis.target,
        campaign,
        link: Link::new(redis.target.clone(), &keys),
        keys,
        cursor: enqueued.values().min().map(|id| before(id)),
        waiting: enqueued.into_iter().map(|(row, id)| (id, row)).collect(),
        tally: Tally::new(journal, report, fresh.len(), summary),
    };
    let mut rows = (0..fresh.len()).filter(|&i| fresh[i]);
    let mut rows_left = true;
    let progress = Progress::new(to_send, options.progress);
    let lookahead = campaign.delivery.lookahead.max(1);
    let deadline = redis.deadline.map(|d| start + d);
    let mut stop_by: Option<Instant> = None;
    let mut interrupted = false;
    while run.tally.finals < to_send {
        if stop_by.is_none() && options.stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
            // No new work; what is in Redis gets the grace period to become final.
            rows_left = false;
            stop_by = Some(Instant::now() + options.stop_grace);
        }
        let now = Instant::now();
        if stop_by.is_some_and(|t| now >= t) || deadline.is_some_and(|t| now >= t) {
            interrupted = true;
            break;
        }
        let room = lookahead.saturating_sub(run.waiting.len()).min(BATCH);
        if rows_left && room > 0 {
            let batch: Vec<usize> = rows.by_ref().take(room).collect();
            rows_left = batch.len() == room;
            run.enqueue(&batch)?;
        }
        // Wait for outcomes only when there is nothing to enqueue.
        let block = if rows_left && run.waiting.len() < lookahead {
            None
        } else {
            Some(250)
        };
        run.read_outcomes(block)?;
        run.flush()?;
        progress.update(&run.tally.counts);
    }
    progress.finish();
    run.flush()?;
    let mut summary = run.tally.summary;
    let c = run.tally.counts;
    summary.delivered = c.delivered;
    summary.bounced = c.bounced;
    summary.expired = c.expired;
    summary.failed = c.failed;
    summary.interrupted = interrupted;
    summary.not_final = run.waiting.len() as u64;
    finish_timing(&mut summary, start, run.tally.finals);
    Ok(summary)
}

impl Run<'_> {
    /// Renders `rows` and adds them to the work stream, one entry each, and journals their IDs.
    fn enqueue(&mut self, rows: &[usize]) -> Result<(), CampaignError> {
        let mut entries = Vec::with_capacity(rows.len());
        let mut sent = Vec::with_capacity(rows.len());
        for &row in rows {
            match self.campaign.render(row) {
                Ok(rendered) => {
                    entries.push(Entry {
                        from: rendered.sender.as_str().to_string(),
                        to: vec![Recipient::Plain(rendered.recipient.as_str().to_string())],
                        content: Content::Inline(rendered.content),
                        tag: 0,
                    });
                    sent.push(row);
                }
                Err(e) => self.failure(row, e.to_string())?,
            }
        }
        if entries.is_empty() {
            return Ok(());
        }
        let ids = produce::enqueue(&mut self.link, &self.keys, &entries)
            .map_err(|e| redis_error(self.target, e))?;
        if self.cursor.is_none() {
            self.cursor = ids.first().map(|id| before(id));
        }
        for (id, row) in ids.into_iter().zip(sent) {
            if let Some(j) = &mut self.tally.journal {
                j.append_enqueued(&id, self.campaign.recipients.address(row))?;
            }
            self.waiting.insert(id, row);
        }
        self.tally.summary.submitted += entries.len() as u64;
        // Journaled before anything else happens: a kill now does not enqueue these again.
        self.flush()
    }

    /// Reads what the outcomes stream has after the cursor (waiting up to `block` ms when
    /// given) and takes this run's outcomes from it.
    fn read_outcomes(&mut self, block: Option<u64>) -> Result<(), CampaignError> {
        let Some(cursor) = self.cursor.clone() else {
            return Ok(());
        };
        let key = self.keys.outcomes();
        let reply: redis::RedisResult<Option<StreamReadReply>> = self.link.call(|c| {
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT").arg(1000);
            if let Some(ms) = block {
                cmd.arg("BLOCK").arg(ms);
            }
            cmd.arg("STREAMS").arg(&key).arg(&cursor).query(c)
        });
        let reply = reply.map_err(|e| redis_error(self.target, e))?;
        let Some(reply) = reply else {
            return Ok(());
        };
        for stream in reply.keys {
            for id in stream.ids {
                self.cursor = Some(id.id.clone());
                let Some(redis::Value::BulkString(field)) = id.map.get("outcomes") else {
                    continue;
                };
                // Records another producer wrote in another format are not this run's.
                let Ok(records) = outcome::parse(&field[..]) else {
                    continue;
                };
                for record in records {
                    self.record(record)?;
                }
            }
        }
        Ok(())
    }

    /// One record of the outcomes stream: this run's when its entry is one the run waits for.
    fn record(&mut self, record: OutcomeRecord<'_>) -> Result<(), CampaignError> {
        let Some(&row) = self.waiting.get(&*record.entry) else {
            return Ok(());
        };
        match &*record.status {
            "deferred" => {
                self.tally.deferral(row);
                return Ok(());
            }
            "invalid" => {
                // Not sent at all: a later run renders and enqueues the row again.
                self.waiting.remove(&*record.entry);
                if let Some(j) = &mut self.tally.journal {
                    j.append_enqueued("", self.campaign.recipients.address(row))?;
                }
                return self.failure(row, record.text.into_owned());
            }
            _ if !record.is_final() => return Ok(()),
            _ => {}
        }
        self.waiting.remove(&*record.entry);
        let outcome = Outcome {
            recipient: self.campaign.recipients.address(row).to_string(),
            status: record.status.into_owned(),
            code: record.code,
            enhanced: record.enhanced.map(Cow::into_owned).unwrap_or_default(),
            text: record.text.into_owned(),
            attempts: record.attempts,
            destination: record.destination.into_owned(),
            time: now_rfc3339(),
            tls: String::new(),
            tls_verified: String::new(),
            tls_policy: String::new(),
        };
        self.tally.final_outcome(row, &outcome)
    }

    /// A row that could not be rendered or was refused as invalid: reported, not journaled as
    /// final, so that a later run tries it again.
    fn failure(&mut self, row: usize, message: String) -> Result<(), CampaignError> {
        let address = self.campaign.recipients.address(row);
        self.tally.failure(address, message)
    }

    fn flush(&mut self) -> Result<(), CampaignError> {
        self.tally.flush()
    }
}
