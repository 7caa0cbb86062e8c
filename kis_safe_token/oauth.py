"""KIS's OAuth endpoints (``tokenP``, ``revokeP``, ``Approval``) and the reading of their
answers, written once for every token holder and integration: plain functions over an injected
``requests.Session``, no memory, storage or lock. No error message holds the secret or a token.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import requests

from .errors import KisApiError, TokenIssueError
from .events import Kind, emit
from .flight.engine import about
from .kis import (
    APPROVAL_KEY_LIFETIME_S,
    APPROVAL_PATH,
    CLOCK_TOLERANCE_S,
    REVOKE_PATH,
    TOKEN_PATH,
    Answer,
    Verdict,
    json_or_none,
    kis_code,
    kis_message,
    kis_time,
    origin,
    verdict,
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
    "no_answer",
    "revoke_request",
    "revoke_request_failed",
    "revoke_token",
    "token_from",
    "token_from_answer",
    "token_request",
    "token_request_failed",
]

Timeout: TypeAlias = tuple[float, float]
"""requests' ``(connect, read)`` timeout, in seconds."""

#: How long an approval-key holder sits out an ``EGW00201`` before asking once more.
APPROVAL_RATE_LIMITED_WAIT_S = 1.0


def _NO_AUTH(request: requests.PreparedRequest) -> requests.PreparedRequest:  # noqa: N802
    """The OAuth calls carry no token: never the session's own ``auth``, which may be a
    :class:`~kis_safe_token.KisAuth` waiting for the very token being issued (a deadlock)."""
    return request


def _post(
    session: requests.Session,
    url: str,
    body: dict[str, str],
    timeout: Timeout,
    failed: Callable[[BaseException], Exception],
) -> requests.Response:
    """POST ``body`` to ``url`` without the session's ``auth``; ``failed(exc)`` if no answer."""
    try:
        return session.post(url, json=body, timeout=timeout, auth=_NO_AUTH)
    except requests.RequestException as exc:
        raise failed(exc) from None


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
    ``retry_after_s=rate_limit_wait_s`` for ``EGW00133``), if the call fails (naming KIS's host
    and the cause), or if the answer is a token that cannot be used. A token refused only because
    this host's clock is far from KIS's is a ``local`` error naming the clock.
    """
    body = token_request(api_key, api_secret)
    resp = _post(session, f"{base_url}{TOKEN_PATH}", body, timeout, token_request_failed)
    return token_from_answer(resp, clock=clock, rate_limit_wait_s=rate_limit_wait_s)


def token_request(api_key: str, api_secret: str) -> dict[str, str]:
    """The JSON body of a ``tokenP`` call."""
    return {"grant_type": "client_credentials", "appkey": api_key, "appsecret": api_secret}


def token_request_failed(exc: BaseException) -> TokenIssueError:
    """The error of a ``tokenP`` call that got no answer (:func:`no_answer`)."""
    return TokenIssueError(no_answer("token", exc))


def no_answer(what: str, exc: BaseException) -> str:
    """``"KIS <what> request to <host>:<port> failed: <cause>"`` for a call that raised ``exc``:
    the cause from its chain and type, never its message, which may quote the request."""
    return f"KIS {what} request{_where(exc)} failed: {_cause(exc)}"


def token_from_answer(
    resp: Answer, *, clock: Callable[[], float], rate_limit_wait_s: float
) -> Token:
    """The token in KIS's answer to ``tokenP``; the errors :func:`issue_token` describes."""
    payload = json_or_none(resp)
    return token_from(
        resp.status_code, payload, kis_time(resp), clock=clock, rate_limit_wait_s=rate_limit_wait_s
    )


def token_from(
    status: int | None,
    payload: Mapping[str, Any] | None,
    kis_now: float | None,
    *,
    clock: Callable[[], float],
    rate_limit_wait_s: float,
) -> Token:
    """The token in KIS's ``tokenP`` answer: its HTTP ``status``, JSON object and clock (its
    ``Date``; ``None``: unknown, a skew reads as an unusable token); errors as :func:`issue_token`.
    """
    now = clock()
    kind = verdict(payload, status, now=now, kis_now=kis_now)
    if kind is Verdict.CLOCK_SKEW and kis_now is not None:
        skew = now - kis_now
        raise TokenIssueError(
            f"this host's clock differs from KIS's by about {abs(skew):.0f} s "
            f"({'ahead' if skew > 0 else 'behind'}, by the Date of KIS's answer): the token "
            "KIS just issued is usable by KIS's clock but not by this host's; "
            "fix this host's clock (NTP)",
            status=200,
            # A storage keeps it to this process: other processes' clocks may be right.
            local=True,
        )
    if kind is not Verdict.OK or payload is None or "access_token" not in payload:
        raise TokenIssueError(
            kis_message(payload) or f"KIS answered HTTP {status} without a token",
            code=kis_code(payload),
            status=status,
            retry_after_s=rate_limit_wait_s if kind is Verdict.ISSUE_REFUSED else None,
        )
    try:
        return Token.from_kis_response(payload, now=now)
    except ValueError as exc:
        raise TokenIssueError(f"KIS token response unusable: {exc}", status=200) from None


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
    check_revoked(_post(session, f"{base_url}{REVOKE_PATH}", body, timeout, revoke_request_failed))


def revoke_request(api_key: str, api_secret: str, access_token: str) -> dict[str, str]:
    """The JSON body of a ``revokeP`` call."""
    return {"appkey": api_key, "appsecret": api_secret, "token": access_token}


def revoke_request_failed(exc: BaseException) -> KisApiError:
    """The error of a ``revokeP`` call that got no answer (:func:`no_answer`)."""
    return KisApiError(no_answer("revoke", exc))


def note_revoked(api_key: str, storage: object) -> None:
    """The log line and event of a revoke, the same for the sync and the asyncio token holder."""
    emit(Kind.REVOKED, storage, api_key)
    logging.getLogger("kis_safe_token").info(
        "%s: revoked the token at KIS and dropped it from the store", about(storage, api_key)
    )


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
    valid :data:`~kis_safe_token.kis.APPROVAL_KEY_LIFETIME_S`. :class:`TokenIssueError` with
    KIS's code if it refuses, or if the answer holds no key that can be sent."""
    body = approval_request(api_key, api_secret)
    resp = _post(session, f"{base_url}{APPROVAL_PATH}", body, timeout, approval_request_failed)
    return approval_key_from_answer(resp, clock=clock)


def approval_request(api_key: str, api_secret: str) -> dict[str, str]:
    """The JSON body of an ``Approval`` call (KIS names the secret ``secretkey`` here)."""
    return {"grant_type": "client_credentials", "appkey": api_key, "secretkey": api_secret}


def approval_request_failed(exc: BaseException) -> TokenIssueError:
    """The error of an ``Approval`` call that got no answer (:func:`no_answer`)."""
    return TokenIssueError(no_answer("approval key", exc))


def approval_key_from_answer(resp: Answer, *, clock: Callable[[], float]) -> Token:
    """The approval key in KIS's answer to ``Approval``, as :func:`issue_approval_key` says."""
    payload = json_or_none(resp)
    key = payload.get("approval_key") if payload else None
    kind = verdict(payload, resp.status_code)
    if kind is not Verdict.OK or not header_safe(key):
        raise TokenIssueError(
            kis_message(payload)
            or f"KIS answered {APPROVAL_PATH} with HTTP {resp.status_code} "
            "without a usable approval_key",
            code=kis_code(payload),
            status=resp.status_code,
            # EGW00201 (KIS meters Approval with the REST calls): the holder sits this out and
            # asks once more, instead of the fleet recording a failure.
            retry_after_s=APPROVAL_RATE_LIMITED_WAIT_S if kind is Verdict.TOO_MANY_CALLS else None,
        )
    now = clock()
    return Token(str(key), now + APPROVAL_KEY_LIFETIME_S, "approval", issued_at=now)


# -- naming a call that got no answer --------------------------------------------------------------
#: The causes named, by the exception found in the chain (the first match wins).
_CAUSES: tuple[tuple[type[BaseException], str], ...] = (
    (ConnectionRefusedError, "connection refused"),
    (ConnectionResetError, "connection reset"),
    (socket.gaierror, "host name not found"),
    (ssl.SSLError, "TLS handshake failed"),
    (TimeoutError, "timed out"),
)


def _cause(exc: BaseException) -> str:
    """``"<cause> (<type of exc>)"``, the cause found in the chain of ``exc`` (``__cause__``,
    ``__context__``, urllib3's ``reason``, ``args``); else the type."""
    name = type(exc).__name__
    todo, seen = [exc], set[int]()
    while todo and len(seen) < 20:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        for kind, text in _CAUSES:
            if isinstance(current, kind):
                return f"{text} ({name})"
        linked = (current.__cause__, current.__context__, getattr(current, "reason", None))
        todo += [e for e in (*linked, *current.args) if isinstance(e, BaseException)]
    return f"timed out ({name})" if "Timeout" in name else name


def _where(exc: BaseException) -> str:
    """``" to <host>:<port>"`` of the request ``exc`` was raised for, if it carries one."""
    try:
        url = getattr(getattr(exc, "request", None), "url", None)  # httpx: RuntimeError if none
    except RuntimeError:
        return ""
    _scheme, host, port = origin(str(url or ""))
    if not host:
        return ""
    host = f"[{host}]" if ":" in host else host
    return f" to {host}:{port}" if port else f" to {host}"
