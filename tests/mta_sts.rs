//! MTA-STS (RFC 8461) end to end: dnsmasq serves the MX, `_mta-sts` TXT and `mta-sts.<domain>`
//! records; a rustls HTTPS server in the test serves each domain's policy file with a
//! certificate from a test CA; the exchangers are `aiosmtpd` capture servers, one offering
//! STARTTLS with a certificate from that CA, one in plaintext only. Each test checks every
//! recipient's outcome, what each server received, and which policies were fetched.

mod util;

use mxpipe::engine::{Dispatcher, Event, EventKind, TlsPolicy};
use mxpipe::message::Message;
use mxpipe::queue::RetryPolicy;
use mxpipe::route::mx::MxConfig;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use util::dns::Dnsmasq;
use util::CaptureServer;

/// The exchanger with STARTTLS and the one without.
const TLS_MX: &str = "127.0.0.10";
const PLAIN_MX: &str = "127.0.0.11";

/// A test CA and one server certificate for `names`, as PEM files (for aiosmtpd and the
/// dispatcher's `tls_ca_file`) and DER (for the HTTPS server).
struct Pki {
    dir: PathBuf,
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl Pki {
    fn new(label: &str, names: &[String]) -> Pki {
        let dir = util::fresh_temp_dir(label);
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "mxpipe MTA-STS test CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names.to_vec())
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        Pki {
            dir,
            cert: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An HTTPS server on 127.0.0.1 answering each `Host` with a canned HTTP answer (404 for
/// others), recording the hosts and paths asked for. One connection at a time.
struct PolicyServer {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<(String, String)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PolicyServer {
    fn start(pki: &Pki, answers: HashMap<String, String>) -> PolicyServer {
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![pki.cert.clone()],
            PrivateKeyDer::Pkcs8(pki.key.clone_key()),
        )
        .unwrap();
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, stopping) = (Arc::clone(&requests), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                if let Some(request) = serve(stream, &config, &answers) {
                    seen.lock().unwrap().push(request);
                }
            }
        });
        PolicyServer {
            addr,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    /// The (Host, path) of every request answered so far.
    fn requests(&self) -> Vec<(String, String)> {
        self.requests.lock().unwrap().clone()
    }

    fn fetches_of(&self, host: &str) -> usize {
        self.requests().iter().filter(|(h, _)| h == host).count()
    }
}

impl Drop for PolicyServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Answers one HTTPS request; returns its Host and path.
fn serve(
    stream: TcpStream,
    config: &Arc<rustls::ServerConfig>,
    answers: &HashMap<String, String>,
) -> Option<(String, String)> {
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let connection = rustls::ServerConnection::new(Arc::clone(config)).ok()?;
    let mut tls = rustls::StreamOwned::new(connection, stream);
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
        let n = tls.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&request).to_string();
    let path = text.split(' ').nth(1).unwrap_or_default().to_string();
    let host = text
        .lines()
        .find_map(|l| l.strip_prefix("Host: "))
        .unwrap_or_default()
        .trim()
        .to_string();
    let answer = answers
        .get(&host)
        .cloned()
        .unwrap_or_else(|| "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".into());
    let _ = tls.write_all(answer.as_bytes());
    tls.conn.send_close_notify();
    let _ = tls.flush();
    Some((host, path))
}

/// An HTTP 200 answer carrying a policy file.
fn policy(mode: &str, mx: &[&str]) -> String {
    let mut body = format!("version: STSv1\r\nmode: {mode}\r\n");
    for m in mx {
        body.push_str(&format!("mx: {m}\r\n"));
    }
    body.push_str("max_age: 86400\r\n");
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// A port free on every loopback address the test uses.
fn common_port(ips: &[&str]) -> u16 {
    for _ in 0..50 {
        let port = util::free_port(ips[0]);
        if ips.iter().all(|ip| TcpListener::bind((*ip, port)).is_ok()) {
            return port;
        }
    }
    panic!("no common free port");
}

/// The servers of one test: `domains` maps a recipient domain to (its MX host, the policy
/// answer served for it or `None` for no `_mta-sts` TXT record). `mx.tls.test` is the STARTTLS
/// exchanger, `mx.plain.test` the plaintext one, `mx.misnamed.test` the STARTTLS one under a
/// name its certificate does not hold.
struct World {
    tls_mx: CaptureServer,
    plain_mx: CaptureServer,
    https: PolicyServer,
    dns: Dnsmasq,
    pki: Pki,
    port: u16,
}

impl World {
    fn start(label: &str, domains: &[(&str, &str, Option<String>)]) -> World {
        let mut names: Vec<String> = domains.iter().map(|d| format!("mta-sts.{}", d.0)).collect();
        names.push("mx.tls.test".into());
        let pki = Pki::new(label, &names);
        let port = common_port(&[TLS_MX, PLAIN_MX]);
        let tls_mx = CaptureServer::builder()
            .host(TLS_MX)
            .port(port)
            .tls(&pki.dir.join("cert.pem"), &pki.dir.join("key.pem"))
            .start();
        let plain_mx = CaptureServer::builder().host(PLAIN_MX).port(port).start();
        let answers = domains
            .iter()
            .filter_map(|(d, _, answer)| {
                let answer = answer.clone().filter(|a| !a.is_empty())?;
                Some((format!("mta-sts.{d}"), answer))
            })
            .collect();
        let https = PolicyServer::start(&pki, answers);
        let mut dns = Dnsmasq::builder()
            .host("mx.tls.test", TLS_MX)
            .host("mx.plain.test", PLAIN_MX)
            // The STARTTLS exchanger again, under a name its certificate does not hold.
            .host("mx.misnamed.test", TLS_MX);
        for (domain, mx, answer) in domains {
            dns = dns
                .mx(domain, mx, 10)
                .host(&format!("mta-sts.{domain}"), "127.0.0.1");
            if answer.is_some() {
                dns = dns.txt(&format!("_mta-sts.{domain}"), "v=STSv1; id=20261130T1700");
            }
        }
        World {
            tls_mx,
            plain_mx,
            https,
            dns: dns.start(),
            pki,
            port,
        }
    }

    fn dispatcher(&self) -> Dispatcher {
        Dispatcher::builder()
            .direct_mx(MxConfig {
                nameservers: Some(vec![self.dns.addr()]),
                smtp_port: self.port,
                ipv6: false,
                timeout: Duration::from_millis(500),
                // The exchangers are on loopback.
                allow_loopback: true,
                mta_sts_port: self.https.addr.port(),
                ..MxConfig::default()
            })
            .tls_ca_file(self.pki.dir.join("ca.pem"))
            .retry(RetryPolicy {
                initial: Duration::from_millis(100),
                max_interval: Duration::from_millis(300),
                multiplier: 2.0,
                jitter: 0.1,
                max_age: Duration::from_millis(1500),
            })
            .start()
            .unwrap()
    }
}

/// Sends one message to `rcpts`; every recipient's final event.
fn send(d: &Dispatcher, rcpts: &[&str]) -> HashMap<String, Event> {
    d.submit(
        Message::new(
            "s@mxpipe.test",
            rcpts.iter().copied(),
            b"Subject: sts\r\n\r\nconfidential\r\n",
        )
        .unwrap(),
    )
    .unwrap();
    assert!(d.wait_final(Duration::from_secs(60)), "{:?}", d.stats());
    let mut finals = HashMap::new();
    for e in d.events().unwrap().try_iter().filter(|e| e.kind.is_final()) {
        assert!(finals.insert(e.recipient.to_string(), e.clone()).is_none());
    }
    assert_eq!(finals.len(), rcpts.len(), "{finals:?}");
    finals
}

#[test]
fn enforce_delivers_only_over_verified_tls_to_named_exchangers() {
    let world = World::start(
        "sts-enforce",
        &[
            (
                "good.test",
                "mx.tls.test",
                Some(policy("enforce", &["mx.tls.test"])),
            ),
            (
                "plain.test",
                "mx.plain.test",
                Some(policy("enforce", &["mx.plain.test"])),
            ),
            (
                "misnamed.test",
                "mx.misnamed.test",
                Some(policy("enforce", &["mx.misnamed.test"])),
            ),
            (
                "elsewhere.test",
                "mx.plain.test",
                Some(policy("enforce", &["*.other.test"])),
            ),
        ],
    );
    let d = world.dispatcher();
    let f = send(
        &d,
        &[
            "a@good.test",
            "b@plain.test",
            "m@misnamed.test",
            "c@elsewhere.test",
        ],
    );

    let good = &f["a@good.test"];
    assert_eq!(good.kind, EventKind::Delivered, "{good:?}");
    let tls = good
        .tls
        .expect("a server's outcome says how it was protected");
    assert!(tls.version.is_some() && tls.verified, "{tls:?}");
    assert_eq!(tls.policy, TlsPolicy::MtaSts);
    assert_eq!(tls.policy.as_str(), "mta-sts");
    let received = world.tls_mx.messages();
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0].rcpt_tos, ["a@good.test"]);
    assert!(received[0].tls, "delivered over TLS");

    // The policy names the exchanger, but it offers no STARTTLS: the mail waits, and says why.
    let plain = &f["b@plain.test"];
    assert_eq!(plain.kind, EventKind::Expired, "{plain:?}");
    assert!(
        plain.reply.text.contains("under MTA-STS enforce")
            && plain.reply.text.contains("does not offer STARTTLS"),
        "{}",
        plain.reply.text
    );
    // STARTTLS, but the certificate does not name the exchanger: deferred, not delivered.
    let misnamed = &f["m@misnamed.test"];
    assert_eq!(misnamed.kind, EventKind::Expired, "{misnamed:?}");
    assert!(
        misnamed.reply.text.contains("under MTA-STS enforce")
            && misnamed.reply.text.contains("mx.misnamed.test")
            && misnamed.reply.text.contains("certificate"),
        "{}",
        misnamed.reply.text
    );
    // The policy names no exchanger of the domain: not even a connection.
    let elsewhere = &f["c@elsewhere.test"];
    assert_eq!(elsewhere.kind, EventKind::Expired, "{elsewhere:?}");
    assert_eq!(elsewhere.reply.enhanced.unwrap().to_string(), "4.7.0");
    assert_eq!(
        elsewhere.reply.text,
        "the MTA-STS policy of elsewhere.test (mode enforce) allows the MX hosts *.other.test; \
         none of mx.plain.test matches: not delivered"
    );
    assert_eq!(
        world.plain_mx.messages(),
        Vec::new(),
        "nothing went in plaintext"
    );

    // Each policy was fetched once, from its well-known path, and then reused from the cache
    // for the retries (its TXT id did not change).
    for domain in ["good.test", "plain.test", "misnamed.test", "elsewhere.test"] {
        assert_eq!(
            world.https.fetches_of(&format!("mta-sts.{domain}")),
            1,
            "{domain}"
        );
    }
    assert!(world
        .https
        .requests()
        .iter()
        .all(|(_, path)| path == "/.well-known/mta-sts.txt"));
}

#[test]
fn testing_none_and_unusable_policies_deliver_as_usual() {
    let moved = "HTTP/1.1 301 Moved Permanently\r\nLocation: https://mta-sts.good.test/\r\n\
                 Content-Length: 0\r\n\r\n"
        .to_string();
    let world = World::start(
        "sts-testing",
        &[
            (
                "testing.test",
                "mx.plain.test",
                Some(policy("testing", &["mx.tls.test"])),
            ),
            (
                "testing-ok.test",
                "mx.tls.test",
                Some(policy("testing", &["*.tls.test"])),
            ),
            (
                "testing-misnamed.test",
                "mx.misnamed.test",
                Some(policy("testing", &["mx.misnamed.test"])),
            ),
            ("none.test", "mx.plain.test", Some(policy("none", &[]))),
            ("moved.test", "mx.plain.test", Some(moved)),
            // The TXT record is there, the policy host answers 404.
            ("missing.test", "mx.plain.test", Some(String::new())),
            // A policy would refuse the exchanger, but no TXT record announces it.
            ("quiet.test", "mx.plain.test", None),
        ],
    );
    let d = world.dispatcher();
    let rcpts = [
        "t@testing.test",
        "k@testing-ok.test",
        "w@testing-misnamed.test",
        "n@none.test",
        "m@moved.test",
        "x@missing.test",
        "q@quiet.test",
    ];
    let f = send(&d, &rcpts);
    for r in rcpts {
        assert_eq!(f[r].kind, EventKind::Delivered, "{:?}", f[r]);
    }
    let policy_of = |r: &str| f[r].tls.expect("a server's outcome").policy;
    // Testing: delivered where enforce would have refused, and the event says so.
    assert_eq!(
        policy_of("t@testing.test"),
        TlsPolicy::MtaStsTestingMismatch
    );
    assert_eq!(
        policy_of("t@testing.test").as_str(),
        "mta-sts-testing-mx-mismatch"
    );
    assert_eq!(policy_of("k@testing-ok.test"), TlsPolicy::MtaStsTesting);
    assert_eq!(
        policy_of("w@testing-misnamed.test"),
        TlsPolicy::MtaStsTesting
    );
    // Testing checks the certificate after the fact: whether enforce would have taken it.
    let tls_of = |r: &str| f[r].tls.expect("a server's outcome");
    let ok = tls_of("k@testing-ok.test");
    assert!(ok.version.is_some() && ok.verified, "{ok:?}");
    let misnamed = tls_of("w@testing-misnamed.test");
    assert!(
        misnamed.version.is_some() && !misnamed.verified,
        "{misnamed:?}"
    );
    let plaintext = tls_of("t@testing.test");
    assert!(
        plaintext.version.is_none() && !plaintext.verified,
        "{plaintext:?}"
    );
    for r in [
        "n@none.test",
        "m@moved.test",
        "x@missing.test",
        "q@quiet.test",
    ] {
        assert_eq!(policy_of(r), TlsPolicy::Opportunistic, "{r}");
    }
    let mut plain: Vec<String> = world
        .plain_mx
        .messages()
        .into_iter()
        .flat_map(|m| m.rcpt_tos)
        .collect();
    plain.sort();
    assert_eq!(
        plain,
        [
            "m@moved.test",
            "n@none.test",
            "q@quiet.test",
            "t@testing.test",
            "x@missing.test"
        ]
    );
    let mut tls: Vec<String> = world
        .tls_mx
        .messages()
        .into_iter()
        .flat_map(|m| m.rcpt_tos)
        .collect();
    tls.sort();
    assert_eq!(tls, ["k@testing-ok.test", "w@testing-misnamed.test"]);
    // No TXT record, no fetch; a redirect is not followed.
    assert_eq!(world.https.fetches_of("mta-sts.quiet.test"), 0);
    assert_eq!(world.https.fetches_of("mta-sts.moved.test"), 1);
    assert_eq!(world.https.fetches_of("mta-sts.good.test"), 0);
}
