"""The opt-in seed-protocol lease: single flight for clients that only call the
seed's four methods. Every behaviour runs on both backends (a real file, a real redis-server);
the last tests start 16 real processes through the real korea-investment-stock 0.19.0.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
from upstream_herd import require_upstream, with_host

from kis_safe_token import (
    FileTokenStorage,
    LockedRedisTokenStorage,
    TokenIssueError,
    TokenStorageError,
)
from kis_safe_token.flight.aio import AsyncStore
from kis_safe_token.storage.base import SealedTokenStorage
from kis_safe_token.storage.factory import create_token_storage
from kis_safe_token.testing import KisSimulator
from kis_safe_token.token import Token

# Before the import: the contract's asserts then report values, as a test module's do.
pytest.register_assert_rewrite("kis_safe_token.testing.contract")
from kis_safe_token.testing.contract import StorageFactory, TokenStorageContract  # noqa: E402

K, S = "PSleaseAppKey0000000000000000000000", "lease-secret-" + "l" * 40
BACKENDS = ["file", "redis"]
#: Long enough for a thread that is going to return to have returned: only used to show that a
#: call is *still* blocked, never to let a race come out right.
BLOCKED_S = 0.3

Build = Callable[..., SealedTokenStorage]
T = TypeVar("T")


@pytest.fixture(params=BACKENDS)
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Build:
    """``make(**options)``: a storage of this backend with the lease on, all sharing one store."""
    backend: str = request.param

    def build(**options: Any) -> SealedTokenStorage:
        options.setdefault("seed_lease", True)
        # A lease that outlives any pause of a loaded machine (a 2 s one lapsed under
        # `pytest -n 8` before the holder's save); tests of expiry set their own short ones.
        options.setdefault("wait_timeout", 20.0)
        options.setdefault("lease_ttl", 10.0)
        options.setdefault("issue_window_s", 0)  # a waiter honours the window its granter set
        lock_ttl = options.pop("lock_ttl", 0.5)  # Redis only: the file lock has no ttl
        if backend == "file":
            return FileTokenStorage(tmp_path / "cache" / "tokens.json", **options)
        url: str = request.getfixturevalue("redis_url")
        prefix: str = request.getfixturevalue("key_prefix")
        return LockedRedisTokenStorage(url, key_prefix=prefix, lock_ttl=lock_ttl, **options)

    return build


def redis_with_lease(url: str, prefix: str) -> SealedTokenStorage:
    """A Redis storage with the lease on and the fixture's timings, for the Redis-only tests."""
    return LockedRedisTokenStorage(
        url,
        key_prefix=prefix,
        seed_lease=True,
        wait_timeout=20.0,
        lease_ttl=10.0,
        issue_window_s=0,
        lock_ttl=0.5,
    )


def in_thread(fn: Callable[..., Any], *args: Any) -> Future[Any]:
    """Run ``fn`` in a new thread (a new lease owner; a pool would reuse threads)."""
    done: Future[Any] = Future()

    def run() -> None:
        try:
            done.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            done.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return done


def timed(fn: Callable[..., Any], *args: Any) -> Future[tuple[Any, float]]:
    """``in_thread`` that also reports how long the call took."""

    def run() -> tuple[Any, float]:
        started = time.monotonic()
        result = fn(*args)
        return result, time.monotonic() - started

    return in_thread(run)


def token(name: str = "a", expires_in: float = 86_400) -> Token:
    return Token(f"tok-{name}-" + "x" * 50, time.time() + expires_in)


def data(tok: Token) -> dict[str, Any]:
    return tok.to_token_data(K, S)


def blocked(fut: Future[Any]) -> bool:
    try:
        fut.result(timeout=BLOCKED_S)
    except TimeoutError:
        return True
    return False


# -- off by default, then the basic promise -------------------------------------------------------


def test_the_lease_is_off_by_default(make: Build) -> None:
    storage = make(seed_lease=False)
    assert not storage.seed_lease
    assert storage.check_token_valid(K, S) is False
    # Without the lease another caller is told the same at once: the seed's herd.
    assert in_thread(storage.check_token_valid, K, S).result(timeout=5) is False


def test_false_grants_the_lease_and_others_wait_for_the_holders_save(make: Build) -> None:
    holder, other = make(), make()
    assert holder.seed_lease
    assert holder.check_token_valid(K, S) is False  # this thread holds the lease
    waiters = [in_thread(other.check_token_valid, K, S) for _ in range(3)]
    assert all(blocked(w) for w in waiters)
    assert holder.save_token(data(token()))
    assert [w.result(timeout=5) for w in waiters] == [True, True, True]
    assert holder.load_token(K, S)["access_token"] == token().access_token


def test_holder_thread_re_enters_another_thread_of_the_process_waits(make: Build) -> None:
    storage = make()
    assert storage.check_token_valid(K, S) is False
    assert storage.check_token_valid(K, S) is False  # again: no deadlock, still the holder
    assert make(lease_ttl=1.0).check_token_valid(K, S) is False  # whichever storage object
    assert storage.load_token(K, S) is None  # the holder reading never waits on itself
    same_process = in_thread(storage.check_token_valid, K, S)
    assert blocked(same_process)
    storage.save_token(data(token()))
    assert same_process.result(timeout=5) is True


def test_a_forked_child_is_a_separate_owner(make: Build) -> None:
    holder, storage = make(lease_ttl=30.0, wait_timeout=60.0), make(lease_ttl=0.3, wait_timeout=0.6)
    assert holder.check_token_valid(K, S) is False
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child's thread id is copied from its parent's holder thread
        try:
            answer = repr(storage.check_token_valid(K, S))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            answer = type(exc).__name__
        os.write(write_end, answer.encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    answer = os.read(read_end, 100).decode()
    os.close(read_end)
    assert answer == "TokenStorageError"  # it waited on the parent's lease, was not granted


# -- a caller that checks and never issues --------------------------------------------------------


def test_status_display_blocks_the_fleet_only_for_the_lease_ttl(make: Build) -> None:
    display, fleet = make(lease_ttl=0.8, issue_window_s=0.2), make()
    started = time.monotonic()  # before the grant: the lease's 0.8 s run from within the call
    assert display.check_token_valid(K, S) is False  # and it never issues
    answer, _ = timed(fleet.check_token_valid, K, S).result(timeout=10)
    assert answer is False  # the next caller holds the lease once the display's expired
    assert 0.75 < time.monotonic() - started < 0.8 + 3.0


def test_lease_is_a_record_not_a_held_lock_the_file_stays_writable(
    make: Build, tmp_path: Path
) -> None:
    display, other = make(lease_ttl=5.0), make()
    assert display.check_token_valid(K, S) is False
    # A held file lock would make every save wait; the record lets anyone save at once.
    assert in_thread(other.save_token, data(token())).result(timeout=2) is True
    assert in_thread(other.check_token_valid, K, S).result(timeout=2) is True


def test_waiter_honours_a_holders_longer_lease_and_gives_up_with_storage_error(
    make: Build,
) -> None:
    holder = make(lease_ttl=30.0, wait_timeout=60.0)
    impatient = make(lease_ttl=0.3, issue_window_s=0, wait_timeout=1.0)
    assert holder.check_token_valid(K, S) is False
    started = time.monotonic()
    with pytest.raises(TokenStorageError, match="holder of the issuance lease"):
        in_thread(impatient.check_token_valid, K, S).result(timeout=10)
    assert 0.9 < time.monotonic() - started < 3.0


# -- load_token waits, never grants ----------------------------------------------------------


def test_load_token_waits_for_an_active_lease_and_never_grants(make: Build) -> None:
    # A lease far longer than the test's steps: under load, a short one could expire before the
    # save and end the reader's wait (that is the next test's case).
    reader, holder = make(lease_ttl=5.0, issue_window_s=0), make(lease_ttl=5.0, issue_window_s=0)
    assert reader.load_token(K, S) is None  # nothing stored, no lease: at once
    assert holder.check_token_valid(K, S) is False  # the reader did not take the lease
    loaded = in_thread(reader.load_token, K, S)
    assert blocked(loaded)
    holder.save_token(data(token()))
    got = loaded.result(timeout=5)
    assert got is not None and got["access_token"] == token().access_token


def test_load_token_stops_waiting_when_the_lease_expires(make: Build) -> None:
    reader, holder = make(lease_ttl=0.5, issue_window_s=0), make(lease_ttl=0.5, issue_window_s=0)
    started = time.monotonic()  # before the grant: the lease's 0.5 s run from within the call
    assert holder.check_token_valid(K, S) is False
    answer, _ = timed(reader.load_token, K, S).result(timeout=5)
    assert answer is None and 0.45 < time.monotonic() - started < 4.0
    # ... and it still granted nothing: the next checker is the holder.
    assert in_thread(reader.check_token_valid, K, S).result(timeout=2) is False


# -- a holder that issued and died: the next one waits out KIS's window --------------------------


@pytest.fixture
def short_window_sim() -> Iterator[KisSimulator]:
    # 0.3 s: the storage's window below (1.3 s) leaves the dead holder's POST a whole second to
    # reach KIS after its grant before the next holder's POST could land inside KIS's window.
    with KisSimulator(apps={K: S}, issue_window_s=0.3, issue_latency_s=0) as sim:
        yield sim


def post_token(base_url: str) -> requests.Response:
    body = {"grant_type": "client_credentials", "appkey": K, "appsecret": S}
    return requests.post(f"{base_url}/oauth2/tokenP", json=body, timeout=5)


def test_holder_killed_after_kis_answered_next_holder_waits_out_the_window(
    make: Build, short_window_sim: KisSimulator
) -> None:
    sim = short_window_sim
    # The storage's window is longer than the simulator's, as ISSUE_WINDOW_S is than KIS's.
    options = {"lease_ttl": 0.2, "issue_window_s": 1.3, "wait_timeout": 5.0}
    storage = make(**options)
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the holder: checks, KIS issues, it dies before save_token
        code = 1
        try:
            if storage.check_token_valid(K, S) is False and post_token(sim.base_url).ok:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0 and sim.issued == 1
    answer, waited = timed(make(**options).check_token_valid, K, S).result(timeout=10)
    assert answer is False
    resp = post_token(sim.base_url)
    assert resp.status_code == 200, resp.text  # not EGW00133
    assert sim.rate_limited == 0 and sim.issued == 2
    assert time.monotonic() - started >= 1.3 and waited < 3.0


def test_delete_by_the_holder_releases_its_waiters_but_keeps_the_window(make: Build) -> None:
    holder = make(lease_ttl=10.0, issue_window_s=0.8)
    started = time.monotonic()  # before the grant, which marks the window
    assert holder.check_token_valid(K, S) is False
    waiter = in_thread(make(lease_ttl=10.0).check_token_valid, K, S)
    assert blocked(waiter)
    assert holder.delete_token(K, S)  # its issue failed: it lets go
    assert waiter.result(timeout=10) is False  # the waiter holds the lease now
    waited = time.monotonic() - started
    assert 0.75 < waited < 5.0  # after the window, long before the 10 s lease would have ended


def test_a_deleted_token_is_not_re_issued_within_the_window_of_its_save(make: Build) -> None:
    holder = make(lease_ttl=0.2, issue_window_s=0.8)
    assert holder.check_token_valid(K, S) is False
    saved_at = time.monotonic()  # before the save, which marks the window
    holder.save_token(data(token()))
    holder.delete_token(K, S)  # say, a client dropping a token KIS rejected
    answer, _ = timed(make(lease_ttl=0.2).check_token_valid, K, S).result(timeout=10)
    assert answer is False and time.monotonic() - saved_at > 0.75


# -- a save after the lease expired --------------------------------------------------------------


def test_late_save_keeps_the_newest_token(make: Build) -> None:
    slow, quick = make(lease_ttl=0.2, issue_window_s=0), make(lease_ttl=0.2, issue_window_s=0)
    older, newer, newest = token("older", 86_000), token("newer", 86_200), token("newest", 86_400)
    assert slow.check_token_valid(K, S) is False  # its POST hangs past its lease
    assert in_thread(quick.check_token_valid, K, S).result(timeout=5) is False
    assert in_thread(quick.save_token, data(newer)).result(timeout=5)
    assert slow.save_token(data(older))  # late, and KIS issued it first: dropped
    assert quick.load_token(K, S)["access_token"] == newer.access_token
    assert slow.save_token(data(newest))  # late, but issued later: it lives longer, it wins
    assert quick.load_token(K, S)["access_token"] == newest.access_token


def test_a_newer_save_replaces_an_expired_or_deleted_token(make: Build) -> None:
    storage = make(issue_window_s=0)
    assert storage.save_token(data(token("first", 86_400)))
    storage.delete_token(K, S)
    assert storage.save_token(data(token("second", 3_600)))  # shorter-lived, but nothing stored
    assert storage.load_token(K, S)["access_token"] == token("second").access_token


# -- the lease keeps the storage contract -------------------------------------------------------

#: No window: the contract deletes and re-saves tokens at once, as tests (not KIS) do.
CONTRACT_LEASE: dict[str, Any] = {"seed_lease": True, "lease_ttl": 0.5, "issue_window_s": 0}


class TestFileTokenStorageWithSeedLease(TokenStorageContract):
    @pytest.fixture
    def make_storage(self, token_path: Path) -> StorageFactory:
        return lambda clock=time.time: FileTokenStorage(token_path, clock=clock, **CONTRACT_LEASE)


class TestLockedRedisTokenStorageWithSeedLease(TokenStorageContract):
    @pytest.fixture
    def make_storage(self, redis_url: str, key_prefix: str) -> StorageFactory:
        return lambda clock=time.time: LockedRedisTokenStorage(
            redis_url, key_prefix=key_prefix, clock=clock, **CONTRACT_LEASE
        )


# -- configuration -------------------------------------------------------------------------------


def test_lease_options_are_validated(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    with pytest.raises(ValueError, match="lease_ttl"):
        FileTokenStorage(path, seed_lease=True, lease_ttl=0)
    with pytest.raises(ValueError, match="issue_window_s"):
        FileTokenStorage(path, seed_lease=True, issue_window_s=-1)
    # A wait shorter than KIS's 61 s window is the caller's choice: accepted (and logged).
    assert FileTokenStorage(path, seed_lease=True, wait_timeout=30).seed_lease
    with pytest.raises(ValueError, match="seed_lease"):
        FileTokenStorage(path, seed_lease="yes")  # type: ignore[arg-type]


def test_environment_turns_the_lease_on(tmp_path: Path) -> None:
    env = {"KOREA_INVESTMENT_TOKEN_FILE": str(tmp_path / "t.json")}
    assert not create_token_storage(env).seed_lease
    on = create_token_storage({**env, "KOREA_INVESTMENT_SEED_LEASE": "true"})
    assert on.seed_lease
    assert on.check_token_valid(K, S) is False
    assert blocked(in_thread(on.check_token_valid, K, S))
    on.save_token(data(token()))


@pytest.mark.parametrize(
    ("name", "value"),
    [("KOREA_INVESTMENT_SEED_LEASE", "maybe"), ("KOREA_INVESTMENT_SEED_LEASE_TTL", "-3")],
)
def test_bad_lease_variables_are_named(tmp_path: Path, name: str, value: str) -> None:
    env = {"KOREA_INVESTMENT_TOKEN_FILE": str(tmp_path / "t.json"), name: value}
    with pytest.raises(ValueError, match=name):
        create_token_storage(env)


def test_unreachable_store_is_a_storage_error_not_a_grant(dead_port: int) -> None:
    storage = LockedRedisTokenStorage(
        f"redis://127.0.0.1:{dead_port}/0",
        seed_lease=True,
        connect_timeout_s=0.2,
        lock_ttl=0.5,
        lease_ttl=0.5,
        issue_window_s=1.0,
        wait_timeout=2.0,
    )
    with pytest.raises(TokenStorageError):
        storage.check_token_valid(K, S)  # False would send every process to KIS


# -- the real korea-investment-stock 0.19.0, 16 processes ---------------------------------------

HERD = 16


def _upstream_client_class(base_url: str) -> type[Any]:
    """korea-investment-stock's own class, its hard-coded host redirected (test only)."""
    return with_host(require_upstream("korea_investment_stock").KoreaInvestment, base_url)


def _upstream_child(
    cls: type[Any], build: Callable[[], SealedTokenStorage], barrier: Any, out: Any
) -> None:
    try:
        storage = build()
        storage.load_token(K, S)  # connections and key derivation before the start line
        barrier.wait(30)
        client = cls(K, S, "12345678-01", token_storage=storage)
        quote = client.fetch_domestic_price("005930")
        out.put(("ok", client.access_token, quote.get("rt_cd")))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        out.put(("crash", f"{type(exc).__name__}: {str(exc)[:200]}", None))


@pytest.mark.stress
@pytest.mark.parametrize("backend", BACKENDS)
def test_sixteen_korea_investment_stock_processes_share_one_issuance(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    with KisSimulator(apps={K: S}, issue_latency_s=0.05) as sim:
        assert sim.issue_window_s == 60  # KIS's window is on: a second issue would be EGW00133
        cls = _upstream_client_class(sim.base_url)  # pandas-heavy: imported once, here
        options: dict[str, Any] = {"seed_lease": True}
        if backend == "file":
            build: Callable[[], SealedTokenStorage] = lambda: FileTokenStorage(  # noqa: E731
                tmp_path / "tokens.json", **options
            )
        else:
            url, prefix = (
                request.getfixturevalue("redis_url"),
                request.getfixturevalue("key_prefix"),
            )
            build = lambda: LockedRedisTokenStorage(url, key_prefix=prefix, **options)  # noqa: E731
        ctx = mp.get_context("fork")
        barrier, out = ctx.Barrier(HERD + 1), ctx.Queue()
        procs = [
            ctx.Process(target=_upstream_child, args=(cls, build, barrier, out))
            for _ in range(HERD)
        ]
        for p in procs:
            p.start()
        barrier.wait(60)
        results = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(10)
    crashes = [r[1] for r in results if r[0] != "ok"]
    counts = f"{sim.issued} issued, {sim.rate_limited} EGW00133, {len(crashes)} crashed"
    print(f"\n{backend}: {HERD} korea-investment-stock processes: {counts}")
    assert crashes == [], counts
    assert sim.issued == 1 and sim.rate_limited == 0
    assert len({r[1] for r in results}) == 1  # one token
    assert {r[2] for r in results} == {"0"}  # and it works at KIS


# -- a mixed fleet: seed clients and get_or_issue on one store --------------------------------


def test_get_or_issue_waits_for_a_seed_holders_save_instead_of_issuing(make: Build) -> None:
    seed, ours = make(), make()
    assert seed.check_token_valid(K, S) is False  # a seed client holds the lease
    issued: list[Token] = []

    def issue() -> Token:
        issued.append(token("ours"))
        return issued[-1]

    getter = in_thread(ours.get_or_issue, K, S, issue)
    assert blocked(getter)
    seed.save_token(data(token("seed")))
    assert getter.result(timeout=5).access_token == token("seed").access_token
    assert issued == []  # without the lease in get_or_issue, ours would have asked KIS too


def test_a_seed_client_waits_while_get_or_issue_issues(make: Build) -> None:
    # Ours holds its Redis lock through the whole slow issue: with the fixture's 0.5 s lock_ttl
    # a loaded machine let it lapse mid-issue, the save was refused, and the seed client was
    # granted the lease instead of the token.
    seed, ours = make(), make(lock_ttl=30.0)
    asked, answer = threading.Event(), threading.Event()

    def slow_issue() -> Token:
        asked.set()
        assert answer.wait(5)
        return token("ours")

    getter = in_thread(ours.get_or_issue, K, S, slow_issue)
    assert asked.wait(5)  # ours is at KIS, holding its lock and the lease
    checker = in_thread(seed.check_token_valid, K, S)
    assert blocked(checker)  # without the lease in get_or_issue: False, and a second issuance
    answer.set()
    assert getter.result(timeout=5).access_token == token("ours").access_token
    assert checker.result(timeout=5) is True
    assert seed.load_token(K, S)["access_token"] == token("ours").access_token


def test_the_clients_check_access_token_never_takes_the_lease(make: Build) -> None:
    from kis_safe_token import KoreaInvestment

    storage = make(lock_ttl=5.0)
    with KisSimulator(issue_latency_s=0) as sim:  # any app key
        # Timings the storage's waiters outlast (the client checks them against its own).
        client = KoreaInvestment(
            K, S, token_storage=storage, base_url=sim.base_url, timeout=1.0, rate_limit_wait_s=1
        )
        assert storage.delete_token(K, S)
        assert client.check_access_token() is False
        # The lease is free: a seed client is granted it at once (the seed's check would have
        # taken it for this thread and made the seed client wait for a save that never comes),
        # well before the fixture's 10 s lease would have expired.
        assert in_thread(make().check_token_valid, K, S).result(timeout=5) is False
        client.close()


def test_a_recorded_issuance_failure_fails_the_next_caller_fast(make: Build) -> None:
    """A failed holder leaves the quiet mark: the next caller must get the recorded failure at
    once, not wait out the window in the lease (and then fail anyway)."""
    first, second = make(issue_window_s=10.0), make(issue_window_s=10.0)

    def refused() -> Token:
        raise TokenIssueError("app key revoked", code="EGW00105", status=403)

    with pytest.raises(TokenIssueError):
        first.get_or_issue(K, S, refused)
    asked: list[str] = []
    started = time.monotonic()
    with pytest.raises(TokenIssueError, match="app key revoked"):
        in_thread(second.get_or_issue, K, S, lambda: asked.append("x")).result(timeout=10)
    assert time.monotonic() - started < 5.0  # without the check: the 10 s window, then the error
    assert asked == []


# -- the asyncio side: the same lease, waited for with asyncio.sleep -----------------------------


async def _ticking(work: Awaitable[T]) -> tuple[T, int]:
    """``await work`` while a ticker counts 10 ms ticks: a blocked loop would not tick."""
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        return await work, ticks
    finally:
        ticker.cancel()


def test_async_get_or_issue_waits_for_a_seed_holders_save(make: Build) -> None:
    seed, ours = make(), AsyncStore(make())
    assert seed.check_token_valid(K, S) is False  # a seed client (this thread) holds the lease
    issued: list[Token] = []

    async def issue() -> Token:
        issued.append(token("ours"))
        return issued[-1]

    async def main() -> tuple[Token, int]:
        try:
            return await _ticking(ours.get_or_issue(K, S, issue))
        finally:
            await ours.aclose()

    getter = in_thread(asyncio.run, main())  # another thread: another lease owner
    assert blocked(getter)
    seed.save_token(data(token("seed")))
    got, ticks = getter.result(timeout=5)
    assert got.access_token == token("seed").access_token
    assert issued == []  # without the lease on the async side, it would have asked KIS too
    assert ticks >= 10  # it waited with the loop running (BLOCKED_S is 30 ticks)


def test_a_seed_client_waits_while_async_get_or_issue_issues(make: Build) -> None:
    seed, ours = make(), AsyncStore(make())
    asked, answer = threading.Event(), threading.Event()

    async def slow_issue() -> Token:
        asked.set()
        assert await asyncio.to_thread(answer.wait, 5)
        return token("ours")

    async def main() -> Token:
        try:
            return await ours.get_or_issue(K, S, slow_issue)
        finally:
            await ours.aclose()

    getter = in_thread(asyncio.run, main())
    assert asked.wait(5)  # the task is at KIS, holding the lock and the lease
    checker = in_thread(seed.check_token_valid, K, S)
    assert blocked(checker)  # without the lease on the async side: False, a second issuance
    answer.set()
    assert getter.result(timeout=5).access_token == token("ours").access_token
    assert checker.result(timeout=5) is True
    # The task let go of the lease: after a delete, a seed client is granted at once (not
    # after the 10 s lease_ttl of the loop thread's lease).
    assert seed.delete_token(K, S)
    assert in_thread(make().check_token_valid, K, S).result(timeout=5) is False


def test_async_caller_gets_a_recorded_failure_fast_with_the_lease(make: Build) -> None:
    ours = AsyncStore(make(issue_window_s=10.0))
    asked: list[str] = []

    async def refused() -> Token:
        asked.append("x")
        raise TokenIssueError("app key revoked", code="EGW00105", status=403)

    async def main() -> float:
        try:
            with pytest.raises(TokenIssueError):
                await ours.get_or_issue(K, S, refused)
            started = time.monotonic()
            with pytest.raises(TokenIssueError, match="app key revoked"):
                await ours.get_or_issue(K, S, refused)
            return time.monotonic() - started
        finally:
            await ours.aclose()

    assert in_thread(asyncio.run, main()).result(timeout=20) < 5.0  # not the 10 s window
    assert asked == ["x"]


def test_async_save_goes_through_the_lease_and_keeps_the_newest(
    redis_url: str, key_prefix: str
) -> None:
    """A seed client's own refresh saves a longer-lived token while the task is at KIS: the task's
    save keeps the newest (a plain write would replace it). Redis only: a file holder's lock
    keeps every other writer out until its save."""

    make_redis = partial(redis_with_lease, redis_url, key_prefix)

    other, ours = make_redis(), AsyncStore(make_redis())
    longer = token("longer", expires_in=90_000)

    async def issue() -> Token:
        assert await asyncio.to_thread(other.save_token, data(longer))
        return token("ours")

    async def main() -> Token:
        try:
            return await ours.get_or_issue(K, S, issue)
        finally:
            await ours.aclose()

    assert (
        in_thread(asyncio.run, main()).result(timeout=10).access_token == token("ours").access_token
    )
    assert other.load_token(K, S)["access_token"] == longer.access_token


def test_a_task_cancelled_during_its_grant_gives_the_lease_back(
    redis_url: str, key_prefix: str
) -> None:
    """Redis grants run in a worker thread, which a cancellation does not stop: a lease granted
    after the task was cancelled is given back, not left to block the fleet for its ttl."""

    make_redis = partial(redis_with_lease, redis_url, key_prefix)

    storage = make_redis()
    lease = storage._lease
    assert lease is not None
    entered, gate, returned = threading.Event(), threading.Event(), threading.Event()
    grant = lease.try_grant

    def gated(*args: Any) -> Any:
        entered.set()
        assert gate.wait(5)
        try:
            return grant(*args)
        finally:
            returned.set()

    lease.try_grant = gated  # type: ignore[method-assign]

    async def issue() -> Token:
        raise AssertionError("a cancelled task must not issue")

    async def main() -> None:
        ours = AsyncStore(storage)
        task = asyncio.create_task(ours.get_or_issue(K, S, issue))
        assert await asyncio.to_thread(entered.wait, 5)  # the grant is on its way, in a thread
        task.cancel()
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        await ours.aclose()

    in_thread(asyncio.run, main()).result(timeout=10)
    assert returned.wait(5)  # the grant did run (and took the lease for the loop's thread)
    # Given back: a seed client is granted at once, not after the 10 s lease_ttl.
    assert in_thread(make_redis().check_token_valid, K, S).result(timeout=5) is False


def test_load_token_sees_a_save_that_lands_between_its_looks(make: Build) -> None:
    """The holder's save ends its lease: a reader that found no token, then no lease, must look
    at the token once more (played deterministically: the save lands right between the looks)."""
    reader, holder = make(), make()
    assert holder.check_token_valid(K, S) is False
    lease = reader._lease
    assert lease is not None
    records = lease._records
    held_by_other = records.held_by_other

    def save_first(api_key: str, owner: str) -> bool:
        assert holder.save_token(data(token()))
        return held_by_other(api_key, owner)

    records.held_by_other = save_first  # type: ignore[method-assign]
    got = reader.load_token(K, S)
    assert got is not None and got["access_token"] == token().access_token


def test_sync_seed_code_on_the_loop_thread_is_not_the_async_holder(make: Build) -> None:
    """A task holds the lease; seed code called (blocking) on the loop thread is another owner:
    it must not be told "you hold the lease" (it would issue a second token). It waits, and
    since it blocks the very loop the holder needs, it gives up after its wait_timeout."""
    # The holder's lease outlives the seed code's wait, so the wait cannot end in a new grant.
    ours, seed = AsyncStore(make(lease_ttl=10.0)), make(lease_ttl=1.0, wait_timeout=2.5)
    issued: list[str] = []

    async def main() -> Token:
        asked, answer = asyncio.Event(), asyncio.Event()

        async def slow_issue() -> Token:
            issued.append("ours")
            asked.set()
            await answer.wait()
            return token("ours")

        try:
            holder = asyncio.create_task(ours.get_or_issue(K, S, slow_issue))
            await asyncio.wait_for(asked.wait(), 5)
            with pytest.raises(TokenStorageError):
                seed.check_token_valid(K, S)  # with one owner per loop thread: False at once
            answer.set()
            return await asyncio.wait_for(holder, 5)
        finally:
            await ours.aclose()

    assert asyncio.run(main()).access_token == token("ours").access_token
    assert issued == ["ours"]


@pytest.mark.parametrize("asked_kis", [False, True], ids=["before-kis", "during-kis"])
def test_a_task_cancelled_with_the_lease_keeps_the_fleet_out_only_if_kis_was_asked(
    make: Build, asked_kis: bool
) -> None:
    """Cancelled after its grant but before asking KIS, a task leaves no quiet mark: nothing can
    have been issued, so the next caller issues at once (before: the fleet waited out the 61 s
    window). Cancelled while asking KIS, the mark stays: KIS may have issued, and a new ask
    within the window would be an EGW00133."""
    window = 30.0
    storage = make(issue_window_s=window)
    read = storage.read_token

    def cancelled_at_the_fresh_read(*args: Any, fresh: bool = False) -> Token | None:
        if fresh and not asked_kis:
            raise asyncio.CancelledError  # as a cancel delivered at the read after the grant
        return read(*args, fresh=fresh)

    storage.read_token = cancelled_at_the_fresh_read  # type: ignore[method-assign]
    asked: list[str] = []

    async def issue() -> Token:
        asked.append("ours")
        raise asyncio.CancelledError  # cancelled while the request is out at KIS

    async def main() -> None:
        ours = AsyncStore(storage)
        try:
            with pytest.raises(asyncio.CancelledError):
                await ours.get_or_issue(K, S, issue)
        finally:
            await ours.aclose()

    in_thread(asyncio.run, main()).result(timeout=10)
    assert asked == (["ours"] if asked_kis else [])
    other = make(issue_window_s=window, wait_timeout=2.0)
    started = time.monotonic()
    if asked_kis:
        with pytest.raises(TokenStorageError, match="KIS issue window"):
            other.get_or_issue(K, S, lambda: pytest.fail("asked KIS within the window"))
    else:
        assert (
            other.get_or_issue(K, S, lambda: token("next")).access_token
            == token("next").access_token
        )
    assert time.monotonic() - started < 5
