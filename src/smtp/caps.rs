//! The server's EHLO capabilities (RFC 5321 4.1.1.1) that change how the client talks.
//!
//! Only what the client acts on is kept; unknown keywords are ignored. Capabilities are
//! per-connection and must be forgotten after STARTTLS (RFC 3207 4.2).

use super::reply::Reply;

/// SASL mechanisms the server offers (RFC 4954), as a bit set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuthMechanisms {
    pub plain: bool,
    pub login: bool,
    pub xoauth2: bool,
}

/// What the server said it supports in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// RFC 2920.
    pub pipelining: bool,
    /// RFC 1870: `Some(0)` means SIZE without a fixed limit.
    pub size: Option<u64>,
    /// RFC 6152.
    pub eight_bit_mime: bool,
    /// RFC 6531.
    pub smtputf8: bool,
    /// RFC 2034.
    pub enhanced_status_codes: bool,
    /// RFC 3030.
    pub chunking: bool,
    /// RFC 3030 BINARYMIME.
    pub binary_mime: bool,
    /// RFC 3461.
    pub dsn: bool,
    /// RFC 3207.
    pub starttls: bool,
    /// RFC 4954.
    pub auth: AuthMechanisms,
}

impl Capabilities {
    /// Reads the keywords from an EHLO reply: the first line is the server's greeting name,
    /// each later line is `keyword [params]`, case-insensitive (RFC 5321 4.1.1.1).
    pub fn from_ehlo(reply: &Reply) -> Self {
        let mut caps = Capabilities::default();
        for line in reply.lines().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            let keyword = keyword.to_ascii_uppercase();
            match keyword.as_str() {
                "PIPELINING" => caps.pipelining = true,
                "SIZE" => {
                    caps.size = Some(words.next().and_then(|v| v.parse().ok()).unwrap_or(0));
                }
                "8BITMIME" => caps.eight_bit_mime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "ENHANCEDSTATUSCODES" => caps.enhanced_status_codes = true,
                "CHUNKING" => caps.chunking = true,
                "BINARYMIME" => caps.binary_mime = true,
                "DSN" => caps.dsn = true,
                "STARTTLS" => caps.starttls = true,
                // "AUTH=LOGIN PLAIN" is an old, still common spelling.
                "AUTH" | "AUTH=LOGIN" | "AUTH=PLAIN" => {
                    let inline = keyword.strip_prefix("AUTH=").map(str::to_string);
                    for mech in inline.into_iter().chain(words.map(str::to_ascii_uppercase)) {
                        match mech.as_str() {
                            "PLAIN" => caps.auth.plain = true,
                            "LOGIN" => caps.auth.login = true,
                            "XOAUTH2" => caps.auth.xoauth2 = true,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        caps
    }

    /// The largest message the server accepts, when it announced a limit.
    pub fn size_limit(&self) -> Option<u64> {
        self.size.filter(|&s| s > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_keywords() {
        let reply = Reply::new(
            250,
            None,
            "mx.example.org Hello\nPIPELINING\nsize 10240000\n8BITMIME\nSMTPUTF8\nENHANCEDSTATUSCODES\nCHUNKING\nDSN\nSTARTTLS\nAUTH PLAIN login XOAUTH2\nVRFY",
        );
        let caps = Capabilities::from_ehlo(&reply);
        assert!(caps.pipelining && caps.eight_bit_mime && caps.smtputf8);
        assert!(caps.enhanced_status_codes && caps.chunking && caps.dsn && caps.starttls);
        assert_eq!(caps.size_limit(), Some(10_240_000));
        assert_eq!(
            caps.auth,
            AuthMechanisms {
                plain: true,
                login: true,
                xoauth2: true
            }
        );
    }

    #[test]
    fn first_line_is_not_a_keyword_and_size_without_limit() {
        let caps = Capabilities::from_ehlo(&Reply::new(250, None, "PIPELINING\nSIZE"));
        assert!(!caps.pipelining);
        assert_eq!(caps.size, Some(0));
        assert_eq!(caps.size_limit(), None);
    }

    #[test]
    fn old_auth_spelling() {
        let caps = Capabilities::from_ehlo(&Reply::new(250, None, "mx\nAUTH=LOGIN PLAIN"));
        assert!(caps.auth.login && caps.auth.plain);
    }
}
