//! mxpipe: a high-throughput bulk mail dispatcher.
//!
//! (crate documentation is completed with the engine)

pub mod error;
pub mod message;
pub mod smtp;

pub use error::{Error, Result};
