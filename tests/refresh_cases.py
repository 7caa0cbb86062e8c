"""Refresh scenarios shared by the tests of the integrations whose broker refreshes in-process
(korea-investment-stock, mojito2): each test passes its broker, its price call and its refresh.

Test machinery, imported as ``refresh_cases`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from kis_safe_token.storage.base import TokenStorage
from kis_safe_token.testing import KisSimulator

Price = Callable[[], dict[str, Any]]


def price_ok(answer: dict[str, Any]) -> bool:
    return answer.get("rt_cd") == "0" and bool(answer["output"]["stck_prpr"])


def late_refresh_drops_only_its_token(
    broker: Any,
    usim: KisSimulator,
    storage: TokenStorage,
    credentials: tuple[str, str],
    price: Price,
    refresh: Callable[[], object],
) -> None:
    """A thread whose expired answer comes after another thread refreshed drops the token it
    sent (gone already), not the fresh one, so no second issuance (refused within the minute)."""
    sent, go, results = threading.Event(), threading.Event(), []

    def late() -> None:
        results.append(broker.access_token)  # this thread builds its header with the first token
        sent.set()
        go.wait(10)
        refresh()  # the client's own refresh path
        results.append(broker.access_token)

    thread = threading.Thread(target=late)
    thread.start()
    assert sent.wait(10)
    usim.expire_tokens()
    assert price_ok(price())  # this thread refreshes first
    fresh = broker.access_token
    go.set()
    thread.join(30)
    assert results[0] != fresh and results[1] == fresh
    assert usim.issued == 2 and usim.rate_limited == 0
    stored = storage.load_token(*credentials)
    assert stored is not None and stored["access_token"] == fresh.removeprefix("Bearer ")


def threads_refresh_once(usim: KisSimulator, price: Price) -> None:
    """8 threads of one broker meet the expired token together: each drops the token it sent,
    not the one another thread just got (which would cost a second issuance within KIS's
    minute), so the fleet's token is issued once more, not eight times."""
    usim.expire_tokens()
    start = threading.Barrier(8)
    answers: list[dict[str, Any]] = []

    def call() -> None:
        start.wait(10)
        answers.append(price())

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(answers) == 8 and all(price_ok(a) for a in answers)
    assert usim.issued == 2 and usim.rate_limited == 0
