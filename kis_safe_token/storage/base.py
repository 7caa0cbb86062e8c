"""The storage interface and the single-flight issuance protocol, written once.

``get_or_issue`` is a template method: a valid cached token is returned without any lock;
otherwise the backend's :class:`IssuanceLock` either is acquired or hands over a token that
another process saved meanwhile (or the failure it met); the holder looks again, issues only if
still needed, saves and releases (waking the waiters). Backends supply the primitives ``_read``,
``_write``, ``_read_failure``, ``_write_failure``, ``_compare_and_delete`` and their lock,
``_issuance_lock``.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, TypeGuard

from .._faults import fault_point
from ..crypto import Sealer, fingerprint
from ..errors import TokenIssueError, TokenStorageError
from ..failure import IssueFailure
from ..kis import HTTP_TIMEOUT_S, ISSUE_WINDOW_S
from ..ratelimit.base import RateLimiter
from ..ratelimit.memory import MemoryRateLimiter
from ..token import REFRESH_MARGIN_S, Token

if TYPE_CHECKING:
    from .lease import LeaseRecords, SeedLease

__all__ = [
    "IssuanceLock",
    "LocalIssuanceLock",
    "SealedTokenStorage",
    "TokenStorage",
    "default_wait_timeout",
]

logger = logging.getLogger("kis_safe_token")

BACKOFF_SLICE_S = 1.0
WAIT_SLACK_S = 5.0

IssueFn = Callable[[], Token]
Acquired: TypeAlias = "Literal[True] | Token | IssueFailure"
"""What :meth:`IssuanceLock.acquire` hands back: ``True`` (held), a token another process saved
meanwhile, or the failure it recorded."""


class IssuanceLock(ABC):
    """The lock that lets one caller at a time issue a token for one app key.

    Modelled on redis-py's ``Lock`` and msal-extensions' ``CrossPlatLock``, with one twist: a
    waiter also watches the store, so :meth:`acquire` returns as soon as the holder's token (or
    its failure) appears, instead of taking the lock only to find the work done.
    """

    @abstractmethod
    def acquire(self, deadline: float) -> Acquired:
        """``True`` once held; or the usable :class:`Token` / active :class:`IssueFailure` that
        showed up meanwhile. :class:`TokenStorageError` past ``deadline`` (``time.monotonic()``)."""

    def extend(self) -> None:  # noqa: B027 - locks that do not expire need nothing
        """Keep holding a lock that expires by itself (called while the holder works)."""

    def save_deadline(self) -> float | None:
        """Until when (``time.monotonic()``) the holder retries saving the token KIS just gave
        it; ``None``: the store's own default. A Redis lock: its holder's deadline, at least
        ``retry_timeout_s`` from now."""
        return None

    @abstractmethod
    def release(self) -> None:
        """Release the lock (and wake the waiters, where the backend has any)."""


class LocalIssuanceLock(IssuanceLock):
    """A lock within this process only: the default for a storage that has no shared lock."""

    def __init__(self, api_key: str) -> None:
        self._lock = _local_lock(api_key)

    def acquire(self, deadline: float) -> Acquired:
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TokenStorageError("timed out waiting for this process's own issuance")
        return True

    def release(self) -> None:
        self._lock.release()


def default_wait_timeout(takeover_s: float = 0.0) -> float:
    """How long a waiter waits for another's issuance by default: the holder's worst case.

    A holder may need ``takeover_s`` to be replaced if it died (a Redis lock's ``lock_ttl``), one
    KIS call, an ``EGW00133`` window sat out, and a second KIS call. A waiter that gave up sooner
    would fail while the fleet is about to hold a token.
    """
    return takeover_s + ISSUE_WINDOW_S + 2 * sum(HTTP_TIMEOUT_S) + WAIT_SLACK_S


def check_seconds(name: str, value: float, *, low: float = 0.0, high: float = 86_400.0) -> float:
    """``value`` as a float if ``low < value <= high``; else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not (math.isfinite(value) and low < value <= high):
        raise ValueError(f"{name} must be more than {low:g} and at most {high:g} seconds")
    return float(value)


class TokenStorage(ABC):
    """Where tokens live between processes: the seed's four methods plus ``get_or_issue``.

    A subclass that implements only the seed's four methods still works with ``get_or_issue``,
    single-flight within its process (an in-process lock). The built-in backends override the
    primitives to make it single-flight across processes and hosts.
    """

    refresh_margin_s: float = REFRESH_MARGIN_S
    wait_timeout: float = default_wait_timeout()
    clock: Callable[[], float] = staticmethod(time.time)
    _lease: SeedLease | None = None  # the seed-protocol lease, where a backend has one

    # -- the seed's interface --------------------------------------------------------------------
    @abstractmethod
    def save_token(self, token_data: dict[str, Any]) -> bool:
        """Save a token (the seed's ``token_data`` dict); ``False`` if it could not be saved."""

    @abstractmethod
    def load_token(self, api_key: str, api_secret: str) -> dict[str, Any] | None:
        """The valid token of these credentials as a ``token_data`` dict, or ``None``."""

    @abstractmethod
    def check_token_valid(self, api_key: str, api_secret: str) -> bool:
        """Whether a valid token of these credentials is stored."""

    @abstractmethod
    def delete_token(self, api_key: str, api_secret: str) -> bool:
        """Forget the token of this app key; ``False`` if the store could not be changed."""

    # -- timing ----------------------------------------------------------------------------------
    def takeover_s(self) -> float:
        """How long a dead holder can keep others from issuing (0: its lock dies with it)."""
        return 0.0

    def check_timing(
        self, *, http_timeout_s: float, issue_window_s: float = ISSUE_WINDOW_S
    ) -> None:
        """``ValueError`` unless a waiter outlasts a holder's worst case with these timings.

        The worst case: a dead holder taken over (:meth:`takeover_s`), one KIS call of up to
        ``http_timeout_s``, an ``EGW00133`` window of ``issue_window_s`` sat out, a second call.
        Clients call this with their HTTP timeout; call it yourself when you issue by hand.
        """
        need = self.takeover_s() + issue_window_s + 2 * http_timeout_s
        if self.wait_timeout < need:
            raise ValueError(
                f"wait_timeout ({self.wait_timeout:.1f} s) must be at least {need:.1f} s: "
                f"takeover {self.takeover_s():.1f} s + KIS issue window {issue_window_s:.1f} s "
                f"+ 2 x HTTP timeout {http_timeout_s:.1f} s, or a waiter gives up while the "
                "fleet is about to hold a token"
            )

    # -- the call-rate limit -----------------------------------------------------------------------
    def rate_limiter(self, api_key: str, calls_per_second: float) -> RateLimiter:
        """The limiter of KIS calls for ``api_key``, shared as widely as this store shares tokens.

        This default counts within this process only (logged once per store class): a store
        that every process of the fleet reaches should override it with a limiter on that same
        backend, or clients be given ``rate_limiter=``. ``ValueError`` for a rate out of range.
        """
        if type(self) not in _noted_per_process:
            _noted_per_process.add(type(self))
            logger.info(
                "%s has no shared rate limiter: KIS calls are limited per process "
                "(pass rate_limiter= to share one across the fleet)",
                type(self).__name__,
            )
        return MemoryRateLimiter(api_key, calls_per_second)

    # -- single flight ---------------------------------------------------------------------------
    def get_or_issue(self, api_key: str, api_secret: str, issue: IssueFn) -> Token:
        """A usable token: the cached one, or one issued by exactly one caller fleet-wide.

        ``issue`` calls KIS and returns the :class:`Token`; it runs only while holding the
        issuance lock and only if, looking again under the lock, no usable token is stored. If it
        raises :class:`TokenIssueError` with ``retry_after_s`` (KIS said ``EGW00133``: someone,
        perhaps a holder that died after KIS answered, issued within the minute), the holder
        keeps the lock, re-checks the cache while it sits out the window, and asks once more.
        Any other failure is recorded for the fleet (:mod:`kis_safe_token.failure`): waiters and
        later callers get the same :class:`TokenIssueError` at once instead of each asking KIS.

        Raises :class:`TokenStorageError` if the store is unreachable or the wait exceeds
        ``wait_timeout``, and :class:`TokenIssueError` if KIS refuses.
        """
        token = self._read(api_key, api_secret)
        if self._usable(token):
            return token
        if self._lease is not None:
            return self._get_or_issue_leased(self._lease, api_key, api_secret, issue)
        return self._get_or_issue_locked(api_key, api_secret, issue)

    def _get_or_issue_leased(
        self, lease: SeedLease, api_key: str, api_secret: str, issue: IssueFn
    ) -> Token:
        """With the seed-protocol lease on, seed clients issue under the lease, not under the
        issuance lock: take the lease first (or wait in it for a seed holder's save), so a fleet
        mixing them with ours issues once. The save ends the lease; a failure releases it. A
        token still valid but inside the refresh margin is renewed under the lock alone (seed
        clients, which still see it valid, do not issue)."""
        # A recorded failure fails callers fast, as it does without the lease: a failed holder
        # leaves the quiet mark, and waiting in it would keep them for the whole window.
        held = not lease.wait_for_grant(
            api_key, api_secret, partial(self._raise_failed, api_key, api_secret)
        )
        if not held:
            token = self._read(api_key, api_secret, fresh=True)
            if self._usable(token):
                return token
        try:
            return self._get_or_issue_locked(api_key, api_secret, issue)
        finally:
            if held:
                lease.released_by_delete(api_key)  # a no-op after our save, which ended it

    def _get_or_issue_locked(self, api_key: str, api_secret: str, issue: IssueFn) -> Token:
        lock = self._issuance_lock(api_key, api_secret)
        got = lock.acquire(time.monotonic() + self.wait_timeout)
        if isinstance(got, Token):
            return got
        if isinstance(got, IssueFailure):
            raise got.error(self.clock())
        try:
            token = self._read(api_key, api_secret, fresh=True)
            if not self._usable(token):
                token = self._issue_recording(lock, api_key, api_secret, issue)
                self._note_success(api_key, api_secret)
                self._save_issued(lock, api_key, api_secret, token)
            return token
        finally:
            lock.release()

    def _save_issued(self, lock: IssuanceLock, api_key: str, api_secret: str, token: Token) -> None:
        """Save what KIS just issued. A store that fails now costs the others a wait, but the
        holder keeps its token: KIS would refuse another within the minute."""
        try:
            lock.extend()
            deadline = lock.save_deadline()
            if self._lease is not None:  # also ends our lease, marks the window
                self._lease.save(api_key, api_secret, token, deadline=deadline)
            else:
                self._write_until(api_key, api_secret, token, deadline)
        except TokenStorageError as exc:
            logger.error("could not save the token KIS just issued (kept in memory): %s", exc)
            return
        fault_point("storage.after_save")

    def invalidate_token(self, api_key: str, api_secret: str, access_token: str) -> bool:
        """Delete the stored token only if it is still ``access_token`` (compare-and-delete).

        N workers that saw the same token rejected make one deletion, not N; a worker that is
        late never deletes the fresh token another one just saved. Returns whether it deleted.
        """
        return self._compare_and_delete(api_key, api_secret, access_token)

    def _issue_recording(
        self, lock: IssuanceLock, api_key: str, api_secret: str, issue: IssueFn
    ) -> Token:
        """Issue holding the lock, unless a recent failure says KIS is not worth asking yet;
        record a failure for the fleet (or, if it is this host's own, for this process)."""
        previous = self._failure(api_key, api_secret)
        self._raise_if_held(previous)
        try:
            return self._issue_holding(lock, api_key, api_secret, issue)
        except TokenIssueError as exc:
            failure = self._note_failure(api_key, api_secret, exc, previous)
            if failure is not None:
                try:
                    self._write_failure(api_key, api_secret, failure)
                except TokenStorageError as store_exc:
                    logger.warning("could not record the failed issuance: %s", store_exc)
            raise

    def _raise_failed(self, api_key: str, api_secret: str) -> None:
        """Raise the recorded failure of these credentials while its hold lasts."""
        self._raise_if_held(self._failure(api_key, api_secret))

    def _failure(self, api_key: str, api_secret: str) -> IssueFailure | None:
        """The most recent failure: this process's own, else the store's."""
        local = self._local_failure(api_key, api_secret)
        if local is not None and local.active(self.clock()):
            return local
        return self._read_failure(api_key, api_secret) or local

    # -- the pure parts of the protocol, shared with the asyncio side (storage/aio.py) ----------
    def _local_failure(self, api_key: str, api_secret: str) -> IssueFailure | None:
        """This process's own record of the last failed issuance of these credentials."""
        return _local_failures.get(_failure_key(api_key, api_secret))

    def _raise_if_held(self, previous: IssueFailure | None) -> None:
        """Re-raise ``previous`` while its hold lasts: KIS is not worth asking yet."""
        now = self.clock()
        if previous is not None and previous.active(now):
            raise previous.error(now)

    def _note_failure(
        self, api_key: str, api_secret: str, exc: TokenIssueError, previous: IssueFailure | None
    ) -> IssueFailure | None:
        """The record of a failed issuance: kept by this process if it is this host's own
        (``None`` is returned), else returned for the caller to store for the fleet."""
        failure = IssueFailure.after(exc, self.clock(), previous)
        if exc.local:
            _local_failures[_failure_key(api_key, api_secret)] = failure
            return None
        return failure

    def _note_success(self, api_key: str, api_secret: str) -> None:
        """A token was issued: this process's own failure record no longer holds anyone back."""
        _local_failures.pop(_failure_key(api_key, api_secret), None)

    def _resume_at(self, exc: TokenIssueError) -> float:
        """When (``time.monotonic()``) a holder refused with ``EGW00133`` asks KIS again;
        ``exc`` itself is raised if KIS refused for any other reason."""
        if exc.retry_after_s is None:
            raise exc
        logger.warning(
            "KIS refused issuance (%s); re-checking the cache, retrying in %.1f s",
            exc.code,
            exc.retry_after_s,
        )
        return time.monotonic() + exc.retry_after_s

    def _backoff_slice_s(self) -> float:
        """How often a holder sitting out ``EGW00133`` extends its lock and re-checks the cache:
        a third of a lock that expires by itself, so it never lapses meanwhile."""
        takeover = self.takeover_s()
        return min(BACKOFF_SLICE_S, takeover / 3) if takeover > 0 else BACKOFF_SLICE_S

    def _issue_holding(
        self, lock: IssuanceLock, api_key: str, api_secret: str, issue: IssueFn
    ) -> Token:
        """Ask KIS; after ``EGW00133`` sit out the window, re-checking the cache, and ask once
        more. The holder does not give up early: its waiters' ``wait_timeout`` covers this."""
        try:
            return _issued(issue)
        except TokenIssueError as exc:
            resume = self._resume_at(exc)
        slice_s = self._backoff_slice_s()
        while (left := resume - time.monotonic()) > 0:
            time.sleep(min(slice_s, left))
            lock.extend()
            token = self._read(api_key, api_secret, fresh=True)
            if self._usable(token):
                return token
        return _issued(issue)

    def _usable(self, token: Token | None) -> TypeGuard[Token]:
        """Whether ``token`` is there and good beyond the refresh margin."""
        return token is not None and token.is_valid(self.clock(), self.refresh_margin_s)

    # -- primitives; the defaults build on the seed methods and an in-process lock -------------
    def _read(self, api_key: str, api_secret: str, *, fresh: bool = False) -> Token | None:
        data = self.load_token(api_key, api_secret)
        return Token.from_token_data(data) if data else None

    def _write(self, api_key: str, api_secret: str, token: Token) -> None:
        """Save ``token`` through the seed's ``save_token`` (stores with a failure record clear it
        here too: a success ends an outage's hold)."""
        if not self.save_token(token.to_token_data(api_key, api_secret)):
            raise TokenStorageError(f"{type(self).__name__}.save_token failed")

    def _write_until(
        self, api_key: str, api_secret: str, token: Token, deadline: float | None
    ) -> None:
        """:meth:`_write`, retried through a store's transient errors until ``deadline``
        (``time.monotonic()``; ``None``: the store's default) where the store retries at all."""
        self._write(api_key, api_secret, token)

    def _read_failure(self, api_key: str, api_secret: str) -> IssueFailure | None:
        """The failure record in the store (the default store has none: see ``_write_failure``)."""
        return None

    def _write_failure(self, api_key: str, api_secret: str, failure: IssueFailure) -> None:
        """Share ``failure`` with the fleet; by default with this process only."""
        _local_failures[_failure_key(api_key, api_secret)] = failure

    def _compare_and_delete(self, api_key: str, api_secret: str, access_token: str) -> bool:
        with _local_lock(api_key):
            token = self._read(api_key, api_secret, fresh=True)
            if token is None or token.access_token != access_token:
                return False
            return self.delete_token(api_key, api_secret)

    def _issuance_lock(self, api_key: str, api_secret: str) -> IssuanceLock:
        """The lock guarding issuance for this app key; by default within this process only."""
        return LocalIssuanceLock(api_key)


_noted_per_process: set[type[TokenStorage]] = set()
_local_locks: dict[str, threading.Lock] = {}
_local_locks_guard = threading.Lock()
_local_failures: dict[tuple[str, str], IssueFailure] = {}
"""Failures only this process may act on: its own clock's, and those of a store without a
place for them. Keyed by app key and credential fingerprint (never the secret itself)."""


def _issued(issue: IssueFn) -> Token:
    return checked_token(issue())


def checked_token(token: object) -> Token:
    """``token`` if the issue function returned a :class:`Token`; else a ``TypeError``."""
    if not isinstance(token, Token):
        raise TypeError(f"the issue function must return a Token, not {type(token).__name__}")
    return token


def _failure_key(api_key: str, api_secret: str) -> tuple[str, str]:
    return api_key, fingerprint(api_key, api_secret)


def _local_lock(api_key: str) -> threading.Lock:
    with _local_locks_guard:
        return _local_locks.setdefault(api_key, threading.Lock())


def _fresh_local_locks() -> None:
    """In a forked child: locks a parent's thread held at the fork would never be released."""
    global _local_locks_guard
    _local_locks_guard = threading.Lock()
    _local_locks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_local_locks)


class SealedTokenStorage(TokenStorage):
    """Shared by the built-in backends: the seed's methods on top of encrypted primitives.

    The seed's bool/None returns stay, but an unreachable backend is logged once with its cause
    (not swallowed silently) and ``get_or_issue`` raises :class:`TokenStorageError`.

    ``seed_lease=True`` (off by default) turns on the seed-protocol lease of
    :mod:`kis_safe_token.storage.lease` for clients that only call the four seed methods:
    ``check_token_valid`` answering ``False`` then means "you hold the issuance lease: issue and
    ``save_token``", and other callers wait in it for that save. ``lease_ttl``: how long a lease
    lasts; ``issue_window_s``: KIS's one-issue-per-minute window, during which no new lease is
    granted after a grant or a save.
    """

    def __init__(
        self,
        *,
        encryption_keys: Sequence[bytes | str] = (),
        refresh_margin_s: float = REFRESH_MARGIN_S,
        wait_timeout: float | None = None,
        clock: Callable[[], float] = time.time,
        seed_lease: bool = False,
        lease_ttl: float | None = None,
        issue_window_s: float = ISSUE_WINDOW_S,
    ) -> None:
        self._encryption_keys = tuple(encryption_keys)
        self.refresh_margin_s = (
            0.0 if refresh_margin_s == 0 else check_seconds("refresh_margin_s", refresh_margin_s)
        )
        self.wait_timeout = (
            default_wait_timeout(self.takeover_s())
            if wait_timeout is None
            else check_seconds("wait_timeout", wait_timeout)
        )
        self.clock = clock
        self._sealers: dict[tuple[str, str], Sealer] = {}
        self._failing = False
        if not isinstance(seed_lease, bool):
            raise ValueError("seed_lease must be True or False")
        if seed_lease:
            from .lease import new_seed_lease

            self._lease = new_seed_lease(self, lease_ttl, issue_window_s)

    @property
    def seed_lease(self) -> bool:
        """Whether the seed-protocol lease is on (see :mod:`kis_safe_token.storage.lease`)."""
        return self._lease is not None

    def _lease_records(self) -> LeaseRecords:
        """The backend's records of the seed-protocol lease (see :mod:`.lease`)."""
        raise NotImplementedError(f"{type(self).__name__} has no seed-protocol lease")

    def _sealer(self, api_key: str, api_secret: str) -> Sealer:
        sealer = self._sealers.get((api_key, api_secret))
        if sealer is None:
            if len(self._sealers) >= 64:
                self._sealers.clear()
            sealer = self._sealers[(api_key, api_secret)] = Sealer(
                api_key, api_secret, self._encryption_keys
            )
        return sealer

    def _failed(self, action: str, exc: BaseException) -> None:
        if not self._failing:
            self._failing = True
            logger.error("%s: %s failed: %s", type(self).__name__, action, exc)

    def _succeeded(self) -> None:
        if self._failing:
            self._failing = False
            logger.info("%s: store reachable again", type(self).__name__)

    # -- the seed's interface on top of the primitives ---------------------------------------
    def save_token(self, token_data: dict[str, Any]) -> bool:
        try:
            api_key, api_secret = token_data["api_key"], token_data["api_secret"]
            token = Token.from_token_data(token_data)
            self._sealer(api_key, api_secret)
        except (KeyError, TypeError, ValueError) as exc:
            logger.error("save_token: token_data rejected: %s", _key_error_text(exc))
            return False
        if not token.is_valid(self.clock()):
            # Not a store failure: this host's clock (or the caller) says the token is dead.
            logger.error(
                "save_token: token_data rejected: the token has expired (is the clock right?)"
            )
            return False
        try:
            if self._lease is not None:
                self._lease.save(api_key, api_secret, token)
            else:
                self._write(api_key, api_secret, token)
        except TokenStorageError as exc:
            self._failed("save_token", exc)
            return False
        self._succeeded()
        return True

    def load_token(self, api_key: str, api_secret: str) -> dict[str, Any] | None:
        try:
            if self._lease is not None:
                token = self._lease.load_token(api_key, api_secret)
            else:
                token = self._read(api_key, api_secret)
        except TokenStorageError as exc:
            self._failed("load_token", exc)
            return None
        self._succeeded()
        if token is None or not token.is_valid(self.clock()):
            return None
        return token.to_token_data(api_key, api_secret)

    def check_token_valid(self, api_key: str, api_secret: str) -> bool:
        if self._lease is not None:  # may wait; raises TokenStorageError (see .lease)
            return self._lease.check_token_valid(api_key, api_secret)
        return self.load_token(api_key, api_secret) is not None

    def delete_token(self, api_key: str, api_secret: str) -> bool:
        try:
            self._delete(api_key)
            if self._lease is not None:
                self._lease.released_by_delete(api_key)
        except TokenStorageError as exc:
            self._failed("delete_token", exc)
            return False
        self._succeeded()
        return True

    @abstractmethod
    def _delete(self, api_key: str) -> None:
        """Remove this app key's entry; :class:`TokenStorageError` if the store is unreachable."""

    @abstractmethod
    def _read(self, api_key: str, api_secret: str, *, fresh: bool = False) -> Token | None: ...

    @abstractmethod
    def _write(self, api_key: str, api_secret: str, token: Token) -> None: ...


def _key_error_text(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"missing field {exc.args[0]!r}"
    return str(exc)


def jittered(interval_s: float) -> float:
    """``interval_s`` spread by ±50 %, so a herd of pollers does not wake in lockstep."""
    return interval_s * (0.5 + random.random())
