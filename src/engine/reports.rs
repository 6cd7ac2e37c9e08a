//! Failure reports to senders (RFC 3464 DSNs) for mail the dispatcher has custody of.
//!
//! [`DsnReports`] wraps the [`Custody`] of a source (the spool): it passes every outcome on
//! unchanged and, for each recipient that bounced or expired and whose NOTIFY asks for
//! failures (the default), has a report written to the envelope sender (never to the null
//! sender) and submitted through the engine's [`Intake`] like any other message, with
//! `MAIL FROM:<>`. The loop never learns about reports: it only hands outcomes to its custody.
//! Reports are written on a thread of their own, one per message and loop turn, so the loop
//! thread never copies a body. A report is counted as submitted the moment the failure is
//! decided, so `flush` and `wait_final` wait for reports too; reports themselves are not
//! spooled (a crash between a bounce and its report loses the report, not the bounce).

use super::custody::{Counted, Custody, Intake, Outcome};
use super::EventKind;
use crate::message::dsn::Notify;
use crate::message::report::{FailureReport, ReportedRecipient};
use crate::message::Message;
use crate::queue::Submission;
use crossbeam_channel::{Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

/// Identifiers of reports start here, above any a spool gives, so that their own outcomes are
/// never mistaken for (or checkpointed as) a spooled message's.
pub const REPORT_IDS: u64 = 1 << 63;

/// How long the report thread waits for room in a full queue before it drops a report.
const QUEUE_WAIT: Duration = Duration::from_secs(30);

/// A custody that also reports failures to senders (see the module documentation).
#[derive(Debug)]
pub struct DsnReports {
    inner: Arc<dyn Custody>,
    reporting_mta: String,
    intake: OnceLock<Intake>,
    work: Sender<Vec<Outcome>>,
    pending: Mutex<Option<Receiver<Vec<Outcome>>>>,
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
    fn wanted(outcome: &Outcome) -> bool {
        let Some(failure) = &outcome.failure else {
            return false;
        };
        let envelope = &failure.envelope;
        matches!(outcome.kind, EventKind::Bounced | EventKind::Expired)
            && outcome.message_id < REPORT_IDS
            && !envelope.sender.is_null()
            && envelope.dsn.as_ref().is_none_or(|dsn| {
                dsn.recipient(outcome.recipient.as_str())
                    .map_or(Notify::DEFAULT, |r| r.effective_notify())
                    .failure
            })
    }
}

impl Custody for DsnReports {
    fn record(&self, mut outcomes: Vec<Outcome>) {
        let failures: Vec<Outcome> = outcomes
            .iter()
            .filter(|o| Self::wanted(o))
            .cloned()
            .collect();
        // A report's own outcomes are no business of the wrapped custody.
        outcomes.retain(|o| o.message_id < REPORT_IDS);
        if !outcomes.is_empty() {
            self.inner.record(outcomes);
        }
        if !failures.is_empty() {
            let _ = self.work.send(failures);
        }
    }

    fn decided(&self, outcome: &Outcome) {
        if outcome.message_id < REPORT_IDS {
            self.inner.decided(outcome);
        }
        if Self::wanted(outcome) {
            if let Some(intake) = self.intake.get() {
                intake.count_submitted(1, true);
            }
        }
    }

    fn wants_failures(&self) -> bool {
        true
    }
}

/// The report thread: one report per message and batch, submitted with the null sender.
fn writer(rx: Receiver<Vec<Outcome>>, intake: Intake, host: String) {
    let mut next_id = REPORT_IDS;
    while let Ok(batch) = rx.recv() {
        let mut groups: Vec<(u64, Vec<&Outcome>)> = Vec::new();
        for o in &batch {
            match groups.iter_mut().find(|(id, _)| *id == o.message_id) {
                Some((_, list)) => list.push(o),
                None => groups.push((o.message_id, vec![o])),
            }
        }
        for (_, list) in groups {
            let counted = list.len() as u64;
            let failure = list[0].failure.as_ref().expect("wanted outcomes carry it");
            let envelope = &failure.envelope;
            let dsn = envelope.dsn.as_deref();
            let recipients: Vec<ReportedRecipient> = list
                .iter()
                .map(|o| {
                    let f = o.failure.as_ref().expect("wanted outcomes carry it");
                    ReportedRecipient {
                        recipient: o.recipient.as_str(),
                        orcpt: dsn
                            .and_then(|d| d.recipient(o.recipient.as_str()))
                            .and_then(|r| r.orcpt.as_ref()),
                        expired: o.kind == EventKind::Expired,
                        reply: &f.reply,
                        destination: &f.destination,
                    }
                })
                .collect();
            let now = SystemTime::now();
            let age = envelope.submitted.elapsed();
            let report = FailureReport {
                reporting_mta: &host,
                sender: envelope.sender.as_str(),
                envid: dsn.and_then(|d| d.envid.as_deref()),
                arrival: now.checked_sub(age).unwrap_or(now),
                recipients: &recipients,
                ret: dsn.and_then(|d| d.ret),
                original: envelope.body.as_bytes(),
            }
            .write(now);
            let message = Message::new("", [envelope.sender.as_str()], &report);
            let handed = match message {
                Ok(message) => {
                    let id = next_id;
                    next_id += 1;
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
    }
}
