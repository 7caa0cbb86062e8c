"""``kis-token demo``: N processes start at once against the offline simulator, share one token."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from unittest import mock

from .client import BASE_URL_ENV, KoreaInvestment
from .kis import ISSUE_WINDOW_ENV
from .storage.factory import FILE_ENV, REDIS_URL_ENV, STORAGE_ENV
from .testing import KisSimulator

DEMO_APP_KEY = "PSdemoAppKey0000000000000000000000"
DEMO_SECRET = "demo-secret-" + "x" * 40
DEMO_ACCOUNT = "50000000-01"
SYMBOL = "005930"


def _worker(index: int, barrier: Any, results: Any) -> None:
    try:
        results.put(("ready", index, None))
        barrier.wait(60)
        started = time.perf_counter()
        with KoreaInvestment(DEMO_APP_KEY, DEMO_SECRET, DEMO_ACCOUNT) as client:
            quote = client.fetch_price(SYMBOL)
            token_id = hashlib.sha256(client.access_token.encode()).hexdigest()[:8]
        elapsed_ms = (time.perf_counter() - started) * 1000
        results.put(
            ("done", index, (os.getpid(), elapsed_ms, token_id, quote["output"]["stck_prpr"]))
        )
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the demo
        results.put(("error", index, f"{type(exc).__name__}: {exc}"))


def _progress(label: str, done: int, total: int) -> None:
    width = 24
    filled = width * done // max(total, 1)
    line = f"{label:<18} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
    if sys.stdout.isatty():
        print("\r" + line, end="" if done < total else "\n", flush=True)
    elif done == total:
        print(line, flush=True)


def run_demo(workers: int, storage: str, issue_window_s: float = 60.0) -> int:
    """Run the demo; 0 if exactly one token was issued and every worker got a price.
    ``issue_window_s``: the simulator's one-issue window, which the workers sit out too."""
    with ExitStack() as stack:
        sim = stack.enter_context(KisSimulator(issue_latency_s=0.2, issue_window_s=issue_window_s))
        window = f"{issue_window_s:g}"
        env = {BASE_URL_ENV: sim.base_url, STORAGE_ENV: storage, ISSUE_WINDOW_ENV: window}
        if storage == "file":
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="kis-demo-"))
            env[FILE_ENV] = where = str(Path(folder) / "cache" / "tokens.json")
        else:
            from .testing.redis_server import RedisServer

            env[REDIS_URL_ENV] = where = stack.enter_context(RedisServer()).url
        stack.enter_context(mock.patch.dict(os.environ, env))  # the spawned workers read it

        print(f"KIS simulator: {sim.base_url}   storage: {storage} ({where})")
        print(f"starting {workers} processes that each build a KoreaInvestment and fetch {SYMBOL}")
        ctx = mp.get_context("spawn")
        barrier = ctx.Barrier(workers)
        results = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(i, barrier, results)) for i in range(workers)]
        wall = time.perf_counter()
        for p in procs:
            p.start()
        ready = done = 0
        rows: dict[int, tuple[int, float, str, str]] = {}
        errors: list[str] = []
        _progress("workers ready", 0, workers)
        while done < workers:
            kind, index, payload = results.get(timeout=120)
            if kind == "ready":
                ready += 1
                _progress("workers ready", ready, workers)
                if ready == workers:
                    _progress("workers with token", 0, workers)
                continue
            done += 1
            if kind == "done":
                rows[index] = payload
            else:
                errors.append(f"worker {index}: {payload}")
            _progress("workers with token", done, workers)
        for p in procs:
            p.join(30)
        wall_ms = (time.perf_counter() - wall) * 1000

    print("(token id: the first 8 hex digits of the token's SHA-256, not the token)")
    print(f"{'worker':>6}  {'pid':>7}  {'latency ms':>10}  {'token id':<10}  price")
    for index, (pid, ms, token_id, price) in sorted(rows.items()):
        print(f"{index:>6}  {pid:>7}  {ms:>10.1f}  {token_id:<10}  {price}")
    for line in errors:
        print(line)
    distinct = len({row[2] for row in rows.values()})
    print(
        f"\ntokens issued by KIS: {sim.issued}   EGW00133 refusals: {sim.rate_limited}   "
        f"distinct tokens held: {distinct}   wall time: {wall_ms:.0f} ms"
    )
    ok = sim.issued == 1 and sim.rate_limited == 0 and distinct == 1 and not errors
    print("OK: one issuance shared by every worker" if ok else "FAILED: see above")
    return 0 if ok else 1
