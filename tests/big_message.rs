//! One message to a large recipient list, through the `mxpipe` binary, against a relay that
//! refuses every connection (a port nobody listens on): every recipient is deferred and then
//! expires, each attempt an outcome event per recipient (three per recipient here).
//!
//! The tests check every recipient's line in the report (one each, expired, with the
//! connection error) and the child's peak RSS, read from `wait4` (its own, not that of other
//! tests' children), against a bound per recipient. The bound is tight enough to catch a copy
//! of the reply text per event or per failure (about 1 KB per recipient): the events of one
//! failed attempt share one reply, and an event waiting for a slow reader costs a small record.
//! The second test runs the same send with a spool and a sender, so that every expiry also goes
//! through the spool's checkpoints and the failure reports to the sender (RFC 3464 DSNs).

mod util;

use std::collections::HashSet;
use std::fs;
use std::process::{Command, Stdio};

/// Recipients in the message: enough that a per-recipient cost of a few hundred bytes shows
/// against the fixed cost, few enough for a debug build to finish in seconds.
const RECIPIENTS: usize = 100_000;

/// Peak RSS allowed, in KiB: the process's fixed cost (about 35 MB in a debug build) plus
/// 400 bytes per recipient (its address in the list, the engine's queue, the report's record,
/// and the events of one attempt waiting for the reader). A copy of the reply per event or per
/// failure costs about 1 KB per recipient and fails this.
const PEAK_RSS_KIB: i64 = 40 * 1024 + (RECIPIENTS as i64 * 400) / 1024;

/// With a spool and a sender, the failure reports to the sender come on top: real messages of
/// about 300 bytes per failed recipient (a report lists up to 1000), which wait in the engine
/// like any other mail (here for the same refused relay, until they expire too); the copy of
/// each failed address kept for its report until the report is written, and the loop's copy
/// of the addresses decided in one turn (for the spool's checkpoint), about 100 bytes more.
/// Measured in a debug build on a loaded 2-core machine: 114 to 130 MB.
const PEAK_RSS_SPOOL_KIB: i64 = PEAK_RSS_KIB + (RECIPIENTS as i64 * 600) / 1024;

/// Runs `command` to its end and returns its exit code, its stdout and its peak RSS in KiB.
// The child is reaped by wait4, which std's Child does not know of.
#[allow(clippy::zombie_processes)]
fn run_measured(command: &mut Command) -> (i32, String, i64) {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run mxpipe");
    let pid = child.id() as libc::pid_t;
    let mut stdout = child.stdout.expect("piped");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut out).expect("read stdout");
        out
    });
    let mut status = 0;
    // SAFETY: wait4 writes the status and the rusage we own; the child is ours and waited
    // for only here (std's Child is not asked to wait).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid, "wait4: {}", std::io::Error::last_os_error());
    let out = reader.join().expect("stdout reader");
    assert!(
        libc::WIFEXITED(status),
        "mxpipe did not exit normally: {status}"
    );
    (libc::WEXITSTATUS(status), out, usage.ru_maxrss)
}

/// Sends one message to `RECIPIENTS` recipients at a refused relay (with a spool in `spool`
/// when given), checks that every recipient expired exactly once with the connection error in
/// the report, and returns the peak RSS in KiB.
fn send_to_refused_relay(label: &str, spool: bool) -> i64 {
    let dir = util::fresh_temp_dir(label);
    let list: String = (0..RECIPIENTS)
        .map(|i| format!("user{i}@big.example\n"))
        .collect();
    fs::write(dir.join("list.txt"), list).expect("write list");
    fs::write(
        dir.join("message.eml"),
        "From: a@example.org\r\nTo: list@big.example\r\nSubject: big\r\n\r\nhello\r\n",
    )
    .expect("write message");
    // Nobody listens here: every connection is refused.
    let port = util::free_port("127.0.0.1");
    let relay = format!("127.0.0.1:{port}");
    let mut command = Command::new(env!("CARGO_BIN_EXE_mxpipe"));
    command
        .current_dir(&dir)
        .args(["send", "--relay", &relay, "--from", "a@example.org"])
        .args(["--to-file", "list.txt", "--report", "report.jsonl"])
        .args(["--max-age", "2", "--retry-after", "1", "--wait-final"]);
    if spool {
        command.args(["--spool", "spool"]);
    }
    let (code, stdout, peak_kib) = run_measured(command.arg("message.eml"));
    eprintln!("{label}: peak RSS {peak_kib} KiB for {RECIPIENTS} recipients");
    assert_eq!(code, 1, "stdout: {stdout}");
    if spool {
        assert!(
            stdout.contains(&format!("spooled id=1 recipients={RECIPIENTS}")),
            "stdout: {stdout}"
        );
    }
    assert!(
        stdout.contains(&format!(
            "recipients={RECIPIENTS} delivered=0 bounced=0 expired={RECIPIENTS} not_final=0"
        )),
        "stdout: {stdout}"
    );
    let report = fs::read_to_string(dir.join("report.jsonl")).expect("read report");
    let mut seen = HashSet::new();
    let refused = format!("connect to {relay} failed: Connection refused");
    for line in report.lines() {
        let value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        let recipient = value["recipient"].as_str().expect("recipient").to_string();
        assert_eq!(value["status"], "expired", "{line}");
        assert_eq!(value["code"], 0, "{line}");
        assert_eq!(value["enhanced"], "4.4.1", "{line}");
        assert_eq!(value["message_id"], 1, "{line}");
        assert_eq!(value["destination"], relay.as_str(), "{line}");
        let text = value["text"].as_str().expect("text");
        assert!(text.starts_with(&refused), "{line}");
        assert!(seen.insert(recipient), "twice: {line}");
    }
    assert_eq!(seen.len(), RECIPIENTS);
    for i in 0..RECIPIENTS {
        assert!(
            seen.contains(&format!("user{i}@big.example")),
            "user{i} missing"
        );
    }
    let _ = fs::remove_dir_all(&dir);
    peak_kib
}

#[test]
fn refused_relay_big_list_every_recipient_expires_once_in_bounded_memory() {
    let peak_kib = send_to_refused_relay("big-message", false);
    assert!(
        peak_kib < PEAK_RSS_KIB,
        "peak RSS {peak_kib} KiB for {RECIPIENTS} recipients; bound {PEAK_RSS_KIB} KiB"
    );
}

#[test]
fn refused_relay_big_list_with_spool_and_failure_reports_in_bounded_memory() {
    let peak_kib = send_to_refused_relay("big-message-spool", true);
    assert!(
        peak_kib < PEAK_RSS_SPOOL_KIB,
        "peak RSS {peak_kib} KiB for {RECIPIENTS} recipients with a spool; bound \
         {PEAK_RSS_SPOOL_KIB} KiB"
    );
}
