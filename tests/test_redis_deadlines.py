"""Redis retries bounded by the caller's own deadline: a rate-limit slot or an
``EGW00201`` slowdown on a dead Redis gives up within the caller's budget, not after the
storage's ``retry_timeout_s`` (40 s in HA mode); a holder saving the token KIS just gave
retries until its own deadline, not for ``retry_timeout_s`` only."""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Any

import pytest
import redis
import redis.asyncio
from test_redis_retry import TOKEN, FlakyRedis, sha

from kis_safe_token import LockedRedisTokenStorage, TokenStorageError
from kis_safe_token.flight.aio import AsyncStore
from kis_safe_token.storage.redis import SAVE_NEWEST_LUA
from kis_safe_token.testing.redis_server import free_port
from kis_safe_token.token import Token

BUDGET_S = 0.5
#: The budget, one backoff pause and loopback connection refusals, with room for a loaded box:
#: still far below the store's own 40 s, which is what a call would take without its budget.
WITHIN_S = 5.0


@pytest.fixture
def dead_store(key_prefix: str) -> LockedRedisTokenStorage:
    """A store on a port nothing listens on, retrying for 40 s by its own setting."""
    return LockedRedisTokenStorage(
        f"redis://127.0.0.1:{free_port()}/0", key_prefix=key_prefix, retry_timeout_s=40
    )


def _fails_within_budget(call: Any) -> float:
    started = time.monotonic()
    with pytest.raises(TokenStorageError, match="rate limiter"):
        call()
    took = time.monotonic() - started
    assert took < WITHIN_S
    return took


def test_acquire_on_a_dead_redis_gives_up_within_its_timeout(
    dead_store: LockedRedisTokenStorage,
) -> None:
    limiter = dead_store.rate_limiter("key1", 10.0)
    assert _fails_within_budget(partial(limiter.acquire, timeout_s=BUDGET_S)) >= BUDGET_S * 0.9


def test_penalize_on_a_dead_redis_gives_up_within_the_callers_budget(
    dead_store: LockedRedisTokenStorage,
) -> None:
    limiter = dead_store.rate_limiter("key1", 10.0)
    _fails_within_budget(partial(limiter.penalize, timeout_s=BUDGET_S))


def test_async_acquire_and_penalize_on_a_dead_redis_give_up_within_the_budget(
    dead_store: LockedRedisTokenStorage,
) -> None:
    limiter = dead_store.rate_limiter("key1", 10.0)

    async def acquire() -> float:
        store = AsyncStore(dead_store)
        try:
            return await limiter.acquire_async(
                BUDGET_S, try_acquire=partial(store.try_acquire, limiter)
            )
        finally:
            await store.aclose()

    _fails_within_budget(lambda: asyncio.run(acquire()))
    _fails_within_budget(lambda: asyncio.run(AsyncStore.penalize(limiter, BUDGET_S)))


# -- the holder's save ----------------------------------------------------------------------------

#: Refused attempts of the save: with backoff from 0.05 s, about 1.5 s of outage, five times
#: the stores' retry_timeout_s below.
SAVE_OUTAGE = 8


@pytest.fixture
def flaky(redis_server: Any) -> FlakyRedis:
    return FlakyRedis("127.0.0.1", redis_server.port)


def _stored(flaky: FlakyRedis, key_prefix: str) -> Token | None:
    fresh = LockedRedisTokenStorage(
        client=redis.Redis(port=flaky.connection_pool.connection_kwargs["port"]),
        key_prefix=key_prefix,
    )
    return fresh.read_token("key1", "secret1")


@pytest.mark.parametrize("seed_lease", [False, True])
def test_the_holder_retries_its_save_until_its_own_deadline(
    flaky: FlakyRedis, key_prefix: str, seed_lease: bool
) -> None:
    # The extend goes through; then the save is refused for longer than retry_timeout_s.
    storage = LockedRedisTokenStorage(
        client=flaky,
        key_prefix=key_prefix,
        lock_ttl=5,
        wait_timeout=20,
        retry_timeout_s=0.3,
        seed_lease=seed_lease,
        lease_ttl=5,
        issue_window_s=1,
    )
    save = sha(SAVE_NEWEST_LUA) if seed_lease else "pipeline"

    def issue() -> Token:
        flaky.down[save] = SAVE_OUTAGE
        return TOKEN

    assert storage.get_or_issue("key1", "secret1", issue) == TOKEN
    assert flaky.calls[save] >= SAVE_OUTAGE + 1
    assert _stored(flaky, key_prefix) == TOKEN


def test_the_async_holder_retries_its_save_until_its_own_deadline(
    flaky: FlakyRedis, key_prefix: str
) -> None:
    storage = LockedRedisTokenStorage(
        client=flaky, key_prefix=key_prefix, lock_ttl=5, wait_timeout=20, retry_timeout_s=0.3
    )
    port = flaky.connection_pool.connection_kwargs["port"]

    async def main() -> Token:
        store = AsyncStore(storage, redis_client=redis.asyncio.Redis(port=port))

        async def issue() -> Token:
            flaky.down["pipeline"] = SAVE_OUTAGE  # the save runs on the sync client
            return TOKEN

        try:
            return await store.get_or_issue("key1", "secret1", issue)
        finally:
            await store._client.aclose()

    assert asyncio.run(main()) == TOKEN
    assert flaky.calls["pipeline"] >= SAVE_OUTAGE + 1
    assert _stored(flaky, key_prefix) == TOKEN
