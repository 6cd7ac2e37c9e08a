//! `mxp_dispatcher` and `mxp_body`: starting, enqueueing (one message, or one prepared body for
//! many recipients), flushing, durability with a spool (sync, the durable watermark), counters and
//! shutdown.
//!
//! Enqueue is the hot path: it checks every pointer, reads each address with a bounded scan,
//! and hands one `Message` to the Rust dispatcher; nothing on it takes a lock that a blocking
//! call holds. Calls that may block (`_timeout`, `_flush`, `_wait_final`, `_shutdown`) hold a
//! reference to the dispatcher instead of the handle table's lock.

use super::config::CONFIGS;
use super::event::{is_callback_thread_of, mxp_event, CallbackThread};
use super::handle::{from_ptr, to_ptr, HandleTable};
use super::panic::boundary;
use super::result::{excerpt, mxp_result, FfiError};
use super::{address_bytes, body_slice, out_ptr, read_address};
use crate::engine::{Dispatcher, Event};
use crate::error::{Error, Field};
use crate::message::{Address, Body, Message};
use crossbeam_channel::{Receiver, Sender};
use std::cell::RefCell;
use std::ffi::{c_char, c_void};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often a blocking call looks whether the dispatcher was shut down meanwhile.
const SLICE: Duration = Duration::from_millis(50);

/// The most recipients one enqueue call takes. A larger count is refused with
/// `MXP_ERR_INVALID_ARGUMENT` before the array is read, which catches a garbage count.
pub const MXP_MAX_RECIPIENTS: usize = 1_000_000;

/// An opaque handle to a running dispatcher, from `mxp_dispatcher_new`; free it with
/// `mxp_dispatcher_free`. Every function taking it may be called from any thread, concurrently.
pub struct mxp_dispatcher {
    _private: [u8; 0],
}

/// An opaque handle to a prepared message body, from `mxp_body_new`; free it with
/// `mxp_body_free`. Shared by any number of messages and threads.
pub struct mxp_body {
    _private: [u8; 0],
}

/// Counters of a dispatcher, from `mxp_dispatcher_stats`. Each is read atomically; together they
/// are a near-simultaneous snapshot, not an exact one.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct mxp_stats {
    /// Messages and recipients accepted by the enqueue calls.
    pub submitted_messages: u64,
    pub submitted_recipients: u64,
    /// Recipient outcomes so far (`deferred` counts each deferral).
    pub delivered: u64,
    pub deferred: u64,
    pub bounced: u64,
    pub expired: u64,
    /// Recipients without a final outcome (queued, in a transaction, or waiting to retry).
    pub in_flight: u64,
    pub connections_opened: u64,
    pub connections_open: u64,
    /// SMTP transactions completed.
    pub transactions: u64,
    /// Final outcome events (delivered, bounced, expired) handed to the caller so far, by the
    /// polling functions or the callback. When it equals `submitted_recipients`, every
    /// recipient's final outcome has been read.
    pub final_events_read: u64,
}

pub(crate) static DISPATCHERS: HandleTable<DispatcherState> = HandleTable::new("dispatcher", 2);
static BODIES: HandleTable<Body> = HandleTable::new("body", 3);

/// What a dispatcher handle holds.
pub(crate) struct DispatcherState {
    /// Taken only in `drop`, so that the loops end before the callback thread is joined.
    dispatcher: Option<Dispatcher>,
    events: Option<Receiver<Event>>,
    callback: Mutex<Option<CallbackThread>>,
    shut_down: AtomicBool,
    pub(crate) finals_read: Arc<AtomicU64>,
    /// Dropped when the loops have stopped: no event comes after that. Waiters select on
    /// `stopped`, which then reports disconnection at once.
    stopped_signal: Mutex<Option<Sender<()>>>,
    pub(crate) stopped: Receiver<()>,
}

impl DispatcherState {
    fn dispatcher(&self) -> &Dispatcher {
        self.dispatcher.as_ref().expect("present until dropped")
    }

    fn check_running(&self) -> Result<(), FfiError> {
        if self.shut_down.load(Ordering::Acquire) {
            Err(Error::ShutDown.into())
        } else {
            Ok(())
        }
    }

    fn callback_slot(&self) -> std::sync::MutexGuard<'_, Option<CallbackThread>> {
        self.callback.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The receiver the polling functions read, unless events are off or go to a callback.
    pub(crate) fn event_receiver(&self) -> Result<&Receiver<Event>, FfiError> {
        let unavailable =
            |why: &'static str| FfiError::new(mxp_result::MXP_ERR_EVENTS_UNAVAILABLE, why);
        let receiver = self.events.as_ref().ok_or_else(|| {
            unavailable("events are turned off for this dispatcher (record_events = false)")
        })?;
        if self.callback_slot().is_some() {
            return Err(unavailable(
                "events go to the callback set with mxp_dispatcher_set_callback",
            ));
        }
        Ok(receiver)
    }

    pub(crate) fn set_callback(
        &self,
        callback: unsafe extern "C" fn(*mut c_void, *const mxp_event),
        userdata: *mut c_void,
    ) -> Result<(), FfiError> {
        self.check_running()?;
        let receiver = self.events.clone().ok_or_else(|| {
            FfiError::new(
                mxp_result::MXP_ERR_EVENTS_UNAVAILABLE,
                "events are turned off for this dispatcher (record_events = false)",
            )
        })?;
        let mut slot = self.callback_slot();
        if slot.is_some() {
            return Err(FfiError::invalid_argument(
                "callback: a callback is set already (it can be set once)",
            ));
        }
        let finals_read = Arc::clone(&self.finals_read);
        let thread = CallbackThread::spawn(self.key(), receiver, callback, userdata, finals_read)
            .map_err(|e| {
            FfiError::new(
                mxp_result::MXP_ERR_IO,
                format!("cannot start the callback thread: {e}"),
            )
        })?;
        *slot = Some(thread);
        Ok(())
    }

    /// Identifies this dispatcher to its callback thread: the address of a value it owns.
    fn key(&self) -> usize {
        Arc::as_ptr(&self.finals_read).addr()
    }

    fn on_callback_thread(&self) -> bool {
        is_callback_thread_of(self.key())
    }

    /// Refuses new work at once, then lets the Rust dispatcher finish what it has until
    /// `timeout` passes and stop its loops; false when something had to be cut short. Waiters
    /// on events are then woken.
    fn stop(&self, timeout: Duration) -> bool {
        self.shut_down.store(true, Ordering::Release);
        let clean = self.dispatcher().shutdown_timeout(timeout);
        drop(
            self.stopped_signal
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        clean
    }
}

impl Drop for DispatcherState {
    fn drop(&mut self) {
        // Joins the loops; their event senders go with them, which ends the callback thread
        // once it has handed over the last event.
        drop(self.dispatcher.take());
        let callback = self.callback_slot().take();
        if let Some(callback) = callback {
            // A callback that made a blocking call holding the last reference ends up here on
            // its own thread; it then finishes by itself.
            if !self.on_callback_thread() {
                let _ = callback.thread.join();
            }
        }
    }
}

/// A start-up error, with the configured value added where the Rust error names only the key.
fn start_error(error: Error, settings: &super::config::Settings) -> FfiError {
    let mut ffi = FfiError::from(error);
    if let Error::InvalidConfig { key, .. } = error {
        if let Some(value) = settings.value_of(key) {
            ffi.message = format!("{} (value {:?})", ffi.message, excerpt(&value)).into();
        }
    }
    ffi
}

/// Starts a dispatcher with the settings of `config` (its event-loop threads start now) and
/// writes its handle to `*out`.
///
/// Errors: `MXP_ERR_INVALID_CONFIG` (no relay or route, a host that does not resolve: the
/// message names key and value), `MXP_ERR_IO` (a thread or socket could not be created),
/// `MXP_ERR_NULL_POINTER`, `MXP_ERR_BAD_HANDLE`.
///
/// Ownership: `config` is only read; the caller still frees it, and may do so at once. The
/// caller owns the new handle and frees it with `mxp_dispatcher_free`. Any thread may call this.
///
/// # Safety
///
/// `out` must be NULL or point to writable storage for one pointer.
#[no_mangle]
pub unsafe extern "C" fn mxp_dispatcher_new(
    config: *const super::config::mxp_config,
    out: *mut *mut mxp_dispatcher,
) -> mxp_result {
    boundary("mxp_dispatcher_new", || {
        let config = from_ptr(config);
        if config == 0 {
            return Err(FfiError::null("config"));
        }
        let out = out_ptr(out, "out")?;
        let settings = CONFIGS.with(config, |s| {
            s.lock().unwrap_or_else(|e| e.into_inner()).clone()
        })?;
        let dispatcher = settings
            .builder()?
            .start()
            .map_err(|e| start_error(e, &settings))?;
        let events = if settings.record_events() {
            dispatcher.events()
        } else {
            None
        };
        let (stopped_signal, stopped) = crossbeam_channel::bounded(0);
        let handle = DISPATCHERS.insert(DispatcherState {
            dispatcher: Some(dispatcher),
            events,
            callback: Mutex::new(None),
            shut_down: AtomicBool::new(false),
            finals_read: Arc::new(AtomicU64::new(0)),
            stopped_signal: Mutex::new(Some(stopped_signal)),
            stopped,
        })?;
        // SAFETY: checked non-NULL; the caller gives writable storage.
        unsafe { out.write(to_ptr(handle)) };
        Ok(())
    })
}

/// Shuts the dispatcher down (as `mxp_dispatcher_shutdown`: waits until every recipient in a
/// transaction has an outcome), stops its threads, and frees the handle. When a callback is set,
/// it has seen every event when this returns. NULL is a no-op (`MXP_OK`); a handle freed
/// already gives `MXP_ERR_BAD_HANDLE`.
///
/// Threading: any thread except the callback thread (`MXP_ERR_CALLBACK_CONTEXT` there: freeing
/// would wait for the callback itself). Calls that other threads are making on this dispatcher
/// meanwhile finish (blocking ones are woken: `mxp_dispatcher_wait_events`,
/// `mxp_dispatcher_wait_final` and the `_timeout` enqueues give `MXP_ERR_SHUT_DOWN`), and this
/// function returns only after all of them have returned and the callback, if one is set, has
/// returned from its last event: `userdata` may be freed as soon as this returns. Any later call
/// with the handle gives `MXP_ERR_BAD_HANDLE`. To bound the wait for a slow server, call
/// `mxp_dispatcher_shutdown_timeout` first.
///
/// # Safety
///
/// None beyond passing a value that `mxp_dispatcher_new` returned, or NULL; stale values are
/// caught.
#[no_mangle]
pub unsafe extern "C" fn mxp_dispatcher_free(dispatcher: *mut mxp_dispatcher) -> mxp_result {
    boundary("mxp_dispatcher_free", || {
        let handle = from_ptr(dispatcher);
        if handle == 0 {
            return Ok(());
        }
        if DISPATCHERS.get(handle)?.on_callback_thread() {
            return Err(FfiError::new(
                mxp_result::MXP_ERR_CALLBACK_CONTEXT,
                "mxp_dispatcher_free: not allowed from the dispatcher's own event callback",
            ));
        }
        let state = DISPATCHERS.remove(handle)?;
        state.stop(Duration::MAX);
        // Calls other threads are making on this dispatcher (the callback's among them) end
        // promptly now: blocking ones are woken by the shutdown. Waiting for them makes this
        // thread the one that drops the dispatcher, which joins the callback thread after it
        // has handed over the last event.
        while Arc::strong_count(&state) > 1 {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(state);
        Ok(())
    })
}

thread_local! {
    /// The last sender this thread enqueued with: bulk senders repeat it, and reusing the
    /// checked address saves parsing it again.
    static LAST_SENDER: RefCell<Option<(Box<[u8]>, Address)>> = const { RefCell::new(None) };
}

/// Reads the envelope sender ("" is the null sender), reusing this thread's last one when the
/// bytes are the same.
///
/// # Safety
///
/// As for `read_address`.
unsafe fn read_sender(pointer: *const c_char) -> Result<Address, FfiError> {
    // SAFETY: by the caller's contract; the scan is bounded as in read_address.
    let bytes = unsafe { address_bytes(pointer) };
    let cached = LAST_SENDER.try_with(|last| {
        let last = last.borrow();
        match (&*last, bytes) {
            (Some((text, address)), Some(bytes)) if **text == *bytes => Some(address.clone()),
            _ => None,
        }
    });
    if let Ok(Some(address)) = cached {
        return Ok(address);
    }
    // SAFETY: as above.
    let address = unsafe { read_address(pointer, Field::Sender) }?;
    if let Some(bytes) = bytes {
        let _ = LAST_SENDER.try_with(|last| {
            *last.borrow_mut() = Some((bytes.into(), address.clone()));
        });
    }
    Ok(address)
}

/// Where an enqueue call's body comes from.
#[derive(Clone, Copy)]
enum BodySource {
    Bytes(*const u8, usize),
    Prepared(usize),
}

/// The common path of the enqueue functions: checks, builds the message, submits it.
///
/// # Safety
///
/// As documented on `mxp_dispatcher_enqueue`.
#[allow(clippy::too_many_arguments)] // the C functions' arguments, in their order
unsafe fn enqueue(
    dispatcher: *const mxp_dispatcher,
    sender: *const c_char,
    recipients: *const *const c_char,
    n_recipients: usize,
    body: BodySource,
    tag: u64,
    timeout: Option<Duration>,
    out_id: *mut u64,
) -> Result<(), FfiError> {
    let handle = from_ptr(dispatcher);
    if handle == 0 {
        return Err(FfiError::null("dispatcher"));
    }
    if sender.is_null() {
        return Err(FfiError::null("sender"));
    }
    // No recipients is the error whatever the array pointer is (NULL is usual with a count 0).
    if n_recipients == 0 {
        return Err(Error::NoRecipients.into());
    }
    if recipients.is_null() {
        return Err(FfiError::null("recipients"));
    }
    let content = match body {
        // SAFETY: the caller gives `len` readable bytes at `ptr`, or NULL.
        BodySource::Bytes(ptr, len) => Some(unsafe { body_slice(ptr, len) }?),
        BodySource::Prepared(0) => return Err(FfiError::null("body")),
        BodySource::Prepared(_) => None,
    };
    let out_id = out_ptr(out_id, "out_id")?;
    if n_recipients > MXP_MAX_RECIPIENTS {
        return Err(FfiError::invalid_argument(format!(
            "n_recipients: {n_recipients} is over the limit of {MXP_MAX_RECIPIENTS} per call"
        )));
    }
    // SAFETY: the caller passes a NUL-terminated string (sender) and an array of
    // `n_recipients` pointers, each NULL or NUL-terminated.
    let sender = unsafe { read_sender(sender) }?;
    let pointers = unsafe { std::slice::from_raw_parts(recipients, n_recipients) };
    let mut addresses = Vec::with_capacity(n_recipients);
    for (i, &pointer) in pointers.iter().enumerate() {
        if pointer.is_null() {
            return Err(FfiError::null(&format!("recipient {i}")));
        }
        // SAFETY: as above.
        let address = unsafe { read_address(pointer, Field::Recipient(i)) }?;
        if address.is_null() {
            return Err(Error::InvalidAddress {
                field: Field::Recipient(i),
                problem: crate::error::AddressProblem::Empty,
            }
            .into());
        }
        addresses.push(address);
    }
    let body = match (content, body) {
        (Some(content), _) => Arc::new(Body::new(content)?),
        (None, BodySource::Prepared(body)) => BODIES.get(body)?,
        (None, BodySource::Bytes(..)) => unreachable!("bytes always give content"),
    };
    let message = Message::from_parts(sender, addresses, body)?.with_tag(tag);
    let id = match timeout {
        None => DISPATCHERS.with(handle, |state| {
            state.check_running()?;
            state
                .dispatcher()
                .submit(message)
                .map_err(|e| FfiError::from(e.error))
        })??,
        Some(timeout) => {
            let state = DISPATCHERS.get(handle)?;
            state.check_running()?;
            state
                .dispatcher()
                .submit_timeout(message, timeout)
                .map_err(|e| FfiError::from(e.error))?
        }
    };
    // SAFETY: checked non-NULL.
    unsafe { out_id.write(id) };
    Ok(())
}

/// Enqueues one message without blocking and writes its identifier (which outcome events
/// carry) to `*out_id`.
///
/// - `sender`: the envelope sender, NUL-terminated UTF-8; "" is the null sender `<>`.
/// - `recipients`: an array of `n_recipients` NUL-terminated UTF-8 addresses (1 to
///   `MXP_MAX_RECIPIENTS`), none NULL. A count of 0 gives `MXP_ERR_NO_RECIPIENTS`, whatever
///   the array pointer (NULL too).
/// - `body`, `body_len`: the message (headers and body) as bytes; NUL bytes pass intact. Bare
///   LF and CR become CRLF; a line over 998 octets is refused. The bytes are copied. `(NULL, 0)`
///   is an empty body.
/// - `tag`: any value of the caller's (a row number, a key, a pointer cast to `uint64_t`),
///   echoed in `mxp_event.tag` of every event of this message; mxpipe never reads it.
///
/// Errors: `MXP_ERR_QUEUE_FULL` when the ingress queue is full (back off, or use
/// `mxp_dispatcher_enqueue_timeout`); `MXP_ERR_INVALID_ADDRESS`, `MXP_ERR_INVALID_UTF8`,
/// `MXP_ERR_NO_RECIPIENTS`, `MXP_ERR_BODY_LINE_TOO_LONG` (the message names the field: "sender",
/// "recipient 2", "body: line 3 ..."); `MXP_ERR_NULL_POINTER` (names the argument, or the
/// recipient index); `MXP_ERR_INVALID_ARGUMENT`; `MXP_ERR_SHUT_DOWN`; `MXP_ERR_BAD_HANDLE`.
///
/// Ownership: every input is only read during the call. Threading: any thread, any number of
/// threads at once.
///
/// # Safety
///
/// `sender` must be NULL or NUL-terminated; `recipients` NULL or an array of `n_recipients`
/// pointers, each NULL or NUL-terminated; `body` NULL or `body_len` readable bytes; `out_id`
/// NULL or writable. An address is read up to its NUL or 255 bytes, whichever comes first.
#[no_mangle]
pub unsafe extern "C" fn mxp_dispatcher_enqueue(
    dispatcher: *const mxp_dispatcher,
    sender: *const c_char,
    recipients: *const *const c_char,
    n_recipients: usize,
    body: *const u8,
    body_len: usize,
    tag: u64,
    out_id: *mut u64,
) -> mxp_result {
    boundary("mxp_dispatcher_enqueue", || {
        // SAFETY: forwarded from the caller's contract.
        unsafe {
            enqueue(
                dispatcher,
                sender,
                recipients,
                n_recipients,
                BodySource::Bytes(body, body_len),
                tag,
                None,
                out_id,
            )
        }
    })
}

/// As `mxp_dispatcher_enqueue`, but waits up to `timeout_ms` milliseconds for room in a full
/// queue (`UINT64_MAX`: without limit) before giving `MXP_ERR_QUEUE_FULL`. Gives
/// `MXP_ERR_SHUT_DOWN` when the dispatcher shuts down while waiting.
///
/// # Safety
///
/// As for `mxp_dispatcher_enqueue`.
#[no_mangle]
pub unsafe extern "C" fn mxp_dispatcher_enqueue_timeout(
    dispatcher: *const mxp_dispatcher,
    sender: *const c_char,
    recipients: *const *const c_char,
    n_recipients: usize,
    body: *const u8,
    body_len: usize,
    tag: u64,
    timeout_ms: u64,
    out_id: *mut u64,
) -> mxp_result {
    boundary("mxp_dispatcher_enqueue_timeout", || {
        // SAFETY: forwarded from the caller's contract.
        unsafe {
            enqueue(
                dispatcher,
                sender,
                recipients,
                n_recipients,
                BodySource::Bytes(body, body_len),
                tag,
                Some(Duration::from_millis(timeout_ms)),
                out_id,
            )
        }
    })
}

/// Prepares a message body once (normalised to CRLF and checked) for any number of
/// `mxp_dispatcher_enqueue_body` calls, and writes its handle to `*out`. The bytes are copied;
/// `(NULL, 0)` is an empty body.
///
/// Errors: `MXP_ERR_BODY_LINE_TOO_LONG` (names the line), `MXP_ERR_NULL_POINTER`,
/// `MXP_ERR_INVALID_ARGUMENT`.
///
/// Ownership: the caller owns the handle and frees it with `mxp_body_free`, which it may do as
/// soon as it has enqueued what it wanted: queued messages keep the content alive. Any thread.
///
/// # Safety
///
/// `content` must be NULL or point to `len` readable bytes; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn mxp_body_new(
    content: *const u8,
    len: usize,
    out: *mut *mut mxp_body,
) -> mxp_result {
    boundary("mxp_body_new", || {
        // SAFETY: the caller gives `len` readable bytes, or NULL.
        let content = unsafe { body_slice(content, len) }?;
        let out = out_ptr(out, "out")?;
        let body = Body::new(content)?;
        let handle = BODIES.insert(body)?;
        // SAFETY: checked non-NULL.
        unsafe { out.write(to_ptr(handle)) };
        Ok(())
    })
}

/// Frees a prepared body. NULL is a no-op (`MXP_OK`); a handle freed already gives
/// `MXP_ERR_BAD_HANDLE`. Messages already enqueued with it are not affected.
///
/// # Safety
///
/// None beyond passing a value that `mxp_body_new` returned, or NULL; stale values are caught.
#[no_mangle]
pub unsafe extern "C" fn mxp_body_free(body: *mut mxp_body) -> mxp_result {
    boundary("mxp_body_free", || {
        let handle = from_ptr(body);
        if handle != 0 {
            drop(BODIES.remove(handle)?);
        }
        Ok(())
    })
}

/// The bulk path: enqueues one message with a body prepared by `mxp_body_new` (shared, not
/// copied) without blocking. Otherwise as `mxp_dispatcher_enqueue`: one message may have up to
/// `MXP_MAX_RECIPIENTS` recipients, sent in transactions of `max_recipients_per_transaction`.
///
/// # Safety
///
/// As for `mxp_dispatcher_enqueue`.
#[no_mangle]
pub unsafe extern "C" fn mxp_dispatcher_enqueue_body(
    dispatcher: *const mxp_dispatcher,
    sender: *const c_char,
    recipients: *const *const c_char,
    n_recipients: usize,
    body: *const mxp_body,
    tag: u64,
    out_id: *mut u64,
) -> mxp_result {
    boundary("mxp_dispatcher_enqueue_body", || {
        // SAFETY: forwarded from the caller's contract.
        unsafe {
            enqueue(
                dispatcher,
                sender,
                recipients,
                n_recipients,
                BodySource::Prepared(from_ptr(body)),
                tag,
                None,
                out_id,
            )
        }
    })
}

/// As `mxp_dispatcher_enqueue_body`, waiting up to `timeout_ms` milliseconds for room in a full
/// queue (`UINT64_MAX`: without limit).
///
/// # Safety
///
/// As for `mxp_dispatcher_enqueue`.
#[no_mangle]
pub unsafe extern "C" fn mxp_dispatcher_enqueue_body_timeout(
    dispatcher: *const mxp_dispatcher,
    sender: *const c_char,
    recipients: *const *const c_char,
    n_recipients: usize,
    body: *const mxp_body,
    tag: u64,
    timeout_ms: u64,
    out_id: *mut u64,
) -> mxp_result {
    boundary("mxp_dispatcher_enqueue_body_timeout", || {
        // SAFETY: forwarded from the caller's contract.
        unsafe {
            enqueue(
                dispatcher,
                sender,
                recipients,
                n_recipients,
                BodySource::Prepared(from_ptr(body)),
                tag,
                Some(Duration::from_millis(timeout_ms)),
                out_id,
            )
        }
    })
}

/// Blocks until every enqueued recipient has a final outcome or is waiting for a retry.
///
/// Errors: `MXP_ERR_SHUT_DOWN`, `MXP_ERR_NULL_POINTER`, `MXP_ERR_BAD_HANDLE`. Any thread.
///
/// # Safety
///
/// None beyond passing a dispatcher handle or NULL.
#[no_mangle]
pub unsafe extern "C" fn mxp_dispatcher_flush(dispatcher: *const mxp_dispatcher) -> mxp_result {
    boundary("mxp_dispatcher_flush", || {
        let state = DISPATCHERS.get(from_ptr(dispatcher))?;
        state.check_running()?;
        state.dispatcher().flush();
        Ok(())
    })
}

/// With a spool (`spool_dir`): blocks until every message enqueued before the call is durable
/// (written and fsynced in the spool), so that it may be acknowledged upstream. Without a spool
/// it returns `MXP_OK` at once. Works after `mxp_dispatcher_shutdown` too (until
/// `mxp_dispatcher_free`).
///
/// Errors: `MXP_ERR_IO` when the spool refused a batch or an fsync failed (the message names
/// the problem; the spool then takes nothing more, and only identifiers up to
/// `mxp_dispatcher_durable_id` are durable), `MXP_ERR_NULL_POINTER`, `MXP_ERR_BAD_HANDLE`.
/// Any thread.
///
/// # Safety
///
/// None beyond passing a dispatcher handle or NULL.
#[no_mangle]
pub unsafe extern "C" fn mxp_dispatcher_sync(dispatcher: *const mxp_dispatcher) -> mxp_result {
    boundary("mxp_dispatcher_sync", || {
        let state = DISPATCHERS.get(from_ptr(dispatcher))?;
        state.dispatcher().sync()?;
        Ok(())
    })
}

/// Writes the durable watermark to `*out`: with a spool, every message whose identifier (from
/// the enqueue calls) is at most this is durable; identifiers grow across restarts. Without a
/// spool: 0. Never blocks; works after shutdown too. Any thread.
///
/// Errors: `MXP_ERR_NULL_POINTER`, `MXP_ERR_BAD_HANDLE`.
///
/// # Safety
///
/// `out` must be NULL or point to a writable `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn mxp_dispatcher_durable_id(
    dispatcher: *const mxp_dispatcher,
    out: *mut u64,
) -> mxp_result {
    boundary("mxp_dispatcher_durable_id", || {
        let handle = from_ptr(dispatcher);
        if handle == 0 {
            return Err(FfiError::null("dispatcher"));
        }
        let out = out_ptr(out, "out")?;
        let id = DISPATCHERS.with(handle, |state| state.dispatcher().durable_id())?;
        // SAFETY: checked non-NULL.
        unsafe { out.write(id) };
        Ok(())
    })
}

/// Blocks until every enqueued recipient has a final outcome (delivered, bounced or expired),
/// retries included, or `timeout_ms` milliseconds pass: then `MXP_ERR_TIMED_OUT`.
///
/// Errors: `MXP_ERR_TIMED_OUT`, `MXP_ERR_SHUT_DOWN`, `MXP_ERR_NULL_POINTER`,
/// `MXP_ERR_BAD_HANDLE`. Any thread.
///
/// # Safety
///
/// None beyond passing a dispatcher handle or NULL.
#[no_mangle]
pub unsafe extern "C" fn mxp_dispatcher_wait_final(
    dispatcher: *const mxp_dispatcher,
    timeout_ms: u64,
) -> mxp_result {
    boundary("mxp_dispatcher_wait_final", || {
        let state = DISPATCHERS.get(from_ptr(dispatcher))?;
        state.check_running()?;
        let deadline = Instant::now().checked_add(Duration::from_millis(timeout_ms));
        // In slices, so that a shutdown meanwhile ends the wait (recipients waiting for a
        // retry would otherwise hold it to the end).
        loop {
            let left = deadline.map_or(Duration::MAX, |d| {
                d.saturating_duration_since(Instant::now())
            });
            if state.dispatcher().wait_final(left.min(SLICE)) {
                return Ok(());
            }
            state.check_running()?;
            if left <= SLICE {
                break;
            }
        }
        Err(FfiError::new(
            mxp_result::MXP_ERR_TIMED_OUT,
            format!("wait_final: recipients still without a final outcome after {timeout_ms} ms"),
        ))
    })
}

/// Stops taking work (later enqueue, flush, wait and set_callback calls give
/// `MXP_ERR_SHUT_DOWN`), waits until every recipient in a transaction has an outcome, ends
/// every session with QUIT and stops the event loops. Recipients waiting for a retry stay
/// deferred (their deferred event was sent). Outcome events stay readable and the counters
/// stay current until `mxp_dispatcher_free`. A second call does nothing. Any thread.
///
/// # Safety
///
/// None beyond passing a dispatcher handle or NULL.
#[no_mangle]
pub unsafe extern "C" fn mxp_dispatcher_shutdown(dispatcher: *const mxp_dispatcher) -> mxp_result {
    boundary("mxp_dispatcher_shutdown", || {
        DISPATCHERS.get(from_ptr(dispatcher))?.stop(Duration::MAX);
        Ok(())
    })
}

/// A bounded shutdown: as `mxp_dispatcher_shutdown`, but only until `timeout_ms` milliseconds
/// have passed (`UINT64_MAX`: without limit; 0: at once). New work is refused at once; queued
/// work and transactions under way go on until the deadline. Then every recipient that is
/// still not final (queued, or in a transaction the deadline cut short, which the server may or
/// may not have accepted) gets a `MXP_EVENT_KIND_DEFERRED` event with code 0, enhanced code
/// 4.3.2, `retry_after_ms` -1 and the reason in `text`; connections are closed without QUIT and
/// the event loops stop. It returns when they have stopped, shortly after the deadline at the
/// latest. Recipients waiting for a retry stay deferred, as after `mxp_dispatcher_shutdown`.
///
/// It may be called while another thread is in `mxp_dispatcher_shutdown` or
/// `mxp_dispatcher_free` on the same dispatcher, and then cuts that shutdown short too (a
/// second Ctrl-C). Outcome events and counters stay readable until `mxp_dispatcher_free`.
///
/// Returns `MXP_OK` when nothing had to be cut short, `MXP_ERR_TIMED_OUT` when recipients were
/// left deferred: the dispatcher is shut down either way. Errors: `MXP_ERR_NULL_POINTER`,
/// `MXP_ERR_BAD_HANDLE`. Any thread, the callback thread included.
///
/// # Safety
///
/// None beyond passing a dispatcher handle or NULL.
#[no_mangle]
pub unsafe extern "C" fn mxp_dispatcher_shutdown_timeout(
    dispatcher: *const mxp_dispatcher,
    timeout_ms: u64,
) -> mxp_result {
    boundary("mxp_dispatcher_shutdown_timeout", || {
        let state = DISPATCHERS.get(from_ptr(dispatcher))?;
        if state.stop(Duration::from_millis(timeout_ms)) {
            Ok(())
        } else {
            Err(FfiError::new(
                mxp_result::MXP_ERR_TIMED_OUT,
                format!(
                    "shutdown: recipients were still not final after {timeout_ms} ms and are \
                     left deferred"
                ),
            ))
        }
    })
}

/// Writes the dispatcher's counters to `*out`. Works after shutdown too. Any thread.
///
/// # Safety
///
/// `out` must be NULL or point to a writable `mxp_stats`.
#[no_mangle]
pub unsafe extern "C" fn mxp_dispatcher_stats(
    dispatcher: *const mxp_dispatcher,
    out: *mut mxp_stats,
) -> mxp_result {
    boundary("mxp_dispatcher_stats", || {
        let handle = from_ptr(dispatcher);
        if handle == 0 {
            return Err(FfiError::null("dispatcher"));
        }
        let out = out_ptr(out, "out")?;
        let stats = DISPATCHERS.with(handle, |state| {
            let s = state.dispatcher().stats();
            mxp_stats {
                submitted_messages: s.submitted_messages,
                submitted_recipients: s.submitted_recipients,
                delivered: s.delivered,
                deferred: s.deferred,
                bounced: s.bounced,
                expired: s.expired,
                in_flight: s.in_flight,
                connections_opened: s.connections_opened,
                connections_open: s.connections_open,
                transactions: s.transactions,
                final_events_read: state.finals_read.load(Ordering::Acquire),
            }
        })?;
        // SAFETY: checked non-NULL.
        unsafe { out.write(stats) };
        Ok(())
    })
}
