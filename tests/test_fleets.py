"""Real fleets: gunicorn (sync and gthread, with and without --preload) and a celery prefork
worker, each process with its own KoreaInvestment, all sharing one token through the store."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from conftest import APP_KEY, HERD_CALLS_PER_SECOND, SECRET

from kis_safe_token.testing import KisSimulator
from kis_safe_token.testing.redis_server import RedisServer, free_port

pytestmark = pytest.mark.stress

APPS = Path(__file__).parent / "apps"


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test alone: the fleets use the default key prefix."""
    with RedisServer() as server:
        yield server


def fleet_env(
    sim: KisSimulator, storage: str, tmp_path: Path, redis: RedisServer | None
) -> dict[str, str]:
    """The environment of a fleet on ``storage`` (``redis``: a private server, needed only for
    the Redis backend, as the fleets use the default key prefix)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOREA_INVESTMENT_")}
    env.update(
        KOREA_INVESTMENT_BASE_URL=sim.base_url,
        KOREA_INVESTMENT_TOKEN_STORAGE=storage,
        KOREA_INVESTMENT_TOKEN_FILE=str(tmp_path / "cache" / "tokens.json"),
        KIS_TEST_APP_KEY=APP_KEY,
        KIS_TEST_APP_SECRET=SECRET,
        PYTHONPATH=os.pathsep.join([str(APPS), env.get("PYTHONPATH", "")]),
    )
    if redis is not None:
        env["KOREA_INVESTMENT_REDIS_URL"] = redis.url
    return env


def wait_until_serving(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "gunicorn exited during start-up"
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise AssertionError(f"gunicorn did not serve {url} within {timeout} s")


@pytest.mark.parametrize("storage", ["file", "redis"])
@pytest.mark.parametrize("worker_class", ["sync", "gthread"])
@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
def test_gunicorn_workers_share_one_issuance(
    sim: KisSimulator,
    tmp_path: Path,
    private_redis: RedisServer,
    storage: str,
    worker_class: str,
    preload: bool,
) -> None:
    env = fleet_env(sim, storage, tmp_path, private_redis)
    env["KIS_TEST_BUILD_AT_IMPORT"] = "1"  # with --preload: in the master, before fork()
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "gunicorn",
        "-w",
        "4",
        "-k",
        worker_class,
        "--threads",
        "4",
        "-b",
        f"127.0.0.1:{port}",
        "--log-level",
        "warning",
        "wsgi_app:app",
    ]
    if preload:
        args.insert(3, "--preload")
    proc = subprocess.Popen(args, env=env, cwd=APPS)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(f"{url}/005930", proc)
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda i: requests.get(f"{url}/005930", timeout=30), range(48)))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert [a.status_code for a in answers] == [200] * 48
    bodies = [a.json() for a in answers]
    assert len({b["token"] for b in bodies}) == 1
    assert {b["price"] for b in bodies} == {bodies[0]["price"]}
    assert sim.issued == 1
    assert sim.rate_limited == 0


def test_gunicorn_workers_subscribe_through_the_fleet_s_one_realtime_session(
    sim: KisSimulator, tmp_path: Path
) -> None:
    from kis_safe_token.testing.realtime_sim import RealtimeSimulator

    ready = tmp_path / "ready"
    ready.mkdir()
    env = fleet_env(sim, "file", tmp_path, None)
    env["KIS_TEST_READY_DIR"] = str(ready)
    port = free_port()
    args = [sys.executable, "-m", "gunicorn", "-w", "4", "-k", "sync", "-b", f"127.0.0.1:{port}"]
    with RealtimeSimulator(sim, rate=50) as rts:
        env["KOREA_INVESTMENT_WS_URL"] = rts.ws_url
        proc = subprocess.Popen(
            [*args, "--log-level", "warning", "wsgi_app:app"], env=env, cwd=APPS
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_serving(f"{url}/005930", proc)
            deadline = time.monotonic() + 60
            while len(list(ready.iterdir())) < 4:  # every worker up: the requests spread
                assert time.monotonic() < deadline, "not every gunicorn worker started"
                time.sleep(0.05)
            with ThreadPoolExecutor(16) as pool:
                answers = list(
                    pool.map(lambda i: requests.get(f"{url}/rt/005930", timeout=30), range(48))
                )
            stats = rts.stats()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    assert [a.status_code for a in answers] == [200] * 48
    bodies = [a.json() for a in answers]
    assert len({b["pid"] for b in bodies}) >= 2  # several workers subscribed
    assert {b["role"] for b in bodies} <= {"leader", "follower"}
    assert (stats["sessions_opened"], stats["sessions_peak"], stats["sessions_refused"]) == (
        1,
        1,
        0,
    )
    assert stats["registrations"] == 1  # one pair, however many workers want it


@pytest.fixture
def celery_fleet(
    sim: KisSimulator, tmp_path: Path, private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[object]:
    env = fleet_env(sim, "redis", tmp_path, private_redis)
    env["KIS_TEST_BROKER_URL"] = f"redis://127.0.0.1:{private_redis.port}/1"
    for key in ("KIS_TEST_BROKER_URL", "KIS_TEST_APP_KEY", "KIS_TEST_APP_SECRET"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.syspath_prepend(str(APPS))
    sys.modules.pop("celery_app", None)
    module = importlib.import_module("celery_app")
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "celery_app",
            "worker",
            "-P",
            "prefork",
            "-c",
            "4",
            "--loglevel=WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-n",
            f"kis-{uuid.uuid4().hex[:8]}@%h",
        ],
        env=env,
        cwd=APPS,
    )
    try:
        deadline = time.monotonic() + 60
        while not module.app.control.ping(timeout=0.5):
            assert worker.poll() is None, "the celery worker exited during start-up"
            assert time.monotonic() < deadline, "the celery worker did not answer a ping in 60 s"
        yield module
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(10)
        module.app.close()
        sys.modules.pop("celery_app", None)


def test_celery_prefork_worker_makes_one_issuance_per_expiry(
    sim: KisSimulator, celery_fleet
) -> None:
    from celery import group

    fetch = celery_fleet.fetch
    first = group(fetch.s("005930") for _ in range(24))().get(timeout=90)
    assert len({r["token"] for r in first}) == 1
    assert sim.issued == 1 and sim.rate_limited == 0
    sim.expire_tokens()
    second = group(fetch.s("005930") for _ in range(24))().get(timeout=90)
    assert len({r["token"] for r in second}) == 1
    assert {r["token"] for r in second} != {r["token"] for r in first}
    assert sim.issued == 2 and sim.rate_limited == 0
    assert sim.counts["EGW00123"] >= 1


@pytest.mark.parametrize("storage", ["file", "redis"])
def test_gunicorn_fleet_metrics_match_what_kis_counted(
    sim: KisSimulator, tmp_path: Path, private_redis: RedisServer, storage: str
) -> None:
    """4 gthread workers under load, scraped through prometheus_client's multi-process
    collector: the fleet's counters are the simulator's (issuances, calls, EGW00201)."""
    from prometheus_client.parser import text_string_to_metric_families

    env = fleet_env(sim, storage, tmp_path, private_redis)
    env["KOREA_INVESTMENT_METRICS"] = "prometheus"
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "prometheus")
    env["KOREA_INVESTMENT_CALLS_PER_SECOND"] = str(HERD_CALLS_PER_SECOND)
    (tmp_path / "prometheus").mkdir()
    port = free_port()
    args = [sys.executable, "-m", "gunicorn", "-w", "4", "-k", "gthread", "--threads", "4"]
    args += ["-b", f"127.0.0.1:{port}", "--log-level", "warning", "wsgi_app:app"]
    proc = subprocess.Popen(args, env=env, cwd=APPS)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(f"{url}/005930", proc)
        sim.refuse_calls(3)  # an outside program: three EGW00201, re-sent by the clients
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda i: requests.get(f"{url}/005930", timeout=60), range(48)))
        scraped = requests.get(f"{url}/metrics", timeout=30).text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert [a.status_code for a in answers] == [200] * 48
    totals: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(scraped):
        for sample in family.samples:
            key = (sample.name, sample.labels.get("code", sample.labels.get("event", "")))
            totals[key] = totals.get(key, 0.0) + sample.value
            assert APP_KEY not in str(sample.labels) and SECRET not in str(sample.labels)
    assert sim.issued == 1 and sim.too_many_calls == 3
    assert totals[("kis_token_issuances_total", "")] == sim.issued
    assert totals[("kis_token_kis_calls_total", "")] == sim.counts["uapi_calls"] + 3
    assert totals[("kis_token_kis_errors_total", "EGW00201")] == 3
    assert totals[("kis_token_events_total", "issued")] == 1
