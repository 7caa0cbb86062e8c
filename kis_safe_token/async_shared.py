"""``AsyncSharedToken``: :class:`~kis_safe_token.SharedToken` for asyncio code (the same token,
store and single flight; waits that never block the loop; OAuth calls with ``httpx``)."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from .errors import TokenIssueError
from .flight.aio import AsyncStore
from .kis import APPROVAL_PATH, HTTP_TIMEOUT_S, REVOKE_PATH, TOKEN_PATH, TOO_MANY_CALLS
from .oauth import (
    Timeout,
    approval_key_from_answer,
    approval_request,
    approval_request_failed,
    check_revoked,
    note_revoked,
    revoke_request,
    revoke_request_failed,
    token_from_answer,
    token_request,
    token_request_failed,
)
from .policy import RETRY_BUDGET_S
from .ratelimit import RateLimiter
from .ratelimit.base import ACQUIRE_TIMEOUT_S
from .shared import APPROVAL_SUFFIX, AsyncClosing, TokenSettings
from .storage.base import TokenStorage
from .token import Token

try:
    import httpx
except ImportError as exc:  # pragma: no cover - exercised only without the [async] extra
    raise ImportError(
        "the asyncio client needs httpx: pip install 'kis-safe-token[async]'"
    ) from exc

__all__ = ["AsyncSharedToken", "httpx_timeout"]


def httpx_timeout(timeout: Timeout) -> httpx.Timeout:
    """requests' ``(connect, read)`` pair as an ``httpx.Timeout`` (write and pool: the read)."""
    connect, read = timeout
    return httpx.Timeout(read, connect=connect)


class AsyncSharedToken(TokenSettings, AsyncClosing):
    """The access token of one app key for coroutines, shared with every sync or async process
    on the same store; tasks of one loop needing a new one make one store round. Nothing is
    fetched at construction. The arguments are :class:`~kis_safe_token.SharedToken`'s, plus
    ``http_client`` (the ``httpx.AsyncClient`` of the OAuth calls; by default its own, closed by
    :meth:`aclose`) and ``redis_client`` (the ``redis.asyncio`` client a Redis store is waited
    on with; by default one built from the storage's settings).
    """

    def __init__(
        self,
        api_key: str,
        api_secret: str | None = None,
        token_storage: TokenStorage | None = None,
        *,
        mock: bool = False,
        base_url: str | None = None,
        http_client: httpx.AsyncClient | None = None,
        redis_client: Any = None,
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
        self._own_http = http_client is None
        self._http = http_client  # our own is built at the first call: see http_client()
        self._store = AsyncStore(self.token_storage, redis_client=redis_client)

    async def http_client(self) -> httpx.AsyncClient:
        """The ``httpx.AsyncClient`` of the OAuth calls (clients send theirs through it too)."""
        if self._http is None:
            context = await _tls_context()
            if self._http is None:  # another task may have built it meanwhile
                self._http = httpx.AsyncClient(verify=context)
        return self._http

    # -- the token -------------------------------------------------------------------------------
    async def token(self) -> Token:
        """The current :class:`Token`, refreshed through the store when near its expiry."""
        token = self._held(self._memory)
        if token is None:
            token = await self._store.get_or_issue(self.api_key, self.api_secret, self._issue)
            self._memory.write_token(self.api_key, self.api_secret, token)
        return token

    async def bearer(self) -> str:
        """``Bearer <token>`` for the ``authorization`` header."""
        return (await self.token()).bearer

    async def issue(self, force: bool = False) -> Token:
        """The token through the store's single flight; ``force`` first drops the stored one
        (compare-and-delete), so a new one is issued unless another process just did."""
        if force:
            stored = await self._store.load_token(self.api_key, self.api_secret)
            if stored is not None:
                await self._store.invalidate_token(
                    self.api_key, self.api_secret, stored.access_token
                )
            self._memory.forget()
        return await self.token()

    async def invalidate(self, access_token: str) -> bool:
        """KIS rejected ``access_token``: drop it from the store only if the store still holds
        it, and from memory if it is the current one (see ``SharedToken.invalidate``)."""
        access_token = access_token.removeprefix("Bearer ")
        deleted = await self._store.invalidate_token(self.api_key, self.api_secret, access_token)
        self._memory.forget(access_token)
        return deleted

    async def revoke(self) -> None:
        """Revoke the token in memory at KIS, then drop it from the store and from memory
        (nothing to do before a token was fetched). :class:`KisApiError` if KIS refuses."""
        token = self._memory.token
        if token is None:
            return
        body = revoke_request(self.api_key, self.api_secret, token.access_token)
        check_revoked(await self._post(REVOKE_PATH, body, revoke_request_failed))
        await self.invalidate(token.access_token)
        note_revoked(self.api_key, self.token_storage)

    # -- the call-rate limit and the websocket approval key ---------------------------------------
    async def throttle(self, timeout_s: float = ACQUIRE_TIMEOUT_S) -> float:
        """:meth:`SharedToken.throttle` without blocking the loop (the same fleet-wide rate)."""
        limiter = self.rate_limiter
        if limiter is None:
            return self.sent(0.0)
        try_acquire = partial(self._store.try_acquire, limiter)
        return self.sent(await limiter.acquire_async(timeout_s, try_acquire=try_acquire))

    async def penalize(self, timeout_s: float | None = None) -> None:
        """KIS answered ``EGW00201`` anyway: :meth:`RateLimiter.penalize` (``timeout_s``: the
        caller's budget left); a no-op without a limiter."""
        limiter = self.rate_limiter
        if limiter is not None:
            await self._store.penalize(limiter, timeout_s)

    async def approval_key(self) -> str:
        """The websocket approval key, shared with the sync side (``SharedToken.approval_key``'s
        entry, lock and failure record); :meth:`invalidate_approval_key` when KIS rejects it."""
        current = self._held(self._approvals)
        if current is None:
            current = await self._fetch_approval()
            self._approvals.write_token(self.api_key, self.api_secret, current)
        return current.access_token

    async def _fetch_approval(self) -> Token:
        # As SharedToken._fetch_approval: the rate-limit slot comes before the issuance lock.
        key = self.api_key + APPROVAL_SUFFIX
        stored = await self._store.load_token(key, self.api_secret)
        if stored is not None:
            return stored
        await self.throttle()
        return await self._store.get_or_issue(key, self.api_secret, self._issue_approval)

    async def invalidate_approval_key(self, approval_key: str) -> bool:
        """KIS rejected ``approval_key``: compare-and-delete it; whether the store deleted it."""
        deleted = await self._store.invalidate_token(
            self.api_key + APPROVAL_SUFFIX, self.api_secret, approval_key
        )
        self._approvals.forget(approval_key)
        return deleted

    async def load(self) -> Token | None:
        """Take the stored token into memory if the store holds a valid one; never issues."""
        token = await self._store.load_token(self.api_key, self.api_secret)
        if token is not None:
            self._memory.write_token(self.api_key, self.api_secret, token)
        return token

    # -- internals -------------------------------------------------------------------------------
    async def _post(
        self, path: str, body: dict[str, str], failed: Callable[[Exception], Exception]
    ) -> httpx.Response:
        """POST ``body`` to KIS's OAuth ``path``; ``failed(exc)`` is raised if no answer came."""
        try:
            return await (await self.http_client()).post(
                f"{self.base_url}{path}", json=body, timeout=httpx_timeout(self.timeout)
            )
        except httpx.HTTPError as exc:
            raise failed(exc) from None

    async def _issue(self) -> Token:
        """Ask KIS for a token (called by the store, holding the issuance lock)."""
        body = token_request(self.api_key, self.api_secret)
        resp = await self._post(TOKEN_PATH, body, token_request_failed)
        return token_from_answer(resp, clock=self._clock, rate_limit_wait_s=self.rate_limit_wait_s)

    async def _issue_approval(self) -> Token:
        """Ask KIS for an approval key (holding the issuance lock); ``EGW00201`` slows the fleet."""
        body = approval_request(self.api_key, self.api_secret)
        resp = await self._post(APPROVAL_PATH, body, approval_request_failed)
        try:
            return approval_key_from_answer(resp, clock=self._clock)
        except TokenIssueError as exc:
            if exc.code == TOO_MANY_CALLS:
                await self.penalize(RETRY_BUDGET_S)
            raise

    async def aclose(self) -> None:
        """Close the HTTP client and the Redis client, if this object built them."""
        if self._own_http and self._http is not None:
            await self._http.aclose()
        await self._store.aclose()


_tls: ssl.SSLContext | None = None


async def _tls_context() -> ssl.SSLContext:
    """httpx's verifying TLS context, built once per process in a worker thread (off the loop)."""
    global _tls
    if _tls is None:
        _tls = await asyncio.to_thread(httpx.create_ssl_context)
    return _tls
