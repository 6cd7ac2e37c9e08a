//! The `mxpipe` binary as a user drives it: each test runs the built command line against real
//! servers on loopback (Postfix's `smtp-sink`, mxpipe's own sink for scripted faults) and
//! checks what a user would: the exit code, the summary and errors printed, the report and
//! journal files, and what arrived.

mod util;

use mxpipe::sink::{Faults, Sink, SinkConfig};
use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A directory of inputs, removed on drop.
struct Dir {
    dir: PathBuf,
}

impl Dir {
    fn new(label: &str) -> Dir {
        Dir {
            dir: util::fresh_temp_dir(label),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn write(&self, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path(name);
        fs::write(&path, content).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    fn read(&self, name: &str) -> String {
        let path = self.path(name);
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn mxpipe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mxpipe"))
}

fn run(command: &mut Command) -> Output {
    command.output().expect("run mxpipe")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A campaign of `recipients` (one address a row) relayed to `relay`.
fn campaign(d: &Dir, relay: &str, recipients: &[&str]) -> PathBuf {
    let mut csv = String::from("email,first_name\n");
    for r in recipients {
        csv.push_str(&format!("{r},Reader\n"));
    }
    d.write("recipients.csv", csv);
    d.write(
        "campaign.toml",
        format!(
            "from = \"News <news@example.org>\"\n\
             subject = \"Hello {{{{first_name}}}}\"\n\
             text = \"Hi {{{{first_name}}}}.\"\n\
             recipients = \"recipients.csv\"\n\
             [delivery]\n\
             relay = \"{relay}\"\n"
        ),
    )
}

/// Report lines (JSON Lines) as values.
fn report_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

fn statuses(report: &[serde_json::Value]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = report
        .iter()
        .map(|o| {
            (
                o["recipient"].as_str().unwrap().to_string(),
                o["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Defect 1: a campaign honours the delivery options of the command line, over its own file.
#[test]
fn campaign_send_honours_command_line_delivery_options() {
    let d = Dir::new("cli-campaign-options");
    let sink = util::SmtpSink::start_dumping("127.0.0.1", &[]);
    let file = campaign(&d, &sink.addr().to_string(), &["ann@example.net"]);

    // smtp-sink offers no STARTTLS: under --starttls required nothing may go out.
    let out = run(mxpipe()
        .arg("send")
        .arg(&file)
        .args([
            "--starttls",
            "required",
            "--max-age",
            "1",
            "--retry-after",
            "1",
        ])
        .arg("--report")
        .arg(d.path("required.jsonl"))
        .arg("--quiet"));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        statuses(&report_lines(&d.read("required.jsonl"))),
        [("ann@example.net".to_string(), "expired".to_string())]
    );
    assert!(sink.dumps().is_empty(), "nothing may arrive in plaintext");

    // --ehlo-name replaces the default; the message arrives.
    let out = run(mxpipe().arg("send").arg(&file).args([
        "--ehlo-name",
        "cli.example.org",
        "--connections",
        "1",
    ]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("{:<16}{:>12}\n", "delivered", 1)),
        "{}",
        stdout(&out)
    );
    let dumps = sink.dumps();
    assert_eq!(dumps.len(), 1);
    assert_eq!(dumps[0].helo_args.as_deref(), Some("cli.example.org"));

    // What makes no sense for a campaign is refused, not ignored.
    let out = run(mxpipe()
        .arg("send")
        .arg(&file)
        .args(["--from", "x@example.org"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--from"), "{}", stderr(&out));
}

/// Starts `mxpipe send` in message mode in the background.
fn spawn_send(args: &[&OsStr]) -> Child {
    mxpipe()
        .arg("send")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mxpipe send")
}

/// Kills a child by its own PID and reaps it.
fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits (at most 30 s) until `path` holds a line containing `needle`.
fn wait_for_line(path: &Path, needle: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if fs::read_to_string(path).is_ok_and(|t| t.lines().any(|l| l.contains(needle))) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Defect 3: the report streams one line per final outcome as it happens, an output path that
/// cannot be created stops the run before anything is sent, and what is not final at exit is
/// said plainly.
#[test]
fn message_mode_report_streams_and_is_checked_first() {
    let d = Dir::new("cli-report");
    let sink = util::SmtpSink::start_dumping("127.0.0.1", &[]);
    let relay = sink.addr().to_string();
    d.write(
        "message.eml",
        "From: news@example.org\r\nSubject: hi\r\n\r\nHello.\r\n",
    );
    d.write("list.txt", "ann@example.net\nbob@example.net\n");

    // A report in a directory that does not exist: refused, and nothing goes out.
    let out = run(mxpipe()
        .args(["send", "--relay", &relay, "--from", "news@example.org"])
        .arg("--to-file")
        .arg(d.path("list.txt"))
        .arg("--report")
        .arg(d.path("missing/report.jsonl"))
        .arg(d.path("message.eml")));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with(&format!(
            "mxpipe: --report {}: cannot create:",
            d.path("missing/report.jsonl").display()
        )),
        "{}",
        stderr(&out)
    );
    assert!(sink.dumps().is_empty(), "nothing may be sent");

    // One recipient is delivered at once, the other is deferred again and again: the first
    // one's line is in the report while the send still runs.
    let faulty = Sink::start(SinkConfig {
        faults: Faults {
            tempfail_rcpt: vec!["bob@".into()],
            ..Faults::default()
        },
        ..SinkConfig::default()
    })
    .expect("sink starts");
    let report = d.path("report.jsonl");
    let faulty_relay = faulty.local_addr().to_string();
    let child = spawn_send(&[
        OsStr::new("--relay"),
        OsStr::new(&faulty_relay),
        OsStr::new("--from"),
        OsStr::new("news@example.org"),
        OsStr::new("--to-file"),
        d.path("list.txt").as_os_str(),
        OsStr::new("--report"),
        report.as_os_str(),
        OsStr::new("--wait-final"),
        OsStr::new("--retry-after"),
        OsStr::new("1"),
        d.path("message.eml").as_os_str(),
    ]);
    let streamed = wait_for_line(&report, "\"ann@example.net\"");
    let mut child = child;
    let still_running = child.try_wait().expect("try_wait").is_none();
    kill(child);
    assert!(
        streamed,
        "the delivered recipient's line was not in the report in time"
    );
    assert!(still_running, "the send should still be retrying bob");
    let lines = report_lines(&fs::read_to_string(&report).unwrap());
    assert_eq!(
        statuses(&lines),
        [("ann@example.net".to_string(), "delivered".to_string())],
        "only final outcomes, one line each"
    );

    // Without --wait-final the deferred recipient is not final at exit: the summary says so,
    // and so does its report line; the exit code is not 0.
    let out = run(mxpipe()
        .args([
            "send",
            "--relay",
            &faulty_relay,
            "--from",
            "news@example.org",
        ])
        .arg("--to-file")
        .arg(d.path("list.txt"))
        .arg("--report")
        .arg(&report)
        .arg(d.path("message.eml")));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let lines = report_lines(&fs::read_to_string(&report).unwrap());
    assert_eq!(
        statuses(&lines),
        [
            ("ann@example.net".to_string(), "delivered".to_string()),
            ("bob@example.net".to_string(), "not_final".to_string())
        ]
    );
    assert!(
        stderr(&out).contains(
            "mxpipe: 1 recipient not final at exit (deferred, not retried: without --wait-final \
             nothing keeps it); see the report"
        ),
        "{}",
        stderr(&out)
    );
    faulty.stop();
}

/// Defect 6: the recipients list takes comments and blank lines, counts duplicates and skips an
/// undecodable line with its number instead of aborting.
#[test]
fn message_mode_recipient_list_comments_duplicates_and_bad_lines() {
    let d = Dir::new("cli-to-file");
    let sink = util::SmtpSink::start_dumping("127.0.0.1", &[]);
    d.write(
        "message.eml",
        "From: news@example.org\r\nSubject: hi\r\n\r\nHello.\r\n",
    );
    let mut list = b"# the fair, May\n\nann@example.net\nbob@example.net   # met at the stand\n  \nANN@example.net\n".to_vec();
    list.extend_from_slice(b"caf\xe9@example.net\n");
    list.extend_from_slice(b"cy@example.net\r\n");
    d.write("list.txt", list);
    let out = run(mxpipe()
        .args(["send", "--relay", &sink.addr().to_string()])
        .args(["--from", "news@example.org", "--to-file"])
        .arg(d.path("list.txt"))
        .arg(d.path("message.eml")));
    let list_path = d.path("list.txt").display().to_string();
    assert_eq!(
        stderr(&out),
        format!(
            "{list_path}:6: recipient \"ANN@example.net\" skipped: a duplicate of line 3\n\
             {list_path}:7: line skipped: not valid UTF-8\n"
        )
    );
    assert_eq!(
        stdout(&out),
        "recipients=3 delivered=3 bounced=0 expired=0 not_final=0 invalid=1 duplicates=1 connections=1\n"
    );
    // An unreadable line is an invalid entry: the exit code says not everything went.
    assert_eq!(out.status.code(), Some(1));
    let dumps = sink.dumps();
    assert_eq!(dumps.len(), 1);
    assert_eq!(
        dumps[0].rcpt_args,
        ["<ann@example.net>", "<bob@example.net>", "<cy@example.net>"]
    );
}

/// Defect 8: a message without Date or Message-ID gets them (as Postfix's cleanup does); one
/// with them is sent unchanged; a file with no header section is warned about.
#[test]
fn message_mode_adds_date_and_message_id_when_missing() {
    let d = Dir::new("cli-headers");
    let sink = util::SmtpSink::start_dumping("127.0.0.1", &[]);
    let relay = sink.addr().to_string();
    d.write("list.txt", "ann@example.net\n");
    let send = |message: &str| {
        let out = run(mxpipe()
            .args(["send", "--relay", &relay, "--from", "news@example.org"])
            .arg("--to-file")
            .arg(d.path("list.txt"))
            .arg(d.write("message.eml", message)));
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        stderr(&out)
    };

    assert_eq!(
        send("From: news@example.org\r\nSubject: hi\r\n\r\nHello.\r\n"),
        ""
    );
    let complete = "From: news@example.org\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\n\
                    Message-ID: <given@example.org>\r\nSubject: hi\r\n\r\nHello.\r\n";
    assert_eq!(send(complete), "");
    let warned = send("Hello, just a body.\r\n");
    assert_eq!(
        warned,
        format!(
            "mxpipe: warning: {}: no header section (the first line is not a header field); \
             it is sent as the body of a message with only Date and Message-ID\n",
            d.path("message.eml").display()
        )
    );

    let dumps = sink.dumps();
    assert_eq!(dumps.len(), 3);
    let text = |i: usize| String::from_utf8(dumps[i].content.clone()).unwrap();
    let first = text(0);
    // smtp-sink writes LF line ends.
    let (headers, body) = first.split_once("\n\n").expect("a header section");
    let names: Vec<&str> = headers
        .lines()
        .map(|l| l.split(':').next().unwrap())
        .collect();
    assert_eq!(names, ["From", "Subject", "Date", "Message-ID"], "{first}");
    assert!(headers.contains("\nMessage-ID: <") && headers.ends_with("@example.org>"));
    assert_eq!(body, "Hello.\n");
    assert_eq!(text(1), complete.replace("\r\n", "\n"));
    let third = text(2);
    assert!(third.starts_with("Date: "), "{third}");
    assert!(third.ends_with(">\n\nHello, just a body.\n"), "{third}");
}

/// Defect 7: a byte-order mark at the start of a template is not content.
#[test]
fn campaign_template_byte_order_mark_is_not_sent() {
    let d = Dir::new("cli-bom");
    let file = campaign(&d, "127.0.0.1:25", &["ann@example.net"]);
    d.write("body.txt", "\u{feff}Hi {{first_name}}.\n");
    let toml = d
        .read("campaign.toml")
        .replace("text = \"Hi {{first_name}}.\"", "text_file = \"body.txt\"");
    d.write("campaign.toml", toml);
    let out = run(mxpipe()
        .args(["send", "--quiet", "--dry-run"])
        .arg(d.path("out"))
        .arg(&file));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let eml = fs::read(d.path("out/00000002.eml")).expect("rendered message");
    let text = String::from_utf8_lossy(&eml);
    assert!(text.ends_with("\r\n\r\nHi Reader.\r\n"), "{text}");
}

/// Defect 7: `sink --capture` errors name --capture; `--listen` takes a host name.
#[test]
fn sink_names_capture_errors_and_listens_on_a_host_name() {
    let d = Dir::new("cli-sink");
    let file = d.write("not-a-dir", "x");
    let out = run(mxpipe()
        .args(["sink", "--listen", "127.0.0.1:0", "--capture"])
        .arg(file.join("sub")));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).starts_with(&format!(
            "mxpipe: sink: --capture {}: cannot create:",
            file.join("sub").display()
        )),
        "{}",
        stderr(&out)
    );

    let port = util::free_port("127.0.0.1");
    let mut child = mxpipe()
        .args(["sink", "--listen", &format!("localhost:{port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the sink");
    let mut line = String::new();
    let read = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
    let status = child.try_wait().expect("try_wait");
    kill(child);
    read.expect("read the sink's first line");
    assert!(status.is_none(), "the sink exited: {line}");
    let addr = line
        .trim()
        .strip_prefix("mxpipe sink listening on ")
        .unwrap_or_else(|| panic!("{line:?}"));
    let addr: std::net::SocketAddr = addr.parse().expect("an address");
    assert!(addr.ip().is_loopback() && addr.port() == port, "{addr}");
}

/// Defect 7: `--nameserver` takes a host name (and a bare address gets port 53, see the unit
/// tests of `cli::options`).
#[test]
fn direct_mx_nameserver_takes_a_host_name() {
    let d = Dir::new("cli-nameserver");
    let sink = util::SmtpSink::start_dumping("127.0.0.1", &[]);
    let dns = util::dns::Dnsmasq::builder()
        .mx("example.test", "mx.example.test", 10)
        .host("mx.example.test", "127.0.0.1")
        .start();
    d.write(
        "message.eml",
        "From: news@example.org\r\nSubject: hi\r\n\r\nHello.\r\n",
    );
    d.write("list.txt", "ann@example.test\n");
    let out = run(mxpipe()
        .args(["send", "--direct-mx", "--nameserver"])
        .arg(format!("localhost:{}", dns.addr().port()))
        .args(["--mx-port", &sink.addr().port().to_string()])
        .arg("--mx-allow-loopback")
        .args(["--from", "news@example.org", "--to-file"])
        .arg(d.path("list.txt"))
        .arg(d.path("message.eml")));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(sink.dumps().len(), 1);
}

/// Defect 5: a CRLF recipients file gets the physical line numbers, and an unclosed quote is
/// an error instead of swallowing the rows after it.
#[test]
fn campaign_csv_lines_are_physical_and_an_unclosed_quote_is_reported() {
    let d = Dir::new("cli-csv");
    let file = campaign(&d, "127.0.0.1:25", &[]);
    d.write(
        "recipients.csv",
        "email,first_name,note\r\nann@example.net,Ann,\r\nnot-an-address,Bob,\r\n\"cy@example.net\",Cy,\"two\r\nlines\"\r\ndan@example.net,Dan,\r\n",
    );
    let out = run(mxpipe()
        .args(["send", "--dry-run"])
        .arg(d.path("out"))
        .arg(&file));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "{}:3: skipped (invalid) \"not-an-address\": email: address has no '@'\n",
            d.path("recipients.csv").display()
        )
    );
    let mut names: Vec<String> = fs::read_dir(d.path("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["00000002.eml", "00000004.eml", "00000006.eml"]);

    d.write(
        "recipients.csv",
        "email,first_name\nann@example.net,\"Ann\nbob@example.net,Bob\ncy@example.net,Cy\n",
    );
    let out = run(mxpipe()
        .args(["send", "--dry-run"])
        .arg(d.path("out2"))
        .arg(&file));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "mxpipe: {}:2: a quote opened in this row is never closed: the 2 lines after it would be one field\n",
            d.path("recipients.csv").display()
        )
    );
    assert!(!d.path("out2").exists(), "nothing may be rendered");
}

fn json_summary(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", stdout(out), stderr(out)))
}

/// Defect 4: a journal belongs to its campaign, and recipients that expired can be retried.
#[test]
fn campaign_journal_is_bound_to_its_campaign_and_expired_can_be_retried() {
    let d = Dir::new("cli-journal");
    let sink = Sink::start(SinkConfig::default()).expect("sink starts");
    let relay = sink.local_addr().to_string();
    // Nothing listens on this port: every attempt fails temporarily until the recipients expire.
    let down = format!("127.0.0.1:{}", util::free_port("127.0.0.1"));
    let file = campaign(&d, &down, &["ann@example.net", "bob@example.net"]);
    let journal = d.path("send.journal");
    let send = |extra: &[&str]| {
        run(mxpipe()
            .arg("send")
            .arg(&file)
            .arg("--journal")
            .arg(&journal)
            .args(["--quiet", "--json", "--retry-after", "1"])
            .args(extra))
    };
    let out = send(&["--max-age", "1"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(json_summary(&out)["expired"], 2);

    // The relay is back (given on the command line: how to send is not the campaign's
    // identity). Expired recipients are final unless --retry-expired, and the summary says so.
    let out = send(&["--relay", &relay]);
    let summary = json_summary(&out);
    assert_eq!(summary["already_final"], 2, "{summary}");
    assert_eq!(summary["already_expired"], 2, "{summary}");
    assert_eq!(summary["submitted"], 0, "{summary}");
    let out = send(&["--relay", &relay, "--retry-expired"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let summary = json_summary(&out);
    assert_eq!(summary["already_final"], 0, "{summary}");
    assert_eq!(summary["delivered"], 2, "{summary}");
    // And now they are final for good.
    let out = send(&["--relay", &relay, "--retry-expired"]);
    assert_eq!(json_summary(&out)["already_final"], 2);
    assert_eq!(json_summary(&out)["already_expired"], 0);

    // Another campaign (another subject) refuses this journal, before anything is sent.
    let toml = d.read("campaign.toml").replace("Hello", "Goodbye");
    d.write("campaign.toml", toml);
    let out = send(&["--relay", &relay]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "mxpipe: {}: the journal of another campaign (its campaign file, recipients or \
             templates differ); give another --journal, or --journal-any-campaign to use it anyway\n",
            journal.display()
        )
    );
    let out = send(&["--relay", &relay, "--journal-any-campaign"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(json_summary(&out)["already_final"], 2);
    assert_eq!(sink.stop().messages, 2);
}

/// Sends `signal` to a child by its own PID.
fn signal(child: &Child, signal: libc::c_int) {
    // SAFETY: kill(2) on the PID of a child we started and have not reaped.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
}

/// Waits (at most 60 s) for a child to exit, and returns its output.
fn finish(mut child: Child) -> Output {
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            kill(child);
            panic!("mxpipe did not exit within 60 s of the signal");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn outcome_lines(path: &Path) -> Vec<serde_json::Value> {
    report_lines(&fs::read_to_string(path).unwrap_or_default())
        .into_iter()
        .filter(|v| v.get("recipient").is_some())
        .collect()
}

/// Defect 2: Ctrl-C on a campaign stops taking new work, lets what is in flight finish, writes
/// the report, journal and summary and exits 130; the same command resumes and finishes, and
/// every recipient gets the newsletter.
#[test]
fn ctrl_c_stops_a_campaign_cleanly_and_it_resumes() {
    const N: usize = 60;
    let d = Dir::new("cli-ctrl-c");
    // Every reply held 100 ms: the send takes long enough to be interrupted midway.
    let sink = Sink::start(SinkConfig {
        faults: Faults {
            reply_delay: Some(Duration::from_millis(100)),
            ..Faults::default()
        },
        ..SinkConfig::default()
    })
    .expect("sink starts");
    let addresses: Vec<String> = (0..N).map(|i| format!("reader{i}@example.net")).collect();
    let refs: Vec<&str> = addresses.iter().map(String::as_str).collect();
    let file = campaign(&d, &sink.local_addr().to_string(), &refs);
    let toml = d.read("campaign.toml") + "[limits]\nconnections = 2\nlookahead = 4\n";
    d.write("campaign.toml", toml);
    let journal = d.path("send.journal");
    let report = d.path("report.jsonl");
    let start = || {
        mxpipe()
            .arg("send")
            .arg(&file)
            .arg("--journal")
            .arg(&journal)
            .arg("--report")
            .arg(&report)
            .arg("--json")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mxpipe send")
    };

    let child = start();
    let deadline = Instant::now() + Duration::from_secs(30);
    while outcome_lines(&journal).len() < 5 {
        assert!(Instant::now() < deadline, "the journal does not grow");
        std::thread::sleep(Duration::from_millis(10));
    }
    signal(&child, libc::SIGINT);
    let out = finish(child);
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    let summary = json_summary(&out);
    assert_eq!(summary["interrupted"], true, "{summary}");
    let first_journal = outcome_lines(&journal);
    let delivered = summary["delivered"].as_u64().unwrap() as usize;
    assert!((5..N).contains(&delivered), "{summary}");
    assert_eq!(first_journal.len(), delivered, "{summary}");
    // The report has every final outcome the journal has.
    assert_eq!(statuses(&outcome_lines(&report)), statuses(&first_journal));
    assert!(
        stderr(&out).contains(
            " sent in this run had no outcome yet; the same command resumes from the journal"
        ),
        "{}",
        stderr(&out)
    );

    // The same command again finishes the job.
    let out = finish(start());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let summary = json_summary(&out);
    assert_eq!(summary["already_final"].as_u64(), Some(delivered as u64));
    assert_eq!(summary["delivered"].as_u64(), Some((N - delivered) as u64));
    let all = outcome_lines(&journal);
    let mut in_journal: Vec<&str> = all
        .iter()
        .map(|v| v["recipient"].as_str().unwrap())
        .collect();
    in_journal.sort();
    in_journal.dedup();
    assert_eq!(in_journal.len(), N);
    assert_eq!(all.len(), N, "nobody is journaled twice");
    // Only what was in flight at the signal may have been sent twice.
    let messages = sink.stop().messages as usize;
    assert!((N..=N + 4 + 2).contains(&messages), "{messages}");
}

/// Defect 2: Ctrl-C in message mode writes what is not final to the report and exits 130; a
/// second signal ends the process at once.
#[test]
fn ctrl_c_in_message_mode_reports_what_is_not_final() {
    let d = Dir::new("cli-ctrl-c-message");
    let sink = Sink::start(SinkConfig {
        faults: Faults {
            tempfail_rcpt: vec!["bob@".into()],
            ..Faults::default()
        },
        ..SinkConfig::default()
    })
    .expect("sink starts");
    d.write(
        "message.eml",
        "From: news@example.org\r\nSubject: hi\r\n\r\nHello.\r\n",
    );
    d.write("list.txt", "ann@example.net\nbob@example.net\n");
    let report = d.path("report.jsonl");
    let relay = sink.local_addr().to_string();
    let (list, message) = (d.path("list.txt"), d.path("message.eml"));
    let args = [
        OsStr::new("--relay"),
        OsStr::new(&relay),
        OsStr::new("--from"),
        OsStr::new("news@example.org"),
        OsStr::new("--to-file"),
        list.as_os_str(),
        OsStr::new("--report"),
        report.as_os_str(),
        OsStr::new("--wait-final"),
        message.as_os_str(),
    ];
    let child = spawn_send(&args);
    assert!(
        wait_for_line(&report, "ann@example.net"),
        "ann is not delivered"
    );
    signal(&child, libc::SIGTERM);
    let out = finish(child);
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert_eq!(
        statuses(&outcome_lines(&report)),
        [
            ("ann@example.net".to_string(), "delivered".to_string()),
            ("bob@example.net".to_string(), "not_final".to_string())
        ]
    );
    assert!(
        stdout(&out).starts_with("recipients=2 delivered=1 "),
        "{}",
        stdout(&out)
    );
    assert!(stderr(&out).contains("mxpipe: 1 recipient not final at exit (interrupted;"));

    sink.stop();

    // Two signals: no grace period (no summary either), the same exit code. The tarpit holds
    // ann's transaction in flight for 5 s, which one signal would wait for.
    let tarpit = Sink::start(SinkConfig {
        faults: Faults {
            reply_delay: Some(Duration::from_secs(5)),
            ..Faults::default()
        },
        ..SinkConfig::default()
    })
    .expect("sink starts");
    let relay = tarpit.local_addr().to_string();
    let mut args = args;
    args[1] = OsStr::new(&relay);
    let _ = fs::remove_file(&report);
    let child = spawn_send(&args);
    // The report is created after the signal handler is installed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !report.exists() {
        assert!(Instant::now() < deadline, "no report");
        std::thread::sleep(Duration::from_millis(10));
    }
    signal(&child, libc::SIGINT);
    std::thread::sleep(Duration::from_millis(200));
    signal(&child, libc::SIGINT);
    let out = finish(child);
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "",
        "a second signal exits at once, without a summary"
    );
    tarpit.stop();
}

/// `mxpipe check` against a private Postfix with VRFY on and off, and against smtp-sink (which
/// takes every address: a catch-all); never a DATA.
/// Postfix's log once smtpd has logged the end of the session (its "disconnect from" line,
/// with the command counts, may come a moment after the client is gone).
fn disconnect_logged(postfix: &util::postfix::Postfix) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = postfix.log();
        if log.contains(" disconnect from ") || Instant::now() >= deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn check_asks_vrfy_or_rcpt_and_never_sends_data() {
    let run_check = |server: std::net::SocketAddr, addresses: &[&str]| {
        run(mxpipe()
            .args(["check", "--per-second", "100", "--server"])
            .arg(server.to_string())
            .args(addresses))
    };
    let postfix = util::postfix::Postfix::start_local("disable_vrfy_command = no");
    let out = run_check(
        postfix.addr(),
        &["root@example.test", "nosuch@example.test", "not-an-address"],
    );
    let at = postfix.addr();
    assert_eq!(
        stdout(&out),
        format!(
            "root@example.test deliverable 250 2.1.5 Ok (RCPT at {at})\n\
             nosuch@example.test rejected 550 5.1.1 <nosuch@example.test>: Recipient address rejected: User unknown in local recipient table (VRFY at {at})\n\
             not-an-address rejected not an address: has no '@'\n"
        ),
        "{}",
        stderr(&out)
    );
    assert_eq!(out.status.code(), Some(1));
    let log = disconnect_logged(&postfix);
    assert!(
        log.contains(" vrfy=1/2 "),
        "both addresses were asked with VRFY: {log}"
    );
    assert!(!log.contains("data="), "{log}");
    drop(postfix);

    let postfix = util::postfix::Postfix::start_local("disable_vrfy_command = yes");
    let at = postfix.addr();
    let out = run_check(at, &["root@example.test", "nosuch@example.test"]);
    assert_eq!(
        stdout(&out),
        format!(
            "root@example.test deliverable 250 2.1.5 Ok (RCPT at {at})\n\
             nosuch@example.test rejected 550 5.1.1 <nosuch@example.test>: Recipient address rejected: User unknown in local recipient table (RCPT at {at})\n"
        )
    );
    let log = disconnect_logged(&postfix);
    assert!(log.contains("vrfy=0/1"), "VRFY was tried once: {log}");
    assert!(!log.contains("data="), "{log}");
    drop(postfix);

    let sink = util::SmtpSink::start_dumping("127.0.0.1", &["-f", "VRFY"]);
    let out = run_check(sink.addr(), &["ann@example.net"]);
    let at = sink.addr();
    assert_eq!(
        stdout(&out),
        format!("ann@example.net catch-all 250 2.1.5 Ok (RCPT at {at})\n")
    );
    assert_eq!(out.status.code(), Some(0));
    // smtp-sink keeps a dump of every transaction that reached the end of DATA: none did.
    assert!(sink.dumps().is_empty());
}

/// `--trace FILE`: the dialogue of every connection, with AUTH secrets and content redacted.
#[test]
fn trace_writes_the_dialogue_without_secrets_or_content() {
    let d = Dir::new("cli-trace");
    let sink = util::SmtpSink::start_dumping("127.0.0.1", &[]);
    d.write(
        "message.eml",
        "From: news@example.org\r\nSubject: hi\r\n\r\nPRIVATE-BODY-LINE\r\n",
    );
    d.write("list.txt", "ann@example.net\n");
    let send = |auth: bool| {
        let mut command = mxpipe();
        command
            .args(["send", "--relay", &sink.addr().to_string()])
            .args(["--from", "news@example.org", "--to-file"])
            .arg(d.path("list.txt"))
            .arg("--trace")
            .arg(d.path("trace.txt"))
            .arg(d.path("message.eml"));
        if auth {
            command
                .args([
                    "--auth-user",
                    "bulk",
                    "--auth-password-env",
                    "MXPIPE_TEST_SECRET",
                ])
                .arg("--allow-plaintext-auth")
                .env("MXPIPE_TEST_SECRET", "s3cret-Pa55");
        }
        let out = run(&mut command);
        let trace = d.read("trace.txt");
        // "1.234567 c1 > MAIL FROM:<...>": the time, the connection, the direction, the line.
        let lines: Vec<String> = trace
            .lines()
            .map(|l| l.split_once(' ').expect("a timestamp").1.to_string())
            .collect();
        (out, trace, lines)
    };
    let at = sink.addr();

    // smtp-sink answers AUTH with 250, not 235 (RFC 4954), so the login fails; the secret
    // never shows.
    let (out, trace, lines) = send(true);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        lines.contains(&"c1 > AUTH PLAIN [redacted]".to_string()),
        "{trace}"
    );
    use base64::Engine as _;
    let secret = base64::engine::general_purpose::STANDARD.encode("\0bulk\0s3cret-Pa55");
    assert!(
        !trace.contains(&secret) && !trace.contains("s3cret"),
        "{trace}"
    );

    let (out, trace, lines) = send(false);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    for expected in [
        format!("c1 = connect {at}"),
        "c1 < 220 smtp-sink ESMTP".to_string(),
        "c1 > EHLO localhost".to_string(),
        "c1 < 250-PIPELINING".to_string(),
        "c1 > MAIL FROM:<news@example.org>".to_string(),
        "c1 > RCPT TO:<ann@example.net>".to_string(),
        "c1 > DATA".to_string(),
        "c1 < 354 End data with <CR><LF>.<CR><LF>".to_string(),
        "c1 > .".to_string(),
        "c1 = close".to_string(),
    ] {
        assert!(lines.contains(&expected), "{expected:?} not in:\n{trace}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("c1 > [message content: ")),
        "{trace}"
    );
    assert!(!trace.contains("PRIVATE-BODY-LINE"), "{trace}");
    assert_eq!(sink.dumps().len(), 1);
}

/// `--bdat-window N`: with the default window MAIL, RCPT and `BDAT LAST` with its content go
/// out before any reply; with 0, BDAT waits for the RCPT replies. Out of range: refused,
/// naming the option.
#[test]
fn bdat_window_option_sets_how_bdat_is_pipelined() {
    let d = Dir::new("cli-bdat-window");
    let sink = Sink::start(SinkConfig::default()).expect("sink starts");
    d.write(
        "message.eml",
        "From: news@example.org\r\nSubject: hi\r\n\r\nhello\r\n",
    );
    d.write("list.txt", "ann@example.net\n");
    // The replies the client had read when it wrote BDAT.
    let replies_before_bdat = |window: Option<&str>| -> usize {
        let mut command = mxpipe();
        command
            .args(["send", "--relay", &sink.local_addr().to_string()])
            .args(["--from", "news@example.org", "--to-file"])
            .arg(d.path("list.txt"))
            .arg("--trace")
            .arg(d.path("trace.txt"))
            .arg(d.path("message.eml"));
        if let Some(n) = window {
            command.args(["--bdat-window", n]);
        }
        let out = run(&mut command);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let trace = d.read("trace.txt");
        let lines: Vec<&str> = trace
            .lines()
            .map(|l| l.split_once(' ').expect("a timestamp").1)
            .collect();
        let mail = lines
            .iter()
            .position(|l| l.starts_with("c1 > MAIL FROM:"))
            .unwrap_or_else(|| panic!("no MAIL in:\n{trace}"));
        let bdat = lines
            .iter()
            .position(|l| l.starts_with("c1 > BDAT "))
            .unwrap_or_else(|| panic!("no BDAT in:\n{trace}"));
        assert!(mail < bdat, "{trace}");
        lines[mail..bdat]
            .iter()
            .filter(|l| l.starts_with("c1 < "))
            .count()
    };
    assert_eq!(replies_before_bdat(None), 0);
    assert_eq!(replies_before_bdat(Some("8")), 0);
    // The replies to MAIL and RCPT.
    assert_eq!(replies_before_bdat(Some("0")), 2);

    let out = run(mxpipe().args([
        "send",
        "--relay",
        "127.0.0.1:9",
        "--from",
        "news@example.org",
        "--to-file",
        "list.txt",
        "--bdat-window",
        "1025",
        "message.eml",
    ]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--bdat-window"), "{}", stderr(&out));
}
