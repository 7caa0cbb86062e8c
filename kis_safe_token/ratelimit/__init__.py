"""Fleet-wide KIS call-rate limiters: one limit per app key, shared like the token.

- :class:`RateLimiter` (:mod:`.base`): the protocol.
- :class:`FileRateLimiter`: every process of the host (beside the token file).
- :class:`RedisRateLimiter`: every process of every host on one Redis (one Lua call per slot).
- :class:`MemoryRateLimiter`: this process only (stores with no shared place).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final

from .base import RateLimiter, RateLimitTimeout, check_rate
from .file import FileRateLimiter
from .memory import MemoryRateLimiter
from .redis import RedisRateLimiter

__all__ = [
    "CALLS_PER_SECOND_ENV",
    "KIS_CALLS_PER_SECOND_REAL",
    "KIS_CALLS_PER_SECOND_VIRTUAL",
    "SAFETY_MARGIN",
    "FileRateLimiter",
    "MemoryRateLimiter",
    "RateLimitTimeout",
    "RateLimiter",
    "RedisRateLimiter",
    "check_rate",
    "default_calls_per_second",
    "resolve_calls_per_second",
]

#: ``calls_per_second=None`` reads this variable first (a number; ``0`` turns the limiter off).
CALLS_PER_SECOND_ENV: Final = "KOREA_INVESTMENT_CALLS_PER_SECOND"

#: KIS's documented limits per app key: REST calls per second.
KIS_CALLS_PER_SECOND_REAL: Final = 20.0
KIS_CALLS_PER_SECOND_VIRTUAL: Final = 2.0
#: The share of KIS's limit the fleet is configured for by default: all of it (the slots'
#: :data:`~kis_safe_token.ratelimit.base.ARRIVAL_JITTER_S` slack keeps it safe).
SAFETY_MARGIN: Final = 1.0


def default_calls_per_second(mock: bool) -> float:
    """What ``calls_per_second=None`` means: KIS's limit for the account type."""
    base = KIS_CALLS_PER_SECOND_VIRTUAL if mock else KIS_CALLS_PER_SECOND_REAL
    return base * SAFETY_MARGIN


def resolve_calls_per_second(
    calls_per_second: float | None, *, mock: bool, env: Mapping[str, str] | None = None
) -> float | None:
    """The rate a client uses, or ``None`` (no limiter): ``calls_per_second`` if given (``0``:
    off), else ``$KOREA_INVESTMENT_CALLS_PER_SECOND`` (same meaning), else
    :func:`default_calls_per_second`. ``ValueError`` naming the argument or the variable."""
    name = "calls_per_second"
    value: object = calls_per_second
    if calls_per_second is None:
        raw = (os.environ if env is None else env).get(CALLS_PER_SECOND_ENV, "").strip()
        if not raw:
            return default_calls_per_second(mock)
        name = CALLS_PER_SECOND_ENV
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(
                f"{CALLS_PER_SECOND_ENV} must be a number of calls per second (0 turns the "
                "limiter off)"
            ) from None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
        return None
    return check_rate(value, name)
