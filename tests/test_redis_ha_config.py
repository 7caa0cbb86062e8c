"""Configuration of the highly available Redis clients, without servers (issue 13 review):
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
