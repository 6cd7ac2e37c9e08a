//! `mxpipe send --from ... --to-file ... MESSAGE.eml`: one ready message to many recipients,
//! with a per-recipient report.
//!
//! The message goes out as given, except that a missing `Date` or `Message-ID` is added (RFC
//! 5322 3.6 requires both; Postfix's cleanup and swaks add them too). The report gets one line
//! per final outcome as it happens, flushed whenever no more outcomes are waiting, so a run
//! that is stopped keeps what it learnt; a recipient still deferred when the run ends gets a
//! `not_final` line and is named in the summary. This module must not build MIME; it only completes the header section.

use super::options::{serve_metrics, Overrides};
use super::{event_json, event_value, signal, CliResult};
use mxpipe::engine::{Dispatcher, Event, EventKind};
use mxpipe::message::mime::{format_date, is_valid_header_name, new_message_id};
use mxpipe::message::{Address, Body, Message};
use mxpipe::smtp::Reply;
use mxpipe::Error;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

pub(crate) struct SendArgs {
    pub(crate) from: String,
    pub(crate) to_file: PathBuf,
    pub(crate) message: PathBuf,
    pub(crate) report: Option<PathBuf>,
    pub(crate) wait_final: bool,
    pub(crate) overrides: Overrides,
}

pub(crate) fn run_send(args: SendArgs) -> CliResult {
    signal::install()?;
    let sender = if args.from.is_empty() {
        Address::null()
    } else {
        Address::parse(&args.from, mxpipe::error::Field::Sender)
            .map_err(|e| format!("--from: {e}"))?
    };
    let content = std::fs::read(&args.message)
        .map_err(|e| format!("{}: cannot read: {e}", args.message.display()))?;
    let id_domain = if sender.is_null() {
        args.overrides.ehlo_name.as_deref().unwrap_or("localhost")
    } else {
        sender.domain()
    };
    let (content, has_headers) = complete_header(&content, SystemTime::now(), id_domain);
    if !has_headers {
        eprintln!(
            "mxpipe: warning: {}: no header section (the first line is not a header field); it \
             is sent as the body of a message with only Date and Message-ID",
            args.message.display()
        );
    }
    let body = Body::new(&content).map_err(|e| format!("{}: {e}", args.message.display()))?;
    let list = RecipientList::read(&args.to_file)?;
    let delivery = &args.overrides.delivery;
    // What the command line gives replaces the --config file's settings; the rest stays.
    let mut builder = args.overrides.apply(delivery.base_builder()?)?;
    // With a spool (--spool, or spool_dir in the --config file), an empty list sends what the
    // spool holds from earlier runs.
    if list.recipients.is_empty() && builder.config_mut().spool.is_none() {
        return Err(format!("{}: no valid recipients", args.to_file.display()));
    }
    // Output paths are checked before anything is sent.
    let mut report = args
        .report
        .as_ref()
        .map(|path| {
            File::create(path)
                .map(BufWriter::new)
                .map_err(|e| format!("--report {}: cannot create: {e}", path.display()))
        })
        .transpose()?;
    let max_age = builder.config_mut().retry.max_age;
    // This command reads every outcome: a --config file cannot turn them off.
    let dispatcher = builder
        .record_events(true)
        .start()
        .map_err(|e| e.to_string())?;
    let dispatcher = Arc::new(dispatcher);
    if let Some(addr) = delivery.metrics {
        serve_metrics(addr, &dispatcher)?;
    }
    let events = dispatcher.events().expect("events are on");
    if let Some(recovered) = dispatcher.spool_report() {
        eprintln!("{recovered}");
    }
    let total = list.recipients.len() as u64;
    // Clones of an address share its text: the list costs a pointer per recipient.
    let all: Vec<Address> = list.recipients.clone();
    if total > 0 {
        let message = Message::from_parts(sender, list.recipients, Arc::new(body))
            .map_err(|e| e.to_string())?;
        let id = dispatcher
            .submit_timeout(message, Duration::from_secs(60))
            .map_err(|e| e.to_string())?;
        if dispatcher.spool_report().is_some() {
            // Acknowledged only once on disk (a spool of --spool or of the --config file's
            // spool_dir): a crash from here on loses nothing.
            dispatcher.sync().map_err(|e| e.to_string())?;
            println!("spooled id={id} recipients={total}");
            std::io::stdout().flush().map_err(|e| e.to_string())?;
        }
    }
    // Another thread waits for the end of the run while this one writes the report.
    let (done_tx, done) = crossbeam_channel::bounded::<()>(2);
    let wait = |dispatcher: Arc<Dispatcher>, wait_final: bool| {
        let done_tx = done_tx.clone();
        std::thread::spawn(move || {
            if wait_final {
                dispatcher.wait_final(max_age + Duration::from_secs(60));
            } else {
                dispatcher.flush();
            }
            let _ = done_tx.send(());
        })
    };
    let first_wait = wait(Arc::clone(&dispatcher), args.wait_final);
    let mut outcomes = Outcomes::with_capacity(all.len());
    let mut write = |report: &mut Option<BufWriter<File>>, event: &Event| {
        if let Some(line) = outcomes.take(event) {
            if let Some(w) = report.as_mut() {
                writeln!(w, "{line}").map_err(|e| format!("--report: cannot write: {e}"))?;
            }
        }
        // Flushed once the events that came together are written, not per line: a burst of
        // a million outcomes must not wait for a million writes while more pile up.
        if let Some(w) = report.as_mut().filter(|_| events.is_empty()) {
            w.flush()
                .map_err(|e| format!("--report: cannot write: {e}"))?;
        }
        Ok::<(), String>(())
    };
    let tick = crossbeam_channel::tick(Duration::from_millis(200));
    let mut deadline = None;
    loop {
        crossbeam_channel::select! {
            recv(events) -> event => match event {
                Ok(event) => write(&mut report, &event)?,
                Err(_) => break,
            },
            recv(done) -> _ => break,
            recv(tick) -> _ => {}
        }
        if deadline.is_none() && signal::stop_requested() {
            // Stop taking new work: what is in flight gets the grace period, and a recipient
            // waiting for a retry is not waited for.
            deadline = Some(Instant::now() + signal::GRACE);
            let _ = wait(Arc::clone(&dispatcher), false);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    let interrupted = deadline.is_some();
    if interrupted {
        // Shutting down would wait for what is in flight: it is abandoned with the process.
        std::mem::forget(Arc::clone(&dispatcher));
    } else {
        dispatcher.shutdown();
        // It has sent `done`: once it has ended, this is the last reference, and dropping it
        // at the end of the command waits for the loops (their QUITs, the trace's last lines)
        // and writes the spool's last checkpoints. Without the join, the process could exit
        // while that thread still held it, and skip all of that.
        let _ = first_wait.join();
    }
    for event in events.try_iter() {
        write(&mut report, &event)?;
    }
    // What is not final now is not retried by anyone: said in the report and the summary.
    let not_final = outcomes.not_final(&all);
    if let Some(w) = report.as_mut() {
        for line in &not_final {
            writeln!(w, "{line}").map_err(|e| format!("--report: cannot write: {e}"))?;
        }
        w.flush()
            .map_err(|e| format!("--report: cannot write: {e}"))?;
    }
    let connections = dispatcher.stats().connections_opened;
    let [delivered, bounced, expired] = outcomes.finals;
    let not_final = not_final.len() as u64;
    println!(
        "recipients={total} delivered={delivered} bounced={bounced} expired={expired} not_final={not_final} invalid={} duplicates={} connections={connections}",
        list.invalid, list.duplicates
    );
    if not_final > 0 {
        let what = if not_final == 1 {
            "1 recipient".to_string()
        } else {
            format!("{not_final} recipients")
        };
        let why = if let Some(dir) = &delivery.spool {
            &*format!(
                "kept in the spool {}; the next `mxpipe send --spool` on it retries it",
                dir.display()
            )
        } else if interrupted {
            "interrupted; a message sent with --from/--to-file is not kept anywhere, so nothing \
             retries it"
        } else if args.wait_final {
            "still deferred at the end of --wait-final"
        } else {
            "deferred, not retried: without --wait-final nothing keeps it"
        };
        eprintln!("mxpipe: {what} not final at exit ({why}); see the report");
    }
    if interrupted {
        return Ok(ExitCode::from(signal::INTERRUPTED));
    }
    Ok(if bounced + expired + list.invalid + not_final == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Final outcomes as report lines, and the last deferral of each recipient not final yet.
///
/// A list's recipients are deferred together with one reply (a relay that refuses
/// connections): their events share it, and the records kept here share one [`Attempt`], so
/// that a million-recipient message costs one small map entry per recipient here.
#[derive(Default)]
struct Outcomes {
    /// Every recipient with an outcome: its last deferral, or `None` once it is final.
    seen: HashMap<Address, Option<Deferral>>,
    /// The attempt of the last deferral, shared by the records of the recipients it deferred.
    last_attempt: Option<Arc<Attempt>>,
    /// Final outcomes written to the report (delivered, bounced, expired): the summary counts
    /// these, not the dispatcher's counters, so that an interrupted send (whose loops go on
    /// deciding while it exits) never counts an outcome its report does not show. The
    /// delivery status notifications the spool's custody sends are not this send's
    /// recipients and are counted in neither.
    finals: [u64; 3],
}

/// What the deferrals of one attempt have in common.
#[derive(PartialEq)]
struct Attempt {
    message_id: u64,
    reply: Arc<Reply>,
    destination: Arc<str>,
    attempts: u32,
}

/// A recipient's last deferral, as much of its event as a `not_final` line shows.
struct Deferral {
    attempt: Arc<Attempt>,
    elapsed_ms: u64,
}

impl Deferral {
    /// The deferral event of `recipient` again.
    fn event(&self, recipient: &Address) -> Event {
        let attempt = &self.attempt;
        Event {
            kind: EventKind::Deferred,
            message_id: attempt.message_id,
            tag: 0,
            recipient: recipient.clone(),
            reply: Arc::clone(&attempt.reply),
            destination: Arc::clone(&attempt.destination),
            attempts: attempt.attempts,
            retry_after: None,
            category: None,
            elapsed: Duration::from_millis(self.elapsed_ms),
            tls: None,
        }
    }
}

impl Outcomes {
    /// Expects outcomes for about `recipients` recipients: the map is made once, not grown
    /// (a growing map holds its old and new tables at once).
    fn with_capacity(recipients: usize) -> Outcomes {
        Outcomes {
            seen: HashMap::with_capacity(recipients),
            ..Outcomes::default()
        }
    }

    /// The report line of a final outcome (a deferral is only remembered).
    fn take(&mut self, event: &Event) -> Option<String> {
        if event.message_id >= mxpipe::engine::reports::REPORT_IDS {
            return None;
        }
        if event.kind == EventKind::Deferred {
            let attempt = Attempt {
                message_id: event.message_id,
                reply: Arc::clone(&event.reply),
                destination: Arc::clone(&event.destination),
                attempts: event.attempts,
            };
            let attempt = match &self.last_attempt {
                Some(last) if **last == attempt => Arc::clone(last),
                _ => Arc::clone(self.last_attempt.insert(Arc::new(attempt))),
            };
            let deferral = Deferral {
                attempt,
                elapsed_ms: event.elapsed.as_millis() as u64,
            };
            self.seen.insert(event.recipient.clone(), Some(deferral));
            return None;
        }
        self.seen.insert(event.recipient.clone(), None);
        let kind = match event.kind {
            EventKind::Delivered => 0,
            EventKind::Bounced => 1,
            _ => 2,
        };
        self.finals[kind] += 1;
        Some(event_json(event))
    }

    /// A `not_final` line for each of `all` without a final outcome: its last deferral's
    /// reply, or none when it never had an attempt.
    fn not_final(&self, all: &[Address]) -> Vec<String> {
        all.iter()
            .filter_map(|r| match self.seen.get(r) {
                Some(None) => None,
                Some(Some(deferral)) => Some((r, Some(deferral))),
                None => Some((r, None)),
            })
            .map(|(recipient, deferral)| {
                let mut value = match deferral {
                    Some(deferral) => event_value(&deferral.event(recipient)),
                    None => serde_json::json!({
                        "message_id": null,
                        "recipient": recipient.as_str(),
                        "code": 0,
                        "enhanced": null,
                        "text": "no attempt finished before mxpipe stopped",
                        "attempts": 0,
                        "destination": "",
                        "elapsed_ms": 0,
                    }),
                };
                value["status"] = "not_final".into();
                value["retry_after_s"] = serde_json::Value::Null;
                value.to_string()
            })
            .collect()
    }
}

/// The recipients of `--to-file`: one address a line; `#` at the start of a line or after a
/// space starts a comment; blank lines are skipped. Duplicates (compared without case) and
/// lines that are not addresses or not UTF-8 are skipped with their line number.
pub(crate) struct RecipientList {
    pub(crate) recipients: Vec<Address>,
    invalid: u64,
    duplicates: u64,
}

impl RecipientList {
    pub(crate) fn read(path: &Path) -> Result<RecipientList, String> {
        let bytes =
            std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let mut list = RecipientList {
            recipients: Vec::new(),
            invalid: 0,
            duplicates: 0,
        };
        let mut first_line: HashMap<String, usize> = HashMap::new();
        for (index, raw) in bytes.split(|&b| b == b'\n').enumerate() {
            let n = index + 1;
            let Ok(line) = std::str::from_utf8(raw) else {
                list.invalid += 1;
                eprintln!("{}:{n}: line skipped: not valid UTF-8", path.display());
                continue;
            };
            let text = strip_comment(line).trim();
            if text.is_empty() {
                continue;
            }
            let field = mxpipe::error::Field::Recipient(list.recipients.len());
            match Address::parse(text, field) {
                Ok(a) => match first_line.get(&a.as_str().to_lowercase()) {
                    Some(first) => {
                        list.duplicates += 1;
                        eprintln!(
                            "{}:{n}: recipient {text:?} skipped: a duplicate of line {first}",
                            path.display()
                        );
                    }
                    None => {
                        first_line.insert(a.as_str().to_lowercase(), n);
                        list.recipients.push(a);
                    }
                },
                Err(Error::InvalidAddress { problem, .. }) => {
                    list.invalid += 1;
                    eprintln!(
                        "{}:{n}: recipient {text:?} skipped: address {problem}",
                        path.display()
                    );
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(list)
    }
}

/// The line without its comment: `#` at the start or after white space (a `#` inside an
/// address, which RFC 5321 allows in a local part, stays).
fn strip_comment(line: &str) -> &str {
    let mut previous_is_space = true;
    for (i, c) in line.char_indices() {
        if c == '#' && previous_is_space {
            return &line[..i];
        }
        previous_is_space = c.is_whitespace();
    }
    line
}

/// The message with `Date` and `Message-ID` added at the end of its header section when it has
/// none, and whether it had a header section at all (without one, both are put before the
/// content, followed by the empty line that ends a header section).
fn complete_header(content: &[u8], now: SystemTime, id_domain: &str) -> (Vec<u8>, bool) {
    let mut has_date = false;
    let mut has_id = false;
    let mut end = None;
    let mut offset = 0;
    let mut first = true;
    while offset < content.len() {
        let line_end = content[offset..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(content.len(), |p| offset + p + 1);
        let line = &content[offset..line_end];
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        if text.is_empty() {
            end = Some(offset);
            break;
        }
        let is_continuation = matches!(text[0], b' ' | b'\t');
        if !is_continuation {
            let name = text
                .iter()
                .position(|&b| b == b':')
                .and_then(|colon| std::str::from_utf8(&text[..colon]).ok())
                .filter(|name| is_valid_header_name(name));
            match name {
                Some(name) => {
                    has_date |= name.eq_ignore_ascii_case("date");
                    has_id |= name.eq_ignore_ascii_case("message-id");
                }
                None if first => break,
                // Not a header field: the header section ends without its empty line.
                None => {
                    end = Some(offset);
                    break;
                }
            }
        } else if first {
            break;
        }
        first = false;
        offset = line_end;
    }
    if first {
        let mut out = Vec::with_capacity(content.len() + 128);
        out.extend_from_slice(format!("Date: {}\r\n", format_date(now)).as_bytes());
        out.extend_from_slice(
            format!("Message-ID: {}\r\n\r\n", new_message_id(id_domain)).as_bytes(),
        );
        out.extend_from_slice(content);
        return (out, false);
    }
    let at = end.unwrap_or(content.len());
    let mut added = Vec::new();
    if at == content.len() && !content.ends_with(b"\n") {
        added.extend_from_slice(b"\r\n");
    }
    if !has_date {
        added.extend_from_slice(format!("Date: {}\r\n", format_date(now)).as_bytes());
    }
    if !has_id {
        added
            .extend_from_slice(format!("Message-ID: {}\r\n", new_message_id(id_domain)).as_bytes());
    }
    if !has_date || !has_id {
        if end.is_none() {
            added.extend_from_slice(b"\r\n");
        }
    } else {
        added.clear();
    }
    let mut out = Vec::with_capacity(content.len() + added.len());
    out.extend_from_slice(&content[..at]);
    out.extend_from_slice(&added);
    out.extend_from_slice(&content[at..]);
    (out, true)
}
