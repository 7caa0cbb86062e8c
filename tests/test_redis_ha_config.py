"""Configuration of the highly available Redis clients, without servers:
an address list never echoes an entry (it may hold a password), and an injected client that
``redis_ha`` did not build still asks for its asyncio twin by name."""

from __future__ import annotations

import pytest
import redis

from kis_safe_token import LockedRedisTokenStorage, create_token_storage
from kis_safe_token.storage.redis_ha import parse_nodes

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    ("value", "position", "what"),
    [
        (f"10.0.0.1,redis://:{SECRET}@h:26379", 2, "is a URL"),
        (f"user:{SECRET}@h", 1, "has no valid port"),
        (f"10.0.0.1:26379,10.0.0.2,{SECRET}@h:26379", 3, "is not a host name or address"),
        (f"h:{SECRET}", 1, "has no valid port"),
    ],
)
def test_a_bad_address_is_named_by_position_never_echoed(
    value: str, position: int, what: str
) -> None:
    variable = "KOREA_INVESTMENT_REDIS_SENTINELS"
    with pytest.raises(ValueError) as raised:
        create_token_storage(
            {
                "KOREA_INVESTMENT_TOKEN_STORAGE": "redis",
                "KOREA_INVESTMENT_REDIS_MODE": "sentinel",
                variable: value,
            }
        )
    message = str(raised.value)
    assert f"{variable} entry {position} {what}" in message
    assert SECRET not in message and "@" not in message.split(";")[0]
    with pytest.raises(ValueError) as direct:
        parse_nodes(value, "nodes", 26379)
    assert SECRET not in str(direct.value)


def test_an_injected_client_redis_ha_did_not_build_still_needs_redis_client() -> None:
    storage = LockedRedisTokenStorage(client=redis.Redis(port=1))
    with pytest.raises(ValueError, match="redis_client="):
        storage.async_client()


#: The retry bound (0.5 s) plus what a CPU-starved host may add to the last attempt.
BOUND_S = 3.0


@pytest.mark.parametrize("sentinels", [1, 2, 3])
def test_dead_sentinels_fail_within_the_retry_bound(
    sentinels: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every sentinel on a closed port, ``KOREA_INVESTMENT_REDIS_RETRY_TIMEOUT=0.5``: sync and
    asyncio fail within the bound (0.5 s measured on a quiet host; before: 4.7 / 8.3 / 13.6 s,
    the sentinels' own connections kept redis-py's default retries), in one line naming the
    cause. The test allows the last attempt 2.5 s of a CPU-starved host (1.9 s seen beside two
    CPU burners), still under the 4.7 s one dead sentinel cost before."""
    import asyncio
    import socket
    import time

    from kis_safe_token import TokenStorageError
    from kis_safe_token.flight.aio import AsyncStore

    held = [socket.socket() for _ in range(sentinels)]
    try:
        for sock in held:
            sock.bind(("127.0.0.1", 0))  # bound, never listening: connect is refused at once
        addresses = ",".join(f"127.0.0.1:{sock.getsockname()[1]}" for sock in held)
        monkeypatch.setenv("KOREA_INVESTMENT_TOKEN_STORAGE", "redis")
        monkeypatch.setenv("KOREA_INVESTMENT_REDIS_MODE", "sentinel")
        monkeypatch.setenv("KOREA_INVESTMENT_REDIS_SENTINELS", addresses)
        monkeypatch.setenv("KOREA_INVESTMENT_REDIS_RETRY_TIMEOUT", "0.5")

        def never() -> None:
            raise AssertionError("must not issue")

        storage = create_token_storage()
        started = time.monotonic()
        with pytest.raises(TokenStorageError) as info:
            storage.get_or_issue("key1", "secret1", never)  # type: ignore[arg-type]
        assert time.monotonic() - started < BOUND_S
        assert "No master found" in str(info.value) and "<redis." not in str(info.value)

        async def async_get() -> float:
            store = AsyncStore(create_token_storage())
            began = time.monotonic()
            try:
                with pytest.raises(TokenStorageError):
                    await store.get_or_issue("key1", "secret1", never)  # type: ignore[arg-type]
            finally:
                await store.aclose()
            return time.monotonic() - began

        assert asyncio.run(async_get()) < BOUND_S
    finally:
        for sock in held:
            sock.close()
