"""``SharedToken``: one app key's access token, held in memory and shared through a store.

Every client builds on it (:class:`~kis_safe_token.KoreaInvestment`,
:class:`~kis_safe_token.KisAuth`): it owns the credentials, the KIS host, the store, the token in
memory with its refresh margin, single-flight refresh, compare-and-delete, and fork safety.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from types import TracebackType

import requests

from ._faults import fault_point
from ._fork import renew_after_fork
from .errors import TokenIssueError
from .flight.memory import InMemory
from .keyring_secrets import resolve_api_secret
from .kis import (
    HTTP_TIMEOUT_S,
    REAL_BASE_URL,
    TOO_MANY_CALLS,
    VIRTUAL_BASE_URL,
    resolve_issue_window_s,
)
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

#: The approval key is stored under the app key plus this suffix: its own sealed entry, lock and
#: failure record in any store, with the token's single flight and compare-and-delete.
APPROVAL_SUFFIX = ":approval"

MAX_WAIT_S = 3600.0
"""The longest HTTP timeout or ``EGW00133`` back-off accepted: an issue call holds the fleet's
issuance lock that long, and far larger numbers overflow the socket layer."""


class TokenSettings:
    """What a token holder needs, checked once: the credentials, the KIS host, the store and the
    HTTP timings. The base of :class:`SharedToken` and of its asyncio twin
    :class:`~kis_safe_token.AsyncSharedToken`, so both read their arguments the same way.

    ``ValueError`` names an argument that cannot be used (a credential that cannot go in an
    HTTP header, a bad timeout, timings the store's waiters would not outlast, a bad rate).
    ``calls_per_second``/``rate_limiter``: the fleet's call-rate limit (see
    :mod:`kis_safe_token.ratelimit`; ``None``: KIS's default for the account type, ``0``: off).
    """

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
        self._margin_s = self.token_storage.refresh_margin_s
        if rate_limiter is not None:
            if calls_per_second is not None:
                raise ValueError("give calls_per_second or rate_limiter, not both")
            self.rate_limiter: RateLimiter | None = rate_limiter
        else:
            rate = resolve_calls_per_second(calls_per_second, mock=mock)
            self.rate_limiter = (
                None
                if rate is None
                else self.token_storage.rate_limiter(api_key, rate, api_secret=self.api_secret)
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(api_key={mask(self.api_key, 4)!r}, "
            f"base_url={self.base_url!r}, token_storage={self.token_storage!r})"
        )


class SharedToken(TokenSettings):
    """The access token of one app key, shared with every process that uses the same store.

    The token lives in memory and is checked against its expiry locally: :attr:`bearer` costs a
    clock read and a comparison while the token is fresh. The store is touched on first use,
    near expiry (the store's ``refresh_margin_s``), and after :meth:`invalidate`; a new token
    comes through the store's single flight (``get_or_issue``), so a fleet makes one issuance.
    Nothing is fetched at construction: the first :attr:`bearer` or :attr:`token` does it.

    ``api_secret=None``: the keyring, then ``$KOREA_INVESTMENT_API_SECRET``
    (:class:`SecretNotFoundError` otherwise). ``token_storage=None``: from the environment
    (:func:`create_token_storage`). ``base_url=None``: ``$KOREA_INVESTMENT_BASE_URL``, else the
    real host, or the virtual-trading host for ``mock=True``. ``session``: the
    ``requests.Session`` for the OAuth calls (one of its own by default, closed by
    :meth:`close`). ``timeout``: seconds per KIS call, or a ``(connect, read)`` pair.
    ``rate_limit_wait_s``: how long to sit out an ``EGW00133``.

    KIS calls per second are limited for the whole fleet by :attr:`rate_limiter` (see
    :meth:`throttle`): ``calls_per_second=None`` is ``$KOREA_INVESTMENT_CALLS_PER_SECOND`` if
    set, else KIS's limit for the account type (20/s real, 2/s with ``mock=True``); a
    number overrides; ``0`` turns the limiter off. The limiter comes from the store
    (``token_storage.rate_limiter``: a file beside the token file, a key beside the token in
    Redis, this process only for other stores), unless one is given as ``rate_limiter=``.

    ``ValueError`` names an argument that cannot be used (a credential that cannot go in an HTTP
    header, a bad timeout or rate, timings the store's waiters would not outlast).
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
        memory = partial(
            InMemory,
            wait_timeout=self.token_storage.wait_timeout,
            refresh_margin_s=self._margin_s,
            clock=self._clock,
        )
        self._memory = memory()
        self._approvals = memory(what="another thread's approval key")
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
        fresh_until = self._memory.fresh_until  # read before the token: a refresh sets it after
        token = self._memory.token
        if token is not None and self._clock() < fresh_until:
            return token
        return self._refresh()

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
        """KIS rejected ``access_token`` (``EGW00121``/``EGW00123``): drop it from the store only
        if the store still holds it, and from memory if it is the current one.

        N processes that saw the same token rejected make one deletion and then one issuance
        between them; one that comes late never deletes the fresh token another one saved.
        ``access_token`` may be given with its ``Bearer `` prefix. Returns whether the store
        deleted it. Raises :class:`TokenStorageError` if the store cannot be reached.
        """
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
        self.token_storage.invalidate_token(self.api_key, self.api_secret, token.access_token)
        self._memory.forget(token.access_token)
        note_revoked(self.api_key, self.token_storage)

    # -- the call-rate limit and the websocket approval key ---------------------------------------
    def throttle(self, timeout_s: float = ACQUIRE_TIMEOUT_S) -> float:
        """Wait for this process's turn to call KIS (a slot of the fleet-wide rate limit); the
        seconds waited. Call it right before every REST call to KIS that does not go through
        :class:`KisAuth` or :class:`KoreaInvestment` (they call it themselves). A no-op without a
        limiter. :class:`~kis_safe_token.ratelimit.RateLimitTimeout` if no slot is free within
        ``timeout_s``."""
        limiter = self.rate_limiter
        return 0.0 if limiter is None else limiter.acquire(timeout_s)

    @property
    def approval_key(self) -> str:
        """The websocket approval key (``POST /oauth2/Approval``), shared like the token: one
        process of the fleet asks KIS, the others read it from the store (its own sealed entry).
        Kept in memory; :meth:`invalidate_approval_key` when KIS rejects it."""
        current = self._approvals.token
        if current is not None and current.is_valid(self._clock(), self._margin_s):
            return current.access_token
        return self._approvals.get(self._fetch_approval).access_token

    def _fetch_approval(self) -> Token:
        """The stored approval key, or (in a slot of the fleet's rate limit: KIS meters the
        Approval call with the REST calls) one through the store's single flight. The slot is
        taken before the store's issuance lock, never while holding it."""
        key = self.api_key + APPROVAL_SUFFIX
        stored = self.token_storage.load_token(key, self.api_secret)
        if stored is not None:
            return Token.from_token_data(stored)
        self.throttle()
        return self.token_storage.get_or_issue(key, self.api_secret, self._issue_approval)

    def invalidate_approval_key(self, approval_key: str) -> bool:
        """KIS rejected ``approval_key``: drop it from the store only if the store still holds it
        (compare-and-delete), and from memory; the next :attr:`approval_key` gets a new one
        through the single flight. Returns whether the store deleted it."""
        deleted = self.token_storage.invalidate_token(
            self.api_key + APPROVAL_SUFFIX, self.api_secret, approval_key
        )
        self._approvals.forget(approval_key)
        return deleted

    def _issue_approval(self) -> Token:
        """Ask KIS for an approval key (called by the store, holding the issuance lock); an
        ``EGW00201`` answer slows the fleet's rate down (the store sits it out, asks once more)."""
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
        """The token through this process's tier (one thread at a time; bounded like the store's
        own wait, so threads queued behind a refresh that times out do not each wait a full
        ``wait_timeout`` in turn), then the store's single flight."""
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
        # In a child forked while another thread refreshed the token (gunicorn --preload with a
        # background thread), the inherited lock would stay held for ever; an object built before
        # fork() must not share pooled sockets with its parent either.
        self._memory.renew_after_fork()
        self._approvals.renew_after_fork()
        if self._own_session:
            self._session = None

    # -- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the session, if it is this object's own."""
        if self._own_session and self._session is not None:
            self._session.close()

    def __enter__(self) -> SharedToken:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


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
        if len(pair) != 2:
            raise ValueError
        return check_seconds("timeout", pair[0], high=MAX_WAIT_S), check_seconds(
            "timeout", pair[1], high=MAX_WAIT_S
        )
    except ValueError:
        raise ValueError(
            f"timeout must be a number of seconds (more than 0, at most {MAX_WAIT_S:.0f}) or a "
            "(connect, read) pair of them"
        ) from None
