//! HTTP injection (`POST /v1/messages`) over loopback: what was posted arrives byte-exact at
//! `aiosmtpd`, merge fields fill each recipient's copy, bad input is refused with the field
//! named, and a dispatcher that takes nothing more answers 503.

mod util;

use mxpipe::engine::Dispatcher;
use mxpipe::http::{self, HttpServer, HttpState};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;
use util::CaptureServer;

/// One HTTP/1.1 request over a fresh connection: the status and the body.
fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

fn post(addr: SocketAddr, doc: &Value) -> (u16, Value) {
    let (status, body) = request(addr, "POST", "/v1/messages", &doc.to_string());
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

fn serve(relay: SocketAddr, spool: bool) -> (Arc<Dispatcher>, HttpServer) {
    let mut b = Dispatcher::builder()
        .relay(&relay.to_string())
        .ehlo_name("mxpipe.test");
    if spool {
        b = b.spool(util::fresh_temp_dir("http-spool"));
    }
    let d = Arc::new(b.start().unwrap());
    let server = http::start(
        "127.0.0.1:0".parse().unwrap(),
        HttpState::new(Arc::clone(&d), "mxpipe.test"),
    )
    .unwrap();
    (d, server)
}

#[test]
fn a_posted_raw_message_arrives_byte_exact_after_custody() {
    let capture = CaptureServer::start();
    let (d, server) = serve(capture.addr(), true);
    let raw = "From: News <news@example.org>\r\nSubject: raw {{not a field}}\r\n\r\n\
               caf\u{e9}\r\n.leading dot\r\nend\r\n";
    let (status, answer) = post(
        server.local_addr(),
        &json!({
            "from": "bounces@example.org",
            "recipients": ["ann@example.net", {"address": "bob@example.net"}],
            "raw": raw,
        }),
    );
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer, json!({"ids": [1], "custody": "spooled"}));
    assert!(d.durable_id() >= 1);
    let got = capture.wait_for_messages(1, Duration::from_secs(30));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].mail_from, "bounces@example.org");
    assert_eq!(got[0].rcpt_tos, ["ann@example.net", "bob@example.net"]);
    assert_eq!(got[0].data, raw.as_bytes());
    let (status, text) = request(server.local_addr(), "GET", "/metrics", "");
    assert_eq!(status, 200);
    assert!(text.contains("mxpipe_"), "{text}");
    server.stop();
    d.shutdown();
}

#[test]
fn merge_fields_fill_each_recipients_copy_and_without_a_spool_the_answer_says_so() {
    let capture = CaptureServer::start();
    let (d, server) = serve(capture.addr(), false);
    let (status, answer) = post(
        server.local_addr(),
        &json!({
            "from": "news@example.org",
            "header_from": "Example News <news@example.org>",
            "recipients": [
                {"address": "ann@example.net", "fields": {"name": "Ann"}},
                {"address": "bob@example.net", "fields": {"name": "Bob <b>"}},
            ],
            "subject": "Hello {{name}}",
            "text": "Hi {{name}}.",
            "html": "<p>Hi {{name}}.</p>",
        }),
    );
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["ids"], json!([1, 2]));
    assert_eq!(answer["custody"], "queued");
    assert!(answer["note"].as_str().unwrap().contains("no spool"));
    let mut got = capture.wait_for_messages(2, Duration::from_secs(30));
    got.sort_by(|a, b| a.rcpt_tos.cmp(&b.rcpt_tos));
    for (m, name, html) in [
        (&got[0], "Ann", "Ann"),
        (&got[1], "Bob <b>", "Bob &lt;b&gt;"),
    ] {
        let text = String::from_utf8(m.data.clone()).unwrap();
        assert!(
            text.starts_with("From: Example News <news@example.org>\r\nTo: <"),
            "{text}"
        );
        assert!(
            text.contains(&format!("Subject: Hello {name}\r\n")),
            "{text}"
        );
        assert!(text.contains(&format!("Hi {name}.")), "{text}");
        assert!(text.contains(&format!("<p>Hi {html}.</p>")), "{text}");
    }
    server.stop();
    d.shutdown();
}

#[test]
fn bad_input_is_refused_with_the_field_named() {
    let capture = CaptureServer::start();
    let (d, server) = serve(capture.addr(), false);
    let addr = server.local_addr();
    let cases = [
        (json!({"recipients": ["a@example.net"], "raw": "x"}), "from"),
        (
            json!({"from": 5, "recipients": ["a@example.net"], "raw": "x"}),
            "from",
        ),
        (
            json!({"from": "s@example.org", "recipients": ["a@example.net", "no-at"], "raw": "x"}),
            "recipients[1]",
        ),
        (
            json!({"from": "s@example.org", "recipients": [{"adress": "a@example.net"}], "raw": "x"}),
            "recipients[0]",
        ),
        (
            json!({"from": "s@example.org", "recipients": ["a@example.net"], "raw": "x", "colour": 1}),
            "colour",
        ),
        (
            json!({"from": "s@example.org", "recipients": ["a@example.net"]}),
            "raw",
        ),
        (
            json!({"from": "s@example.org", "recipients": [{"address": "a@example.net", "fields": {"name": "A"}}], "subject": "{{nope}}", "text": "x"}),
            "subject",
        ),
        (
            json!({"from": "s@example.org", "recipients": [{"address": "a@example.net", "notify": "NEVER,DELAY"}], "raw": "x"}),
            "recipients[0].notify",
        ),
        (
            json!({"from": "s@example.org", "recipients": ["a@example.net"], "raw": "x", "dsn": {"ret": "ALL"}}),
            "dsn.ret",
        ),
        (
            json!({"from": "s@example.org", "recipients": ["a@example.net"], "raw": "x".repeat(1200)}),
            "raw",
        ),
    ];
    for (doc, field) in cases {
        let (status, answer) = post(addr, &doc);
        assert_eq!(status, 400, "{doc}: {answer}");
        assert_eq!(answer["field"], field, "{doc}: {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.starts_with(&format!("{field}: ")), "{error}");
    }
    let (status, body) = request(addr, "POST", "/v1/messages", "{not json");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("\"field\":\"body\""), "{body}");
    // Nothing reached the server.
    d.shutdown();
    assert!(capture.messages().is_empty());
    // A dispatcher that takes nothing more: 503, with Retry-After.
    let (status, answer) = post(
        addr,
        &json!({"from": "s@example.org", "recipients": ["a@example.net"], "raw": "x"}),
    );
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["accepted_ids"], json!([]));
    server.stop();
}

#[test]
fn the_queue_tools_answer_over_http_on_a_running_spool() {
    // A relay that refuses connections: everything posted is deferred and stays queued.
    let down: SocketAddr = format!("127.0.0.1:{}", util::free_port("127.0.0.1"))
        .parse()
        .unwrap();
    let (d, server) = serve(down, true);
    let addr = server.local_addr();
    for who in ["ann@example.net", "bob@example.net"] {
        let (status, answer) = post(
            addr,
            &json!({"from": "news@example.org", "recipients": [who], "raw": "Subject: q\r\n\r\nx\r\n"}),
        );
        assert_eq!(status, 202, "{answer}");
    }
    // Both deferred (the list shows what `mxpipe queue list` shows: id, sender, counts).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let listed = loop {
        let (status, body) = request(addr, "GET", "/v1/queue", "");
        assert_eq!(status, 200, "{body}");
        let text = serde_json::from_str::<Value>(&body).unwrap()["text"]
            .as_str()
            .unwrap()
            .to_string();
        if text.matches("news@example.org").count() == 2 && d.stats().deferred >= 2 {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never deferred: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(listed.contains("1/1"), "{listed}");
    let (status, body) = request(addr, "GET", "/v1/queue/1", "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("ann@example.net"), "{body}");
    // Deleting message 2 finishes its recipient as deleted, and it leaves the list.
    let (status, body) = request(addr, "DELETE", "/v1/queue/2", "");
    assert_eq!(status, 200, "{body}");
    let (status, body) = request(addr, "GET", "/v1/queue/999", "");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("999"), "{body}");
    let (status, body) = request(addr, "GET", "/v1/queue/stats", "");
    assert_eq!(status, 200, "{body}");
    server.stop();
    d.shutdown();
    // Without a spool there is no queue to show.
    let (d, server) = serve(down, false);
    let (status, body) = request(server.local_addr(), "GET", "/v1/queue", "");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no spool"), "{body}");
    server.stop();
    d.shutdown();
}
