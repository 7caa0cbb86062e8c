"""Measure the asyncio client against the sync one, in one run (standalone):

    python benchmarks/async_client.py            # herds of 4 and 8 processes x 50 tasks
    python benchmarks/async_client.py --quick    # herds of 4 x 50 only

Rows: the warm token per request (sync ``SharedToken.bearer`` vs ``await
AsyncSharedToken.bearer()``), a warm price call per request against the simulator (sync vs
async, one at a time and 50 at once), the costs that decide what runs on the event loop (a
sealed file read and write), the file-lock wait on the loop vs in a thread, and the herds of
async processes (issuances, EGW00133, errors, wall time).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests")]  # the herds are the test suite's (spawned: inherited)

from async_herd import run_mixed_herd  # noqa: E402
from herd import HERD_APP_KEY, HERD_SECRET, SYMBOL  # noqa: E402

from kis_safe_token import (  # noqa: E402
    AsyncKoreaInvestment,
    FileTokenStorage,
    KoreaInvestment,
    SharedToken,
)
from kis_safe_token.flight.aio import AsyncStore  # noqa: E402
from kis_safe_token.testing import KisSimulator  # noqa: E402
from kis_safe_token.testing.redis_server import RedisServer  # noqa: E402
from kis_safe_token.token import Token  # noqa: E402


def us_per_call(fn: Callable[[], Any], number: int) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best * 1e6


async def aus_per_call(fn: Callable[[], Awaitable[Any]], number: int) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(number):
            await fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best * 1e6


#: The call-rate limit of the clients measured here: the limiter stays in every call's path (its
#: cost is part of a request's), but at KIS's 18/s these rows would time the queue, not the call.
UNTHROTTLED = 10_000.0


def warm_rows(sim: KisSimulator, folder: Path) -> list[tuple[str, str, str]]:
    storage = FileTokenStorage(folder / "warm.json")
    shared = SharedToken(
        HERD_APP_KEY, HERD_SECRET, storage, base_url=sim.base_url, calls_per_second=UNTHROTTLED
    )
    sync_kis = KoreaInvestment.from_shared(shared)
    shared.token  # noqa: B018 - warm
    sync_bearer = us_per_call(lambda: shared.bearer, 200_000)
    sync_price = us_per_call(lambda: sync_kis.fetch_price(SYMBOL), 300)

    async def measure() -> tuple[float, float, float]:
        async with AsyncKoreaInvestment(
            HERD_APP_KEY,
            HERD_SECRET,
            token_storage=storage,
            base_url=sim.base_url,
            calls_per_second=UNTHROTTLED,
        ) as kis:
            bearer = await aus_per_call(kis.shared_token.bearer, 200_000)
            price = await aus_per_call(lambda: kis.fetch_price(SYMBOL), 300)
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                await asyncio.gather(*(kis.fetch_price(SYMBOL) for _ in range(50)))
                best = min(best, (time.perf_counter() - start) / 50)
            return bearer, price, best * 1e6

    async_bearer, async_price, async_50 = asyncio.run(measure())
    shared.close()
    return [
        ("warm token per request (us)", f"{sync_bearer:.2f}", f"{async_bearer:.2f}"),
        ("warm price call, one at a time (us)", f"{sync_price:.0f}", f"{async_price:.0f}"),
        ("warm price call, 50 at once (us/call)", "-", f"{async_50:.0f}"),
    ]


def inline_rows(folder: Path) -> list[tuple[str, str, str]]:
    """The sealed-record costs that run on the loop for the file backend."""
    storage = FileTokenStorage(folder / "inline.json")
    token = Token("t" * 300, time.time() + 86_400)
    storage.write_token(HERD_APP_KEY, HERD_SECRET, token)
    read = us_per_call(lambda: storage.read_token(HERD_APP_KEY, HERD_SECRET, fresh=True), 2000)
    warm = us_per_call(lambda: storage.read_token(HERD_APP_KEY, HERD_SECRET), 20_000)
    write = us_per_call(lambda: storage.write_token(HERD_APP_KEY, HERD_SECRET, token), 200)
    return [
        ("file: read, unchanged file (us, on loop)", "-", f"{warm:.1f}"),
        ("file: read + Fernet open (us, on loop)", "-", f"{read:.0f}"),
        ("file: holder's save, fsync (us, on loop)", "-", f"{write:.0f}"),
    ]


def one_file_wait(how: str, path: Path) -> tuple[float, float]:
    """One waiter (``how``: ``"loop"`` or ``"thread"``) while a thread holds the file lock and
    issues: seconds from the holder's save to the waiter holding, and the loop's worst lag."""
    holder, waiter = FileTokenStorage(path), FileTokenStorage(path)
    entered, go = threading.Event(), threading.Event()
    saved: list[float] = []

    def issue() -> Token:
        entered.set()
        go.wait(10)
        return Token(uuid.uuid4().hex * 4, time.time() + 86_400)

    def hold() -> None:
        holder.get_or_issue(HERD_APP_KEY, HERD_SECRET, issue)
        saved.append(time.perf_counter())

    async def never() -> Token:
        raise AssertionError("the waiter must not issue")

    async def wait() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        lags: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            while not done.is_set():
                start = loop.time()
                await asyncio.sleep(0.002)
                lags.append(loop.time() - start - 0.002)

        ticking = asyncio.create_task(ticker())
        if how == "loop":
            call = asyncio.create_task(
                AsyncStore(waiter).get_or_issue(HERD_APP_KEY, HERD_SECRET, never)
            )
        else:
            call = asyncio.create_task(
                asyncio.to_thread(waiter.get_or_issue, HERD_APP_KEY, HERD_SECRET, Token)
            )
        await asyncio.sleep(0.2)
        go.set()
        await call
        got = time.perf_counter()
        done.set()
        await ticking
        return got, max(lags)

    th = threading.Thread(target=hold)
    th.start()
    entered.wait(10)
    got, lag = asyncio.run(wait())
    th.join()
    return got - saved[0], lag


def file_wait_rows(folder: Path, repeats: int) -> list[tuple[str, str, str]]:
    """The file lock's wait: looks on the loop with ``asyncio.sleep`` vs the sync wait in
    ``asyncio.to_thread``."""
    runs = {
        how: [one_file_wait(how, folder / f"wait-{how}-{i}.json") for i in range(repeats)]
        for how in ("loop", "thread")
    }
    latency = {how: statistics.median(r[0] for r in v) * 1000 for how, v in runs.items()}
    lag = {how: max(r[1] for r in v) * 1000 for how, v in runs.items()}
    return [
        (
            "file wait: save -> waiter holding (ms, median)",
            f"to_thread {latency['thread']:.1f}",
            f"on loop {latency['loop']:.1f}",
        ),
        (
            "file wait: max loop lag (ms)",
            f"to_thread {lag['thread']:.1f}",
            f"on loop {lag['loop']:.1f}",
        ),
    ]


def herd_rows(
    redis_url: str, folder: Path, sizes: list[int], tasks: int
) -> list[tuple[str, str, str]]:
    rows = []
    for backend in ("file", "redis"):
        for n in sizes:
            spec = (
                {"kind": "file", "path": str(folder / f"herd-{n}.json")}
                if backend == "file"
                else {"kind": "redis", "url": redis_url, "key_prefix": f"b:{uuid.uuid4().hex[:8]}"}
            )
            with KisSimulator(issue_latency_s=0.05) as sim:
                herd = run_mixed_herd(
                    ["async"] * n, spec, sim.base_url, tasks=tasks, calls_per_second=UNTHROTTLED
                )
                rows.append(
                    (
                        f"async herd {backend} {n} proc x {tasks} tasks",
                        f"issued {sim.issued}, EGW00133 {sim.rate_limited}, "
                        f"errors {len(herd.errors)}, tokens {len(herd.tokens)}",
                        f"{herd.calls} calls, wall {herd.wall_s:.2f} s",
                    )
                )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="herds of 4 processes only")
    args = parser.parse_args()
    sizes = [4] if args.quick else [4, 8]
    rows: list[tuple[str, str, str]] = [("what", "sync", "async")]
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as server:
        folder = Path(tmp)
        with KisSimulator(issue_latency_s=0.05) as sim:
            rows += warm_rows(sim, folder)
            rows += inline_rows(folder)
            rows += file_wait_rows(folder, repeats=5 if args.quick else 15)
        rows += herd_rows(server.url, folder, sizes, tasks=50)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
