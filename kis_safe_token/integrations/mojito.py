"""mojito2's ``KoreaInvestment`` with the fleet's single flight and the token refresh mojito lacks.

mojito's arguments plus ``token_storage=``, ``base_url=``, ``calls_per_second=`` and
``rate_limiter=``; what changes and the upstream lines it depends on: ``docs/integrations.md``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from ..ratelimit import RateLimiter
from ..storage.base import TokenStorage
from . import require
from ._client_token import ClientTokenHolder, env_base_url

UPSTREAM_VERSION = "0.1.6"
"""The mojito2 release these overrides were written and tested against."""

_mojito = require("mojito", "mojito2", version=UPSTREAM_VERSION)
_UpstreamKoreaInvestment: Any = _mojito.KoreaInvestment

__all__ = ["REFRESHING_METHODS", "UPSTREAM_VERSION", "KoreaInvestment"]


_TOKEN_METHODS = frozenset(
    {"__init__", "set_base_url", "issue_access_token", "check_access_token", "load_access_token"}
)

F = TypeVar("F", bound=Callable[..., Any])


class KoreaInvestment(ClientTokenHolder, _UpstreamKoreaInvestment):  # type: ignore[misc]
    """mojito2's ``KoreaInvestment``, its token shared by the fleet. Keywords
    ``calls_per_second``/``rate_limiter``: the fleet-wide call-rate limit, as in
    :class:`kis_safe_token.KoreaInvestment` (``None``: KIS's default for the account type,
    virtual with ``mock=True``; ``0``: off)."""

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
        self._kst_setup(
            token_storage, mock=mock, calls_per_second=calls_per_second, rate_limiter=rate_limiter
        )
        self._kst_base_url = env_base_url(base_url)
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
        a wrapped method, it is the header of mojito's next request: once the token is in hand,
        it takes that request's slot (a slot taken before a refresh would pass unused while the
        token is issued, and the calls queued behind the refresh would then all go at once)."""
        shared = self._kst_shared()
        bearer = shared.serve()
        shared.meter.before_send()
        return bearer

    @access_token.setter
    def access_token(self, value: object) -> None:
        """mojito's ``__init__`` sets it to ``None`` before fetching; the fleet's is served."""

    def issue_access_token(self) -> None:
        """The fleet's token, through the single flight (mojito's would issue once per process)."""
        self._kst_shared().serve()

    def issue_hashkey(self, data: dict[str, Any]) -> Any:
        """mojito's ``/uapi/hashkey`` call in a slot of the fleet's rate limit (it reads no token,
        so it is not wrapped; mojito parses the answer itself, so it is not re-sent)."""
        self._kst_shared().throttle()
        return super().issue_hashkey(data)

    def close(self) -> None:
        """Close the HTTP session of our token calls (mojito's own calls have none)."""
        self._kst_close()


def _refreshing(method: F) -> F:
    """``method`` (an upstream REST method) acted on as the thread's call policy says: re-sent
    after a back-off on ``EGW00201``, once with the fleet's next token if its token is rejected."""

    @functools.wraps(method)
    def call(self: KoreaInvestment, *args: Any, **kwargs: Any) -> Any:
        shared = self._kst_shared()
        # mojito reads the token (and so takes the slot, ``access_token``) in each send.
        send = functools.partial(method, self, *args, **kwargs)
        return shared.meter.run(send, refresh=shared.refresh_rejected, slots=False)

    return call  # type: ignore[return-value]


REFRESHING_METHODS: tuple[str, ...] = tuple(
    name
    for name, function in vars(_mojito.KoreaInvestment).items()
    if inspect.isfunction(function)
    and name not in _TOKEN_METHODS
    and "access_token" in function.__code__.co_names
)
"""mojito's methods that build a request with the token, wrapped with the refresh."""

for _name in REFRESHING_METHODS:
    setattr(KoreaInvestment, _name, _refreshing(getattr(_mojito.KoreaInvestment, _name)))
