//! Envelope addresses (RFC 5321 4.1.2), checked once at the door.
//!
//! An [`Address`] that exists is safe to put between `<` and `>` on the wire: no control
//! characters, no whitespace outside a quoted local part, no angle brackets, and within the
//! length limits of RFC 5321 4.5.3.1. Non-ASCII addresses are allowed and flagged, because they
//! need SMTPUTF8 (RFC 6531). This module does not decide deliverability.

use crate::error::{AddressProblem, Error, Field};
use std::fmt;
use std::sync::Arc;

/// A validated envelope address. Cheap to clone (shared string).
///
/// Two addresses are equal when their text is: the position a spool gave a recipient is not
/// part of the address.
#[derive(Clone)]
pub struct Address {
    text: Arc<str>,
    /// Byte offset of the '@' that separates local part and domain (0 for the null sender).
    at: u32,
    /// The recipient's position in its message's list as a spool stored it
    /// ([`NO_POSITION`]: none), so that a checkpoint names it with 4 octets instead of its
    /// address. It fills what was padding: an address is no larger for it.
    position: u32,
}

/// The position of an address that no spool placed.
pub(crate) const NO_POSITION: u32 = u32::MAX;

impl PartialEq for Address {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for Address {}

impl std::hash::Hash for Address {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.text.hash(state);
    }
}

impl Address {
    /// The null reverse-path `<>` (RFC 5321 4.5.5), for bounces and auto-replies.
    pub fn null() -> Self {
        Address {
            text: Arc::from(""),
            at: 0,
            position: NO_POSITION,
        }
    }

    /// Where a spool stored this recipient in its message's list, if one did.
    pub(crate) fn position(&self) -> Option<u32> {
        (self.position != NO_POSITION).then_some(self.position)
    }

    /// Places this recipient at `position` of its message's stored list.
    pub(crate) fn set_position(&mut self, position: u32) {
        self.position = position;
    }

    /// Checks `text` as a mailbox; `field` names it in the error.
    pub fn parse(text: &str, field: Field) -> Result<Self, Error> {
        let problem = |problem| Error::InvalidAddress { field, problem };
        if text.is_empty() {
            return Err(problem(AddressProblem::Empty));
        }
        // RFC 5321 4.5.3.1.3: a path is at most 256 octets including the angle brackets.
        if text.len() > 254 {
            return Err(problem(AddressProblem::PathTooLong));
        }
        let bytes = text.as_bytes();
        // Most addresses have no quoting and nothing to refuse: then the separating '@' is the
        // last one, as the full scan would find.
        let at = if bytes.iter().all(|&b| PLAIN[b as usize]) {
            memchr::memrchr(b'@', bytes)
        } else {
            scan(bytes).map_err(problem)?
        };
        let Some(at) = at else {
            return Err(problem(AddressProblem::MissingAt));
        };
        let (local, domain) = (&text[..at], &text[at + 1..]);
        if local.is_empty() {
            return Err(problem(AddressProblem::EmptyLocalPart));
        }
        if domain.is_empty() {
            return Err(problem(AddressProblem::EmptyDomain));
        }
        if local.len() > 64 {
            return Err(problem(AddressProblem::LocalPartTooLong));
        }
        if !valid_domain(domain) {
            return Err(problem(AddressProblem::InvalidDomain));
        }
        Ok(Address {
            text: Arc::from(text),
            at: at as u32,
            position: NO_POSITION,
        })
    }

    /// Like [`Address::parse`] for bytes that must be UTF-8 (from C or a file).
    pub fn parse_bytes(bytes: &[u8], field: Field) -> Result<Self, Error> {
        let text = std::str::from_utf8(bytes).map_err(|_| Error::InvalidAddress {
            field,
            problem: AddressProblem::InvalidUtf8,
        })?;
        Address::parse(text, field)
    }

    /// The address as written (empty for the null sender).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn is_null(&self) -> bool {
        self.text.is_empty()
    }

    /// The part after the '@' (empty for the null sender).
    pub fn domain(&self) -> &str {
        if self.is_null() {
            ""
        } else {
            &self.text[self.at as usize + 1..]
        }
    }

    /// The part before the '@'.
    pub fn local_part(&self) -> &str {
        &self.text[..self.at as usize]
    }

    /// Non-ASCII addresses need the SMTPUTF8 extension (RFC 6531 3.4).
    pub fn needs_smtputf8(&self) -> bool {
        !self.text.is_ascii()
    }
}

/// Octets that need no further thought in an address: not a control character, space, angle
/// bracket, quote or backslash.
const PLAIN: [bool; 256] = {
    let mut plain = [true; 256];
    let mut b = 0;
    while b < 0x20 {
        plain[b] = false;
        b += 1;
    }
    plain[0x7f] = false;
    plain[b' ' as usize] = false;
    plain[b'<' as usize] = false;
    plain[b'>' as usize] = false;
    plain[b'"' as usize] = false;
    plain[b'\\' as usize] = false;
    plain
};

/// The full scan of an address: the offset of the last '@' outside quotes, or the first
/// problem found.
fn scan(bytes: &[u8]) -> std::result::Result<Option<usize>, AddressProblem> {
    let mut in_quotes = false;
    let mut escaped = false;
    let mut at = None;
    for (i, &b) in bytes.iter().enumerate() {
        if b < 0x20 || b == 0x7f {
            return Err(AddressProblem::ControlCharacter);
        }
        if escaped {
            escaped = false;
            continue;
        }
        match b {
            b'\\' if in_quotes => escaped = true,
            b'"' if at.is_none() => in_quotes = !in_quotes,
            b' ' if !in_quotes => return Err(AddressProblem::Whitespace),
            b'<' | b'>' => return Err(AddressProblem::AngleBracket),
            b'@' if !in_quotes => at = Some(i),
            _ => {}
        }
    }
    Ok(at)
}

/// A domain name of dot-separated labels (letters, digits, hyphens, or non-ASCII U-labels), or
/// an address literal in brackets (RFC 5321 4.1.3).
fn valid_domain(domain: &str) -> bool {
    if let Some(literal) = domain.strip_prefix('[') {
        return literal.strip_suffix(']').is_some_and(|inner| {
            !inner.is_empty()
                && inner
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b':' | b'-'))
        });
    }
    // Bytes rather than chars: a non-ASCII character is non-ASCII in every one of its bytes.
    let domain = domain.as_bytes();
    let domain = domain.strip_suffix(b".").unwrap_or(domain);
    !domain.is_empty()
        && domain.split(|&b| b == b'.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label[0] != b'-'
                && label[label.len() - 1] != b'-'
                && label
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || !b.is_ascii())
        })
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{}>", self.text)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_costs_no_room_and_does_not_change_equality() {
        assert_eq!(std::mem::size_of::<Address>(), 24);
        let a = Address::parse("a@example.net", Field::Sender).unwrap();
        let mut b = a.clone();
        b.set_position(7);
        assert_eq!(a, b);
        assert_eq!(a.position(), None);
        assert_eq!(b.position(), Some(7));
        use std::hash::BuildHasher;
        let state = std::hash::RandomState::new();
        assert_eq!(state.hash_one(&a), state.hash_one(&b));
    }

    fn problem(text: &str) -> AddressProblem {
        match Address::parse(text, Field::Recipient(2)) {
            Err(Error::InvalidAddress { field, problem }) => {
                assert_eq!(field, Field::Recipient(2));
                problem
            }
            other => panic!("{text:?} accepted: {other:?}"),
        }
    }

    #[test]
    fn accepts_ordinary_addresses() {
        for ok in [
            "a@b.example",
            "first.last+tag@sub.example.org",
            "\"with space\"@example.org",
            "user@[127.0.0.1]",
            "jöran@bücher.example",
            "x@example.org.",
        ] {
            let a = Address::parse(ok, Field::Sender).unwrap();
            assert_eq!(a.as_str(), ok);
        }
        let a = Address::parse("Local@Example.ORG", Field::Sender).unwrap();
        assert_eq!(a.domain(), "Example.ORG");
        assert_eq!(a.local_part(), "Local");
        assert!(Address::parse("jöran@x.example", Field::Sender)
            .unwrap()
            .needs_smtputf8());
    }

    #[test]
    fn refuses_bad_addresses() {
        assert_eq!(problem(""), AddressProblem::Empty);
        assert_eq!(
            problem("a@b\r\nRCPT TO:<x@y>"),
            AddressProblem::ControlCharacter
        );
        assert_eq!(problem("a@b\n"), AddressProblem::ControlCharacter);
        assert_eq!(problem("a\0@b"), AddressProblem::ControlCharacter);
        assert_eq!(problem("a b@c"), AddressProblem::Whitespace);
        assert_eq!(problem("a@b> SIZE=1"), AddressProblem::AngleBracket);
        assert_eq!(problem("a@b SIZE=1"), AddressProblem::Whitespace);
        assert_eq!(problem("<a@b>"), AddressProblem::AngleBracket);
        assert_eq!(problem("nobody"), AddressProblem::MissingAt);
        assert_eq!(problem("@b.example"), AddressProblem::EmptyLocalPart);
        assert_eq!(problem("a@"), AddressProblem::EmptyDomain);
        assert_eq!(
            problem(&format!("{}@b", "x".repeat(65))),
            AddressProblem::LocalPartTooLong
        );
        assert_eq!(
            problem(&format!("a@{}", "b".repeat(256))),
            AddressProblem::PathTooLong
        );
        assert_eq!(problem("a@b..c"), AddressProblem::InvalidDomain);
        assert_eq!(problem("a@-b.c"), AddressProblem::InvalidDomain);
        assert_eq!(problem("a@b_c.d"), AddressProblem::InvalidDomain);
        let bytes = Address::parse_bytes(b"a\xff@b", Field::Sender);
        assert_eq!(
            bytes,
            Err(Error::InvalidAddress {
                field: Field::Sender,
                problem: AddressProblem::InvalidUtf8
            })
        );
    }

    #[test]
    fn domain_over_255_is_named() {
        let label = "d".repeat(60);
        let domain = [label.as_str(); 5].join(".");
        assert_eq!(problem(&format!("a@{domain}")), AddressProblem::PathTooLong);
    }

    proptest::proptest! {
        /// The shortcut for plain addresses finds the '@' the full scan finds.
        #[test]
        fn plain_shortcut_agrees_with_the_scan(text in "[a-z@.\"\\\\ <>\t-]{0,12}") {
            let bytes = text.as_bytes();
            if bytes.iter().all(|&b| PLAIN[b as usize]) {
                proptest::prop_assert_eq!(scan(bytes), Ok(memchr::memrchr(b'@', bytes)));
            }
        }
    }
}
