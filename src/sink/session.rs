//! The server side of one SMTP connection: commands in, replies out, no sockets.
//!
//! [`Session::process`] takes every octet that has arrived, answers every complete command in it
//! and appends all the replies to one buffer, which the event loop then writes with one call:
//! that is what makes a pipelining client fast (RFC 2920). Content that is not captured is
//! scanned where it lies and never copied. The scripted [`Faults`](super::Faults) are applied
//! here too, except the reply delay, which needs a clock and so belongs to the loop. STARTTLS is
//! decided here (and the state reset after it), the handshake itself is the loop's. This must
//! not block, sleep or touch the socket; its only IO is the optional capture of accepted
//! messages.

use std::fmt;
use std::io::{self, Write as _};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::capture::{Capture, Envelope, Via};
use super::scan::{find_byte, unstuff, EndOfData};
use super::{Counters, Faults, SinkConfig};

/// Longest command line accepted, CRLF included. RFC 5321 4.5.3.1.4 asks for at least 512;
/// this leaves room for long parameter lists (RFC 5321 4.5.3.1.10: over-long lines get 500).
pub(super) const MAX_LINE: usize = 4096;

/// Replies buffered for a client that does not read them. Above this, [`Session::process`] stops
/// taking input, so a client that pipelines without reading meets TCP backpressure instead of
/// growing the sink's memory.
pub(super) const OUTPUT_HIGH_WATER: usize = 64 * 1024;

/// Whether the connection goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    /// Keep reading commands.
    Open,
    /// Send what is buffered, then close (QUIT, 421).
    Close,
    /// Send what is buffered (the 220 to STARTTLS), then start the TLS handshake: the octets
    /// after the STARTTLS line are not commands and must not be offered again.
    StartTls,
    /// Send what is buffered, then close without answering the content that arrived
    /// (`Faults::drop_during_data`).
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

/// Everything the sessions of one event loop share: configuration, prepared replies and
/// sink-wide counters. Owned by the loop thread, so nothing here needs locking; only the
/// statistics are atomics, because the [`SinkHandle`](super::SinkHandle) reads them.
pub(super) struct Context {
    faults: Faults,
    max_size: u64,
    counters: Arc<Counters>,
    capture: Option<Capture>,
    greeting: Vec<u8>,
    greeting_kind: Greeting,
    /// The EHLO reply before TLS: with STARTTLS when it is offered.
    ehlo_reply: Vec<u8>,
    /// The EHLO reply over TLS: never with STARTTLS (RFC 3207 4.2).
    ehlo_reply_encrypted: Vec<u8>,
    helo_reply: Vec<u8>,
    /// STARTTLS is offered on plaintext connections.
    starttls: bool,
    /// Connections are encrypted from the first octet.
    implicit_tls: bool,
    /// Transactions still to be answered 451 (`Faults::tempfail_first_transactions`).
    tempfails_left: u32,
    /// The next queue id, which is also the capture file number.
    next_queue_id: u64,
}

impl Context {
    /// Prepares the replies that never change; creates the capture directory.
    pub(super) fn new(config: SinkConfig, counters: Arc<Counters>) -> io::Result<Context> {
        let host = &config.hostname;
        let mut greeting = Vec::new();
        let greeting_kind = match &config.faults.greeting {
            None => {
                greeting.extend_from_slice(format!("220 {host} ESMTP mxpipe-sink\r\n").as_bytes());
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
        if let Some(extra) = &config.faults.after_greeting {
            greeting.extend_from_slice(extra);
        }

        let implicit_tls = config.tls.as_ref().is_some_and(|tls| tls.implicit);
        let starttls = config.tls.is_some() && !implicit_tls;
        // RFC 5321 4.1.1.1; the keywords are RFC 2920, 1870, 6152, 3207, 6531, 2034, 3030 and
        // 3461.
        let ehlo_reply_with = |offer_starttls: bool| {
            let mut lines = vec![host.clone()];
            if config.pipelining {
                lines.push("PIPELINING".to_owned());
            }
            lines.push(format!("SIZE {}", config.max_size));
            lines.push("8BITMIME".to_owned());
            if offer_starttls {
                lines.push("STARTTLS".to_owned());
            }
            lines.push("SMTPUTF8".to_owned());
            lines.push("ENHANCEDSTATUSCODES".to_owned());
            if config.chunking {
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
        let ehlo_reply = ehlo_reply_with(starttls);
        let ehlo_reply_encrypted = ehlo_reply_with(false);

        Ok(Context {
            tempfails_left: config.faults.tempfail_first_transactions,
            capture: config.capture_dir.map(Capture::create).transpose()?,
            max_size: config.max_size as u64,
            greeting,
            greeting_kind,
            ehlo_reply,
            ehlo_reply_encrypted,
            helo_reply: format!("250 {host}\r\n").into_bytes(),
            starttls,
            implicit_tls,
            faults: config.faults,
            counters,
            next_queue_id: 1,
        })
    }

    pub(super) fn reply_delay(&self) -> Option<Duration> {
        self.faults.reply_delay
    }

    pub(super) fn max_connections(&self) -> Option<usize> {
        self.faults.max_connections
    }

    pub(super) fn counters(&self) -> &Counters {
        &self.counters
    }
}

/// Where the next octets of input belong.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Command lines.
    Command,
    /// DATA content, up to and including CRLF.CRLF.
    Data(EndOfData),
    /// The octets of a BDAT chunk.
    Chunk(Chunk),
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

/// The mail transaction in progress (RFC 5321 3.3). Addresses and content are kept only when
/// capturing; the buffers are reused from one transaction to the next.
#[derive(Debug, Default)]
struct Transaction {
    active: bool,
    recipients: usize,
    /// Content octets as they arrived (for DATA: stuffed, end sequence excluded once known).
    size: u64,
    via: Option<Via>,
    mail_from: String,
    mail_params: String,
    rcpt_to: Vec<String>,
    content: Vec<u8>,
}

impl Transaction {
    /// RSET, EHLO/HELO and the end of a transaction all forget it (RFC 5321 4.1.1.5).
    fn clear(&mut self) {
        self.active = false;
        self.recipients = 0;
        self.size = 0;
        self.via = None;
        self.mail_from.clear();
        self.mail_params.clear();
        self.rcpt_to.clear();
        self.content.clear();
    }
}

/// One connection's protocol state.
#[derive(Debug)]
pub(super) struct Session {
    phase: Phase,
    end: End,
    refusing: bool,
    greeted: bool,
    /// The connection is encrypted (implicit TLS, or STARTTLS done).
    encrypted: bool,
    /// Inside an over-long line: octets are dropped up to the next LF.
    discarding_line: bool,
    /// Transactions that reached their final reply on this connection.
    transactions: u32,
    transaction: Transaction,
}

impl Session {
    /// A new connection: appends the greeting to `out`.
    pub(super) fn start(context: &Context, out: &mut Vec<u8>) -> Session {
        out.extend_from_slice(&context.greeting);
        let end = if context.greeting_kind == Greeting::Closing {
            End::Close
        } else {
            End::Open
        };
        Session::new(context, end, context.greeting_kind == Greeting::Refusing)
    }

    /// A connection over `Faults::max_connections`: appends a 421 greeting to `out`, and the
    /// session ends once it is sent (RFC 5321 3.8).
    pub(super) fn refuse(context: &Context, out: &mut Vec<u8>) -> Session {
        out.extend_from_slice(b"421 4.7.0 Too many connections, try again later\r\n");
        Session::new(context, End::Close, false)
    }

    fn new(context: &Context, end: End, refusing: bool) -> Session {
        Session {
            phase: Phase::Command,
            end,
            refusing,
            greeted: false,
            encrypted: context.implicit_tls,
            discarding_line: false,
            transactions: 0,
            transaction: Transaction::default(),
        }
    }

    /// The loop has put TLS under the connection after the 220 to STARTTLS. RFC 3207 4.2: the
    /// SMTP state is that after the greeting, and nothing learnt from the client before
    /// (its EHLO, a transaction) counts; the client must say EHLO again.
    pub(super) fn tls_started(&mut self) {
        debug_assert_eq!(self.end, End::StartTls);
        self.end = End::Open;
        self.encrypted = true;
        self.greeted = false;
        self.discarding_line = false;
        self.transaction.clear();
    }

    pub(super) fn end(&self) -> End {
        self.end
    }

    /// Consumes as much of `input` as can be acted on and appends the replies to `out`.
    /// Returns the number of octets consumed; the rest (a partial command line, or anything
    /// after the connection ended or the output filled up) must be offered again.
    pub(super) fn process(
        &mut self,
        context: &mut Context,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> usize {
        let mut consumed = 0;
        while consumed < input.len() && self.end == End::Open && out.len() < OUTPUT_HIGH_WATER {
            let rest = &input[consumed..];
            consumed += match self.phase {
                Phase::Command => match self.command_line(context, rest, out) {
                    Some(used) => used,
                    None => break,
                },
                Phase::Data(_) => self.data(context, rest, out),
                Phase::Chunk(_) => self.chunk(context, rest, out),
            };
        }
        consumed
    }

    /// Handles the first line of `rest`; `None` when it is not complete yet.
    fn command_line(
        &mut self,
        context: &mut Context,
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
            // Bare LF is tolerated as a command terminator; content never gets that leniency.
            let line = rest[..newline]
                .strip_suffix(b"\r")
                .unwrap_or(&rest[..newline]);
            self.command(context, line, out);
        }
        Some(used)
    }

    fn command(&mut self, context: &mut Context, line: &[u8], out: &mut Vec<u8>) {
        let (verb, argument) = match find_byte(b' ', line) {
            Some(space) => (&line[..space], trim_spaces(&line[space + 1..])),
            None => (line, &line[line.len()..]),
        };
        let is = |name: &str| verb.eq_ignore_ascii_case(name.as_bytes());

        if let Some(limit) = context.faults.close_after_transactions {
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

        if is("EHLO") {
            if context.faults.no_ehlo {
                out.extend_from_slice(b"502 5.5.2 Command not recognized\r\n");
            } else if argument.is_empty() {
                out.extend_from_slice(b"501 5.5.4 Syntax: EHLO hostname\r\n");
            } else {
                self.transaction.clear();
                self.greeted = true;
                out.extend_from_slice(if self.encrypted {
                    &context.ehlo_reply_encrypted
                } else {
                    &context.ehlo_reply
                });
            }
        } else if is("HELO") {
            if argument.is_empty() {
                out.extend_from_slice(b"501 5.5.4 Syntax: HELO hostname\r\n");
            } else {
                self.transaction.clear();
                self.greeted = true;
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
        } else if is("STARTTLS") && (self.encrypted || context.starttls) {
            self.starttls(argument, out);
        } else {
            out.extend_from_slice(b"502 5.5.2 Command not recognized\r\n");
        }
    }

    /// STARTTLS on a connection that offers it or is already encrypted (RFC 3207 4).
    fn starttls(&mut self, argument: &[u8], out: &mut Vec<u8>) {
        if self.encrypted {
            out.extend_from_slice(b"503 5.5.1 Error: TLS already active\r\n");
        } else if !argument.is_empty() {
            // RFC 3207 4: STARTTLS takes no parameters.
            out.extend_from_slice(b"501 5.5.4 Syntax: STARTTLS\r\n");
        } else {
            out.extend_from_slice(b"220 2.0.0 Ready to start TLS\r\n");
            self.end = End::StartTls;
        }
    }

    fn mail(&mut self, context: &Context, argument: &[u8], out: &mut Vec<u8>) {
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
        match declared_size(parameters) {
            Err(()) => {
                out.extend_from_slice(b"501 5.5.4 Bad SIZE parameter\r\n");
                return;
            }
            // RFC 1870 6.1: a declared size above the limit is refused at MAIL.
            Ok(Some(size)) if size > context.max_size => {
                out.extend_from_slice(
                    b"552 5.3.4 Message size exceeds fixed maximum message size\r\n",
                );
                return;
            }
            Ok(_) => {}
        }
        let transaction = &mut self.transaction;
        transaction.active = true;
        if context.capture.is_some() {
            transaction
                .mail_from
                .push_str(&String::from_utf8_lossy(address));
            transaction
                .mail_params
                .push_str(&String::from_utf8_lossy(parameters));
        }
        out.extend_from_slice(b"250 2.1.0 Ok\r\n");
    }

    fn rcpt(&mut self, context: &Context, argument: &[u8], out: &mut Vec<u8>) {
        if !self.transaction.active {
            out.extend_from_slice(b"503 5.5.1 Error: need MAIL command\r\n");
            return;
        }
        let address = match parse_path(argument, b"TO:") {
            Some((address, _)) if !address.is_empty() => address,
            _ => {
                out.extend_from_slice(b"501 5.5.4 Syntax: RCPT TO:<address>\r\n");
                return;
            }
        };
        let faults = &context.faults;
        let matches = |patterns: &[String]| {
            patterns
                .iter()
                .any(|pattern| contains(address, pattern.as_bytes()))
        };
        let refused = if faults
            .max_recipients
            .is_some_and(|max| self.transaction.recipients >= max)
        {
            // RFC 5321 4.5.3.1.10: 452 for too many recipients.
            out.extend_from_slice(b"452 4.5.3 Too many recipients\r\n");
            true
        } else if matches(&faults.reject_rcpt) {
            let address = String::from_utf8_lossy(address);
            append(
                out,
                format_args!("550 5.1.1 <{address}>: Recipient address rejected: User unknown\r\n"),
            );
            true
        } else if matches(&faults.tempfail_rcpt) {
            let address = String::from_utf8_lossy(address);
            append(
                out,
                format_args!("450 4.2.1 <{address}>: Mailbox busy, try again later\r\n"),
            );
            true
        } else {
            false
        };
        if refused {
            context
                .counters
                .rejected_recipients
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.transaction.recipients += 1;
        if context.capture.is_some() {
            self.transaction
                .rcpt_to
                .push(String::from_utf8_lossy(address).into_owned());
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
        } else if transaction.recipients == 0 {
            // RFC 2920 3.1: the answer to DATA after every RCPT failed.
            out.extend_from_slice(b"554 5.5.1 No valid recipients\r\n");
        } else {
            transaction.via = Some(Via::Data);
            self.phase = Phase::Data(EndOfData::after_data_command());
            out.extend_from_slice(b"354 End data with <CR><LF>.<CR><LF>\r\n");
        }
    }

    /// Reads DATA content from `rest`; returns the octets used.
    fn data(&mut self, context: &mut Context, rest: &[u8], out: &mut Vec<u8>) -> usize {
        let Phase::Data(mut scanner) = self.phase else {
            unreachable!("data() is only called in the DATA phase")
        };
        if context.faults.drop_during_data {
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
        if context.capture.is_some() && transaction.size <= context.max_size + 3 {
            transaction.content.extend_from_slice(&rest[..used]);
        }
        if end.is_some() {
            // The final ".CRLF" is not content; the CRLF before it is (RFC 5321 4.1.1.4).
            transaction.size -= 3;
            let kept = transaction.content.len().saturating_sub(3);
            transaction.content.truncate(kept);
            unstuff(&mut transaction.content);
            self.phase = Phase::Command;
            self.finish_transaction(context, out);
        }
        used
    }

    fn bdat_command(&mut self, context: &mut Context, argument: &[u8], out: &mut Vec<u8>) {
        let Some((size, last)) = parse_bdat(argument) else {
            // The chunk size is unknown, so the octets that follow cannot be skipped: they will
            // be read as commands, as any server must.
            out.extend_from_slice(b"501 5.5.4 Syntax: BDAT size [LAST]\r\n");
            return;
        };
        let transaction = &mut self.transaction;
        let verdict = if !transaction.active {
            ChunkVerdict::NoTransaction
        } else if transaction.recipients == 0 {
            ChunkVerdict::NoRecipients
        } else if transaction.size.saturating_add(size) > context.max_size {
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
    fn chunk(&mut self, context: &mut Context, rest: &[u8], out: &mut Vec<u8>) -> usize {
        let Phase::Chunk(mut chunk) = self.phase else {
            unreachable!("chunk() is only called in the BDAT phase")
        };
        if context.faults.drop_during_data {
            self.end = End::Abort;
            return rest.len();
        }
        let used = usize::try_from(chunk.remaining).map_or(rest.len(), |r| r.min(rest.len()));
        chunk.remaining -= used as u64;
        self.phase = Phase::Chunk(chunk);
        if chunk.verdict == ChunkVerdict::Accept {
            self.transaction.size += used as u64;
            if context.capture.is_some() {
                self.transaction.content.extend_from_slice(&rest[..used]);
            }
        }
        if chunk.remaining == 0 {
            self.finish_chunk(context, out);
        }
        used
    }

    /// Answers a BDAT chunk whose octets have all been read.
    fn finish_chunk(&mut self, context: &mut Context, out: &mut Vec<u8>) {
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
                out.extend_from_slice(
                    b"552 5.3.4 Message size exceeds fixed maximum message size\r\n",
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

    /// Gives the final reply to a transaction whose content is complete.
    fn finish_transaction(&mut self, context: &mut Context, out: &mut Vec<u8>) {
        let transaction = &mut self.transaction;
        if transaction.size > context.max_size {
            out.extend_from_slice(b"552 5.3.4 Message size exceeds fixed maximum message size\r\n");
        } else if context.tempfails_left > 0 {
            context.tempfails_left -= 1;
            out.extend_from_slice(b"451 4.3.0 Temporary failure, try again\r\n");
        } else {
            let id = context.next_queue_id;
            context.next_queue_id += 1;
            let stored = match &context.capture {
                Some(capture) => capture.store(
                    id,
                    &Envelope {
                        mail_from: &transaction.mail_from,
                        rcpt_to: &transaction.rcpt_to,
                        mail_params: &transaction.mail_params,
                        via: transaction.via.unwrap_or(Via::Data),
                    },
                    &transaction.content,
                ),
                None => Ok(()),
            };
            if stored.is_ok() {
                let counters = &context.counters;
                counters.messages.fetch_add(1, Ordering::Relaxed);
                counters
                    .recipients
                    .fetch_add(transaction.recipients as u64, Ordering::Relaxed);
                counters
                    .bytes
                    .fetch_add(transaction.size, Ordering::Relaxed);
                append(out, format_args!("250 2.0.0 Ok: queued as {id:08}\r\n"));
            } else {
                // Not stored means not accepted: the client must keep the message.
                out.extend_from_slice(b"451 4.3.0 Error: could not store message\r\n");
            }
        }
        transaction.clear();
        self.transactions += 1;
    }
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
fn declared_size(parameters: &[u8]) -> Result<Option<u64>, ()> {
    for parameter in parameters.split(|&b| b == b' ') {
        if parameter.len() > 5 && parameter[..5].eq_ignore_ascii_case(b"SIZE=") {
            return parse_number(&parameter[5..]).map(Some).ok_or(());
        }
    }
    Ok(None)
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

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty()
        || haystack
            .windows(needle.len())
            .any(|window| window == needle)
}
