"""What KIS is: its hosts, paths, error codes and limits, written once for the client and the
simulator; and how to read a KIS answer (its code and message), written once for every caller."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Protocol

__all__ = [
    "APPROVAL_KEY_LIFETIME_S",
    "APPROVAL_PATH",
    "Answer",
    "BAD_APP_KEY",
    "BAD_APP_SECRET",
    "HTTP_TIMEOUT_S",
    "ISSUE_WINDOW_S",
    "PRICE_PATH",
    "PRICE_TR_ID",
    "RATE_LIMITED",
    "RATE_LIMIT_MESSAGE",
    "REAL_BASE_URL",
    "REVOKE_PATH",
    "TOKEN_EXPIRED",
    "TOKEN_INVALID",
    "TOKEN_PATH",
    "TOKEN_REJECTED",
    "TOO_MANY_CALLS",
    "TOO_MANY_CALLS_MESSAGE",
    "UNKNOWN_SERVICE",
    "VIRTUAL_BASE_URL",
    "json_or_none",
    "kis_code",
    "kis_message",
]

REAL_BASE_URL: Final = "https://openapi.koreainvestment.com:9443"
VIRTUAL_BASE_URL: Final = "https://openapivts.koreainvestment.com:29443"

#: KIS allows one token issuance per app key per minute (``EGW00133`` otherwise); a holder that
#: meets ``EGW00133`` sits out this long (a second more than the minute, for clock granularity).
ISSUE_WINDOW_S: Final = 61.0

#: The client's default (connect, read) timeout of one KIS call, in seconds.
HTTP_TIMEOUT_S: Final = (3.05, 10.0)

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
#: token, and states no expiry in the answer. Refreshed with the store's refresh margin, and
#: dropped (compare-and-delete) as soon as KIS rejects it.
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
    if not payload:
        return None
    code = payload.get("error_code") or payload.get("msg_cd")
    return str(code) if code else None


def kis_message(payload: Mapping[str, Any] | None) -> str | None:
    """``"<code>: <KIS's text>"`` (at most 200 characters of text), or ``None`` without text."""
    if not payload:
        return None
    text = payload.get("error_description") or payload.get("msg1")
    code = kis_code(payload)
    if not text:
        return None
    return f"{code}: {str(text)[:200]}" if code else str(text)[:200]
