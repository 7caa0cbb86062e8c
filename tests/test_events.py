"""The event stream (docs/observability.md): each event fires once per occurrence, carries the
masked app key and the backend, never a secret or a token; a raising subscriber breaks nothing;
the Prometheus metrics count what the events say."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import APP_KEY, SECRET
from prometheus_client import CollectorRegistry

from kis_safe_token import FileTokenStorage, KoreaInvestment, LockedRedisTokenStorage, SharedToken
from kis_safe_token.errors import TokenStorageError
from kis_safe_token.events import Event, Kind, app_key_label, subscribe
from kis_safe_token.metrics import METRICS_ENV, enable_prometheus, from_environment
from kis_safe_token.oauth import issue_token
from kis_safe_token.testing import KisSimulator


@pytest.fixture
def events() -> Iterator[list[Event]]:
    seen: list[Event] = []
    unsubscribe = subscribe(seen.append)
    yield seen
    unsubscribe()


def kinds(events: list[Event]) -> list[Kind]:
    return [e.kind for e in events]


def no_secrets(events: list[Event], sim: KisSimulator) -> None:
    assert events
    for event in events:
        text = repr(event)
        assert SECRET not in text and APP_KEY not in text
        for token in sim.issued_tokens():
            assert token not in text and token[-12:] not in text


def test_issue_then_load_fire_once_each(
    sim: KisSimulator, token_path: Path, events: list[Event]
) -> None:
    first = SharedToken(APP_KEY, SECRET, FileTokenStorage(token_path), base_url=sim.base_url)
    token = first.token
    (issued,) = events
    assert issued.kind is Kind.ISSUED and issued.what == "token"
    assert issued.backend == "FileTokenStorage" and issued.app_key == app_key_label(APP_KEY)
    assert issued.expires_at == token.expires_at and issued.seconds >= 0.05  # the sim's latency
    first.token  # from memory: no event
    assert len(events) == 1

    second = SharedToken(APP_KEY, SECRET, FileTokenStorage(token_path), base_url=sim.base_url)
    assert second.token == token
    assert kinds(events) == [Kind.ISSUED, Kind.RELOADED]
    assert events[1].waited_s == 0.0 and events[1].expires_at == token.expires_at
    first.approval_key
    assert events[-1].kind is Kind.ISSUED and events[-1].what == "approval_key"
    assert events[-1].app_key == app_key_label(APP_KEY)
    no_secrets(events, sim)


class _Said(logging.Handler):
    """Sets ``event`` once a log line containing ``text`` is emitted."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text, self.event = text, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def test_waiter_reloads_the_holders_token_with_its_wait(
    sim: KisSimulator, token_path: Path, events: list[Event], caplog: pytest.LogCaptureFixture
) -> None:
    storage = FileTokenStorage(token_path)
    lock = storage.issuance_lock(APP_KEY, SECRET)
    assert lock.attempt() is True
    waiting = _Said("waiting for")
    logging.getLogger("kis_safe_token").addHandler(waiting)
    got: list[object] = []
    waiter = threading.Thread(
        target=lambda: got.append(
            SharedToken(APP_KEY, SECRET, FileTokenStorage(token_path), base_url=sim.base_url).token
        )
    )
    try:
        with caplog.at_level(logging.DEBUG, logger="kis_safe_token"):
            waiter.start()
            assert waiting.event.wait(30), "the waiter never waited"
            assert not events
            token = issue_token(
                requests.Session(),
                sim.base_url,
                api_key=APP_KEY,
                api_secret=SECRET,
                timeout=(5, 5),
                clock=time.time,
                rate_limit_wait_s=0,
            )
            storage.write_token(APP_KEY, SECRET, token)
            lock.release()
            waiter.join(30)
    finally:
        lock.release()
        logging.getLogger("kis_safe_token").removeHandler(waiting)
    assert got == [token]
    (reloaded,) = events
    assert reloaded.kind is Kind.RELOADED and reloaded.waited_s > 0
    no_secrets(events, sim)


def test_takeover_and_store_error(
    sim: KisSimulator, redis_url: str, key_prefix: str, dead_port: int, events: list[Event]
) -> None:
    storage = LockedRedisTokenStorage(redis_url, key_prefix=key_prefix, lock_ttl=1)
    held = storage.issuance_lock(APP_KEY, SECRET)
    assert held.attempt() is True  # a holder that dies: its lock lapses after lock_ttl
    shared = SharedToken(APP_KEY, SECRET, storage, base_url=sim.base_url, timeout=0.4)
    shared.token
    assert kinds(events) == [Kind.TOOK_OVER, Kind.ISSUED]
    assert events[0].waited_s > 0.5 and events[0].backend == "LockedRedisTokenStorage"

    events.clear()
    dead = LockedRedisTokenStorage(
        f"redis://127.0.0.1:{dead_port}/0", key_prefix=key_prefix, retry_timeout_s=0.5
    )
    with pytest.raises(TokenStorageError):
        SharedToken(APP_KEY, SECRET, dead, base_url=sim.base_url).token
    (error,) = events
    assert error.kind is Kind.STORE_ERROR and error.code == "TokenStorageError"


def test_sit_out_of_egw00133(token_path: Path, events: list[Event]) -> None:
    with KisSimulator(apps={APP_KEY: SECRET}, issue_window_s=1.0, issue_latency_s=0) as sim:
        SharedToken(APP_KEY, SECRET, FileTokenStorage(token_path), base_url=sim.base_url).token
        token_path.unlink()  # the token is lost: the next issue comes within KIS's window
        other = FileTokenStorage(token_path.with_name("other.json"))
        SharedToken(APP_KEY, SECRET, other, base_url=sim.base_url, rate_limit_wait_s=1.0).token
    assert kinds(events) == [Kind.ISSUED, Kind.KIS_ERROR, Kind.SAT_OUT, Kind.ISSUED]
    assert events[2].code == "EGW00133" and events[2].seconds == pytest.approx(1.0, abs=0.5)


def test_a_raising_subscriber_breaks_nothing(
    sim: KisSimulator, token_path: Path, events: list[Event], caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: Event) -> None:
        raise RuntimeError(f"subscriber bug {event.app_key}")

    unsubscribe = subscribe(broken)
    try:
        with caplog.at_level(logging.WARNING, logger="kis_safe_token"):
            broker = KoreaInvestment(
                APP_KEY, SECRET, token_storage=FileTokenStorage(token_path), base_url=sim.base_url
            )
            broker.fetch_price("005930")
            SharedToken(APP_KEY, SECRET, FileTokenStorage(token_path), base_url=sim.base_url).token
    finally:
        unsubscribe()
    assert Kind.ISSUED in kinds(events)  # the other subscriber still saw it
    warnings = [r.getMessage() for r in caplog.records if "event subscriber" in r.getMessage()]
    assert len(warnings) == 1 and "RuntimeError" in warnings[0]  # once, not per event
    assert kinds(events).count(Kind.RELOADED) == 1


def test_unsubscribe_stops_the_events(sim: KisSimulator, token_path: Path) -> None:
    seen: list[Event] = []
    unsubscribe = subscribe(seen.append)
    unsubscribe()
    SharedToken(APP_KEY, SECRET, FileTokenStorage(token_path), base_url=sim.base_url).token
    assert seen == []


def test_prometheus_counts_the_events(sim: KisSimulator, token_path: Path) -> None:
    registry = CollectorRegistry()
    enable_prometheus(registry)
    enable_prometheus(registry)  # a second call changes nothing
    first = SharedToken(APP_KEY, SECRET, FileTokenStorage(token_path), base_url=sim.base_url)
    token = first.token
    SharedToken(APP_KEY, SECRET, FileTokenStorage(token_path), base_url=sim.base_url).token
    labels = {"app_key": app_key_label(APP_KEY), "backend": "FileTokenStorage"}
    value = registry.get_sample_value
    assert value("kis_token_issuances_total", {**labels, "what": "token"}) == 1
    assert value("kis_token_events_total", {**labels, "event": "reloaded"}) == 1
    assert value("kis_token_issue_seconds_count", labels) == 1
    assert value("kis_token_expiry_timestamp_seconds", labels) == token.expires_at
    from prometheus_client import generate_latest

    text = generate_latest(registry).decode()
    assert SECRET not in text and APP_KEY not in text and token.access_token[-12:] not in text


def test_the_metrics_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(METRICS_ENV, "statsd")
    with pytest.raises(ValueError, match=f"{METRICS_ENV} must be one of prometheus, off"):
        from_environment()
    monkeypatch.setenv(METRICS_ENV, "off")
    from_environment()


def test_calls_rate_waits_refusals_rejections_and_revoke(
    sim: KisSimulator, token_path: Path, events: list[Event]
) -> None:
    broker = KoreaInvestment(
        APP_KEY,
        SECRET,
        token_storage=FileTokenStorage(token_path),
        base_url=sim.base_url,
        calls_per_second=5,
    )
    assert kinds(events) == [Kind.ISSUED]
    events.clear()
    sim.refuse_calls(1)  # one EGW00201, re-sent after back-off in a new slot
    for _ in range(3):
        broker.fetch_price("005930")
    assert kinds(events).count(Kind.KIS_CALL) == 4 == sim.counts["uapi_calls"] + 1
    (refusal,) = [e for e in events if e.kind is Kind.KIS_ERROR]
    assert refusal.code == "EGW00201"
    assert Kind.RATE_WAITED in kinds(events)  # 4 calls at 5/s: some waited for their slot
    assert all(e.seconds > 0 for e in events if e.kind is Kind.RATE_WAITED)

    events.clear()
    sim.expire_tokens()  # KIS now answers EGW00123: dropped, refreshed, re-sent once
    broker.fetch_price("005930")
    assert [k for k in kinds(events) if k is not Kind.RATE_WAITED] == [
        Kind.KIS_CALL,
        Kind.KIS_ERROR,
        Kind.REJECTED,
        Kind.ISSUED,
        Kind.KIS_CALL,
    ]
    events.clear()
    broker.revoke_access_token()
    assert kinds(events) == [Kind.REVOKED]
    no_secrets(events, sim)


def test_the_asyncio_client_emits_the_same(
    sim: KisSimulator, token_path: Path, events: list[Event]
) -> None:
    import asyncio

    from kis_safe_token import AsyncKoreaInvestment

    async def main() -> None:
        async with AsyncKoreaInvestment(
            APP_KEY, SECRET, token_storage=FileTokenStorage(token_path), base_url=sim.base_url
        ) as broker:
            sim.refuse_calls(1)
            await broker.fetch_price("005930")

    asyncio.run(main())
    assert kinds(events) == [Kind.ISSUED, Kind.KIS_CALL, Kind.KIS_ERROR, Kind.KIS_CALL]
    assert events[2].code == "EGW00201"


def test_issuance_refused_counts_the_kis_code(token_path: Path, events: list[Event]) -> None:
    with KisSimulator(apps={APP_KEY: SECRET}, issue_window_s=1.0, issue_latency_s=0) as sim:
        SharedToken(APP_KEY, SECRET, FileTokenStorage(token_path), base_url=sim.base_url).token
        other = FileTokenStorage(token_path.with_name("other.json"))
        SharedToken(APP_KEY, SECRET, other, base_url=sim.base_url, rate_limit_wait_s=1.0).token
    assert [e.code for e in events if e.kind is Kind.KIS_ERROR] == ["EGW00133"]


def test_a_lease_that_runs_out_then_is_granted(token_path: Path, events: list[Event]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    holder = FileTokenStorage(token_path, seed_lease=True, lease_ttl=0.5, issue_window_s=0)
    assert holder.check_token_valid(APP_KEY, SECRET) is False  # granted; it never saves
    assert kinds(events) == [Kind.LEASE_GRANTED]
    waiter = FileTokenStorage(
        token_path, seed_lease=True, lease_ttl=0.5, issue_window_s=0, wait_timeout=30
    )
    with ThreadPoolExecutor(1) as pool:  # another thread: another owner
        assert pool.submit(waiter.check_token_valid, APP_KEY, SECRET).result(30) is False
    assert kinds(events) == [Kind.LEASE_GRANTED, Kind.LEASE_EXPIRED, Kind.LEASE_GRANTED]


def test_every_event_and_metric_label_leaks_nothing(
    token_path: Path, redis_url: str, key_prefix: str, dead_port: int
) -> None:
    registry = CollectorRegistry()
    enable_prometheus(registry)
    seen: list[Event] = []
    unsubscribe = subscribe(seen.append)
    try:
        with KisSimulator(apps={APP_KEY: SECRET}, issue_window_s=2.0, issue_latency_s=0) as sim:
            first, second = token_path, token_path.with_name("second.json")
            SharedToken(APP_KEY, SECRET, FileTokenStorage(first), base_url=sim.base_url).token
            broker = KoreaInvestment(  # EGW00133 at once: sat out, then issued
                APP_KEY,
                SECRET,
                token_storage=FileTokenStorage(second),
                base_url=sim.base_url,
                calls_per_second=5,
                rate_limit_wait_s=2.0,
            )
            SharedToken(APP_KEY, SECRET, FileTokenStorage(second), base_url=sim.base_url).token
            sim.refuse_calls(1)
            for _ in range(3):
                broker.fetch_price("005930")
            sim.expire_tokens()  # rejected, refreshed
            broker.fetch_price("005930")
            broker.revoke_access_token()
            sim.expire_tokens()  # a fresh window for the takeover's issue
            redis = LockedRedisTokenStorage(redis_url, key_prefix=key_prefix, lock_ttl=1)
            assert redis.issuance_lock(APP_KEY, SECRET).attempt() is True
            SharedToken(APP_KEY, SECRET, redis, base_url=sim.base_url, timeout=0.4).token
            dead = LockedRedisTokenStorage(
                f"redis://127.0.0.1:{dead_port}/0", key_prefix=key_prefix, retry_timeout_s=0.5
            )
            with pytest.raises(TokenStorageError):
                SharedToken(APP_KEY, SECRET, dead, base_url=sim.base_url).token
            tokens = sim.issued_tokens()
        lease_path = token_path.with_name("lease.json")
        holder = FileTokenStorage(lease_path, seed_lease=True, lease_ttl=0.5, issue_window_s=0)
        assert holder.check_token_valid(APP_KEY, SECRET) is False
        waiter = FileTokenStorage(
            lease_path, seed_lease=True, lease_ttl=0.5, issue_window_s=0, wait_timeout=30
        )
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(waiter.check_token_valid, APP_KEY, SECRET).result(30) is False
    finally:
        unsubscribe()
    assert {e.kind for e in seen} == set(Kind)  # every kind, in one run
    from prometheus_client import generate_latest

    text = generate_latest(registry).decode() + "\n".join(map(repr, seen))
    assert SECRET not in text and APP_KEY not in text
    assert len(tokens) >= 4
    for token in tokens:
        assert token not in text and token[-12:] not in text
