"""Every kind of bad input, from Python: a typed exception with a readable message, never a
crash. The last tests go below the Pythonic API and pass NULLs and stale handles to the C ABI
itself through ctypes."""

from __future__ import annotations

import ctypes
import time
from ctypes import byref, c_char_p, c_size_t, c_uint64, c_void_p

import pytest

import mxpipe
from mxpipe import _native as n

BODY = b"Subject: t\r\n\r\nbody\r\n"


@pytest.fixture
def dispatcher(sink):
    with mxpipe.Dispatcher(relay=sink) as d:
        yield d


@pytest.mark.parametrize(
    "sender, recipients, error, message",
    [
        ("a@example.org", ["ok@example.net", "x@example.net\r\nRCPT TO:<evil@example.net>"],
         mxpipe.InvalidAddress,
         "recipient 1: address contains a control character (CR, LF, NUL or another)"),
        ("a@example.org", ["ok@example.net", "nul\0@example.net"], mxpipe.InvalidAddress,
         "recipient 1: address contains a control character (CR, LF, NUL or another)"),
        ("a\0@example.org", ["ok@example.net"], mxpipe.InvalidAddress,
         "sender: address contains a control character (CR, LF, NUL or another)"),
        ("a@example.org", [b"\xff@example.net"], mxpipe.InvalidUtf8,
         "recipient 0: address is not valid UTF-8"),
        (b"\xc0@example.org", ["ok@example.net"], mxpipe.InvalidUtf8,
         "sender: address is not valid UTF-8"),
        ("a@example.org", ["ok@example.net", "\udcff@example.net"], mxpipe.InvalidUtf8,
         "recipient 1: address is not valid UTF-8"),
        ("a@example.org", [], mxpipe.NoRecipients, "recipients: the message has no recipients"),
        ("a@example.org", [""], mxpipe.InvalidAddress, "recipient 0: address is empty"),
        ("nobody", ["ok@example.net"], mxpipe.InvalidAddress, "sender: address has no '@'"),
        ("a@example.org", ["<ok@example.net>"], mxpipe.InvalidAddress,
         "recipient 0: address contains '<' or '>'"),
        ("a@example.org", ["x" * 300 + "@example.net"], mxpipe.InvalidAddress,
         "recipient 0: address is over 254 octets"),
    ],
)
def test_bad_envelopes_are_refused_naming_the_field(dispatcher, sender, recipients, error, message):
    with pytest.raises(error) as raised:
        dispatcher.send(sender, recipients, BODY)
    assert str(raised.value).startswith(message)
    assert isinstance(raised.value, mxpipe.InvalidInput)
    with pytest.raises(error):
        dispatcher.send_many(sender, recipients, BODY)
    assert dispatcher.stats().submitted_messages == 0


def test_an_over_long_body_line_is_refused(dispatcher):
    body = b"Subject: x\r\n\r\n" + b"y" * 1000 + b"\r\n"
    with pytest.raises(mxpipe.BodyLineTooLong,
                       match=r"^body: line 3 is 1000 octets long; RFC 5322 allows at most 998$"):
        dispatcher.send("a@example.org", ["b@example.net"], body)
    with pytest.raises(mxpipe.BodyLineTooLong, match="line 3"):
        dispatcher.send_many("a@example.org", ["b@example.net"], body)


def test_send_many_names_the_index_in_the_whole_list(dispatcher):
    recipients = [f"u{i}@example.net" for i in range(2500)]
    recipients[1500] = "bad address@example.net"
    with pytest.raises(mxpipe.InvalidAddress, match="^recipient 1500: address contains whitespace") as e:
        dispatcher.send_many("a@example.org", recipients, BODY, chunk_size=1000)
    assert len(e.value.message_ids) == 1  # the first chunk was queued
    assert dispatcher.stats().submitted_recipients == 1000


def test_too_many_recipients_in_one_call(dispatcher):
    with pytest.raises(mxpipe.InvalidArgument, match="n_recipients: 1000001 is over the limit"):
        dispatcher.send("a@example.org", ["b@example.net"] * 1_000_001, BODY)


@pytest.mark.parametrize(
    "settings, error, message",
    [
        ({"relai": "127.0.0.1:25"}, mxpipe.UnknownKey, 'unknown configuration key "relai"'),
        ({"relay": "127.0.0.1"}, mxpipe.ConfigError, 'config relay: "127.0.0.1" is not host:port'),
        ({"relay": "127.0.0.1:25", "connect_timeout": "soon"}, mxpipe.ConfigError,
         'config connect_timeout: "soon" is not a duration'),
        ({"relay": "127.0.0.1:25", "max_connections_per_destination": 0}, mxpipe.ConfigError,
         'config max_connections_per_destination: "0" is not a whole number from 1'),
        ({"relay": "127.0.0.1:25", "retry_jitter": 1.5}, mxpipe.ConfigError,
         'config retry_jitter: "1.5"'),
        ({}, mxpipe.ConfigError, "config relay: no relay, route or direct MX delivery is configured"),
        ({"relay": "host.invalid:25"}, mxpipe.ConfigError,
         'config relay: the host does not resolve (value "host.invalid:25")'),
    ],
)
def test_bad_settings_name_key_and_value(settings, error, message):
    with pytest.raises(error) as raised:
        mxpipe.Dispatcher(**settings)
    assert str(raised.value).startswith(message)


def test_bad_toml():
    with pytest.raises(mxpipe.ConfigError, match="not valid TOML"):
        mxpipe.Dispatcher.from_toml("relay = ")
    with pytest.raises(mxpipe.UnknownKey, match='"nope"'):
        mxpipe.Dispatcher.from_toml('nope = 1')


def test_calls_after_shutdown(sink):
    with mxpipe.Dispatcher(relay=sink) as d:
        d.send("a@example.org", ["b@example.net"], BODY)
        d.shutdown()
        d.shutdown()  # a second shutdown does nothing
        for call in (
            lambda: d.send("a@example.org", ["b@example.net"], BODY),
            lambda: d.send_many("a@example.org", ["b@example.net"], BODY),
            d.flush,
            lambda: d.wait_final(1),
        ):
            with pytest.raises(mxpipe.ShutDown, match="the dispatcher has been shut down"):
                call()
        # Reading is still fine: the outcome produced during shutdown is there.
        assert [o.kind for o in d.poll()] == [mxpipe.OutcomeKind.DELIVERED]
        assert d.stats().delivered == 1


def test_calls_after_close(sink):
    d = mxpipe.Dispatcher(relay=sink)
    d.close()
    d.close()  # closing twice is fine
    assert d.closed
    for call in (
        lambda: d.send("a@example.org", ["b@example.net"], BODY),
        lambda: d.send_many("a@example.org", ["b@example.net"], BODY),
        d.stats, d.poll, d.flush, d.shutdown,
    ):
        with pytest.raises(mxpipe.BadHandle, match="dispatcher handle 0x[0-9a-f]+ is not live"):
            call()


def test_queue_full(slow_sink):
    # The loop holds one recipient (the slow sink answers DATA after 2 s) and the queue one
    # message: the next send finds the queue full.
    with mxpipe.Dispatcher(relay=slow_sink, queue_capacity=1, max_queued_recipients=1) as d:
        d.send("a@example.org", ["b@example.net"], BODY)
        deadline = time.monotonic() + 10
        while d.stats().connections_opened == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        d.send("a@example.org", ["b@example.net"], BODY)
        with pytest.raises(mxpipe.QueueFull, match="queue full"):
            d.send("a@example.org", ["b@example.net"], BODY, timeout=0)
        with pytest.raises(mxpipe.QueueFull):
            d.send_many("a@example.org", ["b@example.net"], BODY, timeout=0.05)


def test_events_turned_off(sink):
    with mxpipe.Dispatcher(relay=sink, record_events=False) as d:
        d.send("a@example.org", ["b@example.net"], BODY)
        with pytest.raises(mxpipe.EventsUnavailable, match="record_events = false"):
            d.poll()
    with pytest.raises(mxpipe.EventsUnavailable, match="record_events = false"):
        mxpipe.Dispatcher(relay=sink, record_events=False, on_outcome=print)


# ----- the C ABI itself ---------------------------------------------------------------------


def raw_error(code: int) -> tuple:
    return code, n.last_error()


def test_c_abi_null_pointers_and_lengths(sink):
    lib = n.lib
    config = c_void_p()
    assert raw_error(lib.mxp_config_new(None)) == (n.MXP_ERR_NULL_POINTER, "out: NULL pointer")
    assert lib.mxp_config_new(byref(config)) == n.MXP_OK
    assert raw_error(lib.mxp_config_set(None, b"relay", b"a:1")) == (
        n.MXP_ERR_NULL_POINTER, "config: NULL pointer")
    assert raw_error(lib.mxp_config_set(config, None, b"a:1")) == (
        n.MXP_ERR_NULL_POINTER, "key: NULL pointer")
    assert raw_error(lib.mxp_config_set(config, b"relay", None)) == (
        n.MXP_ERR_NULL_POINTER, "value: NULL pointer")
    assert lib.mxp_config_set(config, b"relay", sink.encode()) == n.MXP_OK
    dispatcher = c_void_p()
    assert raw_error(lib.mxp_dispatcher_new(None, byref(dispatcher)))[0] == n.MXP_ERR_NULL_POINTER
    assert raw_error(lib.mxp_dispatcher_new(config, None))[0] == n.MXP_ERR_NULL_POINTER
    assert lib.mxp_dispatcher_new(config, byref(dispatcher)) == n.MXP_OK
    assert lib.mxp_config_free(config) == n.MXP_OK
    assert raw_error(lib.mxp_config_free(config))[0] == n.MXP_ERR_BAD_HANDLE

    d = dispatcher
    rcpts = (c_char_p * 2)(b"a@example.net", b"b@example.net")
    with_null = (c_char_p * 2)(b"a@example.net", None)
    out = c_uint64(12345)
    enqueue = lib.mxp_dispatcher_enqueue
    s = b"s@example.org"
    cases = [
        (lambda: enqueue(None, s, rcpts, 2, BODY, len(BODY), 0, byref(out)),
         n.MXP_ERR_NULL_POINTER, "dispatcher: NULL pointer"),
        (lambda: enqueue(d, None, rcpts, 2, BODY, len(BODY), 0, byref(out)),
         n.MXP_ERR_NULL_POINTER, "sender: NULL pointer"),
        (lambda: enqueue(d, s, None, 2, BODY, len(BODY), 0, byref(out)),
         n.MXP_ERR_NULL_POINTER, "recipients: NULL pointer"),
        (lambda: enqueue(d, s, rcpts, 2, None, 5, 0, byref(out)),
         n.MXP_ERR_NULL_POINTER, "body: NULL pointer"),
        (lambda: enqueue(d, s, rcpts, 2, BODY, len(BODY), 0, None),
         n.MXP_ERR_NULL_POINTER, "out_id: NULL pointer"),
        (lambda: enqueue(d, s, with_null, 2, BODY, len(BODY), 0, byref(out)),
         n.MXP_ERR_NULL_POINTER, "recipient 1: NULL pointer"),
        (lambda: enqueue(d, s, rcpts, 0, BODY, len(BODY), 0, byref(out)),
         n.MXP_ERR_NO_RECIPIENTS, "recipients: the message has no recipients"),
        (lambda: enqueue(d, s, None, 0, BODY, len(BODY), 0, byref(out)),
         n.MXP_ERR_NO_RECIPIENTS, "recipients: the message has no recipients"),
        (lambda: enqueue(d, s, rcpts, 2**64 - 1, BODY, len(BODY), 0, byref(out)),
         n.MXP_ERR_INVALID_ARGUMENT,
         "n_recipients: 18446744073709551615 is over the limit of 1000000 per call"),
        (lambda: enqueue(d, s, rcpts, 2, BODY, 2**64 - 1, 0, byref(out)),
         n.MXP_ERR_INVALID_ARGUMENT, "body_len: 18446744073709551615 is larger than any buffer"),
        (lambda: lib.mxp_body_new(None, 3, byref(c_void_p())),
         n.MXP_ERR_NULL_POINTER, "body: NULL pointer"),
        (lambda: lib.mxp_dispatcher_enqueue_body(d, s, rcpts, 2, None, 0, byref(out)),
         n.MXP_ERR_NULL_POINTER, "body: NULL pointer"),
        (lambda: lib.mxp_dispatcher_poll_events(d, None, 4, byref(c_size_t())),
         n.MXP_ERR_NULL_POINTER, "events: NULL pointer"),
        (lambda: lib.mxp_dispatcher_poll_events(d, (n.Event * 1)(), 0, byref(c_size_t())),
         n.MXP_ERR_INVALID_ARGUMENT, "capacity: must be at least 1"),
        (lambda: lib.mxp_dispatcher_stats(d, None), n.MXP_ERR_NULL_POINTER, "out: NULL pointer"),
        (lambda: lib.mxp_dispatcher_set_callback(d, n.EVENT_CALLBACK(), None),
         n.MXP_ERR_NULL_POINTER, "callback: NULL pointer"),
        # mxp_last_error's own failures leave the stored message as it was.
        (lambda: lib.mxp_last_error(None, 10), n.MXP_ERR_NULL_POINTER, "callback: NULL pointer"),
    ]
    for call, want_code, want_message in cases:
        assert raw_error(call()) == (want_code, want_message)
    assert out.value == 12345  # no failed call wrote its output
    small = ctypes.create_string_buffer(4)
    assert lib.mxp_last_error(small, 4) == n.MXP_ERR_BUFFER_TOO_SMALL and small.value == b""
    assert n.result_str(999) == "unknown result code"

    # Stale and made-up handles.
    assert lib.mxp_dispatcher_free(d) == n.MXP_OK
    assert raw_error(lib.mxp_dispatcher_free(d))[0] == n.MXP_ERR_BAD_HANDLE
    assert raw_error(enqueue(d, b"s@example.org", rcpts, 2, BODY, len(BODY), 0, byref(out)))[0] == (
        n.MXP_ERR_BAD_HANDLE)
    made_up = ctypes.addressof(out)
    code, message = raw_error(lib.mxp_dispatcher_flush(made_up))
    assert code == n.MXP_ERR_BAD_HANDLE and message.startswith(f"dispatcher handle {made_up:#x}")
    assert lib.mxp_dispatcher_free(None) == n.MXP_OK
