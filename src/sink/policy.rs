//! What the sink does with mail: count it, capture it when asked, and play the scripted
//! [`Faults`](super::Faults) that concern recipients and messages. The protocol itself is the
//! shared server's ([`crate::server`]); this must stay a thin layer over it.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::capture::{Capture, Envelope};
use super::{Faults, SinkConfig};
use crate::server::{Counters, Peer, Policy, Transaction, Verdict, Via};

/// The sink's policy: accepts everything but what the faults refuse.
pub(super) struct SinkPolicy {
    faults: Faults,
    counters: Arc<Counters>,
    capture: Option<Capture>,
    /// Transactions still to be answered 451 (`Faults::tempfail_first_transactions`).
    tempfails_left: u32,
    /// The next queue id, which is also the capture file number.
    next_queue_id: u64,
}

impl SinkPolicy {
    /// Creates the capture directory, so that a bad path fails at start.
    pub(super) fn new(config: &SinkConfig, counters: Arc<Counters>) -> io::Result<SinkPolicy> {
        Ok(SinkPolicy {
            faults: config.faults.clone(),
            counters,
            capture: config
                .capture_dir
                .clone()
                .map(Capture::create)
                .transpose()?,
            tempfails_left: config.faults.tempfail_first_transactions,
            next_queue_id: 1,
        })
    }
}

impl Policy for SinkPolicy {
    fn rcpt(
        &mut self,
        _peer: &Peer,
        _transaction: &Transaction,
        address: &[u8],
    ) -> Option<Vec<u8>> {
        let matches = |patterns: &[String]| {
            patterns
                .iter()
                .any(|pattern| contains(address, pattern.as_bytes()))
        };
        let address = || String::from_utf8_lossy(address).into_owned();
        if matches(&self.faults.reject_rcpt) {
            Some(
                format!(
                    "550 5.1.1 <{}>: Recipient address rejected: User unknown\r\n",
                    address()
                )
                .into_bytes(),
            )
        } else if matches(&self.faults.tempfail_rcpt) {
            Some(
                format!(
                    "450 4.2.1 <{}>: Mailbox busy, try again later\r\n",
                    address()
                )
                .into_bytes(),
            )
        } else {
            None
        }
    }

    fn message(&mut self, _peer: &Peer, transaction: &mut Transaction) -> Verdict {
        if self.tempfails_left > 0 {
            self.tempfails_left -= 1;
            return Verdict::Reply(b"451 4.3.0 Temporary failure, try again\r\n".to_vec());
        }
        let id = self.next_queue_id;
        self.next_queue_id += 1;
        let stored = match &self.capture {
            Some(capture) => {
                let rcpt_to: Vec<String> = transaction
                    .recipients
                    .iter()
                    .map(|r| r.address.clone())
                    .collect();
                capture.store(
                    id,
                    &Envelope {
                        mail_from: &transaction.mail_from,
                        rcpt_to: &rcpt_to,
                        mail_params: &transaction.mail_params_text,
                        via: transaction.via.unwrap_or(Via::Data),
                    },
                    &transaction.content,
                )
            }
            None => Ok(()),
        };
        if stored.is_err() {
            // Not stored means not accepted: the client must keep the message.
            return Verdict::Reply(b"451 4.3.0 Error: could not store message\r\n".to_vec());
        }
        let counters = &self.counters;
        counters.messages.fetch_add(1, Ordering::Relaxed);
        counters
            .recipients
            .fetch_add(transaction.accepted as u64, Ordering::Relaxed);
        counters
            .bytes
            .fetch_add(transaction.size, Ordering::Relaxed);
        Verdict::Reply(format!("250 2.0.0 Ok: queued as {id:08}\r\n").into_bytes())
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty()
        || haystack
            .windows(needle.len())
            .any(|window| window == needle)
}
