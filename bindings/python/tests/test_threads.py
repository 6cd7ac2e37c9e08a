"""Several Python threads sending into one dispatcher while others read the outcomes."""

from __future__ import annotations

import threading
from collections import Counter

import mxpipe
from mxpipe import OutcomeKind

BODY = b"Subject: threads\r\n\r\nhello\r\n"


def test_many_threads_send_and_read(sink, rejecting_sink):
    senders, per_sender = 8, 300
    with mxpipe.Dispatcher(relay=sink, routes={"reject.example": rejecting_sink},
                           queue_capacity=64) as d:
        errors = []
        outcomes = []
        lock = threading.Lock()
        sending_done = threading.Event()

        def send(t: int) -> None:
            try:
                for i in range(per_sender):
                    if i % 3 == 0:
                        d.send_many(f"t{t}@example.org",
                                    [f"m{t}.{i}@accept.example", f"m{t}.{i}@reject.example"],
                                    BODY)
                    else:
                        d.send(f"t{t}@example.org", [f"s{t}.{i}@accept.example"], BODY)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        def read() -> None:
            while True:
                batch = d.poll(256) or []
                if not batch:
                    stats = d.stats()
                    if sending_done.is_set() and stats.final_events_read >= stats.submitted_recipients:
                        return
                    batch = list(d.outcomes(timeout=0.05))
                with lock:
                    outcomes.extend(batch)

        readers = [threading.Thread(target=read) for _ in range(2)]
        writers = [threading.Thread(target=send, args=(t,)) for t in range(senders)]
        for thread in readers + writers:
            thread.start()
        for thread in writers:
            thread.join()
        sending_done.set()
        for thread in readers:
            thread.join(60)
        assert not errors
        stats = d.stats()

    per_thread_many = len(range(0, per_sender, 3))
    expected_delivered = senders * per_sender
    expected_bounced = senders * per_thread_many
    kinds = Counter(o.kind for o in outcomes)
    assert kinds == {OutcomeKind.DELIVERED: expected_delivered, OutcomeKind.BOUNCED: expected_bounced}
    assert len({o.recipient for o in outcomes}) == len(outcomes)  # each outcome handed out once
    assert stats.submitted_recipients == expected_delivered + expected_bounced
    assert stats.delivered == expected_delivered and stats.bounced == expected_bounced


def test_callbacks_do_not_deadlock_with_busy_python_threads(sink):
    seen = Counter()
    lock = threading.Lock()

    def on_outcome(outcome):
        with lock:
            seen[outcome.kind] += 1

    with mxpipe.Dispatcher(relay=sink, on_outcome=on_outcome) as d:
        def send(t: int) -> None:
            for i in range(200):
                d.send("a@example.org", [f"x{t}.{i}@example.net"], BODY)

        threads = [threading.Thread(target=send, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert d.wait_final(30)
    # close() returned only after the callback saw every outcome.
    assert seen == {OutcomeKind.DELIVERED: 800}
