"""The issuance lock protocol: what a backend gives the single-flight engine. One lock object
serves both drivers: :meth:`IssuanceLock.attempt` never blocks, and only the drivers wait."""

from __future__ import annotations

import os
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, TypeAlias

from ..errors import TokenStorageError

if TYPE_CHECKING:
    from ..failure import IssueFailure
    from ..token import Token

__all__ = ["HELD", "Attempt", "Busy", "IssuanceLock", "LocalIssuanceLock", "Seen", "jittered"]

#: :meth:`IssuanceLock.attempt` took the lock: the caller holds it now.
HELD: Final = True
Seen: TypeAlias = "Token | IssueFailure"
"""What a waiter may find instead of the lock: a usable token, or an active failure record."""


@dataclass(frozen=True, slots=True)
class Busy:
    """Someone else holds the lock: look again after ``poll_s`` (sooner if woken by the holder).

    ``waiting_on``: what the caller waits for, for a timeout's message; ``stage``: the stage of a
    lock made of several (the seed lease, then the lock), each given a full ``wait_timeout``."""

    poll_s: float
    waiting_on: str = "the process holding the issuance lock"
    wake: str | None = None
    stage: int = 0


Attempt: TypeAlias = "Literal[True] | Token | IssueFailure | Busy"


class IssuanceLock(ABC):
    """The lock that lets one caller at a time issue a token for one app key; an attempt also
    looks at the store, so a waiter learns of the holder's token (or failure) as soon as it is
    there instead of taking the lock only to find the work done."""

    @abstractmethod
    def attempt(self) -> Attempt:
        """One try that never blocks: :data:`HELD`; a usable :class:`Token` or an active
        :class:`IssueFailure` another caller stored; or :class:`Busy` (when to look again).
        :class:`TokenStorageError` if the backend cannot be reached."""

    def wait(self, busy: Busy, timeout_s: float) -> Seen | None:
        """Block until it is worth attempting again (at most ``timeout_s``); a backend with a
        wake-up signal returns early, with what the holder left if it read it on the way."""
        time.sleep(timeout_s)
        return None

    async def wait_async(self, busy: Busy, timeout_s: float) -> Seen | None:
        """:meth:`wait` for the asyncio driver: ``asyncio.sleep``, or for a wake-up signal
        :meth:`wait` in a thread (bounded by ``timeout_s``: a cancelled waiter's ends by itself)."""
        import asyncio  # here: a sync user of the library never imports asyncio

        if busy.wake is None:
            await asyncio.sleep(timeout_s)
            return None
        return await asyncio.to_thread(self.wait, busy, timeout_s)

    def for_task(self) -> None:  # noqa: B027 - most locks own per attempt, not per thread
        """Said by the asyncio driver before the first attempt: one task owns it, not a thread."""

    def issuing(self) -> None:  # noqa: B027 - most locks do not care
        """Said right before the holder asks KIS: from here on, a release must assume KIS issued
        (the seed lease keeps its quiet mark then, and only then)."""

    def extend(self) -> None:  # noqa: B027 - locks that do not expire need nothing
        """Keep holding a lock that expires by itself (called while the holder works)."""

    def save_deadline(self) -> float | None:
        """Until when (``time.monotonic()``) the holder retries its save; ``None``: the store's."""
        return None

    def save(self, write: Callable[[Token, float | None], None], token: Token) -> None:
        """Save the token KIS just issued: by default ``write`` it, to :meth:`save_deadline`."""
        write(token, self.save_deadline())

    @abstractmethod
    def release(self) -> None:
        """Release the lock if held (and wake the waiters, where the backend has any)."""

    def acquire(self, deadline: float) -> Literal[True] | Token | IssueFailure:
        """Attempt until held or a token/failure is seen, for a caller holding the lock by hand;
        :class:`TokenStorageError` past ``deadline`` (``time.monotonic()``)."""
        while True:
            got = self.attempt()
            if not isinstance(got, Busy):
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise TokenStorageError(f"timed out waiting for {got.waiting_on}")
            seen = self.wait(got, min(left, got.poll_s))
            if seen is not None:
                return seen


#: How often a caller waiting for this process's own lock looks again.
LOCAL_POLL_S: Final = 0.005


class LocalIssuanceLock(IssuanceLock):
    """A lock within this process only: all a storage with only the seed's four methods offers."""

    def __init__(
        self,
        api_key: str,
        *,
        lock: threading.Lock | None = None,
        waiting_on: str = "this process's own issuance",
    ) -> None:
        self._lock = _local_lock(api_key) if lock is None else lock
        self._waiting_on = waiting_on
        self._held = False

    def attempt(self) -> Attempt:
        if self._lock.acquire(blocking=False):
            self._held = True
            return HELD
        return Busy(jittered(LOCAL_POLL_S), self._waiting_on)

    def release(self) -> None:
        if self._held:
            self._held = False
            self._lock.release()


_local_locks: dict[str, threading.Lock] = {}
_local_locks_guard = threading.Lock()


def _local_lock(api_key: str) -> threading.Lock:
    with _local_locks_guard:
        return _local_locks.setdefault(api_key, threading.Lock())


def _fresh_local_locks() -> None:
    """In a forked child: locks a parent's thread held at the fork would never be released."""
    global _local_locks_guard
    _local_locks_guard = threading.Lock()
    _local_locks.clear()


def jittered(interval_s: float) -> float:
    """``interval_s`` spread by ±50 %, so a herd of pollers does not wake in lockstep."""
    return interval_s * (0.5 + random.random())


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_local_locks)
