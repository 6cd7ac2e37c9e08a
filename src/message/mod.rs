//! What a caller submits: an envelope (sender, recipients) and a body prepared for the wire.
//!
//! Everything is checked here, at the door, so that nothing unsafe reaches a session: addresses
//! (see [`address`]), line lengths and line endings (see [`crate::smtp::data`]). A [`Body`] is
//! prepared once and shared (`Arc`) by every recipient and every message that uses it.

pub mod address;
pub mod dkim;
pub mod dsn;
pub mod mime;
pub mod report;
pub mod template;

pub use address::Address;

use crate::error::{Error, Field, Result};
use crate::smtp::data;
use std::sync::{Arc, OnceLock};

/// Message content, normalised to CRLF line endings, checked, and ready to send.
#[derive(Debug)]
pub struct Body {
    wire: Box<[u8]>,
    eight_bit: bool,
    needs_stuffing: bool,
    /// The dot-stuffed form for DATA, built on first use and kept for every later recipient.
    stuffed: OnceLock<Box<[u8]>>,
}

impl Body {
    /// Prepares content: bare LF and bare CR become CRLF, a final CRLF is added, and a line over
    /// 998 octets is refused (RFC 5322 2.1.1) rather than folded, since folding would change
    /// the message the caller signed or meant.
    pub fn new(content: &[u8]) -> Result<Self> {
        let n = data::normalize(content).map_err(|e| Error::BodyLineTooLong {
            line: e.line,
            length: e.length,
        })?;
        Ok(Body {
            wire: n.bytes.into_boxed_slice(),
            eight_bit: n.eight_bit,
            needs_stuffing: n.needs_stuffing,
            stuffed: OnceLock::new(),
        })
    }

    /// The normalised content (what BDAT sends, and what the server stores).
    pub fn as_bytes(&self) -> &[u8] {
        &self.wire
    }

    /// The content as DATA sends it, before the terminating `.CRLF`.
    pub fn dot_stuffed(&self) -> &[u8] {
        if !self.needs_stuffing {
            return &self.wire;
        }
        self.stuffed.get_or_init(|| {
            let mut out = Vec::new();
            data::dot_stuff(&self.wire, &mut out);
            out.into_boxed_slice()
        })
    }

    /// Octets of the normalised content (the SIZE= value, RFC 1870).
    pub fn len(&self) -> usize {
        self.wire.len()
    }

    pub fn is_empty(&self) -> bool {
        self.wire.is_empty()
    }

    /// Some octet is above 127: MAIL FROM needs BODY=8BITMIME (RFC 6152).
    pub fn is_eight_bit(&self) -> bool {
        self.eight_bit
    }
}

/// One message: sender, recipients, and a shared body.
#[derive(Debug, Clone)]
pub struct Message {
    pub(crate) sender: Address,
    pub(crate) recipients: Vec<Address>,
    pub(crate) body: Arc<Body>,
    /// The caller's tag, echoed in every outcome event of the message.
    pub(crate) tag: u64,
    /// What the sender asked for in delivery status notifications (RFC 3461), if anything.
    pub(crate) dsn: Option<Arc<dsn::DsnEnvelope>>,
}

impl Message {
    /// Builds a message from text addresses; an empty sender is the null sender `<>`.
    pub fn new<'a>(
        sender: &str,
        recipients: impl IntoIterator<Item = &'a str>,
        content: &[u8],
    ) -> Result<Self> {
        let body = Arc::new(Body::new(content)?);
        Message::with_body(sender, recipients, body)
    }

    /// Builds a message around a body prepared earlier, shared with other messages (the bulk
    /// path: one body, many envelopes).
    pub fn with_body<'a>(
        sender: &str,
        recipients: impl IntoIterator<Item = &'a str>,
        body: Arc<Body>,
    ) -> Result<Self> {
        let sender = if sender.is_empty() {
            Address::null()
        } else {
            Address::parse(sender, Field::Sender)?
        };
        let recipients = recipients
            .into_iter()
            .enumerate()
            .map(|(i, r)| Address::parse(r, Field::Recipient(i)))
            .collect::<Result<Vec<_>>>()?;
        Message::from_parts(sender, recipients, body)
    }

    /// Builds a message from addresses checked earlier.
    pub fn from_parts(sender: Address, recipients: Vec<Address>, body: Arc<Body>) -> Result<Self> {
        if recipients.is_empty() {
            return Err(Error::NoRecipients);
        }
        Ok(Message {
            sender,
            recipients,
            body,
            tag: 0,
            dsn: None,
        })
    }

    /// Sets the caller's tag (0 unless set), which every outcome event of the message carries
    /// ([`crate::engine::Event::tag`]): a row number, a database key, a pointer.
    pub fn with_tag(mut self, tag: u64) -> Self {
        self.tag = tag;
        self
    }

    /// Sets the DSN request (RFC 3461: RET, ENVID, NOTIFY and ORCPT per recipient), passed to
    /// the next hop when it offers DSN and honoured when mxpipe reports a failure itself.
    pub fn with_dsn(mut self, dsn: dsn::DsnEnvelope) -> Self {
        self.dsn = Some(Arc::new(dsn));
        self
    }

    pub fn dsn(&self) -> Option<&Arc<dsn::DsnEnvelope>> {
        self.dsn.as_ref()
    }

    pub fn tag(&self) -> u64 {
        self.tag
    }

    pub fn sender(&self) -> &Address {
        &self.sender
    }

    pub fn recipients(&self) -> &[Address] {
        &self.recipients
    }

    pub fn body(&self) -> &Arc<Body> {
        &self.body
    }

    /// Some address is non-ASCII: the transaction needs SMTPUTF8 (RFC 6531 3.4).
    pub fn needs_smtputf8(&self) -> bool {
        self.sender.needs_smtputf8() || self.recipients.iter().any(Address::needs_smtputf8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::AddressProblem;

    #[test]
    fn body_is_prepared_once() {
        let body = Body::new(b"Subject: x\n\n.hidden\nend").unwrap();
        assert_eq!(body.as_bytes(), b"Subject: x\r\n\r\n.hidden\r\nend\r\n");
        assert_eq!(body.dot_stuffed(), b"Subject: x\r\n\r\n..hidden\r\nend\r\n");
        assert!(!body.is_eight_bit());
    }

    #[test]
    fn errors_name_the_field() {
        let e = Message::new("a@b.example", ["ok@b.example", "bad\r\n@x"], b"x").unwrap_err();
        assert_eq!(
            e,
            Error::InvalidAddress {
                field: Field::Recipient(1),
                problem: AddressProblem::ControlCharacter
            }
        );
        assert_eq!(
            e.to_string(),
            "recipient 1: address contains a control character (CR, LF, NUL or another)"
        );
        assert_eq!(
            Message::new("a@b.example", [], b"x").unwrap_err(),
            Error::NoRecipients
        );
        let long = vec![b'x'; 1200];
        assert_eq!(
            Message::new("a@b.example", ["c@d.example"], &long)
                .unwrap_err()
                .to_string(),
            "body: line 1 is 1200 octets long; RFC 5322 allows at most 998"
        );
        let null = Message::new("", ["c@d.example"], b"x").unwrap();
        assert!(null.sender().is_null());
    }
}
