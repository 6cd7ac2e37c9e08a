//! The SMTP client state machine for one connection, sans-IO: no sockets, no clocks, no threads.
//!
//! Inputs are bytes from the server ([`Session::handle_input`]), the passing of time
//! ([`Session::handle_timeout`]), the loss of the connection ([`Session::handle_close`]) and
//! work ([`Session::start_transaction`], [`Session::quit`]). Outputs are bytes to write
//! ([`Session::output_slices`]), the next deadline ([`Session::deadline`]) and events
//! ([`Session::poll_event`]).
//!
//! Pipelining (RFC 2920) is two cursors over the commands: `unsent` holds what is queued but not
//! yet written, `pending` what was written and awaits its reply. Replies are matched to
//! `pending` strictly in order. The client only waits where RFC 2920 3.1 says it must: for the
//! greeting, after EHLO, and after DATA (for 354). With CHUNKING and PIPELINING, MAIL, every
//! RCPT, `BDAT <n> LAST` and the content go out together and further transactions follow right
//! behind, up to a window: the chunk length is explicit, so content after a refused recipient
//! list can never be read as commands, and RFC 3030 2 has a pipelining server discard chunks
//! after a failure (a transaction whose recipients were all refused expects the BDAT to fail).
//! With the window at 0, or a destination that showed it cannot take this, BDAT content waits
//! for the RCPT replies so that no content is sent when every recipient was refused. A reply
//! that fits no command closes the session; nothing is counted as delivered on a guess.

use super::auth::{Credentials, Mechanism};
use super::caps::Capabilities;
use super::command::{self, MailParams};
use super::output::Output;
use super::reply::{EnhancedCode, Reply, ReplyError, ReplyLimits, ReplyParser};
use super::window::BdatWindow;
use crate::message::dsn::DsnEnvelope;
use crate::message::{Address, Body};
use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long to wait for each reply. RFC 5321 4.5.3.2 gives minimums for patient servers
/// (5 minutes for most commands, 10 after the end of data); a bulk sender uses shorter ones and
/// retries later instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// The engine's: from connect() to a connected socket.
    pub connect: Duration,
    /// From connection to the 220 greeting.
    pub greeting: Duration,
    /// Each of EHLO, HELO, RSET, MAIL, RCPT, DATA, QUIT.
    pub command: Duration,
    /// From the end of the content (final dot or BDAT LAST) to its reply.
    pub data_end: Duration,
    /// From the start of a TLS handshake (after STARTTLS's 220, or on connect for implicit
    /// TLS) to its end.
    pub tls_handshake: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(30),
            greeting: Duration::from_secs(60),
            command: Duration::from_secs(60),
            data_end: Duration::from_secs(180),
            tls_handshake: Duration::from_secs(30),
        }
    }
}

/// When to upgrade a plaintext connection with STARTTLS (RFC 3207).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartTls {
    /// Never.
    Disabled,
    /// When the server offers it; carry on in plaintext when it does not.
    #[default]
    Opportunistic,
    /// Always: a server without STARTTLS, or a refused STARTTLS, fails the session and no
    /// MAIL is ever sent in plaintext.
    Required,
}

/// Settings shared by every session of a dispatcher.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The name sent in EHLO/HELO: a domain, or an address literal such as `[127.0.0.1]`.
    pub ehlo_name: String,
    pub timeouts: Timeouts,
    pub reply_limits: ReplyLimits,
    /// Use BDAT when the server offers CHUNKING (RFC 3030).
    pub use_chunking: bool,
    /// With CHUNKING and PIPELINING: at most how many transactions may be in flight on a
    /// connection, each written whole (MAIL, RCPTs, BDAT LAST, content) without waiting for
    /// the RCPT replies. The window starts at four and adapts up to this (see `window.rs`):
    /// it grows while the server keeps up and shrinks when its replies lag or it fails
    /// temporarily. 0: BDAT content waits for the RCPT replies (one transaction behind
    /// another).
    pub bdat_window: usize,
    /// With a BDAT window: at most this many content octets in flight on a connection (a
    /// single larger message still goes, alone).
    pub bdat_window_bytes: usize,
    /// A connection idle for longer than this gets an RSET first when reused, so that a server
    /// that dropped it costs nothing but a retry on a new connection.
    pub probe_after_idle: Duration,
    pub starttls: StartTls,
    /// Log in with these after EHLO (RFC 4954).
    pub credentials: Option<Credentials>,
    /// Allow AUTH on a connection without TLS or with TLS whose certificate was not verified
    /// (off: credentials cross only over verified TLS).
    pub allow_plaintext_auth: bool,
    /// Keep the text of the reply that accepted the content (a server's queue id, say) in each
    /// delivered recipient's result. Off: delivered results carry an empty text, which saves
    /// a copy and an allocation per message for a caller that never reads it.
    pub delivery_reply_text: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            ehlo_name: "localhost".into(),
            timeouts: Timeouts::default(),
            reply_limits: ReplyLimits::default(),
            use_chunking: true,
            // A deep window halves the cost per message against mxpipe's own sink, but against
            // Postfix smtpd (which answers a pipelined burst only once it has read it all) a
            // fixed 32 was measured at 0.7x the unpipelined rate with 20 connections: the
            // window adapts below this.
            bdat_window: 32,
            bdat_window_bytes: 1 << 20,
            probe_after_idle: Duration::from_secs(2),
            starttls: StartTls::default(),
            credentials: None,
            allow_plaintext_auth: false,
            delivery_reply_text: true,
        }
    }
}

/// One mail transaction: a sender, the recipients it carries, and the shared body.
#[derive(Debug, Clone)]
pub struct Transaction {
    /// The engine's identifier, returned with the outcome.
    pub tag: u64,
    pub sender: Address,
    pub recipients: Vec<Address>,
    pub body: Arc<Body>,
    /// RET, ENVID, NOTIFY and ORCPT, sent only to a server that offers DSN (RFC 3461 4).
    pub dsn: Option<Arc<DsnEnvelope>>,
}

/// How one recipient of a transaction fared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptResult {
    /// The server took responsibility for the message (2xx after the content).
    Delivered(Reply),
    /// The server refused, or the attempt failed; `permanent` is a 5xx or a local decision that
    /// retrying cannot change. A reply with code 0 was made by the client (no server reply).
    Failed { reply: Reply, permanent: bool },
    /// Not attempted in this transaction ("too many recipients", or a reused connection that
    /// turned out to be dead): submit again without counting an attempt.
    Retry(Reply),
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closure {
    /// The reply that ended it, or a client-made one (code 0) for timeouts and errors.
    pub reply: Reply,
    /// Greeting and EHLO/HELO had succeeded.
    pub established: bool,
    /// Ended by QUIT as planned.
    pub graceful: bool,
    /// The session broke (a reply out of order, the connection lost, a timeout) while
    /// pipelined BDAT transactions were in flight: the destination may not handle them.
    pub pipelined_bdat_failed: bool,
}

/// Something the engine must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// A transaction has ended: one result per recipient, in the transaction's order.
    TransactionDone { tag: u64, results: Vec<RcptResult> },
    /// The server agreed to STARTTLS: the engine runs the TLS handshake on this connection,
    /// then calls [`Session::tls_established`] or [`Session::tls_failed`].
    StartTls,
    /// The session is over; the engine closes the socket and never reuses it.
    Closed(Closure),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    TlsHandshake,
    Auth,
    Ready,
    Quitting,
    Closed,
}

/// A command written or queued, and what its reply means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Greeting,
    Ehlo,
    Helo,
    Rset { probe: bool },
    StartTls,
    Auth { step: u8 },
    Mail { txn: u32 },
    Rcpt { txn: u32, index: u32 },
    Data { txn: u32 },
    DataEnd { txn: u32 },
    Bdat { txn: u32 },
    Quit,
}

impl Expect {
    /// RFC 2920 3.1: these end a group; nothing may follow until their reply is in.
    fn ends_group(self) -> bool {
        matches!(
            self,
            Expect::Greeting
                | Expect::Ehlo
                | Expect::Helo
                | Expect::StartTls
                | Expect::Auth { .. }
                | Expect::Data { .. }
                | Expect::Quit
        )
    }

    fn txn(self) -> Option<u32> {
        match self {
            Expect::Mail { txn }
            | Expect::Rcpt { txn, .. }
            | Expect::Data { txn }
            | Expect::DataEnd { txn }
            | Expect::Bdat { txn } => Some(txn),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Expect::Greeting => "greeting",
            Expect::Ehlo => "EHLO",
            Expect::Helo => "HELO",
            Expect::Rset { .. } => "RSET",
            Expect::StartTls => "STARTTLS",
            Expect::Auth { .. } => "AUTH",
            Expect::Mail { .. } => "MAIL FROM",
            Expect::Rcpt { .. } => "RCPT TO",
            Expect::Data { .. } => "DATA",
            Expect::DataEnd { .. } => "end of data",
            Expect::Bdat { .. } => "BDAT",
            Expect::Quit => "QUIT",
        }
    }
}

#[derive(Debug)]
struct TxnState {
    id: u32,
    txn: Transaction,
    bdat: bool,
    /// Pipelined BDAT: the content went out with the envelope, before any reply.
    eager: bool,
    /// When pipelined BDAT content was written, for the window's latency.
    sent_at: Option<Instant>,
    /// `None` until answered; a refused MAIL decides every recipient.
    mail: Option<Result<(), Reply>>,
    results: Vec<Option<RcptResult>>,
    rcpt_answered: usize,
    accepted: usize,
    content_sent: bool,
    /// The transaction can no longer deliver (MAIL refused, no recipient accepted, DATA
    /// refused); remaining replies only keep the stream in sync.
    doomed: bool,
}

impl TxnState {
    /// Gives every recipient that has no result yet this one.
    fn settle_rest(&mut self, result: impl Fn() -> RcptResult) {
        for r in &mut self.results {
            if r.is_none() {
                *r = Some(result());
            }
        }
    }

    /// The recipients accepted at RCPT all get the reply to the content.
    /// The last of them gets `reply` itself, the others a copy.
    fn settle_accepted(&mut self, reply: Reply) {
        let permanent = reply.is_permanent();
        let positive = reply.is_positive();
        let outcome = |reply| {
            Some(if positive {
                RcptResult::Delivered(reply)
            } else {
                RcptResult::Failed { reply, permanent }
            })
        };
        let provisional = |r: &Option<RcptResult>| matches!(r, Some(RcptResult::Delivered(_)));
        let Some(last) = self.results.iter().rposition(provisional) else {
            return;
        };
        for r in self.results[..last].iter_mut().filter(|r| provisional(r)) {
            *r = outcome(reply.clone());
        }
        self.results[last] = outcome(reply);
    }
}

/// One SMTP client session.
#[derive(Debug)]
pub struct Session {
    config: Arc<SessionConfig>,
    phase: Phase,
    caps: Capabilities,
    parser: ReplyParser,
    replies: VecDeque<Reply>,
    out: Output,
    unsent: VecDeque<Expect>,
    pending: VecDeque<Expect>,
    txns: VecDeque<TxnState>,
    next_txn: u32,
    events: VecDeque<SessionEvent>,
    deadline: Option<Instant>,
    last_activity: Instant,
    transactions_started: u32,
    established: bool,
    tls_active: bool,
    /// The TLS layer checks the server's certificate: the handshake completes only when it
    /// is valid. AUTH needs it (or `allow_plaintext_auth`).
    certificate_verified: bool,
    /// Implicit TLS: the handshake runs before the greeting, under the handshake timeout.
    implicit_handshake: bool,
    starttls_forbidden: bool,
    /// The destination showed it cannot take pipelined BDAT: content waits for RCPT replies.
    pipelined_bdat_forbidden: bool,
    /// Set when the session breaks with pipelined BDAT in flight, or gets out of step after
    /// using it; reported in the closure.
    pipelined_bdat_failed: bool,
    /// Pipelined BDAT was written on this connection.
    pipelined_bdat_sent: bool,
    /// How many pipelined BDAT transactions may be in flight now.
    bdat_window: BdatWindow,
    mechanism: Option<Mechanism>,
    /// Result and recipient lists of finished transactions, emptied, for the next ones: a
    /// bulk send makes no allocation per transaction for them (see `recycle_results`).
    spare_results: Vec<Vec<Option<RcptResult>>>,
    spare_recipients: Vec<Vec<Address>>,
    /// Why the session is ending when it failed while still in sync with the server: QUIT is
    /// sent first (RFC 5321 4.1.1.10), and the closure reports this, not the reply to QUIT.
    quit_reason: Option<Reply>,
}

/// Emptied result and recipient lists a session keeps for later transactions, at most (a
/// window's worth, so that a connection's spare memory stays small).
const SPARE_BUFFERS: usize = 64;

fn local_reply(code_class: u8, subject: u16, detail: u16, text: impl Into<String>) -> Reply {
    Reply::new(
        0,
        Some(EnhancedCode::new(code_class, subject, detail)),
        text,
    )
}

impl Session {
    /// A session for a connection that has just been established; it waits for the greeting.
    pub fn new(config: Arc<SessionConfig>, now: Instant) -> Self {
        let parser = ReplyParser::new(config.reply_limits);
        let bdat_window = BdatWindow::new(config.bdat_window);
        let deadline = Some(now + config.timeouts.greeting);
        let mut pending = VecDeque::with_capacity(8);
        pending.push_back(Expect::Greeting);
        Session {
            config,
            phase: Phase::Greeting,
            caps: Capabilities::default(),
            parser,
            replies: VecDeque::new(),
            out: Output::with_capacity(512),
            unsent: VecDeque::with_capacity(8),
            pending,
            txns: VecDeque::with_capacity(2),
            next_txn: 0,
            events: VecDeque::new(),
            deadline,
            last_activity: now,
            transactions_started: 0,
            established: false,
            tls_active: false,
            certificate_verified: false,
            implicit_handshake: false,
            starttls_forbidden: false,
            pipelined_bdat_forbidden: false,
            pipelined_bdat_failed: false,
            pipelined_bdat_sent: false,
            bdat_window,
            mechanism: None,
            spare_results: Vec::new(),
            spare_recipients: Vec::new(),
            quit_reason: None,
        }
    }

    /// The connection is already encrypted (implicit TLS, RFC 8314): no STARTTLS. The
    /// handshake comes first, under the TLS handshake timeout; the greeting's starts when
    /// [`Session::tls_established`] is called.
    pub fn set_implicit_tls(&mut self, now: Instant) {
        self.tls_active = true;
        self.implicit_handshake = true;
        self.deadline = Some(now + self.config.timeouts.tls_handshake);
    }

    /// The engine's TLS layer for this connection verifies the server's certificate (the
    /// handshake fails otherwise). Without this, AUTH is not sent over the TLS session.
    pub fn set_certificate_verified(&mut self) {
        self.certificate_verified = true;
    }

    /// The server accepted STARTTLS and the engine must run the handshake now.
    pub fn is_tls_handshake(&self) -> bool {
        self.phase == Phase::TlsHandshake
    }

    /// Do not use STARTTLS on this connection even when offered (a destination whose TLS
    /// failed under the opportunistic policy is tried in plaintext).
    /// The destination showed it cannot take pipelined BDAT (a desync or a reset with it in
    /// flight): BDAT content waits for the RCPT replies on this connection.
    pub fn forbid_pipelined_bdat(&mut self) {
        self.pipelined_bdat_forbidden = true;
    }

    /// Transactions go out whole (MAIL, RCPTs, BDAT LAST, content) without waiting for
    /// replies: the server offers CHUNKING and PIPELINING and nothing forbids it.
    fn pipelined_bdat(&self) -> bool {
        self.config.use_chunking
            && self.config.bdat_window > 0
            && self.caps.chunking
            && self.caps.pipelining
            && !self.pipelined_bdat_forbidden
    }

    pub fn forbid_starttls(&mut self) {
        self.starttls_forbidden = true;
    }

    /// The connection is encrypted (implicit TLS, or STARTTLS completed).
    pub fn is_tls(&self) -> bool {
        self.tls_active
    }

    /// The TLS handshake after STARTTLS completed. RFC 3207 4.2: everything learnt before is
    /// forgotten, anything the server sent before the handshake is discarded (the reply
    /// injection of CVE-2011-0411), and EHLO is sent again.
    pub fn tls_established(&mut self, now: Instant) {
        if self.implicit_handshake {
            self.implicit_handshake = false;
            self.deadline = Some(now + self.config.timeouts.greeting);
            return;
        }
        if self.phase != Phase::TlsHandshake {
            return;
        }
        self.tls_active = true;
        self.parser.clear();
        self.replies.clear();
        self.caps = Capabilities::default();
        self.phase = Phase::Ehlo;
        self.unsent.push_back(Expect::Ehlo);
        self.pump(now);
    }

    /// The TLS handshake failed (a certificate that does not verify, a protocol error, or
    /// the handshake timed out); `why` says which.
    pub fn tls_failed(&mut self, why: &str) {
        if self.phase != Phase::Closed {
            self.fail(local_reply(4, 7, 5, format!("TLS handshake failed: {why}")));
        }
    }

    /// What the server announced in its last EHLO reply.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// Fills `slices` with the next pieces of what is waiting to be written, in order, for
    /// one vectored write; returns how many it filled (fewer than fit only when that is all).
    /// Message content is not copied into a buffer of the session: its pieces point into the
    /// shared body.
    pub fn output_slices<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        self.out.slices(slices)
    }

    /// Nothing is waiting to be written.
    pub fn output_is_empty(&self) -> bool {
        self.out.is_empty()
    }

    /// Octets waiting to be written.
    pub fn output_len(&self) -> usize {
        self.out.len()
    }

    /// The engine wrote `n` octets of what [`Session::output_slices`] gave.
    pub fn consume_output(&mut self, n: usize) {
        self.out.consume(n);
    }

    /// When [`Session::handle_timeout`] must be called, if a reply is awaited.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// Greeting and EHLO/HELO are done.
    pub fn is_established(&self) -> bool {
        self.established
    }

    /// Ready for a transaction with nothing in flight.
    pub fn is_idle(&self) -> bool {
        self.phase == Phase::Ready && self.txns.is_empty() && self.pending.is_empty()
    }

    /// A transaction may be started now. With PIPELINING, the next transaction's envelope may
    /// follow the previous one's content in the same write (RFC 2920 3.1).
    pub fn can_accept(&self) -> bool {
        if self.phase != Phase::Ready {
            return false;
        }
        if !self.txns.iter().all(|t| t.content_sent || t.doomed) {
            return false;
        }
        if self.pipelined_bdat() {
            let in_flight: usize = self.txns.iter().map(|t| t.txn.body.len()).sum();
            self.txns.is_empty()
                || (self.txns.len() < self.bdat_window.current()
                    && in_flight < self.config.bdat_window_bytes)
        } else if self.caps.pipelining {
            self.txns.len() < 2
        } else {
            self.txns.is_empty()
        }
    }

    /// Gives back the results of a finished transaction ([`SessionEvent::TransactionDone`]),
    /// emptied or not, so that their memory serves a later transaction. Optional: it saves a
    /// bulk sender an allocation per transaction.
    pub fn recycle_results(&mut self, mut results: Vec<RcptResult>) {
        if self.spare_results.len() < SPARE_BUFFERS && results.capacity() > 0 {
            results.clear();
            // The same layout: collected in place, the allocation kept.
            self.spare_results
                .push(results.into_iter().map(Some).collect());
        }
    }

    /// An empty recipient list for the next [`Transaction`], with the room of a finished
    /// transaction's when there is one: a bulk sender saves an allocation per transaction.
    pub fn recipient_buffer(&mut self) -> Vec<Address> {
        self.spare_recipients.pop().unwrap_or_default()
    }

    /// Transactions started on this connection so far.
    pub fn transactions_started(&self) -> u32 {
        self.transactions_started
    }

    /// Starts a transaction; [`Session::can_accept`] must be true. Transactions the server
    /// cannot take (too large for its SIZE, 8-bit or UTF-8 content it does not support) end at
    /// once with a permanent result, and nothing reaches the wire.
    pub fn start_transaction(&mut self, txn: Transaction, now: Instant) {
        debug_assert!(self.can_accept());
        if let Some(reply) = self.refusal(&txn) {
            let results = txn
                .recipients
                .iter()
                .map(|_| RcptResult::Failed {
                    reply: reply.clone(),
                    permanent: true,
                })
                .collect();
            self.events.push_back(SessionEvent::TransactionDone {
                tag: txn.tag,
                results,
            });
            return;
        }
        let id = self.next_txn;
        self.next_txn = self.next_txn.wrapping_add(1);
        if self.transactions_started > 0
            && self.txns.is_empty()
            && self.pending.is_empty()
            && now.duration_since(self.last_activity) > self.config.probe_after_idle
        {
            self.unsent.push_back(Expect::Rset { probe: true });
        }
        self.transactions_started += 1;
        let bdat = self.config.use_chunking && self.caps.chunking;
        let eager = bdat && self.pipelined_bdat();
        self.unsent.push_back(Expect::Mail { txn: id });
        for index in 0..txn.recipients.len() as u32 {
            self.unsent.push_back(Expect::Rcpt { txn: id, index });
        }
        if eager {
            self.unsent.push_back(Expect::Bdat { txn: id });
        } else if !bdat {
            self.unsent.push_back(Expect::Data { txn: id });
        }
        let n = txn.recipients.len();
        let mut results = self.spare_results.pop().unwrap_or_default();
        results.resize(n, None);
        self.txns.push_back(TxnState {
            id,
            txn,
            bdat,
            eager,
            sent_at: None,
            mail: None,
            results,
            rcpt_answered: 0,
            accepted: 0,
            content_sent: false,
            doomed: false,
        });
        if eager && self.txns.len() >= self.bdat_window.current() {
            self.bdat_window.note_full();
        }
        self.pump(now);
    }

    /// Ends the session politely: QUIT once nothing is in flight (RFC 5321 4.1.1.10).
    pub fn quit(&mut self, now: Instant) {
        match self.phase {
            Phase::Closed | Phase::Quitting => {}
            Phase::Ready if self.txns.is_empty() => {
                self.phase = Phase::Quitting;
                self.unsent.push_back(Expect::Quit);
                self.pump(now);
            }
            _ => {
                // Mid-handshake or mid-transaction: just close; in-flight work is retried.
                self.fail(local_reply(4, 4, 2, "session ended by the client"));
            }
        }
    }

    /// Bytes arrived from the server.
    pub fn handle_input(&mut self, data: &[u8], now: Instant) {
        if self.phase == Phase::Closed {
            return;
        }
        if self.phase == Phase::TlsHandshake {
            // Plaintext after the 220 to STARTTLS: not to be trusted, never acted on.
            return;
        }
        self.last_activity = now;
        // Only commands written before these bytes arrived can be answered by them; a reply
        // beyond that was sent before the server saw its command (a spoofed or injected one).
        let mut answerable = self.pending.len();
        let mut replies = std::mem::take(&mut self.replies);
        // Texts never reported are not copied: of a positive reply to MAIL or RCPT (an
        // accepted recipient's outcome is the reply to the content), of the 354 to DATA, and
        // of the reply accepting the content when the caller does not want it.
        let pending = &self.pending;
        let delivery_text = self.config.delivery_reply_text;
        let parsed = self
            .parser
            .feed_with(data, &mut replies, |n, code| match pending.get(n) {
                Some(Expect::Mail { .. } | Expect::Rcpt { .. }) => code / 100 != 2,
                Some(Expect::Data { .. }) => code != 354,
                Some(Expect::Bdat { .. } | Expect::DataEnd { .. }) => {
                    code / 100 != 2 || delivery_text
                }
                _ => true,
            });
        while let Some(reply) = replies.pop_front() {
            if answerable == 0 {
                replies.clear();
                self.protocol_error_text(format!(
                    "reply arrived before its command was sent: {reply}"
                ));
                break;
            }
            answerable -= 1;
            if answerable == 0 && reply.code == 354 {
                if let Some(Expect::Data { txn }) = self.pending.front().copied() {
                    let premature = replies.front().is_some_and(|r| r.code >= 400);
                    if premature {
                        let refusal = replies.pop_front().expect("a reply follows the 354");
                        replies.clear();
                        self.premature_refusal(txn, refusal);
                        break;
                    }
                }
            }
            self.handle_reply(reply, now);
            if self.phase == Phase::Closed {
                replies.clear();
                break;
            }
            if self.phase == Phase::TlsHandshake {
                // RFC 3207 4.2 / CVE-2011-0411: whatever followed the 220 in the same
                // packet came before the handshake and is discarded.
                replies.clear();
                self.parser.clear();
                self.replies = replies;
                return;
            }
        }
        self.replies = replies;
        if let Err(e) = parsed {
            self.protocol_error(e);
        }
    }

    /// The connection was closed by the peer or failed.
    pub fn handle_close(&mut self, why: &str) {
        if self.phase == Phase::Closed {
            return;
        }
        if self.phase == Phase::Quitting {
            // The server may close without answering QUIT; nothing was in flight.
            self.close(Reply::new(221, None, "closed after QUIT"), true);
            return;
        }
        let waiting_for = self.pending.front().copied();
        let name = waiting_for.map_or("nothing", |e| e.name());
        let reply = local_reply(
            4,
            4,
            2,
            format!("connection lost while waiting for reply to {name}: {why}"),
        );
        self.note_pipelined_bdat_failure();
        if waiting_for == Some(Expect::Rset { probe: true }) {
            // The reused connection had died while idle: nothing was attempted.
            self.fail_with_retry(reply);
        } else {
            self.fail(reply);
        }
    }

    /// Time has passed; if the awaited reply is overdue, the session fails.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.deadline {
            Some(deadline)
                if now >= deadline
                    && (self.phase == Phase::TlsHandshake || self.implicit_handshake) =>
            {
                let limit = self.config.timeouts.tls_handshake;
                self.tls_failed(&format!("timed out after {limit:?}"));
            }
            Some(deadline) if now >= deadline && self.phase != Phase::Closed => {
                let waiting_for = self.pending.front().copied();
                let name = waiting_for.map_or("nothing", |e| e.name());
                let reply = local_reply(4, 4, 2, format!("timed out waiting for reply to {name}"));
                self.note_pipelined_bdat_failure();
                if waiting_for == Some(Expect::Rset { probe: true }) {
                    // A reused connection whose peer went silent while idle: the connection
                    // failed, not the transactions queued behind the probe.
                    self.fail_with_retry(reply);
                } else {
                    self.fail(reply);
                }
            }
            _ => {}
        }
    }

    fn refusal(&self, txn: &Transaction) -> Option<Reply> {
        let size = txn.body.len() as u64;
        if let Some(limit) = self.caps.size_limit() {
            if size > limit {
                return Some(local_reply(
                    5,
                    3,
                    4,
                    format!("message is {size} octets; the server accepts at most {limit} (SIZE)"),
                ));
            }
        }
        if txn.body.is_eight_bit() && !self.caps.eight_bit_mime {
            return Some(local_reply(
                5,
                6,
                3,
                "message has 8-bit content and the server does not offer 8BITMIME",
            ));
        }
        let utf8 =
            txn.sender.needs_smtputf8() || txn.recipients.iter().any(Address::needs_smtputf8);
        if utf8 && !self.caps.smtputf8 {
            return Some(local_reply(
                5,
                6,
                7,
                "non-ASCII address and the server does not offer SMTPUTF8",
            ));
        }
        None
    }

    /// Moves commands from `unsent` to the wire while RFC 2920 allows it.
    fn pump(&mut self, now: Instant) {
        while let Some(&next) = self.unsent.front() {
            if let Some(&last) = self.pending.back() {
                if !self.caps.pipelining || last.ends_group() {
                    break;
                }
            }
            self.unsent.pop_front();
            self.encode(next);
            self.push_pending(next, now);
        }
    }

    fn push_pending(&mut self, expect: Expect, now: Instant) {
        if let Expect::Bdat { txn } = expect {
            if let Some(t) = self.txns.iter_mut().find(|t| t.id == txn && t.eager) {
                t.sent_at = Some(now);
            }
        }
        if self.pending.is_empty() {
            self.deadline = Some(now + self.timeout_for(expect));
        }
        self.pending.push_back(expect);
    }

    fn timeout_for(&self, expect: Expect) -> Duration {
        let t = &self.config.timeouts;
        match expect {
            Expect::Greeting => t.greeting,
            Expect::DataEnd { .. } | Expect::Bdat { .. } => t.data_end,
            _ => t.command,
        }
    }

    fn encode(&mut self, expect: Expect) {
        let out = self.out.commands();
        match expect {
            Expect::Greeting => {}
            Expect::Ehlo => command::ehlo(out, &self.config.ehlo_name),
            Expect::Helo => command::helo(out, &self.config.ehlo_name),
            Expect::Rset { .. } => command::rset(out),
            Expect::StartTls => out.extend_from_slice(b"STARTTLS\r\n"),
            Expect::Auth { .. } => {
                let mechanism = self.mechanism.expect("mechanism chosen before AUTH");
                let credentials = self.config.credentials.as_ref().expect("credentials");
                credentials.first_command(mechanism, out);
            }
            Expect::Quit => command::quit(out),
            Expect::Mail { txn } => {
                let caps = &self.caps;
                let t = self
                    .txns
                    .iter()
                    .find(|t| t.id == txn)
                    .expect("transaction in flight");
                let utf8 = t.txn.sender.needs_smtputf8()
                    || t.txn.recipients.iter().any(Address::needs_smtputf8);
                let params = MailParams {
                    size: caps.size.map(|_| t.txn.body.len()),
                    eight_bit: t.txn.body.is_eight_bit() && caps.eight_bit_mime,
                    smtputf8: utf8 && caps.smtputf8,
                };
                let dsn = t.txn.dsn.as_deref().filter(|_| caps.dsn);
                command::mail_from(out, &t.txn.sender, params, dsn);
            }
            Expect::Rcpt { txn, index } => {
                let t = self
                    .txns
                    .iter()
                    .find(|t| t.id == txn)
                    .expect("transaction in flight");
                let dsn = t.txn.dsn.as_deref().filter(|_| self.caps.dsn);
                command::rcpt_to(out, &t.txn.recipients[index as usize], dsn);
            }
            Expect::Data { .. } => command::data(out),
            Expect::Bdat { txn } => {
                // Pipelined BDAT is queued with its envelope and written here with its
                // content; otherwise `send_content` writes it once the RCPT replies are in.
                if let Some(t) = self.txns.iter_mut().find(|t| t.id == txn && t.eager) {
                    t.content_sent = true;
                    self.pipelined_bdat_sent = true;
                    command::bdat(out, t.txn.body.len(), true);
                    self.out.push_content(Arc::clone(&t.txn.body), false);
                }
            }
            // Content follows this; it is written by `send_content`.
            Expect::DataEnd { .. } => {}
        }
    }

    fn txn_mut(&mut self, id: u32) -> Option<&mut TxnState> {
        self.txns.iter_mut().find(|t| t.id == id)
    }

    fn handle_reply(&mut self, reply: Reply, now: Instant) {
        let Some(expect) = self.pending.pop_front() else {
            self.protocol_error_text(format!(
                "unexpected reply with nothing outstanding: {reply}"
            ));
            return;
        };
        self.deadline = self.pending.front().map(|&e| now + self.timeout_for(e));
        // RFC 5321 3.8: 421 means the server is shutting the connection, whatever it answers.
        let closing = reply.code == 421;
        let closing_reply = closing.then(|| reply.clone());
        match expect {
            Expect::Greeting => {
                if reply.code == 220 {
                    self.phase = Phase::Ehlo;
                    self.unsent.push_back(Expect::Ehlo);
                } else if closing {
                    return self.fail(reply);
                } else {
                    // RFC 5321 3.1: after a 554 greeting the client sends QUIT.
                    return self.quit_after(reply, now);
                }
            }
            Expect::Ehlo => {
                if reply.is_positive() {
                    self.caps = Capabilities::from_ehlo(&reply);
                    self.negotiate();
                } else if reply.is_permanent() {
                    // RFC 5321 3.2: a server that does not know EHLO gets HELO.
                    self.phase = Phase::Helo;
                    self.unsent.push_back(Expect::Helo);
                } else if closing || !reply.is_transient() {
                    return self.fail(reply);
                } else {
                    return self.quit_after(reply, now);
                }
            }
            Expect::Helo => {
                if reply.is_positive() {
                    self.caps = Capabilities::default();
                    self.negotiate();
                } else if closing || reply.is_intermediate() {
                    return self.fail(reply);
                } else {
                    return self.quit_after(reply, now);
                }
            }
            Expect::StartTls => {
                if reply.code == 220 {
                    self.phase = Phase::TlsHandshake;
                    self.deadline = Some(now + self.config.timeouts.tls_handshake);
                    self.events.push_back(SessionEvent::StartTls);
                    return;
                }
                if self.config.starttls == StartTls::Required {
                    let text =
                        format!("STARTTLS refused under a policy that requires TLS: {reply}");
                    let reason = Reply::new(reply.code, reply.enhanced, text);
                    if closing || reply.is_intermediate() {
                        return self.fail(reason);
                    }
                    return self.quit_after(reason, now);
                }
                // Opportunistic: carry on in plaintext (RFC 3207 4.1 leaves it to policy).
                self.after_tls_decision();
            }
            Expect::Auth { step } => {
                if reply.code == 235 {
                    self.established();
                } else if reply.code == 334 && step < 2 {
                    let mechanism = self.mechanism.expect("AUTH in progress");
                    let credentials = self.config.credentials.clone().expect("credentials");
                    credentials.respond(mechanism, step, self.out.commands());
                    self.push_pending(Expect::Auth { step: step + 1 }, now);
                } else {
                    let text = format!("authentication failed: {reply}");
                    let reason = Reply::new(reply.code, reply.enhanced, text);
                    if closing || reply.is_intermediate() {
                        // A challenge beyond the mechanism's steps: the server awaits an
                        // answer, so a QUIT would not be read as a command.
                        return self.fail(reason);
                    }
                    return self.quit_after(reason, now);
                }
            }
            Expect::Rset { .. } => {
                if !reply.is_positive() {
                    // A dead or confused connection: what follows it was not attempted.
                    return self.fail_with_retry(reply);
                }
            }
            Expect::Quit => {
                self.close(reply, true);
                return;
            }
            Expect::Mail { txn } => {
                if !self.on_mail(txn, reply) {
                    return;
                }
            }
            Expect::Rcpt { txn, index } => self.on_rcpt(txn, index, reply, now),
            Expect::Data { txn } => {
                if !self.on_data(txn, reply, now) {
                    return;
                }
            }
            Expect::DataEnd { txn } | Expect::Bdat { txn } => {
                if !(reply.is_positive() || reply.is_transient() || reply.is_permanent()) {
                    return self.protocol_error_text(format!(
                        "unexpected reply to {}: {reply}",
                        expect.name()
                    ));
                }
                let window = &mut self.bdat_window;
                if let Some(t) = self.txns.iter_mut().find(|t| t.id == txn) {
                    if let Some(sent_at) = t.sent_at {
                        // A temporary failure of content the server had recipients for: it
                        // may be short of resources. Anything else measures how it keeps up.
                        if reply.is_transient() && !t.doomed {
                            window.on_failure();
                        } else {
                            window.on_reply(now.saturating_duration_since(sent_at));
                        }
                    }
                    t.settle_accepted(reply);
                }
                self.finish(txn);
            }
        }
        if let Some(reply) = closing_reply {
            if self.phase != Phase::Closed {
                return self.fail(reply);
            }
        }
        self.pump(now);
    }

    fn established(&mut self) {
        self.phase = Phase::Ready;
        self.established = true;
    }

    /// After EHLO/HELO: STARTTLS when policy and server allow, then AUTH, then ready.
    fn negotiate(&mut self) {
        if !self.tls_active {
            let policy = self.config.starttls;
            if policy != StartTls::Disabled && !self.starttls_forbidden && self.caps.starttls {
                self.phase = Phase::StartTls;
                self.unsent.push_back(Expect::StartTls);
                return;
            }
            if policy == StartTls::Required {
                return self.quit_soon(local_reply(
                    4,
                    7,
                    10,
                    "TLS is required but the server does not offer STARTTLS; nothing was sent in plaintext",
                ));
            }
        }
        self.after_tls_decision();
    }

    fn after_tls_decision(&mut self) {
        let Some(credentials) = &self.config.credentials else {
            return self.established();
        };
        if !self.tls_active && !self.config.allow_plaintext_auth {
            return self.quit_soon(local_reply(
                4,
                7,
                10,
                "AUTH is configured but the connection is not encrypted; credentials are never sent in plaintext",
            ));
        }
        if self.tls_active && !self.certificate_verified && !self.config.allow_plaintext_auth {
            return self.quit_soon(local_reply(
                4,
                7,
                10,
                "AUTH is configured but the server's certificate was not verified; credentials are sent only over verified TLS (tls_verify, tls_ca_file)",
            ));
        }
        let Some(mechanism) = credentials.choose(self.caps.auth) else {
            // X.7.0, not X.7.12 (RFC 4954 6: "a password transition is needed").
            return self.quit_soon(local_reply(
                4,
                7,
                0,
                "the server offers no AUTH mechanism these credentials can use",
            ));
        };
        self.mechanism = Some(mechanism);
        self.phase = Phase::Auth;
        self.unsent.push_back(Expect::Auth { step: 0 });
    }

    /// Returns false when the session was closed.
    fn on_mail(&mut self, txn: u32, reply: Reply) -> bool {
        if reply.is_intermediate() {
            self.protocol_error_text(format!("unexpected reply to MAIL FROM: {reply}"));
            return false;
        }
        let Some(t) = self.txns.iter_mut().find(|t| t.id == txn) else {
            return true;
        };
        if reply.is_positive() {
            t.mail = Some(Ok(()));
        } else {
            if t.eager && reply.is_transient() {
                // A server short of resources (451, 452 at MAIL): fewer in flight.
                self.bdat_window.on_failure();
            }
            // 503 "bad sequence of commands" is about the server's state (a transaction it
            // kept open after a failed BDAT, say), not the sender: never a bounce.
            let permanent = reply.is_permanent() && reply.code != 503;
            t.settle_rest(|| RcptResult::Failed {
                reply: reply.clone(),
                permanent,
            });
            t.mail = Some(Err(reply));
            t.doomed = true;
        }
        self.after_txn_reply(txn);
        true
    }

    fn on_rcpt(&mut self, txn: u32, index: u32, reply: Reply, now: Instant) {
        if reply.is_intermediate() {
            return self.protocol_error_text(format!("unexpected reply to RCPT TO: {reply}"));
        }
        let Some(t) = self.txn_mut(txn) else { return };
        t.rcpt_answered += 1;
        let slot = &mut t.results[index as usize];
        if slot.is_none() {
            *slot = Some(if reply.is_positive() {
                t.accepted += 1;
                // Provisional: becomes the reply to the content.
                RcptResult::Delivered(reply)
            } else if too_many_recipients(&reply) {
                // RFC 5321 4.5.3.1.10: the rest go in a new transaction.
                RcptResult::Retry(reply)
            } else {
                let permanent = reply.is_permanent();
                RcptResult::Failed { reply, permanent }
            });
        }
        if t.rcpt_answered == t.results.len() && t.accepted == 0 {
            t.doomed = true;
        }
        let (all_answered, bdat, doomed) = (t.rcpt_answered == t.results.len(), t.bdat, t.doomed);
        if all_answered && bdat && !doomed && !t.eager {
            self.send_content(txn, now);
        }
        self.after_txn_reply(txn);
    }

    /// Returns false when the session was closed.
    fn on_data(&mut self, txn: u32, reply: Reply, now: Instant) -> bool {
        let Some(t) = self.txn_mut(txn) else {
            return true;
        };
        if reply.code == 354 {
            if t.accepted == 0 || t.mail != Some(Ok(())) {
                // RFC 2920 3.1: the server took DATA although nothing is valid; end the
                // data at once, with no content.
                self.out.commands().extend_from_slice(b".\r\n");
                self.push_pending(Expect::DataEnd { txn }, now);
                if let Some(t) = self.txn_mut(txn) {
                    t.content_sent = true;
                }
            } else {
                self.send_content(txn, now);
            }
            true
        } else if reply.is_transient() || reply.is_permanent() {
            if !t.doomed {
                t.settle_accepted(reply);
                t.doomed = true;
            }
            self.after_txn_reply(txn);
            true
        } else {
            self.protocol_error_text(format!("unexpected reply to DATA: {reply}"));
            false
        }
    }

    fn send_content(&mut self, txn: u32, now: Instant) {
        let Some(t) = self.txns.iter_mut().find(|t| t.id == txn) else {
            return;
        };
        t.content_sent = true;
        let body = Arc::clone(&t.txn.body);
        if t.bdat {
            command::bdat(self.out.commands(), body.len(), true);
            self.out.push_content(body, false);
            self.push_pending(Expect::Bdat { txn }, now);
        } else {
            self.out.push_content(body, true);
            self.out.commands().extend_from_slice(b".\r\n");
            self.push_pending(Expect::DataEnd { txn }, now);
        }
    }

    /// After a reply about `txn`: a doomed transaction drops its unsent commands and ends once
    /// nothing of it is outstanding; a transaction that opened a mail transaction on the server
    /// and did not complete it gets an RSET (RFC 5321 4.1.1.5).
    fn after_txn_reply(&mut self, txn: u32) {
        let Some(t) = self.txns.iter().find(|t| t.id == txn) else {
            return;
        };
        if !t.doomed {
            return;
        }
        self.unsent.retain(|e| e.txn() != Some(txn));
        if self.pending.iter().any(|e| e.txn() == Some(txn)) {
            return;
        }
        let opened = t.mail == Some(Ok(()));
        self.finish(txn);
        if opened {
            self.unsent.push_front(Expect::Rset { probe: false });
        }
    }

    fn finish(&mut self, txn: u32) {
        let Some(pos) = self.txns.iter().position(|t| t.id == txn) else {
            return;
        };
        let mut t = self.txns.remove(pos).expect("position is valid");
        if self.spare_recipients.len() < SPARE_BUFFERS {
            let mut recipients = std::mem::take(&mut t.txn.recipients);
            recipients.clear();
            self.spare_recipients.push(recipients);
        }
        // A server that refuses every recipient as "too many" would otherwise be retried for
        // free forever: count it as a failed attempt.
        if t.results
            .iter()
            .all(|r| matches!(r, Some(RcptResult::Retry(_))))
        {
            for r in &mut t.results {
                if let Some(RcptResult::Retry(reply)) = r.take() {
                    *r = Some(RcptResult::Failed {
                        reply,
                        permanent: false,
                    });
                }
            }
        }
        t.settle_rest(|| RcptResult::Failed {
            reply: local_reply(
                4,
                5,
                0,
                "transaction ended without a reply for this recipient",
            ),
            permanent: false,
        });
        let results = t.results.into_iter().map(|r| r.expect("settled")).collect();
        self.events.push_back(SessionEvent::TransactionDone {
            tag: t.txn.tag,
            results,
        });
    }

    fn protocol_error(&mut self, e: ReplyError) {
        self.protocol_error_text(format!("protocol error: {e}"));
    }

    fn protocol_error_text(&mut self, text: String) {
        // A server that read a chunk as commands answers too often, possibly only after the
        // transaction ended.
        self.pipelined_bdat_failed |= self.pipelined_bdat_sent;
        self.note_pipelined_bdat_failure();
        self.fail(local_reply(4, 5, 0, text));
    }

    /// The session is breaking: if pipelined BDAT was in flight, the closure says so, and the
    /// engine stops using it for this destination.
    fn note_pipelined_bdat_failure(&mut self) {
        if self.txns.iter().any(|t| t.eager) {
            self.pipelined_bdat_failed = true;
        }
    }

    /// Ends the session: every transaction in flight fails with `reply` (transient, since the
    /// connection, not the message, failed), except transactions that had no reply yet on a
    /// reused connection after a probe failure.
    fn fail(&mut self, reply: Reply) {
        self.settle_all(&reply);
        self.close(reply, false);
    }

    /// Every transaction in flight fails with `reply`, transient.
    fn settle_all(&mut self, reply: &Reply) {
        let txns: Vec<TxnState> = self.txns.drain(..).collect();
        for mut t in txns {
            let text = if t.content_sent && t.accepted > 0 {
                // RFC 5321 6.1: the server may have the message; a retry risks a duplicate.
                format!(
                    "{} (after the content was sent: the message may have been delivered)",
                    reply.text
                )
            } else {
                reply.text.clone()
            };
            let r = Reply::new(reply.code, reply.enhanced, text);
            for slot in &mut t.results {
                match slot {
                    Some(RcptResult::Delivered(_)) | None => {
                        *slot = Some(RcptResult::Failed {
                            reply: r.clone(),
                            permanent: false,
                        })
                    }
                    _ => {}
                }
            }
            let results = t.results.into_iter().map(|r| r.expect("settled")).collect();
            self.events.push_back(SessionEvent::TransactionDone {
                tag: t.txn.tag,
                results,
            });
        }
    }

    /// Ends the session politely while it is still in sync with the server (every command
    /// written has its reply): every transaction fails as in `fail`, QUIT is sent (RFC 5321
    /// 4.1.1.10), and the closure that follows reports `reason`.
    fn quit_after(&mut self, reason: Reply, now: Instant) {
        self.quit_soon(reason);
        self.pump(now);
    }

    /// Like `quit_after`, when the caller writes the QUIT out with its own `pump`.
    fn quit_soon(&mut self, reason: Reply) {
        self.settle_all(&reason);
        self.quit_reason = Some(reason);
        self.phase = Phase::Quitting;
        self.unsent.clear();
        self.unsent.push_back(Expect::Quit);
    }

    /// The server answered DATA with 354 and, in the same read, refused the message (Postfix
    /// `smtp_proto.c`, "premature" reply; `smtp-sink -A`): no content was sent, the refusal
    /// applies to every accepted recipient, and the session is out of sync, so it ends.
    fn premature_refusal(&mut self, txn: u32, refusal: Reply) {
        self.pending.retain(|e| *e != Expect::Data { txn });
        if let Some(t) = self.txn_mut(txn) {
            t.settle_accepted(refusal.clone());
        }
        self.finish(txn);
        let text = format!("premature reply after 354 to DATA: {refusal}");
        self.fail(Reply::new(refusal.code, refusal.enhanced, text));
    }

    /// Like `fail`, for a failed probe: nothing after it was attempted.
    fn fail_with_retry(&mut self, reply: Reply) {
        let txns: Vec<TxnState> = self.txns.drain(..).collect();
        for t in txns {
            let results = t
                .txn
                .recipients
                .iter()
                .map(|_| RcptResult::Retry(reply.clone()))
                .collect();
            self.events.push_back(SessionEvent::TransactionDone {
                tag: t.txn.tag,
                results,
            });
        }
        self.fail(reply);
    }

    fn close(&mut self, reply: Reply, graceful: bool) {
        let (reply, graceful) = match self.quit_reason.take() {
            Some(reason) => (reason, false),
            None => (reply, graceful),
        };
        self.phase = Phase::Closed;
        self.deadline = None;
        self.pending.clear();
        self.unsent.clear();
        self.events.push_back(SessionEvent::Closed(Closure {
            reply,
            established: self.established,
            graceful,
            pipelined_bdat_failed: self.pipelined_bdat_failed,
        }));
    }
}

/// RFC 5321 4.5.3.1.10: "452 too many recipients" (and the obsolete 552 form) asks the client
/// to send the remaining recipients in a later transaction.
fn too_many_recipients(reply: &Reply) -> bool {
    let enhanced = reply
        .enhanced
        .is_some_and(|e| e.subject == 5 && e.detail == 3);
    (reply.code == 452 || reply.code == 552)
        && (enhanced
            || reply
                .text
                .to_ascii_lowercase()
                .contains("too many recipients"))
}

#[cfg(test)]
mod tests {
    //! Byte-literal transcripts: what the client writes, what the server answers.
    use super::*;
    use crate::error::Field;

    struct Script {
        session: Session,
        now: Instant,
        done: Vec<(u64, Vec<RcptResult>)>,
        closed: Option<Closure>,
        tls_requested: bool,
    }

    fn addr(s: &str) -> Address {
        Address::parse(s, Field::Sender).unwrap()
    }

    /// Everything the session has waiting to be written, as one byte string.
    fn output(session: &Session) -> Vec<u8> {
        let mut slices = vec![IoSlice::new(&[]); 4096];
        let n = session.output_slices(&mut slices);
        assert!(n < slices.len(), "more pieces than a test expects");
        slices[..n].iter().flat_map(|s| s.iter().copied()).collect()
    }

    fn txn(tag: u64, rcpts: &[&str], body: &[u8]) -> Transaction {
        Transaction {
            tag,
            sender: addr("from@s.example"),
            recipients: rcpts.iter().map(|r| addr(r)).collect(),
            body: Arc::new(Body::new(body).unwrap()),
            dsn: None,
        }
    }

    impl Script {
        fn new(chunking: bool) -> Self {
            Script::configured(SessionConfig {
                ehlo_name: "client.example".into(),
                use_chunking: chunking,
                ..SessionConfig::default()
            })
        }

        /// With the BDAT window grown to its maximum (see `adaptive_bdat_window_*` for how
        /// it gets there).
        fn configured(config: SessionConfig) -> Self {
            let now = Instant::now();
            let mut session = Session::new(Arc::new(config), now);
            session.bdat_window = BdatWindow::grown(session.config.bdat_window);
            Script {
                session,
                now,
                done: Vec::new(),
                closed: None,
                tls_requested: false,
            }
        }

        /// Greeting and EHLO with these capability lines.
        fn connected(chunking: bool, caps: &str) -> Self {
            Script::connected_with(Script::new(chunking), caps)
        }

        /// BDAT content waits for the RCPT replies (no pipelined BDAT window).
        fn connected_lockstep_bdat(caps: &str) -> Self {
            Script::connected_with(
                Script::configured(SessionConfig {
                    ehlo_name: "client.example".into(),
                    bdat_window: 0,
                    ..SessionConfig::default()
                }),
                caps,
            )
        }

        fn connected_with(mut s: Script, caps: &str) -> Self {
            s.server("220 mx.example ESMTP\r\n");
            s.expect("EHLO client.example\r\n");
            let mut ehlo = String::from("250-mx.example\r\n");
            let lines: Vec<&str> = caps.split(',').filter(|c| !c.is_empty()).collect();
            for (i, c) in lines.iter().enumerate() {
                let sep = if i + 1 == lines.len() { ' ' } else { '-' };
                ehlo.push_str(&format!("250{sep}{c}\r\n"));
            }
            if lines.is_empty() {
                ehlo = "250 mx.example\r\n".into();
            }
            s.server(&ehlo);
            assert!(s.session.is_established());
            s
        }

        fn server(&mut self, bytes: &str) {
            self.server_bytes(bytes.as_bytes());
        }

        fn server_bytes(&mut self, bytes: &[u8]) {
            self.session.handle_input(bytes, self.now);
            self.drain();
        }

        fn drain(&mut self) {
            while let Some(e) = self.session.poll_event() {
                match e {
                    SessionEvent::TransactionDone { tag, results } => {
                        self.done.push((tag, results))
                    }
                    SessionEvent::Closed(c) => self.closed = Some(c),
                    SessionEvent::StartTls => self.tls_requested = true,
                }
            }
        }

        fn written(&mut self) -> String {
            let out = String::from_utf8_lossy(&output(&self.session)).into_owned();
            self.session.consume_output(self.session.output_len());
            out
        }

        fn expect(&mut self, wire: &str) {
            assert_eq!(self.written(), wire);
        }

        fn start(&mut self, t: Transaction) {
            assert!(self.session.can_accept());
            self.session.start_transaction(t, self.now);
            self.drain();
        }
    }

    fn codes(results: &[RcptResult]) -> Vec<String> {
        results
            .iter()
            .map(|r| match r {
                RcptResult::Delivered(r) => format!("D{}", r.code),
                RcptResult::Failed { reply, permanent } => {
                    format!("{}{}", if *permanent { "P" } else { "T" }, reply.code)
                }
                RcptResult::Retry(r) => format!("R{}", r.code),
            })
            .collect()
    }

    #[test]
    fn pipelined_transactions_back_to_back() {
        let mut s = Script::connected(false, "PIPELINING,SIZE 100000,8BITMIME");
        s.start(txn(
            1,
            &["a@r.example", "bad@r.example", "c@r.example"],
            b"Hi\n.dot\n",
        ));
        s.expect(
            "MAIL FROM:<from@s.example> SIZE=10\r\nRCPT TO:<a@r.example>\r\nRCPT TO:<bad@r.example>\r\nRCPT TO:<c@r.example>\r\nDATA\r\n",
        );
        s.server("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 <bad@r.example>: User unknown\r\n");
        assert_eq!(s.written(), "", "nothing may follow DATA before 354");
        s.server("250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n");
        s.expect("Hi\r\n..dot\r\n.\r\n");
        // The next envelope goes out before the reply to the first message's end of data.
        assert!(s.session.can_accept());
        s.start(txn(2, &["d@r.example"], "8bit é\n".as_bytes()));
        s.expect(
            "MAIL FROM:<from@s.example> SIZE=9 BODY=8BITMIME\r\nRCPT TO:<d@r.example>\r\nDATA\r\n",
        );
        s.server("250 2.0.0 Ok: queued as A1\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n");
        assert_eq!(s.done.len(), 1);
        assert_eq!(s.done[0].0, 1);
        assert_eq!(codes(&s.done[0].1), ["D250", "P550", "D250"]);
        match &s.done[0].1[0] {
            RcptResult::Delivered(r) => assert_eq!(r.text, "Ok: queued as A1"),
            other => panic!("{other:?}"),
        }
        match &s.done[0].1[1] {
            RcptResult::Failed { reply, .. } => {
                assert_eq!(reply.enhanced, Some(EnhancedCode::new(5, 1, 1)));
                assert_eq!(reply.text, "<bad@r.example>: User unknown");
            }
            other => panic!("{other:?}"),
        }
        s.expect("8bit \u{e9}\r\n.\r\n");
        s.server("451 4.3.0 try later\r\n");
        assert_eq!(codes(&s.done[1].1), ["T451"]);
        assert!(s.session.is_idle());
        s.session.quit(s.now);
        s.expect("QUIT\r\n");
        s.server("221 2.0.0 Bye\r\n");
        assert!(s.closed.as_ref().unwrap().graceful);
    }

    #[test]
    fn every_rcpt_refused_sends_no_content_and_resets() {
        let mut s = Script::connected(false, "PIPELINING");
        s.start(txn(1, &["a@r.example", "b@r.example"], b"secret\n"));
        s.written();
        s.server("250 Ok\r\n550 5.1.1 no\r\n450 4.2.1 busy\r\n");
        // A conforming server refuses DATA.
        s.server("554 5.5.1 No valid recipients\r\n");
        assert_eq!(codes(&s.done[0].1), ["P550", "T450"]);
        s.expect("RSET\r\n");
        s.server("250 Ok\r\n");
        // A server that answers 354 anyway gets an empty message, never the content.
        s.start(txn(2, &["a@r.example"], b"secret\n"));
        s.written();
        s.server("250 Ok\r\n550 no\r\n354 go\r\n");
        s.expect(".\r\n");
        s.server("554 no recipients\r\n");
        assert_eq!(codes(&s.done[1].1), ["P550"]);
        // The reply to the end of data closes the transaction on the server: no RSET.
        s.expect("");
    }

    #[test]
    fn refused_data_sends_no_body() {
        let mut s = Script::connected(false, "PIPELINING");
        s.start(txn(1, &["a@r.example"], b"body\n"));
        s.written();
        s.server("250 Ok\r\n250 Ok\r\n451 4.3.0 not now\r\n");
        assert_eq!(codes(&s.done[0].1), ["T451"]);
        s.expect("RSET\r\n");
    }

    #[test]
    fn refused_mail_decides_every_recipient() {
        let mut s = Script::connected(false, "PIPELINING");
        s.start(txn(1, &["a@r.example", "b@r.example"], b"body\n"));
        s.written();
        s.server("553 5.7.1 sender rejected\r\n503 5.5.1 need MAIL\r\n503 need MAIL\r\n554 no\r\n");
        assert_eq!(codes(&s.done[0].1), ["P553", "P553"]);
        // No transaction was opened: no RSET needed.
        s.expect("");
    }

    #[test]
    fn chunking_waits_for_rcpt_replies_then_sends_bdat() {
        let mut s = Script::connected_lockstep_bdat("PIPELINING,CHUNKING");
        s.start(txn(1, &["a@r.example", "b@r.example"], b".x\nlast"));
        s.expect(
            "MAIL FROM:<from@s.example>\r\nRCPT TO:<a@r.example>\r\nRCPT TO:<b@r.example>\r\n",
        );
        s.server("250 Ok\r\n250 Ok\r\n");
        s.expect("");
        s.server("550 no\r\n");
        // BDAT content is not dot-stuffed (RFC 3030).
        s.expect("BDAT 10 LAST\r\n.x\r\nlast\r\n");
        s.start(txn(2, &["c@r.example"], b"z"));
        s.expect("MAIL FROM:<from@s.example>\r\nRCPT TO:<c@r.example>\r\n");
        s.server("250 2.0.0 queued\r\n250 Ok\r\n550 no such user\r\n");
        assert_eq!(codes(&s.done[0].1), ["D250", "P550"]);
        assert_eq!(codes(&s.done[1].1), ["P550"]);
        s.expect("RSET\r\n");
    }

    #[test]
    fn delivered_reply_text_is_kept_unless_turned_off_and_buffers_are_recycled() {
        for keep in [true, false] {
            let mut s = Script::connected_with(
                Script::configured(SessionConfig {
                    ehlo_name: "client.example".into(),
                    delivery_reply_text: keep,
                    ..SessionConfig::default()
                }),
                "PIPELINING,CHUNKING",
            );
            for tag in 1..=2 {
                let mut recipients = s.session.recipient_buffer();
                if tag == 2 {
                    // The first transaction's list came back, emptied.
                    assert!(recipients.is_empty() && recipients.capacity() >= 2);
                }
                recipients.push(addr("a@r.example"));
                recipients.push(addr("bad@r.example"));
                s.start(Transaction {
                    recipients,
                    ..txn(tag, &[], b"hi")
                });
                s.expect(concat!(
                    "MAIL FROM:<from@s.example>\r\nRCPT TO:<a@r.example>\r\n",
                    "RCPT TO:<bad@r.example>\r\nBDAT 4 LAST\r\nhi\r\n"
                ));
                s.server(concat!(
                    "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 <bad@r.example>: unknown\r\n",
                    "250 2.0.0 Ok: queued as A1\r\n"
                ));
                let (_, results) = s.done.pop().expect("done");
                let delivered = if keep { "Ok: queued as A1" } else { "" };
                assert_eq!(
                    results,
                    [
                        RcptResult::Delivered(Reply::new(
                            250,
                            Some(EnhancedCode::new(2, 0, 0)),
                            delivered
                        )),
                        // A refusal keeps its text either way.
                        RcptResult::Failed {
                            reply: Reply::new(
                                550,
                                Some(EnhancedCode::new(5, 1, 1)),
                                "<bad@r.example>: unknown"
                            ),
                            permanent: true
                        },
                    ]
                );
                s.session.recycle_results(results);
            }
        }
    }

    #[test]
    fn pipelined_bdat_sends_whole_transactions_in_one_write() {
        let mut s = Script::connected(true, "PIPELINING,CHUNKING,8BITMIME");
        s.start(txn(1, &["a@r.example"], b".x\nend"));
        s.start(txn(2, &["b@r.example", "bad@r.example"], b"two"));
        s.start(txn(3, &["gone@r.example"], b"three"));
        s.start(txn(4, &["c@r.example"], b"four"));
        s.expect(concat!(
            "MAIL FROM:<from@s.example>\r\nRCPT TO:<a@r.example>\r\nBDAT 9 LAST\r\n.x\r\nend\r\n",
            "MAIL FROM:<from@s.example>\r\nRCPT TO:<b@r.example>\r\nRCPT TO:<bad@r.example>\r\n",
            "BDAT 5 LAST\r\ntwo\r\n",
            "MAIL FROM:<from@s.example>\r\nRCPT TO:<gone@r.example>\r\nBDAT 7 LAST\r\nthree\r\n",
            "MAIL FROM:<from@s.example>\r\nRCPT TO:<c@r.example>\r\nBDAT 6 LAST\r\nfour\r\n",
        ));
        s.server(concat!(
            "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: queued as A1\r\n",
            "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 <bad@r.example>: unknown\r\n",
            "250 2.0.0 Ok: queued as A2\r\n",
            "250 2.1.0 Ok\r\n550 5.1.1 <gone@r.example>: unknown\r\n",
        ));
        assert_eq!(s.done.len(), 2);
        // Every recipient of the third was refused: its BDAT's failure is expected, no desync.
        s.server("554 5.5.1 Error: no valid recipients\r\n");
        s.server("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n451 4.3.0 try later\r\n");
        assert!(s.closed.is_none());
        let got: Vec<(u64, Vec<String>)> = s.done.iter().map(|(t, r)| (*t, codes(r))).collect();
        assert_eq!(
            got,
            [
                (1, vec!["D250".to_string()]),
                (2, vec!["D250".into(), "P550".into()]),
                (3, vec!["P550".into()]),
                (4, vec!["T451".into()]),
            ]
        );
        match &s.done[1].1[..] {
            [RcptResult::Delivered(ok), RcptResult::Failed { reply, .. }] => {
                assert_eq!(ok.text, "Ok: queued as A2");
                assert_eq!(reply.text, "<bad@r.example>: unknown");
            }
            other => panic!("{other:?}"),
        }
        match &s.done[2].1[..] {
            [RcptResult::Failed { reply, permanent }] => {
                assert!(*permanent);
                assert_eq!(reply.text, "<gone@r.example>: unknown");
            }
            other => panic!("{other:?}"),
        }
        // The BDAT LAST replies ended every transaction on the server: no RSET.
        s.expect("");
        assert!(s.session.is_idle());
    }

    /// Starts transactions while the session takes them; returns how many it took.
    fn fill(s: &mut Script, first_tag: u64) -> u64 {
        let mut n = 0;
        while s.session.can_accept() {
            s.start(txn(first_tag + n, &["a@r.example"], b"x"));
            n += 1;
        }
        n
    }

    #[test]
    fn adaptive_bdat_window_grows_while_the_server_keeps_up_and_shrinks_when_it_lags() {
        let mut s = Script::connected(true, "PIPELINING,CHUNKING");
        s.session.bdat_window = BdatWindow::new(8);
        let ok = "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: queued\r\n";
        let mut tag = 0;
        let mut windows = Vec::new();
        for _ in 0..5 {
            let n = fill(&mut s, tag);
            tag += n;
            windows.push(n);
            s.written();
            s.now += Duration::from_micros(100);
            s.server(&ok.repeat(n as usize));
        }
        assert_eq!(windows, [4, 8, 8, 8, 8]);
        // Replies that take far longer than the least seen: one fewer in flight.
        let n = fill(&mut s, tag);
        tag += n;
        s.written();
        s.now += Duration::from_millis(50);
        s.server(&ok.repeat(n as usize));
        assert_eq!(fill(&mut s, tag), 7);
        tag += 7;
        s.written();
        // A 451 at MAIL (short of resources) halves it; the recipient is deferred, and every
        // transaction still ends with its own outcome.
        s.server("451 4.3.1 insufficient system resources\r\n250 2.1.5 Ok\r\n554 5.5.1 no valid recipients\r\n");
        s.server(&ok.repeat(6));
        assert_eq!(fill(&mut s, tag), 3);
        let outcomes: Vec<String> = s.done.iter().map(|(_, r)| codes(r).join(",")).collect();
        assert_eq!(outcomes.len(), tag as usize);
        assert_eq!(
            outcomes.iter().filter(|o| o.as_str() == "T451").count(),
            1,
            "{outcomes:?}"
        );
        assert!(outcomes.iter().all(|o| o == "D250" || o == "T451"));
    }

    #[test]
    fn pipelined_bdat_after_refused_mail_keeps_in_step() {
        let mut s = Script::connected(true, "PIPELINING,CHUNKING");
        s.start(txn(1, &["a@r.example", "b@r.example"], b"one"));
        s.start(txn(2, &["c@r.example"], b"two"));
        s.written();
        s.server(concat!(
            "553 5.7.1 sender rejected\r\n503 5.5.1 Error: need MAIL command\r\n",
            "503 5.5.1 Error: need MAIL command\r\n503 5.5.1 Error: need MAIL command\r\n",
            "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: queued\r\n",
        ));
        assert!(s.closed.is_none());
        assert_eq!(codes(&s.done[0].1), ["P553", "P553"]);
        assert_eq!(codes(&s.done[1].1), ["D250"]);
        s.expect("");
    }

    #[test]
    fn pipelined_bdat_window_limits_transactions_and_octets() {
        let mut s = Script::connected_with(
            Script::configured(SessionConfig {
                ehlo_name: "client.example".into(),
                bdat_window: 2,
                bdat_window_bytes: 8,
                ..SessionConfig::default()
            }),
            "PIPELINING,CHUNKING",
        );
        s.start(txn(1, &["a@r.example"], b"abc"));
        s.start(txn(2, &["b@r.example"], b"def"));
        assert!(!s.session.can_accept(), "two transactions fill the window");
        s.server("250 Ok\r\n250 Ok\r\n250 Ok\r\n");
        s.start(txn(3, &["c@r.example"], b"0123456789"));
        assert!(
            !s.session.can_accept(),
            "the octets in flight fill the window"
        );
        s.server("250 Ok\r\n250 Ok\r\n250 Ok\r\n");
        assert!(!s.session.can_accept(), "a larger message goes alone");
        s.server("250 Ok\r\n250 Ok\r\n250 Ok\r\n");
        assert!(s.session.can_accept());
        assert_eq!(s.done.len(), 3);
        assert!(s.session.is_idle());
    }

    #[test]
    fn pipelined_bdat_desync_is_reported_and_can_be_forbidden() {
        let mut s = Script::connected(true, "PIPELINING,CHUNKING");
        s.start(txn(1, &["a@r.example"], b"one"));
        s.written();
        // A server that took the content for commands answers too often.
        s.server("250 Ok\r\n250 Ok\r\n500 5.5.2 Error: command not recognized\r\n");
        s.server("500 5.5.2 Error: command not recognized\r\n");
        let closure = s.closed.take().expect("closed");
        assert!(closure.pipelined_bdat_failed);
        assert!(
            closure.reply.text.contains("before its command"),
            "{closure:?}"
        );
        assert_eq!(codes(&s.done[0].1), ["P500"]);

        // A session that forbids it waits for the RCPT replies, as without a window.
        let mut s = Script::new(true);
        s.session.forbid_pipelined_bdat();
        let mut s = Script::connected_with(s, "PIPELINING,CHUNKING");
        s.start(txn(1, &["a@r.example"], b"one"));
        s.expect("MAIL FROM:<from@s.example>\r\nRCPT TO:<a@r.example>\r\n");
        s.server("250 Ok\r\n250 Ok\r\n");
        s.expect("BDAT 5 LAST\r\none\r\n");
        s.server("250 Ok\r\n");
        assert_eq!(codes(&s.done[0].1), ["D250"]);

        // A connection lost with pipelined BDAT in flight is reported too; one lost while
        // idle is not.
        let mut s = Script::connected(true, "PIPELINING,CHUNKING");
        s.start(txn(1, &["a@r.example"], b"one"));
        s.session.handle_close("reset by peer");
        s.drain();
        assert!(s.closed.unwrap().pipelined_bdat_failed);
        let mut s = Script::connected(true, "PIPELINING,CHUNKING");
        s.session.handle_close("reset by peer");
        s.drain();
        assert!(!s.closed.unwrap().pipelined_bdat_failed);
    }

    #[test]
    fn helo_fallback_and_lockstep_without_pipelining() {
        let mut s = Script::new(true);
        s.server("220 old.example SMTP\r\n");
        s.expect("EHLO client.example\r\n");
        s.server("502 5.5.2 Command not recognized\r\n");
        s.expect("HELO client.example\r\n");
        s.server("250 old.example\r\n");
        s.start(txn(1, &["a@r.example", "b@r.example"], b"x\n"));
        s.expect("MAIL FROM:<from@s.example>\r\n");
        s.server("250 Ok\r\n");
        s.expect("RCPT TO:<a@r.example>\r\n");
        s.server("250 Ok\r\n");
        s.expect("RCPT TO:<b@r.example>\r\n");
        s.server("250 Ok\r\n");
        s.expect("DATA\r\n");
        s.server("354 go\r\n");
        s.expect("x\r\n.\r\n");
        assert!(
            !s.session.can_accept(),
            "no pipelining: one transaction at a time"
        );
        s.server("250 Ok\r\n");
        assert_eq!(codes(&s.done[0].1), ["D250", "D250"]);
        assert!(s.session.can_accept());
    }

    #[test]
    fn lockstep_stops_after_refused_mail() {
        let mut s = Script::connected(false, "");
        s.start(txn(1, &["a@r.example"], b"x\n"));
        s.expect("MAIL FROM:<from@s.example>\r\n");
        s.server("451 4.3.0 later\r\n");
        assert_eq!(codes(&s.done[0].1), ["T451"]);
        s.expect("");
    }

    #[test]
    fn too_many_recipients_are_retried_elsewhere() {
        let mut s = Script::connected(false, "PIPELINING");
        s.start(txn(
            1,
            &["a@r.example", "b@r.example", "c@r.example"],
            b"x\n",
        ));
        s.written();
        s.server("250 Ok\r\n250 Ok\r\n452 4.5.3 Too many recipients\r\n452 4.5.3 Too many recipients\r\n354 go\r\n");
        s.expect("x\r\n.\r\n");
        s.server("250 Ok\r\n");
        assert_eq!(codes(&s.done[0].1), ["D250", "R452", "R452"]);
    }

    #[test]
    fn service_closing_mid_session_fails_everything_in_flight() {
        let mut s = Script::connected(false, "PIPELINING");
        s.start(txn(1, &["a@r.example", "b@r.example"], b"x\n"));
        s.written();
        s.server("250 Ok\r\n250 Ok\r\n421 4.7.0 closing connection\r\n");
        assert_eq!(codes(&s.done[0].1), ["T421", "T421"]);
        let closed = s.closed.clone().unwrap();
        assert_eq!(closed.reply.code, 421);
        assert!(!closed.graceful);
        assert!(s.session.is_closed());
        assert!(!s.session.can_accept());
    }

    #[test]
    fn greeting_refused() {
        let mut s = Script::new(false);
        s.server("554 5.3.2 no service\r\n");
        // RFC 5321 3.1: the client sends QUIT and waits for the server to close.
        s.expect("QUIT\r\n");
        assert!(s.closed.is_none());
        s.server("221 2.0.0 Bye\r\n");
        let closed = s.closed.unwrap();
        assert_eq!(closed.reply.code, 554);
        assert_eq!(closed.reply.text, "no service");
        assert!(!closed.established);
        assert!(!closed.graceful);
        // A 421 greeting closes the connection from the server's side: no QUIT.
        let mut s = Script::new(false);
        s.server("421 4.3.2 busy\r\n");
        s.expect("");
        assert_eq!(s.closed.unwrap().reply.code, 421);
    }

    #[test]
    fn premature_refusal_after_354_bounces_without_content() {
        let mut s = Script::connected(false, "PIPELINING");
        s.start(txn(1, &["a@r.example", "b@r.example"], b"body\n"));
        s.written();
        // smtp-sink -A: the 354 and the refusal in one write, then the server hangs up.
        s.server("250 Ok\r\n250 Ok\r\n550 5.1.1 no b\r\n354 go\r\n550 5.7.1 Rejected\r\n");
        assert_eq!(s.written(), "", "no content after a premature refusal");
        assert_eq!(codes(&s.done[0].1), ["P550", "P550"]);
        match &s.done[0].1[0] {
            RcptResult::Failed { reply, .. } => {
                assert_eq!(reply.enhanced, Some(EnhancedCode::new(5, 7, 1)));
                assert_eq!(reply.text, "Rejected");
            }
            other => panic!("{other:?}"),
        }
        match &s.done[0].1[1] {
            RcptResult::Failed { reply, .. } => assert_eq!(reply.text, "no b"),
            other => panic!("{other:?}"),
        }
        assert!(s.session.is_closed());
        // A 4xx the same way is transient.
        let mut s = Script::connected(false, "PIPELINING");
        s.start(txn(1, &["a@r.example"], b"body\n"));
        s.written();
        s.server("250 Ok\r\n250 Ok\r\n354 go\r\n451 4.3.0 later\r\n");
        assert_eq!(s.written(), "");
        assert_eq!(codes(&s.done[0].1), ["T451"]);
    }

    /// A 503 to MAIL (a server that kept the last transaction open) is the server's state,
    /// not the recipients': deferred, never bounced.
    #[test]
    fn bad_sequence_reply_to_mail_defers() {
        let mut s = Script::connected(false, "PIPELINING");
        s.start(txn(1, &["a@r.example"], b"body\n"));
        s.written();
        s.server("503 5.5.1 Error: nested MAIL command\r\n554 5.5.1 no valid recipients\r\n554 5.5.1 no valid recipients\r\n");
        assert_eq!(codes(&s.done[0].1), ["T503"]);
    }

    #[test]
    fn silent_peer_on_reuse_retries_without_an_attempt() {
        let mut s = Script::connected(false, "PIPELINING");
        s.start(txn(1, &["a@r.example"], b"x"));
        s.written();
        s.server("250 Ok\r\n250 Ok\r\n354 go\r\n");
        s.written();
        s.server("250 Ok\r\n");
        s.now += Duration::from_secs(10);
        s.start(txn(2, &["b@r.example"], b"y"));
        s.expect("RSET\r\nMAIL FROM:<from@s.example>\r\nRCPT TO:<b@r.example>\r\nDATA\r\n");
        s.now += Timeouts::default().command;
        s.session.handle_timeout(s.now);
        s.drain();
        assert_eq!(codes(&s.done[1].1), ["R0"]);
        assert!(s.session.is_closed());
    }

    #[test]
    fn deadline_is_per_request_not_per_read() {
        let mut s = Script::connected(false, "PIPELINING");
        s.start(txn(1, &["a@r.example"], b"x\n"));
        s.written();
        let deadline = s.session.deadline().unwrap();
        assert_eq!(deadline, s.now + Timeouts::default().command);
        // A server dribbling one byte at a time does not move the deadline.
        s.now += Duration::from_secs(30);
        s.server("2");
        s.now += Duration::from_secs(29);
        s.server("5");
        assert_eq!(s.session.deadline(), Some(deadline));
        s.now = deadline;
        s.session.handle_timeout(s.now);
        s.drain();
        assert_eq!(codes(&s.done[0].1), ["T0"]);
        match &s.done[0].1[0] {
            RcptResult::Failed { reply, .. } => {
                assert_eq!(reply.text, "timed out waiting for reply to MAIL FROM")
            }
            other => panic!("{other:?}"),
        }
        assert!(s.session.is_closed());
    }

    #[test]
    fn connection_lost_after_content_warns_of_duplicate() {
        let mut s = Script::connected(false, "PIPELINING");
        s.start(txn(1, &["a@r.example"], b"x\n"));
        s.written();
        s.server("250 Ok\r\n250 Ok\r\n354 go\r\n");
        s.written();
        s.session.handle_close("connection reset by peer");
        s.drain();
        match &s.done[0].1[0] {
            RcptResult::Failed { reply, permanent: false } => assert_eq!(
                reply.text,
                "connection lost while waiting for reply to end of data: connection reset by peer (after the content was sent: the message may have been delivered)"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refusals_before_the_wire() {
        let mut s = Script::connected(false, "PIPELINING,SIZE 10");
        s.start(txn(1, &["a@r.example"], b"0123456789abc"));
        assert_eq!(s.written(), "");
        assert_eq!(codes(&s.done[0].1), ["P0"]);
        match &s.done[0].1[0] {
            RcptResult::Failed { reply, .. } => {
                assert_eq!(reply.enhanced, Some(EnhancedCode::new(5, 3, 4)));
                assert_eq!(
                    reply.text,
                    "message is 15 octets; the server accepts at most 10 (SIZE)"
                );
            }
            other => panic!("{other:?}"),
        }
        let mut s = Script::connected(false, "PIPELINING");
        s.start(txn(1, &["a@r.example"], "é".as_bytes()));
        s.start(txn(2, &["jöran@r.example"], b"x"));
        assert_eq!(s.written(), "");
        assert_eq!(codes(&s.done[0].1), ["P0"]);
        assert_eq!(codes(&s.done[1].1), ["P0"]);
    }

    #[test]
    fn smtputf8_when_offered() {
        let mut s = Script::connected(false, "PIPELINING,SMTPUTF8");
        s.start(txn(1, &["jöran@r.example"], b"x"));
        s.expect("MAIL FROM:<from@s.example> SMTPUTF8\r\nRCPT TO:<jöran@r.example>\r\nDATA\r\n");
    }

    fn dsn_txn() -> Transaction {
        use crate::message::dsn::{Notify, Orcpt, RecipientDsn, Ret};
        let dsn = DsnEnvelope::default()
            .with_ret(Ret::Full)
            .with_envid("id=1+2")
            .unwrap()
            .with_recipient(
                "a@r.example",
                RecipientDsn {
                    notify: Some(Notify::NEVER),
                    orcpt: Some(Orcpt {
                        addr_type: "rfc822".into(),
                        address: b"A+1=x@r.example".to_vec(),
                    }),
                },
            );
        Transaction {
            dsn: Some(Arc::new(dsn)),
            ..txn(1, &["a@r.example", "b@r.example"], b"x")
        }
    }

    #[test]
    fn dsn_parameters_only_to_a_server_that_offers_dsn() {
        let mut s = Script::connected(false, "PIPELINING,DSN");
        s.start(dsn_txn());
        s.expect(
            "MAIL FROM:<from@s.example> RET=FULL ENVID=id+3D1+2B2\r\n\
             RCPT TO:<a@r.example> NOTIFY=NEVER ORCPT=rfc822;A+2B1+3Dx@r.example\r\n\
             RCPT TO:<b@r.example>\r\nDATA\r\n",
        );
        let mut s = Script::connected(false, "PIPELINING");
        s.start(dsn_txn());
        s.expect(
            "MAIL FROM:<from@s.example>\r\nRCPT TO:<a@r.example>\r\nRCPT TO:<b@r.example>\r\nDATA\r\n",
        );
    }

    #[test]
    fn reply_with_nothing_outstanding_closes() {
        let mut s = Script::connected(false, "PIPELINING");
        s.server("250 surprise\r\n");
        assert!(s.session.is_closed());
        assert_eq!(
            s.closed.unwrap().reply.text,
            "reply arrived before its command was sent: 250 surprise"
        );
    }

    #[test]
    fn garbage_closes_with_protocol_error() {
        let mut s = Script::connected(false, "PIPELINING");
        s.start(txn(1, &["a@r.example"], b"x"));
        s.written();
        s.server("HTTP/1.1 400 Bad Request\r\n");
        assert_eq!(codes(&s.done[0].1), ["T0"]);
        assert!(s.session.is_closed());
    }

    #[test]
    fn idle_reuse_is_probed_and_a_dead_probe_retries() {
        let mut s = Script::connected(false, "PIPELINING");
        s.start(txn(1, &["a@r.example"], b"x"));
        s.written();
        s.server("250 Ok\r\n250 Ok\r\n354 go\r\n");
        s.written();
        s.server("250 Ok\r\n");
        s.now += Duration::from_secs(10);
        s.start(txn(2, &["b@r.example"], b"y"));
        s.expect("RSET\r\nMAIL FROM:<from@s.example>\r\nRCPT TO:<b@r.example>\r\nDATA\r\n");
        s.session.handle_close("connection reset by peer");
        s.drain();
        assert_eq!(codes(&s.done[1].1), ["R0"]);
    }

    fn tls_script(policy: StartTls, credentials: Option<Credentials>) -> Script {
        let config = SessionConfig {
            ehlo_name: "client.example".into(),
            starttls: policy,
            credentials,
            ..SessionConfig::default()
        };
        let now = Instant::now();
        Script {
            session: Session::new(Arc::new(config), now),
            now,
            done: Vec::new(),
            closed: None,
            tls_requested: false,
        }
    }

    #[test]
    fn starttls_discards_injected_replies_and_says_ehlo_again() {
        let mut s = tls_script(StartTls::Opportunistic, None);
        s.server("220 mx ESMTP\r\n");
        s.expect("EHLO client.example\r\n");
        s.server("250-mx\r\n250-SIZE 100\r\n250 STARTTLS\r\n");
        s.expect("STARTTLS\r\n");
        // The classic injection: a reply smuggled into the same packet as the 220.
        s.server("220 2.0.0 Ready to start TLS\r\n250-fake\r\n250 PIPELINING\r\n");
        assert!(s.tls_requested);
        assert!(s.session.is_tls_handshake());
        assert_eq!(s.written(), "");
        // Plaintext arriving during the handshake is ignored too.
        s.server("250 more fake\r\n");
        s.session.tls_established(s.now);
        assert!(s.session.is_tls());
        assert_eq!(
            s.session.capabilities(),
            &Capabilities::default(),
            "capabilities forgotten"
        );
        s.expect("EHLO client.example\r\n");
        s.server("250-mx\r\n250 PIPELINING\r\n");
        assert!(s.session.is_established());
        assert!(s.session.capabilities().pipelining);
        assert_eq!(s.session.capabilities().size, None);
    }

    #[test]
    fn required_tls_without_starttls_sends_nothing_in_plaintext() {
        let mut s = tls_script(StartTls::Required, None);
        s.server("220 mx ESMTP\r\n");
        s.written();
        s.server("250-mx\r\n250 PIPELINING\r\n");
        assert_eq!(s.written(), "QUIT\r\n");
        s.session.handle_close("connection closed by peer");
        s.drain();
        let closed = s.closed.unwrap();
        assert!(!closed.established);
        assert_eq!(closed.reply.enhanced, Some(EnhancedCode::new(4, 7, 10)));
        assert!(
            closed.reply.text.contains("does not offer STARTTLS"),
            "{}",
            closed.reply.text
        );
        // A refused STARTTLS under the same policy fails too.
        let mut s = tls_script(StartTls::Required, None);
        s.server(
            "220 mx ESMTP\r\n250-mx\r\n250 STARTTLS\r\n"
                .split_inclusive("\r\n")
                .next()
                .unwrap(),
        );
        s.written();
        s.server("250-mx\r\n250 STARTTLS\r\n");
        s.expect("STARTTLS\r\n");
        s.server("454 4.7.0 TLS not available due to temporary reason\r\n");
        s.expect("QUIT\r\n");
        s.server("221 2.0.0 Bye\r\n");
        let closed = s.closed.unwrap();
        assert_eq!(closed.reply.code, 454);
        assert!(
            closed.reply.text.starts_with("STARTTLS refused"),
            "{}",
            closed.reply.text
        );
    }

    #[test]
    fn opportunistic_tls_refused_carries_on_in_plaintext() {
        let mut s = tls_script(StartTls::Opportunistic, None);
        s.server("220 mx ESMTP\r\n");
        s.written();
        s.server("250-mx\r\n250 STARTTLS\r\n");
        s.expect("STARTTLS\r\n");
        s.server("454 4.7.0 not now\r\n");
        assert!(s.session.is_established());
        assert!(!s.session.is_tls());
    }

    #[test]
    fn tls_handshake_failure_and_timeout_are_reported() {
        let mut s = tls_script(StartTls::Opportunistic, None);
        s.server("220 mx ESMTP\r\n");
        s.written();
        s.server("250-mx\r\n250 STARTTLS\r\n");
        s.written();
        s.server("220 go ahead\r\n");
        s.now += Timeouts::default().tls_handshake;
        s.session.handle_timeout(s.now);
        s.drain();
        let closed = s.closed.unwrap();
        assert_eq!(
            closed.reply.text,
            "TLS handshake failed: timed out after 30s"
        );
        assert_eq!(closed.reply.enhanced, Some(EnhancedCode::new(4, 7, 5)));
    }

    #[test]
    fn auth_plain_and_login() {
        let creds = Credentials::password("u", "p").unwrap();
        let mut s = tls_script(StartTls::Opportunistic, Some(creds.clone()));
        s.session.set_implicit_tls(s.now);
        s.session.set_certificate_verified();
        s.session.tls_established(s.now);
        s.server("220 mx ESMTP\r\n");
        s.written();
        s.server("250-mx\r\n250 AUTH PLAIN LOGIN\r\n");
        s.expect("AUTH PLAIN AHUAcA==\r\n");
        assert!(!s.session.can_accept());
        s.server("235 2.7.0 Authentication successful\r\n");
        assert!(s.session.is_established());

        let mut s = tls_script(StartTls::Opportunistic, Some(creds.clone()));
        s.session.set_implicit_tls(s.now);
        s.session.set_certificate_verified();
        s.session.tls_established(s.now);
        s.server("220 mx ESMTP\r\n");
        s.written();
        s.server("250-mx\r\n250 AUTH=LOGIN\r\n");
        s.expect("AUTH LOGIN\r\n");
        s.server("334 VXNlcm5hbWU6\r\n");
        s.expect("dQ==\r\n");
        s.server("334 UGFzc3dvcmQ6\r\n");
        s.expect("cA==\r\n");
        s.server("535 5.7.8 Authentication credentials invalid\r\n");
        s.expect("QUIT\r\n");
        s.server("221 2.0.0 Bye\r\n");
        let closed = s.closed.unwrap();
        assert_eq!(closed.reply.code, 535);
        assert_eq!(
            closed.reply.text,
            "authentication failed: 535 5.7.8 Authentication credentials invalid"
        );
        assert!(!closed.reply.text.contains("cA=="));
    }

    /// Issue 12, defect 1: encrypted but unverified is not enough for credentials.
    #[test]
    fn auth_is_never_sent_over_unverified_tls() {
        let creds = Credentials::password("u", "p").unwrap();
        let mut s = tls_script(StartTls::Opportunistic, Some(creds));
        s.session.set_implicit_tls(s.now);
        s.session.tls_established(s.now);
        s.server("220 mx ESMTP\r\n");
        s.written();
        s.server("250-mx\r\n250 AUTH PLAIN\r\n");
        // No AUTH: the session ends politely (RFC 5321 4.1.1.10), the cause kept.
        s.expect("QUIT\r\n");
        s.server("221 2.0.0 Bye\r\n");
        let closed = s.closed.unwrap();
        assert_eq!(closed.reply.enhanced, Some(EnhancedCode::new(4, 7, 10)));
        assert!(
            closed.reply.text.contains("certificate was not verified"),
            "{}",
            closed.reply.text
        );
    }

    /// Issue 12, defect 5: implicit TLS's handshake has the handshake timeout, then the
    /// greeting its own.
    #[test]
    fn implicit_tls_handshake_then_greeting_timeouts() {
        let mut s = tls_script(StartTls::Opportunistic, None);
        let start = s.now;
        s.session.set_implicit_tls(start);
        assert_eq!(
            s.session.deadline(),
            Some(start + Timeouts::default().tls_handshake)
        );
        s.session.tls_established(start + Duration::from_secs(1));
        assert_eq!(
            s.session.deadline(),
            Some(start + Duration::from_secs(1) + Timeouts::default().greeting)
        );

        let mut s = tls_script(StartTls::Opportunistic, None);
        s.session.set_implicit_tls(s.now);
        s.now += Timeouts::default().tls_handshake;
        s.session.handle_timeout(s.now);
        s.drain();
        assert_eq!(
            s.closed.unwrap().reply.text,
            "TLS handshake failed: timed out after 30s"
        );
    }

    #[test]
    fn auth_is_never_sent_in_plaintext() {
        let creds = Credentials::password("u", "p").unwrap();
        let mut s = tls_script(StartTls::Opportunistic, Some(creds));
        s.server("220 mx ESMTP\r\n");
        s.written();
        s.server("250-mx\r\n250 AUTH PLAIN\r\n");
        assert_eq!(s.written(), "QUIT\r\n");
        s.server("221 2.0.0 Bye\r\n");
        let closed = s.closed.unwrap();
        assert!(
            closed.reply.text.contains("not encrypted"),
            "{}",
            closed.reply.text
        );
    }

    #[test]
    fn reply_before_its_command_is_a_protocol_error() {
        let mut s = Script::new(false);
        // A "250" in the same packet as the greeting cannot answer an EHLO not yet sent.
        s.server("220 mx ESMTP\r\n250 fake\r\n");
        let closed = s.closed.unwrap();
        assert!(closed
            .reply
            .text
            .starts_with("reply arrived before its command was sent"));
    }
}
