"""``KisAuth``: the fleet's one KIS token for any ``requests`` code.

``session.auth = KisAuth(api_key)`` and every request of that session carries the KIS token
headers; when KIS rejects the token (``EGW00121``/``EGW00123``), the request is sent once more
with a fresh one, the way ``requests.auth.HTTPDigestAuth`` answers a 401 challenge.
"""

from __future__ import annotations

import random
import time
from typing import Any, Final
from urllib.parse import urlsplit

import requests
from requests.auth import AuthBase

from .errors import KisApiError
from .kis import TOKEN_REJECTED, TOO_MANY_CALLS, kis_code
from .ratelimit import RateLimiter
from .shared import SharedToken
from .storage.base import TokenStorage
from .token import Token

__all__ = ["RETRY_ATTEMPTS", "RETRY_BUDGET_S", "KisAuth", "backoff_s"]

#: ``EGW00201`` anyway (a program outside the fleet shares the app key): at most this many
#: re-sends, ...
RETRY_ATTEMPTS: Final = 4
#: ... within this many seconds from the first refusal (back-offs and slot waits included).
RETRY_BUDGET_S: Final = 10.0
#: The first back-off; each next one doubles, up to ``BACKOFF_CAP_S``, all with full jitter.
BACKOFF_BASE_S: Final = 0.25
BACKOFF_CAP_S: Final = 2.0


def backoff_s(attempt: int) -> float:
    """The pause before re-send number ``attempt`` (0-based) after ``EGW00201``: exponential,
    jittered over its upper half so a fleet refused in the same second does not return in it."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2.0**attempt)
    return ceiling * (0.5 + 0.5 * random.random())


#: The headers that carry the credentials; none of them may follow a redirect.
CREDENTIAL_HEADERS = ("authorization", "appkey", "appsecret")

_DEFAULT_PORTS = {"http": 80, "https": 443}


class KisAuth(AuthBase):
    """A ``requests`` auth that sends the shared KIS token: ``authorization``, ``appkey`` and
    ``appsecret`` on every request (headers such as ``tr_id`` and ``custtype`` are the caller's).

    If KIS answers that the token is invalid or expired, the token that was sent is dropped from
    the store only if the store still holds it (compare-and-delete), a fresh one comes through the
    store's single flight, and the request is re-sent once with it: N processes that meet the
    same expiry make one issuance. The response the caller gets is the re-sent request's, with
    the rejected one in its ``history``.

    Every request first takes a slot of the fleet-wide call-rate limit
    (:meth:`SharedToken.throttle`). If KIS still answers ``EGW00201`` (too many calls per second:
    a program outside the fleet uses the app key), the limiter is told (it halves the fleet's
    rate for a while, logged once) and the request is re-sent after a jittered back-off, at most
    :data:`RETRY_ATTEMPTS` times within :data:`RETRY_BUDGET_S`; the last answer is returned.

    The credentials go only to the KIS host (``base_url``'s scheme, host and port): a request to
    another host is a ``ValueError``, and a redirect loses the credential headers. The arguments
    are :class:`SharedToken`'s; nothing is fetched until the first request. Use
    :meth:`from_shared` to share one :class:`SharedToken` with other clients in this process.
    """

    def __init__(
        self,
        api_key: str,
        api_secret: str | None = None,
        token_storage: TokenStorage | None = None,
        *,
        mock: bool = False,
        base_url: str | None = None,
        calls_per_second: float | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        self._setup(
            SharedToken(
                api_key,
                api_secret,
                token_storage,
                mock=mock,
                base_url=base_url,
                calls_per_second=calls_per_second,
                rate_limiter=rate_limiter,
            ),
            owned=True,
        )

    @classmethod
    def from_shared(cls, shared: SharedToken) -> KisAuth:
        """A ``KisAuth`` on ``shared`` (which stays the caller's to close)."""
        auth = cls.__new__(cls)
        auth._setup(shared, owned=False)
        return auth

    def _setup(self, shared: SharedToken, *, owned: bool) -> None:
        self.shared_token = shared
        self._owned = owned
        self._origin = _origin(shared.base_url)

    def __repr__(self) -> str:
        return f"KisAuth({self.shared_token!r})"

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        if _origin(r.url or "") != self._origin:
            raise ValueError(
                "KisAuth sends the KIS credentials only to its base_url "
                f"({self.shared_token.base_url}); this request goes elsewhere"
            )
        shared = self.shared_token
        token = shared.token
        shared.throttle()
        r.headers["authorization"] = token.bearer
        r.headers["appkey"] = shared.api_key
        r.headers["appsecret"] = shared.api_secret
        r.register_hook("response", _Resend(shared, token, r))  # type: ignore[no-untyped-call]
        return r

    def close(self) -> None:
        """Close the :class:`SharedToken`, if this object built it."""
        if self._owned:
            self.shared_token.close()


class _Resend:
    """The response hook of one request: at most one re-send, with a fresh token.

    ``PreparedRequest.copy()`` shares the hook list, so the re-sent request (and any redirect)
    reaches this same object, whose ``done`` stops a second re-send.
    """

    def __init__(self, shared: SharedToken, sent: Token, r: requests.PreparedRequest) -> None:
        self.shared = shared
        self.sent = sent
        self.done = False
        tell = getattr(r.body, "tell", None)
        self.body_pos: int | None = tell() if tell is not None else None

    def __call__(self, r: requests.Response, **kwargs: Any) -> requests.Response:
        if self.done:
            return r
        if r.is_redirect:
            # requests strips only Authorization on a redirect to another host; appsecret would
            # follow. KIS does not redirect: drop all three, whatever the target.
            self.done = True
            for header in CREDENTIAL_HEADERS:
                r.request.headers.pop(header, None)
            return r
        r = self._while_too_many_calls(r, kwargs)
        if not _kis_code_is(r, TOKEN_REJECTED, b"EGW0012", stream=bool(kwargs.get("stream"))):
            return r
        self.done = True
        self.shared.invalidate(self.sent.access_token)
        fresh = self.shared.token
        if fresh.access_token == self.sent.access_token:
            return r  # nothing better to send
        self.sent = fresh
        self.shared.throttle()
        prep = r.request.copy()
        prep.headers["authorization"] = fresh.bearer
        resent = self._send_again(r, prep, kwargs)
        return r if resent is None else self._while_too_many_calls(resent, kwargs)

    def _while_too_many_calls(
        self, r: requests.Response, kwargs: dict[str, Any]
    ) -> requests.Response:
        """Re-send ``r``'s request while KIS answers ``EGW00201``, backing off, bounded."""
        stream = bool(kwargs.get("stream"))
        first = time.monotonic()
        attempt = 0
        while attempt < RETRY_ATTEMPTS and _kis_code_is(
            r, (TOO_MANY_CALLS,), TOO_MANY_CALLS.encode(), stream=stream
        ):
            limiter = self.shared.rate_limiter
            if limiter is not None:
                limiter.penalize(timeout_s=RETRY_BUDGET_S - (time.monotonic() - first))
            pause = backoff_s(attempt)
            left = RETRY_BUDGET_S - (time.monotonic() - first) - pause
            if left <= 0:
                break
            time.sleep(pause)
            try:
                self.shared.throttle(left)
            except KisApiError:
                break  # no slot within the budget: the caller gets KIS's EGW00201
            prep = r.request.copy()
            resent = self._send_again(r, prep, kwargs)
            if resent is None:
                break
            r = resent
            attempt += 1
        return r

    def _send_again(
        self, r: requests.Response, prep: requests.PreparedRequest, kwargs: dict[str, Any]
    ) -> requests.Response | None:
        """Send ``prep`` (a copy of ``r``'s request) on ``r``'s connection, with ``r`` in the new
        response's history; ``None`` if it cannot be sent again (no connection, a spent
        stream)."""
        connection = getattr(r, "connection", None)
        if connection is None:
            return None
        if self.body_pos is not None:
            prep.body.seek(self.body_pos)  # type: ignore[union-attr]
        elif prep.body is not None and not isinstance(prep.body, (bytes, str)):
            return None  # a streamed body is spent: it cannot be sent again
        # Consume the content and release the connection, so the re-send can reuse it.
        r.content  # noqa: B018
        r.close()
        resent: requests.Response = connection.send(prep, **kwargs)
        resent.history = [*r.history, r]
        resent.request = prep
        return resent


def _kis_code_is(
    r: requests.Response, codes: frozenset[str] | tuple[str, ...], needle: bytes, *, stream: bool
) -> bool:
    """Whether KIS answered ``r`` with one of ``codes`` (read without decoding JSON unless the
    body holds ``needle``; a streamed success is left unread)."""
    if stream and r.status_code < 400:
        return False
    if needle not in r.content:
        return False
    try:
        payload = r.json()
    except ValueError:
        return False
    return isinstance(payload, dict) and kis_code(payload) in codes


def _origin(url: str) -> tuple[str, str, int | None]:
    """``(scheme, host, port)`` of ``url``, with the scheme's default port filled in."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port or _DEFAULT_PORTS.get(scheme)
