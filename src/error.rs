//! Errors returned at the door: by message construction, submission and configuration.
//!
//! Every error names the field it is about, so that a caller can tell which input was refused.
//! Outcomes of delivery attempts are not errors: they are events (see `engine::Event`).

use std::fmt;

/// Which input field an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    /// The envelope sender (MAIL FROM).
    Sender,
    /// The recipient at this index of the recipient list (RCPT TO).
    Recipient(usize),
    /// The message body.
    Body,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::Sender => f.write_str("sender"),
            Field::Recipient(i) => write!(f, "recipient {i}"),
            Field::Body => f.write_str("body"),
        }
    }
}

/// What is wrong with an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressProblem {
    Empty,
    ControlCharacter,
    Whitespace,
    AngleBracket,
    MissingAt,
    EmptyLocalPart,
    EmptyDomain,
    LocalPartTooLong,
    PathTooLong,
    InvalidDomain,
    InvalidUtf8,
}

impl fmt::Display for AddressProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddressProblem::Empty => "is empty",
            AddressProblem::ControlCharacter => {
                "contains a control character (CR, LF, NUL or another)"
            }
            AddressProblem::Whitespace => "contains whitespace",
            AddressProblem::AngleBracket => "contains '<' or '>'",
            AddressProblem::MissingAt => "has no '@'",
            AddressProblem::EmptyLocalPart => "has an empty local part",
            AddressProblem::EmptyDomain => "has an empty domain",
            AddressProblem::LocalPartTooLong => {
                "has a local part over 64 octets (RFC 5321 4.5.3.1.1)"
            }
            AddressProblem::PathTooLong => {
                "is over 254 octets (RFC 5321 4.5.3.1.3 limits a path to 256 with its brackets)"
            }
            AddressProblem::InvalidDomain => "has an invalid domain",
            AddressProblem::InvalidUtf8 => "is not valid UTF-8",
        })
    }
}

/// An input refused at the door, or a dispatcher that cannot take work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// An address (sender or recipient) is not acceptable.
    InvalidAddress {
        field: Field,
        problem: AddressProblem,
    },
    /// A message must have at least one recipient.
    NoRecipients,
    /// A body line is longer than RFC 5322's 998 octets (line numbers start at 1).
    BodyLineTooLong { line: usize, length: usize },
    /// The ingress queue is full: back off and submit again (or use a timeout).
    QueueFull,
    /// The dispatcher has been shut down and takes no more work.
    ShutDown,
    /// A configuration value is out of range or inconsistent.
    InvalidConfig {
        key: &'static str,
        problem: &'static str,
    },
    /// An operating-system error (socket, thread) while starting.
    Io(std::io::ErrorKind),
    /// The spool cannot take (or could not keep) a submission; see [`SpoolProblem`].
    Spool(SpoolProblem),
    /// An ESMTP parameter (RFC 3461's RET, ENVID, NOTIFY, ORCPT) is malformed; `recipient`:
    /// the index of the recipient it came with.
    InvalidParameter {
        parameter: DsnParameter,
        recipient: Option<u32>,
        problem: &'static str,
    },
}

/// The ESMTP parameters of RFC 3461 (an enum, so that [`Error`] stays small).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DsnParameter {
    Ret,
    Envid,
    Notify,
    Orcpt,
}

impl fmt::Display for DsnParameter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DsnParameter::Ret => "RET",
            DsnParameter::Envid => "ENVID",
            DsnParameter::Notify => "NOTIFY",
            DsnParameter::Orcpt => "ORCPT",
        })
    }
}

/// Why the spool refused a submission. Once writing or syncing failed, the spool takes nothing
/// more until the process restarts and recovers it: an fsync that failed is never retried and
/// trusted (the kernel may have dropped the dirty pages it reported on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpoolProblem {
    /// The spool holds its `max_bytes` already.
    Full,
    /// The file system has less free space than the spool's `min_free_bytes`.
    LowSpace,
    /// Writing a batch failed (ENOSPC, EIO...: the OS error number); what was written of it
    /// was removed.
    WriteFailed(i32),
    /// fsync failed (the OS error number): nothing written since the last good fsync is
    /// acknowledged.
    SyncFailed(i32),
    /// Another process holds the spool directory.
    Locked,
}

impl fmt::Display for SpoolProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpoolProblem::Full => f.write_str("full: its size limit (max_bytes) is reached"),
            SpoolProblem::LowSpace => {
                f.write_str("the file system has less free space than min_free_bytes")
            }
            SpoolProblem::WriteFailed(errno) => write!(
                f,
                "write failed ({}); the spool takes nothing more until restarted",
                std::io::Error::from_raw_os_error(*errno)
            ),
            SpoolProblem::SyncFailed(errno) => write!(
                f,
                "fsync failed ({}); the spool acknowledges nothing more until restarted",
                std::io::Error::from_raw_os_error(*errno)
            ),
            SpoolProblem::Locked => f.write_str("directory is held by another process"),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidAddress { field, problem } => write!(f, "{field}: address {problem}"),
            Error::NoRecipients => f.write_str("recipients: the message has no recipients"),
            Error::BodyLineTooLong { line, length } => write!(
                f,
                "body: line {line} is {length} octets long; RFC 5322 allows at most 998"
            ),
            Error::QueueFull => {
                f.write_str("queue full: the dispatcher's ingress queue is at capacity")
            }
            Error::ShutDown => f.write_str("the dispatcher has been shut down"),
            Error::InvalidConfig { key, problem } => write!(f, "config {key}: {problem}"),
            Error::Io(kind) => write!(f, "I/O error: {kind}"),
            Error::Spool(problem) => write!(f, "spool: {problem}"),
            Error::InvalidParameter {
                parameter,
                recipient: None,
                problem,
            } => write!(f, "ESMTP parameter {parameter}: {problem}"),
            Error::InvalidParameter {
                parameter,
                recipient: Some(i),
                problem,
            } => write!(f, "ESMTP parameter {parameter} (recipient {i}): {problem}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e.kind())
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
