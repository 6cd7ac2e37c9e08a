//! The C ABI: opaque handles, result codes, a panic boundary, and pointer and UTF-8 checks at
//! every entry point. `include/mxpipe.h` is generated from this module by cbindgen.
//!
//! Conventions (see the header for each function):
//! - Names are `mxp_<object>_<verb>`. Every `_new` has a `_free`, and `_free(NULL)` is a no-op.
//! - Fallible functions return [`result::mxp_result`]; outputs go through out-pointers, last in
//!   the argument list, and are written only on success. `mxp_last_error` gives the detailed
//!   message of the latest failure on the calling thread.
//! - Handles are generation-checked indexes into tables ([`handle`]), never pointers into Rust
//!   memory: a freed, doubly freed or made-up handle gives `MXP_ERR_BAD_HANDLE`.
//! - Text is NUL-terminated UTF-8 and checked; a message body is `(const uint8_t *, size_t)` so
//!   NUL bytes pass. Every pointer is checked for NULL; what cannot be checked from here (a
//!   pointer to too little memory, a count larger than its array) is the caller's contract,
//!   written under "Safety" on each function.
//! - Every body runs inside [`panic::boundary`]; a panic becomes `MXP_ERR_PANIC`.
//!
//! Nothing here decides anything about mail: it translates between C and the Rust API.

// The C names (`mxp_dispatcher`, `mxp_result`) are the ABI.
#![allow(non_camel_case_types)]

mod config;
mod dispatcher;
mod event;
mod handle;
mod panic;
mod result;

pub use config::builder_from_toml;
pub use config::{
    mxp_config, mxp_config_free, mxp_config_from_toml, mxp_config_new, mxp_config_set,
};
pub use dispatcher::{
    mxp_body, mxp_body_free, mxp_body_new, mxp_dispatcher, mxp_dispatcher_durable_id,
    mxp_dispatcher_enqueue, mxp_dispatcher_enqueue_body, mxp_dispatcher_enqueue_body_timeout,
    mxp_dispatcher_enqueue_timeout, mxp_dispatcher_flush, mxp_dispatcher_free, mxp_dispatcher_new,
    mxp_dispatcher_shutdown, mxp_dispatcher_shutdown_timeout, mxp_dispatcher_stats,
    mxp_dispatcher_sync, mxp_dispatcher_wait_final, mxp_stats, MXP_MAX_RECIPIENTS,
};
pub use event::{
    mxp_category, mxp_category_str, mxp_dispatcher_poll_events, mxp_dispatcher_set_callback,
    mxp_dispatcher_wait_events, mxp_event, mxp_event_callback, mxp_event_kind, mxp_event_kind_str,
    MXP_DESTINATION_SIZE, MXP_RECIPIENT_SIZE, MXP_REPLY_TEXT_SIZE,
};
pub use result::{
    mxp_last_error, mxp_last_error_len, mxp_result, mxp_result_str, MXP_LAST_ERROR_SIZE,
};

use crate::error::{AddressProblem, Error, Field};
use crate::message::Address;
use result::FfiError;
use std::ffi::{c_char, CStr};

/// The library's version ("0.1.0"): a static NUL-terminated string that must not be freed. Any
/// thread may call this.
#[no_mangle]
pub extern "C" fn mxp_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Checks an out-pointer.
fn out_ptr<T>(ptr: *mut T, what: &str) -> Result<*mut T, FfiError> {
    if ptr.is_null() {
        Err(FfiError::null(what))
    } else {
        Ok(ptr)
    }
}

/// Reads a NUL-terminated UTF-8 string that `what` names in errors.
///
/// # Safety
///
/// `ptr` must be NULL or point to a NUL-terminated string that outlives `'a`.
unsafe fn c_str<'a>(ptr: *const c_char, what: &str) -> Result<&'a str, FfiError> {
    if ptr.is_null() {
        return Err(FfiError::null(what));
    }
    // SAFETY: non-NULL and NUL-terminated, by the caller's contract.
    unsafe { CStr::from_ptr(ptr) }.to_str().map_err(|_| {
        FfiError::new(
            result::mxp_result::MXP_ERR_INVALID_UTF8,
            format!("{what}: not valid UTF-8"),
        )
    })
}

/// Checks a caller array of `len` elements (`len` names the count in errors).
fn check_array<T>(ptr: *const T, len: usize, what: &str, len_name: &str) -> Result<(), FfiError> {
    if ptr.is_null() {
        return Err(FfiError::null(what));
    }
    if len == 0 {
        return Err(FfiError::invalid_argument(format!(
            "{len_name}: must be at least 1"
        )));
    }
    if len > isize::MAX as usize / std::mem::size_of::<T>().max(1) {
        return Err(FfiError::invalid_argument(format!(
            "{len_name}: {len} is larger than any array"
        )));
    }
    Ok(())
}

/// The bytes of a message body; `(NULL, 0)` is an empty body.
///
/// # Safety
///
/// `ptr` must be NULL or point to `len` readable bytes that outlive `'a`.
unsafe fn body_slice<'a>(ptr: *const u8, len: usize) -> Result<&'a [u8], FfiError> {
    if ptr.is_null() {
        return if len == 0 {
            Ok(&[])
        } else {
            Err(FfiError::null("body"))
        };
    }
    if len > isize::MAX as usize {
        return Err(FfiError::invalid_argument(format!(
            "body_len: {len} is larger than any buffer"
        )));
    }
    // SAFETY: non-NULL, at most isize::MAX, and readable for `len` bytes by contract.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// The bytes of an address string, up to its NUL, or `None` when there is no NUL within the
/// longest address plus one byte (the scan reads no further).
///
/// # Safety
///
/// `ptr` must be non-NULL and point to a NUL-terminated string, or to at least 255 readable
/// bytes.
unsafe fn address_bytes<'a>(ptr: *const c_char) -> Option<&'a [u8]> {
    // An address is at most 254 octets (RFC 5321 4.5.3.1.3 with the brackets).
    const MAX: usize = 254;
    let bytes = ptr.cast::<u8>();
    let mut len = 0;
    // SAFETY: reads stop at the first NUL, within the caller's string.
    while len <= MAX && unsafe { *bytes.add(len) } != 0 {
        len += 1;
    }
    // SAFETY: `len` bytes before the NUL were just read.
    (len <= MAX).then(|| unsafe { std::slice::from_raw_parts(bytes, len) })
}

/// Reads an envelope address: "" is the null address. The scan stops at the NUL or after 255
/// bytes, so an unterminated string is read no further than an address can be long.
///
/// # Safety
///
/// As for `address_bytes`.
unsafe fn read_address(ptr: *const c_char, field: Field) -> Result<Address, FfiError> {
    // SAFETY: forwarded from the caller's contract.
    let Some(text) = (unsafe { address_bytes(ptr) }) else {
        return Err(Error::InvalidAddress {
            field,
            problem: AddressProblem::PathTooLong,
        }
        .into());
    };
    if text.is_empty() {
        return Ok(Address::null());
    }
    Ok(Address::parse_bytes(text, field)?)
}
