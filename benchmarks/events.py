"""What the event stream and the metrics cost, in one run.

    python benchmarks/events.py

- warm token: ``SharedToken.bearer`` while the token is fresh, with no subscriber, with a
  subscriber, and with the Prometheus metrics on (goal: under 250 ns with none of them; the warm
  path emits nothing, so the three should match);
- one ``emit`` with no subscriber, one no-op subscriber, and the metrics;
- a store reload (a new ``SharedToken`` reading a warm token file): none against metrics on.

Medians of 7 rounds; results in ``benchmarks/results/events.json``.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry

from kis_safe_token import FileTokenStorage, SharedToken
from kis_safe_token.events import Kind, emit, subscribe
from kis_safe_token.metrics import enable_prometheus
from kis_safe_token.testing import KisSimulator

HERE = Path(__file__).resolve().parent
APP_KEY, SECRET = "PSbenchEventsAppKey00000000000000001", "bench-secret-" + "s" * 167
ROUNDS = 7


def ns_per_call(fn: Callable[[], object], number: int) -> float:
    return statistics.median(timeit.repeat(fn, number=number, repeat=ROUNDS)) / number * 1e9


def main() -> None:
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, KisSimulator(apps={APP_KEY: SECRET}) as sim:
        path = Path(tmp) / "tokens.json"
        shared = SharedToken(APP_KEY, SECRET, FileTokenStorage(path), base_url=sim.base_url)
        assert shared.bearer
        storage = FileTokenStorage(path)

        def reload() -> None:
            assert SharedToken(APP_KEY, SECRET, storage, base_url=sim.base_url).bearer

        def measure(state: str) -> None:
            results[f"warm bearer, {state} (ns)"] = ns_per_call(lambda: shared.bearer, 200_000)
            results[f"emit, {state} (ns)"] = ns_per_call(
                lambda: emit(Kind.KIS_CALL, storage, APP_KEY), 100_000
            )
            results[f"store reload, {state} (us)"] = ns_per_call(reload, 300) / 1000

        measure("no subscriber")
        unsubscribe = subscribe(lambda event: None)
        measure("one no-op subscriber")
        unsubscribe()
        enable_prometheus(CollectorRegistry())
        measure("metrics on")
    width = max(map(len, results))
    for name, value in results.items():
        print(f"{name:<{width}}  {value:10.1f}")
    base = results["store reload, no subscriber (us)"]
    print(f"store reload with metrics: {results['store reload, metrics on (us)'] / base:.2f}x")
    out = HERE / "results" / "events.json"
    out.write_text(json.dumps({"measured": time.strftime("%Y-%m-%d"), **results}, indent=2) + "\n")
    print(f"written to {out.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
