//! mxpipe: a high-throughput bulk mail dispatcher.
//!
//! A caller hands mxpipe messages and recipients; it delivers them over SMTP as fast as the
//! receiving side allows and reports what happened to every recipient.
//!
//! # Architecture
//!
//! - [`message`]: what a caller submits. Addresses and bodies are checked at the door; a body is
//!   normalised to CRLF once and shared (`Arc`) by every recipient.
//! - [`smtp`]: the SMTP client, sans-IO. [`smtp::ReplyParser`] parses replies incrementally and
//!   within bounds; [`smtp::Session`] is the state machine of one connection (greeting,
//!   EHLO/HELO, pipelined MAIL/RCPT/DATA or BDAT, RSET, QUIT) with a send cursor and a receive
//!   cursor over its commands (RFC 2920). It never touches a socket or a clock.
//! - [`queue`]: the lock-free ingress (a bounded `crossbeam` channel plus a `mio::Waker`), jobs
//!   (one message's recipients for one destination) and the retry schedule.
//! - [`route`]: where mail goes: a smarthost, or static per-domain routes.
//! - [`engine`]: the [`engine::Dispatcher`] handle and the `mio` event loop that owns every
//!   connection, pools them per destination, hands jobs to sessions and turns results into
//!   [`engine::Event`]s: Delivered, Deferred (with the retry time), Bounced, Expired.
//! - [`spool`]: custody on disk: group-committed submissions, per-recipient checkpoints,
//!   recovery after a crash, queue tools. The engine reports to it through
//!   [`engine::custody`], the boundary every source of work uses.
//! - [`sink`]: a fast, scriptable SMTP sink for benchmarks, demos and fault tests.
//!
//! # Example
//!
//! ```
//! use mxpipe::engine::{Dispatcher, EventKind};
//! use mxpipe::message::Message;
//! use mxpipe::sink::{Sink, SinkConfig};
//! use std::time::Duration;
//!
//! // A local sink stands in for a smarthost.
//! let sink = Sink::start(SinkConfig::default())?;
//! let dispatcher = Dispatcher::builder()
//!     .relay(&sink.local_addr().to_string())
//!     .ehlo_name("sender.example.org")
//!     .start()?;
//! let message = Message::new(
//!     "news@example.org",
//!     ["ann@example.net", "bob@example.com"],
//!     b"Subject: Hello\r\n\r\nHello, world.\r\n",
//! )?;
//! let id = dispatcher.submit(message)?;
//! assert!(dispatcher.wait_final(Duration::from_secs(30)));
//! for event in dispatcher.events().unwrap().try_iter() {
//!     assert_eq!(event.message_id, id);
//!     assert_eq!(event.kind, EventKind::Delivered);
//!     println!("{} {} {}", event.recipient, event.kind.as_str(), event.reply);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod campaign;
pub mod cluster;
pub mod engine;
pub mod error;
pub mod ffi;
pub mod http;
pub mod inbound;
pub mod message;
pub mod queue;
pub mod route;
pub mod serve;
pub(crate) mod server;
pub mod sink;
pub mod smtp;
pub mod spool;

pub use error::{Error, Result};
