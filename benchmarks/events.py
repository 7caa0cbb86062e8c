"""What the event stream and the metrics cost, in one run.

    python benchmarks/events.py

- warm token: ``SharedToken.bearer`` while the token is fresh, with no subscriber, with a
  subscriber, and with the Prometheus metrics on (goal: under 250 ns with none of them; the warm
  path emits nothing, so the three should match);
- one ``emit`` with no subscriber, one no-op subscriber, and the metrics;
- a store reload (a new ``SharedToken`` reading a warm token file): none against metrics on.

Medians of 7 interleaved rounds; results in ``benchmarks/results/events.json``.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path

import prometheus_client
from prometheus_client import CollectorRegistry

from kis_safe_token import FileTokenStorage, SharedToken
from kis_safe_token.events import Event, Kind, emit, subscribe
from kis_safe_token.metrics import _Metrics
from kis_safe_token.testing import KisSimulator

HERE = Path(__file__).resolve().parent
APP_KEY, SECRET = "PSbenchEventsAppKey00000000000000001", "bench-secret-" + "s" * 167
ROUNDS = 7


def ns_per_call(stmt: str, number: int, **names: object) -> float:
    """``stmt`` timed by ``timeit`` (no function call around it), in ns per run."""
    return timeit.Timer(stmt, globals=names).timeit(number) / number * 1e9


def main() -> None:
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp, KisSimulator(apps={APP_KEY: SECRET}) as sim:
        path = Path(tmp) / "tokens.json"
        shared = SharedToken(APP_KEY, SECRET, FileTokenStorage(path), base_url=sim.base_url)
        assert shared.bearer
        storage = FileTokenStorage(path)

        def reload() -> None:
            assert SharedToken(APP_KEY, SECRET, storage, base_url=sim.base_url).bearer

        emitting = {"emit": emit, "call": Kind.KIS_CALL, "storage": storage, "key": APP_KEY}
        metrics = _Metrics(prometheus_client, CollectorRegistry())
        states: dict[str, Callable[[Event], object] | None] = {
            "no subscriber": None,
            "one no-op subscriber": lambda event: None,
            "metrics on": metrics.record,
        }
        for _ in range(ROUNDS):  # interleaved: a noisy moment hits every state
            for state, subscriber in states.items():
                unsubscribe = subscribe(subscriber) if subscriber is not None else None
                rows = {
                    f"warm bearer, {state} (ns)": ns_per_call("s.bearer", 200_000, s=shared),
                    f"emit, {state} (ns)": ns_per_call(
                        "emit(call, storage, key)", 20_000, **emitting
                    ),
                    f"store reload, {state} (us)": ns_per_call("reload()", 200, reload=reload)
                    / 1000,
                }
                for name, value in rows.items():
                    samples.setdefault(name, []).append(value)
                if unsubscribe is not None:
                    unsubscribe()
    results = {name: statistics.median(values) for name, values in samples.items()}
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
