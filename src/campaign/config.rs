//! The campaign file: its TOML schema, with the position of every value kept so that an error
//! can name the line it is about.
//!
//! This module only reads and shapes the file; it must not open the files it names or judge
//! their contents (see [`super::Campaign::load`]). Unknown keys are refused, so a misspelt setting is an
//! error, not a silent default.
//!
//! ```toml
//! from = "Example News <news@example.org>"
//! subject = "Your {{month}} digest, {{first_name}}"
//! text_file = "digest.txt"          # or text = "...", inline
//! html_file = "digest.html"         # or html = "..."
//! recipients = "recipients.csv"     # a header row; one column is `email`
//! suppression = "suppressed.txt"    # optional: addresses or domains, one a line
//! return_path = "bounces+{local}={domain}@example.org"   # optional VERP envelope sender
//! to_name = "{{first_name}} {{last_name}}"               # optional display name in To
//!
//! [headers]
//! X-Campaign = "digest-{{month}}"
//!
//! [[attachments]]
//! file = "programme.pdf"            # content_type and name are optional
//!
//! [list_unsubscribe]
//! url = "https://example.org/unsubscribe?id={{id}}"
//! mailto = "unsubscribe@example.org"
//! secret_env = "NEWS_UNSUBSCRIBE_SECRET" # optional: adds u=ADDRESS&t=TOKEN for `mxpipe inbound`
//!
//! [delivery]
//! mode = "relay"                    # or "mx": straight to each domain's MX hosts
//! relay = "smtp.example.org:25"     # smtps://host:465 for implicit TLS
//! ehlo_name = "mail.example.org"
//! starttls = "required"             # none | opportunistic (default) | required
//! auth_user = "news"                # optional; the password comes from the environment:
//! auth_password_env = "SMTP_PASSWORD"
//!
//! [limits]
//! connections = 20
//! max_age_secs = 14400
//!
//! [dkim]
//! domain = "example.org"
//! selector = "news2026"
//! key_file = "dkim.pem"
//! algorithm = "rsa-sha256"          # or "ed25519-sha256"
//! ```

use serde::Deserialize;

/// Every key of a campaign file, with what it takes: the reference `mxpipe campaign keys`
/// prints. A unit test checks it against the keys the file's schema accepts, so it cannot drift.
pub const KEYS: &[(&str, &str)] = &[
    (
        "from",
        "the From mailbox, \"Name <address>\" or an address (required)",
    ),
    ("reply_to", "a Reply-To mailbox"),
    (
        "to_name",
        "a template for the display name in To, e.g. \"{{first_name}} {{last_name}}\"",
    ),
    ("subject", "a template for the Subject (required)"),
    ("text", "the plain-text body, a template written inline"),
    (
        "text_file",
        "the plain-text body, a template in a UTF-8 file (a byte-order mark is dropped)",
    ),
    ("html", "the HTML body, a template written inline"),
    ("html_file", "the HTML body, a template in a UTF-8 file"),
    (
        "recipients",
        "the recipients CSV: a header row, one column named email (required)",
    ),
    (
        "suppression",
        "addresses or @domains never sent to, one a line, # comments",
    ),
    (
        "return_path",
        "the envelope sender, with {local} and {domain} for VERP",
    ),
    (
        "headers",
        "a table of extra header fields, each value a template",
    ),
    (
        "attachments",
        "a list of tables: file, content_type (guessed), name (the file's)",
    ),
    ("attachments.file", "the file to attach"),
    (
        "attachments.content_type",
        "its media type (guessed from the name when missing)",
    ),
    ("attachments.name", "the name the reader sees"),
    (
        "list_unsubscribe",
        "a table: List-Unsubscribe with RFC 8058 one-click",
    ),
    (
        "list_unsubscribe.url",
        "an https:// URL template (required in the table)",
    ),
    (
        "list_unsubscribe.mailto",
        "an address template for mailto: unsubscription",
    ),
    (
        "list_unsubscribe.secret_env",
        "an environment variable holding a secret: the URL gets u=ADDRESS&t=TOKEN for `mxpipe inbound`'s one-click check",
    ),
    ("delivery", "a table: where and how to send (required)"),
    (
        "delivery.mode",
        "\"relay\" (default) or \"mx\": straight to each domain's MX hosts",
    ),
    (
        "delivery.relay",
        "the smarthost, host:port, or smtps://host:port for implicit TLS",
    ),
    (
        "delivery.ehlo_name",
        "the name sent in EHLO (default localhost)",
    ),
    (
        "delivery.nameservers",
        "mode = \"mx\": DNS servers, ip:port each (default: the system's)",
    ),
    (
        "delivery.mx_port",
        "mode = \"mx\": the SMTP port of MX hosts (default 25)",
    ),
    (
        "delivery.starttls",
        "none, opportunistic (default) or required",
    ),
    (
        "delivery.tls_verify",
        "verify certificates (default: under required and implicit TLS)",
    ),
    ("delivery.tls_ca_file", "a PEM file of extra trust anchors"),
    ("delivery.auth_user", "log in as this user (RFC 4954)"),
    (
        "delivery.auth_password_env",
        "the environment variable holding the password",
    ),
    ("limits", "a table: how hard and how long to try"),
    (
        "limits.connections",
        "connections per destination at most (default 20)",
    ),
    (
        "limits.max_age_secs",
        "give up on a recipient failing temporarily after this long (default 14400)",
    ),
    (
        "limits.retry_after_secs",
        "the first retry, doubling after (default 60)",
    ),
    (
        "limits.lookahead",
        "messages rendered ahead of delivery (default 1000)",
    ),
    (
        "limits.render_threads",
        "threads rendering and signing (default: the number of cores)",
    ),
    (
        "limits.engine",
        "an engine file (the keys of mxpipe config keys), relative to the campaign file",
    ),
    ("dkim", "a table: sign every message (RFC 6376)"),
    (
        "dkim.domain",
        "the signing domain, d= (required in the table)",
    ),
    ("dkim.selector", "the selector, s= (required in the table)"),
    (
        "dkim.key_file",
        "the private key, PEM (required in the table)",
    ),
    ("dkim.algorithm", "rsa-sha256 (default) or ed25519-sha256"),
];
use std::collections::BTreeMap;
use toml::Spanned;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CampaignFile {
    pub from: Spanned<String>,
    pub reply_to: Option<Spanned<String>>,
    pub to_name: Option<Spanned<String>>,
    pub subject: Spanned<String>,
    pub text: Option<Spanned<String>>,
    pub text_file: Option<Spanned<String>>,
    pub html: Option<Spanned<String>>,
    pub html_file: Option<Spanned<String>>,
    pub recipients: Spanned<String>,
    pub suppression: Option<Spanned<String>>,
    pub return_path: Option<Spanned<String>>,
    #[serde(default)]
    pub headers: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    pub attachments: Vec<AttachmentSpec>,
    pub list_unsubscribe: Option<ListUnsubscribe>,
    pub delivery: Spanned<Delivery>,
    #[serde(default)]
    pub limits: Limits,
    pub dkim: Option<Dkim>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AttachmentSpec {
    pub file: Spanned<String>,
    /// Guessed from the file name's extension when missing.
    pub content_type: Option<Spanned<String>>,
    /// The name the reader sees; the file's own name when missing.
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListUnsubscribe {
    pub url: Spanned<String>,
    pub mailto: Option<Spanned<String>>,
    pub secret_env: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Delivery {
    #[serde(default = "relay_mode")]
    pub mode: Spanned<String>,
    pub relay: Option<Spanned<String>>,
    pub ehlo_name: Option<String>,
    /// mode = "mx": DNS servers to ask (`ip:port`); the system's when missing.
    pub nameservers: Option<Vec<Spanned<String>>>,
    /// mode = "mx": the SMTP port of MX hosts (25).
    pub mx_port: Option<u16>,
    /// "none", "opportunistic" (default) or "required".
    pub starttls: Option<Spanned<String>>,
    pub tls_verify: Option<bool>,
    pub tls_ca_file: Option<String>,
    /// AUTH user; the password is read from the environment variable `auth_password_env`.
    pub auth_user: Option<String>,
    pub auth_password_env: Option<Spanned<String>>,
}

fn relay_mode() -> Spanned<String> {
    Spanned::new(0..0, "relay".to_string())
}

/// How hard and how long to try.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct Limits {
    /// Connections to the relay at once.
    pub connections: usize,
    /// A recipient still failing temporarily after this long is given up (expired).
    pub max_age_secs: u64,
    /// The first retry of a deferred recipient, doubling after.
    pub retry_after_secs: u64,
    /// Messages rendered ahead of delivery: the bound on rendered messages held in memory.
    pub lookahead: usize,
    /// Threads rendering and signing; the number of cores when missing.
    pub render_threads: Option<usize>,
    /// A TOML file of engine settings, with the keys of the C ABI's `mxp_config_set`
    /// (rates per destination, overrides by host or `@recipient-domain`, adaptive backoff);
    /// the campaign's own settings apply on top. Relative to the campaign file.
    pub engine: Option<String>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: 20,
            max_age_secs: 4 * 3600,
            retry_after_secs: 60,
            lookahead: 1000,
            render_threads: None,
            engine: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Dkim {
    pub domain: Spanned<String>,
    pub selector: String,
    pub key_file: Spanned<String>,
    #[serde(default = "rsa_sha256")]
    pub algorithm: Spanned<String>,
}

fn rsa_sha256() -> Spanned<String> {
    Spanned::new(0..0, "rsa-sha256".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields serde expects where `toml` puts an unknown key, from its error message.
    fn expected_fields(toml: &str) -> Vec<String> {
        let error = toml::from_str::<CampaignFile>(toml)
            .unwrap_err()
            .to_string();
        let list = error
            .split_once("expected ")
            .unwrap_or_else(|| panic!("{error}"))
            .1;
        list.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn the_key_reference_names_every_key_the_schema_accepts() {
        let mut from_schema: Vec<String> = expected_fields("zz_unknown = 1\n");
        for (table, prefix) in [
            ("[delivery]", "delivery."),
            ("[limits]", "limits."),
            ("[dkim]", "dkim."),
            ("[list_unsubscribe]", "list_unsubscribe."),
            ("[[attachments]]", "attachments."),
        ] {
            from_schema.extend(
                expected_fields(&format!("{table}\nzz_unknown = 1\n"))
                    .into_iter()
                    .map(|f| format!("{prefix}{f}")),
            );
        }
        from_schema.sort();
        let mut documented: Vec<String> = KEYS.iter().map(|(k, _)| k.to_string()).collect();
        documented.sort();
        assert_eq!(documented, from_schema);
    }
}
