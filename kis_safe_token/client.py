"""``KoreaInvestment``: KIS REST calls on a :class:`~kis_safe_token.SharedToken`."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from functools import cached_property
from typing import Any, Generic, TypeVar

import requests

from .auth import KisAuth
from .errors import KisApiError
from .kis import (
    HTTP_TIMEOUT_S,
    PRICE_PATH,
    PRICE_TR_ID,
    REAL_BASE_URL,
    VIRTUAL_BASE_URL,
    Answer,
    Verdict,
    json_or_none,
    kis_code,
    kis_message,
    verdict,
)
from .oauth import Timeout, no_answer
from .ratelimit import RateLimiter
from .shared import BASE_URL_ENV, Closing, SharedToken, TokenSettings, check_header_value
from .storage.base import TokenStorage
from .token import Token, header_safe, mask

__all__ = ["BASE_URL_ENV", "REAL_BASE_URL", "VIRTUAL_BASE_URL", "KoreaInvestment"]

S = TypeVar("S", bound=TokenSettings)
C = TypeVar("C", bound="ClientSettings[Any]")


class ClientSettings(Generic[S]):
    """The settings of a client's token holder, read through it (sync and asyncio clients)."""

    shared_token: S

    @classmethod
    def from_shared(
        cls: type[C], shared: S, acc_no: str | None = None, *, custtype: str = "P"
    ) -> C:
        """A client on ``shared`` (which stays the caller's to close); fetches nothing."""
        check_header_value("custtype", custtype)
        client = cls.__new__(cls)
        client._setup(shared, acc_no, custtype, owned=False)
        return client

    def _setup(self, shared: S, acc_no: str | None, custtype: str, *, owned: bool) -> None:
        self.shared_token = shared
        self.acc_no = acc_no
        self.custtype = custtype
        self._owned = owned

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(api_key={mask(self.api_key, 4)!r}, "
            f"base_url={self.base_url!r}, token_storage={self.token_storage!r})"
        )

    @property
    def api_key(self) -> str:
        return self.shared_token.api_key

    @property
    def api_secret(self) -> str:
        return self.shared_token.api_secret

    @property
    def mock(self) -> bool:
        return self.shared_token.mock

    @property
    def base_url(self) -> str:
        return self.shared_token.base_url

    @property
    def token_storage(self) -> TokenStorage:
        return self.shared_token.token_storage

    @property
    def timeout(self) -> Timeout:
        return self.shared_token.timeout

    @property
    def rate_limit_wait_s(self) -> float:
        return self.shared_token.rate_limit_wait_s

    @property
    def rate_limiter(self) -> RateLimiter | None:
        """The fleet-wide call-rate limiter every call waits for (``None``: turned off)."""
        return self.shared_token.rate_limiter


class KoreaInvestment(ClientSettings[SharedToken], Closing):
    """A KIS client whose access token is shared with every other process using the same store.

    Every call carries the :class:`SharedToken` through :class:`KisAuth`. The token is fetched at
    construction, so a wrong secret or an unreachable store fails here. ``acc_no``: the account
    number; ``custtype``: KIS's customer type header (``"P"``: a person); the other arguments are
    :class:`SharedToken`'s. :meth:`from_shared` builds a client on an existing one.
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
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
        timeout: float | tuple[float, float] = HTTP_TIMEOUT_S,
        rate_limit_wait_s: float | None = None,
        custtype: str = "P",
        calls_per_second: float | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        check_header_value("custtype", custtype)
        shared = SharedToken(
            api_key,
            api_secret,
            token_storage,
            mock=mock,
            base_url=base_url,
            session=session,
            clock=clock,
            timeout=timeout,
            rate_limit_wait_s=rate_limit_wait_s,
            calls_per_second=calls_per_second,
            rate_limiter=rate_limiter,
        )
        self._setup(shared, acc_no, custtype, owned=True)
        try:
            shared.token  # noqa: B018 - fetched now: a wrong secret fails here, not mid-trade
        except BaseException:
            self.close()
            raise

    @cached_property
    def _auth(self) -> KisAuth:
        return KisAuth.from_shared(self.shared_token)

    @property
    def approval_key(self) -> str:
        """The websocket approval key, issued once for the fleet and shared through the store."""
        return self.shared_token.approval_key

    # -- the token (the seed's names) --------------------------------------------------------------
    @property
    def access_token(self) -> str:
        """``Bearer <token>``, refreshed through the store when near its expiry."""
        return self.shared_token.bearer

    @property
    def token(self) -> Token:
        """The current token record (refreshed if needed)."""
        return self.shared_token.token

    def issue_access_token(self, force: bool = False) -> Token:
        """Get a token through the store's single flight; ``force`` first drops the stored one."""
        return self.shared_token.issue(force)

    def check_access_token(self) -> bool:
        """Whether the store holds a valid token: a pure read, never the seed lease (which
        the seed's ``check_token_valid`` takes)."""
        return self.token_storage.load_token(self.api_key, self.api_secret) is not None

    def load_access_token(self) -> None:
        """Load the stored token into memory, if there is a valid one (the seed's load)."""
        self.shared_token.load()

    def revoke_access_token(self) -> None:
        """Revoke the current token at KIS and drop it from the store and from memory."""
        self.shared_token.revoke()

    # -- API calls ---------------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        *,
        tr_id: str,
        params: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Call a KIS endpoint through :class:`KisAuth`; the decoded JSON. :class:`KisApiError`
        on failure; ``ValueError`` naming ``method``, ``path`` or ``tr_id`` if it cannot be sent."""
        check_request_line(method, path)
        headers = request_headers(tr_id, self.custtype)
        try:
            resp = self.shared_token.session.request(
                method,
                f"{self.base_url}{path}",
                headers=headers,
                params=params,
                json=body,
                timeout=self.timeout,
                auth=self._auth,
            )
        except requests.RequestException as exc:
            raise KisApiError(no_answer(path, exc)) from None
        return payload_of(resp, path, resends=len(resp.history))

    def fetch_price(self, symbol: str) -> dict[str, Any]:
        """Current price of a domestic stock (``FHKST01010100``): the decoded KIS JSON."""
        return self.request("GET", PRICE_PATH, tr_id=PRICE_TR_ID, params=price_params(symbol))

    def close(self) -> None:
        """Close the :class:`SharedToken`'s session, if this client built it."""
        if self._owned:
            self.shared_token.close()


def request_headers(tr_id: str, custtype: str) -> dict[str, str]:
    """The headers of a KIS REST call other than the credentials."""
    check_header_value("tr_id", tr_id)
    return {"content-type": "application/json; charset=utf-8", "tr_id": tr_id, "custtype": custtype}


def price_params(symbol: str) -> dict[str, str]:
    """The query of the domestic price quote (``FHKST01010100``) of ``symbol``."""
    return {"FID_COND_MRKT_DIV_CODE": "J", "FID_INPUT_ISCD": symbol}


def payload_of(resp: Answer, path: str, *, resends: int = 0) -> dict[str, Any]:
    """The decoded JSON of KIS's answer to ``path``, or :class:`KisApiError` with KIS's code
    (``resends``: the re-sends after ``EGW00201``, for the message)."""
    payload = json_or_none(resp)
    if payload is None:
        raise KisApiError(
            f"KIS answered {path} with HTTP {resp.status_code}, not JSON",
            status=resp.status_code,
        )
    kind = verdict(payload, resp.status_code)
    if kind is not Verdict.OK:
        message = kis_message(payload) or f"KIS answered {path} with HTTP {resp.status_code}"
        if kind is Verdict.TOO_MANY_CALLS:
            message += (
                f" (still refused after {resends} re-sends with back-off: another "
                "program may be using this app key)"
            )
        raise KisApiError(message, code=kis_code(payload), status=resp.status_code)
    return payload


def check_request_line(method: object, path: object) -> None:
    """``ValueError`` naming ``method`` or ``path`` if the request line cannot be sent."""
    if not header_safe(method):
        raise ValueError("method must be an HTTP method name such as GET or POST")
    # Without the leading slash, "@host/..." appended to base_url would send the credentials
    # and the token to another host.
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError("path must be a string starting with '/' (it is appended to base_url)")
