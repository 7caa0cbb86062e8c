"""What production does to single flight: a holder that dies after KIS answered, with
the library's defaults and KIS's real one-minute window; fork() mid-refresh; KIS down for a
while; Redis keys written by someone without the secret; a host whose clock is far off;
parameters at their edges. Real processes, a real redis-server, the simulator over HTTP.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import HeldIssuance, report_from_forked_child
from herd import HERD_APP_KEY, HERD_SECRET, build_storage, gated_client, token_id

from kis_safe_token import (
    FileTokenStorage,
    KoreaInvestment,
    LockedRedisTokenStorage,
    TokenIssueError,
    TokenStorageError,
)
from kis_safe_token._faults import arm_fault
from kis_safe_token.testing import KisSimulator
from kis_safe_token.testing.redis_server import free_port
from kis_safe_token.token import Token

BACKENDS = ["file", "redis"]


def storage_spec(backend: str, tmp_path: Path, redis_url: str, key_prefix: str) -> dict[str, Any]:
    if backend == "file":
        return {"kind": "file", "path": str(tmp_path / "cache" / "tokens.json")}
    return {"kind": "redis", "url": redis_url, "key_prefix": key_prefix}


def make_token(token: str = "tok-" + "h" * 60, expires_in: float = 86_400) -> Token:
    return Token(token, time.time() + expires_in)


def must_not_issue() -> Token:
    raise AssertionError("this caller must not issue")


def token_data(token: str = "tok-" + "h" * 60, expires_in: float = 86_400) -> dict[str, Any]:
    """The seed's dict of ``make_token(...)``, for ``save_token``."""
    return make_token(token, expires_in).to_token_data("key1", "secret1")


# -- 1. the holder dies after KIS answered, library defaults, KIS's 60 s window -----------------


@pytest.mark.stress
@pytest.mark.parametrize("backend", BACKENDS)
def test_holder_killed_after_kis_answered_with_the_library_defaults(
    backend: str, tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    spec = storage_spec(backend, tmp_path, redis_url, key_prefix)
    takeover_s = build_storage(spec).takeover_s()  # Redis: lock_ttl (30 s); file: 0
    with KisSimulator(apps={HERD_APP_KEY: HERD_SECRET}, issue_latency_s=0) as sim:
        assert sim.issue_window_s == 60
        ctx = mp.get_context("spawn")
        out, go = ctx.Queue(), ctx.Event()
        survivors = [
            ctx.Process(target=gated_client, args=(spec, sim.base_url, go, out)) for _ in range(4)
        ]
        for p in survivors:
            p.start()
        assert [out.get(timeout=120)[0] for _ in survivors] == ["ready"] * 4
        victim = ctx.Process(
            target=gated_client,
            args=(spec, sim.base_url, None, out, arm_fault("issue.after_kis", tmp_path)),
        )
        victim.start()
        victim.join(60)
        assert victim.exitcode == -9, "the victim did not die after KIS answered"
        assert sim.issued == 1
        died = time.monotonic()
        go.set()
        results = [out.get(timeout=takeover_s + 100) for _ in survivors]
        for p in survivors:
            p.join(10)
    assert [r[0] for r in results] == ["ok"] * 4, results  # no waiter fails
    assert len({r[1] for r in results}) == 1
    assert sim.issued == 2  # the victim's lost one, and one more
    # One process at a time asks KIS: one EGW00133, then the retry after the window.
    assert sim.rate_limited == 1
    assert sim.counts["issue_requests"] == 3
    last_s = max(r[2] for r in results) - died
    print(f"\n{backend}: every survivor held a token {last_s:.1f} s after the holder died")
    assert last_s < takeover_s + 61 + 5


# -- 7. KIS down: waiters get the failure, the fleet asks KIS a few times, not N --------------


def outage_worker(spec: dict[str, Any], base_url: str, go: Any, out: Any) -> None:
    """Build a client until it works, as an app's own retry loop would (every 0.2 s, 40 s)."""
    storage = build_storage(spec)
    out.put(("ready", 0))
    go.wait(60)
    refusals, give_up = 0, time.monotonic() + 40
    while True:
        try:
            client = KoreaInvestment(
                HERD_APP_KEY, HERD_SECRET, token_storage=storage, base_url=base_url
            )
            out.put((token_id(client.access_token), refusals))
            return
        except TokenIssueError:
            refusals += 1
            if time.monotonic() > give_up:
                out.put(("gave up", refusals))
                return
            time.sleep(0.2)
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            out.put((f"{type(exc).__name__}: {exc}", refusals))
            return


@pytest.mark.parametrize("backend", BACKENDS)
def test_kis_outage_costs_the_fleet_a_few_token_calls_not_one_per_worker(
    backend: str, tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    spec = storage_spec(backend, tmp_path, redis_url, key_prefix)
    with KisSimulator(apps={HERD_APP_KEY: HERD_SECRET}, issue_latency_s=0) as sim:
        sim.outage.set()
        ctx = mp.get_context("spawn")
        out, go = ctx.Queue(), ctx.Event()
        workers = [
            ctx.Process(target=outage_worker, args=(spec, sim.base_url, go, out)) for _ in range(16)
        ]
        for p in workers:
            p.start()
        assert [out.get(timeout=120)[0] for _ in workers] == ["ready"] * 16
        go.set()
        assert sim.wait_for(lambda s: s.counts["outage_answers"] >= 1, timeout=30)
        time.sleep(10)  # the outage lasts 10 s (a scenario, not a race)
        sim.outage.clear()
        results = [out.get(timeout=60) for _ in workers]
        for p in workers:
            p.join(10)
    assert all(len(r[0]) == 8 for r in results), results  # every worker ended with a token
    assert len({r[0] for r in results}) == 1
    assert sum(r[1] for r in results) >= 16  # the workers did see the outage
    assert sim.issued == 1
    # Holds of 5 s then 10 s: about three calls over the 10 s outage, fleet-wide.
    print(f"\n{backend}: {sim.counts['outage_answers']} tokenP calls during the outage")
    assert sim.counts["outage_answers"] <= 4, sim.counts


# -- 2. fork() while another thread is refreshing ---------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_child_forked_mid_refresh_gets_a_token_instead_of_hanging(
    backend: str, tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    spec = storage_spec(backend, tmp_path, redis_url, key_prefix)
    window = {"issue_window_s": 0}  # the forced refresh follows the first issue at once
    with KisSimulator(apps={HERD_APP_KEY: HERD_SECRET}, issue_latency_s=0, **window) as sim:
        broker = KoreaInvestment(
            HERD_APP_KEY, HERD_SECRET, token_storage=build_storage(spec), base_url=sim.base_url
        )
        sim.issue_gate.clear()  # KIS hangs: the refreshing thread holds every lock it takes
        refresher = threading.Thread(target=broker.issue_access_token, kwargs={"force": True})
        refresher.start()
        assert sim.wait_for(lambda s: s.counts["issue_requests"] == 2, timeout=10)

        def release_kis() -> None:
            sim.issue_gate.set()
            refresher.join(20)

        message = report_from_forked_child(
            lambda: "ok " + token_id(broker.access_token), then=release_kis
        )
        parent_token = token_id(broker.access_token)
    assert message == f"ok {parent_token}"
    assert sim.issued == 2  # the parent's refresh; the child reused it


# -- 6. Redis keys written by someone without the secret --------------------------------------


@pytest.mark.parametrize("how", ["set", "restore"])
def test_stray_lock_without_expiry_is_taken_over_within_lock_ttl(
    how: str, redis_url: str, key_prefix: str
) -> None:
    storage = LockedRedisTokenStorage(redis_url, key_prefix=key_prefix, lock_ttl=1.0)
    admin = redis.from_url(redis_url)
    lock_key = storage._get_redis_key("key1") + ":lock"
    if how == "set":
        admin.set(lock_key, "stray")
    else:
        admin.set("scratch", "stray")
        admin.restore(lock_key, 0, admin.dump("scratch"))
    assert admin.pttl(lock_key) == -1
    token = make_token()
    started = time.monotonic()
    assert storage.get_or_issue("key1", "secret1", lambda: token) == token
    assert time.monotonic() - started < 5.0  # lock_ttl and a poll, not the 60 s+ wait_timeout


def test_a_flooded_wake_up_list_does_not_make_waiters_spin(redis_url: str, key_prefix: str) -> None:
    admin = redis.from_url(redis_url)

    def storage() -> LockedRedisTokenStorage:
        return LockedRedisTokenStorage(redis_url, key_prefix=key_prefix, wait_timeout=40)

    lock_key = storage()._get_redis_key("key1") + ":lock"
    token = make_token()
    got: list[object] = []

    def wait() -> None:
        got.append(storage().get_or_issue("key1", "secret1", lambda: pytest.fail("no issue")))

    with HeldIssuance(storage(), lambda: token) as held:
        owner = admin.get(lock_key).decode()
        admin.rpush(f"{lock_key}:wake:{owner}", *["x"] * 1000)
        calls_before, started = _commands(admin), time.monotonic()
        waiters = [threading.Thread(target=wait) for _ in range(4)]
        for t in waiters:
            t.start()
        time.sleep(1.5)  # the holder holds for 1.5 s (or longer on a loaded box) while flooded
        commands = _commands(admin) - calls_before
        held_s = time.monotonic() - started
        held.finish()
        for t in waiters:
            t.join(10)
    assert len(got) == 4 and all(g == token for g in got)
    # At most 4 waiters x (held_s / 0.125 s, the shortest jittered poll, + their first round) x
    # 9 commands (the lock script's 5, a BLPOP and a 3-command pipeline): 450 in 1.5 s. Before,
    # 4 waiters sent ~31,000.
    bound = 4 * (held_s / 0.125 + 1) * 9 + 18
    assert commands < bound, f"{commands} commands in {held_s:.2f} s"


def _commands(admin: redis.Redis) -> int:
    return sum(int(v["calls"]) for v in admin.info("commandstats").values())


def test_a_waiter_with_a_shorter_lock_ttl_leaves_a_live_holders_lock_alone(
    redis_url: str, key_prefix: str
) -> None:
    """Fleets mix lock_ttl values: a 1 s waiter must not cut a 15 s holder that is mid-issue."""
    holder = LockedRedisTokenStorage(redis_url, key_prefix=key_prefix, lock_ttl=15.0)
    waiter = LockedRedisTokenStorage(
        redis_url, key_prefix=key_prefix, lock_ttl=1.0, wait_timeout=10, poll_interval_s=0.1
    )
    token = make_token()
    with HeldIssuance(holder, lambda: token) as held:
        got: list[Token] = []
        t = threading.Thread(
            target=lambda: got.append(waiter.get_or_issue("key1", "secret1", must_not_issue))
        )
        t.start()
        time.sleep(2.5)  # the holder stays in KIS's call for longer than the waiter's lock_ttl
        held.finish()
        t.join(10)
    assert got == [token]


def test_a_holder_keeps_the_token_kis_gave_it_when_the_save_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = FileTokenStorage(tmp_path / "tokens.json")

    def disk_full(*args: object) -> None:
        raise TokenStorageError("cannot write token file: No space left on device")

    monkeypatch.setattr(storage, "write_token", disk_full)
    token = make_token()
    assert storage.get_or_issue("key1", "secret1", lambda: token) == token


def test_a_password_in_the_url_query_never_reaches_a_repr_or_an_error() -> None:
    storage = LockedRedisTokenStorage(
        f"redis://127.0.0.1:{free_port()}/0?password=hunter2secret", key_prefix="q"
    )
    assert "hunter2secret" not in repr(storage)
    with pytest.raises(TokenStorageError) as info:
        storage.get_or_issue("key1", "secret1", must_not_issue)
    assert "hunter2secret" not in str(info.value)


def test_a_poll_interval_the_socket_timeout_would_cut_short_is_refused() -> None:
    with pytest.raises(ValueError, match="poll_interval_s"):
        LockedRedisTokenStorage("redis://127.0.0.1:9/0", socket_timeout_s=0.2)


# -- 4. a host whose clock is far off ---------------------------------------------------------


def test_a_host_whose_clock_runs_days_fast_never_deletes_the_fleets_token(
    redis_url: str, key_prefix: str
) -> None:
    healthy = LockedRedisTokenStorage(redis_url, key_prefix=key_prefix)
    assert healthy.save_token(token_data("good-" + "g" * 60))
    skewed = LockedRedisTokenStorage(
        redis_url, key_prefix=key_prefix, clock=lambda: time.time() + 2 * 86_400
    )
    # The skewed host's fresh token looks expired to it: it is refused, not written as a DEL.
    assert skewed.save_token(token_data("new-" + "n" * 60)) is False
    loaded = healthy.load_token("key1", "secret1")
    assert loaded is not None and loaded["access_token"] == "good-" + "g" * 60


def test_an_unusable_answer_is_not_asked_for_again_on_every_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 3: KIS answers an already-expired token; the next calls re-raise, no tokenP loop."""
    with KisSimulator(apps={HERD_APP_KEY: HERD_SECRET}, issue_latency_s=0) as sim:
        issue = sim._issue

        def expired_answer(body: dict[str, Any]) -> tuple[int, Any]:
            status, payload = issue(body)
            if status == 200:
                payload["access_token_token_expired"] = "2001-01-01 00:00:00"
            return status, payload

        monkeypatch.setattr(sim, "_issue", expired_answer)
        storage = FileTokenStorage(tmp_path / "tokens.json")
        for _ in range(5):
            with pytest.raises(TokenIssueError, match="already-expired"):
                KoreaInvestment(
                    HERD_APP_KEY, HERD_SECRET, token_storage=storage, base_url=sim.base_url
                )
        assert sim.counts["issue_requests"] == 1
        assert storage.load_token(HERD_APP_KEY, HERD_SECRET) is None


def test_a_host_whose_clock_runs_days_fast_asks_kis_once_and_leaves_the_fleet_alone(
    redis_url: str, key_prefix: str
) -> None:
    """Item 4 on Redis: the skewed host is told its clock is off; the healthy hosts never notice."""
    no_window = {"issue_window_s": 0}  # the skewed host comes right after the fleet's issuance
    with KisSimulator(apps={HERD_APP_KEY: HERD_SECRET}, issue_latency_s=0, **no_window) as sim:

        def client(clock: Any = time.time) -> KoreaInvestment:
            storage = LockedRedisTokenStorage(redis_url, key_prefix=key_prefix, clock=clock)
            return KoreaInvestment(
                HERD_APP_KEY, HERD_SECRET, token_storage=storage, base_url=sim.base_url, clock=clock
            )

        healthy = [client() for _ in range(2)]
        kept = {h.access_token for h in healthy}
        assert len(kept) == 1 and sim.issued == 1

        def ahead() -> float:
            return time.time() + 2 * 86_400

        for _ in range(3):
            with pytest.raises(TokenIssueError, match="clock") as info:
                client(ahead)
            assert info.value.local
        assert (
            sim.counts["issue_requests"] == 2
        )  # the healthy issuance and one from the skewed host
        for h in healthy:
            assert h.fetch_price("005930")["rt_cd"] == "0"
        assert {h.access_token for h in healthy} == kept
        assert client().access_token in kept  # the stored token is still the fleet's
        assert sim.issued == 2 and sim.rate_limited == 0


# -- 8. parameters at their edges ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("lock_ttl", math.inf),
        ("lock_ttl", 1e-4),
        ("lock_ttl", math.nan),
        ("lock_ttl", "30"),
        ("wait_timeout", math.inf),
        ("wait_timeout", 0),
        ("refresh_margin_s", math.inf),
        ("refresh_margin_s", -1),
        ("poll_interval_s", 0),
    ],
)
def test_edge_timings_are_refused_naming_the_parameter(name: str, value: object) -> None:
    import fakeredis

    with pytest.raises(ValueError, match=name):
        LockedRedisTokenStorage(client=fakeredis.FakeRedis(), **{name: value})


def test_edge_timings_of_the_file_backend_are_refused(tmp_path: Path) -> None:
    for name, value in [("wait_timeout", math.inf), ("poll_interval_s", -1.0)]:
        with pytest.raises(ValueError, match=name):
            FileTokenStorage(tmp_path / "t.json", **{name: value})


def test_a_wait_shorter_than_a_dead_holders_lock_is_the_callers_choice(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import fakeredis

    storage = LockedRedisTokenStorage(client=fakeredis.FakeRedis(), lock_ttl=20, wait_timeout=5)
    with caplog.at_level(logging.INFO, logger="kis_safe_token"):
        storage.check_timing(http_timeout_s=13.05)
    assert "wait_timeout 5.0 s is shorter than a holder's worst case" in caplog.text
    assert "takeover 20.0 s" in caplog.text


def test_a_tiny_lock_ttl_within_bounds_works(redis_url: str, key_prefix: str) -> None:
    storage = LockedRedisTokenStorage(redis_url, key_prefix=key_prefix, lock_ttl=0.2)
    token = make_token()
    assert storage.get_or_issue("key1", "secret1", lambda: token) == token


def test_default_wait_outlasts_a_takeover_and_the_issue_window() -> None:
    import fakeredis

    storage = LockedRedisTokenStorage(client=fakeredis.FakeRedis())
    storage.check_timing(http_timeout_s=13.05, issue_window_s=61)  # the client's defaults
    assert storage.wait_timeout >= storage.lock_ttl + 61 + 2 * 13.05
