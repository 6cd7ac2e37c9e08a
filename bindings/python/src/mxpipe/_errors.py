"""Exceptions, one class per mxp_result code, each carrying the library's detailed message."""

from typing import Dict, Type

from . import _native as n


class MxpipeError(Exception):
    """Base of every mxpipe error. ``code`` is the C ABI's mxp_result value and ``message`` the
    detailed text (which names the refused field, key or value)."""

    def __init__(self, message: str, code: int = -1) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class InvalidInput(MxpipeError, ValueError):
    """Base of the errors about a message refused at the door (nothing was queued)."""


class InvalidAddress(InvalidInput):
    """The sender or a recipient is not a valid envelope address; the message names which
    ("recipient 3: address contains a control character ...")."""


class InvalidUtf8(InvalidInput):
    """Text that must be UTF-8 is not."""


class NoRecipients(InvalidInput):
    """The recipient list is empty."""


class BodyLineTooLong(InvalidInput):
    """A body line is longer than RFC 5322's 998 octets; the message gives the line."""


class InvalidArgument(MxpipeError, ValueError):
    """A count or size is out of range (for example over 1,000,000 recipients in one call)."""


class QueueFull(MxpipeError):
    """The ingress queue is full and the timeout (if any) passed: back off and send again."""


class ShutDown(MxpipeError):
    """The dispatcher has been shut down and takes no more work."""


class ConfigError(MxpipeError, ValueError):
    """A setting's value is malformed or out of range; the message names key and value."""


class UnknownKey(ConfigError):
    """A setting does not exist; the message names it and lists the keys."""


class BadHandle(MxpipeError):
    """The dispatcher was closed (its handle freed): nothing can be done with it any more."""


class EventsUnavailable(MxpipeError):
    """Outcomes cannot be polled: events are off (record_events=False) or go to on_outcome."""


class CallbackContext(MxpipeError):
    """The call is not allowed from the on_outcome callback (closing its own dispatcher)."""


class MxpipeOSError(MxpipeError, OSError):
    """An operating-system error while starting (a thread, a socket)."""


class InternalError(MxpipeError):
    """A bug in mxpipe or in these bindings (a panic, a NULL pointer, a too small buffer)."""


_BY_CODE: Dict[int, Type[MxpipeError]] = {
    n.MXP_ERR_NULL_POINTER: InternalError,
    n.MXP_ERR_INVALID_UTF8: InvalidUtf8,
    n.MXP_ERR_INVALID_ADDRESS: InvalidAddress,
    n.MXP_ERR_NO_RECIPIENTS: NoRecipients,
    n.MXP_ERR_BODY_LINE_TOO_LONG: BodyLineTooLong,
    n.MXP_ERR_QUEUE_FULL: QueueFull,
    n.MXP_ERR_SHUT_DOWN: ShutDown,
    n.MXP_ERR_INVALID_CONFIG: ConfigError,
    n.MXP_ERR_UNKNOWN_KEY: UnknownKey,
    n.MXP_ERR_BAD_HANDLE: BadHandle,
    n.MXP_ERR_IO: MxpipeOSError,
    n.MXP_ERR_PANIC: InternalError,
    n.MXP_ERR_BUFFER_TOO_SMALL: InternalError,
    n.MXP_ERR_INVALID_ARGUMENT: InvalidArgument,
    n.MXP_ERR_EVENTS_UNAVAILABLE: EventsUnavailable,
    n.MXP_ERR_CALLBACK_CONTEXT: CallbackContext,
}


def error_for(code: int) -> MxpipeError:
    """The exception for a failed call's result code, with this thread's detailed message."""
    message = n.last_error() or n.result_str(code)
    return _BY_CODE.get(code, MxpipeError)(message, code)


def check(code: int) -> None:
    """Raises the matching exception unless ``code`` is MXP_OK."""
    if code != n.MXP_OK:
        raise error_for(code)
