//! Custody across kill -9: `mxpipe send --spool` to Postfix's `smtp-sink` (which writes every
//! transaction it accepts to a file), killed with SIGKILL at random moments, then restarted
//! (also killed, at random moments of its recovery and sending) until it finishes. Every
//! recipient of the acknowledged message must have arrived at least once, the spool must end
//! empty, and recipients that arrived twice are counted and must stay within what the killed
//! processes had in flight (per kill and connection: a transaction under way and one whose
//! checkpoint was not written yet, of up to 100 recipients each).
//!
//! Size and repetitions: MXPIPE_SPOOL_CRASH_RECIPIENTS (default 10,000) and
//! MXPIPE_SPOOL_CRASH_ROUNDS (default 20); `benches/spool_crash.sh` runs 100 rounds of 100,000.

mod util;

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use util::SmtpSink;

const CONNECTIONS: usize = 20;
const SEGMENT_BYTES: usize = 128 << 10;
const RECIPIENTS_PER_TRANSACTION: usize = 100;
const BODY: &[u8] = b"Subject: custody\r\n\r\nsent exactly once, crash or not\r\n";

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn mxpipe_send(spool: &Path, relay: &str, list: &Path, message: &Path) -> Child {
    // Small segments, so that kills also fall on rotations and on the compactions of the
    // running spool (each rewrites the message with the recipients still pending).
    let config = spool.with_extension("toml");
    fs::write(
        &config,
        format!(
            "spool_dir = {:?}\nspool_segment_bytes = {SEGMENT_BYTES}\n",
            spool.display().to_string()
        ),
    )
    .unwrap();
    Command::new(env!("CARGO_BIN_EXE_mxpipe"))
        .arg("send")
        .arg("--config")
        .arg(&config)
        .args(["--relay", relay, "--from", "news@example.org", "--to-file"])
        .arg(list)
        .args([
            "--connections",
            &CONNECTIONS.to_string(),
            "--starttls",
            "none",
            "--wait-final",
            "--max-age",
            "600",
        ])
        .arg(message)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mxpipe send")
}

/// Waits for the "spooled id=N" line: from then on the message is acknowledged.
fn wait_acknowledged(child: &mut Child) {
    let stdout = child.stdout.take().expect("piped");
    let mut lines = BufReader::new(stdout).lines();
    let line = lines
        .next()
        .expect("mxpipe send printed nothing")
        .expect("read stdout");
    assert!(line.starts_with("spooled id="), "{line}");
    // The rest of the output is not needed; a reader keeps the pipe from filling.
    std::thread::spawn(move || for _ in lines {});
}

/// Kills with SIGKILL; returns whether the process was still running, and how many
/// recipients it had found pending in the spool when it started (None if it was killed before
/// it said).
fn kill9(child: &mut Child) -> (bool, Option<usize>) {
    let running = child.try_wait().expect("try_wait").is_none();
    if running {
        child.kill().expect("SIGKILL");
    }
    child.wait().expect("reap");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("piped"), &mut stderr)
        .expect("read stderr");
    (running, pending_at_start(&stderr))
}

/// The recipients pending at start, from "spool recovered: M messages, N recipients pending".
fn pending_at_start(stderr: &str) -> Option<usize> {
    let rest = stderr.split("spool recovered: ").nth(1)?;
    let rest = rest.split(" messages, ").nth(1)?;
    rest.split(' ').next()?.parse().ok()
}

struct Round {
    kills: usize,
    /// Recipients each restart found pending.
    pending: Vec<Option<usize>>,
    once: usize,
    twice_or_more: usize,
}

/// One round; kills fall at random moments within `window` (about as long as a whole send).
fn round(n: usize, dir: &Path, recipients: &[String], window: Duration) -> Round {
    let window_ms = window.as_millis().max(2) as u64;
    let sink = SmtpSink::start_dumping("127.0.0.1", &[]);
    let relay = sink.addr().to_string();
    let spool = dir.join(format!("spool-{n}"));
    let list = dir.join("list.txt");
    let empty = dir.join("empty.txt");
    let message = dir.join("message.eml");
    let mut kills = 0;
    let mut pending = Vec::new();
    // First process: killed at a random moment of its send, after it acknowledged the message.
    let mut child = mxpipe_send(&spool, &relay, &list, &message);
    wait_acknowledged(&mut child);
    std::thread::sleep(Duration::from_millis(fastrand::u64(0..window_ms)));
    kills += usize::from(kill9(&mut child).0);
    // Restarts: up to three more killed at random moments (recovery, compaction, sending).
    for _ in 0..fastrand::usize(0..=3) {
        let mut child = mxpipe_send(&spool, &relay, &empty, &message);
        std::thread::sleep(Duration::from_millis(fastrand::u64(0..window_ms)));
        let (running, found) = kill9(&mut child);
        kills += usize::from(running);
        pending.push(found);
    }
    // The last one runs until everything is final.
    let child = mxpipe_send(&spool, &relay, &empty, &message);
    let out = child.wait_with_output().expect("wait for mxpipe send");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    pending.push(pending_at_start(&stderr));
    assert!(
        out.status.success(),
        "round {n}: the last send failed: {stdout}{stderr}"
    );
    assert!(
        stdout.contains("bounced=0 expired=0 not_final=0"),
        "{stdout}"
    );
    let stats = Command::new(env!("CARGO_BIN_EXE_mxpipe"))
        .args(["queue", "stats", "--spool"])
        .arg(&spool)
        .output()
        .expect("mxpipe queue stats");
    let stats = String::from_utf8_lossy(&stats.stdout);
    assert!(
        stats.contains("recipients_pending 0\n"),
        "round {n}: {stats}"
    );
    // What arrived, per recipient.
    let mut arrived: HashMap<String, usize> = HashMap::new();
    let dumps = sink.dumps();
    // `send` adds Date and Message-ID once, before the spool: every copy, whichever process
    // sent it, carries the same bytes.
    if let Some(first) = dumps.first() {
        let text = String::from_utf8_lossy(&first.content);
        assert!(
            text.starts_with("Subject: custody\nDate: ")
                && text.contains("\nMessage-ID: <")
                && text.ends_with("\n\nsent exactly once, crash or not\n"),
            "round {n}: {text}"
        );
    }
    for dump in &dumps {
        assert_eq!(dump.content, dumps[0].content, "round {n}");
        assert_eq!(dump.mail_args.split(' ').next(), Some("<news@example.org>"));
        for rcpt in &dump.rcpt_args {
            let address = rcpt.trim_start_matches('<').split('>').next().unwrap_or("");
            *arrived.entry(address.to_string()).or_default() += 1;
        }
    }
    let never: Vec<&String> = recipients
        .iter()
        .filter(|r| !arrived.contains_key(*r))
        .collect();
    assert!(
        never.is_empty(),
        "round {n}: {} acknowledged recipients never arrived, e.g. {:?}",
        never.len(),
        &never[..never.len().min(5)]
    );
    assert_eq!(
        arrived.len(),
        recipients.len(),
        "round {n}: strangers arrived"
    );
    let twice_or_more = arrived.values().filter(|&&c| c >= 2).count();
    // Per kill: on each connection, one transaction in flight, and one whose outcome the
    // loop had decided but the spool had not yet written.
    let bound = kills * 2 * CONNECTIONS * RECIPIENTS_PER_TRANSACTION;
    assert!(
        twice_or_more <= bound,
        "round {n}: {twice_or_more} recipients arrived twice or more; {kills} kills allow {bound}"
    );
    let _ = fs::remove_dir_all(&spool);
    Round {
        kills,
        pending,
        once: recipients.len() - twice_or_more,
        twice_or_more,
    }
}

#[test]
fn kill_9_at_random_moments_loses_no_acknowledged_recipient() {
    let size = env_number("MXPIPE_SPOOL_CRASH_RECIPIENTS", 10_000);
    let rounds = env_number("MXPIPE_SPOOL_CRASH_ROUNDS", 20);
    let dir = util::fresh_temp_dir("spool-crash");
    let recipients: Vec<String> = (0..size).map(|i| format!("user{i}@example.net")).collect();
    let mut list = fs::File::create(dir.join("list.txt")).unwrap();
    for r in &recipients {
        writeln!(list, "{r}").unwrap();
    }
    drop(list);
    fs::write(dir.join("empty.txt"), b"").unwrap();
    fs::write(dir.join("message.eml"), BODY).unwrap();
    // How long a send takes here from its acknowledgement to its end: the kills fall within.
    let window = {
        let sink = SmtpSink::start_dumping("127.0.0.1", &[]);
        let spool = dir.join("spool-calibration");
        let mut child = mxpipe_send(
            &spool,
            &sink.addr().to_string(),
            &dir.join("list.txt"),
            &dir.join("message.eml"),
        );
        wait_acknowledged(&mut child);
        let acknowledged = Instant::now();
        assert!(child.wait().expect("calibration send").success());
        let _ = fs::remove_dir_all(&spool);
        acknowledged.elapsed()
    };
    println!("one send of {size} recipients, acknowledgement to exit: {window:?}");
    let started = Instant::now();
    let (mut kills, mut duplicated) = (0, 0);
    for n in 0..rounds {
        let r = round(n, &dir, &recipients, window);
        println!(
            "round {n}: kills={} pending_at_restarts={:?} recipients_once={} recipients_twice_or_more={}",
            r.kills, r.pending, r.once, r.twice_or_more
        );
        kills += r.kills;
        duplicated += r.twice_or_more;
    }
    println!(
        "spool crash: rounds={rounds} recipients={size} kills={kills} delivered_zero=0 duplicated={duplicated} in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let _ = fs::remove_dir_all(&dir);
}
