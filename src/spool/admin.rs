//! Queue tools, as Postfix users know them from `mailq`, `postqueue` and `postsuper`: list,
//! show, retry, delete, stats (`mxpipe queue ... --spool DIR`).
//!
//! When a dispatcher holds the spool, the command goes to it over its control socket
//! ([`super::control`]). Otherwise the directory is locked for the duration, so a tool never
//! reads a spool a dispatcher is writing. Changes (retry, delete) are then appended as records
//! in a new segment, fsynced, and take effect when a dispatcher next opens the spool; nothing is
//! rewritten in place.

use super::log::Record;
use super::store::{self, State};
use super::{lock_dir, unix_ms};
use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

/// One queue command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueCommand {
    /// One line per message with recipients pending.
    List,
    /// A message's envelope and every pending recipient with its attempts and retry time.
    Show(u64),
    /// Make deferred recipients due now: of one message, or (`None`) of every message.
    Retry(Option<u64>),
    /// Drop a message without further attempts.
    Delete(u64),
    /// Counts: messages, recipients pending and deferred, octets on disk, segments.
    Stats,
}

/// Runs `command` on the spool at `dir`, writing what it reports to `out`. Errors are texts
/// for a person (the directory is held, no such message, an I/O error with its path).
pub fn run(command: QueueCommand, dir: &Path, out: &mut dyn Write) -> Result<(), String> {
    if !dir.is_dir() {
        return Err(format!("spool {}: no such directory", dir.display()));
    }
    let _lock = lock_dir(dir).map_err(|e| format!("spool {}: {e}", dir.display()))?;
    let state = State::load(dir).map_err(|e| format!("spool {}: {e}", dir.display()))?;
    let io = |e: std::io::Error| e.to_string();
    match command {
        QueueCommand::Retry(id) => {
            if let Some(id) = id {
                exists(&state, id)?;
            }
            store::append_segment(
                dir,
                &state,
                &[Record::Retry {
                    id: id.unwrap_or(0),
                }],
            )
            .map_err(io)?;
            let n = id.map_or(state.messages.len(), |_| 1);
            writeln!(out, "{n} messages due now").map_err(io)?;
        }
        QueueCommand::Delete(id) => {
            exists(&state, id)?;
            store::append_segment(dir, &state, &[Record::Delete { id }]).map_err(io)?;
            writeln!(out, "message {id} deleted").map_err(io)?;
        }
        QueueCommand::List | QueueCommand::Show(_) | QueueCommand::Stats => {
            report(command, &state, out)?
        }
    }
    Ok(())
}

/// Fails, naming `id`, unless the spool holds message `id` with recipients pending.
pub(crate) fn exists(state: &State, id: u64) -> Result<(), String> {
    if state.messages.contains_key(&id) {
        Ok(())
    } else {
        Err(format!(
            "no message {id} with pending recipients in the spool"
        ))
    }
}

/// What `list`, `show` and `stats` print about `state` (other commands print nothing).
pub(crate) fn report(
    command: QueueCommand,
    state: &State,
    out: &mut dyn Write,
) -> Result<(), String> {
    let now_ms = unix_ms(SystemTime::now());
    let io = |e: std::io::Error| e.to_string();
    match command {
        QueueCommand::List => {
            writeln!(
                out,
                "{:>10}  {:>8}  {:>9}  {:>10}  sender",
                "id", "age", "pending", "next try"
            )
            .map_err(io)?;
            for (id, m) in &state.messages {
                let pending: Vec<_> = m.pending().collect();
                let next = pending
                    .iter()
                    .map(|(_, c)| c.map_or(0, |c| c.retry_at_ms))
                    .min()
                    .unwrap_or(0);
                writeln!(
                    out,
                    "{id:>10}  {:>8}  {:>9}  {:>10}  <{}>",
                    seconds(now_ms.saturating_sub(m.submitted_ms)),
                    format!("{}/{}", pending.len(), m.recipients.len()),
                    retry(next, now_ms),
                    m.sender
                )
                .map_err(io)?;
            }
        }
        QueueCommand::Show(id) => {
            exists(state, id)?;
            let m = &state.messages[&id];
            let size = state.bodies.get(&m.body_id).map_or(0, Vec::len);
            writeln!(out, "id: {id}").map_err(io)?;
            writeln!(out, "sender: <{}>", m.sender).map_err(io)?;
            writeln!(
                out,
                "age: {}",
                seconds(now_ms.saturating_sub(m.submitted_ms))
            )
            .map_err(io)?;
            writeln!(out, "body: {size} octets").map_err(io)?;
            for (recipient, c) in m.pending() {
                match c {
                    Some(c) => writeln!(
                        out,
                        "<{recipient}> deferred attempts={} next try {}",
                        c.attempts,
                        retry(c.retry_at_ms, now_ms)
                    ),
                    None => writeln!(out, "<{recipient}> queued attempts=0"),
                }
                .map_err(io)?;
            }
        }
        QueueCommand::Stats => {
            let (mut pending, mut deferred) = (0usize, 0usize);
            for m in state.messages.values() {
                for (_, c) in m.pending() {
                    pending += 1;
                    deferred += usize::from(c.is_some());
                }
            }
            writeln!(out, "messages {}", state.messages.len()).map_err(io)?;
            writeln!(out, "recipients_pending {pending}").map_err(io)?;
            writeln!(out, "recipients_deferred {deferred}").map_err(io)?;
            writeln!(out, "bodies {}", state.bodies.len()).map_err(io)?;
            writeln!(out, "bytes {}", state.bytes).map_err(io)?;
            writeln!(out, "segments {}", state.segments.len()).map_err(io)?;
            writeln!(out, "torn_records {}", state.issues.torn).map_err(io)?;
            writeln!(out, "corrupt_records {}", state.issues.corrupt).map_err(io)?;
        }
        QueueCommand::Retry(_) | QueueCommand::Delete(_) => {}
    }
    Ok(())
}

fn seconds(ms: u64) -> String {
    format!("{}s", ms / 1000)
}

fn retry(at_ms: u64, now_ms: u64) -> String {
    if at_ms <= now_ms {
        "now".into()
    } else {
        format!("in {}s", (at_ms - now_ms).div_ceil(1000))
    }
}

/// `mxpipe queue ...` on the command line.
#[derive(clap::Args, Debug, Clone)]
pub struct QueueArgs {
    #[command(subcommand)]
    pub action: QueueAction,
    /// The spool directory (no process may hold it).
    #[arg(long, value_name = "DIR", global = true)]
    pub spool: Option<std::path::PathBuf>,
}

/// The queue tools.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum QueueAction {
    /// One line per message with recipients pending: id, age, pending/total, next try, sender.
    List,
    /// A message's envelope and its pending recipients with attempts and next try.
    Show { id: u64 },
    /// Make deferred recipients due now: of message ID, or of all with --all.
    Retry {
        id: Option<u64>,
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// Drop a message: nothing more is sent for it.
    Delete { id: u64 },
    /// Counts: messages, recipients pending and deferred, bodies, octets, segments.
    Stats,
}

/// Runs a queue command, printing to stdout.
pub fn run_cli(args: QueueArgs) -> Result<(), String> {
    let dir = args
        .spool
        .ok_or("queue: --spool DIR is required (the spool directory)")?;
    let command = match args.action {
        QueueAction::List => QueueCommand::List,
        QueueAction::Show { id } => QueueCommand::Show(id),
        QueueAction::Retry { id: Some(id), .. } => QueueCommand::Retry(Some(id)),
        QueueAction::Retry {
            id: None,
            all: true,
        } => QueueCommand::Retry(None),
        QueueAction::Retry {
            id: None,
            all: false,
        } => return Err("queue retry: give a message ID or --all".into()),
        QueueAction::Delete { id } => QueueCommand::Delete(id),
        QueueAction::Stats => QueueCommand::Stats,
    };
    // A dispatcher holding the spool answers on its control socket; otherwise the tools work
    // on the files themselves (and lock them).
    if let Some(response) = super::control::ask(&dir, command)? {
        print!("{}", response.text);
        return if response.ok {
            Ok(())
        } else {
            Err(format!("queue: {}", response.text.trim_end()))
        };
    }
    run(command, &dir, &mut std::io::stdout().lock()).map_err(|e| format!("queue: {e}"))
}
