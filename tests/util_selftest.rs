//! Tests of the test helpers in `tests/util`: that the real servers start, answer as their
//! flags say, and that what the helpers read back is what was sent. Driven by hand over
//! `std::net::TcpStream` (and Python's smtplib for TLS), never by the crate under test.

mod util;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use util::{dot_stuff, CaptureServer, RawSmtpClient, SinkDump, SmtpSink, TestCert};

/// MAIL, RCPT..., DATA with `body` dot-stuffed; returns the reply to the final dot.
fn send_message(client: &mut RawSmtpClient, from: &str, rcpts: &[&str], body: &[u8]) -> u16 {
    assert_eq!(client.command(&format!("MAIL FROM:<{from}>")).code, 250);
    for rcpt in rcpts {
        assert_eq!(client.command(&format!("RCPT TO:<{rcpt}>")).code, 250);
    }
    assert_eq!(client.command("DATA").code, 354);
    client.send_raw(&dot_stuff(body));
    client.read_reply().code
}

/// A body with a line that needs dot-stuffing, one already starting with two dots, a lone dot
/// in the middle, and 8-bit bytes that are not UTF-8.
const TRICKY_BODY: &[u8] = b"From: a@example.test\r\nSubject: dots\r\n\r\n.starts with a dot\r\n..two dots\r\n.\r\nx\r\nLatin-1 \xe9\xff and UTF-8 \xc3\xa9\r\n";

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn free_port_is_bindable() {
    let port = util::free_port("127.0.0.1");
    assert_ne!(port, 0);
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("free port can be bound");
}

#[test]
fn dot_stuff_doubles_leading_dots_and_terminates() {
    assert_eq!(
        dot_stuff(b".a\r\nb.\r\n..c\r\n"),
        b"..a\r\nb.\r\n...c\r\n.\r\n"
    );
    assert_eq!(dot_stuff(b"no newline"), b"no newline\r\n.\r\n");
    assert_eq!(dot_stuff(b""), b".\r\n");
}

#[test]
fn smtp_sink_accepts_a_transaction() {
    let sink = SmtpSink::start(&[], 64);
    let mut client = RawSmtpClient::connect(sink.addr());
    let ehlo = client.command("EHLO client.test");
    assert_eq!(ehlo.code, 250);
    assert!(ehlo.lines.iter().any(|l| l == "PIPELINING"), "{ehlo:?}");
    assert!(ehlo.lines.iter().any(|l| l == "8BITMIME"), "{ehlo:?}");
    let mail = client.command("MAIL FROM:<sender@example.test>");
    assert_eq!((mail.code, mail.text()), (250, "2.1.0 Ok".to_string()));
    let rcpt = client.command("RCPT TO:<rcpt@example.test>");
    assert_eq!((rcpt.code, rcpt.text()), (250, "2.1.5 Ok".to_string()));
    assert_eq!(client.command("DATA").code, 354);
    client.send_raw(&dot_stuff(TRICKY_BODY));
    let dot = client.read_reply();
    assert_eq!((dot.code, dot.text()), (250, "2.0.0 Ok".to_string()));
    assert_eq!(client.command("QUIT").code, 221);
    assert!(process_exists(sink.pid()));
}

#[test]
fn smtp_sink_soft_rejects_rcpt_with_r_flag() {
    let sink = SmtpSink::start(&["-r", "rcpt"], 64);
    let mut client = RawSmtpClient::connect(sink.addr());
    let ehlo = client.command("EHLO client.test");
    // -r implies -p: no PIPELINING.
    assert!(!ehlo.lines.iter().any(|l| l == "PIPELINING"), "{ehlo:?}");
    assert_eq!(client.command("MAIL FROM:<s@example.test>").code, 250);
    let rcpt = client.command("RCPT TO:<r@example.test>");
    assert_eq!(rcpt.code, 450, "{rcpt:?}");
    assert_eq!(rcpt.text(), "4.3.0 Error: command failed");
}

#[test]
fn smtp_sink_listens_on_another_loopback_address_and_dies_with_its_handle() {
    let sink = SmtpSink::start_on("127.0.0.2", &["-h", "second.test"]);
    assert_eq!(sink.addr().ip().to_string(), "127.0.0.2");
    let mut client = RawSmtpClient::connect(sink.addr());
    let ehlo = client.command("EHLO client.test");
    assert_eq!(ehlo.lines[0], "second.test");
    let pid = sink.pid();
    drop(client);
    drop(sink);
    assert!(
        !process_exists(pid),
        "smtp-sink {pid} still running after drop"
    );
}

#[test]
fn smtp_sink_dump_holds_envelope_and_lf_normalised_content() {
    let sink = SmtpSink::start_dumping("127.0.0.1", &[]);
    let mut client = RawSmtpClient::connect(sink.addr());
    assert_eq!(client.command("EHLO client.test").code, 250);
    let code = send_message(
        &mut client,
        "sender@example.test",
        &["a@example.test", "b@example.test"],
        TRICKY_BODY,
    );
    assert_eq!(code, 250);
    // An aborted transaction leaves no dump.
    assert_eq!(client.command("MAIL FROM:<other@example.test>").code, 250);
    assert_eq!(client.command("RSET").code, 250);
    assert_eq!(client.command("QUIT").code, 221);

    let dumps = sink.dumps();
    assert_eq!(dumps.len(), 1, "{dumps:?}");
    let dump = &dumps[0];
    assert_eq!(dump.client_addr, "127.0.0.1");
    assert_eq!(dump.client_proto, "ESMTP");
    assert_eq!(dump.helo_args.as_deref(), Some("client.test"));
    assert_eq!(dump.mail_args, "<sender@example.test>");
    assert_eq!(dump.rcpt_args, ["<a@example.test>", "<b@example.test>"]);
    let lf_only: Vec<u8> = TRICKY_BODY
        .iter()
        .copied()
        .filter(|&b| b != b'\r')
        .collect();
    assert_eq!(
        String::from_utf8_lossy(&dump.content),
        String::from_utf8_lossy(&lf_only)
    );
    assert_eq!(dump.content, lf_only);
}

#[test]
fn sink_dump_parse_rejects_a_transaction_in_progress() {
    let partial = b"X-Client-Addr: 127.0.0.1\nX-Client-Proto: ESMTP\nX-Mail-Args: <a@b>\n";
    assert!(SinkDump::parse(partial).is_err());
}

#[test]
fn capture_server_keeps_the_exact_bytes() {
    let server = CaptureServer::start();
    let mut client = RawSmtpClient::connect(server.addr());
    let ehlo = client.command("EHLO client.test");
    assert!(ehlo.lines.iter().any(|l| l == "8BITMIME"), "{ehlo:?}");
    assert!(ehlo.lines.iter().any(|l| l == "SMTPUTF8"), "{ehlo:?}");
    assert!(ehlo.lines.iter().any(|l| l == "SIZE 67108864"), "{ehlo:?}");

    assert_eq!(
        client
            .command("MAIL FROM:<sender@example.test> BODY=8BITMIME SIZE=200")
            .code,
        250
    );
    assert_eq!(client.command("RCPT TO:<a@example.test>").code, 250);
    assert_eq!(client.command("RCPT TO:<b@example.test>").code, 250);
    assert_eq!(client.command("DATA").code, 354);
    // Dot-stuffed by hand on the wire, so the helper under test is not the only witness.
    client.send_raw(b"From: a@example.test\r\nSubject: dots\r\n\r\n..starts with a dot\r\n...two dots\r\n..\r\nx\r\nLatin-1 \xe9\xff and UTF-8 \xc3\xa9\r\n.\r\n");
    let dot = client.read_reply();
    assert_eq!(dot.code, 250, "{dot:?}");
    assert_eq!(dot.text(), "2.0.0 OK queued as 000001");

    let second = b"Subject: second\r\n\r\nbody\r\n";
    assert_eq!(
        send_message(&mut client, "", &["c@example.test"], second),
        250
    );
    assert_eq!(client.command("QUIT").code, 221);

    let messages = server.wait_for_messages(2, Duration::from_secs(10));
    assert_eq!(messages.len(), 2);
    let first = &messages[0];
    assert_eq!(first.seq, 1);
    assert_eq!(first.mail_from, "sender@example.test");
    assert_eq!(first.rcpt_tos, ["a@example.test", "b@example.test"]);
    assert_eq!(first.mail_options, ["BODY=8BITMIME", "SIZE=200"]);
    assert_eq!(first.helo.as_deref(), Some("client.test"));
    assert!(!first.tls);
    assert_eq!(first.auth_login, None);
    assert_eq!(first.data, TRICKY_BODY);

    assert_eq!(messages[1].seq, 2);
    assert_eq!(messages[1].mail_from, "<>", "null reverse-path");
    assert_eq!(messages[1].data, second);
}

#[test]
fn capture_server_takes_a_one_mebibyte_message() {
    let server = CaptureServer::start();
    let mut body = b"Subject: big\r\n\r\n".to_vec();
    let mut i = 0u32;
    while body.len() < 1 << 20 {
        // 8-bit and leading-dot lines throughout, each well under the 998-byte limit.
        body.extend_from_slice(format!(".{i:07} ").as_bytes());
        body.extend(std::iter::repeat_n(0xe9u8, 60));
        body.extend_from_slice(b"\r\n");
        i += 1;
    }
    let mut client = RawSmtpClient::connect(server.addr());
    assert_eq!(client.command("EHLO client.test").code, 250);
    assert_eq!(
        send_message(&mut client, "s@example.test", &["r@example.test"], &body),
        250
    );
    let messages = server.wait_for_messages(1, Duration::from_secs(10));
    assert_eq!(messages[0].data.len(), body.len());
    assert!(messages[0].data == body, "1 MiB body differs");
}

#[test]
fn capture_server_rejects_and_tempfails_recipients() {
    let server = CaptureServer::builder()
        .reject_rcpt("unknown")
        .reject_rcpt("gone")
        .tempfail_rcpt("busy")
        .start();
    let mut client = RawSmtpClient::connect(server.addr());
    assert_eq!(client.command("EHLO client.test").code, 250);
    assert_eq!(client.command("MAIL FROM:<s@example.test>").code, 250);
    let rejected = client.command("RCPT TO:<unknown@example.test>");
    assert_eq!(
        (rejected.code, rejected.text()),
        (550, "5.1.1 User unknown".to_string())
    );
    assert_eq!(client.command("RCPT TO:<gone@example.test>").code, 550);
    let busy = client.command("RCPT TO:<busy@example.test>");
    assert_eq!(busy.code, 450, "{busy:?}");
    assert!(busy.text().starts_with("4.2.1 "), "{busy:?}");
    assert_eq!(client.command("RCPT TO:<ok@example.test>").code, 250);
    assert_eq!(client.command("DATA").code, 354);
    client.send_raw(&dot_stuff(b"Subject: x\r\n\r\nx\r\n"));
    assert_eq!(client.read_reply().code, 250);

    let messages = server.wait_for_messages(1, Duration::from_secs(10));
    assert_eq!(messages[0].rcpt_tos, ["ok@example.test"]);
}

#[test]
fn capture_server_tempfails_the_first_transactions() {
    let server = CaptureServer::builder().tempfail_first(2).start();
    let mut client = RawSmtpClient::connect(server.addr());
    assert_eq!(client.command("EHLO client.test").code, 250);
    let body = b"Subject: retry\r\n\r\nx\r\n";
    for expected in [451, 451, 250] {
        assert_eq!(
            send_message(&mut client, "s@example.test", &["r@example.test"], body),
            expected
        );
    }
    let messages = server.wait_for_messages(1, Duration::from_secs(10));
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].seq, 1);
}

#[test]
fn capture_server_can_close_in_data() {
    let server = CaptureServer::builder().close_in_data().start();
    let mut client = RawSmtpClient::connect(server.addr());
    assert_eq!(client.command("EHLO client.test").code, 250);
    assert_eq!(client.command("MAIL FROM:<s@example.test>").code, 250);
    assert_eq!(client.command("RCPT TO:<r@example.test>").code, 250);
    assert_eq!(client.command("DATA").code, 354);
    client.send_raw(&dot_stuff(b"Subject: x\r\n\r\nx\r\n"));
    assert!(client.is_closed_by_server());
    assert!(server.messages().is_empty());
}

#[test]
fn capture_server_enforces_its_size_limit() {
    let server = CaptureServer::builder().size_limit(1000).start();
    let mut client = RawSmtpClient::connect(server.addr());
    let ehlo = client.command("EHLO client.test");
    assert!(ehlo.lines.iter().any(|l| l == "SIZE 1000"), "{ehlo:?}");
    assert_eq!(
        client.command("MAIL FROM:<s@example.test> SIZE=5000").code,
        552
    );
    assert_eq!(client.command("MAIL FROM:<s@example.test>").code, 250);
    assert_eq!(client.command("RCPT TO:<r@example.test>").code, 250);
    assert_eq!(client.command("DATA").code, 354);
    let big = vec![b'x'; 70]
        .into_iter()
        .chain(*b"\r\n")
        .cycle()
        .take(2000);
    client.send_raw(&dot_stuff(&big.collect::<Vec<u8>>()));
    assert_eq!(client.read_reply().code, 552);
    assert!(server.messages().is_empty());
}

#[test]
fn capture_server_requires_auth_when_configured() {
    let server = CaptureServer::builder().auth("user", "secret").start();
    let mut client = RawSmtpClient::connect(server.addr());
    let ehlo = client.command("EHLO client.test");
    assert!(
        ehlo.lines.iter().any(|l| l.starts_with("AUTH ")),
        "{ehlo:?}"
    );
    assert_eq!(client.command("MAIL FROM:<s@example.test>").code, 530);
    // base64("\0user\0wrong") then base64("\0user\0secret")
    assert_eq!(client.command("AUTH PLAIN AHVzZXIAd3Jvbmc=").code, 535);
    assert_eq!(client.command("AUTH PLAIN AHVzZXIAc2VjcmV0").code, 235);
    assert_eq!(
        send_message(&mut client, "s@example.test", &["r@example.test"], b"x\r\n"),
        250
    );
    let messages = server.wait_for_messages(1, Duration::from_secs(10));
    assert_eq!(messages[0].auth_login.as_deref(), Some("user"));
}

#[test]
fn capture_server_dies_with_its_handle() {
    let server = CaptureServer::start();
    let pid = server.pid();
    let out = server.out_dir();
    assert!(process_exists(pid));
    drop(server);
    assert!(!process_exists(pid), "capture server {pid} still running");
    assert!(!out.exists(), "{} left behind", out.display());
}

/// Python's smtplib speaks TLS for us: STARTTLS then AUTH with `require_starttls`, and implicit
/// TLS, both verifying the test CA.
#[test]
fn capture_server_speaks_starttls_and_implicit_tls() {
    let cert = TestCert::generate();
    let starttls = CaptureServer::builder()
        .tls(&cert.cert_path(), &cert.key_path())
        .require_starttls()
        .auth("user", "secret")
        .start();
    let implicit = CaptureServer::builder()
        .tls(&cert.cert_path(), &cert.key_path())
        .implicit_tls()
        .start();

    // Before STARTTLS everything but EHLO/NOOP/QUIT/STARTTLS is refused.
    let mut plain = RawSmtpClient::connect(starttls.addr());
    let ehlo = plain.command("EHLO client.test");
    assert!(ehlo.lines.iter().any(|l| l == "STARTTLS"), "{ehlo:?}");
    assert!(
        !ehlo.lines.iter().any(|l| l.starts_with("AUTH")),
        "{ehlo:?}"
    );
    assert_eq!(plain.command("MAIL FROM:<s@example.test>").code, 530);

    let script = r#"
import smtplib, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[1])
s = smtplib.SMTP("127.0.0.1", int(sys.argv[2]), local_hostname="client.test")
s.starttls(context=ctx)
s.login("user", "secret")
s.sendmail("s@example.test", ["r@example.test"], b"Subject: tls\r\n\r\nover starttls\r\n")
s.quit()
s = smtplib.SMTP_SSL("localhost", int(sys.argv[3]), context=ctx, local_hostname="client.test")
s.sendmail("s@example.test", ["r@example.test"], b"Subject: tls\r\n\r\nimplicit\r\n")
s.quit()
"#;
    let out = Command::new(util::test_python())
        .arg("-c")
        .arg(script)
        .arg(cert.ca_path())
        .arg(starttls.addr().port().to_string())
        .arg(implicit.addr().port().to_string())
        .stdin(Stdio::null())
        .output()
        .expect("run python smtplib client");
    assert!(
        out.status.success(),
        "smtplib client failed: {}\nstarttls server: {}\nimplicit server: {}",
        String::from_utf8_lossy(&out.stderr),
        starttls.log(),
        implicit.log()
    );

    let over_starttls = starttls.wait_for_messages(1, Duration::from_secs(10));
    assert!(over_starttls[0].tls);
    assert_eq!(over_starttls[0].auth_login.as_deref(), Some("user"));
    assert_eq!(
        over_starttls[0].data,
        b"Subject: tls\r\n\r\nover starttls\r\n"
    );
    let over_implicit = implicit.wait_for_messages(1, Duration::from_secs(10));
    assert!(over_implicit[0].tls);
    assert_eq!(over_implicit[0].data, b"Subject: tls\r\n\r\nimplicit\r\n");
}

#[test]
fn servers_listen_on_ipv6_loopback() {
    let sink = SmtpSink::start_on("::1", &[]);
    assert_eq!(sink.addr().ip().to_string(), "::1");
    let mut client = RawSmtpClient::connect(sink.addr());
    assert_eq!(client.command("EHLO client.test").code, 250);

    let server = CaptureServer::builder().host("::1").start();
    assert_eq!(server.addr().ip().to_string(), "::1");
    let mut client = RawSmtpClient::connect(server.addr());
    assert_eq!(client.command("EHLO client.test").code, 250);
    assert_eq!(
        send_message(&mut client, "s@example.test", &["r@example.test"], b"x\r\n"),
        250
    );
    assert_eq!(
        server.wait_for_messages(1, Duration::from_secs(10)).len(),
        1
    );
}
