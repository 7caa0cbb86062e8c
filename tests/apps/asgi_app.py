"""A small Starlette app for the uvicorn-worker test: every request fetches a price through one
``AsyncKoreaInvestment`` per worker process, built in the worker's event loop (lifespan).

Configured by the environment, as ``wsgi_app``: ``KOREA_INVESTMENT_*`` for storage and host,
plus ``KIS_TEST_APP_KEY`` / ``KIS_TEST_APP_SECRET``. ``/health`` answers without touching KIS,
so the first price requests are the herd.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from kis_safe_token import AsyncKoreaInvestment


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    kis = AsyncKoreaInvestment(os.environ["KIS_TEST_APP_KEY"], os.environ["KIS_TEST_APP_SECRET"])
    app.state.kis = kis
    try:
        yield
    finally:
        await kis.aclose()


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"pid": os.getpid()})


async def price(request: Request) -> JSONResponse:
    kis: AsyncKoreaInvestment = request.app.state.kis
    quote = await kis.fetch_price(request.path_params["symbol"])
    bearer = await kis.access_token()
    return JSONResponse(
        {
            "pid": os.getpid(),
            "price": quote["output"]["stck_prpr"],
            "token": hashlib.sha256(bearer.encode()).hexdigest()[:8],
        }
    )


app = Starlette(
    routes=[Route("/health", health), Route("/{symbol}", price)],
    lifespan=lifespan,
)
