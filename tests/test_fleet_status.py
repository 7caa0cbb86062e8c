"""``kis-token status --fleet``: every app key in the store, on the file and the Redis backend,
as a separate process sees it (a lock held here is held for it), leaking nothing."""

from __future__ import annotations

import json

import pytest
from conftest import APP_KEY, HERD_APP_KEY, HERD_SECRET, SECRET
from test_cli_and_secrets import assert_nothing_leaked, cli_env, kis_token  # noqa: F401

from kis_safe_token import FileTokenStorage, LockedRedisTokenStorage, SharedToken
from kis_safe_token.crypto import key_id
from kis_safe_token.events import app_key_label
from kis_safe_token.ratelimit import RateLimiter
from kis_safe_token.storage.base import TokenStorage
from kis_safe_token.testing import KisSimulator
from kis_safe_token.testing.redis_server import RedisServer


@pytest.mark.parametrize("backend", ["file", "redis"])
def test_fleet_status_shows_every_app_key(
    backend: str,
    cli_env: dict[str, str],  # noqa: F811
    sim: KisSimulator,
    request: pytest.FixtureRequest,
) -> None:
    storage: TokenStorage
    if backend == "file":
        storage = FileTokenStorage(cli_env["KOREA_INVESTMENT_TOKEN_FILE"])
    else:  # a server of its own: the command uses the default key prefix
        server = RedisServer()
        request.addfinalizer(server.stop)
        server.start()
        storage = LockedRedisTokenStorage(server.url)
        cli_env.update(
            KOREA_INVESTMENT_TOKEN_STORAGE="redis", KOREA_INVESTMENT_REDIS_URL=server.url
        )
    ours = SharedToken(APP_KEY, SECRET, storage, base_url=sim.base_url)
    token = ours.token
    ours.approval_key
    limiter = ours.rate_limiter
    assert isinstance(limiter, RateLimiter)
    limiter.penalize()  # an EGW00201: the fleet runs at half its rate for a while
    SharedToken(HERD_APP_KEY, HERD_SECRET, storage, base_url=sim.base_url).token
    lock = storage.issuance_lock(HERD_APP_KEY, HERD_SECRET)
    assert lock.attempt() is True  # held by this process while the command looks
    try:
        cli_env["KOREA_INVESTMENT_API_SECRET"] = SECRET
        result = kis_token(cli_env, "status", "--fleet", "--json")
        text = kis_token(cli_env, "status", "--fleet")
    finally:
        lock.release()
    assert result.returncode == 0 and text.returncode == 0, result.stderr + text.stderr
    report = json.loads(result.stdout)
    by_id = {entry["key_id"]: entry for entry in report["app_keys"]}
    assert set(by_id) == {key_id(APP_KEY), key_id(HERD_APP_KEY)}  # the approval key: with ours
    mine, other = by_id[key_id(APP_KEY)], by_id[key_id(HERD_APP_KEY)]
    assert mine["app_key"] == app_key_label(APP_KEY) and mine["approval_key"] is True
    assert mine["token"]["expires_kst"] == token.expired_kst
    assert 0 < mine["token"]["seconds_left"] <= token.expires_at
    assert mine["rate_limit"]["slowed_down_s"] > 0
    assert mine["rate_limit"]["calls_per_second"] == mine["rate_limit"]["configured"] / 2
    assert other["app_key"] is None and "token" in other["records"]
    assert other["lock_held"] is True and mine["lock_held"] is (backend == "file")
    if backend == "redis":
        assert other["lock_held_s"] is not None and other["token_ttl_s"] > 0
    assert f"app key {app_key_label(APP_KEY)}" in text.stdout
    assert "slowed to half after EGW00201" in text.stdout
    assert APP_KEY not in result.stdout + text.stdout
    assert HERD_APP_KEY not in result.stdout + text.stdout
    assert_nothing_leaked(sim, result.stdout, text.stdout, result.stderr, text.stderr)
