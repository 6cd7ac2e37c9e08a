//! Queue tools on a running dispatcher: `mxpipe queue list|show|retry|delete|stats --spool DIR`
//! reach the dispatcher that holds the spool through its control socket. The relay is down at
//! first (nothing listens on its port), so every recipient is deferred with a retry an hour
//! away; then Postfix's smtp-sink comes up on that port, `queue delete` drops one message (its
//! recipients get the final outcome "deleted by admin" and never arrive) and `queue retry
//! --all` sends the others at once.

mod util;

use mxpipe::engine::{Dispatcher, Event, EventKind};
use mxpipe::message::Message;
use mxpipe::queue::RetryPolicy;
use mxpipe::smtp::StartTls;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use util::SmtpSink;

fn queue(args: &[&str], spool: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mxpipe"))
        .arg("queue")
        .args(args)
        .arg("--spool")
        .arg(spool)
        .output()
        .expect("run mxpipe queue");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Reads events until `want` of them match `pick`, or panics after 30 s.
fn wait_events(d: &Dispatcher, want: usize, pick: impl Fn(&Event) -> bool) -> Vec<Event> {
    let events = d.events().expect("events recorded");
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut got, mut others) = (Vec::new(), Vec::new());
    while got.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = events.recv_timeout(left).unwrap_or_else(|_| {
            panic!(
                "only {} of {want} events within 30 s: {got:?}; others: {others:?}",
                got.len()
            )
        });
        if pick(&event) {
            got.push(event);
        } else {
            others.push(event);
        }
    }
    got
}

#[test]
fn queue_tools_list_retry_and_delete_on_a_running_dispatcher() {
    let spool = util::fresh_temp_dir("queue-control");
    let port = util::free_port("127.0.0.1");
    let d = Dispatcher::builder()
        .relay(&format!("127.0.0.1:{port}"))
        .starttls(StartTls::Disabled)
        .record_events(true)
        .retry(RetryPolicy {
            initial: Duration::from_secs(3600),
            max_interval: Duration::from_secs(3600),
            multiplier: 1.0,
            jitter: 0.0,
            max_age: Duration::from_secs(24 * 3600),
        })
        .spool(&spool)
        .start()
        .expect("start");
    let mut ids = Vec::new();
    for n in 1..=3 {
        let body = format!("Subject: message {n}\r\n\r\nbody {n}\r\n");
        let m = Message::new(
            "news@example.org",
            [
                format!("a{n}@example.net").as_str(),
                &format!("b{n}@example.net"),
            ],
            body.as_bytes(),
        )
        .unwrap();
        ids.push(d.submit(m).expect("submit"));
    }
    d.sync().expect("sync");
    wait_events(&d, 6, |e| e.kind == EventKind::Deferred);

    // Only the spool's owner may talk to it.
    let mode = std::fs::metadata(spool.join("control.sock"))
        .expect("control socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let (ok, list, err) = queue(&["list"], &spool);
    assert!(ok, "queue list failed: {err}");
    let rows: Vec<Vec<&str>> = list
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 3, "{list}");
    for (row, id) in rows.iter().zip(&ids) {
        assert_eq!(row[0], id.to_string(), "{list}");
        assert_eq!(row[2], "2/2", "{list}");
        assert_eq!(row[3..5], ["in", "3600s"], "{list}");
        assert_eq!(row[5], "<news@example.org>", "{list}");
    }
    let (ok, show, err) = queue(&["show", &ids[1].to_string()], &spool);
    assert!(ok, "queue show failed: {err}");
    assert!(
        show.contains("<a2@example.net> deferred attempts=1 next try in 3600s"),
        "{show}"
    );
    assert!(
        show.contains("<b2@example.net> deferred attempts=1 next try in 3600s"),
        "{show}"
    );
    let (ok, stats, err) = queue(&["stats"], &spool);
    assert!(ok, "queue stats failed: {err}");
    assert!(
        stats.contains("messages 3\nrecipients_pending 6\nrecipients_deferred 6\n"),
        "{stats}"
    );
    let (ok, _, err) = queue(&["delete", "999"], &spool);
    assert!(!ok);
    assert!(
        err.contains("no message 999 with pending recipients in the spool"),
        "{err}"
    );

    // The relay comes up; message 2 is deleted, then everything else is retried.
    let sink = SmtpSink::start_dumping_on_port("127.0.0.1", port, &[]);
    let (ok, out, err) = queue(&["delete", &ids[1].to_string()], &spool);
    assert!(ok, "queue delete failed: {err}");
    assert_eq!(out, format!("message {} deleted\n", ids[1]));
    let deleted = wait_events(&d, 2, |e| e.kind.is_final());
    for e in &deleted {
        assert_eq!(e.message_id, ids[1]);
        assert_eq!(e.kind, EventKind::Bounced);
        assert_eq!(e.reply.text, "deleted by admin");
    }
    let (ok, out, err) = queue(&["retry", "--all"], &spool);
    assert!(ok, "queue retry failed: {err}");
    assert_eq!(out, "2 messages due now\n");
    let delivered = wait_events(&d, 4, |e| e.kind.is_final());
    let mut outcomes: BTreeMap<String, EventKind> = BTreeMap::new();
    for e in deleted.iter().chain(&delivered) {
        assert!(
            outcomes
                .insert(e.recipient.as_str().to_string(), e.kind)
                .is_none(),
            "two final outcomes for {}",
            e.recipient.as_str()
        );
    }
    assert_eq!(
        outcomes.into_iter().collect::<Vec<_>>(),
        vec![
            ("a1@example.net".to_string(), EventKind::Delivered),
            ("a2@example.net".to_string(), EventKind::Bounced),
            ("a3@example.net".to_string(), EventKind::Delivered),
            ("b1@example.net".to_string(), EventKind::Delivered),
            ("b2@example.net".to_string(), EventKind::Bounced),
            ("b3@example.net".to_string(), EventKind::Delivered),
        ]
    );
    assert!(d.wait_final(Duration::from_secs(30)));
    // What arrived: messages 1 and 3, to their two recipients each; message 2 never.
    let mut arrived: Vec<(Vec<String>, String)> = sink
        .dumps()
        .into_iter()
        .map(|dump| {
            let content = String::from_utf8_lossy(&dump.content).into_owned();
            let body = content.lines().last().unwrap_or("").to_string();
            (dump.rcpt_args, body)
        })
        .collect();
    arrived.sort();
    assert_eq!(
        arrived,
        vec![
            (
                vec!["<a1@example.net>".into(), "<b1@example.net>".into()],
                "body 1".into()
            ),
            (
                vec!["<a3@example.net>".into(), "<b3@example.net>".into()],
                "body 3".into()
            ),
        ]
    );
    // Every recipient is final: the running spool's list is empty.
    let (ok, list, err) = queue(&["list"], &spool);
    assert!(ok, "queue list failed: {err}");
    assert_eq!(list.lines().count(), 1, "{list}");
    drop(d);
    // The socket goes with the dispatcher; the tools then work on the files.
    assert!(!spool.join("control.sock").exists());
    let (ok, stats, err) = queue(&["stats"], &spool);
    assert!(ok, "queue stats on the released spool failed: {err}");
    assert!(stats.contains("messages 0\n"), "{stats}");
    let _ = std::fs::remove_dir_all(&spool);
}
