//! One recipient's message, rendered just before it is submitted: the templates filled in with
//! the row's values, the header fields and MIME body written, the DKIM signature added last
//! over the exact bytes that will be sent.
//!
//! A [`Renderer`] holds everything that is the same for every recipient (parsed templates,
//! encoded attachments, the DKIM key) and is shared by the render threads; per-recipient bytes
//! live only until the dispatcher has them. It must not read files or decide who is sent to.

use super::recipients::Row;
use crate::error::Field;
use crate::message::dkim::Signer;
use crate::message::mime::{self, Attachment, Content, Mailbox};
use crate::message::template::{Escape, Template};
use crate::message::Address;
use std::time::{SystemTime, UNIX_EPOCH};

/// The List-Unsubscribe targets (RFC 2369 3.2, RFC 8058).
pub(crate) struct Unsubscribe {
    /// An https URL that takes the one-click POST; values are percent-encoded into it.
    pub url: Template,
    /// An address for unsubscribing by mail, without the `mailto:`.
    pub mailto: Option<Template>,
    /// The one-click secret: the URL gets `u=` and `t=` (see `inbound::unsubscribe`).
    pub secret: Option<Vec<u8>>,
}

/// A VERP envelope sender: `{local}` and `{domain}` are the recipient's, so that a bounce
/// names the recipient it is about in the address it comes back to.
pub(crate) struct ReturnPath {
    template: String,
}

impl ReturnPath {
    /// Checks that only `{local}` and `{domain}` appear in braces.
    pub fn parse(template: &str) -> Result<ReturnPath, String> {
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            let close = rest[open..]
                .find('}')
                .ok_or("\"{\" without a closing \"}\"")?;
            let name = &rest[open + 1..open + close];
            if name != "local" && name != "domain" {
                return Err(format!(
                    "unknown placeholder \"{{{name}}}\" (use {{local}} and {{domain}})"
                ));
            }
            rest = &rest[open + close + 1..];
        }
        Ok(ReturnPath {
            template: template.to_string(),
        })
    }

    /// The envelope sender for `recipient`.
    pub fn address(&self, recipient: &Address) -> Result<Address, String> {
        let text = self
            .template
            .replace("{local}", recipient.local_part())
            .replace("{domain}", recipient.domain());
        Address::parse(&text, Field::Sender).map_err(|e| format!("return_path {text:?}: {e}"))
    }
}

/// What is the same in every message of the campaign.
pub(crate) struct Renderer {
    pub from: Mailbox,
    pub reply_to: Option<Mailbox>,
    pub to_name: Option<Template>,
    pub subject: Template,
    pub text: Option<Template>,
    pub html: Option<Template>,
    pub headers: Vec<(String, Template)>,
    pub attachments: Vec<Attachment>,
    pub unsubscribe: Option<Unsubscribe>,
    pub return_path: Option<ReturnPath>,
    pub signer: Option<Signer>,
}

/// One message, ready to submit.
#[derive(Debug)]
pub struct Rendered {
    /// The envelope sender (MAIL FROM): the VERP address, or the From address.
    pub sender: Address,
    pub recipient: Address,
    /// The message, CRLF line ends, DKIM-signed when the campaign signs.
    pub content: Vec<u8>,
}

/// Buffers a render thread reuses from one message to the next.
#[derive(Default)]
pub(crate) struct Scratch {
    text: String,
    html: String,
    value: String,
    message: Vec<u8>,
}

impl Renderer {
    /// Renders the message for `row`, whose address is `recipient`.
    pub fn render(
        &self,
        row: &Row<'_>,
        recipient: Address,
        scratch: &mut Scratch,
    ) -> Result<Rendered, String> {
        let sender = match &self.return_path {
            Some(verp) => verp.address(&recipient)?,
            None => self.from.address.clone(),
        };
        let now = SystemTime::now();
        let out = &mut scratch.message;
        out.clear();
        let e = |e: mime::HeaderError| e.to_string();
        mime::write_structured_header(out, "Date", &mime::format_date(now)).map_err(e)?;
        mime::write_address_header(out, "From", std::slice::from_ref(&self.from)).map_err(e)?;
        let value = &mut scratch.value;
        let name = match &self.to_name {
            Some(t) => {
                value.clear();
                t.render_into(row, Escape::None, value);
                Some(value.trim().to_string()).filter(|n| !n.is_empty())
            }
            None => None,
        };
        let to = Mailbox {
            name,
            address: recipient.clone(),
        };
        mime::write_address_header(out, "To", &[to]).map_err(e)?;
        value.clear();
        self.subject.render_into(row, Escape::None, value);
        mime::write_text_header(out, "Subject", value).map_err(e)?;
        let message_id = mime::new_message_id(self.from.address.domain());
        mime::write_structured_header(out, "Message-ID", &message_id).map_err(e)?;
        if let Some(reply_to) = &self.reply_to {
            mime::write_address_header(out, "Reply-To", std::slice::from_ref(reply_to))
                .map_err(e)?;
        }
        if let Some(unsubscribe) = &self.unsubscribe {
            value.clear();
            value.push('<');
            unsubscribe.url.render_into(row, Escape::Url, value);
            if let Some(secret) = &unsubscribe.secret {
                let url = crate::inbound::unsubscribe::signed_url(
                    &value[1..],
                    secret,
                    recipient.as_str(),
                );
                value.truncate(1);
                value.push_str(&url);
            }
            value.push('>');
            if let Some(mailto) = &unsubscribe.mailto {
                value.push_str(", <mailto:");
                mailto.render_into(row, Escape::Url, value);
                value.push('>');
            }
            mime::write_structured_header(out, "List-Unsubscribe", value).map_err(e)?;
            // RFC 8058 3.1: this exact value asks for a one-click POST to the https URL.
            mime::write_structured_header(
                out,
                "List-Unsubscribe-Post",
                "List-Unsubscribe=One-Click",
            )
            .map_err(e)?;
        }
        for (name, template) in &self.headers {
            value.clear();
            template.render_into(row, Escape::None, value);
            mime::write_text_header(out, name, value).map_err(e)?;
        }
        let text = self.text.as_ref().map(|t| {
            scratch.text.clear();
            t.render_into(row, Escape::None, &mut scratch.text);
            scratch.text.as_str()
        });
        let html = self.html.as_ref().map(|t| {
            scratch.html.clear();
            t.render_into(row, Escape::Html, &mut scratch.html);
            scratch.html.as_str()
        });
        Content {
            text,
            html,
            attachments: &self.attachments,
        }
        .write(out);
        let content = match &self.signer {
            Some(signer) => {
                let timestamp = now
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let mut signed = signer.sign(out, timestamp);
                signed.extend_from_slice(out);
                signed
            }
            None => out.clone(),
        };
        Ok(Rendered {
            sender,
            recipient,
            content,
        })
    }
}
