//! The server side of one SMTP or LMTP connection: commands in, replies and accepted
//! transactions out, no sockets.
//!
//! [`Session::process`] takes every octet that has arrived, answers every complete command in it
//! and appends all the replies to one buffer, which the event loop then writes with one call:
//! that is what makes a pipelining client fast (RFC 2920). Content that is not kept is scanned
//! where it lies and never copied. What becomes of a message is the [`Policy`]'s decision; when
//! it cannot answer at once the session waits ([`Session::resume`]) and reads nothing more.
//! STARTTLS is decided here (and the state reset after it), the handshake itself is the loop's.
//! This must not block, sleep or touch the socket.

use std::fmt;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use base64::Engine as _;

use super::scan::{find_byte, unstuff, EndOfData};
use super::{ConnectionId, Counters, Peer, Policy, Settings, Verdict};

/// Longest command line accepted, CRLF included. RFC 5321 4.5.3.1.4 asks for at least 512;
/// this leaves room for long parameter lists (RFC 5321 4.5.3.1.10: over-long lines get 500).
pub(crate) const MAX_LINE: usize = 4096;

/// Replies buffered for a client that does not read them. Above this, [`Session::process`] stops
/// taking input, so a client that pipelines without reading meets TCP backpressure instead of
/// growing the server's memory.
pub(crate) const OUTPUT_HIGH_WATER: usize = 64 * 1024;

/// Whether the connection goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// Keep reading commands.
    Open,
    /// Send what is buffered, then close (QUIT, 421).
    Close,
    /// Send what is buffered (the 220 to STARTTLS), then start the TLS handshake: the octets
    /// after the STARTTLS line are not commands and must not be offered again.
    StartTls,
    /// Send what is buffered, then close without answering the content that arrived
    /// (`Settings::drop_during_data`).
    Abort,
}

/// What the greeting told the client (RFC 5321 3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Greeting {
    /// 220: commands are served.
    Ready,
    /// 421: the connection is closed after the greeting.
    Closing,
    /// Any other code (554 in practice): every command but QUIT gets 503 (RFC 5321 3.1).
    Refusing,
}

/// Everything the sessions of one event loop share: settings, prepared replies, the policy
/// and the counters. Owned by the loop thread, so nothing here needs locking.
pub(crate) struct Context<P> {
    pub(crate) settings: Settings,
    pub(crate) policy: P,
    counters: Arc<Counters>,
    greeting: Vec<u8>,
    greeting_kind: Greeting,
    /// The EHLO reply before TLS: with STARTTLS when it is offered.
    ehlo_reply: Vec<u8>,
    /// The EHLO reply over TLS: never with STARTTLS (RFC 3207 4.2), with AUTH when offered.
    ehlo_reply_encrypted: Vec<u8>,
    helo_reply: Vec<u8>,
    /// STARTTLS is offered on plaintext connections.
    starttls: bool,
}

impl<P: Policy> Context<P> {
    /// Prepares the replies that never change.
    pub(crate) fn new(settings: Settings, policy: P, counters: Arc<Counters>) -> Context<P> {
        let host = &settings.hostname;
        let mut greeting = Vec::new();
        let greeting_kind = match &settings.greeting {
            None => {
                let protocol = if settings.lmtp { "LMTP" } else { "ESMTP" };
                greeting.extend_from_slice(format!("220 {host} {protocol} mxpipe\r\n").as_bytes());
                Greeting::Ready
            }
            Some(text) => {
                for line in text.lines() {
                    greeting.extend_from_slice(line.as_bytes());
                    greeting.extend_from_slice(b"\r\n");
                }
                if text.starts_with("421") {
                    Greeting::Closing
                } else if text.starts_with('2') {
                    Greeting::Ready
                } else {
                    Greeting::Refusing
                }
            }
        };
        if let Some(extra) = &settings.after_greeting {
            greeting.extend_from_slice(extra);
        }

        let starttls = settings.tls.is_some() && !settings.implicit_tls;
        // RFC 5321 4.1.1.1; the keywords are RFC 2920, 1870, 6152, 3207, 6531, 2034, 3030,
        // 3461 and 4954.
        let ehlo_reply_with = |offer_starttls: bool, offer_auth: bool| {
            let mut lines = vec![host.clone()];
            if settings.pipelining {
                lines.push("PIPELINING".to_owned());
            }
            lines.push(format!("SIZE {}", settings.max_size));
            lines.push("8BITMIME".to_owned());
            if offer_starttls {
                lines.push("STARTTLS".to_owned());
            }
            if offer_auth {
                lines.push("AUTH PLAIN LOGIN".to_owned());
            }
            lines.push("SMTPUTF8".to_owned());
            lines.push("ENHANCEDSTATUSCODES".to_owned());
            if settings.chunking {
                lines.push("CHUNKING".to_owned());
            }
            lines.push("DSN".to_owned());
            let mut reply = Vec::new();
            for (i, line) in lines.iter().enumerate() {
                let separator = if i + 1 == lines.len() { ' ' } else { '-' };
                reply.extend_from_slice(format!("250{separator}{line}\r\n").as_bytes());
            }
            reply
        };
        let ehlo_reply = ehlo_reply_with(starttls, settings.auth && settings.implicit_tls);
        let ehlo_reply_encrypted = ehlo_reply_with(false, settings.auth);

        Context {
            greeting,
            greeting_kind,
            ehlo_reply,
            ehlo_reply_encrypted,
            helo_reply: format!("250 {host}\r\n").into_bytes(),
            starttls,
            settings,
            policy,
            counters,
        }
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
    }
}

/// Where the next octets of input belong.
#[derive(Debug, Clone)]
enum Phase {
    /// Command lines.
    Command,
    /// DATA content, up to and including CRLF.CRLF.
    Data(EndOfData),
    /// The octets of a BDAT chunk.
    Chunk(Chunk),
    /// A line of an AUTH exchange (RFC 4954 4).
    Auth(AuthStep),
    /// The policy has not answered the end of the content yet.
    Waiting,
}

/// The next client line an AUTH exchange expects.
#[derive(Debug, Clone)]
enum AuthStep {
    /// The PLAIN response (RFC 4616).
    Plain,
    /// The LOGIN user name.
    LoginUser,
    /// The LOGIN password for this user.
    LoginPassword(String),
}

/// A BDAT chunk being read (RFC 3030 2).
#[derive(Debug, Clone, Copy)]
struct Chunk {
    size: u64,
    remaining: u64,
    last: bool,
    verdict: ChunkVerdict,
}

/// The answer a BDAT chunk gets once its octets are read: the octets are always read first,
/// because the client sends them without waiting (RFC 3030 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkVerdict {
    Accept,
    NoTransaction,
    NoRecipients,
    TooLarge,
}

/// How the content arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
    /// DATA with dot-stuffing (RFC 5321 4.1.1.4).
    Data,
    /// BDAT chunks (RFC 3030).
    Bdat,
}

/// An ESMTP parameter as the client wrote it (RFC 5321 4.1.2 `esmtp-param`): the keyword, and
/// the value when there was an "=". Interpreting them (SIZE aside) is the policy's business.
pub(crate) type Parameter = (String, Option<String>);

/// One accepted recipient, kept when the settings keep content.
#[derive(Debug, Clone)]
pub(crate) struct Recipient {
    pub(crate) address: String,
    /// Its RCPT parameters (NOTIFY, ORCPT for a DSN request).
    pub(crate) parameters: Vec<Parameter>,
}

/// The mail transaction in progress (RFC 5321 3.3). Addresses and content are kept only when
/// the settings say so; the buffers are reused from one transaction to the next.
#[derive(Debug, Default)]
pub(crate) struct Transaction {
    active: bool,
    /// Recipients accepted so far (also when they are not kept).
    pub(crate) accepted: usize,
    /// Content octets as they arrived (for DATA: stuffed, end sequence excluded once known).
    pub(crate) size: u64,
    pub(crate) via: Option<Via>,
    pub(crate) mail_from: String,
    /// The MAIL parameters as written, and parsed.
    pub(crate) mail_params_text: String,
    pub(crate) mail_params: Vec<Parameter>,
    pub(crate) recipients: Vec<Recipient>,
    /// The content the client meant (dot-stuffing undone).
    pub(crate) content: Vec<u8>,
}

impl Transaction {
    /// RSET, EHLO/HELO and the end of a transaction all forget it (RFC 5321 4.1.1.5).
    fn clear(&mut self) {
        self.active = false;
        self.accepted = 0;
        self.size = 0;
        self.via = None;
        self.mail_from.clear();
        self.mail_params_text.clear();
        self.mail_params.clear();
        self.recipients.clear();
        self.content.clear();
    }
}

/// One connection's protocol state.
#[derive(Debug)]
pub(crate) struct Session {
    phase: Phase,
    end: End,
    refusing: bool,
    greeted: bool,
    peer: Peer,
    /// Inside an over-long line: octets are dropped up to the next LF.
    discarding_line: bool,
    /// Transactions that reached their final reply on this connection.
    transactions: u32,
    transaction: Transaction,
}

impl Session {
    /// A new connection: appends the greeting to `out`.
    pub(crate) fn start<P: Policy>(
        context: &Context<P>,
        id: ConnectionId,
        addr: SocketAddr,
        out: &mut Vec<u8>,
    ) -> Session {
        out.extend_from_slice(&context.greeting);
        let end = if context.greeting_kind == Greeting::Closing {
            End::Close
        } else {
            End::Open
        };
        let refusing = context.greeting_kind == Greeting::Refusing;
        Session::new(context, id, addr, end, refusing)
    }

    /// A connection over a connection limit: appends a 421 greeting to `out`, and the session
    /// ends once it is sent (RFC 5321 3.8).
    pub(crate) fn refuse<P: Policy>(
        context: &Context<P>,
        id: ConnectionId,
        addr: SocketAddr,
        out: &mut Vec<u8>,
    ) -> Session {
        out.extend_from_slice(b"421 4.7.0 Too many connections, try again later\r\n");
        Session::new(context, id, addr, End::Close, false)
    }

    fn new<P: Policy>(
        context: &Context<P>,
        id: ConnectionId,
        addr: SocketAddr,
        end: End,
        refusing: bool,
    ) -> Session {
        Session {
            phase: Phase::Command,
            end,
            refusing,
            greeted: false,
            peer: Peer {
                id,
                addr,
                helo: String::new(),
                encrypted: context.settings.implicit_tls,
                user: None,
            },
            discarding_line: false,
            transactions: 0,
            transaction: Transaction::default(),
        }
    }

    /// The loop has put TLS under the connection after the 220 to STARTTLS. RFC 3207 4.2: the
    /// SMTP state is that after the greeting, and nothing learnt from the client before
    /// (its EHLO, a transaction) counts; the client must say EHLO again.
    pub(crate) fn tls_started(&mut self) {
        debug_assert_eq!(self.end, End::StartTls);
        self.end = End::Open;
        self.peer.encrypted = true;
        self.greeted = false;
        self.peer.helo.clear();
        self.discarding_line = false;
        self.transaction.clear();
    }

    pub(crate) fn end(&self) -> End {
        self.end
    }

    /// The policy has not answered the end of the content yet.
    pub(crate) fn is_waiting(&self) -> bool {
        matches!(self.phase, Phase::Waiting)
    }

    /// The policy's late answer to the end of the content: appends it to `out`, and commands
    /// are read again.
    pub(crate) fn resume(&mut self, replies: &[u8], out: &mut Vec<u8>) {
        if matches!(self.phase, Phase::Waiting) {
            out.extend_from_slice(replies);
            self.phase = Phase::Command;
            self.transaction.clear();
            self.transactions += 1;
        }
    }

    /// Consumes as much of `input` as can be acted on and appends the replies to `out`.
    /// Returns the number of octets consumed; the rest (a partial command line, or anything
    /// after the connection ended, the output filled up or while a verdict is pending) must be
    /// offered again.
    pub(crate) fn process<P: Policy>(
        &mut self,
        context: &mut Context<P>,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> usize {
        let mut consumed = 0;
        while consumed < input.len() && self.end == End::Open && out.len() < OUTPUT_HIGH_WATER {
            let rest = &input[consumed..];
            consumed += match self.phase {
                Phase::Command | Phase::Auth(_) => match self.command_line(context, rest, out) {
                    Some(used) => used,
                    None => break,
                },
                Phase::Data(_) => self.data(context, rest, out),
                Phase::Chunk(_) => self.chunk(context, rest, out),
                Phase::Waiting => break,
            };
        }
        consumed
    }

    /// Handles the first line of `rest`; `None` when it is not complete yet.
    fn command_line<P: Policy>(
        &mut self,
        context: &mut Context<P>,
        rest: &[u8],
        out: &mut Vec<u8>,
    ) -> Option<usize> {
        let Some(newline) = find_byte(b'\n', rest) else {
            if self.discarding_line {
                return Some(rest.len());
            }
            if rest.len() >= MAX_LINE {
                // Too long whatever comes next: answer now so the buffer stays bounded.
                out.extend_from_slice(b"500 5.5.2 Line too long\r\n");
                self.discarding_line = true;
                return Some(rest.len());
            }
            return None;
        };
        let used = newline + 1;
        if self.discarding_line {
            self.discarding_line = false;
        } else if used > MAX_LINE {
            out.extend_from_slice(b"500 5.5.2 Line too long\r\n");
        } else {
            let line = match rest[..newline].strip_suffix(b"\r") {
                Some(line) => line,
                None if context.settings.forbid_bare_newline => {
                    self.bare_newline(context, out);
                    return Some(rest.len());
                }
                // Bare LF is otherwise tolerated as a command terminator; content never gets
                // that leniency.
                None => &rest[..newline],
            };
            if let Phase::Auth(step) = &self.phase {
                let step = step.clone();
                self.phase = Phase::Command;
                self.auth_response(context, step, line, out);
            } else {
                self.command(context, line, out);
            }
        }
        Some(used)
    }

    /// A line ended in a bare LF where that is refused: the client is not one to trust with
    /// the rest of the connection (Postfix's `smtpd_forbid_bare_newline`).
    fn bare_newline<P: Policy>(&mut self, context: &Context<P>, out: &mut Vec<u8>) {
        let host = &context.settings.hostname;
        append(
            out,
            format_args!("521 5.5.2 {host} Error: bare <LF> received\r\n"),
        );
        self.transaction.clear();
        self.end = End::Close;
    }

    /// One reply for the end of a transaction: LMTP wants one per accepted recipient (RFC 2033
    /// 4.2), SMTP one.
    fn final_reply<P: Policy>(&self, context: &Context<P>, line: &[u8], out: &mut Vec<u8>) {
        let times = if context.settings.lmtp {
            self.transaction.accepted.max(1)
        } else {
            1
        };
        for _ in 0..times {
            out.extend_from_slice(line);
        }
    }

    fn command<P: Policy>(&mut self, context: &mut Context<P>, line: &[u8], out: &mut Vec<u8>) {
        let (verb, argument) = match find_byte(b' ', line) {
            Some(space) => (&line[..space], trim_spaces(&line[space + 1..])),
            None => (line, &line[line.len()..]),
        };
        let is = |name: &str| verb.eq_ignore_ascii_case(name.as_bytes());

        if let Some(limit) = context.settings.close_after_transactions {
            if self.transactions >= limit {
                out.extend_from_slice(b"421 4.7.0 closing connection\r\n");
                self.end = End::Close;
                return;
            }
        }
        if is("QUIT") {
            out.extend_from_slice(b"221 2.0.0 Bye\r\n");
            self.end = End::Close;
            return;
        }
        if self.refusing {
            out.extend_from_slice(b"503 5.5.1 Bad sequence of commands\r\n");
            return;
        }
        let lmtp = context.settings.lmtp;

        if (is("EHLO") && !lmtp) || (is("LHLO") && lmtp) {
            if context.settings.no_ehlo {
                out.extend_from_slice(b"502 5.5.2 Command not recognized\r\n");
            } else if argument.is_empty() {
                append(
                    out,
                    format_args!(
                        "501 5.5.4 Syntax: {} hostname\r\n",
                        if lmtp { "LHLO" } else { "EHLO" }
                    ),
                );
            } else {
                self.hello(argument);
                out.extend_from_slice(if self.peer.encrypted {
                    &context.ehlo_reply_encrypted
                } else {
                    &context.ehlo_reply
                });
            }
        } else if is("HELO") && !lmtp {
            if argument.is_empty() {
                out.extend_from_slice(b"501 5.5.4 Syntax: HELO hostname\r\n");
            } else {
                self.hello(argument);
                out.extend_from_slice(&context.helo_reply);
            }
        } else if is("MAIL") {
            self.mail(context, argument, out);
        } else if is("RCPT") {
            self.rcpt(context, argument, out);
        } else if is("DATA") {
            self.data_command(out);
        } else if is("BDAT") {
            self.bdat_command(context, argument, out);
        } else if is("RSET") {
            self.transaction.clear();
            out.extend_from_slice(b"250 2.0.0 Ok\r\n");
        } else if is("NOOP") {
            out.extend_from_slice(b"250 2.0.0 Ok\r\n");
        } else if is("VRFY") {
            // RFC 5321 3.5.3: the answer of a server that does not verify addresses.
            out.extend_from_slice(b"252 2.5.0 Cannot VRFY user\r\n");
        } else if is("STARTTLS") && (self.peer.encrypted || context.starttls) {
            self.starttls(argument, out);
        } else if is("AUTH") && context.settings.auth {
            self.auth(context, argument, out);
        } else {
            out.extend_from_slice(b"502 5.5.2 Command not recognized\r\n");
        }
    }

    /// EHLO, HELO or LHLO with a name: a new start (RFC 5321 4.1.4).
    fn hello(&mut self, argument: &[u8]) {
        self.transaction.clear();
        self.greeted = true;
        self.peer.helo = String::from_utf8_lossy(argument).into_owned();
    }

    /// STARTTLS on a connection that offers it or is already encrypted (RFC 3207 4).
    fn starttls(&mut self, argument: &[u8], out: &mut Vec<u8>) {
        if self.peer.encrypted {
            out.extend_from_slice(b"503 5.5.1 Error: TLS already active\r\n");
        } else if !argument.is_empty() {
            // RFC 3207 4: STARTTLS takes no parameters.
            out.extend_from_slice(b"501 5.5.4 Syntax: STARTTLS\r\n");
        } else {
            out.extend_from_slice(b"220 2.0.0 Ready to start TLS\r\n");
            self.end = End::StartTls;
        }
    }

    /// AUTH PLAIN or LOGIN (RFC 4954 4), with or without an initial response.
    fn auth<P: Policy>(&mut self, context: &mut Context<P>, argument: &[u8], out: &mut Vec<u8>) {
        if !self.greeted {
            out.extend_from_slice(b"503 5.5.1 Error: send HELO/EHLO first\r\n");
            return;
        }
        if !self.peer.encrypted {
            // RFC 4954 6: the mechanisms that send a password need an encrypted connection.
            out.extend_from_slice(
                b"538 5.7.11 Encryption required for requested authentication mechanism\r\n",
            );
            return;
        }
        if self.peer.user.is_some() {
            out.extend_from_slice(b"503 5.5.1 Error: already authenticated\r\n");
            return;
        }
        if self.transaction.active {
            out.extend_from_slice(b"503 5.5.1 Error: MAIL transaction in progress\r\n");
            return;
        }
        let mut words = argument.split(|&b| b == b' ').filter(|w| !w.is_empty());
        let mechanism = words.next().unwrap_or_default();
        let initial = words.next();
        let step = if mechanism.eq_ignore_ascii_case(b"PLAIN") {
            AuthStep::Plain
        } else if mechanism.eq_ignore_ascii_case(b"LOGIN") {
            AuthStep::LoginUser
        } else {
            out.extend_from_slice(b"504 5.5.4 Unrecognized authentication type\r\n");
            return;
        };
        match initial {
            // RFC 4954 4: "=" is an empty initial response.
            Some(response) => self.auth_response(context, step, response, out),
            None => {
                out.extend_from_slice(match step {
                    AuthStep::Plain => b"334 \r\n".as_slice(),
                    _ => b"334 VXNlcm5hbWU6\r\n",
                });
                self.phase = Phase::Auth(step);
            }
        }
    }

    /// A client line inside an AUTH exchange.
    fn auth_response<P: Policy>(
        &mut self,
        context: &mut Context<P>,
        step: AuthStep,
        line: &[u8],
        out: &mut Vec<u8>,
    ) {
        if line == b"*" {
            out.extend_from_slice(b"501 5.0.0 Authentication aborted\r\n");
            return;
        }
        let decoded = if line == b"=" {
            Ok(Vec::new())
        } else {
            base64::engine::general_purpose::STANDARD.decode(line)
        };
        let Ok(decoded) = decoded else {
            out.extend_from_slice(b"501 5.5.2 Cannot decode response\r\n");
            return;
        };
        let credentials = match step {
            AuthStep::Plain => {
                // RFC 4616 2: authzid NUL authcid NUL passwd.
                let mut parts = decoded.split(|&b| b == 0);
                match (parts.next(), parts.next(), parts.next(), parts.next()) {
                    (Some(authzid), Some(user), Some(password), None)
                        if authzid.is_empty() || authzid == user =>
                    {
                        Some((user.to_vec(), password.to_vec()))
                    }
                    _ => None,
                }
            }
            AuthStep::LoginUser => {
                let user = String::from_utf8_lossy(&decoded).into_owned();
                out.extend_from_slice(b"334 UGFzc3dvcmQ6\r\n");
                self.phase = Phase::Auth(AuthStep::LoginPassword(user));
                return;
            }
            AuthStep::LoginPassword(user) => Some((user.into_bytes(), decoded)),
        };
        let accepted = credentials.and_then(|(user, password)| {
            let user = String::from_utf8(user).ok()?;
            context
                .policy
                .authenticate(&user, &password)
                .then_some(user)
        });
        match accepted {
            Some(user) => {
                self.peer.user = Some(user);
                out.extend_from_slice(b"235 2.7.0 Authentication successful\r\n");
            }
            None => out.extend_from_slice(b"535 5.7.8 Authentication credentials invalid\r\n"),
        }
    }

    fn mail<P: Policy>(&mut self, context: &Context<P>, argument: &[u8], out: &mut Vec<u8>) {
        // RFC 5321 4.1.4: a transaction needs EHLO/HELO first, and cannot be nested.
        if !self.greeted {
            out.extend_from_slice(b"503 5.5.1 Error: send HELO/EHLO first\r\n");
            return;
        }
        if self.transaction.active {
            out.extend_from_slice(b"503 5.5.1 Error: nested MAIL command\r\n");
            return;
        }
        let Some((address, parameters)) = parse_path(argument, b"FROM:") else {
            out.extend_from_slice(b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n");
            return;
        };
        let Some(parsed) = parse_parameters(parameters) else {
            out.extend_from_slice(b"501 5.5.4 Syntax error in parameters\r\n");
            return;
        };
        if !known(
            &parsed,
            &["SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "AUTH"],
        ) {
            // RFC 5321 4.1.1.11.
            out.extend_from_slice(b"555 5.5.4 Unsupported MAIL parameter\r\n");
            return;
        }
        match declared_size(&parsed) {
            Err(()) => {
                out.extend_from_slice(b"501 5.5.4 Bad SIZE parameter\r\n");
                return;
            }
            // RFC 1870 6.1: a declared size above the limit is refused at MAIL.
            Ok(Some(size)) if size > context.settings.max_size => {
                out.extend_from_slice(
                    b"552 5.3.4 Message size exceeds fixed maximum message size\r\n",
                );
                return;
            }
            Ok(_) => {}
        }
        let transaction = &mut self.transaction;
        transaction.active = true;
        if context.settings.keep_content {
            transaction
                .mail_from
                .push_str(&String::from_utf8_lossy(address));
            transaction
                .mail_params_text
                .push_str(&String::from_utf8_lossy(parameters));
            transaction.mail_params = parsed;
        }
        out.extend_from_slice(b"250 2.1.0 Ok\r\n");
    }

    fn rcpt<P: Policy>(&mut self, context: &mut Context<P>, argument: &[u8], out: &mut Vec<u8>) {
        if !self.transaction.active {
            out.extend_from_slice(b"503 5.5.1 Error: need MAIL command\r\n");
            return;
        }
        let (address, parameters) = match parse_path(argument, b"TO:") {
            Some((address, parameters)) if !address.is_empty() => (address, parameters),
            _ => {
                out.extend_from_slice(b"501 5.5.4 Syntax: RCPT TO:<address>\r\n");
                return;
            }
        };
        let Some(parameters) = parse_parameters(parameters) else {
            out.extend_from_slice(b"501 5.5.4 Syntax error in parameters\r\n");
            return;
        };
        if !known(&parameters, &["NOTIFY", "ORCPT"]) {
            out.extend_from_slice(b"555 5.5.4 Unsupported RCPT parameter\r\n");
            return;
        }
        let refusal = if context
            .settings
            .max_recipients
            .is_some_and(|max| self.transaction.accepted >= max)
        {
            // RFC 5321 4.5.3.1.10: 452 for too many recipients.
            Some(b"452 4.5.3 Too many recipients\r\n".to_vec())
        } else {
            context.policy.rcpt(&self.peer, &self.transaction, address)
        };
        if let Some(reply) = refusal {
            out.extend_from_slice(&reply);
            context
                .counters
                .rejected_recipients
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.transaction.accepted += 1;
        if context.settings.keep_content {
            self.transaction.recipients.push(Recipient {
                address: String::from_utf8_lossy(address).into_owned(),
                parameters,
            });
        }
        out.extend_from_slice(b"250 2.1.5 Ok\r\n");
    }

    fn data_command(&mut self, out: &mut Vec<u8>) {
        let transaction = &mut self.transaction;
        if !transaction.active {
            out.extend_from_slice(b"503 5.5.1 Error: need MAIL command\r\n");
        } else if transaction.via == Some(Via::Bdat) {
            // RFC 3030 2: DATA and BDAT cannot be mixed in one transaction.
            out.extend_from_slice(b"503 5.5.1 Error: BDAT in progress\r\n");
        } else if transaction.accepted == 0 {
            // RFC 2920 3.1: the answer to DATA after every RCPT failed.
            out.extend_from_slice(b"554 5.5.1 No valid recipients\r\n");
        } else {
            transaction.via = Some(Via::Data);
            self.phase = Phase::Data(EndOfData::after_data_command());
            out.extend_from_slice(b"354 End data with <CR><LF>.<CR><LF>\r\n");
        }
    }

    /// Reads DATA content from `rest`; returns the octets used.
    fn data<P: Policy>(
        &mut self,
        context: &mut Context<P>,
        rest: &[u8],
        out: &mut Vec<u8>,
    ) -> usize {
        let Phase::Data(mut scanner) = self.phase else {
            unreachable!("data() is only called in the DATA phase")
        };
        if context.settings.drop_during_data {
            self.end = End::Abort;
            return rest.len();
        }
        let end = scanner.scan(rest);
        self.phase = Phase::Data(scanner);
        let used = end.unwrap_or(rest.len());
        let transaction = &mut self.transaction;
        transaction.size += used as u64;
        // Keep at most what could still be accepted (plus the end sequence), so an oversized
        // message cannot grow the buffer past the advertised SIZE.
        if context.settings.keep_content && transaction.size <= context.settings.max_size + 3 {
            transaction.content.extend_from_slice(&rest[..used]);
        }
        if end.is_some() {
            // The final ".CRLF" is not content; the CRLF before it is (RFC 5321 4.1.1.4).
            transaction.size -= 3;
            let kept = transaction.content.len().saturating_sub(3);
            transaction.content.truncate(kept);
            self.phase = Phase::Command;
            if context.settings.forbid_bare_newline && smuggling(&transaction.content) {
                self.bare_newline(context, out);
                return used;
            }
            unstuff(&mut transaction.content);
            self.finish_transaction(context, out);
        }
        used
    }

    fn bdat_command<P: Policy>(
        &mut self,
        context: &mut Context<P>,
        argument: &[u8],
        out: &mut Vec<u8>,
    ) {
        let Some((size, last)) = parse_bdat(argument) else {
            // The chunk size is unknown, so the octets that follow cannot be skipped: they will
            // be read as commands, as any server must.
            out.extend_from_slice(b"501 5.5.4 Syntax: BDAT size [LAST]\r\n");
            return;
        };
        let transaction = &mut self.transaction;
        let verdict = if !transaction.active {
            ChunkVerdict::NoTransaction
        } else if transaction.accepted == 0 {
            ChunkVerdict::NoRecipients
        } else if transaction.size.saturating_add(size) > context.settings.max_size {
            ChunkVerdict::TooLarge
        } else {
            transaction.via = Some(Via::Bdat);
            ChunkVerdict::Accept
        };
        self.phase = Phase::Chunk(Chunk {
            size,
            remaining: size,
            last,
            verdict,
        });
        if size == 0 {
            self.finish_chunk(context, out);
        }
    }

    /// Reads BDAT chunk octets from `rest`; returns the octets used.
    fn chunk<P: Policy>(
        &mut self,
        context: &mut Context<P>,
        rest: &[u8],
        out: &mut Vec<u8>,
    ) -> usize {
        let Phase::Chunk(mut chunk) = self.phase else {
            unreachable!("chunk() is only called in the BDAT phase")
        };
        if context.settings.drop_during_data {
            self.end = End::Abort;
            return rest.len();
        }
        let used = usize::try_from(chunk.remaining).map_or(rest.len(), |r| r.min(rest.len()));
        chunk.remaining -= used as u64;
        self.phase = Phase::Chunk(chunk);
        if chunk.verdict == ChunkVerdict::Accept {
            self.transaction.size += used as u64;
            if context.settings.keep_content {
                self.transaction.content.extend_from_slice(&rest[..used]);
            }
        }
        if chunk.remaining == 0 {
            self.finish_chunk(context, out);
        }
        used
    }

    /// Answers a BDAT chunk whose octets have all been read.
    fn finish_chunk<P: Policy>(&mut self, context: &mut Context<P>, out: &mut Vec<u8>) {
        let Phase::Chunk(chunk) = self.phase else {
            unreachable!("finish_chunk() is only called in the BDAT phase")
        };
        self.phase = Phase::Command;
        match chunk.verdict {
            ChunkVerdict::NoTransaction => {
                out.extend_from_slice(b"503 5.5.1 Error: need MAIL command\r\n");
            }
            ChunkVerdict::NoRecipients => {
                // RFC 3030 2: a failed chunk fails the transaction (as Postfix's smtpd does):
                // a pipelined MAIL that follows starts a new one.
                out.extend_from_slice(b"554 5.5.1 No valid recipients\r\n");
                self.transaction.clear();
                self.transactions += 1;
            }
            ChunkVerdict::TooLarge => {
                // RFC 3030 2: a failed chunk fails the transaction; the client must not
                // send more chunks for it.
                self.final_reply(
                    context,
                    b"552 5.3.4 Message size exceeds fixed maximum message size\r\n",
                    out,
                );
                self.transaction.clear();
                self.transactions += 1;
            }
            ChunkVerdict::Accept if chunk.last => self.finish_transaction(context, out),
            ChunkVerdict::Accept => {
                append(
                    out,
                    format_args!("250 2.0.0 {} octets received\r\n", chunk.size),
                );
            }
        }
    }

    /// Gives the final reply to a transaction whose content is complete, or waits for it.
    fn finish_transaction<P: Policy>(&mut self, context: &mut Context<P>, out: &mut Vec<u8>) {
        if self.transaction.size > context.settings.max_size {
            self.final_reply(
                context,
                b"552 5.3.4 Message size exceeds fixed maximum message size\r\n",
                out,
            );
        } else {
            match context.policy.message(&self.peer, &mut self.transaction) {
                Verdict::Reply(replies) => out.extend_from_slice(&replies),
                Verdict::Pending => {
                    self.phase = Phase::Waiting;
                    return;
                }
            }
        }
        self.transaction.clear();
        self.transactions += 1;
    }
}

/// Whether DATA content (still dot-stuffed, without the end sequence) holds a line that ends
/// in a bare LF, or a "." line that ends in anything but CRLF: what another server could take
/// for an end of data (SMTP smuggling).
fn smuggling(content: &[u8]) -> bool {
    let mut previous = b'\n';
    let mut at_line_start = true;
    for (i, &octet) in content.iter().enumerate() {
        if octet == b'\n' && previous != b'\r' {
            return true;
        }
        if at_line_start && octet == b'.' && content.get(i + 1) == Some(&b'\r') {
            // A lone "." line inside the content is only possible unstuffed, with a bare CR.
            if content.get(i + 2) != Some(&b'\n') {
                return true;
            }
        }
        at_line_start = octet == b'\n';
        previous = octet;
    }
    false
}

/// Appends a formatted reply.
fn append(out: &mut Vec<u8>, reply: fmt::Arguments<'_>) {
    out.write_fmt(reply).expect("writing to a Vec cannot fail");
}

fn trim_spaces(mut text: &[u8]) -> &[u8] {
    while let [b' ', rest @ ..] = text {
        text = rest;
    }
    while let [rest @ .., b' '] = text {
        text = rest;
    }
    text
}

/// Splits `FROM:<address> parameters` (or `TO:...`) into the address between the angle brackets
/// and the parameters after them (RFC 5321 4.1.2). A space after the colon is tolerated, as most
/// servers do.
fn parse_path<'a>(argument: &'a [u8], keyword: &[u8]) -> Option<(&'a [u8], &'a [u8])> {
    if argument.len() < keyword.len() || !argument[..keyword.len()].eq_ignore_ascii_case(keyword) {
        return None;
    }
    let path = trim_spaces(&argument[keyword.len()..]);
    let inner = path.strip_prefix(b"<")?;
    let close = find_byte(b'>', inner)?;
    let address = &inner[..close];
    if find_byte(b'<', address).is_some() {
        return None;
    }
    let parameters = &inner[close + 1..];
    if !parameters.is_empty() && parameters[0] != b' ' {
        return None;
    }
    Some((address, trim_spaces(parameters)))
}

/// The SIZE= value among MAIL parameters (RFC 1870 3): `Ok(None)` when there is none, `Err`
/// when it is not a number.
fn declared_size(parameters: &[Parameter]) -> Result<Option<u64>, ()> {
    for (keyword, value) in parameters {
        if keyword.eq_ignore_ascii_case("SIZE") {
            return value
                .as_deref()
                .and_then(|v| parse_number(v.as_bytes()))
                .map(Some)
                .ok_or(());
        }
    }
    Ok(None)
}

/// Whether every parameter's keyword is one of `keywords` (the extensions this server offers).
fn known(parameters: &[Parameter], keywords: &[&str]) -> bool {
    parameters
        .iter()
        .all(|(keyword, _)| keywords.iter().any(|k| k.eq_ignore_ascii_case(keyword)))
}

/// `esmtp-param *(SP esmtp-param)` (RFC 5321 4.1.2): a keyword of letters, digits and "-"
/// starting with a letter or digit, and an optional "=" value of printable octets other than
/// "=" and SP (or UTF-8, RFC 6531). `None` on a syntax error.
fn parse_parameters(text: &[u8]) -> Option<Vec<Parameter>> {
    let mut parameters = Vec::new();
    for word in text.split(|&b| b == b' ').filter(|w| !w.is_empty()) {
        let (keyword, value) = match find_byte(b'=', word) {
            Some(i) => (&word[..i], Some(&word[i + 1..])),
            None => (word, None),
        };
        let keyword_ok = keyword.first().is_some_and(u8::is_ascii_alphanumeric)
            && keyword
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'-');
        let value_ok = value.is_none_or(|v| {
            !v.is_empty()
                && v.iter()
                    .all(|&b| (33..=126).contains(&b) && b != b'=' || b >= 0x80)
        });
        if !keyword_ok || !value_ok {
            return None;
        }
        let value = match value {
            Some(v) => Some(String::from_utf8(v.to_vec()).ok()?),
            None => None,
        };
        parameters.push((String::from_utf8_lossy(keyword).into_owned(), value));
    }
    Some(parameters)
}

/// `chunk-size [SP "LAST"]` (RFC 3030 2).
fn parse_bdat(argument: &[u8]) -> Option<(u64, bool)> {
    let mut words = argument
        .split(|&b| b == b' ')
        .filter(|word| !word.is_empty());
    let size = parse_number(words.next()?)?;
    let last = match words.next() {
        None => false,
        Some(word) if word.eq_ignore_ascii_case(b"LAST") => true,
        Some(_) => return None,
    };
    words.next().is_none().then_some((size, last))
}

fn parse_number(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0, |n, &d| n * 10 + u64::from(d - b'0')))
}
