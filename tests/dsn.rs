//! Delivery status notifications (RFC 3461, 3464) against servers this project did not write:
//! the reports mxpipe sends for mail it has custody of, read back with Python's `email`
//! package from what `aiosmtpd` captured; and the DSN parameters passed to a private Postfix,
//! which shows it understood them in the success notice it sends for NOTIFY=SUCCESS.

mod util;

use mxpipe::engine::{Dispatcher, EventKind};
use mxpipe::message::dsn::{DsnEnvelope, Notify, Orcpt, RecipientDsn, Ret};
use mxpipe::message::Message;
use mxpipe::queue::RetryPolicy;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use util::CaptureServer;

/// Reads a captured report with `tests/servers/mail_check.py dsn`.
fn read_report(data: &[u8]) -> Value {
    let dir = util::fresh_temp_dir("dsn-report");
    let path = dir.join("report.eml");
    std::fs::write(&path, data).unwrap();
    let script = util::repo_root().join("tests/servers/mail_check.py");
    let out = Command::new(util::test_python())
        .arg(&script)
        .arg("dsn")
        .arg(&path)
        .output()
        .expect("run mail_check.py");
    assert!(
        out.status.success(),
        "mail_check.py dsn failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn orcpt(address: &str) -> Orcpt {
    Orcpt {
        addr_type: "rfc822".into(),
        address: address.as_bytes().to_vec(),
    }
}

fn spooled(relay: &str, spool: &Path, max_age: Duration) -> Dispatcher {
    Dispatcher::builder()
        .relay(relay)
        .ehlo_name("mxpipe.test")
        .retry(RetryPolicy {
            initial: Duration::from_millis(100),
            max_interval: Duration::from_millis(200),
            multiplier: 2.0,
            jitter: 0.0,
            max_age,
        })
        .spool(spool)
        .start()
        .unwrap()
}

#[test]
fn a_refused_recipient_gets_its_sender_a_multipart_report() {
    let capture = CaptureServer::builder()
        .reject_rcpt("nosuch")
        .reject_rcpt("quiet")
        .start();
    let spool = util::fresh_temp_dir("dsn-spool");
    let d = spooled(&capture.addr().to_string(), &spool, Duration::from_secs(60));
    let body = b"Subject: the original\r\nFrom: sender@example.org\r\n\r\nthe body\r\n";
    let dsn = DsnEnvelope::default()
        .with_envid("env-42+x=y")
        .unwrap()
        .with_recipient(
            "nosuch@example.net",
            RecipientDsn {
                notify: None,
                orcpt: Some(orcpt("NoSuch+Orig@example.net")),
            },
        )
        .with_recipient(
            "quiet@example.net",
            RecipientDsn {
                notify: Some(Notify::NEVER),
                orcpt: None,
            },
        );
    let id = d
        .submit(
            Message::new(
                "sender@example.org",
                ["ok@example.net", "nosuch@example.net", "quiet@example.net"],
                body,
            )
            .unwrap()
            .with_dsn(dsn),
        )
        .unwrap();
    // The null sender never gets a report.
    d.submit(Message::new("", ["nosuch@example.net"], b"Subject: bounce\r\n\r\nx\r\n").unwrap())
        .unwrap();
    assert!(d.wait_final(Duration::from_secs(60)), "{:?}", d.stats());
    let events: Vec<_> = d.events().unwrap().try_iter().collect();
    let original: Vec<(String, EventKind)> = events
        .iter()
        .filter(|e| e.message_id == id)
        .map(|e| (e.recipient.to_string(), e.kind))
        .collect();
    assert_eq!(
        original,
        [
            ("ok@example.net".to_string(), EventKind::Delivered),
            ("nosuch@example.net".to_string(), EventKind::Bounced),
            ("quiet@example.net".to_string(), EventKind::Bounced),
        ]
    );
    // The delivered original, and one report: none for NOTIFY=NEVER, none for the null sender.
    let messages = capture.messages();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert_eq!(messages[0].rcpt_tos, ["ok@example.net"]);
    // aiosmtpd offers no DSN: no RET or ENVID went to it (it would have refused them).
    assert_eq!(messages[0].mail_options, [format!("SIZE={}", body.len())]);
    assert_eq!(messages[0].rcpt_options, Vec::<String>::new());
    let report = &messages[1];
    assert_eq!(report.mail_from, "<>");
    assert_eq!(report.rcpt_tos, ["sender@example.org"]);
    let parsed = read_report(&report.data);
    assert_eq!(parsed["defects"], serde_json::json!([]), "{parsed}");
    assert_eq!(parsed["content_type"], "multipart/report");
    assert_eq!(parsed["report_type"], "delivery-status");
    assert_eq!(parsed["to"], "sender@example.org");
    assert_eq!(parsed["auto_submitted"], "auto-replied");
    assert_eq!(
        parsed["parts"],
        serde_json::json!([
            "text/plain",
            "message/delivery-status",
            "text/rfc822-headers"
        ])
    );
    assert_eq!(parsed["per_message"]["Reporting-MTA"], "dns; mxpipe.test");
    assert_eq!(parsed["per_message"]["Original-Envelope-Id"], "env-42+x=y");
    let recipients = parsed["per_recipient"].as_array().unwrap();
    assert_eq!(recipients.len(), 1, "{parsed}");
    let r = &recipients[0];
    assert_eq!(r["Original-Recipient"], "rfc822;NoSuch+Orig@example.net");
    assert_eq!(r["Final-Recipient"], "rfc822; nosuch@example.net");
    assert_eq!(r["Action"], "failed");
    assert_eq!(r["Status"], "5.1.1");
    assert_eq!(r["Remote-MTA"], "dns; 127.0.0.1");
    assert!(
        r["Diagnostic-Code"]
            .as_str()
            .unwrap()
            .starts_with("smtp; 550 5.1.1"),
        "{r}"
    );
    // RET defaults to the headers only.
    assert_eq!(
        parsed["returned"],
        "Subject: the original\r\nFrom: sender@example.org\r\n"
    );
    d.shutdown();
}

/// A spooled dispatcher whose mail goes to `dead` (nothing listens: every recipient expires
/// after 600 ms) and whose reports, to the sender's domain example.org, go to `capture`.
fn expiring_to_a_dead_relay(dead: &str, capture: &CaptureServer, spool: &Path) -> Dispatcher {
    Dispatcher::builder()
        .relay(dead)
        .route("example.org", &capture.addr().to_string())
        .ehlo_name("mxpipe.test")
        .retry(RetryPolicy {
            initial: Duration::from_millis(100),
            max_interval: Duration::from_millis(200),
            multiplier: 2.0,
            jitter: 0.0,
            max_age: Duration::from_millis(600),
        })
        .spool(spool)
        .start()
        .unwrap()
}

#[test]
fn ret_full_returns_the_whole_message_and_an_expiry_is_reported() {
    // Nothing listens on this port: the recipient expires after the maximum age.
    let dead = format!("127.0.0.1:{}", util::free_port("127.0.0.1"));
    let capture = CaptureServer::start();
    let spool = util::fresh_temp_dir("dsn-spool-full");
    // The original goes to the dead relay; the report to the sender's domain goes to aiosmtpd.
    let d = expiring_to_a_dead_relay(&dead, &capture, &spool);
    let body = b"Subject: full\r\n\r\nline one\r\n.dot line\r\n";
    let dsn = DsnEnvelope::default().with_ret(Ret::Full).with_recipient(
        "late@example.net",
        RecipientDsn {
            notify: Some(Notify {
                success: false,
                failure: true,
                delay: false,
            }),
            orcpt: None,
        },
    );
    d.submit(
        Message::new("sender@example.org", ["late@example.net"], body)
            .unwrap()
            .with_dsn(dsn),
    )
    .unwrap();
    assert!(d.wait_final(Duration::from_secs(60)), "{:?}", d.stats());
    let messages = capture.messages();
    assert_eq!(messages.len(), 1, "{messages:?}");
    let parsed = read_report(&messages[0].data);
    assert_eq!(parsed["defects"], serde_json::json!([]), "{parsed}");
    assert_eq!(parsed["returned_type"], "message/rfc822");
    assert_eq!(
        parsed["returned"],
        "Subject: full\r\n\r\nline one\r\n.dot line\r\n"
    );
    let r = &parsed["per_recipient"][0];
    assert_eq!(r["Action"], "failed");
    // The last attempt's code (connection refused: 4.4.1), as Postfix reports an expiry.
    assert_eq!(r["Status"], "4.4.1", "{r}");
    assert!(r.get("Diagnostic-Code").is_none(), "no server replied: {r}");
    assert!(r.get("Original-Envelope-Id").is_none());
    assert!(parsed["per_message"].get("Original-Envelope-Id").is_none());
    d.shutdown();
}

#[test]
fn failures_of_a_big_list_are_reported_in_reports_of_at_most_a_thousand_recipients() {
    // Nothing listens on this port: every recipient expires in the same loop turn.
    let dead = format!("127.0.0.1:{}", util::free_port("127.0.0.1"));
    let capture = CaptureServer::start();
    let spool = util::fresh_temp_dir("dsn-spool-split");
    let d = expiring_to_a_dead_relay(&dead, &capture, &spool);
    let recipients: Vec<String> = (0..2500).map(|i| format!("r{i}@example.net")).collect();
    d.submit(
        Message::new(
            "sender@example.org",
            recipients.iter().map(String::as_str),
            b"Subject: many\r\n\r\nx\r\n",
        )
        .unwrap(),
    )
    .unwrap();
    assert!(d.wait_final(Duration::from_secs(60)), "{:?}", d.stats());
    let messages = capture.messages();
    assert_eq!(messages.len(), 3, "one report per 1000 failures");
    let mut reported = Vec::new();
    for message in &messages {
        assert_eq!(message.mail_from, "<>");
        assert_eq!(message.rcpt_tos, ["sender@example.org"]);
        let parsed = read_report(&message.data);
        assert_eq!(parsed["defects"], serde_json::json!([]));
        let listed = parsed["per_recipient"].as_array().unwrap();
        assert!(listed.len() <= 1000, "{} recipients", listed.len());
        for r in listed {
            assert_eq!(r["Action"], "failed");
            assert_eq!(r["Status"], "4.4.1", "{r}");
            let address = r["Final-Recipient"].as_str().unwrap();
            reported.push(address.trim_start_matches("rfc822; ").to_string());
        }
    }
    reported.sort();
    let mut expected = recipients.clone();
    expected.sort();
    assert_eq!(reported, expected, "every failure reported once");
    d.shutdown();
}

#[test]
fn dsn_parameters_reach_a_postfix_that_offers_dsn() {
    // Postfix relays everything to aiosmtpd (which offers no DSN), so for NOTIFY=SUCCESS it
    // sends the sender a "relayed" notice: its Original-Envelope-Id and Original-Recipient
    // show how it decoded what mxpipe sent.
    let capture = CaptureServer::start();
    let postfix = util::postfix::Postfix::start_local(&format!(
        "relayhost = [127.0.0.1]:{}\n\
         mynetworks = 127.0.0.0/8\n\
         smtpd_recipient_restrictions = permit_mynetworks, reject",
        capture.addr().port()
    ));
    let d = Dispatcher::builder()
        .relay(&postfix.addr().to_string())
        .ehlo_name("mxpipe.test")
        .start()
        .unwrap();
    let dsn = DsnEnvelope::from_params(
        &[("RET", Some("HDRS")), ("ENVID", Some("Q+2B1+3D2"))],
        &[(
            "ann@relay.test",
            vec![
                ("NOTIFY", Some("SUCCESS,FAILURE")),
                ("ORCPT", Some("rfc822;Ann+2Borig@relay.test")),
            ],
        )],
    )
    .unwrap();
    d.submit(
        Message::new(
            "sender@relay.test",
            ["ann@relay.test"],
            b"Subject: via postfix\r\n\r\nhello\r\n",
        )
        .unwrap()
        .with_dsn(dsn),
    )
    .unwrap();
    assert!(d.wait_final(Duration::from_secs(30)), "{:?}", d.stats());
    let kinds: Vec<EventKind> = d.events().unwrap().try_iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [EventKind::Delivered], "{}", postfix.log());
    let messages = capture.wait_for_messages(2, Duration::from_secs(60));
    let notice = messages
        .iter()
        .find(|m| m.mail_from == "<>")
        .unwrap_or_else(|| panic!("no notice: {messages:?}\n{}", postfix.log()));
    assert_eq!(notice.rcpt_tos, ["sender@relay.test"]);
    let parsed = read_report(&notice.data);
    assert_eq!(parsed["content_type"], "multipart/report", "{parsed}");
    assert_eq!(parsed["per_message"]["Original-Envelope-Id"], "Q+1=2");
    let r = &parsed["per_recipient"][0];
    assert_eq!(r["Original-Recipient"], "rfc822;Ann+orig@relay.test", "{r}");
    assert_eq!(r["Action"], "relayed", "{r}");
    // RET=HDRS: the notice returns the headers only.
    assert_eq!(parsed["returned_type"], "text/rfc822-headers");
}

#[test]
fn send_with_a_spool_counts_only_its_own_recipients_not_the_report() {
    let capture = CaptureServer::builder().reject_rcpt("nosuch").start();
    let dir = util::fresh_temp_dir("dsn-cli");
    std::fs::write(dir.join("list.txt"), "ok@example.net\nnosuch@example.net\n").unwrap();
    std::fs::write(dir.join("message.eml"), "Subject: cli\r\n\r\nbody\r\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mxpipe"))
        .current_dir(&dir)
        .args(["send", "--spool", "spool", "--relay"])
        .arg(capture.addr().to_string())
        .args([
            "--from",
            "sender@example.org",
            "--to-file",
            "list.txt",
            "message.eml",
            "--report",
            "report.jsonl",
            "--wait-final",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("recipients=2 delivered=1 bounced=1 expired=0 not_final=0"),
        "{stdout}"
    );
    let report = std::fs::read_to_string(dir.join("report.jsonl")).unwrap();
    let recipients: Vec<String> = report
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["recipient"].to_string())
        .collect();
    assert_eq!(
        recipients,
        ["\"ok@example.net\"", "\"nosuch@example.net\""],
        "{report}"
    );
    // The report itself went to the sender all the same.
    let messages = capture.messages();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert_eq!(messages[1].rcpt_tos, ["sender@example.org"]);
}
