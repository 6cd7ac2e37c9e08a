//! One message to a large recipient list, through the `mxpipe` binary, against a relay that
//! refuses every connection (a port nobody listens on): every recipient is deferred and then
//! expires, each attempt an outcome event per recipient.
//!
//! The test checks every recipient's line in the report (one each, expired, with the
//! connection error) and the child's peak RSS, read from `wait4` (its own, not that of other
//! tests' children), against a bound per recipient: a guard against a per-recipient cost of
//! kilobytes, not a measure (the events a slow reader has not taken yet still cost about a
//! kilobyte per recipient and attempt).

mod util;

use std::collections::HashSet;
use std::fs;
use std::process::{Command, Stdio};

/// Recipients in the message: enough that a per-recipient cost of kilobytes shows, few enough
/// for a debug build to finish in seconds.
const RECIPIENTS: usize = 50_000;

/// Peak RSS allowed, in KiB: the process's fixed cost (about 35 MB in a debug build) plus
/// 1.6 KB per recipient (measured here: about 0.8 KB in a debug build, 1 KB in a release
/// build at 1,000,000 recipients).
const PEAK_RSS_KIB: i64 = 40 * 1024 + (RECIPIENTS as i64 * 1600) / 1024;

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

#[test]
fn refused_relay_big_list_every_recipient_expires_once_in_bounded_memory() {
    let dir = util::fresh_temp_dir("big-message");
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
    let (code, stdout, peak_kib) = run_measured(
        Command::new(env!("CARGO_BIN_EXE_mxpipe"))
            .current_dir(&dir)
            .args(["send", "--relay", &relay, "--from", "a@example.org"])
            .args(["--to-file", "list.txt", "--report", "report.jsonl"])
            .args(["--max-age", "2", "--retry-after", "1", "--wait-final"])
            .arg("message.eml"),
    );
    eprintln!("peak RSS {peak_kib} KiB for {RECIPIENTS} recipients");
    assert_eq!(code, 1, "stdout: {stdout}");
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
        assert_eq!(value["enhanced"], "4.4.1", "{line}");
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
    assert!(
        peak_kib < PEAK_RSS_KIB,
        "peak RSS {peak_kib} KiB for {RECIPIENTS} recipients; bound {PEAK_RSS_KIB} KiB"
    );
    let _ = fs::remove_dir_all(&dir);
}
