//! The JSON document `POST /v1/messages` takes, and how it becomes messages.
//!
//! Content is raw RFC 5322 (`raw`, sent as given after CRLF normalisation) or built here from
//! `subject`, `text` and `html` with the MIME writer of [`crate::message::mime`]. When a
//! recipient gives merge `fields`, the content is a template ([`crate::message::template`]):
//! its `{{field}}` placeholders are filled per recipient, one message each; otherwise (or when
//! no placeholder is used) one message goes to every recipient, sharing one body, and the
//! content is taken as it is, braces included. Every error names the
//! field of the document it is about, as a JSON path (`recipients[2].address`).

use crate::error::{Error, Field};
use crate::message::dsn::{xtext_encode, DsnEnvelope, EsmtpParams};
use crate::message::mime::{self, Content, Mailbox};
use crate::message::template::{Escape, Template};
use crate::message::{Body, Message};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

/// The request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    /// The envelope sender (MAIL FROM); "" for the null sender.
    pub from: String,
    /// The From header of built content (`Name <address>`); `from` when absent.
    #[serde(default)]
    pub header_from: Option<String>,
    pub recipients: Vec<RecipientEntry>,
    /// A complete message (header section, blank line, body).
    #[serde(default)]
    pub raw: Option<String>,
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub html: Option<String>,
    /// RFC 3461 RET (`FULL` or `HDRS`) and ENVID (as it is, not xtext).
    #[serde(default)]
    pub dsn: Option<DsnRequest>,
}

/// A recipient: an address, or an object with merge fields and DSN parameters.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RecipientEntry {
    Address(String),
    Detailed(Recipient),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipient {
    pub address: String,
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// RFC 3461 NOTIFY: `NEVER` or a comma list of `SUCCESS`, `FAILURE`, `DELAY`.
    #[serde(default)]
    pub notify: Option<String>,
    /// RFC 3461 ORCPT as on the wire: `rfc822;` and the address in xtext.
    #[serde(default)]
    pub orcpt: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DsnRequest {
    #[serde(default)]
    pub ret: Option<String>,
    #[serde(default)]
    pub envid: Option<String>,
}

/// A refused document: the field (JSON path) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub field: String,
    pub error: String,
}

fn refuse(field: impl Into<String>, error: impl Into<String>) -> Refusal {
    Refusal {
        field: field.into(),
        error: error.into(),
    }
}

impl RecipientEntry {
    fn address(&self) -> &str {
        match self {
            RecipientEntry::Address(a) => a,
            RecipientEntry::Detailed(r) => &r.address,
        }
    }

    fn fields(&self) -> Option<&BTreeMap<String, String>> {
        match self {
            RecipientEntry::Address(_) => None,
            RecipientEntry::Detailed(r) => Some(&r.fields),
        }
    }
}

/// Reads a request body; a syntax or type error names where it is.
pub fn parse(body: &[u8]) -> Result<Document, Refusal> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let error = e.into_inner().to_string();
        // serde names a missing or unknown field in its message, at its parent's path.
        let named = ["missing field `", "unknown field `"]
            .iter()
            .find_map(|p| error.strip_prefix(p))
            .and_then(|rest| rest.split('`').next());
        let field = match (path.as_str(), named) {
            (".", Some(name)) => name.to_string(),
            // A syntax error: the path is "." or "?" (inside a map whose key did not parse).
            (".", None) | ("?", _) => "body".to_string(),
            (_, Some(name)) if !path.ends_with(name) => format!("{path}.{name}"),
            _ => path.clone(),
        };
        refuse(field, error)
    })
}

/// One content field: its template when recipients give merge fields, else its text.
struct Part<'a> {
    text: Option<&'a str>,
    template: Option<Template>,
}

impl Part<'_> {
    fn fill(&self, values: &[String], escape: Escape) -> Option<String> {
        match &self.template {
            Some(t) => Some(t.render(values, escape)),
            None => self.text.map(str::to_string),
        }
    }
}

/// The content fields, by the document field each came from.
struct Templates<'a> {
    raw: Part<'a>,
    subject: Part<'a>,
    text: Part<'a>,
    html: Part<'a>,
}

impl Document {
    /// The messages this document asks for, checked: one for every recipient when the content
    /// has no merge fields, else one per recipient. `id_domain`: the Message-ID domain of built
    /// content when the sender is `<>`.
    pub fn messages<'a>(
        &'a self,
        id_domain: &str,
        now: SystemTime,
    ) -> Result<Vec<Message>, Refusal> {
        if self.recipients.is_empty() {
            return Err(refuse("recipients", "at least one recipient is needed"));
        }
        let built = self.subject.is_some() || self.text.is_some() || self.html.is_some();
        match (&self.raw, built) {
            (Some(_), true) => {
                return Err(refuse(
                    "raw",
                    "give either raw or subject/text/html, not both",
                ))
            }
            (None, false) => {
                return Err(refuse(
                    "raw",
                    "no content: give raw, or subject with text and/or html",
                ))
            }
            _ => {}
        }
        if built && self.subject.is_none() {
            return Err(refuse("subject", "built content needs a subject"));
        }
        // Field names: every name any recipient gives, in order, each an index.
        let mut names: Vec<&str> = self
            .recipients
            .iter()
            .filter_map(RecipientEntry::fields)
            .flat_map(|f| f.keys().map(String::as_str))
            .collect();
        names.sort_unstable();
        names.dedup();
        let resolve = |name: &str| names.iter().position(|n| *n == name);
        let merging = !names.is_empty();
        let template = |field: &str, text: &'a Option<String>| -> Result<Part<'a>, Refusal> {
            let text = text.as_deref();
            let template = text
                .filter(|_| merging)
                .map(|t| Template::parse(t, resolve))
                .transpose()
                .map_err(|e| refuse(field, e.to_string()))?;
            Ok(Part { text, template })
        };
        let templates = Templates {
            raw: template("raw", &self.raw)?,
            subject: template("subject", &self.subject)?,
            text: template("text", &self.text)?,
            html: template("html", &self.html)?,
        };
        let used: Vec<usize> = [
            &templates.raw,
            &templates.subject,
            &templates.text,
            &templates.html,
        ]
        .into_iter()
        .filter_map(|p| p.template.as_ref())
        .flat_map(|t| t.fields())
        .collect();
        let dsn = self.dsn_envelope()?;
        let field_of = |e: Error, content: &str| match e {
            Error::InvalidAddress {
                field: Field::Sender,
                ..
            } => refuse("from", e.to_string()),
            Error::InvalidAddress {
                field: Field::Recipient(i),
                problem,
            } => refuse(format!("recipients[{i}]"), format!("address {problem}")),
            _ => refuse(content, e.to_string()),
        };
        let content_field = if self.raw.is_some() { "raw" } else { "text" };
        let with_dsn = |m: Message| match &dsn {
            Some(d) => m.with_dsn(d.clone()),
            None => m,
        };
        if used.is_empty() {
            let body = self.render(&templates, &[], None, id_domain, now)?;
            let body = Body::new(&body).map_err(|e| refuse(content_field, e.to_string()))?;
            let message = Message::with_body(
                &self.from,
                self.recipients.iter().map(RecipientEntry::address),
                Arc::new(body),
            )
            .map_err(|e| field_of(e, content_field))?;
            return Ok(vec![with_dsn(message)]);
        }
        let mut out = Vec::with_capacity(self.recipients.len());
        for (i, r) in self.recipients.iter().enumerate() {
            let given = r.fields();
            let mut values = Vec::with_capacity(names.len());
            for (n, name) in names.iter().enumerate() {
                match given.and_then(|f| f.get(*name)) {
                    Some(v) => values.push(v.clone()),
                    None if used.contains(&n) => {
                        return Err(refuse(
                            format!("recipients[{i}].fields"),
                            format!("no value for \"{name}\", which the content uses"),
                        ))
                    }
                    None => values.push(String::new()),
                }
            }
            let body = self.render(&templates, &values, Some(r.address()), id_domain, now)?;
            let body = Body::new(&body).map_err(|e| refuse(content_field, e.to_string()))?;
            // Checked as recipient i, so that an error names its place in the list.
            let address = crate::message::Address::parse(r.address(), Field::Recipient(i))
                .map_err(|e| field_of(e, content_field))?;
            let sender = if self.from.is_empty() {
                crate::message::Address::null()
            } else {
                crate::message::Address::parse(&self.from, Field::Sender)
                    .map_err(|e| field_of(e, content_field))?
            };
            let message = Message::from_parts(sender, vec![address], Arc::new(body))
                .map_err(|e| field_of(e, content_field))?;
            out.push(with_dsn(message));
        }
        Ok(out)
    }

    /// The RFC 3461 request, if the document makes one.
    fn dsn_envelope(&self) -> Result<Option<DsnEnvelope>, Refusal> {
        let param = |k: &str, v: &str| (k.to_string(), Some(v.to_string()));
        let mut mail: EsmtpParams<String> = Vec::new();
        if let Some(d) = &self.dsn {
            if let Some(ret) = &d.ret {
                mail.push(param("RET", ret));
            }
            if let Some(envid) = &d.envid {
                mail.push(param("ENVID", &xtext_encode(envid.as_bytes())));
            }
        }
        let mut rcpts: Vec<(String, EsmtpParams<String>)> = Vec::new();
        for r in &self.recipients {
            let mut params = Vec::new();
            if let RecipientEntry::Detailed(r) = r {
                if let Some(n) = &r.notify {
                    params.push(param("NOTIFY", n));
                }
                if let Some(o) = &r.orcpt {
                    params.push(param("ORCPT", o));
                }
            }
            rcpts.push((r.address().to_string(), params));
        }
        if mail.is_empty() && rcpts.iter().all(|(_, p)| p.is_empty()) {
            return Ok(None);
        }
        DsnEnvelope::from_params(&mail, &rcpts)
            .map(Some)
            .map_err(|e| match e {
                Error::InvalidParameter {
                    parameter,
                    recipient: Some(i),
                    problem,
                } => refuse(
                    format!(
                        "recipients[{i}].{}",
                        parameter.to_string().to_ascii_lowercase()
                    ),
                    problem,
                ),
                Error::InvalidParameter {
                    parameter, problem, ..
                } => refuse(
                    format!("dsn.{}", parameter.to_string().to_ascii_lowercase()),
                    problem,
                ),
                other => refuse("dsn", other.to_string()),
            })
    }

    /// One message's bytes: `raw` rendered, or built content with its header.
    fn render(
        &self,
        t: &Templates,
        values: &[String],
        to: Option<&str>,
        id_domain: &str,
        now: SystemTime,
    ) -> Result<Vec<u8>, Refusal> {
        if let Some(raw) = t.raw.fill(values, Escape::None) {
            return Ok(raw.into_bytes());
        }
        let from_text = self.header_from.as_deref().unwrap_or(&self.from);
        let from_field = if self.header_from.is_some() {
            "header_from"
        } else {
            "from"
        };
        if from_text.is_empty() {
            return Err(refuse(from_field, "built content needs a From address"));
        }
        let from = Mailbox::parse(from_text, Field::Sender)
            .map_err(|e| refuse(from_field, e.to_string()))?;
        let mut out = Vec::with_capacity(1024);
        mime::write_address_header(&mut out, "From", std::slice::from_ref(&from))
            .map_err(|e| refuse(from_field, e.to_string()))?;
        if let Some(to) = to {
            let to = Mailbox::parse(to, Field::Recipient(0))
                .map_err(|e| refuse("recipients", e.to_string()))?;
            mime::write_address_header(&mut out, "To", &[to])
                .map_err(|e| refuse("recipients", e.to_string()))?;
        }
        let subject = t.subject.fill(values, Escape::None).unwrap_or_default();
        mime::write_text_header(&mut out, "Subject", &subject)
            .map_err(|e| refuse("subject", e.to_string()))?;
        out.extend_from_slice(format!("Date: {}\r\n", mime::format_date(now)).as_bytes());
        let domain = if from.address.is_null() {
            id_domain
        } else {
            from.address.domain()
        };
        out.extend_from_slice(
            format!("Message-ID: {}\r\n", mime::new_message_id(domain)).as_bytes(),
        );
        let text = t.text.fill(values, Escape::None);
        let html = t.html.fill(values, Escape::Html);
        Content {
            text: text.as_deref(),
            html: html.as_deref(),
            attachments: &[],
        }
        .write(&mut out);
        Ok(out)
    }
}
