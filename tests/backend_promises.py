"""Two cross-process promises of the backend protocol, checked on any storage spec (see
``herd.build_storage``): by ``test_backend_contract`` on file, Redis and SQLite, and by
``test_redis_ha`` on Sentinel and Cluster."""

from __future__ import annotations

import time
from typing import Any

from async_herd import run_mixed_herd
from herd import HERD_APP_KEY, HERD_SECRET, build_storage

from kis_safe_token.storage import HELD
from kis_safe_token.testing import KisSimulator
from kis_safe_token.token import Token


def assert_mixed_herd_issues_once(spec: dict[str, Any], sim: KisSimulator) -> None:
    """4 sync and 4 asyncio processes, 5 calls each, released together: one issuance."""
    herd = run_mixed_herd(
        ["sync"] * 4 + ["async"] * 4, spec, sim.base_url, tasks=5, calls_per_second=1000
    )
    assert herd.errors == []
    assert herd.calls == 8 * 5
    assert sim.issued == 1 and sim.rate_limited == 0
    assert len(herd.tokens) == 1


def assert_dead_holder_taken_over(spec: dict[str, Any]) -> None:
    """A holder that died holding the lock (never released, never extended): the next caller
    issues after the lock's ttl (1 s here), not never."""
    spec = {**spec, "options": {"lock_ttl": 1.0}}
    dead = build_storage(spec).issuance_lock(HERD_APP_KEY, HERD_SECRET)
    assert dead.attempt() is HELD
    started = time.monotonic()
    token = "next-" + "x" * 40
    got = build_storage(spec).get_or_issue(
        HERD_APP_KEY, HERD_SECRET, lambda: Token(token, time.time() + 86_400)
    )
    assert got.access_token == token
    assert 0.9 <= time.monotonic() - started < 10
