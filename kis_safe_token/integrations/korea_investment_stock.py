"""korea-investment-stock's ``KoreaInvestment`` with the fleet's single flight.

Change one import line and nothing else::

    # from korea_investment_stock import KoreaInvestment
    from kis_safe_token.integrations.korea_investment_stock import KoreaInvestment

    broker = KoreaInvestment(api_key, api_secret, "12345678-01")          # upstream's arguments
    broker = KoreaInvestment(..., token_storage=FileTokenStorage(path))    # or one of our storages
    broker = KoreaInvestment(..., base_url=sim.base_url)                   # or another host

What changes (install with ``pip install 'kis-safe-token[korea-investment-stock]'``):

- The token, at start and on upstream's refresh path (``issue_access_token(force=True)`` after an
  answer saying the token expired), comes through the storage's single flight: a fleet of
  processes makes one ``tokenP`` call, and a token KIS rejected is dropped by compare-and-delete,
  so N processes seeing it rejected make one new issuance. ``access_token`` is read from the
  shared token at every request (refreshed ahead of expiry, like our own client).
- ``token_storage`` must be one of ours; ``None`` builds it from the environment
  (:func:`~kis_safe_token.storage.create_token_storage`). Upstream's own storages
  (``~/.cache/kis/token.key``, a pickle holding the api_secret) are never built, read or written.
- ``base_url=`` (keyword): the host, for all calls including ``tokenP``; else
  ``$KOREA_INVESTMENT_BASE_URL``, else upstream's (the real KIS host).
- ``check_access_token()`` only reads the store (upstream's would issue through our bridge).
- **The fleet's call-rate limit** (``calls_per_second=``/``rate_limiter=``, keywords, as in
  :class:`kis_safe_token.KoreaInvestment`: ``None`` is 20/s for a real account, ``0`` off): every
  send of ``_request_with_token_refresh`` (the one path of every REST method) takes a slot of
  the limiter ``KoreaInvestment``/``KisAuth`` use for the same app key and storage, the re-send
  after an expired token included (taken in ``issue_access_token(force=True)``, which upstream
  calls right before it). ``EGW00201``: the whole path is run again as
  :mod:`kis_safe_token.policy` says; then upstream's answer is returned.
  ``issue_hashkey`` (``POST /uapi/hashkey`` through upstream's ``requests.post``) takes a slot
  too; upstream raises on its refusal, so it is not re-sent. Not throttled: the master-file
  downloads (``download_master_file``, another host, not metered by KIS) and the module-level
  function ``korea_investment_stock.ipo.fetch_ipo_schedule`` (it is handed a token, not this
  broker; the broker's own ``fetch_ipo_schedule`` goes through the limited path). Upstream's
  per-process ``RateLimitedKoreaInvestment`` still composes on top.
- The rest is upstream's: its methods, and its wrappers ``RateLimitedKoreaInvestment(broker)``
  and ``CachedKoreaInvestment(broker)``, which compose a broker and work on this one unchanged.

Upstream offers no hook for any of this; the overrides depend on korea-investment-stock
**0.19.0** (:data:`UPSTREAM_VERSION`; a different version warns at import), at these places
(``tests/test_integration_korea_investment_stock.py`` fails if an upgrade moves them):

- ``korea_investment_stock.py:127``: ``__init__`` assigns the hard-coded host to
  ``self.base_url`` before building its ``TokenManager`` (``:145``) with it; our ``base_url``
  property ignores that one assignment.
- ``:142``: ``storage = token_storage or create_token_storage(...)``, ``:156``:
  ``self.access_token = self._token_manager.get_valid_token()``, and ``token/manager.py:80-101``
  (``check_token_valid`` True, then ``load_token(...)["access_token"]``): at construction
  upstream gets a seed-protocol bridge answering from our single flight, so it never POSTs.
- ``:174-184`` ``issue_access_token(force)``, ``:245-255``
  ``check_access_token``/``load_access_token``: overridden; ``:206-243``
  ``_request_with_token_refresh`` (``requests.get``/``post`` per attempt, an expired answer ->
  ``issue_access_token(force=True)`` -> ``headers["authorization"] = self.access_token`` ->
  the next attempt) and ``:257-266`` ``issue_hashkey``: wrapped (the slots).
- every REST method reads ``self.access_token`` for its header: a property here.
"""

from __future__ import annotations

from typing import Any

from ..kis import REAL_BASE_URL
from ..ratelimit import RateLimiter
from ..storage.base import TokenStorage
from . import require
from ._client_token import ClientToken, checked_storage, env_base_url

UPSTREAM_VERSION = "0.19.0"
"""The korea-investment-stock release these overrides were written and tested against."""

_upstream = require("korea_investment_stock", "korea-investment-stock", version=UPSTREAM_VERSION)
_UpstreamKoreaInvestment: Any = _upstream.KoreaInvestment
_SeedTokenStorage: Any = require(
    "korea_investment_stock.token", "korea-investment-stock"
).TokenStorage

__all__ = ["UPSTREAM_VERSION", "KoreaInvestment"]


class _SeedBridge(_SeedTokenStorage):  # type: ignore[misc]
    """The seed-protocol storage upstream's ``TokenManager`` gets: it answers from the single
    flight (so upstream takes its check -> load branch and never issues) and stores nothing."""

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


class KoreaInvestment(_UpstreamKoreaInvestment):  # type: ignore[misc]
    """korea-investment-stock's ``KoreaInvestment``, its token shared by the fleet (module
    docstring). Upstream's arguments, plus keywords ``base_url``, ``calls_per_second`` and
    ``rate_limiter`` (the fleet-wide call-rate limit, as in :class:`kis_safe_token.KoreaInvestment`:
    ``None`` is KIS's default for a real account, ``0`` turns it off)."""

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
        self._kst_rate: dict[str, Any] = {
            "calls_per_second": calls_per_second,
            "rate_limiter": rate_limiter,
        }
        self._kst_storage = checked_storage(token_storage)
        self._kst_base_url = env_base_url(base_url) or REAL_BASE_URL
        self._kst_token: ClientToken | None = None
        self._kst_constructing = True
        try:
            super().__init__(
                api_key, api_secret, acc_no, config, config_file, token_storage=_SeedBridge(self)
            )
        finally:
            self._kst_constructing = False
        # Upstream keeps the storage here "for compatibility": ours, not the bridge.
        self.token_storage = self._kst_shared(self.api_key, self.api_secret).token_storage

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
        return self._kst_shared(self.api_key, self.api_secret).serve()

    @access_token.setter
    def access_token(self, value: object) -> None:
        """Upstream assigns the token it got (``:156``); the fleet's is the one served."""

    def _kst_shared(self, api_key: str, api_secret: str) -> ClientToken:
        if self._kst_token is None:
            self._kst_token = ClientToken(
                self, api_key, api_secret, self._kst_storage, **self._kst_rate
            )
        return self._kst_token

    def issue_access_token(self, force: bool = False) -> None:
        """The fleet's token; ``force`` (upstream calls it after an answer saying the token
        expired) first drops the token this thread sent, if the store still holds it."""
        shared = self._kst_shared(self.api_key, self.api_secret)
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
        """Upstream's request path (every REST method of the broker), each send in a slot of the
        fleet's rate limit; an ``EGW00201`` answer is re-sent after a back-off, bounded."""
        parent = super()._request_with_token_refresh
        return self._kst_shared(self.api_key, self.api_secret).meter.run(
            lambda: parent(method, url, headers, params, max_retries)
        )

    def issue_hashkey(self, data: dict[str, Any]) -> str:
        """Upstream's ``/uapi/hashkey`` call (``token/manager.py:166-176``), in a slot of the
        fleet's rate limit (KIS counts it; upstream raises on a refusal, so no re-send)."""
        self._kst_shared(self.api_key, self.api_secret).throttle()
        return str(super().issue_hashkey(data))

    def check_access_token(self) -> bool:
        """Whether the store holds a valid token (a read: never issues, never takes the seed
        lease of a store that has it on)."""
        return self.token_storage.load_token(self.api_key, self.api_secret) is not None

    def load_access_token(self) -> None:
        """Take the fleet's token (issued through the single flight if the store has none)."""
        self._kst_shared(self.api_key, self.api_secret).serve()

    def shutdown(self) -> None:
        """Upstream's clean-up, then close our token's HTTP session."""
        super().shutdown()
        if self._kst_token is not None:
            self._kst_token.close()
