//! The inbound SMTP listener: takes mail for the bounce and unsubscribe domains (and nothing
//! else: other recipients get 550 5.7.1) and hands each message to [`super::Inbound`]; the
//! reply to the end of data is given after processing, so a message is acknowledged only when
//! its outcome and suppression are written (a write failure answers 451 and the sender
//! retries).
//!
//! It is the project's one SMTP server ([`crate::server`], shared with the sink and
//! `mxpipe serve`: PIPELINING, CHUNKING, 8BITMIME, SMTPUTF8, SIZE, ENHANCEDSTATUSCODES) with
//! an [`InboundPolicy`] that decides recipients and messages.

use super::report::MAX_REPORT_BYTES;
use super::unsubscribe::Shared;
use crate::server::listener::Server;
use crate::server::{Counters, Peer, Policy, Settings, Transaction, Verdict};
use mio::Waker;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::SystemTime;

/// The largest message taken; larger ones are refused with 552 (RFC 5321 4.5.3.1.10). Up to
/// it, messages larger than a report may be are taken and quarantined.
pub const MAX_MESSAGE: usize = 2 * MAX_REPORT_BYTES;
const MAX_RECIPIENTS: usize = 100;

/// Recipients: only the addresses [`super::Inbound::accepts`]; messages: processed before the
/// reply. Processing appends to local files (outcomes, suppression), which is short enough
/// for the loop thread at the rate bounces and complaints arrive.
struct InboundPolicy {
    state: Shared,
}

impl Policy for InboundPolicy {
    fn rcpt(&mut self, _peer: &Peer, _t: &Transaction, address: &[u8]) -> Option<Vec<u8>> {
        let address = String::from_utf8_lossy(address);
        let accepted = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .accepts(&address);
        (!accepted).then(|| {
            b"550 5.7.1 relay access denied: not a bounce or unsubscribe address\r\n".to_vec()
        })
    }

    fn message(&mut self, _peer: &Peer, transaction: &mut Transaction) -> Verdict {
        let recipients: Vec<String> = transaction
            .recipients
            .iter()
            .map(|r| r.address.clone())
            .collect();
        let result = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .receive(&recipients, &transaction.content, SystemTime::now());
        let line: &[u8] = match result {
            Ok(_) => b"250 2.0.0 Ok: processed\r\n",
            Err(_) => b"451 4.3.0 could not record the report, try again later\r\n",
        };
        Verdict::Reply(line.to_vec())
    }
}

/// A running inbound SMTP listener; dropping it stops it.
pub struct SmtpListener {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl SmtpListener {
    /// Binds `addr` and serves on a thread of its own, greeting as `hostname`.
    pub fn start(addr: SocketAddr, state: Shared, hostname: &str) -> io::Result<SmtpListener> {
        let mut settings = Settings::new(hostname, MAX_MESSAGE as u64);
        settings.keep_content = true;
        settings.max_recipients = Some(MAX_RECIPIENTS);
        let server = Server::bind(
            &[addr],
            settings,
            InboundPolicy { state },
            Arc::new(Counters::default()),
        )?;
        let addr = server.local_addr()?;
        let waker = server.waker();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("mxpipe-inbound-smtp".into())
            .spawn(move || server.run(&flag))?;
        Ok(SmtpListener {
            addr,
            stop,
            waker,
            thread: Some(thread),
        })
    }

    /// The address it listens on (with the port the OS gave when asked for 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops listening; open connections are closed, unanswered messages stay the sender's.
    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for SmtpListener {
    fn drop(&mut self) {
        self.shut();
    }
}
