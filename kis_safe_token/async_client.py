"""``AsyncKoreaInvestment``: KIS REST calls from asyncio code on an :class:`AsyncSharedToken`."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
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
    ISSUE_WINDOW_S,
    PRICE_PATH,
    PRICE_TR_ID,
    TOKEN_REJECTED,
    json_or_none,
    kis_code,
)
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

    The arguments are :class:`~kis_safe_token.KoreaInvestment`'s, plus ``http_client`` and
    ``redis_client`` (see :class:`AsyncSharedToken`). ``calls_per_second`` and
    ``rate_limiter`` are accepted for the fleet-wide call limit (issue 12), which every
    ``/uapi/`` call goes through in :meth:`_throttle`.
    """

    # TODO(issue 12): approval_key (the websocket key, single flight like the token).

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
        rate_limit_wait_s: float = ISSUE_WINDOW_S,
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
        """Call a KIS endpoint with the token headers; one re-send with a fresh token on
        ``EGW00121``/``EGW00123``. Raises :class:`KisApiError` on any other failure, and
        ``ValueError`` naming ``method``, ``path`` or ``tr_id`` if it cannot be sent."""
        check_request_line(method, path)
        headers = request_headers(tr_id, self.custtype)
        sent = await self.shared_token.token()
        resp = await self._send(method, path, headers, params, body, sent)
        if _token_rejected(resp):
            await self.shared_token.invalidate(sent.access_token)
            fresh = await self.shared_token.token()
            if fresh.access_token != sent.access_token:
                resp = await self._send(method, path, headers, params, body, fresh)
        return payload_of(resp, path)

    async def fetch_price(self, symbol: str) -> dict[str, Any]:
        """Current price of a domestic stock (``FHKST01010100``): the decoded KIS JSON."""
        return await self.request("GET", PRICE_PATH, tr_id=PRICE_TR_ID, params=price_params(symbol))

    async def _send(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        params: Mapping[str, str] | None,
        body: Mapping[str, Any] | None,
        token: Token,
    ) -> httpx.Response:
        if path.startswith(THROTTLED_PREFIX):
            await self._throttle()
        shared = self.shared_token
        headers = {
            **headers,
            "authorization": token.bearer,
            "appkey": shared.api_key,
            "appsecret": shared.api_secret,
        }
        try:
            return await shared.http.request(
                method,
                f"{shared.base_url}{path}",
                headers=headers,
                params=params,
                json=body,
                timeout=httpx_timeout(shared.timeout),
            )
        except httpx.HTTPError as exc:
            raise request_failed(path, exc) from None

    async def _throttle(self) -> None:
        """Wait for this app key's fleet-wide call budget before a ``/uapi/`` call.

        A no-op for now: the fleet-wide limiter (issue 12, ``calls_per_second`` /
        ``rate_limiter``, a non-sleeping ``try_acquire() -> wait_s``) is wired in here at merge
        time, as ``while (wait_s := limiter.try_acquire()) > 0: await asyncio.sleep(wait_s)``.
        """

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


def _token_rejected(resp: httpx.Response) -> bool:
    """Whether KIS answered ``EGW00121``/``EGW00123`` (JSON decoded only if the body names one)."""
    if b"EGW0012" not in resp.content:
        return False
    return kis_code(json_or_none(resp)) in TOKEN_REJECTED
