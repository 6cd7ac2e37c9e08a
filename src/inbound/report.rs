//! Reading what comes back: an RFC 3464 delivery status notification, an RFC 5965 ARF
//! feedback report, or one of the many non-standard bounce texts (Exchange, Gmail, qmail, Exim,
//! Postfix, Sendmail), turned into a [`Report`] whose per-recipient failures carry an SMTP
//! [`Reply`] classified by the engine's one bounce table ([`Classifier`]).
//!
//! MIME is parsed by `mail-parser`; this module reads the report fields (which are header-like
//! blocks, RFC 3464 2.1) itself. It performs no I/O and decides nothing about suppression:
//! anything it cannot read is a [`ParseError`], never a guess.

use crate::engine::classify::{Category, Classifier};
use crate::smtp::{EnhancedCode, Reply};
use mail_parser::{MessageParser, MimeHeaders, PartType};
use std::fmt;

/// The largest message this module reads; larger input is refused as [`ParseError::TooLarge`].
pub const MAX_REPORT_BYTES: usize = 4 << 20;
/// The most per-recipient blocks one DSN may carry.
const MAX_RECIPIENTS: usize = 1000;

/// What kind of message arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportKind {
    /// `multipart/report; report-type=delivery-status` (RFC 3464).
    DeliveryStatus,
    /// `multipart/report; report-type=feedback-report` (RFC 5965).
    Feedback,
    /// A bounce written as prose by an MTA that does not send RFC 3464 reports.
    Text,
}

/// RFC 3464 2.3.3 Action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Failed,
    Delayed,
    Delivered,
    Relayed,
    Expanded,
}

impl Action {
    fn parse(value: &str) -> Option<Action> {
        match value.trim().to_ascii_lowercase().as_str() {
            "failed" => Some(Action::Failed),
            "delayed" => Some(Action::Delayed),
            "delivered" => Some(Action::Delivered),
            "relayed" => Some(Action::Relayed),
            "expanded" => Some(Action::Expanded),
            _ => None,
        }
    }
}

/// One recipient of a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientStatus {
    /// Final-Recipient (RFC 3464 2.3.2), without its address type; for a text bounce, the
    /// address the text names.
    pub final_recipient: Option<String>,
    /// Original-Recipient (RFC 3464 2.3.1), when given.
    pub original_recipient: Option<String>,
    pub action: Action,
    /// The reply this recipient failed with: the Diagnostic-Code's SMTP reply when there is
    /// one, with Status as its enhanced code.
    pub reply: Reply,
    pub category: Category,
}

impl RecipientStatus {
    /// A permanent failure (RFC 3464 Action failed with a 5.x.x status).
    pub fn is_permanent(&self) -> bool {
        self.action == Action::Failed && reply_class(&self.reply) != 4
    }
}

fn reply_class(reply: &Reply) -> u8 {
    if reply.code != 0 {
        (reply.code / 100) as u8
    } else {
        reply.enhanced.map_or(5, |e| e.class)
    }
}

/// The machine-readable part of an ARF report (RFC 5965 3.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Feedback {
    /// `abuse`, `fraud`, `not-spam`, `virus`, `other` (RFC 5965 7.3), lower case.
    pub feedback_type: String,
    pub original_mail_from: Option<String>,
    pub original_rcpt_to: Vec<String>,
    pub user_agent: Option<String>,
}

/// Header fields of the original message, when the report includes them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OriginalHeaders {
    pub message_id: Option<String>,
    /// Return-Path: the envelope sender the original was sent with (the VERP address).
    pub return_path: Option<String>,
    pub to: Vec<String>,
    /// Every field, names as written, values unfolded; bounded by the report's size.
    pub fields: Vec<(String, String)>,
}

impl OriginalHeaders {
    /// The value of field `name` (case-insensitive), the first when repeated.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A report, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub kind: ReportKind,
    /// Per-recipient results (empty for a feedback report).
    pub recipients: Vec<RecipientStatus>,
    pub feedback: Option<Feedback>,
    pub original: OriginalHeaders,
    /// The report's own From address, lower case.
    pub from: Option<String>,
}

/// Why a message is not a report this module can read; such messages go to quarantine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    TooLarge(usize),
    /// No header section: not a mail message.
    NotMime,
    /// A multipart/report whose report part is missing or has no usable fields.
    BadReport(&'static str),
    /// Neither a report nor a text bounce mxpipe recognises.
    Unrecognised,
}

impl ParseError {
    /// A short name for metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            ParseError::TooLarge(_) => "too_large",
            ParseError::NotMime => "not_mime",
            ParseError::BadReport(_) => "bad_report",
            ParseError::Unrecognised => "unrecognised",
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::TooLarge(n) => write!(
                f,
                "message of {n} bytes is larger than the {MAX_REPORT_BYTES} bytes a report may be"
            ),
            ParseError::NotMime => f.write_str("not a mail message (no header section)"),
            ParseError::BadReport(why) => write!(f, "malformed report: {why}"),
            ParseError::Unrecognised => {
                f.write_str("neither a delivery report, a feedback report nor a known bounce text")
            }
        }
    }
}

impl std::error::Error for ParseError {}

/// Reads one message. `classifier` maps each failure to its [`Category`].
pub fn parse(raw: &[u8], classifier: &Classifier) -> Result<Report, ParseError> {
    if raw.len() > MAX_REPORT_BYTES {
        return Err(ParseError::TooLarge(raw.len()));
    }
    // The MIME parser is another crate's code fed hostile input: a panic in it is one more
    // malformed message, not the end of the listener.
    let parsed = std::panic::catch_unwind(|| MessageParser::default().parse(raw))
        .map_err(|_| ParseError::BadReport("the MIME parser gave up on it"))?;
    let message = parsed
        .filter(|m| !m.headers().is_empty())
        .ok_or(ParseError::NotMime)?;
    let from = message
        .from()
        .and_then(|a| a.first())
        .and_then(|a| a.address())
        .map(|a| a.to_ascii_lowercase());
    let root = message.root_part();
    let report_type = root
        .content_type()
        .filter(|ct| {
            ct.ctype().eq_ignore_ascii_case("multipart")
                && ct
                    .subtype()
                    .is_some_and(|s| s.eq_ignore_ascii_case("report"))
        })
        .and_then(|ct| ct.attribute("report-type"))
        .map(|t| t.to_ascii_lowercase());

    let mut status_part = None;
    let mut feedback_part = None;
    let mut original = OriginalHeaders::default();
    let mut text = String::new();
    for part in message.parts.iter().skip(1) {
        let Some(ct) = part.content_type() else {
            if let PartType::Text(t) = &part.body {
                push_text(&mut text, t);
            }
            continue;
        };
        let ctype = ct.ctype().to_ascii_lowercase();
        let subtype = ct.subtype().unwrap_or("").to_ascii_lowercase();
        match (ctype.as_str(), subtype.as_str()) {
            ("message", "delivery-status") | ("message", "global-delivery-status") => {
                status_part.get_or_insert(part.contents());
            }
            ("message", "feedback-report") => {
                feedback_part.get_or_insert(part.contents());
            }
            ("message", "rfc822") | ("message", "global") | ("text", "rfc822-headers")
                if original.fields.is_empty() =>
            {
                original = original_headers(part.contents());
            }
            ("message", _) => {}
            ("text", _) => {
                if let PartType::Text(t) = &part.body {
                    push_text(&mut text, t);
                }
            }
            _ => {}
        }
    }
    if message.parts.len() == 1 {
        if let Some(t) = root.text_contents() {
            push_text(&mut text, t);
        }
    }

    match report_type.as_deref() {
        Some("delivery-status") => {
            let fields = status_part.ok_or(ParseError::BadReport(
                "report-type=delivery-status without a message/delivery-status part",
            ))?;
            let recipients = delivery_status(fields, classifier)?;
            Ok(Report {
                kind: ReportKind::DeliveryStatus,
                recipients,
                feedback: None,
                original,
                from,
            })
        }
        Some("feedback-report") => {
            let fields = feedback_part.ok_or(ParseError::BadReport(
                "report-type=feedback-report without a message/feedback-report part",
            ))?;
            let feedback = feedback_report(fields)?;
            Ok(Report {
                kind: ReportKind::Feedback,
                recipients: Vec::new(),
                feedback: Some(feedback),
                original,
                from,
            })
        }
        _ => {
            // A text bounce: the original is often quoted inline after a marker line.
            if original.fields.is_empty() {
                original = quoted_original(&text);
            }
            let recipients = super::text::recipients(&text, classifier);
            if recipients.is_empty() {
                return Err(ParseError::Unrecognised);
            }
            Ok(Report {
                kind: ReportKind::Text,
                recipients,
                feedback: None,
                original,
                from,
            })
        }
    }
}

fn push_text(out: &mut String, text: &str) {
    if out.len() < MAX_REPORT_BYTES {
        out.push_str(text);
        out.push('\n');
    }
}

/// Header-like fields (RFC 3464 2.1, RFC 5965 3.1): unfolded, split into blocks at blank lines.
fn field_blocks(raw: &[u8]) -> Vec<Vec<(String, String)>> {
    let text = String::from_utf8_lossy(raw);
    let mut blocks = Vec::new();
    let mut block: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !block.is_empty() {
                blocks.push(std::mem::take(&mut block));
            }
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = block.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
            continue;
        }
        if let Some((name, value)) = line.split_once(':') {
            block.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    if !block.is_empty() {
        blocks.push(block);
    }
    blocks
}

fn field<'a>(block: &'a [(String, String)], name: &str) -> Option<&'a str> {
    block
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// `rfc822; ann@example.org` → `ann@example.org` (RFC 3464 2.3.1: address-type ; address).
fn typed_address(value: &str) -> Option<String> {
    let address = match value.split_once(';') {
        Some((_, a)) => a,
        None => value,
    };
    let address = address.trim().trim_start_matches('<').trim_end_matches('>');
    (address.contains('@') && !address.contains(char::is_whitespace))
        .then(|| address.to_ascii_lowercase())
}

/// `5.1.1` (possibly followed by a comment).
pub(crate) fn parse_enhanced(value: &str) -> Option<EnhancedCode> {
    let code = value
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()?;
    let mut it = code.split('.');
    let class: u8 = it.next()?.parse().ok()?;
    let subject: u16 = it.next()?.parse().ok()?;
    let detail: u16 = it.next()?.parse().ok()?;
    if it.next().is_some() || !matches!(class, 2 | 4 | 5) || subject > 999 || detail > 999 {
        return None;
    }
    Some(EnhancedCode::new(class, subject, detail))
}

/// `smtp; 550 5.1.1 <ann@example.org>: Recipient address rejected` → (550, the text after it).
fn diagnostic_reply(value: &str) -> (u16, String) {
    let text = match value.split_once(';') {
        Some((kind, rest)) if !kind.contains(' ') => rest.trim(),
        _ => value.trim(),
    };
    let bytes = text.as_bytes();
    if bytes.len() >= 3
        && bytes[..3].iter().all(u8::is_ascii_digit)
        && matches!(bytes[0], b'4' | b'5')
        && bytes.get(3).is_none_or(|b| *b == b' ' || *b == b'-')
    {
        let code = text[..3].parse().unwrap_or(0);
        (code, text[3..].trim_start_matches(['-', ' ']).to_string())
    } else {
        (0, text.to_string())
    }
}

fn delivery_status(
    raw: &[u8],
    classifier: &Classifier,
) -> Result<Vec<RecipientStatus>, ParseError> {
    let blocks = field_blocks(raw);
    let mut recipients = Vec::new();
    // The first block is per-message (Reporting-MTA, RFC 3464 2.2); the rest per recipient.
    for block in blocks.iter().skip(1).take(MAX_RECIPIENTS) {
        let Some(action) = field(block, "Action").and_then(Action::parse) else {
            continue;
        };
        let final_recipient = field(block, "Final-Recipient").and_then(typed_address);
        let original_recipient = field(block, "Original-Recipient").and_then(typed_address);
        if final_recipient.is_none() && original_recipient.is_none() {
            continue;
        }
        let status = field(block, "Status").and_then(parse_enhanced);
        let (code, text) = field(block, "Diagnostic-Code")
            .map(diagnostic_reply)
            .unwrap_or((0, String::new()));
        // The Diagnostic-Code's own enhanced code, when it repeats one, is dropped from the
        // text; Status is authoritative (RFC 3464 2.3.4).
        let text = match text.split_once(' ') {
            Some((first, rest)) if parse_enhanced(first).is_some() => rest.to_string(),
            _ => text,
        };
        let enhanced = status.or_else(|| parse_enhanced(&text));
        if enhanced.is_none() && code == 0 {
            continue;
        }
        let reply = Reply::new(code, enhanced, text);
        let category = classifier.classify(&reply);
        recipients.push(RecipientStatus {
            final_recipient,
            original_recipient,
            action,
            reply,
            category,
        });
    }
    if recipients.is_empty() {
        return Err(ParseError::BadReport(
            "no per-recipient block with an Action, a recipient and a Status",
        ));
    }
    Ok(recipients)
}

fn feedback_report(raw: &[u8]) -> Result<Feedback, ParseError> {
    let blocks = field_blocks(raw);
    let fields: Vec<(String, String)> = blocks.into_iter().flatten().collect();
    let feedback_type = field(&fields, "Feedback-Type")
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        .ok_or(ParseError::BadReport("no Feedback-Type"))?;
    Ok(Feedback {
        feedback_type,
        original_mail_from: field(&fields, "Original-Mail-From").and_then(typed_address),
        original_rcpt_to: fields
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("Original-Rcpt-To"))
            .filter_map(|(_, v)| typed_address(v))
            .collect(),
        user_agent: field(&fields, "User-Agent").map(str::to_string),
    })
}

/// The header fields of an embedded original message (or text/rfc822-headers part).
fn original_headers(raw: &[u8]) -> OriginalHeaders {
    let end = find_header_end(raw);
    let fields: Vec<(String, String)> = field_blocks(&raw[..end])
        .into_iter()
        .next()
        .unwrap_or_default();
    headers_from_fields(fields)
}

fn find_header_end(raw: &[u8]) -> usize {
    memchr::memmem::find(raw, b"\r\n\r\n")
        .or_else(|| memchr::memmem::find(raw, b"\n\n"))
        .unwrap_or(raw.len())
}

fn headers_from_fields(fields: Vec<(String, String)>) -> OriginalHeaders {
    let get = |name: &str| field(&fields, name).map(str::to_string);
    OriginalHeaders {
        message_id: get("Message-ID").map(|v| v.trim().to_string()),
        return_path: get("Return-Path").and_then(|v| typed_address(&v)),
        to: get("To").map(|v| addresses_in(&v)).unwrap_or_default(),
        fields,
    }
}

/// Addresses in angle brackets, else bare words with an `@`.
pub(crate) fn addresses_in(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find('<') {
        let Some(close) = rest[open..].find('>') else {
            break;
        };
        let candidate = &rest[open + 1..open + close];
        if candidate.contains('@') && !candidate.contains(char::is_whitespace) {
            out.push(candidate.trim_start_matches("mailto:").to_ascii_lowercase());
        }
        rest = &rest[open + close + 1..];
    }
    if out.is_empty() {
        for word in text.split(|c: char| c.is_whitespace() || c == ',' || c == ';') {
            let word = word.trim_matches(|c: char| "\"'()[]:.".contains(c));
            if word.contains('@') && !word.starts_with('@') && !word.ends_with('@') {
                out.push(word.to_ascii_lowercase());
            }
        }
    }
    out
}

/// A text bounce that quotes the original inline after a marker line ("------ This is a copy
/// of the message, including all the headers. ------", "--- Below this line is a copy of the
/// message.", "----- Original message -----").
fn quoted_original(text: &str) -> OriginalHeaders {
    const MARKERS: &[&str] = &[
        "copy of the message",
        "below this line is a copy",
        "original message",
        "returned message",
        "undelivered message",
    ];
    let lower = text.to_ascii_lowercase();
    let Some(at) = MARKERS.iter().filter_map(|m| lower.find(m)).min() else {
        return OriginalHeaders::default();
    };
    let after = &text[at..];
    let start = after.find('\n').map_or(after.len(), |n| n + 1);
    let body = after[start..].trim_start_matches(['\r', '\n']);
    original_headers(body.as_bytes())
}
