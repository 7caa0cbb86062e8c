"""The asyncio driver: the engine's steps performed with ``await``.

The same steps on the same store and lock objects as :func:`~.drivers.run_sync`, so a sync and
an async process take turns on one lock and share one token. Where each step runs:

- a store with ``inline_io`` (the file backend: a ``stat`` while the file is unchanged, ~4 us;
  a Fernet open, ~60 us; the holder's save, ~1 ms once per issuance) performs its steps on the
  loop. They must run there: ``filelock`` locks per thread, and the loop's thread holds it;
- any other store's steps run in a worker thread (``asyncio.to_thread``), and so does a
  compare-and-delete, which may wait for a lock.

Cancellation: a lock attempt cancelled while it runs in a thread is awaited to its end, and a
lock it took is given back; the release is shielded, so a second cancellation cannot leave the
fleet's lock behind. Within one event loop, tasks needing a token for the same store and app key
queue on one ``asyncio.Lock`` first: one of them goes to the fleet's lock, the others read what
it saved (a file lock is re-entrant within a thread, so two tasks would otherwise both hold it).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
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
    """A :class:`~kis_safe_token.storage.TokenStorage` driven from an event loop:
    ``get_or_issue`` and ``invalidate_token`` as coroutines, on the storage's own records and
    lock. Cancelled or timed out (``asyncio.timeout``) at any await, it leaves no lock held.

    ``redis_client``: the ``redis.asyncio`` client the fleet's Redis rate limiter is reserved
    on (by default one built from a Redis storage's URL; close it with :meth:`aclose`).
    """

    def __init__(self, storage: TokenStorage, *, redis_client: Any = None) -> None:
        self.storage = storage
        self._own_client = False
        self._client = redis_client
        build = getattr(storage, "async_client", None)
        if redis_client is None and build is not None:
            try:
                self._client = build()
                self._own_client = True
            except ValueError:
                self._client = None
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
        if step is RELEASE:
            return await asyncio.shield(self._run(flight.lock.release))
        if step is ATTEMPT and not self._inline:
            return await self._attempt_in_thread(flight)
        return await self._run(io_call(flight, step))

    async def _attempt_in_thread(self, flight: Flight) -> Any:
        """A lock attempt in a worker thread: cancelled meanwhile, the attempt runs to its end
        and a lock it took is released (the protocol never learnt that it held it)."""
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
        """:meth:`TokenStorage.get_or_issue` for a coroutine ``issue``: the same single flight
        fleet-wide (sync processes included), one issuance per event loop, and no blocking
        wait. Raises what ``get_or_issue`` raises."""
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
        deleted: bool = await asyncio.to_thread(
            self.storage.invalidate_token, api_key, api_secret, access_token
        )
        return deleted

    async def load_token(self, api_key: str, api_secret: str) -> Token | None:
        """The stored token if it is valid (never issues)."""
        token: Token | None = await self._run(partial(self.storage.read_token, api_key, api_secret))
        return token if token is not None and token.is_valid(self.storage.clock()) else None

    # -- the call-rate limiter --------------------------------------------------------------------
    async def try_acquire(
        self, limiter: Any, max_wait_s: float, deadline: float | None = None
    ) -> float | None:
        """``limiter.try_acquire(max_wait_s)`` without blocking the loop on a network: the
        limiter's own ``try_acquire_async`` (a Redis limiter runs its script on this store's
        ``redis.asyncio`` client, a file or memory one inline, any other in a worker thread)."""
        client = self._client if limiter.on_client(self._sync_client) else None
        wait: float | None = await limiter.try_acquire_async(max_wait_s, deadline, client)
        return wait

    @staticmethod
    async def penalize(limiter: Any, timeout_s: float | None = None) -> bool:
        """``limiter.penalize()`` (after ``EGW00201``; rare), through the limiter's own
        ``penalize_async`` (inline for a file or memory limiter, else in a worker thread; a
        Redis round trip retried for at most ``timeout_s``, the caller's budget left)."""
        started: bool = await limiter.penalize_async(timeout_s)
        return started


_guards: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[int, str], asyncio.Lock]]
_guards = weakref.WeakKeyDictionary()


def _loop_guard(storage: TokenStorage, api_key: str) -> asyncio.Lock:
    """The ``asyncio.Lock`` of this event loop for one store and app key (a lock belongs to
    one loop; keyed by the store object, which lives as long as the clients using it)."""
    per_loop = _guards.setdefault(asyncio.get_running_loop(), {})
    return per_loop.setdefault((id(storage), api_key), asyncio.Lock())


async def _acquire_within(lock: asyncio.Lock, timeout_s: float) -> bool:
    """Whether ``lock`` was acquired within ``timeout_s``.

    Not ``asyncio.wait_for``: before Python 3.12 it returns the lock, swallowing the
    cancellation, when the task is cancelled in the loop step that grants it; an
    ``asyncio.timeout`` around the call would then not fire until the whole refresh was over.
    Cancelled or timed out, this holds nothing: a lock granted meanwhile is given back.
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
    """Undo an acquire whose caller gave up: release a lock it got, else cancel it (a cancelled
    ``asyncio.Lock.acquire`` takes nothing and passes a grant on to the next waiter)."""
    if not acquiring.done():
        acquiring.cancel()
    elif not acquiring.cancelled():
        lock.release()
