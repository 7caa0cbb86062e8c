"""``KisAuth``: the fleet's one KIS token for any ``requests`` code (``session.auth = ...``)."""

from __future__ import annotations

from typing import Any

import requests
from requests.auth import AuthBase

from .kis import origin, verdict_of
from .policy import RETRY_ATTEMPTS, RETRY_BUDGET_S, CallPolicy, backoff_s, drive
from .ratelimit import RateLimiter
from .shared import SharedToken
from .storage.base import TokenStorage
from .token import Token

__all__ = ["RETRY_ATTEMPTS", "RETRY_BUDGET_S", "KisAuth", "backoff_s"]

#: The headers that carry the credentials; none of them may follow a redirect.
CREDENTIAL_HEADERS = ("authorization", "appkey", "appsecret")


class KisAuth(AuthBase):
    """A ``requests`` auth that sends the shared KIS token (``authorization``, ``appkey``,
    ``appsecret``) on every request, in a slot of the fleet's call rate (docs/clients.md).

    A rejected token (``EGW00121``/``EGW00123``) is compare-and-deleted and the request re-sent
    once with the fleet's next one (the rejected answer in ``history``); ``EGW00201`` is re-sent
    as :mod:`kis_safe_token.policy` says. A request to another origin (scheme, host, port) than
    ``base_url``'s is a ``ValueError``; a redirect loses the credential headers. The arguments
    are :class:`SharedToken`'s; nothing is fetched until the first request.
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
        self._origin = origin(shared.base_url)

    def __repr__(self) -> str:
        return f"KisAuth({self.shared_token!r})"

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        if origin(r.url or "") != self._origin:
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
    """The response hook of one request: the policy's re-sends, on the answer's connection.

    ``PreparedRequest.copy()`` shares the hook list, so a redirect reaches this same object,
    whose ``done`` stops a second round of re-sends.
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
        self.done = True
        if r.is_redirect:
            # requests strips only Authorization on a redirect to another host; appsecret would
            # follow. KIS does not redirect: drop all three, whatever the target.
            for header in CREDENTIAL_HEADERS:
                r.request.headers.pop(header, None)
            return r
        stream = bool(kwargs.get("stream"))
        return drive(
            CallPolicy(on_refusal=self.shared.refused),
            r,
            lambda answer: verdict_of(answer, stream=stream),
            lambda last: self._send_again(last, kwargs),
            limiter=self.shared.rate_limiter,
            throttle=self.shared.throttle,
            refresh=self._refresh,
        )

    def _refresh(self, r: requests.Response) -> bool:
        """Drop the token sent (compare-and-delete); whether the fleet has a better one."""
        self.shared.invalidate(self.sent.access_token)
        fresh = self.shared.token
        if fresh.access_token == self.sent.access_token:
            return False  # nothing better to send
        self.sent = fresh
        return True

    def _send_again(self, r: requests.Response, kwargs: dict[str, Any]) -> requests.Response | None:
        """A copy of ``r``'s request sent with the current token on ``r``'s connection (``r`` in
        its history); ``None`` if it cannot be sent again (no connection, a spent stream)."""
        connection = getattr(r, "connection", None)
        if connection is None:
            return None
        prep = r.request.copy()
        prep.headers["authorization"] = self.sent.bearer
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
