//! What a session has to write, in wire order: command bytes, and the message content they
//! frame, which is never copied here.
//!
//! A bulk send shares one body among many transactions (`Arc<Body>`); copying it into the
//! connection's buffer for every message would cost a copy per message before the kernel's own.
//! So content stays where it is and is only referenced, with the offset in the command bytes
//! where it goes; the engine hands the pieces to one vectored write (`writev`), or copies them
//! into its TLS layer, which must copy anyway. This module only keeps order and counts what
//! was written; it does no I/O.

use crate::message::Body;
use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;

/// A buffer of commands that has grown past this is given back once written, so that an idle
/// connection does not keep a large AUTH exchange's or a long burst's worth of memory.
const KEEP_CAPACITY: usize = 64 * 1024;

/// Content referenced by the output.
#[derive(Debug)]
struct Content {
    /// Where it goes: before the command byte at this offset.
    at: usize,
    body: Arc<Body>,
    /// The dot-stuffed form (DATA) rather than the normalised one (BDAT).
    stuffed: bool,
    /// Octets of it already written.
    written: usize,
}

impl Content {
    fn bytes(&self) -> &[u8] {
        if self.stuffed {
            self.body.dot_stuffed()
        } else {
            self.body.as_bytes()
        }
    }
}

/// Bytes to write: commands, with content in between.
#[derive(Debug, Default)]
pub(crate) struct Output {
    commands: Vec<u8>,
    /// Command bytes before this were written.
    pos: usize,
    /// In order of `at`.
    content: VecDeque<Content>,
}

impl Output {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Output {
            commands: Vec::with_capacity(capacity),
            pos: 0,
            content: VecDeque::new(),
        }
    }

    /// Where commands are appended; they go after everything queued so far.
    pub(crate) fn commands(&mut self) -> &mut Vec<u8> {
        &mut self.commands
    }

    /// Queues `body` (its dot-stuffed form when `stuffed`) after everything queued so far.
    pub(crate) fn push_content(&mut self, body: Arc<Body>, stuffed: bool) {
        self.content.push_back(Content {
            at: self.commands.len(),
            body,
            stuffed,
            written: 0,
        });
    }

    /// Nothing is waiting to be written.
    pub(crate) fn is_empty(&self) -> bool {
        self.pos == self.commands.len() && self.content.is_empty()
    }

    /// Octets waiting to be written.
    pub(crate) fn len(&self) -> usize {
        let content: usize = self
            .content
            .iter()
            .map(|c| c.bytes().len() - c.written)
            .sum();
        self.commands.len() - self.pos + content
    }

    /// Fills `slices` with the next pieces to write, in order; returns how many it filled
    /// (fewer than fit only when that is everything).
    pub(crate) fn slices<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        let mut filled = 0;
        let mut pos = self.pos;
        let mut push = |bytes: &'a [u8]| {
            if bytes.is_empty() {
                return true;
            }
            if filled == slices.len() {
                return false;
            }
            slices[filled] = IoSlice::new(bytes);
            filled += 1;
            true
        };
        for c in &self.content {
            if !push(&self.commands[pos..c.at]) || !push(&c.bytes()[c.written..]) {
                return filled;
            }
            pos = c.at;
        }
        push(&self.commands[pos..]);
        filled
    }

    /// `n` octets of what [`Output::slices`] gave were written.
    pub(crate) fn consume(&mut self, mut n: usize) {
        while n > 0 {
            let end = self.content.front().map_or(self.commands.len(), |c| c.at);
            let commands = (end - self.pos).min(n);
            self.pos += commands;
            n -= commands;
            if n == 0 {
                break;
            }
            let Some(c) = self.content.front_mut() else {
                debug_assert!(false, "consumed more than was pending");
                break;
            };
            let left = c.bytes().len() - c.written;
            if n < left {
                c.written += n;
                return;
            }
            n -= left;
            self.content.pop_front();
        }
        // Content written up to a command boundary leaves nothing to point into the buffer.
        while self
            .content
            .front()
            .is_some_and(|c| c.at == self.pos && c.written == c.bytes().len())
        {
            self.content.pop_front();
        }
        if self.is_empty() {
            self.commands.clear();
            self.pos = 0;
            if self.commands.capacity() > KEEP_CAPACITY {
                self.commands = Vec::with_capacity(512);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything pending, as one byte string, through slices of at most `width` pieces.
    fn pending(out: &Output, width: usize) -> Vec<u8> {
        let mut slices = vec![IoSlice::new(&[]); width];
        let n = out.slices(&mut slices);
        slices[..n].iter().flat_map(|s| s.iter().copied()).collect()
    }

    fn body(text: &[u8]) -> Arc<Body> {
        Arc::new(Body::new(text).unwrap())
    }

    #[test]
    fn content_goes_between_commands_in_order_and_is_consumed_at_any_split() {
        let mut out = Output::with_capacity(16);
        out.commands().extend_from_slice(b"BDAT 3 LAST\r\n");
        out.push_content(body(b"a\r\n"), false);
        out.commands().extend_from_slice(b"MAIL\r\n");
        out.push_content(body(b".x\r\n"), true);
        out.commands().extend_from_slice(b".\r\n");
        let all = b"BDAT 3 LAST\r\na\r\nMAIL\r\n..x\r\n.\r\n".to_vec();
        assert_eq!(pending(&out, 8), all);
        assert_eq!(out.len(), all.len());
        // Two slices at a time: the rest comes with the next call.
        assert_eq!(pending(&out, 2), b"BDAT 3 LAST\r\na\r\n");
        for split in 0..=all.len() {
            let mut o = Output::with_capacity(0);
            o.commands().extend_from_slice(b"BDAT 3 LAST\r\n");
            o.push_content(body(b"a\r\n"), false);
            o.commands().extend_from_slice(b"MAIL\r\n");
            o.push_content(body(b".x\r\n"), true);
            o.commands().extend_from_slice(b".\r\n");
            o.consume(split);
            assert_eq!(pending(&o, 8), all[split..], "split at {split}");
            assert_eq!(o.len(), all.len() - split);
            let rest = o.len();
            o.consume(rest);
            assert!(o.is_empty());
            assert_eq!(o.slices(&mut [IoSlice::new(&[])]), 0);
        }
    }

    #[test]
    fn content_at_the_end_and_back_to_back() {
        let mut out = Output::with_capacity(0);
        out.push_content(body(b"one\r\n"), false);
        out.push_content(body(b"two\r\n"), false);
        assert_eq!(pending(&out, 1), b"one\r\n");
        out.consume(7);
        assert_eq!(pending(&out, 4), b"o\r\n");
        out.consume(3);
        assert!(out.is_empty());
        out.commands().extend_from_slice(b"QUIT\r\n");
        assert_eq!(pending(&out, 4), b"QUIT\r\n");
    }
}
