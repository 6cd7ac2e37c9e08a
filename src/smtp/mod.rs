//! The SMTP client protocol, sans-IO: replies, capabilities, commands, content, and the
//! session state machine. Nothing in here opens a socket, reads a clock or starts a thread;
//! the engine moves bytes and passes in the time.

pub mod auth;
pub mod caps;
pub mod command;
pub mod data;
mod output;
pub mod reply;
pub mod session;
mod window;

pub use auth::Credentials;
pub use caps::Capabilities;
pub use reply::{EnhancedCode, Reply, ReplyError, ReplyLimits, ReplyParser};
pub use session::{
    Closure, RcptResult, Session, SessionConfig, SessionEvent, StartTls, Timeouts, Transaction,
};
