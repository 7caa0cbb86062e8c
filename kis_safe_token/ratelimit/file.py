"""``FileRateLimiter``: the rate limit of every process of this user on this host.

The state is one 24-byte record (the TAT and the end of a slowdown, two little-endian doubles
in seconds of :func:`host_clock`, and the boot they belong to) in a small file beside the token
file, updated under ``flock`` on that same file:
``flock`` + ``pread`` + ``pwrite`` + unlock, a few microseconds, no fsync (a lost record after a
crash costs at most one early call). Bounded in size (the record is rewritten in place, never
appended) and in time (the lock is held for two page-cache syscalls; the kernel frees a dead
holder's lock at once).

Time is the host's clock that never steps (``CLOCK_BOOTTIME`` on Linux, ``time.monotonic``
elsewhere: one clock for every process of the host), not the wall clock: a wall clock stepped
forward would put slots in the past (a burst KIS refuses), stepped back it would leave every
process waiting for a TAT in its future. A record of another boot (the clock restarted at 0)
is started afresh.
"""

from __future__ import annotations

import math
import os
import stat
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from .._fork import renew_after_fork
from ..errors import TokenStorageError
from .base import MAX_WAIT_S, SLOWDOWN_FACTOR, RateLimiter, check_rate, reserve

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: a filelock on a sibling file instead
    fcntl = None  # type: ignore[assignment]
    import filelock

__all__ = ["FileRateLimiter", "host_clock", "shared_file_rate_limiter"]

_RECORD: Final = struct.Struct("<ddQ")


def _host_clock() -> Callable[[], float]:
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    if boottime is None:  # pragma: no cover - not Linux: monotonic is host-wide there too
        return time.monotonic
    return lambda: time.clock_gettime(boottime)


#: Seconds of the host's clock that never steps, shared by every process of the host.
host_clock: Final = _host_clock()


def _boot_tag() -> int:
    """This boot of the host, as 64 bits (Linux's ``boot_id``; 0 where there is none)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return int(fh.read().strip().replace("-", "")[:16], 16)
    except (OSError, ValueError):  # pragma: no cover - not Linux
        return 0


_BOOT: Final = _boot_tag()
_OPEN_FLAGS: Final = (
    os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
)


class FileRateLimiter(RateLimiter):
    """Slots shared through the record in ``path`` (created 0600 on first use).

    One descriptor per limiter, reopened in a forked child: ``flock`` belongs to the open file
    description, so a parent and a child sharing one would not exclude each other. Threads of
    one process share the descriptor and are serialized by a ``threading.Lock`` first (``flock``
    does not exclude holders of the same description either).
    """

    inline = True

    def __init__(
        self, path: Path | str, calls_per_second: float, *, clock: Callable[[], float] = host_clock
    ) -> None:
        self.rate = check_rate(calls_per_second)
        self.path = Path(path)
        self.where = f"every process using {self.path.parent}"
        self._clock = clock
        self._guard = threading.Lock()
        self._fd: int | None = None
        if fcntl is None:  # pragma: no cover - Windows
            self._winlock = filelock.FileLock(f"{self.path}.lock")
        renew_after_fork(self)

    def _after_fork(self) -> None:
        self._guard = threading.Lock()
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)  # the parent's description: closing our copy leaves theirs
            except OSError:
                pass

    def close(self) -> None:
        with self._guard:
            fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def _open(self) -> int:
        if self._fd is None:
            try:
                try:
                    fd = os.open(self.path, _OPEN_FLAGS, 0o600)
                except FileNotFoundError:  # no token saved yet: its folder may not exist
                    self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                    fd = os.open(self.path, _OPEN_FLAGS, 0o600)
            except OSError as exc:
                raise TokenStorageError(f"cannot open rate-limit file {self.path}: {exc}") from exc
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                raise TokenStorageError(f"rate-limit file {self.path} is not a regular file")
            self._fd = fd
        return self._fd

    def _update(self, step: Callable[[float, float, float], tuple[float, float] | None]) -> None:
        """Read the record, let ``step(tat, slow_until, now)`` return a new one (or ``None``:
        unchanged), write it back; all under the thread lock and ``flock``."""
        with self._guard:
            fd = self._open()
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                else:  # pragma: no cover - Windows
                    self._winlock.acquire()
                try:
                    raw = os.pread(fd, _RECORD.size, 0)
                    tat, slow_until, boot = (
                        _RECORD.unpack(raw) if len(raw) == _RECORD.size else (0.0, 0.0, _BOOT)
                    )
                    if boot != _BOOT or not (math.isfinite(tat) and math.isfinite(slow_until)):
                        tat, slow_until = 0.0, 0.0  # another boot's, torn or foreign: afresh
                    new = step(tat, slow_until, self._clock())
                    if new is not None:
                        os.pwrite(fd, _RECORD.pack(*new, _BOOT), 0)
                finally:
                    if fcntl is not None:
                        fcntl.flock(fd, fcntl.LOCK_UN)
                    else:  # pragma: no cover - Windows
                        self._winlock.release()
            except OSError as exc:
                raise TokenStorageError(f"rate-limit file {self.path}: {exc}") from exc

    def try_acquire(self, max_wait_s: float = 0.0) -> float | None:
        result: list[float | None] = [None]
        limit = min(max_wait_s, MAX_WAIT_S)

        def step(tat: float, slow_until: float, now: float) -> tuple[float, float] | None:
            interval = self.interval_s * (SLOWDOWN_FACTOR if now < slow_until else 1.0)
            wait, new_tat = reserve(tat, now, interval, limit)
            result[0] = wait
            return None if wait is None else (new_tat, slow_until)

        self._update(step)
        return result[0]

    def _slow_down(self, hold_s: float) -> bool:
        started = [False]

        def step(tat: float, slow_until: float, now: float) -> tuple[float, float]:
            started[0] = now >= slow_until
            return tat, now + hold_s

        self._update(step)
        return started[0]

    def slowdown_left_s(self) -> float:
        left = [0.0]

        def step(tat: float, slow_until: float, now: float) -> None:
            left[0] = max(0.0, slow_until - now)

        self._update(step)
        return left[0]


_shared: dict[tuple[Path, float], FileRateLimiter] = {}
_shared_guard = threading.Lock()


def shared_file_rate_limiter(path: Path, calls_per_second: float) -> FileRateLimiter:
    """The one :class:`FileRateLimiter` of this process for ``path`` and rate (one descriptor,
    however many clients and storages use the file)."""
    rate = check_rate(calls_per_second)
    with _shared_guard:
        limiter = _shared.get((path, rate))
        if limiter is None:
            limiter = _shared[(path, rate)] = FileRateLimiter(path, rate)
        return limiter


def _fresh_guard() -> None:
    global _shared_guard
    _shared_guard = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_guard)
