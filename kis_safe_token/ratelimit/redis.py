"""``RedisRateLimiter``: the rate limit of every process on every host using one Redis.

Keys sit beside the token's, under its Cluster hash tag (one slot, one script)::

    korea_investment:token:{<key id>}:rate        the TAT, microseconds of the Redis clock
    korea_investment:token:{<key id>}:rate:slow   present while the learned slowdown lasts

A slot costs one round trip: one ``EVALSHA`` of :data:`RESERVE_LUA`. The script reads the Redis
server's own clock (``TIME``), so the hosts of a fleet need no clock agreement: the caller gets
back a *relative* wait. Both keys expire by themselves (the TAT one interval after it is reached,
the slowdown after its hold), so an idle app key leaves nothing behind.

Both are authenticated, since anyone who can write the Redis could otherwise stall or slow the
fleet: the TAT is stored with an HMAC of its key name and value (HMAC-SHA1 computed by the
script with ``redis.sha1hex``, keyed by a key derived from the api_secret), the slowdown flag
holds the one value a holder of the secret writes; either must carry a TTL within its bounds.
Anything else is ignored and replaced.

State lost mid-run (``FLUSHALL``, a restart without persistence, a failover to a replica that
never got the key) must not restart the slots at "now" while slots already handed out are still
to come: each caller passes the queue it last saw ahead of it (while that observation is
recent), and a missing TAT is re-seeded that far ahead of now, so the slots given out before
the loss keep their second to themselves.
"""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Callable
from typing import Any, Final

from .base import (
    MAX_SLOWDOWN_S,
    MAX_WAIT_S,
    SLOWDOWN_FACTOR,
    STALE_AHEAD_S,
    RateLimiter,
    check_rate,
)

__all__ = ["GET_LUA", "PENALIZE_LUA", "RESERVE_LUA", "SLOWDOWN_LEFT_LUA", "RedisRateLimiter"]

_US: Final = 1_000_000
_MAX_HOLD_MS: Final = int(MAX_SLOWDOWN_S * 1000)

#: Prepended to every script that reads a key: a key of another type (a list or hash someone
#: wrote there by hand) reads as absent, and the script's SET then replaces it, instead of every
#: call failing with WRONGTYPE.
GET_LUA: Final = """
local function get(key)
  local value = redis.pcall('get', key)
  if type(value) == 'table' and value.err then return false end
  return value
end
"""

#: HMAC-SHA1 in Lua (``redis.sha1hex`` twice): ARGV[6] and ARGV[7] are the key xor ipad / opad,
#: precomputed by the caller, so the script only hashes.
_MAC_LUA: Final = """
local function hex2bin(h)
  return (h:gsub('..', function(c) return string.char(tonumber(c, 16)) end))
end
local function mac(msg) return redis.sha1hex(ARGV[7] .. hex2bin(redis.sha1hex(ARGV[6] .. msg))) end
"""

#: ``slowed(key, value, max_ms)``: the ms left of the slowdown flag at ``key``, trusted only with
#: the ``value`` a holder of the secret writes and a TTL no longer than ``max_ms``; anything else
#: (a stray SET, a copied value with its TTL removed) is deleted and ``false`` returned.
_SLOW_LUA: Final = """
local function slowed(key, value, max_ms)
  local flag = get(key)
  if not flag then return false end
  local left = redis.call('pttl', key)
  if flag == value and left > 0 and left <= tonumber(max_ms) then return left end
  redis.call('del', key)
  return false
end
"""

RESERVE_LUA: Final = (
    GET_LUA
    + _MAC_LUA
    + _SLOW_LUA
    + """
-- KEYS[1] the TAT ('<integer microseconds, Redis clock>:<HMAC>'), KEYS[2] the slowdown flag.
-- ARGV[1] interval in us, ARGV[2] longest wait in us the caller accepts, ARGV[3] slowdown factor,
-- ARGV[4] how far ahead a TAT may be before it is taken for a clock step and reset (us),
-- ARGV[5] the queue (us) the caller last saw, for a TAT that is missing (the state was lost) or
-- not written by a holder of the secret, ARGV[6]/[7] the MAC key pads, ARGV[8] the slowdown
-- flag's value, ARGV[9] the longest hold in ms.
-- Returns {reserved (1/0), wait in us}: reserved, the caller's slot begins after the wait.
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local ahead = tonumber(ARGV[4])
if slowed(KEYS[2], ARGV[8], ARGV[9]) then interval = interval * tonumber(ARGV[3]) end
local tat = nil
local raw = get(KEYS[1])
if raw then
  local value, tag = string.match(raw, '^(%d+):(%x+)$')
  local left = redis.call('pttl', KEYS[1])
  if value and tag == mac(KEYS[1] .. '|' .. value) and left > 0 and left <= ahead / 1000 + 1000 then
    tat = tonumber(value)
  end
end
if tat == nil then tat = now + tonumber(ARGV[5]) end
if tat > now + ahead then tat = now end
local start = math.max(tat, now)
local wait = start - now
if wait > tonumber(ARGV[2]) then return {0, wait} end
-- %.0f: Lua's own number-to-string keeps 14 digits, and epoch microseconds have 16.
local new = string.format('%.0f', start + interval)
redis.call('SET', KEYS[1], new .. ':' .. mac(KEYS[1] .. '|' .. new), 'PX',
  math.ceil((start + interval - now) / 1000) + 1000)
return {1, wait}
"""
)

PENALIZE_LUA: Final = (
    GET_LUA
    + _SLOW_LUA
    + """
-- KEYS[1] the slowdown flag; ARGV[1] hold in ms, ARGV[2] the flag's value, ARGV[3] the longest
-- hold in ms. Returns 1 if this call started the slowdown (the one caller that logs it), 0 if it
-- only extended a slowdown already in force.
if slowed(KEYS[1], ARGV[2], ARGV[3]) then
  redis.call('pexpire', KEYS[1], ARGV[1])
  return 0
end
redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[1])
return 1
"""
)

SLOWDOWN_LEFT_LUA: Final = (
    GET_LUA
    + _SLOW_LUA
    + """
-- KEYS[1] the slowdown flag; ARGV[1] its value, ARGV[2] the longest hold in ms: the ms left of a
-- slowdown the limiter honours (what ``kis-token status`` reports), 0 if none.
return slowed(KEYS[1], ARGV[1], ARGV[2]) or 0
"""
)


class RedisRateLimiter(RateLimiter):
    """Slots shared through ``key`` (and ``key:slow``) on the Redis that ``client()`` returns.

    ``client`` is a callable so the limiter follows its storage's client (a storage that
    reconnects in a forked child hands out the new one). Redis errors become
    :class:`TokenStorageError`; every Redis call goes through :meth:`_run`, which retries
    transient ones (a failover) for ``retry_timeout_s`` (its storage's; 0: one attempt).
    """

    def __init__(
        self,
        client: Callable[[], Any],
        key: str,
        calls_per_second: float,
        *,
        where: str = "Redis",
        retry_timeout_s: float = 0.0,
        mac_key: bytes = b"",
    ) -> None:
        self.rate = check_rate(calls_per_second)
        # The state is authenticated with ``mac_key`` (the storage passes one derived from the
        # secret): HMAC-SHA1 pads for the TAT, the slowdown flag's one valid value.
        if len(mac_key) > 64:
            raise ValueError("mac_key must be at most 64 bytes (one SHA-1 block)")
        padded = mac_key.ljust(64, b"\0")
        pads = (bytes(b ^ 0x36 for b in padded), bytes(b ^ 0x5C for b in padded))
        self._slow_value = "1:" + hmac.new(mac_key, f"{key}:slow".encode(), "sha256").hexdigest()
        self._constant_args = (*pads, self._slow_value, _MAX_HOLD_MS)
        self._client = client
        self._key = key
        self._slow_key = f"{key}:slow"
        self._keys = [key, self._slow_key]
        self.where = f"every process using {where}"
        self._redis_where = where
        self._retry_timeout_s = retry_timeout_s
        self._scripts: dict[tuple[int, str], Any] = {}
        # The queue this process last saw ahead of its slot, and until when (monotonic) that
        # observation still describes slots handed out: what a lost TAT is re-seeded with.
        self._seen_queue_s = 0.0
        self._seen_until = 0.0

    def _script(self, client: Any, source: str) -> Any:
        cache_key = (id(client), source)
        script = self._scripts.get(cache_key)
        if script is None:
            if len(self._scripts) > 8:
                self._scripts.clear()
            script = self._scripts[cache_key] = client.register_script(source)
        return script

    def _run(self, what: str, call: Callable[[Any], Any], deadline: float | None = None) -> Any:
        """``call(client)`` through :func:`~kis_safe_token.storage.redis_retry.redis_retry`, its
        Redis errors as :class:`TokenStorageError`: the one place this limiter talks to Redis.
        Retried for ``retry_timeout_s``, or until the caller's ``deadline`` if that is sooner.
        A reservation retried after a lost reply may take one more slot than it uses: the
        fleet then calls KIS slightly under its limit, never over it."""
        from ..storage.redis_retry import redis_retry  # here: storage imports this module

        return redis_retry(
            lambda: call(self._client()),
            deadline=self.retry_deadline(deadline),
            what=f"rate limiter {what}",
            where=self._redis_where,
        )

    def retry_deadline(self, deadline: float | None = None) -> float:
        """Until when a transient Redis error is retried: ``retry_timeout_s`` from now, or the
        caller's ``deadline`` (``time.monotonic()``) if that is sooner."""
        own = time.monotonic() + self._retry_timeout_s
        return own if deadline is None else min(own, deadline)

    def _eval(
        self,
        what: str,
        source: str,
        keys: list[str],
        args: list[Any],
        deadline: float | None = None,
    ) -> Any:
        """One script, one round trip (EVALSHA; redis-py loads it on NOSCRIPT)."""
        return self._run(
            what,
            lambda client: self._script(client, source)(keys=keys, args=args, client=client),
            deadline,
        )

    def try_acquire(self, max_wait_s: float = 0.0) -> float | None:
        return self._reserve_by(max_wait_s, None)

    def _reserve_by(self, max_wait_s: float, deadline: float | None) -> float | None:
        keys, args = self.reserve_call(max_wait_s)
        client = self._client()
        try:  # the common case, one attempt, straight through (no retry loop to set up)
            reply = self._script(client, RESERVE_LUA)(keys=keys, args=args, client=client)
        except Exception:  # noqa: BLE001 - retried, or raised as TokenStorageError, by _eval
            reply = self._eval("reserve", RESERVE_LUA, keys, args, deadline)
        return self.reserve_result(reply)

    def _recent_queue_s(self) -> float:
        """The queue last seen, while slots handed out then may still be ahead; else 0."""
        return self._seen_queue_s if time.monotonic() < self._seen_until else 0.0

    def reserve_call(self, max_wait_s: float) -> tuple[list[str], list[Any]]:
        """``(keys, args)`` of :data:`RESERVE_LUA` for one reservation: an asyncio client runs
        the same script on ``redis.asyncio`` with them, then reads :meth:`reserve_result`."""
        args = [
            math.ceil(self.interval_s * _US),
            int(min(max(0.0, max_wait_s), MAX_WAIT_S) * _US),
            SLOWDOWN_FACTOR,
            int(STALE_AHEAD_S * _US),
            int(self._recent_queue_s() * _US),
            *self._constant_args,
        ]
        return self._keys, args

    async def try_acquire_async(
        self, max_wait_s: float, deadline: float | None = None, async_client: Any = None
    ) -> float | None:
        """One script on ``async_client`` (``redis.asyncio``, on this limiter's Redis), retried
        through a failover no later than ``deadline``; without one, in a worker thread."""
        if async_client is None:
            return await super().try_acquire_async(max_wait_s, deadline)
        from ..storage.redis_retry import redis_retry_async

        keys, args = self.reserve_call(max_wait_s)
        script = async_client.register_script(RESERVE_LUA)
        reply = await redis_retry_async(
            lambda: script(keys=keys, args=args),
            deadline=self.retry_deadline(deadline),
            what="rate limiter reserve",
            where=self._redis_where,
        )
        return self.reserve_result(reply)

    def on_client(self, client: Any) -> bool:
        """Whether this limiter's state is on ``client`` (the storage's own Redis client): an
        asyncio client may then run :data:`RESERVE_LUA` on the matching ``redis.asyncio``
        client instead of blocking its loop on :meth:`try_acquire`."""
        return bool(self._client() is client)

    @property
    def retry_timeout_s(self) -> float:
        """How long a transient Redis error (a failover) is retried."""
        return self._retry_timeout_s

    def reserve_result(self, reply: Any) -> float | None:
        """The wait in seconds that :data:`RESERVE_LUA`'s reply grants, or ``None``; a granted
        one is remembered as the queue seen (see the module's docstring)."""
        reserved, wait_us = reply
        if not int(reserved):
            return None
        wait = int(wait_us) / _US
        self._seen_queue_s = wait + self.interval_s
        self._seen_until = time.monotonic() + self._seen_queue_s + 1.0
        return wait

    def _slow_down(self, hold_s: float) -> bool:
        return self._slow_down_by(hold_s, None)

    def _slow_down_by(self, hold_s: float, deadline: float | None) -> bool:
        hold_ms = min(math.ceil(hold_s * 1000), _MAX_HOLD_MS)
        args = [hold_ms, self._slow_value, _MAX_HOLD_MS]
        started = self._eval("penalize", PENALIZE_LUA, [self._slow_key], args, deadline)
        return bool(int(started))

    def slowdown_left_s(self) -> float:
        """The slowdown the limiter honours: a flag not written by a holder of the secret, or
        with no expiry, is deleted and reported as none."""
        args = [self._slow_value, _MAX_HOLD_MS]
        left_ms = self._eval("slowdown", SLOWDOWN_LEFT_LUA, [self._slow_key], args)
        return max(0, int(left_ms)) / 1000
