"""What the client integrations share: the token a third-party client object reads, through our
single flight, issued at the client's own host.

Clients such as korea-investment-stock and mojito2 build every request's ``authorization`` header
from ``self.access_token``. The integrations make that attribute a property served by a
:class:`ClientToken`: a :class:`~kis_safe_token.shared.SharedToken` that issues at the client's
current ``base_url`` (read at issuance, so ``set_base_url`` or a subclass redirects it, as in the
client itself) and remembers, per thread, the token it served last, so the one a rejected call
sent is the one dropped (compare-and-delete), never a fresh one another thread already got.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from ..kis import TOKEN_REJECTED
from ..shared import BASE_URL_ENV, SharedToken
from ..storage.base import TokenStorage

__all__ = ["ClientToken", "checked_storage", "env_base_url", "token_rejected"]


class ClientToken(SharedToken):
    """The token of one third-party ``client`` object (its ``api_key``/``api_secret`` are passed
    here), shared through ``token_storage`` (``None``: from the environment)."""

    def __init__(
        self, client: Any, api_key: str, api_secret: str, token_storage: TokenStorage | None
    ) -> None:
        self._client = client
        self._served = threading.local()
        super().__init__(api_key, api_secret, token_storage, base_url=str(client.base_url))

    @property
    def base_url(self) -> str:
        """The client's host now (``SharedToken`` issues and revokes there)."""
        return str(self._client.base_url).rstrip("/")

    @base_url.setter
    def base_url(self, value: str) -> None:
        """``SharedToken.__init__`` sets it; the client's own attribute is the one used."""

    def serve(self) -> str:
        """``Bearer <token>`` for a request header, remembered as this thread's last one."""
        bearer = self.bearer
        self._served.bearer = bearer
        return bearer

    def refresh_rejected(self) -> str:
        """KIS rejected the token this thread served last: drop it from the store if the store
        still holds it (compare-and-delete) and serve the fleet's next one (one issuance for all
        the processes that saw it rejected)."""
        rejected: str | None = getattr(self._served, "bearer", None)
        if rejected is None and self._token is not None:
            rejected = self._token.access_token
        if rejected:
            self.invalidate(rejected)
        return self.serve()


def checked_storage(token_storage: object) -> TokenStorage | None:
    """``token_storage`` if it is one of ours (or ``None``); ``TypeError`` otherwise."""
    if token_storage is None or isinstance(token_storage, TokenStorage):
        return token_storage
    raise TypeError(
        "token_storage must be a kis_safe_token storage (FileTokenStorage, "
        f"LockedRedisTokenStorage, ...) or None, not {type(token_storage).__name__}: a storage "
        "without get_or_issue cannot make the fleet's single issuance"
    )


def env_base_url(base_url: str | None) -> str | None:
    """``base_url``, else ``$KOREA_INVESTMENT_BASE_URL``, else ``None`` (the client's own host),
    without a trailing slash."""
    chosen = base_url or os.environ.get(BASE_URL_ENV, "").strip()
    return chosen.rstrip("/") if chosen else None


def token_rejected(answer: object) -> bool:
    """Whether a KIS answer (a client's parsed JSON) says the token sent was rejected:
    ``EGW00123`` (expired) or ``EGW00121`` (invalid), or, for gateways that answer without the
    code, a failure whose message says the token expired (``기간이 만료된 token 입니다.``), the
    test korea-investment-stock makes."""
    if not isinstance(answer, dict) or answer.get("rt_cd") == "0":
        return False
    if answer.get("msg_cd") in TOKEN_REJECTED:
        return True
    message = str(answer.get("msg1") or "")
    return "만료" in message and "token" in message.lower()
