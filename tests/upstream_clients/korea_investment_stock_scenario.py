"""korea-investment-stock 0.19.0 in a herd (see ``upstream_clients``): upstream's
``KoreaInvestment`` with its pickle cache vs. our
``kis_safe_token.integrations.korea_investment_stock``."""

from __future__ import annotations

from typing import Any

import korea_investment_stock
from upstream_herd import ScenarioContext, with_host

from kis_safe_token.integrations.korea_investment_stock import KoreaInvestment


class _Client:
    def __init__(self, broker: Any, symbol: str) -> None:
        self.broker, self.symbol = broker, symbol

    def round(self, round_no: int) -> str:
        # fetch_domestic_price goes through upstream's _request_with_token_refresh (its refresh).
        answer = self.broker.fetch_domestic_price(self.symbol)
        if answer.get("rt_cd") != "0":
            raise RuntimeError(f"no price: {answer.get('msg_cd')} {answer.get('msg1')}")
        return str(self.broker.access_token)


def shipped(ctx: ScenarioContext) -> _Client:
    Shipped = with_host(korea_investment_stock.KoreaInvestment, ctx.base_url)  # noqa: N806
    # Its default storage: the pickle ~/.cache/kis/token.key under the process's own HOME.
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
