"""Leaving the interpreter with a dispatcher still open: it must exit promptly, and what was
sent is delivered (the open dispatcher is shut down at exit)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CASES = {
    "open dispatcher": """
        d = mxpipe.Dispatcher(relay=RELAY)
        for i in range(100):
            d.send("a@example.org", [f"u{i}@example.net"], BODY)
    """,
    "open dispatcher with a callback": """
        d = mxpipe.Dispatcher(relay=RELAY, on_outcome=lambda o: print(o.kind.value, flush=True))
        d.send_many("a@example.org", [f"u{i}@example.net" for i in range(100)], BODY)
    """,
    "dispatcher in a reference cycle": """
        class Holder:
            pass
        h = Holder()
        h.me = h
        h.d = mxpipe.Dispatcher(relay=RELAY)
        h.d.send_many("a@example.org", [f"u{i}@example.net" for i in range(100)], BODY)
        del h
    """,
    "daemon thread blocked on a full queue": """
        import threading, time
        d = mxpipe.Dispatcher(relay=RELAY, queue_capacity=1, max_queued_recipients=1)
        def flood():
            for i in range(100):
                d.send("a@example.org", [f"u{i}@example.net"], BODY)
        threading.Thread(target=flood, daemon=True).start()
        time.sleep(0.5)
    """,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_interpreter_exits_with_an_open_dispatcher(case, capture):
    script = "import mxpipe\nRELAY = %r\nBODY = b'Subject: exit\\r\\n\\r\\nbye\\r\\n'\n%s" % (
        capture.address,
        textwrap.dedent(CASES[case]),
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    received = capture.handler.wait_for(1, timeout=5)
    count = sum(len(m.rcpt_tos) for m in received)
    if case.startswith("daemon"):
        assert count >= 1  # what was queued before the exit went out
    else:
        assert count == 100
    if "callback" in case:
        assert done.stdout.decode().split() == ["delivered"] * 100
