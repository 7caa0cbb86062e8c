"""The four client integrations in a fleet: 16 forked processes of each (the real upstream
package, its own request path), on the file and the Redis backend, against the simulator with
KIS's one-token-a-minute window: one issuance, then after a server-side expiry one refresh,
through the client's own refresh path, and none of the client's own token caches written.

What each client does as shipped (the baseline that makes these zeros mean something) is in its
own ``test_integration_<client>.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from upstream_herd import UPSTREAM_CLIENTS, require_upstream, run_upstream_herd, upstream_simulator

from kis_safe_token.kis import TOKEN_EXPIRED

PROCESSES = 16

#: ``EGW00123`` answers the herd's round 1 gets: exactly that many, or ``None`` for at least one.
EXPIRED_ANSWERS: dict[str, int | None] = {
    "korea_investment_stock": None,  # round 1 went through upstream's refresh path
    "mojito": None,  # round 1 met the expiry and refreshed (mojito alone cannot)
    "pykis": PROCESSES,  # every process met the expiry in pykis's loop and went on
    "kis_trader": PROCESSES,  # every process met the expiry once, and no retry re-sent it
}


@pytest.mark.parametrize("client", list(UPSTREAM_CLIENTS))
@pytest.mark.parametrize("backend", ["file", "redis"])
def test_herd_of_16_makes_one_issuance_then_one_refresh(
    backend: str, client: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    require_upstream(client)
    spec: dict[str, Any] = (
        {"kind": "file", "path": str(tmp_path / "shared" / "token.json")}
        if backend == "file"
        else {
            "kind": "redis",
            "url": request.getfixturevalue("redis_url"),
            "key_prefix": request.getfixturevalue("key_prefix"),
        }
    )
    with upstream_simulator() as sim:
        result = run_upstream_herd(
            f"upstream_clients.{client}_scenario:integrated",
            PROCESSES,
            spec,
            sim.base_url,
            folder=tmp_path / "herd",
            sim=sim,
            between_rounds=lambda _: sim.expire_tokens(),
        )
        expired_answers = sim.counts[TOKEN_EXPIRED]
    assert not result.harness_errors, result.summary()
    assert result.errors() == [], result.summary()
    assert result.issued == [1, 1], result.summary()  # start, then after the server-side expiry
    assert result.rate_limited == [0, 0] and result.crashed() == 0, result.summary()
    assert len(result.round_rows(1)) == PROCESSES
    assert len(result.tokens(0)) == 1 and len(result.tokens(1)) == 1
    assert result.tokens(0) != result.tokens(1)
    expected = EXPIRED_ANSWERS[client]
    if expected is None:
        assert expired_answers >= 1
    else:
        assert expired_answers == expected
    # None of the clients' own caches (~/.cache/kis/token.key, ./token.dat, ~/.pykis/cache,
    # ~/.cache/kis-trader/tokens) in any process's home or working directory.
    assert result.cache_files() == []
