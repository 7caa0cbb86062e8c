"""``KisAuth``: the fleet's one KIS token for any ``requests`` code.

``session.auth = KisAuth(api_key)`` and every request of that session carries the KIS token
headers; when KIS rejects the token (``EGW00121``/``EGW00123``), the request is sent once more
with a fresh one, the way ``requests.auth.HTTPDigestAuth`` answers a 401 challenge.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import requests
from requests.auth import AuthBase

from .kis import TOKEN_REJECTED, kis_code
from .shared import SharedToken
from .storage.base import TokenStorage
from .token import Token

__all__ = ["KisAuth"]

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
    ) -> None:
        self._setup(
            SharedToken(api_key, api_secret, token_storage, mock=mock, base_url=base_url),
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
        if not _token_rejected(r, stream=bool(kwargs.get("stream"))):
            return r
        self.done = True
        self.shared.invalidate(self.sent.access_token)
        fresh = self.shared.token
        connection = getattr(r, "connection", None)
        if fresh.access_token == self.sent.access_token or connection is None:
            return r  # nothing better to send, or no way to send it
        if self.body_pos is not None:
            r.request.body.seek(self.body_pos)  # type: ignore[union-attr]
        elif r.request.body is not None and not isinstance(r.request.body, (bytes, str)):
            return r  # a streamed body is spent: it cannot be sent again
        # Consume the content and release the connection, so the re-send can reuse it.
        r.content  # noqa: B018
        r.close()
        prep = r.request.copy()
        prep.headers["authorization"] = fresh.bearer
        resent: requests.Response = connection.send(prep, **kwargs)
        resent.history.append(r)
        resent.request = prep
        return resent


def _token_rejected(r: requests.Response, *, stream: bool) -> bool:
    """Whether KIS answered ``r`` with ``EGW00121``/``EGW00123`` (read without decoding JSON
    unless the body names one of them; a streamed success is left unread)."""
    if stream and r.status_code < 400:
        return False
    if b"EGW0012" not in r.content:
        return False
    try:
        payload = r.json()
    except ValueError:
        return False
    return isinstance(payload, dict) and kis_code(payload) in TOKEN_REJECTED


def _origin(url: str) -> tuple[str, str, int | None]:
    """``(scheme, host, port)`` of ``url``, with the scheme's default port filled in."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port or _DEFAULT_PORTS.get(scheme)
