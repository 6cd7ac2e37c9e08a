"""Sending through Postfix's smtp-sink and reading every recipient's outcome."""

from __future__ import annotations

import threading

import pytest

import mxpipe
from mxpipe import OutcomeKind

BODY = b"From: news@example.org\r\nSubject: test\r\n\r\nHello.\r\n"


def test_version_is_the_library_version():
    assert mxpipe.__version__ == "0.1.0"


def test_send_one_is_delivered(sink):
    with mxpipe.Dispatcher(relay=sink, ehlo_name="test.example") as d:
        message_id = d.send("news@example.org", "someone@example.net", BODY)
        outcomes = list(d.outcomes(timeout=30))
        stats = d.stats()
    assert [(o.recipient, o.kind, o.code, o.enhanced) for o in outcomes] == [
        ("someone@example.net", OutcomeKind.DELIVERED, 250, (2, 0, 0))
    ]
    outcome = outcomes[0]
    assert outcome.message_id == message_id
    assert outcome.destination == sink
    assert outcome.attempts == 1 and outcome.final and outcome.retry_after is None
    assert outcome.category is None
    assert stats.submitted_messages == 1 and stats.delivered == 1 and stats.in_flight == 0
    assert stats.final_events_read == 1


def test_send_many_shares_one_body(sink):
    recipients = [f"user{i}@example.net" for i in range(5000)]
    with mxpipe.Dispatcher(relay=sink) as d:
        ids = d.send_many("news@example.org", recipients, BODY, chunk_size=1000)
        outcomes = list(d.outcomes(timeout=60))
        stats = d.stats()
    assert len(ids) == 5 and len(set(ids)) == 5
    assert sorted(o.recipient for o in outcomes) == sorted(recipients)
    assert all(o.kind is OutcomeKind.DELIVERED and o.code == 250 for o in outcomes)
    # The chunk of recipient i went out under ids[i // 1000].
    by_recipient = {o.recipient: o.message_id for o in outcomes}
    assert all(by_recipient[r] == ids[i // 1000] for i, r in enumerate(recipients))
    assert stats.submitted_messages == 5 and stats.submitted_recipients == 5000
    assert stats.delivered == 5000


def test_rejected_recipients_bounce_with_the_server_reply(sink, rejecting_sink):
    with mxpipe.Dispatcher(relay=sink, routes={"reject.example": rejecting_sink}) as d:
        d.send_many(
            "news@example.org",
            [f"u{i}@{'reject' if i % 2 else 'accept'}.example" for i in range(200)],
            BODY,
        )
        outcomes = list(d.outcomes(timeout=30))
        stats = d.stats()
    assert len(outcomes) == 200
    for o in outcomes:
        if o.recipient.endswith("@reject.example"):
            assert (o.kind, o.code, o.enhanced, o.text) == (
                OutcomeKind.BOUNCED, 500, (5, 3, 0), "Error: command failed"
            )
            assert o.destination == rejecting_sink
        else:
            assert (o.kind, o.code, o.destination) == (OutcomeKind.DELIVERED, 250, sink)
    assert stats.delivered == 100 and stats.bounced == 100


def test_unreachable_relay_defers_with_a_reason(closed_port):
    with mxpipe.Dispatcher(relay=closed_port, retry_initial=300) as d:
        d.send("news@example.org", ["a@example.net"], BODY)
        outcomes = list(d.outcomes(timeout=2))
        assert d.wait_final(0.2) is False
        stats = d.stats()
    assert len(outcomes) == 1
    deferred = outcomes[0]
    assert deferred.kind is OutcomeKind.DEFERRED and not deferred.final
    assert deferred.code == 0 and deferred.text  # no reply: the reason is in the text
    assert deferred.category == "connection"
    assert deferred.retry_after is not None and 200 < deferred.retry_after < 400
    assert stats.deferred == 1 and stats.in_flight == 1


def test_poll_does_not_block_and_flush_waits(sink):
    with mxpipe.Dispatcher(relay=sink) as d:
        assert d.poll() == []
        for i in range(50):
            d.send("news@example.org", [f"p{i}@example.net"], BODY)
        d.flush()
        assert d.stats().in_flight == 0
        assert d.wait_final(5)
        first = d.poll(max=10)
        rest = d.poll()
    assert len(first) == 10 and len(first) + len(rest) == 50


def test_configuration_from_toml(sink, rejecting_sink):
    toml = f"""
relay = "{sink}"
ehlo_name = "toml.example"
max_connections_per_destination = 2
connect_timeout = "5s"
chunking = false
[routes]
"reject.example" = "{rejecting_sink}"
"""
    with mxpipe.Dispatcher.from_toml(toml) as d:
        d.send("news@example.org", ["a@accept.example", "b@reject.example"], BODY)
        kinds = {o.recipient: o.kind for o in d.outcomes(timeout=30)}
    assert kinds == {
        "a@accept.example": OutcomeKind.DELIVERED,
        "b@reject.example": OutcomeKind.BOUNCED,
    }


def test_on_outcome_runs_on_another_thread(sink):
    seen = []
    threads = set()
    done = threading.Event()

    def on_outcome(outcome):
        seen.append(outcome)
        threads.add(threading.get_ident())
        if len(seen) == 20:
            done.set()

    with mxpipe.Dispatcher(relay=sink, on_outcome=on_outcome) as d:
        d.send_many("news@example.org", [f"c{i}@example.net" for i in range(20)], BODY)
        assert done.wait(30)
        with pytest.raises(mxpipe.EventsUnavailable, match="callback"):
            d.poll()
        assert d.stats().final_events_read == 20
    assert len(seen) == 20 and all(o.kind is OutcomeKind.DELIVERED for o in seen)
    assert threading.get_ident() not in threads


def test_closing_from_the_callback_is_refused(sink):
    errors = []
    done = threading.Event()

    def on_outcome(outcome):
        try:
            dispatcher.close()
        except mxpipe.MxpipeError as e:
            errors.append(e)
        done.set()

    dispatcher = mxpipe.Dispatcher(relay=sink, on_outcome=on_outcome)
    dispatcher.send("news@example.org", ["a@example.net"], BODY)
    assert done.wait(30)
    assert not dispatcher.closed
    dispatcher.close()
    assert dispatcher.closed
    assert len(errors) == 1 and isinstance(errors[0], mxpipe.CallbackContext)
    assert "own event callback" in str(errors[0])
