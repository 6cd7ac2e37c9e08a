//! Incremental, bounded parser for SMTP replies (RFC 5321 4.2) with RFC 3463 enhanced codes.
//!
//! Bytes arrive in arbitrary pieces; the parser keeps only the unfinished line and the lines of
//! the reply being assembled, so every split of the same bytes yields the same replies. Line
//! length and the number of lines per reply are bounded: a server cannot make the client buffer
//! without limit. A reply that breaks the grammar is a [`ReplyError`], never a panic; after an
//! error the parser stays failed, because the byte stream is out of sync.

use std::collections::VecDeque;
use std::fmt;

/// An RFC 3463 enhanced status code, `class.subject.detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EnhancedCode {
    pub class: u8,
    pub subject: u16,
    pub detail: u16,
}

impl EnhancedCode {
    pub const fn new(class: u8, subject: u16, detail: u16) -> Self {
        EnhancedCode {
            class,
            subject,
            detail,
        }
    }

    /// Parses `x.y.z` at the start of `text`; returns the code and the number of bytes it used
    /// (including one following space). RFC 3463 3: class is 2, 4 or 5; subject and detail are
    /// 1 to 3 digits.
    fn parse_prefix(text: &[u8]) -> Option<(EnhancedCode, usize)> {
        let class = match text.first()? {
            b'2' => 2,
            b'4' => 4,
            b'5' => 5,
            _ => return None,
        };
        if text.get(1) != Some(&b'.') {
            return None;
        }
        let (subject, used_subject) = parse_number(&text[2..])?;
        let rest = 2 + used_subject;
        if text.get(rest) != Some(&b'.') {
            return None;
        }
        let (detail, used_detail) = parse_number(&text[rest + 1..])?;
        let mut end = rest + 1 + used_detail;
        match text.get(end) {
            None => {}
            Some(b' ') => end += 1,
            Some(_) => return None,
        }
        Some((EnhancedCode::new(class, subject, detail), end))
    }
}

fn parse_number(text: &[u8]) -> Option<(u16, usize)> {
    let digits = text
        .iter()
        .take(4)
        .take_while(|b| b.is_ascii_digit())
        .count();
    if digits == 0 || digits > 3 {
        return None;
    }
    let mut value = 0u16;
    for &b in &text[..digits] {
        value = value * 10 + u16::from(b - b'0');
    }
    Some((value, digits))
}

impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// One complete server reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit reply code.
    pub code: u16,
    /// The enhanced status code of the first line, when the server gave one.
    pub enhanced: Option<EnhancedCode>,
    /// The text of every line, joined by `\n`, without the code, the separator and (where the
    /// server gave them) the enhanced codes at the start of each line.
    pub text: String,
}

impl Reply {
    /// Builds a reply; useful for synthesised outcomes and tests.
    pub fn new(code: u16, enhanced: Option<EnhancedCode>, text: impl Into<String>) -> Self {
        Reply {
            code,
            enhanced,
            text: text.into(),
        }
    }

    /// 2xx.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// 3xx (for example 354 after DATA).
    pub fn is_intermediate(&self) -> bool {
        (300..400).contains(&self.code)
    }

    /// 4xx: try again later.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// 5xx: do not try again.
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }

    /// The lines of the text.
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.text.split('\n')
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some(e) = self.enhanced {
            write!(f, " {e}")?;
        }
        if !self.text.is_empty() {
            write!(f, " {}", self.text.replace('\n', " / "))?;
        }
        Ok(())
    }
}

/// Why the reply stream cannot be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyError {
    /// A line is longer than the configured limit.
    LineTooLong,
    /// A multi-line reply has more lines than the configured limit.
    TooManyLines,
    /// A line does not start with three digits followed by space, hyphen or end of line.
    Malformed,
    /// A continuation line carries a different code from the first line (RFC 5321 4.2.1).
    CodeMismatch,
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReplyError::LineTooLong => "reply line too long",
            ReplyError::TooManyLines => "multi-line reply has too many lines",
            ReplyError::Malformed => "malformed reply line",
            ReplyError::CodeMismatch => "multi-line reply changes its code",
        })
    }
}

/// Bounds on what a server may make the parser hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyLimits {
    /// Octets in one line, CRLF included. RFC 5321 4.5.3.1.5 sets 512 as the minimum a receiver
    /// must accept; real servers exceed it with long texts, so the default is more generous.
    pub max_line: usize,
    /// Lines in one multi-line reply (EHLO replies are the longest in practice).
    pub max_lines: usize,
}

impl Default for ReplyLimits {
    fn default() -> Self {
        ReplyLimits {
            max_line: 4096,
            max_lines: 128,
        }
    }
}

/// Incremental reply parser.
#[derive(Debug)]
pub struct ReplyParser {
    limits: ReplyLimits,
    /// The unfinished line (no CRLF yet).
    partial: Vec<u8>,
    /// Code of the multi-line reply being assembled, if any.
    code: u16,
    enhanced: Option<EnhancedCode>,
    text: String,
    lines: usize,
    failed: Option<ReplyError>,
}

impl ReplyParser {
    pub fn new(limits: ReplyLimits) -> Self {
        ReplyParser {
            limits,
            partial: Vec::new(),
            code: 0,
            enhanced: None,
            text: String::new(),
            lines: 0,
            failed: None,
        }
    }

    /// Whether bytes of an unfinished reply are buffered. After STARTTLS (RFC 3207 4.2) such
    /// bytes were sent before the handshake and must not be trusted.
    pub fn has_pending(&self) -> bool {
        !self.partial.is_empty() || self.lines > 0
    }

    /// Forgets everything buffered (used when the transport is replaced by TLS).
    pub fn clear(&mut self) {
        self.partial.clear();
        self.text.clear();
        self.lines = 0;
        self.code = 0;
        self.enhanced = None;
    }

    /// Feeds bytes; every completed reply is pushed to `out`. Once an error is returned, every
    /// later call returns it too.
    pub fn feed(&mut self, input: &[u8], out: &mut VecDeque<Reply>) -> Result<(), ReplyError> {
        self.feed_with(input, out, |_, _| true)
    }

    /// Like [`ReplyParser::feed`], but a reply for which `text_needed(n, code)` is false (`n`
    /// counts the replies completed in this call from 0, `code` is the reply's) gets an empty
    /// text: a client that only needs to know that MAIL and RCPT succeeded saves copying it.
    pub fn feed_with(
        &mut self,
        mut input: &[u8],
        out: &mut VecDeque<Reply>,
        mut text_needed: impl FnMut(usize, u16) -> bool,
    ) -> Result<(), ReplyError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let mut replies = 0;
        let mut text_needed = |code| {
            let needed = text_needed(replies, code);
            replies += 1;
            needed
        };
        while !input.is_empty() {
            match memchr_newline(input) {
                Some(pos) => {
                    let (line, rest) = input.split_at(pos + 1);
                    input = rest;
                    let result = if self.partial.is_empty() {
                        self.check_length(line.len())
                            .and_then(|_| self.line(line, out, &mut text_needed))
                    } else {
                        let mut joined = std::mem::take(&mut self.partial);
                        joined.extend_from_slice(line);
                        let r = self
                            .check_length(joined.len())
                            .and_then(|_| self.line(&joined, out, &mut text_needed));
                        joined.clear();
                        self.partial = joined;
                        r
                    };
                    if let Err(e) = result {
                        self.failed = Some(e);
                        return Err(e);
                    }
                }
                None => {
                    if let Err(e) = self.check_length(self.partial.len() + input.len()) {
                        self.failed = Some(e);
                        return Err(e);
                    }
                    self.partial.extend_from_slice(input);
                    break;
                }
            }
        }
        Ok(())
    }

    fn check_length(&self, len: usize) -> Result<(), ReplyError> {
        if len > self.limits.max_line {
            Err(ReplyError::LineTooLong)
        } else {
            Ok(())
        }
    }

    /// One line including its LF. A bare LF line ending is tolerated (many servers are lax);
    /// the CR before it, if present, is dropped.
    fn line(
        &mut self,
        line: &[u8],
        out: &mut VecDeque<Reply>,
        text_needed: &mut impl FnMut(u16) -> bool,
    ) -> Result<(), ReplyError> {
        let mut body = &line[..line.len() - 1];
        if let [rest @ .., b'\r'] = body {
            body = rest;
        }
        if body.len() < 3
            || !body[..3].iter().all(u8::is_ascii_digit)
            || body[0] < b'2'
            || body[0] > b'5'
        {
            return Err(ReplyError::Malformed);
        }
        let code = u16::from(body[0] - b'0') * 100
            + u16::from(body[1] - b'0') * 10
            + u16::from(body[2] - b'0');
        let last = match body.get(3) {
            None | Some(b' ') => true,
            Some(b'-') => false,
            Some(_) => return Err(ReplyError::Malformed),
        };
        let mut text = body.get(4..).unwrap_or(&[]);
        if self.lines == 0 {
            self.code = code;
            self.enhanced = None;
            // RFC 3463 / RFC 2034: the enhanced code's class must match the reply's class.
            if let Some((enhanced, used)) = EnhancedCode::parse_prefix(text) {
                if u16::from(enhanced.class) == code / 100 {
                    self.enhanced = Some(enhanced);
                    text = &text[used..];
                }
            }
            if last {
                // The common case, a single-line reply ("250 2.1.5 Ok"): straight out, with
                // its text copied once if at all.
                let text = if text_needed(code) {
                    text_string(text)
                } else {
                    String::new()
                };
                out.push_back(Reply {
                    code,
                    enhanced: self.enhanced,
                    text,
                });
                return Ok(());
            }
        } else {
            if code != self.code {
                return Err(ReplyError::CodeMismatch);
            }
            if self.lines >= self.limits.max_lines {
                return Err(ReplyError::TooManyLines);
            }
            self.text.push('\n');
            if let Some(first) = self.enhanced {
                if let Some((enhanced, used)) = EnhancedCode::parse_prefix(text) {
                    if enhanced == first {
                        text = &text[used..];
                    }
                }
            }
        }
        self.lines += 1;
        // Reply text should be ASCII (RFC 5321 4.2); anything else is kept, lossily decoded.
        match std::str::from_utf8(text) {
            Ok(s) => self.text.push_str(s),
            Err(_) => self.text.push_str(&String::from_utf8_lossy(text)),
        }
        if last {
            let text = std::mem::take(&mut self.text);
            out.push_back(Reply {
                code: self.code,
                enhanced: self.enhanced,
                text: if text_needed(self.code) {
                    text
                } else {
                    String::new()
                },
            });
            self.lines = 0;
        }
        Ok(())
    }
}

/// Reply text should be ASCII (RFC 5321 4.2); anything else is kept, lossily decoded.
fn text_string(text: &[u8]) -> String {
    String::from_utf8_lossy(text).into_owned()
}

fn memchr_newline(haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|&b| b == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse_all(input: &[u8]) -> Result<Vec<Reply>, ReplyError> {
        let mut p = ReplyParser::new(ReplyLimits::default());
        let mut out = VecDeque::new();
        p.feed(input, &mut out)?;
        Ok(out.into_iter().collect())
    }

    #[test]
    fn single_line_with_enhanced_code() {
        let r = parse_all(b"250 2.1.5 Ok\r\n").unwrap();
        assert_eq!(
            r,
            vec![Reply::new(250, Some(EnhancedCode::new(2, 1, 5)), "Ok")]
        );
    }

    #[test]
    fn multi_line_ehlo() {
        let r = parse_all(b"250-mx.example.org\r\n250-PIPELINING\r\n250 SIZE 1000\r\n").unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].code, 250);
        assert_eq!(r[0].text, "mx.example.org\nPIPELINING\nSIZE 1000");
        assert_eq!(r[0].enhanced, None);
    }

    #[test]
    fn enhanced_code_repeated_on_each_line_is_stripped() {
        let r =
            parse_all(b"550-5.7.1 Blocked\r\n550-5.7.1 see\r\n550 5.7.1 https://x\r\n").unwrap();
        assert_eq!(r[0].enhanced, Some(EnhancedCode::new(5, 7, 1)));
        assert_eq!(r[0].text, "Blocked\nsee\nhttps://x");
    }

    #[test]
    fn enhanced_code_with_wrong_class_is_text() {
        let r = parse_all(b"250 5.1.1 odd\r\n").unwrap();
        assert_eq!(r[0].enhanced, None);
        assert_eq!(r[0].text, "5.1.1 odd");
    }

    #[test]
    fn bare_code_and_bare_lf() {
        let r = parse_all(b"354\n221 Bye\n").unwrap();
        assert_eq!(r[0].code, 354);
        assert_eq!(r[0].text, "");
        assert_eq!(r[1].code, 221);
    }

    #[test]
    fn several_replies_in_one_read() {
        let r = parse_all(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n").unwrap();
        assert_eq!(
            r.iter().map(|r| r.code).collect::<Vec<_>>(),
            [250, 250, 354]
        );
    }

    #[test]
    fn errors() {
        assert_eq!(parse_all(b"hello\r\n"), Err(ReplyError::Malformed));
        assert_eq!(parse_all(b"25x ok\r\n"), Err(ReplyError::Malformed));
        assert_eq!(parse_all(b"250xok\r\n"), Err(ReplyError::Malformed));
        assert_eq!(parse_all(b"650 ok\r\n"), Err(ReplyError::Malformed));
        assert_eq!(
            parse_all(b"250-a\r\n251 b\r\n"),
            Err(ReplyError::CodeMismatch)
        );
        let long = [b"250 ".as_slice(), &[b'a'; 5000], b"\r\n"].concat();
        assert_eq!(parse_all(&long), Err(ReplyError::LineTooLong));
        let many: Vec<u8> = b"250-x\r\n".repeat(200);
        assert_eq!(parse_all(&many), Err(ReplyError::TooManyLines));
    }

    #[test]
    fn failure_is_sticky() {
        let mut p = ReplyParser::new(ReplyLimits::default());
        let mut out = VecDeque::new();
        assert!(p.feed(b"xyz\r\n", &mut out).is_err());
        assert_eq!(p.feed(b"250 ok\r\n", &mut out), Err(ReplyError::Malformed));
        assert!(out.is_empty());
    }

    #[test]
    fn long_line_without_newline_is_bounded() {
        let mut p = ReplyParser::new(ReplyLimits::default());
        let mut out = VecDeque::new();
        let chunk = [b'2'; 1000];
        let mut failed = false;
        for _ in 0..10 {
            if p.feed(&chunk, &mut out).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed);
        assert!(p.partial.len() <= 4096);
    }

    proptest! {
        #[test]
        fn any_split_gives_same_replies(split in proptest::collection::vec(0usize..200, 0..8)) {
            let input: &[u8] = b"220 mx ESMTP\r\n250-mx\r\n250-PIPELINING\r\n250 2.0.0 OK\r\n550 5.1.1 <a@b>: unknown\r\n354 go ahead\r\n";
            let whole = parse_all(input).unwrap();
            let mut cuts: Vec<usize> = split.into_iter().map(|c| c % (input.len() + 1)).collect();
            cuts.sort_unstable();
            let mut p = ReplyParser::new(ReplyLimits::default());
            let mut out = VecDeque::new();
            let mut start = 0;
            for c in cuts.into_iter().chain(std::iter::once(input.len())) {
                p.feed(&input[start..c], &mut out).unwrap();
                start = c;
            }
            prop_assert_eq!(out.into_iter().collect::<Vec<_>>(), whole);
        }

        #[test]
        fn garbage_never_panics_and_stays_bounded(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..600), 0..20)) {
            let limits = ReplyLimits { max_line: 512, max_lines: 8 };
            let mut p = ReplyParser::new(limits);
            let mut out = VecDeque::new();
            for c in &chunks {
                let _ = p.feed(c, &mut out);
                prop_assert!(p.partial.len() <= limits.max_line);
                prop_assert!(p.lines <= limits.max_lines);
            }
        }
    }
}
