"""Measure the fleet-wide rate limiter against the simulator metering KIS's 20 calls/s.

    python benchmarks/ratelimit.py --quick   # 3 s per fleet (about a minute)
    python benchmarks/ratelimit.py           # 8 s per fleet

1. Throughput of fleets of 8 and 32 processes sharing one app key through the file and the Redis
   limiter (default rate: KIS's 20 calls/s): calls answered per second as a share of the
   configured rate and of KIS's 20/s, EGW00201 answers, the most calls that arrived at the
   simulator in any one-second window (sliding, as KIS counts: it must stay <= 20), and the
   spread of per-process calls (fairness).
2. Overhead of one ``try_acquire`` uncontended: file (microseconds), Redis (microseconds and
   Redis commands per call, from ``INFO commandstats``).
3. The same 8-process fleet with the per-process limiters upstream clients ship
   (korea-investment-stock's ``RateLimiter(15)``, kis-trader's ``SlidingWindowRateLimiter``
   at its default 15/s): their EGW00201 count.

Processes are forked after the imports (one import, N cheap children). Every call is a raw HTTP
GET with the token headers, so the limiter is the only difference between the fleets (the
client's own EGW00201 retries would blur the count). Saves JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from kis_safe_token import FileTokenStorage, LockedRedisTokenStorage, SharedToken
from kis_safe_token.kis import PRICE_PATH, PRICE_TR_ID, TOO_MANY_CALLS
from kis_safe_token.ratelimit import default_calls_per_second
from kis_safe_token.storage.base import TokenStorage
from kis_safe_token.testing import KisSimulator
from kis_safe_token.testing.redis_server import RedisServer
from kis_safe_token.testing.simulator import REAL_CALLS_PER_SECOND

HERE = Path(__file__).resolve().parent
APP_KEY = "PSbenchAppKey000000000000000000000"
SECRET = "bench-secret-" + "b" * 40
RATE = default_calls_per_second(mock=False)


def _storage(spec: dict[str, str]) -> TokenStorage:
    if spec["kind"] == "file":
        return FileTokenStorage(spec["path"])
    return LockedRedisTokenStorage(spec["url"], key_prefix=spec["prefix"])


def _upstream_wait(kind: str) -> Callable[[], None]:
    """The per-process limiter an upstream client ships, as it ships it."""
    if kind == "korea-investment-stock":
        from korea_investment_stock.rate_limit.rate_limiter import RateLimiter

        return RateLimiter(calls_per_second=15.0).wait
    from kis_trader._internal._ratelimit import SlidingWindowRateLimiter

    return SlidingWindowRateLimiter.from_rate(15.0).acquire


def _worker(
    spec: dict[str, str], base_url: str, limiter: str, end_in_s: float, barrier: Any, out: Any
) -> None:
    try:
        calls_per_second = None if limiter == "ours" else 0
        shared = SharedToken(
            APP_KEY, SECRET, _storage(spec), base_url=base_url, calls_per_second=calls_per_second
        )
        wait = shared.throttle if limiter == "ours" else _upstream_wait(limiter)
        headers = {"authorization": shared.bearer, "appkey": APP_KEY, "appsecret": SECRET}
        headers["tr_id"] = PRICE_TR_ID
        params = {"FID_COND_MRKT_DIV_CODE": "J", "FID_INPUT_ISCD": "005930"}
        session = requests.Session()
        barrier.wait(60)
        end = time.time() + end_in_s
        answered = refused = 0
        while True:
            wait()
            if time.time() >= end:
                break
            resp = session.get(f"{base_url}{PRICE_PATH}", headers=headers, params=params)
            if resp.status_code == 200:
                answered += 1
            elif resp.json().get("msg_cd") == TOO_MANY_CALLS:
                refused += 1
        out.put({"answered": answered, "refused": refused})
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        out.put({"error": f"{type(exc).__name__}: {exc}"})


def fleet(
    n: int, spec: dict[str, str], sim: KisSimulator, limiter: str, seconds: float
) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(n + 1), ctx.Queue()
    # The token first, so the fleet measures calls, not the (single-flight) issuance.
    SharedToken(APP_KEY, SECRET, _storage(spec), base_url=sim.base_url).token  # noqa: B018
    procs = [
        ctx.Process(target=_worker, args=(spec, sim.base_url, limiter, seconds, barrier, out))
        for _ in range(n)
    ]
    for proc in procs:
        proc.start()
    before = sim.too_many_calls
    sim.peak_calls_per_second.clear()  # the simulator's sliding one-second window, this fleet's
    barrier.wait(120)
    reports = [out.get(timeout=seconds + 120) for _ in procs]
    for proc in procs:
        proc.join(30)
    errors = [r["error"] for r in reports if "error" in r]
    if errors:
        raise RuntimeError(f"{len(errors)} processes failed, first: {errors[0]}")
    answered = [r["answered"] for r in reports]
    per_s = sum(answered) / seconds
    return {
        "processes": n,
        "backend": spec["kind"],
        "limiter": limiter,
        "calls_per_s": round(per_s, 2),
        "of_rate_pct": round(100 * per_s / RATE, 1),
        "of_kis_pct": round(100 * per_s / REAL_CALLS_PER_SECOND, 1),
        "egw00201": sim.too_many_calls - before,
        "max_in_any_1s": sim.peak_calls_per_second[APP_KEY],
        "per_process_min_max": (min(answered), max(answered)),
    }


def overhead(spec: dict[str, str], redis: Any | None, repeats: int) -> dict[str, Any]:
    """Microseconds per uncontended ``try_acquire`` (median of 5 batches), and for Redis the
    commands the server ran per call."""
    storage = _storage(spec)
    limiter = storage.rate_limiter(f"PSoverhead{uuid.uuid4().hex[:12]}", 10_000.0)
    limiter.try_acquire(0)
    stats_before = _evalsha_calls(redis) if redis else 0
    batches = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(repeats):
            limiter.try_acquire(0)
        batches.append((time.perf_counter() - started) / repeats * 1e6)
    row: dict[str, Any] = {
        "backend": spec["kind"],
        "us_per_call": round(statistics.median(batches), 1),
    }
    if redis is not None:
        # Round trips: the client sends nothing but EVALSHA (TIME, GET, SET run inside it).
        row["round_trips_per_call"] = round(
            (_evalsha_calls(redis) - stats_before) / (5 * repeats), 2
        )
    return row


def _evalsha_calls(redis: Any) -> int:
    stats = redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 s per fleet instead of 8 s")
    args = parser.parse_args()
    seconds = 3.0 if args.quick else 8.0
    rows: list[dict[str, Any]] = []
    folder = Path(tempfile.mkdtemp(prefix="kis-ratelimit-bench-"))
    with (
        RedisServer() as server,
        KisSimulator(
            issue_latency_s=0, issue_window_s=0, calls_per_second=REAL_CALLS_PER_SECOND
        ) as sim,
    ):
        specs = {
            "file": {"kind": "file", "path": str(folder / "tokens.json")},
            "redis": {"kind": "redis", "url": server.url, "prefix": "bench:token"},
        }
        for kind in ("file", "redis"):
            for n in (8, 32):
                rows.append(fleet(n, specs[kind], sim, "ours", seconds))
                print(_line(rows[-1]), flush=True)
        for upstream in ("korea-investment-stock", "kis-trader"):
            rows.append(fleet(8, specs["file"], sim, upstream, seconds))
            print(_line(rows[-1]), flush=True)
        import redis as redis_py

        client = redis_py.from_url(server.url)
        cost = [
            overhead(specs["file"], None, 2_000 if args.quick else 20_000),
            overhead(specs["redis"], client, 500 if args.quick else 2_000),
        ]
    for row in cost:
        extra = (
            f", {row['round_trips_per_call']} round trips (EVALSHA) per call"
            if "round_trips_per_call" in row
            else ""
        )
        print(f"overhead  {row['backend']:<6} {row['us_per_call']:>7.1f} us per try_acquire{extra}")
    name = "ratelimit-quick.json" if args.quick else "ratelimit.json"
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / name).write_text(
        json.dumps({"seconds": seconds, "rate": RATE, "fleets": rows, "overhead": cost}, indent=2)
    )
    print(f"saved benchmarks/results/{name}", file=sys.stderr)


def _line(row: dict[str, Any]) -> str:
    low, high = row["per_process_min_max"]
    return (
        f"{row['limiter']:<23} {row['backend']:<6} {row['processes']:>3} procs  "
        f"{row['calls_per_s']:>6.2f} calls/s = {row['of_rate_pct']:>5.1f} % of {RATE:g}/s "
        f"({row['of_kis_pct']:>5.1f} % of KIS 20/s)  max in any 1 s {row['max_in_any_1s']:>3}  "
        f"EGW00201 {row['egw00201']:>4}  "
        f"per process {low}-{high}"
    )


if __name__ == "__main__":
    main()
