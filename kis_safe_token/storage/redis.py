"""Redis backends: ``RedisTokenStorage`` (seed-compatible) and ``LockedRedisTokenStorage``.

Key layout: docs/storages.md; a value is one Fernet token, never the token or secret in clear."""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, ClassVar
from urllib.parse import urlsplit

from .._fork import renew_after_fork
from ..crypto import key_id, state_key
from ..errors import TokenStorageError
from ..failure import IssueFailure
from ..flight.lock import HELD, Attempt, Busy, IssuanceLock, Seen, jittered
from ..ratelimit.redis import GET_LUA, RedisRateLimiter
from ..token import REFRESH_MARGIN_S, Token
from .base import SealedTokenStorage, check_seconds
from .lease import MAX_LEASE_TTL_S, LeaseRecords, LeaseState, replaces
from .redis_ha import _options, async_builder_of, check_host, no_retries
from .redis_retry import redis_retry, require_redis

# redis-py is imported where a client is built (require_redis): light imports for file users.

__all__ = [
    "DEFAULT_REDIS_URL",
    "LOCK_TTL_S",
    "LockedRedisTokenStorage",
    "RETRY_TIMEOUT_S",
    "RedisIssuanceLock",
    "RedisTokenStorage",
    "validate_redis_url",
]

logger = logging.getLogger("kis_safe_token")

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
REDIS_SCHEMES = ("redis", "rediss", "unix")
DEFAULT_KEY_PREFIX = "korea_investment:token"
CONNECT_TIMEOUT_S = 2.0
SOCKET_TIMEOUT_S = 5.0
LOCK_TTL_S = 30.0
#: How long one Redis operation retries transient errors when no caller deadline is longer:
#: enough for a restart; set ``retry_timeout_s`` above your failover time for Sentinel or Cluster.
RETRY_TIMEOUT_S = 3.0
POLL_INTERVAL_S = 0.25
WAKE_FANOUT = 64
WAKE_TTL_MS = 10_000

MIN_LOCK_TTL_S = 0.1
MAX_LOCK_TTL_S = 3600.0
MAX_LOCK_TTL_MS = int(MAX_LOCK_TTL_S * 1000)


def validate_redis_url(url: str, source: str = "redis_url") -> str:
    """``url`` if it is a usable ``redis://``, ``rediss://`` or ``unix://`` URL; else a
    ``ValueError`` naming ``source`` and the allowed forms, quoting nothing of the URL but its
    scheme (a password with a raw ``/``, ``?``, ``#`` or ``@`` leaks into host, path or query)."""
    allowed = "redis://[user:password@]host[:port][/db], rediss://… or unix:///path/to/socket"
    text = url.strip() if isinstance(url, str) else ""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(f"{source} is not a valid Redis URL; expected {allowed}") from None
    if parts.scheme not in REDIS_SCHEMES:
        written = parts.scheme and text.startswith(f"{parts.scheme}://")
        shown = f" {parts.scheme[:20]!r}" if written else ""
        raise ValueError(f"{source} has an unsupported scheme{shown}; expected {allowed}")
    if "@" in parts.path + parts.query + parts.fragment:
        raise ValueError(
            f"{source} has an '@' after its host: percent-encode '/', '?', '#' and '@' in a "
            f"password (or give the password separately); expected {allowed}"
        )
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"{source} names no socket path; expected {allowed}")
    elif not parts.hostname:
        raise ValueError(f"{source} names no host; expected {allowed}")
    else:
        check_host(parts.hostname, source)
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"{source} has a port out of range (1-65535); expected {allowed}")
    db = parts.path.lstrip("/")
    if parts.scheme != "unix" and db and not db.isdigit():
        raise ValueError(f"{source} has a database that is not a number; expected {allowed}")
    return text


def _display_url(url: str) -> str:
    """``url`` without what may hold a password (user info, query string, fragment)."""
    parts = urlsplit(url.strip())
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


def _describe_client(client: Any) -> str:
    """A name for an injected client, without secrets: its class, and a Sentinel service."""
    service = getattr(getattr(client, "connection_pool", None), "service_name", None)
    if isinstance(service, str):
        return f"sentinel service {service[:60]!r}"
    return type(client).__name__


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisTokenStorage(SealedTokenStorage):
    """Tokens in Redis, readable by every process on every host that has the secret.

    ``client``: an injected ``Redis``, ``RedisCluster`` or Sentinel master instead of
    ``redis_url`` (``password`` is a keyword, never spliced into the URL). Operations retry
    transient errors for ``retry_timeout_s`` (a waiter: its ``wait_timeout``), then raise
    :class:`TokenStorageError`. This class issues under an in-process lock only (the seed's);
    :class:`LockedRedisTokenStorage` adds the fleet-wide one (``lock_ttl``, ``poll_interval_s``).
    ``seed_lease``, ``lease_ttl``, ``issue_window_s``: :mod:`kis_safe_token.storage.lease`."""

    #: Whether issuance takes the fleet-wide :class:`RedisIssuanceLock`.
    fleet_lock: ClassVar[bool] = False

    def __init__(
        self,
        redis_url: str = DEFAULT_REDIS_URL,
        password: str | None = None,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        *,
        client: Any = None,
        lock_ttl: float = LOCK_TTL_S,
        wait_timeout: float | None = None,
        poll_interval_s: float = POLL_INTERVAL_S,
        encryption_keys: Sequence[bytes | str] = (),
        refresh_margin_s: float = REFRESH_MARGIN_S,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        socket_timeout_s: float = SOCKET_TIMEOUT_S,
        retry_timeout_s: float = RETRY_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
        seed_lease: bool = False,
        lease_ttl: float | None = None,
        issue_window_s: float | None = None,
    ) -> None:
        self.lock_ttl = check_seconds("lock_ttl", lock_ttl, low=MIN_LOCK_TTL_S, high=MAX_LOCK_TTL_S)
        self.retry_timeout_s = check_seconds("retry_timeout_s", retry_timeout_s, high=3600.0)
        # A BLPOP waits up to 1.5 x poll_interval_s: it must end before the socket timeout.
        self.poll_interval_s = check_seconds(
            "poll_interval_s", poll_interval_s, high=min(SOCKET_TIMEOUT_S, socket_timeout_s) / 2
        )
        super().__init__(
            encryption_keys=encryption_keys,
            refresh_margin_s=refresh_margin_s,
            wait_timeout=wait_timeout,
            clock=clock,
            seed_lease=seed_lease,
            lease_ttl=lease_ttl,
            issue_window_s=issue_window_s,
        )
        if not isinstance(key_prefix, str) or not key_prefix or "{" in key_prefix:
            raise ValueError("key_prefix must be a non-empty string without '{'")
        self.key_prefix = key_prefix
        self._connect: Callable[[], Any] | None = None
        if client is None:
            redis = require_redis()
            validate_redis_url(redis_url)
            options = _options(connect_timeout_s, socket_timeout_s, password)
            self._connect = partial(redis.from_url, redis_url, **options, retry=no_retries())
            self._async_connect: Callable[[], Any] | None = partial(
                _async_client, redis_url, options
            )
            client = self._connect()
            self._where = _display_url(redis_url)
        else:
            # A Sentinel or Cluster client of redis_ha carries its redis.asyncio twin's builder.
            self._async_connect = async_builder_of(client)
            self._where = _describe_client(client)
        self.redis_client = client
        self._scripts: dict[str, Any] = {}
        renew_after_fork(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._where!r}, key_prefix={self.key_prefix!r})"

    def _after_fork(self) -> None:
        # A built client is rebuilt in a forked child (a pool lock a parent's thread held at
        # fork() is never released); redis-py resets an injected client's pool itself.
        if self._connect is not None:
            self.redis_client = self._connect()
            self._scripts = {}

    def takeover_s(self) -> float:
        return self.lock_ttl if self.fleet_lock else 0.0

    def async_client(self) -> Any:
        """A new ``redis.asyncio`` client on this storage's server (or twin of a :mod:`.redis_ha`
        client), for the asyncio side. ``ValueError`` for any other injected ``client``."""
        if self._async_connect is None:
            raise ValueError(
                "this storage was built on an injected client: pass the matching "
                "redis.asyncio client as redis_client="
            )
        return self._async_connect()

    def check_timing(self, *, http_timeout_s: float, issue_window_s: float | None = None) -> None:
        if self.fleet_lock and self.lock_ttl <= http_timeout_s:
            raise ValueError(
                f"lock_ttl of the token storage ({self.lock_ttl:.1f} s) must exceed the HTTP "
                f"timeout of the issue call ({http_timeout_s:.1f} s), or a slow KIS answer would "
                "let a second process issue while the first is still waiting"
            )
        super().check_timing(http_timeout_s=http_timeout_s, issue_window_s=issue_window_s)

    def issuance_lock(self, api_key: str, api_secret: str) -> IssuanceLock:
        """:class:`RedisIssuanceLock` if :attr:`fleet_lock`, else this process's; behind the seed
        lease, if on."""
        if self.fleet_lock:
            lock: IssuanceLock = RedisIssuanceLock(self, api_key, api_secret)
        else:
            lock = super().issuance_lock(api_key, api_secret)
        return self._leased(lock, api_key, api_secret)

    def rate_limiter(
        self, api_key: str, calls_per_second: float, *, api_secret: str | None = None
    ) -> RedisRateLimiter:
        """Fleet-wide, at ``<token key>:rate``; its state is authenticated with a key derived
        from ``api_secret`` (without one, only its form and expiry are checked)."""
        return RedisRateLimiter(
            lambda: self.redis_client,
            f"{self._get_redis_key(api_key)}:rate",
            calls_per_second,
            where=self._where,
            retry_timeout_s=self.retry_timeout_s,
            mac_key=b"" if api_secret is None else state_key(api_key, api_secret),
        )

    def _lease_records(self) -> RedisLeaseRecords:
        return RedisLeaseRecords(self)

    def fleet(self) -> dict[str, dict[str, Any]]:
        """Every key under ``key_prefix`` (a SCAN), with the token's and the lock's PTTL."""
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.key_prefix) + ":{*}*"
        client = self.redis_client
        names = self._call("SCAN", lambda: [str(_text(k)) for k in client.scan_iter(pattern, 500)])
        view: dict[str, dict[str, Any]] = {}
        for name in sorted(names):
            ident, _, kind = name[len(self.key_prefix) + 2 :].partition("}")
            records = view.setdefault(ident, {"records": []})["records"]
            kind = kind.lstrip(":").split(":")[0] or "token"  # lock:wake:... is the lock's
            if kind not in records:
                records.append(kind)
        for ident, info in view.items():
            token_key = f"{self.key_prefix}:{{{ident}}}"
            pttl = self._call("PTTL", partial(client.pttl, token_key))
            lock_pttl = self._call("PTTL", partial(client.pttl, f"{token_key}:lock"))
            info["token_ttl_s"] = pttl / 1000 if pttl > 0 else None
            info["lock_held"] = lock_pttl > 0
            info["lock_held_s"] = self.lock_ttl - lock_pttl / 1000 if lock_pttl > 0 else None
        return view

    def _get_redis_key(self, api_key: str) -> str:
        """The token key of an app key (the seed's name; braces make it a Cluster hash tag)."""
        return f"{self.key_prefix}:{{{key_id(api_key)}}}"

    def _call(self, what: str, fn: Callable[[], Any], deadline: float | None = None) -> Any:
        """``fn()`` retried until ``deadline`` (default: in ``retry_timeout_s``)."""
        if deadline is None:
            deadline = time.monotonic() + self.retry_timeout_s
        return redis_retry(fn, deadline=deadline, what=what, where=self._where)

    def _eval(
        self, what: str, lua: str, keys: list[str], args: list[Any], deadline: float | None = None
    ) -> Any:
        """A Lua script (registered once per client) through :meth:`_call`."""
        script = self._scripts.get(lua)
        if script is None:
            script = self._scripts[lua] = self.redis_client.register_script(lua)
        return self._call(what, partial(script, keys=keys, args=args), deadline)

    def _get(self, key: str, deadline: float | None = None) -> Any:
        """``GET key`` through :meth:`_call`; a key of another type reads as absent (a miss)."""

        def get() -> Any:
            try:
                return self.redis_client.get(key)
            except Exception as exc:
                if _wrong_type(exc):
                    return None
                raise

        return self._call("GET", get, deadline)

    # -- primitives ------------------------------------------------------------------------------
    def read_token(self, api_key: str, api_secret: str, *, fresh: bool = False) -> Token | None:
        raw = self._get(self._get_redis_key(api_key))
        return self._sealer(api_key, api_secret).open(raw)

    def write_token(
        self, api_key: str, api_secret: str, token: Token, deadline: float | None = None
    ) -> None:
        """Save ``token`` (TTL: its time left) and clear the failure record, retried until
        ``deadline``. A token this host's clock sees as expired is refused: a host whose clock
        runs fast must not wipe the fleet's good token."""
        ttl_ms = int((token.expires_at - self.clock()) * 1000)
        if ttl_ms <= 0:
            raise TokenStorageError(
                "refusing to save a token this host's clock sees as expired (is the clock right?)"
            )
        key = self._get_redis_key(api_key)
        sealed = self._sealer(api_key, api_secret).seal(token)

        def save() -> Any:  # a new pipeline per try: redis-py empties a failed one
            pipe = self.redis_client.pipeline(transaction=False)
            pipe.set(key, sealed, px=ttl_ms)
            pipe.delete(f"{key}:failure")
            return pipe.execute()

        self._call("SET", save, deadline)

    def read_failure(self, api_key: str, api_secret: str) -> IssueFailure | None:
        raw = self._get(f"{self._get_redis_key(api_key)}:failure")
        return self._sealer(api_key, api_secret).open_failure(raw)

    def write_failure(self, api_key: str, api_secret: str, failure: IssueFailure) -> None:
        key = f"{self._get_redis_key(api_key)}:failure"
        sealed = self._sealer(api_key, api_secret).seal_failure(failure)
        ttl_ms = int(failure.ttl_s * 1000)
        self._call("SET", lambda: self.redis_client.set(key, sealed, px=ttl_ms))

    def _delete(self, api_key: str) -> None:
        self._call("DEL", lambda: self.redis_client.delete(self._get_redis_key(api_key)))

    def invalidate_token(self, api_key: str, api_secret: str, access_token: str) -> bool:
        key = self._get_redis_key(api_key)
        raw = self._get(key)
        token = self._sealer(api_key, api_secret).open(raw)
        if token is None or token.access_token != access_token:
            return False
        # Delete only the value we decrypted: a token saved since our GET must survive.
        return bool(self._eval("compare-and-delete", COMPARE_AND_DELETE_LUA, [key], [raw]))


def _wrong_type(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis's WRONGTYPE reply."""
    from redis.exceptions import ResponseError

    return isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE")


def _absent_if_wrong_type(replies: list[Any]) -> list[Any]:
    """A pipeline's replies (``raise_on_error=False``), WRONGTYPE as absent, other errors raised."""
    for reply in replies:
        if isinstance(reply, Exception) and not _wrong_type(reply):
            raise reply
    return [None if isinstance(r, Exception) else r for r in replies]


def _async_client(redis_url: str, options: dict[str, Any]) -> Any:
    import redis.asyncio

    return redis.asyncio.from_url(redis_url, **options, retry=no_retries(asyncio=True))


def _lua(body: str) -> str:
    """:data:`GET_LUA`, then ``body``: every script reads its keys through ``get``."""
    return GET_LUA + body


COMPARE_AND_DELETE_LUA = _lua("""
if get(KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
""")

ACQUIRE_LUA = _lua("""
-- KEYS[1] lock, KEYS[2] token, KEYS[3] failure record; ARGV[1] owner id, ARGV[2] lock_ttl in ms,
-- ARGV[3] the longest lock_ttl in ms this library allows.
-- Returns {acquired (1/0), holder or false, sealed token or false, sealed failure or false}.
local ttl = tonumber(ARGV[2])
local holder = get(KEYS[1])
if not holder then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ttl)
  return {1, ARGV[1], false, false}
end
if holder == ARGV[1] then
  -- Our own SET went through but its reply was lost (a retry): we hold it.
  return {1, holder, false, false}
end
-- An owner id ends with its holder's lock_ttl in ms (capped by ARGV[3]): a lock with no expiry
-- or longer than declared (a stray SET, a forged value) is cut to our lock_ttl; a live holder
-- with a longer lock_ttl than ours is left alone.
local declared = tonumber(string.match(holder, ':(%d+)$'))
if declared == nil or declared > tonumber(ARGV[3]) then declared = ttl end
local left = redis.call('pttl', KEYS[1])
if left == -1 or left > declared then
  redis.call('pexpire', KEYS[1], ttl)
end
return {0, holder, get(KEYS[2]) or false, get(KEYS[3]) or false}
""")

RELEASE_LUA = _lua("""
-- Wake this holder's waiters, then delete the lock only if still ours: a holder whose lock
-- expired must never free its successor's lock.
for i = 1, tonumber(ARGV[2]) do redis.call('rpush', KEYS[2], '1') end
redis.call('pexpire', KEYS[2], ARGV[3])
if get(KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
""")

EXTEND_LUA = _lua("""
if get(KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
""")


class LockedRedisTokenStorage(RedisTokenStorage):
    """:class:`RedisTokenStorage` with a fleet-wide issuance lock (:class:`RedisIssuanceLock`):
    one process issues, the rest wait and reload. ``lock_ttl`` must exceed the HTTP timeout of
    the issue call; a wait ends in :class:`TokenStorageError` after ``wait_timeout``."""

    fleet_lock = True


class RedisIssuanceLock(IssuanceLock):
    """``SET <key>:lock <owner> NX PX lock_ttl`` (Lua scripts on the owner id: docs/design.md).

    Waiters ``BLPOP`` the holder's wake-up list, filled once the token is saved (each passes
    one wake-up on); the ``BLPOP`` timeout, ``poll_interval_s`` jittered, notices a dead holder."""

    def __init__(self, storage: RedisTokenStorage, api_key: str, api_secret: str) -> None:
        self._storage = storage
        self._sealer = storage._sealer(api_key, api_secret)
        self._token_key = storage._get_redis_key(api_key)
        self._lock_key = f"{self._token_key}:lock"
        self._failure_key = f"{self._token_key}:failure"
        self._ttl_ms = math.ceil(storage.lock_ttl * 1000)
        self._deadline = time.monotonic() + storage.wait_timeout
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(16).hex()}:{self._ttl_ms}"
        self._held = False
        self._spurious: str | None = None  # a wake-up list that woke us without a token

    def _wake_key(self, owner: str | None) -> str:
        return f"{self._lock_key}:wake:{owner}"

    def attempt(self) -> Attempt:
        """One round trip: the lock, or the token and failure record a waiter decides on."""
        storage = self._storage
        keys = [self._lock_key, self._token_key, self._failure_key]
        args = [self._owner, self._ttl_ms, MAX_LOCK_TTL_MS]
        # Retried until this waiter's own deadline (it was ready to wait that long); retried
        # after a lost reply, the script finds its own owner id: the lock is ours.
        acquired, holder, raw, raw_failure = storage._eval(
            "lock", ACQUIRE_LUA, keys, args, self._deadline
        )
        if acquired:
            self._held = True
            return HELD
        seen = self._seen(raw, raw_failure)
        if seen is not None:
            return seen
        holder_id = _text(holder) or ""
        process = holder_id.rsplit(":", 2)[0] if holder_id.count(":") >= 3 else "another process"
        wake = self._wake_key(_text(holder))
        return Busy(
            jittered(storage.poll_interval_s),
            f"the issuance lock, held by {process} (host:pid)",
            # A list that woke us without a token (someone filled it by hand): do not spin on it.
            wake=None if wake == self._spurious else wake,
        )

    def wait(self, busy: Busy, timeout_s: float) -> Seen | None:
        """``BLPOP`` on the holder's wake-up list; woken, pass one wake-up on and read the token
        and failure record in one round trip (not race the other waiters for the lock)."""
        if busy.wake is None:
            return super().wait(busy, timeout_s)
        storage, client, wake_key = self._storage, self._storage.redis_client, busy.wake
        popped = storage._call(
            "BLPOP", partial(client.blpop, [wake_key], timeout=timeout_s), self._deadline
        )
        if not popped:
            return None

        def pass_on_and_read() -> Any:  # a new pipeline per try: redis-py empties a failed one
            pipe = client.pipeline(transaction=False)
            pipe.lpush(wake_key, "1")
            pipe.pexpire(wake_key, WAKE_TTL_MS)  # the push may re-create an expired list
            pipe.get(self._token_key)
            pipe.get(self._failure_key)
            return _absent_if_wrong_type(pipe.execute(raise_on_error=False))

        _, _, raw, raw_failure = storage._call("GET", pass_on_and_read, self._deadline)
        seen = self._seen(raw, raw_failure)
        if seen is None:
            self._spurious = wake_key
        return seen

    def _seen(self, raw: Any, raw_failure: Any) -> Seen | None:
        """A usable token or an active failure among what a round trip read, if any."""
        storage = self._storage
        token = self._sealer.open(raw)
        if storage.usable(token):
            return token
        failure = self._sealer.open_failure(raw_failure)
        if failure is not None and failure.active(storage.clock()):
            return failure
        return None

    def extend(self) -> None:
        """Keep the lock, retried until :meth:`save_deadline` (right before saving KIS's token: a
        failover delays the save instead of losing the token)."""
        storage = self._storage
        args = [self._owner, self._ttl_ms]
        if not storage._eval("PEXPIRE", EXTEND_LUA, [self._lock_key], args, self.save_deadline()):
            logger.warning(
                "the issuance lock was lost while held (lock_ttl %.1f s too short, or a Redis "
                "failover before it was replicated?); saving the token anyway",
                storage.lock_ttl,
            )

    def save_deadline(self) -> float:
        """This holder's deadline, at least ``retry_timeout_s`` from now."""
        return max(self._deadline, time.monotonic() + self._storage.retry_timeout_s)

    def release(self) -> None:
        """Wake this holder's waiters and delete the lock if still ours (a no-op if not held)."""
        if not self._held:
            return
        self._held = False
        storage = self._storage
        keys = [self._lock_key, self._wake_key(self._owner)]
        args = [self._owner, WAKE_FANOUT, WAKE_TTL_MS]
        # Retried no longer than the lock would live: past that, it has expired by itself.
        deadline = time.monotonic() + min(storage.retry_timeout_s, storage.lock_ttl)
        try:
            storage._eval("release", RELEASE_LUA, keys, args, deadline)
        except TokenStorageError as exc:
            logger.warning(
                "could not release the issuance lock (it expires by itself in %.0f s): %s",
                storage.lock_ttl,
                exc,
            )


# -- the seed-protocol lease -----------------------------------------------------------------------
GRANT_LUA = _lua("""
-- KEYS[1] lease (owner id ending in ':<its ttl ms>'), KEYS[2] quiet mark (no grant while it lives).
-- ARGV[1] owner with its ttl, ARGV[2] lease ttl ms, ARGV[3] window ms, ARGV[4] the longest ttl
-- ms allowed, ARGV[5] the owner (the thread) whatever ttl it declared.
-- Returns {granted 1/0, ms until worth trying again, 1 if another holds the lease}.
local holder = get(KEYS[1])
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
""")

RELEASE_LEASE_LUA = _lua("""
-- KEYS[1] lease, KEYS[2] quiet mark; ARGV[1] owner (the lease goes only if still theirs);
-- ARGV[2] '1': the holder never asked KIS, so the quiet mark its grant set goes too.
local holder = get(KEYS[1])
if holder and (string.gsub(holder, ':%d+$', '')) == ARGV[1] then
  if ARGV[2] == '1' and get(KEYS[2]) == holder then redis.call('del', KEYS[2]) end
  return redis.call('del', KEYS[1])
end
return 0
""")

SAVE_NEWEST_LUA = _lua("""
-- KEYS[1] token, KEYS[2] failure record, KEYS[3] lease, KEYS[4] quiet mark.
-- ARGV[1] the sealed token the caller read ('' = none), ARGV[2] the sealed token to store
-- ('' = keep the stored one), ARGV[3] its ttl ms, ARGV[4] owner, ARGV[5] window ms.
-- Returns 1 stored, 0 kept, -1 the token changed since the caller read it (decide again).
local current = get(KEYS[1]) or ''
-- Our own sealed value already there: a retry after a lost reply; go on.
if current ~= ARGV[1] and (ARGV[2] == '' or current ~= ARGV[2]) then return -1 end
if tonumber(ARGV[5]) > 0 then redis.call('set', KEYS[4], ARGV[4], 'PX', ARGV[5]) end
local holder = get(KEYS[3])
if holder and (string.gsub(holder, ':%d+$', '')) == ARGV[4] then redis.call('del', KEYS[3]) end
if ARGV[2] == '' then return 0 end
redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('del', KEYS[2])
return 1
""")


class RedisLeaseRecords(LeaseRecords):
    """The lease as ``<token key>:lease`` (owner id ending in ``:<its lease_ttl in ms>``, PX
    ``lease_ttl``) and the quiet mark as ``<token key>:lease:quiet`` (PX window): Redis expires
    both, so no host's clock is read."""

    def __init__(self, storage: RedisTokenStorage) -> None:
        self._storage = storage

    def _keys(self, api_key: str) -> list[str]:
        token_key = self._storage._get_redis_key(api_key)
        return [f"{token_key}:lease", f"{token_key}:lease:quiet"]

    def grant(self, api_key: str, owner: str, ttl_s: float, window_s: float) -> LeaseState:
        ttl_ms = round(ttl_s * 1000)
        args = [f"{owner}:{ttl_ms}", ttl_ms, round(window_s * 1000)]
        args += [round(MAX_LEASE_TTL_S * 1000), owner]
        granted, left_ms, held = self._storage._eval("lease", GRANT_LUA, self._keys(api_key), args)
        return LeaseState(bool(granted), max(0, int(left_ms)) / 1000, bool(held))

    def held_by_other(self, api_key: str, owner: str) -> bool:
        holder = _text(self._storage._get(self._keys(api_key)[0]))
        return holder is not None and holder.rsplit(":", 1)[0] != owner  # ends in ':<ttl ms>'

    def release(self, api_key: str, owner: str, *, unmark: bool = False) -> None:
        args = [owner, "1" if unmark else "0"]
        self._storage._eval("lease release", RELEASE_LEASE_LUA, self._keys(api_key), args)

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
        sealer = storage._sealer(api_key, api_secret)
        token_key = storage._get_redis_key(api_key)
        keys = [token_key, f"{token_key}:failure", *self._keys(api_key)]
        sealed = sealer.seal(token)
        for _ in range(8):  # another save between our GET and the script: decide again
            raw = storage._get(token_key, deadline)
            now = storage.clock()
            newer = replaces(token, sealer.open(raw), now)
            ttl_ms = int((token.expires_at - now) * 1000)
            if newer and ttl_ms <= 0:
                raise TokenStorageError(
                    "refusing to save a token this host's clock sees as expired"
                )
            args = [raw or "", sealed if newer else "", max(ttl_ms, 1)]
            args += [owner, round(window_s * 1000)]
            done = storage._eval("SET", SAVE_NEWEST_LUA, keys, args, deadline)
            if int(done) >= 0:
                return bool(done)
        raise TokenStorageError("the stored token kept changing while saving; try again")
