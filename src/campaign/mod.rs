//! Campaigns: one newsletter, personalised for every row of a recipients file, sent through the
//! engine, with a per-recipient report and a journal to resume from (`mxpipe send
//! campaign.toml`).
//!
//! [`Campaign::load`] reads and checks everything before anything is sent: the campaign file
//! ([`config`] shows its keys), the templates (an unknown `{{field}}` is an error with its file
//! and line), attachments, the DKIM key, the suppression list and every recipient row (rows
//! that cannot be sent are set aside with their line and reason, see [`Skipped`]). Messages are
//! rendered when they are sent, not when loaded, by a few render threads that stay at most
//! `limits.lookahead` messages ahead of delivery: memory grows with the number of recipients,
//! not with recipients × message size. Each recipient gets its own message (one envelope, one
//! transaction), so that its outcome, its List-Unsubscribe URL and its VERP address are its own.
//!
//! Resuming: with a journal, every final outcome (delivered, bounced, expired) is appended as it
//! happens, and a later run skips the recipients the journal names. A run killed at any point
//! (even `kill -9`) loses no one; what may be sent twice is only what was in flight at the
//! kill, a message the server had accepted whose outcome had not reached the journal. Rows that
//! could not be rendered are reported as `failed` but not journaled, so a later run tries them
//! again.
//!
//! This module must not speak SMTP or hold connections (that is [`crate::engine`]'s), and must
//! not build MIME by hand (that is [`crate::message::mime`]'s).

mod cluster;
pub mod config;
mod journal;
mod progress;
mod recipients;
pub(crate) mod render;
mod report;
mod send;

pub use cluster::RedisTarget;
pub use recipients::{SkipKind, Skipped};
pub use render::Rendered;
pub use report::{Outcome, COLUMNS as REPORT_COLUMNS};
pub use send::{SendOptions, Summary};

use crate::engine::{Dispatcher, DispatcherBuilder};
use crate::error::{Error, Field};
use crate::message::dkim::{Algorithm, Signer};
use crate::message::mime::{self, Attachment, Mailbox};
use crate::message::template::{Fields as _, Template};
use crate::message::Address;
use config::CampaignFile;
use recipients::{CsvSource, Recipients, Suppression};
use render::{Renderer, ReturnPath, Scratch, Unsubscribe};
use std::cell::RefCell;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// Why a campaign cannot be loaded or sent.
#[derive(Debug)]
pub enum CampaignError {
    /// Bad input: the file, the line when known, and what is wrong (naming the field).
    Input {
        file: PathBuf,
        line: Option<u64>,
        message: String,
    },
    /// The dispatcher refused to start (a relay that does not resolve, bad limits).
    Dispatcher(Error),
    /// The `limits.engine` settings could not be applied.
    Engine(String),
    /// Redis (a campaign sent through it) failed: the server and what went wrong.
    Redis(String),
}

impl CampaignError {
    fn input(file: &Path, line: Option<u64>, message: impl Into<String>) -> CampaignError {
        CampaignError::Input {
            file: file.to_path_buf(),
            line,
            message: message.into(),
        }
    }
}

impl fmt::Display for CampaignError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CampaignError::Input {
                file,
                line: Some(line),
                message,
            } => write!(f, "{}:{line}: {message}", file.display()),
            CampaignError::Input { file, message, .. } => {
                write!(f, "{}: {message}", file.display())
            }
            CampaignError::Dispatcher(e) => write!(f, "dispatcher: {e}"),
            CampaignError::Engine(e) => write!(f, "limits.engine: {e}"),
            CampaignError::Redis(e) => write!(f, "redis {e}"),
        }
    }
}

impl std::error::Error for CampaignError {}

/// Where and how fast to send.
#[derive(Debug, Clone)]
struct Delivery {
    /// `None`: direct to MX with `mx`.
    relay: Option<String>,
    mx: Option<crate::route::mx::MxConfig>,
    /// `None`: as the `limits.engine` file says, else opportunistic.
    starttls: Option<crate::smtp::StartTls>,
    tls_verify: Option<bool>,
    tls_ca_file: Option<PathBuf>,
    credentials: Option<crate::smtp::Credentials>,
    ehlo_name: String,
    connections: usize,
    max_age: Duration,
    retry_after: Duration,
    lookahead: usize,
    render_threads: usize,
    /// The `limits.engine` file's text, already checked.
    engine: Option<String>,
}

/// A loaded, checked campaign, ready to send or to render.
pub struct Campaign {
    renderer: Renderer,
    recipients: Recipients,
    recipients_path: PathBuf,
    skipped: Vec<Skipped>,
    delivery: Delivery,
    /// What is sent and to whom, hashed: see [`Campaign::identity`].
    identity: String,
}

impl fmt::Debug for Campaign {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Campaign")
            .field("recipients", &self.recipients.len())
            .field("skipped", &self.skipped.len())
            .field("delivery", &self.delivery)
            .finish()
    }
}

/// The 1-based line of byte `offset` in `source`.
fn line_of(source: &str, offset: usize) -> u64 {
    source[..offset.min(source.len())].matches('\n').count() as u64 + 1
}

/// Reading the campaign file: resolving paths and naming lines in errors.
struct Loader<'a> {
    path: &'a Path,
    dir: PathBuf,
    source: &'a str,
}

impl Loader<'_> {
    fn line(&self, span: Range<usize>) -> Option<u64> {
        (span.end > 0).then(|| line_of(self.source, span.start))
    }

    fn error(&self, span: Range<usize>, key: &str, message: impl fmt::Display) -> CampaignError {
        CampaignError::input(self.path, self.line(span), format!("{key}: {message}"))
    }

    fn resolve(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn read_file(&self, value: &Spanned<String>, key: &str) -> Result<Vec<u8>, CampaignError> {
        let file = self.resolve(value.get_ref());
        std::fs::read(&file).map_err(|e| {
            self.error(
                value.span(),
                key,
                format!("cannot read {}: {e}", file.display()),
            )
        })
    }

    fn mailbox(&self, value: &Spanned<String>, key: &str) -> Result<Mailbox, CampaignError> {
        Mailbox::parse(value.get_ref(), Field::Sender).map_err(|e| match e {
            Error::InvalidAddress { problem, .. } => {
                self.error(value.span(), key, format!("address {problem}"))
            }
            other => self.error(value.span(), key, other),
        })
    }

    /// A template written in the campaign file; errors name the line within the file.
    fn inline_template(
        &self,
        value: &Spanned<String>,
        key: &str,
        columns: &Columns<'_>,
    ) -> Result<Template, CampaignError> {
        Template::parse(value.get_ref(), |n| columns.find(n)).map_err(|e| {
            let span = value.span();
            let raw = &self.source[span.start.min(self.source.len())..];
            // A multi-line string drops the line break right after its opening quotes.
            let skipped = u64::from(
                ["\"\"\"\n", "'''\n", "\"\"\"\r\n", "'''\r\n"]
                    .iter()
                    .any(|q| raw.starts_with(q)),
            );
            let line = self.line(span).map(|l| l + skipped + e.line as u64 - 1);
            CampaignError::input(
                self.path,
                line,
                format!("{key}: {}{}", e.problem, columns.hint(&e.problem)),
            )
        })
    }

    /// A template in a file of its own (`text_file`, `html_file`).
    fn file_template(
        &self,
        value: &Spanned<String>,
        key: &str,
        columns: &Columns<'_>,
    ) -> Result<Template, CampaignError> {
        let file = self.resolve(value.get_ref());
        let bytes = self.read_file(value, key)?;
        let text = String::from_utf8(bytes).map_err(|e| {
            CampaignError::input(
                &file,
                Some(line_of(
                    &String::from_utf8_lossy(&e.as_bytes()[..e.utf8_error().valid_up_to()]),
                    usize::MAX,
                )),
                format!("{key}: not valid UTF-8"),
            )
        })?;
        // A byte-order mark (editors on Windows write one) is not part of the text.
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        Template::parse(text, |n| columns.find(n)).map_err(|e| {
            CampaignError::input(
                &file,
                Some(e.line as u64),
                format!("{key}: {}{}", e.problem, columns.hint(&e.problem)),
            )
        })
    }

    /// `inline` or `file`, at most one of them.
    fn body_template(
        &self,
        inline: &Option<Spanned<String>>,
        file: &Option<Spanned<String>>,
        key: &str,
        columns: &Columns<'_>,
    ) -> Result<Option<Template>, CampaignError> {
        match (inline, file) {
            (Some(_), Some(f)) => Err(self.error(
                f.span(),
                &format!("{key}_file"),
                format!("give {key} or {key}_file, not both"),
            )),
            (Some(t), None) => self.inline_template(t, key, columns).map(Some),
            (None, Some(f)) => self
                .file_template(f, &format!("{key}_file"), columns)
                .map(Some),
            (None, None) => Ok(None),
        }
    }
}

/// The recipients file's columns, for resolving template fields.
struct Columns<'a> {
    names: &'a [String],
    file: &'a Path,
}

impl Columns<'_> {
    fn find(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|c| c == name)
    }

    fn hint(&self, problem: &crate::message::template::TemplateProblem) -> String {
        match problem {
            crate::message::template::TemplateProblem::UnknownField(_) => format!(
                " ({} has columns: {})",
                self.file.display(),
                self.names.join(", ")
            ),
            _ => String::new(),
        }
    }
}

/// See [`Campaign::identity`].
fn identity(
    path: &Path,
    source: &str,
    recipients: &Path,
    file: &CampaignFile,
    loader: &Loader<'_>,
) -> Result<String, CampaignError> {
    use ring::digest::{Context, SHA256};
    let mut table: toml::Table = toml::from_str(source)
        .map_err(|e| CampaignError::input(path, None, e.message().trim().to_string()))?;
    table.remove("delivery");
    table.remove("limits");
    let mut context = Context::new(&SHA256);
    // Each part length-prefixed, so that no two different inputs hash alike.
    let mut part = |bytes: &[u8]| {
        context.update(&(bytes.len() as u64).to_be_bytes());
        context.update(bytes);
    };
    part(table.to_string().as_bytes());
    let mut files: Vec<PathBuf> = vec![recipients.to_path_buf()];
    files.extend(
        [&file.text_file, &file.html_file]
            .into_iter()
            .flatten()
            .map(|f| loader.resolve(f.get_ref())),
    );
    files.extend(
        file.attachments
            .iter()
            .map(|a| loader.resolve(a.file.get_ref())),
    );
    for f in files {
        let bytes = std::fs::read(&f)
            .map_err(|e| CampaignError::input(&f, None, format!("cannot read: {e}")))?;
        part(&bytes);
    }
    Ok(context
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Header fields mxpipe writes itself: a campaign's `[headers]` must not repeat them.
const RESERVED_HEADERS: &[&str] = &[
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "dkim-signature",
    "return-path",
];

/// Control characters other than TAB would end a header line early: a value used in a header
/// must not have them.
fn has_control(value: &str) -> bool {
    value.chars().any(|c| c.is_control() && c != '\t')
}

impl Campaign {
    /// Reads and checks the campaign file at `path` and everything it names. Relative paths in
    /// it are relative to its directory.
    pub fn load(path: &Path) -> Result<Campaign, CampaignError> {
        let source = std::fs::read_to_string(path)
            .map_err(|e| CampaignError::input(path, None, format!("cannot read: {e}")))?;
        let file: CampaignFile = toml::from_str(&source).map_err(|e| {
            let line = e.span().map(|s| line_of(&source, s.start));
            CampaignError::input(path, line, e.message().trim().to_string())
        })?;
        let loader = Loader {
            path,
            dir: path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from(".")),
            source: &source,
        };

        let from = loader.mailbox(&file.from, "from")?;
        let reply_to = file
            .reply_to
            .as_ref()
            .map(|r| loader.mailbox(r, "reply_to"))
            .transpose()?;

        let recipients_path = loader.resolve(file.recipients.get_ref());
        let csv = CsvSource::open(&recipients_path)?;
        let names = csv.columns().to_vec();
        let columns = Columns {
            names: &names,
            file: &recipients_path,
        };

        let subject = loader.inline_template(&file.subject, "subject", &columns)?;
        let to_name = file
            .to_name
            .as_ref()
            .map(|t| loader.inline_template(t, "to_name", &columns))
            .transpose()?;
        let text = loader.body_template(&file.text, &file.text_file, "text", &columns)?;
        let html = loader.body_template(&file.html, &file.html_file, "html", &columns)?;
        if text.is_none() && html.is_none() {
            return Err(CampaignError::input(
                path,
                None,
                "no content: give text, text_file, html or html_file",
            ));
        }

        let mut headers = Vec::new();
        for (name, value) in &file.headers {
            let key = format!("headers.{name}");
            if !mime::is_valid_header_name(name) {
                return Err(loader.error(
                    value.span(),
                    &key,
                    "not a valid header name (printable US-ASCII without ':' or spaces)",
                ));
            }
            if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                return Err(loader.error(
                    value.span(),
                    &key,
                    "mxpipe writes this header itself; set it with the campaign's own keys",
                ));
            }
            headers.push((name.clone(), loader.inline_template(value, &key, &columns)?));
        }

        let mut attachments = Vec::new();
        for (i, spec) in file.attachments.iter().enumerate() {
            let key = format!("attachments[{i}].file");
            let data = loader.read_file(&spec.file, &key)?;
            let name = spec.name.clone().unwrap_or_else(|| {
                Path::new(spec.file.get_ref())
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| spec.file.get_ref().clone())
            });
            let content_type = spec
                .content_type
                .as_ref()
                .map(|c| c.get_ref().as_str())
                .unwrap_or_else(|| mime::guess_media_type(&name));
            let attachment = Attachment::new(&name, content_type, &data).map_err(|e| {
                let span = spec
                    .content_type
                    .as_ref()
                    .map_or(spec.file.span(), |c| c.span());
                loader.error(span, &format!("attachments[{i}]"), e)
            })?;
            attachments.push(attachment);
        }

        let unsubscribe = match &file.list_unsubscribe {
            Some(l) => {
                let url = loader.inline_template(&l.url, "list_unsubscribe.url", &columns)?;
                let literal: String = url.literals().collect();
                // RFC 8058 3.1: one-click unsubscription needs an HTTPS URI.
                if !literal.starts_with("https://") {
                    return Err(loader.error(
                        l.url.span(),
                        "list_unsubscribe.url",
                        "must start with https:// (RFC 8058 one-click unsubscription)",
                    ));
                }
                let unsafe_char = |t: &Template| {
                    t.literals().any(|s| {
                        s.chars()
                            .any(|c| !c.is_ascii_graphic() || matches!(c, '<' | '>' | '"' | ','))
                    })
                };
                if unsafe_char(&url) {
                    return Err(loader.error(
                        l.url.span(),
                        "list_unsubscribe.url",
                        "must be printable US-ASCII without spaces, '<', '>', '\"' or ',' (percent-encode them)",
                    ));
                }
                let mailto = match &l.mailto {
                    Some(m) => {
                        let t = loader.inline_template(m, "list_unsubscribe.mailto", &columns)?;
                        let literal: String = t.literals().collect();
                        if unsafe_char(&t) || !literal.contains('@') {
                            return Err(loader.error(
                                m.span(),
                                "list_unsubscribe.mailto",
                                "must be an address (without mailto:) in printable US-ASCII",
                            ));
                        }
                        Some(t)
                    }
                    None => None,
                };
                let secret = match &l.secret_env {
                    Some(var) => match std::env::var(var.get_ref()) {
                        Ok(s) if !s.is_empty() => Some(s.into_bytes()),
                        _ => {
                            return Err(loader.error(
                                var.span(),
                                "list_unsubscribe.secret_env",
                                format!("the environment variable {} is not set", var.get_ref()),
                            ))
                        }
                    },
                    None => None,
                };
                Some(Unsubscribe {
                    url,
                    mailto,
                    secret,
                })
            }
            None => None,
        };

        let return_path = file
            .return_path
            .as_ref()
            .map(|r| {
                ReturnPath::parse(r.get_ref()).map_err(|e| loader.error(r.span(), "return_path", e))
            })
            .transpose()?;

        let delivery = loader.delivery(&file)?;

        let signer = match &file.dkim {
            Some(d) => {
                let algorithm = Algorithm::parse(d.algorithm.get_ref()).ok_or_else(|| {
                    loader.error(
                        d.algorithm.span(),
                        "dkim.algorithm",
                        format!(
                            "{:?} is not rsa-sha256 or ed25519-sha256",
                            d.algorithm.get_ref()
                        ),
                    )
                })?;
                let key_path = loader.resolve(d.key_file.get_ref());
                let pem = loader.read_file(&d.key_file, "dkim.key_file")?;
                let pem = String::from_utf8_lossy(&pem);
                let signer = Signer::from_pem(&pem, algorithm, d.domain.get_ref(), &d.selector)
                    .map_err(|e| {
                        let span = match e {
                            crate::message::dkim::KeyError::InvalidName(_) => d.domain.span(),
                            _ => d.key_file.span(),
                        };
                        loader.error(span, "dkim", format!("{}: {e}", key_path.display()))
                    })?;
                Some(signer)
            }
            None => None,
        };

        let suppression = match &file.suppression {
            Some(s) => Suppression::load(&loader.resolve(s.get_ref()))?,
            None => Suppression::default(),
        };

        // Values that go into header fields must not break the header.
        let mut header_fields: Vec<usize> = subject
            .fields()
            .chain(to_name.iter().flat_map(|t| t.fields()))
            .chain(headers.iter().flat_map(|(_, t)| t.fields()))
            .collect();
        header_fields.sort_unstable();
        header_fields.dedup();
        let (recipients, skipped) = csv.read(&suppression, |row, address| {
            for &f in &header_fields {
                if has_control(row.field(f)) {
                    return Err(format!(
                        "{}: contains a line break or control character, and a header uses it",
                        names[f]
                    ));
                }
            }
            if let Some(verp) = &return_path {
                verp.address(address)?;
            }
            Ok(())
        })?;

        let identity = identity(path, &source, &recipients_path, &file, &loader)?;
        Ok(Campaign {
            renderer: Renderer {
                from,
                reply_to,
                to_name,
                subject,
                text,
                html,
                headers,
                attachments,
                unsubscribe,
                return_path,
                signer,
            },
            recipients,
            recipients_path,
            skipped,
            delivery,
            identity,
        })
    }

    /// The campaign's identity: a SHA-256 over what is sent and to whom (the campaign file
    /// without its `[delivery]` and `[limits]`, the recipients file, the template and attachment
    /// files). A journal records it, so that it is never used to resume another campaign; how
    /// the mail is sent (relay, TLS, limits) may change between runs.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Recipients to send to (rows that passed every check).
    pub fn len(&self) -> usize {
        self.recipients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.recipients.is_empty()
    }

    /// Rows set aside at load time, in file order.
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// The recipients file.
    pub fn recipients_path(&self) -> &Path {
        &self.recipients_path
    }

    /// The DNS name and TXT record of the DKIM key, when the campaign signs.
    pub fn dkim_record(&self) -> Option<(String, String)> {
        self.renderer
            .signer
            .as_ref()
            .map(|s| (s.dns_name(), s.dns_record()))
    }

    /// Renders the message of recipient `index` (0 ≤ index < [`Campaign::len`]). Buffers are
    /// kept per thread and reused, so rendering many messages allocates little.
    pub fn render(&self, index: usize) -> Result<Rendered, CampaignError> {
        thread_local! {
            static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
        }
        let row = self.recipients.row(index);
        let fail =
            |message: String| CampaignError::input(&self.recipients_path, Some(row.line), message);
        let address = Address::parse(self.recipients.address(index), Field::Recipient(0))
            .map_err(|e| fail(e.to_string()))?;
        SCRATCH
            .with_borrow_mut(|scratch| self.renderer.render(&row, address, scratch))
            .map_err(fail)
    }

    /// Sends the campaign (see [`SendOptions`]) with the delivery settings of its file;
    /// returns when every recipient is final.
    pub fn send(&self, options: &SendOptions) -> Result<Summary, CampaignError> {
        send::send(self, self.builder(None, false)?, options, &|_| Ok(()))
    }

    /// Sends the campaign through a dispatcher built from `builder` (start from
    /// [`Campaign::builder`] and apply what overrides it); `started` is called once with the
    /// dispatcher before anything is submitted (e.g. to serve its metrics). The campaign still
    /// sets what it needs: events on, and its lookahead as the queue bounds.
    pub fn send_with(
        &self,
        builder: DispatcherBuilder,
        options: &SendOptions,
        started: &dyn Fn(&std::sync::Arc<Dispatcher>) -> Result<(), String>,
    ) -> Result<Summary, CampaignError> {
        send::send(self, builder, options, started)
    }

    /// Sends the campaign through Redis instead of a local engine: every message goes into the
    /// work stream for `mxpipe node` processes, and the outcomes come from the outcomes stream
    /// (see [`RedisTarget`]); returns when every recipient is final, or at the deadline.
    pub fn send_through_redis(
        &self,
        redis: &RedisTarget,
        options: &SendOptions,
    ) -> Result<Summary, CampaignError> {
        cluster::send(self, redis, options)
    }

    /// A dispatcher builder with this campaign's settings over an engine file's: `engine` is
    /// the text of an engine file that replaces `limits.engine` (a `--config` given on the
    /// command line), and with `route_given` the caller sets the relay or direct-MX routing
    /// itself, so the campaign's `delivery.mode`/`relay` are left out.
    pub fn builder(
        &self,
        engine: Option<&str>,
        route_given: bool,
    ) -> Result<DispatcherBuilder, CampaignError> {
        let d = &self.delivery;
        let mut builder = match engine.or(d.engine.as_deref()) {
            Some(text) => crate::ffi::builder_from_toml(text).map_err(CampaignError::Engine)?,
            None => Dispatcher::builder(),
        };
        if let Some(policy) = d.starttls {
            builder = builder.starttls(policy);
        }
        if !route_given {
            if let Some(relay) = &d.relay {
                builder = builder.relay(relay);
            }
            if let Some(mx) = &d.mx {
                builder = builder.direct_mx(mx.clone());
            }
        }
        if let Some(verify) = d.tls_verify {
            builder = builder.tls_verify(verify);
        }
        if let Some(ca) = &d.tls_ca_file {
            builder = builder.tls_ca_file(ca);
        }
        if let Some(credentials) = &d.credentials {
            builder = builder.credentials(credentials.clone());
        }
        let mut builder = builder
            .ehlo_name(&d.ehlo_name)
            .max_connections_per_destination(d.connections);
        let retry = &mut builder.config_mut().retry;
        retry.initial = d.retry_after;
        retry.max_age = d.max_age;
        Ok(builder)
    }

    /// Writes every message to `dir` as `<line>.eml` (the line of its row in the recipients
    /// file) instead of sending it.
    pub fn dry_run(&self, dir: &Path) -> Result<Summary, CampaignError> {
        send::dry_run(self, dir)
    }
}

impl Recipients {
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Loader<'_> {
    fn delivery(&self, file: &CampaignFile) -> Result<Delivery, CampaignError> {
        let d = file.delivery.get_ref();
        let (relay, mx) = match d.mode.get_ref().as_str() {
            "relay" => {
                let relay = d.relay.as_ref().ok_or_else(|| {
                    self.error(
                        file.delivery.span(),
                        "delivery.relay",
                        "missing: the smarthost's host:port",
                    )
                })?;
                (Some(relay.get_ref().clone()), None)
            }
            "mx" => {
                let mut nameservers = Vec::new();
                for ns in d.nameservers.iter().flatten() {
                    let addr = ns.get_ref().parse().map_err(|_| {
                        self.error(
                            ns.span(),
                            "delivery.nameservers",
                            format!("{:?} is not an ip:port address", ns.get_ref()),
                        )
                    })?;
                    nameservers.push(addr);
                }
                let mx = crate::route::mx::MxConfig {
                    nameservers: (!nameservers.is_empty()).then_some(nameservers),
                    smtp_port: d.mx_port.unwrap_or(25),
                    ..crate::route::mx::MxConfig::default()
                };
                (None, Some(mx))
            }
            other => {
                return Err(self.error(
                    d.mode.span(),
                    "delivery.mode",
                    format!("{other:?} is not a delivery mode; use \"relay\" or \"mx\""),
                ))
            }
        };
        let starttls = match d.starttls.as_ref().map(|s| s.get_ref().as_str()) {
            None => None,
            Some("opportunistic") => Some(crate::smtp::StartTls::Opportunistic),
            Some("none") => Some(crate::smtp::StartTls::Disabled),
            Some("required") => Some(crate::smtp::StartTls::Required),
            Some(other) => {
                let span = d.starttls.as_ref().expect("present").span();
                return Err(self.error(
                    span,
                    "delivery.starttls",
                    format!("{other:?} is not one of \"none\", \"opportunistic\", \"required\""),
                ));
            }
        };
        let credentials = match (&d.auth_user, &d.auth_password_env) {
            (None, None) => None,
            (Some(user), Some(var)) => {
                let password = std::env::var(var.get_ref()).map_err(|_| {
                    self.error(
                        var.span(),
                        "delivery.auth_password_env",
                        format!("the environment variable {} is not set", var.get_ref()),
                    )
                })?;
                Some(
                    crate::smtp::Credentials::password(user, &password).ok_or_else(|| {
                        self.error(
                            file.delivery.span(),
                            "delivery.auth_user",
                            "the user or password contains NUL, CR or LF",
                        )
                    })?,
                )
            }
            _ => {
                return Err(self.error(
                    file.delivery.span(),
                    "delivery.auth_user",
                    "auth_user and auth_password_env go together",
                ))
            }
        };
        let l = &file.limits;
        let positive = |value: usize, key: &str| {
            if value == 0 {
                Err(CampaignError::input(
                    self.path,
                    None,
                    format!("limits.{key}: must be at least 1"),
                ))
            } else {
                Ok(value)
            }
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let engine = match &l.engine {
            None => None,
            Some(file) => {
                let path = self.resolve(file);
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    CampaignError::input(
                        self.path,
                        None,
                        format!("limits.engine: {}: {e}", path.display()),
                    )
                })?;
                // Checked now, so that a bad setting stops the campaign before anything is sent.
                crate::ffi::builder_from_toml(&text).map_err(|e| {
                    CampaignError::input(
                        self.path,
                        None,
                        format!("limits.engine: {}: {e}", path.display()),
                    )
                })?;
                Some(text)
            }
        };
        Ok(Delivery {
            relay,
            mx,
            starttls,
            tls_verify: d.tls_verify,
            tls_ca_file: d.tls_ca_file.as_deref().map(|f| self.resolve(f)),
            credentials,
            ehlo_name: d.ehlo_name.clone().unwrap_or_else(|| "localhost".into()),
            connections: positive(l.connections, "connections")?,
            max_age: Duration::from_secs(l.max_age_secs),
            retry_after: Duration::from_secs(l.retry_after_secs.max(1)),
            lookahead: positive(l.lookahead, "lookahead")?,
            render_threads: positive(l.render_threads.unwrap_or(threads), "render_threads")?,
            engine,
        })
    }
}
