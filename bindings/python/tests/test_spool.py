"""Custody through the Python package: with ``spool_dir``, ``sync()`` waits until what was sent
is durable and ``durable_id()`` is the watermark; what is not final survives a restart. The
relay refuses connections, so every recipient stays deferred in the spool."""

from __future__ import annotations

import pytest

import mxpipe

BODY = b"From: news@example.org\r\nSubject: custody\r\n\r\nDurable before acknowledged.\r\n"


def test_without_a_spool_sync_returns_and_the_watermark_is_zero(closed_port):
    with mxpipe.Dispatcher(relay=closed_port, retry_initial="1h") as d:
        d.send("news@example.org", "a@example.net", BODY)
        d.sync()
        assert d.durable_id() == 0


def test_sync_makes_every_sent_message_durable_across_a_restart(closed_port, tmp_path):
    spool = tmp_path / "spool"
    with mxpipe.Dispatcher(relay=closed_port, retry_initial="1h", spool_dir=spool) as d:
        ids = [d.send("news@example.org", f"user{i}@example.net", BODY) for i in range(50)]
        assert ids == list(range(ids[0], ids[0] + 50))
        d.sync()
        assert d.durable_id() >= ids[-1]
        # The spool is held: a second dispatcher on it is refused, naming the reason.
        with pytest.raises(mxpipe.MxpipeOSError, match="held by another process"):
            mxpipe.Dispatcher(relay=closed_port, spool_dir=spool)
    with mxpipe.Dispatcher(relay=closed_port, retry_initial="1h", spool_dir=spool) as d:
        # Every deferred recipient came back; the identifiers go on after the last durable one.
        assert d.durable_id() == ids[-1]
        assert d.stats().in_flight == 50
        after = d.send("news@example.org", "after@example.net", BODY)
        assert after == ids[-1] + 1
        d.sync()
        assert d.durable_id() == after
