from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import fakeredis
import pytest
import redis
from conftest import HeldIssuance
from herd import HERD_APP_KEY, HERD_SECRET, gated_client, run_herd, token_id

from kis_safe_token import (
    LockedRedisTokenStorage,
    RedisTokenStorage,
    TokenIssueError,
    TokenStorageError,
)
from kis_safe_token.storage.factory import create_token_storage
from kis_safe_token.testing import KisSimulator
from kis_safe_token.testing.redis_server import RedisServer
from kis_safe_token.token import Token

TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9." + "r" * 120


def make_token(token: str = TOKEN) -> Token:
    return Token(token, time.time() + 86_400)


def token_data() -> dict[str, Any]:
    """A seed ``token_data`` dict for key1/secret1, valid for a day."""
    return make_token().to_token_data("key1", "secret1")


# -- fast unit tests on fakeredis ------------------------------------------------------------


@pytest.mark.parametrize("decode", [True, False])
def test_round_trip_whether_or_not_the_client_decodes(decode: bool) -> None:
    storage = RedisTokenStorage(client=fakeredis.FakeRedis(decode_responses=decode))
    assert storage.save_token(token_data())
    assert storage.load_token("key1", "secret1")["access_token"] == TOKEN
    assert storage.load_token("key1", "wrong") is None
    assert storage.delete_token("key1", "secret1")
    assert storage.load_token("key1", "secret1") is None


def test_key_is_a_cluster_hash_tag_shared_by_the_lock() -> None:
    storage = LockedRedisTokenStorage(client=fakeredis.FakeRedis())
    key = storage._get_redis_key("key1")
    assert key.startswith("korea_investment:token:{") and key.endswith("}")
    assert len(key.split("{")[1].rstrip("}")) == 12


def test_corrupt_value_is_a_miss_and_gets_replaced() -> None:
    fake = fakeredis.FakeRedis()
    storage = LockedRedisTokenStorage(client=fake)
    fake.set(storage._get_redis_key("key1"), b"\x80\x04garbage")
    assert storage.load_token("key1", "secret1") is None
    got = storage.get_or_issue("key1", "secret1", make_token)
    assert got.access_token == TOKEN
    assert storage.load_token("key1", "secret1")["access_token"] == TOKEN


def test_password_goes_in_as_a_keyword_not_into_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def from_url(url: str, **kwargs: Any) -> Any:
        seen.update(url=url, **kwargs)
        return fakeredis.FakeRedis()

    monkeypatch.setattr("redis.from_url", from_url)
    RedisTokenStorage("rediss://kisuser@redis.example:6380/1", password="p@ss:w/rd")
    assert seen["url"] == "rediss://kisuser@redis.example:6380/1"
    assert seen["password"] == "p@ss:w/rd"


@pytest.mark.parametrize(
    "bad",
    [
        "http://localhost:6379",
        "localhost:6379",
        "redis://",
        "redis://h:99999/0",
        "redis://h:6379/notanumber",
        "unix://",
    ],
)
def test_bad_url_from_the_environment_names_the_variable(bad: str) -> None:
    with pytest.raises(ValueError, match="KOREA_INVESTMENT_REDIS_URL"):
        create_token_storage(
            {"KOREA_INVESTMENT_TOKEN_STORAGE": "redis", "KOREA_INVESTMENT_REDIS_URL": bad}
        )


def test_lock_parameters_are_validated() -> None:
    with pytest.raises(ValueError, match="lock_ttl"):
        LockedRedisTokenStorage(client=fakeredis.FakeRedis(), lock_ttl=0)
    with pytest.raises(ValueError, match="wait_timeout"):
        LockedRedisTokenStorage(client=fakeredis.FakeRedis(), wait_timeout=-1)


# -- on a real redis-server ---------------------------------------------------------------------


def locked(redis_url: str, key_prefix: str, **options: Any) -> LockedRedisTokenStorage:
    return LockedRedisTokenStorage(redis_url, key_prefix=key_prefix, **options)


def test_environment_selects_the_locked_backend(redis_url: str) -> None:
    storage = create_token_storage(
        {"KOREA_INVESTMENT_TOKEN_STORAGE": "redis", "KOREA_INVESTMENT_REDIS_URL": redis_url}
    )
    assert isinstance(storage, LockedRedisTokenStorage)
    assert storage.save_token(token_data())


def test_warm_load_is_one_redis_command(redis_url: str, key_prefix: str) -> None:
    storage = locked(redis_url, key_prefix)
    storage.save_token(token_data())
    commands: list[str] = []
    real = storage.redis_client.execute_command

    def counting(*args: Any, **kwargs: Any) -> Any:
        commands.append(str(args[0]))
        return real(*args, **kwargs)

    storage.redis_client.execute_command = counting  # type: ignore[method-assign]
    assert storage.load_token("key1", "secret1")["access_token"] == TOKEN
    assert commands == ["GET"]
    commands.clear()
    storage.get_or_issue("key1", "secret1", lambda: pytest.fail("must not issue"))
    assert commands == ["GET"]


def test_redis_holds_neither_token_nor_secret_in_clear(redis_url: str, key_prefix: str) -> None:
    storage = locked(redis_url, key_prefix)
    storage.get_or_issue("key1", "secret1", make_token)
    raw = redis.from_url(redis_url)
    keys = list(raw.scan_iter(f"{key_prefix}*"))
    assert keys
    for key in keys:
        value = raw.dump(key) or b""
        assert TOKEN.encode() not in value and b"secret1" not in value
        assert b"key1" not in key
    ttl = raw.ttl(storage._get_redis_key("key1"))
    assert 86_000 < ttl <= 86_400


def test_password_with_odd_characters_works_on_a_real_server() -> None:
    password = "p@ss:w/rd#?"
    with RedisServer(password=password) as server:
        url = f"redis://127.0.0.1:{server.port}/0"
        storage = RedisTokenStorage(url, password=password, key_prefix="pw")
        assert storage.save_token(token_data())
        assert storage.load_token("key1", "secret1")["access_token"] == TOKEN
        assert not RedisTokenStorage(url, password="wrong", key_prefix="pw").save_token(
            token_data()
        )


def gated_issue(inside: threading.Event, go: threading.Event) -> Callable[[], Token]:
    """An issue function that says when it is called, then waits for ``go``."""

    def issue() -> Token:
        inside.set()
        go.wait(10)
        return make_token()

    return issue


def test_expired_holder_never_frees_its_successors_lock(redis_url: str, key_prefix: str) -> None:
    # A's 0.2 s lock expires while A is inside a slow issue; B takes the lock. A then saves and
    # releases late: B's lock must be neither deleted nor shortened.
    a = locked(redis_url, key_prefix, lock_ttl=0.2)
    b = locked(redis_url, key_prefix, lock_ttl=30)
    raw = redis.from_url(redis_url)
    lock_key = a._get_redis_key("key1") + ":lock"  # the seed's key name, plus the lock's suffix
    a_inside, a_go, b_inside, b_go = (threading.Event() for _ in range(4))
    ta = threading.Thread(
        target=a.get_or_issue, args=("key1", "secret1", gated_issue(a_inside, a_go))
    )
    tb = threading.Thread(
        target=b.get_or_issue, args=("key1", "secret1", gated_issue(b_inside, b_go))
    )
    try:
        ta.start()
        assert a_inside.wait(10)
        deadline = time.monotonic() + 10
        while raw.exists(lock_key) and time.monotonic() < deadline:  # bounded wait: A's expiry
            time.sleep(0.01)
        tb.start()
        assert b_inside.wait(10), "B did not take the expired lock"
        b_owner = raw.get(lock_key)
        assert b_owner is not None
        a_go.set()
        ta.join(10)
        assert not ta.is_alive()
        assert raw.get(lock_key) == b_owner  # A's late release left B's lock alone
        assert raw.pttl(lock_key) > 20_000  # and A's extend did not shorten it
    finally:
        a_go.set()
        b_go.set()
        for t in (ta, tb):
            if t.ident is not None:  # started
                t.join(10)
    assert not raw.exists(lock_key)  # B released its own lock


def test_waiter_is_woken_by_the_save_not_by_polling(redis_url: str, key_prefix: str) -> None:
    # The longest poll allowed: a BLPOP that timed out would take 1.25-3.75 s (jittered).
    waiter = locked(redis_url, key_prefix, poll_interval_s=2.5)
    got: list[float] = []

    def wait() -> None:
        waiter.get_or_issue("key1", "secret1", lambda: pytest.fail("waiter must not issue"))
        got.append(time.monotonic())

    with HeldIssuance(locked(redis_url, key_prefix), make_token) as held:
        w = threading.Thread(target=wait)
        w.start()
        time.sleep(0.2)  # let the waiter block in BLPOP (not needed for correctness)
        released = time.monotonic()
        held.finish()
        w.join(10)
    assert got and got[0] - released < 1.0


def test_wait_for_a_stuck_holder_ends_in_storage_error(redis_url: str, key_prefix: str) -> None:
    # The holder is alive and keeps extending its 1 s lock while it sits out a 3 s EGW00133.
    calls: list[float] = []
    entered = threading.Event()

    def rate_limited_once() -> Token:
        calls.append(time.monotonic())
        entered.set()
        if len(calls) == 1:
            raise TokenIssueError("EGW00133", code="EGW00133", retry_after_s=5.0)
        return make_token()

    # The holder keeps its 2 s lock alive through the sit-out (a stall under 1.3 s of its thread
    # cannot let the lock lapse); the waiter gives up after 3 s, long before the holder is done.
    holder = locked(redis_url, key_prefix, lock_ttl=2.0, wait_timeout=8.0)
    waiter = locked(redis_url, key_prefix, lock_ttl=1.0, wait_timeout=3.0, poll_interval_s=0.1)
    t = threading.Thread(target=holder.get_or_issue, args=("key1", "secret1", rate_limited_once))
    t.start()
    assert entered.wait(10)
    started = time.monotonic()
    with pytest.raises(TokenStorageError, match="timed out"):
        waiter.get_or_issue("key1", "secret1", lambda: pytest.fail("waiter must not issue"))
    assert 3.0 <= time.monotonic() - started < 3.0 + 1.5
    t.join(10)
    assert len(calls) == 2  # the holder kept its lock through the sit-out and asked again


def test_nothing_listening_is_a_storage_error_within_bounded_time(dead_port: int) -> None:
    storage = LockedRedisTokenStorage(f"redis://127.0.0.1:{dead_port}/0", key_prefix="dead")
    started = time.monotonic()
    with pytest.raises(TokenStorageError):
        storage.get_or_issue("key1", "secret1", lambda: pytest.fail("must not issue"))
    assert time.monotonic() - started < 5
    assert storage.load_token("key1", "secret1") is None
    assert storage.save_token(token_data()) is False


def test_server_restart_mid_run_is_an_error_then_recovery() -> None:
    with RedisServer() as server:
        storage = LockedRedisTokenStorage(server.url, key_prefix="restart")
        assert storage.get_or_issue("key1", "secret1", make_token).access_token == TOKEN
        server.stop()
        started = time.monotonic()
        with pytest.raises(TokenStorageError):
            storage.get_or_issue("key1", "secret1", make_token)
        assert time.monotonic() - started < 5
        server.start()
        # The server came back empty (no persistence): one new issuance, then served warm.
        calls: list[int] = []
        got = storage.get_or_issue("key1", "secret1", lambda: calls.append(1) or make_token())
        assert got.access_token == TOKEN and calls == [1]


def _forked_get(storage: LockedRedisTokenStorage, barrier: Any, out: Any) -> None:
    from kis_safe_token import KoreaInvestment

    barrier.wait(30)
    client = KoreaInvestment(
        HERD_APP_KEY, HERD_SECRET, token_storage=storage, base_url=os.environ["KIS_TEST_BASE_URL"]
    )
    out.put(token_id(client.access_token))


def test_storage_built_before_fork_is_safe_in_children(
    sim: KisSimulator, redis_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = locked(redis_url, key_prefix)
    storage.load_token("warm", "up")  # the parent's pool now has a connection
    monkeypatch.setenv("KIS_TEST_BASE_URL", sim.base_url)
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_forked_get, args=(storage, barrier, out)) for _ in range(6)]
    for p in procs:
        p.start()
    tokens = {out.get(timeout=60) for _ in procs}
    for p in procs:
        p.join(30)
    assert len(tokens) == 1
    assert sim.issued == 1 and sim.rate_limited == 0


def spec(redis_url: str, key_prefix: str, **options: Any) -> dict[str, Any]:
    return {"kind": "redis", "url": redis_url, "key_prefix": key_prefix, "options": options}


def test_sixteen_processes_cold_start_share_one_issuance(
    sim: KisSimulator, redis_url: str, key_prefix: str
) -> None:
    herd = run_herd(16, spec(redis_url, key_prefix), sim.base_url)
    assert herd.errors == []
    assert len(herd.rows) == 16
    assert sim.issued == 1
    assert sim.rate_limited == 0
    assert len(herd.tokens()) == 1
    assert herd.save_to_last_holder_s() is not None


def test_holder_killed_while_kis_is_slow_one_waiter_takes_over(
    redis_url: str, key_prefix: str
) -> None:
    with KisSimulator(
        apps={HERD_APP_KEY: HERD_SECRET}, issue_window_s=1.0, issue_latency_s=0
    ) as sim:
        lock_ttl = 3.0
        fast = {"rate_limit_wait_s": 1.1, "timeout": (1.0, 1.5)}  # lock_ttl must exceed it
        s = spec(redis_url, key_prefix, lock_ttl=lock_ttl, poll_interval_s=0.1)
        ctx = mp.get_context("spawn")
        out, go = ctx.Queue(), ctx.Event()
        # The waiters are started (and imported) first, so the kill below is not racing their
        # start-up nor the holder's 1 s read timeout.
        waiters = [
            ctx.Process(target=gated_client, args=(s, sim.base_url, go, out, None, fast))
            for _ in range(3)
        ]
        for w in waiters:
            w.start()
        ready = [out.get(timeout=120) for _ in waiters]
        assert [r[0] for r in ready] == ["ready"] * 3, ready
        sim.issue_gate.clear()  # KIS hangs
        holder = ctx.Process(target=gated_client, args=(s, sim.base_url, None, out, None, fast))
        holder.start()
        assert sim.wait_for(lambda m: m.counts["issue_requests"] == 1, timeout=60)
        holder.kill()  # inside its KIS call, holding the lock
        holder.join(10)
        killed_at = time.monotonic()
        go.set()
        sim.issue_gate.set()  # the dead holder's request still completes at KIS
        results = [out.get(timeout=60) for _ in waiters]
        for w in waiters:
            w.join(10)
        assert [r[0] for r in results] == ["ok"] * 3, results
        assert len({r[1] for r in results}) == 1
        # The lock lapses after lock_ttl, then one waiter sits out KIS's 1 s window and issues:
        # about 4 s on a quiet host, 8.8 s seen beside two CPU burners; well under a wait_timeout.
        assert max(r[2] for r in results) - killed_at < lock_ttl + 10
        # The dead holder's issuance went through at KIS and was lost; exactly one more followed.
        assert sim.issued == 2
