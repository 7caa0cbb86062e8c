"""mojito2 0.1.6 in a herd (see ``upstream_clients``): upstream's ``KoreaInvestment`` with its
``token.dat`` in the working directory vs. ``kis_safe_token.integrations.mojito``."""

from __future__ import annotations

from typing import Any

import mojito
from upstream_herd import ScenarioContext

from kis_safe_token.integrations.mojito import KoreaInvestment


class _Client:
    def __init__(self, broker: Any, symbol: str) -> None:
        self.broker, self.symbol = broker, symbol

    def round(self, round_no: int) -> str:
        # fetch_price -> fetch_domestic_price: mojito's own request path (it has no refresh).
        answer = self.broker.fetch_price(self.symbol)
        if answer.get("rt_cd") != "0":
            raise RuntimeError(f"no price: {answer.get('msg_cd')} {answer.get('msg1')}")
        return str(self.broker.access_token)


def shipped(ctx: ScenarioContext) -> _Client:
    base_url = ctx.base_url

    class Shipped(mojito.KoreaInvestment):  # type: ignore[misc]
        def set_base_url(self, mock: bool = True) -> None:  # mojito's own redirection point
            self.base_url = base_url

    return _Client(Shipped(ctx.app_key, ctx.app_secret, ctx.account), ctx.symbol)


def integrated(ctx: ScenarioContext) -> _Client:
    broker = KoreaInvestment(
        ctx.app_key,
        ctx.app_secret,
        ctx.account,
        token_storage=ctx.token_storage(),
        base_url=ctx.base_url,
    )
    return _Client(broker, ctx.symbol)
