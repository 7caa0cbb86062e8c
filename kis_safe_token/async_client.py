"""``AsyncKoreaInvestment``: KIS REST calls from asyncio code on an :class:`AsyncSharedToken`."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

from .async_shared import AsyncSharedToken, httpx_timeout
from .client import (
    ClientSettings,
    check_request_line,
    payload_of,
    price_params,
    request_failed,
    request_headers,
)
from .kis import (
    HTTP_TIMEOUT_S,
    PRICE_PATH,
    PRICE_TR_ID,
    verdict_of,
)
from .policy import CallPolicy, backoff_s, drive_async
from .ratelimit import RateLimiter
from .shared import check_header_value
from .storage.base import TokenStorage
from .token import Token

__all__ = ["AsyncKoreaInvestment"]

#: The REST paths that count against KIS's calls-per-second limit (the OAuth ones do not).
THROTTLED_PREFIX = "/uapi/"


class AsyncKoreaInvestment(ClientSettings):
    """:class:`~kis_safe_token.KoreaInvestment` for asyncio: ``await fetch_price(...)``, one
    token shared with every sync and async process on the same store, and no call that blocks
    the event loop while another process issues.

    ``async with AsyncKoreaInvestment(...) as kis:`` fetches the token on entry (a wrong
    secret or an unreachable store fails there) and closes the HTTP and Redis clients on exit.
    A call whose token KIS rejects (``EGW00121``/``EGW00123``) is sent once more with a fresh
    one, through the store's single flight.

    Every ``/uapi/`` call first waits (``asyncio.sleep``, never blocking the loop) for a slot
    of the app key's fleet-wide call-rate limit, the very limiter sync processes on the same
    store use, so a mixed fleet counts once: ``calls_per_second=None`` is
    ``$KOREA_INVESTMENT_CALLS_PER_SECOND``, else 20/s real, 2/s virtual; a number overrides;
    ``0`` turns it off; ``rate_limiter=`` injects one. On a Redis store the slot is one script
    on ``redis.asyncio``. An ``EGW00201`` that comes anyway is re-sent as
    :mod:`kis_safe_token.policy` says, then raised as :class:`KisApiError`.
    ``await kis.approval_key()`` is the websocket approval key, one for the fleet (sync and
    async), through the store's single flight.

    The arguments are :class:`~kis_safe_token.KoreaInvestment`'s, plus ``http_client`` and
    ``redis_client`` (see :class:`AsyncSharedToken`).
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

    @classmethod
    def from_shared(
        cls, shared: AsyncSharedToken, acc_no: str | None = None, *, custtype: str = "P"
    ) -> AsyncKoreaInvestment:
        """A client on ``shared`` (which stays the caller's to close); fetches nothing."""
        check_header_value("custtype", custtype)
        client = cls.__new__(cls)
        client._setup(shared, acc_no, custtype, owned=False)
        return client

    shared_token: AsyncSharedToken

    def _setup(
        self, shared: AsyncSharedToken, acc_no: str | None, custtype: str, *, owned: bool
    ) -> None:
        self.shared_token = shared
        self.acc_no = acc_no
        self.custtype = custtype
        self._owned = owned

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
        """Call a KIS endpoint with the token headers, after a slot of the fleet's call-rate
        limit for a ``/uapi/`` path; one re-send with a fresh token on
        ``EGW00121``/``EGW00123``; bounded re-sends after back-off on ``EGW00201``. Raises
        :class:`KisApiError` on any other failure (or an ``EGW00201`` that does not stop), and
        ``ValueError`` naming ``method``, ``path`` or ``tr_id`` if it cannot be sent."""
        check_request_line(method, path)
        call = _Call(method, path, request_headers(tr_id, self.custtype), params, body)
        shared = self.shared_token
        policy = CallPolicy(backoff=backoff_s)  # looked up here: tests make it quick
        sent = await shared.token()

        async def resend(_last: httpx.Response) -> httpx.Response:
            return await self._send(call, sent, policy.left_s())

        async def refresh(_last: httpx.Response) -> bool:
            nonlocal sent
            await shared.invalidate(sent.access_token)
            fresh = await shared.token()
            if fresh.access_token == sent.access_token:
                return False  # nothing better to send
            sent = fresh
            return True

        first = await self._send(call, sent, policy.left_s())
        resp = await drive_async(
            policy, first, verdict_of, resend, penalize=shared.penalize, refresh=refresh
        )
        return payload_of(resp, path, resends=policy.resends)

    async def fetch_price(self, symbol: str) -> dict[str, Any]:
        """Current price of a domestic stock (``FHKST01010100``): the decoded KIS JSON."""
        return await self.request("GET", PRICE_PATH, tr_id=PRICE_TR_ID, params=price_params(symbol))

    async def _send(self, call: _Call, token: Token, slot_timeout_s: float) -> httpx.Response:
        """Send ``call`` with ``token``, after a slot of the fleet's call-rate limit (waited
        for, without blocking the loop, within ``slot_timeout_s``) for a ``/uapi/`` path."""
        shared = self.shared_token
        if call.path.startswith(THROTTLED_PREFIX):
            await shared.throttle(slot_timeout_s)
        headers = {
            **call.headers,
            "authorization": token.bearer,
            "appkey": shared.api_key,
            "appsecret": shared.api_secret,
        }
        try:
            return await (await shared.http_client()).request(
                call.method,
                f"{shared.base_url}{call.path}",
                headers=headers,
                params=call.params,
                json=call.body,
                timeout=httpx_timeout(shared.timeout),
            )
        except httpx.HTTPError as exc:
            raise request_failed(call.path, exc) from None

    # -- the websocket approval key ----------------------------------------------------------------
    async def approval_key(self) -> str:
        """The websocket approval key, issued once for the fleet (sync and async processes
        alike) and shared through the store (:meth:`AsyncSharedToken.approval_key`)."""
        return await self.shared_token.approval_key()

    async def invalidate_approval_key(self, approval_key: str) -> bool:
        """KIS rejected ``approval_key``: compare-and-delete it, so the next
        :meth:`approval_key` gets a new one (:meth:`AsyncSharedToken.invalidate_approval_key`)."""
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

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


@dataclass(frozen=True)
class _Call:
    """One request as the caller gave it, sent again as is after a refusal."""

    method: str
    path: str
    headers: dict[str, str]
    params: Mapping[str, str] | None
    body: Mapping[str, Any] | None
