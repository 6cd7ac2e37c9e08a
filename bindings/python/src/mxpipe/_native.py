"""The C ABI of libmxpipe as ctypes declarations (mirrors include/mxpipe.h).

Only this module knows the C types. The library is loaded with ctypes.CDLL, so every call
releases the GIL while it runs: blocking calls (waiting for room in the queue, for events, for a
flush) never stop other Python threads.
"""

import ctypes
import os
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_bool,
    c_char,
    c_char_p,
    c_int,
    c_int64,
    c_size_t,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    c_void_p,
)
from pathlib import Path

# mxp_result values (never renumbered).
MXP_OK = 0
MXP_ERR_NULL_POINTER = 1
MXP_ERR_INVALID_UTF8 = 2
MXP_ERR_INVALID_ADDRESS = 3
MXP_ERR_NO_RECIPIENTS = 4
MXP_ERR_BODY_LINE_TOO_LONG = 5
MXP_ERR_QUEUE_FULL = 6
MXP_ERR_SHUT_DOWN = 7
MXP_ERR_INVALID_CONFIG = 8
MXP_ERR_UNKNOWN_KEY = 9
MXP_ERR_BAD_HANDLE = 10
MXP_ERR_IO = 11
MXP_ERR_PANIC = 12
MXP_ERR_BUFFER_TOO_SMALL = 13
MXP_ERR_INVALID_ARGUMENT = 14
MXP_ERR_EVENTS_UNAVAILABLE = 15
MXP_ERR_CALLBACK_CONTEXT = 16
MXP_ERR_TIMED_OUT = 17

MXP_RECIPIENT_SIZE = 256
MXP_DESTINATION_SIZE = 264
MXP_REPLY_TEXT_SIZE = 512
MXP_LAST_ERROR_SIZE = 512
MXP_MAX_RECIPIENTS = 1_000_000
WAIT_FOREVER = 2**64 - 1

# mxp_category values, by name (the index is the C value).
CATEGORIES = (
    None,
    "bad_mailbox",
    "mailbox_full",
    "no_such_domain",
    "policy_block",
    "throttled",
    "tls",
    "dns",
    "connection",
    "protocol",
    "other",
)


class Event(Structure):
    """struct mxp_event."""

    _fields_ = [
        ("kind", c_int),
        ("category", c_int),
        ("message_id", c_uint64),
        ("tag", c_uint64),
        ("code", c_uint16),
        ("enhanced_class", c_uint8),
        ("enhanced_subject", c_uint16),
        ("enhanced_detail", c_uint16),
        ("attempts", c_uint32),
        ("retry_after_ms", c_int64),
        ("elapsed_ms", c_uint64),
        ("text_truncated", c_bool),
        ("recipient", c_char * MXP_RECIPIENT_SIZE),
        ("destination", c_char * MXP_DESTINATION_SIZE),
        ("text", c_char * MXP_REPLY_TEXT_SIZE),
    ]


class Stats(Structure):
    """struct mxp_stats."""

    _fields_ = [
        (name, c_uint64)
        for name in (
            "submitted_messages",
            "submitted_recipients",
            "delivered",
            "deferred",
            "bounced",
            "expired",
            "in_flight",
            "connections_opened",
            "connections_open",
            "transactions",
            "final_events_read",
        )
    ]


EVENT_CALLBACK = CFUNCTYPE(None, c_void_p, POINTER(Event))


def _load() -> ctypes.CDLL:
    override = os.environ.get("MXPIPE_LIBRARY")
    if override:
        return ctypes.CDLL(override)
    here = Path(__file__).resolve().parent
    for name in ("libmxpipe.so", "libmxpipe.dylib", "mxpipe.dll"):
        candidate = here / name
        if candidate.exists():
            return ctypes.CDLL(str(candidate))
    raise ImportError(
        f"mxpipe: the native library is not in {here}; install the package with "
        "`pip install ./bindings/python` (which builds it) or set MXPIPE_LIBRARY"
    )


lib = _load()

_HANDLE = c_void_p
_OUT_HANDLE = POINTER(c_void_p)
_STRINGS = POINTER(c_char_p)
# Bodies are passed as bytes objects (a pointer to their buffer, NUL bytes included) with a length.
_BYTES = c_char_p

_PROTOTYPES = {
    "mxp_version": (c_char_p, []),
    "mxp_result_str": (c_char_p, [c_int]),
    "mxp_last_error_len": (c_size_t, []),
    "mxp_last_error": (c_int, [c_char_p, c_size_t]),
    "mxp_config_new": (c_int, [_OUT_HANDLE]),
    "mxp_config_from_toml": (c_int, [c_char_p, _OUT_HANDLE]),
    "mxp_config_set": (c_int, [_HANDLE, c_char_p, c_char_p]),
    "mxp_config_free": (c_int, [_HANDLE]),
    "mxp_dispatcher_new": (c_int, [_HANDLE, _OUT_HANDLE]),
    "mxp_dispatcher_free": (c_int, [_HANDLE]),
    "mxp_dispatcher_enqueue": (
        c_int,
        [_HANDLE, c_char_p, _STRINGS, c_size_t, _BYTES, c_size_t, c_uint64, POINTER(c_uint64)],
    ),
    "mxp_dispatcher_enqueue_timeout": (
        c_int,
        [_HANDLE, c_char_p, _STRINGS, c_size_t, _BYTES, c_size_t, c_uint64, c_uint64,
         POINTER(c_uint64)],
    ),
    "mxp_body_new": (c_int, [_BYTES, c_size_t, _OUT_HANDLE]),
    "mxp_body_free": (c_int, [_HANDLE]),
    "mxp_dispatcher_enqueue_body": (
        c_int,
        [_HANDLE, c_char_p, _STRINGS, c_size_t, _HANDLE, c_uint64, POINTER(c_uint64)],
    ),
    "mxp_dispatcher_enqueue_body_timeout": (
        c_int,
        [_HANDLE, c_char_p, _STRINGS, c_size_t, _HANDLE, c_uint64, c_uint64, POINTER(c_uint64)],
    ),
    "mxp_dispatcher_flush": (c_int, [_HANDLE]),
    "mxp_dispatcher_wait_final": (c_int, [_HANDLE, c_uint64]),
    "mxp_dispatcher_sync": (c_int, [_HANDLE]),
    "mxp_dispatcher_durable_id": (c_int, [_HANDLE, POINTER(c_uint64)]),
    "mxp_dispatcher_shutdown": (c_int, [_HANDLE]),
    "mxp_dispatcher_shutdown_timeout": (c_int, [_HANDLE, c_uint64]),
    "mxp_dispatcher_stats": (c_int, [_HANDLE, POINTER(Stats)]),
    "mxp_dispatcher_poll_events": (c_int, [_HANDLE, POINTER(Event), c_size_t, POINTER(c_size_t)]),
    "mxp_dispatcher_wait_events": (
        c_int,
        [_HANDLE, POINTER(Event), c_size_t, c_uint64, POINTER(c_size_t)],
    ),
    "mxp_dispatcher_set_callback": (c_int, [_HANDLE, EVENT_CALLBACK, c_void_p]),
}

for _name, (_restype, _argtypes) in _PROTOTYPES.items():
    _function = getattr(lib, _name)
    _function.restype = _restype
    _function.argtypes = _argtypes


def last_error() -> str:
    """The detailed message of the latest failed call on this thread."""
    buffer = ctypes.create_string_buffer(MXP_LAST_ERROR_SIZE)
    if lib.mxp_last_error(buffer, MXP_LAST_ERROR_SIZE) != MXP_OK:
        return ""
    return buffer.value.decode("utf-8", "replace")


def result_str(code: int) -> str:
    text: bytes = lib.mxp_result_str(code)
    return text.decode()
