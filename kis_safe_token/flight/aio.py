"""The asyncio driver: the engine's steps, on the same store and lock objects, with ``await``.

A store with ``inline_io`` (the file backend, microseconds a step) runs its steps on the loop:
``filelock`` locks per thread, and the loop's thread holds it. Any other store's run in a worker
thread. Tasks of one loop queue on one ``asyncio.Lock`` per store and app key first, since a
file lock is re-entrant within a thread and two tasks would otherwise both hold it.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from contextlib import suppress
from functools import partial
from typing import TYPE_CHECKING, Any

from ..errors import TokenStorageError
from ..token import Token
from .drivers import io_call
from .engine import (
    ATTEMPT,
    ISSUE,
    RELEASE,
    Flight,
    Protocol,
    Sleep,
    Step,
    Wait,
    get_or_issue,
    noted,
)
from .lock import HELD

if TYPE_CHECKING:
    from ..storage.base import TokenStorage

__all__ = ["AsyncStore"]

AsyncIssueFn = Callable[[], Awaitable[Token]]


class AsyncStore:
    """A ``TokenStorage`` driven from an event loop; cancelled at any await, it holds no lock.

    ``redis_client``: the ``redis.asyncio`` client for the Redis rate limiter (default: one built
    from a Redis storage's URL; close it with :meth:`aclose`).
    """

    def __init__(self, storage: TokenStorage, *, redis_client: Any = None) -> None:
        self.storage = storage
        self._own_client = False
        self._client = redis_client
        build = getattr(storage, "async_client", None)
        if redis_client is None and build is not None:
            with suppress(ValueError):  # built on an injected client: no async twin
                self._client = build()
                self._own_client = True
        self._sync_client = getattr(storage, "redis_client", None)
        self._inline = bool(getattr(storage, "inline_io", False))

    async def aclose(self) -> None:
        """Close the ``redis.asyncio`` client, if this object built it."""
        if self._own_client and self._client is not None:
            await self._client.aclose()

    async def _run(self, fn: Callable[[], Any]) -> Any:
        if self._inline:
            return fn()
        return await asyncio.to_thread(fn)

    async def _drive(self, flight: Flight, protocol: Protocol, issue: AsyncIssueFn | None) -> Any:
        reply: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = protocol.send(reply) if error is None else protocol.throw(error)
            except StopIteration as done:
                return done.value
            reply, error = None, None
            try:
                reply = await self._perform(flight, step, issue)
            except BaseException as exc:  # noqa: BLE001 - thrown into the protocol
                error = noted(flight, exc)

    async def _perform(self, flight: Flight, step: Step, issue: AsyncIssueFn | None) -> Any:
        if isinstance(step, Wait):
            return await flight.lock.wait_async(step.busy, step.timeout_s)
        if isinstance(step, Sleep):
            return await asyncio.sleep(step.seconds)
        if step is ISSUE:
            assert issue is not None
            flight.lock.issuing()
            return await issue()
        if step is RELEASE:  # shielded: a second cancellation cannot leave the lock behind
            return await asyncio.shield(self._run(flight.lock.release))
        if step is ATTEMPT and not self._inline:
            return await self._attempt_in_thread(flight)
        return await self._run(io_call(flight, step))

    async def _attempt_in_thread(self, flight: Flight) -> Any:
        """A lock attempt in a thread; cancelled, it runs to its end and a lock it took is given
        back (the protocol never learnt that it held it)."""
        attempt = asyncio.ensure_future(asyncio.to_thread(flight.lock.attempt))
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            await asyncio.shield(self._abandon(flight, attempt))
            raise

    @staticmethod
    async def _abandon(flight: Flight, attempt: asyncio.Future[Any]) -> None:
        try:
            got = await attempt
        except Exception:  # noqa: BLE001 - nothing was taken
            return
        if got is HELD:
            await asyncio.to_thread(flight.lock.release)

    # -- the protocol, driven -------------------------------------------------------------------
    async def get_or_issue(self, api_key: str, api_secret: str, issue: AsyncIssueFn) -> Token:
        """:meth:`TokenStorage.get_or_issue` for a coroutine ``issue``, never blocking the loop."""
        storage = self.storage
        token: Token | None = await self._run(partial(storage.read_token, api_key, api_secret))
        if storage.usable(token):
            return token
        guard = _loop_guard(storage, api_key)
        if not await _acquire_within(guard, storage.wait_timeout):
            raise TokenStorageError(
                f"timed out after {storage.wait_timeout:.1f} s waiting for another task's refresh"
            )
        try:
            flight = Flight(storage, api_key, api_secret)
            flight.lock.for_task()  # made here, not on first use: the read may hit the cache
            issued: Token = await self._drive(flight, get_or_issue(flight), issue)
            return issued
        finally:
            guard.release()

    async def invalidate_token(self, api_key: str, api_secret: str, access_token: str) -> bool:
        """The storage's compare-and-delete, in a worker thread (it may wait for a lock)."""
        return await asyncio.to_thread(
            self.storage.invalidate_token, api_key, api_secret, access_token
        )

    async def load_token(self, api_key: str, api_secret: str) -> Token | None:
        """The stored token if it is valid (never issues)."""
        token: Token | None = await self._run(partial(self.storage.read_token, api_key, api_secret))
        return token if token is not None and token.is_valid(self.storage.clock()) else None

    # -- the call-rate limiter --------------------------------------------------------------------
    async def try_acquire(
        self, limiter: Any, max_wait_s: float, deadline: float | None = None
    ) -> float | None:
        """``limiter.try_acquire_async`` (a Redis limiter on this store's ``redis.asyncio``
        client)."""
        client = self._client if limiter.on_client(self._sync_client) else None
        wait: float | None = await limiter.try_acquire_async(max_wait_s, deadline, client)
        return wait

    @staticmethod
    async def penalize(limiter: Any, timeout_s: float | None = None) -> bool:
        """``limiter.penalize_async(timeout_s)`` (after ``EGW00201``; ``timeout_s``: the caller's
        budget left)."""
        started: bool = await limiter.penalize_async(timeout_s)
        return started


_guards: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[int, str], asyncio.Lock]]
_guards = weakref.WeakKeyDictionary()


def _loop_guard(storage: TokenStorage, api_key: str) -> asyncio.Lock:
    """This loop's ``asyncio.Lock`` for one store (by ``id``: it outlives its clients) and key."""
    per_loop = _guards.setdefault(asyncio.get_running_loop(), {})
    return per_loop.setdefault((id(storage), api_key), asyncio.Lock())


async def _acquire_within(lock: asyncio.Lock, timeout_s: float) -> bool:
    """Whether ``lock`` was acquired within ``timeout_s``; cancelled or timed out, none is held.

    Not ``asyncio.wait_for``: before 3.12 it swallows a cancellation landing in the loop step
    that grants the lock, so an ``asyncio.timeout`` around the call would not fire in time.
    """
    acquiring = asyncio.ensure_future(lock.acquire())
    try:
        await asyncio.wait({acquiring}, timeout=timeout_s)
    except BaseException:
        _give_back(lock, acquiring)
        raise
    if acquiring.done():
        return True
    _give_back(lock, acquiring)
    return False


def _give_back(lock: asyncio.Lock, acquiring: asyncio.Future[Any]) -> None:
    """Undo an acquire whose caller gave up: release a lock it got, else cancel it (which takes
    nothing and passes a grant on)."""
    if not acquiring.done():
        acquiring.cancel()
    elif not acquiring.cancelled():
        lock.release()
