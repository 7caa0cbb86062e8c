"""The KIS clients people already run, as shipped vs. through kis_safe_token.integrations.

    python benchmarks/upstream_clients.py --quick   # herds of 8 and 32, file backend
    python benchmarks/upstream_clients.py           # herds of 8 and 32, file and Redis backends

For every scenario module under ``tests/upstream_clients/`` (``<client>_scenario.py``; a client
that is not installed is listed as skipped) and every herd size: N forked processes start the
client at once against the simulator (its one-issue-per-minute window on, as at KIS), fetch a
price, then, after a server-side expiry, fetch again through the client's own request path.
"As shipped" is the client with its own token cache; "integrated" is our integration with our
storage. Prints a table and saves it as JSON under ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
# The herd harness and the scenarios are the test suite's (forked children share the parent's path).
# tests/ goes first: its package ``upstream_clients`` must win over this script's own name.
sys.path[:0] = [str(TESTS)]

from upstream_herd import load_scenario, run_upstream_herd, upstream_simulator  # noqa: E402

from kis_safe_token.testing.redis_server import RedisServer, find_redis_server  # noqa: E402


def scenario_modules() -> list[str]:
    """``upstream_clients.<client>_scenario`` for every scenario file, sorted."""
    return [
        f"upstream_clients.{path.stem}"
        for path in sorted((TESTS / "upstream_clients").glob("*_scenario.py"))
    ]


def measure(scenario: str, n: int, spec: dict[str, Any] | None, folder: Path) -> dict[str, Any]:
    with upstream_simulator() as sim:
        result = run_upstream_herd(
            scenario,
            n,
            spec,
            sim.base_url,
            folder=folder,
            sim=sim,
            between_rounds=lambda _: sim.expire_tokens(),
            timeout_s=240,
        )
    return {
        "token_requests": result.issue_requests[0] if result.issue_requests else None,
        "issued": result.issued[0] if result.issued else None,
        "egw00133": result.rate_limited[0] if result.rate_limited else None,
        "crashed": result.crashed(0),
        "refresh_issued": result.issued[1] if len(result.issued) > 1 else None,
        "refresh_failed": result.crashed(1),
        "egw00133_refresh": result.rate_limited[1] if len(result.rate_limited) > 1 else None,
        "distinct_tokens": len(result.tokens(0)),
        "cache_files": sorted(set(result.cache_files())),
        "harness_errors": result.harness_errors,
        "first_error": (result.errors() or [""])[0].split(": ", 1)[-1][:60],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="file backend only")
    args = parser.parse_args()
    sizes = [8, 32]
    started = time.time()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        server = None
        if not args.quick and find_redis_server() is not None:
            server = RedisServer().__enter__()
        try:
            for module in scenario_modules():
                client = module.rsplit(".", 1)[1].removesuffix("_scenario")
                try:
                    load_scenario(f"{module}:shipped")
                except ImportError as exc:
                    print(f"  {client}: skipped ({exc})", flush=True)
                    rows.append({"client": client, "skipped": str(exc)})
                    continue
                for n in sizes:
                    runs: list[tuple[str, str, dict[str, Any] | None]] = [
                        ("as shipped", "shipped", None)
                    ]
                    runs.append(
                        (
                            "ours (file)",
                            "integrated",
                            {"kind": "file", "path": str(folder / uuid.uuid4().hex / "t.json")},
                        )
                    )
                    if server is not None:
                        prefix = f"bench:{uuid.uuid4().hex[:8]}:token"
                        runs.append(
                            (
                                "ours (redis)",
                                "integrated",
                                {"kind": "redis", "url": server.url, "key_prefix": prefix},
                            )
                        )
                    for mode, function, spec in runs:
                        where = folder / uuid.uuid4().hex
                        row = measure(f"{module}:{function}", n, spec, where)
                        row.update(client=client, processes=n, mode=mode)
                        rows.append(row)
                        print(
                            f"  {client} N={n} {mode}: {row['token_requests']} tokenP calls, "
                            f"{row['issued']} issued, "
                            f"{row['egw00133']} EGW00133, {row['crashed']} crashed",
                            flush=True,
                        )
        finally:
            if server is not None:
                server.__exit__(None, None, None)

    print()
    header = (
        f"{'client':<24}{'N':>4}  {'mode':<13}{'tokenP':>7}{'issued':>7}{'EGW00133':>9}"
        f"{'crashed':>8}"
        f"  {'after expiry: issued':>20}{'failed':>7}  {'own cache file'}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if "skipped" in r:
            print(f"{r['client']:<24}  skipped: not installed")
            continue
        cache = ", ".join(r["cache_files"]) or "-"
        print(
            f"{r['client']:<24}{r['processes']:>4}  {r['mode']:<13}"
            f"{r['token_requests']!s:>7}{r['issued']!s:>7}"
            f"{r['egw00133']!s:>9}{r['crashed']:>8}  {r['refresh_issued']!s:>20}"
            f"{r['refresh_failed']:>7}  {cache}"
        )
    crashes = sorted({(r["client"], r["first_error"]) for r in rows if r.get("first_error")})
    if crashes:
        print("\nhow the as-shipped processes failed:")
        for client, error in crashes:
            print(f"  {client}: {error}")
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "quick": args.quick,
        "rows": rows,
        "elapsed_s": time.time() - started,
    }
    name = "upstream_clients_quick.json" if args.quick else "upstream_clients.json"
    out = HERE / "results" / name
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print(f"\nsaved {out} ({result['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
