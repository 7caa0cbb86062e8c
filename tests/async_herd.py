"""A herd of real processes (``spawn``), asyncio or sync, each with one client that many tasks
(or threads) use at the same instant: ``run_mixed_herd(["async"] * 4, spec, sim.base_url)``.

Test machinery beside ``herd.py`` (for the tests and ``benchmarks/async_client.py``). An
``"async"`` process runs ``tasks`` concurrent ``fetch_price`` calls on one
:class:`AsyncKoreaInvestment` in one event loop; a ``"sync"`` process runs ``tasks`` threads on
one :class:`KoreaInvestment` (its :class:`SharedToken`). Every process is up, its store
connected, before the barrier lets them all go together.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from herd import HERD_APP_KEY, HERD_SECRET, SYMBOL, build_storage, reap, token_id

__all__ = ["MixedHerd", "run_mixed_herd"]


@dataclass
class MixedHerd:
    """What each process saw: the tokens its calls carried, its errors, its slowest call."""

    tokens: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    calls: int = 0
    wall_s: float = 0.0  # from the barrier to the last call answered, slowest process


def _async_calls(
    spec: dict[str, Any], base_url: str, tasks: int, barrier: Any, rate: float | None
) -> list[Any]:
    from kis_safe_token import AsyncKoreaInvestment

    storage = build_storage(spec)
    storage.load_token(HERD_APP_KEY, HERD_SECRET)  # connected and keys derived before the go

    async def main() -> list[Any]:
        kis = AsyncKoreaInvestment(
            HERD_APP_KEY,
            HERD_SECRET,
            token_storage=storage,
            base_url=base_url,
            calls_per_second=rate,
        )
        async with kis.shared_token:
            await asyncio.to_thread(barrier.wait, 60)

            async def one() -> str:
                await kis.fetch_price(SYMBOL)
                return token_id(await kis.access_token())

            return await asyncio.gather(*(one() for _ in range(tasks)), return_exceptions=True)

    return asyncio.run(main())


def _sync_calls(
    spec: dict[str, Any], base_url: str, tasks: int, barrier: Any, rate: float | None
) -> list[Any]:
    from kis_safe_token import KoreaInvestment, SharedToken

    storage = build_storage(spec)
    storage.load_token(HERD_APP_KEY, HERD_SECRET)
    shared = SharedToken(
        HERD_APP_KEY, HERD_SECRET, storage, base_url=base_url, calls_per_second=rate
    )
    kis = KoreaInvestment.from_shared(shared)
    out: list[Any] = [None] * tasks

    def one(i: int) -> None:
        try:
            kis.fetch_price(SYMBOL)
            out[i] = token_id(kis.access_token)
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            out[i] = exc

    pool = [threading.Thread(target=one, args=(i,)) for i in range(tasks)]
    barrier.wait(60)
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    return out


def _worker(
    kind: str,
    spec: dict[str, Any],
    base_url: str,
    tasks: int,
    rate: float | None,
    barrier: Any,
    q: Any,
) -> None:
    try:
        run = _async_calls if kind == "async" else _sync_calls
        outcomes = run(spec, base_url, tasks, barrier, rate)
        done = time.time()
        q.put(
            (
                [o for o in outcomes if isinstance(o, str)],
                [f"{kind}: {type(o).__name__}: {o}" for o in outcomes if not isinstance(o, str)],
                done,
            )
        )
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        q.put(([], [f"{kind} process: {type(exc).__name__}: {exc}"], time.time()))


def run_mixed_herd(
    kinds: list[str],
    spec: dict[str, Any],
    base_url: str,
    *,
    tasks: int = 50,
    calls_per_second: float | None = None,
    timeout_s: float = 60,
) -> MixedHerd:
    """Start one spawned process per entry of ``kinds`` (``"async"`` or ``"sync"``), release
    them together, and gather what they saw. ``calls_per_second``: the clients' fleet-wide
    call-rate limit (``None``: KIS's default, 20/s; a herd about issuance sets it high, or its
    calls queue for the limit)."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(kinds) + 1)
    q = ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker,
            args=(k, spec, base_url, tasks, calls_per_second, barrier, q),
            daemon=True,
        )
        for k in kinds
    ]
    for p in procs:
        p.start()
    out = MixedHerd()
    try:
        barrier.wait(timeout_s)
        released = time.time()
        for _ in procs:
            tokens, errors, done = q.get(timeout=timeout_s)
            out.tokens.update(tokens)
            out.errors.extend(errors)
            out.calls += len(tokens)
            out.wall_s = max(out.wall_s, done - released)
    except Exception as exc:  # noqa: BLE001 - a herd that hangs is a failure to report
        out.errors.append(f"herd: {type(exc).__name__}: {exc}")
    finally:
        reap(procs, time.monotonic() + 10)
    return out
