"""Measure kis_safe_token against a faithful re-implementation of the seed design, in one run.

    python benchmarks/run.py --quick     # herds of 8 and 32, fewer repeats (under a minute)
    python benchmarks/run.py             # herds of 8, 32 and 64

Prints a table with ratios seed/ours and saves it as JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import timeit
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# seed_baseline sits beside this file; the process herd is the test suite's (tests/herd.py).
# Spawned herd processes inherit sys.path, so they find both too.
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from herd import HERD_APP_KEY, HERD_SECRET, run_herd  # noqa: E402
from seed_baseline import (  # noqa: E402
    SeedFileTokenStorage,
    SeedRedisTokenStorage,
    run_seed_herd,
)

from kis_safe_token import FileTokenStorage, KoreaInvestment, LockedRedisTokenStorage  # noqa: E402
from kis_safe_token.testing import KisSimulator  # noqa: E402
from kis_safe_token.testing.redis_server import RedisServer  # noqa: E402
from kis_safe_token.token import Token  # noqa: E402


def herd_rows(sizes: list[int], redis_url: str, folder: Path) -> list[dict[str, Any]]:
    rows = []
    for backend in ("file", "redis"):
        for n in sizes:
            prefix = f"bench:{uuid.uuid4().hex[:8]}:token"
            ours_spec = (
                {"kind": "file", "path": str(folder / f"ours-{n}.json")}
                if backend == "file"
                else {"kind": "redis", "url": redis_url, "key_prefix": prefix}
            )
            seed_spec = (
                {"kind": "file", "path": str(folder / f"seed-{n}.pkl")}
                if backend == "file"
                else {"kind": "redis", "url": redis_url, "key_prefix": prefix + ":seed"}
            )
            with KisSimulator(issue_latency_s=0.05) as sim:
                herd = run_herd(n, ours_spec, sim.base_url, timeout_s=240, fetch=False)
                ours = {
                    "issued": sim.issued,
                    "egw00133": sim.rate_limited,
                    "errors": len(herd.errors),
                    "distinct_tokens": len(herd.tokens()),
                    "herd_wall_ms": (herd.herd_wall_s() or 0) * 1000,
                    "save_to_last_holder_ms": (herd.save_to_last_holder_s() or 0) * 1000,
                }
            with KisSimulator(issue_latency_s=0.05) as sim:
                seed = run_seed_herd(n, seed_spec, sim.base_url, HERD_APP_KEY, HERD_SECRET)
                seed.update(
                    issued=sim.issued,
                    egw00133=sim.rate_limited,
                    herd_wall_ms=seed.pop("herd_wall_s") * 1000,
                )
            rows.append({"backend": backend, "processes": n, "ours": ours, "seed": seed})
            print(
                f"  herd {backend:5} N={n:<3} ours: {ours['issued']} issued, "
                f"{ours['egw00133']} EGW00133, save->last holder "
                f"{ours['save_to_last_holder_ms']:.1f} ms, wall {ours['herd_wall_ms']:.0f} ms | "
                f"seed: {seed['issued']} issued, {seed['egw00133']} EGW00133, "
                f"{seed['errors']} crashed",
                flush=True,
            )
    return rows


def per_call_us(fn: Any, repeat: int, number: int) -> float:
    return min(timeit.repeat(fn, repeat=repeat, number=number)) / number * 1e6


class CountingProxy:
    def __init__(self, client: Any) -> None:
        self.client, self.count = client, 0
        real = client.execute_command

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return real(*args, **kwargs)

        client.execute_command = counting


def warm_rows(redis_url: str, folder: Path, number: int) -> list[dict[str, Any]]:
    key, secret = HERD_APP_KEY, HERD_SECRET
    token = Token("eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9." + "w" * 300, time.time() + 86_400)
    data = token.to_token_data(key, secret)
    rows = []

    ours_r = LockedRedisTokenStorage(redis_url, key_prefix=f"warm:{uuid.uuid4().hex[:8]}")
    seed_r = SeedRedisTokenStorage(redis_url, key_prefix=f"warm:{uuid.uuid4().hex[:8]}")
    ours_r.save_token(data)
    seed_r.save_token(data)
    c_ours, c_seed = CountingProxy(ours_r.redis_client), CountingProxy(seed_r.redis_client)
    ours_us = per_call_us(lambda: ours_r.load_token(key, secret), 5, number)
    ours_cmds = c_ours.count / (5 * number)

    def seed_start() -> None:  # what the seed client does at start: check, then load
        if seed_r.check_token_valid(key, secret):
            seed_r.load_token(key, secret)

    seed_us = per_call_us(seed_start, 5, number)
    seed_cmds = c_seed.count / (5 * number)
    rows.append({"what": "warm load, Redis (us/call)", "ours": ours_us, "seed": seed_us})
    rows.append({"what": "warm load, Redis (commands/call)", "ours": ours_cmds, "seed": seed_cmds})

    ours_f = FileTokenStorage(folder / "warm.json")
    seed_f = SeedFileTokenStorage(str(folder / "warm.pkl"))
    ours_f.save_token(data)
    seed_f.save_token(data)
    ours_f.load_token(key, secret)

    def seed_file_start() -> None:
        if seed_f.check_token_valid(key, secret):
            seed_f.load_token(key, secret)

    rows.append(
        {
            "what": "warm load, file (us/call)",
            "ours": per_call_us(lambda: ours_f.load_token(key, secret), 5, number),
            "seed": per_call_us(seed_file_start, 5, number),
        }
    )

    with KisSimulator(issue_latency_s=0) as sim:
        client = KoreaInvestment(key, secret, token_storage=ours_f, base_url=sim.base_url)
        ns = per_call_us(lambda: client.access_token, 7, number * 100) * 1000
    rows.append(
        {
            "what": "token per request in the client (ns)",
            "ours": ns,
            "seed": None,
            "note": "seed: a bare attribute, never checked for expiry",
        }
    )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="herds of 8 and 32, fewer repeats")
    args = parser.parse_args()
    sizes = [8, 32] if args.quick else [8, 32, 64]
    number = 200 if args.quick else 2000
    started = time.time()
    with RedisServer() as server, tempfile.TemporaryDirectory() as tmp:
        print(f"redis-server {server.binary} on port {server.port}; herds of {sizes}")
        herds = herd_rows(sizes, server.url, Path(tmp))
        warm = warm_rows(server.url, Path(tmp), number)

    print()
    print(
        f"{'herd':<14}{'N':>4}  {'issued ours/seed':>17}  {'EGW00133 ours/seed':>19}  "
        f"{'seed crashed':>12}  {'save->last holder ms':>21}  {'herd wall ms ours/seed':>23}"
    )
    for r in herds:
        o, s = r["ours"], r["seed"]
        print(
            f"{r['backend']:<14}{r['processes']:>4}  {o['issued']:>8}/{s['issued']:<8}  "
            f"{o['egw00133']:>9}/{s['egw00133']:<9}  {s['errors']:>12}  "
            f"{o['save_to_last_holder_ms']:>21.1f}  "
            f"{o['herd_wall_ms']:>11.0f}/{s['herd_wall_ms']:<11.0f}"
        )
    print()
    print(f"{'measure':<40}{'ours':>12}{'seed':>12}{'seed/ours':>11}")
    for w in warm:
        ratio = f"{w['seed'] / w['ours']:.1f}x" if w["seed"] else "-"
        seed = f"{w['seed']:.2f}" if w["seed"] is not None else "-"
        print(f"{w['what']:<40}{w['ours']:>12.2f}{seed:>12}{ratio:>11}")
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "quick": args.quick,
        "herds": herds,
        "warm": warm,
        "elapsed_s": time.time() - started,
    }
    out = Path(__file__).parent / "results" / ("quick.json" if args.quick else "full.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"\nsaved {out} ({result['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
