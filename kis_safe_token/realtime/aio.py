"""``AsyncKisRealtime``: :class:`~.client.KisRealtime` for asyncio code.

The session, the election and the fan-out run on ``KisRealtime``'s own thread either way; this
side only waits for their answers off the event loop and wakes an ``async for`` when an event
arrives (one ``call_soon_threadsafe`` per wait, none for events already queued).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

from ..shared import AsyncClosing
from .client import ANSWER_TIMEOUT_S, KisRealtime, Subscription
from .frames import RealtimeEvent

__all__ = ["AsyncKisRealtime", "AsyncSubscription"]


class AsyncSubscription:
    """The events of one pair: ``async for event in sub``; :meth:`aclose` to stop (one task
    reads a subscription at a time)."""

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub
        self.tr_id, self.tr_key = sub.tr_id, sub.tr_key

    def __repr__(self) -> str:
        return f"AsyncSubscription({self.tr_id!r}, {self.tr_key!r})"

    @property
    def dropped(self) -> int:
        return self.sub.dropped

    def __aiter__(self) -> AsyncIterator[RealtimeEvent]:
        return self

    async def __anext__(self) -> RealtimeEvent:
        event = await self.get()
        if event is None:
            raise StopAsyncIteration
        return event

    async def get(self, timeout: float | None = None) -> RealtimeEvent | None:
        """The next event, waiting up to ``timeout`` (``None``: closed, or nothing in time)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while (event := self.sub.pop()) is None and not self.sub.closed:
            woken = loop.create_future()
            self.sub.wake = partial(loop.call_soon_threadsafe, _settle, woken)
            if self.sub.ready():  # an event that came before the wake-up was set
                self.sub.wake = None
                continue
            left = None if deadline is None else deadline - loop.time()
            try:
                if left is not None and left <= 0:
                    raise asyncio.TimeoutError
                await asyncio.wait_for(woken, left)
            except asyncio.TimeoutError:
                return None
            finally:  # timed out or cancelled: no wake-up into a loop that may be gone
                self.sub.wake = None
        return event

    async def aclose(self) -> None:
        await asyncio.to_thread(self.sub.close)


class AsyncKisRealtime(AsyncClosing):
    """:class:`~.client.KisRealtime` with ``await subscribe(...)`` and ``async for``."""

    def __init__(self, api_key: str, api_secret: str | None = None, *args: Any, **kw: Any) -> None:
        self.rt = KisRealtime(api_key, api_secret, *args, **kw)

    def __repr__(self) -> str:
        return f"Async{self.rt!r}"

    async def subscribe(
        self, tr_id: str, tr_key: str, *, timeout: float = ANSWER_TIMEOUT_S
    ) -> AsyncSubscription:
        """As :meth:`KisRealtime.subscribe`, waiting off the event loop."""
        sub = await asyncio.to_thread(self.rt.subscribe, tr_id, tr_key, timeout=timeout)
        return AsyncSubscription(sub)

    def stats(self) -> dict[str, int | str | None]:
        return self.rt.stats()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.rt.close)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
