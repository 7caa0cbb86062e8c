"""``SharedToken``: one app key's access token, held in memory and shared through a store."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import requests

from ._faults import fault_point
from ._fork import renew_after_fork
from .errors import TokenIssueError
from .events import Kind, emit
from .flight.memory import InMemory
from .keyring_secrets import resolve_api_secret
from .kis import (
    APPROVAL_SUFFIX,
    HTTP_TIMEOUT_S,
    REAL_BASE_URL,
    TOO_MANY_CALLS,
    VIRTUAL_BASE_URL,
    Verdict,
    resolve_issue_window_s,
)
from .metrics import from_environment as metrics_from_environment
from .oauth import Timeout, issue_approval_key, issue_token, note_revoked, revoke_token
from .policy import RETRY_BUDGET_S
from .ratelimit import RateLimiter, resolve_calls_per_second
from .ratelimit.base import ACQUIRE_TIMEOUT_S
from .storage.base import TokenStorage, check_seconds
from .storage.factory import base_url_from_environment, create_token_storage
from .token import Token, header_safe, mask

__all__ = [
    "APPROVAL_SUFFIX",
    "BASE_URL_ENV",
    "MAX_WAIT_S",
    "SharedToken",
    "TokenSettings",
    "check_header_value",
]

BASE_URL_ENV = "KOREA_INVESTMENT_BASE_URL"

MAX_WAIT_S = 3600.0
"""The longest HTTP timeout or ``EGW00133`` back-off accepted: an issue call holds the fleet's
issuance lock that long, and far larger numbers overflow the socket layer."""

_T = TypeVar("_T")


class Closing:
    """A context manager that calls ``close()`` on exit."""

    def close(self) -> None:
        """Release what this object owns."""

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncClosing:
    """An async context manager that awaits ``aclose()`` on exit."""

    async def aclose(self) -> None:
        """Release what this object owns."""

    async def __aenter__(self: _T) -> _T:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


#: The ``code`` of a rejected token's events: KIS's two codes for it are one verdict.
TOKEN_REJECTED_LABEL = "EGW00121/EGW00123"


class TokenSettings:
    """What :class:`SharedToken` and :class:`~kis_safe_token.AsyncSharedToken` share: the checked
    settings and the tokens in memory. ``ValueError`` names an argument that cannot be used."""

    def __init__(
        self,
        api_key: str,
        api_secret: str | None = None,
        token_storage: TokenStorage | None = None,
        *,
        mock: bool = False,
        base_url: str | None = None,
        clock: Callable[[], float] = time.time,
        timeout: float | tuple[float, float] = HTTP_TIMEOUT_S,
        rate_limit_wait_s: float | None = None,
        calls_per_second: float | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        check_header_value("api_key", api_key)
        self.timeout: Timeout = _checked_timeout(timeout)
        self.rate_limit_wait_s = resolve_issue_window_s(rate_limit_wait_s)
        self.api_key = api_key
        self.api_secret = resolve_api_secret(api_key, api_secret)
        check_header_value("api_secret", self.api_secret)
        self.mock = mock
        self.base_url = (
            base_url or base_url_from_environment() or (VIRTUAL_BASE_URL if mock else REAL_BASE_URL)
        ).rstrip("/")
        self.token_storage = token_storage if token_storage is not None else create_token_storage()
        self.token_storage.check_timing(
            http_timeout_s=sum(self.timeout), issue_window_s=self.rate_limit_wait_s
        )
        self._clock = clock
        memory = partial(
            InMemory,
            wait_timeout=self.token_storage.wait_timeout,
            refresh_margin_s=self.token_storage.refresh_margin_s,
            clock=clock,
        )
        self._memory = memory()
        self._approvals = memory(what="another thread's approval key")
        metrics_from_environment()
        if rate_limiter is None:
            rate = resolve_calls_per_second(calls_per_second, mock=mock)
            if rate is not None:
                rate_limiter = self.token_storage.rate_limiter(
                    api_key, rate, api_secret=self.api_secret
                )
        elif calls_per_second is not None:
            raise ValueError("give calls_per_second or rate_limiter, not both")
        self.rate_limiter: RateLimiter | None = rate_limiter

    def sent(self, waited_s: float) -> float:
        """A call goes to KIS after ``waited_s`` for its rate slot (for the events)."""
        if waited_s > 0:
            emit(Kind.RATE_WAITED, self.token_storage, self.api_key, seconds=waited_s)
        emit(Kind.KIS_CALL, self.token_storage, self.api_key)
        return waited_s

    def refused(self, verdict: Verdict) -> None:
        """KIS refused a call with ``EGW00201`` or refused its token (for the events)."""
        code = TOO_MANY_CALLS if verdict is Verdict.TOO_MANY_CALLS else TOKEN_REJECTED_LABEL
        emit(Kind.KIS_ERROR, self.token_storage, self.api_key, code=code)
        if code == TOKEN_REJECTED_LABEL:
            emit(Kind.REJECTED, self.token_storage, self.api_key, code=code)

    def _held(self, memory: InMemory) -> Token | None:
        """``memory``'s token while it is fresh (never fetches one)."""
        fresh_until = memory.fresh_until  # read before the token: a refresh sets it after
        token = memory.token
        return token if token is not None and self._clock() < fresh_until else None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(api_key={mask(self.api_key, 4)!r}, "
            f"base_url={self.base_url!r}, token_storage={self.token_storage!r})"
        )


class SharedToken(TokenSettings, Closing):
    """The access token of one app key, shared with every process that uses the same store.

    Kept in memory (:attr:`bearer` is a clock read while fresh); the store is touched on first
    use, near expiry and after :meth:`invalidate`; nothing is fetched at construction. The
    arguments are described in docs/configuration.md; ``session`` is the ``requests.Session`` of
    the OAuth calls (by default its own, closed by :meth:`close`). :class:`SecretNotFoundError`
    without an ``api_secret`` anywhere; ``ValueError`` names an argument that cannot be used.
    """

    def __init__(
        self,
        api_key: str,
        api_secret: str | None = None,
        token_storage: TokenStorage | None = None,
        *,
        mock: bool = False,
        base_url: str | None = None,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
        timeout: float | tuple[float, float] = HTTP_TIMEOUT_S,
        rate_limit_wait_s: float | None = None,
        calls_per_second: float | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        super().__init__(
            api_key,
            api_secret,
            token_storage,
            mock=mock,
            base_url=base_url,
            clock=clock,
            timeout=timeout,
            rate_limit_wait_s=rate_limit_wait_s,
            calls_per_second=calls_per_second,
            rate_limiter=rate_limiter,
        )
        self._own_session = session is None
        self._session = session  # our own is made when first needed: a waiter never needs it
        renew_after_fork(self)

    # -- the token -------------------------------------------------------------------------------
    @property
    def bearer(self) -> str:
        """``Bearer <token>`` for the ``authorization`` header, refreshed when near expiry."""
        memory = self._memory
        if self._clock() < memory.fresh_until:
            return memory.bearer
        return self._refresh().bearer

    @property
    def token(self) -> Token:
        """The current :class:`Token` (refreshed through the store when near expiry)."""
        return self._held(self._memory) or self._refresh()

    def in_memory(self) -> Token | None:
        """The token held in memory (never fetches one)."""
        return self._memory.token

    @property
    def session(self) -> requests.Session:
        """The ``requests.Session`` of the OAuth calls (a fresh one in a forked child, if it is
        this object's own); clients may send their calls through it too."""
        if self._session is None:
            self._session = requests.Session()
        return self._session

    def issue(self, force: bool = False) -> Token:
        """The token, through the store's single flight; ``force`` first drops the stored one
        (compare-and-delete), so a new one is issued unless another process just did."""
        if force:
            stored = self.token_storage.load_token(self.api_key, self.api_secret)
            if stored:
                self.token_storage.invalidate_token(
                    self.api_key, self.api_secret, stored["access_token"]
                )
            self._memory.forget()
        return self._refresh()

    def invalidate(self, access_token: str) -> bool:
        """KIS rejected ``access_token`` (``Bearer `` prefix optional): drop it from the store only
        if the store still holds it (compare-and-delete: N processes make one issuance), and from
        memory. Whether the store deleted it; :class:`TokenStorageError` if it is unreachable."""
        current = self._memory.token
        if current is not None and access_token == current.bearer:
            access_token = current.access_token
        else:
            access_token = access_token.removeprefix("Bearer ")
        deleted = self.token_storage.invalidate_token(self.api_key, self.api_secret, access_token)
        # After the store: forgetting first would let another thread reload the rejected token.
        if current is not None and current.access_token == access_token:
            self._memory.forget(access_token)
        return deleted

    def revoke(self) -> None:
        """Revoke the token in memory at KIS, then drop it from the store and from memory
        (nothing to do before a token was fetched). :class:`KisApiError` if KIS refuses."""
        token = self._memory.token
        if token is None:
            return
        revoke_token(
            self.session,
            self.base_url,
            api_key=self.api_key,
            api_secret=self.api_secret,
            access_token=token.access_token,
            timeout=self.timeout,
        )
        self.invalidate(token.access_token)
        note_revoked(self.api_key, self.token_storage)

    # -- the call-rate limit and the websocket approval key ---------------------------------------
    def throttle(self, timeout_s: float = ACQUIRE_TIMEOUT_S) -> float:
        """Wait for a slot of the fleet's call rate before a KIS call you send yourself (no-op
        without a limiter); the seconds waited. :class:`RateLimitTimeout` after ``timeout_s``."""
        limiter = self.rate_limiter
        return self.sent(0.0 if limiter is None else limiter.acquire(timeout_s))

    @property
    def approval_key(self) -> str:
        """The websocket approval key (``POST /oauth2/Approval``), shared like the token (its own
        sealed entry in the store); :meth:`invalidate_approval_key` when KIS rejects it."""
        held = self._held(self._approvals)
        return (held or self._approvals.get(self._fetch_approval)).access_token

    def _fetch_approval(self) -> Token:
        # KIS meters Approval with the REST calls: the slot is taken before the issuance lock,
        # never while holding it.
        key = self.api_key + APPROVAL_SUFFIX
        stored = self.token_storage.load_token(key, self.api_secret)
        if stored is not None:
            return Token.from_token_data(stored)
        self.throttle()
        return self.token_storage.get_or_issue(key, self.api_secret, self._issue_approval)

    def invalidate_approval_key(self, approval_key: str) -> bool:
        """KIS rejected ``approval_key``: compare-and-delete it; whether the store deleted it."""
        deleted = self.token_storage.invalidate_token(
            self.api_key + APPROVAL_SUFFIX, self.api_secret, approval_key
        )
        self._approvals.forget(approval_key)
        return deleted

    def _issue_approval(self) -> Token:
        """Ask KIS for an approval key (holding the issuance lock); ``EGW00201`` slows the fleet."""
        try:
            return issue_approval_key(
                self.session,
                self.base_url,
                api_key=self.api_key,
                api_secret=self.api_secret,
                timeout=self.timeout,
                clock=self._clock,
            )
        except TokenIssueError as exc:
            if exc.code == TOO_MANY_CALLS and self.rate_limiter is not None:
                self.rate_limiter.penalize(timeout_s=RETRY_BUDGET_S)
            raise

    def load(self) -> Token | None:
        """Take the stored token into memory if the store holds a valid one; never issues."""
        data = self.token_storage.load_token(self.api_key, self.api_secret)
        if not data:
            return None
        token = Token.from_token_data(data)
        self._memory.write_token(self.api_key, self.api_secret, token)
        return token

    # -- internals -------------------------------------------------------------------------------
    def _refresh(self) -> Token:
        """The token through this process's tier (one thread at a time), then the store."""
        storage, key, secret = self.token_storage, self.api_key, self.api_secret
        return self._memory.get(partial(storage.get_or_issue, key, secret, self._issue))

    def _issue(self) -> Token:
        """Ask KIS for a token (called by the store, holding the issuance lock)."""
        fault_point("issue.before_kis")
        token = issue_token(
            self.session,
            self.base_url,
            api_key=self.api_key,
            api_secret=self.api_secret,
            timeout=self.timeout,
            clock=self._clock,
            rate_limit_wait_s=self.rate_limit_wait_s,
        )
        fault_point("issue.after_kis")
        return token

    def _after_fork(self) -> None:
        # A child forked while another thread refreshed (gunicorn --preload) would inherit a lock
        # held for ever, and must not share pooled sockets with its parent either.
        self._memory.renew_after_fork()
        self._approvals.renew_after_fork()
        if self._own_session:
            self._session = None

    def close(self) -> None:
        """Close the session, if it is this object's own."""
        if self._own_session and self._session is not None:
            self._session.close()


def check_header_value(name: str, value: object) -> None:
    """``ValueError`` naming ``name`` (never showing ``value``) unless it can go in a header."""
    if not header_safe(value):
        raise ValueError(
            f"{name} must be a non-empty string of printable ASCII without spaces or control "
            "characters (it is sent in an HTTP header)"
        )


def _checked_timeout(timeout: object) -> Timeout:
    """``timeout`` as requests' ``(connect, read)`` pair; one number stands for both."""
    pair = timeout if isinstance(timeout, (tuple, list)) else (timeout, timeout)
    try:
        connect, read = (check_seconds("timeout", part, high=MAX_WAIT_S) for part in pair)
        return connect, read
    except ValueError:
        raise ValueError(
            f"timeout must be a number of seconds (more than 0, at most {MAX_WAIT_S:.0f}) or a "
            "(connect, read) pair of them"
        ) from None
