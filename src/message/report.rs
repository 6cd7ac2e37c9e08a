//! Delivery status notifications mxpipe writes itself (RFC 3464): a `multipart/report;
//! report-type=delivery-status` with a human-readable part, the `message/delivery-status` part
//! and the original message (RET=FULL) or its header section (RET=HDRS, the default).
//!
//! This module only writes bytes from the values it is given (no clock, no network, no
//! decision whether a report is wanted: see [`crate::engine::reports`]). Every line it writes
//! is ASCII and at most 998 octets, whatever a server's reply held, so the report is itself a
//! message [`crate::message::Body::new`] takes.

use super::dsn::{xtext_encode, Orcpt, Ret};
use super::mime;
use crate::smtp::reply::Reply;
use std::time::SystemTime;

/// One recipient the report is about.
#[derive(Debug, Clone)]
pub struct ReportedRecipient<'a> {
    pub recipient: &'a str,
    pub orcpt: Option<&'a Orcpt>,
    /// The maximum age passed (the last reply was a temporary failure), rather than a refusal.
    pub expired: bool,
    /// The last reply: a server's, or one mxpipe made (code 0) with the reason in its text.
    pub reply: &'a Reply,
    /// The destination the last attempt went to (`host:port`, `HOST[IP]:PORT`, ...); empty
    /// when none was tried.
    pub destination: &'a str,
}

/// A failure report for one message.
#[derive(Debug, Clone)]
pub struct FailureReport<'a> {
    /// This host's name (the EHLO name): Reporting-MTA, and the domain of From and Message-ID.
    pub reporting_mta: &'a str,
    /// The original envelope sender, who receives the report.
    pub sender: &'a str,
    /// ENVID, decoded.
    pub envid: Option<&'a [u8]>,
    pub arrival: SystemTime,
    pub recipients: &'a [ReportedRecipient<'a>],
    /// How much of the original to return (`None`: headers, RFC 3461 4.3 leaves it to us).
    pub ret: Option<Ret>,
    /// The original message as it was to be sent (CRLF line ends).
    pub original: &'a [u8],
}

impl FailureReport<'_> {
    /// The report as a message, `now` its Date.
    pub fn write(&self, now: SystemTime) -> Vec<u8> {
        let mut out = Vec::with_capacity(2048 + self.original.len());
        let boundary = format!("=_mx_r_{:016x}", fastrand::u64(..));
        let host = self.reporting_mta;
        push(
            &mut out,
            &format!("From: Mail Delivery System <MAILER-DAEMON@{host}>"),
        );
        push(&mut out, &format!("To: <{}>", self.sender));
        push(&mut out, "Subject: Undelivered Mail Returned to Sender");
        push(&mut out, &format!("Date: {}", mime::format_date(now)));
        push(
            &mut out,
            &format!("Message-ID: {}", mime::new_message_id(host)),
        );
        // RFC 3834 5: an automatic response, which auto-responders must not answer.
        push(&mut out, "Auto-Submitted: auto-replied");
        push(&mut out, "MIME-Version: 1.0");
        push(
            &mut out,
            "Content-Type: multipart/report; report-type=delivery-status;",
        );
        push(&mut out, &format!(" boundary=\"{boundary}\""));
        push(&mut out, "");
        push(&mut out, "This is a MIME-encapsulated message.");
        push(&mut out, "");

        push(&mut out, &format!("--{boundary}"));
        push(&mut out, "Content-Description: Notification");
        push(&mut out, "Content-Type: text/plain; charset=us-ascii");
        push(&mut out, "");
        push(
            &mut out,
            &format!("This is the mail system at host {host}."),
        );
        push(&mut out, "");
        push(
            &mut out,
            "Your message could not be delivered to one or more recipients.",
        );
        push(&mut out, "");
        for r in self.recipients {
            let why = if r.expired {
                "gave up after retrying"
            } else {
                "refused"
            };
            fold(
                &mut out,
                &format!(
                    "<{}>: {why}: {}",
                    ascii(r.recipient),
                    ascii(&r.reply.to_string())
                ),
            );
        }
        push(&mut out, "");

        push(&mut out, &format!("--{boundary}"));
        push(&mut out, "Content-Description: Delivery report");
        push(&mut out, "Content-Type: message/delivery-status");
        push(&mut out, "");
        push(&mut out, &format!("Reporting-MTA: dns; {host}"));
        if let Some(envid) = self.envid {
            push(
                &mut out,
                &format!("Original-Envelope-Id: {}", printable(envid)),
            );
        }
        push(
            &mut out,
            &format!("Arrival-Date: {}", mime::format_date(self.arrival)),
        );
        for r in self.recipients {
            push(&mut out, "");
            if let Some(o) = r.orcpt {
                push(
                    &mut out,
                    &format!(
                        "Original-Recipient: {};{}",
                        o.addr_type,
                        printable(&o.address)
                    ),
                );
            }
            // RFC 3464 2.3.2: utf-8 for a non-ASCII address (RFC 6533), else rfc822.
            let (kind, address) = if r.recipient.is_ascii() {
                ("rfc822", r.recipient.to_string())
            } else {
                ("utf-8", xtext_encode(r.recipient.as_bytes()))
            };
            push(&mut out, &format!("Final-Recipient: {kind}; {address}"));
            push(&mut out, "Action: failed");
            push(&mut out, &format!("Status: {}", status(r)));
            if r.reply.code != 0 {
                if let Some(host) = remote_host(r.destination) {
                    push(&mut out, &format!("Remote-MTA: dns; {}", ascii(host)));
                }
                fold(
                    &mut out,
                    &format!("Diagnostic-Code: smtp; {}", ascii(&r.reply.to_string())),
                );
            }
        }
        push(&mut out, "");

        push(&mut out, &format!("--{boundary}"));
        let (headers_only, header_end) = match self.ret {
            Some(Ret::Full) => (false, self.original.len()),
            _ => (true, header_section_len(self.original)),
        };
        if headers_only {
            push(&mut out, "Content-Description: Undelivered Message Headers");
            push(&mut out, "Content-Type: text/rfc822-headers");
        } else {
            push(&mut out, "Content-Description: Undelivered Message");
            push(&mut out, "Content-Type: message/rfc822");
        }
        push(&mut out, "");
        let part = &self.original[..header_end];
        out.extend_from_slice(part);
        if !part.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
        push(&mut out, "");
        push(&mut out, &format!("--{boundary}--"));
        out
    }
}

fn push(out: &mut Vec<u8>, line: &str) {
    out.extend_from_slice(line.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Writes a field, folded at spaces before 78 columns (RFC 5322 2.2.3); a word longer than a
/// line is split at 990 octets, so no line exceeds 998.
fn fold(out: &mut Vec<u8>, text: &str) {
    let mut column = 0;
    for (i, word) in text.split(' ').enumerate() {
        if i > 0 {
            if column + 1 + word.len() > 78 {
                out.extend_from_slice(b"\r\n");
                column = 0;
            }
            out.push(b' ');
            column += 1;
        }
        for chunk in word.as_bytes().chunks(990) {
            if column + chunk.len() > 990 {
                out.extend_from_slice(b"\r\n ");
                column = 1;
            }
            out.extend_from_slice(chunk);
            column += chunk.len();
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// `text` with every octet outside printable ASCII as `?` (a reply's text can hold anything).
fn ascii(text: &str) -> String {
    text.chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .collect()
}

/// A decoded ENVID or ORCPT address as the report shows it: as it is when printable ASCII
/// without spaces, else xtext (RFC 3461 4), which a reader can decode.
fn printable(value: &[u8]) -> String {
    if value.iter().all(|b| (b'!'..=b'~').contains(b)) {
        String::from_utf8(value.to_vec()).expect("ASCII")
    } else {
        xtext_encode(value)
    }
}

/// RFC 3464 2.3.4: the reply's enhanced code when it says the same (a permanent code for a
/// refusal, any code for an expiry), else one made from the reply code.
fn status(r: &ReportedRecipient) -> String {
    match r.reply.enhanced {
        Some(e) if r.expired || e.class == 5 => e.to_string(),
        // RFC 3463 3.5: "delivery time expired".
        _ if r.expired => "4.4.7".into(),
        _ => "5.0.0".into(),
    }
}

/// The host of a destination name (`host:port`, `HOST[IP]:PORT ...`, `smtps://host:port`).
fn remote_host(destination: &str) -> Option<&str> {
    let d = destination.strip_prefix("smtps://").unwrap_or(destination);
    let d = d.split(' ').next().unwrap_or(d);
    let host = match d.find('[') {
        Some(i) if i > 0 => &d[..i],
        _ => d.rsplit_once(':').map_or(d, |(h, _)| h),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then_some(host)
}

/// Octets of the header section, the blank line that ends it excluded (the whole message when
/// it has no body).
fn header_section_len(message: &[u8]) -> usize {
    if message.starts_with(b"\r\n") {
        return 0;
    }
    memchr::memmem::find(message, b"\r\n\r\n").map_or(message.len(), |i| i + 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::reply::EnhancedCode;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn report_fields_and_headers_only_by_default() {
        let refused = Reply::new(550, Some(EnhancedCode::new(5, 1, 1)), "no such user");
        let expired = Reply::new(0, None, "connection refused");
        let orcpt = Orcpt {
            addr_type: "rfc822".into(),
            address: b"Ann@x.example".to_vec(),
        };
        let recipients = [
            ReportedRecipient {
                recipient: "ann@x.example",
                orcpt: Some(&orcpt),
                expired: false,
                reply: &refused,
                destination: "mx.x.example[192.0.2.1]:25",
            },
            ReportedRecipient {
                recipient: "bob@y.example",
                orcpt: None,
                expired: true,
                reply: &expired,
                destination: "",
            },
        ];
        let report = FailureReport {
            reporting_mta: "out.example.org",
            sender: "news@example.org",
            envid: Some(b"batch 7"),
            arrival: UNIX_EPOCH + Duration::from_secs(1_780_000_000),
            recipients: &recipients,
            ret: None,
            original: b"Subject: hi\r\nFrom: a@example.org\r\n\r\nsecret body\r\n",
        };
        let text = String::from_utf8(report.write(UNIX_EPOCH)).unwrap();
        assert!(text.starts_with(
            "From: Mail Delivery System <MAILER-DAEMON@out.example.org>\r\nTo: <news@example.org>\r\n"
        ));
        for field in [
            "Reporting-MTA: dns; out.example.org\r\n",
            "Original-Envelope-Id: batch+207\r\n",
            "Original-Recipient: rfc822;Ann@x.example\r\nFinal-Recipient: rfc822; ann@x.example\r\n\
             Action: failed\r\nStatus: 5.1.1\r\nRemote-MTA: dns; mx.x.example\r\n\
             Diagnostic-Code: smtp; 550 5.1.1 no such user\r\n",
            "Final-Recipient: rfc822; bob@y.example\r\nAction: failed\r\nStatus: 4.4.7\r\n\r\n",
            "Content-Type: text/rfc822-headers\r\n\r\nSubject: hi\r\nFrom: a@example.org\r\n\r\n--",
        ] {
            assert!(text.contains(field), "{field:?} missing from\n{text}");
        }
        assert!(!text.contains("secret body"));
        let full = FailureReport {
            ret: Some(Ret::Full),
            ..report
        };
        let text = String::from_utf8(full.write(UNIX_EPOCH)).unwrap();
        assert!(text.contains("Content-Type: message/rfc822\r\n\r\nSubject: hi\r\n"));
        assert!(text.contains("secret body\r\n"));
    }

    #[test]
    fn a_long_or_odd_reply_never_makes_a_long_or_8bit_line() {
        let reply = Reply::new(
            550,
            None,
            format!("{}\u{e9}\r{}", "w ".repeat(600), "x".repeat(3000)),
        );
        let recipients = [ReportedRecipient {
            recipient: "a@x.example",
            orcpt: None,
            expired: false,
            reply: &reply,
            destination: "127.0.0.1:25",
        }];
        let report = FailureReport {
            reporting_mta: "h.example",
            sender: "s@example.org",
            envid: None,
            arrival: UNIX_EPOCH,
            recipients: &recipients,
            ret: None,
            original: b"Subject: x\r\n\r\n",
        };
        let bytes = report.write(UNIX_EPOCH);
        assert!(bytes.is_ascii());
        assert!(bytes.split(|&b| b == b'\n').all(|l| l.len() <= 999));
        assert!(crate::message::Body::new(&bytes).is_ok());
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.contains("Status: 5.0.0\r\nRemote-MTA: dns; 127.0.0.1\r\n"));
    }
}
