"""Measured: a Redis primary SIGKILLed in the middle of an issuance, K times each on a
Sentinel set (1 primary + 1 replica + 3 sentinels) and a Cluster (3 primaries + 3 replicas).

Each run: a fresh KIS simulator (its tokenP answer held by the issue gate), a herd of N spawned
processes building a client at once; when the holder's request hangs at KIS and half the others
block in BLPOP on the primary, the primary is SIGKILLed and KIS answers at once, so the holder
saves through the failover. Printed per run: kill -> promotion, issuances, failures, and the time
from the herd's start to the last process holding a token. The killed server is restarted (as a
replica) between runs. Standalone: ``python benchmarks/ha_failover.py [--runs 3] [--processes 16]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# Spawned herd processes inherit sys.path, so they find the herd harness too.
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import redis  # noqa: E402
from ha_servers import (  # noqa: E402
    FailoverDuringIssuance,
    LocalRedisCluster,
    LocalSentinelSet,
)
from herd import HERD_APP_KEY, HERD_SECRET, run_herd  # noqa: E402

from kis_safe_token.crypto import key_id  # noqa: E402
from kis_safe_token.testing import KisSimulator  # noqa: E402


def one_run(
    processes: int,
    spec: dict[str, Any],
    primary_port: Callable[[], int],
    kill: Callable[[], object],
    wait_for_failover: Callable[[], float],
    after_kill: Callable[[], object] | None = None,
) -> dict[str, Any]:
    with KisSimulator(apps={HERD_APP_KEY: HERD_SECRET}, issue_latency_s=0.05) as sim:
        chaos = FailoverDuringIssuance(
            sim, processes // 2, primary_port, kill, wait_for_failover, after_kill
        )
        herd = run_herd(processes, spec, sim.base_url, fetch=False, timeout_s=150)
        failover_s = chaos.join()
        last = max((r["holding_at"] for r in herd.rows), default=float("nan"))
        return {
            "failover_s": round(failover_s, 2),
            "issuances": sim.issued,
            "rate_limited": sim.rate_limited,
            "failures": len(herd.errors) + processes - len(herd.rows),
            "tokens": len(herd.tokens()),
            "last_token_s": round(herd.herd_wall_s() or float("nan"), 2),
            "kill_to_last_token_s": round(last - (chaos.killed_at or last), 2),
            "errors": herd.errors[:3],
        }


def sentinel_runs(runs: int, processes: int, *, lost_lock: bool = False) -> list[dict[str, Any]]:
    """``lost_lock``: the lock is deleted on the replica right after the kill (the replica made
    writable for that), as if the primary died before replicating it: the case SECURITY.md
    names as the lock's limit."""
    out = []
    with LocalSentinelSet() as sentinels:
        for _ in range(runs):
            prefix = f"bench:{uuid.uuid4().hex[:8]}:token"
            spec = {"kind": "redis-sentinel", "sentinels": sentinels.sentinels}
            spec["key_prefix"] = prefix
            after_kill = None
            if lost_lock:
                replica = next(s for s in sentinels.data if s.port != sentinels.primary_port())
                admin = redis.Redis("127.0.0.1", replica.port)
                admin.config_set("replica-read-only", "no")
                lock_key = f"{prefix}:{{{key_id(HERD_APP_KEY)}}}:lock"
                after_kill = partial(admin.delete, lock_key)
            out.append(
                one_run(
                    processes,
                    spec,
                    sentinels.primary_port,
                    sentinels.kill_primary,
                    sentinels.wait_for_failover,
                    after_kill,
                )
            )
            sentinels.heal()
            name = "lost-lock" if lost_lock else "sentinel"
            print(f"{name:9}", json.dumps(out[-1]), flush=True)
    return out


def cluster_runs(runs: int, processes: int) -> list[dict[str, Any]]:
    out = []
    with LocalRedisCluster() as cluster:
        for _ in range(runs):
            prefix = f"bench:{uuid.uuid4().hex[:8]}:token"
            slot = cluster.keyslot(f"{prefix}:{{{key_id(HERD_APP_KEY)}}}")
            spec = {"kind": "redis-cluster", "nodes": cluster.nodes, "key_prefix": prefix}
            out.append(
                one_run(
                    processes,
                    spec,
                    lambda: cluster.slot_owner(slot).port,  # noqa: B023 - called within the run
                    lambda: cluster.kill_slot_owner(slot),  # noqa: B023
                    lambda: cluster.wait_for_failover(slot),  # noqa: B023
                )
            )
            cluster.heal()
            print("cluster ", json.dumps(out[-1]), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--processes", type=int, default=16)
    parser.add_argument("--only", choices=("sentinel", "cluster", "lost-lock"))
    parser.add_argument(
        "--lost-lock",
        action="store_true",
        help="also run Sentinel failovers in which the lock never reached the replica",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    results: dict[str, list[dict[str, Any]]] = {}
    if args.only in (None, "sentinel"):
        results["sentinel"] = sentinel_runs(args.runs, args.processes)
    if args.only in (None, "cluster"):
        results["cluster"] = cluster_runs(args.runs, args.processes)
    if args.only == "lost-lock" or (args.only is None and args.lost_lock):
        results["lost-lock"] = sentinel_runs(args.runs, args.processes, lost_lock=True)
    took = time.monotonic() - started
    print(f"\n{args.processes} processes, {args.runs} runs each ({took:.0f} s); seconds:")
    print(
        f"{'':9}{'run':>4}{'kill->promoted':>16}{'issuances':>11}{'EGW00133':>10}"
        f"{'failures':>10}{'start->last token':>19}{'kill->last token':>18}"
    )
    ok = True
    for name, rows in results.items():
        for i, r in enumerate(rows, 1):
            print(
                f"{name:9}{i:>4}{r['failover_s']:>16.2f}{r['issuances']:>11}"
                f"{r['rate_limited']:>10}{r['failures']:>10}"
                f"{r['last_token_s']:>19.2f}{r['kill_to_last_token_s']:>18.2f}"
            )
            ok = ok and r["failures"] == 0 and r["issuances"] <= 2 and r["tokens"] == 1
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
