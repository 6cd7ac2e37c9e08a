//! Decoding a VERP return path: the campaign's `return_path` template
//! (`bounces+{local}={domain}@example.org`, see `campaign::render::ReturnPath`) read backwards,
//! so the address a bounce arrives at names the recipient it is about.
//!
//! Matching is case-insensitive on the template's literal text (domains and many MTAs change
//! case); the recipient's local part keeps its case. Nothing here does I/O.

use crate::error::Field;
use crate::message::Address;

/// A return-path template, for decoding.
#[derive(Debug, Clone)]
pub struct VerpTemplate {
    /// Literal text and placeholders, in order.
    pieces: Vec<Piece>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Local,
    Domain,
}

impl VerpTemplate {
    /// Parses a template with the same rules as a campaign's `return_path`: only `{local}`
    /// and `{domain}` in braces, each at most once, and two placeholders never adjacent.
    pub fn parse(template: &str) -> Result<VerpTemplate, String> {
        let mut pieces = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            let close = rest[open..]
                .find('}')
                .ok_or("\"{\" without a closing \"}\"")?;
            if open > 0 {
                pieces.push(Piece::Literal(rest[..open].to_ascii_lowercase()));
            }
            let piece = match &rest[open + 1..open + close] {
                "local" => Piece::Local,
                "domain" => Piece::Domain,
                name => {
                    return Err(format!(
                        "unknown placeholder \"{{{name}}}\" (use {{local}} and {{domain}})"
                    ))
                }
            };
            if pieces.contains(&piece) {
                return Err("a placeholder appears twice".into());
            }
            if matches!(pieces.last(), Some(Piece::Local | Piece::Domain)) {
                return Err("two placeholders side by side cannot be told apart".into());
            }
            pieces.push(piece);
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Literal(rest.to_ascii_lowercase()));
        }
        if !pieces.contains(&Piece::Local) || !pieces.contains(&Piece::Domain) {
            return Err("needs both {local} and {domain} to name the recipient".into());
        }
        Ok(VerpTemplate { pieces })
    }

    /// The recipient `address` was made for, if it was made from this template.
    pub fn decode(&self, address: &str) -> Option<Address> {
        let lower = address.to_ascii_lowercase();
        let mut at = 0;
        let mut local = None;
        let mut domain = None;
        let mut pending: Option<&Piece> = None;
        for piece in &self.pieces {
            match piece {
                Piece::Literal(text) => {
                    let found = match pending {
                        None => {
                            if !lower[at..].starts_with(text.as_str()) {
                                return None;
                            }
                            at
                        }
                        // The recipient's domain has no '=' or '@'; its local part may, so a
                        // placeholder takes everything up to the last match of what follows.
                        Some(_) => at + lower[at..].rfind(text.as_str())?,
                    };
                    if let Some(p) = pending.take() {
                        let value = &address[at..found];
                        match p {
                            Piece::Local => local = Some(value),
                            _ => domain = Some(value),
                        }
                    }
                    at = found + text.len();
                }
                placeholder => pending = Some(placeholder),
            }
        }
        match pending {
            Some(Piece::Local) => local = Some(&address[at..]),
            Some(_) => domain = Some(&address[at..]),
            None if at != address.len() => return None,
            None => {}
        }
        let (local, domain) = (local?, domain?);
        if local.is_empty() || domain.is_empty() {
            return None;
        }
        Address::parse(&format!("{local}@{domain}"), Field::Recipient(0)).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::campaign::render::ReturnPath;

    #[test]
    fn decodes_what_a_campaign_encodes() {
        let template = "bounces-digest+{local}={domain}@News.Example.org";
        let encode = ReturnPath::parse(template).unwrap();
        let decode = VerpTemplate::parse(template).unwrap();
        for recipient in [
            "ann@example.net",
            "o'brien+tag=x@sub.example.com",
            "Bob@EXAMPLE.com",
        ] {
            let addr = Address::parse(recipient, Field::Recipient(0)).unwrap();
            let verp = encode.address(&addr).unwrap();
            let back = decode
                .decode(verp.as_str())
                .unwrap_or_else(|| panic!("{verp}"));
            assert_eq!(back.as_str(), recipient);
            // MTAs may change the case of the domain they delivered to.
            let upper = verp
                .as_str()
                .replace("news.example.org", "NEWS.EXAMPLE.ORG");
            assert_eq!(decode.decode(&upper).unwrap().as_str(), recipient);
        }
        assert!(decode
            .decode("bounces-other+ann=example.net@news.example.org")
            .is_none());
        assert!(decode
            .decode("bounces-digest+ann=example.net@elsewhere.example")
            .is_none());
        assert!(decode.decode("postmaster@news.example.org").is_none());
    }

    #[test]
    fn refuses_templates_it_cannot_read_back() {
        assert!(VerpTemplate::parse("bounces@example.org").is_err());
        assert!(VerpTemplate::parse("b+{local}{domain}@example.org").is_err());
        assert!(VerpTemplate::parse("b+{who}@example.org").is_err());
    }
}
