//! One SMTP/LMTP server for every part of mxpipe that receives mail: the sink (benchmarks and
//! scripted faults), the `serve` injection listener, and later the inbound bounce listener.
//!
//! Like the client in [`crate::smtp`], the protocol is sans-IO: [`session`] takes octets and
//! gives replies and accepted transactions, and knows no socket or clock. What a server does
//! with mail (count it, capture it, spool it, deliver it and wait) is a [`Policy`] on top; the
//! policy may answer the end of a message at once or later ([`Verdict::Pending`]), which is how
//! custody waits for an fsync and pass-through for a delivery. [`listener`] is the `mio` loop
//! that moves octets between sockets, rustls and sessions. Nothing here may block: a policy
//! that must wait says so and is asked again.

pub(crate) mod listener;
mod scan;
pub(crate) mod session;
#[cfg(test)]
mod tests;
pub(crate) mod tls;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

pub(crate) use session::{Transaction, Via};

/// What a server offers and enforces, whatever its policy.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// The name in the greeting, the EHLO reply and trace headers.
    pub(crate) hostname: String,
    /// The advertised SIZE (RFC 1870); larger messages get 552 5.3.4.
    pub(crate) max_size: u64,
    pub(crate) pipelining: bool,
    pub(crate) chunking: bool,
    /// Speak LMTP (RFC 2033): LHLO instead of EHLO, one reply per recipient after the content.
    pub(crate) lmtp: bool,
    /// STARTTLS (or implicit TLS) with this configuration.
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    pub(crate) implicit_tls: bool,
    /// Offer AUTH PLAIN and LOGIN (RFC 4954), only over TLS.
    pub(crate) auth: bool,
    /// The whole greeting instead of `220 <host> ESMTP mxpipe` (scripted fault).
    pub(crate) greeting: Option<String>,
    /// Raw octets sent right after the greeting (scripted fault).
    pub(crate) after_greeting: Option<Vec<u8>>,
    /// Answer EHLO 502 (scripted fault).
    pub(crate) no_ehlo: bool,
    /// RCPT beyond this many accepted recipients gets 452 4.5.3.
    pub(crate) max_recipients: Option<usize>,
    /// After this many transactions on a connection, the next command gets 421.
    pub(crate) close_after_transactions: Option<u32>,
    /// Close without a reply when content starts (scripted fault).
    pub(crate) drop_during_data: bool,
    /// Hold every reply this long (scripted fault).
    pub(crate) reply_delay: Option<Duration>,
    /// Connections beyond this many get a 421 greeting.
    pub(crate) max_connections: Option<usize>,
    /// Connections from one client address beyond this many get a 421 greeting.
    pub(crate) max_connections_per_client: Option<usize>,
    /// Refuse command and content lines that end in a bare LF, and a "." line that does not end
    /// in CRLF, with 521 and a disconnect, as Postfix's `smtpd_forbid_bare_newline` does.
    pub(crate) forbid_bare_newline: bool,
    /// Keep the envelope and the content of each transaction for the policy (capture, serve);
    /// otherwise content is only scanned.
    pub(crate) keep_content: bool,
}

impl Settings {
    /// A plain server named `hostname` with nothing scripted and nothing kept.
    pub(crate) fn new(hostname: &str, max_size: u64) -> Settings {
        Settings {
            hostname: hostname.to_owned(),
            max_size,
            pipelining: true,
            chunking: true,
            lmtp: false,
            tls: None,
            implicit_tls: false,
            auth: false,
            greeting: None,
            after_greeting: None,
            no_ehlo: false,
            max_recipients: None,
            close_after_transactions: None,
            drop_during_data: false,
            reply_delay: None,
            max_connections: None,
            max_connections_per_client: None,
            forbid_bare_newline: false,
            keep_content: false,
        }
    }
}

/// A server's figures, written by the loop thread and read by anyone.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) connections: AtomicU64,
    pub(crate) refused_connections: AtomicU64,
    pub(crate) tls_handshakes: AtomicU64,
    pub(crate) messages: AtomicU64,
    pub(crate) recipients: AtomicU64,
    pub(crate) bytes: AtomicU64,
    pub(crate) rejected_recipients: AtomicU64,
}

/// One connection, as its policy sees it: unique for the life of the server (a reused slab slot
/// gets a new generation), so a late answer can never reach the wrong client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ConnectionId {
    pub(crate) key: usize,
    pub(crate) generation: u64,
}

/// Who is on the other end of a session.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    pub(crate) id: ConnectionId,
    pub(crate) addr: SocketAddr,
    /// The EHLO/HELO/LHLO argument.
    pub(crate) helo: String,
    pub(crate) encrypted: bool,
    /// The user AUTH logged in as.
    pub(crate) user: Option<String>,
}

/// The answer to the end of a message's content.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// These reply lines now (LMTP: one per accepted recipient).
    Reply(Vec<u8>),
    /// Later, through [`Policy::take_ready`]; the session reads no more commands until then.
    Pending,
}

/// A pending verdict that is now known.
#[derive(Debug)]
pub(crate) struct Ready {
    pub(crate) connection: ConnectionId,
    pub(crate) replies: Vec<u8>,
}

/// What a server does with the mail it is offered. Called on the loop thread: must not block.
pub(crate) trait Policy {
    /// RCPT of `address` (syntax already checked): `None` accepts it, `Some(reply)` refuses it
    /// with that reply line (CRLF included).
    fn rcpt(&mut self, peer: &Peer, transaction: &Transaction, address: &[u8]) -> Option<Vec<u8>>;
    /// The content of `transaction` is complete and within the size limit.
    fn message(&mut self, peer: &Peer, transaction: &mut Transaction) -> Verdict;
    /// AUTH with these credentials (over TLS only).
    fn authenticate(&mut self, _user: &str, _password: &[u8]) -> bool {
        false
    }
    /// Pending verdicts that are known now.
    fn take_ready(&mut self) -> Vec<Ready> {
        Vec::new()
    }
    /// While verdicts are pending: how soon to ask [`Policy::take_ready`] again.
    fn check_interval(&self) -> Option<Duration> {
        None
    }
    /// A connection went away; a pending verdict for it no longer has anyone to answer.
    fn closed(&mut self, _connection: ConnectionId) {}
}
