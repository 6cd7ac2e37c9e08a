//! Running a campaign: render threads feed the dispatcher, the calling thread turns outcome
//! events into journal lines, report lines and the progress bar, and a [`Summary`] comes back.
//!
//! Render threads take rows in file order from a shared counter, render and submit each with
//! `submit_timeout`, so a full queue stops them (backpressure) and no more than the lookahead is
//! rendered ahead of delivery. Only the calling thread writes the journal and the report. This
//! module must not parse input files (that is [`super::Campaign::load`]'s).

use super::journal::{Journal, Line};
use super::progress::{Counts, Progress};
use super::recipients::SkipKind;
use super::report::{Outcome, Report};
use super::{Campaign, CampaignError};
use crate::engine::{Dispatcher, DispatcherBuilder, Event, EventKind};
use crate::error::Error;
use crate::message::{Body, Message};
use crossbeam_channel::{select, Receiver, Sender};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How to run a send.
#[derive(Debug, Clone, Default)]
pub struct SendOptions {
    /// Write one line per recipient here (CSV for `.csv`, JSON Lines otherwise).
    pub report: Option<PathBuf>,
    /// Resume from, and append final outcomes to, this journal.
    pub journal: Option<PathBuf>,
    /// Draw the progress bar on standard error (when it is a terminal).
    pub progress: bool,
    /// Send again to recipients the journal has as expired (e.g. after a relay was down).
    pub retry_expired: bool,
    /// Use a journal even if it was written for another campaign.
    pub journal_any_campaign: bool,
    /// When this becomes true (a signal handler sets it, say), the send stops taking new work:
    /// no more rows are rendered or submitted, what was submitted gets `stop_grace` to become
    /// final, and the send returns with [`Summary::interrupted`]. What is still in the
    /// dispatcher then is abandoned with it (its loops run until the process ends); those
    /// recipients are not in the journal, so a resumed send tries them again.
    pub stop: Option<&'static AtomicBool>,
    /// See `stop`.
    pub stop_grace: Duration,
}

/// What a run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Data rows in the recipients file.
    pub rows: u64,
    pub invalid: u64,
    pub suppressed: u64,
    pub duplicates: u64,
    /// Recipients the journal already had a final outcome for (not sent again).
    pub already_final: u64,
    /// Of those, recipients that had expired (sent again with `retry_expired`).
    pub already_expired: u64,
    /// Messages handed to the dispatcher in this run (or written, in a dry run).
    pub submitted: u64,
    pub delivered: u64,
    pub bounced: u64,
    pub expired: u64,
    /// Messages that could not be rendered.
    pub failed: u64,
    /// The send was stopped (see [`SendOptions::stop`]) before every recipient was final.
    pub interrupted: bool,
    /// Messages submitted in this run without a final outcome when it stopped.
    pub not_final: u64,
    /// Temporary failures along the way (one recipient may have several).
    pub deferrals: u64,
    pub connections: u64,
    pub elapsed_secs: f64,
    /// Final outcomes per second in this run.
    pub per_second: f64,
    pub dry_run: bool,
    /// The first few reasons a message failed (all of them are in the report).
    pub failures: Vec<String>,
}

impl Summary {
    pub(super) fn new(campaign: &Campaign) -> Summary {
        let count = |kind| campaign.skipped.iter().filter(|s| s.kind == kind).count() as u64;
        Summary {
            rows: (campaign.recipients.len() + campaign.skipped.len()) as u64,
            invalid: count(SkipKind::Invalid),
            suppressed: count(SkipKind::Suppressed),
            duplicates: count(SkipKind::Duplicate),
            ..Summary::default()
        }
    }

    pub(super) fn note_failure(&mut self, message: String) {
        const KEEP: usize = 10;
        if self.failures.len() < KEEP {
            self.failures.push(message);
        }
    }

    /// Whether every recipient that could be sent to was delivered (the exit status).
    pub fn is_clean(&self) -> bool {
        !self.interrupted && self.invalid + self.bounced + self.expired + self.failed == 0
    }

    /// The summary as an aligned table, one count a line.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mut row = |name: &str, value: String| {
            let _ = writeln!(out, "{name:<16}{value:>12}");
        };
        row("rows", self.rows.to_string());
        row("invalid", self.invalid.to_string());
        row("suppressed", self.suppressed.to_string());
        row("duplicates", self.duplicates.to_string());
        if self.dry_run {
            row("rendered", self.submitted.to_string());
        } else {
            row("already final", self.already_final.to_string());
            row("  of which expired", self.already_expired.to_string());
            row("sent", self.submitted.to_string());
            row("delivered", self.delivered.to_string());
            row("bounced", self.bounced.to_string());
            row("expired", self.expired.to_string());
            row("deferrals", self.deferrals.to_string());
            row("connections", self.connections.to_string());
        }
        row("failed", self.failed.to_string());
        if self.interrupted {
            row("not final", self.not_final.to_string());
            row("interrupted", "yes".to_string());
        }
        row("elapsed", format!("{:.1} s", self.elapsed_secs));
        row("rate", format!("{:.0} /s", self.per_second));
        out
    }
}

/// Rows render threads take, in file order, skipping those already final.
struct Work<'a> {
    campaign: &'a Campaign,
    todo: &'a [bool],
    next: AtomicUsize,
    stop: AtomicBool,
    failures: Sender<(usize, String)>,
}

impl Work<'_> {
    fn next_row(&self) -> Option<usize> {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return None;
            }
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.todo.len() {
                return None;
            }
            if self.todo[i] {
                return Some(i);
            }
        }
    }

    fn fail(&self, row: usize, message: String) {
        let _ = self.failures.send((row, message));
    }

    /// Renders and submits rows until there are none left.
    fn submit_all(&self, dispatcher: &Dispatcher, submitted: &AtomicU64) {
        while let Some(i) = self.next_row() {
            let rendered = match self.campaign.render(i) {
                Ok(r) => r,
                Err(e) => {
                    self.fail(i, e.to_string());
                    continue;
                }
            };
            let message = Body::new(&rendered.content).and_then(|body| {
                Message::from_parts(rendered.sender, vec![rendered.recipient], Arc::new(body))
            });
            let mut message = match message {
                Ok(m) => m,
                Err(e) => {
                    self.fail(i, e.to_string());
                    continue;
                }
            };
            // A full queue is backpressure: wait, but look up now and then in case the run
            // was stopped.
            loop {
                match dispatcher.submit_timeout(message, Duration::from_millis(500)) {
                    Ok(_) => {
                        submitted.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Err(e) if e.error == Error::QueueFull => {
                        if self.stop.load(Ordering::Relaxed) {
                            return;
                        }
                        message = e.message;
                    }
                    Err(e) => {
                        self.fail(i, e.error.to_string());
                        break;
                    }
                }
            }
        }
    }

    /// Renders rows into `dir` until there are none left.
    fn write_all(&self, dir: &Path, written: &AtomicU64) {
        while let Some(i) = self.next_row() {
            let result = self.campaign.render(i).and_then(|r| {
                let line = self.campaign.recipients.row(i).line;
                let file = dir.join(format!("{line:08}.eml"));
                std::fs::write(&file, &r.content)
                    .map_err(|e| CampaignError::input(&file, None, format!("cannot write: {e}")))
            });
            match result {
                Ok(()) => {
                    written.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => self.fail(i, e.to_string()),
            }
        }
    }
}

/// What a run has learnt of its recipients' outcomes, on the calling thread: the journal, the
/// report, the counts and the summary. A local run and a run through Redis keep it alike.
pub(super) struct Tally {
    pub(super) journal: Option<Journal>,
    pub(super) report: Option<Report>,
    /// Rows with a deferral and no final outcome yet.
    deferred: Vec<bool>,
    pub(super) counts: Counts,
    pub(super) summary: Summary,
    pub(super) finals: u64,
}

impl Tally {
    pub(super) fn new(
        journal: Option<Journal>,
        report: Option<Report>,
        rows: usize,
        summary: Summary,
    ) -> Tally {
        Tally {
            journal,
            report,
            deferred: vec![false; rows],
            counts: Counts::default(),
            summary,
            finals: 0,
        }
    }

    /// A deferral of `row`.
    pub(super) fn deferral(&mut self, row: usize) {
        self.summary.deferrals += 1;
        if !self.deferred[row] {
            self.deferred[row] = true;
            self.counts.deferred += 1;
        }
    }

    /// The final outcome of `row`, journaled and reported.
    pub(super) fn final_outcome(
        &mut self,
        row: usize,
        outcome: &Outcome,
    ) -> Result<(), CampaignError> {
        if self.deferred[row] {
            self.deferred[row] = false;
            self.counts.deferred -= 1;
        }
        match outcome.status.as_str() {
            "delivered" => self.counts.delivered += 1,
            "bounced" => self.counts.bounced += 1,
            _ => self.counts.expired += 1,
        }
        if let Some(j) = &mut self.journal {
            j.append(outcome)?;
        }
        if let Some(r) = &mut self.report {
            r.write(outcome)?;
        }
        self.finals += 1;
        Ok(())
    }

    /// A row that could not be rendered or submitted: reported, not journaled, so that a later
    /// run tries it again.
    pub(super) fn failure(&mut self, address: &str, message: String) -> Result<(), CampaignError> {
        self.counts.failed += 1;
        self.finals += 1;
        if let Some(r) = &mut self.report {
            r.write(&Outcome::local(address, "failed", message.clone()))?;
        }
        self.summary.note_failure(message);
        Ok(())
    }

    pub(super) fn flush(&mut self) -> Result<(), CampaignError> {
        if let Some(j) = &mut self.journal {
            j.flush()?;
        }
        if let Some(r) = &mut self.report {
            r.flush()?;
        }
        Ok(())
    }
}

/// The calling thread's side of a local run: the engine's events into its [`Tally`].
struct Outcomes<'a> {
    campaign: &'a Campaign,
    tally: Tally,
}

impl Outcomes<'_> {
    fn event(&mut self, event: &Event) -> Result<(), CampaignError> {
        let Some(i) = self.campaign.recipients.find(event.recipient.as_str()) else {
            return Ok(());
        };
        if event.kind == EventKind::Deferred {
            self.tally.deferral(i);
            return Ok(());
        }
        self.tally.final_outcome(i, &Outcome::from_event(event))
    }

    fn failure(&mut self, row: usize, message: String) -> Result<(), CampaignError> {
        let address = self.campaign.recipients.address(row);
        self.tally.failure(address, message)
    }

    fn flush(&mut self) -> Result<(), CampaignError> {
        self.tally.flush()
    }
}

/// The report and journal, open, and the rows to send this time.
pub(super) struct Prepared {
    pub(super) report: Option<Report>,
    pub(super) journal: Option<Journal>,
    pub(super) todo: Vec<bool>,
    /// Rows of `todo` a run through Redis already put into the work stream (their entry IDs),
    /// from the journal: a resumed run waits for their outcomes instead of enqueueing them again.
    pub(super) enqueued: BTreeMap<usize, String>,
}

/// Opens the report and the journal: rows skipped at load and outcomes already in the journal
/// go to the report first, and the rows to send this time are marked in `todo`.
pub(super) fn prepare(
    campaign: &Campaign,
    options: &SendOptions,
    summary: &mut Summary,
) -> Result<Prepared, CampaignError> {
    let mut report = options.report.as_deref().map(Report::create).transpose()?;
    if let Some(r) = &mut report {
        // A duplicate is the same recipient as an earlier row: it is reported there.
        for s in campaign
            .skipped
            .iter()
            .filter(|s| s.kind != SkipKind::Duplicate)
        {
            r.write(&Outcome::local(
                &s.recipient,
                s.kind.as_str(),
                s.reason.clone(),
            ))?;
        }
    }
    let mut todo = vec![true; campaign.recipients.len()];
    let mut enqueued = BTreeMap::new();
    let journal = match &options.journal {
        Some(path) => {
            // The last outcome of each row, except that an expiry never replaces another final
            // outcome (a recipient retried after expiring may have been delivered since).
            let mut known: BTreeMap<usize, Outcome> = BTreeMap::new();
            let journal = Journal::open(
                path,
                campaign.identity(),
                options.journal_any_campaign,
                |line| {
                    match line {
                        Line::Outcome(outcome) => {
                            if let Some(i) = campaign.recipients.find(&outcome.recipient) {
                                // A final outcome ends the entry the row was waiting for.
                                enqueued.remove(&i);
                                let keep = known.get(&i).is_some_and(|k| k.status != "expired");
                                if !keep {
                                    known.insert(i, outcome);
                                }
                            }
                        }
                        Line::Enqueued {
                            enqueued: id,
                            recipient,
                        } => {
                            if let Some(i) = campaign.recipients.find(&recipient) {
                                if id.is_empty() {
                                    enqueued.remove(&i);
                                } else {
                                    enqueued.insert(i, id);
                                }
                            }
                        }
                    }
                    Ok(())
                },
            )?;
            for (i, outcome) in known {
                let expired = outcome.status == "expired";
                if expired && options.retry_expired {
                    continue;
                }
                enqueued.remove(&i);
                todo[i] = false;
                summary.already_final += 1;
                summary.already_expired += u64::from(expired);
                if let Some(r) = &mut report {
                    r.write(&outcome)?;
                }
            }
            Some(journal)
        }
        None => None,
    };
    Ok(Prepared {
        report,
        journal,
        todo,
        enqueued,
    })
}

pub(super) fn send(
    campaign: &Campaign,
    builder: DispatcherBuilder,
    options: &SendOptions,
    started: &dyn Fn(&Arc<Dispatcher>) -> Result<(), String>,
) -> Result<Summary, CampaignError> {
    let start = Instant::now();
    let mut summary = Summary::new(campaign);
    // Rows a run through Redis enqueued are sent again here: this engine cannot wait for them.
    let Prepared {
        report,
        journal,
        todo,
        enqueued: _,
    } = prepare(campaign, options, &mut summary)?;
    let to_send = todo.iter().filter(|&&t| t).count() as u64;
    let d = &campaign.delivery;
    let dispatcher = builder
        // The events are how a campaign learns its outcomes: an engine file cannot turn them off.
        .record_events(true)
        // Both bound what is rendered but not yet delivered: the lookahead.
        .queue_capacity(d.lookahead)
        .max_queued_recipients(d.lookahead)
        .start()
        .map_err(CampaignError::Dispatcher)?;
    let dispatcher = Arc::new(dispatcher);
    started(&dispatcher).map_err(CampaignError::Engine)?;
    let events = dispatcher.events().expect("events are recorded");
    let (failures_tx, failures) = crossbeam_channel::unbounded();
    let work = Work {
        campaign,
        todo: &todo,
        next: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        failures: failures_tx,
    };
    let submitted = AtomicU64::new(0);
    let mut outcomes = Outcomes {
        campaign,
        tally: Tally::new(journal, report, todo.len(), summary),
    };
    let progress = Progress::new(to_send, options.progress);
    let result = std::thread::scope(|scope| {
        for _ in 0..d.render_threads {
            scope.spawn(|| work.submit_all(&dispatcher, &submitted));
        }
        let result = collect(
            &mut outcomes,
            &events,
            &failures,
            &progress,
            to_send,
            Stop {
                requested: options.stop,
                grace: options.stop_grace,
                work: &work,
                submitted: &submitted,
            },
        );
        if !matches!(result, Ok(Finished::All)) {
            work.stop.store(true, Ordering::Relaxed);
        }
        result
    });
    progress.finish();
    let interrupted = matches!(result, Ok(Finished::Stopped));
    if interrupted {
        // Shutting down would wait for everything the dispatcher holds: it is abandoned
        // instead, and ends with the process.
        std::mem::forget(Arc::clone(&dispatcher));
    } else {
        dispatcher.shutdown();
    }
    result?;
    outcomes.flush()?;
    let mut summary = outcomes.tally.summary;
    let c = outcomes.tally.counts;
    summary.submitted = submitted.load(Ordering::Relaxed);
    summary.delivered = c.delivered;
    summary.bounced = c.bounced;
    summary.expired = c.expired;
    summary.failed = c.failed;
    summary.connections = dispatcher.stats().connections_opened;
    summary.interrupted = interrupted;
    summary.not_final = summary
        .submitted
        .saturating_sub(c.delivered + c.bounced + c.expired);
    finish_timing(&mut summary, start, outcomes.tally.finals);
    Ok(summary)
}

/// How a send learns it should stop, and what it stops.
struct Stop<'a> {
    requested: Option<&'static AtomicBool>,
    grace: Duration,
    work: &'a Work<'a>,
    submitted: &'a AtomicU64,
}

/// How [`collect`] ended.
enum Finished {
    /// Every row sent this run is final.
    All,
    /// Stopped on request.
    Stopped,
}

/// Takes outcomes until every row sent this run is final, or until a stop was requested and
/// what was submitted is final or its grace period is over.
fn collect(
    outcomes: &mut Outcomes<'_>,
    events: &Receiver<Event>,
    failures: &Receiver<(usize, String)>,
    progress: &Progress,
    to_send: u64,
    stop: Stop<'_>,
) -> Result<Finished, CampaignError> {
    let mut deadline = None;
    while outcomes.tally.finals < to_send {
        if deadline.is_none() && stop.requested.is_some_and(|s| s.load(Ordering::SeqCst)) {
            // No new work: the render threads stop at their next row.
            stop.work.stop.store(true, Ordering::Relaxed);
            deadline = Some(Instant::now() + stop.grace);
        }
        if let Some(deadline) = deadline {
            let c = &outcomes.tally.counts;
            let finals = c.delivered + c.bounced + c.expired;
            if finals >= stop.submitted.load(Ordering::Relaxed) || Instant::now() >= deadline {
                outcomes.flush()?;
                return Ok(Finished::Stopped);
            }
        }
        select! {
            recv(events) -> event => {
                if let Ok(event) = event {
                    outcomes.event(&event)?;
                }
            }
            recv(failures) -> failure => {
                if let Ok((row, message)) = failure {
                    outcomes.failure(row, message)?;
                }
            }
            // Wake now and then to keep the bar's rate and ETA moving.
            default(Duration::from_millis(250)) => {}
        }
        // Everything already waiting goes out in the same batch, then one flush.
        while let Ok(event) = events.try_recv() {
            outcomes.event(&event)?;
        }
        outcomes.flush()?;
        progress.update(&outcomes.tally.counts);
    }
    Ok(Finished::All)
}

pub(super) fn dry_run(campaign: &Campaign, dir: &Path) -> Result<Summary, CampaignError> {
    let start = Instant::now();
    std::fs::create_dir_all(dir)
        .map_err(|e| CampaignError::input(dir, None, format!("cannot create: {e}")))?;
    let mut summary = Summary::new(campaign);
    summary.dry_run = true;
    let todo = vec![true; campaign.recipients.len()];
    let (failures_tx, failures) = crossbeam_channel::unbounded();
    let work = Work {
        campaign,
        todo: &todo,
        next: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        failures: failures_tx,
    };
    let written = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for _ in 0..campaign.delivery.render_threads {
            scope.spawn(|| work.write_all(dir, &written));
        }
    });
    drop(work);
    for (_, message) in failures.iter() {
        summary.failed += 1;
        summary.note_failure(message);
    }
    summary.submitted = written.load(Ordering::Relaxed);
    let done = summary.submitted;
    finish_timing(&mut summary, start, done);
    Ok(summary)
}

pub(super) fn finish_timing(summary: &mut Summary, start: Instant, done: u64) {
    summary.elapsed_secs = start.elapsed().as_secs_f64();
    summary.per_second = if summary.elapsed_secs > 0.0 {
        done as f64 / summary.elapsed_secs
    } else {
        0.0
    };
}
