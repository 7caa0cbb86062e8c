"""KIS's OAuth endpoints: issue a token (``tokenP``), revoke one (``revokeP``), and get the
websocket approval key (``Approval``).

Plain functions over an injected ``requests.Session``: no memory, no storage, no lock. Whoever
calls :func:`issue_token` decides when (:class:`~kis_safe_token.SharedToken` calls it only while
holding the fleet's issuance lock). Neither the secret nor a token appears in an error message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Any, TypeAlias

import requests

from .errors import KisApiError, TokenIssueError
from .kis import (
    APPROVAL_KEY_LIFETIME_S,
    APPROVAL_PATH,
    RATE_LIMITED,
    REVOKE_PATH,
    TOKEN_PATH,
    TOO_MANY_CALLS,
    Answer,
    json_or_none,
    kis_code,
    kis_message,
)
from .token import Token, header_safe

__all__ = [
    "CLOCK_TOLERANCE_S",
    "Timeout",
    "approval_key_from_answer",
    "approval_request",
    "approval_request_failed",
    "check_revoked",
    "issue_approval_key",
    "issue_token",
    "revoke_request",
    "revoke_token",
    "token_from_answer",
    "token_request",
    "token_request_failed",
]

Timeout: TypeAlias = tuple[float, float]
"""requests' ``(connect, read)`` timeout, in seconds."""

CLOCK_TOLERANCE_S = 5.0
"""KIS's ``Date`` has one-second resolution and the answer takes time to arrive: a smaller
difference from this host's clock says nothing about the clock."""


def _NO_AUTH(request: requests.PreparedRequest) -> requests.PreparedRequest:  # noqa: N802
    """The OAuth calls carry no token: never the session's own ``auth``, which may be a
    :class:`~kis_safe_token.KisAuth` waiting for the very token being issued (a deadlock)."""
    return request


def issue_token(
    session: requests.Session,
    base_url: str,
    *,
    api_key: str,
    api_secret: str,
    timeout: Timeout,
    clock: Callable[[], float],
    rate_limit_wait_s: float,
) -> Token:
    """Ask KIS for a new access token (``POST /oauth2/tokenP``).

    Raises :class:`TokenIssueError` carrying KIS's code and HTTP status if KIS refuses (with
    ``retry_after_s=rate_limit_wait_s`` for ``EGW00133``), if the call fails, or if the answer
    is a token that cannot be used (expired on arrival, unsendable, living for years). A token
    refused only because this host's clock is far from KIS's is a ``local`` error naming the
    clock.
    """
    body = token_request(api_key, api_secret)
    try:
        resp = session.post(f"{base_url}{TOKEN_PATH}", json=body, timeout=timeout, auth=_NO_AUTH)
    except requests.RequestException as exc:
        raise token_request_failed(exc) from None
    return token_from_answer(resp, clock=clock, rate_limit_wait_s=rate_limit_wait_s)


def token_request(api_key: str, api_secret: str) -> dict[str, str]:
    """The JSON body of a ``tokenP`` call."""
    return {"grant_type": "client_credentials", "appkey": api_key, "appsecret": api_secret}


def token_request_failed(exc: BaseException) -> TokenIssueError:
    """The error of a ``tokenP`` call that got no answer (named by its type only: an HTTP
    library's message may quote the request)."""
    return TokenIssueError(f"KIS token request failed: {type(exc).__name__}")


def token_from_answer(
    resp: Answer, *, clock: Callable[[], float], rate_limit_wait_s: float
) -> Token:
    """The token in KIS's answer to ``tokenP`` (from ``requests`` or ``httpx``); the errors
    :func:`issue_token` describes."""
    payload = json_or_none(resp)
    if resp.status_code != 200 or payload is None or "access_token" not in payload:
        code = kis_code(payload)
        message = kis_message(payload) or f"KIS answered HTTP {resp.status_code} without a token"
        retry = rate_limit_wait_s if code == RATE_LIMITED else None
        raise TokenIssueError(message, code=code, status=resp.status_code, retry_after_s=retry)
    now = clock()
    try:
        return Token.from_kis_response(payload, now=now)
    except ValueError as exc:
        raise _unusable_token(exc, payload, now, _kis_time(resp)) from None


def revoke_token(
    session: requests.Session,
    base_url: str,
    *,
    api_key: str,
    api_secret: str,
    access_token: str,
    timeout: Timeout,
) -> None:
    """Revoke ``access_token`` at KIS (``POST /oauth2/revokeP``); :class:`KisApiError` if not."""
    body = revoke_request(api_key, api_secret, access_token)
    try:
        resp = session.post(f"{base_url}{REVOKE_PATH}", json=body, timeout=timeout, auth=_NO_AUTH)
    except requests.RequestException as exc:
        raise KisApiError(f"KIS request {REVOKE_PATH} failed: {type(exc).__name__}") from None
    check_revoked(resp)


def revoke_request(api_key: str, api_secret: str, access_token: str) -> dict[str, str]:
    """The JSON body of a ``revokeP`` call."""
    return {"appkey": api_key, "appsecret": api_secret, "token": access_token}


def check_revoked(resp: Answer) -> None:
    """:class:`KisApiError` unless KIS's answer to ``revokeP`` is a success."""
    payload = json_or_none(resp)
    if resp.status_code != 200 or payload is None:
        raise KisApiError(
            kis_message(payload) or f"KIS answered {REVOKE_PATH} with HTTP {resp.status_code}",
            code=kis_code(payload),
            status=resp.status_code,
        )


def issue_approval_key(
    session: requests.Session,
    base_url: str,
    *,
    api_key: str,
    api_secret: str,
    timeout: Timeout,
    clock: Callable[[], float],
) -> Token:
    """Ask KIS for a websocket approval key (``POST /oauth2/Approval``), as a :class:`Token`
    whose ``access_token`` is the key, valid :data:`~kis_safe_token.kis.APPROVAL_KEY_LIFETIME_S`
    (KIS states no expiry). :class:`TokenIssueError` with KIS's code if it refuses, or if the
    answer holds no key that can be sent."""
    body = approval_request(api_key, api_secret)
    try:
        resp = session.post(f"{base_url}{APPROVAL_PATH}", json=body, timeout=timeout, auth=_NO_AUTH)
    except requests.RequestException as exc:
        raise approval_request_failed(exc) from None
    return approval_key_from_answer(resp, clock=clock)


def approval_request(api_key: str, api_secret: str) -> dict[str, str]:
    """The JSON body of an ``Approval`` call (KIS names the secret ``secretkey`` here)."""
    return {"grant_type": "client_credentials", "appkey": api_key, "secretkey": api_secret}


def approval_request_failed(exc: BaseException) -> TokenIssueError:
    """The error of an ``Approval`` call that got no answer (named by its type only)."""
    return TokenIssueError(f"KIS approval key request failed: {type(exc).__name__}")


APPROVAL_RATE_LIMITED_WAIT_S = 1.0
"""How long an approval-key holder sits out an ``EGW00201`` before asking once more."""


def approval_key_from_answer(resp: Answer, *, clock: Callable[[], float]) -> Token:
    """The approval key in KIS's answer to ``Approval`` (from ``requests`` or ``httpx``), as
    :func:`issue_approval_key` describes it; :class:`TokenIssueError` if there is none."""
    payload = json_or_none(resp)
    key = payload.get("approval_key") if payload else None
    if resp.status_code != 200 or not header_safe(key):
        code = kis_code(payload)
        raise TokenIssueError(
            kis_message(payload)
            or f"KIS answered {APPROVAL_PATH} with HTTP {resp.status_code} "
            "without a usable approval_key",
            code=code,
            status=resp.status_code,
            # EGW00201 (KIS meters Approval with the REST calls): the holder sits this out and
            # asks once more, instead of the fleet recording a failure.
            retry_after_s=APPROVAL_RATE_LIMITED_WAIT_S if code == TOO_MANY_CALLS else None,
        )
    now = clock()
    return Token(str(key), now + APPROVAL_KEY_LIFETIME_S, "approval", issued_at=now)


def _kis_time(resp: Answer) -> float | None:
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
