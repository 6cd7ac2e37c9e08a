//! Result codes, the error a failing call leaves behind, and the functions that turn either into
//! text a person can read.
//!
//! Every fallible function returns an [`mxp_result`]. Its values are part of the ABI: a code is
//! never renumbered or reused, new codes are only appended. The detailed message of the latest
//! failure on a thread (naming the field, key or value that was refused) is kept in a
//! thread-local and read with [`mxp_last_error`]; a successful call leaves it as it was, like
//! `errno`. Nothing here may allocate on the success path of another call.

use super::panic::boundary_value;
use crate::error::{AddressProblem, Error};
use std::borrow::Cow;
use std::cell::RefCell;
use std::ffi::{c_char, c_int};

/// What a call did. `MXP_OK` is success; every other value is a failure, and the call then
/// wrote none of its outputs. The values are fixed: they are never renumbered or reused.
/// cbindgen:prefix-with-name=false
/// cbindgen:rename-all=None
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum mxp_result {
    /// Success.
    MXP_OK = 0,
    /// A required pointer argument was NULL (the message names it).
    MXP_ERR_NULL_POINTER = 1,
    /// A string that must be UTF-8 is not (the message names the field).
    MXP_ERR_INVALID_UTF8 = 2,
    /// The sender or a recipient is not a valid envelope address (the message names which).
    MXP_ERR_INVALID_ADDRESS = 3,
    /// The recipient list is empty.
    MXP_ERR_NO_RECIPIENTS = 4,
    /// A body line is over RFC 5322's 998 octets (the message gives the line number).
    MXP_ERR_BODY_LINE_TOO_LONG = 5,
    /// The ingress queue is full: back off and try again, or use a `_timeout` variant.
    MXP_ERR_QUEUE_FULL = 6,
    /// The dispatcher has been shut down and takes no more work.
    MXP_ERR_SHUT_DOWN = 7,
    /// A configuration value is malformed or out of range (the message names key and value).
    MXP_ERR_INVALID_CONFIG = 8,
    /// A configuration key does not exist (the message names it).
    MXP_ERR_UNKNOWN_KEY = 9,
    /// A handle is not live: freed already, never returned by a `_new`, or of another type.
    MXP_ERR_BAD_HANDLE = 10,
    /// An operating-system error (a socket, a thread) while starting.
    MXP_ERR_IO = 11,
    /// mxpipe panicked inside the call (a bug in mxpipe; please report the message).
    MXP_ERR_PANIC = 12,
    /// The caller's buffer cannot hold the output; nothing was written.
    MXP_ERR_BUFFER_TOO_SMALL = 13,
    /// A length or count argument is out of range (the message names it).
    MXP_ERR_INVALID_ARGUMENT = 14,
    /// Events are not available here: turned off (`record_events = false`), or a callback
    /// receives them.
    MXP_ERR_EVENTS_UNAVAILABLE = 15,
    /// The call is not allowed from the event callback's thread (`mxp_dispatcher_free`).
    MXP_ERR_CALLBACK_CONTEXT = 16,
    /// The timeout passed before what was waited for happened (`mxp_dispatcher_wait_final`).
    MXP_ERR_TIMED_OUT = 17,
}

use mxp_result::*;

impl mxp_result {
    /// The fixed description of a code, NUL-terminated.
    fn description(self) -> &'static str {
        match self {
            MXP_OK => "success\0",
            MXP_ERR_NULL_POINTER => "a required pointer argument is NULL\0",
            MXP_ERR_INVALID_UTF8 => "a string is not valid UTF-8\0",
            MXP_ERR_INVALID_ADDRESS => "an address is not a valid envelope address\0",
            MXP_ERR_NO_RECIPIENTS => "the message has no recipients\0",
            MXP_ERR_BODY_LINE_TOO_LONG => "a body line is longer than 998 octets\0",
            MXP_ERR_QUEUE_FULL => "the dispatcher's ingress queue is full\0",
            MXP_ERR_SHUT_DOWN => "the dispatcher has been shut down\0",
            MXP_ERR_INVALID_CONFIG => "a configuration value is invalid\0",
            MXP_ERR_UNKNOWN_KEY => "unknown configuration key\0",
            MXP_ERR_BAD_HANDLE => "the handle is not live (freed, or never created)\0",
            MXP_ERR_IO => "operating-system error\0",
            MXP_ERR_PANIC => "internal error: mxpipe panicked\0",
            MXP_ERR_BUFFER_TOO_SMALL => "the buffer is too small\0",
            MXP_ERR_INVALID_ARGUMENT => "an argument is out of range\0",
            MXP_ERR_EVENTS_UNAVAILABLE => "events are turned off or go to a callback\0",
            MXP_ERR_CALLBACK_CONTEXT => "not allowed from the event callback\0",
            MXP_ERR_TIMED_OUT => "the timeout passed\0",
        }
    }

    fn from_code(code: c_int) -> Option<Self> {
        const ALL: [mxp_result; 18] = [
            MXP_OK,
            MXP_ERR_NULL_POINTER,
            MXP_ERR_INVALID_UTF8,
            MXP_ERR_INVALID_ADDRESS,
            MXP_ERR_NO_RECIPIENTS,
            MXP_ERR_BODY_LINE_TOO_LONG,
            MXP_ERR_QUEUE_FULL,
            MXP_ERR_SHUT_DOWN,
            MXP_ERR_INVALID_CONFIG,
            MXP_ERR_UNKNOWN_KEY,
            MXP_ERR_BAD_HANDLE,
            MXP_ERR_IO,
            MXP_ERR_PANIC,
            MXP_ERR_BUFFER_TOO_SMALL,
            MXP_ERR_INVALID_ARGUMENT,
            MXP_ERR_EVENTS_UNAVAILABLE,
            MXP_ERR_CALLBACK_CONTEXT,
            MXP_ERR_TIMED_OUT,
        ];
        ALL.into_iter().find(|r| *r as c_int == code)
    }
}

/// The longest message `mxp_last_error` ever writes, its terminating NUL included: a buffer of
/// this size is always large enough.
pub const MXP_LAST_ERROR_SIZE: usize = 512;

/// A failure inside an extern function: the code to return and the message to keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FfiError {
    pub code: mxp_result,
    pub message: Cow<'static, str>,
}

impl FfiError {
    pub fn new(code: mxp_result, message: impl Into<Cow<'static, str>>) -> Self {
        FfiError {
            code,
            message: message.into(),
        }
    }

    pub fn null(what: &str) -> Self {
        FfiError::new(MXP_ERR_NULL_POINTER, format!("{what}: NULL pointer"))
    }

    pub fn bad_handle(kind: &str, handle: usize) -> Self {
        FfiError::new(
            MXP_ERR_BAD_HANDLE,
            format!(
                "{kind} handle {handle:#x} is not live: it was freed already, was never \
                 returned by mxp_{kind}_new, or is a handle of another type"
            ),
        )
    }

    pub fn invalid_argument(message: impl Into<Cow<'static, str>>) -> Self {
        FfiError::new(MXP_ERR_INVALID_ARGUMENT, message)
    }
}

impl From<Error> for FfiError {
    fn from(error: Error) -> Self {
        let code = match error {
            Error::InvalidAddress {
                problem: AddressProblem::InvalidUtf8,
                ..
            } => MXP_ERR_INVALID_UTF8,
            Error::InvalidAddress { .. } => MXP_ERR_INVALID_ADDRESS,
            Error::NoRecipients => MXP_ERR_NO_RECIPIENTS,
            Error::BodyLineTooLong { .. } => MXP_ERR_BODY_LINE_TOO_LONG,
            Error::QueueFull => MXP_ERR_QUEUE_FULL,
            Error::ShutDown => MXP_ERR_SHUT_DOWN,
            Error::InvalidConfig { .. } => MXP_ERR_INVALID_CONFIG,
            Error::Io(_) | Error::Spool(_) => MXP_ERR_IO,
            Error::InvalidParameter { .. } => MXP_ERR_INVALID_ARGUMENT,
        };
        // The two errors a busy producer sees in a loop cost no allocation.
        let message = match error {
            Error::QueueFull => {
                Cow::Borrowed("queue full: the dispatcher's ingress queue is at capacity")
            }
            Error::ShutDown => Cow::Borrowed("the dispatcher has been shut down"),
            other => Cow::Owned(other.to_string()),
        };
        FfiError { code, message }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<Cow<'static, str>> = const { RefCell::new(Cow::Borrowed("")) };
}

/// Keeps `error` as this thread's last error and returns its code.
pub(crate) fn set_last_error(error: FfiError) -> mxp_result {
    let mut message = error.message;
    if message.len() >= MXP_LAST_ERROR_SIZE {
        let mut end = MXP_LAST_ERROR_SIZE - 4;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message = Cow::Owned(format!("{}...", &message[..end]));
    }
    if message.contains('\0') {
        message = Cow::Owned(message.replace('\0', "\\0"));
    }
    // A thread being torn down has no storage left; the code alone is then the answer.
    let _ = LAST_ERROR.try_with(|last| *last.borrow_mut() = message);
    error.code
}

/// Shortens `text` (a value echoed in an error message) to a readable length.
pub(crate) fn excerpt(text: &str) -> Cow<'_, str> {
    const MAX: usize = 80;
    if text.len() <= MAX {
        return Cow::Borrowed(text);
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}...", &text[..end]))
}

/// A fixed, human-readable description of a result code: a static NUL-terminated string that
/// must not be freed. Unknown codes give "unknown result code".
///
/// For the detailed message of the latest failure (which names the field, key or value), use
/// `mxp_last_error`. Any thread may call this.
#[no_mangle]
pub extern "C" fn mxp_result_str(code: c_int) -> *const c_char {
    const UNKNOWN: &str = "unknown result code\0";
    let text = boundary_value("mxp_result_str", UNKNOWN, || {
        mxp_result::from_code(code)
            .map(mxp_result::description)
            .unwrap_or(UNKNOWN)
    });
    text.as_ptr().cast()
}

/// The size in bytes, terminating NUL included, of the message `mxp_last_error` would write now
/// (at most `MXP_LAST_ERROR_SIZE`). 1 when no call has failed on this thread yet.
#[no_mangle]
pub extern "C" fn mxp_last_error_len() -> usize {
    boundary_value("mxp_last_error_len", 1, || {
        LAST_ERROR
            .try_with(|last| last.borrow().len() + 1)
            .unwrap_or(1)
    })
}

/// Copies the detailed message of the latest failed call made on this thread into `buf`
/// (UTF-8, NUL-terminated), for example "recipient 1: address contains a control character
/// (CR, LF, NUL or another)". The message is kept per thread: a failure on another thread does
/// not change it, and a successful call leaves it as it was. It is empty ("") when no call has
/// failed on this thread.
///
/// Returns `MXP_ERR_NULL_POINTER` when `buf` is NULL, `MXP_ERR_BUFFER_TOO_SMALL` (writing
/// nothing) when `len` is below `mxp_last_error_len()`. A buffer of `MXP_LAST_ERROR_SIZE` bytes
/// is always large enough. This function never replaces the stored message.
///
/// # Safety
///
/// `buf` must be NULL or point to `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn mxp_last_error(buf: *mut c_char, len: usize) -> mxp_result {
    if buf.is_null() {
        return MXP_ERR_NULL_POINTER;
    }
    // Not `boundary`: this function's own errors are returned, not stored, so that the message
    // being read stays.
    boundary_value("mxp_last_error", MXP_ERR_PANIC, || {
        copy_last_error(buf, len)
    })
}

fn copy_last_error(buf: *mut c_char, len: usize) -> mxp_result {
    LAST_ERROR
        .try_with(|last| {
            let last = last.borrow();
            if len < last.len() + 1 {
                return MXP_ERR_BUFFER_TOO_SMALL;
            }
            // SAFETY: the caller gives `len` writable bytes and we write `last.len() + 1 <= len`.
            unsafe {
                std::ptr::copy_nonoverlapping(last.as_ptr(), buf.cast::<u8>(), last.len());
                *buf.add(last.len()) = 0;
            }
            MXP_OK
        })
        .unwrap_or(MXP_ERR_PANIC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Field;
    use std::ffi::CStr;

    #[test]
    fn codes_are_fixed() {
        assert_eq!(MXP_OK as c_int, 0);
        assert_eq!(MXP_ERR_QUEUE_FULL as c_int, 6);
        assert_eq!(MXP_ERR_BUFFER_TOO_SMALL as c_int, 13);
        assert_eq!(MXP_ERR_CALLBACK_CONTEXT as c_int, 16);
        assert_eq!(MXP_ERR_TIMED_OUT as c_int, 17);
        for code in 0..=17 {
            let text = unsafe { CStr::from_ptr(mxp_result_str(code)) };
            assert!(!text.to_bytes().is_empty());
            assert_ne!(text.to_bytes(), b"unknown result code", "{code}");
        }
        let text = unsafe { CStr::from_ptr(mxp_result_str(18)) };
        assert_eq!(text.to_bytes(), b"unknown result code");
        let text = unsafe { CStr::from_ptr(mxp_result_str(-1)) };
        assert_eq!(text.to_bytes(), b"unknown result code");
    }

    #[test]
    fn errors_map_to_codes_and_keep_the_field() {
        let e = FfiError::from(Error::InvalidAddress {
            field: Field::Recipient(3),
            problem: AddressProblem::InvalidUtf8,
        });
        assert_eq!(e.code, MXP_ERR_INVALID_UTF8);
        assert_eq!(e.message, "recipient 3: address is not valid UTF-8");
        assert_eq!(FfiError::from(Error::QueueFull).code, MXP_ERR_QUEUE_FULL);
    }

    #[test]
    fn last_error_is_per_thread_and_bounded() {
        set_last_error(FfiError::new(MXP_ERR_IO, "x".repeat(2000)));
        assert_eq!(mxp_last_error_len(), MXP_LAST_ERROR_SIZE);
        let mut small = [0 as c_char; 8];
        assert_eq!(
            unsafe { mxp_last_error(small.as_mut_ptr(), small.len()) },
            MXP_ERR_BUFFER_TOO_SMALL
        );
        assert_eq!(small, [0; 8]);
        set_last_error(FfiError::null("sender"));
        let mut buf = [0 as c_char; MXP_LAST_ERROR_SIZE];
        assert_eq!(
            unsafe { mxp_last_error(buf.as_mut_ptr(), buf.len()) },
            MXP_OK
        );
        let text = unsafe { CStr::from_ptr(buf.as_ptr()) };
        assert_eq!(text.to_str().unwrap(), "sender: NULL pointer");
        std::thread::spawn(|| assert_eq!(mxp_last_error_len(), 1))
            .join()
            .unwrap();
    }
}
