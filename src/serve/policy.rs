//! What `mxpipe serve` does with mail a listener accepts: who may inject (an allowed network or
//! an authenticated user), the per-client rate, the `Received:` trace header, and the hand-off
//! to the engine in one of two modes.
//!
//! - *Custody*: the message goes to the spool; the 250 waits until the spool's group commit has
//!   made it durable ([`Dispatcher::durable_id`]), so a crash after the 250 loses nothing.
//! - *Pass-through*: the message goes to an engine without a spool; each recipient's reply waits
//!   for its delivery outcome (250, the remote's 5xx, or 4xx for a deferral or the deadline),
//!   so the upstream MTA stays the queue of record.
//!
//! A full queue or spool is 452 4.3.1 at once: never accepted and dropped. Everything here runs
//! on the listener's loop thread and must not block: the pending replies are checked at the
//! loop's next turn.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::Receiver;
use ipnet::IpNet;

use super::auth::PasswordFile;
use super::config::{Mode, Protocol};
use crate::engine::{Dispatcher, Event, EventKind};
use crate::error::{Error, SpoolProblem};
use crate::message::dsn::{DsnEnvelope, EsmtpParams};
use crate::message::mime::format_date;
use crate::message::Message;
use crate::server::session::Parameter;
use crate::server::{ConnectionId, Peer, Policy, Ready, Transaction, Verdict};

/// How often the loop asks for pending replies while some are waiting: about one spool group
/// commit, so custody adds little to a transaction's latency.
const CHECK_INTERVAL: Duration = Duration::from_millis(1);

/// How long a custody reply waits for durability before the client is told to try again (the
/// spool failed or is stuck; the copy it may still write is then a duplicate at worst).
const DURABILITY_TIMEOUT: Duration = Duration::from_secs(60);

/// The rate window of `messages_per_client_per_minute`.
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// One listener's policy.
pub(crate) struct ServePolicy {
    pub(crate) hostname: String,
    pub(crate) protocol: Protocol,
    pub(crate) mode: Mode,
    pub(crate) allow_networks: Vec<IpNet>,
    pub(crate) passwords: Option<Arc<PasswordFile>>,
    pub(crate) dispatcher: Arc<Dispatcher>,
    /// Pass-through: the engine's outcome events.
    pub(crate) events: Option<Receiver<Event>>,
    pub(crate) deadline: Duration,
    /// 0: no limit.
    pub(crate) messages_per_client_per_minute: u32,
    rates: HashMap<IpAddr, (Instant, u32)>,
    /// Custody: messages waiting for durability, in identifier order.
    durable_wait: VecDeque<(ConnectionId, u64, usize, Instant)>,
    /// Pass-through: messages waiting for their outcomes, by identifier.
    outcome_wait: HashMap<u64, Held>,
    ready: Vec<Ready>,
}

/// A pass-through message waiting for the outcome of each recipient.
struct Held {
    connection: ConnectionId,
    recipients: Vec<String>,
    replies: Vec<Option<String>>,
    deadline: Instant,
}

impl ServePolicy {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        hostname: String,
        protocol: Protocol,
        mode: Mode,
        allow_networks: Vec<IpNet>,
        passwords: Option<Arc<PasswordFile>>,
        dispatcher: Arc<Dispatcher>,
        deadline: Duration,
        messages_per_client_per_minute: u32,
    ) -> ServePolicy {
        let events = match mode {
            Mode::PassThrough => dispatcher.events(),
            Mode::Custody => None,
        };
        ServePolicy {
            hostname,
            protocol,
            mode,
            allow_networks,
            passwords,
            dispatcher,
            events,
            deadline,
            messages_per_client_per_minute,
            rates: HashMap::new(),
            durable_wait: VecDeque::new(),
            outcome_wait: HashMap::new(),
            ready: Vec::new(),
        }
    }

    /// The same reply for every recipient (LMTP), or once (SMTP).
    fn replies(&self, line: &str, recipients: usize) -> Vec<u8> {
        let times = match self.protocol {
            Protocol::Lmtp => recipients.max(1),
            Protocol::Smtp => 1,
        };
        format!("{line}\r\n").repeat(times).into_bytes()
    }

    /// The `Received:` header (RFC 5321 4.4, protocol names of RFC 3848).
    fn received(&self, peer: &Peer, transaction: &Transaction, id: &str) -> String {
        let ip = match peer.addr.ip() {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("IPv6:{ip}"),
        };
        let helo: String = peer
            .helo
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(255)
            .collect();
        let mut with = match self.protocol {
            Protocol::Smtp => "ESMTP".to_owned(),
            Protocol::Lmtp => "LMTP".to_owned(),
        };
        if peer.encrypted {
            with.push('S');
        }
        if peer.user.is_some() {
            with.push('A');
        }
        // "for" only with one recipient, so that a message does not tell its recipients of
        // each other.
        let for_clause = match transaction.recipients.as_slice() {
            [only] => format!("\r\n\tfor <{}>", only.address),
            _ => String::new(),
        };
        format!(
            "Received: from {helo} ([{ip}])\r\n\tby {host} (mxpipe) with {with} id {id}{for_clause};\r\n\t{date}\r\n",
            host = self.hostname,
            date = format_date(SystemTime::now()),
        )
    }

    /// The reply to a recipient from its delivery outcome (pass-through).
    fn outcome_reply(event: &Event) -> Option<String> {
        let reply = &event.reply;
        let text = reply.text.replace(['\r', '\n'], " ");
        let enhanced = reply.enhanced.map(|e| e.to_string());
        Some(match event.kind {
            EventKind::Delivered => format!(
                "250 2.0.0 <{}> delivered via {}",
                event.recipient, event.destination
            ),
            EventKind::Bounced if (500..600).contains(&reply.code) => format!(
                "{} {} {text}",
                reply.code,
                enhanced.unwrap_or_else(|| "5.0.0".to_owned())
            ),
            EventKind::Bounced => format!("554 5.0.0 {text}"),
            EventKind::Deferred | EventKind::Expired if (400..500).contains(&reply.code) => {
                format!(
                    "{} {} {text}",
                    reply.code,
                    enhanced.unwrap_or_else(|| "4.0.0".to_owned())
                )
            }
            EventKind::Deferred | EventKind::Expired => format!("451 4.4.1 {text}"),
        })
    }

    /// Takes in the engine's outcomes and the deadlines that passed (pass-through).
    fn collect_outcomes(&mut self) {
        if let Some(events) = &self.events {
            for event in events.try_iter() {
                let Some(held) = self.outcome_wait.get_mut(&event.message_id) else {
                    continue;
                };
                let recipient = event.recipient.to_string();
                let slot = held
                    .recipients
                    .iter()
                    .zip(held.replies.iter_mut())
                    .find(|(address, reply)| reply.is_none() && **address == recipient);
                if let Some((_, reply)) = slot {
                    *reply = ServePolicy::outcome_reply(&event);
                }
            }
        }
        let now = Instant::now();
        let protocol = self.protocol;
        let mut done = Vec::new();
        for (&id, held) in &mut self.outcome_wait {
            if now >= held.deadline {
                for reply in held.replies.iter_mut().filter(|r| r.is_none()) {
                    *reply = Some(
                        "451 4.4.7 Delivery not confirmed in time, try again later".to_owned(),
                    );
                }
            }
            if held.replies.iter().all(Option::is_some) {
                done.push(id);
            }
        }
        for id in done {
            let held = self.outcome_wait.remove(&id).expect("listed above");
            let mut replies = Vec::new();
            let lines: Vec<String> = held.replies.into_iter().flatten().collect();
            match protocol {
                Protocol::Lmtp => {
                    for line in lines {
                        replies.extend_from_slice(line.as_bytes());
                        replies.extend_from_slice(b"\r\n");
                    }
                }
                // SMTP pass-through has one recipient per transaction (the listener answers a
                // second RCPT 452), so its one outcome is the message's.
                Protocol::Smtp => {
                    replies.extend_from_slice(lines[0].as_bytes());
                    replies.extend_from_slice(b"\r\n");
                }
            }
            self.ready.push(Ready {
                connection: held.connection,
                replies,
            });
        }
    }

    /// Releases custody replies whose messages are durable now.
    fn collect_durable(&mut self) {
        let durable = self.dispatcher.durable_id();
        let now = Instant::now();
        while let Some(&(connection, id, recipients, since)) = self.durable_wait.front() {
            let line = if id <= durable {
                format!("250 2.0.0 Ok: queued as {id}")
            } else if now.duration_since(since) >= DURABILITY_TIMEOUT {
                "451 4.3.0 Error: the message could not be stored, try again later".to_owned()
            } else {
                break;
            };
            self.durable_wait.pop_front();
            let replies = self.replies(&line, recipients);
            self.ready.push(Ready {
                connection,
                replies,
            });
        }
    }
}

impl Policy for ServePolicy {
    fn rcpt(&mut self, peer: &Peer, transaction: &Transaction, address: &[u8]) -> Option<Vec<u8>> {
        let allowed = peer.user.is_some()
            || self
                .allow_networks
                .iter()
                .any(|net| net.contains(&peer.addr.ip()));
        if !allowed {
            let address = String::from_utf8_lossy(address);
            return Some(format!("554 5.7.1 <{address}>: Relay access denied\r\n").into_bytes());
        }
        if self.mode == Mode::PassThrough
            && self.protocol == Protocol::Smtp
            && transaction.accepted >= 1
        {
            // One reply per message can only be each recipient's own outcome when the message
            // has one recipient: the client sends the others in transactions of their own.
            return Some(b"452 4.5.3 Too many recipients\r\n".to_vec());
        }
        if transaction.accepted == 0 && self.messages_per_client_per_minute > 0 {
            let now = Instant::now();
            let (start, count) = self.rates.entry(peer.addr.ip()).or_insert((now, 0));
            if now.duration_since(*start) >= RATE_WINDOW {
                *start = now;
                *count = 0;
            }
            if *count >= self.messages_per_client_per_minute {
                return Some(b"450 4.7.1 Rate limit exceeded, try again later\r\n".to_vec());
            }
            *count += 1;
            if self.rates.len() > 100_000 {
                self.rates
                    .retain(|_, (start, _)| now.duration_since(*start) < RATE_WINDOW);
            }
        }
        None
    }

    fn message(&mut self, peer: &Peer, transaction: &mut Transaction) -> Verdict {
        let n = transaction.recipients.len();
        let local_id = format!("{:x}{:x}", peer.id.generation, fastrand::u32(..));
        let mut content = self.received(peer, transaction, &local_id).into_bytes();
        content.extend_from_slice(&transaction.content);
        let message = match Message::new(
            &transaction.mail_from,
            transaction.recipients.iter().map(|r| r.address.as_str()),
            &content,
        ) {
            Ok(message) => message,
            Err(error) => {
                let text = error.to_string().replace(['\r', '\n'], " ");
                return Verdict::Reply(self.replies(&format!("554 5.6.0 {text}"), n));
            }
        };
        // The DSN request (RFC 3461) travels with the message to the next hop and into the
        // spool; a malformed one is refused by name, never passed on.
        let message = match dsn_request(transaction) {
            Ok(Some(dsn)) => message.with_dsn(dsn),
            Ok(None) => message,
            Err(error) => {
                let text = error.to_string().replace(['\r', '\n'], " ");
                return Verdict::Reply(self.replies(&format!("501 5.5.4 {text}"), n));
            }
        };
        match self.dispatcher.submit(message) {
            Ok(id) => {
                match self.mode {
                    Mode::Custody => {
                        self.durable_wait
                            .push_back((peer.id, id, n, Instant::now()));
                    }
                    Mode::PassThrough => {
                        self.outcome_wait.insert(
                            id,
                            Held {
                                connection: peer.id,
                                recipients: transaction
                                    .recipients
                                    .iter()
                                    .map(|r| r.address.clone())
                                    .collect(),
                                replies: vec![None; n],
                                deadline: Instant::now() + self.deadline,
                            },
                        );
                    }
                }
                Verdict::Pending
            }
            Err(refused) => {
                // Backpressure: the client keeps the message and tries again.
                let line = match refused.error {
                    Error::QueueFull
                    | Error::Spool(SpoolProblem::Full | SpoolProblem::LowSpace) => {
                        "452 4.3.1 Insufficient system storage, try again later".to_owned()
                    }
                    Error::ShutDown => {
                        "451 4.3.2 System not accepting messages, try again later".to_owned()
                    }
                    other => format!("451 4.3.0 Error: {other}"),
                };
                Verdict::Reply(self.replies(&line, n))
            }
        }
    }

    fn authenticate(&mut self, user: &str, password: &[u8]) -> bool {
        self.passwords
            .as_ref()
            .is_some_and(|file| file.verify(user, password))
    }

    fn take_ready(&mut self) -> Vec<Ready> {
        match self.mode {
            Mode::Custody if !self.durable_wait.is_empty() => self.collect_durable(),
            Mode::PassThrough if !self.outcome_wait.is_empty() => self.collect_outcomes(),
            _ => {}
        }
        std::mem::take(&mut self.ready)
    }

    fn check_interval(&self) -> Option<Duration> {
        (!self.durable_wait.is_empty() || !self.outcome_wait.is_empty()).then_some(CHECK_INTERVAL)
    }

    fn closed(&mut self, connection: ConnectionId) {
        // Nobody is left to answer; the work itself goes on (custody: it is mxpipe's now;
        // pass-through: the client retries, so a delivery may happen twice).
        self.outcome_wait
            .retain(|_, held| held.connection != connection);
    }
}

/// The transaction's DSN request, if its MAIL or any RCPT asked for one.
fn dsn_request(transaction: &Transaction) -> crate::Result<Option<DsnEnvelope>> {
    let is_dsn = |(keyword, _): &Parameter| {
        ["RET", "ENVID", "NOTIFY", "ORCPT"]
            .iter()
            .any(|k| keyword.eq_ignore_ascii_case(k))
    };
    let asked = transaction.mail_params.iter().any(is_dsn)
        || transaction
            .recipients
            .iter()
            .any(|r| r.parameters.iter().any(is_dsn));
    if !asked {
        return Ok(None);
    }
    let rcpts: Vec<(&str, EsmtpParams<&str>)> = transaction
        .recipients
        .iter()
        .map(|r| {
            let params = r
                .parameters
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_deref()))
                .collect();
            (r.address.as_str(), params)
        })
        .collect();
    let mail: EsmtpParams<&str> = transaction
        .mail_params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_deref()))
        .collect();
    DsnEnvelope::from_params(&mail, &rcpts).map(Some)
}
