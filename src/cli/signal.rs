//! Ctrl-C and SIGTERM for the commands that send: the first signal asks the running send to
//! stop (it stops taking new work, gives what is in flight a short grace period, writes its
//! records and summary and exits with [`INTERRUPTED`]); a second one ends the process at once,
//! with the same code. Reports and journals are flushed as they go, so even then they hold
//! every outcome learnt.
//!
//! The handler only touches atomics (and `_exit`), which is all a signal handler may do; this
//! module must not do more in it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// The exit code of a send stopped by a signal (128 + SIGINT, as shells report Ctrl-C).
pub(crate) const INTERRUPTED: u8 = 130;

/// How long what is in flight may take to finish after the first signal.
pub(crate) const GRACE: Duration = Duration::from_secs(10);

/// Set by the first signal.
pub(crate) static STOP: AtomicBool = AtomicBool::new(false);

static RECEIVED: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(_signal: libc::c_int) {
    if RECEIVED.fetch_add(1, Ordering::SeqCst) > 0 {
        // SAFETY: _exit is async-signal-safe; buffered output is lost, files were flushed.
        unsafe { libc::_exit(libc::c_int::from(INTERRUPTED)) };
    }
    STOP.store(true, Ordering::SeqCst);
}

/// Installs the handler for SIGINT and SIGTERM.
pub(crate) fn install() -> Result<(), String> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction with a handler that only touches atomics and _exit.
        let ok = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut()) == 0
        };
        if !ok {
            return Err(format!(
                "cannot install a signal handler: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// Whether a signal asked the send to stop.
pub(crate) fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}
