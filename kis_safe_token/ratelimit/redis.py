"""``RedisRateLimiter``: the rate limit of every process on every host using one Redis.

A slot is one ``EVALSHA`` of :data:`RESERVE_LUA` on ``<token key>:rate`` (the TAT, on the Redis
clock, with an HMAC) and ``:rate:slow`` (the slowdown flag). Why authenticated: docs/security.md."""

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

#: Prepended to every script that reads a key: a key of another type reads as absent (and the
#: script's SET replaces it) instead of every call failing with WRONGTYPE.
GET_LUA: Final = """
local function get(key)
  local value = redis.pcall('get', key)
  if type(value) == 'table' and value.err then return false end
  return value
end
"""

#: ``slowed(key, value, max_ms)``: the ms left of the slowdown flag, trusted only with ``value``
#: and a TTL up to ``max_ms``; anything else is deleted and ``false`` returned.
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


def _lua(body: str) -> str:
    """:data:`GET_LUA` and the ``slowed`` helper, then ``body``."""
    return GET_LUA + _SLOW_LUA + body


RESERVE_LUA: Final = _lua("""
-- KEYS[1] the TAT ('<integer microseconds, Redis clock>:<HMAC>'), KEYS[2] the slowdown flag.
-- ARGV[1] interval in us, ARGV[2] longest wait in us the caller accepts, ARGV[3] slowdown factor,
-- ARGV[4] how far ahead a TAT may be before it is taken for a clock step and reset (us),
-- ARGV[5] the queue (us) the caller last saw, for a missing or unauthenticated TAT,
-- ARGV[6]/[7] the MAC key pads, ARGV[8] the slowdown flag's value, ARGV[9] the longest hold ms.
-- Returns {reserved (1/0), wait in us}.
-- mac(msg): HMAC-SHA1 (redis.sha1hex twice) with the key pads ARGV[6] and ARGV[7].
local function hex2bin(h)
  return (h:gsub('..', function(c) return string.char(tonumber(c, 16)) end))
end
local function mac(msg) return redis.sha1hex(ARGV[7] .. hex2bin(redis.sha1hex(ARGV[6] .. msg))) end
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
""")

PENALIZE_LUA: Final = _lua("""
-- KEYS[1] the slowdown flag; ARGV[1] hold in ms, ARGV[2] the flag's value, ARGV[3] the longest
-- hold in ms. Returns 1 if this call started the slowdown (it logs it), 0 if it extended one.
if slowed(KEYS[1], ARGV[2], ARGV[3]) then
  redis.call('pexpire', KEYS[1], ARGV[1])
  return 0
end
redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[1])
return 1
""")

SLOWDOWN_LEFT_LUA: Final = _lua("""
-- KEYS[1] the slowdown flag; ARGV[1] its value, ARGV[2] the longest hold in ms.
-- Returns the ms left of a slowdown the limiter honours, 0 if none.
return slowed(KEYS[1], ARGV[1], ARGV[2]) or 0
""")


class RedisRateLimiter(RateLimiter):
    """Slots shared through ``key`` (and ``key:slow``) on the Redis that ``client()`` returns
    (a callable: it follows its storage's client, rebuilt in a forked child).

    ``where`` names the Redis in errors; ``retry_timeout_s``: how long transient errors are
    retried (0: one attempt); ``mac_key`` (at most 64 bytes) authenticates the state."""

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
        if len(mac_key) > 64:
            raise ValueError("mac_key must be at most 64 bytes (one SHA-1 block)")
        padded = mac_key.ljust(64, b"\0")
        pads = (bytes(b ^ 0x36 for b in padded), bytes(b ^ 0x5C for b in padded))
        self._slow_key = f"{key}:slow"
        self._slow_value = "1:" + hmac.new(mac_key, self._slow_key.encode(), "sha256").hexdigest()
        self._constant_args = (*pads, self._slow_value, _MAX_HOLD_MS)
        self._client = client
        self._keys = [key, self._slow_key]
        self.where = f"every process using {where}"
        self._redis_where = where
        #: How long a transient Redis error (a failover) is retried.
        self.retry_timeout_s = retry_timeout_s
        self._scripts: dict[tuple[int, str], Any] = {}
        # The queue this process last saw ahead of its slot, and until when (monotonic) it still
        # describes slots handed out: what a lost TAT is re-seeded with.
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

    def retry_deadline(self, deadline: float | None = None) -> float:
        """``retry_timeout_s`` from now, or the caller's ``deadline`` if that is sooner."""
        own = time.monotonic() + self.retry_timeout_s
        return own if deadline is None else min(own, deadline)

    def _eval(
        self, what: str, lua: str, keys: list[str], args: list[Any], deadline: float | None = None
    ) -> Any:
        """One script (EVALSHA), retried until :meth:`retry_deadline`. A reservation retried after
        a lost reply may take a slot it does not use: the fleet stays under its limit."""
        from ..storage.redis_retry import redis_retry  # here: storage imports this module

        def run() -> Any:
            client = self._client()
            return self._script(client, lua)(keys=keys, args=args, client=client)

        return redis_retry(
            run,
            deadline=self.retry_deadline(deadline),
            what=f"rate limiter {what}",
            where=self._redis_where,
        )

    def try_acquire(self, max_wait_s: float = 0.0) -> float | None:
        return self._reserve_by(max_wait_s, None)

    def _reserve_by(self, max_wait_s: float, deadline: float | None) -> float | None:
        keys, args = self.reserve_call(max_wait_s)
        return self.reserve_result(self._eval("reserve", RESERVE_LUA, keys, args, deadline))

    def reserve_call(self, max_wait_s: float) -> tuple[list[str], list[Any]]:
        """``(keys, args)`` of :data:`RESERVE_LUA` for one reservation (the asyncio side's too)."""
        args = [
            math.ceil(self.interval_s * _US),
            int(min(max(0.0, max_wait_s), MAX_WAIT_S) * _US),
            SLOWDOWN_FACTOR,
            int(STALE_AHEAD_S * _US),
            int(self._seen_queue_s * _US) if time.monotonic() < self._seen_until else 0,
            *self._constant_args,
        ]
        return self._keys, args

    async def try_acquire_async(
        self, max_wait_s: float, deadline: float | None = None, async_client: Any = None
    ) -> float | None:
        """One script on ``async_client`` (``redis.asyncio``, on this limiter's Redis), retried
        until ``deadline``; without one, in a worker thread."""
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
        """Whether this limiter's state is on ``client`` (whose asyncio twin may reserve)."""
        return bool(self._client() is client)

    def reserve_result(self, reply: Any) -> float | None:
        """The wait :data:`RESERVE_LUA`'s reply grants (kept as the queue seen), or ``None``."""
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
        """The slowdown the limiter honours (a flag not written with the secret: none)."""
        args = [self._slow_value, _MAX_HOLD_MS]
        left_ms = self._eval("slowdown", SLOWDOWN_LEFT_LUA, [self._slow_key], args)
        return max(0, int(left_ms)) / 1000
