//! Inbound processing end to end: a corpus of bounces in the formats real MTAs write
//! (tests/data/bounces, expected results in its expected.txt), ARF complaints built per
//! RFC 5965, mangled reports (a property test), soft bounces counted over a window, one-click
//! POSTs with good and forged tokens and mailto unsubscribes through `mxpipe inbound`, and
//! genuine bounces from a private Postfix that the next campaign run then skips.

mod util;

use mxpipe::engine::classify::Classifier;
use mxpipe::inbound::report;
use mxpipe::inbound::{bounce_type, AsyncOutcome, Inbound, InboundConfig};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

const VERP: &str = "bounces-digest+{local}={domain}@news.example.org";

fn verp(recipient: &str) -> String {
    let (local, domain) = recipient.split_once('@').unwrap();
    format!("bounces-digest+{local}={domain}@news.example.org")
}

fn corpus_dir() -> PathBuf {
    util::repo_root().join("tests/data/bounces")
}

/// (file, recipient, type, category, format) from expected.txt.
fn corpus() -> Vec<(String, String, String, String, String)> {
    let text = fs::read_to_string(corpus_dir().join("expected.txt")).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].to_string(),
                f[1].to_string(),
                f[2].to_string(),
                f[3].to_string(),
                f[4..].join(" "),
            )
        })
        .collect()
}

/// A temporary inbound set-up: config, suppression, quarantine, outcomes.
struct Setup {
    dir: PathBuf,
}

impl Setup {
    fn new(label: &str, extra: &str) -> Setup {
        let dir = util::fresh_temp_dir(label);
        fs::write(
            dir.join("inbound.toml"),
            format!(
                "suppression = \"suppressed.txt\"\nquarantine = \"quarantine\"\n\
                 soft_bounces = \"soft.jsonl\"\n{extra}\n\
                 [[campaign]]\nname = \"digest\"\nreturn_path = \"{VERP}\"\n\
                 unsubscribe_mailto = \"unsubscribe@news.example.org\"\n\
                 outcomes = \"digest-async.jsonl\"\n"
            ),
        )
        .unwrap();
        Setup { dir }
    }

    fn config(&self) -> InboundConfig {
        InboundConfig::load(&self.dir.join("inbound.toml")).unwrap()
    }

    fn open(&self) -> Inbound {
        Inbound::open(&self.config()).unwrap()
    }

    fn suppressed(&self) -> BTreeSet<String> {
        fs::read_to_string(self.dir.join("suppressed.txt"))
            .unwrap_or_default()
            .lines()
            .map(|l| l.split('#').next().unwrap().trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }

    fn outcomes(&self) -> Vec<AsyncOutcome> {
        fs::read_to_string(self.dir.join("digest-async.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn quarantined(&self) -> usize {
        fs::read_dir(self.dir.join("quarantine"))
            .map(|d| d.count())
            .unwrap_or(0)
            / 2
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn corpus_is_classified_as_expected() {
    let classifier = Classifier::default();
    let mut by_category: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut wrong = Vec::new();
    let corpus = corpus();
    for (file, recipient, kind, category, format) in &corpus {
        let raw = fs::read(corpus_dir().join(file)).unwrap();
        let got = match report::parse(&raw, &classifier) {
            Ok(r) => r
                .recipients
                .iter()
                .find(|s| s.final_recipient.as_deref() == Some(recipient.as_str()))
                .map(|s| {
                    (
                        bounce_type(s).unwrap_or("none").to_string(),
                        s.category.as_str().to_string(),
                    )
                }),
            Err(e) => {
                wrong.push(format!("{file}: {e}"));
                None
            }
        };
        let entry = by_category.entry(category.clone()).or_default();
        entry.1 += 1;
        match got {
            Some((k, c)) if &k == kind && &c == category => entry.0 += 1,
            other => wrong.push(format!(
                "{file} ({format}): expected {kind} {category} for {recipient}, got {other:?}"
            )),
        }
    }
    for (category, (right, all)) in &by_category {
        println!("{category:15} {right}/{all}");
    }
    assert_eq!(corpus.len(), 21);
    assert!(wrong.is_empty(), "misclassified:\n{}", wrong.join("\n"));
}

#[test]
fn corpus_through_the_processor_suppresses_hard_bounces_only() {
    let setup = Setup::new("inbound-corpus", "");
    let mut inbound = setup.open();
    let corpus = corpus();
    for (file, recipient, ..) in &corpus {
        let raw = fs::read(corpus_dir().join(file)).unwrap();
        let out = inbound
            .receive(&[verp(recipient)], &raw, SystemTime::now())
            .unwrap();
        assert_eq!(out.len(), 1, "{file}: {out:?}");
    }
    let hard: BTreeSet<String> = corpus
        .iter()
        .filter(|c| c.2 == "hard")
        .map(|c| c.1.clone())
        .collect();
    assert_eq!(setup.suppressed(), hard);
    let outcomes = setup.outcomes();
    assert_eq!(outcomes.len(), corpus.len());
    for ((file, recipient, kind, category, _), o) in corpus.iter().zip(&outcomes) {
        assert_eq!(
            (&o.recipient, &o.kind, &o.category, o.campaign.as_str()),
            (recipient, kind, category, "digest"),
            "{file}"
        );
        assert_eq!(o.event, if kind == "delay" { "delay" } else { "bounce" });
        assert_eq!(o.suppressed, kind == "hard");
        assert!(!o.reason.is_empty() && o.time.ends_with('Z'), "{o:?}");
    }
    let first = &outcomes[0];
    assert_eq!((first.code, first.enhanced.as_str()), (550, "5.1.1"));
    assert!(first
        .reason
        .contains("User unknown in virtual mailbox table"));
    let metrics = inbound.metrics().prometheus();
    assert!(
        metrics.contains("mxpipe_inbound_bounces_total{type=\"hard\",category=\"bad_mailbox\"} 10"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mxpipe_inbound_bounces_total{type=\"soft\",category=\"mailbox_full\"} 4"),
        "{metrics}"
    );
    assert_eq!(setup.quarantined(), 0);
}

/// An RFC 5965 report: a human-readable part, the machine-readable part, the original.
fn arf(feedback_type: &str, mail_from: Option<&str>, to: &str, rcpt_to: Option<&str>) -> Vec<u8> {
    let mut fields =
        format!("Feedback-Type: {feedback_type}\r\nUser-Agent: ExampleFBL/1.0\r\nVersion: 1\r\n");
    if let Some(f) = mail_from {
        fields.push_str(&format!("Original-Mail-From: <{f}>\r\n"));
    }
    if let Some(r) = rcpt_to {
        fields.push_str(&format!("Original-Rcpt-To: <{r}>\r\n"));
    }
    fields.push_str("Arrival-Date: Mon, 30 Nov 2026 10:00:00 +0000\r\nReported-Domain: example.org\r\nSource-IP: 203.0.113.25\r\n");
    format!(
        "From: <feedback@fbl.example.com>\r\nTo: <fbl@news.example.org>\r\nSubject: FW: Your November digest\r\n\
         Date: Mon, 30 Nov 2026 12:00:00 +0000\r\nMIME-Version: 1.0\r\nMessage-ID: <fbl-1@fbl.example.com>\r\n\
         Content-Type: multipart/report; report-type=feedback-report;\r\n\tboundary=\"part1_13d.2e68ed54_boundary\"\r\n\r\n\
         --part1_13d.2e68ed54_boundary\r\nContent-Type: text/plain; charset=\"US-ASCII\"\r\n\r\n\
         This is an email abuse report for an email message received from IP 203.0.113.25 on Mon, 30 Nov 2026.\r\n\r\n\
         --part1_13d.2e68ed54_boundary\r\nContent-Type: message/feedback-report\r\n\r\n{fields}\r\n\
         --part1_13d.2e68ed54_boundary\r\nContent-Type: message/rfc822\r\nContent-Disposition: inline\r\n\r\n\
         From: Example News <news@example.org>\r\nTo: {to}\r\nSubject: Your November digest\r\n\
         Message-ID: <1764496797.4411@example.org>\r\nX-Campaign: digest\r\nDate: Mon, 30 Nov 2026 09:59:57 +0000\r\n\r\n\
         Hello.\r\n\r\n--part1_13d.2e68ed54_boundary--\r\n"
    )
    .into_bytes()
}

#[test]
fn arf_complaints_suppress_and_give_rates_per_campaign_and_domain() {
    let setup = Setup::new("inbound-arf", "");
    fs::write(
        setup.dir.join("report.csv"),
        "recipient,status,code,enhanced,text,attempts,destination,time\n\
         ann@example.net,delivered,250,2.0.0,ok,1,mx:25,2026-11-30T10:00:00Z\n\
         bob@example.net,delivered,250,2.0.0,ok,1,mx:25,2026-11-30T10:00:00Z\n\
         cat@example.com,delivered,250,2.0.0,ok,1,mx:25,2026-11-30T10:00:00Z\n\
         dan@example.com,delivered,250,2.0.0,ok,1,mx:25,2026-11-30T10:00:00Z\n\
         eve@example.com,bounced,550,5.1.1,no,1,mx:25,2026-11-30T10:00:00Z\n",
    )
    .unwrap();
    let toml = fs::read_to_string(setup.dir.join("inbound.toml")).unwrap();
    fs::write(
        setup.dir.join("inbound.toml"),
        toml + "report = \"report.csv\"\n",
    )
    .unwrap();
    let mut inbound = setup.open();
    let fbl = ["fbl@news.example.org".to_string()];
    let now = SystemTime::now();
    // 1. Original-Mail-From is the VERP address.
    let out = inbound
        .receive(
            &fbl,
            &arf(
                "abuse",
                Some(&verp("ann@example.net")),
                "ann@example.net",
                None,
            ),
            now,
        )
        .unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(
        (
            out[0].event.as_str(),
            out[0].kind.as_str(),
            out[0].recipient.as_str(),
            out[0].suppressed
        ),
        ("complaint", "abuse", "ann@example.net", true)
    );
    // 2. Redacted envelope: the campaign header and the one To address.
    inbound
        .receive(
            &fbl,
            &arf(
                "abuse",
                None,
                "Cat <cat@example.com>",
                Some("cat@example.com"),
            ),
            now,
        )
        .unwrap();
    // 3. not-spam is no complaint.
    let out = inbound
        .receive(
            &fbl,
            &arf(
                "not-spam",
                Some(&verp("dan@example.com")),
                "dan@example.com",
                None,
            ),
            now,
        )
        .unwrap();
    assert!(!out[0].suppressed);
    // 4. A report naming nobody we sent to is quarantined, not guessed at.
    let out = inbound
        .receive(
            &fbl,
            &arf(
                "abuse",
                Some("someone@else.example"),
                "a@b.example, c@d.example",
                None,
            ),
            now,
        )
        .unwrap();
    assert!(out.is_empty());
    assert_eq!(
        setup.suppressed(),
        BTreeSet::from(["ann@example.net".to_string(), "cat@example.com".to_string()])
    );
    assert_eq!(setup.quarantined(), 1);
    let m = inbound.metrics();
    assert_eq!(m.complaint_rate_campaign("digest"), 0.5);
    assert_eq!(m.complaint_rate_domain("example.net"), 0.5);
    assert_eq!(m.complaint_rate_domain("example.com"), 0.5);
    let text = m.prometheus();
    assert!(
        text.contains("mxpipe_inbound_complaint_rate{campaign=\"digest\"} 0.5"),
        "{text}"
    );
    assert!(
        text.contains("mxpipe_inbound_domain_complaints_total{domain=\"example.com\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("mxpipe_inbound_quarantined_total{reason=\"unattributed\"} 1"),
        "{text}"
    );
}

#[test]
fn soft_bounces_suppress_after_n_within_m_days() {
    let setup = Setup::new(
        "inbound-soft",
        "soft_bounce_limit = 2\nsoft_bounce_days = 7",
    );
    let raw = fs::read(corpus_dir().join("postfix-over-quota.eml")).unwrap();
    let rcpt = [verp("bea@example.net")];
    let day = Duration::from_secs(86_400);
    let t0 = SystemTime::now() - day * 30;
    {
        let mut inbound = setup.open();
        // Two soft bounces ten days apart: never two within the window.
        assert!(!inbound.receive(&rcpt, &raw, t0).unwrap()[0].suppressed);
        assert!(!inbound.receive(&rcpt, &raw, t0 + day * 10).unwrap()[0].suppressed);
    }
    // The history survives a restart: the next one, two days later, is the second in 7 days.
    let mut inbound = setup.open();
    let out = inbound.receive(&rcpt, &raw, t0 + day * 12).unwrap();
    assert!(out[0].suppressed, "{out:?}");
    assert!(inbound.is_suppressed("BEA@example.net"));
    assert_eq!(
        setup.suppressed(),
        BTreeSet::from(["bea@example.net".to_string()])
    );
}

/// A DSN about two recipients that came back to one recipient's VERP address acts on that
/// recipient only; with no VERP address, the campaign header names the campaign and both count.
#[test]
fn a_report_about_several_recipients_acts_on_the_one_verp_names() {
    let setup = Setup::new("inbound-multi", "");
    let mut inbound = setup.open();
    let text = fs::read_to_string(corpus_dir().join("postfix-user-unknown.eml")).unwrap();
    let second = "Final-Recipient: rfc822; bob@example.net\r\nAction: failed\r\nStatus: 4.2.2\r\n\
                  Diagnostic-Code: smtp; 452 4.2.2 Mailbox full\r\n\r\n";
    let at = text
        .find("--4ZkA1B2C3D.1764496801/mx.example.net\r\nContent-Description: Undelivered")
        .unwrap();
    let two = format!("{}{second}{}", &text[..at], &text[at..]);
    let out = inbound
        .receive(
            &[verp("bob@example.net")],
            two.as_bytes(),
            SystemTime::now(),
        )
        .unwrap();
    let got: Vec<(&str, &str)> = out
        .iter()
        .map(|o| (o.recipient.as_str(), o.kind.as_str()))
        .collect();
    assert_eq!(got, [("bob@example.net", "soft")]);
    assert!(setup.suppressed().is_empty());
    // Sent to a non-VERP address: the original's Return-Path names ann, so only ann's entry.
    let out = inbound
        .receive(
            &["postmaster@news.example.org".into()],
            two.as_bytes(),
            SystemTime::now(),
        )
        .unwrap();
    let got: Vec<(&str, &str)> = out
        .iter()
        .map(|o| (o.recipient.as_str(), o.kind.as_str()))
        .collect();
    assert_eq!(got, [("ann@example.net", "hard")]);
    assert_eq!(
        setup.suppressed(),
        BTreeSet::from(["ann@example.net".to_string()])
    );
}

/// The ways a report arrives broken, each kept for a person and counted by reason.
#[test]
fn malformed_reports_are_quarantined_and_suppress_nobody() {
    let setup = Setup::new("inbound-malformed", "");
    let mut inbound = setup.open();
    let good = fs::read(corpus_dir().join("postfix-user-unknown.eml")).unwrap();
    let text = String::from_utf8(good.clone()).unwrap();
    let cut = text.find("Final-Recipient").unwrap();
    let truncated = text.as_bytes()[..cut].to_vec();
    let wrong_type = text
        .replace(
            "Content-Type: message/delivery-status",
            "Content-Type: application/octet-stream",
        )
        .into_bytes();
    let mut huge = good.clone();
    huge.extend(std::iter::repeat_n(b'x', report::MAX_REPORT_BYTES));
    let non_utf8: Vec<u8> = b"From: \xff\xfe <x@y>\r\nSubject: \xc3\x28\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\xff\xfe\xfd no status here\r\n".to_vec();
    let cases: [(&str, Vec<u8>, &str); 5] = [
        ("truncated MIME", truncated, "bad_report"),
        ("wrong content type", wrong_type, "bad_report"),
        ("huge", huge, "too_large"),
        ("non-UTF-8", non_utf8, "unrecognised"),
        ("no header", b"\r\n\r\nhello".to_vec(), "not_mime"),
    ];
    for (name, raw, reason) in &cases {
        let out = inbound
            .receive(&[verp("ann@example.net")], raw, SystemTime::now())
            .unwrap();
        assert!(out.is_empty(), "{name}: {out:?}");
        let counted = inbound.metrics().quarantined.get(*reason).copied();
        assert!(
            counted.is_some(),
            "{name}: {:?}",
            inbound.metrics().quarantined
        );
    }
    let counts: Vec<(&str, u64)> = inbound
        .metrics()
        .quarantined
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    assert_eq!(
        counts,
        [
            ("bad_report", 2),
            ("not_mime", 1),
            ("too_large", 1),
            ("unrecognised", 1)
        ]
    );
    assert!(setup.suppressed().is_empty());
    assert_eq!(setup.quarantined(), cases.len());
    let kept: Vec<String> = fs::read_dir(setup.dir.join("quarantine"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .map(|p| fs::read_to_string(p).unwrap())
        .collect();
    assert!(
        kept.iter().any(|k| k.starts_with("too_large: message of")),
        "{kept:?}"
    );
}

fn mangle(raw: &[u8], ops: &[(u8, usize, u8)]) -> Vec<u8> {
    let mut out = raw.to_vec();
    for &(op, at, byte) in ops {
        if out.is_empty() {
            break;
        }
        let at = at % out.len();
        match op % 5 {
            0 => out.truncate(at),
            1 => out[at] = byte,
            2 => out.insert(at, byte),
            3 => {
                out.drain(at..(at + usize::from(byte)).min(out.len()));
            }
            _ => {
                let copy = out[at..(at + 64).min(out.len())].to_vec();
                out.splice(at..at, copy);
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Whatever happens to a report on its way, processing never panics, and the only address
    /// it may suppress is the one the VERP address names.
    #[test]
    fn mangled_reports_never_suppress_the_wrong_address(
        file in 0usize..21,
        ops in proptest::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 1..6),
    ) {
        let corpus = corpus();
        let (name, recipient, ..) = &corpus[file];
        let raw = fs::read(corpus_dir().join(name)).unwrap();
        let setup = Setup::new("inbound-prop", "soft_bounce_limit = 1");
        let mut inbound = setup.open();
        let mangled = mangle(&raw, &ops);
        inbound.receive(&[verp(recipient)], &mangled, SystemTime::now()).unwrap();
        // The same bytes to a non-VERP address: nobody is named, nobody suppressed unless the
        // report names the campaign and its recipient itself.
        inbound.receive(&["postmaster@news.example.org".into()], &mangled, SystemTime::now()).unwrap();
        let suppressed = setup.suppressed();
        prop_assert!(suppressed.iter().all(|s| s == recipient), "{name}: {suppressed:?}");
    }
}

// ---- mxpipe inbound over SMTP and HTTP ----

struct Daemon {
    child: Child,
    smtp: String,
    http: String,
}

impl Daemon {
    fn start(config: &Path, envs: &[(&str, &str)]) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mxpipe"))
            .args([
                "inbound",
                "--smtp",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
                "--config",
            ])
            .arg(config)
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start mxpipe inbound");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut next = |prefix: &str| {
            let line = lines.next().expect("a line").expect("read");
            line.strip_prefix(prefix)
                .unwrap_or_else(|| panic!("{line:?}"))
                .to_string()
        };
        let smtp = next("smtp listening on ");
        let http = next("http listening on ");
        Daemon { child, smtp, http }
    }
}

impl Daemon {
    /// `mxpipe serve` with an `[inbound]` table: the same receiver beside an injection
    /// listener (pass-through, so no spool), its addresses read from what serve prints.
    fn start_serve(config: &Path) -> Daemon {
        let serve = config.with_file_name("serve.toml");
        fs::write(
            &serve,
            format!(
                "hostname = \"bounces.test\"\n\
                 [inbound]\n\
                 smtp = \"127.0.0.1:0\"\n\
                 http = \"127.0.0.1:0\"\n\
                 config = \"{}\"\n\
                 [[listener]]\n\
                 protocol = \"lmtp\"\n\
                 address = \"127.0.0.1:0\"\n\
                 mode = \"pass-through\"\n\
                 allow_networks = [\"127.0.0.0/8\"]\n\
                 [delivery]\n\
                 relay = \"127.0.0.1:1\"\n",
                config.display()
            ),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_mxpipe"))
            .args(["serve", "--config"])
            .arg(&serve)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start mxpipe serve");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut smtp, mut http) = (String::new(), String::new());
        for line in lines {
            let line = line.expect("read");
            let Some(rest) = line.strip_prefix("mxpipe serve listening on ") else {
                panic!("{line:?}");
            };
            let (addr, what) = rest.split_once(' ').unwrap();
            if what.starts_with("(inbound SMTP") {
                smtp = addr.to_string();
            } else if what.starts_with("(inbound HTTP") {
                http = addr.to_string();
                break;
            }
        }
        assert!(!smtp.is_empty(), "serve printed no inbound SMTP address");
        Daemon { child, smtp, http }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http(addr: &str, method: &str, target: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: news.example.org\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn one_click_and_mailto_unsubscribes_through_mxpipe_inbound() {
    let setup = Setup::new("inbound-unsub", "");
    let toml = fs::read_to_string(setup.dir.join("inbound.toml")).unwrap();
    fs::write(
        setup.dir.join("inbound.toml"),
        toml + "secret_env = \"TEST_UNSUB_SECRET\"\n",
    )
    .unwrap();
    // The campaign writes the URL; its secret is the one the daemon checks against.
    fs::write(
        setup.dir.join("recipients.csv"),
        "email\nann@example.net\nbob@example.com\n",
    )
    .unwrap();
    fs::write(
        setup.dir.join("campaign.toml"),
        format!(
            "from = \"News <news@example.org>\"\nsubject = \"Hi\"\ntext = \"Hello\"\n\
             recipients = \"recipients.csv\"\nsuppression = \"suppressed.txt\"\nreturn_path = \"{VERP}\"\n\
             [list_unsubscribe]\nurl = \"https://news.example.org/unsubscribe/digest\"\n\
             mailto = \"unsubscribe@news.example.org\"\nsecret_env = \"TEST_UNSUB_SECRET\"\n\
             [delivery]\nrelay = \"127.0.0.1:25\"\n"
        ),
    )
    .unwrap();
    let daemon = Daemon::start(
        &setup.dir.join("inbound.toml"),
        &[("TEST_UNSUB_SECRET", "k3y-for-tests")],
    );
    let rendered = Command::new(env!("CARGO_BIN_EXE_mxpipe"))
        .arg("send")
        .arg(setup.dir.join("campaign.toml"))
        .arg("--dry-run")
        .arg(setup.dir.join("rendered"))
        .env("TEST_UNSUB_SECRET", "k3y-for-tests")
        .output()
        .unwrap();
    assert!(
        rendered.status.success(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let mut urls = BTreeMap::new();
    for entry in fs::read_dir(setup.dir.join("rendered")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "eml") {
            continue;
        }
        let eml = fs::read_to_string(&path).unwrap();
        let to = eml
            .lines()
            .find_map(|l| l.strip_prefix("To: "))
            .unwrap()
            .trim()
            .trim_matches(['<', '>'])
            .to_string();
        // Unfold the header, then take the https URL out of it.
        let unfolded = eml.replace("\r\n ", " ").replace("\r\n\t", " ");
        let header = unfolded
            .lines()
            .find_map(|l| l.strip_prefix("List-Unsubscribe: "))
            .unwrap();
        let url = header
            .split(['<', '>'])
            .find(|p| p.starts_with("https://"))
            .unwrap();
        assert!(
            header.contains("<mailto:unsubscribe@news.example.org>"),
            "{header}"
        );
        urls.insert(to, url.replace("https://news.example.org", "").to_string());
    }
    let ann = urls.get("ann@example.net").expect("ann's message").clone();
    let bob = urls.get("bob@example.com").expect("bob's message").clone();
    // Forged: bob's token on ann's address, a made-up token, a GET.
    let ann_with_bobs_token = format!(
        "{}&t={}",
        ann.split("&t=").next().unwrap(),
        bob.split("&t=").nth(1).unwrap()
    );
    assert_eq!(
        http(
            &daemon.http,
            "POST",
            &ann_with_bobs_token,
            "List-Unsubscribe=One-Click"
        )
        .0,
        403
    );
    assert_eq!(
        http(
            &daemon.http,
            "POST",
            "/unsubscribe/digest?u=ann%40example.net&t=AAAA",
            "List-Unsubscribe=One-Click"
        )
        .0,
        403
    );
    assert_eq!(http(&daemon.http, "POST", &ann, "").0, 400);
    assert_eq!(http(&daemon.http, "GET", &ann, "").0, 405);
    assert_eq!(
        http(
            &daemon.http,
            "POST",
            &ann.replace("/digest", "/other"),
            "List-Unsubscribe=One-Click"
        )
        .0,
        404
    );
    assert!(setup.suppressed().is_empty());
    // The real one.
    let (status, body) = http(&daemon.http, "POST", &ann, "List-Unsubscribe=One-Click");
    assert_eq!((status, body.as_str()), (200, "unsubscribed\n"));
    // Mail to the unsubscribe address, over SMTP.
    let mut client = util::RawSmtpClient::connect(daemon.smtp.parse().unwrap());
    let mut send = |line: &str, code: u16| {
        let reply = client.command(line);
        assert_eq!(reply.code, code, "{line}: {reply:?}");
    };
    send("EHLO reader.example.com", 250);
    send("MAIL FROM:<bob@example.com>", 250);
    send("RCPT TO:<someone@elsewhere.example>", 550);
    send("RCPT TO:<unsubscribe@news.example.org>", 250);
    send("DATA", 354);
    send("From: Bob <bob@example.com>\r\nTo: unsubscribe@news.example.org\r\nSubject: unsubscribe\r\n\r\nplease\r\n.", 250);
    send("QUIT", 221);
    assert_eq!(
        setup.suppressed(),
        BTreeSet::from(["ann@example.net".to_string(), "bob@example.com".to_string()])
    );
    let outcomes = setup.outcomes();
    let kinds: Vec<(&str, &str, &str)> = outcomes
        .iter()
        .map(|o| (o.event.as_str(), o.kind.as_str(), o.recipient.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("unsubscribe", "one-click", "ann@example.net"),
            ("unsubscribe", "mailto", "bob@example.com")
        ]
    );
    let (status, metrics) = http(&daemon.http, "GET", "/metrics", "");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("mxpipe_inbound_forged_unsubscribes_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "mxpipe_inbound_unsubscribes_total{campaign=\"digest\",method=\"one-click\"} 1"
        ),
        "{metrics}"
    );
    // The next campaign run skips both (loading it needs the secret too).
    std::env::set_var("TEST_UNSUB_SECRET", "k3y-for-tests");
    let campaign = mxpipe::campaign::Campaign::load(&setup.dir.join("campaign.toml"));
    let campaign = campaign.unwrap();
    assert_eq!(campaign.len(), 0);
    assert_eq!(campaign.skipped().len(), 2);
}

/// A private Postfix takes the campaign's mail, then its local delivery finds two recipients
/// unknown and sends genuine bounces to their VERP addresses, relayed to `mxpipe inbound`.
#[test]
fn postfix_bounces_reach_inbound_and_the_next_run_skips_them() {
    let setup = Setup::new("inbound-postfix", "");
    // The bounces reach the receiver of `mxpipe serve` (its [inbound] table).
    let daemon = Daemon::start_serve(&setup.dir.join("inbound.toml"));
    let postfix = util::postfix::Postfix::start_local(&format!(
        "local_recipient_maps =\nrelayhost = [127.0.0.1]:{}\nsmtp_tls_security_level = none\n\
         mailbox_command = /bin/true\n",
        daemon.smtp.rsplit(':').next().unwrap()
    ));
    fs::write(
        setup.dir.join("recipients.csv"),
        "email\nroot@example.test\nnosuch1@example.test\nnosuch2@example.test\n",
    )
    .unwrap();
    fs::write(
        setup.dir.join("campaign.toml"),
        format!(
            "from = \"News <news@example.org>\"\nsubject = \"Hi\"\ntext = \"Hello\"\n\
             recipients = \"recipients.csv\"\nsuppression = \"suppressed.txt\"\nreturn_path = \"{VERP}\"\n\
             [headers]\nX-Campaign = \"digest\"\n\
             [delivery]\nrelay = \"{}\"\n",
            postfix.addr()
        ),
    )
    .unwrap();
    let campaign = mxpipe::campaign::Campaign::load(&setup.dir.join("campaign.toml")).unwrap();
    assert_eq!(campaign.len(), 3);
    let summary = campaign
        .send(&mxpipe::campaign::SendOptions {
            report: Some(setup.dir.join("report.csv")),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(summary.delivered, 3, "{summary:?}");
    let want = BTreeSet::from([
        "nosuch1@example.test".to_string(),
        "nosuch2@example.test".to_string(),
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while setup.suppressed() != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(setup.suppressed(), want, "postfix log:\n{}", postfix.log());
    let outcomes = setup.outcomes();
    for o in &outcomes {
        assert_eq!(
            (o.event.as_str(), o.kind.as_str(), o.category.as_str()),
            ("bounce", "hard", "bad_mailbox"),
            "{o:?}"
        );
        assert_eq!(o.enhanced, "5.1.1", "{o:?}");
        assert!(o.reason.contains("unknown user"), "{o:?}");
    }
    assert_eq!(outcomes.len(), 2);
    let again = mxpipe::campaign::Campaign::load(&setup.dir.join("campaign.toml")).unwrap();
    assert_eq!(again.len(), 1);
    let skipped: BTreeSet<String> = again
        .skipped()
        .iter()
        .map(|s| s.recipient.clone())
        .collect();
    assert_eq!(skipped, want);
    assert_eq!(setup.quarantined(), 0);
}
