//! Per-recipient outcomes for C: the fixed-size `mxp_event` record, draining events into a
//! caller's array, and the optional callback thread.
//!
//! An event is copied into caller memory with fixed-size, NUL-terminated text fields, so C never
//! holds a pointer into Rust memory and nothing has to be freed. Only the reply text can be too
//! long for its field; it is then cut at a UTF-8 character boundary and `text_truncated` is set.
//! The callback runs on a thread of its own, never on an event-loop thread, so a slow callback
//! delays only other callbacks, never delivery.

use super::dispatcher::{DispatcherState, DISPATCHERS};
use super::handle::from_ptr;
use super::panic::boundary;
use super::result::{mxp_result, FfiError};
use super::{check_array, out_ptr};
use crate::engine::classify::Category;
use crate::engine::{Event, EventKind};
use crossbeam_channel::Receiver;
use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Size of `mxp_event.recipient`: an address is at most 254 octets, so it is never cut.
pub const MXP_RECIPIENT_SIZE: usize = 256;
/// Size of `mxp_event.destination`: a destination (`host:port`, at most 263 octets as
/// `mxp_config_set` enforces) is never cut.
pub const MXP_DESTINATION_SIZE: usize = 264;
/// Size of `mxp_event.text`: a longer reply text is cut and `text_truncated` set.
pub const MXP_REPLY_TEXT_SIZE: usize = 512;

/// What happened to one recipient.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum mxp_event_kind {
    /// The destination accepted the message (final).
    Delivered = 0,
    /// A temporary failure; the recipient will be tried again after `retry_after_ms`.
    Deferred = 1,
    /// A permanent failure (final).
    Bounced = 2,
    /// Temporary failures until the maximum age passed (final).
    Expired = 3,
}

/// Why a recipient was not delivered, from its reply (mxpipe's classification).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum mxp_category {
    /// Delivered: nothing to classify.
    None = 0,
    /// The mailbox does not exist, is disabled, or the address is invalid.
    BadMailbox = 1,
    /// Over quota.
    MailboxFull = 2,
    /// The domain does not exist or accepts no mail (null MX).
    NoSuchDomain = 3,
    /// Refused for spam, reputation, authentication (SPF/DKIM/DMARC) or local policy.
    PolicyBlock = 4,
    /// Slow down: rate limits, too many connections, temporary reputation deferrals.
    Throttled = 5,
    /// TLS could not be negotiated or verified.
    Tls = 6,
    /// Name resolution failed or routing is impossible.
    Dns = 7,
    /// The connection could not be made, was lost, or timed out.
    Connection = 8,
    /// The server and client disagreed about the protocol.
    Protocol = 9,
    Other = 10,
}

impl From<Option<Category>> for mxp_category {
    fn from(category: Option<Category>) -> Self {
        match category {
            None => mxp_category::None,
            Some(Category::BadMailbox) => mxp_category::BadMailbox,
            Some(Category::MailboxFull) => mxp_category::MailboxFull,
            Some(Category::NoSuchDomain) => mxp_category::NoSuchDomain,
            Some(Category::PolicyBlock) => mxp_category::PolicyBlock,
            Some(Category::Throttled) => mxp_category::Throttled,
            Some(Category::Tls) => mxp_category::Tls,
            Some(Category::Dns) => mxp_category::Dns,
            Some(Category::Connection) => mxp_category::Connection,
            Some(Category::Protocol) => mxp_category::Protocol,
            Some(Category::Other) => mxp_category::Other,
        }
    }
}

/// The name of an event kind: "delivered", "deferred", "bounced" or "expired"; "unknown" for a
/// value that is none of `mxp_event_kind`'s. A static string: do not free it. Any thread.
#[no_mangle]
pub extern "C" fn mxp_event_kind_str(kind: c_int) -> *const c_char {
    let name: &'static CStr = match kind {
        0 => c"delivered",
        1 => c"deferred",
        2 => c"bounced",
        3 => c"expired",
        _ => c"unknown",
    };
    name.as_ptr()
}

/// The name of a category, as mxpipe's reports and the Python package write it: "none",
/// "bad_mailbox", "mailbox_full", "no_such_domain", "policy_block", "throttled", "tls", "dns",
/// "connection", "protocol" or "other"; "unknown" for a value that is none of `mxp_category`'s.
/// A static string: do not free it. Any thread.
#[no_mangle]
pub extern "C" fn mxp_category_str(category: c_int) -> *const c_char {
    let name: &'static CStr = match category {
        0 => c"none",
        1 => c"bad_mailbox",
        2 => c"mailbox_full",
        3 => c"no_such_domain",
        4 => c"policy_block",
        5 => c"throttled",
        6 => c"tls",
        7 => c"dns",
        8 => c"connection",
        9 => c"protocol",
        10 => c"other",
        _ => c"unknown",
    };
    name.as_ptr()
}

/// One outcome for one recipient, copied into caller memory: it holds no pointers and needs no
/// freeing. Every text field is NUL-terminated UTF-8.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct mxp_event {
    pub kind: mxp_event_kind,
    /// Why it was not delivered; `MXP_CATEGORY_NONE` for delivered recipients.
    pub category: mxp_category,
    /// The identifier the enqueue call returned.
    pub message_id: u64,
    /// The `tag` the enqueue call was given.
    pub tag: u64,
    /// The server's reply code; 0 when the outcome was decided without a reply (a connection
    /// failure, a timeout), with the reason in `text`.
    pub code: u16,
    /// The enhanced status code (RFC 3463) class.subject.detail; class 0 when there was none.
    pub enhanced_class: u8,
    pub enhanced_subject: u16,
    pub enhanced_detail: u16,
    /// Delivery attempts so far, this one included.
    pub attempts: u32,
    /// For `MXP_EVENT_KIND_DEFERRED`: milliseconds until the next attempt; -1 otherwise.
    pub retry_after_ms: i64,
    /// Milliseconds since the message was enqueued.
    pub elapsed_ms: u64,
    /// True when `text` was cut to fit (the reply text is the only field that can be).
    pub text_truncated: bool,
    /// The recipient address, never cut.
    pub recipient: [c_char; MXP_RECIPIENT_SIZE],
    /// The destination the attempt went to (`host:port` as configured), never cut.
    pub destination: [c_char; MXP_DESTINATION_SIZE],
    /// The server's reply text (lines joined by "\n"), or the reason when `code` is 0.
    pub text: [c_char; MXP_REPLY_TEXT_SIZE],
}

/// The event callback: `userdata` as given to `mxp_dispatcher_set_callback`, and one event,
/// valid only during the call (copy what you keep).
pub type mxp_event_callback =
    Option<unsafe extern "C" fn(userdata: *mut c_void, event: *const mxp_event)>;

/// Copies `text` into `field` with a NUL, cutting at a character boundary; true when cut.
fn fill<const N: usize>(field: &mut [c_char; N], text: &str) -> bool {
    let mut end = text.len().min(N - 1);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    for (dst, &src) in field.iter_mut().zip(&text.as_bytes()[..end]) {
        // A NUL inside a reply would end the C string early; show it instead.
        *dst = if src == 0 { b' ' } else { src } as c_char;
    }
    field[end] = 0;
    end < text.len()
}

impl mxp_event {
    pub(crate) fn from_event(event: &Event) -> Self {
        let enhanced = event.reply.enhanced;
        let mut out = mxp_event {
            kind: match event.kind {
                EventKind::Delivered => mxp_event_kind::Delivered,
                EventKind::Deferred => mxp_event_kind::Deferred,
                EventKind::Bounced => mxp_event_kind::Bounced,
                EventKind::Expired => mxp_event_kind::Expired,
            },
            category: event.category.into(),
            message_id: event.message_id,
            tag: event.tag,
            code: event.reply.code,
            enhanced_class: enhanced.map_or(0, |e| e.class),
            enhanced_subject: enhanced.map_or(0, |e| e.subject),
            enhanced_detail: enhanced.map_or(0, |e| e.detail),
            attempts: event.attempts,
            retry_after_ms: event
                .retry_after
                .map_or(-1, |d| d.as_millis().min(i64::MAX as u128) as i64),
            elapsed_ms: event.elapsed.as_millis().min(u64::MAX as u128) as u64,
            text_truncated: false,
            recipient: [0; MXP_RECIPIENT_SIZE],
            destination: [0; MXP_DESTINATION_SIZE],
            text: [0; MXP_REPLY_TEXT_SIZE],
        };
        fill(&mut out.recipient, event.recipient.as_str());
        fill(&mut out.destination, &event.destination);
        out.text_truncated = fill(&mut out.text, &event.reply.text);
        out
    }
}

/// The thread that hands events to a C callback.
pub(crate) struct CallbackThread {
    pub thread: JoinHandle<()>,
}

thread_local! {
    /// On a callback thread: the key of the dispatcher it serves (0 elsewhere). A plain cell,
    /// so that checking it allocates nothing on the caller's threads.
    static CALLBACK_OF: Cell<usize> = const { Cell::new(0) };
}

/// Whether the calling thread is the callback thread of the dispatcher with this key.
pub(crate) fn is_callback_thread_of(key: usize) -> bool {
    CALLBACK_OF.try_with(|c| c.get() == key).unwrap_or(false)
}

struct UserData(*mut c_void);
// SAFETY: the pointer is only handed back to the caller's callback; mxp_dispatcher_set_callback
// documents that it is used from the callback thread.
unsafe impl Send for UserData {}

impl CallbackThread {
    /// Starts the thread for the dispatcher identified by `key` (non-zero).
    pub(crate) fn spawn(
        key: usize,
        events: Receiver<Event>,
        callback: unsafe extern "C" fn(*mut c_void, *const mxp_event),
        userdata: *mut c_void,
        finals_read: Arc<AtomicU64>,
    ) -> std::io::Result<Self> {
        let userdata = UserData(userdata);
        let thread = std::thread::Builder::new()
            .name("mxpipe-callback".into())
            .spawn(move || {
                let userdata = userdata;
                CALLBACK_OF.with(|c| c.set(key));
                // Ends when the dispatcher is dropped and its loops have sent their last event.
                for event in events.iter() {
                    let record = mxp_event::from_event(&event);
                    if event.kind.is_final() {
                        finals_read.fetch_add(1, Ordering::AcqRel);
                    }
                    // SAFETY: the caller's callback, with the userdata it gave and an event
                    // that lives for the call.
                    unsafe { callback(userdata.0, &record) };
                }
            })?;
        Ok(CallbackThread { thread })
    }
}

/// The next event, waiting up to `timeout`; `MXP_ERR_SHUT_DOWN` once the dispatcher has
/// stopped and every event has been read (none can come after that), also while waiting.
fn wait_first(
    state: &DispatcherState,
    receiver: &Receiver<Event>,
    timeout: Duration,
) -> Result<Option<Event>, FfiError> {
    let shut_down = || {
        FfiError::new(
            mxp_result::MXP_ERR_SHUT_DOWN,
            "wait_events: the dispatcher was shut down and every event has been read",
        )
    };
    crossbeam_channel::select! {
        recv(receiver) -> event => Ok(event.ok()),
        // Disconnected when the loops have stopped.
        recv(state.stopped) -> _ => receiver.try_recv().map(Some).map_err(|_| shut_down()),
        default(timeout) => Ok(None),
    }
}

/// Moves up to `capacity` waiting events into `events`; blocks up to `wait` for the first.
fn drain(
    state: &DispatcherState,
    events: *mut mxp_event,
    capacity: usize,
    wait: Option<Duration>,
) -> Result<usize, FfiError> {
    let receiver = state.event_receiver()?;
    let mut n = 0;
    let mut finals = 0;
    while n < capacity {
        let next = match (n, wait) {
            (0, Some(timeout)) => wait_first(state, receiver, timeout)?,
            _ => receiver.try_recv().ok(),
        };
        let Some(event) = next else { break };
        if event.kind.is_final() {
            finals += 1;
        }
        // SAFETY: check_array proved `events` non-NULL; the caller gives `capacity` records.
        unsafe { events.add(n).write(mxp_event::from_event(&event)) };
        n += 1;
    }
    state.finals_read.fetch_add(finals, Ordering::AcqRel);
    Ok(n)
}

/// Moves up to `capacity` waiting outcome events into `events[0..*out_n]` without blocking
/// (`*out_n` is 0 when none is waiting). Each event is delivered once, to one caller.
///
/// Outcomes produced during `mxp_dispatcher_shutdown` stay readable after it, until
/// `mxp_dispatcher_free`.
///
/// Errors: `MXP_ERR_EVENTS_UNAVAILABLE` when `record_events` is false or a callback is set;
/// `MXP_ERR_INVALID_ARGUMENT` when `capacity` is 0; `MXP_ERR_NULL_POINTER`,
/// `MXP_ERR_BAD_HANDLE`.
///
/// Ownership: the caller owns `events`. Any thread may call this, also concurrently.
///
/// # Safety
///
/// `events` must be NULL or point to `capacity` writable `mxp_event` records; `out_n` must be
/// NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn mxp_dispatcher_poll_events(
    dispatcher: *const super::dispatcher::mxp_dispatcher,
    events: *mut mxp_event,
    capacity: usize,
    out_n: *mut usize,
) -> mxp_result {
    boundary("mxp_dispatcher_poll_events", || {
        let handle = from_ptr(dispatcher);
        check_array(events, capacity, "events", "capacity")?;
        let out_n = out_ptr(out_n, "out_n")?;
        let n = DISPATCHERS.with(handle, |state| drain(state, events, capacity, None))??;
        // SAFETY: checked non-NULL.
        unsafe { out_n.write(n) };
        Ok(())
    })
}

/// Like `mxp_dispatcher_poll_events`, but waits up to `timeout_ms` milliseconds for the first
/// event (`UINT64_MAX`: without limit); `*out_n` is 0 when none came in time.
///
/// Once the dispatcher has been shut down (`mxp_dispatcher_shutdown`, `_shutdown_timeout` or
/// `_free` on another thread) and every event has been read, it gives `MXP_ERR_SHUT_DOWN`: a
/// waiting call is woken then, and a later call returns at once. A free on another thread waits
/// for this call to return, which the shutdown makes prompt.
///
/// # Safety
///
/// As for `mxp_dispatcher_poll_events`.
#[no_mangle]
pub unsafe extern "C" fn mxp_dispatcher_wait_events(
    dispatcher: *const super::dispatcher::mxp_dispatcher,
    events: *mut mxp_event,
    capacity: usize,
    timeout_ms: u64,
    out_n: *mut usize,
) -> mxp_result {
    boundary("mxp_dispatcher_wait_events", || {
        let handle = from_ptr(dispatcher);
        check_array(events, capacity, "events", "capacity")?;
        let out_n = out_ptr(out_n, "out_n")?;
        let state = DISPATCHERS.get(handle)?;
        let n = drain(
            &state,
            events,
            capacity,
            Some(Duration::from_millis(timeout_ms)),
        )?;
        // SAFETY: checked non-NULL.
        unsafe { out_n.write(n) };
        Ok(())
    })
}

/// Hands every later outcome event to `callback(userdata, event)` instead of the polling
/// functions (events already waiting go to the callback too).
///
/// Threading: the callback runs on one dedicated thread that mxpipe starts here, named
/// "mxpipe-callback": never on an event-loop thread and never on the caller's thread, one event
/// at a time, in order. A slow callback delays later callbacks, not delivery (events wait in an
/// unbounded queue). The callback may call any mxpipe function except `mxp_dispatcher_free` on
/// this dispatcher (which returns `MXP_ERR_CALLBACK_CONTEXT` there).
///
/// During a shutdown or a free on another thread, the callback still gets every remaining event;
/// calls it makes on this dispatcher then give `MXP_ERR_SHUT_DOWN` (enqueue, flush, wait_final)
/// or work as usual (stats, `mxp_dispatcher_shutdown_timeout`). `mxp_dispatcher_free` returns
/// only after the callback has returned from the last event, so `userdata` must stay valid until
/// then, and the callback must not wait for the thread that is in `mxp_dispatcher_free`.
///
/// Errors: `MXP_ERR_INVALID_ARGUMENT` when a callback is set already (it is set once);
/// `MXP_ERR_EVENTS_UNAVAILABLE` when `record_events` is false; `MXP_ERR_SHUT_DOWN`;
/// `MXP_ERR_IO` when the thread cannot be started; `MXP_ERR_NULL_POINTER`, `MXP_ERR_BAD_HANDLE`.
///
/// # Safety
///
/// `callback` must be safe to call from another thread with `userdata`.
#[no_mangle]
pub unsafe extern "C" fn mxp_dispatcher_set_callback(
    dispatcher: *const super::dispatcher::mxp_dispatcher,
    callback: mxp_event_callback,
    userdata: *mut c_void,
) -> mxp_result {
    boundary("mxp_dispatcher_set_callback", || {
        let handle = from_ptr(dispatcher);
        let callback = callback.ok_or_else(|| FfiError::null("callback"))?;
        DISPATCHERS.with(handle, |state| state.set_callback(callback, userdata))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Address;
    use crate::smtp::{EnhancedCode, Reply};
    use std::ffi::CStr;

    #[test]
    fn names_match_the_rust_names() {
        let name = |p: *const c_char| unsafe { CStr::from_ptr(p) }.to_str().unwrap();
        for (value, kind) in [
            EventKind::Delivered,
            EventKind::Deferred,
            EventKind::Bounced,
            EventKind::Expired,
        ]
        .into_iter()
        .enumerate()
        {
            assert_eq!(name(mxp_event_kind_str(value as c_int)), kind.as_str());
        }
        assert_eq!(name(mxp_event_kind_str(4)), "unknown");
        assert_eq!(name(mxp_event_kind_str(-1)), "unknown");
        assert_eq!(name(mxp_category_str(0)), "none");
        for category in Category::ALL {
            let value = mxp_category::from(Some(category)) as c_int;
            assert_eq!(name(mxp_category_str(value)), category.as_str());
        }
        assert_eq!(name(mxp_category_str(11)), "unknown");
    }

    #[test]
    fn events_copy_into_fixed_fields() {
        let long = "é".repeat(400);
        let event = Event {
            kind: EventKind::Deferred,
            message_id: 7,
            tag: u64::MAX,
            recipient: Address::parse("a@b.example", crate::error::Field::Sender).unwrap(),
            reply: Arc::new(Reply::new(
                451,
                Some(EnhancedCode::new(4, 3, 0)),
                long.clone(),
            )),
            destination: Arc::from("127.0.0.1:25"),
            attempts: 2,
            retry_after: Some(Duration::from_millis(1500)),
            category: Some(Category::Throttled),
            elapsed: Duration::from_millis(20),
            tls: None,
        };
        let c = mxp_event::from_event(&event);
        assert_eq!(c.kind, mxp_event_kind::Deferred);
        assert_eq!(c.category, mxp_category::Throttled);
        assert_eq!((c.code, c.enhanced_class, c.enhanced_subject), (451, 4, 3));
        assert_eq!(c.retry_after_ms, 1500);
        assert_eq!((c.message_id, c.tag), (7, u64::MAX));
        let text = |f: &[c_char]| {
            unsafe { CStr::from_ptr(f.as_ptr()) }
                .to_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(text(&c.recipient), "a@b.example");
        assert_eq!(text(&c.destination), "127.0.0.1:25");
        assert!(c.text_truncated);
        // Cut at a character boundary: 255 two-octet characters fit in 511 octets.
        assert_eq!(text(&c.text), "é".repeat(255));
    }
}
