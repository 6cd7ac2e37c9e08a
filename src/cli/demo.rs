//! `mxpipe demo`: a real bulk send of a generated newsletter to the built-in sink, with no
//! setup.
//!
//! This module only drives the engine and the sink.

use super::{event_json, CliResult};
use mxpipe::engine::{Dispatcher, EventKind};
use mxpipe::message::{Address, Body, Message};
use mxpipe::sink::{Sink, SinkConfig};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) fn run_demo(recipients: usize) -> CliResult {
    let capture = std::env::temp_dir().join(format!("mxpipe-demo-{}", std::process::id()));
    let sink = Sink::start(SinkConfig {
        capture_dir: Some(capture.clone()),
        ..SinkConfig::default()
    })
    .map_err(|e| format!("sink: {e}"))?;
    println!(
        "built-in sink listening on {} (capturing to {})",
        sink.local_addr(),
        capture.display()
    );
    let dispatcher = Dispatcher::builder()
        .relay(&sink.local_addr().to_string())
        .ehlo_name("demo.mxpipe.example")
        .max_connections_per_destination(8)
        .start()
        .map_err(|e| e.to_string())?;
    let events = dispatcher.events().expect("events are on");
    let start = Instant::now();
    let body = Arc::new(
        Body::new(
            b"From: Newsletter <news@demo.mxpipe.example>\r\nSubject: mxpipe demo newsletter\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello from mxpipe.\r\n.This line starts with a dot and arrives intact.\r\n",
        )
        .map_err(|e| e.to_string())?,
    );
    let sender =
        Address::parse("news@demo.mxpipe.example", mxpipe::error::Field::Sender).expect("valid");
    let all: Vec<Address> = (0..recipients)
        .map(|i| {
            Address::parse(
                &format!("reader{i}@demo.mxpipe.example"),
                mxpipe::error::Field::Recipient(i),
            )
            .expect("valid")
        })
        .collect();
    // One body, many envelopes of 50 recipients each.
    for chunk in all.chunks(50) {
        let m = Message::from_parts(sender.clone(), chunk.to_vec(), Arc::clone(&body))
            .map_err(|e| e.to_string())?;
        dispatcher
            .submit_timeout(m, Duration::from_secs(30))
            .map_err(|e| e.to_string())?;
    }
    let done = dispatcher.wait_final(Duration::from_secs(120));
    let elapsed = start.elapsed();
    let mut by_kind = std::collections::BTreeMap::new();
    let mut sample = None;
    for event in events.try_iter() {
        *by_kind.entry(event.kind.as_str()).or_insert(0u64) += 1;
        if sample.is_none() && event.kind == EventKind::Delivered {
            sample = Some(event_json(&event));
        }
    }
    let s = dispatcher.stats();
    drop(dispatcher);
    let sink_stats = sink.stop();
    println!("outcomes: {by_kind:?}");
    if let Some(sample) = sample {
        println!("first outcome: {sample}");
    }
    println!(
        "sent {} recipients in {} transactions over {} connections in {:.2}s; sink received {} messages for {} recipients",
        s.delivered,
        s.transactions,
        s.connections_opened,
        elapsed.as_secs_f64(),
        sink_stats.messages,
        sink_stats.recipients
    );
    let _ = std::fs::remove_dir_all(&capture);
    Ok(if done && s.delivered == recipients as u64 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
