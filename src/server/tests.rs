//! Byte-literal transcripts of the server session with a scripted policy: what a client sends,
//! what the session answers, and what the policy is handed.

use std::net::SocketAddr;
use std::sync::Arc;

use super::session::{Context, End, Session};
use super::*;

/// Accepts every recipient but `denied@...`, answers messages as told, and keeps what it was
/// handed.
#[derive(Default)]
struct Script {
    pending: bool,
    messages: Vec<Handed>,
}

type Parameter = (String, Option<String>);

/// What a message handed the policy: sender, MAIL parameters, recipients with theirs, content.
type Handed = (
    String,
    Vec<Parameter>,
    Vec<(String, Vec<Parameter>)>,
    Vec<u8>,
);

impl Policy for Script {
    fn rcpt(&mut self, _peer: &Peer, _t: &Transaction, address: &[u8]) -> Option<Vec<u8>> {
        address
            .starts_with(b"denied@")
            .then(|| b"554 5.7.1 Relay access denied\r\n".to_vec())
    }

    fn message(&mut self, _peer: &Peer, t: &mut Transaction) -> Verdict {
        self.messages.push((
            t.mail_from.clone(),
            t.mail_params.clone(),
            t.recipients
                .iter()
                .map(|r| (r.address.clone(), r.parameters.clone()))
                .collect(),
            t.content.clone(),
        ));
        if self.pending {
            Verdict::Pending
        } else {
            let mut replies = Vec::new();
            for r in &t.recipients {
                replies.extend_from_slice(format!("250 2.0.0 <{}> ok\r\n", r.address).as_bytes());
            }
            Verdict::Reply(replies)
        }
    }

    fn authenticate(&mut self, user: &str, password: &[u8]) -> bool {
        user == "ann" && password == b"s3cret"
    }
}

fn context(settings: Settings, script: Script) -> Context<Script> {
    Context::new(settings, script, Arc::new(Counters::default()))
}

fn session(context: &Context<Script>) -> (Session, String) {
    let mut out = Vec::new();
    let id = ConnectionId {
        key: 0,
        generation: 1,
    };
    let addr: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let session = Session::start(context, id, addr, &mut out);
    (session, String::from_utf8(out).unwrap())
}

/// Feeds `input` at once and returns the replies.
fn feed(session: &mut Session, context: &mut Context<Script>, input: &[u8]) -> String {
    let mut out = Vec::new();
    let used = session.process(context, input, &mut out);
    assert_eq!(used, input.len(), "all input is consumed");
    String::from_utf8(out).unwrap()
}

fn settings() -> Settings {
    let mut settings = Settings::new("mx.test", 1000);
    settings.keep_content = true;
    settings
}

#[test]
fn lmtp_answers_each_recipient_after_the_data_and_hands_on_the_parameters() {
    let mut settings = settings();
    settings.lmtp = true;
    let mut context = context(settings, Script::default());
    let (mut s, greeting) = session(&context);
    assert_eq!(greeting, "220 mx.test LMTP mxpipe\r\n");
    assert_eq!(
        feed(&mut s, &mut context, b"EHLO x\r\nHELO x\r\n"),
        "502 5.5.2 Command not recognized\r\n502 5.5.2 Command not recognized\r\n"
    );
    let replies = feed(
        &mut s,
        &mut context,
        b"LHLO x\r\nMAIL FROM:<a@b.test> RET=HDRS ENVID=x+2By SIZE=20\r\n\
          RCPT TO:<r1@c.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;r1+40c.test\r\n\
          RCPT TO:<denied@c.test>\r\nRCPT TO:<r2@c.test>\r\nDATA\r\n\
          Subject: s\r\n\r\n..dot\r\n.\r\n",
    );
    assert!(replies.starts_with("250-mx.test\r\n"), "{replies}");
    assert!(replies.ends_with(
        "250 DSN\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n554 5.7.1 Relay access denied\r\n\
         250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n\
         250 2.0.0 <r1@c.test> ok\r\n250 2.0.0 <r2@c.test> ok\r\n"
    ));
    let some = |s: &str| Some(s.to_owned());
    assert_eq!(
        context.policy.messages,
        vec![(
            "a@b.test".to_owned(),
            vec![
                ("RET".to_owned(), some("HDRS")),
                ("ENVID".to_owned(), some("x+2By")),
                ("SIZE".to_owned(), some("20")),
            ],
            vec![
                (
                    "r1@c.test".to_owned(),
                    vec![
                        ("NOTIFY".to_owned(), some("SUCCESS,FAILURE")),
                        ("ORCPT".to_owned(), some("rfc822;r1+40c.test")),
                    ]
                ),
                ("r2@c.test".to_owned(), vec![]),
            ],
            b"Subject: s\r\n\r\n.dot\r\n".to_vec(),
        )]
    );
}

#[test]
fn bad_and_unknown_parameters_are_refused() {
    let mut context = context(settings(), Script::default());
    let (mut s, _) = session(&context);
    assert_eq!(
        feed(
            &mut s,
            &mut context,
            b"HELO x\r\nMAIL FROM:<a@b.test> XYZZY=1\r\nMAIL FROM:<a@b.test> RET=\r\n\
              MAIL FROM:<a@b.test> =x\r\nMAIL FROM:<a@b.test>\r\n\
              RCPT TO:<r@c.test> FOO\r\nRCPT TO:<r@c.test> NOTIFY=a=b\r\n"
        ),
        "250 mx.test\r\n555 5.5.4 Unsupported MAIL parameter\r\n\
         501 5.5.4 Syntax error in parameters\r\n501 5.5.4 Syntax error in parameters\r\n\
         250 2.1.0 Ok\r\n555 5.5.4 Unsupported RCPT parameter\r\n\
         501 5.5.4 Syntax error in parameters\r\n"
    );
}

#[test]
fn a_pending_verdict_holds_the_pipelined_commands_behind_it() {
    let mut context = context(
        settings(),
        Script {
            pending: true,
            ..Script::default()
        },
    );
    let (mut s, _) = session(&context);
    let input =
        b"HELO x\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<r@c.test>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n";
    let mut out = Vec::new();
    let used = s.process(&mut context, input, &mut out);
    assert_eq!(&input[used..], b"QUIT\r\n", "QUIT waits for the verdict");
    assert!(s.is_waiting());
    assert_eq!(s.process(&mut context, &input[used..], &mut out), 0);
    out.clear();
    s.resume(b"250 2.0.0 durable\r\n", &mut out);
    assert_eq!(out, b"250 2.0.0 durable\r\n");
    assert_eq!(
        feed(&mut s, &mut context, &input[used..]),
        "221 2.0.0 Bye\r\n"
    );
    assert_eq!(s.end(), End::Close);
}

#[test]
fn bare_newlines_are_refused_when_forbidden_and_the_connection_closes() {
    let mut settings = settings();
    settings.forbid_bare_newline = true;
    let mut context = context(settings, Script::default());
    for content in [
        &b"a\n.\nMAIL FROM:<x@y.test>\r\n"[..],
        b"a\r\n.\rMAIL FROM:<x@y.test>\r\n",
        b"line\nother\r\n",
    ] {
        let (mut s, _) = session(&context);
        feed(
            &mut s,
            &mut context,
            b"HELO x\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<r@c.test>\r\nDATA\r\n",
        );
        let mut input = content.to_vec();
        input.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(
            feed(&mut s, &mut context, &input),
            "521 5.5.2 mx.test Error: bare <LF> received\r\n"
        );
        assert_eq!(s.end(), End::Close);
    }
    let (mut s, _) = session(&context);
    let mut out = Vec::new();
    s.process(&mut context, b"HELO x\nQUIT\r\n", &mut out);
    assert_eq!(out, b"521 5.5.2 mx.test Error: bare <LF> received\r\n");
    assert!(context.policy.messages.is_empty());
    // Without the setting (the sink), content with bare LFs is accepted as it came.
    let mut context = self::context(self::settings(), Script::default());
    let (mut s, _) = session(&context);
    let replies = feed(
        &mut s,
        &mut context,
        b"HELO x\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<r@c.test>\r\nDATA\r\nline\nother\r\n.\r\n",
    );
    assert!(
        replies.ends_with("250 2.0.0 <r@c.test> ok\r\n"),
        "{replies}"
    );
}

#[test]
fn auth_needs_tls_and_checks_plain_and_login_credentials() {
    let mut settings = settings();
    settings.auth = true;
    settings.tls = Some(
        tls::server_config(
            "test",
            include_bytes!("../sink/bench_cert.pem"),
            include_bytes!("../sink/bench_key.pem"),
        )
        .unwrap(),
    );
    let mut context = context(settings, Script::default());
    let (mut s, _) = session(&context);
    let ehlo = feed(&mut s, &mut context, b"EHLO x\r\n");
    assert!(
        !ehlo.contains("AUTH"),
        "no AUTH offered in plaintext: {ehlo}"
    );
    assert_eq!(
        feed(&mut s, &mut context, b"AUTH PLAIN AGFubgBzM2NyZXQ=\r\n"),
        "538 5.7.11 Encryption required for requested authentication mechanism\r\n"
    );
    // As if STARTTLS had happened.
    let mut out = Vec::new();
    s.process(&mut context, b"STARTTLS\r\n", &mut out);
    assert_eq!(s.end(), End::StartTls);
    s.tls_started();
    assert!(feed(&mut s, &mut context, b"EHLO x\r\n").contains("250-AUTH PLAIN LOGIN\r\n"));
    assert_eq!(
        feed(
            &mut s,
            &mut context,
            b"AUTH PLAIN AGFubgB3cm9uZw==\r\nAUTH CRAM-MD5\r\nAUTH PLAIN\r\n!!\r\nAUTH LOGIN\r\nYW5u\r\n*\r\n"
        ),
        "535 5.7.8 Authentication credentials invalid\r\n\
         504 5.5.4 Unrecognized authentication type\r\n\
         334 \r\n501 5.5.2 Cannot decode response\r\n\
         334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n501 5.0.0 Authentication aborted\r\n"
    );
    assert_eq!(
        feed(
            &mut s,
            &mut context,
            b"AUTH LOGIN YW5u\r\nczNjcmV0\r\nAUTH PLAIN =\r\n"
        ),
        "334 UGFzc3dvcmQ6\r\n235 2.7.0 Authentication successful\r\n\
         503 5.5.1 Error: already authenticated\r\n"
    );
}
