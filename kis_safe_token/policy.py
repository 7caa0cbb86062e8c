"""The one call policy of every KIS client and integration: :class:`CallPolicy`, free of I/O,
answers each :class:`~kis_safe_token.kis.Verdict` with a :class:`Step`; :func:`drive` and
:func:`drive_async` are the only loops that sleep and send.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, TypeVar

from .kis import Verdict
from .ratelimit.base import ACQUIRE_TIMEOUT_S, RateLimiter, RateLimitTimeout

__all__ = [
    "RETRY_ATTEMPTS",
    "RETRY_BUDGET_S",
    "Action",
    "CallPolicy",
    "Step",
    "backoff_s",
    "drive",
    "drive_async",
]

RETRY_ATTEMPTS: Final = 4
RETRY_BUDGET_S: Final = 10.0
#: The first back-off; each next one doubles, up to ``BACKOFF_CAP_S``, all with full jitter.
BACKOFF_BASE_S: Final = 0.25
BACKOFF_CAP_S: Final = 2.0

R = TypeVar("R")


def backoff_s(attempt: int) -> float:
    """The pause before re-send number ``attempt`` (0-based) after ``EGW00201``: exponential,
    jittered over its upper half so a fleet refused in the same second does not return in it."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2.0**attempt)
    return ceiling * (0.5 + 0.5 * random.random())


class Action(enum.Enum):
    DELIVER = "give the caller this answer"
    REFRESH = "drop the token sent, send once more with the fleet's next one"
    RESEND = "send again after the pause"


@dataclass(frozen=True, slots=True)
class Step:
    """What to do after one answer; first, if ``penalize_s`` is set, tell the fleet's limiter of
    the ``EGW00201`` within that much of the budget."""

    action: Action
    pause_s: float = 0.0
    penalize_s: float | None = None


class CallPolicy:
    """The state of one logical call: its first send and every re-send (one budget)."""

    def __init__(
        self,
        *,
        backoff: Callable[[int], float] = backoff_s,
        clock: Callable[[], float] = time.monotonic,
        on_refusal: Callable[[Verdict], object] | None = None,
    ) -> None:
        self._on_refusal = on_refusal  # told of each EGW00201 and rejected token (the events)
        self._backoff = backoff
        self._clock = clock
        self._first_refusal: float | None = None
        self.resends = 0  # after EGW00201, for the caller's message
        self.refreshed = False  # the one re-send after a rejected token is used

    def after(self, verdict: Verdict) -> Step:
        """The step after an answer of ``verdict``."""
        refused = verdict in (Verdict.TOKEN_REJECTED, Verdict.TOO_MANY_CALLS)
        if refused and self._on_refusal is not None:
            self._on_refusal(verdict)
        if verdict is Verdict.TOKEN_REJECTED and not self.refreshed:
            self.refreshed = True
            return Step(Action.REFRESH)
        if verdict is not Verdict.TOO_MANY_CALLS:
            return Step(Action.DELIVER)
        if self._first_refusal is None:
            self._first_refusal = self._clock()
        left = self.left_s()
        if self.resends >= RETRY_ATTEMPTS or left - (pause := self._backoff(self.resends)) <= 0:
            return Step(Action.DELIVER, penalize_s=left)
        self.resends += 1
        return Step(Action.RESEND, pause_s=pause, penalize_s=left)

    def left_s(self) -> float:
        """The wait allowed for the next slot: the default, then what is left of the budget."""
        if self._first_refusal is None:
            return ACQUIRE_TIMEOUT_S
        return max(0.0, RETRY_BUDGET_S - (self._clock() - self._first_refusal))


def drive(
    policy: CallPolicy,
    answer: R,
    verdict_of: Callable[[R], Verdict],
    resend: Callable[[R], R | None],
    *,
    limiter: RateLimiter | None,
    throttle: Callable[[float], object] | None = None,
    refresh: Callable[[R], bool] | None = None,
) -> R:
    """Act on KIS's ``answer`` as ``policy`` says; the answer it delivers.

    ``limiter``: the fleet's, told of each ``EGW00201``; ``throttle(timeout_s)``: a slot before
    each re-send (``None``: ``resend`` takes its own); ``resend(last)``: send again (``None``:
    it cannot be); ``refresh(last)``: drop the token ``last`` carried, take the fleet's next
    (``False``: none better; ``None``: refreshed elsewhere). No slot in time
    (``RateLimitTimeout``) delivers the last answer."""
    while True:
        step = policy.after(verdict_of(answer))
        if step.penalize_s is not None and limiter is not None:
            limiter.penalize(timeout_s=step.penalize_s)
        if step.action is Action.DELIVER:
            return answer
        if step.action is Action.REFRESH:
            if refresh is None or not refresh(answer):
                return answer
        else:
            time.sleep(min(step.pause_s, policy.left_s()))
            if policy.left_s() <= 0:
                return answer
        try:
            if throttle is not None:
                throttle(policy.left_s())
            again = resend(answer)
        except RateLimitTimeout:
            return answer
        if again is None:
            return answer
        answer = again


async def drive_async(
    policy: CallPolicy,
    answer: R,
    verdict_of: Callable[[R], Verdict],
    resend: Callable[[R], Awaitable[R]],
    *,
    penalize: Callable[[float], Awaitable[object]],
    refresh: Callable[[R], Awaitable[bool]],
) -> R:
    """:func:`drive` for asyncio (``resend`` takes its own slot within ``policy.left_s()``)."""
    import asyncio  # here: a sync user of the library never imports asyncio

    while True:
        step = policy.after(verdict_of(answer))
        if step.penalize_s is not None:
            await penalize(step.penalize_s)
        if step.action is Action.DELIVER:
            return answer
        if step.action is Action.REFRESH:
            if not await refresh(answer):
                return answer
        else:
            await asyncio.sleep(min(step.pause_s, policy.left_s()))
            if policy.left_s() <= 0:
                return answer
        try:
            answer = await resend(answer)
        except RateLimitTimeout:
            return answer
