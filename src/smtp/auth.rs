//! SMTP AUTH (RFC 4954): credentials and the SASL mechanisms PLAIN (RFC 4616), LOGIN and
//! XOAUTH2, encoded for the wire.
//!
//! Secrets live only here and in the bytes written to the server: `Debug` shows the user name
//! and never the secret, and nothing in this module builds an error or event text from them.

use super::caps::AuthMechanisms;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use std::fmt;

/// What the secret is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretKind {
    /// A password, for PLAIN (preferred) or LOGIN.
    Password,
    /// An OAuth 2.0 bearer token, for XOAUTH2.
    OAuth2Token,
}

/// A user name and its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    user: String,
    secret: String,
    kind: SecretKind,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("secret", &"<redacted>")
            .field("kind", &self.kind)
            .finish()
    }
}

/// The mechanism chosen for a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
    XOAuth2,
}

impl Mechanism {
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
            Mechanism::XOAuth2 => "XOAUTH2",
        }
    }
}

impl Credentials {
    /// A password login. Returns `None` when the user or secret contains NUL, CR or LF, which
    /// no mechanism can carry.
    pub fn password(user: &str, password: &str) -> Option<Self> {
        Credentials::new(user, password, SecretKind::Password)
    }

    /// An XOAUTH2 bearer token.
    pub fn oauth2(user: &str, token: &str) -> Option<Self> {
        Credentials::new(user, token, SecretKind::OAuth2Token)
    }

    fn new(user: &str, secret: &str, kind: SecretKind) -> Option<Self> {
        let bad = |s: &str| s.bytes().any(|b| matches!(b, 0 | b'\r' | b'\n'));
        if user.is_empty() || bad(user) || bad(secret) {
            return None;
        }
        Some(Credentials {
            user: user.to_string(),
            secret: secret.to_string(),
            kind,
        })
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// The best mechanism both sides support: PLAIN over LOGIN for passwords (one round
    /// trip), XOAUTH2 for tokens.
    pub fn choose(&self, offered: AuthMechanisms) -> Option<Mechanism> {
        match self.kind {
            SecretKind::Password if offered.plain => Some(Mechanism::Plain),
            SecretKind::Password if offered.login => Some(Mechanism::Login),
            SecretKind::OAuth2Token if offered.xoauth2 => Some(Mechanism::XOAuth2),
            _ => None,
        }
    }

    /// `AUTH PLAIN <initial response>` or `AUTH XOAUTH2 <initial response>` or `AUTH LOGIN`.
    pub fn first_command(&self, mechanism: Mechanism, out: &mut Vec<u8>) {
        out.extend_from_slice(b"AUTH ");
        out.extend_from_slice(mechanism.name().as_bytes());
        match mechanism {
            Mechanism::Plain => {
                out.push(b' ');
                self.plain_response(out);
            }
            Mechanism::XOAuth2 => {
                out.push(b' ');
                let raw = format!("user={}\x01auth=Bearer {}\x01\x01", self.user, self.secret);
                out.extend_from_slice(STANDARD.encode(raw).as_bytes());
            }
            Mechanism::Login => {}
        }
        out.extend_from_slice(b"\r\n");
    }

    /// RFC 4616: authzid (empty), NUL, authcid, NUL, password.
    fn plain_response(&self, out: &mut Vec<u8>) {
        let raw = format!("\0{}\0{}", self.user, self.secret);
        out.extend_from_slice(STANDARD.encode(raw).as_bytes());
    }

    /// The answer to a 334 challenge at `step` (0-based) of `mechanism`.
    pub fn respond(&self, mechanism: Mechanism, step: u8, out: &mut Vec<u8>) {
        match (mechanism, step) {
            (Mechanism::Login, 0) => out.extend_from_slice(STANDARD.encode(&self.user).as_bytes()),
            (Mechanism::Login, 1) => {
                out.extend_from_slice(STANDARD.encode(&self.secret).as_bytes())
            }
            // PLAIN without initial response support on the server: send it now.
            (Mechanism::Plain, 0) => self.plain_response(out),
            // XOAUTH2 error challenge (RFC 7628 3.2.2 style): an empty line ends the exchange.
            _ => {}
        }
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_mechanisms_and_hides_the_secret() {
        let c = Credentials::password("user@example.org", "s3cret").unwrap();
        let mut out = Vec::new();
        c.first_command(Mechanism::Plain, &mut out);
        assert_eq!(out, b"AUTH PLAIN AHVzZXJAZXhhbXBsZS5vcmcAczNjcmV0\r\n");
        out.clear();
        c.first_command(Mechanism::Login, &mut out);
        c.respond(Mechanism::Login, 0, &mut out);
        c.respond(Mechanism::Login, 1, &mut out);
        assert_eq!(
            out,
            b"AUTH LOGIN\r\ndXNlckBleGFtcGxlLm9yZw==\r\nczNjcmV0\r\n"
        );
        let t = Credentials::oauth2("u@x.example", "tok").unwrap();
        out.clear();
        t.first_command(Mechanism::XOAuth2, &mut out);
        assert_eq!(
            out,
            b"AUTH XOAUTH2 dXNlcj11QHguZXhhbXBsZQFhdXRoPUJlYXJlciB0b2sBAQ==\r\n"
        );
        assert!(!format!("{c:?}").contains("s3cret"));
        assert!(Credentials::password("a", "b\r\nRCPT").is_none());
        let offered = AuthMechanisms {
            plain: false,
            login: true,
            xoauth2: true,
        };
        assert_eq!(c.choose(offered), Some(Mechanism::Login));
        assert_eq!(t.choose(offered), Some(Mechanism::XOAuth2));
        assert_eq!(c.choose(AuthMechanisms::default()), None);
    }
}
