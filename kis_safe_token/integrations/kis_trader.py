"""kis-trader's ``TokenManager`` and ``RequestsTransport``, the token shared through our storage.

Hand our :class:`TokenManager` to our :class:`RequestsTransport`, and that to ``KISClient(...,
transport=)``; what changes and the upstream lines it depends on: ``docs/integrations.md``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

from ..errors import TokenIssueError
from ..kis import REVOKE_PATH, TOKEN_PATH, json_or_none, verdict
from ..oauth import revoke_request, token_from, token_request, token_request_failed
from ..ratelimit import RateLimiter
from ..shared import SharedToken
from ..storage.base import TokenStorage
from ..storage.factory import create_token_storage
from ..token import Token
from . import require
from ._client_token import CallMeter

UPSTREAM_VERSION = "0.12.2"
"""The kis-trader release this module was written against (the ``[kis-trader]`` extra pins it)."""

require("kis_trader", "kis-trader", version=UPSTREAM_VERSION)
from kis_trader._internal import _auth, _http  # noqa: E402
from kis_trader._internal._endpoints import base_url as _endpoint  # noqa: E402
from kis_trader.errors import KISAuthError  # noqa: E402

__all__ = [
    "ENVIRONMENTS",
    "UPSTREAM_VERSION",
    "RequestsTransport",
    "TokenManager",
    "refreshing_send",
]


ENVIRONMENTS: dict[str, Literal["real", "paper"]] = {
    "real": "real",
    "virtual": "paper",
    "paper": "paper",
}
"""The environments accepted, and kis-trader's name of each."""

Sender = Callable[..., "_http.HTTPResult"]


def trader_environment(environment: object) -> Literal["real", "paper"]:
    """kis-trader's name of ``environment``; ``ValueError`` naming the allowed values."""
    name = ENVIRONMENTS.get(environment) if isinstance(environment, str) else None
    if name is None:
        raise ValueError(
            f"environment must be one of {', '.join(map(repr, ENVIRONMENTS))}, "
            f"not {str(environment)[:20]!r}"
        )
    return name


class _TraderToken(SharedToken):
    """The shared token of one kis-trader app key, issued through the manager's ``post``."""

    def __init__(
        self,
        manager: TokenManager,
        storage: TokenStorage,
        post: _auth.TokenPoster | None,
        clock: Callable[[], float],
        calls_per_second: float | None,
        rate_limiter: RateLimiter | None,
    ) -> None:
        self._environment = manager.environment
        self._post = post
        super().__init__(
            manager.app_key,
            manager.app_secret,
            storage,
            mock=self._environment == "paper",
            clock=clock,
            calls_per_second=calls_per_second,
            rate_limiter=rate_limiter,
        )

    @property
    def base_url(self) -> str:
        """The endpoint table's host for the environment, read at each call, as kis-trader does."""
        return _endpoint(self._environment)

    @base_url.setter
    def base_url(self, value: str) -> None:
        """``SharedToken.__init__`` sets it; kis-trader's endpoint table is the one used."""

    def call(self, path: str, body: Mapping[str, str]) -> tuple[int, Any]:
        """POST ``body`` to ``path`` through the manager's ``post``, else our session."""
        url = self.base_url + path
        if self._post is not None:
            return self._post(url, body)
        resp = self.session.post(url, json=dict(body), timeout=self.timeout)
        return resp.status_code, json_or_none(resp)

    def _issue(self) -> Token:
        """``tokenP`` through our session, or the manager's ``post`` (whose answer has no Date)."""
        if self._post is None:
            return super()._issue()
        try:
            status, payload = self.call(TOKEN_PATH, token_request(self.api_key, self.api_secret))
        except Exception as exc:  # noqa: BLE001 - whatever the injected post raises
            raise token_request_failed(exc) from None
        answer = payload if isinstance(payload, Mapping) else None
        return token_from(
            status, answer, None, clock=self._clock, rate_limit_wait_s=self.rate_limit_wait_s
        )


class TokenManager(_auth.TokenManager):
    """kis-trader's ``TokenManager`` whose token comes from ``token_storage`` (``None``: ours
    from the environment). ``environment``: ``'real'``, ``'virtual'`` or ``'paper'`` (else
    ``ValueError``); ``post``: kis-trader's token poster (``(url, body) -> (status, json)``);
    ``calls_per_second``/``rate_limiter``: the fleet-wide limit :func:`refreshing_send` keeps to.
    """

    def __init__(
        self,
        *,
        app_key: str,
        app_secret: str,
        environment: str,
        token_storage: TokenStorage | None = None,
        post: _auth.TokenPoster | None = None,
        clock: Callable[[], float] = time.time,
        calls_per_second: float | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        env = trader_environment(environment)
        storage = token_storage if token_storage is not None else create_token_storage()
        super().__init__(
            app_key=app_key,
            app_secret=app_secret,
            environment=env,
            post=post if post is not None else _auth._requests_post,
            clock=clock,
        )
        self.app_key = app_key
        self.app_secret = app_secret
        self.environment: Literal["real", "paper"] = env
        self._kst_token = _TraderToken(self, storage, post, clock, calls_per_second, rate_limiter)

    def __repr__(self) -> str:
        return f"TokenManager(environment={self.environment!r}, shared={self._kst_token!r})"

    @property
    def token_storage(self) -> TokenStorage:
        """The storage the token comes from."""
        return self._kst_token.token_storage

    def access_token(self) -> str:
        """The access token (without ``Bearer``), from the fleet's single flight. ``KISAuthError``
        if KIS refuses to issue one; ``TokenStorageError`` if the storage cannot be used."""
        try:
            bearer = self._kst_token.bearer
        except TokenIssueError as exc:
            raise KISAuthError(f"KIS OAuth token issuance failed: {exc}", msg_cd=exc.code) from exc
        return bearer.removeprefix("Bearer ")

    def invalidate(self, access_token: str) -> bool:
        """KIS rejected ``access_token`` (with or without ``Bearer``): drop it (compare-and-delete);
        whether the storage deleted it."""
        return self._kst_token.invalidate(access_token)

    def revoke(self) -> None:
        """Revoke the current token at KIS, if there is one, and drop it. ``KISAuthError`` if the
        revocation fails (the token is dropped all the same, as kis-trader does)."""
        shared = self._kst_token
        token = shared.in_memory() or shared.load()
        if token is None:
            return
        shared.invalidate(token.access_token)
        body = revoke_request(self.app_key, self.app_secret, token.access_token)
        try:
            status, _payload = shared.call(REVOKE_PATH, body)
        except Exception as err:  # noqa: BLE001 - whatever the injected post raises
            raise KISAuthError(f"KIS token revocation failed: {type(err).__name__}") from None
        if status != 200:
            raise KISAuthError(f"KIS token revocation failed (HTTP {status})")


def refreshing_send(token_manager: TokenManager, send: Sender | None = None) -> Sender:
    """kis-trader's ``send`` (default: its ``requests`` sender) under the call policy: each send
    in a slot of the fleet's rate limit, ``EGW00201`` re-sent after a back-off, a rejected token
    dropped and the call sent once more with the fleet's next one; the last answer goes back
    unchanged (kis-trader raises on it)."""
    inner: Sender = send if send is not None else _http._requests_send
    meter = CallMeter(token_manager._kst_token)

    def send_refreshing(
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        params: Mapping[str, str] | None,
        json_body: Mapping[str, str] | None,
    ) -> _http.HTTPResult:
        sent = dict(headers)

        def refresh() -> bool:
            rejected = str(sent.get("authorization", ""))
            token_manager.invalidate(rejected)
            fresh = f"Bearer {token_manager.access_token()}"
            if fresh == rejected:  # the storage kept it: sending it again would be rejected again
                return False
            sent["authorization"] = fresh
            return True

        return meter.run(
            lambda: inner(method, url, headers=sent, params=params, json_body=json_body),
            lambda result: verdict(result[2], result[0]),
            refresh=refresh,
        )

    return send_refreshing


class RequestsTransport(_http.RequestsTransport):
    """kis-trader's ``RequestsTransport``, its ``send`` wrapped by :func:`refreshing_send` with our
    :class:`TokenManager`, whose ``app_key``, ``app_secret`` and ``environment`` are the
    defaults (``environment`` also takes ``'virtual'``)."""

    def __init__(
        self,
        *,
        token_manager: _auth.TokenManager,
        app_key: str | None = None,
        app_secret: str | None = None,
        environment: str | None = None,
        send: Sender | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(token_manager, TokenManager):
            app_key = app_key if app_key is not None else token_manager.app_key
            app_secret = app_secret if app_secret is not None else token_manager.app_secret
            environment = environment if environment is not None else token_manager.environment
            send = refreshing_send(token_manager, send)
        if app_key is None or app_secret is None or environment is None:
            raise ValueError(
                "app_key, app_secret and environment are required with a token_manager that "
                "is not kis_safe_token's TokenManager"
            )
        super().__init__(
            app_key=app_key,
            app_secret=app_secret,
            environment=trader_environment(environment),
            token_manager=token_manager,
            send=send if send is not None else _http._requests_send,
            **kwargs,
        )
