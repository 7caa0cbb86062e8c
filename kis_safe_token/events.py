"""One typed event stream per process: what the library does with the token, rate and waits.

A callback runs in the emitting thread and must not block; one that raises is logged once
(docs/observability.md). Events name the app key masked, never a secret or a whole token.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from .kis import APPROVAL_SUFFIX

__all__ = ["Event", "Kind", "app_key_label", "emit", "subscribe"]

logger = logging.getLogger("kis_safe_token")


class Kind(str, Enum):
    """What happened. ``seconds`` and ``waited_s`` of an :class:`Event` say how long, per kind."""

    ISSUED = "issued"  #: KIS issued a token to this process (seconds: KIS latency)
    RELOADED = "reloaded"  #: waited for the holder, then read its token (waited_s)
    TOOK_OVER = "took_over"  #: took the lock from a holder that left no token (waited_s)
    SAT_OUT = "sat_out"  #: KIS said EGW00133; the holder sits out its window (seconds)
    RATE_WAITED = "rate_waited"  #: waited for a slot of the fleet's call rate (seconds)
    KIS_ERROR = "kis_error"  #: KIS answered with an error code (code)
    KIS_CALL = "kis_call"  #: a REST call was sent to KIS through a client
    REJECTED = "rejected"  #: KIS rejected the token (EGW00121/00123); it is refreshed
    REVOKED = "revoked"  #: the token was revoked at KIS
    LEASE_GRANTED = "lease_granted"  #: the seed lease let this process issue
    LEASE_EXPIRED = "lease_expired"  #: a lease holder's grant ran out before it released
    STORE_ERROR = "store_error"  #: the store could not be read or written (code: the error)


@dataclass(frozen=True, slots=True)
class Event:
    """One occurrence. ``app_key``: :func:`app_key_label`; ``backend``: the store's class name;
    ``what``: ``"token"`` or ``"approval_key"``; ``expires_at``: the token's expiry (epoch s)."""

    kind: Kind
    app_key: str
    backend: str
    what: str = "token"
    seconds: float = 0.0
    waited_s: float = 0.0
    code: str = ""
    expires_at: float | None = None
    pid: int = field(default_factory=os.getpid)


_subscribers: tuple[Callable[[Event], object], ...] = ()
_guard = threading.Lock()
_complained: set[int] = set()


def subscribe(callback: Callable[[Event], object]) -> Callable[[], None]:
    """Call ``callback(event)`` for every event of this process; returns the unsubscribe call."""
    global _subscribers
    with _guard:
        _subscribers = (*_subscribers, callback)

    def unsubscribe() -> None:
        global _subscribers
        with _guard:
            _subscribers = tuple(cb for cb in _subscribers if cb is not callback)
            _complained.discard(id(callback))

    return unsubscribe


def emit(
    kind: Kind,
    storage: object,
    api_key: str,
    *,
    seconds: float = 0.0,
    waited_s: float = 0.0,
    code: str = "",
    expires_at: float | None = None,
) -> None:
    """Tell every subscriber; a subscriber that raises is logged (once) and skipped."""
    if not _subscribers:
        return
    bare = api_key.removesuffix(APPROVAL_SUFFIX)
    what = "token" if bare == api_key else "approval_key"
    label, backend = app_key_label(bare), type(storage).__name__
    event = Event(kind, label, backend, what, seconds, waited_s, code, expires_at)
    for callback in _subscribers:
        try:
            callback(event)
        except Exception as exc:  # noqa: BLE001 - a subscriber never breaks a token path
            if id(callback) not in _complained:
                _complained.add(id(callback))
                logger.warning("event subscriber %r raised %s; ignored", callback, type(exc))


@functools.cache
def app_key_label(api_key: str) -> str:
    """The app key as events and metrics show it: its first 4 characters and 6 hex digits of its
    SHA-256 (KIS app keys share their first characters; the digest tells them apart)."""
    digest = hashlib.sha256(api_key.encode()).hexdigest()[:6]
    return f"{api_key[:4] if len(api_key) > 8 else ''}…{digest}"
