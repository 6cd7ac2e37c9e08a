//! The resolver thread's own DNS transport for the common case: one question over UDP to a
//! configured recursive nameserver, answered in one datagram.
//!
//! Hickory's resolver opens a socket per query and runs each through several layers of
//! futures: about 150 µs of CPU per domain (MX, A and AAAA) against about 34 µs here, which at
//! bulk scale (10,000 new domains) was most of the resolver thread's work. Here a few
//! connected UDP sockets per nameserver carry many queries at once, matched to their answers by
//! message ID and question. The message format is still hickory's (`hickory-proto`); only the
//! transport is ours. Anything out of the ordinary (a truncated answer, which needs TCP; a
//! server that refuses EDNS) is reported so that the caller hands the query to hickory.
//!
//! Spoofing resistance is that of a stub resolver (RFC 5452): random 16-bit IDs from a CSPRNG,
//! random source ports (the kernel's) that change every `QUERIES_PER_SOCKET` queries or
//! `SOCKET_LIFETIME`, whichever comes first, sockets connected to the nameserver so that the
//! kernel drops datagrams from any other address, and a datagram counts as the answer only when
//! its ID, flags and question all match (a stray one does not use the question up).
//!
//! A nameserver that times out or refuses is avoided for `SUSPECT_FOR` while another is
//! available. This module must not cache, turn records into routing decisions, or block.

use hickory_resolver::proto::op::{
    Edns, Header, Message, MessageType, OpCode, Query as Question, ResponseCode,
};
use hickory_resolver::proto::rr::{Name, RecordType};
use hickory_resolver::proto::serialize::binary::{BinDecodable, BinDecoder};
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::{oneshot, Notify, Semaphore};

/// Sockets kept open per nameserver; queries are spread over them in turn.
const SOCKETS_PER_SERVER: usize = 8;
/// A socket carries this many queries at most before a new one (with a new random port) takes
/// its place...
const QUERIES_PER_SOCKET: u32 = 2_000;
/// ... and is used for this long at most, so that a quiet sender's ports change too.
const SOCKET_LIFETIME: Duration = Duration::from_secs(60);
/// Queries sent to one nameserver in the last `FRESH_QUERY_TIME` at most; more wait their turn.
/// A burst of thousands of new domains would otherwise overflow the server's socket buffer (a
/// default Linux buffer holds about 200 small datagrams), and every datagram dropped there
/// costs a full timeout here. Only fresh queries count: one still unanswered after that long
/// has left the server's buffer, and a run of slow domains must not hold up the others.
const MAX_FRESH_QUERIES_PER_SERVER: usize = 100;
const FRESH_QUERY_TIME: Duration = Duration::from_millis(100);
/// How long a nameserver that timed out or refused is tried only after the others.
const SUSPECT_FOR: Duration = Duration::from_secs(30);
/// The EDNS UDP payload size offered (the DNS flag day 2020 value): big MX sets fit, and
/// fragmentation is avoided.
const EDNS_PAYLOAD: u16 = 1232;
/// Room for the largest datagram a server may send within `EDNS_PAYLOAD`, and some slack for
/// servers that ignore it (their answers are cut and fail to parse rather than overflow).
const RECEIVE_BUFFER: usize = 4096;
/// Receive buffer asked for each socket (the kernel may cap it at `net.core.rmem_max`), so that
/// answers to all questions in flight fit while the thread is busy elsewhere.
const SOCKET_RECEIVE_BUFFER: usize = 1 << 20;

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

/// Queries over UDP to the nameservers, `tries` times in all (at least once each), each within
/// `timeout`.
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
    fresh: Semaphore,
    /// Until when this server is asked only after the others.
    suspect_until: Mutex<Option<Instant>>,
}

#[derive(Debug, Default)]
struct Sockets {
    open: Vec<Arc<Channel>>,
    next: usize,
}

/// Where a question's answer (the datagram) or the reason for none goes, and the question
/// that answer must carry.
#[derive(Debug)]
struct Waiting {
    name: Name,
    record_type: RecordType,
    answer: oneshot::Sender<Result<Vec<u8>, String>>,
}

/// One connected UDP socket and the questions waiting for an answer on it.
#[derive(Debug)]
struct Channel {
    socket: UdpSocket,
    opened: Instant,
    waiting: Mutex<HashMap<u16, Waiting>>,
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
                    fresh: Semaphore::new(MAX_FRESH_QUERIES_PER_SERVER),
                    suspect_until: Mutex::new(None),
                })
                .collect(),
            timeout,
            tries: tries.max(servers.len()).max(1),
        }
    }

    /// How many times one query may be sent.
    pub(super) fn tries(&self) -> usize {
        self.tries
    }

    /// Asks for the `record_type` records of `name` (fully qualified), recursion desired. Must
    /// run inside the resolver thread's tokio runtime.
    pub(super) async fn query(&self, name: &Name, record_type: RecordType) -> Reply {
        // Servers in their configured order, those recently failing last.
        let now = Instant::now();
        let mut order: Vec<&Server> = self.servers.iter().collect();
        order.sort_by_key(|server| server.is_suspect(now));
        let mut why = String::from("no nameserver was asked");
        for attempt in 0..self.tries {
            let server = order[attempt % order.len()];
            match self.ask(server, name, record_type).await {
                Ok(Some(answer)) => {
                    // SERVFAIL and REFUSED are this server's problem: another may answer.
                    let code = answer.metadata.response_code;
                    let failed = matches!(code, ResponseCode::ServFail | ResponseCode::Refused);
                    if failed && attempt + 1 < self.tries && order.len() > 1 {
                        server.suspect(Instant::now());
                        why = format!("{} answered {code}", server.addr);
                        continue;
                    }
                    return Reply::Answer(answer);
                }
                Ok(None) => return Reply::Truncated,
                Err(error) => {
                    server.suspect(Instant::now());
                    why = error;
                }
            }
        }
        Reply::Failed(why)
    }

    /// One try at one server, all within `timeout`: the answer, `None` when it was truncated,
    /// or why there is none.
    async fn ask(
        &self,
        server: &Server,
        name: &Name,
        record_type: RecordType,
    ) -> Result<Option<Box<Message>>, String> {
        let no_answer = || {
            format!(
                "no answer from the nameserver {} within {} s",
                server.addr,
                self.timeout.as_secs_f32()
            )
        };
        let deadline = tokio::time::Instant::now() + self.timeout;
        // The semaphore is never closed, so acquiring fails only by running out of time.
        let fresh = tokio::time::timeout_at(deadline, server.fresh.acquire())
            .await
            .map_err(|_| no_answer())?
            .map_err(|_| no_answer())?;
        let channel = server.channel().map_err(|e| {
            format!(
                "cannot open a socket to the nameserver {}: {e}",
                server.addr
            )
        })?;
        let (id, answer) = channel.register(name, record_type);
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
        let answer = tokio::time::timeout_at(deadline, answer);
        tokio::pin!(answer);
        // The turn among fresh queries ends with the answer or after a moment, whichever is
        // first; then the answer is awaited without it.
        let early = tokio::time::timeout(FRESH_QUERY_TIME, &mut answer).await;
        drop(fresh);
        let received = match early {
            Ok(received) => received,
            Err(_) => answer.await,
        };
        drop(registration);
        let bytes = match received {
            Ok(Ok(Ok(bytes))) => bytes,
            Ok(Ok(Err(error))) => return Err(format!("nameserver {}: {error}", server.addr)),
            Ok(Err(_)) => return Err(format!("nameserver {}: the socket closed", server.addr)),
            Err(_) => return Err(no_answer()),
        };
        server.healthy();
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
        Ok(Some(Box::new(message)))
    }
}

impl Server {
    fn is_suspect(&self, now: Instant) -> bool {
        lock(&self.suspect_until).is_some_and(|until| until > now)
    }

    fn suspect(&self, now: Instant) {
        *lock(&self.suspect_until) = Some(now + SUSPECT_FOR);
    }

    fn healthy(&self) {
        *lock(&self.suspect_until) = None;
    }

    /// The next socket in turn, opening or replacing it as needed.
    fn channel(&self) -> io::Result<Arc<Channel>> {
        let mut sockets = lock(&self.sockets);
        let slot = sockets.next % SOCKETS_PER_SERVER;
        sockets.next = sockets.next.wrapping_add(1);
        let usable = sockets.open.get(slot).is_some_and(|c| {
            let fresh = c.opened.elapsed() < SOCKET_LIFETIME;
            if !fresh {
                c.retire();
            }
            fresh && !c.retired.load(Ordering::Relaxed)
        });
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
            opened: Instant::now(),
            waiting: Mutex::new(HashMap::new()),
            sent: AtomicU32::new(0),
            retired: AtomicBool::new(false),
            wake_reader: Notify::new(),
        });
        tokio::spawn(read_answers(Arc::clone(&channel)));
        Ok(channel)
    }

    /// A fresh random ID not in use on this socket for `name`/`record_type`, and where its
    /// answer will arrive. At most `MAX_FRESH_QUERIES_PER_SERVER` plus the slow queries are
    /// outstanding, far fewer than the 65,536 IDs.
    fn register(
        &self,
        name: &Name,
        record_type: RecordType,
    ) -> (u16, oneshot::Receiver<Result<Vec<u8>, String>>) {
        let (answer, receiver) = oneshot::channel();
        let mut waiting = lock(&self.waiting);
        loop {
            let id: u16 = rand::random();
            if let std::collections::hash_map::Entry::Vacant(slot) = waiting.entry(id) {
                slot.insert(Waiting {
                    name: name.clone(),
                    record_type,
                    answer,
                });
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
        for (_, question) in waiting {
            let _ = question.answer.send(Err(why.to_string()));
        }
    }

    /// Hands `datagram` to the question it answers, if one waits for it.
    fn deliver(&self, datagram: &[u8]) {
        let id = u16::from_be_bytes([datagram[0], datagram[1]]);
        let mut waiting = lock(&self.waiting);
        let answers = waiting
            .get(&id)
            .is_some_and(|q| answers(datagram, &q.name, q.record_type));
        if answers {
            if let Some(question) = waiting.remove(&id) {
                drop(waiting);
                let _ = question.answer.send(Ok(datagram.to_vec()));
            }
        }
    }
}

/// Whether `datagram` is a response to a standard query for `name`/`record_type`: by its
/// flags and question (a datagram with the right ID alone may be stray or forged). A response
/// without a question is taken only as a refusal (FORMERR, NOTIMP, SERVFAIL, REFUSED), which
/// some servers send without echoing it.
fn answers(datagram: &[u8], name: &Name, record_type: RecordType) -> bool {
    let mut decoder = BinDecoder::new(datagram);
    let Ok(header) = Header::read(&mut decoder) else {
        return false;
    };
    let metadata = header.metadata;
    if metadata.message_type != MessageType::Response || metadata.op_code != OpCode::Query {
        return false;
    }
    if header.counts.queries == 0 {
        return matches!(
            metadata.response_code,
            ResponseCode::FormErr
                | ResponseCode::NotImp
                | ResponseCode::ServFail
                | ResponseCode::Refused
        );
    }
    Question::read(&mut decoder).is_ok_and(|q| q.name == *name && q.query_type == record_type)
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

/// Hands each datagram to the question it answers; others (late, duplicated, stray or forged)
/// are dropped. Stops once the channel is retired and idle.
async fn read_answers(channel: Arc<Channel>) {
    let mut buffer = vec![0u8; RECEIVE_BUFFER];
    loop {
        if channel.finished() {
            return;
        }
        tokio::select! {
            () = channel.wake_reader.notified() => {}
            received = channel.socket.recv(&mut buffer) => match received {
                Ok(len) if len >= 12 => channel.deliver(&buffer[..len]),
                // Shorter than a DNS header: not an answer.
                Ok(_) => {}
                // An ICMP port unreachable, reported on the connected socket: nothing listens
                // there. The questions on this socket fail now rather than at their timeout
                // (forging one takes the socket's port, as forging an answer does), and the
                // socket is replaced.
                Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
                    channel.retire();
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
