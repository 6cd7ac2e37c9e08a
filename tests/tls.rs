//! TLS and AUTH against `aiosmtpd` (STARTTLS, implicit TLS, AUTH PLAIN and LOGIN) with
//! certificates made at test time, and a scripted server for the STARTTLS reply-injection
//! attack. Each test checks what arrived (or that nothing did) and the outcome text.

mod util;

use mxpipe::engine::{Dispatcher, Event, EventKind, TlsPolicy};
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
        "the certificate was issued by an unknown certificate authority",
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

// ----- issue 12: security defects -------------------------------------------------------------

const SECRET: &str = "Secr3t-horse-battery";

/// Every event's text, for grepping for the secret.
fn assert_no_secret(events: &[Event], server: &CaptureServer) {
    for e in events {
        assert!(
            !format!("{e:?}").contains(SECRET),
            "secret in an event: {e:?}"
        );
    }
    assert!(!server.log().contains(SECRET), "secret in the server log");
}

/// Defect 1: with AUTH configured and the default (opportunistic) policy, a server whose
/// certificate does not verify never gets the password: the recipient is deferred, and
/// nothing is sent in plaintext instead.
#[test]
fn credentials_are_never_sent_over_unverified_tls_by_default() {
    let pki = Pki::new("tls-auth-selfsigned", &["localhost"], false);
    let server = CaptureServer::builder()
        .tls(&pki.cert(), &pki.key())
        .auth("alice", SECRET)
        .start();
    let d = Dispatcher::builder()
        .relay(&relay(&server))
        .credentials(Credentials::password("alice", SECRET).unwrap())
        .retry(quick_retry())
        .start()
        .unwrap();
    let events = send_one(&d, "bob@r.test");
    assert_eq!(events[0].kind, EventKind::Deferred, "{:?}", events[0]);
    let text = &events[0].reply.text;
    assert!(
        text.contains("certificate was issued by an unknown certificate authority"),
        "{text}"
    );
    assert_eq!(events.last().unwrap().kind, EventKind::Expired);
    assert!(server.messages().is_empty(), "nothing delivered");
    assert_no_secret(&events, &server);

    // Verification turned off explicitly: the session is encrypted, but AUTH is still not
    // sent over it.
    let d = Dispatcher::builder()
        .relay(&relay(&server))
        .tls_verify(false)
        .credentials(Credentials::password("alice", SECRET).unwrap())
        .retry(quick_retry())
        .start()
        .unwrap();
    let events = send_one(&d, "carol@r.test");
    assert_eq!(events[0].kind, EventKind::Deferred, "{:?}", events[0]);
    assert!(
        events[0]
            .reply
            .text
            .contains("certificate was not verified; credentials are sent only over verified TLS"),
        "{}",
        events[0].reply.text
    );
    assert!(server.messages().is_empty(), "nothing delivered");
    assert_no_secret(&events, &server);
}

/// Defect 2: opportunistic TLS with verification on: a certificate that fails the check
/// defers the mail; the next attempts do not go in plaintext.
#[test]
fn a_certificate_failure_under_opportunistic_tls_never_falls_back_to_plaintext() {
    let pki = Pki::new("tls-opp-verify", &["localhost"], false);
    let server = CaptureServer::builder()
        .tls(&pki.cert(), &pki.key())
        .start();
    let d = Dispatcher::builder()
        .relay(&relay(&server))
        .starttls(StartTls::Opportunistic)
        .tls_verify(true)
        .retry(quick_retry())
        .start()
        .unwrap();
    let events = send_one(&d, "v@r.test");
    assert!(events.len() >= 2, "retried, each time over TLS: {events:?}");
    for e in &events[..events.len() - 1] {
        assert_eq!(e.kind, EventKind::Deferred, "{e:?}");
        assert!(
            e.reply.text.contains("not sent in plaintext"),
            "{}",
            e.reply.text
        );
    }
    assert_eq!(events.last().unwrap().kind, EventKind::Expired);
    assert!(server.messages().is_empty(), "nothing sent in plaintext");
    assert!(!server.log().contains("MAIL FROM"), "{}", server.log());
}

/// Defect 4: a route with implicit TLS and a plaintext route to the same host and port are
/// two destinations: the implicit-TLS domain's mail is never sent in plaintext, and the
/// plaintext domain's mail is delivered, whichever route comes first.
#[test]
fn implicit_tls_and_plaintext_routes_to_one_port_do_not_share_connections() {
    for tls_first in [false, true] {
        let server = CaptureServer::start();
        let port = server.addr().port();
        let plain = format!("127.0.0.1:{port}");
        let tls = format!("smtps://127.0.0.1:{port}");
        let mut builder = Dispatcher::builder();
        if tls_first {
            builder = builder.route("tls.test", &tls).route("plain.test", &plain);
        } else {
            builder = builder.route("plain.test", &plain).route("tls.test", &tls);
        }
        let d = builder.retry(quick_retry()).start().unwrap();
        d.submit(
            Message::new(
                "s@mxpipe.test",
                ["a@plain.test", "b@tls.test"],
                b"Subject: routes\r\n\r\nbody\r\n",
            )
            .unwrap(),
        )
        .unwrap();
        assert!(d.wait_final(Duration::from_secs(60)));
        let events: Vec<Event> = d.events().unwrap().try_iter().collect();
        let last = |rcpt: &str| {
            events
                .iter()
                .rev()
                .find(|e| e.recipient.as_str() == rcpt)
                .unwrap()
                .clone()
        };
        assert_eq!(
            last("a@plain.test").kind,
            EventKind::Delivered,
            "{events:?}"
        );
        let tls_outcome = last("b@tls.test");
        assert_eq!(tls_outcome.kind, EventKind::Expired, "{events:?}");
        assert!(
            tls_outcome.reply.text.contains("TLS handshake failed"),
            "{}",
            tls_outcome.reply.text
        );
        let got = server.wait_for_messages(1, Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(200));
        let got_all = server.messages();
        assert_eq!(got_all.len(), 1, "{got:?}");
        assert_eq!(got_all[0].rcpt_tos, ["a@plain.test"]);
    }
}

/// Defect 5: an implicit-TLS server that accepts and never answers the handshake is given up
/// after the TLS handshake timeout, and the outcome says so.
#[test]
fn implicit_tls_handshake_timeout_applies() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = std::thread::spawn(move || {
        // Hold the connections open, answer nothing.
        let mut held = Vec::new();
        listener.set_nonblocking(true).unwrap();
        let until = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < until && held.len() < 4 {
            match listener.accept() {
                Ok((s, _)) => held.push(s),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        held
    });
    let d = Dispatcher::builder()
        .relay(&format!("smtps://127.0.0.1:{port}"))
        .timeouts(mxpipe::smtp::Timeouts {
            greeting: Duration::from_secs(50),
            tls_handshake: Duration::from_millis(300),
            ..Default::default()
        })
        .retry(RetryPolicy {
            max_age: Duration::from_millis(100),
            ..quick_retry()
        })
        .start()
        .unwrap();
    let events = send_one(&d, "t@r.test");
    assert_eq!(
        events[0].reply.text,
        format!("smtps://127.0.0.1:{port}: TLS handshake failed: timed out after 300ms"),
        "{:?}",
        events[0]
    );
    drop(d);
    drop(silent);
}

/// Defect 6: no usable AUTH mechanism is not "4.7.12 a password transition is needed".
#[test]
fn no_usable_auth_mechanism_has_its_own_status() {
    let pki = Pki::new("tls-nomech", &["localhost"], false);
    let server = CaptureServer::builder()
        .tls(&pki.cert(), &pki.key())
        .auth("alice", SECRET)
        .auth_exclude("PLAIN")
        .auth_exclude("LOGIN")
        .start();
    let d = Dispatcher::builder()
        .relay(&relay(&server))
        .tls_ca_file(pki.ca())
        .credentials(Credentials::password("alice", SECRET).unwrap())
        .retry(quick_retry())
        .start()
        .unwrap();
    let events = send_one(&d, "m@r.test");
    assert_eq!(events[0].kind, EventKind::Deferred, "{:?}", events[0]);
    let code = events[0].reply.enhanced.map(|c| c.to_string());
    assert_eq!(code.as_deref(), Some("4.7.0"), "{:?}", events[0]);
    assert!(
        events[0]
            .reply
            .text
            .contains("the server offers no AUTH mechanism these credentials can use"),
        "{}",
        events[0].reply.text
    );
    assert!(server.messages().is_empty());
    assert_no_secret(&events, &server);
}

/// Defect 6: a certificate error is said in words, not as Rust debug text.
#[test]
fn a_ca_certificate_used_as_the_servers_is_said_in_words() {
    let dir = util::fresh_temp_dir("tls-ca-as-ee");
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    let server = CaptureServer::builder()
        .tls(&dir.join("cert.pem"), &dir.join("key.pem"))
        .start();
    let d = Dispatcher::builder()
        .relay(&relay(&server))
        .starttls(StartTls::Required)
        .tls_ca_file(dir.join("cert.pem"))
        .retry(quick_retry())
        .start()
        .unwrap();
    let events = send_one(&d, "c@r.test");
    let text = &events[0].reply.text;
    assert!(
        text.contains("the server's certificate is a CA certificate, not a server certificate"),
        "{text}"
    );
    assert!(!text.contains("Other("), "{text}");
    assert!(server.messages().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

// ----- issue 12: TLS policy per destination ---------------------------------------------------

fn tls_override(
    domain: &str,
    policy: TlsPolicy,
    ca: Option<&Path>,
) -> mxpipe::engine::shaping::LimitOverride {
    mxpipe::engine::shaping::LimitOverride {
        pattern: domain.to_string(),
        recipient_domain: true,
        tls_policy: Some(policy),
        tls_ca_file: ca.map(Path::to_path_buf),
        ..Default::default()
    }
}

/// One server that offers STARTTLS with a certificate for "localhost" and "secure.test" from
/// the test CA; each recipient domain has its own policy. The outcome, the event's TLS fields,
/// what arrived (and whether over TLS) and the per-destination metrics are checked.
#[test]
fn tls_policy_per_recipient_domain() {
    let pki = Pki::new("tls-policy", &["localhost", "secure.test"], false);
    let server = CaptureServer::builder()
        .tls(&pki.cert(), &pki.key())
        .start();
    let ca = pki.ca();
    let d = Dispatcher::builder()
        .relay(&relay(&server))
        .limit_override(tls_override("plain.test", TlsPolicy::None, None))
        .limit_override(tls_override("secure.test", TlsPolicy::Secure, Some(&ca)))
        .limit_override(tls_override("wrong.test", TlsPolicy::Secure, Some(&ca)))
        .limit_override(tls_override("verify.test", TlsPolicy::Verify, Some(&ca)))
        .limit_override(tls_override("noca.test", TlsPolicy::Verify, None))
        .limit_override(tls_override("required.test", TlsPolicy::Required, None))
        .retry(quick_retry())
        .start()
        .unwrap();
    let recipients = [
        "a@plain.test",
        "b@secure.test",
        "c@wrong.test",
        "d@verify.test",
        "e@noca.test",
        "f@required.test",
        "g@other.test",
    ];
    for rcpt in recipients {
        d.submit(Message::new("s@mxpipe.test", [rcpt], b"Subject: p\r\n\r\nbody\r\n").unwrap())
            .unwrap();
    }
    assert!(d.wait_final(Duration::from_secs(60)), "{:?}", d.stats());
    let events: Vec<Event> = d.events().unwrap().try_iter().collect();
    let last = |rcpt: &str| {
        events
            .iter()
            .rev()
            .find(|e| e.recipient.as_str() == rcpt)
            .unwrap()
            .clone()
    };
    let delivered = |rcpt: &str, version: bool, verified: bool, policy: TlsPolicy| {
        let e = last(rcpt);
        assert_eq!(e.kind, EventKind::Delivered, "{e:?}");
        let tls = e.tls.unwrap();
        assert_eq!(tls.version.is_some(), version, "{rcpt}: {tls:?}");
        if let Some(v) = tls.version {
            assert!(v == "TLSv1.3" || v == "TLSv1.2", "{v}");
        }
        assert_eq!((tls.verified, tls.policy), (verified, policy), "{rcpt}");
    };
    delivered("a@plain.test", false, false, TlsPolicy::None);
    delivered("b@secure.test", true, true, TlsPolicy::Secure);
    delivered("d@verify.test", true, true, TlsPolicy::Verify);
    delivered("f@required.test", true, false, TlsPolicy::Required);
    delivered("g@other.test", true, false, TlsPolicy::Opportunistic);
    let wrong = last("c@wrong.test");
    assert_eq!(wrong.kind, EventKind::Expired);
    assert!(
        wrong
            .reply
            .text
            .contains("certificate not valid for name \"wrong.test\""),
        "{}",
        wrong.reply.text
    );
    let noca = last("e@noca.test");
    assert_eq!(noca.kind, EventKind::Expired);
    assert!(
        noca.reply.text.contains("unknown certificate authority"),
        "{}",
        noca.reply.text
    );

    let got = server.wait_for_messages(5, Duration::from_secs(10));
    let mut seen: Vec<(String, bool)> = got.iter().map(|m| (m.rcpt_tos.join(","), m.tls)).collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("a@plain.test".to_string(), false),
            ("b@secure.test".to_string(), true),
            ("d@verify.test".to_string(), true),
            ("f@required.test".to_string(), true),
            ("g@other.test".to_string(), true),
        ]
    );
    let metrics = d.prometheus();
    let plain_line = metrics
        .lines()
        .find(|l| {
            l.starts_with("mxpipe_destination_delivered_plaintext_total")
                && l.contains("for @plain.test")
        })
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(plain_line.ends_with(" 1"), "{plain_line}");
    let tls_line = metrics
        .lines()
        .find(|l| {
            l.starts_with("mxpipe_destination_delivered_tls_total")
                && l.contains("for @secure.test")
        })
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(tls_line.ends_with(" 1"), "{tls_line}");
}

/// A required policy for a server that does not offer STARTTLS defers; `secure` is refused
/// for a host override, where there is no recipient domain to check.
#[test]
fn tls_policy_required_without_starttls_and_secure_needs_a_domain() {
    let server = CaptureServer::start();
    let d = Dispatcher::builder()
        .relay(&relay(&server))
        .limit_override(tls_override("required.test", TlsPolicy::Required, None))
        .retry(quick_retry())
        .start()
        .unwrap();
    let events = send_one(&d, "r@required.test");
    assert_eq!(events.last().unwrap().kind, EventKind::Expired);
    assert!(
        events[0].reply.text.contains("does not offer STARTTLS"),
        "{}",
        events[0].reply.text
    );
    assert!(server.messages().is_empty());

    let mut host = tls_override("localhost", TlsPolicy::Secure, None);
    host.recipient_domain = false;
    let e = Dispatcher::builder()
        .relay(&relay(&server))
        .limit_override(host)
        .start()
        .unwrap_err();
    assert!(e.to_string().contains("tls_policy=secure"), "{e}");
}

/// Credentials per route: the recipients of "@auth.test" log in as alice over verified TLS;
/// the others do not log in at all. The secret appears in no event and no server output.
#[test]
fn credentials_per_recipient_domain() {
    let pki = Pki::new("tls-route-auth", &["localhost"], false);
    let server = CaptureServer::builder()
        .tls(&pki.cert(), &pki.key())
        .auth("alice", SECRET)
        .start();
    let other = CaptureServer::builder()
        .tls(&pki.cert(), &pki.key())
        .start();
    let mut with_auth = tls_override("auth.test", TlsPolicy::Verify, Some(&pki.ca()));
    with_auth.credentials = Some(Credentials::password("alice", SECRET).unwrap());
    let d = Dispatcher::builder()
        .route("auth.test", &relay(&server))
        .route("other.test", &relay(&other))
        .limit_override(with_auth)
        .retry(quick_retry())
        .start()
        .unwrap();
    d.submit(
        Message::new(
            "s@mxpipe.test",
            ["a@auth.test", "b@other.test"],
            b"Subject: r\r\n\r\nbody\r\n",
        )
        .unwrap(),
    )
    .unwrap();
    assert!(d.wait_final(Duration::from_secs(60)));
    let events: Vec<Event> = d.events().unwrap().try_iter().collect();
    assert!(
        events.iter().all(|e| e.kind == EventKind::Delivered),
        "{events:?}"
    );
    let got = server.wait_for_messages(1, Duration::from_secs(10));
    assert_eq!(got[0].auth_login.as_deref(), Some("alice"));
    assert!(got[0].tls);
    let got = other.wait_for_messages(1, Duration::from_secs(10));
    assert_eq!(got[0].auth_login, None);
    assert_no_secret(&events, &server);
    assert_no_secret(&events, &other);
}

// ----- issue 12 against a private Postfix with TLS and Cyrus SASL ----------------------------

/// Defect 1 against Postfix: by default (opportunistic STARTTLS) with credentials, a server
/// whose certificate does not verify never gets AUTH; with its CA trusted, the same settings
/// log in and deliver. Postfix's log and every event are grepped for the password.
#[test]
fn postfix_gets_credentials_only_over_verified_tls() {
    let pki = Pki::new("tls-postfix", &["localhost"], false);
    let postfix = util::postfix::Postfix::start(&pki.cert(), &pki.key(), &[("alice", SECRET)]);
    let relay = format!("localhost:{}", postfix.addr().port());
    let credentials = Credentials::password("alice", SECRET).unwrap();

    let d = Dispatcher::builder()
        .relay(&relay)
        .credentials(credentials.clone())
        .retry(quick_retry())
        .start()
        .unwrap();
    let events = send_one(&d, "bob@remote.test");
    assert_eq!(events[0].kind, EventKind::Deferred, "{:?}", events[0]);
    assert!(
        events[0]
            .reply
            .text
            .contains("the certificate was issued by an unknown certificate authority"),
        "{}",
        events[0].reply.text
    );
    assert_eq!(events.last().unwrap().kind, EventKind::Expired);
    let log = postfix.wait_for_log("disconnect from", 1, Duration::from_secs(10));
    assert!(!log.contains("sasl_"), "no AUTH reached Postfix: {log}");
    assert!(!log.contains("auth="), "no AUTH reached Postfix: {log}");
    assert!(!log.contains(SECRET));
    for e in &events {
        assert!(!format!("{e:?}").contains(SECRET));
    }
    drop(d);

    let d = Dispatcher::builder()
        .relay(&relay)
        .credentials(credentials)
        .tls_ca_file(pki.ca())
        .retry(quick_retry())
        .start()
        .unwrap();
    let events = send_one(&d, "carol@remote.test");
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].kind, EventKind::Delivered, "{:?}", events[0]);
    let tls = events[0].tls.unwrap();
    assert!(tls.version.is_some() && tls.verified, "{tls:?}");
    let log = postfix.wait_for_log("status=sent", 1, Duration::from_secs(10));
    assert!(
        log.contains("sasl_method=PLAIN, sasl_username=alice@postfix.test"),
        "{log}"
    );
    assert!(log.contains("to=<carol@remote.test>"), "{log}");
    assert!(!log.contains("bob@remote.test"), "{log}");
    assert!(!log.contains(SECRET));
}

/// Defect 2, the other half: a handshake that fails (here the server answers STARTTLS's 220
/// with bytes that are not TLS) lets opportunistic TLS go on in plaintext, and the deferral
/// says so; the next connection does not try STARTTLS and delivers.
#[test]
fn a_failed_handshake_under_opportunistic_tls_falls_back_to_plaintext_and_says_so() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let mut transcripts = Vec::new();
        for _ in 0..2 {
            let (tcp, _) = listener.accept().unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut reader = BufReader::new(tcp.try_clone().unwrap());
            let mut tcp = tcp;
            let mut lines = Vec::new();
            tcp.write_all(b"220 scripted ESMTP\r\n").unwrap();
            let mut line = String::new();
            loop {
                line.clear();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let command = line.trim_end().to_string();
                lines.push(command.clone());
                let reply: &[u8] = match command.split(' ').next().unwrap_or("") {
                    "EHLO" => b"250-scripted\r\n250-PIPELINING\r\n250 STARTTLS\r\n",
                    "STARTTLS" => b"220 2.0.0 go ahead\r\n",
                    "MAIL" | "RCPT" => b"250 2.1.0 Ok\r\n",
                    "DATA" => b"354 go\r\n",
                    "." => b"250 2.0.0 Ok: queued\r\n",
                    "QUIT" => b"221 2.0.0 Bye\r\n",
                    _ => b"",
                };
                let _ = tcp.write_all(reply);
                if command == "STARTTLS" {
                    // Read the ClientHello, answer with what is not a TLS record: the
                    // handshake fails (not a certificate check).
                    let mut hello = [0u8; 512];
                    let _ = reader.read(&mut hello);
                    let _ = tcp.write_all(b"500 this is not TLS\r\n");
                    std::thread::sleep(Duration::from_millis(200));
                    break;
                }
                if command == "QUIT" {
                    break;
                }
            }
            transcripts.push(lines);
        }
        transcripts
    });
    let d = Dispatcher::builder()
        .relay(&format!("127.0.0.1:{port}"))
        .starttls(StartTls::Opportunistic)
        .retry(RetryPolicy {
            max_age: Duration::from_secs(20),
            ..quick_retry()
        })
        .start()
        .unwrap();
    let events = send_one(&d, "h@r.test");
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].kind, EventKind::Deferred);
    let text = &events[0].reply.text;
    assert!(
        text.contains("TLS handshake failed")
            && text.contains("the next connections go in plaintext for 3600s"),
        "{text}"
    );
    assert_eq!(events[1].kind, EventKind::Delivered, "{:?}", events[1]);
    let tls = events[1].tls.unwrap();
    assert_eq!((tls.version, tls.policy), (None, TlsPolicy::Opportunistic));
    drop(d);
    let transcripts = server.join().unwrap();
    assert_eq!(transcripts[0], ["EHLO localhost", "STARTTLS"]);
    assert_eq!(
        &transcripts[1][..4],
        [
            "EHLO localhost",
            "MAIL FROM:<s@mxpipe.test>",
            "RCPT TO:<h@r.test>",
            "DATA"
        ]
    );
}
