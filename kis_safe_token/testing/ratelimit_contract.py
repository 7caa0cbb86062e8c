"""The behaviour every :class:`~kis_safe_token.ratelimit.RateLimiter` must show, as a pytest
test class (requires pytest; docs/fleet.md shows how to run it on your own limiter)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

try:
    import pytest
except ImportError as exc:  # pragma: no cover - exercised only without pytest
    raise ImportError("kis_safe_token.testing.ratelimit_contract requires pytest") from exc

from ..ratelimit.base import (
    ARRIVAL_JITTER_S,
    LATE_WAKE_S,
    SLOWDOWN_FACTOR,
    RateLimiter,
    RateLimitTimeout,
    slot_interval_s,
)

__all__ = ["LimiterFactory", "RateLimiterContract"]

LimiterFactory = Callable[[str, float], RateLimiter]

#: 10 calls/s: slots just over 100 ms apart (:func:`slot_interval_s`).
RATE = 10.0
INTERVAL_S = slot_interval_s(RATE)
#: Clock resolution and float rounding: a wait may exceed its slot's offset by no more.
EPSILON_S = 0.001


def since(started: float) -> float:
    """Seconds since ``started``: how far a reported wait may fall short of its slot's offset."""
    return time.monotonic() - started + EPSILON_S


def new_name() -> str:
    return f"PSlimit{uuid.uuid4().hex[:20]}"


class RateLimiterContract:
    """Slots spaced :func:`slot_interval_s` apart (no more than ``rate`` in any second), shared
    by every object on the same state, independent per name; ``try_acquire`` never reserves
    past ``max_wait_s``; ``acquire`` times out at once; ``penalize`` halves the rate, started
    once; threads get distinct slots."""

    @pytest.fixture
    def make_limiter(self) -> LimiterFactory:
        """Override: a factory of new limiter objects on state private to the test."""
        raise NotImplementedError(f"{type(self).__name__} must override the make_limiter fixture")

    def test_first_slot_is_now_and_the_next_ones_are_spaced_by_the_interval(
        self, make_limiter: LimiterFactory
    ) -> None:
        limiter = make_limiter(new_name(), RATE)
        assert limiter.rate == RATE
        started = time.monotonic()
        waits, slack = [], []
        for _ in range(4):
            waits.append(limiter.try_acquire(1.0))
            slack.append(since(started))
        assert waits[0] == 0.0
        for k, wait in enumerate(waits[1:], start=1):
            assert wait is not None
            assert k * INTERVAL_S - slack[k] <= wait <= k * INTERVAL_S + EPSILON_S

    def test_a_slot_beyond_max_wait_is_refused_and_not_reserved(
        self, make_limiter: LimiterFactory
    ) -> None:
        limiter = make_limiter(new_name(), 1.0)  # slots a second apart: no stall crosses one
        assert limiter.try_acquire(0.0) == 0.0
        assert limiter.try_acquire(0.0) is None  # the next slot is ~1 s away
        assert limiter.try_acquire(0.0) is None
        wait = limiter.try_acquire(2.0)  # the refusals reserved nothing: this is slot 2, not 4
        assert wait is not None and wait <= limiter.interval_s + EPSILON_S

    def test_two_objects_on_one_name_share_the_rate(self, make_limiter: LimiterFactory) -> None:
        name = new_name()
        first, second = make_limiter(name, RATE), make_limiter(name, RATE)
        started = time.monotonic()
        assert first.try_acquire(1.0) == 0.0
        wait = second.try_acquire(1.0)
        assert wait is not None and wait >= INTERVAL_S - since(started)

    def test_names_do_not_share_a_rate(self, make_limiter: LimiterFactory) -> None:
        assert make_limiter(new_name(), RATE).try_acquire(0.0) == 0.0
        assert make_limiter(new_name(), RATE).try_acquire(0.0) == 0.0

    def test_acquire_blocks_until_the_slot_and_times_out_at_once_if_too_far(
        self, make_limiter: LimiterFactory
    ) -> None:
        limiter = make_limiter(new_name(), RATE)
        started = time.monotonic()
        first = limiter.acquire(1.0)
        # At once, unless its own reservation's answer came late (a loaded box): then it took
        # the next slot rather than bunch with it, and slept only after that late answer.
        assert first == 0.0 or (time.monotonic() - started) - first > LATE_WAKE_S
        waited = limiter.acquire(1.0)
        # It returned no earlier than its slot, an interval after the first reservation, and
        # reports what it slept (0 only if this thread got there late, past the slot).
        assert time.monotonic() - started >= INTERVAL_S - EPSILON_S
        assert 0.0 <= waited <= INTERVAL_S + EPSILON_S
        for _ in range(3):
            limiter.try_acquire(1.0)
        with pytest.raises(RateLimitTimeout, match="no KIS call slot within"):
            limiter.acquire(0.05)

    def test_penalize_halves_the_rate_and_says_who_started_it(
        self, make_limiter: LimiterFactory
    ) -> None:
        name = new_name()
        limiter, other = make_limiter(name, RATE), make_limiter(name, RATE)
        assert limiter.slowdown_left_s() == 0.0
        assert limiter.penalize(5.0) is True
        assert other.penalize(5.0) is False  # already slowed: only the first one logs
        assert 4.0 < other.slowdown_left_s() <= 5.0
        assert "slowed to" in other.describe()
        started = time.monotonic()
        assert limiter.try_acquire(1.0) == 0.0
        wait = limiter.try_acquire(1.0)
        assert wait is not None and wait >= SLOWDOWN_FACTOR * INTERVAL_S - since(started)

    def test_threads_get_distinct_slots(self, make_limiter: LimiterFactory) -> None:
        rate = 50.0
        limiter = make_limiter(new_name(), rate)
        taken: list[float | None] = []

        def take() -> None:
            for _ in range(10):
                taken.append(limiter.try_acquire(5.0))  # list.append is atomic

        started = time.monotonic()
        threads = [threading.Thread(target=take) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(taken) == 80 and None not in taken
        # No update lost: the 80 slots are consumed, so the next one is 80 intervals after the
        # first (less the time that passed), not fewer.
        nxt = limiter.try_acquire(5.0)
        assert nxt is not None and nxt >= 80 * slot_interval_s(rate) - since(started)

    def test_no_second_holds_more_than_rate_slots_from_a_burst(
        self, make_limiter: LimiterFactory
    ) -> None:
        """``rate + 1`` slots taken at once span a second and half the jitter allowance (the
        other half is this test's clock): no one-second window KIS counts holds more than rate."""
        for rate in (2.0, 5.0, 20.0):
            limiter = make_limiter(new_name(), rate)
            started = time.monotonic()
            waits = [limiter.try_acquire(5.0) for _ in range(int(rate) + 1)]
            assert None not in waits
            last = waits[-1]
            assert last is not None and last >= 1.0 + ARRIVAL_JITTER_S / 2 - since(started)
