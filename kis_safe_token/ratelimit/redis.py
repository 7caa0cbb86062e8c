"""``RedisRateLimiter``: the rate limit of every process on every host using one Redis.

Keys sit beside the token's, under its Cluster hash tag (one slot, one script)::

    korea_investment:token:{<key id>}:rate        the TAT, microseconds of the Redis clock
    korea_investment:token:{<key id>}:rate:slow   present while the learned slowdown lasts

A slot costs one round trip: one ``EVALSHA`` of :data:`RESERVE_LUA`. The script reads the Redis
server's own clock (``TIME``), so the hosts of a fleet need no clock agreement: the caller gets
back a *relative* wait. Both keys expire by themselves (the TAT one interval after it is reached,
the slowdown after its hold), so an idle app key leaves nothing behind.

State lost mid-run (``FLUSHALL``, a restart without persistence, a failover to a replica that
never got the key) must not restart the slots at "now" while slots already handed out are still
to come: each caller passes the queue it last saw ahead of it (while that observation is
recent), and a missing TAT is re-seeded that far ahead of now, so the slots given out before
the loss keep their second to themselves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Final

from .base import MAX_WAIT_S, SLOWDOWN_FACTOR, STALE_AHEAD_S, RateLimiter, check_rate

__all__ = ["PENALIZE_LUA", "RESERVE_LUA", "RedisRateLimiter"]

_US: Final = 1_000_000

RESERVE_LUA: Final = """
-- KEYS[1] the TAT (integer microseconds, Redis clock), KEYS[2] the slowdown flag.
-- ARGV[1] interval in us, ARGV[2] longest wait in us the caller accepts, ARGV[3] slowdown factor,
-- ARGV[4] how far ahead a TAT may be before it is taken for a clock step and reset (us),
-- ARGV[5] the queue (us) the caller last saw, for a TAT that is missing (the state was lost).
-- Returns {reserved (1/0), wait in us}: reserved, the caller's slot begins after the wait.
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 1 then interval = interval * tonumber(ARGV[3]) end
local raw = redis.call('GET', KEYS[1])
local tat = 0
if raw then tat = tonumber(raw) or 0 else tat = now + tonumber(ARGV[5]) end
if tat > now + tonumber(ARGV[4]) then tat = now end
local start = math.max(tat, now)
local wait = start - now
if wait > tonumber(ARGV[2]) then return {0, wait} end
local new = start + interval
-- %.0f: Lua's own number-to-string keeps 14 digits, and epoch microseconds have 16.
redis.call('SET', KEYS[1], string.format('%.0f', new), 'PX', math.ceil((new - now) / 1000) + 1000)
return {1, wait}
"""

PENALIZE_LUA: Final = """
-- KEYS[1] the slowdown flag; ARGV[1] hold in ms. Returns 1 if this call started the slowdown
-- (the one caller that logs it), 0 if it only extended a slowdown already in force.
if redis.call('SET', KEYS[1], '1', 'PX', ARGV[1], 'NX') then return 1 end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 0
"""


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
    ) -> None:
        self.rate = check_rate(calls_per_second)
        self._client = client
        self._key = key
        self._slow_key = f"{key}:slow"
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
        return self.reserve_result(self._eval("reserve", RESERVE_LUA, keys, args, deadline))

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
        ]
        return [self._key, self._slow_key], args

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
        hold_ms = math.ceil(hold_s * 1000)
        started = self._eval("penalize", PENALIZE_LUA, [self._slow_key], [hold_ms], deadline)
        return bool(int(started))

    def slowdown_left_s(self) -> float:
        left_ms = self._run("PTTL", lambda client: client.pttl(self._slow_key))
        return max(0, int(left_ms)) / 1000
