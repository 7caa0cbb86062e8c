"""A celery app for the celery tests: each task fetches a price through one ``KoreaInvestment``
per worker process. Broker, result backend and storage come from the environment."""

from __future__ import annotations

import hashlib
import os

from celery import Celery

from kis_safe_token import KoreaInvestment

app = Celery(
    "kis_test", broker=os.environ["KIS_TEST_BROKER_URL"], backend=os.environ["KIS_TEST_BROKER_URL"]
)
app.conf.update(
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    task_acks_late=False,
    worker_prefetch_multiplier=1,
)

_client: KoreaInvestment | None = None


@app.task(name="kis_test.fetch")
def fetch(symbol: str) -> dict[str, object]:
    global _client
    if _client is None:
        _client = KoreaInvestment(os.environ["KIS_TEST_APP_KEY"], os.environ["KIS_TEST_APP_SECRET"])
    quote = _client.fetch_price(symbol)
    return {
        "pid": os.getpid(),
        "price": quote["output"]["stck_prpr"],
        "token": hashlib.sha256(_client.access_token.encode()).hexdigest()[:8],
    }
