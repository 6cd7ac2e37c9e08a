"""mxpipe: a high-throughput bulk SMTP dispatcher for Python.

The engine is mxpipe's Rust library, used through its C ABI (ctypes); it delivers over pooled,
pipelined SMTP connections on its own threads and reports every recipient's outcome::

    import mxpipe

    with mxpipe.Dispatcher(relay="127.0.0.1:2525") as d:
        d.send_many("news@example.org", recipients, body)   # one body, many recipients
        for outcome in d.outcomes():
            print(outcome.recipient, outcome.kind.value, outcome.code, outcome.text)

Errors are subclasses of MxpipeError, one per C result code, with the library's message.
"""

from . import _native
from ._async import AsyncDispatcher
from ._dispatcher import Category, Dispatcher, Outcome, OutcomeKind, Stats
from ._settings import Duration, Settings
from ._errors import (
    BadHandle,
    BodyLineTooLong,
    CallbackContext,
    ConfigError,
    EventsUnavailable,
    InternalError,
    InvalidAddress,
    InvalidArgument,
    InvalidInput,
    InvalidUtf8,
    MxpipeError,
    MxpipeOSError,
    NoRecipients,
    QueueFull,
    ShutDown,
    UnknownKey,
)

__version__: str = _native.lib.mxp_version().decode()
"""The version of the native library."""

__all__ = [
    "AsyncDispatcher",
    "BadHandle",
    "BodyLineTooLong",
    "CallbackContext",
    "Category",
    "ConfigError",
    "Dispatcher",
    "Duration",
    "EventsUnavailable",
    "InternalError",
    "InvalidAddress",
    "InvalidArgument",
    "InvalidInput",
    "InvalidUtf8",
    "MxpipeError",
    "MxpipeOSError",
    "NoRecipients",
    "Outcome",
    "OutcomeKind",
    "QueueFull",
    "Settings",
    "ShutDown",
    "Stats",
    "UnknownKey",
]
