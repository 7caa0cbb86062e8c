"""python-kis 2.1.6 in a herd (see ``upstream_clients``): upstream's ``PyKis`` with its
``keep_token`` JSON cache (``~/.pykis/cache``) vs. ``kis_safe_token.integrations.pykis``.

pykis has no host setting: its request loop joins the module constant ``pykis.kis.REAL_DOMAIN``
to each path at call time (``kis.py:563``), so both scenarios point that constant at the
simulator in their own (forked) process, which is what a user testing pykis offline does too.
"""

from __future__ import annotations

from typing import Any

import pykis
import pykis.kis
from pykis.api.stock.quote import domestic_quote
from upstream_herd import ScenarioContext

from kis_safe_token.integrations.pykis import PyKis


class _Client:
    def __init__(self, kis: Any, symbol: str) -> None:
        self.kis, self.symbol = kis, symbol

    def round(self, round_no: int) -> str:
        # domestic_quote -> PyKis.fetch -> PyKis.request: pykis's own request loop, the one
        # that resets its token after EGW00123.
        quote = domestic_quote(self.kis, self.symbol)
        if not quote.price:
            raise RuntimeError("no price")
        return str(self.kis._token.token)


def _point_pykis_at(base_url: str) -> None:
    pykis.kis.REAL_DOMAIN = base_url
    pykis.kis.VIRTUAL_DOMAIN = base_url


def shipped(ctx: ScenarioContext) -> _Client:
    _point_pykis_at(ctx.base_url)
    kis = pykis.PyKis(
        id="herd",
        account=ctx.account,
        appkey=ctx.app_key,
        secretkey=ctx.app_secret,
        keep_token=True,  # pykis's own cache, so a process can reuse another's token
        use_websocket=False,
    )
    return _Client(kis, ctx.symbol)


def integrated(ctx: ScenarioContext) -> _Client:
    _point_pykis_at(ctx.base_url)
    kis = PyKis(
        id="herd",
        account=ctx.account,
        appkey=ctx.app_key,
        secretkey=ctx.app_secret,
        use_websocket=False,
        token_storage=ctx.token_storage(),
    )
    return _Client(kis, ctx.symbol)
