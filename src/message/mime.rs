//! Writing Internet messages: header fields (RFC 5322), MIME structure and transfer encodings
//! (RFC 2045–2049), encoded-words for non-ASCII header text (RFC 2047) and parameter values
//! (RFC 2231).
//!
//! Everything here writes into a caller's `Vec<u8>` with CRLF line ends, folds header fields at
//! 78 columns where it can and refuses a line over 998 octets (RFC 5322 2.1.1), so its output
//! can go to [`crate::message::Body::new`] unchanged. Text parts are quoted-printable and
//! attachments base64, so no body line is ever long and 7-bit transports carry the message.
//! An [`Attachment`] is encoded once and its bytes reused by every message that carries it.
//! This module must not decide what a message says (that is the caller's, or a template's),
//! and it never touches the network or the clock except through the values it is given.

use crate::error::Field;
use crate::message::Address;
use base64::Engine as _;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// RFC 5322 2.1.1: a line MUST be at most 998 octets, excluding CRLF...
const MAX_LINE: usize = 998;
/// ...and SHOULD be at most 78.
const FOLD_AT: usize = 78;
/// RFC 2047 2: an encoded-word is at most 75 characters.
const ENCODED_WORD_MAX: usize = 75;
const Q_PREFIX: &str = "=?utf-8?q?";
/// RFC 2045 6.7 (5): encoded lines are at most 76 characters, the soft break's "=" included.
const QP_LINE: usize = 76;
/// 57 octets make one 76-character base64 line (RFC 2045 6.8).
const BASE64_LINE_INPUT: usize = 57;

/// A header field that cannot be written, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderError {
    /// The field name ("Subject", "Content-Disposition").
    pub header: String,
    pub problem: HeaderProblem,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderProblem {
    /// The name is empty or has a character outside printable US-ASCII, or a colon.
    InvalidName,
    /// CR, LF, NUL or another control character in the value: it could end the header early.
    ControlCharacter,
    /// A word too long to fold into a line of 998 octets.
    LineTooLong,
    /// An address that is not a valid mailbox.
    InvalidAddress,
    /// A media type that is not `type/subtype` in token characters (RFC 2045 5.1).
    InvalidContentType,
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let problem = match self.problem {
            HeaderProblem::InvalidName => {
                "is not a valid header name (printable US-ASCII without ':')"
            }
            HeaderProblem::ControlCharacter => {
                "contains a control character (CR, LF, NUL or another)"
            }
            HeaderProblem::LineTooLong => {
                "has a word too long to fold within 998 octets (RFC 5322 2.1.1)"
            }
            HeaderProblem::InvalidAddress => "is not a valid address",
            HeaderProblem::InvalidContentType => "is not a media type of the form type/subtype",
        };
        write!(f, "header {}: {problem}", self.header)
    }
}

impl std::error::Error for HeaderError {}

fn error(header: &str, problem: HeaderProblem) -> HeaderError {
    HeaderError {
        header: header.to_string(),
        problem,
    }
}

/// RFC 5322 2.2: a field name is printable US-ASCII except ':'.
pub fn is_valid_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| (33..=126).contains(&b) && b != b':')
}

/// Control characters other than TAB can never be in a header value: CR and LF would start a new
/// field (header injection), and the rest are not allowed by RFC 5322 3.2.
fn has_control(value: &str) -> bool {
    value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f)
}

/// Writes a field token by token, a space between tokens, folding (CRLF SP) before a token that
/// would pass column 78.
struct Folder<'a> {
    out: &'a mut Vec<u8>,
    name: &'a str,
    column: usize,
    empty: bool,
}

impl<'a> Folder<'a> {
    fn start(out: &'a mut Vec<u8>, name: &'a str) -> Result<Self, HeaderError> {
        if !is_valid_header_name(name) {
            return Err(error(name, HeaderProblem::InvalidName));
        }
        out.extend_from_slice(name.as_bytes());
        out.push(b':');
        Ok(Folder {
            column: name.len() + 1,
            out,
            name,
            empty: true,
        })
    }

    /// Columns left on this line before the fold point, after a separating space.
    fn room(&self) -> usize {
        FOLD_AT.saturating_sub(self.column + 1)
    }

    fn token(&mut self, token: &str) -> Result<(), HeaderError> {
        // Never fold before the first token (a line of only the name), nor before an empty
        // token (the line would hold only white space, which RFC 5322 3.2.2 forbids).
        if !self.empty && !token.is_empty() && self.column + 1 + token.len() > FOLD_AT {
            self.out.extend_from_slice(b"\r\n ");
            self.column = 1;
        } else {
            self.out.push(b' ');
            self.column += 1;
        }
        self.out.extend_from_slice(token.as_bytes());
        self.column += token.len();
        self.empty = false;
        if self.column > MAX_LINE {
            return Err(error(self.name, HeaderProblem::LineTooLong));
        }
        Ok(())
    }

    fn finish(self) {
        self.out.extend_from_slice(b"\r\n");
    }
}

/// Writes an unstructured field (Subject, Comments, an `X-` field): US-ASCII text is folded at
/// its spaces; text with non-ASCII characters (or that could be read as an encoded-word, or has
/// a word too long to fold) is written as UTF-8 encoded-words (RFC 2047).
pub fn write_text_header(out: &mut Vec<u8>, name: &str, value: &str) -> Result<(), HeaderError> {
    if has_control(value) {
        return Err(error(name, HeaderProblem::ControlCharacter));
    }
    let value = value.trim_matches([' ', '\t']);
    let mut folder = Folder::start(out, name)?;
    let longest_word = value.split(' ').map(str::len).max().unwrap_or(0);
    if value.is_ascii() && !value.contains("=?") && name.len() + 2 + longest_word <= MAX_LINE {
        for word in value.split(' ') {
            folder.token(word)?;
        }
    } else {
        encoded_words(&mut folder, value)?;
    }
    folder.finish();
    Ok(())
}

/// Writes a structured field whose value the caller built from safe parts (`<uri>, <uri>`,
/// `List-Unsubscribe=One-Click`), folding at its spaces. It must be US-ASCII.
pub fn write_structured_header(
    out: &mut Vec<u8>,
    name: &str,
    value: &str,
) -> Result<(), HeaderError> {
    if has_control(value) || !value.is_ascii() {
        return Err(error(name, HeaderProblem::ControlCharacter));
    }
    let mut folder = Folder::start(out, name)?;
    for word in value.split(' ') {
        folder.token(word)?;
    }
    folder.finish();
    Ok(())
}

/// Appends the Q-encoded words for `text` (RFC 2047 4.2), whole characters per word, each word
/// at most 75 characters and starting on a new line when it would pass column 78. Only
/// letters, digits and `!*+-/` stay literal: the set RFC 2047 5 (3) allows in a phrase, so the
/// words are safe in Subject and in a display name alike. White space between two encoded-words
/// is dropped by decoders (RFC 2047 6.2), so spaces are encoded inside the words.
fn encoded_words(folder: &mut Folder<'_>, text: &str) -> Result<(), HeaderError> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let overhead = Q_PREFIX.len() + 2;
    let mut word = String::from(Q_PREFIX);
    // The first word may be shorter, to fit the line it starts on.
    let mut budget = match folder.room() {
        room if room >= overhead + 12 => room.min(ENCODED_WORD_MAX),
        _ => ENCODED_WORD_MAX,
    };
    let mut buf = [0u8; 4];
    for c in text.chars() {
        let literal = c.is_ascii_alphanumeric() || matches!(c, '!' | '*' | '+' | '-' | '/');
        let width = if literal || c == ' ' {
            1
        } else {
            3 * c.len_utf8()
        };
        if word.len() + width + 2 > budget {
            word.push_str("?=");
            folder.token(&word)?;
            word.truncate(Q_PREFIX.len());
            budget = ENCODED_WORD_MAX;
        }
        if literal {
            word.push(c);
        } else if c == ' ' {
            word.push('_');
        } else {
            for &b in c.encode_utf8(&mut buf).as_bytes() {
                word.push('=');
                word.push(HEX[usize::from(b >> 4)] as char);
                word.push(HEX[usize::from(b & 15)] as char);
            }
        }
    }
    if word.len() > Q_PREFIX.len() || folder.empty {
        word.push_str("?=");
        folder.token(&word)?;
    }
    Ok(())
}

/// A mailbox for From, To, Reply-To: an optional display name and an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    pub name: Option<String>,
    pub address: Address,
}

impl Mailbox {
    /// Parses `Display Name <local@domain>`, `"Quoted, Name" <local@domain>` or a bare address;
    /// `field` names the input in an error.
    pub fn parse(text: &str, field: Field) -> Result<Mailbox, crate::Error> {
        let text = text.trim();
        if let Some(open) = text.rfind('<').filter(|_| text.ends_with('>')) {
            let address = Address::parse(&text[open + 1..text.len() - 1], field)?;
            let name = text[..open].trim();
            let name = name
                .strip_prefix('"')
                .and_then(|n| n.strip_suffix('"'))
                .map(|n| n.replace("\\\"", "\"").replace("\\\\", "\\"))
                .unwrap_or_else(|| name.to_string());
            return Ok(Mailbox {
                name: (!name.is_empty()).then_some(name),
                address,
            });
        }
        Ok(Mailbox {
            name: None,
            address: Address::parse(text, field)?,
        })
    }
}

/// RFC 5322 3.2.3 atext: what a display-name word may hold without quotes.
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c)
}

/// Writes an address field (From, To, Reply-To) of one or more mailboxes. A display name is
/// written as atoms when it can be, as a quoted-string when it has specials, and as
/// encoded-words when it has non-ASCII characters. Addresses are written as they are: a
/// non-ASCII address needs SMTPUTF8 and is allowed in headers by RFC 6532.
pub fn write_address_header(
    out: &mut Vec<u8>,
    name: &str,
    mailboxes: &[Mailbox],
) -> Result<(), HeaderError> {
    let mut folder = Folder::start(out, name)?;
    for (i, mailbox) in mailboxes.iter().enumerate() {
        if let Some(display) = &mailbox.name {
            if has_control(display) {
                return Err(error(name, HeaderProblem::ControlCharacter));
            }
            if !display.is_ascii() || display.contains("=?") {
                encoded_words(&mut folder, display)?;
            } else if display
                .split(' ')
                .all(|w| !w.is_empty() && w.chars().all(is_atext))
            {
                for word in display.split(' ') {
                    folder.token(word)?;
                }
            } else {
                let quoted = display.replace('\\', "\\\\").replace('"', "\\\"");
                folder.token(&format!("\"{quoted}\""))?;
            }
        }
        let separator = if i + 1 < mailboxes.len() { "," } else { "" };
        folder.token(&format!("<{}>{separator}", mailbox.address))?;
    }
    folder.finish();
    Ok(())
}

/// RFC 2231 attribute-char: what a parameter value may hold unencoded.
fn is_attribute_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b)
}

/// Appends `; name="value"` to a field being folded; a value with non-ASCII or control
/// characters, quotes, or over 60 characters is written as RFC 2231 extended parameter(s),
/// `name*=utf-8''%XX...`, in numbered sections when long (RFC 2231 3, 4).
fn write_parameter(folder: &mut Folder<'_>, name: &str, value: &str) -> Result<(), HeaderError> {
    // Both keep a parameter within 78 columns on its own folded line.
    const QUOTED_MAX: usize = 60;
    const SECTION: usize = 40;
    if value.len() <= QUOTED_MAX
        && value
            .bytes()
            .all(|b| (32..=126).contains(&b) && b != b'"' && b != b'\\')
    {
        return folder.token(&format!("{name}=\"{value}\""));
    }
    let mut encoded = Vec::new();
    let mut current = String::new();
    for &b in value.as_bytes() {
        let piece = if is_attribute_char(b) {
            (b as char).to_string()
        } else {
            format!("%{b:02X}")
        };
        if current.len() + piece.len() > SECTION {
            encoded.push(std::mem::take(&mut current));
        }
        current.push_str(&piece);
    }
    encoded.push(current);
    if encoded.len() == 1 {
        return folder.token(&format!("{name}*=utf-8''{}", encoded[0]));
    }
    let last = encoded.len() - 1;
    for (i, section) in encoded.iter().enumerate() {
        let charset = if i == 0 { "utf-8''" } else { "" };
        let separator = if i < last { ";" } else { "" };
        folder.token(&format!("{name}*{i}*={charset}{section}{separator}"))?;
    }
    Ok(())
}

/// Octets quoted-printable may leave as they are (RFC 2045 6.7 (2), (3)): printable US-ASCII
/// but "=", and white space (encoded only at a line end, which the encoder checks).
const QP_LITERAL: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 33;
    while b <= 126 {
        table[b] = b != b'=' as usize;
        b += 1;
    }
    table[b' ' as usize] = true;
    table[b'\t' as usize] = true;
    table
};

/// Appends `text` as quoted-printable (RFC 2045 6.7). Line breaks (LF, CRLF or a lone CR) become
/// CRLF hard breaks; lines are broken with soft breaks at 76 characters; `=`, non-printable and
/// non-ASCII octets, and white space before a line break are encoded, so the result survives
/// any transport and no line is long.
pub fn write_quoted_printable(out: &mut Vec<u8>, text: &[u8]) {
    out.reserve(text.len() + text.len() / 8 + 16);
    let mut rest = text;
    loop {
        let end = rest
            .iter()
            .position(|&b| b == b'\r' || b == b'\n')
            .unwrap_or(rest.len());
        write_quoted_printable_line(out, &rest[..end]);
        if end == rest.len() {
            return;
        }
        out.extend_from_slice(b"\r\n");
        let crlf = rest[end] == b'\r' && rest.get(end + 1) == Some(&b'\n');
        rest = &rest[end + if crlf { 2 } else { 1 }..];
    }
}

fn write_quoted_printable_line(out: &mut Vec<u8>, line: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    // Content per encoded line, leaving room for the soft break's "=".
    const ROOM: usize = QP_LINE - 1;
    let mut column = 0;
    let mut i = 0;
    while i < line.len() {
        if column >= ROOM {
            out.extend_from_slice(b"=\r\n");
            column = 0;
        }
        // The longest run of literal octets that fits on this encoded line.
        let limit = line.len().min(i + ROOM - column);
        let mut j = i;
        while j < limit && QP_LITERAL[usize::from(line[j])] {
            j += 1;
        }
        // White space that ends the line must be encoded (RFC 2045 6.7 (3)).
        if j == line.len() && j > i && matches!(line[j - 1], b' ' | b'\t') {
            j -= 1;
        }
        if j > i {
            out.extend_from_slice(&line[i..j]);
            column += j - i;
            i = j;
            continue;
        }
        if column + 3 > ROOM {
            out.extend_from_slice(b"=\r\n");
            column = 0;
        }
        let b = line[i];
        out.extend_from_slice(&[b'=', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        column += 3;
        i += 1;
    }
}

/// Appends `data` as base64 in lines of 76 characters, each ended by CRLF (RFC 2045 6.8).
pub fn write_base64(out: &mut Vec<u8>, data: &[u8]) {
    let engine = base64::engine::general_purpose::STANDARD;
    let mut line = [0u8; 76];
    for chunk in data.chunks(BASE64_LINE_INPUT) {
        let n = engine
            .encode_slice(chunk, &mut line)
            .expect("57 octets fit 76 characters");
        out.extend_from_slice(&line[..n]);
        out.extend_from_slice(b"\r\n");
    }
}

/// A file attached to messages (`Content-Disposition: attachment`), encoded once.
#[derive(Debug, Clone)]
pub struct Attachment {
    /// The part's header fields, a blank line, and the base64 content, CRLF-ended.
    part: Box<[u8]>,
}

impl Attachment {
    /// Encodes `data` as a base64 part named `filename` of media type `content_type`.
    pub fn new(filename: &str, content_type: &str, data: &[u8]) -> Result<Self, HeaderError> {
        if has_control(filename) {
            return Err(error(
                "Content-Disposition",
                HeaderProblem::ControlCharacter,
            ));
        }
        if !is_media_type(content_type) {
            return Err(error("Content-Type", HeaderProblem::InvalidContentType));
        }
        let mut part = Vec::with_capacity(data.len() * 4 / 3 + data.len() / 28 + 256);
        let mut folder = Folder::start(&mut part, "Content-Type")?;
        folder.token(&format!("{content_type};"))?;
        // `name` is obsolete (RFC 2046 4.5.1) but some readers still show only it.
        write_parameter(&mut folder, "name", filename)?;
        folder.finish();
        let mut folder = Folder::start(&mut part, "Content-Disposition")?;
        folder.token("attachment;")?;
        write_parameter(&mut folder, "filename", filename)?;
        folder.finish();
        part.extend_from_slice(b"Content-Transfer-Encoding: base64\r\n\r\n");
        write_base64(&mut part, data);
        Ok(Attachment {
            part: part.into_boxed_slice(),
        })
    }

    /// The encoded MIME part (headers and body).
    pub fn as_bytes(&self) -> &[u8] {
        &self.part
    }
}

/// RFC 2045 5.1: `type "/" subtype`, both tokens.
fn is_media_type(text: &str) -> bool {
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| (33..=126).contains(&b) && !b"()<>@,;:\\\"/[]?=".contains(&b))
    };
    text.split_once('/')
        .is_some_and(|(t, s)| token(t) && token(s))
}

/// A media type for a file name, by its extension; `application/octet-stream` when unknown.
pub fn guess_media_type(filename: &str) -> &'static str {
    let extension = filename
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match extension.as_str() {
        "pdf" => "application/pdf",
        "txt" => "text/plain",
        "csv" => "text/csv",
        "htm" | "html" => "text/html",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "svg" => "image/svg+xml",
        "ics" => "text/calendar",
        "zip" => "application/zip",
        "json" => "application/json",
        "doc" => "application/msword",
        "docx" => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "xlsx" => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        _ => "application/octet-stream",
    }
}

/// The content of a message: a text part, an HTML part (both: multipart/alternative, RFC 2046
/// 5.1.4, text first since the last part is the preferred one), and attachments (then the whole
/// is multipart/mixed).
#[derive(Debug, Clone, Copy, Default)]
pub struct Content<'a> {
    pub text: Option<&'a str>,
    pub html: Option<&'a str>,
    pub attachments: &'a [Attachment],
}

impl Content<'_> {
    /// Appends `MIME-Version`, the content header fields, the blank line that ends the header,
    /// and the body. Call it after the other header fields.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"MIME-Version: 1.0\r\n");
        // QP and base64 never produce "=_" (QP writes "=" as "=3D"; base64 has no "_"), so a
        // boundary that starts with it cannot occur in any part (RFC 2046 5.1.1).
        let nonce = fastrand::u64(..);
        if self.attachments.is_empty() {
            self.write_alternative(out, nonce);
            return;
        }
        let boundary = format!("=_mx_m_{nonce:016x}");
        write_multipart_header(out, "mixed", &boundary);
        out.extend_from_slice(b"\r\n");
        write_delimiter(out, &boundary);
        self.write_alternative(out, nonce);
        for attachment in self.attachments {
            out.extend_from_slice(b"\r\n");
            write_delimiter(out, &boundary);
            out.extend_from_slice(attachment.as_bytes());
        }
        out.extend_from_slice(b"\r\n--");
        out.extend_from_slice(boundary.as_bytes());
        out.extend_from_slice(b"--\r\n");
    }

    fn write_alternative(&self, out: &mut Vec<u8>, nonce: u64) {
        match (self.text, self.html) {
            (Some(text), Some(html)) => {
                let boundary = format!("=_mx_a_{nonce:016x}");
                write_multipart_header(out, "alternative", &boundary);
                out.extend_from_slice(b"\r\n");
                write_delimiter(out, &boundary);
                write_text_part(out, "plain", text);
                out.extend_from_slice(b"\r\n");
                write_delimiter(out, &boundary);
                write_text_part(out, "html", html);
                out.extend_from_slice(b"\r\n--");
                out.extend_from_slice(boundary.as_bytes());
                out.extend_from_slice(b"--");
            }
            (None, Some(html)) => write_text_part(out, "html", html),
            (text, None) => write_text_part(out, "plain", text.unwrap_or("")),
        }
    }
}

fn write_multipart_header(out: &mut Vec<u8>, subtype: &str, boundary: &str) {
    out.extend_from_slice(b"Content-Type: multipart/");
    out.extend_from_slice(subtype.as_bytes());
    out.extend_from_slice(b";\r\n boundary=\"");
    out.extend_from_slice(boundary.as_bytes());
    out.extend_from_slice(b"\"\r\n");
}

/// `--boundary CRLF`; the CRLF before it belongs to the delimiter (RFC 2046 5.1.1), so the
/// caller writes it after the previous part's content.
fn write_delimiter(out: &mut Vec<u8>, boundary: &str) {
    out.extend_from_slice(b"--");
    out.extend_from_slice(boundary.as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn write_text_part(out: &mut Vec<u8>, subtype: &str, text: &str) {
    out.extend_from_slice(b"Content-Type: text/");
    out.extend_from_slice(subtype.as_bytes());
    out.extend_from_slice(
        b"; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n",
    );
    write_quoted_printable(out, text.as_bytes());
}

/// RFC 5322 3.3 date-time in UTC, e.g. `Tue, 05 May 2026 09:30:00 +0000`.
pub fn format_date(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let c = CivilTime::from_unix(secs);
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} +0000",
        DAYS[(secs / 86_400 % 7) as usize],
        c.day,
        MONTHS[c.month as usize - 1],
        c.year,
        c.hour,
        c.minute,
        c.second
    )
}

/// A UTC calendar date and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CivilTime {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

impl CivilTime {
    /// Converts seconds since 1970 (Howard Hinnant's days-to-civil algorithm).
    pub fn from_unix(secs: u64) -> CivilTime {
        let days = (secs / 86_400) as i64;
        let rem = secs % 86_400;
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        CivilTime {
            year,
            month,
            day,
            hour: (rem / 3600) as u32,
            minute: (rem / 60 % 60) as u32,
            second: (rem % 60) as u32,
        }
    }
}

/// A new `<...@domain>` Message-ID (RFC 5322 3.6.4), unique across processes: the time, a
/// per-process counter and 64 random bits.
pub fn new_message_id(domain: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("<{secs:x}.{n:x}.{:016x}@{domain}>", fastrand::u64(..))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, value: &str) -> String {
        let mut out = Vec::new();
        write_text_header(&mut out, name, value).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn ascii_text_is_folded_at_spaces() {
        assert_eq!(header("Subject", "Hello"), "Subject: Hello\r\n");
        let long = "word ".repeat(30);
        let h = header("Subject", &long);
        assert!(h.lines().all(|l| l.len() <= 78), "{h}");
        assert_eq!(
            h.replace("\r\n ", " "),
            format!("Subject: {}\r\n", long.trim())
        );
        assert_eq!(header("X-A", "two  spaces"), "X-A: two  spaces\r\n");
    }

    #[test]
    fn non_ascii_text_becomes_encoded_words() {
        assert_eq!(
            header("Subject", "Grüße, Zoë!"),
            "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe=2C_Zo=C3=AB!?=\r\n"
        );
        let h = header("Subject", &"日本語のニュースレター ".repeat(6));
        for line in h.trim_end().split("\r\n") {
            assert!(line.len() <= 78, "{line:?}");
            let word = line.trim_start_matches("Subject:").trim();
            assert!(word.starts_with("=?utf-8?q?") && word.ends_with("?="));
            assert!(word.len() <= 75);
        }
        // Text that looks like an encoded-word is encoded, so it is not decoded as one.
        assert_eq!(header("X-A", "=?x?="), "X-A: =?utf-8?q?=3D=3Fx=3F=3D?=\r\n");
    }

    #[test]
    fn injection_and_bad_names_are_refused() {
        let mut out = Vec::new();
        let e = write_text_header(&mut out, "Subject", "a\r\nBcc: x@y").unwrap_err();
        assert_eq!(
            e.to_string(),
            "header Subject: contains a control character (CR, LF, NUL or another)"
        );
        let e = write_text_header(&mut out, "Bad Name", "x").unwrap_err();
        assert_eq!(e.problem, HeaderProblem::InvalidName);
    }

    #[test]
    fn addresses_with_names() {
        let m = |s| Mailbox::parse(s, Field::Sender).unwrap();
        let mut out = Vec::new();
        write_address_header(
            &mut out,
            "From",
            &[
                m("News Desk <news@example.org>"),
                m("\"Doe, Jane\" <jane@example.org>"),
                m("Jörg <j@example.org>"),
                m("bare@example.org"),
            ],
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "From: News Desk <news@example.org>, \"Doe, Jane\" <jane@example.org>,\r\n =?utf-8?q?J=C3=B6rg?= <j@example.org>, <bare@example.org>\r\n"
        );
    }

    #[test]
    fn quoted_printable() {
        let mut out = Vec::new();
        write_quoted_printable(&mut out, "a=b café \nline two\t\r\n".as_bytes());
        assert_eq!(out, b"a=3Db caf=C3=A9=20\r\nline two=09\r\n");
        let mut out = Vec::new();
        write_quoted_printable(&mut out, "x".repeat(200).as_bytes());
        let text = String::from_utf8(out).unwrap();
        assert!(text.split("\r\n").all(|l| l.len() <= 76));
        assert_eq!(text.replace("=\r\n", ""), "x".repeat(200));
    }

    #[test]
    fn attachment_parameters() {
        let a = Attachment::new("report.pdf", "application/pdf", b"%PDF").unwrap();
        assert_eq!(
            String::from_utf8(a.as_bytes().to_vec()).unwrap(),
            "Content-Type: application/pdf; name=\"report.pdf\"\r\nContent-Disposition: attachment; filename=\"report.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERg==\r\n"
        );
        let name = format!("Übersicht {}.pdf", "sehr lang ".repeat(8));
        let a = Attachment::new(&name, "application/pdf", b"").unwrap();
        let text = String::from_utf8(a.as_bytes().to_vec()).unwrap();
        assert!(text.contains("filename*0*=utf-8''%C3%9Cbersicht"), "{text}");
        assert!(text.lines().all(|l| l.len() <= 78), "{text}");
        let e = Attachment::new("x", "pdf", b"").unwrap_err();
        assert_eq!(e.problem, HeaderProblem::InvalidContentType);
    }

    #[test]
    fn dates() {
        assert_eq!(
            format_date(UNIX_EPOCH + std::time::Duration::from_secs(0)),
            "Thu, 01 Jan 1970 00:00:00 +0000"
        );
        assert_eq!(
            format_date(UNIX_EPOCH + std::time::Duration::from_secs(1_778_000_000)),
            "Tue, 05 May 2026 16:53:20 +0000"
        );
        assert_ne!(new_message_id("x.example"), new_message_id("x.example"));
    }
}
