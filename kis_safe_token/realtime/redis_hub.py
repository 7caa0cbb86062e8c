"""The fleet across hosts: its realtime leader is elected in Redis, and everyone meets there.

Keys beside the app key's token key ``<prefix>:{<key id>}`` (one Cluster hash tag):

- ``…:rt:leader`` the lease: ``SET NX PX`` with this process's id, renewed by the leader with a
  compare-and-``PEXPIRE`` every :data:`RENEW_S`; ``…:rt:fence`` counts leaders (``INCR`` on
  winning). A leader that cannot renew (paused past the TTL, cut off) closes its KIS session;
  every line it published carries its fence, and subscribers drop lines of an older fence, so
  a paused leader that wakes up is never heard beside the new one.
- ``…:rt:wants`` a hash: process id → its pairs and the time they expire; each process
  rewrites its field every :data:`HEARTBEAT_S` (and on a change, with a ``W`` on the channel),
  so a dead process's wants end :data:`WANTS_TTL_S` later.
- ``…:rt:ev`` the channel: ``<fence>\\t`` + the lines of :mod:`.local` (``A``, ``D``, ``G``);
  a frame of a tr_id KIS encrypts (execution notices) goes as ``S`` + its ``D`` line sealed
  with Fernet under a key derived from the api_secret: never in clear in Redis.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cryptography.fernet import Fernet, InvalidToken

from ..errors import TokenStorageError
from .leader import GAP_LINE, OK, Leader, Pair, answer_line, frame_line, heard

if TYPE_CHECKING:
    from ..storage.redis import RedisTokenStorage
    from .client import KisRealtime

__all__ = ["RedisHub", "Wants", "serve"]

logger = logging.getLogger("kis_safe_token.realtime")

#: Execution notices (real, virtual): KIS encrypts them, and their tr_key is the HTS id.
ACCOUNT_TR_IDS = frozenset({"H0STCNI0", "H0STCNI9"})
LEASE_TTL_S = 3.0
RENEW_S = 0.5
HEARTBEAT_S = 1.0
WANTS_TTL_S = 5.0

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RESIGN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisHub:
    """Where the processes sharing a Redis storage meet for ``api_key``'s session."""

    def __init__(self, storage: RedisTokenStorage, base_key: str, fernet: Fernet) -> None:
        self.storage = storage
        self.fernet = fernet  # seals the wants and the lines that name an encrypted tr_id
        self.node = uuid.uuid4().hex
        self.lease_key = f"{base_key}:rt:leader"
        self.fence_key = f"{base_key}:rt:fence"
        self.wants_key = f"{base_key}:rt:wants"
        self.channel = f"{base_key}:rt:ev"

    def __repr__(self) -> str:
        return f"RedisHub({self.storage!r}, {self.channel!r})"

    def _redis(self, what: str, command: Callable[[Any], Any]) -> Any:
        """``command(client)`` through the storage's retries (``TokenStorageError`` at last)."""
        client = self.storage.redis_client
        return self.storage._call(what, lambda: command(client))

    # -- the lease -----------------------------------------------------------------------------
    def try_lead(self) -> int | None:
        """This process's fence if it won the lease, else ``None``."""
        ttl_ms = int(LEASE_TTL_S * 1000)
        won = self._redis(
            "realtime lease", lambda r: r.set(self.lease_key, self.node, nx=True, px=ttl_ms)
        )
        if not won:
            return None
        return int(self._redis("realtime fence", lambda r: r.incr(self.fence_key)))

    def renew(self) -> bool:
        args = [self.node, int(LEASE_TTL_S * 1000)]
        return bool(self.storage._eval("realtime lease", _RENEW, [self.lease_key], args))

    def resign(self) -> None:
        self.storage._eval("realtime lease", _RESIGN, [self.lease_key], [self.node])

    # -- wants ---------------------------------------------------------------------------------
    def put_wants(self, pairs: set[Pair], *, changed: bool) -> None:
        plain = json.dumps({"pairs": sorted(pairs), "until": time.time() + WANTS_TTL_S})
        value = self.fernet.encrypt(plain.encode())  # pairs name accounts (H0STCNI0's HTS id)
        self._redis("realtime wants", lambda r: r.hset(self.wants_key, self.node, value))
        if changed:
            self._redis("realtime wants", lambda r: r.publish(self.channel, "0\tW"))

    def drop_wants(self) -> None:
        self._redis("realtime wants", lambda r: r.hdel(self.wants_key, self.node))

    def read_wants(self) -> dict[str, set[Pair]]:
        """Every live process's wants; expired ones are removed."""
        raw = self._redis("realtime wants", lambda r: r.hgetall(self.wants_key))
        now, wants, expired = time.time(), {}, []
        for node, value in raw.items():
            try:
                entry = json.loads(self.fernet.decrypt(value))
                until, pairs = float(entry["until"]), {(str(a), str(b)) for a, b in entry["pairs"]}
            except InvalidToken:
                continue  # sealed with another api_secret: not this fleet's to judge
            except (ValueError, KeyError, TypeError):
                until, pairs = 0.0, set()
            if until < now:
                expired.append(node)
            else:
                wants[node.decode() if isinstance(node, bytes) else str(node)] = pairs
        if expired:
            self._redis("realtime wants", lambda r: r.hdel(self.wants_key, *expired))
        return wants

    # -- the channel ---------------------------------------------------------------------------
    def publish(self, fence: int, line: str) -> None:
        self._redis("realtime publish", lambda r: r.publish(self.channel, f"{fence}\t{line}"))

    def pubsub(self) -> Any:
        pubsub = self.storage.redis_client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self.channel)
        except BaseException:
            pubsub.close()  # its connection back to the pool
            raise
        return pubsub


class _Remote:
    """The leader's holder for one process of the fleet: its lines go to the channel."""

    def __init__(self, publisher: _Publisher, node: str) -> None:
        self.route = publisher
        self.node = node

    def answer(self, pair: Pair, code: str, message: str) -> None:
        self.route.answer(pair, code, message)

    def frame(self, received_at: float, text: str, events: list[Any]) -> None:
        self.route.line(frame_line(received_at, text), tr_id=events[0].tr_id)

    def gap(self) -> None:
        self.route.line(GAP_LINE)


class _Publisher:
    def __init__(self, hub: RedisHub, fence: int, leader: Leader) -> None:
        self.hub, self.fence, self.leader = hub, fence, leader

    def answer(self, pair: Pair, code: str, message: str) -> None:
        self.line(answer_line(pair, code, message), tr_id=pair[0])

    def line(self, line: str, *, tr_id: str = "") -> None:
        """Publish ``line``, sealed if it is of a tr_id KIS encrypts or that names an account."""
        if tr_id in ACCOUNT_TR_IDS or self.leader.encrypted(tr_id):
            line = "S\t" + self.hub.fernet.encrypt(line.encode()).decode()
        try:
            self.hub.publish(self.fence, line)
        except TokenStorageError as exc:
            logger.warning("KisRealtime: cannot publish (%s)", exc)


def serve(node: KisRealtime, hub: RedisHub) -> None:
    """Run ``node`` on ``hub`` until it closes: listen on the channel, keep its wants alive,
    and lead whenever the lease is free."""
    wants = Wants(hub)
    threads = [
        threading.Thread(target=_listen, args=(node, hub, wants), daemon=True),
        threading.Thread(target=_elect, args=(node, hub), daemon=True),
    ]
    for thread in threads:
        thread.start()
    while not node._closed.wait(HEARTBEAT_S):
        wants.beat()
    for thread in threads:
        thread.join(10)
    with contextlib.suppress(TokenStorageError):  # its heartbeat lapses anyway
        hub.drop_wants()


class Wants:
    """This process's wants in the hash: the node's upstream while the channel is heard."""

    def __init__(self, hub: RedisHub) -> None:
        self.hub = hub
        self.pairs: set[Pair] = set()
        self.lock = threading.Lock()

    def want(self, pair: Pair, on: bool) -> None:
        with self.lock:
            (self.pairs.add if on else self.pairs.discard)(pair)
            pairs = set(self.pairs)
        self._put(pairs, changed=True)

    def replace(self, pairs: set[Pair]) -> None:
        """Exactly ``pairs`` (on a new channel: what was let go meanwhile is dropped too)."""
        with self.lock:
            self.pairs = set(pairs)
        self._put(pairs, changed=True)

    def beat(self) -> None:
        with self.lock:
            pairs = set(self.pairs)
        self._put(pairs, changed=False)

    def _put(self, pairs: set[Pair], *, changed: bool) -> None:
        try:
            self.hub.put_wants(pairs, changed=changed)
        except TokenStorageError as exc:
            logger.warning("KisRealtime: cannot write wants (%s)", exc)

    def close(self) -> None:
        """As :class:`~.leader.Link`: nothing to close (the node's thread ends the beats)."""


def _listen(node: KisRealtime, hub: RedisHub, wants: Wants) -> None:
    fence = 0
    while not node._closed.is_set():
        try:
            pubsub = hub.pubsub()
        except Exception as exc:  # noqa: BLE001 - redis-py's errors: retried
            logger.warning("KisRealtime: cannot subscribe (%s)", type(exc).__name__)
            node._closed.wait(0.5)
            continue
        node.attach(wants)
        try:
            while not node._closed.is_set():
                message = pubsub.get_message(timeout=0.2)
                if message is None or message.get("type") != "message":
                    continue
                data = message["data"]
                text = data.decode() if isinstance(data, bytes) else str(data)
                stamp, _, line = text.partition("\t")
                line_fence = int(stamp) if stamp.isdigit() else -1
                if line_fence < 0 or 0 < line_fence < fence:
                    continue  # not ours, or a deposed leader's line
                fence = max(fence, line_fence)
                if line.startswith("S\t"):
                    line = _unseal(hub.fernet, line[2:])
                if heard(node, line) == "W":
                    node._wants_changed.set()
        except Exception as exc:  # noqa: BLE001 - a lost connection: subscribe again
            logger.warning("KisRealtime: the channel was lost (%s)", type(exc).__name__)
        finally:
            node.detach()
            with contextlib.suppress(Exception):  # the connection is gone already
                pubsub.close()


def _unseal(fernet: Fernet, sealed: str) -> str:
    try:
        return fernet.decrypt(sealed.encode()).decode()
    except InvalidToken:
        logger.warning("KisRealtime: a sealed line not ours (another api_secret?) was dropped")
        return ""


def _elect(node: KisRealtime, hub: RedisHub) -> None:
    while not node._closed.wait(RENEW_S):
        try:
            fence = hub.try_lead()
        except TokenStorageError as exc:
            logger.warning("KisRealtime: cannot reach the lease (%s)", exc)
            continue
        if fence is not None:
            _lead(node, hub, fence)


def _lead(node: KisRealtime, hub: RedisHub, fence: int) -> None:
    leader = Leader(node.ws_url, node._approval())
    publisher = _Publisher(hub, fence, leader)
    node.counts["elections_won"] += 1
    node.leading = leader
    logger.info("KisRealtime: leading for %r (fence %d)", hub, fence)
    session = threading.Thread(target=leader.run_session, name="kis-realtime-session")
    session.daemon = True
    session.start()
    remotes: dict[str, _Remote] = {}
    held: dict[str, set[Pair]] = {}
    publisher.line(GAP_LINE)  # the last leader's events may have stopped short of everyone
    try:
        woken = False
        while not node._closed.is_set():
            if not hub.renew():
                logger.warning("KisRealtime: the realtime lease was lost; closing the session")
                break
            wanted = hub.read_wants()
            for name in set(held) | set(wanted):
                remote = remotes.setdefault(name, _Remote(publisher, name))
                before, after = held.get(name, set()), wanted.get(name, set())
                for pair in after - before:
                    leader.want(remote, pair, True)
                for pair in before - after:
                    leader.want(remote, pair, False)
                held[name] = after
            if woken:  # a want may have gone and come back between two reads: answer again
                for pair in leader.registered():
                    publisher.answer(pair, OK, "SUBSCRIBE SUCCESS")
            woken = node._wants_changed.wait(RENEW_S)
            node._wants_changed.clear()
    except TokenStorageError as exc:
        logger.warning("KisRealtime: leading stopped (%s)", exc)
    finally:
        leader.stop()
        session.join(5)
        node.leading = None
        with contextlib.suppress(TokenStorageError):  # the lease expires anyway
            hub.resign()
