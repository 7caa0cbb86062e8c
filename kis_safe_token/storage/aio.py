"""The single-flight protocol for asyncio: the same store, lock and records, no blocking wait.

:class:`AsyncStore` drives a :class:`~kis_safe_token.storage.base.TokenStorage` from an event
loop with the protocol of ``get_or_issue`` (read, lock, read again, issue, save, release) and
its pure parts, which live once in the base class. Only the waits differ: the file lock is
tried without blocking, with ``asyncio.sleep`` between looks; the Redis lock is the same
``ACQUIRE_LUA`` lock and the same wake-up lists, through ``redis.asyncio``. A sync and an async
process therefore take turns on one lock and share one token.

Within one event loop, tasks that need a token for the same store and app key queue on one
``asyncio.Lock`` before the fleet's lock: one of them issues, the others read what it saved
(the file lock is re-entrant within a thread, so without this two tasks would both hold it).

With the seed-protocol lease on (``seed_lease=True``, :mod:`.lease`), a task takes the lease
before the fleet's lock, as the sync ``get_or_issue`` does: one :meth:`SeedLease.try_grant` per
look, ``asyncio.sleep`` between, inside the loop's guard (the lease's owner is the loop thread,
shared by its tasks); a recorded failure is raised on every look; the save goes through the lease
(keeps the newest, marks the window) and the lease is released on the way out.

Where the sync primitives run: a file read is a ``stat`` while the file is unchanged (~4 us)
and a Fernet open of a small file otherwise (~60 us), so it runs on the loop; so does the
holder's save (~1 ms with its fsyncs, once per issuance): it must, as ``filelock`` locks per
thread and the loop's thread holds the lock. A Redis read or write, or a store we do not know,
runs in a worker thread (``asyncio.to_thread``), and so does compare-and-delete on the file (it
may wait for the lock). The fleet's call-rate limiter (:meth:`AsyncStore.try_acquire`): a
Redis one's script runs on ``redis.asyncio`` (one round trip, failovers retried with
``asyncio.sleep``), a file or memory one's inline. The file waiter looks on the loop rather
than waiting in a thread: a thread cannot be cancelled, and one left waiting would go on to
issue for nobody.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
import weakref
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from ..errors import TokenIssueError, TokenStorageError
from ..failure import IssueFailure
from ..ratelimit import FileRateLimiter, MemoryRateLimiter, RateLimiter, RedisRateLimiter
from ..ratelimit.redis import RESERVE_LUA
from ..token import Token
from .base import Acquired, TokenStorage, _local_lock, checked_token, jittered
from .file import FileIssuanceLock, FileTokenStorage
from .lease import LEASE_POLL_S, SeedLease, thread_owner
from .redis import (
    ACQUIRE_LUA,
    COMPARE_AND_DELETE_LUA,
    EXTEND_LUA,
    RELEASE_LUA,
    RedisIssuanceLock,
    RedisTokenStorage,
)
from .redis_retry import FAILED, redis_retry_async

__all__ = [
    "AsyncFileIssuanceLock",
    "AsyncIssuanceLock",
    "AsyncLocalIssuanceLock",
    "AsyncRedisIssuanceLock",
    "AsyncStore",
]

logger = logging.getLogger("kis_safe_token")

AsyncIssueFn = Callable[[], Awaitable[Token]]

#: Limiters whose reservation is a few microseconds of local work: run on the loop.
_INLINE_LIMITERS = (FileRateLimiter, MemoryRateLimiter)

#: How often a task waiting for this process's own (thread) lock looks again.
LOCAL_POLL_S = 0.005


class AsyncIssuanceLock(ABC):
    """:class:`~kis_safe_token.storage.base.IssuanceLock` for a coroutine: the same contract,
    awaited. ``acquire`` never blocks the event loop, and cancelling it leaves no lock held."""

    @abstractmethod
    async def acquire(self, deadline: float) -> Acquired:
        """``True`` once held, or the token / failure that showed up meanwhile."""

    async def extend(self) -> None:  # noqa: B027 - locks that do not expire need nothing
        """Keep holding a lock that expires by itself."""

    def save_deadline(self) -> float | None:
        """See :meth:`~kis_safe_token.storage.base.IssuanceLock.save_deadline`."""
        return None

    @abstractmethod
    async def release(self) -> None:
        """Release the lock (and wake the waiters, where the backend has any)."""


class AsyncLocalIssuanceLock(AsyncIssuanceLock):
    """This process's lock of a store without a shared one (the one its threads take too),
    tried without blocking."""

    def __init__(self, lock: threading.Lock, storage: TokenStorage) -> None:
        self._lock = lock
        self._storage = storage
        self._held = False

    async def acquire(self, deadline: float) -> Acquired:
        while not self._lock.acquire(blocking=False):
            if time.monotonic() >= deadline:
                raise TokenStorageError("timed out waiting for this process's own issuance")
            await asyncio.sleep(jittered(LOCAL_POLL_S))
        self._held = True
        return True

    async def release(self) -> None:
        if self._held:
            self._held = False
            self._lock.release()


class AsyncFileIssuanceLock(AsyncIssuanceLock):
    """The file lock's own looks (:meth:`FileIssuanceLock.look`), ``asyncio.sleep`` between."""

    def __init__(self, lock: FileIssuanceLock) -> None:
        self._lock = lock

    async def acquire(self, deadline: float) -> Acquired:
        while (got := self._lock.look()) is None:
            await asyncio.sleep(self._lock.pause_s(deadline))
        return got

    async def release(self) -> None:
        self._lock.release()


class AsyncRedisIssuanceLock(AsyncIssuanceLock):
    """:class:`RedisIssuanceLock` through ``redis.asyncio``: the same scripts, owner id format
    and wake-up lists, so sync and async waiters wake each other.

    A waiter cancelled in ``BLPOP`` may have taken one wake-up with it; the holder pushed
    ``WAKE_FANOUT`` and each woken waiter passes one on, so the others still wake. A task
    cancelled while its acquire script is on the wire may own the lock without knowing it: it
    releases by owner id (compare-and-delete) before the cancellation goes on.
    """

    def __init__(self, lock: RedisIssuanceLock, client: Any, storage: RedisTokenStorage) -> None:
        self._lock = lock
        self._client = client
        self._storage = storage
        self._deadline = float("-inf")

    async def _call(
        self, what: str, fn: Callable[[], Awaitable[Any]], deadline: float | None = None
    ) -> Any:
        """``await fn()``, retried after transient errors (a failover) until ``deadline``
        (default: the storage's ``retry_timeout_s`` from now), as the sync lock does."""
        if deadline is None:
            deadline = time.monotonic() + self._storage.retry_timeout_s
        return await redis_retry_async(fn, deadline=deadline, what=what, where=self._storage._where)

    async def acquire(self, deadline: float) -> Acquired:
        lock, client = self._lock, self._client
        keys, args = lock.acquire_keys_args
        script = client.register_script(ACQUIRE_LUA)
        spurious: str | None = None  # a wake-up list that woke us without a token
        self._deadline = deadline
        while True:
            try:
                # Retried after a lost reply, the script finds its own owner id: the lock is ours.
                reply = await self._call("lock", lambda: script(keys=keys, args=args), deadline)
            except asyncio.CancelledError:
                await asyncio.shield(self._abandon())
                raise
            got, wake_key = lock.attempt_outcome(reply)
            if got is not None:
                return got
            timeout = lock.wait_s(deadline)
            if wake_key == spurious:
                await asyncio.sleep(timeout)
                continue
            if await self._call(
                "BLPOP", partial(client.blpop, [wake_key], timeout=timeout), deadline
            ):
                reply = await self._call("GET", partial(self._pass_on_and_read, wake_key), deadline)
                seen = lock.woken_outcome(reply)
                if seen is not None:
                    return seen
                spurious = wake_key

    async def _pass_on_and_read(self, wake_key: str) -> Any:
        # A new pipeline per attempt: redis-py empties one that failed.
        pipe = self._lock.queue_pass_on(self._client.pipeline(transaction=False), wake_key)
        return await pipe.execute()

    async def _abandon(self) -> None:
        """After an attempt cancelled on the wire: delete the lock if the attempt took it after
        all (compare-and-delete on our owner id; no wake-ups pushed: nobody waits on a list of
        a holder that never knew it held the lock for more than a moment)."""
        keys, args = self._lock.release_keys_args
        try:
            await self._client.register_script(COMPARE_AND_DELETE_LUA)(keys=keys[:1], args=args[:1])
        except FAILED as exc:
            self._lock.release_failed(exc)

    async def extend(self) -> None:
        """Keep the lock; retried until this holder's deadline (at least ``retry_timeout_s``):
        a failover then delays the save of a token KIS just gave instead of losing it."""
        keys, args = self._lock.extend_keys_args
        script = self._client.register_script(EXTEND_LUA)
        deadline = self.save_deadline()
        if not await self._call("PEXPIRE", lambda: script(keys=keys, args=args), deadline):
            self._lock.lapsed()

    def save_deadline(self) -> float:
        """This holder's deadline, at least ``retry_timeout_s`` from now."""
        return max(self._deadline, time.monotonic() + self._storage.retry_timeout_s)

    async def release(self) -> None:
        keys, args = self._lock.release_keys_args
        script = self._client.register_script(RELEASE_LUA)
        # Retried no longer than the lock would live: past that, it has expired by itself.
        storage = self._storage
        deadline = time.monotonic() + min(storage.retry_timeout_s, storage.lock_ttl)
        try:
            await self._call("release", lambda: script(keys=keys, args=args), deadline)
        except TokenStorageError as exc:
            self._lock.release_failed(exc)


class AsyncStore:
    """A :class:`TokenStorage` seen from an event loop: ``get_or_issue`` and
    ``invalidate_token`` as coroutines, on the storage's own keys, records and lock.

    ``redis_client``: the ``redis.asyncio`` client for a :class:`LockedRedisTokenStorage` (by
    default one built from the storage's URL, password and timeouts; required for a storage
    built on an injected client). Close it with :meth:`aclose`.
    """

    def __init__(self, storage: TokenStorage, *, redis_client: Any = None) -> None:
        self.storage = storage
        self._own_client = False
        self._client = redis_client
        if isinstance(storage, RedisTokenStorage) and storage.fleet_lock and redis_client is None:
            self._client = storage.async_client()
            self._own_client = True
        self._on_loop = isinstance(storage, FileTokenStorage)

    async def aclose(self) -> None:
        """Close the ``redis.asyncio`` client, if this object built it."""
        if self._own_client and self._client is not None:
            await self._client.aclose()

    # -- the primitives, on the loop or in a thread (see the module's docstring) ----------------
    async def _run(self, fn: Callable[[], Any]) -> Any:
        if self._on_loop:
            return fn()
        return await asyncio.to_thread(fn)

    async def _read(self, api_key: str, api_secret: str, fresh: bool = False) -> Token | None:
        token: Token | None = await self._run(
            partial(self.storage._read, api_key, api_secret, fresh=fresh)
        )
        return token

    def _issuance_lock(self, api_key: str, api_secret: str) -> AsyncIssuanceLock:
        storage = self.storage
        lock = storage._issuance_lock(api_key, api_secret)
        if isinstance(lock, FileIssuanceLock):
            return AsyncFileIssuanceLock(lock)
        if isinstance(lock, RedisIssuanceLock) and isinstance(storage, RedisTokenStorage):
            return AsyncRedisIssuanceLock(lock, self._client, storage)
        return AsyncLocalIssuanceLock(_local_lock(api_key), storage)

    # -- the protocol ------------------------------------------------------------------------------
    async def get_or_issue(self, api_key: str, api_secret: str, issue: AsyncIssueFn) -> Token:
        """:meth:`TokenStorage.get_or_issue` for a coroutine ``issue``: the same single flight
        fleet-wide (sync processes included), one issuance per event loop, and no blocking
        wait. Cancelled or timed out (``asyncio.timeout``) at any await, it leaves no lock
        held. Raises what ``get_or_issue`` raises."""
        storage = self.storage
        token = await self._read(api_key, api_secret)
        if storage._usable(token):
            return token
        deadline = time.monotonic() + storage.wait_timeout
        guard = _loop_guard(storage, api_key)
        if not await _acquire_within(guard, storage.wait_timeout):
            raise TokenStorageError(
                f"timed out after {storage.wait_timeout:.1f} s waiting for another task's refresh"
            )
        try:
            token = await self._read(api_key, api_secret)  # another task may just have saved one
            if storage._usable(token):
                return token
            lease = storage._lease
            if lease is None:
                return await self._locked_issue(api_key, api_secret, issue, deadline)
            return await self._leased_issue(lease, api_key, api_secret, issue, deadline)
        finally:
            guard.release()

    async def _leased_issue(
        self, lease: SeedLease, api_key: str, api_secret: str, issue: AsyncIssueFn, deadline: float
    ) -> Token:
        """:meth:`TokenStorage._get_or_issue_leased` without blocking the loop: take the
        seed-protocol lease (or wait in it for a seed holder's save, looking with
        ``asyncio.sleep`` between), then the locked path; a recorded failure fails fast.

        The owner is this call's own (the loop thread's id plus a random part): sync seed code
        run on the loop thread, or another store object's call in the same loop, is another
        owner, not a holder. It is passed to every look and to the save, since a Redis look
        runs in a worker thread, whose own owner would differ. The issuance lock gets a fresh
        ``wait_timeout`` after the lease, as on the sync side.
        """
        storage, owner = self.storage, f"{thread_owner()}:{uuid.uuid4().hex[:8]}"
        held = await self._take_lease(lease, api_key, api_secret, owner)
        if not held:
            token = await self._read(api_key, api_secret, fresh=True)
            if storage._usable(token):
                return token
        deadline = max(deadline, time.monotonic() + storage.wait_timeout)
        try:
            return await self._locked_issue(api_key, api_secret, issue, deadline, owner)
        finally:
            if held:  # a no-op after our save, which ended it; shielded like the lock's release
                await asyncio.shield(self._run(partial(lease.released_by_delete, api_key, owner)))

    async def _take_lease(
        self, lease: SeedLease, api_key: str, api_secret: str, owner: str
    ) -> bool:
        """Whether ``owner`` now holds the lease (``False``: a valid token is stored), as
        :meth:`SeedLease.wait_for_grant` decides, raising a recorded failure on every look."""
        storage = self.storage
        deadline = time.monotonic() + storage.wait_timeout
        while True:
            await self._raise_failed(api_key, api_secret)
            look = asyncio.ensure_future(
                self._run(partial(lease.try_grant, api_key, api_secret, owner))
            )
            try:
                step = await asyncio.shield(look)
            except asyncio.CancelledError:
                await asyncio.shield(self._abandon_grant(look, lease, api_key, owner))
                raise
            if isinstance(step, bool):
                return not step
            retry_at = time.monotonic() + lease.retry_in_s(step)
            while (now := time.monotonic()) < retry_at:
                if now >= deadline:
                    raise lease.timed_out(step)
                await asyncio.sleep(min(retry_at - now, deadline - now, jittered(LEASE_POLL_S)))
                await self._raise_failed(api_key, api_secret)
                if await self._run(partial(lease.stored_valid, api_key, api_secret)):
                    return False

    async def _abandon_grant(
        self, look: asyncio.Future[Any], lease: SeedLease, api_key: str, owner: str
    ) -> None:
        """After a task was cancelled during a grant attempt that runs on in a worker thread
        (Redis): let it finish and give back a lease it took, rather than leave the fleet
        waiting for the lease to expire."""
        try:
            step = await look
        except Exception:  # noqa: BLE001 - nothing was granted
            return
        if step is False:
            try:
                await self._run(partial(lease.released_by_delete, api_key, owner))
            except TokenStorageError as exc:
                logger.warning("could not give back the lease of a cancelled task: %s", exc)

    async def _failure(self, api_key: str, api_secret: str) -> IssueFailure | None:
        """:meth:`TokenStorage._failure`: this process's own record, else the store's."""
        storage = self.storage
        previous = storage._local_failure(api_key, api_secret)
        if previous is None or not previous.active(storage.clock()):
            stored = await self._run(partial(storage._read_failure, api_key, api_secret))
            previous = stored or previous
        return previous

    async def _raise_failed(self, api_key: str, api_secret: str) -> None:
        self.storage._raise_if_held(await self._failure(api_key, api_secret))

    async def _locked_issue(
        self,
        api_key: str,
        api_secret: str,
        issue: AsyncIssueFn,
        deadline: float,
        owner: str | None = None,
    ) -> Token:
        storage = self.storage
        lock = self._issuance_lock(api_key, api_secret)
        got = await lock.acquire(deadline)
        if isinstance(got, Token):
            return got
        if isinstance(got, IssueFailure):
            raise got.error(storage.clock())
        try:
            token = await self._read(api_key, api_secret, fresh=True)
            if not storage._usable(token):
                token = await self._issue_recording(lock, api_key, api_secret, issue)
                storage._note_success(api_key, api_secret)
                await self._save_issued(lock, api_key, api_secret, token, owner)
            return token
        finally:
            # Shielded: a second cancellation must not leave the fleet's lock behind.
            await asyncio.shield(lock.release())

    async def _save_issued(
        self,
        lock: AsyncIssuanceLock,
        api_key: str,
        api_secret: str,
        token: Token,
        owner: str | None = None,
    ) -> None:
        """Save what KIS just issued; with the lease on, through it (keeps the newest, marks the
        window, ends ``owner``'s lease), as the sync holder does."""
        lease = self.storage._lease
        try:
            await lock.extend()
            deadline = lock.save_deadline()
            if lease is not None:
                owner = thread_owner() if owner is None else owner
                save = partial(lease.save, api_key, api_secret, token, owner, deadline=deadline)
                await self._run(save)
            else:
                await self._run(
                    partial(self.storage._write_until, api_key, api_secret, token, deadline)
                )
        except TokenStorageError as exc:
            logger.error("could not save the token KIS just issued (kept in memory): %s", exc)

    async def _issue_recording(
        self, lock: AsyncIssuanceLock, api_key: str, api_secret: str, issue: AsyncIssueFn
    ) -> Token:
        storage = self.storage
        previous = await self._failure(api_key, api_secret)
        storage._raise_if_held(previous)
        try:
            return await self._issue_holding(lock, api_key, api_secret, issue)
        except TokenIssueError as exc:
            failure = storage._note_failure(api_key, api_secret, exc, previous)
            if failure is not None:
                try:
                    await self._run(partial(storage._write_failure, api_key, api_secret, failure))
                except TokenStorageError as store_exc:
                    logger.warning("could not record the failed issuance: %s", store_exc)
            raise

    async def _issue_holding(
        self, lock: AsyncIssuanceLock, api_key: str, api_secret: str, issue: AsyncIssueFn
    ) -> Token:
        """Ask KIS; after ``EGW00133`` sit out the window (re-checking the cache, keeping the
        lock) and ask once more, as the sync holder does."""
        storage = self.storage
        try:
            return checked_token(await issue())
        except TokenIssueError as exc:
            resume = storage._resume_at(exc)
        slice_s = storage._backoff_slice_s()
        while (left := resume - time.monotonic()) > 0:
            await asyncio.sleep(min(slice_s, left))
            await lock.extend()
            token = await self._read(api_key, api_secret, fresh=True)
            if storage._usable(token):
                return token
        return checked_token(await issue())

    async def invalidate_token(self, api_key: str, api_secret: str, access_token: str) -> bool:
        """The storage's compare-and-delete, in a worker thread (it may wait for a lock)."""
        deleted: bool = await asyncio.to_thread(
            self.storage.invalidate_token, api_key, api_secret, access_token
        )
        return deleted

    # -- the call-rate limiter --------------------------------------------------------------------
    async def try_acquire(
        self, limiter: RateLimiter, max_wait_s: float, deadline: float | None = None
    ) -> float | None:
        """``limiter.try_acquire(max_wait_s)`` without blocking the loop on a network: a
        :class:`RedisRateLimiter` on this store's Redis runs its one script on the
        ``redis.asyncio`` client (retried through a failover like the lock, no later than the
        caller's ``deadline``); a file or memory limiter runs inline (microseconds); any other
        limiter in a worker thread."""
        client = self._client
        if (
            isinstance(limiter, RedisRateLimiter)
            and client is not None
            and isinstance(self.storage, RedisTokenStorage)
            and limiter.on_client(self.storage.redis_client)
        ):
            keys, args = limiter.reserve_call(max_wait_s)
            script = client.register_script(RESERVE_LUA)
            reply = await redis_retry_async(
                lambda: script(keys=keys, args=args),
                deadline=limiter.retry_deadline(deadline),
                what="rate limiter reserve",
                where=self.storage._where,
            )
            return limiter.reserve_result(reply)
        if isinstance(limiter, _INLINE_LIMITERS):
            return limiter.try_acquire(max_wait_s)
        if deadline is not None:
            bounded: float | None = await asyncio.to_thread(
                limiter._reserve_by, max_wait_s, deadline
            )
            return bounded
        wait: float | None = await asyncio.to_thread(limiter.try_acquire, max_wait_s)
        return wait

    @staticmethod
    async def penalize(limiter: RateLimiter, timeout_s: float | None = None) -> bool:
        """``limiter.penalize()`` (after ``EGW00201``; rare): inline for a file or memory
        limiter, in a worker thread for any other (a Redis round trip, retried for at most
        ``timeout_s``, the caller's budget left, where given)."""
        if isinstance(limiter, _INLINE_LIMITERS):
            return limiter.penalize()
        started: bool = await asyncio.to_thread(partial(limiter.penalize, timeout_s=timeout_s))
        return started

    async def load_token(self, api_key: str, api_secret: str) -> Token | None:
        """The stored token if it is valid (never issues)."""
        token = await self._read(api_key, api_secret)
        return token if token is not None and token.is_valid(self.storage.clock()) else None


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
