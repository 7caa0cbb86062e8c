"""``redis_retry``: one Redis operation, retried through a failover until the caller's deadline.

Every Redis call of this library goes through it: the whole operation runs again, so the client
re-resolves the primary or slot table. What is retried must be safe to run twice: build a
pipeline inside ``fn`` (redis-py empties a failed one); a Lua script must recognise its effect."""

from __future__ import annotations

import contextlib
import logging
import random
import re
import sys
import time
from collections.abc import Awaitable, Callable
from functools import cache
from types import ModuleType
from typing import Final, TypeVar

from ..errors import TokenStorageError

__all__ = [
    "BACKOFF_CAP_S",
    "BACKOFF_FIRST_S",
    "REDIS_EXTRA_HINT",
    "failed_errors",
    "is_transient",
    "redis_retry",
    "redis_retry_async",
    "require_redis",
]

logger = logging.getLogger("kis_safe_token")

T = TypeVar("T")

#: First pause between attempts; pauses double up to :data:`BACKOFF_CAP_S`, jittered (x0.5-1)
#: so a herd does not hit the new primary in step.
BACKOFF_FIRST_S: Final = 0.05
#: Longest pause: a failover is noticed within half a second of its end.
BACKOFF_CAP_S: Final = 0.5

#: Replies of a demoted primary or a node mid-failover (``UNBLOCKED`` ends a ``BLPOP``).
_TRANSIENT_REPLIES: Final = ("UNBLOCKED", "READONLY", "LOADING", "MASTERDOWN", "TRYAGAIN")

#: How a missing ``[redis]`` extra is named in an ``ImportError``.
REDIS_EXTRA_HINT: Final = "pip install 'kis-safe-token[redis]'"

Errors = tuple[type[BaseException], ...]


def require_redis() -> ModuleType:
    """redis-py, imported on first use; ``ImportError`` naming the extra if it is missing."""
    try:
        import redis
    except ImportError:
        raise ImportError(f"the Redis backend needs redis-py: {REDIS_EXTRA_HINT}") from None
    return redis


def _classes() -> tuple[Errors, Errors, Errors, type[BaseException] | None]:
    """``(failed, transient, never, ResponseError)``; ``OSError`` alone while redis is unloaded."""
    redis = sys.modules.get("redis")
    return ((OSError,), (OSError,), (), None) if redis is None else _redis_classes(redis)


@cache
def _redis_classes(redis: ModuleType) -> tuple[Errors, Errors, Errors, type[BaseException]]:
    exc = redis.exceptions
    # ChildDeadlockedError: a pool whose lock a parent's thread held at fork() (not a RedisError).
    failed = (exc.RedisError, exc.ChildDeadlockedError, OSError)
    transient = (
        exc.ConnectionError,  # includes BusyLoadingError and Sentinel's MasterNotFoundError
        exc.TimeoutError,
        exc.ClusterError,  # ClusterDownError, MasterDownError
        exc.TryAgainError,
        exc.ReadOnlyError,
        exc.RedisClusterException,  # SlotNotCoveredError: the slot table is being rebuilt
        OSError,
    )
    # A wrong password or a missing ACL right does not heal by retrying.
    never = (
        exc.AuthenticationError,
        getattr(exc, "AuthorizationError", exc.AuthenticationError),
        exc.ChildDeadlockedError,
    )
    return failed, transient, never, exc.ResponseError


def failed_errors() -> Errors:
    """What a Redis call raises when it fails (what :func:`redis_retry` catches)."""
    return _classes()[0]


def __getattr__(name: str) -> Errors:
    # ``FAILED`` (that tuple, for an ``except`` elsewhere), loading redis-py on first use only.
    if name == "FAILED":
        with contextlib.suppress(ImportError):  # without the [redis] extra: OSError alone
            import redis  # noqa: F401 - loaded so that the tuple holds its errors
        return failed_errors()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a Redis error a failover, a restart or a dropped connection explains."""
    _, transient, never, response_error = _classes()
    if isinstance(exc, never):
        return False
    if isinstance(exc, transient):
        return True
    return (
        response_error is not None
        and isinstance(exc, response_error)
        and str(exc).upper().startswith(_TRANSIENT_REPLIES)
    )


def redis_retry(
    fn: Callable[[], T],
    *,
    deadline: float,
    what: str = "command",
    where: str = "Redis",
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``fn()`` (at least once), called again after each transient error until ``deadline``.

    ``deadline``: a ``time.monotonic()`` instant; ``what`` (``"GET"``) and ``where`` (a URL
    without its password) go into the :class:`TokenStorageError`, raised at once for an error
    that is not transient, else after ``deadline``."""
    attempts, started = 0, time.monotonic()
    while True:
        attempts += 1
        try:
            return fn()
        except failed_errors() as exc:
            sleep(_pause_or_raise(exc, attempts, started, deadline, what, where))


async def redis_retry_async(
    fn: Callable[[], Awaitable[T]],
    *,
    deadline: float,
    what: str = "command",
    where: str = "Redis",
) -> T:
    """:func:`redis_retry` for ``redis.asyncio``, pausing with ``asyncio.sleep``."""
    import asyncio  # here: ``import kis_safe_token`` loads no asyncio

    attempts, started = 0, time.monotonic()
    while True:
        attempts += 1
        try:
            return await fn()
        except failed_errors() as exc:
            await asyncio.sleep(_pause_or_raise(exc, attempts, started, deadline, what, where))


def brief(exc: BaseException) -> str:
    """``exc``'s message, short (redis-py's "No master found" reduced to its causes)."""
    text = str(exc)
    head, sep, tail = text.partition(" : <redis.")
    if sep:
        causes = sorted(set(re.findall(r" - (\w+:\w+)", tail)))
        text = f"{head} (from each sentinel: {', '.join(causes) or 'no answer'})"
    return text if len(text) <= 300 else text[:297] + "..."


def _pause_or_raise(
    exc: BaseException, attempts: int, started: float, deadline: float, what: str, where: str
) -> float:
    """The pause before the next attempt; :class:`TokenStorageError` if none is due."""
    now = time.monotonic()
    left = deadline - now
    if not is_transient(exc):
        raise TokenStorageError(f"Redis {what} failed ({where}): {brief(exc)}") from exc
    if left <= 0:
        raise TokenStorageError(
            f"Redis {what} failed ({where}) after {attempts} attempt(s) in "
            f"{now - started:.1f} s: {brief(exc)}"
        ) from exc
    if attempts == 1:
        logger.warning(
            "Redis %s failed (%s), retrying for up to %.1f s: %s", what, where, left, brief(exc)
        )
    bound = min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2 ** min(attempts - 1, 16))
    return min(random.uniform(bound / 2, bound), max(0.0, left))
