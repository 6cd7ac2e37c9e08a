//! One pooled connection: the socket, its TLS layer when there is one, the SMTP session it
//! drives, and the jobs in flight on it.
//!
//! This is where bytes move between the kernel and the sans-IO [`Session`]: reads go through the
//! loop's shared buffer (and through rustls when encrypted) straight into the session, and
//! everything the session has to say is written in as few `write` calls as the socket allows.
//! It makes no scheduling decisions.

use super::pool::ConnRef;
use crate::queue::Job;
use crate::smtp::Session;
use mio::net::TcpStream;
use rustls::ClientConnection;
use std::io::{self, IoSlice, Read, Write};
use std::time::Instant;

/// Pieces handed to one vectored write at most: a window of 32 pipelined BDAT transactions is
/// 65 (their commands, each one's content, the commands after the last), well under the
/// kernel's IOV_MAX of 1024; a deeper window takes one more write.
const SLICES_PER_WRITE: usize = 128;

#[derive(Debug)]
pub struct Conn {
    pub stream: TcpStream,
    pub this: ConnRef,
    pub destination: usize,
    /// `None` while the TCP connect is in progress.
    pub session: Option<Session>,
    pub connect_deadline: Instant,
    /// Since when the connection has had nothing to do (for the idle timeout).
    pub idle_since: Option<Instant>,
    /// The earliest deadline already in the timer heap for this connection.
    pub scheduled: Option<Instant>,
    /// Jobs in flight, by transaction tag.
    pub jobs: Vec<(u64, Job)>,
    /// The connection is being retired (QUIT sent or to be sent).
    pub retiring: bool,
    /// The connection is in its destination's ready list.
    pub listed: bool,
    /// Counted in its destination's established connections.
    pub established: bool,
    /// The TLS layer, from the handshake on (implicit TLS: from connect).
    pub tls: Option<ClientConnection>,
    /// The TLS handshake has completed.
    pub tls_ready: bool,
    /// Where the dialogue is traced, when it is.
    pub trace: Option<super::trace::ConnTrace>,
}

/// What a read produced.
pub enum ReadOutcome {
    /// Everything available was read (possibly nothing).
    Drained,
    /// The peer closed its side.
    Closed,
    Failed(io::Error),
    /// The TLS layer failed (handshake, certificate, or a corrupt record), said in words;
    /// `certificate`: it was the server's certificate that failed the check.
    TlsFailed {
        why: String,
        certificate: bool,
    },
}

impl Conn {
    /// Reads everything available and feeds it to the session. `peer_closed`: the event that
    /// woke us also announced the peer's FIN (replies and close in one edge, as when a server
    /// answers a pipelined batch and hangs up), so no later edge will: read on to the end.
    pub fn read(&mut self, buf: &mut [u8], peer_closed: bool, now: Instant) -> ReadOutcome {
        if self.tls.is_some() {
            return self.read_tls(buf, now);
        }
        let Some(session) = self.session.as_mut() else {
            return ReadOutcome::Drained;
        };
        loop {
            match self.stream.read(buf) {
                Ok(0) => return ReadOutcome::Closed,
                Ok(n) => {
                    if let Some(t) = &mut self.trace {
                        t.server(&buf[..n]);
                    }
                    session.handle_input(&buf[..n], now);
                    // Closed, or STARTTLS accepted: what follows is not plaintext SMTP.
                    if session.is_closed() || session.is_tls_handshake() {
                        return ReadOutcome::Drained;
                    }
                    // A short read emptied the socket; the next arrival raises a new edge.
                    if n < buf.len() && !peer_closed {
                        return ReadOutcome::Drained;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadOutcome::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return ReadOutcome::Failed(e),
            }
        }
    }

    fn read_tls(&mut self, buf: &mut [u8], now: Instant) -> ReadOutcome {
        let (Some(tls), Some(session)) = (self.tls.as_mut(), self.session.as_mut()) else {
            return ReadOutcome::Drained;
        };
        loop {
            let eof = match tls.read_tls(&mut self.stream) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadOutcome::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return ReadOutcome::Failed(e),
            };
            if let Err(e) = tls.process_new_packets() {
                // Send the alert that says why, if the socket takes it.
                let _ = tls.write_tls(&mut self.stream);
                let (why, certificate) = super::tls::describe_failure(&e);
                return ReadOutcome::TlsFailed { why, certificate };
            }
            if !self.tls_ready && !tls.is_handshaking() {
                self.tls_ready = true;
                session.tls_established(now);
            }
            loop {
                match tls.reader().read(buf) {
                    Ok(0) => return ReadOutcome::Closed,
                    Ok(n) => {
                        if let Some(t) = &mut self.trace {
                            t.server(&buf[..n]);
                        }
                        session.handle_input(&buf[..n], now)
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        return ReadOutcome::Closed
                    }
                    Err(e) => return ReadOutcome::Failed(e),
                }
                if session.is_closed() {
                    return ReadOutcome::Drained;
                }
            }
            if eof {
                return ReadOutcome::Closed;
            }
        }
    }

    /// Writes what the session has to say until done or the socket is full: commands and
    /// the shared content between them in one vectored write each time, without copying the
    /// content (with TLS it is copied into rustls, which encrypts it anyway).
    pub fn flush(&mut self) -> io::Result<()> {
        let Some(session) = self.session.as_mut() else {
            return Ok(());
        };
        if let Some(tls) = self.tls.as_mut() {
            // Plaintext goes into rustls (which buffers it until the handshake is done), then
            // records go out as the socket takes them.
            loop {
                let mut slices = [IoSlice::new(&[]); SLICES_PER_WRITE];
                let n = session.output_slices(&mut slices);
                if n == 0 {
                    break;
                }
                let mut written = 0;
                for slice in &slices[..n] {
                    if let Some(t) = &mut self.trace {
                        t.client(slice);
                    }
                    tls.writer().write_all(slice)?;
                    written += slice.len();
                }
                session.consume_output(written);
            }
            while tls.wants_write() {
                match tls.write_tls(&mut self.stream) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            return Ok(());
        }
        loop {
            let mut slices = [IoSlice::new(&[]); SLICES_PER_WRITE];
            let n = session.output_slices(&mut slices);
            if n == 0 {
                return Ok(());
            }
            match self.stream.write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => {
                    if let Some(t) = &mut self.trace {
                        let mut left = written;
                        for slice in &slices[..n] {
                            let k = left.min(slice.len());
                            t.client(&slice[..k]);
                            left -= k;
                        }
                    }
                    session.consume_output(written)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The moment this connection next needs attention from the timer.
    pub fn deadline(&self, idle_timeout: std::time::Duration) -> Option<Instant> {
        match &self.session {
            None => Some(self.connect_deadline),
            Some(s) => match (s.deadline(), self.idle_since) {
                (Some(d), _) => Some(d),
                (None, Some(idle)) => Some(idle + idle_timeout),
                (None, None) => None,
            },
        }
    }

    /// Takes the job of a finished transaction.
    pub fn take_job(&mut self, tag: u64) -> Option<Job> {
        let i = self.jobs.iter().position(|(t, _)| *t == tag)?;
        Some(self.jobs.swap_remove(i).1)
    }
}
