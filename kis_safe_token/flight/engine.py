"""The single-flight protocol, written once and free of I/O (``docs/design.md``).

A generator: it yields a :class:`Step` and is sent what performing it gave (or thrown what it
raised); the drivers (:mod:`.drivers`, :mod:`.aio`) do the sleeping and the I/O.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Final, TypeAlias
from typing import Protocol as Shape

from ..errors import TokenIssueError, TokenStorageError
from ..events import Kind, emit
from ..failure import IssueFailure
from ..token import Token, mask
from .lock import Busy, IssuanceLock

__all__ = [
    "ATTEMPT",
    "EXTEND",
    "ISSUE",
    "READ_FAILURE",
    "RELEASE",
    "Flight",
    "Protocol",
    "Read",
    "RecordFailure",
    "Save",
    "Sleep",
    "Step",
    "Wait",
    "checked_token",
    "get_or_issue",
]

logger = logging.getLogger("kis_safe_token")

#: How often a holder sitting out ``EGW00133`` extends its lock and re-checks the cache, at most.
BACKOFF_SLICE_S: Final = 1.0


# -- the steps a driver performs --------------------------------------------------------------
class Step:
    """What the protocol asks its driver to do next."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Read(Step):
    """The stored token (``fresh``: not from a cache of the last read) -> ``Token | None``."""

    fresh: bool = False


@dataclass(frozen=True, slots=True)
class _Named(Step):
    name: str

    def __repr__(self) -> str:
        return self.name


#: The stored failure record -> ``IssueFailure | None``.
READ_FAILURE: Final = _Named("READ_FAILURE")
#: One non-blocking lock attempt -> :data:`~.lock.Attempt`.
ATTEMPT: Final = _Named("ATTEMPT")
#: Ask KIS (the caller's issue function) -> ``Token``, or raises ``TokenIssueError``.
ISSUE: Final = _Named("ISSUE")
#: Keep the lock alive -> ``None``.
EXTEND: Final = _Named("EXTEND")
#: Release whatever the lock holds (a no-op if nothing) -> ``None``.
RELEASE: Final = _Named("RELEASE")


@dataclass(frozen=True, slots=True)
class Wait(Step):
    """Wait as ``busy`` says, at most ``timeout_s`` -> what a wake-up brought, or ``None``."""

    busy: Busy
    timeout_s: float


@dataclass(frozen=True, slots=True)
class Sleep(Step):
    """Sleep ``seconds`` (a holder sitting out KIS's window) -> ``None``."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Save(Step):
    """Save the token KIS just issued, the lock's way, to the holder's deadline -> ``None``."""

    token: Token


@dataclass(frozen=True, slots=True)
class RecordFailure(Step):
    """Store a failure record for the fleet -> ``None``."""

    failure: IssueFailure


Protocol: TypeAlias = Generator[Step, Any, Any]


class Store(Shape):
    """What the engine asks of a store: a ``TokenStorage``, or an :class:`.memory.InMemory`."""

    refresh_margin_s: float
    wait_timeout: float
    #: Whether failures are recorded and ``EGW00133`` sat out here (a tier in front of a store
    #: leaves both to the store behind it).
    records_failures: bool

    def clock(self) -> float: ...
    def takeover_s(self) -> float: ...
    def issuance_lock(self, api_key: str, api_secret: str) -> IssuanceLock: ...
    def read_token(self, api_key: str, api_secret: str, *, fresh: bool = False) -> Token | None: ...
    def write_token(
        self, api_key: str, api_secret: str, token: Token, deadline: float | None = None
    ) -> None: ...
    def read_failure(self, api_key: str, api_secret: str) -> IssueFailure | None: ...
    def write_failure(self, api_key: str, api_secret: str, failure: IssueFailure) -> None: ...


# -- one flight: a store, one app key, one lock --------------------------------------------------
class Flight:
    """One call's view of the store: the credentials, the timings and the issuance lock."""

    __slots__ = ("_lock", "api_key", "api_secret", "storage")

    def __init__(self, storage: Store, api_key: str, api_secret: str) -> None:
        self.storage = storage
        self.api_key = api_key
        self.api_secret = api_secret
        self._lock: IssuanceLock | None = None

    @property
    def lock(self) -> IssuanceLock:
        """The store's issuance lock, made when first needed (a warm read needs none)."""
        if self._lock is None:
            self._lock = self.storage.issuance_lock(self.api_key, self.api_secret)
        return self._lock

    def usable(self, token: Token | None) -> bool:
        storage = self.storage
        return token is not None and token.is_valid(storage.clock(), storage.refresh_margin_s)

    def local_failure(self) -> IssueFailure | None:
        return local_failures.get(self.failure_key)

    def keep_local(self, failure: IssueFailure) -> None:
        """Record ``failure`` for this process only."""
        local_failures[self.failure_key] = failure

    @property
    def failure_key(self) -> tuple[str, str]:
        from ..crypto import fingerprint

        return self.api_key, fingerprint(self.api_key, self.api_secret)


#: Failures only this process acts on (its own clock's, or a store's with no place for them),
#: keyed by app key and credential fingerprint (never the secret itself).
local_failures: dict[tuple[str, str], IssueFailure] = {}


# -- the protocol ---------------------------------------------------------------------------------
def get_or_issue(flight: Flight) -> Protocol:
    """A usable token: the cached one, or one issued by exactly one caller fleet-wide."""
    token = yield Read()
    if flight.usable(token):
        if _told(flight):
            logger.debug("%s: loaded the token", _about(flight))
            _emit(flight, Kind.RELOADED, token)
        return token
    return (yield from _issue_flight(flight))


def _told(flight: Flight) -> bool:
    """Whether this flight's story is logged: a store's, not the in-process tier in front."""
    return flight.storage.records_failures


def _about(flight: Flight) -> str:
    return about(flight.storage, flight.api_key)


def _emit(
    flight: Flight,
    kind: Kind,
    token: Token | None = None,
    *,
    seconds: float = 0.0,
    waited_s: float = 0.0,
    code: str | None = None,
) -> None:
    emit(
        kind,
        flight.storage,
        flight.api_key,
        seconds=seconds,
        waited_s=waited_s,
        code=code or "",
        expires_at=None if token is None else token.expires_at,
    )


def about(storage: object, api_key: str) -> str:
    """Who is speaking, for a log line: the store and the app key, masked."""
    return f"{type(storage).__name__}, app key {mask(api_key, 4)}"


def noted(flight: Flight, exc: BaseException) -> BaseException:
    """What a step raised, for a driver to throw in: a store error is an event first."""
    if isinstance(exc, TokenStorageError) and _told(flight):
        _emit(flight, Kind.STORE_ERROR, code=type(exc).__name__)
    return exc


def _issue_flight(flight: Flight) -> Protocol:
    started = time.monotonic()
    waited_on: list[str] = []
    try:
        got = yield from _acquire(flight, waited_on)
        waited_ms = (time.monotonic() - started) * 1000
        if isinstance(got, Token):
            if _told(flight):
                logger.debug(
                    "%s: waited %.0f ms for %s and reloaded its token",
                    _about(flight),
                    waited_ms,
                    waited_on[-1] if waited_on else "the holder",
                )
                _emit(flight, Kind.RELOADED, got, waited_s=waited_ms / 1000)
            return got
        if isinstance(got, IssueFailure):
            raise got.error(flight.storage.clock())
        token = yield Read(fresh=True)  # another caller may have saved one just before we locked
        if not flight.usable(token):
            if waited_on and _told(flight):
                logger.info(
                    "%s: took over the issuance lock after %.1f s from %s, which left no token "
                    "(it died, or its save was lost)",
                    _about(flight),
                    waited_ms / 1000,
                    waited_on[-1],
                )
                _emit(flight, Kind.TOOK_OVER, waited_s=waited_ms / 1000)
            token = yield from _issue_recording(flight, waited_ms)
            local_failures.pop(flight.failure_key, None)
            yield from _save_issued(flight, token)
        elif _told(flight):
            logger.debug(
                "%s: took the lock and found the token another caller saved", _about(flight)
            )
        return token
    finally:
        yield RELEASE


def _acquire(flight: Flight, waited_on: list[str]) -> Protocol:
    """Attempt until held, or a usable token or an active failure shows up; each stage of the
    lock gets the store's full ``wait_timeout``. What it waited on is appended to ``waited_on``."""
    wait_timeout = flight.storage.wait_timeout
    stage, deadline = 0, time.monotonic() + wait_timeout
    while True:
        got = yield ATTEMPT
        if not isinstance(got, Busy):
            return got
        if not waited_on:
            waited_on.append(got.waiting_on)
            if _told(flight):
                logger.debug("%s: waiting for %s", _about(flight), got.waiting_on)
        if got.stage != stage:
            stage, deadline = got.stage, time.monotonic() + wait_timeout
        left = deadline - time.monotonic()
        if left <= 0:
            raise TokenStorageError(
                f"timed out after {wait_timeout:.1f} s (wait_timeout) waiting for "
                f"{got.waiting_on}: it is issuing the token, or sitting out KIS's "
                f"one-issue-per-minute window (EGW00133) before asking again; this caller "
                "holds nothing and the holder goes on"
            )
        seen = yield Wait(got, max(0.001, min(left, got.poll_s)))
        if seen is not None and not isinstance(seen, Busy):
            return seen


def _issue_recording(flight: Flight, waited_ms: float) -> Protocol:
    """Issue holding the lock, unless a recent failure says KIS is not worth asking yet; record
    a failure for the fleet (or, if it is this host's own, for this process)."""
    if not flight.storage.records_failures:
        return checked_token((yield ISSUE))
    # The most recent failure: this process's own while active, else the store's.
    previous = flight.local_failure()
    if previous is None or not previous.active(flight.storage.clock()):
        previous = (yield READ_FAILURE) or previous
    now = flight.storage.clock()
    if previous is not None and previous.active(now):
        raise previous.error(now)
    try:
        started = time.monotonic()
        token = yield from _issue_holding(flight)
        kis_s = time.monotonic() - started
        _emit(flight, Kind.ISSUED, token, seconds=kis_s, waited_s=waited_ms / 1000)
        logger.info(
            "%s: issued a token (expires %s KST) in %.0f ms, after %.0f ms for the lock",
            _about(flight),
            token.expired_kst,
            kis_s * 1000,
            waited_ms,
        )
        return token
    except TokenIssueError as exc:
        if exc.code:
            _emit(flight, Kind.KIS_ERROR, code=exc.code)
        failure = IssueFailure.after(exc, flight.storage.clock(), previous)
        if exc.local:
            flight.keep_local(failure)
        else:
            try:
                yield RecordFailure(failure)
            except TokenStorageError as store_exc:
                logger.warning("could not record the failed issuance: %s", store_exc)
        raise


def _issue_holding(flight: Flight) -> Protocol:
    """Ask KIS; after ``EGW00133`` sit out the window, re-checking the cache, and ask once more.
    The holder does not give up early: its waiters' ``wait_timeout`` covers this."""
    try:
        return checked_token((yield ISSUE))
    except TokenIssueError as exc:
        if exc.retry_after_s is None:
            raise
        _emit(flight, Kind.KIS_ERROR, code=exc.code)
        logger.info(
            "%s: KIS refused issuance (%s); sitting out its window: re-checking the cache, "
            "asking again in %.1f s",
            _about(flight),
            exc.code,
            exc.retry_after_s,
        )
        _emit(flight, Kind.SAT_OUT, seconds=exc.retry_after_s, code=exc.code)
        resume = time.monotonic() + exc.retry_after_s
    # A third of a lock that expires by itself, so it never lapses meanwhile.
    takeover = flight.storage.takeover_s()
    slice_s = min(BACKOFF_SLICE_S, takeover / 3) if takeover > 0 else BACKOFF_SLICE_S
    while (left := resume - time.monotonic()) > 0:
        yield Sleep(min(slice_s, left))
        yield EXTEND
        token = yield Read(fresh=True)
        if flight.usable(token):
            return token
    return checked_token((yield ISSUE))


def _save_issued(flight: Flight, token: Token) -> Protocol:
    """Save what KIS just issued. A store that fails now costs the others a wait, but the
    holder keeps its token: KIS would refuse another within the minute."""
    try:
        yield EXTEND
        yield Save(token)
    except TokenStorageError as exc:
        logger.error("could not save the token KIS just issued (kept in memory): %s", exc)


def checked_token(token: object) -> Token:
    """``token`` if the issue function returned a :class:`Token`; else a ``TypeError``."""
    if not isinstance(token, Token):
        raise TypeError(f"the issue function must return a Token, not {type(token).__name__}")
    return token
