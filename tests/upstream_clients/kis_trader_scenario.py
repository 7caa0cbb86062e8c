"""kis-trader 0.12.2 in a herd (see ``upstream_clients``): upstream's ``KISClient`` with its own
token cache (``$XDG_CACHE_HOME/kis-trader/tokens``) vs. ``KISClient`` on
``kis_safe_token.integrations.kis_trader``'s ``TokenManager`` and ``RequestsTransport``.

kis-trader reads its hosts from its endpoint table at call time (``_internal/_endpoints.py:10``):
both scenarios point the ``real`` entry at the simulator in their own (forked) process.
"""

from __future__ import annotations

from typing import Any

import kis_trader
from kis_trader._internal import _endpoints
from upstream_herd import ScenarioContext

from kis_safe_token.integrations.kis_trader import RequestsTransport, TokenManager


class _Client:
    def __init__(self, client: Any, symbol: str) -> None:
        self.client, self.symbol = client, symbol

    def round(self, round_no: int) -> str:
        # stock().quote() -> RequestsTransport.request: kis-trader's own request path.
        quote = self.client.domestic.stock(self.symbol).quote()
        if not quote.current_price:
            raise RuntimeError("no price")
        return str(self.client.transport._token_manager.access_token())


def shipped(ctx: ScenarioContext) -> _Client:
    _endpoints._BASE_URL_BY_ENVIRONMENT["real"] = ctx.base_url
    client = kis_trader.KISClient(
        app_key=ctx.app_key, app_secret=ctx.app_secret, environment="real"
    )
    return _Client(client, ctx.symbol)


def integrated(ctx: ScenarioContext) -> _Client:
    _endpoints._BASE_URL_BY_ENVIRONMENT["real"] = ctx.base_url
    tokens = TokenManager(
        app_key=ctx.app_key,
        app_secret=ctx.app_secret,
        environment="real",
        token_storage=ctx.token_storage(),
    )
    client = kis_trader.KISClient(
        app_key=ctx.app_key,
        app_secret=ctx.app_secret,
        environment="real",
        transport=RequestsTransport(token_manager=tokens),
    )
    return _Client(client, ctx.symbol)
