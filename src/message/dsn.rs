//! Delivery Status Notification requests (RFC 3461): what the envelope asks for (RET, ENVID,
//! and per recipient NOTIFY and ORCPT) and the xtext codec those parameters are written in.
//!
//! A [`DsnEnvelope`] is built from the raw ESMTP `(keyword, value)` pairs a server session hands
//! over ([`DsnEnvelope::from_params`]) or from the Rust API, checked at the door: a malformed
//! value is refused with an error naming the parameter, never passed on. Values are kept
//! decoded; [`xtext_encode`] writes them back for the next hop (`MAIL ... RET= ENVID=`,
//! `RCPT ... NOTIFY= ORCPT=`), which the client session does only when that hop offers DSN.
//! This module neither sends nor generates reports (see [`super::report`]).

use crate::error::{DsnParameter as P, Error, Result};
use std::collections::HashMap;
use std::fmt::Write as _;

/// RFC 3461 4.3: how much of the message a failure report returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ret {
    /// The whole message.
    Full,
    /// Only its header section.
    Headers,
}

impl Ret {
    pub fn as_str(self) -> &'static str {
        match self {
            Ret::Full => "FULL",
            Ret::Headers => "HDRS",
        }
    }
}

/// RFC 3461 4.1: when a report is wanted for a recipient. `NEVER` is all three false.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notify {
    pub success: bool,
    pub failure: bool,
    pub delay: bool,
}

impl Notify {
    pub const NEVER: Notify = Notify {
        success: false,
        failure: false,
        delay: false,
    };

    /// What applies without a NOTIFY parameter (RFC 3461 4.1 lets the MTA choose between
    /// FAILURE and FAILURE,DELAY): failures only.
    pub const DEFAULT: Notify = Notify {
        success: false,
        failure: true,
        delay: false,
    };

    /// Parses `NEVER` or a comma list of `SUCCESS`, `FAILURE`, `DELAY` (case-insensitive).
    pub fn parse(value: &str) -> std::result::Result<Notify, &'static str> {
        if value.eq_ignore_ascii_case("NEVER") {
            return Ok(Notify::NEVER);
        }
        let mut notify = Notify::NEVER;
        for word in value.split(',') {
            let slot = if word.eq_ignore_ascii_case("SUCCESS") {
                &mut notify.success
            } else if word.eq_ignore_ascii_case("FAILURE") {
                &mut notify.failure
            } else if word.eq_ignore_ascii_case("DELAY") {
                &mut notify.delay
            } else if word.eq_ignore_ascii_case("NEVER") {
                return Err("NEVER cannot be combined with other values");
            } else {
                return Err("expected NEVER or a comma list of SUCCESS, FAILURE, DELAY");
            };
            if *slot {
                return Err("a value is listed twice");
            }
            *slot = true;
        }
        Ok(notify)
    }

    /// The parameter value as RFC 3461 4.1 spells it.
    pub fn to_param(self) -> String {
        if self == Notify::NEVER {
            return "NEVER".into();
        }
        let words = [
            (self.success, "SUCCESS"),
            (self.failure, "FAILURE"),
            (self.delay, "DELAY"),
        ];
        let on: Vec<&str> = words.iter().filter(|(b, _)| *b).map(|(_, w)| *w).collect();
        on.join(",")
    }
}

/// RFC 3461 4.2: the original recipient, as the first MTA received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orcpt {
    /// The address type (`rfc822`, `utf-8`...), as given.
    pub addr_type: String,
    /// The address, xtext-decoded.
    pub address: Vec<u8>,
}

impl Orcpt {
    /// `addr-type;xtext`, as the ORCPT parameter carries it.
    pub fn to_param(&self) -> String {
        format!("{};{}", self.addr_type, xtext_encode(&self.address))
    }
}

/// What one recipient asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecipientDsn {
    pub notify: Option<Notify>,
    pub orcpt: Option<Orcpt>,
}

impl RecipientDsn {
    /// The NOTIFY that applies (the default when none was given).
    pub fn effective_notify(&self) -> Notify {
        self.notify.unwrap_or(Notify::DEFAULT)
    }
}

/// The DSN request of one message: RET and ENVID from MAIL, NOTIFY and ORCPT per recipient
/// (named by address, as the spool names recipients).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DsnEnvelope {
    pub ret: Option<Ret>,
    /// The envelope identifier, xtext-decoded.
    pub envid: Option<Vec<u8>>,
    recipients: HashMap<String, RecipientDsn>,
}

/// RFC 3461 4.4: ENVID is at most 100 characters.
const MAX_ENVID: usize = 100;
/// RFC 3461 4.2: the whole ORCPT parameter is at most 500 characters.
const MAX_ORCPT: usize = 500;

fn invalid(parameter: P, recipient: Option<usize>, problem: &'static str) -> Error {
    Error::InvalidParameter {
        parameter,
        recipient: recipient.map(|i| i as u32),
        problem,
    }
}

/// ESMTP parameters as a server session received them: `(keyword, value)` pairs.
pub type EsmtpParams<S> = Vec<(S, Option<S>)>;

impl DsnEnvelope {
    /// Builds the request from the ESMTP parameters of MAIL (`mail`) and of each RCPT
    /// (`rcpts`: the recipient's address and its parameters), as a server session received
    /// them. Keywords are case-insensitive; those that are not DSN's (SIZE, BODY...) are
    /// skipped. A DSN parameter given twice, without a value, or with a malformed value is
    /// refused naming it (and the recipient's index).
    pub fn from_params<S: AsRef<str>>(
        mail: &[(S, Option<S>)],
        rcpts: &[(S, EsmtpParams<S>)],
    ) -> Result<DsnEnvelope> {
        let mut dsn = DsnEnvelope::default();
        for (keyword, value) in mail {
            let keyword = keyword.as_ref();
            let value = value.as_ref().map(AsRef::as_ref);
            if keyword.eq_ignore_ascii_case("RET") {
                let v = value.ok_or_else(|| invalid(P::Ret, None, "needs a value"))?;
                if dsn.ret.is_some() {
                    return Err(invalid(P::Ret, None, "given twice"));
                }
                dsn.ret = Some(if v.eq_ignore_ascii_case("FULL") {
                    Ret::Full
                } else if v.eq_ignore_ascii_case("HDRS") {
                    Ret::Headers
                } else {
                    return Err(invalid(P::Ret, None, "expected FULL or HDRS"));
                });
            } else if keyword.eq_ignore_ascii_case("ENVID") {
                let v = value.ok_or_else(|| invalid(P::Envid, None, "needs a value"))?;
                if dsn.envid.is_some() {
                    return Err(invalid(P::Envid, None, "given twice"));
                }
                dsn.envid = Some(parse_envid(v)?);
            }
        }
        for (index, (address, params)) in rcpts.iter().enumerate() {
            let mut r = RecipientDsn::default();
            for (keyword, value) in params {
                let keyword = keyword.as_ref();
                let value = value.as_ref().map(AsRef::as_ref);
                if keyword.eq_ignore_ascii_case("NOTIFY") {
                    let v =
                        value.ok_or_else(|| invalid(P::Notify, Some(index), "needs a value"))?;
                    if r.notify.is_some() {
                        return Err(invalid(P::Notify, Some(index), "given twice"));
                    }
                    r.notify =
                        Some(Notify::parse(v).map_err(|p| invalid(P::Notify, Some(index), p))?);
                } else if keyword.eq_ignore_ascii_case("ORCPT") {
                    let v = value.ok_or_else(|| invalid(P::Orcpt, Some(index), "needs a value"))?;
                    if r.orcpt.is_some() {
                        return Err(invalid(P::Orcpt, Some(index), "given twice"));
                    }
                    r.orcpt = Some(parse_orcpt(v).map_err(|p| invalid(P::Orcpt, Some(index), p))?);
                }
            }
            if r != RecipientDsn::default() {
                dsn.recipients.insert(address.as_ref().to_string(), r);
            }
        }
        Ok(dsn)
    }

    /// Sets RET.
    pub fn with_ret(mut self, ret: Ret) -> Self {
        self.ret = Some(ret);
        self
    }

    /// Sets ENVID (the decoded value: at most 100 octets of printable ASCII, RFC 3461 4.4).
    pub fn with_envid(mut self, envid: &str) -> Result<Self> {
        if envid.is_empty() || envid.len() > MAX_ENVID {
            return Err(invalid(P::Envid, None, "must be 1 to 100 characters"));
        }
        if !envid.bytes().all(|b| (b' '..=b'~').contains(&b)) {
            return Err(invalid(P::Envid, None, "must be printable ASCII"));
        }
        self.envid = Some(envid.as_bytes().to_vec());
        Ok(self)
    }

    /// Sets what `recipient` asked for (NOTIFY, ORCPT).
    pub fn with_recipient(mut self, recipient: &str, dsn: RecipientDsn) -> Self {
        self.recipients.insert(recipient.to_string(), dsn);
        self
    }

    /// What `recipient` asked for, if anything.
    pub fn recipient(&self, recipient: &str) -> Option<&RecipientDsn> {
        self.recipients.get(recipient)
    }

    /// Every recipient that asked for something, in no particular order.
    pub fn recipients(&self) -> impl Iterator<Item = (&str, &RecipientDsn)> {
        self.recipients.iter().map(|(a, r)| (a.as_str(), r))
    }

    /// The MAIL parameters for a hop that offers DSN: ` RET=... ENVID=...` (or nothing).
    pub fn write_mail_params(&self, out: &mut Vec<u8>) {
        if let Some(ret) = self.ret {
            out.extend_from_slice(b" RET=");
            out.extend_from_slice(ret.as_str().as_bytes());
        }
        if let Some(envid) = &self.envid {
            out.extend_from_slice(b" ENVID=");
            out.extend_from_slice(xtext_encode(envid).as_bytes());
        }
    }

    /// The RCPT parameters of `recipient` for a hop that offers DSN: ` NOTIFY=... ORCPT=...`.
    pub fn write_rcpt_params(&self, recipient: &str, out: &mut Vec<u8>) {
        let Some(r) = self.recipients.get(recipient) else {
            return;
        };
        if let Some(notify) = r.notify {
            out.extend_from_slice(b" NOTIFY=");
            out.extend_from_slice(notify.to_param().as_bytes());
        }
        if let Some(orcpt) = &r.orcpt {
            out.extend_from_slice(b" ORCPT=");
            out.extend_from_slice(orcpt.to_param().as_bytes());
        }
    }

    /// The request as text the spool keeps and [`DsnEnvelope::from_stored`] reads back: the
    /// MAIL parameters, then per recipient its address and RCPT parameters (all xtext, so no
    /// separator can occur inside a value).
    pub fn to_stored(&self) -> (String, Vec<(String, String)>) {
        let mut mail = Vec::new();
        self.write_mail_params(&mut mail);
        let mut rcpts: Vec<(String, String)> = self
            .recipients
            .keys()
            .map(|a| {
                let mut p = Vec::new();
                self.write_rcpt_params(a, &mut p);
                (a.clone(), String::from_utf8(p).expect("xtext is ASCII"))
            })
            .collect();
        rcpts.sort();
        (String::from_utf8(mail).expect("xtext is ASCII"), rcpts)
    }

    /// Reads what [`DsnEnvelope::to_stored`] wrote.
    pub fn from_stored(mail: &str, rcpts: &[(String, String)]) -> Result<DsnEnvelope> {
        fn split(params: &str) -> Vec<(&str, Option<&str>)> {
            params
                .split_ascii_whitespace()
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => (k, Some(v)),
                    None => (p, None),
                })
                .collect()
        }
        let rcpts: Vec<(&str, EsmtpParams<&str>)> =
            rcpts.iter().map(|(a, p)| (a.as_str(), split(p))).collect();
        DsnEnvelope::from_params(&split(mail), &rcpts)
    }
}

fn parse_envid(value: &str) -> Result<Vec<u8>> {
    let decoded = xtext_decode(value).map_err(|p| invalid(P::Envid, None, p))?;
    if decoded.is_empty() || decoded.len() > MAX_ENVID {
        return Err(invalid(P::Envid, None, "must be 1 to 100 characters"));
    }
    Ok(decoded)
}

fn parse_orcpt(value: &str) -> std::result::Result<Orcpt, &'static str> {
    if value.len() > MAX_ORCPT {
        return Err("over 500 characters (RFC 3461 4.2)");
    }
    let (addr_type, xtext) = value.split_once(';').ok_or("expected addr-type;address")?;
    // addr-type is an atom (RFC 3461 4.2, RFC 5322 3.2.3); in practice letters, digits, '-'.
    if addr_type.is_empty()
        || !addr_type
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err("the address type must be letters, digits or '-'");
    }
    let address = xtext_decode(xtext)?;
    if address.is_empty() {
        return Err("the address is empty");
    }
    Ok(Orcpt {
        addr_type: addr_type.to_string(),
        address,
    })
}

/// RFC 3461 4: `xchar` is `!` to `~` except `+` and `=`; everything else is `+` and two
/// upper-case hex digits.
fn is_xchar(b: u8) -> bool {
    (b'!'..=b'~').contains(&b) && b != b'+' && b != b'='
}

/// Encodes octets as xtext (RFC 3461 4), upper-case hex.
pub fn xtext_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if is_xchar(b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "+{b:02X}");
        }
    }
    out
}

/// Decodes xtext (RFC 3461 4). Refused: a character outside `!`..`~`, a bare `=`, and a `+`
/// not followed by two hex digits (lower-case hex is taken, as Postfix does).
pub fn xtext_decode(text: &str) -> std::result::Result<Vec<u8>, &'static str> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'+' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
                .ok_or("malformed xtext: '+' must be followed by two hex digits")?;
            out.push(u8::from_str_radix(hex, 16).expect("two hex digits"));
            i += 3;
        } else if is_xchar(b) {
            out.push(b);
            i += 1;
        } else if b == b'=' {
            return Err("malformed xtext: '=' must be written +3D");
        } else {
            return Err("malformed xtext: only '!' to '~' may appear unencoded");
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn xtext_encodes_plus_equals_and_controls() {
        assert_eq!(xtext_encode(b"a+b=c d\r\n\x00~"), "a+2Bb+3Dc+20d+0D+0A+00~");
        assert_eq!(
            xtext_decode("a+2Bb+3Dc+20d+0D+0A+00~").unwrap(),
            b"a+b=c d\r\n\x00~"
        );
        assert_eq!(xtext_decode("x+2b").unwrap(), b"x+");
        assert_eq!(
            xtext_decode("a+2").unwrap_err(),
            "malformed xtext: '+' must be followed by two hex digits"
        );
        assert!(xtext_decode("a+G0").is_err());
        assert!(xtext_decode("a=b").is_err());
        assert!(xtext_decode("a b").is_err());
        assert!(xtext_decode("caf\u{e9}").is_err());
    }

    proptest! {
        #[test]
        fn xtext_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let text = xtext_encode(&bytes);
            prop_assert!(text.bytes().all(|b| (b'!'..=b'~').contains(&b) && b != b'='));
            prop_assert_eq!(xtext_decode(&text).unwrap(), bytes);
        }

        #[test]
        fn canonical_xtext_re_encodes_to_itself(text in "([!-*,-<>-~]|\\+[0-9A-F]{2}){0,60}") {
            let decoded = xtext_decode(&text).unwrap();
            let canonical = xtext_encode(&decoded);
            // Only "+XX" of an octet that needs no encoding changes (to the octet itself).
            prop_assert_eq!(xtext_decode(&canonical).unwrap(), decoded);
        }
    }

    #[test]
    fn from_params_reads_dsn_and_skips_the_rest() {
        let dsn = DsnEnvelope::from_params(
            &[
                ("SIZE", Some("100")),
                ("ret", Some("hdrs")),
                ("ENVID", Some("QQ+2B1")),
            ],
            &[
                (
                    "a@x.example",
                    vec![
                        ("NOTIFY", Some("success,Failure")),
                        ("ORCPT", Some("rfc822;A+2Bb@x.example")),
                    ],
                ),
                ("b@x.example", vec![("NOTIFY", Some("NEVER"))]),
                ("c@x.example", vec![]),
            ],
        )
        .unwrap();
        assert_eq!(dsn.ret, Some(Ret::Headers));
        assert_eq!(dsn.envid.as_deref(), Some(&b"QQ+1"[..]));
        let a = dsn.recipient("a@x.example").unwrap();
        assert_eq!(
            a.notify,
            Some(Notify {
                success: true,
                failure: true,
                delay: false
            })
        );
        assert_eq!(a.orcpt.as_ref().unwrap().address, b"A+b@x.example");
        assert_eq!(
            dsn.recipient("b@x.example").unwrap().notify,
            Some(Notify::NEVER)
        );
        assert!(dsn.recipient("c@x.example").is_none());
        let mut out = Vec::new();
        dsn.write_mail_params(&mut out);
        dsn.write_rcpt_params("a@x.example", &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            " RET=HDRS ENVID=QQ+2B1 NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;A+2Bb@x.example"
        );
        let (mail, rcpts) = dsn.to_stored();
        assert_eq!(DsnEnvelope::from_stored(&mail, &rcpts).unwrap(), dsn);
    }

    #[test]
    fn malformed_parameters_are_refused_by_name() {
        let none: Vec<(&str, EsmtpParams<&str>)> = vec![];
        let err = |mail: &[(&str, Option<&str>)]| {
            DsnEnvelope::from_params(mail, &none)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(&[("RET", Some("ALL"))]),
            "ESMTP parameter RET: expected FULL or HDRS"
        );
        assert_eq!(
            err(&[("ENVID", Some("a+zz"))]),
            "ESMTP parameter ENVID: malformed xtext: '+' must be followed by two hex digits"
        );
        assert_eq!(
            err(&[("RET", Some("FULL")), ("RET", Some("HDRS"))]),
            "ESMTP parameter RET: given twice"
        );
        let rcpt = |params: Vec<(&str, Option<&str>)>| {
            DsnEnvelope::from_params(&[], &[("ok@x.example", vec![]), ("a@x.example", params)])
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            rcpt(vec![("NOTIFY", Some("NEVER,DELAY"))]),
            "ESMTP parameter NOTIFY (recipient 1): NEVER cannot be combined with other values"
        );
        assert_eq!(
            rcpt(vec![("ORCPT", Some("rfc822;a=b"))]),
            "ESMTP parameter ORCPT (recipient 1): malformed xtext: '=' must be written +3D"
        );
        assert_eq!(
            rcpt(vec![("ORCPT", Some("a@x.example"))]),
            "ESMTP parameter ORCPT (recipient 1): expected addr-type;address"
        );
        assert_eq!(
            rcpt(vec![("NOTIFY", None)]),
            "ESMTP parameter NOTIFY (recipient 1): needs a value"
        );
    }
}
