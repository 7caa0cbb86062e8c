"""A small WSGI app for the gunicorn tests: every request fetches a price through one shared
``KoreaInvestment`` per worker process (built at import, so ``--preload`` builds it in the master).

Configured by the environment: ``KOREA_INVESTMENT_*`` for storage and host, plus
``KIS_TEST_APP_KEY`` / ``KIS_TEST_APP_SECRET``; ``KIS_TEST_READY_DIR``: a folder where each
worker leaves a file named by its pid once it has imported the app.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading

from kis_safe_token import KoreaInvestment

_client: KoreaInvestment | None = None
_guard = threading.Lock()


def _broker() -> KoreaInvestment:
    global _client
    with _guard:
        if _client is None:
            _client = KoreaInvestment(
                os.environ["KIS_TEST_APP_KEY"], os.environ["KIS_TEST_APP_SECRET"]
            )
        return _client


if os.environ.get("KIS_TEST_BUILD_AT_IMPORT") == "1":
    _broker()

# A worker says it is up (without --preload every worker imports the app after the fork), so a
# test can wait for the whole fleet rather than the first worker that answers.
if os.environ.get("KIS_TEST_READY_DIR"):
    open(os.path.join(os.environ["KIS_TEST_READY_DIR"], str(os.getpid())), "w").close()


def metrics(start_response):  # type: ignore[no-untyped-def]
    """The fleet's metrics, summed over the workers as prometheus_client documents it."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    body = generate_latest(registry)
    start_response("200 OK", [("content-type", CONTENT_TYPE_LATEST)])
    return [body]


_realtime: dict[str, object] = {}


def next_trade(symbol: str) -> dict[str, object]:
    """``/rt/<code>``: the next trade of ``symbol`` through this worker's ``KisRealtime`` (one
    per worker; the fleet's one session is the leader's)."""
    from kis_safe_token import KisRealtime
    from kis_safe_token.testing.realtime_sim import sequence_of

    with _guard:
        if "rt" not in _realtime:
            _realtime["rt"] = KisRealtime(
                os.environ["KIS_TEST_APP_KEY"], os.environ["KIS_TEST_APP_SECRET"]
            )
        rt = _realtime["rt"]
        if symbol not in _realtime:
            _realtime[symbol] = rt.subscribe("H0STCNT0", symbol)  # type: ignore[attr-defined]
        sub = _realtime[symbol]
    event = sub.get(10)  # type: ignore[attr-defined]
    while event is not None and event.gap:
        event = sub.get(10)  # type: ignore[attr-defined]
    assert event is not None, "no trade within 10 s"
    return {"pid": os.getpid(), "seq": sequence_of(event.fields), "role": rt.role}  # type: ignore[attr-defined]


def app(environ, start_response):  # type: ignore[no-untyped-def]
    symbol = environ.get("PATH_INFO", "/").strip("/") or "005930"
    if symbol == "metrics":
        return metrics(start_response)
    if symbol.startswith("rt/"):
        body = json.dumps(next_trade(symbol[3:])).encode()
        start_response("200 OK", [("content-type", "application/json")])
        return [body]
    broker = _broker()
    quote = broker.fetch_price(symbol)
    body = json.dumps(
        {
            "pid": os.getpid(),
            "price": quote["output"]["stck_prpr"],
            "token": hashlib.sha256(broker.access_token.encode()).hexdigest()[:8],
        }
    ).encode()
    start_response(
        "200 OK", [("content-type", "application/json"), ("content-length", str(len(body)))]
    )
    return [body]
