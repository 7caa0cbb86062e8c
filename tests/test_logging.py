"""The log tells the story at the documented levels (docs/logging.md): INFO for an issuance, an
``EGW00133`` sit-out, a takeover and a revoke; DEBUG for loads, reloads and waits; never the
secret, a whole token or the whole app key."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
from conftest import APP_KEY, SECRET

from kis_safe_token import FileTokenStorage, KoreaInvestment, LockedRedisTokenStorage
from kis_safe_token.crypto import key_id
from kis_safe_token.testing import KisSimulator

TOKEN_PATH = "/oauth2/tokenP"


@pytest.fixture
def story(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.DEBUG, logger="kis_safe_token"):
        yield caplog


def lines(story: pytest.LogCaptureFixture, level: int, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in story.records
        if r.name == "kis_safe_token" and r.levelno == level and text in r.getMessage()
    ]


def no_secrets(story: pytest.LogCaptureFixture, sim: KisSimulator) -> None:
    assert story.records
    for record in story.records:
        message = record.getMessage()
        assert SECRET not in message and APP_KEY not in message
        for token in sim.issued_tokens():
            assert token not in message and token[-12:] not in message


def test_issue_load_and_revoke(
    sim: KisSimulator, token_path: Path, story: pytest.LogCaptureFixture
) -> None:
    broker = KoreaInvestment(
        APP_KEY, SECRET, token_storage=FileTokenStorage(token_path), base_url=sim.base_url
    )
    broker.fetch_price("005930")
    (issued,) = lines(story, logging.INFO, "issued a token")
    assert "FileTokenStorage, app key PSte" in issued and " KST) in " in issued
    assert "ms for the lock" in issued

    other = KoreaInvestment(
        APP_KEY, SECRET, token_storage=FileTokenStorage(token_path), base_url=sim.base_url
    )
    other.fetch_price("005930")
    assert lines(story, logging.DEBUG, "loaded the token") and sim.issued == 1

    broker.revoke_access_token()
    (revoked,) = lines(story, logging.INFO, "revoked the token at KIS")
    assert revoked.startswith("FileTokenStorage, app key PSte")
    no_secrets(story, sim)


def test_egw00133_sit_out_is_told_at_info(
    token_path: Path, story: pytest.LogCaptureFixture
) -> None:
    with KisSimulator(apps={APP_KEY: SECRET}, refusals_per_window=1, issue_latency_s=0) as sim:
        body = {"grant_type": "client_credentials", "appkey": APP_KEY, "appsecret": SECRET}
        assert requests.post(sim.base_url + TOKEN_PATH, json=body, timeout=5).ok  # elsewhere
        broker = KoreaInvestment(
            APP_KEY,
            SECRET,
            token_storage=FileTokenStorage(token_path),
            base_url=sim.base_url,
            rate_limit_wait_s=1.1,
        )
        broker.fetch_price("005930")
        (sat_out,) = lines(story, logging.INFO, "sitting out its window")
        assert "EGW00133" in sat_out and "asking again in 1.1 s" in sat_out
        assert sim.issued == 2
        no_secrets(story, sim)


def test_a_waiter_and_a_takeover_are_told(
    sim: KisSimulator, redis_url: str, key_prefix: str, story: pytest.LogCaptureFixture
) -> None:
    # A lock left by a holder that died (it declares a 300 ms lock_ttl and never releases):
    # the caller waits for it, then takes over and issues.
    lock_key = f"{key_prefix}:{{{key_id(APP_KEY)}}}:lock"
    redis.Redis.from_url(redis_url).set(lock_key, "dead-holder:300", px=300)
    storage = LockedRedisTokenStorage(redis_url, key_prefix=key_prefix, poll_interval_s=0.05)
    broker = KoreaInvestment(APP_KEY, SECRET, token_storage=storage, base_url=sim.base_url)
    broker.fetch_price("005930")
    assert lines(story, logging.DEBUG, "waiting for")
    (took_over,) = lines(story, logging.INFO, "took over the issuance lock")
    assert took_over.startswith("LockedRedisTokenStorage, app key PSte")
    assert "which left no token" in took_over
    assert lines(story, logging.INFO, "issued a token") and sim.issued == 1
    no_secrets(story, sim)


def test_a_waiter_reloads_what_the_holder_issued(
    token_path: Path, story: pytest.LogCaptureFixture
) -> None:
    with KisSimulator(apps={APP_KEY: SECRET}, issue_latency_s=0) as sim:
        holder, waiter = (
            KoreaInvestment(
                APP_KEY, SECRET, token_storage=FileTokenStorage(token_path), base_url=sim.base_url
            )
            for _ in range(2)
        )
        sim.expire_tokens()  # both meet EGW00123 next: the holder re-issues, the waiter waits
        sim.issue_gate.clear()  # the holder's tokenP hangs until the waiter is waiting
        thread = threading.Thread(target=holder.fetch_price, args=("005930",))
        thread.start()
        try:
            assert sim.wait_for(lambda s: s.counts["issue_requests"] == 2)
            # The holder's answer comes the moment the waiter says it is waiting.
            gate = OpenOn("waiting for", sim.issue_gate)
            logging.getLogger("kis_safe_token").addHandler(gate)
            try:
                waiter.fetch_price("005930")
            finally:
                logging.getLogger("kis_safe_token").removeHandler(gate)
        finally:
            sim.issue_gate.set()
            thread.join(10)
        assert sim.issued == 2
        (reloaded,) = lines(story, logging.DEBUG, "reloaded its token")
        assert reloaded.startswith("FileTokenStorage, app key PSte")
        no_secrets(story, sim)


class OpenOn(logging.Handler):
    """Sets ``event`` when a record containing ``text`` is logged."""

    def __init__(self, text: str, event: threading.Event) -> None:
        super().__init__(logging.DEBUG)
        self.text, self.event = text, event

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()
