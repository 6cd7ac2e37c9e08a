//! The SMTP dialogue of every connection, written to a file as it happens (`--trace FILE`,
//! the `trace_file` setting): one line per command or reply, with the time since the trace
//! began, the connection's number and its direction, what swaks `-v` or smtplib's
//! `set_debuglevel` show. Secrets and content are redacted: AUTH arguments and the lines of an
//! AUTH exchange, and message content (after DATA, or a BDAT chunk), which shows as its size.
//!
//! The engine hands over bytes as they cross the socket (decrypted under TLS); this module only
//! splits them into lines and writes them. It must never fail a delivery: a write error to the
//! trace file is ignored.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A trace file, shared by every connection of every loop.
#[derive(Debug)]
pub struct Trace {
    out: Mutex<BufWriter<File>>,
    start: Instant,
    next_id: AtomicU64,
}

impl Trace {
    /// Creates (or truncates) the trace file.
    pub fn create(path: &Path) -> std::io::Result<Arc<Trace>> {
        Ok(Arc::new(Trace {
            out: Mutex::new(BufWriter::new(File::create(path)?)),
            start: Instant::now(),
            next_id: AtomicU64::new(1),
        }))
    }

    /// The trace of a new connection, numbered in order of creation.
    pub(crate) fn connection(self: &Arc<Trace>, peer: &str) -> ConnTrace {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let t = ConnTrace {
            trace: Arc::clone(self),
            id,
            client: Lines::default(),
            server: Lines::default(),
            in_data: false,
            chunk_left: 0,
            content: 0,
            in_auth: false,
        };
        t.write(&format!("connect {peer}"), '=');
        t
    }
}

/// Bytes not yet ended by a line break.
#[derive(Debug, Default)]
struct Lines {
    partial: Vec<u8>,
}

impl Lines {
    /// Complete lines from `bytes` (without their line ends), keeping a partial last line.
    fn feed(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        self.partial.extend_from_slice(bytes);
        let mut lines = Vec::new();
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.partial.drain(..=end).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            lines.push(line);
        }
        lines
    }
}

/// One connection's view of the trace, with what redaction needs to know.
#[derive(Debug)]
pub(crate) struct ConnTrace {
    trace: Arc<Trace>,
    id: u64,
    client: Lines,
    server: Lines,
    /// Between DATA and the final ".".
    in_data: bool,
    /// Octets of a BDAT chunk still to come.
    chunk_left: usize,
    /// Octets of content since the last line written.
    content: usize,
    /// Between AUTH and its final reply: the client's lines are credentials.
    in_auth: bool,
}

impl ConnTrace {
    fn write(&self, text: &str, direction: char) {
        let elapsed = self.trace.start.elapsed().as_secs_f64();
        if let Ok(mut out) = self.trace.out.lock() {
            let _ = writeln!(out, "{elapsed:.6} c{} {direction} {text}", self.id);
            let _ = out.flush();
        }
    }

    fn flush_content(&mut self) {
        if self.content > 0 {
            self.write(&format!("[message content: {} octets]", self.content), '>');
            self.content = 0;
        }
    }

    /// What the client sent.
    pub(crate) fn client(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.chunk_left > 0 {
                let n = self.chunk_left.min(bytes.len());
                self.content += n;
                self.chunk_left -= n;
                bytes = &bytes[n..];
                if self.chunk_left == 0 {
                    self.flush_content();
                }
                continue;
            }
            // One line at a time: a BDAT line changes how the bytes after it are read.
            let end = bytes
                .iter()
                .position(|&b| b == b'\n')
                .map_or(bytes.len(), |p| p + 1);
            let (now, rest) = bytes.split_at(end);
            bytes = rest;
            for line in self.client.feed(now) {
                self.client_line(&line);
            }
        }
    }

    fn client_line(&mut self, line: &[u8]) {
        if self.in_data {
            if line == b"." {
                self.in_data = false;
                self.flush_content();
                self.write(".", '>');
            } else {
                self.content += line.len() + 2;
            }
            return;
        }
        let text = String::from_utf8_lossy(line);
        let verb = text.split(' ').next().unwrap_or("").to_ascii_uppercase();
        match verb.as_str() {
            "DATA" => self.in_data = true,
            "BDAT" => {
                self.chunk_left = text
                    .split(' ')
                    .nth(1)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            }
            "AUTH" => {
                self.in_auth = true;
                let mechanism = text.split(' ').nth(1).unwrap_or("");
                let redacted = if text.split(' ').count() > 2 {
                    " [redacted]"
                } else {
                    ""
                };
                self.write(&format!("AUTH {mechanism}{redacted}"), '>');
                return;
            }
            _ if self.in_auth => {
                self.write("[redacted]", '>');
                return;
            }
            _ => {}
        }
        self.write(&text, '>');
    }

    /// What the server answered.
    pub(crate) fn server(&mut self, bytes: &[u8]) {
        for line in self.server.feed(bytes) {
            let text = String::from_utf8_lossy(&line).into_owned();
            // A final reply other than 334 ends an AUTH exchange.
            if self.in_auth
                && text.len() >= 4
                && !text.starts_with("334")
                && text.as_bytes()[3] == b' '
            {
                self.in_auth = false;
            }
            self.write(&text, '<');
        }
    }
}

impl Drop for ConnTrace {
    fn drop(&mut self) {
        self.flush_content();
        self.write("close", '=');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_content_are_redacted() {
        let dir = std::env::temp_dir().join(format!("mxpipe-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("trace.txt");
        let trace = Trace::create(&path).unwrap();
        let mut c = trace.connection("127.0.0.1:25");
        c.server(b"220 hi\r\n");
        c.client(b"EHLO a\r\n");
        c.server(b"250-x\r\n250 AUTH LOGIN\r\n");
        c.client(b"AUTH LOGIN\r\n");
        c.server(b"334 VXNlcm5hbWU6\r\n");
        c.client(b"dXNlcg==\r\n");
        c.server(b"334 UGFzc3dvcmQ6\r\n");
        c.client(b"c2VjcmV0\r\n");
        c.server(b"235 2.7.0 ok\r\n");
        c.client(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n");
        c.server(b"250 ok\r\n250 ok\r\n354 go\r\n");
        c.client(b"Subject: private\r\n\r\nbody\r\n.\r\nBDAT 5 LAST\r\nhel");
        c.client(b"loQUIT\r\n");
        drop(c);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().map(|l| l.split_once(' ').unwrap().1).collect();
        assert_eq!(
            lines,
            [
                "c1 = connect 127.0.0.1:25",
                "c1 < 220 hi",
                "c1 > EHLO a",
                "c1 < 250-x",
                "c1 < 250 AUTH LOGIN",
                "c1 > AUTH LOGIN",
                "c1 < 334 VXNlcm5hbWU6",
                "c1 > [redacted]",
                "c1 < 334 UGFzc3dvcmQ6",
                "c1 > [redacted]",
                "c1 < 235 2.7.0 ok",
                "c1 > MAIL FROM:<a@b.example>",
                "c1 > RCPT TO:<c@d.example>",
                "c1 > DATA",
                "c1 < 250 ok",
                "c1 < 250 ok",
                "c1 < 354 go",
                "c1 > [message content: 26 octets]",
                "c1 > .",
                "c1 > BDAT 5 LAST",
                "c1 > [message content: 5 octets]",
                "c1 > QUIT",
                "c1 = close",
            ]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
