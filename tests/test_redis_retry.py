"""``redis_retry`` and the Redis storage's use of it, with faults injected into a real server's
client: a reply lost after the command ran (the worst case for a retry), a connection that stays
down for a while. Plus the environment variables for Sentinel and Cluster, checked.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from kis_safe_token import LockedRedisTokenStorage, TokenStorageError, create_token_storage
from kis_safe_token.crypto import key_id
from kis_safe_token.storage.redis import ACQUIRE_LUA, EXTEND_LUA
from kis_safe_token.storage.redis_retry import BACKOFF_CAP_S, is_transient, redis_retry
from kis_safe_token.token import Token

TOKEN = Token("tok-" + "r" * 60, time.time() + 86_400)


def sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()  # noqa: S324 - Redis names scripts so


class FlakyRedis(redis.Redis):
    """A real client that, ``faults[name]`` times, runs a command and then loses its reply
    (``name``: a script's SHA1, ``"BLPOP"``, or ``"pipeline"``); ``down[name]`` times, fails
    without sending it. Counts what it was asked to run in ``calls``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.faults: Counter[str] = Counter()
        self.down: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.guard = threading.Lock()

    def _take(self, name: str) -> tuple[bool, bool]:
        with self.guard:
            self.calls[name] += 1
            if self.down[name] > 0:
                self.down[name] -= 1
                return True, False
            if self.faults[name] > 0:
                self.faults[name] -= 1
                return False, True
            return False, False

    def execute_command(self, *args: Any, **options: Any) -> Any:
        name = str(args[1]) if args[0] == "EVALSHA" else str(args[0])
        down, lose = self._take(name)
        if down:
            raise redis.exceptions.ConnectionError("injected: connection refused")
        result = super().execute_command(*args, **options)
        if lose:
            raise redis.exceptions.ConnectionError("injected: reply lost")
        return result

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        real = pipe.execute

        def execute(raise_on_error: bool = True) -> Any:
            down, lose = self._take("pipeline")
            if down:
                pipe.reset()
                raise redis.exceptions.ConnectionError("injected: connection refused")
            result = real(raise_on_error)
            if lose:
                raise redis.exceptions.ConnectionError("injected: reply lost")
            return result

        pipe.execute = execute  # type: ignore[method-assign]
        return pipe


@pytest.fixture
def flaky(redis_server: Any) -> FlakyRedis:
    return FlakyRedis("127.0.0.1", redis_server.port)


# -- the helper -----------------------------------------------------------------------------------


def test_transient_errors_are_retried_until_the_deadline_then_named() -> None:
    calls: list[float] = []

    def down() -> None:
        calls.append(time.monotonic())
        raise redis.exceptions.ConnectionError("Connection refused")

    wake_ups: list[float] = []  # when each pause was meant to end

    def pause(seconds: float) -> None:
        wake_ups.append(time.monotonic() + seconds)
        time.sleep(seconds)

    started = time.monotonic()
    with pytest.raises(TokenStorageError, match=r"Redis GET failed \(here\) after \d+ attempt"):
        redis_retry(down, deadline=started + 0.6, what="GET", where="here", sleep=pause)
    took = time.monotonic() - started
    assert 0.6 <= took < 0.6 + BACKOFF_CAP_S + 0.3
    assert len(calls) >= 3
    # No pause is meant to end past the deadline: the last attempt starts at it (however late
    # a loaded machine wakes the thread, which is not the code's to bound).
    assert max(wake_ups) <= started + 0.6 + 0.001


def test_a_success_after_failures_is_returned() -> None:
    left = [3]

    def flaky() -> str:
        if left[0]:
            left[0] -= 1
            raise redis.exceptions.TimeoutError("Timeout reading from socket")
        return "ok"

    assert redis_retry(flaky, deadline=time.monotonic() + 5) == "ok"
    assert left == [0]


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.ResponseError("WRONGTYPE Operation against a key"),
        redis.exceptions.AuthenticationError("invalid password"),
        redis.exceptions.ResponseError("NOSCRIPT No matching script"),
    ],
)
def test_errors_a_retry_cannot_heal_fail_at_once(error: Exception) -> None:
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise error

    started = time.monotonic()
    with pytest.raises(TokenStorageError) as info:
        redis_retry(broken, deadline=started + 10)
    assert calls == [1] and time.monotonic() - started < 1
    assert info.value.__cause__ is error


def test_what_a_failover_answers_is_transient() -> None:
    errors = redis.exceptions
    assert is_transient(errors.ConnectionError("Connection closed by server."))
    assert is_transient(errors.ClusterDownError("CLUSTERDOWN The cluster is down"))
    assert is_transient(errors.TryAgainError("TRYAGAIN"))
    assert is_transient(errors.ReadOnlyError("READONLY You can't write against a replica."))
    assert is_transient(errors.ResponseError("UNBLOCKED force unblock from blocking operation"))
    assert is_transient(errors.BusyLoadingError("LOADING Redis is loading"))
    assert not is_transient(errors.ResponseError("ERR unknown command 'GET'"))


# -- the storage through it -----------------------------------------------------------------------


def test_a_lock_whose_reply_was_lost_is_held_by_its_own_retry(
    flaky: FlakyRedis, key_prefix: str
) -> None:
    flaky.faults[sha(ACQUIRE_LUA)] = 1  # SET NX ran, its reply never came back
    storage = LockedRedisTokenStorage(client=flaky, key_prefix=key_prefix)
    calls: list[int] = []
    got = storage.get_or_issue("key1", "secret1", lambda: calls.append(1) or TOKEN)
    assert got == TOKEN and calls == [1]  # the retry found its own owner id: no wait, one issue
    assert flaky.calls[sha(ACQUIRE_LUA)] == 2
    assert flaky.get(f"{key_prefix}:{{{key_id('key1')}}}:lock") is None  # and it released it


def test_the_holder_saves_through_an_outage_longer_than_retry_timeout(
    flaky: FlakyRedis, key_prefix: str
) -> None:
    # The store is down from the moment KIS answers: extend fails for ~2 s, then the first
    # save loses its reply. retry_timeout_s is 0.3 s, but a holder with a token keeps trying
    # until its own deadline (its wait_timeout).
    storage = LockedRedisTokenStorage(
        client=flaky, key_prefix=key_prefix, lock_ttl=5, wait_timeout=20, retry_timeout_s=0.3
    )

    def issue() -> Token:
        flaky.down[sha(EXTEND_LUA)] = 8
        flaky.faults["pipeline"] = 1
        return TOKEN

    started = time.monotonic()
    assert storage.get_or_issue("key1", "secret1", issue) == TOKEN
    assert time.monotonic() - started > 0.3  # it did outlast retry_timeout_s
    assert flaky.calls[sha(EXTEND_LUA)] == 9
    assert flaky.calls["pipeline"] == 2
    fresh = LockedRedisTokenStorage(
        client=redis.Redis(port=flaky.connection_pool.connection_kwargs["port"]),
        key_prefix=key_prefix,
    )
    assert fresh.get_or_issue("key1", "secret1", lambda: pytest.fail("must be saved")) == TOKEN


def test_a_waiter_rides_out_a_dead_connection_while_the_holder_issues(
    flaky: FlakyRedis, key_prefix: str, redis_url: str
) -> None:
    holder = LockedRedisTokenStorage(redis_url, key_prefix=key_prefix)
    waiter = LockedRedisTokenStorage(
        client=flaky, key_prefix=key_prefix, retry_timeout_s=0.2, poll_interval_s=0.1
    )
    entered, release = threading.Event(), threading.Event()

    def slow_issue() -> Token:
        entered.set()
        release.wait(10)
        return TOKEN

    t = threading.Thread(target=holder.get_or_issue, args=("key1", "secret1", slow_issue))
    t.start()
    assert entered.wait(10)
    flaky.down["BLPOP"] = 10**6  # every wait fails, for as long as the holder takes
    flaky.down[sha(ACQUIRE_LUA)] = 5
    out: list[Any] = []
    w = threading.Thread(target=lambda: out.append(waiter.get_or_issue("key1", "secret1", fail)))
    w.start()
    deadline = time.monotonic() + 10
    while flaky.calls["BLPOP"] < 5:  # ~0.5 s of failures and pauses: past retry_timeout_s
        assert time.monotonic() < deadline
        time.sleep(0.01)
    release.set()
    t.join(10)
    flaky.down["BLPOP"] = 0
    w.join(10)
    assert out == [TOKEN]


def fail() -> Token:
    raise AssertionError("a waiter must not issue")


def test_a_store_down_for_good_fails_after_retry_timeout(key_prefix: str, dead_port: int) -> None:
    storage = LockedRedisTokenStorage(
        f"redis://127.0.0.1:{dead_port}/0", key_prefix=key_prefix, retry_timeout_s=0.5
    )
    started = time.monotonic()
    with pytest.raises(TokenStorageError, match="after"):
        storage.get_or_issue("key1", "secret1", fail)
    assert 0.5 <= time.monotonic() - started < 2.5


# -- environment ----------------------------------------------------------------------------------

SENTINEL = {"KOREA_INVESTMENT_TOKEN_STORAGE": "redis", "KOREA_INVESTMENT_REDIS_MODE": "sentinel"}
CLUSTER = {"KOREA_INVESTMENT_TOKEN_STORAGE": "redis", "KOREA_INVESTMENT_REDIS_MODE": "cluster"}


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({**SENTINEL, "KOREA_INVESTMENT_REDIS_MODE": "sentinal"}, "_MODE.*standalone, sentinel"),
        (SENTINEL, "KOREA_INVESTMENT_REDIS_SENTINELS names no node"),
        (
            {**SENTINEL, "KOREA_INVESTMENT_REDIS_SENTINELS": "10.0.0.1:99999"},
            "KOREA_INVESTMENT_REDIS_SENTINELS entry 1 has no valid port",
        ),
        (
            {**SENTINEL, "KOREA_INVESTMENT_REDIS_SENTINELS": "redis://10.0.0.1"},
            "KOREA_INVESTMENT_REDIS_SENTINELS entry 1 is a URL",
        ),
        (
            {
                **SENTINEL,
                "KOREA_INVESTMENT_REDIS_SENTINELS": "h:1",
                "KOREA_INVESTMENT_REDIS_TLS": "y",
            },
            "KOREA_INVESTMENT_REDIS_TLS.*true, false",
        ),
        (
            {
                **SENTINEL,
                "KOREA_INVESTMENT_REDIS_SENTINELS": "h",
                "KOREA_INVESTMENT_REDIS_URL": "x",
            },
            "KOREA_INVESTMENT_REDIS_URL is for KOREA_INVESTMENT_REDIS_MODE=standalone",
        ),
        (
            {
                **SENTINEL,
                "KOREA_INVESTMENT_REDIS_SENTINELS": "h",
                "KOREA_INVESTMENT_REDIS_CLUSTER_NODES": "h",
            },
            "KOREA_INVESTMENT_REDIS_CLUSTER_NODES needs KOREA_INVESTMENT_REDIS_MODE=cluster",
        ),
        (CLUSTER, "KOREA_INVESTMENT_REDIS_CLUSTER_NODES names no node"),
        (
            {
                **CLUSTER,
                "KOREA_INVESTMENT_REDIS_CLUSTER_NODES": "h",
                "KOREA_INVESTMENT_REDIS_SENTINELS": "h",
            },
            "KOREA_INVESTMENT_REDIS_SENTINELS needs KOREA_INVESTMENT_REDIS_MODE=sentinel",
        ),
        (
            {
                **CLUSTER,
                "KOREA_INVESTMENT_REDIS_CLUSTER_NODES": "h",
                "KOREA_INVESTMENT_REDIS_TLS_CA_FILE": "/ca",
            },
            "KOREA_INVESTMENT_REDIS_TLS_CA_FILE needs KOREA_INVESTMENT_REDIS_TLS=true",
        ),
        (
            {"KOREA_INVESTMENT_TOKEN_STORAGE": "redis", "KOREA_INVESTMENT_REDIS_TLS": "true"},
            "KOREA_INVESTMENT_REDIS_TLS is for KOREA_INVESTMENT_REDIS_MODE=sentinel or cluster",
        ),
        (
            {"KOREA_INVESTMENT_TOKEN_STORAGE": "redis", "KOREA_INVESTMENT_REDIS_SENTINELS": "h"},
            "KOREA_INVESTMENT_REDIS_SENTINELS needs KOREA_INVESTMENT_REDIS_MODE=sentinel",
        ),
        (
            {
                "KOREA_INVESTMENT_TOKEN_STORAGE": "redis",
                "KOREA_INVESTMENT_REDIS_RETRY_TIMEOUT": "-1",
            },
            "KOREA_INVESTMENT_REDIS_RETRY_TIMEOUT.*seconds",
        ),
    ],
)
def test_bad_ha_environment_names_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(ValueError, match=names):
        create_token_storage(env)


def test_sentinel_environment_builds_passwords_and_tls_where_they_belong(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not read until a connection is made")
    storage = create_token_storage(
        {
            **SENTINEL,
            "KOREA_INVESTMENT_REDIS_SENTINELS": "10.0.0.1, 10.0.0.2:26380,[::1]:26381",
            "KOREA_INVESTMENT_REDIS_SENTINEL_SERVICE": "kis",
            "KOREA_INVESTMENT_REDIS_PASSWORD": "data-pass",
            "KOREA_INVESTMENT_REDIS_SENTINEL_PASSWORD": "sentinel-pass",
            "KOREA_INVESTMENT_REDIS_TLS": "true",
            "KOREA_INVESTMENT_REDIS_TLS_CA_FILE": str(ca),
        }
    )
    assert isinstance(storage, LockedRedisTokenStorage)
    pool = storage.redis_client.connection_pool
    assert pool.service_name == "kis"
    data = pool.connection_kwargs
    assert data["password"] == "data-pass" and data["ssl_ca_certs"] == str(ca)
    sentinels = pool.sentinel_manager.sentinels
    where = [
        (s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
        for s in sentinels
    ]
    assert where == [("10.0.0.1", 26379), ("10.0.0.2", 26380), ("::1", 26381)]
    assert all(
        s.connection_pool.connection_kwargs["password"] == "sentinel-pass" for s in sentinels
    )
    assert "pass" not in repr(storage)


# -- the rate limiter and the seed lease go through the same helper ----------------------------


def test_the_rate_limiter_rides_out_a_dropped_connection(
    flaky: FlakyRedis, key_prefix: str
) -> None:
    from kis_safe_token.ratelimit.redis import RESERVE_LUA

    storage = LockedRedisTokenStorage(client=flaky, key_prefix=key_prefix, retry_timeout_s=5)
    limiter = storage.rate_limiter("key1", 10.0)
    flaky.down[sha(RESERVE_LUA)] = 2
    assert limiter.try_acquire() == 0.0  # the first slot, after two refused attempts
    assert flaky.calls[sha(RESERVE_LUA)] >= 3  # (+1 EVALSHA after NOSCRIPT: first load)
    flaky.down[sha(RESERVE_LUA)] = 10**6
    started = time.monotonic()
    with pytest.raises(TokenStorageError, match="rate limiter reserve failed"):
        LockedRedisTokenStorage(
            client=flaky, key_prefix=key_prefix, retry_timeout_s=0.3
        ).rate_limiter("key1", 10.0).try_acquire()
    assert 0.3 <= time.monotonic() - started < 4.0  # not forever: retry_timeout_s, one pause


def test_a_seed_lease_save_whose_reply_was_lost_counts_as_stored(
    flaky: FlakyRedis, key_prefix: str
) -> None:
    from kis_safe_token.storage.redis import SAVE_NEWEST_LUA, RedisLeaseRecords

    storage = LockedRedisTokenStorage(client=flaky, key_prefix=key_prefix)
    flaky.faults[sha(SAVE_NEWEST_LUA)] = 1  # stored, reply lost: the retry finds its own value
    records = RedisLeaseRecords(storage)
    assert records.save_newest("key1", "secret1", TOKEN, "owner-1", 1.0) is True
    assert flaky.calls[sha(SAVE_NEWEST_LUA)] == 2
    assert storage.load_token("key1", "secret1")["access_token"] == TOKEN.access_token
