//! Campaigns end to end: rendered messages read back by Python's `email` package, DKIM
//! signatures checked by dkimpy, 10,000 personalised messages through the built-in sink, a send
//! killed with SIGKILL and resumed, and the errors bad input gets. Helpers in
//! `tests/servers/mail_check.py` do the independent parsing and verifying.

mod util;

use base64::Engine as _;
use mxpipe::campaign::{Campaign, SendOptions, SkipKind};
use mxpipe::sink::{Faults, Sink, SinkConfig};
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A directory of campaign inputs, removed on drop.
struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    fn new(label: &str) -> Fixture {
        Fixture {
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

    fn load(&self) -> Campaign {
        Campaign::load(&self.path("campaign.toml")).unwrap_or_else(|e| panic!("load: {e}"))
    }

    fn load_error(&self) -> String {
        Campaign::load(&self.path("campaign.toml"))
            .expect_err("the campaign should be refused")
            .to_string()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Runs `tests/servers/mail_check.py` with the test venv's Python; panics with its stderr on
/// failure.
fn mail_check(args: &[&str]) -> String {
    let script = util::repo_root().join("tests/servers/mail_check.py");
    let out = Command::new(util::test_python())
        .arg(&script)
        .args(args)
        .output()
        .expect("run mail_check.py");
    assert!(
        out.status.success(),
        "mail_check.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

fn parse_with_python(files: &[PathBuf]) -> Vec<serde_json::Value> {
    let mut args = vec!["parse"];
    args.extend(files.iter().map(|f| f.to_str().unwrap()));
    serde_json::from_str(&mail_check(&args)).expect("JSON from mail_check.py parse")
}

fn render_to_files(campaign: &Campaign, dir: &Path) -> Vec<PathBuf> {
    (0..campaign.len())
        .map(|i| {
            let rendered = campaign
                .render(i)
                .unwrap_or_else(|e| panic!("render {i}: {e}"));
            let path = dir.join(format!("{i}.eml"));
            fs::write(&path, &rendered.content).unwrap();
            path
        })
        .collect()
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

#[test]
fn rendered_messages_round_trip_through_python_email() {
    let f = Fixture::new("campaign-mime");
    let people = [
        ("ann@example.net", "Ann", "Zürich"),
        ("bob@example.com", "Bob \"the builder\" O'Neil", "東京"),
        ("zoe@example.org", "Zoë <&>", "Paris"),
    ];
    let mut csv = String::from("email,first_name,city\n");
    for (email, name, city) in people {
        writeln!(csv, "{email},\"{}\",{city}", name.replace('"', "\"\"")).unwrap();
    }
    f.write("recipients.csv", csv);
    let long_line = "word ".repeat(80);
    f.write(
        "body.txt",
        format!(
            "Hello {{{{first_name}}}} from {{{{city}}}}!\ntrailing space \n{long_line}\n=equals= and\n.a dot line\n"
        ),
    );
    let binary: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    f.write("data.bin", &binary);
    f.write("report.pdf", b"%PDF-1.4 pretend\n");
    f.write(
        "campaign.toml",
        r#"
from = "Rédaction <news@example.org>"
subject = "Grüße aus {{city}}, {{first_name}} — a long subject line that has to be folded over more than one line"
text_file = "body.txt"
html = """
<p>Hello {{first_name}} from {{city}}</p>
"""
recipients = "recipients.csv"
to_name = "{{first_name}}"

[headers]
X-City = "{{city}}"

[[attachments]]
file = "data.bin"
name = "Daten für {{city}} ü.bin"

[[attachments]]
file = "report.pdf"

[list_unsubscribe]
url = "https://example.org/unsubscribe?u={{email}}"
mailto = "unsubscribe@example.org"

[delivery]
relay = "127.0.0.1:25"
"#,
    );
    let campaign = f.load();
    assert_eq!(campaign.len(), 3);
    let files = render_to_files(&campaign, &f.dir);
    let parsed = parse_with_python(&files);
    let mut ids = HashSet::new();
    for ((email, name, city), m) in people.iter().zip(&parsed) {
        let expect_subject = format!(
            "Grüße aus {city}, {name} — a long subject line that has to be folded over more than one line"
        );
        assert_eq!(m["subject"], expect_subject.as_str());
        assert_eq!(m["from_display"], "Rédaction");
        assert_eq!(m["from_address"], "news@example.org");
        assert_eq!(m["to_display"], *name);
        assert_eq!(m["to_address"], *email);
        assert_eq!(m["mime_version"], "1.0");
        assert_eq!(
            m["structure"],
            serde_json::json!([
                "multipart/mixed",
                "multipart/alternative",
                "text/plain",
                "text/html",
                "application/octet-stream",
                "application/pdf"
            ])
        );
        let text = m["text"].as_str().unwrap().replace("\r\n", "\n");
        assert_eq!(
            text,
            format!("Hello {name} from {city}!\ntrailing space \n{long_line}\n=equals= and\n.a dot line\n")
        );
        let html_name = name
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
            .replace('\'', "&#39;");
        assert_eq!(
            m["html"].as_str().unwrap().replace("\r\n", "\n"),
            format!("<p>Hello {html_name} from {city}</p>\n")
        );
        let attachments = m["attachments"].as_array().unwrap();
        assert_eq!(attachments.len(), 2);
        // Attachment names are not templates: the braces stay.
        assert_eq!(attachments[0]["filename"], "Daten für {{city}} ü.bin");
        assert_eq!(attachments[0]["data"], b64(&binary).as_str());
        assert_eq!(attachments[1]["filename"], "report.pdf");
        assert_eq!(attachments[1]["content_type"], "application/pdf");
        assert_eq!(attachments[1]["data"], b64(b"%PDF-1.4 pretend\n").as_str());
        let unsubscribe = format!(
            "<https://example.org/unsubscribe?u={}>, <mailto:unsubscribe@example.org>",
            email.replace('@', "%40")
        );
        assert_eq!(m["list_unsubscribe"], unsubscribe.as_str());
        assert_eq!(m["list_unsubscribe_post"], "List-Unsubscribe=One-Click");
        assert_eq!(m["defects"], serde_json::json!([]), "{email}");
        assert!(
            m["max_line"].as_u64().unwrap() <= 78,
            "{email}: {}",
            m["max_line"]
        );
        assert_eq!(m["bare_lf"], 0);
        assert!(!m["date"].as_str().unwrap().is_empty());
        assert!(ids.insert(m["message_id"].as_str().unwrap().to_string()));
    }
}

/// Writes a small campaign signed with `key_file` and `algorithm`.
fn dkim_fixture(f: &Fixture, key_file: &str, algorithm: &str) {
    f.write(
        "recipients.csv",
        "email,first_name\nann@example.net,Ann\nbob@example.com,Bøb\n",
    );
    f.write(
        "campaign.toml",
        format!(
            r#"
from = "News <news@example.org>"
subject = "Hello {{{{first_name}}}}, the news"
text = "Dear {{{{first_name}}}},  here  is  the news.\n\n"
html = "<p>Dear {{{{first_name}}}}</p>"
recipients = "recipients.csv"

[list_unsubscribe]
url = "https://example.org/u?e={{{{email}}}}"

[delivery]
relay = "127.0.0.1:25"

[dkim]
domain = "example.org"
selector = "news2026"
key_file = "{key_file}"
algorithm = "{algorithm}"
"#
        ),
    );
}

#[test]
fn dkim_signatures_verify_with_dkimpy() {
    let f = Fixture::new("campaign-dkim");
    let keys = f.path("keys");
    fs::create_dir(&keys).unwrap();
    mail_check(&["keygen", keys.to_str().unwrap()]);
    let records: HashMap<String, String> =
        serde_json::from_str(&fs::read_to_string(keys.join("records.json")).unwrap()).unwrap();
    for (key, algorithm, kind) in [
        ("keys/rsa-pkcs8.pem", "rsa-sha256", "rsa"),
        ("keys/rsa-pkcs1.pem", "rsa-sha256", "rsa"),
        ("keys/ed25519.pem", "ed25519-sha256", "ed25519"),
    ] {
        dkim_fixture(&f, key, algorithm);
        let campaign = f.load();
        let (name, record) = campaign.dkim_record().expect("signing");
        assert_eq!(name, "news2026._domainkey.example.org");
        // The record mxpipe prints is the one `cryptography` derives from the same key.
        assert_eq!(record, records[kind], "{key}");
        let mut files = render_to_files(&campaign, &f.dir);
        let good = fs::read(&files[0]).unwrap();
        let text = String::from_utf8(good.clone()).unwrap();
        assert!(text.starts_with(&format!(
            "DKIM-Signature: v=1; a={algorithm}; c=relaxed/relaxed; d=example.org; s=news2026;"
        )));
        // Tampered copies: a changed body word, and a changed subject.
        let body_tampered = text.replace("here  is", "here  was");
        assert_ne!(body_tampered, text);
        let subject_tampered = text.replace("Subject: Hello Ann", "Subject: Hello Eve");
        assert_ne!(subject_tampered, text);
        // Re-folding and extra spaces are what relaxed canonicalization forgives.
        let refolded = text.replace("Subject: Hello Ann,", "Subject:  Hello\r\n  Ann,");
        assert_ne!(refolded, text);
        for (name, content) in [
            ("body.eml", body_tampered),
            ("subject.eml", subject_tampered),
            ("refolded.eml", refolded),
        ] {
            files.push(f.write(name, content));
        }
        let mut args = vec!["dkim-verify", name.as_str(), record.as_str()];
        args.extend(files.iter().map(|p| p.to_str().unwrap()));
        let verdicts: Vec<String> = mail_check(&args).lines().map(str::to_string).collect();
        assert_eq!(verdicts, ["pass", "pass", "fail", "fail", "pass"], "{key}");
    }

    dkim_fixture(&f, "keys/rsa-1024.pem", "rsa-sha256");
    let error = f.load_error();
    assert_eq!(
        error,
        format!(
            "{}:17: dkim: {}: not a usable rsa-sha256 key: the key is too small (RSA keys need at least 2048 bits)",
            f.path("campaign.toml").display(),
            f.path("keys/rsa-1024.pem").display()
        )
    );
    dkim_fixture(&f, "keys/ed25519.pem", "rsa-sha256");
    assert!(
        f.load_error()
            .ends_with("ed25519.pem: not a usable rsa-sha256 key: the key is of another algorithm")
            || f.load_error().ends_with(
                "ed25519.pem: not a usable rsa-sha256 key: the key is not valid DER for this algorithm"
            ),
        "{}",
        f.load_error()
    );
}

/// Lines of a CSV report as maps of column to value.
fn read_csv_report(path: &Path) -> Vec<HashMap<String, String>> {
    let mut reader = csv::Reader::from_path(path).expect("report exists");
    let header = reader.headers().unwrap().clone();
    reader
        .records()
        .map(|r| {
            let r = r.unwrap();
            header
                .iter()
                .zip(r.iter())
                .map(|(h, v)| (h.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

/// The envelopes and contents the built-in sink captured.
fn captured(dir: &Path) -> Vec<(serde_json::Value, String)> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let envelope: serde_json::Value =
                serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
            let eml = fs::read_to_string(path.with_extension("eml")).unwrap();
            out.push((envelope, eml));
        }
    }
    out
}

fn ed25519_pem() -> String {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        b64(pkcs8.as_ref())
    )
}

/// A campaign of `n` recipients `user<i>@<domain i%7>.example` sent to `relay`.
fn bulk_fixture(f: &Fixture, n: usize, relay: &str, limits: &str) {
    let mut csv = String::from("email,first_name,id\n");
    for i in 0..n {
        writeln!(csv, "user{i}@d{}.example,Name{i},{i}", i % 7).unwrap();
    }
    f.write("recipients.csv", csv);
    f.write("dkim.pem", ed25519_pem());
    f.write(
        "campaign.toml",
        format!(
            r#"
from = "News <news@example.org>"
subject = "News for {{{{first_name}}}}"
text = "Hello {{{{first_name}}}}, your id is {{{{id}}}}."
recipients = "recipients.csv"
return_path = "bounces+{{local}}={{domain}}@example.org"

[list_unsubscribe]
url = "https://example.org/u/{{{{id}}}}"
mailto = "unsubscribe+{{{{id}}}}@example.org"

[delivery]
relay = "{relay}"
ehlo_name = "campaign.mxpipe.test"

[limits]
{limits}

[dkim]
domain = "example.org"
selector = "s1"
key_file = "dkim.pem"
algorithm = "ed25519-sha256"
"#
        ),
    );
}

/// Checks one captured message is recipient `i`'s own.
fn check_personalised(envelope: &serde_json::Value, eml: &str) -> usize {
    let rcpt = envelope["rcpt_to"].as_array().unwrap();
    assert_eq!(rcpt.len(), 1, "one recipient per message");
    let rcpt = rcpt[0].as_str().unwrap();
    let (local, domain) = rcpt.split_once('@').unwrap();
    let i: usize = local.strip_prefix("user").unwrap().parse().unwrap();
    assert_eq!(
        envelope["mail_from"].as_str().unwrap(),
        format!("bounces+{local}={domain}@example.org"),
        "VERP return path"
    );
    for expected in [
        format!("To: <{rcpt}>\r\n"),
        format!("Subject: News for Name{i}\r\n"),
        format!("List-Unsubscribe: <https://example.org/u/{i}>,\r\n <mailto:unsubscribe+{i}@example.org>\r\n"),
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n".to_string(),
        format!("Hello Name{i}, your id is {i}."),
    ] {
        assert!(eml.contains(&expected), "{rcpt}: no {expected:?} in\n{eml}");
    }
    assert!(eml.starts_with("DKIM-Signature: v=1; a=ed25519-sha256;"));
    i
}

#[test]
fn ten_thousand_personalised_messages_through_the_sink() {
    const N: usize = 10_000;
    let f = Fixture::new("campaign-bulk");
    let capture = f.path("capture");
    let sink = Sink::start(SinkConfig {
        capture_dir: Some(capture.clone()),
        ..SinkConfig::default()
    })
    .expect("sink starts");
    let relay = sink.local_addr().to_string();
    bulk_fixture(&f, N, &relay, "connections = 8");
    let campaign = f.load();
    assert_eq!(campaign.len(), N);
    let report = f.path("report.csv");
    let summary = campaign
        .send(&SendOptions {
            report: Some(report.clone()),
            journal: None,
            progress: false,
            ..SendOptions::default()
        })
        .unwrap_or_else(|e| panic!("send: {e}"));
    let stats = sink.stop();
    assert_eq!(summary.delivered, N as u64, "{summary:?}");
    assert_eq!(summary.submitted, N as u64);
    assert!(summary.is_clean());
    assert_eq!(stats.messages, N as u64);

    let mut seen = vec![0u32; N];
    for (envelope, eml) in captured(&capture) {
        seen[check_personalised(&envelope, &eml)] += 1;
    }
    assert!(seen.iter().all(|&n| n == 1), "every recipient exactly once");

    let lines = read_csv_report(&report);
    assert_eq!(lines.len(), N);
    let mut in_report = HashSet::new();
    for line in &lines {
        assert_eq!(line["status"], "delivered", "{line:?}");
        assert_eq!(line["code"], "250");
        assert_eq!(line["attempts"], "1");
        assert_eq!(line["destination"], relay);
        assert!(line["time"].ends_with('Z'));
        assert!(
            in_report.insert(line["recipient"].clone()),
            "{line:?} twice"
        );
    }
}

#[test]
fn deferrals_and_bounces_reach_the_report() {
    const N: usize = 40;
    let f = Fixture::new("campaign-faults");
    let sink = Sink::start(SinkConfig {
        faults: Faults {
            reject_rcpt: vec!["user7@".into(), "user13@".into()],
            tempfail_first_transactions: 5,
            ..Faults::default()
        },
        ..SinkConfig::default()
    })
    .expect("sink starts");
    let relay = sink.local_addr().to_string();
    bulk_fixture(
        &f,
        N,
        &relay,
        "connections = 2\nretry_after_secs = 1\nmax_age_secs = 60",
    );
    let report = f.path("report.jsonl");
    let summary = f
        .load()
        .send(&SendOptions {
            report: Some(report.clone()),
            journal: None,
            progress: false,
            ..SendOptions::default()
        })
        .unwrap_or_else(|e| panic!("send: {e}"));
    assert_eq!(summary.delivered, N as u64 - 2, "{summary:?}");
    assert_eq!(summary.bounced, 2);
    assert_eq!(
        summary.deferrals, 5,
        "the first 5 transactions were deferred"
    );
    assert!(!summary.is_clean());
    let mut by_recipient = HashMap::new();
    for line in fs::read_to_string(&report).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let old = by_recipient.insert(v["recipient"].as_str().unwrap().to_string(), v);
        assert!(old.is_none(), "one line per recipient");
    }
    assert_eq!(by_recipient.len(), N);
    let bounced = &by_recipient["user7@d0.example"];
    assert_eq!(bounced["status"], "bounced");
    assert_eq!(bounced["code"], 550);
    assert_eq!(bounced["enhanced"], "5.1.1");
    assert_eq!(
        bounced["text"],
        "<user7@d0.example>: Recipient address rejected: User unknown"
    );
    assert_eq!(bounced["destination"], relay.as_str());
    let retried: Vec<_> = by_recipient
        .values()
        .filter(|v| v["attempts"] == 2)
        .collect();
    assert_eq!(retried.len(), 5, "deferred once, then delivered");
    assert!(retried.iter().all(|v| v["status"] == "delivered"));
}

/// Lines in a file (0 when missing).
fn count_lines(path: &Path) -> usize {
    fs::read(path)
        .map(|b| b.iter().filter(|&&c| c == b'\n').count())
        .unwrap_or(0)
}

/// A number from the clock, for picking kill points (no RNG crate in the tests).
fn jitter(modulo: usize) -> usize {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as usize
        % modulo
}

#[test]
fn killed_sends_resume_without_losing_anyone() {
    const N: usize = 3_000;
    const LOOKAHEAD: usize = 20;
    const CONNECTIONS: usize = 4;
    const KILLS: usize = 3;
    let f = Fixture::new("campaign-kill");
    let capture = f.path("capture");
    let sink = Sink::start(SinkConfig {
        capture_dir: Some(capture.clone()),
        faults: Faults {
            // Slow enough that a kill lands mid-send.
            reply_delay: Some(Duration::from_millis(2)),
            ..Faults::default()
        },
        ..SinkConfig::default()
    })
    .expect("sink starts");
    bulk_fixture(
        &f,
        N,
        &sink.local_addr().to_string(),
        &format!("connections = {CONNECTIONS}\nlookahead = {LOOKAHEAD}\nrender_threads = 2"),
    );
    let journal = f.path("send.journal");
    let report = f.path("report.jsonl");
    let send = || {
        Command::new(env!("CARGO_BIN_EXE_mxpipe"))
            .arg("send")
            .arg(f.path("campaign.toml"))
            .arg("--journal")
            .arg(&journal)
            .arg("--report")
            .arg(&report)
            .arg("--quiet")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mxpipe send")
    };
    for kill in 0..KILLS {
        let before = count_lines(&journal);
        // Kill once the journal has grown by a random amount: mid-send, at a different point
        // each time.
        let target = before + 1 + jitter(N / (KILLS + 1));
        let mut child = send();
        let deadline = Instant::now() + Duration::from_secs(60);
        while count_lines(&journal) < target {
            assert!(Instant::now() < deadline, "kill {kill}: journal stuck");
            if let Some(status) = child.try_wait().unwrap() {
                panic!("kill {kill}: mxpipe exited early ({status})");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(jitter(40) as u64));
        // SIGKILL by the child's own PID.
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let child = send();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "final run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = sink.stop();

    let mut seen = vec![0u32; N];
    for (envelope, eml) in captured(&capture) {
        seen[check_personalised(&envelope, &eml)] += 1;
    }
    assert!(seen.iter().all(|&n| n >= 1), "every recipient delivered");
    let twice = seen.iter().filter(|&&n| n > 1).count();
    eprintln!("{twice} of {N} recipients got a second message after {KILLS} kills");
    // What may be sent twice: messages in flight at a kill (rendered or queued ahead, on a
    // connection, or accepted with the outcome not yet journaled).
    let in_flight = 2 * LOOKAHEAD + CONNECTIONS + 2;
    assert!(
        twice <= KILLS * in_flight,
        "{twice} recipients got two messages, more than {KILLS} kills × {in_flight} in flight"
    );

    let mut in_journal = HashSet::new();
    let text = fs::read_to_string(&journal).unwrap();
    let (header, outcomes) = text.split_once('\n').unwrap();
    // The first line names the campaign the journal belongs to.
    let header: serde_json::Value = serde_json::from_str(header).unwrap();
    assert!(header["campaign"].is_string(), "{header}");
    for line in outcomes.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(in_journal.insert(v["recipient"].as_str().unwrap().to_string()));
    }
    assert_eq!(in_journal.len(), N);
    let mut in_report = HashSet::new();
    for line in fs::read_to_string(&report).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["status"], "delivered");
        assert!(in_report.insert(v["recipient"].as_str().unwrap().to_string()));
    }
    assert_eq!(in_report.len(), N, "the report lists every recipient once");
}

/// A valid campaign with one recipients file and body files; tests then break one thing.
fn small_fixture(f: &Fixture) {
    f.write(
        "recipients.csv",
        "email,first_name,last_name\nann@example.net,Ann,Lee\nbad-address,Bad,Row\nbob@example.com,Bob\ncarol@Example.ORG,Carol,Kim\n\"CAROL@example.org\",Carol,Again\nmallory@blocked.example,M,X\n\"eve@example.net\",\"Eve\r\nBcc: x@y.example\",Z\n",
    );
    f.write(
        "suppressed.txt",
        "# never\nblocked.example\nsomeone@example.org\n",
    );
    f.write("body.txt", "Hello {{first_name}},\n\nbye\n");
    f.write(
        "campaign.toml",
        r#"from = "News <news@example.org>"
subject = "Hi {{first_name}}"
text_file = "body.txt"
recipients = "recipients.csv"
suppression = "suppressed.txt"

[delivery]
relay = "127.0.0.1:25"
"#,
    );
}

fn replace_in(f: &Fixture, name: &str, from: &str, to: &str) {
    let path = f.path(name);
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{from:?} not in {name}");
    fs::write(&path, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn bad_rows_are_skipped_with_their_line_and_reason() {
    let f = Fixture::new("campaign-rows");
    small_fixture(&f);
    let campaign = f.load();
    assert_eq!(campaign.len(), 2, "ann and carol");
    let skipped: Vec<(u64, &str, SkipKind, &str)> = campaign
        .skipped()
        .iter()
        .map(|s| (s.line, s.recipient.as_str(), s.kind, s.reason.as_str()))
        .collect();
    assert_eq!(
        skipped,
        [
            (
                3,
                "bad-address",
                SkipKind::Invalid,
                "email: address has no '@'"
            ),
            (
                4,
                "bob@example.com",
                SkipKind::Invalid,
                "the row has 2 fields, the header 3 (missing \"last_name\")"
            ),
            (
                6,
                "CAROL@example.org",
                SkipKind::Duplicate,
                "duplicate of line 5"
            ),
            (
                7,
                "mallory@blocked.example",
                SkipKind::Suppressed,
                "on the suppression list"
            ),
            (
                8,
                "eve@example.net",
                SkipKind::Invalid,
                "first_name: contains a line break or control character, and a header uses it"
            ),
        ]
    );
}

#[test]
fn bad_input_is_refused_before_anything_is_sent() {
    let f = Fixture::new("campaign-errors");
    let toml = f.path("campaign.toml").display().to_string();
    let dir = f.dir.display().to_string();
    let check = |setup: &dyn Fn(), expected: String| {
        small_fixture(&f);
        setup();
        assert_eq!(f.load_error(), expected);
    };
    check(
        &|| replace_in(&f, "campaign.toml", "Hi {{first_name}}", "Hi {{frist_name}}"),
        format!("{toml}:2: subject: unknown merge field \"frist_name\" ({dir}/recipients.csv has columns: email, first_name, last_name)"),
    );
    check(
        &|| replace_in(&f, "body.txt", "bye", "bye {{ nickname }}"),
        format!("{dir}/body.txt:3: text_file: unknown merge field \"nickname\" ({dir}/recipients.csv has columns: email, first_name, last_name)"),
    );
    check(
        &|| replace_in(&f, "body.txt", "bye", "bye {{first_name"),
        format!("{dir}/body.txt:3: text_file: \"{{{{\" without a closing \"}}}}\""),
    );
    check(
        &|| {
            replace_in(
                &f,
                "campaign.toml",
                "[delivery]",
                "[[attachments]]\nfile = \"missing.pdf\"\n\n[delivery]",
            )
        },
        format!("{toml}:8: attachments[0].file: cannot read {dir}/missing.pdf: No such file or directory (os error 2)"),
    );
    check(
        &|| {
            replace_in(
                &f,
                "campaign.toml",
                "[delivery]",
                "[dkim]\ndomain = \"example.org\"\nselector = \"s1\"\nkey_file = \"nokey.pem\"\n\n[delivery]",
            )
        },
        format!("{toml}:10: dkim.key_file: cannot read {dir}/nokey.pem: No such file or directory (os error 2)"),
    );
    check(
        &|| {
            f.write(
                "bad.pem",
                "-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n",
            );
            replace_in(
                &f,
                "campaign.toml",
                "[delivery]",
                "[dkim]\ndomain = \"example.org\"\nselector = \"s1\"\nkey_file = \"bad.pem\"\n\n[delivery]",
            )
        },
        format!("{toml}:10: dkim: {dir}/bad.pem: not a PEM private key (no valid BEGIN/END block)"),
    );
    check(
        &|| replace_in(&f, "campaign.toml", "[delivery]", "[delivery]\nmode = \"carrier-pigeon\""),
        format!("{toml}:8: delivery.mode: \"carrier-pigeon\" is not a delivery mode; use \"relay\" or \"mx\""),
    );
    check(
        &|| replace_in(&f, "campaign.toml", "[delivery]", "[delivery]\nstarttls = \"always\""),
        format!("{toml}:8: delivery.starttls: \"always\" is not one of \"none\", \"opportunistic\", \"required\""),
    );
    check(
        &|| {
            replace_in(
                &f,
                "campaign.toml",
                "from = \"News <news@example.org>\"",
                "from = \"News <news.example.org>\"",
            )
        },
        format!("{toml}:1: from: address has no '@'"),
    );
    check(
        &|| replace_in(&f, "campaign.toml", "subject", "subjcet"),
        format!("{toml}:2: unknown field `subjcet`, expected one of `from`, `reply_to`, `to_name`, `subject`, `text`, `text_file`, `html`, `html_file`, `recipients`, `suppression`, `return_path`, `headers`, `attachments`, `list_unsubscribe`, `delivery`, `limits`, `dkim`"),
    );
    check(
        &|| replace_in(&f, "recipients.csv", "email,", "mail,"),
        format!("{dir}/recipients.csv:1: the header has no \"email\" column (it has: mail, first_name, last_name)"),
    );
    check(
        &|| replace_in(&f, "suppressed.txt", "blocked.example", "not an entry"),
        format!("{dir}/suppressed.txt:2: \"not an entry\" is neither an address nor a domain: it contains whitespace"),
    );
    check(
        &|| {
            replace_in(
                &f,
                "campaign.toml",
                "[delivery]",
                "[list_unsubscribe]\nurl = \"http://example.org/u?e={{email}}\"\n\n[delivery]",
            )
        },
        format!("{toml}:8: list_unsubscribe.url: must start with https:// (RFC 8058 one-click unsubscription)"),
    );
    check(
        &|| replace_in(&f, "campaign.toml", "[delivery]", "[headers]\nSubject = \"x\"\n\n[delivery]"),
        format!("{toml}:8: headers.Subject: mxpipe writes this header itself; set it with the campaign's own keys"),
    );

    // The command line says the same, exits 2, and sends nothing.
    small_fixture(&f);
    replace_in(&f, "body.txt", "bye", "bye {{ nickname }}");
    let sink = Sink::start(SinkConfig::default()).expect("sink starts");
    replace_in(
        &f,
        "campaign.toml",
        "127.0.0.1:25",
        &sink.local_addr().to_string(),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_mxpipe"))
        .arg("send")
        .arg(f.path("campaign.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("mxpipe: {dir}/body.txt:3: text_file: unknown merge field \"nickname\" ({dir}/recipients.csv has columns: email, first_name, last_name)\n")
    );
    assert_eq!(sink.stop().connections, 0);
}

#[test]
fn command_line_dry_run_and_json_summary() {
    let f = Fixture::new("campaign-cli");
    small_fixture(&f);
    let out_dir = f.path("rendered");
    let out = Command::new(env!("CARGO_BIN_EXE_mxpipe"))
        .args(["send", "--quiet", "--json", "--dry-run"])
        .arg(&out_dir)
        .arg(f.path("campaign.toml"))
        .output()
        .unwrap();
    // Exit 1: some rows were invalid.
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr), "", "--quiet");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["rows"], 7);
    assert_eq!(summary["invalid"], 3);
    assert_eq!(summary["suppressed"], 1);
    assert_eq!(summary["duplicates"], 1);
    assert_eq!(summary["submitted"], 2);
    assert_eq!(summary["dry_run"], true);
    let mut names: Vec<String> = fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["00000002.eml", "00000005.eml"]);
    let ann = fs::read_to_string(out_dir.join("00000002.eml")).unwrap();
    assert!(
        ann.contains("To: <ann@example.net>\r\nSubject: Hi Ann\r\n"),
        "{ann}"
    );

    // The message form of `send` still needs all three of its flags.
    let out = Command::new(env!("CARGO_BIN_EXE_mxpipe"))
        .args(["send", "--relay", "127.0.0.1:25"])
        .arg(f.path("body.txt"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "mxpipe: send: give a campaign file alone, or a message with --from, --to-file and --relay (or --direct-mx)\n"
    );
}

#[test]
fn an_engine_settings_file_shapes_a_campaign() {
    let f = Fixture::new("campaign-engine");
    let sink = Sink::start(SinkConfig::default()).expect("sink starts");
    let relay = sink.local_addr().to_string();
    // 70 recipients over d0..d6.example: d1.example's ten get 5 messages a second of their own.
    bulk_fixture(&f, 70, &relay, "engine = \"engine.toml\"");
    f.write(
        "engine.toml",
        "messages_per_hour = 1000000\n\
         limit_override = [\"@d1.example: max_connections=1, messages_per_second=5\"]\n",
    );
    let start = Instant::now();
    let summary = f
        .load()
        .send(&SendOptions {
            report: None,
            journal: None,
            progress: false,
            ..SendOptions::default()
        })
        .unwrap_or_else(|e| panic!("send: {e}"));
    assert_eq!(summary.delivered, 70, "{summary:?}");
    assert_eq!(sink.stop().messages, 70);
    // Ten messages at 5 a second, after a burst of one, cannot take less than 1.8 s.
    assert!(
        start.elapsed() >= Duration::from_millis(1800),
        "the limit did not hold: {:?}",
        start.elapsed()
    );

    // A bad setting in the file stops the campaign before anything is sent, naming it.
    f.write("engine.toml", "messages_per_hour = -3\n");
    let error = f.load_error();
    let engine = f.path("engine.toml").display().to_string();
    let toml = f.path("campaign.toml").display().to_string();
    assert_eq!(
        error,
        format!(
            "{toml}: limits.engine: {engine}: config messages_per_hour: \"-3\" is not a number \
             above zero"
        )
    );
}

/// `mxpipe send` of a small message to the recipients in `list.txt` through `sink`, with
/// `config` as its --config file.
fn send_with_config(
    f: &Fixture,
    sink: &mxpipe::sink::SinkHandle,
    config: &str,
) -> std::process::Output {
    f.write("message.eml", "Subject: hi\r\n\r\nhello\r\n");
    f.write("engine.toml", config);
    Command::new(env!("CARGO_BIN_EXE_mxpipe"))
        .args(["send", "--relay", &sink.local_addr().to_string()])
        .args(["--from", "news@example.org", "--config"])
        .arg(f.path("engine.toml"))
        .arg("--to-file")
        .arg(f.path("list.txt"))
        .arg(f.path("message.eml"))
        .output()
        .unwrap()
}

#[test]
fn command_line_config_file_is_checked_before_sending() {
    let f = Fixture::new("cli-config");
    let sink = Sink::start(SinkConfig::default()).expect("sink starts");
    f.write("list.txt", "a@example.net\nb@example.net\n");
    let send = |config: &str| send_with_config(&f, &sink, config);
    let out = send("limit_overide = [\"@example.net: max_connections=1\"]\n");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(&format!(
            "mxpipe: {}: unknown configuration key \"limit_overide\"",
            f.path("engine.toml").display()
        )),
        "{stderr}"
    );
    assert_eq!(sink.stats().connections, 0, "nothing sent");

    let out = send("limit_override = [\"@example.net: max_connections=1\"]\n");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sink.stop().messages, 1, "one message, both recipients");
}

#[test]
fn an_engine_file_requiring_tls_is_not_downgraded_by_the_campaign() {
    let f = Fixture::new("campaign-engine-tls");
    // Plain SMTP only: STARTTLS is answered 502.
    let sink = Sink::start(SinkConfig::default()).expect("sink starts");
    let relay = sink.local_addr().to_string();
    bulk_fixture(
        &f,
        7,
        &relay,
        "engine = \"engine.toml\"\nmax_age_secs = 2\nretry_after_secs = 1",
    );
    f.write("engine.toml", "starttls = \"required\"\n");
    let _ = f.load().send(&SendOptions {
        report: None,
        journal: None,
        progress: false,
        ..SendOptions::default()
    });
    assert_eq!(
        sink.stop().messages,
        0,
        "the engine file requires TLS, yet mail went in plaintext"
    );
}

/// `record_events = false` in a --config file: `send` reads every outcome anyway.
#[test]
fn command_line_send_keeps_events_on_whatever_the_config_says() {
    let f = Fixture::new("cli-config-events");
    let sink = Sink::start(SinkConfig::default()).unwrap();
    f.write("list.txt", "a@example.net\n");
    let out = send_with_config(&f, &sink, "record_events = false\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("delivered=1"), "{stdout}");
    assert_eq!(sink.stop().messages, 1);
}
