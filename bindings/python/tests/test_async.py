"""The asyncio interface against aiosmtpd: awaited sends get every recipient's final outcome,
concurrent sends share the engine, and what arrived is exactly what was sent."""

from __future__ import annotations

import asyncio

import pytest

import mxpipe
from mxpipe import Category, OutcomeKind


def body(i: int) -> bytes:
    return f"Subject: async {i}\r\n\r\nmessage {i}\r\n".encode()


def test_awaited_sends_get_their_outcomes(capture):
    async def main() -> list:
        async with mxpipe.AsyncDispatcher(relay=capture.address) as d:
            return await asyncio.gather(*(
                d.send("news@example.org", [f"a{i}@example.net", f"reject{i}@example.net"],
                       body(i))
                for i in range(10)
            ))

    results = asyncio.run(main())
    assert len(results) == 10
    for i, outcomes in enumerate(results):
        by_recipient = {o.recipient: o for o in outcomes}
        assert set(by_recipient) == {f"a{i}@example.net", f"reject{i}@example.net"}
        delivered = by_recipient[f"a{i}@example.net"]
        assert (delivered.kind, delivered.code, delivered.category) == (
            OutcomeKind.DELIVERED, 250, None)
        bounced = by_recipient[f"reject{i}@example.net"]
        assert (bounced.kind, bounced.code, bounced.enhanced, bounced.category) == (
            OutcomeKind.BOUNCED, 550, (5, 1, 1), Category.BAD_MAILBOX)
        assert len({o.message_id for o in outcomes}) == 1
    received = capture.handler.wait_for(10)
    assert sorted(m.content.replace(b"\r\n", b"\n") for m in received) == sorted(
        body(i).replace(b"\r\n", b"\n") for i in range(10))
    assert all(m.rcpt_tos == [m.rcpt_tos[0]] for m in received)


def test_bad_input_raises_at_once(sink):
    async def main() -> None:
        async with mxpipe.AsyncDispatcher(relay=sink) as d:
            with pytest.raises(mxpipe.InvalidAddress, match="recipient 0"):
                await d.send("news@example.org", ["no-at-sign"], b"x")
            with pytest.raises(TypeError, match="recipient 0: expected str or bytes"):
                await d.send("news@example.org", [42], b"x")  # type: ignore[list-item]
            assert d.stats().submitted_messages == 0

    asyncio.run(main())


def test_a_send_awaiting_a_retry_gets_its_deferral_at_close(closed_port):
    async def main() -> list:
        d = mxpipe.AsyncDispatcher(relay=closed_port, connect_timeout=2)
        pending = asyncio.ensure_future(d.send("news@example.org", "a@example.net", b"x"))
        while d.stats().deferred == 0:
            await asyncio.sleep(0.02)
        assert not pending.done()
        await d.aclose()
        return await pending

    outcomes = asyncio.run(main())
    assert [(o.recipient, o.kind, o.category) for o in outcomes] == [
        ("a@example.net", OutcomeKind.DEFERRED, Category.CONNECTION)]
