"""Cold start and construction, against plain ``requests``, in one run.

    python benchmarks/cold_start.py            # 15 interleaved rounds
    python benchmarks/cold_start.py --rounds 5
    python benchmarks/cold_start.py --before /tmp/base   # also an older checkout (git worktree)

- one-call script: a fresh interpreter that makes one price call with a warm token, through
  ``KoreaInvestment`` on a warm token file, against a plain ``requests`` script sending the same
  call with the token in hand (the floor: no store, no cache, no lock). Wall time and peak RSS.
- ``import kis_safe_token`` against ``import requests``.
- construction in a warm process: ``KoreaInvestment`` (its first token load included),
  ``AsyncKoreaInvestment`` (on the event loop), ``SharedToken``, ``FileTokenStorage``,
  ``LockedRedisTokenStorage``.

The package is byte-compiled first, as a wheel install is (this machine sets
``PYTHONDONTWRITEBYTECODE``; an editable install is never compiled by pip), so the figures are
those of an installed package. Medians; results in ``benchmarks/results/cold_start.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

from kis_safe_token import (  # noqa: E402
    FileTokenStorage,
    KoreaInvestment,
    LockedRedisTokenStorage,
    SharedToken,
)
from kis_safe_token.testing import KisSimulator  # noqa: E402
from kis_safe_token.testing.redis_server import RedisServer  # noqa: E402

KEY, SECRET = "PSbenchColdStart0000000000000000000", "cold-secret-" + "c" * 40
PRICE = "/uapi/domestic-stock/v1/quotations/inquire-price"
# Peak RSS from /proc (VmHWM, in kB): getrusage's ru_maxrss survives execve, so a child of this
# process would report this process's own peak.
REPORT = "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"

OURS = """
from kis_safe_token import FileTokenStorage, KoreaInvestment
broker = KoreaInvestment({key!r}, {secret!r}, base_url={url!r},
                         token_storage=FileTokenStorage({path!r}))
broker.fetch_price("005930")
"""
PLAIN = """
import requests
answer = requests.get(
    {url!r} + {price!r},
    params={{"FID_COND_MRKT_DIV_CODE": "J", "FID_INPUT_ISCD": "005930"}},
    headers={{"authorization": "Bearer " + {token!r}, "appkey": {key!r},
             "appsecret": {secret!r}, "tr_id": "FHKST01010100"}},
    timeout=10,
)
answer.json()
"""


def from_checkout(path: str, code: str) -> str:
    """``code`` importing kis_safe_token from the checkout at ``path``, not this venv's."""
    return (
        "import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in "
        f"repr(f).lower()]; sys.path.insert(0, {path!r})\n" + code
    )


def run_script(code: str) -> tuple[float, int]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code + "\n" + REPORT],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return time.perf_counter() - started, int(done.stdout.split()[-1])


def per_call_ms(build: Any, rounds: int = 30) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        build()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


async def async_construction_ms(url: str, path: str, rounds: int = 30) -> float:
    from kis_safe_token import AsyncKoreaInvestment

    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        client = AsyncKoreaInvestment(
            KEY, SECRET, base_url=url, token_storage=FileTokenStorage(path)
        )
        times.append((time.perf_counter() - started) * 1000)
        await client.aclose()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--before", help="a checkout of an earlier commit to measure too")
    args = parser.parse_args()
    compileall.compile_dir(str(ROOT / "kis_safe_token"), quiet=1)
    if args.before:
        compileall.compile_dir(str(Path(args.before) / "kis_safe_token"), quiet=1)
    folder = Path(tempfile.mkdtemp(prefix="kis-cold-"))
    path = str(folder / "tokens.json")
    with KisSimulator(issue_latency_s=0.0) as sim, RedisServer() as redis_server:
        warm = KoreaInvestment(
            KEY, SECRET, base_url=sim.base_url, token_storage=FileTokenStorage(path)
        )
        warm.fetch_price("005930")
        token = warm.token.access_token
        fill = {"key": KEY, "secret": SECRET, "url": sim.base_url, "path": path}
        ours_code = OURS.format(**fill)
        plain_code = PLAIN.format(**fill, token=token, price=PRICE)
        scripts = {
            "ours": ours_code,
            "plain": plain_code,
            "imp": "import kis_safe_token",
            "req": "import requests",
        }
        if args.before:
            scripts["before"] = from_checkout(args.before, ours_code)
            scripts["imp_before"] = from_checkout(args.before, "import kis_safe_token")
        samples: dict[str, list[tuple[float, int]]] = {k: [] for k in scripts}
        for _ in range(args.rounds):  # interleaved, so a noisy moment hits every script
            for name, code in scripts.items():
                samples[name].append(run_script(code))
        wall = {k: statistics.median(s[0] for s in v) * 1000 for k, v in samples.items()}
        rss = {k: statistics.median(s[1] for s in v) / 1024 for k, v in samples.items()}
        build = {
            "KoreaInvestment (+ first load)": per_call_ms(
                lambda: KoreaInvestment(
                    KEY, SECRET, base_url=sim.base_url, token_storage=FileTokenStorage(path)
                )
            ),
            "AsyncKoreaInvestment": asyncio.run(async_construction_ms(sim.base_url, path)),
            "SharedToken": per_call_ms(
                lambda: SharedToken(KEY, SECRET, FileTokenStorage(path), base_url=sim.base_url)
            ),
            "FileTokenStorage": per_call_ms(lambda: FileTokenStorage(path)),
            "LockedRedisTokenStorage": per_call_ms(
                lambda: LockedRedisTokenStorage(redis_server.url)
            ),
        }
    print(f"{'measure':44} {'ours':>9} {'requests':>9} {'ratio':>7}")
    print(
        f"{'one-call script, wall ms':44} {wall['ours']:9.1f} {wall['plain']:9.1f} "
        f"{wall['ours'] / wall['plain']:6.2f}x"
    )
    print(
        f"{'one-call script, peak RSS MiB':44} {rss['ours']:9.1f} {rss['plain']:9.1f} "
        f"{rss['ours'] / rss['plain']:6.2f}x"
    )
    print(
        f"{'import, wall ms (interpreter included)':44} {wall['imp']:9.1f} {wall['req']:9.1f} "
        f"{wall['imp'] / wall['req']:6.2f}x"
    )
    if args.before:
        print(
            f"{'one-call script, wall ms, --before':44} {wall['before']:9.1f} {wall['plain']:9.1f} "
            f"{wall['before'] / wall['plain']:6.2f}x"
        )
        print(
            f"{'import, wall ms, --before':44} {wall['imp_before']:9.1f} {wall['req']:9.1f} "
            f"{wall['imp_before'] / wall['req']:6.2f}x"
        )
    for name, ms in build.items():
        print(f"{'construction ms: ' + name:44} {ms:9.2f}")
    out = HERE / "results" / "cold_start.json"
    out.write_text(
        json.dumps(
            {"rounds": args.rounds, "wall_ms": wall, "rss_mib": rss, "construction_ms": build},
            indent=2,
        )
    )
    print(f"saved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
