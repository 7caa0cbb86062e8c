"""The storage interface: the seed's four methods, ``get_or_issue`` and the backend protocol
(records, an ``IssuanceLock``, optionally a rate limiter) the engine (``flight/``) drives."""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, TypeGuard

from .._checks import check_seconds, note_short_wait
from ..crypto import Sealer
from ..errors import TokenStorageError
from ..failure import IssueFailure
from ..flight import engine
from ..flight.drivers import run_sync
from ..flight.lock import IssuanceLock, LocalIssuanceLock, _local_lock, jittered
from ..kis import HTTP_TIMEOUT_S, ISSUE_WINDOW_S, resolve_issue_window_s
from ..ratelimit.base import RateLimiter
from ..ratelimit.memory import MemoryRateLimiter
from ..token import REFRESH_MARGIN_S, Token
from .lease import LeasedLock, LeaseRecords, SeedLease, new_seed_lease

__all__ = [
    "IssuanceLock",
    "LocalIssuanceLock",
    "SealedTokenStorage",
    "TokenStorage",
    "check_seconds",
    "default_wait_timeout",
    "jittered",
]

logger = logging.getLogger("kis_safe_token")

WAIT_SLACK_S = 5.0

IssueFn = Callable[[], Token]


def default_wait_timeout(takeover_s: float = 0.0, issue_window_s: float | None = None) -> float:
    """How long a waiter waits for another's issuance by default: the holder's worst case (a
    takeover of ``takeover_s``, two KIS calls and an ``EGW00133`` window between them)."""
    window = resolve_issue_window_s() if issue_window_s is None else issue_window_s
    return takeover_s + window + 2 * sum(HTTP_TIMEOUT_S) + WAIT_SLACK_S


class TokenStorage(ABC):
    """Where tokens live between processes: the seed's four methods plus ``get_or_issue``
    (single flight within the process for a subclass with only the seed's four methods)."""

    refresh_margin_s: float = REFRESH_MARGIN_S
    # KIS's own window here (read at import): a store built later reads the environment's.
    wait_timeout: float = default_wait_timeout(issue_window_s=ISSUE_WINDOW_S)
    #: The store records failed issuances and sits out ``EGW00133`` (see the engine).
    records_failures: bool = True
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

    def check_timing(self, *, http_timeout_s: float, issue_window_s: float | None = None) -> None:
        """Note (once per store, at INFO) a ``wait_timeout`` shorter than a holder's worst case
        (see :func:`default_wait_timeout`) with these timings. Clients call this."""
        window = resolve_issue_window_s(issue_window_s, name="issue_window_s")
        takeover = self.takeover_s()
        note_short_wait(
            self,
            takeover + window + 2 * http_timeout_s,
            f"takeover {takeover:.1f} s + KIS issue window {window:.1f} s "
            f"+ 2 x HTTP timeout {http_timeout_s:.1f} s",
        )

    def fleet(self) -> dict[str, dict[str, Any]]:
        """What the store holds, by :func:`~kis_safe_token.crypto.key_id`, read without a secret:
        ``records`` (``token``, ``failure``, ``lease``...), ``lock_held`` (``None``: unknown),
        ``lock_held_s`` and ``token_ttl_s`` (where known). ``NotImplementedError`` if unlisted."""
        raise NotImplementedError(f"{type(self).__name__} cannot list the app keys it holds")

    # -- the call-rate limit -----------------------------------------------------------------------
    def rate_limiter(
        self, api_key: str, calls_per_second: float, *, api_secret: str | None = None
    ) -> RateLimiter:
        """The limiter of KIS calls for ``api_key``, shared as widely as the tokens (``api_secret``:
        to authenticate shared state); this default is per process. ``ValueError``: a bad rate."""
        _note_once(
            _noted_per_process,
            self,
            "has no shared rate limiter: KIS calls are limited per process "
            "(pass rate_limiter= to share one across the fleet)",
        )
        return MemoryRateLimiter(api_key, calls_per_second)

    # -- single flight ---------------------------------------------------------------------------
    def get_or_issue(self, api_key: str, api_secret: str, issue: IssueFn) -> Token:
        """A usable token: the cached one, or one issued by exactly one caller fleet-wide.

        ``issue`` calls KIS and returns the :class:`Token`, only under the issuance lock. Raises
        :class:`TokenStorageError` if the store is unreachable or the wait exceeds
        ``wait_timeout``, :class:`TokenIssueError` if KIS refuses (now or recently).
        """
        flight = engine.Flight(self, api_key, api_secret)
        token: Token = run_sync(flight, engine.get_or_issue(flight), issue)
        return token

    def issuance_lock(self, api_key: str, api_secret: str) -> IssuanceLock:
        """The lock guarding issuance for this app key, for both drivers (this default: per
        process, logged once)."""
        _note_once(
            _noted_local_lock,
            self,
            "has no fleet-wide issuance lock: single flight within this process only",
        )
        return LocalIssuanceLock(api_key)

    def usable(self, token: Token | None) -> TypeGuard[Token]:
        """Whether ``token`` is there and good beyond the refresh margin."""
        return token is not None and token.is_valid(self.clock(), self.refresh_margin_s)

    # -- primitives; the defaults build on the seed methods and an in-process lock -------------
    def read_token(self, api_key: str, api_secret: str, *, fresh: bool = False) -> Token | None:
        """The stored token (valid or not), or ``None``; ``fresh``: not from a cache of the last
        read. :class:`TokenStorageError` if unreachable."""
        data = self.load_token(api_key, api_secret)
        return Token.from_token_data(data) if data else None

    def write_token(
        self, api_key: str, api_secret: str, token: Token, deadline: float | None = None
    ) -> None:
        """Store ``token`` and clear the failure record, retried until ``deadline``
        (``time.monotonic()``; ``None``: the store's default). :class:`TokenStorageError`."""
        if not self.save_token(token.to_token_data(api_key, api_secret)):
            raise TokenStorageError(f"{type(self).__name__}.save_token failed")

    def read_failure(self, api_key: str, api_secret: str) -> IssueFailure | None:
        """The failure record in the store (the default store has none: see ``write_failure``)."""
        return None

    def write_failure(self, api_key: str, api_secret: str, failure: IssueFailure) -> None:
        """Share ``failure`` (a failed issuance) with the fleet (by default: this process)."""
        engine.Flight(self, api_key, api_secret).keep_local(failure)

    def invalidate_token(self, api_key: str, api_secret: str, access_token: str) -> bool:
        """Compare-and-delete: drop the stored token only if it is still ``access_token`` (a late
        caller never deletes a fresh one); whether it deleted."""
        with _local_lock(api_key):
            token = self.read_token(api_key, api_secret, fresh=True)
            if token is None or token.access_token != access_token:
                return False
            return self.delete_token(api_key, api_secret)


_noted_per_process: set[type[TokenStorage]] = set()
_noted_local_lock: set[type[TokenStorage]] = set()


def _note_once(noted: set[type[TokenStorage]], store: TokenStorage, what: str) -> None:
    if type(store) not in noted:
        noted.add(type(store))
        logger.info("%s %s", type(store).__name__, what)


class SealedTokenStorage(TokenStorage):
    """The built-in backends' base: the seed's methods on encrypted primitives (an unreachable
    store is logged once and the seed's bool/None returned). ``seed_lease``, ``lease_ttl``,
    ``issue_window_s``: the seed-protocol lease (``docs/seed-lease.md``).
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
        issue_window_s: float | None = None,
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
            self._lease = new_seed_lease(self, lease_ttl, issue_window_s)

    @property
    def seed_lease(self) -> bool:
        """Whether the seed-protocol lease is on."""
        return self._lease is not None

    def _leased(self, lock: IssuanceLock, api_key: str, api_secret: str) -> IssuanceLock:
        """``lock``, behind the seed-protocol lease where it is on."""
        if self._lease is None:
            return lock
        return LeasedLock(self._lease, api_key, api_secret, lock)

    def _lease_records(self) -> LeaseRecords:
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

    def _reached(self, action: str = "", exc: BaseException | None = None) -> None:
        """Log the first failure to reach the store (``exc``), and the first success after it."""
        if exc is not None and not self._failing:
            logger.error("%s: %s failed: %s", type(self).__name__, action, exc)
        elif exc is None and self._failing:
            logger.info("%s: store reachable again", type(self).__name__)
        self._failing = exc is not None

    # -- the seed's interface on top of the primitives ---------------------------------------
    def save_token(self, token_data: dict[str, Any]) -> bool:
        try:
            api_key, api_secret = token_data["api_key"], token_data["api_secret"]
            token = Token.from_token_data(token_data)
            self._sealer(api_key, api_secret)
        except (KeyError, TypeError, ValueError) as exc:
            why = f"missing field {exc.args[0]!r}" if isinstance(exc, KeyError) else exc
            logger.error("save_token: token_data rejected: %s", why)
            return False
        if not token.is_valid(self.clock()):
            # Not a store failure: this host's clock (or the caller) says the token is dead.
            logger.error(
                "save_token: token_data rejected: the token has expired (is the clock right?)"
            )
            return False
        save = self.write_token if self._lease is None else self._lease.save
        try:
            save(api_key, api_secret, token)
        except TokenStorageError as exc:
            self._reached("save_token", exc)
            return False
        self._reached()
        return True

    def load_token(self, api_key: str, api_secret: str) -> dict[str, Any] | None:
        load = self.read_token if self._lease is None else self._lease.load_token
        try:
            token = load(api_key, api_secret)
        except TokenStorageError as exc:
            self._reached("load_token", exc)
            return None
        self._reached()
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
            self._reached("delete_token", exc)
            return False
        self._reached()
        return True

    @abstractmethod
    def _delete(self, api_key: str) -> None:
        """Remove this app key's entry; :class:`TokenStorageError` if the store is unreachable."""

    @abstractmethod
    def read_token(self, api_key: str, api_secret: str, *, fresh: bool = False) -> Token | None: ...

    @abstractmethod
    def write_token(
        self, api_key: str, api_secret: str, token: Token, deadline: float | None = None
    ) -> None: ...
