//! The work stream's entry format, read by nodes and written by producers.
//!
//! An entry of `{NS}:work` has these fields (any language can add one with `XADD`):
//!
//! - `from`: the envelope sender (`""`: the null sender).
//! - `to`: a JSON array of recipients, each an address string or an object
//!   `{"to": "ann@example.net", "fields": {"first_name": "Ann"}}` whose fields fill the
//!   `{{first_name}}` merge fields of the body for that recipient alone.
//! - `body`: the message (RFC 5322 headers and body), or `body_ref`: the name of a body stored
//!   once with `SET {NS}:body:NAME <message>` and shared by every entry that names it.
//! - `tag` (optional): a number of the producer's, echoed in every outcome.
//!
//! Parsing checks everything and names the field at fault; a bad entry is never half sent.
//! This module builds messages and entries; it neither reads Redis itself nor delivers.

use crate::message::template::{Escape, Template};
use crate::message::{Body, Message};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;

/// One recipient of an entry, with its merge fields.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum Recipient {
    Plain(String),
    Merged {
        to: String,
        #[serde(default)]
        fields: HashMap<String, String>,
    },
}

impl Recipient {
    pub fn address(&self) -> &str {
        match self {
            Recipient::Plain(a) | Recipient::Merged { to: a, .. } => a,
        }
    }

    fn fields(&self) -> Option<&HashMap<String, String>> {
        match self {
            Recipient::Merged { fields, .. } if !fields.is_empty() => Some(fields),
            _ => None,
        }
    }
}

/// Where an entry's content is.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Inline(Vec<u8>),
    /// The name of a body stored once (`{NS}:body:NAME`).
    Reference(String),
}

/// A parsed entry of the work stream.
#[derive(Debug, Clone)]
pub struct Entry {
    pub from: String,
    pub to: Vec<Recipient>,
    pub content: Content,
    pub tag: u64,
}

/// A bad entry: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryError {
    pub field: &'static str,
    pub problem: String,
}

impl std::fmt::Display for EntryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "entry field {}: {}", self.field, self.problem)
    }
}

impl std::error::Error for EntryError {}

fn bad(field: &'static str, problem: impl Into<String>) -> EntryError {
    EntryError {
        field,
        problem: problem.into(),
    }
}

impl Entry {
    /// Reads an entry from its fields (as `StreamReadReply` maps them).
    pub fn from_fields(fields: &HashMap<String, redis::Value>) -> Result<Entry, EntryError> {
        let mut known = Fields::default();
        for name in Fields::NAMES {
            if let Some(value) = fields.get(name) {
                known.set(name.as_bytes(), value.clone());
            }
        }
        Entry::from_known(known)
    }

    /// Reads an entry from its flat field list `[name, value, name, value, ...]`, as
    /// `XREADGROUP` sends it, taking the values without copying them (a field given twice:
    /// the last one counts; fields of no meaning to a node are ignored).
    pub fn from_field_list(list: Vec<redis::Value>) -> Result<Entry, EntryError> {
        let mut known = Fields::default();
        let mut items = list.into_iter();
        while let (Some(name), Some(value)) = (items.next(), items.next()) {
            match &name {
                redis::Value::BulkString(n) => known.set(n, value),
                redis::Value::SimpleString(n) => known.set(n.as_bytes(), value),
                _ => {}
            }
        }
        Entry::from_known(known)
    }

    fn from_known(fields: Fields) -> Result<Entry, EntryError> {
        let bytes = |name: &'static str, value: Option<redis::Value>| match value {
            None => Ok(None),
            Some(redis::Value::BulkString(b)) => Ok(Some(b)),
            Some(redis::Value::SimpleString(s)) => Ok(Some(s.into_bytes())),
            Some(_) => Err(bad(name, "is not a string")),
        };
        let text = |name: &'static str, value: Option<redis::Value>| {
            bytes(name, value)?
                .map(|b| String::from_utf8(b).map_err(|_| bad(name, "is not UTF-8")))
                .transpose()
        };
        let from = text("from", fields.from)?.ok_or_else(|| bad("from", "missing"))?;
        let to_json = text("to", fields.to)?.ok_or_else(|| bad("to", "missing"))?;
        // Most entries list plain addresses: read those as strings first (the untagged enum
        // buffers every item before it tries its variants).
        let plain = serde_json::from_str::<Vec<String>>(&to_json)
            .ok()
            .map(|to| to.into_iter().map(Recipient::Plain).collect());
        let to: Vec<Recipient> = match plain {
            Some(to) => to,
            None => serde_json::from_str(&to_json).map_err(|e| {
                bad(
                    "to",
                    format!("not a JSON array of addresses or {{\"to\", \"fields\"}} objects: {e}"),
                )
            })?,
        };
        if to.is_empty() {
            return Err(bad("to", "no recipients"));
        }
        let content = match (
            bytes("body", fields.body)?,
            text("body_ref", fields.body_ref)?,
        ) {
            (Some(body), None) => Content::Inline(body),
            (None, Some(name)) if !name.is_empty() => Content::Reference(name),
            (None, Some(_)) => return Err(bad("body_ref", "empty")),
            (Some(_), Some(_)) => return Err(bad("body", "give body or body_ref, not both")),
            (None, None) => return Err(bad("body", "missing (give body or body_ref)")),
        };
        let tag = match text("tag", fields.tag)? {
            None => 0,
            Some(t) => t
                .parse()
                .map_err(|_| bad("tag", "not a number from 0 to 2^64-1"))?,
        };
        Ok(Entry {
            from,
            to,
            content,
            tag,
        })
    }

    /// The fields to `XADD` for this entry.
    pub fn to_fields(&self) -> Vec<(&'static str, Vec<u8>)> {
        let mut out = vec![
            ("from", self.from.clone().into_bytes()),
            (
                "to",
                serde_json::to_vec(&self.to).expect("recipients serialise"),
            ),
        ];
        match &self.content {
            Content::Inline(body) => out.push(("body", body.clone())),
            Content::Reference(name) => out.push(("body_ref", name.clone().into_bytes())),
        }
        if self.tag != 0 {
            out.push(("tag", self.tag.to_string().into_bytes()));
        }
        out
    }
}

/// The fields of an entry a node reads, as Redis gave them.
#[derive(Default)]
struct Fields {
    from: Option<redis::Value>,
    to: Option<redis::Value>,
    body: Option<redis::Value>,
    body_ref: Option<redis::Value>,
    tag: Option<redis::Value>,
}

impl Fields {
    const NAMES: [&'static str; 5] = ["from", "to", "body", "body_ref", "tag"];

    fn set(&mut self, name: &[u8], value: redis::Value) {
        let slot = match name {
            b"from" => &mut self.from,
            b"to" => &mut self.to,
            b"body" => &mut self.body,
            b"body_ref" => &mut self.body_ref,
            b"tag" => &mut self.tag,
            _ => return,
        };
        *slot = Some(value);
    }
}

/// Builds the messages for `recipients` (a subset of an entry's, in its order): those without
/// merge fields share one message and `body`; each with fields gets a body of its own with them
/// filled in. Any error names the recipient's field.
pub fn messages(
    from: &str,
    recipients: &[&Recipient],
    body: &Arc<Body>,
) -> Result<Vec<(Message, Vec<usize>)>, EntryError> {
    let mut out = Vec::new();
    let plain: Vec<usize> = (0..recipients.len())
        .filter(|&i| recipients[i].fields().is_none())
        .collect();
    if !plain.is_empty() {
        let message = Message::with_body(
            from,
            plain.iter().map(|&i| recipients[i].address()),
            Arc::clone(body),
        )
        .map_err(|e| bad("to", e.to_string()))?;
        out.push((message, plain));
    }
    let mut text: Option<&str> = None;
    for (i, recipient) in recipients.iter().enumerate() {
        let Some(fields) = recipient.fields() else {
            continue;
        };
        let source = match text {
            Some(t) => t,
            None => {
                let t = std::str::from_utf8(body.as_bytes())
                    .map_err(|_| bad("body", "has merge fields but is not UTF-8"))?;
                text = Some(t);
                t
            }
        };
        let names: Vec<&String> = fields.keys().collect();
        let template = Template::parse(source, |name| names.iter().position(|n| *n == name))
            .map_err(|e| bad("to", format!("recipient {}: body {e}", recipient.address())))?;
        let values: Vec<&str> = names.iter().map(|n| fields[*n].as_str()).collect();
        let rendered = template.render(&values[..], Escape::None);
        let message = Message::new(from, [recipient.address()], rendered.as_bytes())
            .map_err(|e| bad("to", format!("recipient {}: {e}", recipient.address())))?;
        out.push((message, vec![i]));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> HashMap<String, redis::Value> {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    redis::Value::BulkString(v.as_bytes().to_vec()),
                )
            })
            .collect()
    }

    #[test]
    fn entries_round_trip_and_bad_ones_name_the_field() {
        let entry = Entry::from_fields(&fields(&[
            ("from", "news@example.org"),
            (
                "to",
                r#"["a@example.net", {"to": "b@example.net", "fields": {"name": "Bo"}}]"#,
            ),
            ("body_ref", "march"),
            ("tag", "7"),
        ]))
        .unwrap();
        assert_eq!(entry.to.len(), 2);
        assert_eq!(entry.content, Content::Reference("march".into()));
        assert_eq!(entry.tag, 7);
        let back: HashMap<String, redis::Value> = entry
            .to_fields()
            .into_iter()
            .map(|(k, v)| (k.to_string(), redis::Value::BulkString(v)))
            .collect();
        assert_eq!(Entry::from_fields(&back).unwrap().to, entry.to);
        let list: Vec<redis::Value> = entry
            .to_fields()
            .into_iter()
            .flat_map(|(k, v)| {
                [
                    redis::Value::BulkString(k.as_bytes().to_vec()),
                    redis::Value::BulkString(v),
                ]
            })
            .chain([
                redis::Value::BulkString(b"other".to_vec()),
                redis::Value::Int(3),
            ])
            .collect();
        let listed = Entry::from_field_list(list).unwrap();
        assert_eq!(listed.to, entry.to);
        assert_eq!(listed.content, entry.content);
        assert_eq!(listed.tag, 7);

        let e = Entry::from_fields(&fields(&[
            ("from", "a@b.example"),
            ("to", "[]"),
            ("body", "x"),
        ]))
        .unwrap_err();
        assert_eq!(e.to_string(), "entry field to: no recipients");
        let e = Entry::from_fields(&fields(&[
            ("from", "a@b.example"),
            ("to", r#"["c@d.example"]"#),
        ]))
        .unwrap_err();
        assert_eq!(e.field, "body");
        let e = Entry::from_fields(&fields(&[
            ("from", "a@b.example"),
            ("to", r#"["c@d.example"]"#),
            ("body", "x"),
            ("tag", "-1"),
        ]))
        .unwrap_err();
        assert_eq!(e.field, "tag");
    }

    #[test]
    fn merge_fields_render_per_recipient_and_plain_recipients_share_a_body() {
        let body = Arc::new(Body::new(b"Subject: Hi {{name}}\r\n\r\nHello {{name}}.\r\n").unwrap());
        let a = Recipient::Plain("a@example.net".into());
        let b = Recipient::Merged {
            to: "b@example.net".into(),
            fields: [("name".to_string(), "Bo".to_string())].into(),
        };
        let c = Recipient::Plain("c@example.net".into());
        let out = messages("news@example.org", &[&a, &b, &c], &body).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].1, vec![0, 2]);
        assert!(Arc::ptr_eq(out[0].0.body(), &body));
        assert_eq!(out[1].1, vec![1]);
        assert_eq!(
            out[1].0.body().as_bytes(),
            b"Subject: Hi Bo\r\n\r\nHello Bo.\r\n"
        );
        let missing = Recipient::Merged {
            to: "d@example.net".into(),
            fields: [("first".to_string(), "D".to_string())].into(),
        };
        let e = messages("news@example.org", &[&missing], &body).unwrap_err();
        assert_eq!(
            e.to_string(),
            "entry field to: recipient d@example.net: body line 1: unknown merge field \"name\""
        );
        let bad_address = Recipient::Plain("not an address".into());
        assert_eq!(
            messages("news@example.org", &[&bad_address], &body)
                .unwrap_err()
                .field,
            "to"
        );
    }
}
