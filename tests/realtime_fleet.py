"""Real processes (``spawn``) sharing one KIS realtime session: each builds a ``KisRealtime``
(``"sync"``) or an ``AsyncKisRealtime`` (``"async"``), subscribes to its pairs, says it is ready
(with its pid and role), then reports every event it gets until told to stop.

Test machinery for tests/test_realtime.py and benchmarks/realtime.py. Each pipe carries
``("ready", index, pid, role)``, ``("event", index, tr_id, tr_key, seq, latency_s)`` (``seq`` 0
for a gap), ``("error", index, text)`` and, at the end, ``("done", index, stats)``. With
``quiet``, only ``("count", index, events, p50_s, p99_s)`` at the end (for the benchmark).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any

__all__ = ["Fleet", "Member"]

# the app of tests/conftest.py's simulator
APP_KEY = "PStestAppKey0000000000000000000000"
SECRET = "test-secret-" + "t" * 40


@dataclass
class Member:
    """One process: ``mode`` "sync" or "async", the pairs it wants."""

    mode: str
    pairs: list[tuple[str, str]]
    spec: dict[str, Any] | None = None  # its own storage: its own session (a baseline)


@dataclass
class Fleet:
    """The processes of one test and the queue of what they report."""

    spec: dict[str, Any]  # the storage of every member (``herd.build_storage``)
    base_url: str
    ws_url: str
    members: list[Member]
    quiet: bool = False
    procs: list[Any] = field(default_factory=list)
    seen: list[tuple[Any, ...]] = field(default_factory=list)  # reports read but not asked for

    def __post_init__(self) -> None:
        # A pipe each, not one shared Queue: a process SIGKILLed while holding a shared queue's
        # lock would silence every other process.
        ctx = mp.get_context("spawn")
        self.stop: Any = ctx.Event()
        self._readers: list[Any] = []
        self._writers: list[Any] = []
        self._pending: deque[tuple[Any, ...]] = deque()
        for index, member in enumerate(self.members):
            reader, writer = ctx.Pipe(duplex=False)
            self._readers.append(reader)
            self._writers.append(writer)
            args = (index, member, self.spec, self.base_url, self.ws_url, self.quiet)
            self.procs.append(
                ctx.Process(target=_member, args=(*args, writer, self.stop), daemon=True)
            )

    def __enter__(self) -> Fleet:
        for proc in self.procs:
            proc.start()
        for writer in self._writers:  # the children's now: a dead child's pipe reads as ended
            writer.close()
        return self

    def _next(self, timeout: float) -> tuple[Any, ...] | None:
        """The next report of any process, or ``None`` after ``timeout``."""
        if not self._pending:
            for reader in wait(self._readers, timeout):
                try:
                    while reader.poll():
                        self._pending.append(reader.recv())
                except (EOFError, OSError):
                    self._readers.remove(reader)  # that process ended (or was killed)
        return self._pending.popleft() if self._pending else None

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        for proc in self.procs:
            proc.join(20)
            if proc.is_alive():
                proc.kill()
                proc.join(5)

    def collect(self, kind: str, count: int, timeout: float = 30.0) -> list[tuple[Any, ...]]:
        """The next ``count`` reports of ``kind`` (others are kept in :attr:`seen`)."""
        found: list[tuple[Any, ...]] = []
        deadline = time.monotonic() + timeout
        while len(found) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{len(found)} of {count} {kind!r} reports in {timeout} s")
            report = self._next(left)
            if report is None:
                continue
            if report[0] == "error":
                raise AssertionError(f"process {report[1]}: {report[2]}")
            (found if report[0] == kind else self.seen).append(report)
        return found

    def until(self, predicate: Any, timeout: float = 30.0) -> None:
        """Read event reports into :attr:`seen` until ``predicate(seen)`` holds."""
        deadline = time.monotonic() + timeout
        while not predicate(self.seen):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"not within {timeout} s; saw {len(self.seen)} reports")
            report = self._next(min(left, 1.0))
            if report is None:
                continue
            if report[0] == "error":
                raise AssertionError(f"process {report[1]}: {report[2]}")
            self.seen.append(report)


class _Reporter:
    """The child's end of its pipe, for several threads."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def put(self, report: tuple[Any, ...]) -> None:
        with self.lock:
            self.conn.send(report)


def _member(
    index: int,
    member: Member,
    spec: dict[str, Any],
    base_url: str,
    ws_url: str,
    quiet: bool,
    conn: Any,
    stop: Any,
) -> None:
    reports = _Reporter(conn)
    import logging

    if not quiet:  # who leads and who follows, in the test's captured output
        logging.getLogger("kis_safe_token.realtime").setLevel(logging.INFO)
    logging.basicConfig(
        format=f"[{index}] %(name)s %(levelname)s %(message)s", level=logging.WARNING
    )
    try:
        kw, tally = _kw(member, spec, base_url, ws_url), _Tally(index, quiet, reports)
        if member.mode == "async":
            asyncio.run(_async_member(member, kw, tally, stop))
        else:
            _sync_member(member, kw, tally, stop)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        reports.put(("error", index, f"{type(exc).__name__}: {exc}"))


def _kw(member: Member, spec: dict[str, Any], base_url: str, ws_url: str) -> dict[str, Any]:
    from herd import build_storage

    storage = build_storage(member.spec or spec)
    return {"token_storage": storage, "base_url": base_url, "ws_url": ws_url}


class _Tally:
    def __init__(self, index: int, quiet: bool, reports: Any) -> None:
        self.index, self.quiet, self.reports = index, quiet, reports
        self.latencies: list[float] = []

    def event(self, event: Any) -> None:
        from kis_safe_token.testing.realtime_sim import sent_at, sequence_of

        if event.gap:
            seq, latency = 0, 0.0
        else:
            seq, latency = sequence_of(event.fields), time.time() - sent_at(event.fields)
        if self.quiet:
            self.latencies.append(latency)
        else:
            self.reports.put(("event", self.index, event.tr_id, event.tr_key, seq, latency))

    def ready(self, role: str | None) -> None:
        self.reports.put(("ready", self.index, mp.current_process().pid, role))

    def done(self, stats: dict[str, Any]) -> None:
        if self.quiet:
            ordered = sorted(self.latencies) or [0.0]
            p50, p99 = ordered[len(ordered) // 2], ordered[int(len(ordered) * 0.99)]
            self.reports.put(("count", self.index, len(self.latencies), p50, p99))
        self.reports.put(("done", self.index, stats))


def _sync_member(member: Member, kw: dict[str, Any], tally: _Tally, stop: Any) -> None:
    from kis_safe_token import KisRealtime

    with KisRealtime(APP_KEY, SECRET, **kw) as rt:
        subs = [rt.subscribe(*pair) for pair in member.pairs]
        tally.ready(rt.role)

        def drain(sub: Any) -> None:
            while not stop.is_set():
                event = sub.get(0.2)
                if event is not None:
                    tally.event(event)

        threads = [threading.Thread(target=drain, args=(sub,)) for sub in subs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        tally.done(rt.stats())


async def _async_member(member: Member, kw: dict[str, Any], tally: _Tally, stop: Any) -> None:
    from kis_safe_token import AsyncKisRealtime

    async with AsyncKisRealtime(APP_KEY, SECRET, **kw) as rt:
        subs = [await rt.subscribe(*pair) for pair in member.pairs]
        tally.ready(rt.rt.role)

        async def drain(sub: Any) -> None:
            while not stop.is_set():
                event = await sub.get(0.2)
                if event is not None:
                    tally.event(event)

        await asyncio.gather(*(drain(sub) for sub in subs))
        tally.done(rt.stats())
