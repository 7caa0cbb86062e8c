"""The seed-protocol lease: single flight for clients that only call the seed's four methods.

A third-party client written against the seed (korea-investment-stock 0.19.0 and its kin) never
calls :meth:`~kis_safe_token.storage.TokenStorage.get_or_issue`: it asks
``check_token_valid``, and on ``False`` issues the token itself and calls ``save_token``. Started
by N processes at once, N of them see ``False``, N ask KIS, N-1 crash on ``EGW00133``. With the
lease on (``seed_lease=True``, off by default) ``check_token_valid`` answering ``False`` means
*you hold the issuance lease: issue and ``save_token``*; every other caller blocks in
``check_token_valid`` until that save and then gets ``True``.

What a prototype showed goes wrong, and what prevents it here:

- **A caller that checks and never issues** (a status display) must not block the fleet for as
  long as it lives, so the lease is a *record* with an owner and an expiry (``lease_ttl``), never
  a held lock; the file backend has no lock with a TTL, so its lease is an entry in the token
  document, written under the file lock held only for that write.
- **Re-entrant per thread**: the owner is one id per thread (fresh in a forked child), so the
  holder asking again gets ``False`` again (it still holds the lease) while another thread of
  the same process waits like any other process.
- **``load_token`` never grants**: it waits while someone else holds an active lease (so a
  reader right behind the holder gets its token), then answers what is stored.
- **A holder that issued and then failed or crashed before ``save_token``**: KIS counts its
  token, so whoever issues next within the minute gets ``EGW00133`` (and seed clients crash on
  it). Every grant and every save leaves a *quiet mark*: no new lease is granted until
  ``issue_window_s`` (KIS's window, :data:`~kis_safe_token.kis.ISSUE_WINDOW_S`) has passed since
  the last grant or save. The storage cannot tell a status display from a holder that crashed
  after KIS answered, so a lease that ends without a save keeps the fleet waiting at most
  ``max(lease_ttl, issue_window_s)`` from its grant, and never longer.
- **A lease shorter than an untimed upstream POST**: the quiet mark keeps the next grant away
  for the whole window, so only a POST longer than the window can meet a second holder. Then
  both tokens are valid at KIS and each save keeps the *newest*: a save whose token expires no
  later than the stored valid one is dropped (the caller still holds a valid token in memory).
  Unlike last-save-wins, a late save can never replace the fleet's token with an older one; unlike
  first-save-wins, the fleet converges on the token that lives longest, whatever order the saves
  land in.
- **Bounded waits**: ``delete_token`` by the holder releases its lease (the quiet mark stays). A
  waiter in ``check_token_valid`` that sees no token within the storage's ``wait_timeout`` gets a
  :class:`~kis_safe_token.errors.TokenStorageError` (as it does when the store is unreachable):
  answering ``False`` would send it to KIS into ``EGW00133``, answering ``True`` would hand the
  client no token. ``load_token`` keeps the seed's ``None``.

The backends supply the records (:class:`LeaseRecords`): :class:`FileLeaseRecords` (one JSON
entry beside the token, clocks of the one host) and :class:`RedisLeaseRecords` (two keys whose
Redis TTLs are the lease and the quiet mark, so hosts' clocks do not matter). A record holds an
owner id (host, pid, a random part) and times, nothing secret; one forged by someone who can
write the store blocks issuance for at most its declared ``lease_ttl`` (capped at an hour).

Scope: the four seed methods, and :meth:`get_or_issue` and its asyncio twin
(:class:`~kis_safe_token.storage.aio.AsyncStore`; this library's clients and integrations):
with the lease on, the caller about to issue under the storage's issuance lock also takes the
lease (or waits in it for a seed holder's save; a recorded active failure is raised instead of
waiting), and its save ends the lease and marks the window, so a fleet mixing seed clients with
ours on one store issues once. A ``save_token``
without the lease (a client's own refresh path) is kept-newest and moves the quiet mark too.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Final

from ..crypto import key_id
from ..errors import TokenStorageError
from ..token import Token
from .base import check_seconds, jittered

if TYPE_CHECKING:
    from .base import SealedTokenStorage
    from .file import FileTokenStorage
    from .redis import RedisTokenStorage

__all__ = [
    "LEASE_TTL_S",
    "FileLeaseRecords",
    "LeaseRecords",
    "LeaseState",
    "RedisLeaseRecords",
    "SeedLease",
    "new_seed_lease",
]

logger = logging.getLogger("kis_safe_token")

#: How long a lease lasts: the longest a holder that never saves (a status display) keeps the
#: lease. Short on purpose: the quiet mark, not the lease, protects a slow issuer.
LEASE_TTL_S: Final = 15.0
MAX_LEASE_TTL_S: Final = 3600.0
#: How often a waiter looks for the holder's token (a ``stat`` or a ``GET``), jittered.
LEASE_POLL_S: Final = 0.02
#: How often a waiter asks for the lease again before the holder's would end: a holder that
#: lets go early (``delete_token``) frees its waiters within this, not at its lease's end.
LEASE_RETRY_S: Final = 0.25
#: A file record stamped this far ahead of our clock was written before the clock stepped back:
#: it is ignored rather than allowed to block the fleet.
CLOCK_SKEW_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class LeaseState:
    """The answer to a grant attempt: ``granted``, else how long until it is worth trying again
    and whether another caller holds an active lease (as opposed to the quiet window)."""

    granted: bool
    retry_in_s: float = 0.0
    held: bool = False


class LeaseRecords(ABC):
    """The backend's half of the lease: atomic grant, release and save, per app key."""

    @abstractmethod
    def grant(self, api_key: str, owner: str, ttl_s: float, window_s: float) -> LeaseState:
        """Grant ``owner`` the lease unless another holds an active one or the quiet mark lives;
        ``owner`` already holding it is granted again (its expiry is not extended)."""

    @abstractmethod
    def held_by_other(self, api_key: str, owner: str) -> bool:
        """Whether someone other than ``owner`` holds an active lease."""

    @abstractmethod
    def release(self, api_key: str, owner: str) -> None:
        """End ``owner``'s lease if it still holds it (the quiet mark stays)."""

    @abstractmethod
    def save_newest(
        self,
        api_key: str,
        api_secret: str,
        token: Token,
        owner: str,
        window_s: float,
        deadline: float | None = None,
    ) -> bool:
        """Atomically: store ``token`` unless the stored one is valid and expires no earlier,
        set the quiet mark to now, end ``owner``'s lease. Returns whether ``token`` was stored.
        ``deadline``: until when a store that retries transient errors keeps trying."""


class SeedLease:
    """The lease protocol behind the four seed methods of a storage with ``seed_lease=True``."""

    def __init__(self, storage: SealedTokenStorage, ttl_s: float, window_s: float) -> None:
        self._storage = storage
        self.ttl_s = ttl_s
        self.window_s = window_s
        self._records_cache: LeaseRecords | None = None

    @property
    def _records(self) -> LeaseRecords:
        # Made on first use: the backend's own attributes do not exist yet in its __init__.
        if self._records_cache is None:
            self._records_cache = self._storage._lease_records()
        return self._records_cache

    def _stored(self, api_key: str, api_secret: str) -> Token | None:
        token = self._storage._read(api_key, api_secret)
        if token is not None and token.is_valid(self._storage.clock()):
            return token
        return None

    def try_grant(
        self, api_key: str, api_secret: str, owner: str | None = None
    ) -> bool | LeaseState:
        """One look, never waiting: ``True`` if a valid token is stored, ``False`` if ``owner``
        (default: this thread) now holds the lease, else the refusal (when to look again).

        The step both the blocking :meth:`wait_for_grant` and the asyncio side's loop take
        (``owner`` passed by the latter: its looks may run in worker threads).
        """
        if self._stored(api_key, api_secret) is not None:
            return True
        owner = thread_owner() if owner is None else owner
        state = self._records.grant(api_key, owner, self.ttl_s, self.window_s)
        return False if state.granted else state

    def stored_valid(self, api_key: str, api_secret: str) -> bool:
        """Whether a valid token is stored (a waiter's look between grant attempts)."""
        return self._stored(api_key, api_secret) is not None

    @staticmethod
    def retry_in_s(state: LeaseState) -> float:
        """How long a refused caller waits before asking for the lease again (looking for the
        holder's token meanwhile)."""
        return min(max(state.retry_in_s, LEASE_POLL_S), LEASE_RETRY_S)

    def timed_out(self, state: LeaseState) -> TokenStorageError:
        """The error of a waiter that saw no token within the storage's ``wait_timeout``."""
        what = "holder of the issuance lease" if state.held else "KIS issue window"
        return TokenStorageError(
            f"timed out after {self._storage.wait_timeout:.1f} s waiting for a token "
            f"(waiting on the {what})"
        )

    def check_token_valid(self, api_key: str, api_secret: str) -> bool:
        """``True`` once a valid token is stored; ``False``: the calling thread holds the lease.

        Raises :class:`TokenStorageError` if the store is unreachable or no token shows up within
        the storage's ``wait_timeout``.
        """
        return self.wait_for_grant(api_key, api_secret)

    def wait_for_grant(
        self, api_key: str, api_secret: str, on_look: Callable[[], None] | None = None
    ) -> bool:
        """:meth:`check_token_valid`, calling ``on_look`` before every look (it may raise: a
        caller of ``get_or_issue`` stops waiting when a failed issuance is recorded)."""
        deadline = time.monotonic() + self._storage.wait_timeout
        while True:
            if on_look is not None:
                on_look()
            step = self.try_grant(api_key, api_secret)
            if isinstance(step, bool):
                return step
            retry_at = time.monotonic() + self.retry_in_s(step)
            while (now := time.monotonic()) < retry_at:
                if now >= deadline:
                    raise self.timed_out(step)
                time.sleep(min(retry_at - now, deadline - now, jittered(LEASE_POLL_S)))
                if on_look is not None:
                    on_look()
                if self.stored_valid(api_key, api_secret):
                    return True

    def load_token(self, api_key: str, api_secret: str) -> Token | None:
        """The stored valid token; while another holds an active lease, wait for its save (up to
        ``wait_timeout``). Never grants. Raises :class:`TokenStorageError` if unreachable."""
        owner = thread_owner()
        deadline = time.monotonic() + self._storage.wait_timeout
        while True:
            token = self._stored(api_key, api_secret)
            if token is not None:
                return token
            if time.monotonic() >= deadline or not self._records.held_by_other(api_key, owner):
                # Looked once more: the holder's save may have landed (and ended its lease)
                # between the look above and this one.
                return self._stored(api_key, api_secret)
            time.sleep(jittered(LEASE_POLL_S))

    def save(
        self,
        api_key: str,
        api_secret: str,
        token: Token,
        owner: str | None = None,
        *,
        deadline: float | None = None,
    ) -> None:
        """Keep the newest token, mark the window, end ``owner``'s (default: this thread's)
        lease (retried until ``deadline`` where the store retries)."""
        owner = thread_owner() if owner is None else owner
        if not self._records.save_newest(
            api_key, api_secret, token, owner, self.window_s, deadline
        ):
            logger.info(
                "save_token: kept the stored token, which expires no earlier than the one being "
                "saved (both are valid at KIS)"
            )

    def released_by_delete(self, api_key: str, owner: str | None = None) -> None:
        """``delete_token`` by the holder ends its lease (``owner``: default this thread's)."""
        self._records.release(api_key, thread_owner() if owner is None else owner)


def new_seed_lease(
    storage: SealedTokenStorage, lease_ttl: float | None, issue_window_s: float
) -> SeedLease:
    """The lease of ``storage``; ``ValueError`` naming the argument if a timing is unusable."""
    ttl = LEASE_TTL_S if lease_ttl is None else lease_ttl
    ttl = check_seconds("lease_ttl", ttl, high=MAX_LEASE_TTL_S)
    window = 0.0 if issue_window_s == 0 else issue_window_s
    if window:
        window = check_seconds("issue_window_s", window, high=MAX_LEASE_TTL_S)
    if storage.wait_timeout <= max(ttl, window):
        raise ValueError(
            f"wait_timeout ({storage.wait_timeout:.1f} s) must exceed lease_ttl ({ttl:.1f} s) "
            f"and issue_window_s ({window:.1f} s), or a waiter gives up before the next holder "
            "may issue"
        )
    return SeedLease(storage, ttl, window)


# -- owners: one per thread, new in a forked child -----------------------------------------------
_owners = threading.local()
_process_tag = f"{socket.gethostname()}:{os.getpid()}"


def thread_owner() -> str:
    """This thread's lease owner id (host, pid, a random part): re-entrant for this thread only.

    A random part, not the thread ident: idents are reused once a thread ends, and a new thread
    must not inherit a dead one's lease.
    """
    owner: str | None = getattr(_owners, "id", None)
    if owner is None:
        owner = _owners.id = f"{_process_tag}:{uuid.uuid4().hex[:16]}"
    return owner


def _fresh_owners() -> None:
    """In a forked child: the forking thread's id is its parent's, and so would be its lease."""
    global _owners, _process_tag
    _owners = threading.local()
    _process_tag = f"{socket.gethostname()}:{os.getpid()}"


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_owners)


# -- file backend ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _FileLease:
    """The lease entry of one app key in the token document (plain JSON: nothing secret)."""

    owner: str | None
    at: float  # grant time (epoch s)
    ttl: float
    mark: float  # last grant or save (epoch s)
    window: float

    def active(self, now: float) -> bool:
        return self.owner is not None and self.at - CLOCK_SKEW_S <= now < self.at + self.ttl

    def quiet(self, now: float) -> bool:
        return self.mark - CLOCK_SKEW_S <= now < self.mark + self.window

    def dumps(self) -> str:
        body = {"owner": self.owner, "at": self.at, "ttl": self.ttl}
        body.update(mark=self.mark, window=self.window)
        return json.dumps(body, separators=(",", ":"))

    @classmethod
    def loads(cls, raw: str | None) -> _FileLease | None:
        """The record, or ``None`` if missing or malformed (a miss, like any unreadable entry)."""
        if not raw:
            return None
        try:
            body: Any = json.loads(raw)
            owner = body["owner"]
            numbers = [float(body[k]) for k in ("at", "ttl", "mark", "window")]
        except (ValueError, TypeError, KeyError):
            return None
        if owner is not None and not isinstance(owner, str):
            return None
        at, ttl, mark, window = numbers
        if not 0 <= ttl <= MAX_LEASE_TTL_S or not 0 <= window <= MAX_LEASE_TTL_S:
            return None
        return cls(owner, at, ttl, mark, window)


def _decide(lease: _FileLease | None, owner: str, now: float) -> LeaseState:
    if lease is not None and lease.active(now):
        if lease.owner == owner:
            return LeaseState(True)
        return LeaseState(False, lease.at + lease.ttl - now, held=True)
    if lease is not None and lease.quiet(now):
        return LeaseState(False, lease.mark + lease.window - now)
    return LeaseState(True)


class FileLeaseRecords(LeaseRecords):
    """The lease as an entry ``<key id>:lease`` of the token document, read without the lock and
    changed under it (held only for that read-modify-write, never across the holder's issue)."""

    def __init__(self, storage: FileTokenStorage) -> None:
        self._storage = storage

    def _peek(self, api_key: str) -> _FileLease | None:
        storage = self._storage
        sig = storage._signature()
        return None if sig is None else _FileLease.loads(storage._entries(sig).get(_id(api_key)))

    def grant(self, api_key: str, owner: str, ttl_s: float, window_s: float) -> LeaseState:
        storage = self._storage
        peek, now = self._peek(api_key), storage.clock()
        state = _decide(peek, owner, now)
        if not state.granted or peek is not None and peek.active(now):
            return state  # refused without taking the file lock, or ours already
        decided = [state]

        def take(entries: dict[str, str]) -> bool:
            now = storage.clock()
            lease = _FileLease.loads(entries.get(_id(api_key)))
            decided[0] = _decide(lease, owner, now)
            if not decided[0].granted or lease is not None and lease.active(now):
                return False  # refused, or ours already
            entries[_id(api_key)] = _FileLease(owner, now, ttl_s, now, window_s).dumps()
            return True

        storage._update(take)
        return decided[0]

    def held_by_other(self, api_key: str, owner: str) -> bool:
        lease = self._peek(api_key)
        return lease is not None and lease.active(self._storage.clock()) and lease.owner != owner

    def release(self, api_key: str, owner: str) -> None:
        peek = self._peek(api_key)
        if peek is None or peek.owner != owner:
            return

        def drop(entries: dict[str, str]) -> bool:
            lease = _FileLease.loads(entries.get(_id(api_key)))
            if lease is None or lease.owner != owner:
                return False
            ended = _FileLease(None, lease.at, 0.0, lease.mark, lease.window)
            entries[_id(api_key)] = ended.dumps()
            return True

        self._storage._update(drop)

    def save_newest(
        self,
        api_key: str,
        api_secret: str,
        token: Token,
        owner: str,
        window_s: float,
        deadline: float | None = None,
    ) -> bool:
        from .file import _failure_id

        storage = self._storage
        sealer = storage._sealer(api_key, api_secret)
        sealed = sealer.seal(token).decode()
        written = [False]

        def put(entries: dict[str, str]) -> bool:
            now = storage.clock()
            if _replaces(token, sealer.open(entries.get(key_id(api_key))), now):
                entries[key_id(api_key)] = sealed
                entries.pop(_failure_id(api_key), None)
                written[0] = True
            lease = _FileLease.loads(entries.get(_id(api_key)))
            mine = lease is not None and lease.owner == owner
            if lease is None or mine or not lease.active(now):
                lease = _FileLease(None, now, 0.0, now, window_s)
            else:  # another holder's active lease stays; only the mark moves
                lease = _FileLease(lease.owner, lease.at, lease.ttl, now, window_s)
            entries[_id(api_key)] = lease.dumps()
            return True

        storage._update(put)
        return written[0]


def _id(api_key: str) -> str:
    return key_id(api_key) + ":lease"


def _replaces(token: Token, stored: Token | None, now: float) -> bool:
    """Keep-the-newest: ``token`` replaces ``stored`` unless that is valid and expires no
    earlier (both backends' ``save_newest``)."""
    return stored is None or not stored.is_valid(now) or stored.expires_at < token.expires_at


# -- Redis backend ---------------------------------------------------------------------------------
GRANT_LUA = """
-- KEYS[1] lease (value: owner id ending in ':<its lease ttl in ms>', PX lease ttl),
-- KEYS[2] quiet mark (PX window: no grant while it lives).
-- ARGV[1] owner with its ttl, ARGV[2] lease ttl ms, ARGV[3] window ms, ARGV[4] the longest ttl
-- in ms allowed, ARGV[5] the owner (the thread), whatever ttl it declared.
-- Returns {granted 1/0, ms until worth trying again, 1 if another holds the lease}.
local holder = redis.call('get', KEYS[1])
if holder and (string.gsub(holder, ':%d+$', '')) == ARGV[5] then return {1, 0, 0} end
if holder then
  -- A lease longer than its holder declared (a stray SET, no TTL) is cut to our ttl.
  local declared = tonumber(string.match(holder, ':(%d+)$'))
  if declared == nil or declared > tonumber(ARGV[4]) then declared = tonumber(ARGV[2]) end
  local left = redis.call('pttl', KEYS[1])
  if left == -1 or left > declared then
    redis.call('pexpire', KEYS[1], ARGV[2])
    left = tonumber(ARGV[2])
  end
  return {0, left, 1}
end
local quiet = redis.call('pttl', KEYS[2])
if quiet == -1 or quiet > tonumber(ARGV[4]) then
  redis.call('pexpire', KEYS[2], ARGV[3])
  quiet = tonumber(ARGV[3])
end
if quiet > 0 then return {0, quiet, 0} end
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
if tonumber(ARGV[3]) > 0 then redis.call('set', KEYS[2], ARGV[1], 'PX', ARGV[3]) end
return {1, 0, 0}
"""

RELEASE_LEASE_LUA = """
-- KEYS[1] lease; ARGV[1] owner: delete the lease only if this owner still holds it.
local holder = redis.call('get', KEYS[1])
if holder and (string.gsub(holder, ':%d+$', '')) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""

SAVE_NEWEST_LUA = """
-- KEYS[1] token, KEYS[2] failure record, KEYS[3] lease, KEYS[4] quiet mark.
-- ARGV[1] the sealed token the caller read ('' = none), ARGV[2] the sealed token to store
-- ('' = keep the stored one), ARGV[3] its ttl ms, ARGV[4] owner, ARGV[5] window ms.
-- Returns 1 stored, 0 kept, -1 the token changed since the caller read it (read and decide again).
local current = redis.call('get', KEYS[1]) or ''
-- Our own sealed value already there: a retry whose first run's reply was lost; go on.
if current ~= ARGV[1] and (ARGV[2] == '' or current ~= ARGV[2]) then return -1 end
if tonumber(ARGV[5]) > 0 then redis.call('set', KEYS[4], ARGV[4], 'PX', ARGV[5]) end
local holder = redis.call('get', KEYS[3])
if holder and (string.gsub(holder, ':%d+$', '')) == ARGV[4] then redis.call('del', KEYS[3]) end
if ARGV[2] == '' then return 0 end
redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('del', KEYS[2])
return 1
"""


class RedisLeaseRecords(LeaseRecords):
    """The lease as ``<token key>:lease`` (owner id ending in ``:<its lease_ttl in ms>``, so a
    waiter honours a holder's longer lease and cuts a stray one; PX ``lease_ttl``; re-entrant for
    the thread whatever ttl it declared) and the quiet mark as
    ``<token key>:lease:quiet`` (PX window): Redis expires both, so no host's clock is read.
    Same hash tag as the token, so all live on one Cluster slot."""

    def __init__(self, storage: RedisTokenStorage) -> None:
        self._storage = storage

    def _keys(self, api_key: str) -> tuple[str, str]:
        token_key = self._storage._get_redis_key(api_key)
        return f"{token_key}:lease", f"{token_key}:lease:quiet"

    @staticmethod
    def _owner(owner: str, ttl_s: float) -> str:
        return f"{owner}:{round(ttl_s * 1000)}"

    def grant(self, api_key: str, owner: str, ttl_s: float, window_s: float) -> LeaseState:
        storage = self._storage
        script = storage._script(GRANT_LUA)
        args = [self._owner(owner, ttl_s), round(ttl_s * 1000), round(window_s * 1000)]
        args += [round(MAX_LEASE_TTL_S * 1000), owner]
        granted, left_ms, held = storage._call(
            "lease", lambda: script(keys=list(self._keys(api_key)), args=args)
        )
        return LeaseState(bool(granted), max(0, int(left_ms)) / 1000, bool(held))

    def held_by_other(self, api_key: str, owner: str) -> bool:
        lease_key = self._keys(api_key)[0]
        holder = self._storage._call("GET", lambda: self._storage.redis_client.get(lease_key))
        if holder is None:
            return False
        text = holder.decode() if isinstance(holder, bytes) else str(holder)
        return text.rsplit(":", 1)[0] != owner  # the holder's id ends in ':<its ttl ms>'

    def release(self, api_key: str, owner: str) -> None:
        storage = self._storage
        script = storage._script(RELEASE_LEASE_LUA)
        lease_key = self._keys(api_key)[0]
        args = [owner]
        storage._call("lease release", lambda: script(keys=[lease_key], args=args))

    def save_newest(
        self,
        api_key: str,
        api_secret: str,
        token: Token,
        owner: str,
        window_s: float,
        deadline: float | None = None,
    ) -> bool:
        storage = self._storage
        client = storage.redis_client
        sealer = storage._sealer(api_key, api_secret)
        token_key = storage._get_redis_key(api_key)
        keys = [token_key, f"{token_key}:failure", *self._keys(api_key)]
        script = storage._script(SAVE_NEWEST_LUA)
        sealed = sealer.seal(token)
        for _ in range(8):  # another save between our GET and the script: decide again
            raw = storage._call("GET", lambda: client.get(token_key), deadline)
            now = storage.clock()
            newer = _replaces(token, sealer.open(raw), now)
            ttl_ms = int((token.expires_at - now) * 1000)
            if newer and ttl_ms <= 0:
                raise TokenStorageError(
                    "refusing to save a token this host's clock sees as expired"
                )
            args = [raw or "", sealed if newer else "", max(ttl_ms, 1)]
            args += [owner, round(window_s * 1000)]
            done = storage._call("SET", partial(script, keys=keys, args=args), deadline)
            if int(done) >= 0:
                return bool(done)
        raise TokenStorageError("the stored token kept changing while saving; try again")
