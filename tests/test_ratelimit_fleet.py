"""Proof of the fleet-wide rate limit: real processes and a real gunicorn fleet against the
simulator metering 20 calls/s per app key as KIS does. Every call is answered, none gets
EGW00201, and no process starves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import APP_KEY, HERD_CALLS_PER_SECOND, SECRET
from herd import HERD_APP_KEY, HERD_SECRET, run_call_herd
from test_fleets import APPS, wait_until_serving

from kis_safe_token.crypto import key_id
from kis_safe_token.testing import KisSimulator
from kis_safe_token.testing.redis_server import free_port
from kis_safe_token.testing.simulator import REAL_CALLS_PER_SECOND

pytestmark = pytest.mark.stress

PROCESSES, CALLS = 8, 25
HERD_RATE = {"calls_per_second": HERD_CALLS_PER_SECOND}


@pytest.fixture
def metered_sim() -> Iterator[KisSimulator]:
    with KisSimulator(
        apps={HERD_APP_KEY: HERD_SECRET, APP_KEY: SECRET},
        issue_latency_s=0,
        calls_per_second=REAL_CALLS_PER_SECOND,
    ) as sim:
        yield sim


@pytest.mark.parametrize("kind", ["file", "redis"])
def test_eight_processes_keep_to_the_limit_together(
    metered_sim: KisSimulator, tmp_path: Path, redis_url: str, key_prefix: str, kind: str
) -> None:
    spec = (
        {"kind": "file", "path": str(tmp_path / "tokens.json")}
        if kind == "file"
        else {"kind": "redis", "url": redis_url, "key_prefix": key_prefix}
    )
    released, reports, errors = run_call_herd(
        PROCESSES, CALLS, spec, metered_sim.base_url, client_kwargs=HERD_RATE
    )
    assert errors == []
    assert [r["answered"] for r in reports] == [CALLS] * PROCESSES
    assert metered_sim.too_many_calls == 0
    assert metered_sim.counts["uapi_calls"] == PROCESSES * CALLS
    assert metered_sim.peak_calls_per_second[HERD_APP_KEY] <= REAL_CALLS_PER_SECOND
    # Fair: slots go out first come, first served, so every process finishes near the end.
    rates = [CALLS / (r["ended"] - released) for r in reports]
    assert min(rates) >= 0.8 * max(rates), rates
    # ... and the fleet used its rate: 200 calls take about 14 s at 15/s with the arrival guard,
    # not much more. The bound is 2x: on a starved host a caller that wakes late for its slot
    # takes a new one (by design, so it never bunches with the next), and 1.5x was missed once
    # (20.2 s, 4 xdist workers beside an install on 2 cores). A limiter that lost the shared
    # state (8 x 15/s) would be far faster, one that serialised on a lock far slower.
    assert (
        max(r["ended"] for r in reports) - released
        < 2.0 * PROCESSES * CALLS / HERD_CALLS_PER_SECOND
    )


WORKERS = 4


def test_gunicorn_fleet_under_load_gets_no_egw00201(
    metered_sim: KisSimulator, tmp_path: Path
) -> None:
    ready = tmp_path / "ready"
    ready.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOREA_INVESTMENT_")}
    env.update(
        KOREA_INVESTMENT_BASE_URL=metered_sim.base_url,
        KOREA_INVESTMENT_TOKEN_FILE=str(tmp_path / "cache" / "tokens.json"),
        KIS_TEST_APP_KEY=APP_KEY,
        KIS_TEST_APP_SECRET=SECRET,
        KIS_TEST_READY_DIR=str(ready),
        KOREA_INVESTMENT_CALLS_PER_SECOND=str(HERD_CALLS_PER_SECOND),
        PYTHONPATH=os.pathsep.join([str(APPS), env.get("PYTHONPATH", "")]),
    )
    port = free_port()
    # Sync workers take one request at a time, so 16 clients at once spread over the workers
    # once all 4 are up (a threaded worker may accept every connection alone on a busy host).
    args = [sys.executable, "-m", "gunicorn", "-w", str(WORKERS), "-k", "sync"]
    args += ["-b", f"127.0.0.1:{port}", "--log-level", "warning", "wsgi_app:app"]
    proc = subprocess.Popen(args, env=env, cwd=APPS)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(f"{url}/005930", proc)
        deadline = time.monotonic() + 60
        while len(list(ready.iterdir())) < WORKERS:  # every worker up, not just the first
            assert proc.poll() is None and time.monotonic() < deadline, "gunicorn workers"
            time.sleep(0.05)
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda i: requests.get(f"{url}/005930", timeout=30), range(64)))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert [a.status_code for a in answers] == [200] * 64
    assert len({a.json()["pid"] for a in answers}) > 1  # several workers served
    assert metered_sim.too_many_calls == 0
    assert metered_sim.counts["uapi_calls"] >= 64  # (and the start-up probes)
    assert metered_sim.peak_calls_per_second[APP_KEY] <= REAL_CALLS_PER_SECOND
    assert (tmp_path / "cache" / f"tokens.json.rate-{key_id(APP_KEY)}").exists()


def test_redis_state_lost_mid_run_costs_no_egw00201(metered_sim: KisSimulator) -> None:
    """``FLUSHALL`` while 8 processes call at the default rate (the same as a restart without
    persistence, or a failover to a replica that never got the key): the slots handed out
    before the loss keep their second, so KIS sees no more than its limit (before: the TAT
    restarted at "now" beside them, 8 EGW00201 within 2 s at 16 processes)."""
    import threading

    import redis

    from kis_safe_token.testing.redis_server import RedisServer

    with RedisServer() as server:  # its own: FLUSHALL must not touch other tests' keys
        spec = {"kind": "redis", "url": server.url, "key_prefix": "lost"}
        outcome: list[tuple[float, list[dict[str, Any]], list[str]]] = []
        herd = threading.Thread(
            target=lambda: outcome.append(
                run_call_herd(PROCESSES, CALLS, spec, metered_sim.base_url, client_kwargs=HERD_RATE)
            )
        )
        herd.start()
        try:
            assert metered_sim.wait_for(lambda s: s.counts["uapi_calls"] >= 60, timeout=60)
            client = redis.Redis.from_url(server.url)
            assert client.keys("lost:*:rate")  # the limiter's state is there ...
            client.flushall()  # ... and is gone
            client.close()
        finally:
            herd.join(120)
    _, reports, errors = outcome[0]
    assert errors == []
    assert [r["answered"] for r in reports] == [CALLS] * PROCESSES
    assert metered_sim.too_many_calls == 0
    assert metered_sim.peak_calls_per_second[HERD_APP_KEY] <= REAL_CALLS_PER_SECOND
