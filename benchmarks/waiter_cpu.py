"""Where a woken waiter's CPU goes: a cold herd, each waiter profiled from the release on.

    python benchmarks/waiter_cpu.py            # N=32 on the file and the Redis backend
    python benchmarks/waiter_cpu.py --n 64

The herd of ``benchmarks/peers.py`` (spawned processes released at once on an empty store, the
simulator's ``tokenP`` taking 0.1 s), with ``cProfile`` on in every waiter from the release to
holding the token. Prints the median CPU per waiter (user + system, without the profiler: a
second herd), how many lock attempts and waits a waiter made, and the functions that took the
most time over all waiters. Results: ``benchmarks/results/waiter_cpu.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import multiprocessing as mp
import pstats
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from peers import KEY, SECRET, _cpu  # noqa: E402

from kis_safe_token.testing import KisSimulator  # noqa: E402
from kis_safe_token.testing.redis_server import RedisServer  # noqa: E402


def _waiter(backend: str, where: str, base_url: str, profile: bool, barrier: Any, out: Any) -> None:
    from kis_safe_token import FileTokenStorage, LockedRedisTokenStorage, SharedToken
    from kis_safe_token.flight import drivers
    from kis_safe_token.flight.engine import ATTEMPT

    storage: Any = (
        FileTokenStorage(where)
        if backend == "file"
        else LockedRedisTokenStorage(where.split("|")[0], key_prefix=where.split("|")[1])
    )
    storage.load_token(KEY, SECRET)  # connected, key derived: a worker that is up
    steps = {"attempts": 0, "waits": 0, "issued": 0}
    io_call = drivers.io_call

    def counting(flight: Any, step: Any) -> Any:
        if step is ATTEMPT:
            steps["attempts"] += 1
        return io_call(flight, step)

    drivers.io_call = counting
    lock_class: Any = type(storage.issuance_lock(KEY, SECRET))
    lock_wait = lock_class.wait

    def wait(self: Any, busy: Any, timeout_s: float) -> Any:
        steps["waits"] += 1
        return lock_wait(self, busy, timeout_s)

    lock_class.wait = wait
    lock_issuing = lock_class.issuing

    def issuing(self: Any) -> None:
        steps["issued"] = 1
        lock_issuing(self)

    lock_class.issuing = issuing
    profiler = cProfile.Profile() if profile else None
    barrier.wait(120)
    cpu = _cpu()
    if profiler is not None:
        profiler.enable()
    SharedToken(KEY, SECRET, storage, base_url=base_url).token  # noqa: B018
    if profiler is not None:
        profiler.disable()
    spent = _cpu() - cpu
    stats = ""
    if profiler is not None:
        buffer = io.StringIO()
        pstats.Stats(profiler, stream=buffer).sort_stats("tottime").print_stats(14)
        stats = buffer.getvalue()
    out.put((spent, steps, stats))


def herd(backend: str, n: int, redis_url: str, folder: Path, profile: bool) -> list[Any]:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(n + 1), ctx.Queue()
    name = f"waiters:{uuid.uuid4().hex[:8]}"
    where = str(folder / f"{name}.json") if backend == "file" else f"{redis_url}|{name}"
    with KisSimulator(issue_latency_s=0.1) as sim:
        args = (backend, where, sim.base_url, profile, barrier, out)
        procs = [ctx.Process(target=_waiter, args=args) for _ in range(n)]
        for p in procs:
            p.start()
        barrier.wait(120)
        rows = [out.get(timeout=180) for _ in range(n)]
        for p in procs:
            p.join(30)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=32)
    cli = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="kis-waiters-"))
    results: dict[str, Any] = {"measured": time.strftime("%Y-%m-%d"), "n": cli.n}
    with RedisServer() as server:
        for backend in ("file", "redis"):
            plain = herd(backend, cli.n, server.url, folder, profile=False)
            profiled = herd(backend, cli.n, server.url, folder, profile=True)
            cpu_ms = statistics.median(r[0] for r in plain) * 1000
            attempts = statistics.median(r[1]["attempts"] for r in plain)
            waits = statistics.median(r[1]["waits"] for r in plain)
            results[backend] = {"cpu_ms": cpu_ms, "attempts": attempts, "waits": waits}
            print(f"== {backend}, N={cli.n}: CPU/waiter {cpu_ms:.2f} ms (median), ")
            print(f"   lock attempts {attempts:.0f}, waits {waits:.0f} per waiter (median)")
            waiters = sorted((r for r in profiled if not r[1]["issued"]), key=lambda r: r[0])
            median = waiters[len(waiters) // 2]
            print(f"   the median waiter's profile ({median[0] * 1000:.2f} ms CPU, tottime):")
            print("\n".join("   " + line for line in median[2].splitlines()[:24]))
    (HERE / "results" / "waiter_cpu.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
