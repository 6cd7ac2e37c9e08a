//! The spool with the engine and mxpipe's own sink: custody across restarts, recovery of
//! damaged segments, queue tools, and (with `--features failpoints`) write and fsync faults.

use super::admin::{self, QueueCommand};
use super::log;
use crate::engine::{Dispatcher, Event, EventKind};
use crate::message::Message;
use crate::queue::RetryPolicy;
use crate::sink::{Faults, Sink, SinkConfig, SinkHandle};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "mxpipe-spool-{name}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn sink(faults: Faults) -> SinkHandle {
    Sink::start(SinkConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        faults,
        ..SinkConfig::default()
    })
    .unwrap()
}

/// Retries after 50 ms, for a day.
fn quick_retry() -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(50),
        max_interval: Duration::from_millis(50),
        multiplier: 1.0,
        jitter: 0.0,
        max_age: Duration::from_secs(86_400),
    }
}

fn dispatcher(spool: &Path, sink: &SinkHandle, retry: RetryPolicy) -> Dispatcher {
    Dispatcher::builder()
        .relay(&sink.local_addr().to_string())
        .ehlo_name("sender.example.org")
        .retry(retry)
        .spool(spool)
        .start()
        .unwrap()
}

fn events(d: &Dispatcher) -> Vec<Event> {
    d.events().unwrap().try_iter().collect()
}

fn queue(dir: &Path, command: QueueCommand) -> String {
    let mut out = Vec::new();
    admin::run(command, dir, &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

#[test]
fn deferred_recipients_survive_a_clean_exit_and_are_retried_by_the_next_process() {
    let dir = tempdir("deferred");
    let busy = sink(Faults {
        tempfail_rcpt: vec!["busy".into()],
        ..Faults::default()
    });
    let body = b"Subject: kept\r\n\r\nkept across restarts\r\n";
    let first_id;
    {
        // Retries an hour away: the first process ends with the busy recipient deferred.
        let d = dispatcher(&dir, &busy, RetryPolicy::default());
        first_id = d
            .submit(
                Message::new(
                    "news@example.org",
                    ["ok@example.net", "busy@example.net"],
                    body,
                )
                .unwrap(),
            )
            .unwrap();
        d.sync().unwrap();
        assert_eq!(d.durable_id(), first_id);
        d.flush();
        let seen: Vec<(String, EventKind, u32)> = events(&d)
            .into_iter()
            .map(|e| (e.recipient.to_string(), e.kind, e.attempts))
            .collect();
        assert_eq!(
            seen,
            [
                ("ok@example.net".to_string(), EventKind::Delivered, 1),
                ("busy@example.net".to_string(), EventKind::Deferred, 1)
            ]
        );
    }
    let listed = queue(&dir, QueueCommand::List);
    assert!(listed.contains(&format!("{first_id:>10}")), "{listed}");
    assert!(listed.contains("1/2"), "{listed}");
    let shown = queue(&dir, QueueCommand::Show(first_id));
    assert!(
        shown.contains("<busy@example.net> deferred attempts=1 next try in"),
        "{shown}"
    );
    assert!(!shown.contains("ok@example.net"), "{shown}");
    // `queue retry` makes it due now; the next process delivers it to a server that takes it.
    assert_eq!(
        queue(&dir, QueueCommand::Retry(None)),
        "1 messages due now\n"
    );
    let open = sink(Faults::default());
    let d = dispatcher(&dir, &open, quick_retry());
    assert_eq!(d.spool_report().unwrap().recipients, 1);
    assert!(d.wait_final(Duration::from_secs(20)));
    let seen: Vec<(u64, String, EventKind, u32)> = events(&d)
        .into_iter()
        .map(|e| (e.message_id, e.recipient.to_string(), e.kind, e.attempts))
        .collect();
    assert_eq!(
        seen,
        [(
            first_id,
            "busy@example.net".to_string(),
            EventKind::Delivered,
            2
        )]
    );
    // New identifiers continue after the recovered ones.
    let next = d
        .submit(Message::new("news@example.org", ["x@example.net"], body).unwrap())
        .unwrap();
    assert!(next > first_id);
    assert!(d.wait_final(Duration::from_secs(20)));
    drop(d);
    assert_eq!(open.stats().recipients, 2);
    // Everything final: the next open removes it all.
    let stats = queue(&dir, QueueCommand::Stats);
    assert!(stats.contains("recipients_pending 0"), "{stats}");
    let d = dispatcher(&dir, &open, quick_retry());
    assert_eq!(d.spool_report().unwrap().messages, 0);
    drop(d);
    let _ = fs::remove_dir_all(&dir);
}

/// The octets in the segment files of `dir`.
fn segment_bytes(dir: &Path) -> u64 {
    log::segments(dir)
        .unwrap()
        .iter()
        .map(|(_, p)| fs::metadata(p).map_or(0, |m| m.len()))
        .sum()
}

#[test]
fn a_running_spool_gives_back_the_segments_of_finished_mail() {
    let dir = tempdir("reclaim");
    let busy = sink(Faults {
        tempfail_rcpt: vec!["busy".into()],
        ..Faults::default()
    });
    let mut builder = Dispatcher::builder()
        .relay(&busy.local_addr().to_string())
        .ehlo_name("sender.example.org")
        .retry(RetryPolicy::default())
        .spool(&dir);
    builder.config_mut().spool.as_mut().unwrap().segment_bytes = 16 << 10;
    let d = builder.start().unwrap();
    // The first message stays deferred (its retry an hour away) in the first segment, through
    // every compaction.
    let kept = d
        .submit(
            Message::new(
                "news@example.org",
                ["ok@example.net", "busy@example.net"],
                b"Subject: kept\r\n\r\nkept\r\n",
            )
            .unwrap(),
        )
        .unwrap();
    d.sync().unwrap();
    let mut written = 0u64;
    for i in 0..2_000u32 {
        let body = format!("Subject: n{i}\r\n\r\n{}\r\n", "x".repeat(300));
        written += body.len() as u64;
        let to = format!("r{i}@example.net");
        d.submit(Message::new("news@example.org", [to.as_str()], body.as_bytes()).unwrap())
            .unwrap();
        if i % 20 == 19 {
            d.sync().unwrap();
            d.flush();
        }
    }
    d.sync().unwrap();
    d.flush();
    let stats = d.spool_stats().unwrap();
    assert!(stats.compactions.load(std::sync::atomic::Ordering::Relaxed) >= 10);
    assert_eq!(
        stats
            .compaction_errors
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    // What is left once the compactions under way are done: the compacted live message, the
    // current segment and the one sealed last; not the 600 KB of delivered mail.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut left = segment_bytes(&dir);
    while left >= 100_000 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        left = segment_bytes(&dir);
    }
    assert!(
        written > 600_000 && left < 100_000,
        "{left} octets left of {written}"
    );
    drop(d);
    // The next process sends only the deferred recipient, with its attempt counted.
    assert_eq!(busy.stats().recipients, 2_001);
    let shown = queue(&dir, QueueCommand::Show(kept));
    assert!(
        shown.contains("<busy@example.net> deferred attempts=1"),
        "{shown}"
    );
    assert_eq!(
        queue(&dir, QueueCommand::Retry(None)),
        "1 messages due now\n"
    );
    let open = sink(Faults::default());
    let d = dispatcher(&dir, &open, quick_retry());
    let report = d.spool_report().unwrap().clone();
    assert_eq!(
        (
            report.messages,
            report.recipients,
            report.corrupt,
            report.torn
        ),
        (1, 1, 0, 0)
    );
    assert!(d.wait_final(Duration::from_secs(20)));
    drop(d);
    assert_eq!(open.stats().recipients, 1);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_spool_is_held_by_one_process_at_a_time() {
    let dir = tempdir("lock");
    let s = sink(Faults::default());
    let d = dispatcher(&dir, &s, quick_retry());
    let e = Dispatcher::builder()
        .relay(&s.local_addr().to_string())
        .spool(&dir)
        .start()
        .unwrap_err();
    assert_eq!(e.to_string(), "spool: directory is held by another process");
    let mut out = Vec::new();
    let e = admin::run(QueueCommand::List, &dir, &mut out).unwrap_err();
    assert!(
        e.ends_with("spool: directory is held by another process"),
        "{e}"
    );
    drop(d);
    queue(&dir, QueueCommand::List);
    let _ = fs::remove_dir_all(&dir);
}

/// Leaves a spool holding one message with two recipients deferred an hour; returns its id.
fn spool_with_deferred(dir: &Path) -> u64 {
    let busy = sink(Faults {
        tempfail_rcpt: vec!["busy".into()],
        ..Faults::default()
    });
    let d = dispatcher(dir, &busy, RetryPolicy::default());
    let id = d
        .submit(
            Message::new(
                "news@example.org",
                ["busy1@example.net", "busy2@example.net"],
                b"Subject: x\r\n\r\nx\r\n",
            )
            .unwrap(),
        )
        .unwrap();
    d.flush();
    id
}

fn last_segment(dir: &Path) -> PathBuf {
    log::segments(dir).unwrap().pop().unwrap().1
}

#[test]
fn a_torn_last_record_is_tolerated() {
    let dir = tempdir("torn");
    let id = spool_with_deferred(&dir);
    // A crash in the middle of a write: half a record at the end.
    let mut buf = Vec::new();
    log::encode(&log::Record::Delete { id }, &mut buf);
    let segment = last_segment(&dir);
    let mut bytes = fs::read(&segment).unwrap();
    bytes.extend_from_slice(&buf[..buf.len() - 4]);
    fs::write(&segment, bytes).unwrap();
    let s = sink(Faults::default());
    let d = dispatcher(&dir, &s, quick_retry());
    let report = d.spool_report().unwrap().clone();
    assert_eq!((report.torn, report.corrupt, report.recipients), (1, 0, 2));
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_corrupt_record_is_set_aside_and_reported_once() {
    let dir = tempdir("corrupt");
    let id = spool_with_deferred(&dir);
    // One octet of the deferral checkpoint flipped (the last record, after the id floor, body
    // and message records): it names both recipients by position (one record per run).
    assert!(
        matches!(
            all_records(&dir).last(),
            Some(log::Record::OutcomePositions { id: of, mark: log::Mark::Deferred, positions, .. })
                if *of == id && positions == &[0, 1]
        ),
        "{:?}",
        all_records(&dir)
    );
    let segment = last_segment(&dir);
    let mut bytes = fs::read(&segment).unwrap();
    *bytes.last_mut().unwrap() ^= 0x20;
    fs::write(&segment, &bytes).unwrap();
    let s = sink(Faults::default());
    {
        let d = dispatcher(&dir, &s, RetryPolicy::default());
        let report = d.spool_report().unwrap().clone();
        assert_eq!((report.torn, report.corrupt), (0, 1));
        // The recipients whose checkpoint was lost are sent at once (a resend, never a loss).
        assert_eq!((report.recipients, report.held), (2, 0));
        // What was set aside is that record as it was found: positions 0 and 1, flipped.
        let aside = fs::read(&report.set_aside[0]).unwrap();
        assert!(aside.ends_with(&[0, 0, 0, 0, 1, 0, 0, 0x20]), "{aside:?}");
        d.flush();
        let delivered: Vec<String> = events(&d)
            .into_iter()
            .map(|e| format!("{} {} {}", e.message_id, e.recipient, e.kind.as_str()))
            .collect();
        assert_eq!(
            delivered,
            [
                format!("{id} busy1@example.net delivered"),
                format!("{id} busy2@example.net delivered")
            ]
        );
    }
    // Set aside once: the next start finds nothing wrong (and nothing left).
    let d = dispatcher(&dir, &s, RetryPolicy::default());
    let report = d.spool_report().unwrap().clone();
    assert_eq!((report.torn, report.corrupt, report.recipients), (0, 0, 0));
    drop(d);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn at_the_size_limit_or_the_free_space_floor_submissions_are_refused() {
    let dir = tempdir("full");
    let s = sink(Faults::default());
    let start = |max_bytes: u64, min_free_bytes: u64| {
        let mut b = Dispatcher::builder()
            .relay(&s.local_addr().to_string())
            .spool(&dir);
        let spool = b.config_mut().spool.as_mut().unwrap();
        spool.max_bytes = max_bytes;
        spool.min_free_bytes = min_free_bytes;
        b.start().unwrap()
    };
    let m = || Message::new("a@example.org", ["b@example.net"], &b"x\r\n".repeat(500)).unwrap();
    let d = start(1000, 0);
    d.submit(m()).unwrap();
    d.sync().unwrap();
    let e = d.submit(m()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "spool: full: its size limit (max_bytes) is reached"
    );
    assert_eq!(e.message.recipients()[0].as_str(), "b@example.net");
    assert!(d.wait_final(Duration::from_secs(20)));
    drop(d);
    let d = start(u64::MAX, u64::MAX);
    let e = d.submit(m()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "spool: the file system has less free space than min_free_bytes"
    );
    drop(d);
    assert_eq!(s.stats().recipients, 1);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_message_that_cannot_be_sent_any_more_does_not_stop_the_start() {
    let dir = tempdir("unusable");
    // Written by hand: a body this version refuses (a 2000-octet line), and a good message.
    let mut buf = Vec::new();
    log::encode_body(1, &[b'x'; 2000], &mut buf);
    log::encode_body(2, b"Subject: ok\r\n\r\nok\r\n", &mut buf);
    for (id, body_id) in [(1u64, 1u64), (2, 2)] {
        log::encode_message(
            id,
            body_id,
            1_700_000_000_000,
            "news@example.org",
            [format!("r{id}@example.net")].iter().map(String::as_str),
            &mut buf,
        );
    }
    fs::write(log::segment_path(&dir, 1), &buf).unwrap();
    let s = sink(Faults::default());
    let d = dispatcher(&dir, &s, quick_retry());
    let report = d.spool_report().unwrap().clone();
    assert_eq!(
        (report.messages, report.unusable, report.recipients),
        (2, 1, 1)
    );
    assert!(d.wait_final(Duration::from_secs(20)));
    let seen: Vec<String> = events(&d)
        .into_iter()
        .map(|e| format!("{} {} {}", e.message_id, e.recipient, e.kind.as_str()))
        .collect();
    assert_eq!(seen, ["2 r2@example.net delivered"]);
    drop(d);
    // Kept for a person to look at: `queue show` and `queue delete` reach it.
    assert!(queue(&dir, QueueCommand::Show(1)).contains("<r1@example.net> queued"));
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn queue_delete_drops_a_message() {
    let dir = tempdir("delete");
    let id = spool_with_deferred(&dir);
    assert_eq!(
        queue(&dir, QueueCommand::Delete(id)),
        format!("message {id} deleted\n")
    );
    let mut out = Vec::new();
    assert_eq!(
        admin::run(QueueCommand::Show(id), &dir, &mut out).unwrap_err(),
        format!("no message {id} with pending recipients in the spool")
    );
    let s = sink(Faults::default());
    let d = dispatcher(&dir, &s, quick_retry());
    assert_eq!(d.spool_report().unwrap().recipients, 0);
    drop(d);
    assert_eq!(s.stats().recipients, 0);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn one_body_for_many_messages_is_stored_once() {
    let dir = tempdir("shared");
    let s = sink(Faults::default());
    let d = dispatcher(&dir, &s, quick_retry());
    let body = std::sync::Arc::new(crate::message::Body::new(&vec![b'x'; 900]).unwrap());
    for i in 0..200 {
        let to = format!("r{i}@example.net");
        d.submit(Message::with_body("news@example.org", [to.as_str()], body.clone()).unwrap())
            .unwrap();
    }
    d.sync().unwrap();
    let size = fs::metadata(last_segment(&dir)).unwrap().len();
    // 200 envelopes of about 60 octets and one 900-octet body, not 200 bodies.
    assert!(size < 200 * 100 + 2 * 900, "{size} octets");
    drop(d);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_burst_of_large_bodies_is_written_whole_and_delivered_once() {
    // 12 MB of unique bodies, written from where they lie (vectored) in one or more batches.
    let dir = tempdir("large");
    let s = sink(Faults::default());
    let d = dispatcher(&dir, &s, quick_retry());
    let bodies: Vec<Vec<u8>> = (0..12)
        .map(|n| {
            let mut b = format!("Subject: {n}\r\n\r\n").into_bytes();
            while b.len() < 1 << 20 {
                b.extend_from_slice(format!("{n:>98}\r\n").as_bytes());
            }
            b
        })
        .collect();
    let mut ids = Vec::new();
    for (n, body) in bodies.iter().enumerate() {
        let to = format!("r{n}@example.net");
        ids.push(
            d.submit(Message::new("news@example.org", [to.as_str()], body).unwrap())
                .unwrap(),
        );
    }
    d.sync().unwrap();
    assert_eq!(d.durable_id(), *ids.last().unwrap());
    assert!(d.wait_final(Duration::from_secs(60)));
    let mut delivered: Vec<String> = events(&d)
        .into_iter()
        .filter(|e| e.kind == EventKind::Delivered)
        .map(|e| e.recipient.to_string())
        .collect();
    delivered.sort();
    let mut expected: Vec<String> = (0..12).map(|n| format!("r{n}@example.net")).collect();
    expected.sort();
    assert_eq!(delivered, expected);
    drop(d);
    // Every body is on disk byte for byte, each in one record.
    let mut issues = log::ReadIssues::default();
    let mut stored = Vec::new();
    log::read_segment(&dir, &last_segment(&dir), &mut issues, |r| {
        if let log::Record::Body { bytes, .. } = r {
            stored.push(bytes);
        }
    })
    .unwrap();
    assert_eq!(issues, log::ReadIssues::default());
    assert_eq!(stored, bodies);
    let _ = fs::remove_dir_all(&dir);
}

#[cfg(feature = "failpoints")]
mod faults {
    use super::*;
    use crate::error::{Error, SpoolProblem};

    /// The failpoints are process-wide: these tests take turns, and each names its own spool
    /// directory in the action (`return(DIR)`), so that the other tests' spools never fail.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn a_failed_fsync_stops_acknowledgements_and_is_never_retried() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempdir("fsync");
        let s = sink(Faults::default());
        let d = dispatcher(&dir, &s, quick_retry());
        let m = || Message::new("a@example.org", ["b@example.net"], b"x\r\n").unwrap();
        let first = d.submit(m()).unwrap();
        d.sync().unwrap();
        fail::cfg(
            "spool-fsync",
            &format!("return({})", dir.canonicalize().unwrap().display()),
        )
        .unwrap();
        d.submit(m()).unwrap();
        let e = d.sync().unwrap_err();
        fail::remove("spool-fsync");
        assert_eq!(e, Error::Spool(SpoolProblem::SyncFailed(libc::EIO)));
        assert_eq!(
            e.to_string(),
            "spool: fsync failed (Input/output error (os error 5)); the spool acknowledges nothing more until restarted"
        );
        assert_eq!(d.durable_id(), first);
        // The fsync works again, but the spool does not trust it.
        let refused = d.submit(m()).unwrap_err();
        assert_eq!(refused.error, e);
        assert!(d.wait_final(Duration::from_secs(20)));
        drop(d);
        // Only the acknowledged message was sent.
        assert_eq!(s.stats().recipients, 1);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn enospc_on_write_leaves_nothing_partial() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempdir("enospc");
        let s = sink(Faults::default());
        let d = dispatcher(&dir, &s, RetryPolicy::default());
        let m = |to: &str| Message::new("a@example.org", [to], b"x\r\n").unwrap();
        let before = fs::read(last_segment(&dir)).unwrap();
        fail::cfg(
            "spool-write",
            &format!("return({})", dir.canonicalize().unwrap().display()),
        )
        .unwrap();
        d.submit(m("lost@example.net")).unwrap();
        let e = d.sync().unwrap_err();
        fail::remove("spool-write");
        assert_eq!(
            e.to_string(),
            "spool: write failed (No space left on device (os error 28)); the spool takes nothing more until restarted"
        );
        assert_eq!(fs::read(last_segment(&dir)).unwrap(), before);
        drop(d);
        let d = dispatcher(&dir, &s, RetryPolicy::default());
        let report = d.spool_report().unwrap().clone();
        assert_eq!((report.torn, report.corrupt, report.messages), (0, 0, 0));
        drop(d);
        assert_eq!(s.stats().recipients, 0);
        let _ = fs::remove_dir_all(&dir);
    }
}

/// Recovery at scale, run by hand in release builds (two processes, so that writing the spool
/// does not count in the peak memory of reading it):
/// `MXPIPE_SPOOL_SCALE_DIR=/tmp/s cargo test --release --lib recovery_scale_write -- --ignored`,
/// then the same with `recovery_scale_read`. 10,000 messages of 100 recipients (1,000,000
/// pending, half of them with a deferral checkpoint) and one body.
#[test]
#[ignore]
fn recovery_scale_write() {
    use std::io::Write;
    let dir = PathBuf::from(std::env::var("MXPIPE_SPOOL_SCALE_DIR").expect("set the directory"));
    fs::create_dir_all(&dir).unwrap();
    let mut file = fs::File::create(log::segment_path(&dir, 1)).unwrap();
    let mut buf = Vec::new();
    log::encode_body(1, &b"0123456789abcdefghi\r\n".repeat(100), &mut buf);
    let later = super::unix_ms(std::time::SystemTime::now()) + 3_600_000;
    for id in 1..=10_000u64 {
        let recipients: Vec<String> = (0..100)
            .map(|i| format!("user{i}.{id}@example.net"))
            .collect();
        log::encode_message(
            id,
            1,
            later - 3_600_000,
            "news@example.org",
            recipients.iter().map(String::as_str),
            &mut buf,
        );
        for r in recipients.iter().step_by(2) {
            log::encode(
                &log::Record::Outcome {
                    id,
                    mark: log::Mark::Deferred,
                    attempts: 1,
                    retry_at_ms: later,
                    recipient: r.clone(),
                },
                &mut buf,
            );
        }
        file.write_all(&buf).unwrap();
        buf.clear();
    }
    file.sync_all().unwrap();
}

#[test]
#[ignore]
fn recovery_scale_read() {
    let dir = PathBuf::from(std::env::var("MXPIPE_SPOOL_SCALE_DIR").expect("set the directory"));
    let started = std::time::Instant::now();
    let mut spool = super::Spool::open(super::SpoolConfig::new(&dir)).unwrap();
    let state = spool.recovered.take().unwrap();
    let mut unusable = 0;
    let recovered = super::recovered_submissions(state, &mut unusable);
    assert_eq!(unusable, 0);
    let elapsed = started.elapsed();
    let recipients: usize = recovered
        .iter()
        .map(|(_, s)| s.message.recipients.len())
        .sum();
    // SAFETY: getrusage fills the zeroed struct it is given.
    let peak_kb = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u.ru_maxrss
    };
    println!(
        "recovery recipients={recipients} submissions={} seconds={:.2} peak_rss_kb={peak_kb}",
        recovered.len(),
        elapsed.as_secs_f64()
    );
    assert_eq!(recipients, 1_000_000);
}

#[test]
fn a_dsn_request_survives_recovery_and_compaction() {
    use crate::message::dsn::{DsnEnvelope, Notify, Orcpt, RecipientDsn, Ret};
    let dir = tempdir("dsn");
    let busy = sink(Faults {
        tempfail_rcpt: vec!["busy".into()],
        ..Faults::default()
    });
    let dsn = DsnEnvelope::default()
        .with_ret(Ret::Headers)
        .with_envid("campaign 7+x")
        .unwrap()
        .with_recipient(
            "busy@example.net",
            RecipientDsn {
                notify: Some(Notify {
                    success: true,
                    failure: true,
                    delay: false,
                }),
                orcpt: Some(Orcpt {
                    addr_type: "rfc822".into(),
                    address: b"Busy=1@example.net".to_vec(),
                }),
            },
        );
    let message = Message::new("news@example.org", ["busy@example.net"], b"x\r\n")
        .unwrap()
        .with_dsn(dsn.clone());
    // Two processes: the second recovers the message (rewriting it into a fresh segment).
    for round in 0..2 {
        let d = dispatcher(&dir, &busy, RetryPolicy::default());
        if round == 0 {
            d.submit(message.clone()).unwrap();
            d.sync().unwrap();
        }
        d.flush();
        d.shutdown();
    }
    let state = super::store::State::load(&dir).unwrap();
    let stored = state.messages.values().next().expect("message kept");
    let (mail, rcpts) = stored.dsn.as_ref().expect("DSN request kept");
    assert_eq!(mail, " RET=HDRS ENVID=campaign+207+2Bx");
    assert_eq!(DsnEnvelope::from_stored(mail, rcpts).unwrap(), dsn);
}

#[test]
fn a_spool_too_deep_for_a_control_socket_still_takes_custody() {
    // A Unix socket path holds at most 107 octets: this spool's control socket cannot exist.
    let dir = tempdir("deep").join("d".repeat(100));
    let s = sink(Faults::default());
    let d = dispatcher(&dir, &s, quick_retry());
    let why = d.spool_report().unwrap().control_unavailable.clone();
    assert!(why.is_some(), "the socket was bound at {}", dir.display());
    let id = d
        .submit(
            Message::new(
                "a@example.org",
                ["b@example.net"],
                b"Subject: x\r\n\r\ny\r\n",
            )
            .unwrap(),
        )
        .unwrap();
    d.sync().unwrap();
    assert!(d.durable_id() >= id);
    assert!(d.wait_final(Duration::from_secs(30)));
    drop(d);
    let _ = fs::remove_dir_all(dir.parent().unwrap());
}

/// Every record of every segment of `dir`, in order.
fn all_records(dir: &Path) -> Vec<log::Record> {
    let mut issues = log::ReadIssues::default();
    let mut out = Vec::new();
    for (_, path) in log::segments(dir).unwrap() {
        log::read_segment(dir, &path, &mut issues, |r| out.push(r)).unwrap();
    }
    out
}

/// A body (1) and message 1 of it, submitted at `submitted_ms` to each of `to` at example.net.
fn body_and_message(submitted_ms: u64, to: &[&str]) -> [log::Record; 2] {
    [
        log::Record::Body {
            body_id: 1,
            bytes: b"Subject: x\r\n\r\ny\r\n".to_vec(),
        },
        log::Record::Message {
            id: 1,
            body_id: 1,
            submitted_ms,
            sender: "news@example.org".into(),
            recipients: to.iter().map(|r| format!("{r}@example.net")).collect(),
        },
    ]
}

#[test]
fn recovery_after_compact_checkpoints_yields_exactly_the_non_final_recipients() {
    use log::{Mark, Record};
    let dir = tempdir("compact-checkpoints");
    let later = super::unix_ms(std::time::SystemTime::now()) + 3_600_000;
    let (t1, t2, t3) = (later, later + 1_000, later + 2_000);
    let outcomes =
        |id: u64, mark: Mark, attempts: u32, retry_at_ms: u64, to: &[&str]| Record::Outcomes {
            id,
            mark,
            attempts,
            retry_at_ms,
            recipients: to.iter().map(|r| r.to_string()).collect(),
        };
    let outcome =
        |id: u64, mark: Mark, attempts: u32, retry_at_ms: u64, to: &str| Record::Outcome {
            id,
            mark,
            attempts,
            retry_at_ms,
            recipient: to.to_string(),
        };
    let [body, first] = body_and_message(later - 3_600_000, &["a", "b", "c", "d", "e"]);
    let records = [
        body,
        first,
        Record::Message {
            id: 2,
            body_id: 1,
            submitted_ms: later - 3_600_000,
            sender: "news@example.org".into(),
            recipients: ["f", "g", "h"].map(|r| format!("{r}@example.net")).to_vec(),
        },
        // An older process's records, one per recipient.
        outcome(1, Mark::Delivered, 1, 0, "a@example.net"),
        outcome(1, Mark::Deferred, 1, t1, "b@example.net"),
        outcome(2, Mark::Deferred, 1, t3, "h@example.net"),
        // This version's, one per run of recipients.
        outcomes(
            1,
            Mark::Deferred,
            2,
            t2,
            &["b@example.net", "c@example.net"],
        ),
        outcomes(1, Mark::Bounced, 1, 0, &["d@example.net"]),
        outcomes(
            2,
            Mark::Delivered,
            1,
            0,
            &["f@example.net", "g@example.net"],
        ),
        // A deferral never undoes a final outcome.
        outcomes(
            1,
            Mark::Deferred,
            3,
            t3,
            &["a@example.net", "d@example.net"],
        ),
        // Torn by a crash: never acknowledged, so c and e stay pending.
        outcomes(
            1,
            Mark::Delivered,
            2,
            0,
            &["c@example.net", "e@example.net"],
        ),
    ];
    let mut buf = Vec::new();
    for r in &records {
        log::encode(r, &mut buf);
    }
    fs::write(log::segment_path(&dir, 1), &buf[..buf.len() - 5]).unwrap();
    // (message, recipient, its last checkpoint: mark, attempts, retry time)
    type Pending = (u64, String, Option<(Mark, u32, u64)>);
    let pending = |state: &super::store::State| -> Vec<Pending> {
        let mut out = Vec::new();
        for (&id, m) in &state.messages {
            for (r, c) in m.pending() {
                out.push((
                    id,
                    r.to_string(),
                    c.map(|c| (c.mark, c.attempts, c.retry_at_ms)),
                ));
            }
        }
        out
    };
    let expected = vec![
        (
            1,
            "b@example.net".to_string(),
            Some((Mark::Deferred, 2, t2)),
        ),
        (
            1,
            "c@example.net".to_string(),
            Some((Mark::Deferred, 2, t2)),
        ),
        (1, "e@example.net".to_string(), None),
        (
            2,
            "h@example.net".to_string(),
            Some((Mark::Deferred, 1, t3)),
        ),
    ];
    let mut state = super::store::State::load(&dir).unwrap();
    assert_eq!((state.issues.torn, state.issues.corrupt), (1, 0));
    assert_eq!(pending(&state), expected);
    // Compaction writes the deferrals as one record per message, attempts and retry time.
    state.compact(&dir).unwrap();
    let compacted = all_records(&dir);
    assert!(
        compacted.contains(&outcomes(
            1,
            Mark::Deferred,
            2,
            t2,
            &["b@example.net", "c@example.net"]
        )),
        "{compacted:?}"
    );
    assert!(compacted.contains(&outcomes(2, Mark::Deferred, 1, t3, &["h@example.net"])));
    assert!(!compacted
        .iter()
        .any(|r| matches!(r, Record::Outcome { .. })));
    let state = super::store::State::load(&dir).unwrap();
    assert_eq!((state.issues.torn, state.issues.corrupt), (0, 0));
    assert_eq!(pending(&state), expected);
    // Recovered as submissions: grouped by attempts and due time, the deferrals held back.
    let mut unusable = 0;
    let recovered = super::recovered_submissions(state, &mut unusable);
    assert_eq!(unusable, 0);
    let got: Vec<(u64, Vec<String>, u32, bool)> = recovered
        .iter()
        .map(|(due, s)| {
            (
                s.id,
                s.message.recipients.iter().map(|r| r.to_string()).collect(),
                s.resumed.as_ref().map_or(0, |r| r.attempts),
                due.is_some(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (1, vec!["e@example.net".to_string()], 0, false),
            (
                1,
                vec!["b@example.net".to_string(), "c@example.net".to_string()],
                2,
                true
            ),
            (2, vec!["h@example.net".to_string()], 1, true),
        ]
    );
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn checkpoints_by_position_name_the_same_recipients_across_compactions_and_restarts() {
    use log::{Mark, Record};
    use std::io::Write;
    let dir = tempdir("positions");
    let later = super::unix_ms(std::time::SystemTime::now()) + 3_600_000;
    let at = |id: u64, mark: Mark, retry_at_ms: u64, positions: &[u32]| Record::OutcomePositions {
        id,
        mark,
        attempts: 1,
        retry_at_ms,
        positions: positions.to_vec(),
    };
    let [body, message] = body_and_message(later - 3_600_000, &["a", "b", "c", "d", "e", "f"]);
    let records = [
        body,
        message,
        at(1, Mark::Delivered, 0, &[0, 2]),
        at(1, Mark::Deferred, later, &[1, 3]),
    ];
    let mut buf = Vec::new();
    for r in &records {
        log::encode(r, &mut buf);
    }
    fs::write(log::segment_path(&dir, 1), &buf).unwrap();
    let pending = |state: &super::store::State| -> Vec<(Option<u32>, String)> {
        state.messages[&1]
            .pending_placed()
            .map(|(p, r, _)| (p, r.to_string()))
            .collect()
    };
    let named = |list: &[(u32, &str)]| -> Vec<(Option<u32>, String)> {
        list.iter()
            .map(|&(p, r)| (Some(p), format!("{r}@example.net")))
            .collect()
    };
    let mut state = super::store::State::load(&dir).unwrap();
    assert_eq!(
        pending(&state),
        named(&[(1, "b"), (3, "d"), (4, "e"), (5, "f")])
    );
    // A compaction keeps only b, d, e and f: their record says where they were.
    let (_, mut file, _) = state.compact(&dir).unwrap();
    assert!(
        all_records(&dir).contains(&Record::PlacedMessage {
            id: 1,
            body_id: 1,
            submitted_ms: later - 3_600_000,
            sender: "news@example.org".into(),
            recipients: ["b", "d", "e", "f"]
                .map(|r| format!("{r}@example.net"))
                .to_vec(),
            positions: vec![1, 3, 4, 5]
        }),
        "{:?}",
        all_records(&dir)
    );
    assert_eq!(
        pending(&state),
        named(&[(1, "b"), (3, "d"), (4, "e"), (5, "f")])
    );
    // The engine goes on naming them by their first positions: 3 is d, 5 is f; 0 (a, final
    // before the compaction) is listed no more and names nobody.
    let mut buf = Vec::new();
    log::encode(&at(1, Mark::Delivered, 0, &[0, 3]), &mut buf);
    log::encode(&at(1, Mark::Bounced, 0, &[5]), &mut buf);
    file.write_all(&buf).unwrap();
    drop(file);
    let mut state = super::store::State::load(&dir).unwrap();
    assert_eq!(pending(&state), named(&[(1, "b"), (4, "e")]));
    // Recovered: each recipient goes back to the engine with its first position.
    let recovered = super::recovered_submissions(super::store::State::load(&dir).unwrap(), &mut 0);
    let mut given: Vec<(Option<u32>, String)> = recovered
        .iter()
        .flat_map(|(_, s)| s.message.recipients.iter())
        .map(|r| (r.position(), r.to_string()))
        .collect();
    given.sort();
    assert_eq!(given, named(&[(1, "b"), (4, "e")]));
    // A second compaction maps the maps; a checkpoint after it still finds e at 4.
    let (_, mut file, _) = state.compact(&dir).unwrap();
    file.write_all(&{
        let mut buf = Vec::new();
        log::encode(&at(1, Mark::Delivered, 0, &[4]), &mut buf);
        buf
    })
    .unwrap();
    drop(file);
    let state = super::store::State::load(&dir).unwrap();
    assert_eq!((state.issues.torn, state.issues.corrupt), (0, 0));
    assert_eq!(pending(&state), named(&[(1, "b")]));
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn positions_that_do_not_fit_their_list_name_nobody() {
    use log::{Mark, Record};
    let dir = tempdir("unplaced");
    let later = super::unix_ms(std::time::SystemTime::now()) + 3_600_000;
    let to = ["b", "d", "e"].map(|r| format!("{r}@example.net"));
    let mut buf = Vec::new();
    for r in [
        Record::Body {
            body_id: 1,
            bytes: b"Subject: x\r\n\r\ny\r\n".to_vec(),
        },
        // Three recipients, two positions (and a list whose positions are not ascending).
        Record::PlacedMessage {
            id: 1,
            body_id: 1,
            submitted_ms: later - 3_600_000,
            sender: "news@example.org".into(),
            recipients: to.to_vec(),
            positions: vec![1, 3],
        },
        Record::PlacedMessage {
            id: 2,
            body_id: 1,
            submitted_ms: later - 3_600_000,
            sender: "news@example.org".into(),
            recipients: to.to_vec(),
            positions: vec![3, 1, 4],
        },
        Record::OutcomePositions {
            id: 1,
            mark: Mark::Delivered,
            attempts: 1,
            retry_at_ms: 0,
            positions: vec![0, 1, 2, 3],
        },
        Record::OutcomePositions {
            id: 2,
            mark: Mark::Delivered,
            attempts: 1,
            retry_at_ms: 0,
            positions: vec![0, 1, 2, 3, 4],
        },
    ] {
        log::encode(&r, &mut buf);
    }
    fs::write(log::segment_path(&dir, 1), &buf).unwrap();
    let state = super::store::State::load(&dir).unwrap();
    // Nobody is marked final by a position that cannot be trusted: all are sent again, and
    // without positions, so that their checkpoints name them by address.
    for id in [1, 2] {
        let pending: Vec<(Option<u32>, &str)> = state.messages[&id]
            .pending_placed()
            .map(|(p, r, _)| (p, r))
            .collect();
        assert_eq!(
            pending,
            to.iter().map(|r| (None, r.as_str())).collect::<Vec<_>>()
        );
    }
    let recovered = super::recovered_submissions(state, &mut 0);
    assert!(recovered
        .iter()
        .flat_map(|(_, s)| s.message.recipients.iter())
        .all(|r| r.position().is_none()));
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_transactions_recipients_are_checkpointed_in_one_record() {
    let dir = tempdir("one-record");
    let s = sink(Faults {
        tempfail_rcpt: vec!["busy".into()],
        ..Faults::default()
    });
    let to: Vec<String> = (0..50)
        .map(|i| format!("user{i}@example.net"))
        .chain(["busy1@example.net".into(), "busy2@example.net".into()])
        .collect();
    let id;
    {
        let d = dispatcher(&dir, &s, RetryPolicy::default());
        id = d
            .submit(
                Message::new(
                    "news@example.org",
                    to.iter().map(String::as_str),
                    b"Subject: x\r\n\r\ny\r\n",
                )
                .unwrap(),
            )
            .unwrap();
        d.sync().unwrap();
        d.flush();
        d.shutdown();
    }
    let checkpoints: Vec<(log::Mark, u32, Vec<u32>)> = all_records(&dir)
        .into_iter()
        .filter_map(|r| match r {
            log::Record::OutcomePositions {
                id: of,
                mark,
                attempts,
                positions,
                ..
            } if of == id => Some((mark, attempts, positions)),
            log::Record::Outcome { .. } | log::Record::Outcomes { .. } => {
                panic!("a recipient was checkpointed by address: {r:?}")
            }
            _ => None,
        })
        .collect();
    // The delivered fifty in one record, the two deferred in another, each recipient named by
    // its position in the message's record (4 octets, not its address).
    assert_eq!(
        checkpoints,
        [
            (log::Mark::Delivered, 1, (0..50).collect()),
            (log::Mark::Deferred, 1, vec![50, 51])
        ]
    );
    // And they name the right ones: the two deferred are what the spool holds.
    let state = super::store::State::load(&dir).unwrap();
    let pending: Vec<&str> = state.messages[&id].pending().map(|(r, _)| r).collect();
    assert_eq!(pending, ["busy1@example.net", "busy2@example.net"]);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn the_writers_queue_is_bounded_in_recipients_and_a_larger_message_is_still_taken() {
    let dir = tempdir("budget");
    let s = sink(Faults::default());
    let mut builder = Dispatcher::builder()
        .relay(&s.local_addr().to_string())
        .ehlo_name("sender.example.org")
        .retry(quick_retry())
        .spool(&dir);
    builder
        .config_mut()
        .spool
        .as_mut()
        .unwrap()
        .queue_recipients = 10;
    let d = builder.start().unwrap();
    let list = |n: usize, tag: &str| -> Vec<String> {
        (0..n).map(|i| format!("{tag}{i}@example.net")).collect()
    };
    // More than the whole budget in one message: taken, since nothing waits before it.
    let big = list(25, "big");
    d.submit(
        Message::new(
            "news@example.org",
            big.iter().map(String::as_str),
            b"Subject: x\r\n\r\ny\r\n",
        )
        .unwrap(),
    )
    .unwrap();
    // Fifty messages of five, each waiting for room as the writer takes the ones before.
    for m in 0..50 {
        let to = list(5, &format!("m{m}."));
        d.submit_timeout(
            Message::new(
                "news@example.org",
                to.iter().map(String::as_str),
                b"Subject: x\r\n\r\ny\r\n",
            )
            .unwrap(),
            Duration::from_secs(30),
        )
        .unwrap();
    }
    // Without waiting, a burst finds the queue full while the writer fsyncs (it holds two
    // messages of five): refused at the door, not held.
    let mut taken = 0;
    let mut refused = 0;
    for m in 0..200 {
        let to = list(5, &format!("n{m}."));
        let message = Message::new(
            "news@example.org",
            to.iter().map(String::as_str),
            b"Subject: x\r\n\r\ny\r\n",
        )
        .unwrap();
        match d.submit(message) {
            Ok(_) => taken += 1,
            Err(e) => {
                assert!(matches!(e.error, crate::error::Error::QueueFull), "{e}");
                refused += 1;
            }
        }
    }
    assert!(refused > 0, "all {taken} taken");
    d.sync().unwrap();
    assert!(d.wait_final(Duration::from_secs(30)));
    let expected = 25 + 250 + 5 * taken;
    assert_eq!(d.stats().delivered, expected);
    drop(d);
    assert_eq!(s.stats().recipients, expected);
    let _ = fs::remove_dir_all(&dir);
}
