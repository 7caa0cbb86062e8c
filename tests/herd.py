"""A herd of real processes (``spawn``) building clients at the same instant, for the tests and
the benchmarks: ``run_herd(4, spec, sim.base_url)`` -> what each process saw.

Test machinery, not part of the installed package: the tests import it as ``herd`` (pytest puts
``tests/`` on ``sys.path``), ``benchmarks/run.py`` puts ``tests/`` on ``sys.path`` itself, and
spawned children inherit that path. It records save times by wrapping the storage's private
``write_token`` (every save of an issued token goes through it), which only a test harness
may do.

A storage *spec* is a picklable dict: ``{"kind": "file", "path": ...}`` or
``{"kind": "redis", "url": ..., "key_prefix": ..., "lock_ttl": ..., "locked": True}``;
``{"kind": "redis-sentinel", "sentinels": [[host, port], ...], "service": ..., "key_prefix": ...}``
or ``{"kind": "redis-cluster", "nodes": [[host, port], ...], "key_prefix": ...}`` (locked,
clients built by :mod:`kis_safe_token.storage.redis_ha`).
Processes line up on a barrier (the parent is one of its parties), so all start together;
with ``rounds > 1`` the parent runs ``between_rounds`` (say, expire the token server-side)
and releases the next round, in which every process fetches a price again.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any

from kis_safe_token.client import KoreaInvestment
from kis_safe_token.storage.base import TokenStorage
from kis_safe_token.storage.file import FileTokenStorage

__all__ = [
    "HERD_APP_KEY",
    "run_call_herd",
    "HERD_SECRET",
    "HerdResult",
    "build_storage",
    "gated_client",
    "run_herd",
    "token_id",
]

HERD_APP_KEY = "PSherdAppKey00000000000000000000000"
HERD_SECRET = "herd-secret-" + "s" * 40
SYMBOL = "005930"


def build_storage(spec: dict[str, Any]) -> TokenStorage:
    """The storage a spec describes (in the calling process)."""
    kind = spec["kind"]
    options = dict(spec.get("options", {}))
    if kind == "file":
        return FileTokenStorage(spec["path"], **options)
    if kind == "redis":
        from kis_safe_token.storage.redis import LockedRedisTokenStorage, RedisTokenStorage

        cls = LockedRedisTokenStorage if spec.get("locked", True) else RedisTokenStorage
        return cls(spec["url"], key_prefix=spec["key_prefix"], **options)
    if kind in ("redis-sentinel", "redis-cluster"):
        from kis_safe_token.storage.factory import HA_RETRY_TIMEOUT_S
        from kis_safe_token.storage.redis import LockedRedisTokenStorage
        from kis_safe_token.storage.redis_ha import cluster_client, sentinel_client

        # As built from the environment: a cold read outlasts a failover too.
        options.setdefault("retry_timeout_s", HA_RETRY_TIMEOUT_S)

        if kind == "redis-sentinel":
            sentinels = [(h, int(p)) for h, p in spec["sentinels"]]
            client = sentinel_client(sentinels, spec.get("service", "mymaster"))
        else:
            client = cluster_client([(h, int(p)) for h, p in spec["nodes"]])
        return LockedRedisTokenStorage(client=client, key_prefix=spec["key_prefix"], **options)
    if kind == "sqlite":  # a backend written to the public protocol alone (tests/sqlite_backend.py)
        from sqlite_backend import SqliteTokenStorage

        return SqliteTokenStorage(spec["path"], **options)
    raise ValueError(f"unknown storage kind {kind!r}")


def token_id(bearer: str) -> str:
    """A short, safe name for a token: 8 hex digits of its SHA-256."""
    return hashlib.sha256(bearer.encode()).hexdigest()[:8]


@dataclass
class HerdResult:
    """What the herd saw: one row per (process, thread, round), plus errors."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    released_at: list[float] = field(default_factory=list)

    def herd_wall_s(self, round_no: int = 0) -> float | None:
        """Seconds from the barrier's release to the last process holding the token."""
        holders: list[float] = [r["holding_at"] for r in self.rows if r["round"] == round_no]
        if not holders or len(self.released_at) <= round_no:
            return None
        return max(holders) - self.released_at[round_no]

    def tokens(self, round_no: int | None = None) -> set[str]:
        return {r["token"] for r in self.rows if round_no is None or r["round"] == round_no}

    def saves(self, round_no: int) -> list[float]:
        return sorted(t for r in self.rows if r["round"] == round_no for t in r["saved_at"])

    def save_to_last_holder_s(self, round_no: int = 0) -> float | None:
        """Seconds from the (first) save of a round to the last process holding the token."""
        saves = self.saves(round_no)
        holders: list[float] = [r["holding_at"] for r in self.rows if r["round"] == round_no]
        if not saves or not holders:
            return None
        return max(holders) - saves[0]


def _worker(
    spec: dict[str, Any],
    client_kwargs: dict[str, Any],
    index: int,
    threads: int,
    rounds: int,
    barrier: Any,
    results: Any,
    env: dict[str, str],
    fetch: bool,
) -> None:
    os.environ.update(env)
    try:
        storage = build_storage(spec)
        # A worker that is up has its store connection and key derivation ready: do that before
        # the barrier, so the herd times the protocol, not connection set-up (~8 ms of CPU each).
        storage.load_token(HERD_APP_KEY, HERD_SECRET)
        saved_at: list[float] = []
        write = storage.write_token

        def traced_write(*args: Any, **kwargs: Any) -> None:
            write(*args, **kwargs)
            saved_at.append(time.time())

        storage.write_token = traced_write  # type: ignore[method-assign]
        clients: list[KoreaInvestment | None] = [None] * threads
        results.put(("ready", index, None))

        def one(t: int, round_no: int) -> None:
            try:
                started = time.time()
                client = clients[t]
                if client is None:
                    client = clients[t] = KoreaInvestment(
                        HERD_APP_KEY,
                        HERD_SECRET,
                        "50000000-01",
                        token_storage=storage,
                        **client_kwargs,
                    )
                holding_at = time.time()  # round 0: the constructor got the token
                # Later rounds: the token is refreshed on EGW00123 inside this call.
                quote = client.fetch_price(SYMBOL) if fetch or round_no else None
                if round_no:
                    holding_at = time.time()
                bearer = client.access_token
                results.put(
                    (
                        "row",
                        index,
                        {
                            "process": index,
                            "thread": t,
                            "round": round_no,
                            "pid": os.getpid(),
                            "token": token_id(bearer),
                            "started_at": started,
                            "holding_at": holding_at,
                            "latency_s": holding_at - started,
                            "price": quote["output"]["stck_prpr"] if quote else None,
                            "saved_at": [],
                        },
                    )
                )
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                results.put(
                    ("error", index, f"process {index} thread {t}: {type(exc).__name__}: {exc}")
                )

        for round_no in range(rounds):
            barrier.wait(120)
            saved_at.clear()
            if threads == 1:
                one(0, round_no)
            else:
                pool = [threading.Thread(target=one, args=(t, round_no)) for t in range(threads)]
                for th in pool:
                    th.start()
                for th in pool:
                    th.join()
            results.put(("saves", index, (round_no, list(saved_at))))
    except Exception as exc:  # noqa: BLE001
        results.put(("error", index, f"process {index}: {type(exc).__name__}: {exc}"))


def run_herd(
    processes: int,
    spec: dict[str, Any],
    base_url: str,
    *,
    threads: int = 1,
    rounds: int = 1,
    between_rounds: Callable[[int], None] | None = None,
    client_kwargs: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 120.0,
    fetch: bool = True,
) -> HerdResult:
    """Start ``processes`` spawned processes (each with ``threads`` clients) and run ``rounds``.

    ``fetch=False``: in round 0 the clients only get the token, so timing is not disturbed by the
    price calls of those that already hold it (the benchmarks' save -> last holder).
    """
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(processes + 1)
    results = ctx.Queue()
    kwargs = {"base_url": base_url, **(client_kwargs or {})}
    procs = [
        ctx.Process(
            target=_worker,
            args=(spec, kwargs, i, threads, rounds, barrier, results, env or {}, fetch),
            daemon=True,
        )
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    out = HerdResult()
    deadline = time.monotonic() + timeout_s
    try:
        ready = 0
        while ready < processes:
            kind, _, payload = results.get(timeout=max(0.1, deadline - time.monotonic()))
            if kind == "ready":
                ready += 1
            elif kind == "error":
                out.errors.append(payload)
                return out
        for round_no in range(rounds):
            if round_no and between_rounds is not None:
                between_rounds(round_no)
            barrier.wait(120)
            out.released_at.append(time.time())
            pending = processes
            saves: dict[int, list[float]] = {}
            while pending:
                kind, index, payload = results.get(timeout=max(0.1, deadline - time.monotonic()))
                if kind == "row":
                    out.rows.append(payload)
                elif kind == "saves":
                    saves[index] = payload[1]
                    pending -= 1
                else:
                    out.errors.append(payload)
                    if "thread" not in payload:
                        pending -= 1
            for row in out.rows:
                if row["round"] == round_no and row["thread"] == 0:
                    row["saved_at"] = saves.get(row["process"], [])
    except (queue.Empty, threading.BrokenBarrierError):
        out.errors.append(f"herd did not finish within {timeout_s:.0f} s")
    finally:
        reap(procs, deadline)
    return out


def reap(procs: Iterable[BaseProcess], deadline: float) -> None:
    """Join each process until ``deadline`` (monotonic); kill one still running then."""
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(5)


def gated_client(
    spec: dict[str, Any],
    base_url: str,
    go: Any,
    out: Any,
    env: dict[str, str] | None = None,
    client_kwargs: dict[str, Any] | None = None,
) -> None:
    """One client in a spawned process, for crash and takeover tests.

    Adds ``env`` to its environment (say, a fault armed by ``_faults.arm_fault``); if ``go`` (an
    event) is given, reports ``("ready", "", t)`` and waits for it; then builds a client and
    reports ``("ok", token id, t)`` or ``("error", text, t)`` on ``out`` (``t``:
    ``time.monotonic()``).
    """
    os.environ.update(env or {})
    try:
        if go is not None:
            out.put(("ready", "", time.monotonic()))
            go.wait(120)
        client = KoreaInvestment(
            HERD_APP_KEY,
            HERD_SECRET,
            token_storage=build_storage(spec),
            base_url=base_url,
            **(client_kwargs or {}),
        )
        out.put(("ok", token_id(client.access_token), time.monotonic()))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        out.put(("error", f"{type(exc).__name__}: {exc}", time.monotonic()))


def _call_loop(
    spec: dict[str, Any],
    client_kwargs: dict[str, Any],
    index: int,
    calls: int,
    barrier: Any,
    results: Any,
) -> None:
    try:
        client = KoreaInvestment(
            HERD_APP_KEY, HERD_SECRET, token_storage=build_storage(spec), **client_kwargs
        )
        barrier.wait(120)
        answered, codes = 0, []
        for _ in range(calls):
            try:
                client.fetch_price(SYMBOL)
                answered += 1
            except Exception as exc:  # noqa: BLE001 - counted and reported to the parent
                codes.append(getattr(exc, "code", None) or type(exc).__name__)
        results.put(("done", index, {"answered": answered, "errors": codes, "ended": time.time()}))
    except Exception as exc:  # noqa: BLE001
        results.put(("error", index, f"process {index}: {type(exc).__name__}: {exc}"))


def run_call_herd(
    processes: int,
    calls: int,
    spec: dict[str, Any],
    base_url: str,
    *,
    client_kwargs: dict[str, Any] | None = None,
    timeout_s: float = 120.0,
) -> tuple[float, list[dict[str, Any]], list[str]]:
    """``processes`` spawned processes, each with its own client, released together by a
    barrier, each making ``calls`` price calls in a row: ``(released_at, one report per
    process, errors)``; a report holds ``answered``, ``errors`` (KIS codes) and ``ended``."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(processes + 1)
    results = ctx.Queue()
    kwargs = {"base_url": base_url, **(client_kwargs or {})}
    procs = [
        ctx.Process(target=_call_loop, args=(spec, kwargs, i, calls, barrier, results), daemon=True)
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    reports: list[dict[str, Any]] = []
    errors: list[str] = []
    released_at = 0.0
    deadline = time.monotonic() + timeout_s
    try:
        barrier.wait(120)
        released_at = time.time()
        while len(reports) + len(errors) < processes:
            kind, _, payload = results.get(timeout=max(0.1, deadline - time.monotonic()))
            (reports if kind == "done" else errors).append(payload)
    except (queue.Empty, threading.BrokenBarrierError):
        errors.append(f"call herd did not finish within {timeout_s:.0f} s")
    finally:
        reap(procs, deadline)
    return released_at, reports, errors
