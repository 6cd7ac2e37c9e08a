//! One pooled connection: the socket, the SMTP session it drives, and the jobs in flight on it.
//!
//! This is where bytes move between the kernel and the sans-IO [`Session`]: reads go through the
//! loop's shared buffer straight into the session, and everything the session has to say is
//! written in one `write` call. It makes no scheduling decisions.

use super::pool::ConnRef;
use crate::queue::Job;
use crate::smtp::Session;
use mio::net::TcpStream;
use std::io::{self, Read, Write};
use std::time::Instant;

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
}

/// What a read produced.
pub enum ReadOutcome {
    /// Everything available was read (possibly nothing).
    Drained,
    /// The peer closed its side.
    Closed,
    Failed(io::Error),
}

impl Conn {
    /// Reads everything available and feeds it to the session.
    pub fn read(&mut self, buf: &mut [u8], now: Instant) -> ReadOutcome {
        let Some(session) = self.session.as_mut() else {
            return ReadOutcome::Drained;
        };
        loop {
            match self.stream.read(buf) {
                Ok(0) => return ReadOutcome::Closed,
                Ok(n) => {
                    session.handle_input(&buf[..n], now);
                    if session.is_closed() {
                        return ReadOutcome::Drained;
                    }
                    // A short read emptied the socket; the next arrival raises a new edge.
                    if n < buf.len() {
                        return ReadOutcome::Drained;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadOutcome::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return ReadOutcome::Failed(e),
            }
        }
    }

    /// Writes what the session has to say until done or the socket is full.
    pub fn flush(&mut self) -> io::Result<()> {
        let Some(session) = self.session.as_mut() else {
            return Ok(());
        };
        loop {
            let out = session.pending_output();
            if out.is_empty() {
                return Ok(());
            }
            match self.stream.write(out) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => session.consume_output(n),
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
