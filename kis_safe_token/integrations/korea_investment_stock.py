"""korea-investment-stock's ``KoreaInvestment`` with the fleet's single flight.

Upstream's arguments plus ``token_storage=``, ``base_url=``, ``calls_per_second=`` and
``rate_limiter=``; what changes and the upstream lines it depends on: ``docs/integrations.md``.
"""

from __future__ import annotations

from typing import Any

from ..kis import REAL_BASE_URL
from ..ratelimit import RateLimiter
from ..storage.base import TokenStorage
from . import require
from ._client_token import ClientTokenHolder, env_base_url

UPSTREAM_VERSION = "0.19.0"
"""The korea-investment-stock release these overrides were written and tested against."""

_upstream = require("korea_investment_stock", "korea-investment-stock", version=UPSTREAM_VERSION)
_UpstreamKoreaInvestment: Any = _upstream.KoreaInvestment
_SeedTokenStorage: Any = require(
    "korea_investment_stock.token", "korea-investment-stock"
).TokenStorage

__all__ = ["UPSTREAM_VERSION", "KoreaInvestment"]


class _SeedBridge(_SeedTokenStorage):  # type: ignore[misc]
    """The storage upstream's ``TokenManager`` gets: it answers from the single flight (so
    upstream takes its check -> load branch and never issues) and stores nothing."""

    def __init__(self, broker: KoreaInvestment) -> None:
        self._broker = broker

    def check_token_valid(self, api_key: str, api_secret: str) -> bool:
        self._broker._kst_shared(api_key, api_secret).serve()
        return True

    def load_token(self, api_key: str, api_secret: str) -> dict[str, Any]:
        token = self._broker._kst_shared(api_key, api_secret).token
        return token.to_token_data(api_key, api_secret)

    def save_token(self, token_data: dict[str, Any]) -> bool:
        return True

    def delete_token(self, api_key: str, api_secret: str) -> bool:
        return True


class KoreaInvestment(ClientTokenHolder, _UpstreamKoreaInvestment):  # type: ignore[misc]
    """korea-investment-stock's ``KoreaInvestment``, its token shared by the fleet. Keywords
    ``calls_per_second``/``rate_limiter``: the fleet-wide call-rate limit, as in
    :class:`kis_safe_token.KoreaInvestment` (``None``: KIS's default, ``0``: off)."""

    def __init__(
        self,
        api_key: str | None = None,
        api_secret: str | None = None,
        acc_no: str | None = None,
        config: Any = None,
        config_file: Any = None,
        token_storage: TokenStorage | None = None,
        *,
        base_url: str | None = None,
        calls_per_second: float | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        self._kst_setup(token_storage, calls_per_second=calls_per_second, rate_limiter=rate_limiter)
        self._kst_base_url = env_base_url(base_url) or REAL_BASE_URL
        self._kst_constructing = True
        try:
            super().__init__(
                api_key, api_secret, acc_no, config, config_file, token_storage=_SeedBridge(self)
            )
        finally:
            self._kst_constructing = False
        # Upstream keeps the storage here "for compatibility": ours, not the bridge.
        self.token_storage = self._kst_shared().token_storage

    # -- the host: upstream hard-codes it in __init__ (:127) ---------------------------------------
    @property
    def base_url(self) -> str:
        """The KIS host of every call, ``tokenP`` included."""
        return self._kst_base_url

    @base_url.setter
    def base_url(self, value: str) -> None:
        if not self.__dict__.get("_kst_constructing"):  # upstream's own assignment is ignored
            self._kst_base_url = str(value).rstrip("/")

    # -- the token ---------------------------------------------------------------------------------
    @property
    def access_token(self) -> str:
        """``Bearer <token>``, the fleet's (refreshed through the store near expiry)."""
        return self._kst_shared().serve()

    @access_token.setter
    def access_token(self, value: object) -> None:
        """Upstream assigns the token it got (``:156``); the fleet's is the one served."""

    def issue_access_token(self, force: bool = False) -> None:
        """The fleet's token; ``force`` (upstream's, after an answer saying the token expired)
        first drops the token this thread sent, if the store still holds it."""
        shared = self._kst_shared()
        if force:
            shared.refresh_rejected()
            shared.meter.before_send()  # upstream re-sends next (``:234-236``): its slot
        else:
            shared.serve()

    def _request_with_token_refresh(
        self,
        method: str,
        url: str,
        headers: dict[str, Any],
        params: dict[str, Any] | None = None,
        max_retries: int = 1,
    ) -> Any:
        """Upstream's request path (every REST method), each send in a slot of the fleet's rate
        limit; an ``EGW00201`` answer is re-sent after a back-off, bounded."""
        parent = super()._request_with_token_refresh
        return self._kst_shared().meter.run(
            lambda: parent(method, url, headers, params, max_retries)
        )

    def issue_hashkey(self, data: dict[str, Any]) -> str:
        """Upstream's ``/uapi/hashkey`` call in a slot of the fleet's rate limit (upstream
        raises on a refusal: no re-send)."""
        self._kst_shared().throttle()
        return str(super().issue_hashkey(data))

    def shutdown(self) -> None:
        """Upstream's clean-up, then close our token's HTTP session."""
        super().shutdown()
        self._kst_close()
