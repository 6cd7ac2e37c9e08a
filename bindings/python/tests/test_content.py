"""What arrives at a real server (aiosmtpd), byte for byte."""

from __future__ import annotations

import mxpipe
from mxpipe import OutcomeKind


def test_exact_bytes_arrive(capture):
    # Bare LF becomes CRLF, a line starting with "." survives dot-stuffing, a NUL byte and
    # 8-bit text pass intact (the body is bytes with a length, not a C string).
    body = b"From: a@example.org\nSubject: exact\n\nline one\n.starts with a dot\nnul:\x00:\nutf-8: \xc3\xa9\n"
    with mxpipe.Dispatcher(relay=capture.address) as d:
        message_id = d.send("a@example.org", ["b@example.net", "c@example.net"], body)
        outcomes = list(d.outcomes(timeout=30))
    assert {o.recipient for o in outcomes} == {"b@example.net", "c@example.net"}
    assert all(o.kind is OutcomeKind.DELIVERED and o.message_id == message_id for o in outcomes)
    assert all(o.code == 250 and o.text == "OK: queued" for o in outcomes)
    [received] = capture.handler.wait_for(1)
    assert received.mail_from == "a@example.org"
    assert received.rcpt_tos == ["b@example.net", "c@example.net"]
    assert received.content == (
        b"From: a@example.org\r\nSubject: exact\r\n\r\nline one\r\n.starts with a dot\r\n"
        b"nul:\x00:\r\nutf-8: \xc3\xa9\r\n"
    )


def test_null_sender_and_str_body(capture):
    with mxpipe.Dispatcher(relay=capture.address) as d:
        d.send("", "b@example.net", "Subject: bounce\r\n\r\nréponse\r\n")
        assert d.wait_final(30)
    [received] = capture.handler.wait_for(1)
    assert received.mail_from == "<>"  # aiosmtpd's way of showing MAIL FROM:<>
    assert received.content == "Subject: bounce\r\n\r\nréponse\r\n".encode()


def test_send_many_sends_one_body_and_reports_refused_recipients(capture):
    body = b"Subject: many\r\n\r\nsame for all\r\n"
    recipients = [f"{'reject' if i % 10 == 0 else 'user'}{i}@example.net" for i in range(50)]
    with mxpipe.Dispatcher(relay=capture.address, max_recipients_per_transaction=20) as d:
        d.send_many("news@example.org", recipients, body)
        outcomes = list(d.outcomes(timeout=30))
    bounced = sorted(o.recipient for o in outcomes if o.kind is OutcomeKind.BOUNCED)
    assert bounced == sorted(r for r in recipients if r.startswith("reject"))
    for o in outcomes:
        if o.kind is OutcomeKind.BOUNCED:
            assert (o.code, o.enhanced, o.category) == (550, (5, 1, 1), "bad_mailbox")
            assert o.text == f"<{o.recipient}>: Recipient address rejected"
    received = capture.handler.wait_for(3)
    assert {m.content for m in received} == {body}
    delivered = sorted(r for m in received for r in m.rcpt_tos)
    assert delivered == sorted(r for r in recipients if not r.startswith("reject"))
    assert max(len(m.rcpt_tos) for m in received) <= 20
