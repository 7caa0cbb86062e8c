"""The storage interface and the single-flight issuance protocol, written once.

``get_or_issue`` is a template method: a valid cached token is returned without any lock;
otherwise the backend's ``_acquire`` either hands over the issuance lock or a token that another
process saved meanwhile; the holder looks again, issues only if still needed, saves and releases
(waking the waiters). Backends supply the primitives: ``_read``, ``_write``, ``_delete``,
``_acquire``, ``_release``, ``_extend`` and ``_compare_and_delete``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from .._faults import fault_point
from ..crypto import Sealer
from ..errors import TokenIssueError, TokenStorageError
from ..token import REFRESH_MARGIN_S, Token

__all__ = ["WAIT_TIMEOUT_S", "SealedTokenStorage", "TokenStorage"]

logger = logging.getLogger("kis_safe_token")

WAIT_TIMEOUT_S = 90.0
"""How long a process waits for another's issuance. Longer than KIS's one-minute issue window, so
a holder that must sit out an ``EGW00133`` does not make its waiters give up."""
BACKOFF_SLICE_S = 1.0

IssueFn = Callable[[], dict[str, Any]]


class TokenStorage(ABC):
    """Where tokens live between processes: the seed's four methods plus ``get_or_issue``.

    A subclass that implements only the seed's four methods still works with ``get_or_issue``,
    single-flight within its process (an in-process lock). The built-in backends override the
    primitives to make it single-flight across processes and hosts.
    """

    refresh_margin_s: float = REFRESH_MARGIN_S
    wait_timeout: float = WAIT_TIMEOUT_S
    clock: Callable[[], float] = staticmethod(time.time)

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

    # -- single flight ---------------------------------------------------------------------------
    def get_or_issue(self, api_key: str, api_secret: str, issue: IssueFn) -> dict[str, Any]:
        """A usable token: the cached one, or one issued by exactly one caller fleet-wide.

        ``issue`` calls KIS and returns a ``token_data`` dict; it runs only while holding the
        issuance lock and only if, looking again under the lock, no usable token is stored. If it
        raises :class:`TokenIssueError` with ``retry_after_s`` (KIS said ``EGW00133``), the holder
        keeps the lock, re-checks the cache while it waits, and retries once the window passed.

        Raises :class:`TokenStorageError` if the store is unreachable or the wait exceeds
        ``wait_timeout``, and :class:`TokenIssueError` if KIS refuses.
        """
        token = self._read(api_key, api_secret)
        if self._usable(token):
            assert token is not None
            return token.to_token_data(api_key, api_secret)
        deadline = time.monotonic() + self.wait_timeout
        got = self._acquire(api_key, api_secret, deadline)
        if isinstance(got, Token):
            return got.to_token_data(api_key, api_secret)
        try:
            token = self._read(api_key, api_secret, fresh=True)
            if not self._usable(token):
                token = self._issue_holding(got, api_key, api_secret, issue, deadline)
                self._extend(got)
                self._write(api_key, api_secret, token)
                fault_point("storage.after_save")
            assert token is not None
            return token.to_token_data(api_key, api_secret)
        finally:
            self._release(got)

    def invalidate_token(self, api_key: str, api_secret: str, access_token: str) -> bool:
        """Delete the stored token only if it is still ``access_token`` (compare-and-delete).

        N workers that saw the same token rejected make one deletion, not N; a worker that is
        late never deletes the fresh token another one just saved. Returns whether it deleted.
        """
        return self._compare_and_delete(api_key, api_secret, access_token)

    def _issue_holding(
        self, handle: object, api_key: str, api_secret: str, issue: IssueFn, deadline: float
    ) -> Token:
        while True:
            try:
                return Token.from_token_data(issue())
            except TokenIssueError as exc:
                if exc.retry_after_s is None:
                    raise
                resume = time.monotonic() + exc.retry_after_s
                if resume > deadline:
                    raise
                logger.warning(
                    "KIS refused issuance (%s); re-checking the cache, retrying in %.1f s",
                    exc.code,
                    exc.retry_after_s,
                )
            while (left := resume - time.monotonic()) > 0:
                time.sleep(min(BACKOFF_SLICE_S, left))
                self._extend(handle)
                token = self._read(api_key, api_secret, fresh=True)
                if self._usable(token):
                    assert token is not None
                    return token

    def _usable(self, token: Token | None) -> bool:
        return token is not None and token.is_valid(self.clock(), self.refresh_margin_s)

    # -- primitives; the defaults build on the seed methods and an in-process lock -------------
    def _read(self, api_key: str, api_secret: str, *, fresh: bool = False) -> Token | None:
        data = self.load_token(api_key, api_secret)
        return Token.from_token_data(data) if data else None

    def _write(self, api_key: str, api_secret: str, token: Token) -> None:
        if not self.save_token(token.to_token_data(api_key, api_secret)):
            raise TokenStorageError(f"{type(self).__name__}.save_token failed")

    def _compare_and_delete(self, api_key: str, api_secret: str, access_token: str) -> bool:
        with _local_lock(api_key):
            token = self._read(api_key, api_secret, fresh=True)
            if token is None or token.access_token != access_token:
                return False
            return self.delete_token(api_key, api_secret)

    def _acquire(self, api_key: str, api_secret: str, deadline: float) -> object:
        """Block until holding the issuance lock (return a handle) or a usable token appears
        (return the :class:`Token`); :class:`TokenStorageError` past ``deadline``."""
        lock = _local_lock(api_key)
        if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TokenStorageError(f"timed out after {self.wait_timeout:.1f} s waiting to issue")
        return lock

    def _release(self, handle: object) -> None:
        assert isinstance(handle, _LOCK_TYPE)
        handle.release()

    def _extend(self, handle: object) -> None:  # noqa: B027 - optional hook
        """Keep holding the lock a while longer (for locks that expire)."""


_LOCK_TYPE = type(threading.Lock())
_local_locks: dict[str, threading.Lock] = {}
_local_locks_guard = threading.Lock()


def _local_lock(api_key: str) -> threading.Lock:
    with _local_locks_guard:
        return _local_locks.setdefault(api_key, threading.Lock())


class SealedTokenStorage(TokenStorage):
    """Shared by the built-in backends: the seed's methods on top of encrypted primitives.

    The seed's bool/None returns stay, but an unreachable backend is logged once with its cause
    (not swallowed silently) and ``get_or_issue`` raises :class:`TokenStorageError`.
    """

    def __init__(
        self,
        *,
        encryption_keys: Sequence[bytes | str] = (),
        refresh_margin_s: float = REFRESH_MARGIN_S,
        wait_timeout: float = WAIT_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not wait_timeout > 0:
            raise ValueError(f"wait_timeout must be > 0 seconds, got {wait_timeout!r}")
        if not refresh_margin_s >= 0:
            raise ValueError(f"refresh_margin_s must be >= 0 seconds, got {refresh_margin_s!r}")
        self._encryption_keys = tuple(encryption_keys)
        self.refresh_margin_s = float(refresh_margin_s)
        self.wait_timeout = float(wait_timeout)
        self.clock = clock
        self._sealers: dict[tuple[str, str], Sealer] = {}
        self._failing = False

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
        try:
            self._write(api_key, api_secret, token)
        except TokenStorageError as exc:
            self._failed("save_token", exc)
            return False
        self._succeeded()
        return True

    def load_token(self, api_key: str, api_secret: str) -> dict[str, Any] | None:
        try:
            token = self._read(api_key, api_secret)
        except TokenStorageError as exc:
            self._failed("load_token", exc)
            return None
        self._succeeded()
        if token is None or not token.is_valid(self.clock()):
            return None
        return token.to_token_data(api_key, api_secret)

    def check_token_valid(self, api_key: str, api_secret: str) -> bool:
        return self.load_token(api_key, api_secret) is not None

    def delete_token(self, api_key: str, api_secret: str) -> bool:
        try:
            self._delete(api_key)
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
