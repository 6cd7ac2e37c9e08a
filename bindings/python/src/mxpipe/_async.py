"""The asyncio interface: ``await`` a message's outcomes, as users of aiosmtplib expect.

The engine runs on its own threads as always; outcomes reach the event loop through the
dispatcher's callback thread (``on_outcome``) and ``loop.call_soon_threadsafe``. Nothing here
blocks the event loop: a send that finds the queue full waits on a worker thread."""

from __future__ import annotations

import asyncio
import functools
import itertools
import threading
from types import TracebackType
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence, Type, Union

from ._dispatcher import Address, Body, Dispatcher, Outcome, Stats
from ._errors import QueueFull
from ._settings import Settings

if TYPE_CHECKING:
    from typing_extensions import Unpack


class _Pending:
    """A message whose outcomes are awaited: the latest outcome of each recipient."""

    def __init__(self, loop: asyncio.AbstractEventLoop, future: "asyncio.Future[List[Outcome]]",
                 recipients: int) -> None:
        self.loop = loop
        self.future = future
        self.waiting = recipients
        self.latest: Dict[str, Outcome] = {}


def _resolve(future: "asyncio.Future[List[Outcome]]", outcomes: List[Outcome]) -> None:
    if not future.done():  # it may have been cancelled meanwhile
        future.set_result(outcomes)


class AsyncDispatcher:
    """An mxpipe Dispatcher for asyncio code::

        async with mxpipe.AsyncDispatcher(relay="127.0.0.1:2525") as d:
            outcomes = await d.send("news@example.org", ["a@example.net"], body)
            for outcome in outcomes:             # one final outcome per recipient
                print(outcome.recipient, outcome.kind.value, outcome.code, outcome.text)

    ``send`` returns when every recipient of the message has its final outcome (delivered,
    bounced or expired). Many sends may be awaited at once (``asyncio.gather``); they share the
    engine's pooled, pipelined connections. Settings are those of ``Dispatcher``; outcomes go to
    the awaiting ``send`` calls, so there is no ``poll`` here.
    """

    def __init__(
        self,
        relay: Optional[str] = None,
        *,
        routes: Optional[Mapping[str, str]] = None,
        **settings: Unpack[Settings],
    ) -> None:
        self._lock = threading.Lock()
        self._pending: Dict[int, _Pending] = {}
        self._tags = itertools.count(1)
        self._dispatcher = Dispatcher(relay, routes=routes, on_outcome=self._on_outcome,
                                      **settings)

    def _on_outcome(self, outcome: Outcome) -> None:
        """On mxpipe's callback thread: records the outcome, resolves the message when every
        recipient is final."""
        with self._lock:
            pending = self._pending.get(outcome.tag)
            if pending is None:
                return
            pending.latest[outcome.recipient] = outcome
            if not outcome.final:
                return
            pending.waiting -= 1
            if pending.waiting:
                return
            del self._pending[outcome.tag]
        pending.loop.call_soon_threadsafe(_resolve, pending.future, list(pending.latest.values()))

    async def send(
        self,
        sender: Address,
        recipients: Union[Address, Sequence[Address]],
        body: Body,
        *,
        timeout: Optional[float] = None,
    ) -> List[Outcome]:
        """Queues one message and returns the final outcome of each of its recipients (the
        latest outcome, a deferral, for recipients still waiting for a retry when the
        dispatcher is closed). ``timeout`` bounds only the wait for room in a full queue, as in
        ``Dispatcher.send``; wrap the call in ``asyncio.wait_for`` to bound the delivery. Bad
        input raises as ``Dispatcher.send`` does."""
        if isinstance(recipients, (str, bytes)):
            recipients = [recipients]
        loop = asyncio.get_running_loop()
        future: "asyncio.Future[List[Outcome]]" = loop.create_future()
        tag = next(self._tags)
        with self._lock:
            # Registered before the message is queued: its first outcome may come at once.
            self._pending[tag] = _Pending(loop, future, len(recipients))
        try:
            try:
                self._dispatcher.send(sender, recipients, body, tag=tag, timeout=0)
            except QueueFull:
                if timeout == 0:
                    raise
                wait = functools.partial(self._dispatcher.send, sender, recipients, body,
                                         tag=tag, timeout=timeout)
                await loop.run_in_executor(None, wait)
        except BaseException:
            with self._lock:
                self._pending.pop(tag, None)
            raise
        return await future

    def stats(self) -> Stats:
        return self._dispatcher.stats()

    async def aclose(self, timeout: Optional[float] = None) -> None:
        """Shuts down (on a worker thread; see ``Dispatcher.close`` and its ``timeout``) and
        frees the engine. Sends still awaiting then get the latest outcome of each recipient."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, functools.partial(self._dispatcher.close, timeout))
        with self._lock:
            left, self._pending = self._pending, {}
        for pending in left.values():
            pending.loop.call_soon_threadsafe(_resolve, pending.future,
                                              list(pending.latest.values()))

    async def __aenter__(self) -> "AsyncDispatcher":
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        # Cancelled (Ctrl-C under asyncio.run) or failed: stop at once, as Dispatcher does.
        stop_now = exc_type is not None and issubclass(
            exc_type, (KeyboardInterrupt, asyncio.CancelledError))
        await self.aclose(timeout=0 if stop_now else None)
