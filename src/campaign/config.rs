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
