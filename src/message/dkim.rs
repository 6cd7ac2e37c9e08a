//! DKIM signing (RFC 6376) with relaxed/relaxed canonicalization, RSA-SHA256 (RFC 8301) and
//! Ed25519-SHA256 (RFC 8463), keys read from PEM files.
//!
//! A [`Signer`] is made once per campaign from a private key and signs each finished message:
//! it hashes the canonicalized body, picks the header fields that matter to a reader and to
//! RFC 8058 (List-Unsubscribe, List-Unsubscribe-Post), and returns a `DKIM-Signature` field to
//! put in front of the message. It must run after personalisation, on the exact bytes that go
//! on the wire, and it must not change the message. It does not verify signatures or publish
//! keys; cryptography is `ring`'s.

use base64::Engine as _;
use ring::digest;
use ring::rand::SystemRandom;
use ring::signature::{self, Ed25519KeyPair, KeyPair as _, RsaKeyPair};
use std::fmt;

/// The fields signed when present, in this order. `from` is listed once more at the end: a
/// name in `h=` with no instance left signs its absence, so no second From can be added
/// without breaking the signature (RFC 6376 8.15).
const SIGNED_HEADERS: &[&str] = &[
    "from",
    "sender",
    "reply-to",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "in-reply-to",
    "references",
    "list-id",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "feedback-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
];

/// The signing algorithm (the `a=` tag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    RsaSha256,
    Ed25519Sha256,
}

impl Algorithm {
    /// `rsa-sha256` or `ed25519-sha256`.
    pub fn parse(text: &str) -> Option<Algorithm> {
        match text {
            "rsa-sha256" => Some(Algorithm::RsaSha256),
            "ed25519-sha256" => Some(Algorithm::Ed25519Sha256),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::RsaSha256 => "rsa-sha256",
            Algorithm::Ed25519Sha256 => "ed25519-sha256",
        }
    }
}

/// Why a key, domain or selector was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// No `-----BEGIN ...-----` / `-----END ...-----` block, or its base64 is broken.
    NotPem,
    /// An encrypted key: mxpipe has no passphrase to open it.
    Encrypted,
    /// A PEM block of another kind (a certificate, a public key).
    UnsupportedPem(String),
    /// `ring` refused the key for the algorithm (wrong kind, too small, malformed).
    Rejected {
        algorithm: Algorithm,
        reason: String,
    },
    /// The domain (`d=`) or selector (`s=`) is not a domain name.
    InvalidName(&'static str),
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::NotPem => f.write_str("not a PEM private key (no valid BEGIN/END block)"),
            KeyError::Encrypted => {
                f.write_str("the private key is encrypted; give an unencrypted PKCS#8 key")
            }
            KeyError::UnsupportedPem(label) => {
                write!(f, "a PEM \"{label}\" is not a private key; give a \"PRIVATE KEY\" (PKCS#8) or \"RSA PRIVATE KEY\"")
            }
            KeyError::Rejected { algorithm, reason } => {
                write!(f, "not a usable {} key: {reason}", algorithm.as_str())
            }
            KeyError::InvalidName(tag) => write!(f, "{tag} is not a valid domain name"),
        }
    }
}

impl std::error::Error for KeyError {}

enum Key {
    Rsa(RsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

/// Signs messages for one domain and selector with one key.
pub struct Signer {
    algorithm: Algorithm,
    key: Key,
    domain: String,
    selector: String,
    rng: SystemRandom,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("Signer")
            .field("algorithm", &self.algorithm)
            .field("domain", &self.domain)
            .field("selector", &self.selector)
            .finish()
    }
}

impl Signer {
    /// A signer from a PEM private key: PKCS#8 (`PRIVATE KEY`, RSA or Ed25519) or PKCS#1
    /// (`RSA PRIVATE KEY`). RSA keys must have at least 2048 bits (`ring`'s floor, above the
    /// 1024 of RFC 8301 3.2).
    pub fn from_pem(
        pem: &str,
        algorithm: Algorithm,
        domain: &str,
        selector: &str,
    ) -> Result<Signer, KeyError> {
        if !is_dns_name(domain) {
            return Err(KeyError::InvalidName("d= (domain)"));
        }
        if !is_dns_name(selector) {
            return Err(KeyError::InvalidName("s= (selector)"));
        }
        let (label, der) = pem_decode(pem)?;
        let rejected = |e: ring::error::KeyRejected| KeyError::Rejected {
            algorithm,
            reason: key_rejected_reason(e),
        };
        let key = match (algorithm, label.as_str()) {
            (_, "ENCRYPTED PRIVATE KEY") => return Err(KeyError::Encrypted),
            (Algorithm::RsaSha256, "PRIVATE KEY") => {
                Key::Rsa(RsaKeyPair::from_pkcs8(&der).map_err(rejected)?)
            }
            (Algorithm::RsaSha256, "RSA PRIVATE KEY") => {
                Key::Rsa(RsaKeyPair::from_der(&der).map_err(rejected)?)
            }
            (Algorithm::Ed25519Sha256, "PRIVATE KEY") => {
                Key::Ed25519(Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der).map_err(rejected)?)
            }
            (Algorithm::Ed25519Sha256, "RSA PRIVATE KEY") => {
                return Err(KeyError::Rejected {
                    algorithm,
                    reason: "this is an RSA key".into(),
                })
            }
            (_, other) => return Err(KeyError::UnsupportedPem(other.to_string())),
        };
        Ok(Signer {
            algorithm,
            key,
            domain: domain.to_ascii_lowercase(),
            selector: selector.to_ascii_lowercase(),
            rng: SystemRandom::new(),
        })
    }

    /// The TXT record to publish at `<selector>._domainkey.<domain>` (RFC 6376 3.6.1): for RSA
    /// the public key as a SubjectPublicKeyInfo, as `openssl rsa -pubout` writes it and
    /// verifiers expect; for Ed25519 the raw 32 octets (RFC 8463 4).
    pub fn dns_record(&self) -> String {
        let engine = base64::engine::general_purpose::STANDARD;
        match &self.key {
            Key::Rsa(k) => format!(
                "v=DKIM1; k=rsa; p={}",
                engine.encode(rsa_spki(k.public().as_ref()))
            ),
            Key::Ed25519(k) => format!(
                "v=DKIM1; k=ed25519; p={}",
                engine.encode(k.public_key().as_ref())
            ),
        }
    }

    /// Where [`Signer::dns_record`] goes.
    pub fn dns_name(&self) -> String {
        format!("{}._domainkey.{}", self.selector, self.domain)
    }

    /// The `DKIM-Signature` header field (with its CRLF) for `message` (CRLF line ends, as it
    /// goes on the wire), signed at `timestamp` (seconds since 1970, the `t=` tag).
    pub fn sign(&self, message: &[u8], timestamp: u64) -> Vec<u8> {
        let (header, body) = match find(message, b"\r\n\r\n") {
            Some(at) => (&message[..at + 2], &message[at + 4..]),
            None => (message, &b""[..]),
        };
        let engine = base64::engine::general_purpose::STANDARD;
        let body_hash = engine.encode(body_hash(body));
        let fields = parse_fields(header);

        // RFC 6376 5.4.2: several instances of a name are signed from the bottom up.
        let mut used = vec![false; fields.len()];
        let mut names = Vec::new();
        let mut data = Vec::with_capacity(header.len() + 512);
        for name in SIGNED_HEADERS {
            while let Some(i) = (0..fields.len())
                .rev()
                .find(|&i| !used[i] && fields[i].0.eq_ignore_ascii_case(name))
            {
                used[i] = true;
                names.push(*name);
                canonical_header(fields[i].1, &mut data);
                data.extend_from_slice(b"\r\n");
            }
        }
        names.push("from");

        let mut field = format!(
            "DKIM-Signature: v=1; a={}; c=relaxed/relaxed; d={}; s={};\r\n\tt={timestamp}; h=",
            self.algorithm.as_str(),
            self.domain,
            self.selector
        );
        let mut column = "\tt=; h=".len() + timestamp.to_string().len();
        for (i, name) in names.iter().enumerate() {
            if i > 0 {
                field.push(':');
                column += 1;
            }
            if column + name.len() > 76 {
                field.push_str("\r\n\t");
                column = 1;
            }
            field.push_str(name);
            column += name.len();
        }
        field.push_str(";\r\n\tbh=");
        field.push_str(&body_hash);
        field.push_str(";\r\n\tb=");
        // RFC 6376 3.7: the signature field itself is hashed last, with an empty b= value and
        // without its final CRLF.
        canonical_header(field.as_bytes(), &mut data);

        let signature = match &self.key {
            Key::Rsa(key) => {
                let mut sig = vec![0; key.public().modulus_len()];
                key.sign(&signature::RSA_PKCS1_SHA256, &self.rng, &data, &mut sig)
                    .expect("RSA signing with a checked key and a right-sized buffer");
                sig
            }
            // RFC 8463 3: Ed25519 signs the SHA-256 hash of the data, not the data itself.
            Key::Ed25519(key) => key
                .sign(digest::digest(&digest::SHA256, &data).as_ref())
                .as_ref()
                .to_vec(),
        };
        let b = engine.encode(signature);
        let mut out = field.into_bytes();
        for (i, chunk) in b.as_bytes().chunks(72).enumerate() {
            if i > 0 {
                out.extend_from_slice(b"\r\n\t");
            }
            out.extend_from_slice(chunk);
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

/// Wraps a PKCS#1 RSAPublicKey in a SubjectPublicKeyInfo (RFC 5280 4.1, RFC 3279 2.3.1).
fn rsa_spki(pkcs1: &[u8]) -> Vec<u8> {
    fn der(tag: u8, content: &[u8], out: &mut Vec<u8>) {
        out.push(tag);
        let len = content.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes = len.to_be_bytes();
            let skip = bytes.iter().take_while(|&&b| b == 0).count();
            out.push(0x80 | (bytes.len() - skip) as u8);
            out.extend_from_slice(&bytes[skip..]);
        }
        out.extend_from_slice(content);
    }
    // SEQUENCE { OID 1.2.840.113549.1.1.1 (rsaEncryption), NULL }
    const ALGORITHM: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bits = vec![0u8]; // no unused bits
    bits.extend_from_slice(pkcs1);
    let mut content = ALGORITHM.to_vec();
    der(0x03, &bits, &mut content);
    let mut out = Vec::new();
    der(0x30, &content, &mut out);
    out
}

fn key_rejected_reason(e: ring::error::KeyRejected) -> String {
    match e.to_string().as_str() {
        "TooSmall" => "the key is too small (RSA keys need at least 2048 bits)".into(),
        "TooLarge" => "the key is too large".into(),
        "WrongAlgorithm" => "the key is of another algorithm".into(),
        "InvalidEncoding" => "the key is not valid DER for this algorithm".into(),
        "InconsistentComponents" => "the key's components are inconsistent".into(),
        other => other.to_string(),
    }
}

/// Letters, digits, hyphens and dots, in labels of 1 to 63 characters.
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The label and DER of the first PEM block (RFC 7468).
fn pem_decode(pem: &str) -> Result<(String, Vec<u8>), KeyError> {
    let begin = pem.find("-----BEGIN ").ok_or(KeyError::NotPem)?;
    let rest = &pem[begin + 11..];
    let label_end = rest.find("-----").ok_or(KeyError::NotPem)?;
    let label = rest[..label_end].to_string();
    let rest = &rest[label_end + 5..];
    let end = rest
        .find(&format!("-----END {label}-----"))
        .ok_or(KeyError::NotPem)?;
    let mut text = String::new();
    for line in rest[..end].lines() {
        // RFC 1421 headers (Proc-Type: 4,ENCRYPTED) mark an OpenSSL-encrypted key.
        if line.contains(':') {
            return Err(KeyError::Encrypted);
        }
        text.push_str(line.trim());
    }
    let der = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| KeyError::NotPem)?;
    Ok((label, der))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The header fields of a header block, as (name, whole field without its final CRLF).
fn parse_fields(header: &[u8]) -> Vec<(&str, &[u8])> {
    let mut fields: Vec<(&str, &[u8])> = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i + 1 < header.len() {
        if header[i] == b'\r' && header[i + 1] == b'\n' {
            let next = header.get(i + 2).copied();
            if !matches!(next, Some(b' ' | b'\t')) {
                let field = &header[start..i];
                let name = field
                    .iter()
                    .position(|&b| b == b':')
                    .and_then(|c| std::str::from_utf8(&field[..c]).ok())
                    .map(|n| n.trim_end_matches([' ', '\t']))
                    .unwrap_or("");
                fields.push((name, field));
                start = i + 2;
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    fields
}

fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// RFC 6376 3.4.2 relaxed header canonicalization: the name lower-cased, the value unfolded,
/// runs of white space made one space, white space around the colon and at the end removed.
fn canonical_header(field: &[u8], out: &mut Vec<u8>) {
    let colon = field.iter().position(|&b| b == b':').unwrap_or(field.len());
    let name = &field[..colon];
    let name_end = name.iter().rposition(|&b| !is_wsp(b)).map_or(0, |p| p + 1);
    out.extend(name[..name_end].iter().map(u8::to_ascii_lowercase));
    out.push(b':');
    let value = field.get(colon + 1..).unwrap_or(&[]);
    let mut pending_space = false;
    let mut started = false;
    for &b in value {
        if b == b'\r' || b == b'\n' {
            continue;
        }
        if is_wsp(b) {
            pending_space = started;
            continue;
        }
        if pending_space {
            out.push(b' ');
            pending_space = false;
        }
        out.push(b);
        started = true;
    }
}

/// RFC 6376 3.4.4 relaxed body canonicalization, hashed: runs of white space in a line made one
/// space, white space at line ends removed, empty lines at the end removed, a final CRLF added
/// to a non-empty body that lacks one. Lines that need no change are hashed in place.
fn body_hash(body: &[u8]) -> digest::Digest {
    let mut context = digest::Context::new(&digest::SHA256);
    let mut line_buf = Vec::new();
    let mut empty_lines = 0;
    let mut rest = body;
    while !rest.is_empty() {
        let (line, next) = match rest.iter().position(|&b| b == b'\n') {
            Some(at) if at > 0 && rest[at - 1] == b'\r' => (&rest[..at - 1], &rest[at + 1..]),
            // A bare LF is not a line end in a CRLF message: it stays part of the line.
            Some(_) | None => match find(rest, b"\r\n") {
                Some(at) => (&rest[..at], &rest[at + 2..]),
                None => (rest, &b""[..]),
            },
        };
        rest = next;
        let needs_work = line.ends_with(b" ")
            || line.ends_with(b"\t")
            || line.contains(&b'\t')
            || line.windows(2).any(|w| w == b"  ");
        let canonical: &[u8] = if needs_work {
            line_buf.clear();
            let mut pending_space = false;
            for &b in line {
                if is_wsp(b) {
                    pending_space = true;
                    continue;
                }
                if pending_space {
                    line_buf.push(b' ');
                    pending_space = false;
                }
                line_buf.push(b);
            }
            &line_buf
        } else {
            line
        };
        if canonical.is_empty() {
            empty_lines += 1;
            continue;
        }
        // Empty lines count only when something follows them.
        for _ in 0..empty_lines {
            context.update(b"\r\n");
        }
        empty_lines = 0;
        context.update(canonical);
        context.update(b"\r\n");
    }
    context.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canonical_body(body: &[u8]) -> Vec<u8> {
        // Compare through the hash: canonical forms with equal hashes are equal here.
        body_hash(body).as_ref().to_vec()
    }

    #[test]
    fn relaxed_body() {
        let sha = |b: &[u8]| digest::digest(&digest::SHA256, b).as_ref().to_vec();
        assert_eq!(canonical_body(b""), sha(b""));
        assert_eq!(canonical_body(b"\r\n\r\n"), sha(b""));
        assert_eq!(canonical_body(b"a  b \t\r\n\r\n\r\n"), sha(b"a b\r\n"));
        assert_eq!(canonical_body(b" c\r\n\r\nd"), sha(b" c\r\n\r\nd\r\n"));
        // RFC 6376 3.4.5's example.
        assert_eq!(
            canonical_body(b" C \r\nD \t E\r\n\r\n\r\n"),
            sha(b" C\r\nD E\r\n")
        );
    }

    #[test]
    fn relaxed_header() {
        let mut out = Vec::new();
        canonical_header(b"SubJect \t:  Hello \r\n\tWorld  ", &mut out);
        assert_eq!(out, b"subject:Hello World");
        let fields = parse_fields(b"A: 1\r\nB: 2\r\n 3\r\nC:\r\n");
        let names: Vec<_> = fields.iter().map(|f| f.0).collect();
        assert_eq!(names, ["A", "B", "C"]);
        assert_eq!(fields[1].1, b"B: 2\r\n 3");
    }

    #[test]
    fn key_errors_are_clear() {
        let e = Signer::from_pem("nothing", Algorithm::RsaSha256, "example.org", "s1").unwrap_err();
        assert_eq!(
            e.to_string(),
            "not a PEM private key (no valid BEGIN/END block)"
        );
        let cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let e = Signer::from_pem(cert, Algorithm::RsaSha256, "example.org", "s1").unwrap_err();
        assert_eq!(e, KeyError::UnsupportedPem("CERTIFICATE".into()));
        let garbage = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        let e =
            Signer::from_pem(garbage, Algorithm::Ed25519Sha256, "example.org", "s1").unwrap_err();
        assert_eq!(
            e.to_string(),
            "not a usable ed25519-sha256 key: the key is not valid DER for this algorithm"
        );
        let e = Signer::from_pem(garbage, Algorithm::RsaSha256, "bad domain", "s1").unwrap_err();
        assert_eq!(e.to_string(), "d= (domain) is not a valid domain name");
    }

    #[test]
    fn ed25519_signature_verifies_with_ring() {
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref())
        );
        let signer =
            Signer::from_pem(&pem, Algorithm::Ed25519Sha256, "example.org", "sel").unwrap();
        let message = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n";
        let field = signer.sign(message, 1_700_000_000);
        let text = String::from_utf8(field.clone()).unwrap();
        assert!(text.starts_with("DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed; d=example.org; s=sel;\r\n\tt=1700000000; h=from:subject:from;\r\n\tbh="), "{text}");
        // Recompute what was signed and check the signature with the public key.
        let (head, b) = text.split_once("b=").unwrap();
        let b = b.split_whitespace().collect::<String>();
        let mut data = Vec::new();
        canonical_header(b"From: a@example.org", &mut data);
        data.extend_from_slice(b"\r\n");
        canonical_header(b"Subject: hi", &mut data);
        data.extend_from_slice(b"\r\n");
        canonical_header(format!("{head}b=").as_bytes(), &mut data);
        let hash = digest::digest(&digest::SHA256, &data);
        let record = signer.dns_record();
        let public = base64::engine::general_purpose::STANDARD
            .decode(record.strip_prefix("v=DKIM1; k=ed25519; p=").unwrap())
            .unwrap();
        assert_eq!(signer.dns_name(), "sel._domainkey.example.org");
        let sig = base64::engine::general_purpose::STANDARD.decode(b).unwrap();
        signature::UnparsedPublicKey::new(&signature::ED25519, public)
            .verify(hash.as_ref(), &sig)
            .unwrap();
    }
}
