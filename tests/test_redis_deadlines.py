"""Redis retries bounded by the caller's own deadline (issue 13 review): a rate-limit slot or an
``EGW00201`` slowdown on a dead Redis gives up within the caller's budget, not after the
storage's ``retry_timeout_s`` (40 s in HA mode)."""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Any

import pytest

from kis_safe_token import LockedRedisTokenStorage, TokenStorageError
from kis_safe_token.storage.aio import AsyncStore
from kis_safe_token.testing.redis_server import free_port

BUDGET_S = 0.5
#: The budget, one backoff pause and loopback connection refusals.
WITHIN_S = 1.5


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
