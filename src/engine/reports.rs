//! Failure reports to senders (RFC 3464 DSNs) for mail the dispatcher has custody of.
//!
//! [`DsnReports`] wraps the [`Custody`] of a source (the spool): it passes every outcome on
//! unchanged and, for each recipient that bounced or expired and whose NOTIFY asks for
//! failures (the default), has a report written to the envelope sender (never to the null
//! sender) and submitted through the engine's [`Intake`] like any other message, with
//! `MAIL FROM:<>`. The loop never learns about reports: it only hands outcomes to its custody.
//! Reports are written on a thread of their own, one per message and loop turn (split into
//! reports of at most [`RECIPIENTS_PER_REPORT`] recipients each), so the loop thread never
//! copies a body. What waits for that thread is a small record per failed recipient: the
//! envelope, reply and destination are shared by the recipients they failed, never copied per
//! recipient. A report is counted as submitted the moment the failure is decided, so `flush`
//! and `wait_final` wait for reports too; reports themselves are not spooled (a crash between a
//! bounce and its report loses the report, not the bounce).

use super::custody::{Counted, Custody, Intake, Outcome, Outcomes};
use super::EventKind;
use crate::message::dsn::Notify;
use crate::message::report::{FailureReport, ReportedRecipient};
use crate::message::Message;
use crate::queue::{Envelope, Submission};
use crate::smtp::Reply;
use crossbeam_channel::{Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

/// Identifiers of reports start here, above any a spool gives, so that their own outcomes are
/// never mistaken for (or checkpointed as) a spooled message's.
pub const REPORT_IDS: u64 = 1 << 63;

/// How long the report thread waits for room in a full queue before it drops a report.
const QUEUE_WAIT: Duration = Duration::from_secs(30);

/// The most recipients one report lists; the failures of a message in one loop turn beyond
/// that go in further reports. A report costs about 500 bytes per recipient: a million failed
/// recipients in one report would be one message of half a gigabyte, to write, hold and send.
/// (Postfix's reports list the recipients of one queue file, at most
/// `smtpd_recipient_limit`, 1000 by default.)
pub const RECIPIENTS_PER_REPORT: usize = 1000;

/// Recipients of one message that failed with one reply at one destination: what their report
/// needs, with the envelope, reply and destination shared by all of them.
#[derive(Debug)]
struct Failed {
    envelope: Arc<Envelope>,
    reply: Arc<Reply>,
    destination: Arc<str>,
    /// Each recipient, and whether it expired (rather than was refused).
    recipients: Vec<(Box<str>, bool)>,
}

/// A custody that also reports failures to senders (see the module documentation).
#[derive(Debug)]
pub struct DsnReports {
    inner: Arc<dyn Custody>,
    reporting_mta: String,
    intake: OnceLock<Intake>,
    work: Sender<Vec<Failed>>,
    pending: Mutex<Option<Receiver<Vec<Failed>>>>,
}

impl DsnReports {
    /// Wraps `inner`; `reporting_mta` names this host in the reports.
    pub fn new(inner: Arc<dyn Custody>, reporting_mta: &str) -> Arc<DsnReports> {
        let (work, rx) = crossbeam_channel::unbounded();
        Arc::new(DsnReports {
            inner,
            reporting_mta: reporting_mta.to_string(),
            intake: OnceLock::new(),
            work,
            pending: Mutex::new(Some(rx)),
        })
    }

    /// Starts the thread that writes and submits reports through `intake`, before any work is
    /// handed over. It ends once the loops (which hold this custody) are gone.
    pub fn start(&self, intake: Intake) -> std::io::Result<()> {
        let Some(rx) = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return Ok(());
        };
        let _ = self.intake.set(intake.clone());
        let host = self.reporting_mta.clone();
        std::thread::Builder::new()
            .name("mxpipe-dsn".into())
            .spawn(move || writer(rx, intake, host))
            .map(drop)
    }

    /// A failure the sender asked to hear about (NOTIFY=FAILURE, the default), of a message
    /// with a sender, that is not itself a report.
    fn wanted(outcome: &Outcome, recipient: &str) -> bool {
        let Some(failure) = outcome.failure.as_deref() else {
            return false;
        };
        let envelope = &failure.envelope;
        matches!(outcome.kind, EventKind::Bounced | EventKind::Expired)
            && outcome.message_id < REPORT_IDS
            && !envelope.sender.is_null()
            && envelope.dsn.as_ref().is_none_or(|dsn| {
                dsn.recipient(recipient)
                    .map_or(Notify::DEFAULT, |r| r.effective_notify())
                    .failure
            })
    }
}

impl Custody for DsnReports {
    fn record(&self, outcomes: &mut Outcomes) {
        // The failures move out of the outcomes (the wrapped custody does not want them), and
        // a run of recipients failed by one reply becomes one record.
        let mut failures: Vec<Failed> = Vec::new();
        for i in 0..outcomes.list.len() {
            let Some((recipient, _)) = outcomes.failed_recipient(&outcomes.list[i]) else {
                continue;
            };
            if !Self::wanted(&outcomes.list[i], recipient) {
                continue;
            }
            let recipient: Box<str> = recipient.into();
            let o = &mut outcomes.list[i];
            let Some(f) = o.failure.take() else {
                continue;
            };
            let recipient = (recipient, o.kind == EventKind::Expired);
            match failures.last_mut() {
                Some(last)
                    if Arc::ptr_eq(&last.envelope, &f.envelope)
                        && (Arc::ptr_eq(&last.reply, &f.reply) || last.reply == f.reply)
                        && last.destination == f.destination =>
                {
                    last.recipients.push(recipient)
                }
                _ => failures.push(Failed {
                    envelope: f.envelope,
                    reply: f.reply,
                    destination: f.destination,
                    recipients: vec![recipient],
                }),
            }
        }
        // A report's own outcomes are no business of the wrapped custody.
        outcomes.list.retain(|o| o.message_id < REPORT_IDS);
        if !outcomes.list.is_empty() {
            self.inner.record(outcomes);
        }
        if !failures.is_empty() {
            let _ = self.work.send(failures);
        }
    }

    fn decided(&self, outcome: &Outcome, recipient: &str) {
        if outcome.message_id < REPORT_IDS {
            self.inner.decided(outcome, recipient);
        }
        if Self::wanted(outcome, recipient) {
            if let Some(intake) = self.intake.get() {
                intake.count_submitted(1, true);
            }
        }
    }

    fn wants_failures(&self) -> bool {
        true
    }
}

/// The report thread: one report per message and batch (per [`RECIPIENTS_PER_REPORT`]
/// recipients of it), submitted with the null sender.
fn writer(rx: Receiver<Vec<Failed>>, intake: Intake, host: String) {
    let mut next_id = REPORT_IDS;
    while let Ok(batch) = rx.recv() {
        let mut messages: Vec<(u64, Vec<&Failed>)> = Vec::new();
        for f in &batch {
            let id = f.envelope.id;
            match messages.iter_mut().find(|(m, _)| *m == id) {
                Some((_, list)) => list.push(f),
                None => messages.push((id, vec![f])),
            }
        }
        for (_, list) in messages {
            let envelope = &list[0].envelope;
            let dsn = envelope.dsn.as_deref();
            let mut recipients = list.iter().flat_map(|f| {
                f.recipients
                    .iter()
                    .map(move |(recipient, expired)| ReportedRecipient {
                        recipient,
                        orcpt: dsn
                            .and_then(|d| d.recipient(recipient))
                            .and_then(|r| r.orcpt.as_ref()),
                        expired: *expired,
                        reply: &f.reply,
                        destination: &f.destination,
                    })
            });
            loop {
                let part: Vec<ReportedRecipient> =
                    recipients.by_ref().take(RECIPIENTS_PER_REPORT).collect();
                if part.is_empty() {
                    break;
                }
                submit_report(&intake, &host, envelope, &part, &mut next_id);
            }
        }
    }
}

/// Writes the report of `recipients` (failures of `envelope`) and submits it; the failures
/// counted as its recipients when they were decided are released but the report's own one.
fn submit_report(
    intake: &Intake,
    host: &str,
    envelope: &Envelope,
    recipients: &[ReportedRecipient],
    next_id: &mut u64,
) {
    let counted = recipients.len() as u64;
    let dsn = envelope.dsn.as_deref();
    let now = SystemTime::now();
    let age = envelope.submitted.elapsed();
    let report = FailureReport {
        reporting_mta: host,
        sender: envelope.sender.as_str(),
        envid: dsn.and_then(|d| d.envid.as_deref()),
        arrival: now.checked_sub(age).unwrap_or(now),
        recipients,
        ret: dsn.and_then(|d| d.ret),
        original: envelope.body.as_bytes(),
    }
    .write(now);
    let message = Message::new("", [envelope.sender.as_str()], &report);
    let handed = match message {
        Ok(message) => {
            let id = *next_id;
            *next_id += 1;
            intake
                .hand_over(
                    Submission::new(id, message),
                    Some(QUEUE_WAIT),
                    Counted::Both,
                )
                .is_ok()
        }
        Err(_) => false,
    };
    // The report has one recipient; the failures counted for it were `counted`.
    let release = if handed { counted - 1 } else { counted };
    if release > 0 {
        intake.count_submitted(release, false);
    }
}
