"""kis_safe_token against the locks and limiters people build the same thing with, in one run.

    python benchmarks/peers.py                 # herds of 8, 32, 64; 3 rounds each
    python benchmarks/peers.py --quick         # herds of 8 and 32; 2 rounds

**Cold herd.** N spawned processes released at once on an empty store, against the simulator
(``tokenP`` takes 0.1 s). Each peer does what a careful user writes with it: read the cached
token; else take the lock, read again, ask ``tokenP`` only if still missing, save, release.

- file: ours (``FileTokenStorage``) against ``filelock`` (a JSON file under a ``FileLock``,
  polling every 50 ms, its default);
- Redis: ours (``LockedRedisTokenStorage``) against redis-py's ``Lock`` (polls every 0.1 s, its
  default) and python-redis-lock (``BLPOP`` on a signal list: woken, not polling).

Every process connects to its store before the release (a worker that is up has its
connection). "wall" is the release -> the last process holding the token; "CPU/waiter" the
median CPU time (user + system) a process spent from the release to holding the token.

**Rate limiter on Redis.** One reservation, one round trip: ours (``try_acquire``) against the
same Lua script sent raw (``EVALSHA`` with the arguments ready), ``limits``' moving window
(``hit``) and pyrate-limiter's Redis bucket (``try_acquire``), with ``PING`` as the floor.
Interleaved rounds, medians. Results: ``benchmarks/results/peers.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

from kis_safe_token.testing import KisSimulator  # noqa: E402
from kis_safe_token.testing.redis_server import RedisServer  # noqa: E402

KEY, SECRET = "PSbenchPeers00000000000000000000000", "peer-secret-" + "p" * 40
TOKEN_PATH = "/oauth2/tokenP"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _issue(base_url: str, session: Any) -> dict[str, Any]:
    body = {"grant_type": "client_credentials", "appkey": KEY, "appsecret": SECRET}
    answer = session.post(base_url + TOKEN_PATH, json=body, timeout=10).json()
    return {"access_token": answer["access_token"], "expires_at": time.time() + 80000}


def _valid(raw: Any) -> bool:
    return raw is not None and json.loads(raw)["expires_at"] > time.time() + 300


def _worker(kind: str, where: str, base_url: str, barrier: Any, out: Any) -> None:
    """One process of a herd: get ready, wait for the release, get the token."""
    import requests

    session = requests.Session()
    if kind == "ours-file" or kind == "ours-redis":
        from kis_safe_token import FileTokenStorage, LockedRedisTokenStorage, SharedToken

        storage = (
            FileTokenStorage(where)
            if kind == "ours-file"
            else LockedRedisTokenStorage(where.split("|")[0], key_prefix=where.split("|")[1])
        )
        storage.load_token(KEY, SECRET)  # connected, key derived: a worker that is up

        def get() -> None:
            SharedToken(KEY, SECRET, storage, base_url=base_url).token  # noqa: B018
    elif kind == "filelock":
        import filelock

        path = Path(where)
        lock = filelock.FileLock(str(path) + ".lock")

        def read() -> Any:
            return path.read_bytes() if path.exists() else None

        def get() -> None:
            if _valid(read()):
                return
            with lock:
                if not _valid(read()):
                    path.write_text(json.dumps(_issue(base_url, session)))
    else:
        import redis

        url, name = where.split("|")
        client = redis.Redis.from_url(url)
        client.ping()
        if kind == "redis-py-lock":
            lock: Any = client.lock(name + ":lock", timeout=30, blocking_timeout=120)
        else:
            import redis_lock

            lock = redis_lock.Lock(client, name, expire=30)

        def get() -> None:
            if _valid(client.get(name)):
                return
            with lock:
                if not _valid(client.get(name)):
                    client.set(name, json.dumps(_issue(base_url, session)))

    barrier.wait(120)
    cpu = _cpu()
    get()
    out.put((time.time(), _cpu() - cpu))


def herd(kind: str, n: int, redis_url: str, folder: Path) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(n + 1), ctx.Queue()
    name = f"peers:{uuid.uuid4().hex[:8]}"
    where = str(folder / f"{name}.json") if "file" in kind else f"{redis_url}|{name}"
    with KisSimulator(issue_latency_s=0.1) as sim:
        procs = [
            ctx.Process(target=_worker, args=(kind, where, sim.base_url, barrier, out))
            for _ in range(n)
        ]
        for p in procs:
            p.start()
        barrier.wait(120)
        released = time.time()
        rows = [out.get(timeout=180) for _ in range(n)]
        for p in procs:
            p.join(30)
        issued = sim.issued
    return {
        "wall_ms": (max(r[0] for r in rows) - released) * 1000,
        "cpu_ms": statistics.median(r[1] for r in rows) * 1000,
        "issued": issued,
    }


def limiter_rows(redis_url: str, rounds: int) -> dict[str, float]:
    import redis
    from limits import RateLimitItemPerSecond
    from limits.storage import RedisStorage
    from limits.strategies import MovingWindowRateLimiter
    from pyrate_limiter import Duration, Limiter, Rate, RedisBucket

    from kis_safe_token import LockedRedisTokenStorage
    from kis_safe_token.ratelimit.redis import RESERVE_LUA

    storage = LockedRedisTokenStorage(redis_url, key_prefix=f"peers:{uuid.uuid4().hex[:8]}")
    ours = storage.rate_limiter(KEY, calls_per_second=10000, api_secret=SECRET)
    client = storage.redis_client
    sha = client.script_load(RESERVE_LUA)
    keys, args = ours.reserve_call(0.0)
    moving = MovingWindowRateLimiter(RedisStorage(redis_url))
    item = RateLimitItemPerSecond(10000)
    bucket_client = redis.Redis.from_url(redis_url)
    pyrate = Limiter(
        RedisBucket.init([Rate(10000, Duration.SECOND)], bucket_client, "peers-bucket"),
    )
    calls = {
        "PING": client.ping,
        "raw script": lambda: client.evalsha(sha, 2, *keys, *args),
        "ours try_acquire": lambda: ours.try_acquire(0.0),
        "limits moving-window hit": lambda: moving.hit(item, "peers"),
        "pyrate-limiter try_acquire": lambda: pyrate.try_acquire("peers"),
    }
    samples: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            started = time.perf_counter()
            for _ in range(300):
                call()
            samples[name].append((time.perf_counter() - started) / 300 * 1e6)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    cli = parser.parse_args()
    sizes, repeats = ([8, 32], 2) if cli.quick else ([8, 32, 64], 3)
    folder = Path(tempfile.mkdtemp(prefix="kis-peers-"))
    groups = {
        "file": ["ours-file", "filelock"],
        "redis": ["ours-redis", "python-redis-lock", "redis-py-lock"],
    }
    results: dict[str, Any] = {"herds": {}, "limiter_us": {}}
    with RedisServer() as server:
        for kinds in groups.values():
            for n in sizes:
                runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
                for _ in range(repeats):  # interleaved: a noisy moment hits every peer
                    for kind in kinds:
                        runs[kind].append(herd(kind, n, server.url, folder))
                for kind in kinds:
                    results["herds"][f"{kind} N={n}"] = {
                        "wall_ms": statistics.median(r["wall_ms"] for r in runs[kind]),
                        "cpu_ms": statistics.median(r["cpu_ms"] for r in runs[kind]),
                        "issued": max(r["issued"] for r in runs[kind]),
                    }
        results["limiter_us"] = limiter_rows(server.url, 7 if cli.quick else 15)

    print(f"{'cold herd':32} {'wall ms':>9} {'CPU/waiter ms':>14} {'issued':>7} {'ours/peer':>10}")
    for kinds in groups.values():
        for n in sizes:
            ours = results["herds"][f"{kinds[0]} N={n}"]
            for kind in kinds:
                row = results["herds"][f"{kind} N={n}"]
                ratio = "" if kind == kinds[0] else f"{ours['wall_ms'] / row['wall_ms']:9.2f}x"
                print(
                    f"{kind + ' N=' + str(n):32} {row['wall_ms']:9.1f} {row['cpu_ms']:14.2f} "
                    f"{row['issued']:7d} {ratio:>10}"
                )
    raw = results["limiter_us"]["raw script"]
    print(f"\n{'Redis limiter, one reservation':32} {'us':>9} {'/raw script':>12}")
    for name, us in results["limiter_us"].items():
        print(f"{name:32} {us:9.1f} {us / raw:11.2f}x")
    target = HERE / "results" / ("peers-quick.json" if cli.quick else "peers.json")
    target.write_text(json.dumps(results, indent=2))
    print(f"saved {target.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT)]
    main()
