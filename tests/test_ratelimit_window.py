"""Exactly KIS's limit is safe: in any one-second window no more than ``rate`` reservations
begin (with the arrival-jitter allowance to spare), on every built-in limiter; and the simulator
counts any one-second window, as KIS does, not calendar seconds."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kis_safe_token.kis import PRICE_PATH
from kis_safe_token.ratelimit import (
    FileRateLimiter,
    MemoryRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    default_calls_per_second,
)
from kis_safe_token.ratelimit.base import ARRIVAL_JITTER_S
from kis_safe_token.testing import KisSimulator

RATES = st.one_of(
    st.sampled_from([1.0, 2.0, 3.0, 18.0, 20.0, 100.0]),
    st.floats(min_value=0.5, max_value=200.0, allow_nan=False),
)
#: Gaps between callers arriving (seconds of the fake clock): bursts, spread, idle.
GAPS = st.lists(
    st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=2.0)), min_size=1, max_size=120
)


def per_window(rate: float) -> int:
    """The most reservations any one-second window may hold at ``rate``."""
    return max(1, math.floor(rate))


def assert_no_window_overfull(starts: list[float], rate: float) -> None:
    """No window of one second *plus the jitter allowance* holds more than ``rate`` starts:
    the ``n + 1``-th start after any start is further than that."""
    starts = sorted(starts)
    n = per_window(rate)
    for first, last in zip(starts, starts[n:]):
        assert last - first >= 1.0 + ARRIVAL_JITTER_S - 1e-6, (rate, first, last)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def reservations(
    limiter: RateLimiter, clock: FakeClock, gaps: list[float], max_wait_s: float
) -> list[float]:
    """The start of every slot reserved by callers arriving ``gaps`` apart."""
    starts = []
    for gap in gaps:
        clock.now += gap
        wait = limiter.try_acquire(max_wait_s)
        if wait is not None:
            starts.append(clock.now + wait)
    return starts


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rate=RATES, gaps=GAPS, max_wait_s=st.floats(min_value=0.0, max_value=60.0))
def test_memory_limiter_never_begins_more_than_rate_slots_in_a_second(
    rate: float, gaps: list[float], max_wait_s: float
) -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(f"window-{uuid.uuid4().hex}", rate, clock=clock)
    assert_no_window_overfull(reservations(limiter, clock, gaps, max_wait_s), rate)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(rate=RATES, gaps=GAPS, max_wait_s=st.floats(min_value=0.0, max_value=60.0))
def test_file_limiter_never_begins_more_than_rate_slots_in_a_second(
    tmp_path: Path, rate: float, gaps: list[float], max_wait_s: float
) -> None:
    clock = FakeClock()
    limiter = FileRateLimiter(tmp_path / f"rate-{uuid.uuid4().hex}", rate, clock=clock)
    try:
        assert_no_window_overfull(reservations(limiter, clock, gaps, max_wait_s), rate)
    finally:
        limiter.close()


@pytest.mark.parametrize("rate", [1.0, 2.0, 7.5, 20.0, 50.0])
def test_redis_limiter_never_begins_more_than_rate_slots_in_a_second(
    redis_url: str, key_prefix: str, rate: float
) -> None:
    """Dense sample on the real server: the start of each slot read exactly from the TAT the
    script wrote (microseconds of the Redis clock, before its MAC), callers in bursts and
    gaps."""
    client = redis.Redis.from_url(redis_url)
    key = f"{key_prefix}:{{window}}:rate"
    limiter = RedisRateLimiter(lambda: client, key, rate)
    interval_us = math.ceil(limiter.interval_s * 1_000_000)
    starts = []
    for k in range(3 * per_window(rate) + 3):
        if k % 7 == 6:
            time.sleep(limiter.interval_s / 3)  # a gap: the next caller finds the queue shorter
        if limiter.try_acquire(10.0) is not None:
            tat = (client.get(key) or b"0").split(b":")[0]  # '<us>:<HMAC>'
            starts.append((int(tat) - interval_us) / 1_000_000)
    assert len(starts) > per_window(rate)
    assert_no_window_overfull(starts, rate)


def test_the_default_rate_is_kis_own_limit() -> None:
    """Safe at KIS's limit, so the default is the limit: the fleet reaches ~95 % of it."""
    assert default_calls_per_second(mock=False) == 20.0
    assert default_calls_per_second(mock=True) == 2.0


def test_the_simulator_counts_any_one_second_window_not_calendar_seconds() -> None:
    """10 calls in the last 0.3 s of a second and 10 in the first 0.3 s of the next: 20 in one
    second for KIS (a per-calendar-second count would see 10 and 10)."""
    now = [100.65]
    with KisSimulator(calls_per_second=10, clock=lambda: now[0]) as sim:
        codes = []
        with requests.Session() as session:
            for k in range(20):
                now[0] = 100.7 + k * 0.03
                resp = session.get(f"{sim.base_url}{PRICE_PATH}", headers={"appkey": "A"})
                codes.append(resp.json().get("msg_cd"))
            now[0] = 102.0  # a second after the last call: the window is empty again
            last = session.get(f"{sim.base_url}{PRICE_PATH}", headers={"appkey": "A"})
    assert codes[:10].count("EGW00201") == 0
    assert codes[10:].count("EGW00201") == 10
    assert last.json().get("msg_cd") != "EGW00201"
    assert sim.peak_calls_per_second["A"] == 10


def sleep_recorder() -> tuple[list[float], Callable[[float], None]]:
    slept: list[float] = []
    return slept, slept.append
