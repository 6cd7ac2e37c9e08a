//! The server's event loop: one `mio::Poll` thread that accepts connections and moves octets
//! between sockets and [`Session`]s, for the sink and for `serve` alike.
//!
//! Per readable socket it does one read into a large buffer, lets the session answer every
//! complete command, and writes all the replies with one call, so a pipelining client costs
//! about two syscalls per round trip however many commands it batches; over TLS (see
//! [`TlsLayer`]) it is the same two. The reply delay fault is a deadline in a timer heap that
//! bounds the poll timeout; pending verdicts of the policy are asked for after every turn, and
//! at the policy's check interval while any is pending. This must never block or sleep: one slow client would stall every
//! other connection.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use rustls::ServerConfig;
use slab::Slab;

use super::session::{Context, End, Session, MAX_LINE};
use super::tls::TlsLayer;
use super::{ConnectionId, Counters, Policy, Settings};

/// Wakes the loop: to stop (with the stop flag set), or because a policy has verdicts ready.
const WAKER: Token = Token(0);
/// Listener `i` has token `FIRST_LISTENER + i`.
const FIRST_LISTENER: usize = 1;
/// Addresses one server may listen on.
const MAX_LISTENERS: usize = 64;
/// Connection `key` has token `FIRST_CONNECTION + key`.
const FIRST_CONNECTION: usize = FIRST_LISTENER + MAX_LISTENERS;

/// Octets read per connection at once. Large, so one read takes in everything a pipelining
/// client has sent; it must exceed [`MAX_LINE`], because a partial command line stays in the
/// buffer while more is read behind it.
const INPUT_CAPACITY: usize = 64 * 1024;
const _: () = assert!(INPUT_CAPACITY > 2 * MAX_LINE);

struct Connection {
    stream: TcpStream,
    /// Every octet goes through it from the 220 to STARTTLS on (implicit TLS: from accept).
    tls: Option<TlsLayer>,
    session: Session,
    /// `input[..filled]` has arrived (decrypted, with TLS) and is not consumed yet.
    input: Box<[u8]>,
    filled: usize,
    /// `output[written..]` is still to be sent.
    output: Vec<u8>,
    written: usize,
    /// Replies are held back until then (`Faults::reply_delay`).
    held_until: Option<Instant>,
    /// Tells this connection's timers from those of an earlier one with the same slab key.
    generation: u64,
    /// The client's address, for per-client limits and the policy.
    peer: IpAddr,
}

/// Connections the kernel may complete before the sink accepts them (capped by
/// `net.core.somaxconn`). The usual 128 overflows when a client opens thousands of connections
/// within a second; the kernel then answers with SYN cookies and drops the handshake's last ACK,
/// leaving the client with a connection that the sink never sees and that waits for a
/// greeting until the client's greeting timeout.
const LISTEN_BACKLOG: i32 = 4096;

/// A non-blocking listening socket on `addr` with a backlog of [`LISTEN_BACKLOG`].
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// The listening socket, the connections and the loop that drives them.
pub(crate) struct Server<P> {
    poll: Poll,
    /// The first address first: its port is the one [`Server::local_addr`] gives.
    listeners: Vec<TcpListener>,
    waker: Arc<Waker>,
    connections: Slab<Connection>,
    context: Context<P>,
    /// Present when the server speaks TLS.
    tls_config: Option<Arc<ServerConfig>>,
    implicit_tls: bool,
    /// Open connections per client address (for `Settings::max_connections_per_client`).
    per_client: HashMap<IpAddr, usize>,
    /// Held replies, earliest first: (release time, slab key, generation).
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    generations: u64,
}

impl<P: Policy> Server<P> {
    /// Binds the listening sockets, so that an address in use is reported to the caller.
    pub(crate) fn bind(
        addrs: &[SocketAddr],
        settings: Settings,
        policy: P,
        counters: Arc<Counters>,
    ) -> io::Result<Server<P>> {
        let tls_config = settings.tls.clone();
        let implicit_tls = settings.implicit_tls;
        let poll = Poll::new()?;
        if addrs.is_empty() || addrs.len() > MAX_LISTENERS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a server listens on 1 to {MAX_LISTENERS} addresses"),
            ));
        }
        let mut listeners = Vec::new();
        for (index, &addr) in addrs.iter().enumerate() {
            let mut listener = listen(addr)?;
            poll.registry().register(
                &mut listener,
                Token(FIRST_LISTENER + index),
                Interest::READABLE,
            )?;
            listeners.push(listener);
        }
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        Ok(Server {
            context: Context::new(settings, policy, counters),
            per_client: HashMap::new(),
            tls_config,
            implicit_tls,
            poll,
            listeners,
            waker,
            connections: Slab::new(),
            timers: BinaryHeap::new(),
            generations: 0,
        })
    }

    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listeners[0].local_addr()
    }

    pub(crate) fn waker(&self) -> Arc<Waker> {
        Arc::clone(&self.waker)
    }

    /// Serves until `stop` is set and the waker is woken. Connections still open are closed.
    pub(crate) fn run(mut self, stop: &AtomicBool) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timer = self
                .timers
                .peek()
                .map(|Reverse((due, _, _))| due.saturating_duration_since(Instant::now()));
            let check = self.context.policy.check_interval();
            let timeout = match (timer, check) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            }
            for event in &events {
                match event.token() {
                    WAKER => {
                        if stop.load(Ordering::Acquire) {
                            return Ok(());
                        }
                    }
                    Token(token) if token >= FIRST_CONNECTION => {
                        self.drive(token - FIRST_CONNECTION)
                    }
                    Token(token) => self.accept(token - FIRST_LISTENER),
                }
            }
            if !self.timers.is_empty() {
                self.release_held_replies();
            }
            self.deliver_verdicts();
        }
    }

    /// Gives the verdicts the policy has reached to their sessions, and carries on with those
    /// connections.
    fn deliver_verdicts(&mut self) {
        for ready in self.context.policy.take_ready() {
            let ConnectionId { key, generation } = ready.connection;
            let Some(connection) = self.connections.get_mut(key) else {
                continue;
            };
            if connection.generation != generation {
                continue;
            }
            connection
                .session
                .resume(&ready.replies, &mut connection.output);
            self.drive(key);
        }
    }

    fn accept(&mut self, listener: usize) {
        loop {
            let Some(listener) = self.listeners.get(listener) else {
                return;
            };
            let mut stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue
                }
                // Out of descriptors or memory: the pending connections wait in the backlog
                // until the next one arrives and wakes the listener again.
                Err(_) => return,
            };
            // Replies are small and written once per batch: Nagle would only add latency.
            if stream.set_nodelay(true).is_err() {
                continue;
            }
            let tls = match &self.tls_config {
                Some(config) if self.implicit_tls => match TlsLayer::new(config) {
                    Ok(layer) => Some(layer),
                    Err(_) => continue,
                },
                _ => None,
            };
            let Ok(peer) = stream.peer_addr() else {
                continue;
            };
            let settings = &self.context.settings;
            let from_client = self.per_client.get(&peer.ip()).copied().unwrap_or(0);
            let over_limit = settings
                .max_connections
                .is_some_and(|max| self.connections.len() >= max)
                || settings
                    .max_connections_per_client
                    .is_some_and(|max| from_client >= max);
            let entry = self.connections.vacant_entry();
            let key = entry.key();
            // Writable interest from the start costs nothing with edge triggering and saves a
            // reregistration each time a client stops reading.
            if self
                .poll
                .registry()
                .register(
                    &mut stream,
                    Token(key + FIRST_CONNECTION),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .is_err()
            {
                continue;
            }
            let mut output = Vec::with_capacity(4096);
            let counters = self.context.counters();
            self.generations += 1;
            let id = ConnectionId {
                key,
                generation: self.generations,
            };
            let session = if over_limit {
                counters.refused_connections.fetch_add(1, Ordering::Relaxed);
                Session::refuse(&self.context, id, peer, &mut output)
            } else {
                Session::start(&self.context, id, peer, &mut output)
            };
            counters.connections.fetch_add(1, Ordering::Relaxed);
            *self.per_client.entry(peer.ip()).or_insert(0) += 1;
            entry.insert(Connection {
                stream,
                tls,
                session,
                input: vec![0; INPUT_CAPACITY].into_boxed_slice(),
                filled: 0,
                output,
                written: 0,
                held_until: None,
                generation: self.generations,
                peer: peer.ip(),
            });
            self.drive(key);
        }
    }

    /// Does all that can be done on a connection now, and closes it when it is finished.
    fn drive(&mut self, key: usize) {
        let Some(connection) = self.connections.get_mut(key) else {
            // An event for a connection closed earlier in the same batch.
            return;
        };
        match Self::advance(connection, &mut self.context, self.tls_config.as_ref()) {
            Progress::Wait => {}
            Progress::Hold(until) => {
                connection.held_until = Some(until);
                self.timers
                    .push(Reverse((until, key, connection.generation)));
            }
            Progress::Close => {
                let mut connection = self.connections.remove(key);
                let _ = self.poll.registry().deregister(&mut connection.stream);
                if let Some(count) = self.per_client.get_mut(&connection.peer) {
                    *count -= 1;
                    if *count == 0 {
                        self.per_client.remove(&connection.peer);
                    }
                }
                self.context.policy.closed(ConnectionId {
                    key,
                    generation: connection.generation,
                });
                if connection.session.end() == End::Close {
                    if let Some(tls) = &mut connection.tls {
                        tls.close(&mut connection.stream);
                    }
                    // Send FIN after the last reply, and take in what the client already sent
                    // so that closing does not turn into a reset that could discard that reply.
                    let _ = connection.stream.shutdown(Shutdown::Write);
                    while matches!(connection.stream.read(&mut connection.input), Ok(n) if n > 0) {}
                }
            }
        }
    }

    fn advance(
        connection: &mut Connection,
        context: &mut Context<P>,
        tls_config: Option<&Arc<ServerConfig>>,
    ) -> Progress {
        if connection.held_until.is_some() {
            return Progress::Wait;
        }
        // Whether reading could still find data: see the short-read note in `receive`.
        let mut may_read = true;
        loop {
            match connection.send() {
                Sent::All => {}
                Sent::Blocked => return Progress::Wait,
                Sent::Failed => return Progress::Close,
            }
            // Replies given to rustls during the handshake are not sent yet (an implicit TLS
            // greeting, or its 421): an ending session waits for them.
            let handshaking = connection
                .tls
                .as_ref()
                .is_some_and(TlsLayer::is_handshaking);
            if !handshaking {
                match connection.session.end() {
                    End::Open => {}
                    End::StartTls => {
                        let Some(layer) = tls_config.and_then(|config| TlsLayer::new(config).ok())
                        else {
                            // STARTTLS is only accepted when TLS is configured, and rustls
                            // refuses a new connection only for a configuration that
                            // `tls::server_config` would not have built.
                            return Progress::Close;
                        };
                        // RFC 3207 4.2: what the client pipelined behind STARTTLS arrived in
                        // plaintext and must not be taken as if it came over TLS (the command
                        // injection of CVE-2011-0411). What arrives from now on is TLS.
                        connection.filled = 0;
                        connection.tls = Some(layer);
                        connection.session.tls_started();
                    }
                    End::Close | End::Abort => return Progress::Close,
                }
            }

            if connection.session.end() == End::Open {
                let consumed = connection.session.process(
                    context,
                    &connection.input[..connection.filled],
                    &mut connection.output,
                );
                connection.input.copy_within(consumed..connection.filled, 0);
                connection.filled -= consumed;
                if !connection.output.is_empty() {
                    if let Some(delay) = context.settings.reply_delay {
                        return Progress::Hold(Instant::now() + delay);
                    }
                    continue;
                }
                if connection.session.end() != End::Open {
                    continue;
                }
            }

            if connection.session.is_waiting() {
                // Nothing more is read until the policy answers: what the client pipelined
                // behind the content waits in the socket, which bounds the input buffer.
                return Progress::Wait;
            }
            match connection.receive(&mut may_read, context.counters()) {
                Received::Input(_) => {}
                Received::Wait => return Progress::Wait,
                Received::End => return Progress::Close,
            }
        }
    }

    /// Releases the replies whose delay is over and carries on with those connections.
    fn release_held_replies(&mut self) {
        let now = Instant::now();
        while let Some(&Reverse((due, key, generation))) = self.timers.peek() {
            if due > now {
                break;
            }
            self.timers.pop();
            if let Some(connection) = self.connections.get_mut(key) {
                if connection.generation == generation {
                    connection.held_until = None;
                    self.drive(key);
                }
            }
        }
    }
}

impl Connection {
    /// Writes the pending replies until they are all out or the socket is full.
    fn send(&mut self) -> Sent {
        if let Some(tls) = &mut self.tls {
            return tls.send(&mut self.output, &mut self.stream);
        }
        while self.written < self.output.len() {
            match self.stream.write(&self.output[self.written..]) {
                Ok(0) => return Sent::Failed,
                Ok(n) => self.written += n,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Sent::Blocked,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Sent::Failed,
            }
        }
        self.output.clear();
        self.written = 0;
        Sent::All
    }

    /// Takes in more input behind `input[..filled]`; reads the socket only when `may_read`.
    fn receive(&mut self, may_read: &mut bool, counters: &Counters) -> Received {
        // The session consumes everything but a partial line shorter than MAX_LINE, so there
        // is always room here (an empty read buffer would look like end of stream).
        let room = &mut self.input[self.filled..];
        debug_assert!(!room.is_empty());
        let received = match &mut self.tls {
            Some(tls) => tls.receive(&mut self.stream, room, may_read, counters),
            None if !*may_read => Received::Wait,
            None => loop {
                match self.stream.read(room) {
                    Ok(0) => break Received::End,
                    Ok(n) => {
                        // epoll reports every arrival of new data to an edge-triggered socket,
                        // so a read that did not fill the buffer has drained it: skip the read
                        // that would only return WouldBlock.
                        *may_read = n == room.len();
                        break Received::Input(n);
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                        break Received::Wait
                    }
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break Received::End,
                }
            },
        };
        if let Received::Input(n) = received {
            self.filled += n;
        }
        received
    }
}

/// How far [`Connection::send`] got.
pub(crate) enum Sent {
    /// Every reply is on the wire (with TLS: or waits inside rustls for the handshake).
    All,
    /// The socket is full: wait until it is writable.
    Blocked,
    /// The connection is broken.
    Failed,
}

/// What [`Connection::receive`] found.
pub(crate) enum Received {
    /// This many new octets of input, possibly none when TLS has handshake records to send
    /// first.
    Input(usize),
    /// Nothing until the socket is readable again.
    Wait,
    /// The client closed the connection, or it is broken.
    End,
}

/// What a connection waits for after [`Server::advance`].
enum Progress {
    /// Readiness of its socket.
    Wait,
    /// The end of a reply delay.
    Hold(Instant),
    /// Nothing: it is finished.
    Close,
}
