//! `mxpipe send --from ... --to-file ... MESSAGE.eml`: one ready message to many recipients,
//! with a per-recipient report.
//!
//! This module must not build the message; it sends the file as given.

use super::options::{serve_metrics, DeliveryArgs};
use super::{event_json, CliResult};
use mxpipe::engine::StatsSnapshot;
use mxpipe::message::{Address, Body, Message};
use mxpipe::Error;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

pub(crate) struct SendArgs {
    pub(crate) relay: Option<String>,
    pub(crate) from: String,
    pub(crate) to_file: PathBuf,
    pub(crate) message: PathBuf,
    pub(crate) connections: Option<usize>,
    pub(crate) ehlo_name: Option<String>,
    pub(crate) report: Option<PathBuf>,
    pub(crate) wait_final: bool,
    pub(crate) max_age: Option<Duration>,
    pub(crate) retry_after: Option<Duration>,
    pub(crate) delivery: DeliveryArgs,
}

pub(crate) fn run_send(args: SendArgs) -> CliResult {
    let content = std::fs::read(&args.message)
        .map_err(|e| format!("{}: cannot read: {e}", args.message.display()))?;
    let body = Body::new(&content).map_err(|e| format!("{}: {e}", args.message.display()))?;
    let sender = if args.from.is_empty() {
        Address::null()
    } else {
        Address::parse(&args.from, mxpipe::error::Field::Sender)
            .map_err(|e| format!("--from: {e}"))?
    };
    let list = std::fs::File::open(&args.to_file)
        .map_err(|e| format!("{}: cannot read: {e}", args.to_file.display()))?;
    let mut recipients = Vec::new();
    let mut invalid = 0u64;
    let mut seen = std::collections::HashSet::new();
    for (n, line) in BufReader::new(list).lines().enumerate() {
        let line = line.map_err(|e| format!("{}: line {}: {e}", args.to_file.display(), n + 1))?;
        let text = line.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        match Address::parse(text, mxpipe::error::Field::Recipient(recipients.len())) {
            Ok(a) => {
                if seen.insert(a.as_str().to_ascii_lowercase()) {
                    recipients.push(a);
                }
            }
            Err(Error::InvalidAddress { problem, .. }) => {
                invalid += 1;
                eprintln!(
                    "{}:{}: recipient {text:?} skipped: address {problem}",
                    args.to_file.display(),
                    n + 1
                );
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    if recipients.is_empty() {
        return Err(format!("{}: no valid recipients", args.to_file.display()));
    }
    let mut builder = args.delivery.base_builder()?;
    if let Some(relay) = &args.relay {
        builder = builder.relay(relay);
    }
    // What the command line gives replaces the --config file's settings; the rest stays.
    let mut builder = args.delivery.apply(builder)?;
    if let Some(name) = &args.ehlo_name {
        builder = builder.ehlo_name(name);
    }
    if let Some(n) = args.connections {
        builder = builder.max_connections_per_destination(n);
    }
    let retry = &mut builder.config_mut().retry;
    if let Some(after) = args.retry_after {
        retry.initial = after;
    }
    if let Some(age) = args.max_age {
        retry.max_age = age;
    }
    let max_age = retry.max_age;
    // This command reads every outcome: a --config file cannot turn them off.
    let dispatcher = builder
        .record_events(true)
        .start()
        .map_err(|e| e.to_string())?;
    let dispatcher = Arc::new(dispatcher);
    if let Some(addr) = args.delivery.metrics {
        serve_metrics(addr, &dispatcher)?;
    }
    let events = dispatcher.events().expect("events are on");
    let total = recipients.len();
    let message =
        Message::from_parts(sender, recipients, Arc::new(body)).map_err(|e| e.to_string())?;
    dispatcher
        .submit_timeout(message, Duration::from_secs(60))
        .map_err(|e| e.to_string())?;
    let mut report = match &args.report {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?,
        )),
        None => None,
    };
    if args.wait_final {
        dispatcher.wait_final(max_age + Duration::from_secs(60));
    } else {
        dispatcher.flush();
    }
    dispatcher.shutdown();
    for event in events.try_iter() {
        if let Some(w) = report.as_mut() {
            writeln!(w, "{}", event_json(&event)).map_err(|e| format!("report: {e}"))?;
        }
    }
    if let Some(mut w) = report {
        w.flush().map_err(|e| format!("report: {e}"))?;
    }
    let s = dispatcher.stats();
    print_summary(total as u64, invalid, &s);
    let pending = s.in_flight;
    Ok(if s.bounced + s.expired + invalid + pending == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub(crate) fn print_summary(recipients: u64, invalid: u64, s: &StatsSnapshot) {
    println!(
        "recipients={recipients} delivered={} bounced={} expired={} deferred_now={} invalid={invalid} connections={}",
        s.delivered, s.bounced, s.expired, s.in_flight, s.connections_opened
    );
}
