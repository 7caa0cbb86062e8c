"""mojito2's ``KoreaInvestment`` with the fleet's single flight and the token refresh mojito lacks.

``from kis_safe_token.integrations.mojito import KoreaInvestment`` instead of mojito's, same
arguments, plus ``token_storage=``, ``base_url=``, ``calls_per_second=`` and ``rate_limiter=``.
What changes against upstream and the upstream lines the overrides depend on (version 0.1.6):
the manual, ``docs/integrations.md``.
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
