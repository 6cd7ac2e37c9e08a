//! Merge templates: text with `{{field}}` placeholders, filled in once per recipient.
//!
//! A [`Template`] is parsed once, against the list of field names the caller will supply (the
//! columns of a recipients file), so that a misspelt field is an error at load time with its line
//! number, never a blank in a sent message. Rendering is a walk over literal and field segments
//! with the escaping the destination needs (HTML, a URL component, or none). This module knows
//! nothing of MIME or headers: it must not encode, fold or check what it produces; the caller
//! does that for the place the text goes.

use std::fmt;

/// How a field's value is escaped when it is put into the text (the literal parts of the
/// template are never changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escape {
    /// The value as it is.
    None,
    /// `&`, `<`, `>`, `"` and `'` become character references, so a value cannot add markup.
    Html,
    /// Every octet but the unreserved characters of RFC 3986 2.3 is percent-encoded, so a value
    /// is one URL component (a query value, a path segment).
    Url,
}

/// A field's values by position, as [`Template::parse`] resolved the names.
pub trait Fields {
    /// The value of field `index` (an index the resolver passed to `parse` returned).
    fn field(&self, index: usize) -> &str;
}

impl Fields for [&str] {
    fn field(&self, index: usize) -> &str {
        self[index]
    }
}

impl Fields for [String] {
    fn field(&self, index: usize) -> &str {
        &self[index]
    }
}

#[derive(Debug, Clone)]
enum Segment {
    Literal(Box<str>),
    Field(usize),
}

/// A parsed template.
#[derive(Debug, Clone)]
pub struct Template {
    segments: Vec<Segment>,
}

/// Why a template was refused, with the 1-based line of the text it was found on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    pub line: usize,
    pub problem: TemplateProblem,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateProblem {
    /// `{{name}}` where `name` is not a known field.
    UnknownField(String),
    /// `{{` without a matching `}}` on the same line.
    Unclosed,
    /// `{{}}` or `{{  }}`.
    EmptyName,
}

impl fmt::Display for TemplateProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateProblem::UnknownField(name) => write!(f, "unknown merge field \"{name}\""),
            TemplateProblem::Unclosed => f.write_str("\"{{\" without a closing \"}}\""),
            TemplateProblem::EmptyName => f.write_str("\"{{}}\" names no field"),
        }
    }
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.problem)
    }
}

impl std::error::Error for TemplateError {}

impl Template {
    /// Parses `text`; `resolve` maps a field name (trimmed of spaces) to the index its value
    /// will have, or `None` when there is no such field.
    pub fn parse(
        text: &str,
        resolve: impl Fn(&str) -> Option<usize>,
    ) -> Result<Template, TemplateError> {
        let mut segments = Vec::new();
        let mut rest = text;
        let mut line = 1;
        while let Some(open) = rest.find("{{") {
            let (literal, after) = rest.split_at(open);
            line += literal.matches('\n').count();
            if !literal.is_empty() {
                segments.push(Segment::Literal(literal.into()));
            }
            let after = &after[2..];
            // A placeholder never spans lines: an unclosed "{{" is reported where it starts,
            // not at some later "}}".
            let close = after
                .find("}}")
                .filter(|&c| !after[..c].contains('\n'))
                .ok_or(TemplateError {
                    line,
                    problem: TemplateProblem::Unclosed,
                })?;
            let name = after[..close].trim();
            if name.is_empty() {
                return Err(TemplateError {
                    line,
                    problem: TemplateProblem::EmptyName,
                });
            }
            let index = resolve(name).ok_or_else(|| TemplateError {
                line,
                problem: TemplateProblem::UnknownField(name.to_string()),
            })?;
            segments.push(Segment::Field(index));
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            segments.push(Segment::Literal(rest.into()));
        }
        Ok(Template { segments })
    }

    /// The indices of the fields the template uses.
    pub fn fields(&self) -> impl Iterator<Item = usize> + '_ {
        self.segments.iter().filter_map(|s| match s {
            Segment::Field(i) => Some(*i),
            Segment::Literal(_) => None,
        })
    }

    /// The literal text between the placeholders.
    pub fn literals(&self) -> impl Iterator<Item = &str> + '_ {
        self.segments.iter().filter_map(|s| match s {
            Segment::Literal(text) => Some(&**text),
            Segment::Field(_) => None,
        })
    }

    /// Appends the template, filled in with `values`, to `out`.
    pub fn render_into<F: Fields + ?Sized>(&self, values: &F, escape: Escape, out: &mut String) {
        for segment in &self.segments {
            match segment {
                Segment::Literal(text) => out.push_str(text),
                Segment::Field(i) => push_escaped(values.field(*i), escape, out),
            }
        }
    }

    /// The template filled in with `values`.
    pub fn render<F: Fields + ?Sized>(&self, values: &F, escape: Escape) -> String {
        let mut out = String::new();
        self.render_into(values, escape, &mut out);
        out
    }
}

fn push_escaped(value: &str, escape: Escape, out: &mut String) {
    match escape {
        Escape::None => out.push_str(value),
        Escape::Html => {
            for c in value.chars() {
                match c {
                    '&' => out.push_str("&amp;"),
                    '<' => out.push_str("&lt;"),
                    '>' => out.push_str("&gt;"),
                    '"' => out.push_str("&quot;"),
                    '\'' => out.push_str("&#39;"),
                    c => out.push(c),
                }
            }
        }
        Escape::Url => {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            for &b in value.as_bytes() {
                if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                    out.push(b as char);
                } else {
                    out.push('%');
                    out.push(HEX[usize::from(b >> 4)] as char);
                    out.push(HEX[usize::from(b & 15)] as char);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn columns(name: &str) -> Option<usize> {
        ["email", "first_name", "id"]
            .iter()
            .position(|c| *c == name)
    }

    #[test]
    fn fills_in_fields_with_escaping() {
        let t = Template::parse("Hi {{first_name}}, {{ id }}!", columns).unwrap();
        let row: &[&str] = &["a@b.example", "Zoë <&>", "7 8"];
        assert_eq!(t.render(row, Escape::None), "Hi Zoë <&>, 7 8!");
        assert_eq!(t.render(row, Escape::Html), "Hi Zoë &lt;&amp;&gt;, 7 8!");
        assert_eq!(
            t.render(row, Escape::Url),
            "Hi Zo%C3%AB%20%3C%26%3E, 7%208!"
        );
        assert_eq!(t.fields().collect::<Vec<_>>(), [1, 2]);
        assert_eq!(t.literals().collect::<Vec<_>>(), ["Hi ", ", ", "!"]);
        let plain = Template::parse("no fields { } }}", columns).unwrap();
        assert_eq!(plain.render(row, Escape::Html), "no fields { } }}");
    }

    #[test]
    fn errors_name_the_line_and_field() {
        let e = Template::parse("one\ntwo {{id}}\nthree {{frist_name}}", columns).unwrap_err();
        assert_eq!(e.to_string(), "line 3: unknown merge field \"frist_name\"");
        let e = Template::parse("a\n{{id\n}}", columns).unwrap_err();
        assert_eq!(e.to_string(), "line 2: \"{{\" without a closing \"}}\"");
        let e = Template::parse("{{ }}", columns).unwrap_err();
        assert_eq!(e.to_string(), "line 1: \"{{}}\" names no field");
    }
}
