"""Lifetimes and shutdown: close() while the on_outcome callback is inside a call on the same
dispatcher, a shutdown with a deadline, and Ctrl-C (once inside ``with``, or while close()
waits) against a server that takes a minute to answer DATA. The scripts run in a subprocess of
their own, so that a crash or a hang shows as a failed test, not a broken test run."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from typing import Iterator

import pytest

import mxpipe
from mxpipe import OutcomeKind

from conftest import start_smtp_sink

BODY = b"Subject: lifetimes\r\n\r\nbody\r\n"


@pytest.fixture(scope="module")
def tarpit() -> Iterator[str]:
    """host:port of an smtp-sink that answers DATA after 60 seconds."""
    yield from start_smtp_sink("-w", "60")


def run_script(body: str, **names: str) -> subprocess.Popen:
    # A test runner started in the background may ignore SIGINT, and the script would inherit
    # that: Ctrl-C is made to raise KeyboardInterrupt, as in a terminal.
    header = (
        "import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "import mxpipe, threading, time\nBODY = b'Subject: t\\r\\n\\r\\nbody\\r\\n'\n"
    )
    header += "".join(f"{key} = {value!r}\n" for key, value in names.items())
    return subprocess.Popen(
        [sys.executable, "-c", header + textwrap.dedent(body)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_close_waits_for_a_callback_that_is_inside_a_call(sink, closed_port):
    # The callback sends a follow-up and waits for every final outcome, which the recipient
    # waiting for a retry never gets: it is inside wait_final when close() runs.
    script = run_script(
        """
        inside, closed = threading.Event(), threading.Event()
        late = []
        def on_outcome(outcome):
            if closed.is_set():
                late.append(outcome.recipient)
            if outcome.recipient == "first@example.net":
                d.send("a@example.org", ["follow-up@example.net"], BODY)
                inside.set()
                try:
                    d.wait_final(5)
                except mxpipe.ShutDown:
                    print("wait_final: ShutDown", flush=True)
                finally:
                    if closed.is_set():
                        late.append("returned after close")
        d = mxpipe.Dispatcher(relay=RELAY, routes={"deferred.example": CLOSED},
                              on_outcome=on_outcome)
        d.send("a@example.org", ["x@deferred.example"], BODY)
        d.send("a@example.org", ["first@example.net"], BODY)
        assert inside.wait(20)
        time.sleep(0.3)
        d.close()
        closed.set()
        time.sleep(1)
        print("late", late, flush=True)
        """,
        RELAY=sink,
        CLOSED=closed_port,
    )
    out, err = script.communicate(timeout=60)
    assert script.returncode == 0, err
    assert out.splitlines() == ["wait_final: ShutDown", "late []"], err


def test_shutdown_with_a_deadline_reports_what_it_cut_short(tarpit):
    d = mxpipe.Dispatcher(relay=tarpit, max_connections_per_destination=1)
    try:
        d.send("a@example.org", ["a@example.net", "b@example.net"], BODY)
        d.send("a@example.org", ["c@example.net"], BODY)
        assert d.stats().submitted_recipients == 3
        assert d.shutdown(timeout=0.5) is False
        with pytest.raises(mxpipe.ShutDown):
            d.send("a@example.org", ["late@example.net"], BODY)
        outcomes = sorted(d.poll(), key=lambda o: o.recipient)
    finally:
        d.close()
    assert [o.recipient for o in outcomes] == ["a@example.net", "b@example.net", "c@example.net"]
    for outcome in outcomes:
        assert outcome.kind is OutcomeKind.DEFERRED
        assert (outcome.code, outcome.enhanced, outcome.retry_after) == (0, (4, 3, 2), None)
        assert outcome.text.startswith("mxpipe shut down ")


def test_shutdown_with_time_enough_delivers(sink):
    with mxpipe.Dispatcher(relay=sink) as d:
        d.send("a@example.org", ["a@example.net", "b@example.net"], BODY)
        assert d.shutdown(timeout=30) is True
        assert {o.kind for o in d.poll()} == {OutcomeKind.DELIVERED}


def interrupted(script: subprocess.Popen, after: float = 0.0) -> tuple:
    """Sends SIGINT ``after`` seconds after the script printed "sent"; returns its output."""
    assert script.stdout is not None
    assert script.stdout.readline() == "sent\n"
    time.sleep(after)
    script.send_signal(signal.SIGINT)
    try:
        out, err = script.communicate(timeout=20)  # the server would hold it for minutes
    except subprocess.TimeoutExpired:
        script.kill()
        script.communicate()
        pytest.fail("the script did not stop within 20 s of Ctrl-C")
    return out, err


def test_ctrl_c_inside_with_stops_and_reports_deferred(tarpit):
    script = run_script(
        """
        with mxpipe.Dispatcher(relay=RELAY, on_outcome=lambda o: print(o.kind.value, o.text,
                                                                       flush=True)) as d:
            d.send("a@example.org", ["a@example.net", "b@example.net"], BODY)
            time.sleep(0.5)
            print("sent", flush=True)
            time.sleep(120)
        """,
        RELAY=tarpit,
    )
    out, err = interrupted(script)
    assert "KeyboardInterrupt" in err
    assert out.splitlines() == [
        "deferred mxpipe shut down during the transaction; the server may or may not have "
        "accepted the message"
    ] * 2, err


def test_ctrl_c_while_close_waits_cuts_it_short(tarpit):
    script = run_script(
        """
        d = mxpipe.Dispatcher(relay=RELAY, on_outcome=lambda o: print(o.kind.value, flush=True))
        d.send("a@example.org", ["a@example.net"], BODY)
        time.sleep(0.5)
        print("sent", flush=True)
        d.close()  # waits for the server: Ctrl-C cuts it short
        """,
        RELAY=tarpit,
    )
    out, err = interrupted(script, after=1.0)  # by then close() is waiting
    assert "KeyboardInterrupt" in err
    assert out.splitlines() == ["deferred"], err


@pytest.mark.parametrize("bad", [5, None, 1.5, bytearray(b"a@example.net")])
def test_a_recipient_that_is_not_text_is_a_type_error(sink, bad):
    with mxpipe.Dispatcher(relay=sink) as d:
        with pytest.raises(TypeError, match=f"recipient 1: expected str or bytes, not {type(bad).__name__}"):
            d.send("a@example.org", ["ok@example.net", bad], BODY)
        with pytest.raises(TypeError, match=f"recipient 1: expected str or bytes"):
            d.send_many("a@example.org", ["ok@example.net", bad], BODY)
        with pytest.raises(TypeError, match="sender: expected str or bytes"):
            d.send(bad, ["ok@example.net"], BODY)
        assert d.stats().submitted_messages == 0
