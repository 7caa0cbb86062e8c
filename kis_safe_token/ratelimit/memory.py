"""``MemoryRateLimiter``: the rate limit within one process (for stores with no shared place)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from .base import MAX_WAIT_S, SLOWDOWN_FACTOR, RateLimiter, check_rate, reserve

__all__ = ["MemoryRateLimiter"]


class _State:
    __slots__ = ("lock", "slow_until", "tat")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tat = 0.0
        self.slow_until = 0.0


_states: dict[str, _State] = {}
_states_guard = threading.Lock()


def _state(name: str) -> _State:
    with _states_guard:
        return _states.setdefault(name, _State())


def _fresh_states() -> None:
    """In a forked child: a state lock a parent's thread held at fork() would never be freed."""
    global _states_guard
    _states_guard = threading.Lock()
    for state in _states.values():
        state.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_states)


class MemoryRateLimiter(RateLimiter):
    """Slots shared by every limiter of this process with the same ``name`` (an app key), and
    by nobody else: N processes on one app key send up to N x ``calls_per_second``.

    The default for a :class:`~kis_safe_token.TokenStorage` that has no shared place of its own;
    also the reference implementation of the contract.
    """

    inline = True

    def __init__(
        self, name: str, calls_per_second: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = check_rate(calls_per_second)
        self._state = _state(name)
        self._clock = clock

    def try_acquire(self, max_wait_s: float = 0.0) -> float | None:
        state = self._state
        with state.lock:
            now = self._clock()
            interval = self.interval_s * (SLOWDOWN_FACTOR if now < state.slow_until else 1.0)
            wait, state.tat = reserve(state.tat, now, interval, min(max_wait_s, MAX_WAIT_S))
        return wait

    def _slow_down(self, hold_s: float) -> bool:
        state = self._state
        with state.lock:
            now = self._clock()
            started = now >= state.slow_until
            state.slow_until = now + hold_s
        return started

    def slowdown_left_s(self) -> float:
        return max(0.0, self._state.slow_until - self._clock())
