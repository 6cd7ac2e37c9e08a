//! The resolver thread's own DNS transport for the common case: one question over UDP to a
//! configured recursive nameserver, answered in one datagram.
//!
//! Hickory's resolver opens a socket per query and runs each through several layers of
//! futures; at bulk scale (10,000 new domains a minute) that was most of the resolver thread's
//! CPU. Here a few long-lived, connected UDP sockets per nameserver carry many queries at once,
//! matched to their answers by message ID. The message format is still hickory's
//! (`hickory-proto`); only the transport is ours. Anything out of the ordinary (a truncated
//! answer, which needs TCP) is reported so that the caller hands the query to hickory.
//!
//! Spoofing resistance is that of a stub resolver: random 16-bit IDs (from a CSPRNG), a random
//! source port per socket that changes every `QUERIES_PER_SOCKET` queries, sockets connected to
//! the nameserver so that the kernel drops datagrams from any other address, and answers whose
//! question differs from the one asked are refused. It must not cache, parse records into
//! routing decisions, or block: that is `lookup`'s job.

use hickory_resolver::proto::op::{Edns, Message, MessageType, OpCode, Query as Question};
use hickory_resolver::proto::rr::{Name, RecordType};
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::{oneshot, Notify, Semaphore};

/// Sockets kept open per nameserver; queries are spread over them in turn.
const SOCKETS_PER_SERVER: usize = 4;
/// Questions outstanding at one nameserver at most; more wait their turn. A burst of thousands
/// of new domains would otherwise overflow the server's socket buffer (a default Linux buffer
/// holds about 200 small datagrams), and every datagram dropped there costs a full timeout
/// here. On loopback 100 in flight still allow several hundred thousand queries a second.
const MAX_IN_FLIGHT_PER_SERVER: usize = 100;
/// Receive buffer asked for each socket (the kernel may cap it at `net.core.rmem_max`), so that
/// answers to all questions in flight fit while the thread is busy elsewhere.
const SOCKET_RECEIVE_BUFFER: usize = 1 << 20;
/// A socket carries this many queries, then a new one (with a new random port) takes its place.
const QUERIES_PER_SOCKET: u32 = 2_000;
/// The EDNS UDP payload size offered (the DNS flag day 2020 value): big MX sets fit, and
/// fragmentation is avoided.
const EDNS_PAYLOAD: u16 = 1232;
/// Room for the largest datagram a server may send within `EDNS_PAYLOAD`, and some slack for
/// servers that ignore it (their answers are cut and fail to parse rather than overflow).
const RECEIVE_BUFFER: usize = 4096;

/// What became of one question.
#[derive(Debug)]
pub(super) enum Reply {
    /// An answer to the question asked, whatever its response code.
    Answer(Box<Message>),
    /// The answer did not fit a datagram (TC bit): ask again over TCP.
    Truncated,
    /// No usable answer from any nameserver within the tries: the text says why.
    Failed(String),
}

/// Queries over UDP to the nameservers in turn, `tries` times in all, each within `timeout`.
#[derive(Debug)]
pub(super) struct Stub {
    servers: Vec<Server>,
    timeout: Duration,
    tries: usize,
}

#[derive(Debug)]
struct Server {
    addr: SocketAddr,
    sockets: Mutex<Sockets>,
    in_flight: Semaphore,
}

#[derive(Debug, Default)]
struct Sockets {
    open: Vec<Arc<Channel>>,
    next: usize,
}

/// Where a question's answer (the datagram) or the reason for none goes.
type AnswerSender = oneshot::Sender<Result<Vec<u8>, String>>;

/// One connected UDP socket and the questions waiting for an answer on it.
#[derive(Debug)]
struct Channel {
    socket: UdpSocket,
    waiting: Mutex<HashMap<u16, AnswerSender>>,
    sent: AtomicU32,
    /// No new questions: the reader stops once the last waiting one is answered or gives up.
    retired: AtomicBool,
    wake_reader: Notify,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Only this module's short, panic-free critical sections hold these locks.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Stub {
    /// `servers` must not be empty; `tries` is at least 1.
    pub(super) fn new(servers: &[SocketAddr], timeout: Duration, tries: usize) -> Stub {
        Stub {
            servers: servers
                .iter()
                .map(|&addr| Server {
                    addr,
                    sockets: Mutex::new(Sockets::default()),
                    in_flight: Semaphore::new(MAX_IN_FLIGHT_PER_SERVER),
                })
                .collect(),
            timeout,
            tries: tries.max(1),
        }
    }

    /// Asks for the `record_type` records of `name` (fully qualified), recursion desired. Must
    /// run inside the resolver thread's tokio runtime.
    pub(super) async fn query(&self, name: &Name, record_type: RecordType) -> Reply {
        let mut why = String::from("no nameserver was asked");
        for attempt in 0..self.tries {
            let server = &self.servers[attempt % self.servers.len()];
            match self.ask(server, name, record_type).await {
                Ok(Some(answer)) => {
                    // SERVFAIL and REFUSED are this server's problem: another may answer.
                    let failed = matches!(
                        answer.metadata.response_code,
                        hickory_resolver::proto::op::ResponseCode::ServFail
                            | hickory_resolver::proto::op::ResponseCode::Refused
                    );
                    if failed && attempt + 1 < self.tries && self.servers.len() > 1 {
                        why = format!("{} answered {}", server.addr, answer.metadata.response_code);
                        continue;
                    }
                    return Reply::Answer(answer);
                }
                Ok(None) => return Reply::Truncated,
                Err(error) => why = error,
            }
        }
        Reply::Failed(why)
    }

    /// One try at one server: the answer, `None` when it was truncated, or why there is none.
    async fn ask(
        &self,
        server: &Server,
        name: &Name,
        record_type: RecordType,
    ) -> Result<Option<Box<Message>>, String> {
        // Held until this try ends. The semaphore is never closed, so acquiring cannot fail.
        let _turn = server
            .in_flight
            .acquire()
            .await
            .map_err(|_| "the resolver is shutting down".to_string())?;
        let channel = server.channel().map_err(|e| {
            format!(
                "cannot open a socket to the nameserver {}: {e}",
                server.addr
            )
        })?;
        let (id, answer) = channel.register();
        // Deregisters on every way out, a dropped future (the lookup's deadline) included.
        let registration = Registration {
            channel: &channel,
            id,
        };
        let question = encode(id, name, record_type)
            .map_err(|e| format!("cannot encode a DNS query for {name}: {e}"))?;
        channel
            .socket
            .send(&question)
            .await
            .map_err(|e| format!("cannot send to the nameserver {}: {e}", server.addr))?;
        let received = tokio::time::timeout(self.timeout, answer).await;
        drop(registration);
        let bytes = match received {
            Ok(Ok(Ok(bytes))) => bytes,
            Ok(Ok(Err(error))) => return Err(format!("nameserver {}: {error}", server.addr)),
            Ok(Err(_)) => return Err(format!("nameserver {}: the socket closed", server.addr)),
            Err(_) => {
                return Err(format!(
                    "no answer from the nameserver {} within {} s",
                    server.addr,
                    self.timeout.as_secs_f32()
                ))
            }
        };
        // The TC bit (RFC 1035 section 4.1.1) is read before parsing: a truncated answer may not
        // parse, and needs TCP either way.
        if bytes.get(2).is_some_and(|flags| flags & 0x02 != 0) {
            return Ok(None);
        }
        let message = Message::from_vec(&bytes).map_err(|e| {
            format!(
                "a malformed answer from the nameserver {}: {e}",
                server.addr
            )
        })?;
        let same_question = message
            .queries
            .first()
            .is_some_and(|q| q.name == *name && q.query_type == record_type);
        if message.metadata.message_type != MessageType::Response || !same_question {
            return Err(format!(
                "the nameserver {} answered another question",
                server.addr
            ));
        }
        Ok(Some(Box::new(message)))
    }
}

impl Server {
    /// The next socket in turn, opening or replacing it as needed.
    fn channel(&self) -> io::Result<Arc<Channel>> {
        let mut sockets = lock(&self.sockets);
        let slot = sockets.next % SOCKETS_PER_SERVER;
        sockets.next = sockets.next.wrapping_add(1);
        let usable = sockets
            .open
            .get(slot)
            .is_some_and(|c| !c.retired.load(Ordering::Relaxed));
        if !usable {
            let channel = Channel::open(self.addr)?;
            if slot < sockets.open.len() {
                sockets.open[slot] = channel;
            } else {
                sockets.open.push(channel);
            }
        }
        let channel = Arc::clone(&sockets.open[slot]);
        if channel.sent.fetch_add(1, Ordering::Relaxed) + 1 >= QUERIES_PER_SOCKET {
            channel.retire();
        }
        Ok(channel)
    }
}

impl Channel {
    /// A socket on a random local port (chosen by the kernel), connected to `server`, with a
    /// task reading its answers.
    fn open(server: SocketAddr) -> io::Result<Arc<Channel>> {
        let local = match server.ip() {
            IpAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            IpAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
        };
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(server),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        // Best effort: a smaller buffer only means drops sooner under a burst.
        let _ = socket.set_recv_buffer_size(SOCKET_RECEIVE_BUFFER);
        socket.bind(&local.into())?;
        socket.connect(&server.into())?;
        socket.set_nonblocking(true)?;
        let channel = Arc::new(Channel {
            socket: UdpSocket::from_std(socket.into())?,
            waiting: Mutex::new(HashMap::new()),
            sent: AtomicU32::new(0),
            retired: AtomicBool::new(false),
            wake_reader: Notify::new(),
        });
        tokio::spawn(read_answers(Arc::clone(&channel)));
        Ok(channel)
    }

    /// A fresh random ID not in use on this socket, and where its answer will arrive.
    fn register(&self) -> (u16, oneshot::Receiver<Result<Vec<u8>, String>>) {
        let (sender, receiver) = oneshot::channel();
        let mut waiting = lock(&self.waiting);
        loop {
            let id: u16 = rand::random();
            if let std::collections::hash_map::Entry::Vacant(slot) = waiting.entry(id) {
                slot.insert(sender);
                return (id, receiver);
            }
        }
    }

    fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        self.wake_reader.notify_one();
    }

    /// Retired and nobody waits: the reader may stop and the socket close.
    fn finished(&self) -> bool {
        self.retired.load(Ordering::Relaxed) && lock(&self.waiting).is_empty()
    }

    /// Fails every waiting question with `why`.
    fn fail_all(&self, why: &str) {
        let waiting: Vec<_> = lock(&self.waiting).drain().collect();
        for (_, sender) in waiting {
            let _ = sender.send(Err(why.to_string()));
        }
    }
}

/// A question's place in its channel's table, given up when the asker stops waiting.
struct Registration<'a> {
    channel: &'a Channel,
    id: u16,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        lock(&self.channel.waiting).remove(&self.id);
        if self.channel.retired.load(Ordering::Relaxed) {
            self.channel.wake_reader.notify_one();
        }
    }
}

/// Hands each datagram to the question with its ID; datagrams for no waiting question (late,
/// duplicated or forged) are dropped. Stops once the channel is retired and idle.
async fn read_answers(channel: Arc<Channel>) {
    let mut buffer = vec![0u8; RECEIVE_BUFFER];
    loop {
        if channel.finished() {
            return;
        }
        tokio::select! {
            () = channel.wake_reader.notified() => {}
            received = channel.socket.recv(&mut buffer) => match received {
                Ok(len) if len >= 12 => {
                    let id = u16::from_be_bytes([buffer[0], buffer[1]]);
                    let sender = lock(&channel.waiting).remove(&id);
                    if let Some(sender) = sender {
                        let _ = sender.send(Ok(buffer[..len].to_vec()));
                    }
                }
                // Shorter than a DNS header: not an answer.
                Ok(_) => {}
                // An ICMP port unreachable, reported on the connected socket: nothing listens
                // there, which concerns every question on this socket.
                Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
                    channel.fail_all("connection refused (nothing listens there)");
                }
                Err(error) => {
                    channel.retire();
                    channel.fail_all(&error.to_string());
                    return;
                }
            },
        }
    }
}

/// A recursive query for one question, with an EDNS OPT record (RFC 6891).
fn encode(
    id: u16,
    name: &Name,
    record_type: RecordType,
) -> Result<Vec<u8>, hickory_resolver::proto::ProtoError> {
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Question::query(name.clone(), record_type));
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD);
    message.set_edns(edns);
    message.to_vec()
}
