//! MTA-STS (RFC 8461): the `_mta-sts` TXT record, the policy file and its HTTPS fetch, and
//! which MX hosts a policy allows.
//!
//! Parsing is pure; [`fetch`] is a blocking HTTPS GET (rustls, certificate verified against the
//! policy host `mta-sts.<domain>`) that the MX resolver runs on a blocking thread, never on the
//! event loop. Nothing here caches or decides what a delivery does: the resolver keeps policies
//! per domain and the engine enforces them.

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The largest policy body accepted (RFC 8461 section 3.3 suggests 64 KiB).
pub const MAX_POLICY_BYTES: usize = 64 * 1024;
/// Room for the status line and headers above the body.
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// The longest `max_age` a policy may give (RFC 8461 section 3.2: 31557600 s, a year).
const MAX_AGE_LIMIT: u64 = 31_557_600;

/// What a policy asks senders to do (RFC 8461 section 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StsMode {
    /// Deliver only to matching MX hosts over TLS with a verified certificate.
    Enforce,
    /// Deliver as usual, reporting what `Enforce` would refuse.
    Testing,
    /// No policy in effect.
    None,
}

impl StsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            StsMode::Enforce => "enforce",
            StsMode::Testing => "testing",
            StsMode::None => "none",
        }
    }
}

/// What a domain's policy says about one of its MX hosts, as the resolver hands it on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StsHost {
    /// `mode: enforce`, and the policy names this host: TLS with a certificate verified for
    /// the host name is required.
    Enforce,
    /// `mode: testing`: delivered as usual; `allowed` says whether the policy names the host
    /// (when not, `enforce` would have refused it).
    Testing { allowed: bool },
}

impl StsHost {
    /// As destination names say it.
    pub fn as_str(self) -> &'static str {
        match self {
            StsHost::Enforce => "enforce",
            StsHost::Testing { allowed: true } => "testing",
            StsHost::Testing { allowed: false } => "testing, MX host not in the policy",
        }
    }
}

/// A parsed policy file (RFC 8461 section 3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StsPolicy {
    pub mode: StsMode,
    /// MX host patterns, lower case, without a trailing dot: a name, or `*.` and a name, which
    /// matches exactly one more label on the left.
    pub mx: Vec<String>,
    /// How long the policy may be cached.
    pub max_age: Duration,
}

impl StsPolicy {
    /// Parses a policy file: `key: value` lines (CRLF or LF), `version: STSv1` first, `mode`,
    /// `max_age` and (unless the mode is `none`) at least one `mx`; unknown keys are ignored.
    pub fn parse(text: &str) -> Result<StsPolicy, String> {
        let mut lines = text.lines().map(|l| l.trim_end_matches('\r'));
        let mut mode = None;
        let mut max_age = None;
        let mut mx = Vec::new();
        match lines.next().and_then(|v| v.split_once(':')) {
            Some((key, value)) if key.trim() == "version" && value.trim() == "STSv1" => {}
            _ => return Err("the policy does not start with \"version: STSv1\"".into()),
        }
        for line in lines.chain(std::iter::once("")) {
            if line.trim().is_empty() {
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                return Err(format!("the policy line {line:?} is not \"key: value\""));
            };
            let value = value.trim();
            match key.trim() {
                "mode" => {
                    mode = Some(match value {
                        "enforce" => StsMode::Enforce,
                        "testing" => StsMode::Testing,
                        "none" => StsMode::None,
                        other => return Err(format!("the policy mode {other:?} is unknown")),
                    })
                }
                "max_age" => {
                    let seconds = value
                        .parse::<u64>()
                        .ok()
                        .filter(|s| value.len() <= 10 && *s <= MAX_AGE_LIMIT)
                        .ok_or_else(|| {
                            format!("the policy max_age {value:?} is not 0..=31557600")
                        })?;
                    max_age = Some(Duration::from_secs(seconds));
                }
                "mx" => {
                    let pattern = value.trim_end_matches('.').to_ascii_lowercase();
                    let name = pattern.strip_prefix("*.").unwrap_or(&pattern);
                    if name.is_empty() || name.contains('*') || name.contains(char::is_whitespace) {
                        return Err(format!("the policy mx {value:?} is not a host pattern"));
                    }
                    mx.push(pattern);
                }
                "version" => return Err("the policy repeats its version".into()),
                _ => {}
            }
        }
        let mode = mode.ok_or("the policy has no mode")?;
        let max_age = max_age.ok_or("the policy has no max_age")?;
        if mx.is_empty() && mode != StsMode::None {
            return Err("the policy has no mx".into());
        }
        Ok(StsPolicy { mode, mx, max_age })
    }

    /// Whether MX host `host` is one the policy allows (RFC 8461 section 4.1): equal to a
    /// pattern, or one label and a `*.` pattern's name; case and a trailing dot do not matter.
    pub fn allows(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx
            .iter()
            .any(|pattern| match pattern.strip_prefix("*.") {
                Some(suffix) => host
                    .split_once('.')
                    .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
                None => *pattern == host,
            })
    }
}

/// The policy id of a domain's `_mta-sts` TXT records (RFC 8461 section 3.1), each given as
/// the concatenation of its strings. Records not starting `v=STSv1` are ignored; none, several,
/// or an invalid one mean the domain has no policy (`None`).
pub fn txt_policy_id(records: &[String]) -> Option<String> {
    let mut sts = records.iter().filter(|r| {
        r.split(';')
            .next()
            .is_some_and(|first| first.trim() == "v=STSv1")
    });
    let record = sts.next()?;
    if sts.next().is_some() {
        return None;
    }
    let mut id = None;
    for field in record.split(';').skip(1) {
        let field = field.trim();
        if field.is_empty() {
            continue;
        }
        let (key, value) = field.split_once('=')?;
        if key == "id" {
            let valid = !value.is_empty()
                && value.len() <= 32
                && value.bytes().all(|b| b.is_ascii_alphanumeric());
            if !valid || id.is_some() {
                return None;
            }
            id = Some(value.to_string());
        }
    }
    id
}

/// Fetches `https://<host>/.well-known/mta-sts.txt` (`host` is the policy host
/// `mta-sts.<domain>`, in A-labels) from `addrs` (tried in order) on `port`, all within
/// `timeout`. The certificate must verify under `tls` for the policy host;
/// only a 200 answer counts (a redirect is a failure, RFC 8461 section 3.3), and a body over
/// [`MAX_POLICY_BYTES`] is refused. Blocking. The error says what failed, in words.
pub fn fetch(
    host: &str,
    addrs: &[SocketAddr],
    port: u16,
    tls: &Arc<ClientConfig>,
    timeout: Duration,
) -> Result<String, String> {
    let name = ServerName::try_from(host.to_string())
        .map_err(|_| format!("{host} is not a valid host name"))?;
    let deadline = Instant::now() + timeout;
    let mut failure = format!("{host} has no address");
    for addr in addrs {
        let addr = SocketAddr::new(addr.ip(), port);
        match fetch_from(addr, host, name.clone(), tls, deadline) {
            Ok(body) => return Ok(body),
            Err(why) => failure = format!("https://{host}:{port} ({}): {why}", addr.ip()),
        }
    }
    Err(failure)
}

fn fetch_from(
    addr: SocketAddr,
    host: &str,
    name: ServerName<'static>,
    tls: &Arc<ClientConfig>,
    deadline: Instant,
) -> Result<String, String> {
    let remaining = || {
        let left = deadline.saturating_duration_since(Instant::now());
        (!left.is_zero())
            .then_some(left)
            .ok_or_else(|| "no answer in time".to_string())
    };
    let stream = TcpStream::connect_timeout(&addr, remaining()?).map_err(|e| e.to_string())?;
    let connection = ClientConnection::new(Arc::clone(tls), name).map_err(|e| e.to_string())?;
    let mut tls_stream = StreamOwned::new(connection, stream);
    let tls_error = |e: io::Error| match e.get_ref().and_then(|inner| inner.downcast_ref()) {
        Some(rustls_error) => crate::engine::tls::describe_failure(rustls_error).0,
        None => e.to_string(),
    };
    // HTTP/1.0: the answer is never chunked and ends when the server closes.
    let request = format!(
        "GET /.well-known/mta-sts.txt HTTP/1.0\r\nHost: {host}\r\nUser-Agent: mxpipe\r\n\
         Accept: text/plain\r\nConnection: close\r\n\r\n"
    );
    tls_stream
        .sock
        .set_write_timeout(Some(remaining()?))
        .map_err(|e| e.to_string())?;
    tls_stream
        .write_all(request.as_bytes())
        .map_err(tls_error)?;
    let mut response = Vec::new();
    let mut chunk = [0u8; 8192];
    let mut clean_end = false;
    loop {
        tls_stream
            .sock
            .set_read_timeout(Some(remaining()?))
            .map_err(|e| e.to_string())?;
        match tls_stream.read(&mut chunk) {
            Ok(0) => {
                clean_end = true;
                break;
            }
            Ok(n) => response.extend_from_slice(&chunk[..n]),
            // A server that closes without close_notify: the body length must then prove
            // the answer whole.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err("no answer in time".into())
            }
            Err(e) => return Err(tls_error(e)),
        }
        if response.len() > MAX_HEADER_BYTES + MAX_POLICY_BYTES {
            return Err(format!(
                "the answer is larger than {MAX_POLICY_BYTES} bytes"
            ));
        }
    }
    policy_body(&response, clean_end)
}

/// The body of a whole HTTP answer, when it is a 200 within the size limit.
fn policy_body(response: &[u8], clean_end: bool) -> Result<String, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Response::new(&mut headers);
    let start = match parsed.parse(response) {
        Ok(httparse::Status::Complete(start)) => start,
        Ok(httparse::Status::Partial) => return Err("the answer ended in its headers".into()),
        Err(e) => return Err(format!("the answer is not HTTP ({e})")),
    };
    match parsed.code {
        Some(200) => {}
        Some(code @ 300..=399) => {
            return Err(format!(
                "HTTP {code}: a redirect, which RFC 8461 section 3.3 forbids following"
            ))
        }
        code => return Err(format!("HTTP {}", code.unwrap_or_default())),
    }
    let mut body = &response[start..];
    let length = parsed
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| {
            std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or("the Content-Length is not a number")
        })
        .transpose()?;
    match length {
        Some(n) if n > MAX_POLICY_BYTES => {
            return Err(format!(
                "the policy is larger than {MAX_POLICY_BYTES} bytes"
            ))
        }
        Some(n) if body.len() < n => return Err("the answer ended before its body".into()),
        Some(n) => body = &body[..n],
        None if !clean_end => return Err("the answer ended without TLS close_notify".into()),
        None => {}
    }
    if body.len() > MAX_POLICY_BYTES {
        return Err(format!(
            "the policy is larger than {MAX_POLICY_BYTES} bytes"
        ));
    }
    String::from_utf8(body.to_vec()).map_err(|_| "the policy is not UTF-8 text".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_files_parse() {
        let text =
            "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.Example.NET.\r\n\
                    max_age: 86400\r\nextension: ignored\r\n";
        let policy = StsPolicy::parse(text).unwrap();
        assert_eq!(policy.mode, StsMode::Enforce);
        assert_eq!(policy.mx, ["mail.example.com", "*.example.net"]);
        assert_eq!(policy.max_age, Duration::from_secs(86400));
        let none = StsPolicy::parse("version: STSv1\nmode: none\nmax_age: 0\n").unwrap();
        assert_eq!(none.mode, StsMode::None);
    }

    #[test]
    fn invalid_policy_files_say_why() {
        let cases = [
            (
                "mode: enforce\nversion: STSv1\nmx: a\nmax_age: 1\n",
                "version: STSv1",
            ),
            (
                "version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n",
                "version: STSv1",
            ),
            (
                "version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n",
                "mode \"strict\"",
            ),
            ("version: STSv1\nmode: enforce\nmax_age: 1\n", "no mx"),
            ("version: STSv1\nmode: testing\nmx: a\n", "no max_age"),
            (
                "version: STSv1\nmode: enforce\nmx: a\nmax_age: 31557601\n",
                "max_age",
            ),
            (
                "version: STSv1\nmode: enforce\nmx: *.*.a\nmax_age: 1\n",
                "mx \"*.*.a\"",
            ),
            ("version: STSv1\nmx: a\nmax_age: 1\n", "no mode"),
            ("version: STSv1\ngarbage\n", "not \"key: value\""),
        ];
        for (text, expected) in cases {
            let error = StsPolicy::parse(text).unwrap_err();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }

    #[test]
    fn mx_patterns_match_one_label_for_a_wildcard() {
        let policy = StsPolicy {
            mode: StsMode::Enforce,
            mx: vec!["mail.example.com".into(), "*.example.net".into()],
            max_age: Duration::from_secs(1),
        };
        assert!(policy.allows("mail.example.com"));
        assert!(policy.allows("MAIL.example.com."));
        assert!(policy.allows("mx1.example.net"));
        assert!(!policy.allows("example.net"));
        assert!(!policy.allows("a.b.example.net"));
        assert!(!policy.allows("xmail.example.com"));
        assert!(!policy.allows("mx1.example.net.evil"));
    }

    #[test]
    fn txt_records_give_the_policy_id() {
        let one = |r: &str| txt_policy_id(&[r.to_string()]);
        assert_eq!(
            one("v=STSv1; id=20160831085700Z;"),
            Some("20160831085700Z".into())
        );
        assert_eq!(one("v=STSv1;id=abc"), Some("abc".into()));
        assert_eq!(one("v=STSv1; id=a-b"), None);
        assert_eq!(one("v=STSv1;"), None);
        assert_eq!(one("v=spf1 -all"), None);
        let two = ["v=STSv1; id=a".to_string(), "v=STSv1; id=b".to_string()];
        assert_eq!(txt_policy_id(&two), None, "several records: no policy");
        let mixed = ["v=spf1 -all".to_string(), "v=STSv1; id=a".to_string()];
        assert_eq!(txt_policy_id(&mixed), Some("a".into()));
    }

    #[test]
    fn only_whole_200_answers_give_a_policy() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(policy_body(ok, false).unwrap(), "hello");
        let moved = b"HTTP/1.1 301 Moved\r\nLocation: https://x/\r\n\r\n";
        assert!(policy_body(moved, true).unwrap_err().contains("redirect"));
        assert_eq!(
            policy_body(b"HTTP/1.0 404 Not Found\r\n\r\n", true).unwrap_err(),
            "HTTP 404"
        );
        let short = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhello";
        assert!(policy_body(short, false)
            .unwrap_err()
            .contains("ended before"));
        let unframed = b"HTTP/1.0 200 OK\r\n\r\nhello";
        assert!(policy_body(unframed, false)
            .unwrap_err()
            .contains("close_notify"));
        assert_eq!(policy_body(unframed, true).unwrap(), "hello");
        let big = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            MAX_POLICY_BYTES + 1
        );
        assert!(policy_body(big.as_bytes(), true)
            .unwrap_err()
            .contains("larger"));
    }
}
