//! TLS and AUTH against `aiosmtpd` (STARTTLS, implicit TLS, AUTH PLAIN and LOGIN) with
//! certificates made at test time, and a scripted server for the STARTTLS reply-injection
//! attack. Each test checks what arrived (or that nothing did) and the outcome text.

mod util;

use mxpipe::engine::{Dispatcher, Event, EventKind};
use mxpipe::message::Message;
use mxpipe::queue::RetryPolicy;
use mxpipe::smtp::{Credentials, StartTls};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use util::CaptureServer;

fn quick_retry() -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(100),
        max_interval: Duration::from_millis(200),
        multiplier: 2.0,
        jitter: 0.1,
        max_age: Duration::from_millis(400),
    }
}

/// A CA and a server certificate made with rcgen, written as PEM files.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// `names`: the server certificate's subject alternative names; `expired`: valid only
    /// in the past.
    fn new(label: &str, names: &[&str], expired: bool) -> Pki {
        let dir = util::fresh_temp_dir(label);
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "mxpipe test CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        Pki { dir }
    }
    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }
    fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn send_one(d: &Dispatcher, rcpt: &str) -> Vec<Event> {
    d.submit(
        Message::new(
            "s@mxpipe.test",
            [rcpt],
            b"Subject: tls\r\n\r\nsecret body\r\n",
        )
        .unwrap(),
    )
    .unwrap();
    assert!(d.wait_final(Duration::from_secs(60)), "{:?}", d.stats());
    d.events().unwrap().try_iter().collect()
}

fn relay(server: &CaptureServer) -> String {
    format!("localhost:{}", server.addr().port())
}

#[test]
fn starttls_with_verification_and_auth_plain() {
    let pki = Pki::new("tls-ok", &["localhost"], false);
    let server = CaptureServer::builder()
        .tls(&pki.cert(), &pki.key())
        .require_starttls()
        .auth("alice", "correct horse")
        .start();
    let d = Dispatcher::builder()
        .relay(&relay(&server))
        .starttls(StartTls::Required)
        .tls_ca_file(pki.ca())
        .credentials(Credentials::password("alice", "correct horse").unwrap())
        .retry(quick_retry())
        .start()
        .unwrap();
    let events = send_one(&d, "bob@r.test");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, EventKind::Delivered, "{:?}", events[0]);
    let got = server.wait_for_messages(1, Duration::from_secs(10));
    assert!(got[0].tls, "delivered over TLS");
    assert_eq!(got[0].auth_login.as_deref(), Some("alice"));
    assert_eq!(got[0].data, b"Subject: tls\r\n\r\nsecret body\r\n");
}

#[test]
fn auth_login_when_plain_is_not_offered() {
    let pki = Pki::new("tls-login", &["localhost"], false);
    let server = CaptureServer::builder()
        .tls(&pki.cert(), &pki.key())
        .auth("alice", "pw")
        .auth_exclude("PLAIN")
        .start();
    let d = Dispatcher::builder()
        .relay(&relay(&server))
        .tls_ca_file(pki.ca())
        .credentials(Credentials::password("alice", "pw").unwrap())
        .retry(quick_retry())
        .start()
        .unwrap();
    let events = send_one(&d, "bob@r.test");
    assert_eq!(events[0].kind, EventKind::Delivered, "{:?}", events[0]);
    assert_eq!(
        server.wait_for_messages(1, Duration::from_secs(10))[0]
            .auth_login
            .as_deref(),
        Some("alice")
    );
}

#[test]
fn wrong_password_is_deferred_with_the_servers_text() {
    let pki = Pki::new("tls-badpw", &["localhost"], false);
    let server = CaptureServer::builder()
        .tls(&pki.cert(), &pki.key())
        .auth("alice", "right")
        .start();
    let d = Dispatcher::builder()
        .relay(&relay(&server))
        .tls_ca_file(pki.ca())
        .credentials(Credentials::password("alice", "wrong-secret").unwrap())
        .retry(quick_retry())
        .start()
        .unwrap();
    let events = send_one(&d, "bob@r.test");
    let last = events.last().unwrap();
    assert_eq!(events[0].kind, EventKind::Deferred);
    assert_eq!(last.kind, EventKind::Expired);
    assert_eq!(last.reply.code, 535);
    assert!(
        last.reply.text.contains("authentication failed: 535"),
        "{}",
        last.reply.text
    );
    assert!(events
        .iter()
        .all(|e| !e.reply.text.contains("wrong-secret")));
    assert!(server.messages().is_empty());
}

#[test]
fn implicit_tls_on_its_own_port() {
    let pki = Pki::new("tls-implicit", &["localhost"], false);
    let server = CaptureServer::builder()
        .tls(&pki.cert(), &pki.key())
        .implicit_tls()
        .auth("alice", "pw")
        .start();
    let d = Dispatcher::builder()
        .relay(&format!("smtps://{}", relay(&server)))
        .tls_ca_file(pki.ca())
        .credentials(Credentials::password("alice", "pw").unwrap())
        .retry(quick_retry())
        .start()
        .unwrap();
    let events = send_one(&d, "bob@r.test");
    assert_eq!(events[0].kind, EventKind::Delivered, "{:?}", events[0]);
    let got = server.wait_for_messages(1, Duration::from_secs(10));
    assert!(got[0].tls);
}

/// A certificate problem under verification defers with the reason; the same server under
/// opportunistic TLS without verification gets the mail, encrypted.
fn certificate_case(label: &str, names: &[&str], expired: bool, trust: bool, reason: &str) {
    let pki = Pki::new(label, names, expired);
    let server = CaptureServer::builder()
        .tls(&pki.cert(), &pki.key())
        .start();
    let mut builder = Dispatcher::builder()
        .relay(&relay(&server))
        .starttls(StartTls::Required)
        .retry(quick_retry());
    if trust {
        builder = builder.tls_ca_file(pki.ca());
    }
    let d = builder.start().unwrap();
    let events = send_one(&d, "v@r.test");
    assert_eq!(events[0].kind, EventKind::Deferred);
    let text = &events[0].reply.text;
    assert!(
        text.contains("TLS handshake failed") && text.contains(reason),
        "{label}: {text}"
    );
    assert_eq!(events.last().unwrap().kind, EventKind::Expired);
    assert!(
        server.messages().is_empty(),
        "nothing sent after a failed handshake"
    );

    let d = Dispatcher::builder()
        .relay(&relay(&server))
        .starttls(StartTls::Opportunistic)
        .tls_verify(false)
        .retry(quick_retry())
        .start()
        .unwrap();
    let events = send_one(&d, "o@r.test");
    assert_eq!(
        events[0].kind,
        EventKind::Delivered,
        "{label}: {:?}",
        events[0]
    );
    assert!(server.wait_for_messages(1, Duration::from_secs(10))[0].tls);
}

#[test]
fn wrong_host_name() {
    certificate_case(
        "tls-name",
        &["mx.elsewhere.test"],
        false,
        true,
        "certificate not valid for name \"localhost\"",
    );
}

#[test]
fn expired_certificate() {
    certificate_case(
        "tls-expired",
        &["localhost"],
        true,
        true,
        "certificate expired",
    );
}

#[test]
fn unknown_ca() {
    certificate_case(
        "tls-unknown-ca",
        &["localhost"],
        false,
        false,
        "UnknownIssuer",
    );
}

#[test]
fn required_tls_without_starttls_sends_no_plaintext_mail() {
    let server = CaptureServer::start();
    let d = Dispatcher::builder()
        .relay(&relay(&server))
        .starttls(StartTls::Required)
        .retry(quick_retry())
        .start()
        .unwrap();
    let events = send_one(&d, "p@r.test");
    assert_eq!(events[0].kind, EventKind::Deferred);
    assert!(
        events[0].reply.text.contains("does not offer STARTTLS"),
        "{}",
        events[0].reply.text
    );
    assert!(server.messages().is_empty());
    assert!(
        !server.log().contains("MAIL FROM"),
        "no MAIL in plaintext: {}",
        server.log()
    );
}

/// mxpipe's own scripted server: a 220 to STARTTLS followed, in the same packet, by a fake
/// "250" reply. The client must ignore it, finish the handshake, send EHLO again, and deliver.
#[test]
fn injected_reply_after_starttls_is_ignored() {
    let pki = Pki::new("tls-inject", &["localhost"], false);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (cert, key) = (pki.cert(), pki.key());
    let server = std::thread::spawn(move || scripted_starttls_server(listener, &cert, &key));
    let d = Dispatcher::builder()
        .relay(&format!("localhost:{port}"))
        .starttls(StartTls::Required)
        .tls_ca_file(pki.ca())
        .retry(quick_retry())
        .start()
        .unwrap();
    let events = send_one(&d, "i@r.test");
    assert_eq!(events[0].kind, EventKind::Delivered, "{:?}", events[0]);
    let transcript = server.join().unwrap();
    assert_eq!(
        transcript,
        [
            "EHLO localhost",
            "STARTTLS",
            "TLS: EHLO localhost",
            "TLS: MAIL FROM:<s@mxpipe.test>",
            "TLS: RCPT TO:<i@r.test>",
            "TLS: DATA",
        ]
    );
}

fn scripted_starttls_server(listener: TcpListener, cert: &Path, key: &Path) -> Vec<String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (mut tcp, _) = listener.accept().unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut transcript = Vec::new();
    let mut plain = BufReader::new(tcp.try_clone().unwrap());
    let mut line = String::new();
    tcp.write_all(b"220 scripted ESMTP\r\n").unwrap();
    plain.read_line(&mut line).unwrap();
    transcript.push(line.trim_end().to_string());
    tcp.write_all(b"250-scripted\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
        .unwrap();
    line.clear();
    plain.read_line(&mut line).unwrap();
    transcript.push(line.trim_end().to_string());
    // The attack: a forged reply in the same packet as the 220.
    tcp.write_all(b"220 2.0.0 Ready to start TLS\r\n250-forged\r\n250 AUTH PLAIN\r\n")
        .unwrap();
    let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let conn = rustls::ServerConnection::new(Arc::new(config)).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut reader = Vec::new();
    let mut read_line =
        |tls: &mut rustls::StreamOwned<rustls::ServerConnection, std::net::TcpStream>| -> String {
            reader.clear();
            let mut byte = [0u8; 1];
            while !reader.ends_with(b"\r\n") {
                if tls.read(&mut byte).unwrap() == 0 {
                    break;
                }
                reader.push(byte[0]);
            }
            String::from_utf8_lossy(&reader).trim_end().to_string()
        };
    let ehlo = read_line(&mut tls);
    transcript.push(format!("TLS: {ehlo}"));
    tls.write_all(b"250-scripted\r\n250 PIPELINING\r\n")
        .unwrap();
    for _ in 0..3 {
        let l = read_line(&mut tls);
        transcript.push(format!("TLS: {l}"));
    }
    tls.write_all(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
        .unwrap();
    let mut content = Vec::new();
    while !content.ends_with(b"\r\n.\r\n") {
        let mut byte = [0u8; 1];
        if tls.read(&mut byte).unwrap() == 0 {
            break;
        }
        content.push(byte[0]);
    }
    tls.write_all(b"250 2.0.0 Ok: queued\r\n").unwrap();
    let _ = tls.flush();
    transcript
}
