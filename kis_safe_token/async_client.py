"""``AsyncKoreaInvestment``: KIS REST calls from asyncio code on an :class:`AsyncSharedToken`."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from .async_shared import AsyncSharedToken, httpx_timeout
from .client import ClientSettings, check_request_line, payload_of, price_params, request_headers
from .errors import KisApiError
from .kis import HTTP_TIMEOUT_S, PRICE_PATH, PRICE_TR_ID, verdict_of
from .oauth import no_answer
from .policy import CallPolicy, backoff_s, drive_async
from .ratelimit import RateLimiter
from .shared import AsyncClosing, check_header_value
from .storage.base import TokenStorage
from .token import Token

__all__ = ["AsyncKoreaInvestment"]

#: The REST paths that count against KIS's calls-per-second limit (the OAuth ones do not).
THROTTLED_PREFIX = "/uapi/"


class AsyncKoreaInvestment(ClientSettings[AsyncSharedToken], AsyncClosing):
    """:class:`~kis_safe_token.KoreaInvestment` for asyncio (docs/asyncio.md): the same token,
    store and call rate as the sync side, and no wait that blocks the loop.

    ``async with`` fetches the token on entry (a wrong secret or an unreachable store fails
    there) and closes the HTTP and Redis clients on exit. The arguments are
    :class:`~kis_safe_token.KoreaInvestment`'s, plus ``http_client`` and ``redis_client`` (see
    :class:`AsyncSharedToken`).
    """

    def __init__(
        self,
        api_key: str,
        api_secret: str | None = None,
        acc_no: str | None = None,
        mock: bool = False,
        token_storage: TokenStorage | None = None,
        *,
        base_url: str | None = None,
        calls_per_second: float | None = None,
        rate_limiter: RateLimiter | None = None,
        http_client: httpx.AsyncClient | None = None,
        redis_client: Any = None,
        clock: Callable[[], float] = time.time,
        timeout: float | tuple[float, float] = HTTP_TIMEOUT_S,
        rate_limit_wait_s: float | None = None,
        custtype: str = "P",
    ) -> None:
        check_header_value("custtype", custtype)
        shared = AsyncSharedToken(
            api_key,
            api_secret,
            token_storage,
            mock=mock,
            base_url=base_url,
            http_client=http_client,
            redis_client=redis_client,
            clock=clock,
            timeout=timeout,
            rate_limit_wait_s=rate_limit_wait_s,
            calls_per_second=calls_per_second,
            rate_limiter=rate_limiter,
        )
        self._setup(shared, acc_no, custtype, owned=True)

    # -- the token -------------------------------------------------------------------------------
    async def access_token(self) -> str:
        """``Bearer <token>``, refreshed through the store when near its expiry."""
        return await self.shared_token.bearer()

    async def token(self) -> Token:
        """The current token record (refreshed if needed)."""
        return await self.shared_token.token()

    async def issue_access_token(self, force: bool = False) -> Token:
        """Get a token through the store's single flight; ``force`` first drops the stored one."""
        return await self.shared_token.issue(force)

    # -- API calls ---------------------------------------------------------------------------------
    async def request(
        self,
        method: str,
        path: str,
        *,
        tr_id: str,
        params: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Call a KIS endpoint as :meth:`KoreaInvestment.request` does (a rate slot first for a
        ``/uapi/`` path); the decoded JSON. Raises what it raises."""
        check_request_line(method, path)
        headers = request_headers(tr_id, self.custtype)
        shared = self.shared_token
        # backoff_s looked up here: tests make it quick
        policy = CallPolicy(backoff=backoff_s, on_refusal=shared.refused)
        sent = await shared.token()

        async def send(_last: httpx.Response | None = None) -> httpx.Response:
            if path.startswith(THROTTLED_PREFIX):
                await shared.throttle(policy.left_s())
            credentials = {"appkey": shared.api_key, "appsecret": shared.api_secret}
            try:
                return await (await shared.http_client()).request(
                    method,
                    f"{shared.base_url}{path}",
                    headers={**headers, "authorization": sent.bearer, **credentials},
                    params=params,
                    json=body,
                    timeout=httpx_timeout(shared.timeout),
                )
            except httpx.HTTPError as exc:
                raise KisApiError(no_answer(path, exc)) from None

        async def refresh(_last: httpx.Response) -> bool:
            nonlocal sent
            await shared.invalidate(sent.access_token)
            fresh = await shared.token()
            if fresh.access_token == sent.access_token:
                return False  # nothing better to send
            sent = fresh
            return True

        resp = await drive_async(
            policy, await send(), verdict_of, send, penalize=shared.penalize, refresh=refresh
        )
        return payload_of(resp, path, resends=policy.resends)

    async def fetch_price(self, symbol: str) -> dict[str, Any]:
        """Current price of a domestic stock (``FHKST01010100``): the decoded KIS JSON."""
        return await self.request("GET", PRICE_PATH, tr_id=PRICE_TR_ID, params=price_params(symbol))

    # -- the websocket approval key ----------------------------------------------------------------
    async def approval_key(self) -> str:
        """The websocket approval key, issued once for the fleet (sync and async alike)."""
        return await self.shared_token.approval_key()

    async def invalidate_approval_key(self, approval_key: str) -> bool:
        """KIS rejected ``approval_key``: compare-and-delete it; whether the store deleted it."""
        return await self.shared_token.invalidate_approval_key(approval_key)

    # -- lifecycle ---------------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Close the :class:`AsyncSharedToken`'s clients, if this client built it."""
        if self._owned:
            await self.shared_token.aclose()

    async def __aenter__(self) -> AsyncKoreaInvestment:
        try:
            await self.shared_token.token()
        except BaseException:
            await self.aclose()
            raise
        return self
