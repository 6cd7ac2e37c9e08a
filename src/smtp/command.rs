//! Command encoding (RFC 5321 4.1.1): every command the client sends, appended to one buffer.
//!
//! Addresses arrive here already validated (see [`crate::message::address`]), so nothing a
//! caller supplied can add a line to the stream; this module only formats.

use crate::message::dsn::DsnEnvelope;
use crate::message::Address;

/// MAIL FROM parameters (RFC 1870 SIZE, RFC 6152 BODY, RFC 6531 SMTPUTF8).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MailParams {
    pub size: Option<usize>,
    pub eight_bit: bool,
    pub smtputf8: bool,
}

pub fn ehlo(out: &mut Vec<u8>, name: &str) {
    line(out, &[b"EHLO ", name.as_bytes()]);
}

pub fn helo(out: &mut Vec<u8>, name: &str) {
    line(out, &[b"HELO ", name.as_bytes()]);
}

/// `dsn`: RET and ENVID, for a server that offers DSN (RFC 3461 4.3, 4.4).
pub fn mail_from(
    out: &mut Vec<u8>,
    sender: &Address,
    params: MailParams,
    dsn: Option<&DsnEnvelope>,
) {
    out.extend_from_slice(b"MAIL FROM:<");
    out.extend_from_slice(sender.as_str().as_bytes());
    out.push(b'>');
    if let Some(size) = params.size {
        out.extend_from_slice(b" SIZE=");
        number(out, size);
    }
    if params.eight_bit {
        out.extend_from_slice(b" BODY=8BITMIME");
    }
    if params.smtputf8 {
        out.extend_from_slice(b" SMTPUTF8");
    }
    if let Some(dsn) = dsn {
        dsn.write_mail_params(out);
    }
    out.extend_from_slice(b"\r\n");
}

/// `dsn`: the recipient's NOTIFY and ORCPT, for a server that offers DSN (RFC 3461 4.1, 4.2).
pub fn rcpt_to(out: &mut Vec<u8>, recipient: &Address, dsn: Option<&DsnEnvelope>) {
    out.extend_from_slice(b"RCPT TO:<");
    out.extend_from_slice(recipient.as_str().as_bytes());
    out.push(b'>');
    if let Some(dsn) = dsn {
        dsn.write_rcpt_params(recipient.as_str(), out);
    }
    out.extend_from_slice(b"\r\n");
}

pub fn data(out: &mut Vec<u8>) {
    out.extend_from_slice(b"DATA\r\n");
}

/// RFC 3030 2: `BDAT <size> [LAST]`, followed directly by exactly `size` octets.
pub fn bdat(out: &mut Vec<u8>, size: usize, last: bool) {
    out.extend_from_slice(b"BDAT ");
    number(out, size);
    out.extend_from_slice(if last { b" LAST\r\n" } else { b"\r\n" });
}

/// A decimal number (sent with every message: core::fmt costs more than the rest of BDAT).
fn number(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

pub fn rset(out: &mut Vec<u8>) {
    out.extend_from_slice(b"RSET\r\n");
}

pub fn quit(out: &mut Vec<u8>) {
    out.extend_from_slice(b"QUIT\r\n");
}

fn line(out: &mut Vec<u8>, parts: &[&[u8]]) {
    for p in parts {
        out.extend_from_slice(p);
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Field;

    #[test]
    fn encodes_mail_with_parameters() {
        let a = Address::parse("s@x.example", Field::Sender).unwrap();
        let mut out = Vec::new();
        mail_from(
            &mut out,
            &a,
            MailParams {
                size: Some(2048),
                eight_bit: true,
                smtputf8: true,
            },
            None,
        );
        mail_from(&mut out, &Address::null(), MailParams::default(), None);
        rcpt_to(&mut out, &a, None);
        bdat(&mut out, 10, true);
        assert_eq!(
            out,
            b"MAIL FROM:<s@x.example> SIZE=2048 BODY=8BITMIME SMTPUTF8\r\nMAIL FROM:<>\r\nRCPT TO:<s@x.example>\r\nBDAT 10 LAST\r\n"
        );
    }
}
