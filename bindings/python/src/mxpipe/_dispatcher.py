"""The Dispatcher: a running mxpipe engine, its outcomes and its counters."""

from __future__ import annotations

import ctypes
import enum
import os
import re
import threading
import time
import traceback
import weakref
from ctypes import byref, c_char_p, c_size_t, c_uint64, c_void_p
from datetime import timedelta
from types import TracebackType
from typing import (
    TYPE_CHECKING,
    Callable,
    Iterable,
    Iterator,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Type,
    Union,
)

from . import _native as n
from ._settings import Settings

if TYPE_CHECKING:
    from typing_extensions import Unpack
from ._errors import (
    _BY_CODE as _ERRORS,
    BadHandle,
    CallbackContext,
    InvalidAddress,
    InvalidUtf8,
    MxpipeError,
    check,
    error_for,
)

Address = Union[str, bytes]
Body = Union[bytes, bytearray, memoryview, str]
Setting = Union[str, int, float, bool, timedelta, "os.PathLike[str]"]

# Blocking calls wait in slices of this many seconds, so that Ctrl-C and close() from another
# thread are noticed.
_SLICE = 0.25


class OutcomeKind(str, enum.Enum):
    """What happened to one recipient."""

    DELIVERED = "delivered"
    """The destination accepted the message (final)."""
    DEFERRED = "deferred"
    """A temporary failure; the recipient will be tried again after ``retry_after``."""
    BOUNCED = "bounced"
    """A permanent failure (final)."""
    EXPIRED = "expired"
    """Temporary failures until the maximum age passed (final)."""


_KINDS = (OutcomeKind.DELIVERED, OutcomeKind.DEFERRED, OutcomeKind.BOUNCED, OutcomeKind.EXPIRED)


class Category(str, enum.Enum):
    """Why a recipient was not delivered (mxpipe's classification of the reply). A str enum:
    ``Category.BAD_MAILBOX == "bad_mailbox"``."""

    BAD_MAILBOX = "bad_mailbox"
    """The mailbox does not exist, is disabled, or the address is invalid."""
    MAILBOX_FULL = "mailbox_full"
    NO_SUCH_DOMAIN = "no_such_domain"
    """The domain does not exist or accepts no mail (null MX)."""
    POLICY_BLOCK = "policy_block"
    """Refused for spam, reputation, authentication (SPF/DKIM/DMARC) or local policy."""
    THROTTLED = "throttled"
    """Slow down: rate limits, too many connections, temporary reputation deferrals."""
    TLS = "tls"
    DNS = "dns"
    CONNECTION = "connection"
    """The connection could not be made, was lost, or timed out."""
    PROTOCOL = "protocol"
    OTHER = "other"


# By C value (mxp_category); 0 is "none" (delivered).
_CATEGORIES: Tuple[Optional[Category], ...] = (None, *(Category(name) for name in n.CATEGORIES[1:]))


class Outcome(NamedTuple):
    """One outcome for one recipient."""

    kind: OutcomeKind
    category: Optional[Category]
    """Why it was not delivered; None when delivered."""
    message_id: int
    """The identifier ``send`` (or ``send_many``) returned."""
    tag: int
    """The ``tag`` given to ``send`` (or ``send_many``); 0 unless given."""
    recipient: str
    code: int
    """The server's reply code; 0 when there was no reply (connection failure, timeout)."""
    enhanced: Optional[Tuple[int, int, int]]
    """The enhanced status code (class, subject, detail), or None."""
    text: str
    """The server's reply text (lines joined by newlines), or the reason when code is 0."""
    text_truncated: bool
    """True when the reply text was longer than 511 octets and was cut."""
    destination: str
    """The host:port the attempt went to."""
    attempts: int
    retry_after: Optional[float]
    """For DEFERRED: seconds until the next attempt."""
    elapsed: float
    """Seconds since the message was enqueued."""

    @property
    def final(self) -> bool:
        """Delivered, bounced and expired end a recipient's story; deferred does not."""
        return self.kind is not OutcomeKind.DEFERRED


class Stats(NamedTuple):
    """A dispatcher's counters (see ``Dispatcher.stats``)."""

    submitted_messages: int
    submitted_recipients: int
    delivered: int
    deferred: int
    bounced: int
    expired: int
    in_flight: int
    """Recipients without a final outcome (queued, in a transaction, or waiting to retry)."""
    connections_opened: int
    connections_open: int
    transactions: int
    final_events_read: int
    """Final outcomes handed out so far (by poll, outcomes or on_outcome)."""


def _outcome(event: n.Event) -> Outcome:
    enhanced = (
        (event.enhanced_class, event.enhanced_subject, event.enhanced_detail)
        if event.enhanced_class
        else None
    )
    return Outcome(
        kind=_KINDS[event.kind],
        category=(
            _CATEGORIES[event.category] if event.category < len(_CATEGORIES) else Category.OTHER
        ),
        message_id=event.message_id,
        tag=event.tag,
        recipient=event.recipient.decode("utf-8", "replace"),
        code=event.code,
        enhanced=enhanced,
        text=event.text.decode("utf-8", "replace"),
        text_truncated=bool(event.text_truncated),
        destination=event.destination.decode("utf-8", "replace"),
        attempts=event.attempts,
        retry_after=None if event.retry_after_ms < 0 else event.retry_after_ms / 1000,
        elapsed=event.elapsed_ms / 1000,
    )


def _setting_text(value: Setting) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, timedelta):
        return repr(value.total_seconds())
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def _encode(value: str, what: str) -> bytes:
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidUtf8(f"{what}: not valid UTF-8 (it has unpaired surrogates)",
                          n.MXP_ERR_INVALID_UTF8) from None


def _address(value: Address, field: str) -> bytes:
    """An address as C takes it; the errors match the library's (which cannot see a NUL)."""
    if isinstance(value, str):
        try:
            data = value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidUtf8(f"{field}: address is not valid UTF-8", n.MXP_ERR_INVALID_UTF8) from None
    elif isinstance(value, bytes):
        data = bytes(value)
    else:
        raise TypeError(f"{field}: expected str or bytes, not {type(value).__name__}")
    if b"\0" in data:
        raise InvalidAddress(
            f"{field}: address contains a control character (CR, LF, NUL or another)",
            n.MXP_ERR_INVALID_ADDRESS,
        )
    return data


def _check_address_types(recipients: Sequence[Address], offset: int) -> None:
    """TypeError naming the first recipient that is neither str nor bytes."""
    for i, r in enumerate(recipients):
        if not isinstance(r, (str, bytes)):
            raise TypeError(
                f"recipient {offset + i}: expected str or bytes, not {type(r).__name__}"
            )


def _recipient_array(
    recipients: Sequence[Address], offset: int = 0
) -> Tuple["ctypes.Array[c_char_p]", List[bytes]]:
    """The recipients as a C array of strings (and the bytes objects it points into)."""
    try:
        # bytes(5) would be five NULs: only str and bytes are addresses.
        encoded = [r.encode("utf-8") if isinstance(r, str) else r for r in recipients]
        if not all(type(r) is bytes for r in encoded):
            _check_address_types(recipients, offset)
            encoded = [bytes(r) for r in encoded]  # bytes subclasses
    except UnicodeEncodeError:
        encoded = [_address(r, f"recipient {offset + i}") for i, r in enumerate(recipients)]
    if b"\0" in b"".join(encoded):
        for i, r in enumerate(encoded):
            _address(r, f"recipient {offset + i}")
    array = (c_char_p * len(encoded))(*encoded)
    return array, encoded


def _check_tag(tag: int) -> int:
    if not isinstance(tag, int) or isinstance(tag, bool):
        raise TypeError(f"tag: expected int, not {type(tag).__name__}")
    if not 0 <= tag < 2**64:
        raise ValueError(f"tag: {tag} is not from 0 to 2**64 - 1")
    return tag


def _body_bytes(body: Body) -> bytes:
    if isinstance(body, str):
        return _encode(body, "body")
    return bytes(body)


def _timeout_ms(seconds: float) -> int:
    return max(0, min(int(seconds * 1000), n.WAIT_FOREVER - 1))


def _stop(handle: int, timeout: Optional[float]) -> Tuple[int, str]:
    """Shuts a dispatcher down (``timeout`` None: without limit) on a helper thread while this
    one waits in slices, so that a Ctrl-C is seen here (a C call cannot be interrupted): it cuts
    the shutdown short, and KeyboardInterrupt is raised once it has ended. Returns the result
    code and the library's message."""
    wait_ms = n.WAIT_FOREVER if timeout is None else _timeout_ms(timeout)
    result: List[Tuple[int, str]] = []

    def run() -> None:
        code = n.lib.mxp_dispatcher_shutdown_timeout(handle, wait_ms)
        result.append((code, n.last_error() if code != n.MXP_OK else ""))

    helper = threading.Thread(target=run, name="mxpipe-shutdown", daemon=True)
    helper.start()
    try:
        while helper.is_alive():
            helper.join(_SLICE)
    except KeyboardInterrupt:
        n.lib.mxp_dispatcher_shutdown_timeout(handle, 0)
        helper.join()
        raise
    return result[0]


def _release(handle: int, keepalive: object) -> None:
    """Frees a dispatcher handle left open (garbage collection, or interpreter exit): what was
    sent is delivered first, unless Ctrl-C cuts that short."""
    try:
        _stop(handle, None)
    except KeyboardInterrupt:
        pass  # the shutdown was cut short: the free below is prompt
    finally:
        n.lib.mxp_dispatcher_free(handle)
        del keepalive  # the callback object had to live until the handle was freed


class Dispatcher:
    """A running mxpipe engine: delivers messages over SMTP through a relay (or per-domain routes)
    and reports every recipient's outcome.

    Settings are the C API's configuration keys, as keyword arguments::

        with Dispatcher(relay="127.0.0.1:2525", max_connections_per_destination=8,
                        connect_timeout=10, routes={"example.org": "10.0.0.5:25"}) as d:
            d.send("news@example.org", ["a@example.net"], b"Subject: hi\\r\\n\\r\\nHello\\r\\n")
            for outcome in d.outcomes(timeout=30):
                print(outcome.recipient, outcome.kind, outcome.code, outcome.text)

    The keys and their types are those of ``mxpipe.Settings`` (a TypedDict: mypy and other type
    checkers catch a misspelt key or a wrong type); keys that may repeat (source_address,
    limit_override, classify_rule, mx_nameservers) take a list too. Durations are seconds (int,
    float or timedelta) or text such as "250ms".

    Every method may be called from any thread; calls that wait release the GIL. ``on_outcome``,
    if given, is called with each Outcome on a thread of mxpipe's (not the caller's, never an
    event-loop thread); outcomes then do not go to ``poll``/``outcomes``. It must not close its
    own dispatcher. A dispatcher left open is closed when it is garbage-collected or when the
    interpreter exits.
    """

    def __init__(
        self,
        relay: Optional[str] = None,
        *,
        routes: Optional[Mapping[str, str]] = None,
        on_outcome: Optional[Callable[[Outcome], None]] = None,
        **settings: Unpack[Settings],
    ) -> None:
        config = c_void_p()
        check(n.lib.mxp_config_new(byref(config)))
        try:
            items: List[Tuple[str, Setting]] = []
            if relay is not None:
                items.append(("relay", relay))
            for domain, target in (routes or {}).items():
                items.append(("route", f"{domain}={target}"))
            for key, value in settings.items():
                if isinstance(value, (list, tuple)):
                    items.extend((key, one) for one in value)
                else:
                    items.append((key, value))  # type: ignore[arg-type]
            for key, value in items:
                check(n.lib.mxp_config_set(config, _encode(key, "key"),
                                           _encode(_setting_text(value), key)))
            self._start(config, on_outcome)
        finally:
            n.lib.mxp_config_free(config)

    @classmethod
    def from_toml(
        cls, text: str, *, on_outcome: Optional[Callable[[Outcome], None]] = None
    ) -> "Dispatcher":
        """A dispatcher configured by a TOML document: top-level keys as in the constructor, and
        a ``[routes]`` table mapping domains to host:port."""
        config = c_void_p()
        check(n.lib.mxp_config_from_toml(_encode(text, "toml"), byref(config)))
        self = cls.__new__(cls)
        try:
            self._start(config, on_outcome)
        finally:
            n.lib.mxp_config_free(config)
        return self

    def _start(self, config: c_void_p, on_outcome: Optional[Callable[[Outcome], None]]) -> None:
        handle = c_void_p()
        check(n.lib.mxp_dispatcher_new(config, byref(handle)))
        if handle.value is None:  # the library writes a handle on success
            raise MxpipeError("mxp_dispatcher_new gave no handle", n.MXP_ERR_PANIC)
        self._handle: int = handle.value
        self._local = threading.local()
        # The thread the callback runs on, once it has run (close() is refused there).
        self._callback_thread: List[Optional[int]] = [None]
        callback = None
        if on_outcome is not None:
            callback = n.EVENT_CALLBACK(_callback_trampoline(on_outcome, self._callback_thread))
        self._finalizer = weakref.finalize(self, _release, self._handle, callback)
        if callback is not None:
            check(n.lib.mxp_dispatcher_set_callback(self._handle, callback, None))

    # ----- sending ----------------------------------------------------------------------------

    def send(
        self,
        sender: Address,
        recipients: Union[Address, Sequence[Address]],
        body: Body,
        *,
        tag: int = 0,
        timeout: Optional[float] = None,
    ) -> int:
        """Queues one message and returns its identifier (outcomes carry it, and ``tag``: any
        integer from 0 to 2**64 - 1 of the caller's, echoed in each of its outcomes).

        ``sender`` "" is the null sender. ``body`` is the whole message (headers and body); bare
        LF becomes CRLF. When the queue is full, waits up to ``timeout`` seconds for room (None:
        as long as it takes; 0: not at all), then raises QueueFull. Bad input raises
        InvalidAddress, InvalidUtf8, NoRecipients or BodyLineTooLong naming the field.
        """
        _check_tag(tag)
        if isinstance(recipients, (str, bytes)):
            recipients = [recipients]
        array, keep = _recipient_array(recipients)
        sender_bytes = _address(sender, "sender")
        content = _body_bytes(body)
        message_id = c_uint64()

        def attempt(wait_ms: int) -> int:
            return int(n.lib.mxp_dispatcher_enqueue_timeout(
                self._handle, sender_bytes, array, len(keep), content, len(content), tag,
                wait_ms, byref(message_id),
            ))

        self._enqueue(attempt, timeout)
        return message_id.value

    def send_many(
        self,
        sender: Address,
        recipients: Iterable[Address],
        body: Body,
        *,
        chunk_size: int = 1000,
        tag: int = 0,
        timeout: Optional[float] = None,
    ) -> List[int]:
        """The bulk path: one body, prepared once and shared, for many recipients.

        Recipients are queued ``chunk_size`` to a message (each message is then sent in
        transactions of ``max_recipients_per_transaction``). Returns the message identifiers,
        one per chunk; every outcome carries ``tag``. If a recipient is refused, the exception
        names its index in
        ``recipients``; the chunks before it are queued and their identifiers are in the
        exception's ``message_ids``.
        """
        _check_tag(tag)
        if not 1 <= chunk_size <= n.MXP_MAX_RECIPIENTS:
            raise ValueError(f"chunk_size must be from 1 to {n.MXP_MAX_RECIPIENTS}")
        content = _body_bytes(body)
        sender_bytes = _address(sender, "sender")
        prepared = c_void_p()
        check(n.lib.mxp_body_new(content, len(content), byref(prepared)))
        ids: List[int] = []
        message_id = c_uint64()
        try:
            pending = list(recipients) if not isinstance(recipients, (list, tuple)) else recipients
            if not pending:
                check(n.lib.mxp_dispatcher_enqueue_body(
                    self._handle, sender_bytes, None, 0, prepared, tag, byref(message_id)))
            for start in range(0, len(pending), chunk_size):
                chunk = pending[start:start + chunk_size]
                try:
                    array, keep = _recipient_array(chunk, start)

                    def attempt(wait_ms: int) -> int:
                        return int(n.lib.mxp_dispatcher_enqueue_body_timeout(
                            self._handle, sender_bytes, array, len(keep), prepared, tag,
                            wait_ms, byref(message_id),
                        ))

                    self._enqueue(attempt, timeout, offset=start)
                except MxpipeError as error:
                    error.message_ids = ids  # type: ignore[attr-defined]
                    raise
                ids.append(message_id.value)
        finally:
            n.lib.mxp_body_free(prepared)
        return ids

    def _enqueue(self, attempt: Callable[[int], int], timeout: Optional[float],
                 offset: int = 0) -> None:
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            wait = _SLICE if deadline is None else min(_SLICE, deadline - time.monotonic())
            code = attempt(_timeout_ms(max(0.0, wait)))
            if code == n.MXP_OK:
                return
            if code != n.MXP_ERR_QUEUE_FULL or (
                deadline is not None and time.monotonic() >= deadline
            ):
                error = error_for(code)
                if offset and error.message.startswith("recipient "):
                    error = type(error)(_shift_index(error.message, offset), error.code)
                raise error

    # ----- outcomes ---------------------------------------------------------------------------

    def _buffer(self, capacity: int) -> "ctypes.Array[n.Event]":
        buffer = getattr(self._local, "events", None)
        if buffer is None or len(buffer) < capacity:
            buffer = (n.Event * max(capacity, 256))()
            self._local.events = buffer
        return buffer

    def _drain(self, capacity: int, wait: Optional[float]) -> List[Outcome]:
        buffer = self._buffer(capacity)
        count = c_size_t()
        if wait is None:
            code = n.lib.mxp_dispatcher_poll_events(self._handle, buffer, capacity, byref(count))
        else:
            code = n.lib.mxp_dispatcher_wait_events(
                self._handle, buffer, capacity, _timeout_ms(wait), byref(count)
            )
        check(code)
        return [_outcome(buffer[i]) for i in range(count.value)]

    def poll(self, max: int = 1024) -> List[Outcome]:
        """The outcomes waiting now (at most ``max``), without blocking. Each outcome is handed
        out once, to one caller."""
        return self._drain(max, None)

    def outcomes(self, timeout: Optional[float] = None) -> Iterator[Outcome]:
        """Yields outcomes as they come (deferrals included) until every recipient sent so far
        has had its final outcome handed out, or ``timeout`` seconds pass (then it just stops;
        check ``stats().in_flight``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            stats = self.stats()
            if stats.final_events_read >= stats.submitted_recipients:
                # Read before the wait above: every final outcome has been handed out.
                return
            wait = _SLICE if deadline is None else min(_SLICE, deadline - time.monotonic())
            if wait <= 0:
                return
            yield from self._drain(1024, wait)

    def __iter__(self) -> Iterator[Outcome]:
        """Same as ``outcomes()``."""
        return self.outcomes()

    # ----- state ------------------------------------------------------------------------------

    def stats(self) -> Stats:
        """The counters now."""
        raw = n.Stats()
        check(n.lib.mxp_dispatcher_stats(self._handle, byref(raw)))
        return Stats(*(getattr(raw, field[0]) for field in n.Stats._fields_))

    def flush(self) -> None:
        """Waits until every queued recipient has a final outcome or waits for a retry."""
        check(n.lib.mxp_dispatcher_flush(self._handle))

    def sync(self) -> None:
        """With a spool (``spool_dir``): waits until every message sent before the call is
        durable (written and fsynced), so that it may be acknowledged upstream. Without a spool
        it returns at once. Raises MxpipeOSError, naming the problem, when the spool refused a
        batch or an fsync failed (it then takes nothing more)."""
        check(n.lib.mxp_dispatcher_sync(self._handle))

    def durable_id(self) -> int:
        """With a spool: every message whose identifier (from ``send``) is at most this is
        durable; identifiers grow across restarts. Without a spool: 0. Never blocks."""
        out = c_uint64()
        check(n.lib.mxp_dispatcher_durable_id(self._handle, byref(out)))
        return out.value

    def wait_final(self, timeout: float) -> bool:
        """Waits up to ``timeout`` seconds until every queued recipient has a final outcome
        (retries included). True if they all have."""
        deadline = time.monotonic() + timeout
        while True:
            wait = min(_SLICE, deadline - time.monotonic())
            code = n.lib.mxp_dispatcher_wait_final(self._handle, _timeout_ms(max(0.0, wait)))
            if code == n.MXP_OK:
                return True
            if code != n.MXP_ERR_TIMED_OUT:
                raise error_for(code)
            if time.monotonic() >= deadline:
                return False

    def shutdown(self, timeout: Optional[float] = None) -> bool:
        """Stops taking work (later sends raise ShutDown), lets what is queued and in
        transactions go on, and stops the engine. Outcomes and counters stay readable until
        ``close``.

        With ``timeout`` (seconds), whatever is not final when it passes is cut short: each such
        recipient gets a DEFERRED outcome with code 0, enhanced (4, 3, 2) and the reason, and
        connections are closed at once. Returns True when nothing was cut short. Ctrl-C while
        this waits cuts the shutdown short the same way, then raises KeyboardInterrupt.
        """
        return self._stop(self._handle, timeout)

    def _stop(self, handle: int, timeout: Optional[float]) -> bool:
        code, message = _stop(handle, timeout)
        if code not in (n.MXP_OK, n.MXP_ERR_TIMED_OUT):
            raise _ERRORS.get(code, MxpipeError)(message, code)
        return code == n.MXP_OK

    def close(self, timeout: Optional[float] = None) -> None:
        """Shuts down (see ``shutdown``, and its ``timeout``) and frees the engine; with an
        ``on_outcome`` callback, it has returned from its last outcome when this returns. Later
        calls raise BadHandle; closing twice is fine. Not allowed from this dispatcher's own
        on_outcome callback. Ctrl-C while this waits cuts the shutdown short (the recipients
        left get DEFERRED outcomes), frees the engine and raises KeyboardInterrupt."""
        info = self._finalizer.peek()
        if info is None:
            return
        handle, callback = info[2]
        if threading.get_ident() == self._callback_thread[0]:
            raise CallbackContext(
                "close: not allowed from the dispatcher's own event callback (on_outcome)",
                n.MXP_ERR_CALLBACK_CONTEXT,
            )
        try:
            self._stop(handle, timeout)
        except BadHandle:
            pass  # closed by another thread meanwhile
        finally:
            # After a KeyboardInterrupt too: the shutdown was cut short, so this is prompt.
            code = n.lib.mxp_dispatcher_free(handle)
            # Freed here, or by a close() racing on another thread (BadHandle): either way done.
            self._finalizer.detach()
            del callback  # kept alive until the callback thread was joined by the free above
        if code not in (n.MXP_OK, n.MXP_ERR_BAD_HANDLE):
            raise error_for(code)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> "Dispatcher":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        # Ctrl-C inside the block stops at once: what is not final is reported as deferred.
        self.close(timeout=0 if exc_type is KeyboardInterrupt else None)

    def __repr__(self) -> str:
        return f"<mxpipe.Dispatcher {'closed' if self.closed else hex(self._handle)}>"


_INDEX = re.compile(r"^recipient (\d+)")


def _shift_index(message: str, offset: int) -> str:
    """Turns a chunk's "recipient 3" into the index in the caller's whole list."""
    return _INDEX.sub(lambda m: f"recipient {int(m.group(1)) + offset}", message, count=1)


def _callback_trampoline(
    on_outcome: Callable[[Outcome], None], thread: List[Optional[int]]
) -> Callable[[Optional[int], "ctypes._Pointer[n.Event]"], None]:
    def trampoline(_userdata: Optional[int], event: "ctypes._Pointer[n.Event]") -> None:
        thread[0] = threading.get_ident()
        try:
            on_outcome(_outcome(event.contents))
        except BaseException:  # noqa: BLE001 - an exception cannot cross into C
            traceback.print_exc()

    return trampoline

