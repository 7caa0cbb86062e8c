"""The call-rate limiter protocol and its arithmetic (GCRA), written once for every backend.

A :class:`RateLimiter` hands out *slots* :func:`slot_interval_s` apart to every process sharing
its state; the state is one number, the TAT (theoretical arrival time of the next free slot).
:meth:`RateLimiter.try_acquire` never sleeps; :meth:`RateLimiter.acquire` blocks. Why GCRA, and
why the slots leave :data:`ARRIVAL_JITTER_S` of slack: docs/fleet.md.
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Final, TypeVar

from ..errors import KisApiError

__all__ = [
    "ACQUIRE_TIMEOUT_S",
    "ARRIVAL_JITTER_S",
    "LATE_WAKE_S",
    "MAX_RETAKES",
    "MAX_CALLS_PER_SECOND",
    "MAX_WAIT_S",
    "MIN_CALLS_PER_SECOND",
    "SLOWDOWN_FACTOR",
    "MAX_SLOWDOWN_S",
    "SLOWDOWN_S",
    "STALE_AHEAD_S",
    "RateLimitTimeout",
    "RateLimiter",
    "check_rate",
    "reserve",
    "slot_interval_s",
]

logger = logging.getLogger("kis_safe_token")
_T = TypeVar("_T")

#: How long :meth:`RateLimiter.acquire` waits for a slot by default.
ACQUIRE_TIMEOUT_S: Final = 30.0
#: The longest wait anyone may reserve: bounds how far ahead a TAT can legitimately be.
MAX_WAIT_S: Final = 60.0
MIN_CALLS_PER_SECOND: Final = 0.1
MAX_CALLS_PER_SECOND: Final = 10_000.0
#: How far arrivals at KIS may drift from their slots with no one-second window holding more
#: than ``rate`` calls: any ``rate + 1`` consecutive slots span one second plus this.
ARRIVAL_JITTER_S: Final = 0.05
#: A caller that wakes later than this after its slot takes a new one: half the jitter
#: allowance, the other half is the network's.
LATE_WAKE_S: Final = ARRIVAL_JITTER_S / 2
#: How many slots in a row a late caller lets go before it goes on its reply's time.
MAX_RETAKES: Final = 3
#: After ``EGW00201`` the fleet's interval is multiplied by this (the rate halves) ...
SLOWDOWN_FACTOR: Final = 2.0
#: ... for this long (extended by every further ``EGW00201``).
SLOWDOWN_S: Final = 60.0
#: The longest slowdown one ``EGW00201`` may impose (a shared flag claiming more is cut to it).
MAX_SLOWDOWN_S: Final = 600.0
#: A TAT further ahead than any reservation can make was written before a clock step back or a
#: reboot: it is reset, not obeyed.
STALE_AHEAD_S: Final = MAX_WAIT_S + 2 * SLOWDOWN_FACTOR / MIN_CALLS_PER_SECOND


class RateLimitTimeout(KisApiError):
    """No call slot within the wait allowed (the fleet's queue is longer than the timeout)."""


def check_rate(calls_per_second: object, name: str = "calls_per_second") -> float:
    """``calls_per_second`` as a float in the allowed range; else a ``ValueError`` naming it."""
    if isinstance(calls_per_second, bool) or not isinstance(calls_per_second, (int, float)):
        kind = type(calls_per_second).__name__
        raise ValueError(f"{name} must be a number of calls per second, not {kind}")
    rate = float(calls_per_second)
    if not (math.isfinite(rate) and MIN_CALLS_PER_SECOND <= rate <= MAX_CALLS_PER_SECOND):
        raise ValueError(
            f"{name} must be between {MIN_CALLS_PER_SECOND:g} and {MAX_CALLS_PER_SECOND:g} "
            "(or 0 to turn the limiter off)"
        )
    return rate


def slot_interval_s(rate: float) -> float:
    """The spacing of slots at ``rate`` calls/s: ``(1 + ARRIVAL_JITTER_S)`` over the whole part
    of ``rate`` (over ``rate`` itself below 1/s)."""
    per_window = math.floor(rate) if rate >= 1 else rate
    return (1.0 + ARRIVAL_JITTER_S) / per_window


def reserve(tat: float, now: float, interval: float, max_wait: float) -> tuple[float | None, float]:
    """One GCRA step in seconds: ``(wait, new_tat)``; ``wait`` is ``None`` (and the TAT
    unchanged) if the next slot begins more than ``max_wait`` after ``now``."""
    if not math.isfinite(tat) or tat - now > STALE_AHEAD_S:
        tat = now
    start = max(tat, now)
    wait = start - now
    if wait > max_wait:
        return None, tat
    return wait, start + interval


class RateLimiter(ABC):
    """Slots for calls to KIS, ``rate`` per second, shared by everyone on the same state.

    Subclasses supply :meth:`try_acquire`, :meth:`_slow_down` and :meth:`slowdown_left_s`.
    """

    #: The configured calls per second (the slowed-down rate is ``rate / SLOWDOWN_FACTOR``).
    rate: float
    #: Where the state lives, for logs and ``kis-token status`` (no secret in it).
    where: str = "this process"
    #: How :meth:`acquire` sleeps (replaceable in tests, to play a host that oversleeps).
    sleep: Callable[[float], None] = staticmethod(time.sleep)
    #: A reservation is microseconds of local work: asyncio callers run it on the event loop;
    #: any other limiter's runs in a worker thread.
    inline: bool = False

    @property
    def interval_s(self) -> float:
        """The spacing of slots (:func:`slot_interval_s`; the slowed-down one is twice it)."""
        return slot_interval_s(self.rate)

    @abstractmethod
    def try_acquire(self, max_wait_s: float = 0.0) -> float | None:
        """Reserve the next slot if it begins within ``max_wait_s``: the seconds until it does
        (``0.0``: call now); ``None``: nothing reserved. Never sleeps. :class:`TokenStorageError`
        if the shared state cannot be reached."""

    @abstractmethod
    def _slow_down(self, hold_s: float) -> bool:
        """Slow the shared rate down for ``hold_s``; whether this call started the slowdown."""

    @abstractmethod
    def slowdown_left_s(self) -> float:
        """Seconds the learned slowdown still lasts (0: the full rate applies)."""

    def _reserve_by(self, max_wait_s: float, deadline: float | None) -> float | None:
        """:meth:`try_acquire`, done by ``deadline`` (``time.monotonic()``) where one is given:
        a limiter on a network (Redis) retries a failover no longer than that."""
        return self.try_acquire(max_wait_s)

    def _slow_down_by(self, hold_s: float, deadline: float | None) -> bool:
        """:meth:`_slow_down`, done by ``deadline`` where one is given (see :meth:`_reserve_by`)."""
        return self._slow_down(hold_s)

    def acquire(self, timeout_s: float = ACQUIRE_TIMEOUT_S) -> float:
        """Block until this caller's slot; the seconds slept. :class:`RateLimitTimeout` if no
        slot is free within ``timeout_s`` (at once if the queue is longer than that).

        A caller waking more than :data:`LATE_WAKE_S` after its slot may have begun takes a new
        one (its call would bunch with the next callers'), at most :data:`MAX_RETAKES` times."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        slept, misses = 0.0, 0
        while True:
            asked = time.monotonic()
            wait = self._reserve_by(min(max(0.0, deadline - asked), MAX_WAIT_S), deadline)
            if wait is None:
                raise self._no_slot(timeout_s)
            slot = self.slot_start(asked, wait, misses)
            if wait > 0:
                self.sleep(wait)
                slept += wait
            if not self.missed(time.monotonic() - slot):
                return slept
            misses += 1

    async def acquire_async(
        self,
        timeout_s: float = ACQUIRE_TIMEOUT_S,
        *,
        try_acquire: Callable[[float, float], Awaitable[float | None]] | None = None,
    ) -> float:
        """:meth:`acquire` for asyncio, awaiting ``asyncio.sleep``. The reservation runs inline
        unless ``try_acquire(max_wait_s, deadline)`` awaits it some other way (the asyncio
        client runs a Redis limiter's script on ``redis.asyncio``)."""
        import asyncio  # here: a sync user of the library never imports asyncio

        deadline = time.monotonic() + max(0.0, timeout_s)
        slept, misses = 0.0, 0
        while True:
            asked = time.monotonic()
            max_wait_s = min(max(0.0, deadline - asked), MAX_WAIT_S)
            if try_acquire is None:
                wait = self._reserve_by(max_wait_s, deadline)
            else:
                wait = await try_acquire(max_wait_s, deadline)
            if wait is None:
                raise self._no_slot(timeout_s)
            slot = self.slot_start(asked, wait, misses)
            if wait > 0:
                await asyncio.sleep(wait)
                slept += wait
            if not self.missed(time.monotonic() - slot):
                return slept
            misses += 1

    async def _off_loop(self, call: Callable[[], _T]) -> _T:
        """``call()`` inline for an ``inline`` limiter, else in a worker thread."""
        if self.inline:
            return call()
        import asyncio

        return await asyncio.to_thread(call)

    async def try_acquire_async(
        self, max_wait_s: float, deadline: float | None = None, async_client: Any = None
    ) -> float | None:
        """:meth:`try_acquire` (by ``deadline``) without blocking the loop. ``async_client``:
        the caller's ``redis.asyncio`` client, which a limiter on that Redis may run its
        script on."""
        return await self._off_loop(partial(self._reserve_by, max_wait_s, deadline))

    async def penalize_async(self, timeout_s: float | None = None) -> bool:
        """:meth:`penalize` without blocking the loop."""
        return await self._off_loop(partial(self.penalize, timeout_s=timeout_s))

    def on_client(self, client: Any) -> bool:
        """Whether this limiter's state lives on the Redis ``client``."""
        return False

    def _no_slot(self, timeout_s: float) -> RateLimitTimeout:
        return RateLimitTimeout(
            f"no KIS call slot within {timeout_s:.1f} s at {self.rate:g} calls/s "
            f"({self.where}): too many callers share this app key's limit"
        )

    @staticmethod
    def slot_start(asked: float, wait: float, misses: int) -> float:
        """When (``time.monotonic()``) a slot granted with ``wait`` may have begun: counted from
        when it was ``asked`` for, or after :data:`MAX_RETAKES` misses, from now."""
        return (asked if misses < MAX_RETAKES else time.monotonic()) + wait

    def missed(self, late_s: float) -> bool:
        """Whether a caller that woke ``late_s`` after its slot must take a new one."""
        return late_s > LATE_WAKE_S

    def penalize(self, hold_s: float = SLOWDOWN_S, *, timeout_s: float | None = None) -> bool:
        """KIS answered ``EGW00201`` anyway: halve the rate for ``hold_s`` for everyone sharing
        this state (logged once, by the caller that started it); whether this call started it.
        ``timeout_s``: the caller's time left, which bounds a Redis limiter's retries."""
        deadline = None if timeout_s is None else time.monotonic() + max(0.0, timeout_s)
        started = self._slow_down_by(hold_s, deadline)
        if started:
            logger.warning(
                "KIS answered EGW00201 (too many calls per second) although this fleet keeps to "
                "%g calls/s: another program may be using the app key; slowing down to %g "
                "calls/s for %.0f s (%s)",
                self.rate,
                self.rate / SLOWDOWN_FACTOR,
                hold_s,
                self.where,
            )
        return started

    def describe(self) -> str:
        """``"18 calls/s, shared by <where>"``, plus a slowdown in force (for status lines)."""
        text = f"{self.rate:g} calls/s, shared by {self.where}"
        left = self.slowdown_left_s()
        if left > 0:
            text += f" (slowed to {self.rate / SLOWDOWN_FACTOR:g}/s for {left:.0f} s more)"
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.rate:g}/s, {self.where})"
