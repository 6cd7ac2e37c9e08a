//! The recipient list: a CSV file whose header row names the merge fields (one of them
//! `email`), checked, de-duplicated and filtered by the suppression list when loaded.
//!
//! Rows are kept compactly (all values in one string, with offsets) because a list may have a
//! million rows and is held for the whole send; nothing rendered is kept here. A row that cannot
//! be sent (invalid address, missing column, suppressed, a duplicate) is set aside with its line
//! number and the reason, never sent and never silently dropped. This module must not render
//! or send.

use super::CampaignError;
use crate::error::{Error, Field};
use crate::message::template::Fields;
use crate::message::Address;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// The column that holds the recipient's address.
pub const EMAIL_COLUMN: &str = "email";

/// Why a row is not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipKind {
    /// The row is malformed (missing column, invalid address, a value unfit for a header).
    Invalid,
    /// The address or its domain is on the suppression list.
    Suppressed,
    /// The address appeared on an earlier line (compared without regard to case).
    Duplicate,
}

impl SkipKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipKind::Invalid => "invalid",
            SkipKind::Suppressed => "suppressed",
            SkipKind::Duplicate => "duplicate",
        }
    }
}

/// A row set aside at load time.
#[derive(Debug, Clone)]
pub struct Skipped {
    /// The line of the recipients file the row starts on.
    pub line: u64,
    /// The `email` value as written (possibly empty or invalid).
    pub recipient: String,
    pub kind: SkipKind,
    pub reason: String,
}

struct Entry {
    start: usize,
    line: u64,
}

/// The rows to send.
pub(crate) struct Recipients {
    columns: Vec<String>,
    email: usize,
    data: String,
    ends: Vec<u32>,
    rows: Vec<Entry>,
    /// The lower-cased address of each row, to find the row an outcome is about.
    index: HashMap<Box<str>, u32>,
}

/// One row's values, by column.
pub(crate) struct Row<'a> {
    values: &'a str,
    ends: &'a [u32],
    pub line: u64,
}

impl<'a> Row<'a> {
    /// The value of column `index`.
    pub fn value(&self, index: usize) -> &'a str {
        let start = if index == 0 { 0 } else { self.ends[index - 1] } as usize;
        &self.values[start..self.ends[index] as usize]
    }
}

impl Fields for Row<'_> {
    fn field(&self, index: usize) -> &str {
        self.value(index)
    }
}

impl Recipients {
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn row(&self, index: usize) -> Row<'_> {
        let n = self.columns.len();
        let entry = &self.rows[index];
        let ends = &self.ends[index * n..(index + 1) * n];
        Row {
            values: &self.data[entry.start..entry.start + ends[n - 1] as usize],
            ends,
            line: entry.line,
        }
    }

    /// The recipient address of row `index`.
    pub fn address(&self, index: usize) -> &str {
        self.row(index).value(self.email)
    }

    /// The row whose address is `address` (without regard to case).
    pub fn find(&self, address: &str) -> Option<usize> {
        self.index
            .get(address.to_lowercase().as_str())
            .map(|&i| i as usize)
    }
}

/// Addresses and domains never to send to.
#[derive(Debug, Default)]
pub(crate) struct Suppression {
    entries: HashSet<String>,
}

impl Suppression {
    /// Reads one address or domain a line (`#` starts a comment; `@domain` is a domain), under
    /// a shared lock: `mxpipe inbound` appends to the same file.
    pub fn load(path: &Path) -> Result<Suppression, CampaignError> {
        let text = crate::inbound::suppress::read_locked(path)
            .map_err(|e| CampaignError::input(path, None, format!("cannot read: {e}")))?;
        let mut entries = HashSet::new();
        for (n, line) in text.lines().enumerate() {
            let entry = line.split('#').next().unwrap_or("").trim();
            if entry.is_empty() {
                continue;
            }
            let entry = entry.strip_prefix('@').unwrap_or(entry);
            let valid = if entry.contains('@') {
                Address::parse(entry, Field::Recipient(n)).map(|_| ())
            } else {
                Address::parse(&format!("x@{entry}"), Field::Recipient(n)).map(|_| ())
            };
            if let Err(Error::InvalidAddress { problem, .. }) = valid {
                return Err(CampaignError::input(
                    path,
                    Some(n as u64 + 1),
                    format!("{entry:?} is neither an address nor a domain: it {problem}"),
                ));
            }
            entries.insert(entry.to_lowercase());
        }
        Ok(Suppression { entries })
    }

    fn contains(&self, address: &Address) -> bool {
        !self.entries.is_empty()
            && (self.entries.contains(&address.as_str().to_lowercase())
                || self.entries.contains(&address.domain().to_lowercase()))
    }
}

/// A recipients file whose header row has been read.
pub(crate) struct CsvSource {
    path: PathBuf,
    reader: csv::Reader<std::fs::File>,
    /// The same file read alongside, for physical line numbers (the csv crate counts a CRLF
    /// line end as no line at all in some states, rust-csv #395) and for quotes left open.
    lines: LineScanner,
    columns: Vec<String>,
    email: usize,
}

/// Reads a file forward, counting line ends and quotes between byte offsets.
struct LineScanner {
    reader: std::io::BufReader<std::fs::File>,
    offset: u64,
    /// Line ends before `offset`.
    line_ends: u64,
}

/// What lies between two offsets of a file.
struct Span {
    line_ends: u64,
    quotes: u64,
    ends_with_line_end: bool,
}

impl LineScanner {
    /// The 1-based line of byte `to`, which must not be before the last one asked for.
    fn line_at(&mut self, to: u64) -> std::io::Result<u64> {
        self.advance(to)?;
        Ok(self.line_ends + 1)
    }

    /// The 1-based line where the record at byte `to` starts: the csv crate may place a record
    /// on the LF of the CRLF before it, and a record never starts with a line end.
    fn record_line(&mut self, to: u64) -> std::io::Result<u64> {
        use std::io::BufRead;
        self.advance(to)?;
        loop {
            let buffer = self.reader.fill_buf()?;
            match buffer.first() {
                Some(b'\r') | Some(b'\n') => {
                    self.line_ends += u64::from(buffer[0] == b'\n');
                    self.reader.consume(1);
                    self.offset += 1;
                }
                _ => return Ok(self.line_ends + 1),
            }
        }
    }

    /// Moves forward to byte `to` and says what was passed.
    fn advance(&mut self, to: u64) -> std::io::Result<Span> {
        use std::io::BufRead;
        let mut span = Span {
            line_ends: 0,
            quotes: 0,
            ends_with_line_end: false,
        };
        while self.offset < to {
            let buffer = self.reader.fill_buf()?;
            if buffer.is_empty() {
                break;
            }
            let take = buffer.len().min((to - self.offset) as usize);
            for &b in &buffer[..take] {
                span.line_ends += u64::from(b == b'\n');
                span.quotes += u64::from(b == b'"');
            }
            span.ends_with_line_end = buffer[take - 1] == b'\n';
            self.reader.consume(take);
            self.offset += take as u64;
        }
        self.line_ends += span.line_ends;
        Ok(span)
    }
}

impl CsvSource {
    /// Opens the file and reads its header row.
    pub fn open(path: &Path) -> Result<CsvSource, CampaignError> {
        let file = std::fs::File::open(path)
            .map_err(|e| CampaignError::input(path, None, format!("cannot read: {e}")))?;
        let lines = LineScanner {
            reader: std::io::BufReader::new(
                file.try_clone()
                    .map_err(|e| CampaignError::input(path, None, format!("cannot read: {e}")))?,
            ),
            offset: 0,
            line_ends: 0,
        };
        // Both handles share one file position: the scanner reads through its own.
        let file = std::fs::File::open(path)
            .map_err(|e| CampaignError::input(path, None, format!("cannot read: {e}")))?;
        let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(file);
        let header = reader
            .byte_headers()
            .map_err(|e| CampaignError::input(path, Some(1), e.to_string()))?
            .clone();
        let mut columns = Vec::with_capacity(header.len());
        for (i, name) in header.iter().enumerate() {
            // A spreadsheet may start the file with a byte-order mark.
            let name = if i == 0 {
                name.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(name)
            } else {
                name
            };
            let name = std::str::from_utf8(name)
                .map_err(|_| {
                    CampaignError::input(
                        path,
                        Some(1),
                        format!("column {} of the header is not UTF-8", i + 1),
                    )
                })?
                .trim()
                .to_string();
            if columns.contains(&name) {
                return Err(CampaignError::input(
                    path,
                    Some(1),
                    format!("column \"{name}\" appears twice in the header"),
                ));
            }
            columns.push(name);
        }
        let email = columns
            .iter()
            .position(|c| c == EMAIL_COLUMN)
            .ok_or_else(|| {
                CampaignError::input(
                    path,
                    Some(1),
                    format!(
                        "the header has no \"{EMAIL_COLUMN}\" column (it has: {})",
                        columns.join(", ")
                    ),
                )
            })?;
        Ok(CsvSource {
            path: path.to_path_buf(),
            reader,
            lines,
            columns,
            email,
        })
    }

    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// Reads every row. `check` sees each row with a valid address and returns why it cannot
    /// be sent (a value unfit for where a template puts it), if it cannot.
    pub fn read(
        mut self,
        suppression: &Suppression,
        check: impl Fn(&Row<'_>, &Address) -> Result<(), String>,
    ) -> Result<(Recipients, Vec<Skipped>), CampaignError> {
        let n = self.columns.len();
        let mut recipients = Recipients {
            columns: std::mem::take(&mut self.columns),
            email: self.email,
            data: String::new(),
            ends: Vec::new(),
            rows: Vec::new(),
            index: HashMap::new(),
        };
        let mut skipped = Vec::new();
        let mut record = csv::ByteRecord::new();
        loop {
            let read_error = |e: std::io::Error| {
                CampaignError::input(&self.path, None, format!("cannot read: {e}"))
            };
            match self.reader.read_byte_record(&mut record) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    let line = match e.position() {
                        Some(p) => Some(self.lines.line_at(p.byte()).map_err(read_error)?),
                        None => None,
                    };
                    return Err(CampaignError::input(&self.path, line, e.to_string()));
                }
            }
            let start = record.position().map_or(0, |p| p.byte());
            let line = self.lines.record_line(start).map_err(read_error)?;
            // A well-formed record has its quotes in pairs; an odd count over several lines is
            // a quote left open, which would make the rest of the file one field.
            let span = self
                .lines
                .advance(self.reader.position().byte())
                .map_err(read_error)?;
            let inner_line_ends = span.line_ends - u64::from(span.ends_with_line_end);
            if span.quotes % 2 == 1 && inner_line_ends > 0 {
                return Err(CampaignError::input(
                    &self.path,
                    Some(line),
                    format!(
                        "a quote opened in this row is never closed: the {inner_line_ends} lines \
                         after it would be one field"
                    ),
                ));
            }
            let mut skip = |kind, recipient: &str, reason: String| {
                skipped.push(Skipped {
                    line,
                    recipient: recipient.to_string(),
                    kind,
                    reason,
                })
            };
            let raw_email = record
                .get(self.email)
                .map(|e| String::from_utf8_lossy(e).trim().to_string())
                .unwrap_or_default();
            if record.len() != n {
                let missing = recipients.columns[record.len().min(n)..].join("\", \"");
                let reason = if record.len() < n {
                    format!(
                        "the row has {} fields, the header {n} (missing \"{missing}\")",
                        record.len()
                    )
                } else {
                    format!("the row has {} fields, the header {n}", record.len())
                };
                skip(SkipKind::Invalid, &raw_email, reason);
                continue;
            }
            let mut values = Vec::with_capacity(n);
            let mut utf8 = true;
            for (i, value) in record.iter().enumerate() {
                match std::str::from_utf8(value) {
                    Ok(v) if i == self.email => values.push(v.trim()),
                    Ok(v) => values.push(v),
                    Err(_) => {
                        skip(
                            SkipKind::Invalid,
                            &raw_email,
                            format!("{}: not valid UTF-8", recipients.columns[i]),
                        );
                        utf8 = false;
                        break;
                    }
                }
            }
            if !utf8 {
                continue;
            }
            let address = match Address::parse(values[self.email], Field::Recipient(0)) {
                Ok(a) => a,
                Err(Error::InvalidAddress { problem, .. }) => {
                    skip(
                        SkipKind::Invalid,
                        &raw_email,
                        format!("{EMAIL_COLUMN}: address {problem}"),
                    );
                    continue;
                }
                Err(e) => {
                    skip(SkipKind::Invalid, &raw_email, e.to_string());
                    continue;
                }
            };
            if suppression.contains(&address) {
                skip(
                    SkipKind::Suppressed,
                    &raw_email,
                    "on the suppression list".into(),
                );
                continue;
            }
            let key: Box<str> = address.as_str().to_lowercase().into();
            if let Some(&first) = recipients.index.get(&key) {
                let first = recipients.rows[first as usize].line;
                skip(
                    SkipKind::Duplicate,
                    &raw_email,
                    format!("duplicate of line {first}"),
                );
                continue;
            }
            let start = recipients.data.len();
            let mut ends = Vec::with_capacity(n);
            for value in &values {
                recipients.data.push_str(value);
                ends.push((recipients.data.len() - start) as u32);
            }
            let row = Row {
                values: &recipients.data[start..],
                ends: &ends,
                line,
            };
            if let Err(reason) = check(&row, &address) {
                recipients.data.truncate(start);
                skip(SkipKind::Invalid, &raw_email, reason);
                continue;
            }
            let index = recipients.rows.len() as u32;
            recipients.ends.extend_from_slice(&ends);
            recipients.rows.push(Entry { start, line });
            recipients.index.insert(key, index);
        }
        Ok((recipients, skipped))
    }
}
