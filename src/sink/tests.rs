//! The sink over real loopback sockets, driven by a plain blocking client (rustls over it for
//! TLS) that writes exactly the octets a test names and reads the replies line by line.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use super::*;

/// What the test client talks through.
enum Transport {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Transport::Plain(stream) => stream.read(buf),
            Transport::Tls(stream) => stream.read(buf),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Transport::Plain(stream) => stream.write(buf),
            Transport::Tls(stream) => stream.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Transport::Plain(stream) => stream.flush(),
            Transport::Tls(stream) => stream.flush(),
        }
    }
}

/// A client configuration that trusts exactly the sink's benchmark certificate, so the tests
/// also check that it is valid for the names it claims.
fn client_tls_config() -> Arc<ClientConfig> {
    let pem = SinkTls::self_signed_for_benchmarks().cert_chain_pem;
    let mut roots = RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(&pem) {
        roots.add(certificate.unwrap()).unwrap();
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    Arc::new(config)
}

/// rustls over `stream`, verifying the sink's certificate for `name`.
fn tls_over(stream: TcpStream, name: &str) -> Transport {
    let name = ServerName::try_from(name.to_owned()).unwrap();
    let connection = ClientConnection::new(client_tls_config(), name).unwrap();
    Transport::Tls(Box::new(StreamOwned::new(connection, stream)))
}

/// A blocking SMTP client that does nothing on its own.
struct Client {
    reader: BufReader<Transport>,
}

impl Client {
    fn connect(sink: &SinkHandle) -> Client {
        Client {
            reader: BufReader::new(Transport::Plain(Client::tcp_to(sink))),
        }
    }

    /// Connects with TLS from the first octet (RFC 8314), verifying the certificate for `name`.
    fn connect_tls(sink: &SinkHandle, name: &str) -> Client {
        Client {
            reader: BufReader::new(tls_over(Client::tcp_to(sink), name)),
        }
    }

    fn tcp_to(sink: &SinkHandle) -> TcpStream {
        let stream = TcpStream::connect(sink.local_addr()).expect("connect to the sink");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        stream
    }

    /// The TCP socket under the client.
    fn tcp(&self) -> &TcpStream {
        match self.reader.get_ref() {
            Transport::Plain(stream) => stream,
            Transport::Tls(stream) => stream.get_ref(),
        }
    }

    /// Says STARTTLS, expects 220, and goes on over TLS (see [`Client::into_tls`]).
    fn starttls(mut self, name: &str) -> Client {
        assert_eq!(self.ask("STARTTLS"), "220 2.0.0 Ready to start TLS");
        self.into_tls(name)
    }

    /// After the 220 to STARTTLS: checks that nothing followed it in plaintext, and goes on
    /// over TLS verifying the certificate for `name` (RFC 3207 4).
    fn into_tls(self, name: &str) -> Client {
        assert!(
            self.reader.buffer().is_empty(),
            "plaintext after the 220: {:?}",
            String::from_utf8_lossy(self.reader.buffer())
        );
        let Transport::Plain(stream) = self.reader.into_inner() else {
            panic!("STARTTLS over TLS")
        };
        Client {
            reader: BufReader::new(tls_over(stream, name)),
        }
    }

    /// Connects and reads the greeting.
    fn greeted(sink: &SinkHandle) -> Client {
        let mut client = Client::connect(sink);
        assert!(client.reply().starts_with("220 "));
        client
    }

    /// Connects, reads the greeting and says EHLO.
    fn ready(sink: &SinkHandle) -> Client {
        let mut client = Client::greeted(sink);
        client.send(b"EHLO client.test\r\n");
        assert!(client.reply().starts_with("250-"));
        client
    }

    fn send(&mut self, octets: &[u8]) {
        let transport = self.reader.get_mut();
        transport.write_all(octets).expect("write to the sink");
        transport.flush().expect("write to the sink");
    }

    /// One reply, all lines, with CRLFs.
    fn reply(&mut self) -> String {
        let mut reply = String::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("read a reply");
            assert!(n > 0, "connection closed; reply so far: {reply:?}");
            assert!(line.ends_with("\r\n"), "reply line without CRLF: {line:?}");
            reply.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return reply;
            }
        }
    }

    /// Sends `command` and returns the reply's first line without its CRLF.
    fn ask(&mut self, command: &str) -> String {
        self.send(format!("{command}\r\n").as_bytes());
        self.reply().trim_end().to_owned()
    }

    /// Whether the sink closed the connection (end of stream or reset) with nothing more sent.
    fn is_closed(&mut self) -> bool {
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) => rest.is_empty(),
            Err(error) => error.kind() == ErrorKind::ConnectionReset,
        }
    }
}

/// A fresh directory under the system's temporary directory.
fn temporary_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "mxpipe-sink-{name}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn sink_with(configure: impl FnOnce(&mut SinkConfig)) -> SinkHandle {
    let mut config = SinkConfig::default();
    configure(&mut config);
    Sink::start(config).expect("start the sink")
}

fn faulty(configure: impl FnOnce(&mut Faults)) -> SinkHandle {
    sink_with(|config| configure(&mut config.faults))
}

/// The queue id at the end of "250 2.0.0 Ok: queued as <id>".
fn queue_id(reply: &str) -> &str {
    reply
        .strip_prefix("250 2.0.0 Ok: queued as ")
        .unwrap_or_else(|| panic!("not a queued reply: {reply:?}"))
}

fn captured(dir: &Path, id: &str) -> (Vec<u8>, serde_json::Value) {
    let envelope = std::fs::read(dir.join(format!("{id}.json"))).expect("envelope captured");
    let content = std::fs::read(dir.join(format!("{id}.eml"))).expect("content captured");
    (content, serde_json::from_slice(&envelope).unwrap())
}

#[test]
fn ehlo_advertises_the_extensions() {
    let sink = sink_with(|config| config.hostname = "sink.test".to_owned());
    let mut client = Client::connect(&sink);
    assert_eq!(client.reply(), "220 sink.test ESMTP mxpipe-sink\r\n");
    client.send(b"EHLO client.test\r\n");
    assert_eq!(
        client.reply(),
        "250-sink.test\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n250-8BITMIME\r\n\
         250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250 DSN\r\n"
    );
    assert_eq!(client.ask("HELO client.test"), "250 sink.test");
    assert_eq!(client.ask("QUIT"), "221 2.0.0 Bye");
    assert!(client.is_closed());
}

#[test]
fn extensions_can_be_withheld() {
    let sink = sink_with(|config| {
        config.pipelining = false;
        config.chunking = false;
        config.max_size = 1000;
    });
    let mut client = Client::greeted(&sink);
    client.send(b"EHLO client.test\r\n");
    let reply = client.reply();
    assert!(!reply.contains("PIPELINING") && !reply.contains("CHUNKING"));
    assert!(reply.contains("250-SIZE 1000\r\n"));
}

#[test]
fn pipelined_data_transaction_is_captured_byte_exact() {
    let dir = temporary_dir("data");
    let sink = sink_with(|config| config.capture_dir = Some(dir.clone()));
    let mut client = Client::ready(&sink);

    // RFC 2920: the whole envelope in one write; the client waits only for 354.
    client.send(
        b"MAIL FROM:<sender@example.org> BODY=8BITMIME SIZE=100\r\n\
          RCPT TO:<one@example.net>\r\nRCPT TO:<two@example.net> NOTIFY=NEVER\r\nDATA\r\n",
    );
    assert_eq!(client.reply(), "250 2.1.0 Ok\r\n");
    assert_eq!(client.reply(), "250 2.1.5 Ok\r\n");
    assert_eq!(client.reply(), "250 2.1.5 Ok\r\n");
    assert!(client.reply().starts_with("354 "));
    // Stuffed lines, a bare LF before a dot (never an end of data), and non-ASCII octets;
    // the next command pipelined behind the end of data.
    client.send(
        b"Subject: dots\r\n\r\n..leading dot\r\n...\r\n.\n.\r\nmiddle.\r\n\xc3\xa9\r\n.\r\nNOOP\r\n",
    );
    let reply = client.reply();
    let id = queue_id(reply.trim_end()).to_owned();
    assert_eq!(client.reply(), "250 2.0.0 Ok\r\n");

    let (content, envelope) = captured(&dir, &id);
    assert_eq!(
        content,
        b"Subject: dots\r\n\r\n.leading dot\r\n..\r\n\n.\r\nmiddle.\r\n\xc3\xa9\r\n".to_vec()
    );
    assert_eq!(
        envelope,
        serde_json::json!({
            "mail_from": "sender@example.org",
            "rcpt_to": ["one@example.net", "two@example.net"],
            "mail_params": "BODY=8BITMIME SIZE=100",
            "via": "DATA",
            "size": content.len(),
        })
    );
    assert_eq!(client.ask("QUIT"), "221 2.0.0 Bye");
    let stats = sink.stop();
    assert_eq!(
        (stats.connections, stats.messages, stats.recipients),
        (1, 1, 2)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn input_split_at_every_octet_is_reassembled() {
    let dir = temporary_dir("split");
    let sink = sink_with(|config| config.capture_dir = Some(dir.clone()));
    let mut client = Client::ready(&sink);
    let envelope = b"MAIL FROM:<>\r\nRCPT TO:<a@example.net>\r\nDATA\r\n";
    for octet in envelope.chunks(1) {
        client.send(octet);
    }
    assert_eq!(client.reply(), "250 2.1.0 Ok\r\n");
    assert_eq!(client.reply(), "250 2.1.5 Ok\r\n");
    assert!(client.reply().starts_with("354 "));
    for octet in b"a\r\n..b\r\n.\r\n".chunks(1) {
        client.send(octet);
        // Give each octet its own read on the sink side.
        std::thread::sleep(Duration::from_millis(2));
    }
    let id = queue_id(client.reply().trim_end()).to_owned();
    let (content, envelope) = captured(&dir, &id);
    assert_eq!(content, b"a\r\n.b\r\n");
    assert_eq!(envelope["mail_from"], "");
    drop(sink);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn empty_data_message_is_accepted() {
    let sink = sink_with(|_| {});
    let mut client = Client::ready(&sink);
    client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n");
    client.reply();
    client.reply();
    assert!(client.reply().starts_with("354 "));
    client.send(b".\r\n");
    queue_id(client.reply().trim_end());
    assert_eq!(sink.stop().bytes, 0);
}

#[test]
fn bdat_chunks_are_captured_without_dot_handling() {
    let dir = temporary_dir("bdat");
    let sink = sink_with(|config| config.capture_dir = Some(dir.clone()));
    let mut client = Client::ready(&sink);

    // RFC 3030: the whole transaction, chunks included, without waiting.
    client.send(
        b"MAIL FROM:<s@example.org> BODY=BINARYMIME\r\nRCPT TO:<r@example.net>\r\n\
          BDAT 9\r\n.\r\nline\r\nBDAT 0\r\nBDAT 5 LAST\r\n\x00.\r\n\xffNOOP\r\n",
    );
    assert_eq!(client.reply(), "250 2.1.0 Ok\r\n");
    assert_eq!(client.reply(), "250 2.1.5 Ok\r\n");
    assert_eq!(client.reply(), "250 2.0.0 9 octets received\r\n");
    assert_eq!(client.reply(), "250 2.0.0 0 octets received\r\n");
    let id = queue_id(client.reply().trim_end()).to_owned();
    assert_eq!(client.reply(), "250 2.0.0 Ok\r\n");

    let (content, envelope) = captured(&dir, &id);
    assert_eq!(content, b".\r\nline\r\n\x00.\r\n\xff");
    assert_eq!(envelope["via"], "BDAT");
    assert_eq!(envelope["size"], 14);
    assert_eq!(envelope["rcpt_to"], serde_json::json!(["r@example.net"]));
    let stats = sink.stop();
    assert_eq!((stats.messages, stats.bytes), (1, 14));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bdat_without_a_valid_recipient_consumes_its_octets() {
    let sink = faulty(|faults| faults.reject_rcpt = vec!["nobody".to_owned()]);
    let mut client = Client::ready(&sink);
    client.send(
        b"BDAT 6\r\nNOOP\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<nobody@example.net>\r\n\
          BDAT 12 LAST\r\nRSET\r\nXXXX\r\nNOOP\r\n",
    );
    assert_eq!(client.reply(), "503 5.5.1 Error: need MAIL command\r\n");
    assert_eq!(client.reply(), "250 2.1.0 Ok\r\n");
    assert!(client.reply().starts_with("550 5.1.1 "));
    // The "RSET" and "XXXX" lines were chunk octets, not commands.
    assert_eq!(client.reply(), "554 5.5.1 No valid recipients\r\n");
    assert_eq!(client.reply(), "250 2.0.0 Ok\r\n");
    // The failed chunk ended the transaction (RFC 3030 2, as Postfix's smtpd does): a
    // pipelined MAIL behind it starts the next one.
    assert_eq!(client.ask("MAIL FROM:<s@example.org>"), "250 2.1.0 Ok");
}

#[test]
fn command_sequence_errors() {
    let sink = sink_with(|_| {});
    let mut client = Client::greeted(&sink);
    assert_eq!(
        client.ask("MAIL FROM:<a@example.org>"),
        "503 5.5.1 Error: send HELO/EHLO first"
    );
    assert_eq!(client.ask("EHLO"), "501 5.5.4 Syntax: EHLO hostname");
    assert!(client.ask("ehlo client.test").starts_with("250-"));
    assert_eq!(
        client.ask("RCPT TO:<b@example.net>"),
        "503 5.5.1 Error: need MAIL command"
    );
    assert_eq!(client.ask("DATA"), "503 5.5.1 Error: need MAIL command");
    assert_eq!(
        client.ask("MAIL FROM:a@example.org"),
        "501 5.5.4 Syntax: MAIL FROM:<address>"
    );
    assert_eq!(
        client.ask("MAIL FROM:<a@example.org> SIZE=x"),
        "501 5.5.4 Bad SIZE parameter"
    );
    assert_eq!(client.ask("mail from: <a@example.org>"), "250 2.1.0 Ok");
    assert_eq!(
        client.ask("MAIL FROM:<a@example.org>"),
        "503 5.5.1 Error: nested MAIL command"
    );
    assert_eq!(
        client.ask("RCPT TO:<>"),
        "501 5.5.4 Syntax: RCPT TO:<address>"
    );
    assert_eq!(client.ask("DATA"), "554 5.5.1 No valid recipients");
    assert_eq!(client.ask("BDAT x"), "501 5.5.4 Syntax: BDAT size [LAST]");
    assert_eq!(client.ask("RSET"), "250 2.0.0 Ok");
    assert_eq!(
        client.ask("RCPT TO:<b@example.net>"),
        "503 5.5.1 Error: need MAIL command"
    );
    assert_eq!(client.ask("STARTTLS"), "502 5.5.2 Command not recognized");
    assert_eq!(client.ask("VRFY someone"), "252 2.5.0 Cannot VRFY user");
    assert_eq!(client.ask("NOOP"), "250 2.0.0 Ok");
    // A bare LF ends a command line too.
    client.send(b"NOOP\n");
    assert_eq!(client.reply(), "250 2.0.0 Ok\r\n");
}

#[test]
fn over_long_lines_get_500_and_the_session_goes_on() {
    let sink = sink_with(|_| {});
    let mut client = Client::ready(&sink);
    let mut long = vec![b'X'; 10_000];
    long.extend_from_slice(b"\r\nNOOP\r\n");
    client.send(&long);
    assert_eq!(client.reply(), "500 5.5.2 Line too long\r\n");
    assert_eq!(client.reply(), "250 2.0.0 Ok\r\n");
    // 4094 octets and CRLF is just within the limit.
    let mut longest = b"NOOP ".to_vec();
    longest.resize(4094, b'x');
    longest.extend_from_slice(b"\r\n");
    client.send(&longest);
    assert_eq!(client.reply(), "250 2.0.0 Ok\r\n");
}

#[test]
fn sizes_above_the_limit_get_552() {
    let sink = sink_with(|config| config.max_size = 10);
    let mut client = Client::ready(&sink);
    assert_eq!(
        client.ask("MAIL FROM:<a@example.org> SIZE=11"),
        "552 5.3.4 Message size exceeds fixed maximum message size"
    );
    client.send(b"MAIL FROM:<a@example.org> SIZE=10\r\nRCPT TO:<b@example.net>\r\nDATA\r\n");
    client.reply();
    client.reply();
    assert!(client.reply().starts_with("354 "));
    client.send(b"0123456789\r\n.\r\n");
    assert_eq!(
        client.reply(),
        "552 5.3.4 Message size exceeds fixed maximum message size\r\n"
    );
    client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nBDAT 6\r\n012345BDAT 5 LAST\r\n01234");
    client.reply();
    client.reply();
    assert_eq!(client.reply(), "250 2.0.0 6 octets received\r\n");
    assert_eq!(
        client.reply(),
        "552 5.3.4 Message size exceeds fixed maximum message size\r\n"
    );
    assert_eq!(sink.stop().messages, 0);
}

#[test]
fn custom_greeting_and_injected_octets() {
    let sink = faulty(|faults| {
        faults.greeting = Some("220-first line\n220 second line".to_owned());
        faults.after_greeting = Some(b"250 injected\r\n".to_vec());
    });
    let mut client = Client::connect(&sink);
    assert_eq!(client.reply(), "220-first line\r\n220 second line\r\n");
    assert_eq!(client.reply(), "250 injected\r\n");
}

#[test]
fn refusing_greeting_answers_503_until_quit() {
    let sink = faulty(|faults| faults.greeting = Some("554 5.3.2 no service".to_owned()));
    let mut client = Client::connect(&sink);
    assert_eq!(client.reply(), "554 5.3.2 no service\r\n");
    assert_eq!(
        client.ask("EHLO client.test"),
        "503 5.5.1 Bad sequence of commands"
    );
    assert_eq!(client.ask("QUIT"), "221 2.0.0 Bye");
    assert!(client.is_closed());
}

#[test]
fn closing_greeting_closes() {
    let sink = faulty(|faults| faults.greeting = Some("421 4.3.2 go away".to_owned()));
    let mut client = Client::connect(&sink);
    assert_eq!(client.reply(), "421 4.3.2 go away\r\n");
    assert!(client.is_closed());
}

#[test]
fn recipients_are_rejected_tempfailed_and_limited() {
    let sink = faulty(|faults| {
        faults.reject_rcpt = vec!["unknown".to_owned()];
        faults.tempfail_rcpt = vec!["busy".to_owned()];
        faults.max_recipients = Some(2);
    });
    let mut client = Client::ready(&sink);
    client.send(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<unknown@example.net>\r\nRCPT TO:<busy@example.net>\r\n\
          RCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\nRCPT TO:<d@example.net>\r\nDATA\r\n",
    );
    assert_eq!(client.reply(), "250 2.1.0 Ok\r\n");
    assert_eq!(
        client.reply(),
        "550 5.1.1 <unknown@example.net>: Recipient address rejected: User unknown\r\n"
    );
    assert_eq!(
        client.reply(),
        "450 4.2.1 <busy@example.net>: Mailbox busy, try again later\r\n"
    );
    assert_eq!(client.reply(), "250 2.1.5 Ok\r\n");
    assert_eq!(client.reply(), "250 2.1.5 Ok\r\n");
    assert_eq!(client.reply(), "452 4.5.3 Too many recipients\r\n");
    assert!(client.reply().starts_with("354 "));
    client.send(b"x\r\n.\r\n");
    queue_id(client.reply().trim_end());
    let stats = sink.stop();
    assert_eq!((stats.recipients, stats.rejected_recipients), (2, 3));
}

#[test]
fn first_transactions_of_the_sink_are_tempfailed() {
    let sink = faulty(|faults| faults.tempfail_first_transactions = 2);
    let mut clients = [Client::ready(&sink), Client::ready(&sink)];
    for (which, expected) in [
        (0, "451 4.3.0 Temporary failure, try again"),
        (1, "451 4.3.0 Temporary failure, try again"),
        (0, "250 2.0.0 Ok: queued as 00000001"),
    ] {
        let client = &mut clients[which];
        client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nBDAT 1 LAST\r\nx");
        client.reply();
        client.reply();
        assert_eq!(client.reply().trim_end(), expected);
    }
    assert_eq!(sink.stop().messages, 1);
}

#[test]
fn connection_is_closed_after_n_transactions() {
    let sink = faulty(|faults| faults.close_after_transactions = Some(1));
    let mut client = Client::ready(&sink);
    client.send(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nBDAT 1 LAST\r\nx\
          MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n",
    );
    client.reply();
    client.reply();
    queue_id(client.reply().trim_end());
    assert_eq!(client.reply(), "421 4.7.0 closing connection\r\n");
    assert!(client.is_closed());
    // Other connections start counting afresh.
    let mut again = Client::ready(&sink);
    assert_eq!(again.ask("NOOP"), "250 2.0.0 Ok");
}

#[test]
fn connection_drops_during_data() {
    let sink = faulty(|faults| faults.drop_during_data = true);
    let mut client = Client::ready(&sink);
    client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n");
    client.reply();
    client.reply();
    assert!(client.reply().starts_with("354 "));
    client.send(b"Subject: half a message\r\n");
    assert!(client.is_closed());

    let mut client = Client::ready(&sink);
    client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nBDAT 100 LAST\r\npart");
    assert_eq!(client.reply(), "250 2.1.0 Ok\r\n");
    assert_eq!(client.reply(), "250 2.1.5 Ok\r\n");
    assert!(client.is_closed());
    assert_eq!(sink.stop().messages, 0);
}

#[test]
fn replies_are_delayed_without_stalling_other_connections() {
    let delay = Duration::from_millis(1500);
    let sink = faulty(|faults| faults.reply_delay = Some(delay));
    let mut slow = Client::greeted(&sink);
    let asked = Instant::now();
    slow.send(b"NOOP\r\nNOOP\r\n");
    // A greeting is never delayed, and the loop keeps serving while a reply is held.
    let _other = Client::greeted(&sink);
    slow.tcp().set_nonblocking(true).unwrap();
    let mut probe = [0; 1];
    assert_eq!(
        slow.tcp().peek(&mut probe).unwrap_err().kind(),
        ErrorKind::WouldBlock
    );
    slow.tcp().set_nonblocking(false).unwrap();
    assert_eq!(slow.reply(), "250 2.0.0 Ok\r\n");
    assert_eq!(slow.reply(), "250 2.0.0 Ok\r\n");
    assert!(asked.elapsed() >= delay);
}

#[test]
fn no_ehlo_forces_helo() {
    let sink = faulty(|faults| faults.no_ehlo = true);
    let mut client = Client::greeted(&sink);
    assert_eq!(
        client.ask("EHLO client.test"),
        "502 5.5.2 Command not recognized"
    );
    assert_eq!(client.ask("HELO client.test"), "250 mxpipe-sink");
    assert_eq!(client.ask("MAIL FROM:<a@example.org>"), "250 2.1.0 Ok");
}

#[test]
fn stop_closes_connections_and_joins() {
    let sink = sink_with(|_| {});
    let address = sink.local_addr();
    let mut client = Client::ready(&sink);
    assert!(sink.cpu_time() > Duration::ZERO);
    let stats = sink.stop();
    assert_eq!(stats.connections, 1);
    assert!(client.is_closed());
    assert!(TcpStream::connect(address).is_err());
}

#[test]
fn capture_dir_that_cannot_be_created_fails_start() {
    let file = temporary_dir("not-a-dir");
    std::fs::write(&file, b"").unwrap();
    let config = SinkConfig {
        capture_dir: Some(file.join("sub")),
        ..SinkConfig::default()
    };
    assert!(Sink::start(config).is_err());
    std::fs::remove_file(file).unwrap();
}

fn tls_sink_with(implicit: bool, configure: impl FnOnce(&mut SinkConfig)) -> SinkHandle {
    sink_with(|config| {
        config.hostname = "sink.test".to_owned();
        config.tls = Some(SinkTls {
            implicit,
            ..SinkTls::self_signed_for_benchmarks()
        });
        configure(config);
    })
}

/// The EHLO reply of a sink named "sink.test" with the default extensions.
fn ehlo_reply(starttls: bool) -> String {
    format!(
        "250-sink.test\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n250-8BITMIME\r\n{}\
         250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250 DSN\r\n",
        if starttls { "250-STARTTLS\r\n" } else { "" }
    )
}

#[test]
fn starttls_session_delivers_a_pipelined_transaction_byte_exact() {
    let dir = temporary_dir("starttls");
    let sink = tls_sink_with(false, |config| config.capture_dir = Some(dir.clone()));
    let mut client = Client::greeted(&sink);
    client.send(b"EHLO client.test\r\n");
    assert_eq!(client.reply(), ehlo_reply(true));
    assert_eq!(client.ask("STARTTLS now"), "501 5.5.4 Syntax: STARTTLS");
    // A transaction begun in plaintext, which TLS must make the sink forget.
    assert_eq!(client.ask("MAIL FROM:<plain@example.org>"), "250 2.1.0 Ok");

    let mut client = client.starttls("localhost");
    // RFC 3207 4.2: the state is that after the greeting, so EHLO comes first again.
    assert_eq!(
        client.ask("MAIL FROM:<a@example.org>"),
        "503 5.5.1 Error: send HELO/EHLO first"
    );
    client.send(b"EHLO client.test\r\n");
    assert_eq!(client.reply(), ehlo_reply(false));
    assert_eq!(
        client.ask("STARTTLS"),
        "503 5.5.1 Error: TLS already active"
    );

    client.send(
        b"MAIL FROM:<sender@example.org> BODY=8BITMIME\r\nRCPT TO:<one@example.net>\r\n\
          RCPT TO:<two@example.net>\r\nDATA\r\n",
    );
    assert_eq!(client.reply(), "250 2.1.0 Ok\r\n");
    assert_eq!(client.reply(), "250 2.1.5 Ok\r\n");
    assert_eq!(client.reply(), "250 2.1.5 Ok\r\n");
    assert!(client.reply().starts_with("354 "));
    // Larger than a TLS record and than the sink's buffers, so that content crosses records
    // and reads; stuffed dots and non-ASCII octets inside.
    let mut content = Vec::new();
    for i in 0..3000 {
        content.extend_from_slice(format!("line {i} é\r\n").as_bytes());
        if i % 100 == 0 {
            content.extend_from_slice(b".starts with a dot\r\n");
        }
    }
    let mut stuffed = dot_stuffed(&content);
    stuffed.extend_from_slice(b".\r\nNOOP\r\n");
    client.send(&stuffed);
    let id = queue_id(client.reply().trim_end()).to_owned();
    assert_eq!(client.reply(), "250 2.0.0 Ok\r\n");

    let (captured_content, envelope) = captured(&dir, &id);
    assert!(captured_content == content, "content differs");
    assert_eq!(
        envelope["rcpt_to"],
        serde_json::json!(["one@example.net", "two@example.net"])
    );
    assert_eq!(envelope["mail_from"], "sender@example.org");
    assert_eq!(client.ask("QUIT"), "221 2.0.0 Bye");
    // The sink ends TLS with close_notify, so the client sees a clean end of stream.
    assert!(client.is_closed());
    let stats = sink.stop();
    assert_eq!(
        (stats.tls_handshakes, stats.messages, stats.recipients),
        (1, 1, 2)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// `content` as DATA carries it (RFC 5321 4.5.2), without the end of data.
fn dot_stuffed(content: &[u8]) -> Vec<u8> {
    let mut stuffed = Vec::with_capacity(content.len() + 64);
    for line in content.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            stuffed.push(b'.');
        }
        stuffed.extend_from_slice(line);
    }
    stuffed
}

#[test]
fn commands_pipelined_behind_starttls_are_discarded() {
    let sink = tls_sink_with(false, |_| {});
    let mut client = Client::ready(&sink);
    // One write: the sink reads the injected commands together with STARTTLS.
    client
        .send(b"STARTTLS\r\nMAIL FROM:<injected@example.org>\r\nRCPT TO:<victim@example.net>\r\n");
    assert_eq!(client.reply(), "220 2.0.0 Ready to start TLS\r\n");
    // Had the injected commands been kept, their replies would come before this one.
    let mut client = client.into_tls("localhost");
    client.send(b"EHLO client.test\r\n");
    assert_eq!(client.reply(), ehlo_reply(false));
    assert_eq!(
        client.ask("RCPT TO:<victim@example.net>"),
        "503 5.5.1 Error: need MAIL command"
    );
    assert_eq!(client.ask("NOOP"), "250 2.0.0 Ok");
    let stats = sink.stop();
    assert_eq!((stats.tls_handshakes, stats.messages), (1, 0));
}

#[test]
fn implicit_tls_from_the_first_octet() {
    let sink = tls_sink_with(true, |_| {});
    // Verified for the IP address this time: the certificate names both.
    let mut client = Client::connect_tls(&sink, "127.0.0.1");
    assert_eq!(client.reply(), "220 sink.test ESMTP mxpipe-sink\r\n");
    client.send(b"EHLO client.test\r\n");
    assert_eq!(client.reply(), ehlo_reply(false));
    assert_eq!(
        client.ask("STARTTLS"),
        "503 5.5.1 Error: TLS already active"
    );
    client.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<r@example.net>\r\nBDAT 5 LAST\r\nhello");
    assert_eq!(client.reply(), "250 2.1.0 Ok\r\n");
    assert_eq!(client.reply(), "250 2.1.5 Ok\r\n");
    queue_id(client.reply().trim_end());
    assert_eq!(client.ask("QUIT"), "221 2.0.0 Bye");
    assert!(client.is_closed());

    // A client that speaks plaintext gets no greeting, only a TLS alert record.
    let mut plain = Client::connect(&sink);
    plain.send(b"EHLO client.test\r\n");
    let mut answer = Vec::new();
    let _ = plain.reader.read_to_end(&mut answer);
    assert_eq!(answer.first(), Some(&0x15), "{answer:?}");

    let stats = sink.stop();
    assert_eq!(
        (stats.tls_handshakes, stats.messages, stats.bytes),
        (1, 1, 5)
    );
}

#[test]
fn connections_over_the_limit_get_421_and_are_closed() {
    let sink = faulty(|faults| faults.max_connections = Some(2));
    let mut first = Client::ready(&sink);
    let mut second = Client::greeted(&sink);
    let mut third = Client::connect(&sink);
    assert_eq!(
        third.reply(),
        "421 4.7.0 Too many connections, try again later\r\n"
    );
    assert!(third.is_closed());
    assert_eq!(second.ask("NOOP"), "250 2.0.0 Ok");
    // Once one has gone, there is room again.
    assert_eq!(first.ask("QUIT"), "221 2.0.0 Bye");
    assert!(first.is_closed());
    let mut fourth = Client::greeted(&sink);
    assert_eq!(fourth.ask("NOOP"), "250 2.0.0 Ok");
    let stats = sink.stop();
    assert_eq!((stats.connections, stats.refused_connections), (4, 1));
}

#[test]
fn connection_over_the_limit_with_implicit_tls_gets_421_after_the_handshake() {
    let sink = tls_sink_with(true, |config| config.faults.max_connections = Some(1));
    let mut first = Client::connect_tls(&sink, "localhost");
    assert!(first.reply().starts_with("220 "));
    let mut second = Client::connect_tls(&sink, "localhost");
    assert_eq!(
        second.reply(),
        "421 4.7.0 Too many connections, try again later\r\n"
    );
    assert!(second.is_closed());
    let stats = sink.stop();
    assert_eq!((stats.refused_connections, stats.tls_handshakes), (1, 2));
}

#[test]
fn unusable_tls_certificate_fails_start_and_the_key_is_not_shown() {
    let mut tls = SinkTls::self_signed_for_benchmarks();
    assert!(!format!("{tls:?}").contains("PRIVATE KEY"));
    tls.key_pem = b"not a key".to_vec();
    let config = SinkConfig {
        tls: Some(tls),
        ..SinkConfig::default()
    };
    let error = Sink::start(config).err().expect("start fails");
    assert_eq!(error.kind(), ErrorKind::InvalidInput);
    assert!(error.to_string().contains("private key"), "{error}");
}

/// Throughput sanity check, not a test of behaviour:
/// `cargo test --release --lib sink::tests::throughput -- --ignored --nocapture`.
///
/// The client is what mxpipe's engine is: one `mio` thread driving every connection, each with
/// one batch in flight. BDAT mode sends `BDAT_BATCH` whole transactions per write; DATA mode
/// waits for 354 as RFC 2920 requires and sends each message's content together with the next
/// envelope. Each runs in plaintext and over implicit TLS (the benchmark certificate; TLS 1.3,
/// whose record layer is what STARTTLS leads to as well). Prints messages/s and the CPU time
/// of the sink thread and of the client.
#[test]
#[ignore = "a measurement, run by hand"]
fn throughput() {
    for (mode, connections, tls) in [
        (Mode::Bdat, 20, false),
        (Mode::Bdat, 20, true),
        (Mode::Bdat, 100, false),
        (Mode::Bdat, 100, true),
        (Mode::Data, 20, false),
        (Mode::Data, 20, true),
        (Mode::Data, 100, false),
        (Mode::Data, 100, true),
    ] {
        let sink = sink_with(|config| {
            config.tls = tls.then(|| SinkTls {
                implicit: true,
                ..SinkTls::self_signed_for_benchmarks()
            });
        });
        let process_before = process_cpu_time();
        let started = Instant::now();
        drive_bench_client(sink.local_addr(), mode, connections, tls, 400_000);
        let elapsed = started.elapsed().as_secs_f64();
        let process = (process_cpu_time() - process_before).as_secs_f64();
        let sink_cpu = sink.cpu_time().as_secs_f64();
        let stats = sink.stop();
        assert_eq!(stats.messages, 400_000);
        assert_eq!(
            stats.tls_handshakes,
            if tls { connections as u64 } else { 0 }
        );
        let per_message = |seconds: f64| seconds * 1e6 / stats.messages as f64;
        let transport = if tls { "TLS" } else { "plain" };
        println!(
            "{mode:?} x{connections} {transport}: {:.0} msgs/s ({:.0} MB/s) in {elapsed:.2}s; \
             sink CPU {sink_cpu:.2}s = {:.2} us/msg = {:.0}% of a core; \
             client CPU {:.2}s = {:.2} us/msg",
            stats.messages as f64 / elapsed,
            stats.bytes as f64 / elapsed / 1e6,
            per_message(sink_cpu),
            100.0 * sink_cpu / elapsed,
            process - sink_cpu,
            per_message(process - sink_cpu),
        );
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Data,
    Bdat,
}

/// Transactions per write in BDAT mode.
const BDAT_BATCH: usize = 16;

/// One benchmark connection: what it still has to write, and how many reply lines it waits for
/// before it writes the next batch.
struct BenchConnection {
    stream: mio::net::TcpStream,
    /// Everything goes through it when the benchmark runs over TLS.
    tls: Option<ClientConnection>,
    output: Vec<u8>,
    written: usize,
    awaited_lines: usize,
    /// Messages whose envelope is not sent yet.
    messages_left: usize,
    /// DATA mode: an envelope got its 354 and the content is owed.
    content_owed: bool,
    quitting: bool,
}

impl BenchConnection {
    /// Prepares the next batch, once everything sent so far is answered.
    fn next_batch(&mut self, mode: Mode, body: &[u8], bdat_batch: &[u8]) {
        const ENVELOPE: &[u8] = b"MAIL FROM:<bench@example.org>\r\nRCPT TO:<sink@example.net>\r\n";
        self.output.clear();
        self.written = 0;
        self.awaited_lines = 0;
        if self.content_owed {
            self.output.extend_from_slice(body);
            self.output.extend_from_slice(b".\r\n");
            self.awaited_lines += 1;
            self.content_owed = false;
        }
        if self.messages_left == 0 {
            self.output.extend_from_slice(b"QUIT\r\n");
            self.awaited_lines += 1;
            self.quitting = true;
            return;
        }
        match mode {
            Mode::Bdat => {
                self.output.extend_from_slice(bdat_batch);
                self.awaited_lines += 3 * BDAT_BATCH;
                self.messages_left -= BDAT_BATCH;
            }
            Mode::Data => {
                // Content and the next envelope go in one write; DATA waits for 354.
                self.output.extend_from_slice(ENVELOPE);
                self.output.extend_from_slice(b"DATA\r\n");
                self.awaited_lines += 3;
                self.messages_left -= 1;
                self.content_owed = true;
            }
        }
    }
}

/// Sends `messages` 2 KB messages over `connections` connections (implicit TLS when `tls`) and
/// returns when every one has been answered and every connection has said QUIT.
fn drive_bench_client(
    address: SocketAddr,
    mode: Mode,
    connections: usize,
    tls: bool,
    messages: usize,
) {
    use mio::{Events, Interest, Poll, Token};

    // 27 lines of 76 octets: about 2 KB, ending in CRLF as DATA content must.
    let body =
        b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n".repeat(27);
    let mut bdat_batch = Vec::new();
    for _ in 0..BDAT_BATCH {
        bdat_batch
            .extend_from_slice(b"MAIL FROM:<bench@example.org>\r\nRCPT TO:<sink@example.net>\r\n");
        bdat_batch.extend_from_slice(format!("BDAT {} LAST\r\n", body.len()).as_bytes());
        bdat_batch.extend_from_slice(&body);
    }
    let per_connection = messages / connections;
    assert_eq!(
        per_connection / BDAT_BATCH * BDAT_BATCH * connections,
        messages,
        "whole BDAT batches on every connection"
    );
    let tls_config = client_tls_config();

    let mut poll = Poll::new().unwrap();
    let mut open = Vec::new();
    for index in 0..connections {
        let mut stream = mio::net::TcpStream::connect(address).unwrap();
        poll.registry()
            .register(
                &mut stream,
                Token(index),
                Interest::READABLE | Interest::WRITABLE,
            )
            .unwrap();
        let tls = tls.then(|| {
            let name = ServerName::try_from("localhost").unwrap();
            let mut connection = ClientConnection::new(Arc::clone(&tls_config), name).unwrap();
            // A batch is handed over whole; the one batch in flight bounds the buffers.
            connection.set_buffer_limit(None);
            connection
        });
        open.push(Some(BenchConnection {
            stream,
            tls,
            output: b"EHLO bench\r\n".to_vec(),
            written: 0,
            // The greeting, then the EHLO reply's 8 lines.
            awaited_lines: 9,
            messages_left: per_connection,
            content_owed: false,
            quitting: false,
        }));
    }
    let mut remaining = connections;
    let mut events = Events::with_capacity(1024);
    let mut input = vec![0; 256 * 1024];
    let mut plaintext = vec![0; 256 * 1024];
    while remaining > 0 {
        poll.poll(&mut events, None).unwrap();
        for event in &events {
            let index = event.token().0;
            let Some(connection) = open[index].as_mut() else {
                continue;
            };
            loop {
                if let Some(tls) = connection.tls.as_mut() {
                    if connection.written < connection.output.len() {
                        tls.writer()
                            .write_all(&connection.output[connection.written..])
                            .unwrap();
                        connection.written = connection.output.len();
                    }
                }
                loop {
                    let written = match connection.tls.as_mut() {
                        Some(tls) if tls.wants_write() => tls.write_tls(&mut connection.stream),
                        Some(_) => break,
                        None if connection.written < connection.output.len() => connection
                            .stream
                            .write(&connection.output[connection.written..]),
                        None => break,
                    };
                    match written {
                        Ok(n) if connection.tls.is_none() => connection.written += n,
                        Ok(_) => {}
                        Err(error) if error.kind() == ErrorKind::WouldBlock => break,
                        Err(error) if error.kind() == ErrorKind::NotConnected => break,
                        Err(error) => panic!("write: {error}"),
                    }
                }
                let n = match connection.stream.read(&mut input) {
                    Ok(0) => {
                        assert!(connection.quitting && connection.awaited_lines == 0);
                        open[index] = None;
                        remaining -= 1;
                        break;
                    }
                    Ok(n) => n,
                    Err(error) if error.kind() == ErrorKind::WouldBlock => break,
                    Err(error) if error.kind() == ErrorKind::NotConnected => break,
                    Err(error) => panic!("read: {error}"),
                };
                if connection.tls.is_none() {
                    connection.take_replies(&input[..n], mode, &body, &bdat_batch);
                    continue;
                }
                // rustls takes at most a few KB per call: feed it the whole read.
                let mut ciphertext = &input[..n];
                while !ciphertext.is_empty() {
                    let tls = connection.tls.as_mut().unwrap();
                    tls.read_tls(&mut ciphertext).unwrap();
                    tls.process_new_packets().unwrap();
                    loop {
                        match connection
                            .tls
                            .as_mut()
                            .unwrap()
                            .reader()
                            .read(&mut plaintext)
                        {
                            Ok(0) => break,
                            Ok(n) => {
                                connection.take_replies(&plaintext[..n], mode, &body, &bdat_batch)
                            }
                            Err(error) if error.kind() == ErrorKind::WouldBlock => break,
                            Err(error) => panic!("TLS read: {error}"),
                        }
                    }
                }
            }
        }
    }
}

impl BenchConnection {
    /// Counts the reply lines in `replies`, and prepares the next batch once all are in.
    fn take_replies(&mut self, replies: &[u8], mode: Mode, body: &[u8], bdat_batch: &[u8]) {
        for line in replies.split_inclusive(|&b| b == b'\n') {
            assert!(matches!(line[0], b'2' | b'3'), "{line:?}");
            self.awaited_lines -= usize::from(line.ends_with(b"\n"));
        }
        if self.awaited_lines == 0 && !self.quitting {
            self.next_batch(mode, body, bdat_batch);
        }
    }
}

/// CPU time of the whole process (every thread), user and system.
fn process_cpu_time() -> Duration {
    // SAFETY: `usage` is a valid, writable rusage.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, &mut usage), 0);
        usage
    };
    let seconds =
        |time: libc::timeval| Duration::new(time.tv_sec as u64, time.tv_usec as u32 * 1000);
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

#[test]
fn one_sink_serves_several_addresses() {
    // A free port on 127.0.0.3, then the same port on 127.0.0.4 (free there too: the
    // addresses are distinct).
    let port = std::net::TcpListener::bind("127.0.0.3:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let extra: Vec<SocketAddr> = ["127.0.0.3", "127.0.0.4"]
        .iter()
        .map(|ip| SocketAddr::new(ip.parse().unwrap(), port))
        .collect();
    let sink = sink_with(|config| config.also_listen = extra.clone());
    for addr in std::iter::once(sink.local_addr()).chain(extra) {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        assert_eq!(line, "220 mxpipe-sink ESMTP mxpipe-sink\r\n", "{addr}");
    }
    assert_eq!(sink.stats().connections, 3);

    let too_many = SinkConfig {
        also_listen: vec![SocketAddr::from(([127, 0, 0, 1], 0)); 64],
        ..SinkConfig::default()
    };
    let error = Sink::start(too_many).map(|_| ()).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidInput);
}
