//! mxpipe: a high-throughput bulk mail dispatcher.
//!
//! (crate documentation is completed with the engine)

pub mod engine;
pub mod error;
pub mod message;
pub mod queue;
pub mod route;
pub mod sink;
pub mod smtp;

pub use error::{Error, Result};
