"""mojito2's ``KoreaInvestment`` with the fleet's single flight and the token refresh mojito lacks.

Change one import line and add the storage::

    # from mojito import KoreaInvestment
    from kis_safe_token.integrations.mojito import KoreaInvestment

    broker = KoreaInvestment(api_key, api_secret, "12345678-01", token_storage=storage)
    broker = KoreaInvestment(..., base_url=sim.base_url)    # or another host (keyword)

What changes (install with ``pip install 'kis-safe-token[mojito2]'``):

- The token comes through the storage's single flight (``token_storage=None``: ours from the
  environment, :func:`~kis_safe_token.storage.create_token_storage`): a fleet makes one ``tokenP``
  call. mojito's ``token.dat`` (a pickle of the token *and the api_secret* in the working
  directory, unpickled at start) is never read or written.
- Issuance goes to ``self.base_url``, read when issuing, as mojito does: ``set_base_url(mock)``
  or a subclass overriding it redirects it. ``base_url=`` (keyword), else
  ``$KOREA_INVESTMENT_BASE_URL``, replaces the host ``set_base_url`` picks.
- mojito has no token refresh: its REST methods return KIS's answer as a dict, an expired token's
  ``EGW00123`` included. Here every upstream method that reads ``self.access_token`` (the ones
  building a request; :data:`REFRESHING_METHODS`) is wrapped: on an answer rejecting the token
  (``EGW00123``/``EGW00121``, or a message saying the token expired) it drops the token that
  call sent from the store if the store still holds it (compare-and-delete: N processes seeing
  it rejected make one new issuance), takes the fleet's next one and makes the call once more.
  Nested calls (``fetch_price`` calls ``fetch_domestic_price``) retry at most once per
  outermost call. A method that parses a rejected answer before returning (and raises) is not
  retried.
- **The fleet's call-rate limit** (``calls_per_second=``/``rate_limiter=``, keywords, as in
  :class:`kis_safe_token.KoreaInvestment`: ``None`` is KIS's default for the account type,
  virtual with ``mock=True``; ``0`` off): every request a wrapped method sends takes a slot of
  the limiter ``KoreaInvestment``/``KisAuth`` use for the same app key and storage. The slot
  is taken where the method reads ``self.access_token`` for its header (mojito reads it once
  per request, right before ``requests.get``/``post``), after the token is in hand, so
  nested wrapped calls (``fetch_balance_oversea`` calls ``fetch_oversea_day_night``) take one
  slot per HTTP call, not one per wrapper level, and the refresh re-send takes its own.
  ``EGW00201``: the method is called again as :mod:`kis_safe_token.policy` says (one budget per
  outermost call); then mojito's answer is returned. ``issue_hashkey`` (``POST
  /uapi/hashkey``, made by the order methods) reads no token and takes its slot itself.
  ``download_master_file`` (another host) is not throttled.
- ``check_access_token()`` reads the store (never issues); ``load_access_token()`` and
  ``issue_access_token()`` take the fleet's token (issuing through the single flight only if the
  store has none). ``access_token`` is read from the shared token at every request, refreshed
  ahead of expiry like our own client.

The overrides depend on mojito2 **0.1.6** (:data:`UPSTREAM_VERSION`; a different version warns at
import), ``mojito/koreainvestment.py`` (``tests/test_integration_mojito.py`` fails if an upgrade
moves them):

- ``:340-368`` ``__init__(api_key, api_secret, acc_no, exchange, mock)``: ``set_base_url(mock)``
  first, then ``self.access_token = None`` and ``check_access_token()`` -> ``load_access_token()``
  or ``issue_access_token()``;
- ``:370-378`` ``set_base_url`` sets ``self.base_url``; ``:380-436`` the three token methods
  (overridden: they read and write ``token.dat``);
- every REST method (``fetch_domestic_price`` ``:472-494`` and the others) builds its header
  from ``self.access_token`` (a property here), once, right before its one ``requests`` call,
  and returns ``resp.json()``; ``:438-455`` ``issue_hashkey`` (wrapped: its slot).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from ..ratelimit import RateLimiter
from ..storage.base import TokenStorage
from . import require
from ._client_token import ClientToken, checked_storage, env_base_url

UPSTREAM_VERSION = "0.1.6"
"""The mojito2 release these overrides were written and tested against."""

_mojito = require("mojito", "mojito2", version=UPSTREAM_VERSION)
_UpstreamKoreaInvestment: Any = _mojito.KoreaInvestment

__all__ = ["REFRESHING_METHODS", "UPSTREAM_VERSION", "KoreaInvestment"]


_TOKEN_METHODS = frozenset(
    {"__init__", "set_base_url", "issue_access_token", "check_access_token", "load_access_token"}
)

F = TypeVar("F", bound=Callable[..., Any])


class KoreaInvestment(_UpstreamKoreaInvestment):  # type: ignore[misc]
    """mojito2's ``KoreaInvestment``, its token shared by the fleet (module docstring).
    mojito's arguments, plus keywords ``token_storage``, ``base_url``, ``calls_per_second`` and
    ``rate_limiter`` (the fleet-wide call-rate limit, as in :class:`kis_safe_token.KoreaInvestment`:
    ``None`` is KIS's default for the account type, virtual with ``mock=True``; ``0`` turns it
    off)."""

    def __init__(
        self,
        api_key: str,
        api_secret: str,
        acc_no: str,
        exchange: str = "서울",
        mock: bool = False,
        *,
        token_storage: TokenStorage | None = None,
        base_url: str | None = None,
        calls_per_second: float | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        self._kst_rate: dict[str, Any] = {
            "mock": mock,
            "calls_per_second": calls_per_second,
            "rate_limiter": rate_limiter,
        }
        self._kst_storage = checked_storage(token_storage)
        self._kst_base_url = env_base_url(base_url)
        self._kst_token: ClientToken | None = None
        super().__init__(api_key, api_secret, acc_no, exchange, mock)

    def set_base_url(self, mock: bool = True) -> None:
        """mojito's host for ``mock``, unless ``base_url`` or ``$KOREA_INVESTMENT_BASE_URL``
        gave one."""
        super().set_base_url(mock)
        if self.__dict__.get("_kst_base_url"):
            self.base_url = self._kst_base_url

    # -- the token ---------------------------------------------------------------------------------
    @property
    def access_token(self) -> str:
        """``Bearer <token>``, the fleet's (refreshed through the store near expiry). Read inside
        a wrapped method, it is the header of the request mojito sends next: once the token is
        in hand, it takes that request's slot of the fleet's rate limit (as ``KisAuth`` does:
        a slot taken before a refresh would pass unused while the token is issued, and the
        calls queued behind the refresh would then all go at once)."""
        shared = self._kst_shared()
        bearer = shared.serve()
        shared.meter.before_send()
        return bearer

    @access_token.setter
    def access_token(self, value: object) -> None:
        """mojito's ``__init__`` sets it to ``None`` before fetching; the fleet's is served."""

    def _kst_shared(self) -> ClientToken:
        if self._kst_token is None:
            self._kst_token = ClientToken(
                self, self.api_key, self.api_secret, self._kst_storage, **self._kst_rate
            )
        return self._kst_token

    def check_access_token(self) -> bool:
        """Whether the store holds a valid token (a read: never issues, never opens token.dat,
        never takes the seed lease of a store that has it on)."""
        storage = self._kst_shared().token_storage
        return storage.load_token(self.api_key, self.api_secret) is not None

    def load_access_token(self) -> None:
        """Take the fleet's token (through the single flight if the store has none)."""
        self._kst_shared().serve()

    def issue_access_token(self) -> None:
        """The fleet's token: issued through the single flight unless the store holds a valid
        one (a fleet makes one issuance; mojito's would make one per process)."""
        self._kst_shared().serve()

    def issue_hashkey(self, data: dict[str, Any]) -> Any:
        """mojito's ``/uapi/hashkey`` call (``:438-455``; the order methods make it before
        their own), in a slot of the fleet's rate limit. It reads no token, so it is not
        wrapped; mojito parses the answer itself, so it is not re-sent."""
        self._kst_shared().throttle()
        return super().issue_hashkey(data)

    def close(self) -> None:
        """Close the HTTP session of our token calls (mojito's own calls have none)."""
        if self._kst_token is not None:
            self._kst_token.close()


def _refreshing(method: F) -> F:
    """``method`` (an upstream REST method): its requests in slots of the fleet's rate limit
    (taken where it reads the token, see ``access_token``), re-sent after a back-off on
    ``EGW00201`` and once with the fleet's next token when its answer rejects the token it sent.
    Nested calls of a thread share the outermost call's budgets (one refresh; ``EGW00201``
    re-sends as :class:`~kis_safe_token.KisAuth` bounds them)."""

    @functools.wraps(method)
    def call(self: KoreaInvestment, *args: Any, **kwargs: Any) -> Any:
        shared = self._kst_shared()
        # mojito reads the token (and so takes the slot, ``access_token``) in each send.
        send = functools.partial(method, self, *args, **kwargs)
        return shared.meter.run(send, refresh=shared.refresh_rejected, slots=False)

    return call  # type: ignore[return-value]


def _reads_token(function: object) -> bool:
    code = getattr(function, "__code__", None)
    return code is not None and "access_token" in code.co_names


REFRESHING_METHODS: tuple[str, ...] = tuple(
    name
    for name, function in vars(_mojito.KoreaInvestment).items()
    if inspect.isfunction(function) and name not in _TOKEN_METHODS and _reads_token(function)
)
"""mojito's methods that build a request with the token, wrapped with the refresh."""

for _name in REFRESHING_METHODS:
    setattr(KoreaInvestment, _name, _refreshing(getattr(_mojito.KoreaInvestment, _name)))
