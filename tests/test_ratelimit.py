"""The call-rate limiters: the contract on every built-in backend (a real redis-server), the
arithmetic, the rate a client picks, the limiter each store hands out, EGW00201 back-off against
the simulator, and the websocket approval key's single flight and compare-and-delete."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import APP_KEY, SECRET
from redis.crc import key_slot
from test_contract import DictTokenStorage

from kis_safe_token import (
    FileTokenStorage,
    KisApiError,
    KisAuth,
    KoreaInvestment,
    LockedRedisTokenStorage,
    SharedToken,
)
from kis_safe_token.auth import RETRY_ATTEMPTS, RETRY_BUDGET_S
from kis_safe_token.ratelimit import (
    CALLS_PER_SECOND_ENV,
    FileRateLimiter,
    MemoryRateLimiter,
    RedisRateLimiter,
    resolve_calls_per_second,
)
from kis_safe_token.ratelimit.base import STALE_AHEAD_S, reserve
from kis_safe_token.shared import APPROVAL_SUFFIX
from kis_safe_token.testing import KisSimulator

pytest.register_assert_rewrite("kis_safe_token.testing.ratelimit_contract")
from kis_safe_token.testing.ratelimit_contract import (  # noqa: E402
    LimiterFactory,
    RateLimiterContract,
)


# -- the contract on every built-in backend -------------------------------------------------------
class TestMemoryRateLimiter(RateLimiterContract):
    @pytest.fixture
    def make_limiter(self) -> LimiterFactory:
        return lambda name, rate: MemoryRateLimiter(name, rate)


class TestFileRateLimiter(RateLimiterContract):
    @pytest.fixture
    def make_limiter(self, tmp_path: Path) -> LimiterFactory:
        # New objects (new descriptors) every time: they exclude each other through flock.
        return lambda name, rate: FileRateLimiter(tmp_path / f"rate-{name}", rate)


class TestRedisRateLimiter(RateLimiterContract):
    @pytest.fixture
    def make_limiter(self, redis_url: str, key_prefix: str) -> LimiterFactory:
        storage = LockedRedisTokenStorage(redis_url, key_prefix=key_prefix)
        return lambda name, rate: storage.rate_limiter(name, rate)


# -- the arithmetic and the rate a client picks ---------------------------------------------------
def test_a_tat_far_ahead_of_the_clock_is_reset_not_obeyed() -> None:
    # Written before the clock stepped back (or before a reboot): obeying it would stall calls.
    wait, tat = reserve(1_000.0 + STALE_AHEAD_S + 1, 1_000.0, 0.1, 1.0)
    assert wait == 0.0 and tat == pytest.approx(1_000.1)
    assert reserve(float("nan"), 5.0, 0.5, 1.0) == (0.0, 5.5)


def test_a_torn_rate_file_starts_afresh(tmp_path: Path) -> None:
    path = tmp_path / "rate"
    path.write_bytes(b"\xff" * 24)  # two NaNs and a boot that is not this one
    limiter = FileRateLimiter(path, 10)
    assert limiter.try_acquire(0) == 0.0
    assert path.stat().st_size == 24
    for _ in range(50):
        limiter.try_acquire(60)
    assert path.stat().st_size == 24  # bounded: rewritten in place, never appended
    old = tmp_path / "rate-of-an-older-version"
    old.write_bytes(struct.pack("<dd", time.time() + 50, 0.0))  # wall-clock seconds, no boot
    assert FileRateLimiter(old, 10).try_acquire(0) == 0.0


def test_default_rate_is_kis_limit_for_the_account_type() -> None:
    assert resolve_calls_per_second(None, mock=False, env={}) == 20.0
    assert resolve_calls_per_second(None, mock=True, env={}) == pytest.approx(2.0)
    assert resolve_calls_per_second(5, mock=False, env={}) == 5.0
    assert resolve_calls_per_second(0, mock=False, env={}) is None
    assert resolve_calls_per_second(None, mock=False, env={CALLS_PER_SECOND_ENV: "7.5"}) == 7.5
    assert resolve_calls_per_second(None, mock=False, env={CALLS_PER_SECOND_ENV: "0"}) is None


@pytest.mark.parametrize("bad", [-1, float("nan"), True, "20", 1e9])
def test_a_bad_rate_names_the_argument(bad: Any) -> None:
    with pytest.raises(ValueError, match="calls_per_second"):
        resolve_calls_per_second(bad, mock=False, env={})


def test_a_bad_rate_variable_names_the_variable() -> None:
    with pytest.raises(ValueError, match=CALLS_PER_SECOND_ENV):
        resolve_calls_per_second(None, mock=False, env={CALLS_PER_SECOND_ENV: "fast"})


# -- which limiter a client gets ------------------------------------------------------------------
def test_file_store_gives_one_host_wide_limiter_shared_by_every_client_of_the_process(
    token_path: Path,
) -> None:
    storage = FileTokenStorage(token_path)
    shared = SharedToken(APP_KEY, SECRET, storage)
    auth = KisAuth(APP_KEY, SECRET, FileTokenStorage(token_path))
    assert isinstance(shared.rate_limiter, FileRateLimiter)
    assert shared.rate_limiter is auth.shared_token.rate_limiter  # counted once per process
    assert shared.rate_limiter.path.parent == token_path.parent
    assert shared.rate_limiter.rate == 20.0
    virtual = SharedToken(APP_KEY, SECRET, storage, mock=True)
    assert virtual.rate_limiter is not None and virtual.rate_limiter.rate == 2.0


def test_redis_store_gives_a_limiter_under_the_token_hash_tag(
    redis_url: str, key_prefix: str
) -> None:
    storage = LockedRedisTokenStorage(redis_url, key_prefix=key_prefix)
    shared = SharedToken(APP_KEY, SECRET, storage, calls_per_second=5)
    limiter = shared.rate_limiter
    assert isinstance(limiter, RedisRateLimiter) and limiter.rate == 5.0
    limiter.try_acquire(0)
    limiter.penalize(1.0)
    keys = {k.decode() for k in storage.redis_client.keys(f"{key_prefix}:*")}
    token_key = storage._get_redis_key(APP_KEY)
    assert keys == {f"{token_key}:rate", f"{token_key}:rate:slow"}
    slots = {key_slot(k.encode()) for k in keys | {token_key}}
    assert len(slots) == 1  # Cluster keeps the token and its rate on one slot
    # It expires by itself, one second after the last slot handed out.
    assert 0 < storage.redis_client.pttl(f"{token_key}:rate") <= 1_001 + 1_000 * limiter.interval_s


def test_other_stores_limit_per_process_and_say_so(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kis_safe_token.storage import base

    monkeypatch.setattr(base, "_noted_per_process", set())
    caplog.set_level(logging.INFO, "kis_safe_token")
    store = DictTokenStorage({})
    shared = SharedToken(APP_KEY, SECRET, store)
    other = SharedToken(APP_KEY, SECRET, DictTokenStorage({}))
    assert isinstance(shared.rate_limiter, MemoryRateLimiter)
    assert other.rate_limiter is not None
    assert shared.rate_limiter.try_acquire(0) == 0.0
    assert other.rate_limiter.try_acquire(0) is None  # one process, one app key: one rate
    notes = [r for r in caplog.records if "limited per process" in r.getMessage()]
    assert len(notes) == 1  # once per store class


def test_zero_turns_the_limiter_off_and_an_injected_one_is_used(token_path: Path) -> None:
    off = SharedToken(APP_KEY, SECRET, FileTokenStorage(token_path), calls_per_second=0)
    assert off.rate_limiter is None and off.throttle() == 0.0
    mine = MemoryRateLimiter("mine", 3)
    injected = SharedToken(APP_KEY, SECRET, FileTokenStorage(token_path), rate_limiter=mine)
    assert injected.rate_limiter is mine
    with pytest.raises(ValueError, match="not both"):
        SharedToken(
            APP_KEY, SECRET, FileTokenStorage(token_path), calls_per_second=3, rate_limiter=mine
        )


def test_every_call_takes_a_slot(sim: KisSimulator, token_path: Path) -> None:
    class Counting(MemoryRateLimiter):
        taken = 0

        def try_acquire(self, max_wait_s: float = 0.0) -> float | None:
            Counting.taken += 1
            return super().try_acquire(max_wait_s)

    limiter = Counting("counting-" + os.urandom(4).hex(), 1000)
    broker = KoreaInvestment(
        APP_KEY,
        SECRET,
        token_storage=FileTokenStorage(token_path),
        base_url=sim.base_url,
        rate_limiter=limiter,
    )
    for _ in range(3):
        broker.fetch_price("005930")
    session = requests.Session()
    session.auth = KisAuth.from_shared(broker.shared_token)
    session.get(
        f"{sim.base_url}/uapi/domestic-stock/v1/quotations/inquire-price",
        headers={"tr_id": "FHKST01010100"},
        params={"FID_INPUT_ISCD": "005930"},
    )
    assert Counting.taken == 4 == sim.counts["uapi_calls"]
    # The Approval call takes one too (KIS meters it with the REST calls); tokenP took none.
    broker.approval_key  # noqa: B018
    assert Counting.taken == 5 and sim.counts["approval_requests"] == 1


# -- EGW00201 anyway: back off, retry, bounded ----------------------------------------------------
def test_egw00201_from_outside_is_retried_after_back_off_and_slows_the_fleet(
    sim: KisSimulator, token_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = KoreaInvestment(
        APP_KEY, SECRET, token_storage=FileTokenStorage(token_path), base_url=sim.base_url
    )
    sim.refuse_calls(2)
    caplog.set_level(logging.WARNING, "kis_safe_token")
    started = time.monotonic()
    assert broker.fetch_price("005930")["rt_cd"] == "0"
    assert time.monotonic() - started >= 0.25 * 0.5 + 0.5 * 0.5  # two jittered back-offs
    assert sim.too_many_calls == 2 and sim.counts["uapi_calls"] == 1
    limiter = broker.rate_limiter
    assert limiter is not None and limiter.slowdown_left_s() > 50
    warnings = [r for r in caplog.records if "EGW00201" in r.getMessage()]
    assert len(warnings) == 1  # two refusals, one log line


def test_egw00201_that_does_not_stop_is_a_clear_error_within_the_budget(
    sim: KisSimulator, token_path: Path
) -> None:
    broker = KoreaInvestment(
        APP_KEY, SECRET, token_storage=FileTokenStorage(token_path), base_url=sim.base_url
    )
    sim.refuse_calls(1_000)
    started = time.monotonic()
    with pytest.raises(KisApiError) as info:
        broker.fetch_price("005930")
    assert time.monotonic() - started < RETRY_BUDGET_S
    assert info.value.code == "EGW00201" and info.value.status == 500
    assert f"after {RETRY_ATTEMPTS} re-sends" in str(info.value)
    assert sim.too_many_calls == 1 + RETRY_ATTEMPTS


def test_the_simulator_answers_egw00201_exactly_as_kis_does(sim: KisSimulator) -> None:
    sim.refuse_calls(1)
    resp = requests.get(f"{sim.base_url}/uapi/domestic-stock/v1/quotations/inquire-price")
    assert resp.status_code == 500
    assert resp.json() == {
        "rt_cd": "1",
        "msg_cd": "EGW00201",
        "msg1": "초당 거래건수를 초과하였습니다.",
    }


def test_the_simulator_meters_per_app_key_per_second() -> None:
    with KisSimulator(calls_per_second=3, clock=lambda: 1_000.5) as sim:
        url = f"{sim.base_url}/uapi/domestic-stock/v1/quotations/inquire-price"
        codes = [requests.get(url, headers={"appkey": "A"}).json()["msg_cd"] for _ in range(4)]
        other = requests.get(url, headers={"appkey": "B"}).json()["msg_cd"]
        sim.outside_calls("B", 2)
        last = requests.get(url, headers={"appkey": "B"}).json()["msg_cd"]
    assert codes[3] == "EGW00201" and "EGW00201" not in codes[:3]
    assert other != "EGW00201" and last == "EGW00201"
    assert sim.peak_calls_per_second["A"] == 3 and sim.too_many_calls == 2


# -- the websocket approval key -------------------------------------------------------------------
def _approval_in_child(path: str, base_url: str, barrier: Any, out: Any) -> None:
    try:
        shared = SharedToken(APP_KEY, SECRET, FileTokenStorage(path), base_url=base_url)
        barrier.wait(30)
        out.put(shared.approval_key)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        out.put(f"error: {type(exc).__name__}: {exc}")


def test_processes_share_one_approval_key(sim: KisSimulator, token_path: Path) -> None:
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(6), ctx.Queue()
    procs = [
        ctx.Process(target=_approval_in_child, args=(str(token_path), sim.base_url, barrier, out))
        for _ in range(6)
    ]
    for proc in procs:
        proc.start()
    try:
        keys = [out.get(timeout=30) for _ in procs]
    finally:
        for proc in procs:
            proc.join(10)
    assert len(set(keys)) == 1 and keys[0] in sim.approval_keys
    assert sim.counts["approvals_issued"] == 1 and sim.counts["approval_requests"] == 1
    assert keys[0] not in token_path.read_text()  # sealed in the store, not in clear
    assert sim.issued == 0  # the approval key needs no access token


def test_an_approval_answered_egw00201_is_sat_out_and_asked_again(token_path: Path) -> None:
    """KIS meters Approval with the REST calls: an ``EGW00201`` there slows the fleet down and
    the holder asks once more after a short pause, instead of the fleet recording a failure
    (which would refuse everyone the key for 5-30 s)."""
    base = float(int(time.time()))
    counts: dict[str, int] = {}
    # The second Approval request is metered in the next second: the window has passed.
    with KisSimulator(
        apps={APP_KEY: SECRET},
        calls_per_second=20,
        clock=lambda: base + (counts.get("approval_requests", 0) >= 2),
    ) as sim:
        counts = sim.counts  # type: ignore[assignment]
        shared = SharedToken(APP_KEY, SECRET, FileTokenStorage(token_path), base_url=sim.base_url)
        sim.outside_calls(APP_KEY, 20)  # another program used this second's quota
        key = shared.approval_key
        assert key in sim.approval_keys
        assert sim.counts["approval_requests"] == 2 and sim.counts["approvals_issued"] == 1
        assert shared.rate_limiter is not None and shared.rate_limiter.slowdown_left_s() > 0


def test_a_rejected_approval_key_is_dropped_only_if_still_stored(
    sim: KisSimulator, token_path: Path
) -> None:
    first = SharedToken(APP_KEY, SECRET, FileTokenStorage(token_path), base_url=sim.base_url)
    late = SharedToken(APP_KEY, SECRET, FileTokenStorage(token_path), base_url=sim.base_url)
    old = first.approval_key
    assert late.approval_key == old
    assert first.invalidate_approval_key(old) is True
    new = first.approval_key
    assert new != old and sim.counts["approvals_issued"] == 2
    assert late.invalidate_approval_key(old) is False  # late: the fresh key survives
    assert late.approval_key == new
    assert sim.counts["approvals_issued"] == 2
    broker = KoreaInvestment.from_shared(late)
    assert broker.approval_key == new
    assert first.token.access_token  # the token is a separate entry: still issued once
    assert sim.issued == 1


def test_a_caller_that_oversleeps_its_slot_takes_a_new_one() -> None:
    # A CPU-starved host wakes late: sent then, the call would bunch with the next slot's.
    # 2 calls/s: slots 0.5 s apart, so the bounds below leave a loaded machine 250 ms.
    limiter = MemoryRateLimiter("late-" + os.urandom(4).hex(), 2)
    lateness = [1.25]  # the first sleep overshoots by 2.5 intervals, the next one does not

    def oversleep(seconds: float) -> None:
        time.sleep(seconds + (lateness.pop() if lateness else 0.0))

    limiter.sleep = oversleep  # type: ignore[method-assign]
    assert limiter.try_acquire(0) == 0.0
    slept = limiter.acquire(5)  # slot 1 missed, a new slot taken after it
    assert slept > 0.25
    nxt = limiter.try_acquire(5)
    # A new slot was taken at wake-up: the next one is an interval away (without the rule the
    # late call would have used the missed slot and the next slot would be free now).
    assert nxt is not None and nxt > 0.25


def test_status_shows_the_rate_setting(
    token_path: Path,
    memory_keyring: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from kis_safe_token import set_api_secret
    from kis_safe_token.cli import main

    set_api_secret(APP_KEY, SECRET)
    monkeypatch.setenv("KOREA_INVESTMENT_TOKEN_FILE", str(token_path))
    assert main(["status", "--api-key", APP_KEY]) == 0
    out = capsys.readouterr().out
    assert "rate:     20 calls/s per app key, virtual 2/s (KIS: 20/s, 2/s)" in out
    assert str(token_path.parent) in out
    FileTokenStorage(token_path).rate_limiter(APP_KEY, 20).penalize()
    assert main(["status", "--api-key", APP_KEY, "--json"]) == 0
    rate = json.loads(capsys.readouterr().out)["rate_limit"]
    assert rate["calls_per_second"] == 20 and rate["slowdown_left_s"] > 50
    monkeypatch.setenv(CALLS_PER_SECOND_ENV, "0")
    assert main(["status", "--api-key", APP_KEY]) == 0
    assert f"rate:     off ({CALLS_PER_SECOND_ENV}=0)" in capsys.readouterr().out


def test_a_slot_before_any_token_creates_a_private_rate_file(tmp_path: Path) -> None:
    token_path = tmp_path / "new" / "cache" / "tokens.json"
    shared = SharedToken(APP_KEY, SECRET, FileTokenStorage(token_path))
    assert not token_path.parent.exists()  # nothing touched the disk at construction
    assert shared.throttle() == 0.0
    (rate_file,) = token_path.parent.iterdir()
    assert rate_file.name.startswith("tokens.json.rate-")
    assert rate_file.stat().st_mode & 0o777 == 0o600
    assert token_path.parent.stat().st_mode & 0o777 == 0o700


def test_an_approval_issuer_that_died_is_taken_over(
    sim: KisSimulator, redis_url: str, key_prefix: str
) -> None:
    storage = LockedRedisTokenStorage(redis_url, key_prefix=key_prefix)
    # A holder that died holding the approval key's issuance lock (its owner id declares 1 s).
    lock = f"{storage._get_redis_key(APP_KEY + APPROVAL_SUFFIX)}:lock"
    started = time.monotonic()
    storage.redis_client.set(lock, "deadhost:1:0badc0de:1000", px=1_000)
    shared = SharedToken(APP_KEY, SECRET, storage, base_url=sim.base_url)
    key = shared.approval_key
    assert 0.9 < time.monotonic() - started < 10  # waited for the dead lock, then took over
    assert key in sim.approval_keys and sim.counts["approvals_issued"] == 1
    assert SharedToken(APP_KEY, SECRET, storage, base_url=sim.base_url).approval_key == key


def test_acquire_async_awaits_the_slot() -> None:
    import asyncio

    limiter = MemoryRateLimiter("async-" + os.urandom(4).hex(), 2)  # slots ~0.5 s apart

    async def two() -> tuple[float, float]:
        return await limiter.acquire_async(1), await limiter.acquire_async(1)

    first, second = asyncio.run(two())
    assert first == 0.0 and 0.25 <= second <= limiter.interval_s + 0.001


# -- a wall-clock step on the host ---------------------------------------------------------------

_STEPPED_CHILD = r"""
import json, sys, time
offset, path, rate, calls = float(sys.argv[1]), sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
real = time.time
time.time = lambda: real() + offset  # this process reads the wall clock after (or before) a step
from kis_safe_token.ratelimit.file import FileRateLimiter
limiter = FileRateLimiter(path, rate)
print("ready", flush=True)
sys.stdin.readline()
stamps = []
for _ in range(calls):
    limiter.acquire(10)
    stamps.append(time.monotonic())
print(json.dumps(stamps), flush=True)
"""


@pytest.mark.parametrize("step_s", [3.0, 40.0, -40.0])
def test_a_wall_clock_step_costs_no_burst_and_no_stall(tmp_path: Path, step_s: float) -> None:
    """Two processes on one host share a file limiter; one reads the wall clock ``step_s``
    away from the other (the clock stepped between their reads). On the wall clock the step
    put slots in the past (a burst: 14 EGW00201 at +3 s) or 40 s ahead (no call for 40 s)."""
    import json
    import subprocess
    import sys

    rate, calls = 10.0, 15
    path = tmp_path / "rate-shared"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _STEPPED_CHILD, str(offset), str(path), str(rate), str(calls)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for offset in (0.0, step_s)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for proc in procs:  # released together
            assert proc.stdin is not None
            proc.stdin.write("\n")
            proc.stdin.flush()
        outs = [proc.communicate(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0], outs
    stamps = sorted(t for out, _ in outs for t in json.loads(out))
    assert len(stamps) == 2 * calls
    most = max(sum(1 for t in stamps if start <= t < start + 1.0) for start in stamps)
    assert most <= rate + 1, most  # spaced as one fleet (+1 for a late wake on a busy host)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert max(gaps) < 1.5, max(gaps)  # nobody waits for a slot the step put in its future


# -- shared keys written by someone without the secret ------------------------------------------


def _limiter_keys(storage: LockedRedisTokenStorage) -> tuple[str, str]:
    token_key = storage._get_redis_key(APP_KEY)
    return f"{token_key}:rate", f"{token_key}:rate:slow"


@pytest.mark.parametrize("forged", ["far-ahead", "list", "nan", "garbage", "copied"])
def test_a_rate_key_not_written_by_a_holder_of_the_secret_is_ignored(
    redis_url: str, key_prefix: str, forged: str
) -> None:
    """The TAT set 95 s ahead with no TTL (before: no call for ~95 s, renewable), a list or "nan"
    (before: every call a TokenStorageError), garbage, or a value copied from another app key's
    limiter: ignored and overwritten, calls go on at once."""
    storage = LockedRedisTokenStorage(redis_url, key_prefix=key_prefix)
    client = storage.redis_client
    rate_key, _ = _limiter_keys(storage)
    seconds, micros = client.time()
    ahead_us = (seconds + 95) * 1_000_000 + micros
    if forged == "far-ahead":
        client.set(rate_key, str(ahead_us))
    elif forged == "list":
        client.rpush(rate_key, "x")
    elif forged == "nan":
        client.set(rate_key, "nan")
    elif forged == "garbage":
        client.set(rate_key, f"{ahead_us}:{'ab' * 20}", px=90_000)
    else:  # a genuine value, but another app key's (its MAC binds its own key name)
        other_key = storage._get_redis_key("PSotherAppKey0000000000000000000000")
        other = RedisRateLimiter(lambda: client, f"{other_key}:rate", 0.1, mac_key=b"k" * 32)
        other.try_acquire(0)
        other.try_acquire(100)  # its TAT 10 s ahead
        client.set(rate_key, client.get(f"{other_key}:rate"), px=20_000)
    limiter = storage.rate_limiter(APP_KEY, 5, api_secret=SECRET)
    assert limiter.try_acquire(0) == 0.0  # not kept out by the forged state
    assert limiter.acquire(2) < 1.0  # and the next slot is the next interval's
    assert client.type(rate_key) == b"string"
    assert 0 < client.pttl(rate_key) <= 1_001 + 1_000 * limiter.interval_s  # ours, expiring


def test_a_slowdown_flag_not_written_by_a_holder_of_the_secret_is_ignored(
    redis_url: str, key_prefix: str, token_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``:rate:slow=1`` with no TTL: before, 9.2/s for ever while ``status`` reported no
    slowdown. Now the limiter ignores and deletes it, and status says what the limiter does; a
    slowdown a holder of the secret started is honoured and reported."""
    storage = LockedRedisTokenStorage(redis_url, key_prefix=key_prefix)
    client = storage.redis_client
    _, slow_key = _limiter_keys(storage)
    client.set(slow_key, "1")  # no TTL
    limiter = storage.rate_limiter(APP_KEY, 10, api_secret=SECRET)
    assert limiter.slowdown_left_s() == 0.0
    assert not client.exists(slow_key)
    client.set(slow_key, "1")
    limiter.try_acquire(0)
    assert limiter.try_acquire(10) == pytest.approx(limiter.interval_s, abs=0.01)  # not doubled
    assert not client.exists(slow_key)
    assert limiter.penalize(5.0)  # a genuine slowdown: started here, reported, honoured
    assert 4.0 < limiter.slowdown_left_s() <= 5.0
    assert not limiter.penalize(5.0)  # already in force: extended, not started again
    client.persist(slow_key)  # a genuine value, its TTL removed: cut, never for ever
    assert limiter.slowdown_left_s() == 0.0 and not client.exists(slow_key)


@pytest.mark.parametrize("entry", ["token", "approval"])
def test_a_wrong_type_at_a_token_or_approval_entry_is_a_miss_then_replaced(
    redis_url: str, key_prefix: str, sim: KisSimulator, entry: str
) -> None:
    """A list at the token's or the approval key's entry (before: WRONGTYPE on every call)."""
    storage = LockedRedisTokenStorage(redis_url, key_prefix=key_prefix)
    client = storage.redis_client
    suffix = "" if entry == "token" else APPROVAL_SUFFIX
    key = storage._get_redis_key(APP_KEY + suffix)
    client.rpush(key, "not a token")
    client.hset(f"{key}:lock", "x", "y")
    client.rpush(f"{key}:failure", "z")
    shared = SharedToken(APP_KEY, SECRET, storage, base_url=sim.base_url)
    if entry == "token":
        assert shared.bearer.startswith("Bearer ")
        assert sim.issued == 1
    else:
        assert shared.approval_key in sim.approval_keys
        assert sim.counts["approvals_issued"] == 1
    assert client.type(key) == b"string"  # replaced by the sealed entry
