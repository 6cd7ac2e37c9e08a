//! The panic boundary: every extern function body runs inside [`boundary`] (or
//! [`boundary_value`]), so that a panic in mxpipe becomes `MXP_ERR_PANIC` with a message instead
//! of unwinding into C, which is undefined behaviour.
//!
//! This only works while panics unwind: the library must not be built with `panic = "abort"`.
//! The default panic hook still prints the panic to standard error, which is wanted: it is a bug.

use super::result::{mxp_result, set_last_error, FfiError};
use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs `body` for the extern function `name`; a failure or a panic is stored as this thread's
/// last error and its code returned.
pub(crate) fn boundary(
    name: &'static str,
    body: impl FnOnce() -> Result<(), FfiError>,
) -> mxp_result {
    // Unwind safety: shared state is behind locks that are recovered from poisoning, and a
    // half-done call leaves no output written (outputs are written last).
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => mxp_result::MXP_OK,
        Ok(Err(error)) => set_last_error(error),
        Err(payload) => set_last_error(panic_error(name, payload.as_ref())),
    }
}

/// Like [`boundary`] for functions that return a value instead of a result: `fallback` is
/// returned after a panic, which is kept as this thread's last error.
pub(crate) fn boundary_value<T>(name: &'static str, fallback: T, body: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(value) => value,
        Err(payload) => {
            set_last_error(panic_error(name, payload.as_ref()));
            fallback
        }
    }
}

fn panic_error(name: &str, payload: &(dyn Any + Send)) -> FfiError {
    let what = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    FfiError::new(
        mxp_result::MXP_ERR_PANIC,
        format!("internal error: {name} panicked: {what}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::result::mxp_last_error_len;

    #[test]
    fn a_panic_becomes_a_result() {
        // The default hook prints the panic; that output is expected here.
        let r = boundary("mxp_test", || panic!("boom"));
        assert_eq!(r, mxp_result::MXP_ERR_PANIC);
        assert_eq!(
            mxp_last_error_len(),
            "internal error: mxp_test panicked: boom".len() + 1
        );
        assert_eq!(boundary_value("mxp_test", 7, || 3), 3);
    }
}
