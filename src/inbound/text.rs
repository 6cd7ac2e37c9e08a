//! Non-standard bounces: the prose that MTAs without RFC 3464 reports send (qmail's "does not
//! like recipient", Exim's "following address(es) failed", old Sendmail's "permanent fatal
//! errors", Postfix and Yahoo's `<address>: reply` paragraphs, Exchange's "Remote Server
//! returned", Gmail's "The response from the remote server was").
//!
//! Each recipient found gets the SMTP reply quoted next to it, classified by the engine's one
//! table. A paragraph with an address but no reply code, enhanced code or phrase the table
//! knows yields nothing: guessing would suppress the wrong address.

use super::report::{addresses_in, parse_enhanced, Action, RecipientStatus};
use crate::engine::classify::{Category, Classifier};
use crate::smtp::Reply;

/// How many lines after an address belong to its diagnostic.
const DIAGNOSTIC_LINES: usize = 8;
/// The longest reply text kept.
const REPLY_TEXT: usize = 500;
/// The most recipients read from one text bounce.
const MAX_RECIPIENTS: usize = 100;

/// Phrases that say the message is still being tried (a delay notice, not a bounce).
const DELAY_PHRASES: &[&str] = &[
    "has not yet been delivered",
    "delivery has been delayed",
    "message delayed",
    "will retry",
    "will keep trying",
    "still trying",
    "delivery is delayed",
];

/// Phrases after which the reply text follows (Exchange, Gmail).
const REPLY_MARKERS: &[&str] = &[
    "remote server returned '",
    "remote server returned",
    "the response from the remote server was:",
    "the response was:",
    "reason:",
    "remote host said:",
    "smtp error from remote mail server after",
];

/// Sentences that name the failed recipient (Gmail, Exchange, Office 365).
const RECIPIENT_SENTENCES: &[&str] = &[
    "wasn't delivered to ",
    "was not delivered to ",
    "couldn't be delivered to ",
    "your message to ",
    "delivery to the following recipient failed permanently:",
    "delivery to the following recipients failed permanently:",
    "delivery has failed to these recipients or groups:",
    "the following address(es) failed:",
    "the following addresses had permanent fatal errors",
    "unable to deliver your message to the following address",
    "could not be delivered to one or more recipients",
    "the address to which the message has not yet been delivered is:",
];

/// The recipients a text bounce reports, with their replies.
pub(crate) fn recipients(text: &str, classifier: &Classifier) -> Vec<RecipientStatus> {
    let text = body_before_quote(text);
    let lower = text.to_ascii_lowercase();
    let delayed = DELAY_PHRASES.iter().any(|p| lower.contains(p));
    let lines: Vec<&str> = text.lines().collect();
    let mut found: Vec<(String, String)> = Vec::new();

    // `<ann@example.org>: reply` (Postfix, qmail, Yahoo) or `<ann@example.org>` followed by an
    // indented `(reason: ...)` (Sendmail), or a bare indented address under Exim's heading.
    let mut under_heading = false;
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim();
        let low = trimmed.to_ascii_lowercase();
        if RECIPIENT_SENTENCES
            .iter()
            .any(|s| low.contains(s.trim_end()))
        {
            under_heading = true;
        }
        let address = if let Some(rest) = trimmed.strip_prefix('<') {
            rest.split_once('>').and_then(|(a, after)| {
                let after = after.trim_start();
                (after.is_empty() || after.starts_with(':') || after.starts_with("..."))
                    .then_some(a)
            })
        } else if under_heading
            && line.starts_with([' ', '\t'])
            && trimmed.contains('@')
            && !trimmed.contains(char::is_whitespace)
        {
            Some(trimmed)
        } else {
            None
        };
        let Some(address) = address.filter(|a| is_address(a)) else {
            continue;
        };
        let mut diagnostic = trimmed
            .split_once('>')
            .map(|(_, after)| after.trim_start_matches([':', ' ', '.']).to_string())
            .unwrap_or_default();
        for next in lines.iter().skip(i + 1).take(DIAGNOSTIC_LINES) {
            let t = next.trim();
            if t.is_empty() || (t.starts_with('<') && t.contains("@") && t.contains('>')) {
                break;
            }
            if t.starts_with("---") {
                break;
            }
            diagnostic.push(' ');
            diagnostic.push_str(t);
        }
        found.push((address.to_ascii_lowercase(), diagnostic));
        if found.len() >= MAX_RECIPIENTS {
            break;
        }
    }

    // Gmail and Exchange: the recipient in a sentence, the reply after a marker.
    if found.is_empty() {
        let recipient = RECIPIENT_SENTENCES.iter().find_map(|s| {
            let at = lower.find(s)?;
            let after = &text[at + s.len()..];
            let window: String = after.chars().take(300).collect();
            addresses_in(&window).into_iter().find(|a| is_address(a))
        });
        if let Some(recipient) = recipient {
            let diagnostic = REPLY_MARKERS
                .iter()
                .find_map(|m| {
                    let at = lower.find(m)?;
                    let after = text[at + m.len()..].trim_start();
                    let end = after.find("\n\n").unwrap_or(after.len()).min(1000);
                    let mut end = end;
                    while !after.is_char_boundary(end) {
                        end -= 1;
                    }
                    Some(after[..end].replace(['\r', '\n'], " "))
                })
                // No marker: the first reply code anywhere in the report's own words.
                .unwrap_or_else(|| text.to_string());
            found.push((recipient, diagnostic));
        }
    }

    found
        .into_iter()
        .filter_map(|(address, diagnostic)| {
            let reply = reply_in(&diagnostic)?;
            let category = classifier.classify(&reply);
            if reply.code == 0 && reply.enhanced.is_none() && category == Category::Other {
                return None;
            }
            Some(RecipientStatus {
                final_recipient: Some(address),
                original_recipient: None,
                action: if delayed {
                    Action::Delayed
                } else {
                    Action::Failed
                },
                reply,
                category,
            })
        })
        .collect()
}

fn is_address(a: &str) -> bool {
    let Some((local, domain)) = a.rsplit_once('@') else {
        return false;
    };
    !local.is_empty()
        && domain.contains('.')
        && !a.contains(['<', '>', '(', ')', ',', ';', '"'])
        && !a.contains(char::is_whitespace)
}

/// Only the report's own words: what follows a quoted original is the sender's content.
fn body_before_quote(text: &str) -> &str {
    const MARKERS: &[&str] = &[
        "------ This is a copy of the message",
        "--- Below this line is a copy of the message",
        "----- Original message -----",
        "------ Original message ------",
        "   ----- Original message follows -----",
    ];
    let end = MARKERS
        .iter()
        .filter_map(|m| text.find(m))
        .min()
        .unwrap_or(text.len());
    &text[..end]
}

/// The SMTP reply quoted in `text`: the first `4xx`/`5xx` code (followed by a space, `-` or
/// `:`) with the enhanced code and text after it; else an enhanced code alone; else the text
/// by itself (the classifier's phrases may still know it).
fn reply_in(text: &str) -> Option<Reply> {
    let text = text.trim().trim_matches('\'');
    if text.is_empty() {
        return None;
    }
    let bytes = text.as_bytes();
    for i in 0..bytes.len().saturating_sub(2) {
        let boundary_before =
            i == 0 || !bytes[i - 1].is_ascii_alphanumeric() && bytes[i - 1] != b'.';
        if !boundary_before
            || !matches!(bytes[i], b'4' | b'5')
            || !bytes[i + 1].is_ascii_digit()
            || !bytes[i + 2].is_ascii_digit()
        {
            continue;
        }
        let after = bytes.get(i + 3).copied();
        if after.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'.') {
            // An enhanced code (5.1.1) or a longer number: look at enhanced codes below.
            continue;
        }
        let code: u16 = text[i..i + 3].parse().ok()?;
        let rest = text[i + 3..].trim_start_matches([' ', '-', ':']);
        let (enhanced, rest) = match rest.split_once(' ') {
            Some((first, tail)) => match parse_enhanced(first) {
                Some(e) if first.bytes().all(|b| b.is_ascii_digit() || b == b'.') => {
                    (Some(e), tail)
                }
                _ => (None, rest),
            },
            None => (parse_enhanced(rest), rest),
        };
        return Some(Reply::new(code, enhanced, first_line(rest)));
    }
    for word in text.split(|c: char| c.is_whitespace() || c == '(' || c == ')' || c == '#') {
        if word.bytes().filter(|&b| b == b'.').count() == 2 {
            if let Some(e) = parse_enhanced(word) {
                return Some(Reply::new(0, Some(e), first_line(text)));
            }
        }
    }
    Some(Reply::new(0, None, first_line(text)))
}

/// At most [`REPLY_TEXT`] bytes of `text`, up to its first blank line: a reply, not the
/// report around it.
fn first_line(text: &str) -> &str {
    let mut end = text.find("\n\n").unwrap_or(text.len()).min(REPLY_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_reply_in_the_ways_mtas_quote_it() {
        let r = reply_in("host mx[192.0.2.1] said: 550 5.1.1 <a@b.example>: User unknown (in reply to RCPT TO command)").unwrap();
        assert_eq!(
            (r.code, r.enhanced.map(|e| e.to_string())),
            (550, Some("5.1.1".into()))
        );
        let r =
            reply_in("554: delivery error: dd This user doesn't have a yahoo.com account").unwrap();
        assert_eq!((r.code, r.enhanced), (554, None));
        let r =
            reply_in("'550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found'").unwrap();
        assert_eq!(r.enhanced.map(|e| e.to_string()), Some("5.1.10".into()));
        let r = reply_in("#5.1.1 smtp;550 user unknown").unwrap();
        assert_eq!(r.code, 550);
        let r = reply_in("mailbox is full (#5.2.2)").unwrap();
        assert_eq!(
            (r.code, r.enhanced.map(|e| e.to_string())),
            (0, Some("5.2.2".into()))
        );
    }
}
