"""The asyncio side: AsyncKoreaInvestment / AsyncSharedToken on the same stores, locks and token
as the sync side, with waits that never block the event loop, and cancellation that leaves no
lock behind. Real processes, a real redis-server, the simulator over real HTTP.

pytest has no asyncio plugin here: each test drives its coroutines with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
import requests
from async_herd import run_mixed_herd
from conftest import HERD_CALLS_PER_SECOND
from herd import HERD_APP_KEY, HERD_SECRET, SYMBOL, build_storage
from test_fleets import APPS, fleet_env, wait_until_serving

import kis_safe_token.async_client as async_client_module
from kis_safe_token import (
    AsyncKoreaInvestment,
    AsyncSharedToken,
    KisApiError,
    KoreaInvestment,
    SharedToken,
    Token,
    TokenIssueError,
    TokenStorageError,
)
from kis_safe_token.auth import RETRY_ATTEMPTS
from kis_safe_token.flight.aio import AsyncStore, _loop_guard
from kis_safe_token.ratelimit import MemoryRateLimiter, RedisRateLimiter
from kis_safe_token.storage import Busy
from kis_safe_token.storage.base import TokenStorage
from kis_safe_token.storage.file import FileIssuanceLock
from kis_safe_token.storage.redis import WAKE_TTL_MS, RedisIssuanceLock
from kis_safe_token.testing import KisSimulator
from kis_safe_token.testing.redis_server import RedisServer, free_port

T = TypeVar("T")
BACKENDS = ["file", "redis"]
#: A call-rate limit that keeps the limiter in every call's path without making tests about the
#: token queue for KIS's 20/s (200 calls would take 10 s).
FAST = 1000.0


def client(storage: TokenStorage, sim: KisSimulator, **kwargs: Any) -> AsyncKoreaInvestment:
    return AsyncKoreaInvestment(
        HERD_APP_KEY, HERD_SECRET, token_storage=storage, base_url=sim.base_url, **kwargs
    )


class SyncHolder:
    """Another process's issuance, played by a thread with its own storage object: it takes the
    fleet's lock and hangs in ``tokenP`` (the simulator's ``issue_gate``) until :meth:`finish`."""

    def __init__(self, sim: KisSimulator, spec: dict[str, Any]) -> None:
        self.sim = sim
        self.spec = spec
        self.bearer: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        storage = build_storage(self.spec)
        kis = KoreaInvestment(
            HERD_APP_KEY, HERD_SECRET, token_storage=storage, base_url=self.sim.base_url
        )
        self.bearer = kis.access_token

    def __enter__(self) -> SyncHolder:
        self.sim.issue_gate.clear()
        self.thread.start()
        assert self.sim.wait_for(lambda s: s.counts["issue_requests"] >= 1), "no tokenP came"
        return self

    def finish(self) -> None:
        self.sim.issue_gate.set()
        self.thread.join(10)

    def __exit__(self, *exc: object) -> None:
        self.finish()


def lock_is_free(spec: dict[str, Any], within_s: float = 3.0) -> bool:
    """Whether another process (a fresh storage object) gets the issuance lock within
    ``within_s`` (a new connection and a script load on a loaded box fit in the default).

    An attempt that meets the lock taken for a moment (a file waiter's release watch holds a
    shared ``flock`` between two system calls) is answered with the stored token instead:
    tried again until the deadline, so only a lock somebody keeps makes this false."""
    storage = build_storage(spec)
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        lock = storage.issuance_lock(HERD_APP_KEY, HERD_SECRET)
        try:
            got = lock.acquire(deadline)
        except TokenStorageError:
            return False
        if got is True:
            lock.release()
            return True
    return False


def waiting_on_the_fleet_lock(
    spec: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> Callable[[], int]:
    """How many waiters are on the fleet's lock, by a real signal of each backend: Redis
    clients blocked in ``BLPOP`` on a wake-up list (``CLIENT LIST`` flag ``b``); file locks whose
    attempt found the lock taken (the file lock's own :meth:`FileIssuanceLock.attempt`, counted)."""
    if spec["kind"] == "redis":
        r = redis.from_url(spec["url"])
        return lambda: sum("b" in c["flags"] for c in r.client_list())
    refused: set[int] = set()
    attempt = FileIssuanceLock.attempt

    def counted(self: FileIssuanceLock) -> Any:
        got = attempt(self)
        if isinstance(got, Busy):
            refused.add(id(self))
        return got

    monkeypatch.setattr(FileIssuanceLock, "attempt", counted)
    return lambda: len(refused)


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    """Wait on the loop until ``condition()`` holds (a bounded wait, never a guess)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.01)


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


# -- fleets ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kinds", [["async"] * 4, ["sync", "async", "sync", "async"]], ids=["async", "mixed"]
)
def test_four_processes_of_fifty_tasks_make_one_issuance(
    sim: KisSimulator, spec_of: Callable[[str], dict[str, Any]], backend: str, kinds: list[str]
) -> None:
    herd = run_mixed_herd(kinds, spec_of(backend), sim.base_url, tasks=50, calls_per_second=FAST)
    assert herd.errors == []
    assert herd.calls == 200
    assert len(herd.tokens) == 1
    assert sim.issued == 1
    assert sim.rate_limited == 0


@pytest.mark.parametrize("backend", ["file", "redis-unlocked"])
def test_clients_of_one_store_in_one_loop_share_one_issuance(
    sim: KisSimulator, spec_of: Callable[[str], dict[str, Any]], backend: str
) -> None:
    # redis-unlocked: the seed's RedisTokenStorage, a store with no fleet lock of its own (its
    # primitives run in threads, its lock is this process's own).
    spec = spec_of(backend.removesuffix("-unlocked"))
    storage = build_storage({**spec, "locked": False})

    async def main() -> set[str]:
        clients = [client(storage, sim, calls_per_second=FAST) for _ in range(3)]
        try:
            calls = [kis.fetch_price(SYMBOL) for kis in clients for _ in range(20)]
            await asyncio.gather(*calls)
            return {await kis.access_token() for kis in clients}
        finally:
            for kis in clients:
                await kis.aclose()

    assert len(run(main())) == 1
    assert sim.issued == 1 and sim.counts["issue_requests"] == 1


def test_rejected_token_is_replaced_once_for_all_tasks(
    sim: KisSimulator, spec_of: Callable[[str], dict[str, Any]]
) -> None:
    # 30 tasks open their Redis connections at once; on a loaded CI host the suite's one
    # redis-server once took over 3 s (the default retry_timeout_s) to accept one of them.
    storage = build_storage({**spec_of("redis"), "options": {"retry_timeout_s": 20.0}})

    async def main() -> tuple[str, str]:
        async with client(storage, sim, calls_per_second=FAST) as kis:
            first = await kis.access_token()
            sim.expire_tokens()
            quotes = await asyncio.gather(*(kis.fetch_price(SYMBOL) for _ in range(30)))
            assert all(q["rt_cd"] == "0" for q in quotes)
            return first, await kis.access_token()

    first, second = run(main())
    assert first != second
    assert sim.issued == 2 and sim.rate_limited == 0
    assert sim.counts["EGW00123"] >= 1


# -- the event loop keeps running ----------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_loop_keeps_ticking_while_waiting_for_another_process_issuance(
    sim: KisSimulator, spec_of: Callable[[str], dict[str, Any]], backend: str
) -> None:
    spec = spec_of(backend)
    storage = build_storage(spec)
    lags: list[float] = []
    tick_s = 0.005

    async def waiting(holder: SyncHolder) -> tuple[str, float]:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        async def ticker() -> None:
            while not done.is_set():
                start = loop.time()
                await asyncio.sleep(tick_s)
                lags.append(loop.time() - start - tick_s)

        kis = client(storage, sim)
        ticking = asyncio.create_task(ticker())
        call = asyncio.create_task(kis.fetch_price(SYMBOL))
        window_s = 1.5
        await asyncio.sleep(window_s)  # the measurement window, not a race
        assert not call.done(), "the call did not wait for the other process"
        holder.sim.issue_gate.set()
        opened = loop.time()
        await call
        got_s = loop.time() - opened
        done.set()
        await ticking
        bearer = await kis.access_token()
        await kis.aclose()
        return bearer, got_s

    with SyncHolder(sim, spec) as holder:
        bearer, got_s = run(waiting(holder))
    assert holder.bearer == bearer
    assert sim.issued == 1
    worst, median = max(lags), statistics.median(lags)
    print(
        f"\n[{backend}] ticks={len(lags)} loop lag median {median * 1000:.1f} ms, "
        f"max {worst * 1000:.1f} ms; token {got_s * 1000:.0f} ms after the holder's"
    )
    # A wait that blocked the loop would stall the ticker for the whole 1.5 s window: no tick
    # in it, one lag of 1.5 s or more. The goal is 20 ms (met on a quiet box, see the report);
    # the bound leaves room for a 2-core box shared by a dozen busy processes.
    assert len(lags) >= 20, "the ticker hardly ran"
    assert worst < 1.0


# -- cancellation and timeouts -------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_task_cancelled_while_holding_the_lock_releases_it(
    sim: KisSimulator, spec_of: Callable[[str], dict[str, Any]], backend: str
) -> None:
    spec = spec_of(backend)
    storage = build_storage(spec)
    sim.issue_gate.clear()

    async def main() -> bool:
        async with client(storage, sim).shared_token as shared:
            holding = asyncio.create_task(shared.token())
            entered = await asyncio.to_thread(
                sim.wait_for, lambda s: s.counts["issue_requests"] >= 1
            )
            assert entered, "the task never reached tokenP"
            # (held for the whole test: a short look cannot mistake it for free)
            assert not await asyncio.to_thread(lock_is_free, spec, 0.5), "the task holds no lock"
            holding.cancel()
            with pytest.raises(asyncio.CancelledError):
                await holding
            return await asyncio.to_thread(lock_is_free, spec)

    try:
        assert run(main()) is True
    finally:
        sim.issue_gate.set()


@pytest.mark.parametrize("backend", BACKENDS)
def test_task_cancelled_while_waiting_leaves_the_others_unharmed(
    sim: KisSimulator,
    spec_of: Callable[[str], dict[str, Any]],
    backend: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = spec_of(backend)
    # Three "processes" in one loop: each its own storage object, so each waits on the fleet lock.
    clients_storages = [build_storage(spec) for _ in range(3)]
    waiting = waiting_on_the_fleet_lock(spec, monkeypatch)

    async def main(holder: SyncHolder) -> list[str]:
        clients = [client(s, sim) for s in clients_storages]
        calls = [asyncio.create_task(kis.fetch_price(SYMBOL)) for kis in clients]
        await until(lambda: waiting() >= 3, "all three tasks wait on the holder's lock")
        assert not any(c.done() for c in calls)
        calls[0].cancel()
        with pytest.raises(asyncio.CancelledError):
            await calls[0]
        holder.finish()
        async with asyncio.timeout(5):
            await asyncio.gather(*calls[1:])
        bearers = [await kis.access_token() for kis in clients[1:]]
        for kis in clients:
            await kis.aclose()
        return bearers

    with SyncHolder(sim, spec) as holder:
        bearers = run(main(holder))
    assert set(bearers) == {holder.bearer}
    assert sim.issued == 1 and sim.counts["issue_requests"] == 1
    assert lock_is_free(spec)
    if backend == "redis":
        r = redis.from_url(spec["url"])
        assert r.keys(f"{spec['key_prefix']}:*:lock") == []
        # Wake-up lists are the releasers' own and expire by themselves: nothing stays behind.
        wake_lists = r.keys(f"{spec['key_prefix']}:*:lock:wake:*")
        assert wake_lists and all(0 < r.pttl(k) <= WAKE_TTL_MS for k in wake_lists)


def test_a_cancellation_that_lands_as_the_loop_guard_is_granted_still_cancels(
    spec_of: Callable[[str], dict[str, Any]],
) -> None:
    """The race behind ``asyncio.timeout`` around a call: the task is cancelled in the same loop
    step as the per-loop guard is handed to it. ``asyncio.wait_for`` before Python 3.12 returns
    the lock then and swallows the cancellation: the call would go on to issue, and a timeout
    around it would not fire until the whole wait was over."""
    storage = build_storage(spec_of("file"))
    store = AsyncStore(storage)
    issued: list[Token] = []

    async def issue() -> Token:
        token = Token("tok-" + os.urandom(4).hex(), time.time() + 86400)
        issued.append(token)
        return token

    async def main() -> None:
        guard = _loop_guard(storage, HERD_APP_KEY)
        await guard.acquire()
        call = asyncio.create_task(store.get_or_issue(HERD_APP_KEY, HERD_SECRET, issue))
        await until(lambda: bool(getattr(guard, "_waiters", None)), "the call waits on the guard")
        guard.release()  # hands the guard to the call's acquire ...
        call.cancel()  # ... and cancels the call before that acquire has run
        done, _ = await asyncio.wait({call}, timeout=5)
        assert done, "the call neither finished nor was cancelled"
        assert call.cancelled(), f"the cancellation was swallowed: {call.result()!r}"
        assert not guard.locked(), "the cancelled call left the guard held"

    run(main())
    assert issued == []


def test_a_call_that_outwaits_another_task_s_refresh_is_a_clear_error_holding_nothing(
    spec_of: Callable[[str], dict[str, Any]],
) -> None:
    spec = spec_of("file")
    spec["options"] = {"wait_timeout": 0.2}
    storage = build_storage(spec)
    store = AsyncStore(storage)

    async def issue() -> Token:
        return Token("tok-" + os.urandom(4).hex(), time.time() + 86400)

    async def main() -> Token:
        guard = _loop_guard(storage, HERD_APP_KEY)
        await guard.acquire()  # another task of this loop, refreshing for longer than the wait
        started = time.monotonic()
        with pytest.raises(TokenStorageError, match="waiting for another task's refresh"):
            await store.get_or_issue(HERD_APP_KEY, HERD_SECRET, issue)
        assert time.monotonic() - started < 2.0
        guard.release()
        await asyncio.sleep(0)  # one loop step: a waiter left in line would take the guard now
        assert not guard.locked(), "the timed-out call took the guard after giving up"
        return await store.get_or_issue(HERD_APP_KEY, HERD_SECRET, issue)

    assert run(main()).access_token.startswith("tok-")


@pytest.mark.parametrize("backend", BACKENDS)
def test_asyncio_timeout_around_a_call_gives_up_and_the_client_still_works(
    sim: KisSimulator, spec_of: Callable[[str], dict[str, Any]], backend: str
) -> None:
    spec = spec_of(backend)
    storage = build_storage(spec)

    async def main(holder: SyncHolder) -> float:
        kis = client(storage, sim)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await kis.fetch_price(SYMBOL)
        gave_up_s = time.monotonic() - started
        holder.finish()
        quote = await kis.fetch_price(SYMBOL)
        assert quote["rt_cd"] == "0"
        assert await kis.access_token() == holder.bearer
        await kis.aclose()
        return gave_up_s

    with SyncHolder(sim, spec) as holder:
        gave_up_s = run(main(holder))
    assert gave_up_s < 5.0  # without the timeout: until the holder's tokenP is answered
    assert sim.issued == 1
    assert lock_is_free(spec)


# -- the fleet's call-rate limit (the asyncio side) ------------------------------------
class CountingLimiter(MemoryRateLimiter):
    """A process-local limiter that counts the slots it hands out."""

    def __init__(self, rate: float) -> None:
        super().__init__("counting-" + os.urandom(4).hex(), rate)
        self.taken = 0

    def try_acquire(self, max_wait_s: float = 0.0) -> float | None:
        self.taken += 1
        return super().try_acquire(max_wait_s)


def test_every_uapi_call_takes_a_slot_of_the_limiter(
    sim: KisSimulator, spec_of: Callable[[str], dict[str, Any]]
) -> None:
    storage = build_storage(spec_of("file"))
    limiter = CountingLimiter(1000)

    async def main() -> None:
        async with client(storage, sim, rate_limiter=limiter) as kis:
            for _ in range(3):
                await kis.fetch_price(SYMBOL)
            await kis.approval_key()

    run(main())
    # One slot per /uapi/ call and one for the Approval call (metered with them); none for tokenP.
    assert sim.counts["uapi_calls"] == 3 and sim.counts["approval_requests"] == 1
    assert limiter.taken == 4
    off = client(storage, sim, calls_per_second=0)
    assert off.rate_limiter is None
    with pytest.raises(ValueError, match="calls_per_second"):
        client(storage, sim, calls_per_second=-1)
    with pytest.raises(ValueError, match="not both"):
        client(storage, sim, calls_per_second=5, rate_limiter=limiter)


@pytest.fixture
def metered_sim() -> Iterator[KisSimulator]:
    """The simulator enforcing KIS's real-account limit, 20 calls/s per app key."""
    with KisSimulator(apps={HERD_APP_KEY: HERD_SECRET}, calls_per_second=20) as simulator:
        yield simulator


@pytest.mark.parametrize(
    ("backend", "kinds", "tasks"),
    [("redis", ["async", "async"], 30), ("file", ["sync", "async"], 20)],
    ids=["redis-async-pair", "file-mixed-pair"],
)
def test_a_fleet_of_async_processes_keeps_to_the_limit(
    metered_sim: KisSimulator,
    spec_of: Callable[[str], dict[str, Any]],
    backend: str,
    kinds: list[str],
    tasks: int,
) -> None:
    # Every task fires at once; each process alone keeps under KIS's 20/s, so only one limit
    # shared by both processes (sync and async alike) keeps the pair under it.
    herd = run_mixed_herd(
        kinds,
        spec_of(backend),
        metered_sim.base_url,
        tasks=tasks,
        calls_per_second=HERD_CALLS_PER_SECOND,
    )
    assert herd.errors == []
    assert herd.calls == len(kinds) * tasks == metered_sim.counts["uapi_calls"]
    assert metered_sim.too_many_calls == 0, dict(metered_sim.counts)
    assert metered_sim.peak_calls_per_second[HERD_APP_KEY] <= 20
    assert metered_sim.issued == 1


def test_redis_slots_are_reserved_on_redis_asyncio_in_the_sync_side_s_state(
    sim: KisSimulator, spec_of: Callable[[str], dict[str, Any]]
) -> None:
    spec = spec_of("redis")
    storage = build_storage(spec)

    async def main() -> None:
        async with client(storage, sim, calls_per_second=0.5) as kis:
            limiter = kis.rate_limiter
            assert isinstance(limiter, RedisRateLimiter)

            def blocking(max_wait_s: float = 0.0) -> float | None:
                raise AssertionError("a blocking Redis round trip on the event loop")

            limiter.try_acquire = blocking  # type: ignore[method-assign]
            for _ in range(2):  # slots at t0 and t0 + 2 s
                await kis.fetch_price(SYMBOL)

    run(main())
    assert sim.counts["uapi_calls"] == 2
    # A sync process on the same Redis queues behind the async one's reservations.
    other = SharedToken(HERD_APP_KEY, HERD_SECRET, build_storage(spec), calls_per_second=0.5)
    assert other.rate_limiter is not None
    # The next free slot is t0 + 4 s: about two seconds away, unless the run above was very slow
    # (a limiter of its own would give this process a slot at once).
    wait = other.rate_limiter.try_acquire(10)
    assert wait is not None and wait > 0.3


def test_egw00201_from_outside_is_retried_after_back_off_and_slows_the_fleet(
    sim: KisSimulator,
    spec_of: Callable[[str], dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage = build_storage(spec_of("redis"))
    sim.refuse_calls(2)
    caplog.set_level(logging.WARNING, "kis_safe_token")

    async def main() -> tuple[str, float, float]:
        async with client(storage, sim) as kis:
            started = time.monotonic()
            quote = await kis.fetch_price(SYMBOL)
            took = time.monotonic() - started
            limiter = kis.rate_limiter
            assert limiter is not None
            return quote["rt_cd"], took, limiter.slowdown_left_s()

    rt_cd, took, slowdown_left = run(main())
    assert rt_cd == "0"
    assert took >= 0.25 * 0.5 + 0.5 * 0.5  # two jittered back-offs
    assert sim.too_many_calls == 2 and sim.counts["uapi_calls"] == 1
    assert slowdown_left > 50  # the fleet (every process on this Redis) slowed down
    warnings = [r for r in caplog.records if "EGW00201" in r.getMessage()]
    assert len(warnings) == 1  # two refusals, one log line


def test_egw00201_that_does_not_stop_is_a_clear_error_after_bounded_re_sends(
    sim: KisSimulator, spec_of: Callable[[str], dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = build_storage(spec_of("file"))
    pauses: list[int] = []

    def quick_backoff(attempt: int) -> float:
        pauses.append(attempt)
        return 0.01

    monkeypatch.setattr(async_client_module, "backoff_s", quick_backoff)
    sim.refuse_calls(1_000)

    async def main() -> KisApiError:
        async with client(storage, sim) as kis:
            with pytest.raises(KisApiError) as info:
                await kis.fetch_price(SYMBOL)
            return info.value

    error = run(main())
    assert error.code == "EGW00201" and error.status == 500
    assert f"after {RETRY_ATTEMPTS} re-sends" in str(error)
    assert sim.too_many_calls == 1 + RETRY_ATTEMPTS
    assert pauses == list(range(RETRY_ATTEMPTS))


# -- the websocket approval key (the asyncio side) ------------------------------------
def _sync_approval(spec: dict[str, Any], base_url: str, barrier: Any, out: Any) -> None:
    try:
        storage = build_storage(spec)
        shared = SharedToken(HERD_APP_KEY, HERD_SECRET, storage, base_url=base_url)
        barrier.wait(30)
        out.put(shared.approval_key)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        out.put(f"error: {type(exc).__name__}: {exc}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tasks_and_a_sync_process_share_one_approval_key(
    sim: KisSimulator, spec_of: Callable[[str], dict[str, Any]], backend: str
) -> None:
    spec = spec_of(backend)
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    proc = ctx.Process(target=_sync_approval, args=(spec, sim.base_url, barrier, out))
    proc.start()

    async def main() -> list[str]:
        # Two async "processes" (each its own storage object) of 10 tasks each.
        shareds = [
            AsyncSharedToken(HERD_APP_KEY, HERD_SECRET, build_storage(spec), base_url=sim.base_url)
            for _ in range(2)
        ]
        try:
            await asyncio.to_thread(barrier.wait, 30)
            return await asyncio.gather(*(s.approval_key() for s in shareds for _ in range(10)))
        finally:
            for shared in shareds:
                await shared.aclose()

    try:
        keys = [*run(main()), out.get(timeout=30)]
    finally:
        proc.join(10)
    assert len(set(keys)) == 1 and keys[0] in sim.approval_keys
    assert sim.counts["approval_requests"] == 1 and sim.counts["approvals_issued"] == 1
    assert sim.issued == 0  # the approval key needs no access token


def test_a_rejected_approval_key_is_dropped_only_if_still_stored(
    sim: KisSimulator, spec_of: Callable[[str], dict[str, Any]]
) -> None:
    spec = spec_of("redis")

    async def main() -> tuple[str, str]:
        async with (
            client(build_storage(spec), sim) as first,
            client(build_storage(spec), sim) as late,
        ):
            old = await first.approval_key()
            assert await late.approval_key() == old
            assert await first.invalidate_approval_key(old) is True
            new = await first.approval_key()
            assert new != old and sim.counts["approvals_issued"] == 2
            assert await late.invalidate_approval_key(old) is False  # the fresh key survives
            assert await late.approval_key() == new
            return old, new

    old, new = run(main())
    assert sim.counts["approvals_issued"] == 2
    sync_side = SharedToken(HERD_APP_KEY, HERD_SECRET, build_storage(spec), base_url=sim.base_url)
    assert sync_side.approval_key == new


# -- an ASGI fleet ---------------------------------------------------------------------------------
@pytest.mark.parametrize("storage", BACKENDS)
def test_starlette_under_gunicorn_uvicorn_workers_makes_one_issuance(
    sim: KisSimulator, tmp_path: Path, storage: str
) -> None:
    with ExitStack() as stack:
        # A private redis-server only for the Redis backend (the fleet uses the default prefix).
        private_redis = stack.enter_context(RedisServer()) if storage == "redis" else None
        env = fleet_env(sim, storage, tmp_path, private_redis)
        port = free_port()
        args = [sys.executable, "-m", "gunicorn", "-w", "4", "-k", "uvicorn.workers.UvicornWorker"]
        args += ["-b", f"127.0.0.1:{port}", "--log-level", "warning", "asgi_app:app"]
        proc = subprocess.Popen(args, env=env, cwd=APPS)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_serving(f"{url}/health", proc)
            # Until several workers answer (bounded): one worker up early could take all 48.
            deadline, seen = time.monotonic() + 30, set()
            while len(seen) < 2 and time.monotonic() < deadline:
                with ThreadPoolExecutor(8) as pool:
                    health = pool.map(lambda i: requests.get(f"{url}/health", timeout=5), range(8))
                    seen |= {h.json()["pid"] for h in health}
            with ThreadPoolExecutor(16) as pool:
                answers = list(
                    pool.map(lambda i: requests.get(f"{url}/{SYMBOL}", timeout=30), range(48))
                )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    assert [a.status_code for a in answers] == [200] * 48
    bodies = [a.json() for a in answers]
    assert len({b["pid"] for b in bodies}) > 1  # several workers served
    assert len({b["token"] for b in bodies}) == 1
    assert sim.issued == 1 and sim.rate_limited == 0


# -- KIS refusing ----------------------------------------------------------------------------------
def test_holder_sits_out_egw00133_on_the_loop_and_asks_again(
    spec_of: Callable[[str], dict[str, Any]],
) -> None:
    storage = build_storage(spec_of("redis"))
    # KIS's one-minute window, ended by the refusal below rather than by the wall clock: the
    # holder's short sit-out (rate_limit_wait_s) stands for the minute.
    with KisSimulator(issue_latency_s=0, refusals_per_window=1) as sim:
        # Someone issued within the window and kept the token to itself (a holder that died).
        requests.post(
            f"{sim.base_url}/oauth2/tokenP",
            json={
                "grant_type": "client_credentials",
                "appkey": HERD_APP_KEY,
                "appsecret": HERD_SECRET,
            },
            timeout=5,
        )
        assert sim.issued == 1

        async def main() -> list[str]:
            async with client(storage, sim, rate_limit_wait_s=1.2) as kis:
                quotes = await asyncio.gather(*(kis.fetch_price(SYMBOL) for _ in range(10)))
                return [q["rt_cd"] for q in quotes]

        assert run(main()) == ["0"] * 10
        assert sim.rate_limited == 1 and sim.issued == 2, dict(sim.counts)


def test_failed_issuance_is_shared_with_the_fleet_not_retried_by_each(
    sim: KisSimulator, spec_of: Callable[[str], dict[str, Any]]
) -> None:
    spec = spec_of("file")
    sim.outage.set()

    async def main() -> list[BaseException | dict[str, Any]]:
        clients = [client(build_storage(spec), sim) for _ in range(3)]
        try:
            first = await asyncio.gather(clients[0].fetch_price(SYMBOL), return_exceptions=True)
            rest = await asyncio.gather(
                *(kis.fetch_price(SYMBOL) for kis in clients[1:]), return_exceptions=True
            )
            return [*first, *rest]
        finally:
            for kis in clients:
                await kis.aclose()

    outcomes = run(main())
    assert all(isinstance(o, TokenIssueError) and o.status == 502 for o in outcomes)
    assert sim.counts["issue_requests"] == 1  # the others re-raised the recorded failure


def test_reprs_show_neither_the_secret_nor_the_token(
    sim: KisSimulator, spec_of: Callable[[str], dict[str, Any]]
) -> None:
    storage = build_storage(spec_of("file"))

    async def main() -> tuple[str, list[str]]:
        async with client(storage, sim) as kis:
            return await kis.access_token(), [repr(kis), repr(kis.shared_token)]

    bearer, reprs = run(main())
    for text in reprs:
        assert HERD_SECRET not in text
        assert HERD_APP_KEY not in text
        assert bearer.removeprefix("Bearer ")[:16] not in text


def test_attempt_cancelled_after_redis_took_the_lock_gives_it_back(
    sim: KisSimulator, spec_of: Callable[[str], dict[str, Any]]
) -> None:
    spec = spec_of("redis")
    storage = build_storage(spec)

    attempted, cancelled = threading.Event(), threading.Event()
    real_attempt = RedisIssuanceLock.attempt

    def reply_lost(self: RedisIssuanceLock) -> Any:
        """The attempt runs on the server (the lock taken) and its task is cancelled before
        the reply is back: the taker does not know it holds the lock."""
        got = real_attempt(self)
        attempted.set()
        cancelled.wait(10)
        return got

    async def main() -> None:
        kis = client(storage, sim)
        call = asyncio.ensure_future(kis.fetch_price(SYMBOL))
        assert await asyncio.to_thread(attempted.wait, 10)
        call.cancel()
        cancelled.set()
        with pytest.raises(asyncio.CancelledError):
            await call
        await kis.aclose()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RedisIssuanceLock, "attempt", reply_lost)
        run(main())
    assert lock_is_free(spec)  # not held until lock_ttl (30 s) runs out
    assert sim.counts["issue_requests"] == 0


def test_revoke_drops_the_token_at_kis_in_the_store_and_in_memory(
    sim: KisSimulator, spec_of: Callable[[str], dict[str, Any]]
) -> None:
    storage = build_storage(spec_of("file"))

    async def main() -> None:
        async with client(storage, sim) as kis:
            shared = kis.shared_token
            await shared.revoke()
            assert await shared.load() is None

    run(main())
    assert sim.counts["revoke_requests"] == 1
    assert storage.load_token(HERD_APP_KEY, HERD_SECRET) is None
