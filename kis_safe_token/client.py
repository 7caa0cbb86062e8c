"""``KoreaInvestment``: a KIS Open API client whose token comes from a shared ``TokenStorage``."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from datetime import timezone
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any

import requests

from ._faults import fault_point
from ._fork import renew_after_fork
from .errors import KisApiError, TokenIssueError
from .kis import (
    HTTP_TIMEOUT_S,
    ISSUE_WINDOW_S,
    PRICE_PATH,
    RATE_LIMITED,
    REAL_BASE_URL,
    TOKEN_EXPIRED,
    TOKEN_INVALID,
    VIRTUAL_BASE_URL,
)
from .secrets import resolve_api_secret
from .storage.base import TokenStorage, check_seconds
from .storage.factory import create_token_storage
from .token import Token, header_safe, mask

__all__ = ["BASE_URL_ENV", "REAL_BASE_URL", "VIRTUAL_BASE_URL", "KoreaInvestment"]

BASE_URL_ENV = "KOREA_INVESTMENT_BASE_URL"

MAX_WAIT_S = 3600.0
"""The longest HTTP timeout or ``EGW00133`` back-off accepted: an issue call holds the fleet's
issuance lock that long, and far larger numbers overflow the socket layer."""
CLOCK_TOLERANCE_S = 5.0
"""KIS's ``Date`` has one-second resolution and the answer takes time to arrive: a smaller
difference from this host's clock says nothing about the clock."""


class KoreaInvestment:
    """A KIS client that shares one access token with every other process using the same store.

    The token is kept in memory and checked against its expiry locally (no I/O per request);
    the store is touched at start, near expiry, and when KIS says the token is invalid or
    expired (``EGW00121``/``EGW00123``) — then the stored token is dropped only if it is still
    the one that failed, and a fresh one comes through ``get_or_issue``, so N workers seeing the
    same failure make one issuance.

    ``api_secret=None``: the keyring, then ``$KOREA_INVESTMENT_API_SECRET``
    (:class:`SecretNotFoundError` otherwise). ``token_storage=None``: from the environment
    (:func:`create_token_storage`). ``base_url=None``: ``$KOREA_INVESTMENT_BASE_URL``, else the
    real host, or the virtual-trading host for ``mock=True``. ``session`` and ``clock`` are
    injectable. ``rate_limit_wait_s``: how long to sit out an ``EGW00133``.
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
        rate_limit_wait_s: float = ISSUE_WINDOW_S,
        custtype: str = "P",
    ) -> None:
        _check_header_value("api_key", api_key)
        _check_header_value("custtype", custtype)
        timeout = _checked_timeout(timeout)
        rate_limit_wait_s = check_seconds("rate_limit_wait_s", rate_limit_wait_s, high=MAX_WAIT_S)
        self.api_key = api_key
        self.api_secret = resolve_api_secret(api_key, api_secret)
        _check_header_value("api_secret", self.api_secret)
        self.acc_no = acc_no
        self.mock = mock
        self.base_url = (
            base_url
            or os.environ.get(BASE_URL_ENV, "").strip()
            or (VIRTUAL_BASE_URL if mock else REAL_BASE_URL)
        ).rstrip("/")
        self.token_storage = token_storage if token_storage is not None else create_token_storage()
        self.timeout = timeout
        self.rate_limit_wait_s = rate_limit_wait_s
        self.custtype = custtype
        self._clock = clock
        self._margin_s = self.token_storage.refresh_margin_s
        self.token_storage.check_timing(
            http_timeout_s=sum(timeout), issue_window_s=rate_limit_wait_s
        )
        self._own_session = session is None
        self._session = session if session is not None else requests.Session()
        self._refresh_lock = threading.Lock()
        renew_after_fork(self)
        self._token: Token | None = None
        self._bearer = ""
        self._fresh_until = float("-inf")
        self._refresh()

    def __repr__(self) -> str:
        return (
            f"KoreaInvestment(api_key={mask(self.api_key, 4)!r}, base_url={self.base_url!r}, "
            f"token_storage={self.token_storage!r})"
        )

    # -- the token -------------------------------------------------------------------------------
    @property
    def access_token(self) -> str:
        """``Bearer <token>``, refreshed through the store when near its expiry."""
        if self._clock() < self._fresh_until:
            return self._bearer
        return self._refresh().bearer

    @property
    def token(self) -> Token:
        """The current token record (refreshed if needed)."""
        self.access_token  # noqa: B018 - refreshes if needed
        assert self._token is not None
        return self._token

    def _set(self, token: Token) -> Token:
        self._token = token
        self._bearer = token.bearer
        self._fresh_until = token.refresh_at(self._margin_s)
        return token

    def _refresh(self) -> Token:
        with self._refresh_lock:
            if self._token is not None and self._clock() < self._fresh_until:
                return self._token
            token = self.token_storage.get_or_issue(self.api_key, self.api_secret, self._issue)
            return self._set(token)

    def _forget(self) -> None:
        self._token = None
        self._fresh_until = float("-inf")

    def issue_access_token(self, force: bool = False) -> Token:
        """Get a token through the store's single flight; ``force`` first drops the stored one."""
        if force:
            stored = self.token_storage.load_token(self.api_key, self.api_secret)
            if stored:
                self.token_storage.invalidate_token(
                    self.api_key, self.api_secret, stored["access_token"]
                )
            self._forget()
        return self._refresh()

    def check_access_token(self) -> bool:
        """Whether the store holds a valid token for these credentials (the seed's check)."""
        return self.token_storage.check_token_valid(self.api_key, self.api_secret)

    def load_access_token(self) -> None:
        """Load the stored token into memory, if there is a valid one (the seed's load)."""
        data = self.token_storage.load_token(self.api_key, self.api_secret)
        if data:
            self._set(Token.from_token_data(data))

    def revoke_access_token(self) -> None:
        """Revoke the current token at KIS and drop it from the store and from memory."""
        token = self._token
        if token is None:
            return
        self._post_json(
            "/oauth2/revokeP",
            {"appkey": self.api_key, "appsecret": self.api_secret, "token": token.access_token},
        )
        self.token_storage.invalidate_token(self.api_key, self.api_secret, token.access_token)
        self._forget()

    def _issue(self) -> Token:
        """Ask KIS for a token (called by the store, holding the issuance lock)."""
        fault_point("issue.before_kis")
        body = {
            "grant_type": "client_credentials",
            "appkey": self.api_key,
            "appsecret": self.api_secret,
        }
        try:
            resp = self._http().post(
                f"{self.base_url}/oauth2/tokenP", json=body, timeout=self.timeout
            )
        except requests.RequestException as exc:
            raise TokenIssueError(f"KIS token request failed: {type(exc).__name__}") from None
        payload = _json_or_none(resp)
        if resp.status_code != 200 or payload is None or "access_token" not in payload:
            code = _kis_code(payload)
            message = (
                _kis_message(payload) or f"KIS answered HTTP {resp.status_code} without a token"
            )
            retry = self.rate_limit_wait_s if code == RATE_LIMITED else None
            raise TokenIssueError(message, code=code, status=resp.status_code, retry_after_s=retry)
        now = self._clock()
        try:
            token = Token.from_kis_response(payload, now=now)
        except ValueError as exc:
            raise _unusable_token(exc, payload, now, _kis_time(resp)) from None
        fault_point("issue.after_kis")
        return token

    def _after_fork(self) -> None:
        # In a child forked while another thread refreshed the token (gunicorn --preload with a
        # background thread), the inherited lock would stay held for ever; a client built before
        # fork() must not share pooled sockets with its parent either.
        self._refresh_lock = threading.Lock()
        if self._own_session:
            self._session = requests.Session()

    # -- API calls -------------------------------------------------------------------------------
    def _http(self) -> requests.Session:
        return self._session

    def _headers(self, tr_id: str) -> dict[str, str]:
        _check_header_value("tr_id", tr_id)
        return {
            "content-type": "application/json; charset=utf-8",
            "authorization": self.access_token,
            "appkey": self.api_key,
            "appsecret": self.api_secret,
            "tr_id": tr_id,
            "custtype": self.custtype,
        }

    def request(
        self,
        method: str,
        path: str,
        *,
        tr_id: str,
        params: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Call a KIS endpoint with the token headers; one retry with a fresh token on
        ``EGW00121``/``EGW00123``. Raises :class:`KisApiError` on any other failure, and
        ``ValueError`` naming ``method``, ``path`` or ``tr_id`` if it cannot be sent."""
        _check_request_line(method, path)
        for attempt in (1, 2):
            headers = self._headers(tr_id)
            used = self._token
            try:
                resp = self._http().request(
                    method,
                    f"{self.base_url}{path}",
                    headers=headers,
                    params=params,
                    json=body,
                    timeout=self.timeout,
                )
            except requests.RequestException as exc:
                raise KisApiError(f"KIS request {path} failed: {type(exc).__name__}") from None
            payload = _json_or_none(resp)
            code = _kis_code(payload)
            if code in (TOKEN_INVALID, TOKEN_EXPIRED) and attempt == 1 and used is not None:
                self.token_storage.invalidate_token(
                    self.api_key, self.api_secret, used.access_token
                )
                if self._token is used:
                    self._forget()
                continue
            if payload is None:
                raise KisApiError(
                    f"KIS answered {path} with HTTP {resp.status_code}, not JSON",
                    status=resp.status_code,
                )
            if resp.status_code != 200 or str(payload.get("rt_cd", "0")) != "0":
                raise KisApiError(
                    _kis_message(payload) or f"KIS answered {path} with HTTP {resp.status_code}",
                    code=code,
                    status=resp.status_code,
                )
            return payload
        raise AssertionError("unreachable")  # pragma: no cover

    def _post_json(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        try:
            resp = self._http().post(
                f"{self.base_url}{path}", json=dict(body), timeout=self.timeout
            )
        except requests.RequestException as exc:
            raise KisApiError(f"KIS request {path} failed: {type(exc).__name__}") from None
        payload = _json_or_none(resp)
        if resp.status_code != 200 or payload is None:
            raise KisApiError(
                _kis_message(payload) or f"KIS answered {path} with HTTP {resp.status_code}",
                code=_kis_code(payload),
                status=resp.status_code,
            )
        return payload

    def fetch_price(self, symbol: str) -> dict[str, Any]:
        """Current price of a domestic stock (``FHKST01010100``): the decoded KIS JSON."""
        return self.request(
            "GET",
            PRICE_PATH,
            tr_id="FHKST01010100",
            params={"FID_COND_MRKT_DIV_CODE": "J", "FID_INPUT_ISCD": symbol},
        )

    # -- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        if self._own_session:
            self._session.close()

    def __enter__(self) -> KoreaInvestment:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _check_header_value(name: str, value: object) -> None:
    if not header_safe(value):
        raise ValueError(
            f"{name} must be a non-empty string of printable ASCII without spaces or control "
            "characters (it is sent in an HTTP header)"
        )


def _check_request_line(method: object, path: object) -> None:
    if not header_safe(method):
        raise ValueError("method must be an HTTP method name such as GET or POST")
    # Without the leading slash, "@host/..." appended to base_url would send the credentials
    # and the token to another host.
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError("path must be a string starting with '/' (it is appended to base_url)")


def _checked_timeout(timeout: object) -> tuple[float, float]:
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


def _kis_time(resp: requests.Response) -> float | None:
    """KIS's clock when it answered: the HTTP ``Date`` of ``resp``, if it has a usable one."""
    try:
        moment = parsedate_to_datetime(resp.headers.get("Date") or "")
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _unusable_token(
    exc: ValueError, payload: Mapping[str, Any], now: float, kis_now: float | None
) -> TokenIssueError:
    """The error for a tokenP answer that ``Token.from_kis_response`` refused at ``now``.

    If the token is fine by KIS's own clock, the fault is this host's clock (ahead by more than
    a token's lifetime, every fresh token looks expired): say so, and mark it ``local`` so a
    storage does not pass it to other processes, whose clocks may be right.
    """
    if kis_now is not None and abs(now - kis_now) > CLOCK_TOLERANCE_S:
        try:
            Token.from_kis_response(payload, now=kis_now)
        except ValueError:
            pass
        else:
            skew = now - kis_now
            return TokenIssueError(
                f"this host's clock differs from KIS's by about {abs(skew):.0f} s "
                f"({'ahead' if skew > 0 else 'behind'}, by the Date of KIS's answer): the token "
                "KIS just issued is usable by KIS's clock but not by this host's; "
                "fix this host's clock (NTP)",
                status=200,
                local=True,
            )
    return TokenIssueError(f"KIS token response unusable: {exc}", status=200)


def _json_or_none(resp: requests.Response) -> dict[str, Any] | None:
    try:
        payload = resp.json()
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def _kis_code(payload: Mapping[str, Any] | None) -> str | None:
    if not payload:
        return None
    code = payload.get("error_code") or payload.get("msg_cd")
    return str(code) if code else None


def _kis_message(payload: Mapping[str, Any] | None) -> str | None:
    if not payload:
        return None
    text = payload.get("error_description") or payload.get("msg1")
    code = _kis_code(payload)
    if not text:
        return None
    return f"{code}: {str(text)[:200]}" if code else str(text)[:200]
