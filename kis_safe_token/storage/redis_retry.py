"""``redis_retry``: one Redis operation, retried through a failover until the caller's deadline.

Every Redis call of this library (token, lock, wake-up; rate limit and approval key too) goes
through :func:`redis_retry`. Why not redis-py's own ``Retry``: it retries inside one command,
often against the address the client cached before the failure (a dead Sentinel primary), and
it applies only to clients a library builds itself, never to an injected ``client=``. Here the
whole operation is called again, so the client gets to re-resolve between attempts:

- a Sentinel ``master_for`` client asks the sentinels for the primary on every reconnect;
- a ``RedisCluster`` re-reads the slot table after a connection error or ``MOVED``;
- a plain ``Redis`` reconnects to its (restarted) server.

Only transient errors are retried: connection and timeout errors, a Cluster that is down or says
``TRYAGAIN``, a demoted primary (``READONLY``, ``UNBLOCKED``), a replica still loading. Anything
else (a wrong password, a script error, a wrong type) fails at once. Whatever is retried must be
safe to run twice: build a pipeline inside ``fn`` (redis-py empties a pipeline that failed), and
make a Lua script recognise its own earlier effect (the lock script sees its own owner id).
"""

from __future__ import annotations

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

#: First pause between attempts; pauses double up to :data:`BACKOFF_CAP_S`, each drawn at
#: random between half its bound and its bound, so a herd does not hit the new primary in step.
BACKOFF_FIRST_S: Final = 0.05
#: Longest pause: a failover is noticed within half a second of its end.
BACKOFF_CAP_S: Final = 0.5

#: Replies a primary that was just demoted (or a node mid-failover) gives instead of running
#: the command: ``UNBLOCKED`` ends a ``BLPOP`` when its server turns replica.
_TRANSIENT_REPLIES: Final = ("UNBLOCKED", "READONLY", "LOADING", "MASTERDOWN", "TRYAGAIN")

#: How a missing ``[redis]`` extra is named in an ``ImportError``.
REDIS_EXTRA_HINT: Final = "pip install 'kis-safe-token[redis]'"

Errors = tuple[type[BaseException], ...]


def require_redis() -> ModuleType:
    """redis-py, imported on first use (``import kis_safe_token`` loads none of it: a
    file-storage user pays nothing); ``ImportError`` naming the extra if it is missing."""
    try:
        import redis
    except ImportError:
        raise ImportError(f"the Redis backend needs redis-py: {REDIS_EXTRA_HINT}") from None
    return redis


def _classes() -> tuple[Errors, Errors, Errors, type[BaseException] | None]:
    """``(failed, transient, never, ResponseError)``. Before redis-py is loaded, nothing it
    raises can exist: ``OSError`` alone, and redis-py stays unloaded (a file-storage user's
    process never loads it)."""
    redis = sys.modules.get("redis")
    if redis is None:
        return (OSError,), (OSError,), (), None
    return _redis_classes(redis)


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
    """What a Redis call raises when it fails: redis-py's errors and ``OSError`` (what
    :func:`redis_retry` catches)."""
    return _classes()[0]


def __getattr__(name: str) -> Errors:
    # ``FAILED`` (that tuple, for an ``except`` elsewhere) stays importable from this module
    # without redis-py being imported along with it: it is looked up, and redis-py loaded if
    # installed, on first use.
    if name == "FAILED":
        try:
            import redis  # noqa: F401 - loaded so that the tuple holds its errors
        except ImportError:  # pragma: no cover - exercised only without the [redis] extra
            pass
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
    """``fn()``, called again after each transient Redis error until ``deadline``.

    ``deadline`` is a ``time.monotonic()`` instant: ``fn`` runs at least once, the last
    attempt starts at the deadline at the latest (and may overrun it by one socket timeout).
    Pauses between attempts grow from :data:`BACKOFF_FIRST_S` to :data:`BACKOFF_CAP_S`,
    jittered. ``what`` (``"GET"``, ``"lock"``) and ``where`` (a URL without its password) go
    into the error.

    Raises :class:`TokenStorageError` (with the Redis error as its cause) at once for an error
    that is not transient, and after the deadline for one that is.
    """
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
    """:func:`redis_retry` for ``redis.asyncio``: ``await fn()`` again after each transient
    error until ``deadline``, pausing with ``asyncio.sleep`` (the loop keeps running)."""
    import asyncio  # here: ``import kis_safe_token`` loads no asyncio

    attempts, started = 0, time.monotonic()
    while True:
        attempts += 1
        try:
            return await fn()
        except failed_errors() as exc:
            await asyncio.sleep(_pause_or_raise(exc, attempts, started, deadline, what, where))


def brief(exc: BaseException) -> str:
    """``exc``'s message, short: redis-py's "No master found" lists a client repr per sentinel
    (hundreds of characters each); that becomes the causes alone."""
    text = str(exc)
    head, sep, tail = text.partition(" : <redis.")
    if sep:
        causes = sorted(set(re.findall(r" - (\w+:\w+)", tail)))
        text = f"{head} (from each sentinel: {', '.join(causes) or 'no answer'})"
    return text if len(text) <= 300 else text[:297] + "..."


def _pause_or_raise(
    exc: BaseException, attempts: int, started: float, deadline: float, what: str, where: str
) -> float:
    """The pause before the next attempt after ``exc``; :class:`TokenStorageError` if the error
    is not transient or the deadline has passed."""
    now = time.monotonic()
    if not is_transient(exc):
        raise TokenStorageError(f"Redis {what} failed ({where}): {brief(exc)}") from exc
    if now >= deadline:
        raise TokenStorageError(
            f"Redis {what} failed ({where}) after {attempts} attempt(s) in "
            f"{now - started:.1f} s: {brief(exc)}"
        ) from exc
    if attempts == 1:
        logger.warning(
            "Redis %s failed (%s), retrying for up to %.1f s: %s",
            what,
            where,
            deadline - now,
            brief(exc),
        )
    bound = min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2 ** min(attempts - 1, 16))
    return min(random.uniform(bound / 2, bound), max(0.0, deadline - now))
