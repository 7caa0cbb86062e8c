"""Large herds, several rounds, on both backends: every round exactly one issuance.

Between rounds the simulator expires the token server-side, so every client meets EGW00123 on its
next call and must get the replacement through the store's single flight.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from herd import run_herd

from kis_safe_token.testing import KisSimulator

pytestmark = pytest.mark.stress

ROUNDS = 3


def make_spec(backend: str, token_path: Path, redis_url: str, key_prefix: str) -> dict[str, Any]:
    if backend == "file":
        return {"kind": "file", "path": str(token_path)}
    return {"kind": "redis", "url": redis_url, "key_prefix": key_prefix}


class ExpireBetweenRounds:
    """``between_rounds`` callback: note the issuance count, then expire the token at KIS."""

    def __init__(self, sim: KisSimulator) -> None:
        self.sim = sim
        self.issued_before: list[int] = []

    def __call__(self, round_no: int) -> None:
        self.issued_before.append(self.sim.issued)
        self.sim.expire_tokens()


def assert_one_issuance_per_round(
    herd: Any, sim: KisSimulator, issued_before: list[int], rounds: int, clients: int
) -> None:
    assert herd.errors == []
    assert len(herd.rows) == rounds * clients
    issued_before.append(sim.issued)
    per_round = [b - a for a, b in zip([0, *issued_before], issued_before)]
    assert per_round == [1] * rounds
    assert sim.rate_limited == 0
    tokens = [herd.tokens(r) for r in range(rounds)]
    assert all(len(t) == 1 for t in tokens)
    assert len(set().union(*tokens)) == rounds


@pytest.mark.parametrize("backend", ["file", "redis"])
@pytest.mark.parametrize("processes", [32, 64])
def test_herd_rounds_make_one_issuance_each(
    sim: KisSimulator,
    backend: str,
    processes: int,
    token_path: Path,
    redis_url: str,
    key_prefix: str,
) -> None:
    next_round = ExpireBetweenRounds(sim)
    herd = run_herd(
        processes,
        make_spec(backend, token_path, redis_url, key_prefix),
        sim.base_url,
        rounds=ROUNDS,
        between_rounds=next_round,
        timeout_s=280,
    )
    assert_one_issuance_per_round(herd, sim, next_round.issued_before, ROUNDS, processes)


@pytest.mark.parametrize("backend", ["file", "redis"])
def test_eight_processes_of_eight_threads_make_one_issuance_per_round(
    sim: KisSimulator, backend: str, token_path: Path, redis_url: str, key_prefix: str
) -> None:
    next_round = ExpireBetweenRounds(sim)
    herd = run_herd(
        8,
        make_spec(backend, token_path, redis_url, key_prefix),
        sim.base_url,
        threads=8,
        rounds=2,
        between_rounds=next_round,
        timeout_s=200,
    )
    assert_one_issuance_per_round(herd, sim, next_round.issued_before, 2, 64)
