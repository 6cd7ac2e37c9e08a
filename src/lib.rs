//! mxpipe: a high-throughput bulk mail dispatcher.
//!
//! (crate documentation is completed with the engine)

pub mod error;

pub use error::{Error, Result};
