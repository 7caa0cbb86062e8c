"""What KIS is (its hosts, paths, error codes and limits) and how to read a KIS answer (its code,
message, clock and :class:`Verdict`), written once for every client, integration and simulator."""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Mapping
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

from ._checks import check_seconds, env_seconds
from .token import Token

__all__ = [
    "APPROVAL_KEY_LIFETIME_S",
    "APPROVAL_PATH",
    "Answer",
    "BAD_APP_KEY",
    "BAD_APP_SECRET",
    "CLOCK_TOLERANCE_S",
    "HTTP_TIMEOUT_S",
    "ISSUE_WINDOW_ENV",
    "ISSUE_WINDOW_S",
    "PRICE_PATH",
    "PRICE_TR_ID",
    "RATE_LIMITED",
    "RATE_LIMIT_MESSAGE",
    "REAL_BASE_URL",
    "REAL_WS_URL",
    "REVOKE_PATH",
    "TOKEN_EXPIRED",
    "TOKEN_INVALID",
    "TOKEN_PATH",
    "TOKEN_REJECTED",
    "TOO_MANY_CALLS",
    "TOO_MANY_CALLS_MESSAGE",
    "UNKNOWN_SERVICE",
    "VIRTUAL_BASE_URL",
    "VIRTUAL_WS_URL",
    "WS_URL_ENV",
    "Verdict",
    "json_or_none",
    "kis_code",
    "kis_message",
    "kis_time",
    "origin",
    "resolve_issue_window_s",
    "verdict",
    "verdict_of",
]

#: The approval key is stored under the app key plus this suffix (its own entry, lock and record).
APPROVAL_SUFFIX: Final = ":approval"
REAL_BASE_URL: Final = "https://openapi.koreainvestment.com:9443"
VIRTUAL_BASE_URL: Final = "https://openapivts.koreainvestment.com:29443"
#: KIS's realtime websocket (one session per app key), real and virtual; the environment's
#: ``KOREA_INVESTMENT_WS_URL`` comes first.
REAL_WS_URL: Final = "ws://ops.koreainvestment.com:21000"
VIRTUAL_WS_URL: Final = "ws://ops.koreainvestment.com:31000"
WS_URL_ENV: Final = "KOREA_INVESTMENT_WS_URL"

#: KIS allows one token issuance per app key per minute (``EGW00133`` otherwise); a holder that
#: meets ``EGW00133`` sits out this long (a second more than the minute, for clock granularity).
ISSUE_WINDOW_S: Final = 61.0
#: The environment variable that sets it for a whole fleet (a simulator's or a gateway's window).
ISSUE_WINDOW_ENV: Final = "KOREA_INVESTMENT_ISSUE_WINDOW_S"
#: The longest window accepted: a holder sits it out holding the fleet's issuance lock.
MAX_ISSUE_WINDOW_S: Final = 3600.0


def resolve_issue_window_s(
    value: float | None = None,
    *,
    name: str = "rate_limit_wait_s",
    env: Mapping[str, str] | None = None,
) -> float:
    """How long a holder sits out ``EGW00133`` before asking KIS again: ``value`` if given, else
    ``$KOREA_INVESTMENT_ISSUE_WINDOW_S``, else :data:`ISSUE_WINDOW_S` (61 s). ``ValueError``
    naming the argument (``name``) or the variable unless more than 0 and at most 3600 s."""
    if value is not None:
        return check_seconds(name, value, high=MAX_ISSUE_WINDOW_S)
    environ = os.environ if env is None else env
    return env_seconds(environ, ISSUE_WINDOW_ENV, ISSUE_WINDOW_S, high=MAX_ISSUE_WINDOW_S)


#: The client's default (connect, read) timeout of one KIS call, in seconds.
HTTP_TIMEOUT_S: Final = (3.05, 10.0)

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def origin(url: str) -> tuple[str, str, int | None]:
    """``(scheme, host, port)`` of ``url``, with the scheme's default port filled in."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port or _DEFAULT_PORTS.get(scheme)


# -- endpoints ------------------------------------------------------------------------------------
TOKEN_PATH: Final = "/oauth2/tokenP"
REVOKE_PATH: Final = "/oauth2/revokeP"
APPROVAL_PATH: Final = "/oauth2/Approval"
PRICE_PATH: Final = "/uapi/domestic-stock/v1/quotations/inquire-price"
PRICE_TR_ID: Final = "FHKST01010100"

# -- error codes (``error_code`` of the OAuth endpoints, ``msg_cd`` of the REST ones) -------------
#: A second token issuance within the minute.
RATE_LIMITED: Final = "EGW00133"
#: The token is not one KIS issued (or it was revoked).
TOKEN_INVALID: Final = "EGW00121"
#: The token has expired.
TOKEN_EXPIRED: Final = "EGW00123"
#: The answers after which the token that was sent is dropped and the call made once more.
TOKEN_REJECTED: Final = frozenset({TOKEN_INVALID, TOKEN_EXPIRED})
#: Too many REST calls per second for this app key (HTTP 500, ``rt_cd`` "1"). Only that: the
#: simulator answers a wrong ``tr_id`` with :data:`UNKNOWN_SERVICE`, never with this code.
TOO_MANY_CALLS: Final = "EGW00201"
TOO_MANY_CALLS_MESSAGE: Final = "초당 거래건수를 초과하였습니다."
#: A ``tr_id`` KIS does not serve.
UNKNOWN_SERVICE: Final = "OPSQ0002"
#: How long an approval key (``/oauth2/Approval``) is used: KIS documents 24 h, like the access
#: token, and states no expiry in the answer.
APPROVAL_KEY_LIFETIME_S: Final = 86_400.0
#: Unknown app key / wrong app secret.
BAD_APP_KEY: Final = "EGW00103"
BAD_APP_SECRET: Final = "EGW00105"

RATE_LIMIT_MESSAGE: Final = "접근토큰 발급 잠시 후 다시 시도하세요(1분당 1회)"


# -- reading an answer ----------------------------------------------------------------------------
class Answer(Protocol):
    """What is read of an HTTP answer: a ``requests.Response`` or an ``httpx.Response``."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def content(self) -> bytes: ...

    def json(self) -> Any: ...


def json_or_none(resp: Answer) -> dict[str, Any] | None:
    """The JSON object of ``resp``, or ``None`` if the body is not one (a gateway's HTML page)."""
    try:
        payload = resp.json()
    except (ValueError, RecursionError):  # RecursionError: "[[[[…" nested past the stack
        return None
    return payload if isinstance(payload, dict) else None


def kis_code(payload: Mapping[str, Any] | None) -> str | None:
    """KIS's code in an answer: ``error_code`` (OAuth endpoints) or ``msg_cd`` (REST ones)."""
    code = payload and (payload.get("error_code") or payload.get("msg_cd"))
    return str(code) if code else None


def kis_message(payload: Mapping[str, Any] | None) -> str | None:
    """``"<code>: <KIS's text>"`` (at most 200 characters of text), or ``None`` without text."""
    text = payload and (payload.get("error_description") or payload.get("msg1"))
    if not text:
        return None
    code = kis_code(payload)
    return f"{code}: {str(text)[:200]}" if code else str(text)[:200]


def kis_time(resp: Answer) -> float | None:
    """KIS's clock when it answered: the HTTP ``Date`` of ``resp``, if it has a usable one."""
    try:
        moment = parsedate_to_datetime(resp.headers.get("Date") or "")
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


#: KIS's ``Date`` has one-second resolution and the answer takes time to arrive: a smaller
#: difference from this host's clock says nothing about the clock.
CLOCK_TOLERANCE_S: Final = 5.0


class Verdict(enum.Enum):
    """What a KIS answer means to its caller: exactly one of these (:func:`verdict`)."""

    OK = "ok"
    #: ``EGW00121``/``EGW00123``, or a failure whose message says the token expired (``기간이
    #: 만료된 token 입니다.``, from gateways that answer without the code): drop the token sent.
    TOKEN_REJECTED = "token rejected"
    #: ``EGW00133``: a token was issued for this app key within the minute.
    ISSUE_REFUSED = "issue refused"
    #: ``EGW00201``: too many calls per second for this app key.
    TOO_MANY_CALLS = "too many calls"
    #: A ``tokenP`` answer whose token is usable by KIS's clock (its ``Date``) but not by this
    #: host's: the fault is this host's clock, not KIS's.
    CLOCK_SKEW = "clock skew"
    #: Any other refusal, or an answer that is not KIS's JSON.
    OTHER = "other"


def verdict(
    answer: object,
    status: int | None = None,
    *,
    now: float | None = None,
    kis_now: float | None = None,
) -> Verdict:
    """The :class:`Verdict` of KIS's answer: its decoded JSON (not an object: KIS sent none)
    and HTTP ``status`` (``None``: unknown). For a ``tokenP`` answer, ``now`` and ``kis_now``
    (this host's clock, KIS's ``Date``) tell :attr:`Verdict.CLOCK_SKEW`."""
    payload = answer if isinstance(answer, Mapping) else None
    code = kis_code(payload)
    if code in TOKEN_REJECTED:
        return Verdict.TOKEN_REJECTED
    if code == TOO_MANY_CALLS:
        return Verdict.TOO_MANY_CALLS
    if code == RATE_LIMITED:
        return Verdict.ISSUE_REFUSED
    if payload is None:
        return Verdict.OTHER
    rt_cd = str(payload.get("rt_cd", "0"))
    if status not in (None, 200) or rt_cd != "0" or payload.get("error_code"):
        message = str(payload.get("msg1") or payload.get("error_description") or "")
        expired = "만료" in message and "token" in message.lower()
        return Verdict.TOKEN_REJECTED if expired else Verdict.OTHER
    if now is not None and kis_now is not None and _skewed(payload, now, kis_now):
        return Verdict.CLOCK_SKEW
    return Verdict.OK


#: What a body holds if its verdict may be other than OK: a KIS gateway code, an expiry, an
#: ``error_code``, or an ``rt_cd`` (then not "0", :data:`_RT_CD_OK`).
_NEEDLES: Final = (b"EGW00", "만료".encode(), b'"error_code"')
_RT_CD_OK: Final = re.compile(rb'"rt_cd"\s*:\s*"0"')


def verdict_of(resp: Answer, *, stream: bool = False) -> Verdict:
    """:func:`verdict` of an HTTP answer, on every call's path: an HTTP success is decoded only if
    a byte search says it may be a refusal, and left unread if ``stream``."""
    status = resp.status_code
    if status < 400 and (stream or _plain(resp.content)):
        return Verdict.OK
    return verdict(json_or_none(resp), status)


def _plain(body: bytes) -> bool:
    if any(needle in body for needle in _NEEDLES):
        return False
    return b'"rt_cd"' not in body or _RT_CD_OK.search(body) is not None


def _skewed(payload: Mapping[str, Any], now: float, kis_now: float) -> bool:
    """Whether the token in ``payload`` is unusable at ``now`` but usable by KIS's ``kis_now``."""
    return (
        abs(now - kis_now) > CLOCK_TOLERANCE_S
        and not _usable(payload, now)
        and _usable(payload, kis_now)
    )


def _usable(payload: Mapping[str, Any], now: float) -> bool:
    try:
        Token.from_kis_response(payload, now=now)
    except ValueError:
        return False
    return True
