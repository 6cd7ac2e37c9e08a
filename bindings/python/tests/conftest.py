"""Fixtures: real SMTP servers on loopback.

- Postfix's smtp-sink (/usr/sbin/smtp-sink, Debian package postfix), started per test module
  on a free port and killed by PID: accepting, rejecting every RCPT (-f rcpt: 500 5.3.0), or slow
  (-w 2: answers DATA after two seconds).
- aiosmtpd, in this process, where the exact bytes that arrived must be checked; it refuses
  recipients whose local part starts with "reject" (550 5.1.1).

Run: pip install ./bindings/python && python -m pytest bindings/python/tests
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, List

import pytest

SMTP_SINK = os.environ.get("SMTP_SINK", "/usr/sbin/smtp-sink")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen) -> None:
    for _ in range(200):
        if process.poll() is not None:
            raise RuntimeError(f"smtp-sink exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.025)
    raise RuntimeError(f"smtp-sink did not listen on {port}")


def start_smtp_sink(*flags: str) -> Iterator[str]:
    if not os.access(SMTP_SINK, os.X_OK):
        pytest.fail(f"{SMTP_SINK} is missing (Debian package postfix)")
    port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    process = subprocess.Popen([SMTP_SINK, *user, *flags, f"127.0.0.1:{port}", "1024"])
    try:
        wait_for_port(port, process)
        yield f"127.0.0.1:{port}"
    finally:
        process.kill()  # by PID: Popen knows exactly the process it started
        process.wait()


@pytest.fixture(scope="module")
def sink() -> Iterator[str]:
    """host:port of an smtp-sink that accepts everything."""
    yield from start_smtp_sink()


@pytest.fixture(scope="module")
def rejecting_sink() -> Iterator[str]:
    """host:port of an smtp-sink that refuses every RCPT with 500 5.3.0."""
    yield from start_smtp_sink("-f", "rcpt")


@pytest.fixture(scope="module")
def slow_sink() -> Iterator[str]:
    """host:port of an smtp-sink that answers DATA after two seconds."""
    yield from start_smtp_sink("-w", "2")


@dataclass
class Received:
    mail_from: str
    rcpt_tos: List[str]
    content: bytes


@dataclass
class CaptureHandler:
    """aiosmtpd handler: keeps every message; refuses recipients starting with "reject"."""

    messages: List[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        if address.startswith("reject"):
            return f"550 5.1.1 <{address}>: Recipient address rejected"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        with self.lock:
            self.messages.append(
                Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.content)
            )
        return "250 2.0.0 OK: queued"

    def wait_for(self, count: int, timeout: float = 20.0) -> List[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.02)
        with self.lock:
            return list(self.messages)


@dataclass
class CaptureServer:
    address: str
    handler: CaptureHandler


@pytest.fixture
def capture() -> Iterator[CaptureServer]:
    """An aiosmtpd server on loopback that records exactly what arrived."""
    from aiosmtpd.controller import Controller

    handler = CaptureHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield CaptureServer(f"127.0.0.1:{port}", handler)
    finally:
        controller.stop()


@pytest.fixture
def closed_port() -> str:
    """host:port where nothing listens: connections are refused, recipients deferred."""
    return f"127.0.0.1:{free_port()}"
