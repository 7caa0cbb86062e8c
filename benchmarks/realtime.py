"""Events from KIS to every subscriber, the fleet's one session against one session each:

    python benchmarks/realtime.py                 # 16 processes, 2,000 events/s, 6 s each way
    python benchmarks/realtime.py --quick         # 8 processes, 3 s

16 processes (half sync ``KisRealtime``, half ``AsyncKisRealtime``) subscribe to one pair; the
simulator pushes ``--rate`` frames a second of ``--records`` records each. *one session, file*:
one token file, so one leader holds KIS's one session and serves the other 15 over its Unix
socket (KIS's rule on). *one session, Redis*: a Redis storage (a local redis-server), the
leader publishing on the app key's channel. *own session each*: each process its own token
file, so its own session, as only a host with KIS's rule off would allow (the simulator's
``one_session=False``). Per process: the events
received of those sent, and the latency from the simulator's send to the subscriber's loop
(same host clock), p50 and p99 over all events; the ratio is shared / own.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests")]  # the fleet is the test suite's (spawned: inherited)

from realtime_fleet import APP_KEY, SECRET, Fleet, Member  # noqa: E402

from kis_safe_token.testing import KisSimulator  # noqa: E402
from kis_safe_token.testing.realtime_sim import RealtimeSimulator  # noqa: E402
from kis_safe_token.testing.redis_server import RedisServer  # noqa: E402

PAIR = ("H0STCNT0", "005930")


def run(
    processes: int, rate: float, records: int, seconds: float, how: str, redis_url: str
) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="kis-rt-bench-"))
    shared = how != "own"
    members = [
        Member("async" if i % 2 else "sync", [PAIR], None if shared else _file(folder / f"{i}"))
        for i in range(processes)
    ]
    spec = _file(folder / "tokens")
    if how == "redis":
        spec = {"kind": "redis", "url": redis_url, "key_prefix": f"bench-{uuid.uuid4().hex}"}
    with (
        KisSimulator(apps={APP_KEY: SECRET}, issue_latency_s=0) as sim,
        RealtimeSimulator(sim, one_session=shared) as rts,
    ):
        fleet = Fleet(spec, sim.base_url, rts.ws_url, members, quiet=True)
        with fleet:
            fleet.collect("ready", processes, timeout=120)
            rts.rate, rts.records = rate, records
            started = time.monotonic()
            rts.start_pushing()
            time.sleep(seconds)  # the measured window: the simulator pushes meanwhile
            rts.stop_pushing()
            elapsed = time.monotonic() - started
            sent = rts.stats()["frames_sent"] * records // (1 if shared else processes)
            time.sleep(0.5)  # what is in flight arrives
            fleet.stop.set()
            counts = fleet.collect("count", processes, timeout=60)
            sessions = rts.stats()["sessions_peak"]
    received = [c[2] for c in counts]
    return {
        "sent": sent,
        "rate": sent / elapsed,
        "min_received": min(received),
        "per_process_rate": min(received) / elapsed,
        "p50_ms": statistics.median(c[3] for c in counts) * 1000,
        "p99_ms": max(c[4] for c in counts) * 1000,
        "sessions": sessions,
    }


def _file(stem: Path) -> dict:
    return {"kind": "file", "path": f"{stem}.json"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rate", type=float, default=200.0, help="frames a second")
    parser.add_argument("--records", type=int, default=10, help="records a frame")
    args = parser.parse_args()
    processes, seconds = (8, 3.0) if args.quick else (16, 6.0)
    print(f"{processes} processes, {args.rate:.0f} frames/s x {args.records} records, {seconds} s")
    rows = {}
    ways = (
        ("one session, file", "file"),
        ("one session, Redis", "redis"),
        ("own session each", "own"),
    )
    with RedisServer() as redis_server:
        for name, how in ways:
            rows[name] = r = run(processes, args.rate, args.records, seconds, how, redis_server.url)
            print(
                f"{name:22} sessions {r['sessions']:2}  sent {r['rate']:7.0f} ev/s  "
                f"each got >= {r['per_process_rate']:7.0f} ev/s ({r['min_received']}/{r['sent']})"
                f"  p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms"
            )
    own = rows["own session each"]
    for name in ("one session, file", "one session, Redis"):
        a = rows[name]
        print(
            f"ratio {name} / own: rate {a['per_process_rate'] / own['per_process_rate']:.2f}x"
            f"  p50 {a['p50_ms'] / own['p50_ms']:.2f}x  p99 {a['p99_ms'] / own['p99_ms']:.2f}x"
        )


if __name__ == "__main__":
    main()
