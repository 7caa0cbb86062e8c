"""``FileRateLimiter``: the rate limit of every process of this user on this host.

The state is one 24-byte record beside the token file (the TAT and the end of a slowdown in
seconds of :func:`host_clock`, and the boot they belong to), updated in place under ``flock``
with no fsync (a record lost in a crash costs one early call). See docs/fleet.md.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
import struct
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Final, TypeVar

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
_T = TypeVar("_T")
#: ``step(tat, slow_until, now)`` of :meth:`FileRateLimiter._update`: the new record (``None``:
#: unchanged) and the caller's answer.
_Step = Callable[[float, float, float], tuple[tuple[float, float] | None, _T]]


#: Seconds of the host's clock that never steps, shared by every process of the host
#: (``CLOCK_BOOTTIME``; elsewhere than Linux ``time.monotonic``, host-wide there too).
host_clock: Final[Callable[[], float]] = (
    partial(time.clock_gettime, time.CLOCK_BOOTTIME)
    if hasattr(time, "CLOCK_BOOTTIME")
    else time.monotonic
)


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

    ``flock`` belongs to the open file description, so the descriptor is reopened in a forked
    child, and threads sharing it are serialized by a ``threading.Lock`` first.
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
        self._close()  # our copy of the parent's description: theirs stays open

    def close(self) -> None:
        with self._guard:
            self._close()

    def _close(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    __del__ = _close

    def _open(self) -> int:
        if self._fd is None:
            try:  # no token saved yet: its folder may not exist
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(self.path, _OPEN_FLAGS, 0o600)
            except OSError as exc:
                raise TokenStorageError(f"cannot open rate-limit file {self.path}: {exc}") from exc
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise TokenStorageError(f"rate-limit file {self.path} is not a regular file")
            self._fd = fd
        return self._fd

    def _update(self, step: _Step[_T]) -> _T:
        """Read the record and write back what ``step`` makes of it, under the thread lock and
        ``flock``; the step's answer."""
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
                    new, answer = step(tat, slow_until, self._clock())
                    if new is not None:
                        os.pwrite(fd, _RECORD.pack(*new, _BOOT), 0)
                    return answer
                finally:
                    if fcntl is not None:
                        fcntl.flock(fd, fcntl.LOCK_UN)
                    else:  # pragma: no cover - Windows
                        self._winlock.release()
            except OSError as exc:
                raise TokenStorageError(f"rate-limit file {self.path}: {exc}") from exc

    def try_acquire(self, max_wait_s: float = 0.0) -> float | None:
        limit = min(max_wait_s, MAX_WAIT_S)

        def step(
            tat: float, slow_until: float, now: float
        ) -> tuple[tuple[float, float] | None, float | None]:
            interval = self.interval_s * (SLOWDOWN_FACTOR if now < slow_until else 1.0)
            wait, new_tat = reserve(tat, now, interval, limit)
            return (None if wait is None else (new_tat, slow_until)), wait

        return self._update(step)

    def _slow_down(self, hold_s: float) -> bool:
        return self._update(lambda tat, slow_until, now: ((tat, now + hold_s), now >= slow_until))

    def slowdown_left_s(self) -> float:
        return self._update(lambda tat, slow_until, now: (None, max(0.0, slow_until - now)))


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
