"""The seed-protocol lease: single flight for clients that only call the seed's four methods.

Backends supply the records (:class:`LeaseRecords`); :class:`LeasedLock` puts the lease in front
of a store's lock. The rules and the races they prevent: ``docs/seed-lease.md``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING, Final

from .._checks import check_seconds, note_short_wait
from ..errors import TokenStorageError
from ..events import Kind, emit
from ..failure import IssueFailure
from ..flight.engine import Flight
from ..flight.lock import Attempt, Busy, IssuanceLock, Seen, jittered
from ..kis import resolve_issue_window_s
from ..token import Token

if TYPE_CHECKING:
    from .base import SealedTokenStorage

__all__ = [
    "LEASE_TTL_S",
    "LeaseRecords",
    "LeaseState",
    "LeasedLock",
    "SeedLease",
    "new_seed_lease",
    "replaces",
]

logger = logging.getLogger("kis_safe_token")

#: The longest a holder that never saves keeps the lease (the quiet mark protects a slow issuer).
LEASE_TTL_S: Final = 15.0
MAX_LEASE_TTL_S: Final = 3600.0
#: How often a waiter looks for the holder's token (a ``stat`` or a ``GET``), jittered.
LEASE_POLL_S: Final = 0.02
#: How often a waiter asks for the lease again: a holder that lets go early frees it within this.
LEASE_RETRY_S: Final = 0.25
#: A file record stamped this far ahead of our clock (a clock stepped back) is ignored.
CLOCK_SKEW_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class LeaseState:
    """A grant attempt's answer: ``granted``, else when to retry and whether another ``held`` it."""

    granted: bool
    retry_in_s: float = 0.0
    held: bool = False


class LeaseRecords(ABC):
    """The backend's half of the lease: atomic grant, release and save, per app key."""

    @abstractmethod
    def grant(self, api_key: str, owner: str, ttl_s: float, window_s: float) -> LeaseState:
        """Grant ``owner`` the lease unless another holds an active one or the quiet mark lives
        (again, its expiry not extended, to an ``owner`` that holds it)."""

    @abstractmethod
    def held_by_other(self, api_key: str, owner: str) -> bool:
        """Whether someone other than ``owner`` holds an active lease."""

    @abstractmethod
    def release(self, api_key: str, owner: str, *, unmark: bool = False) -> None:
        """End ``owner``'s lease if it still holds it; the quiet mark stays unless ``unmark``
        and it is the one ``owner``'s grant set (it never asked KIS)."""

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
        """Atomically: store ``token`` if it :func:`replaces` the stored one, set the quiet mark,
        end ``owner``'s lease; whether it was stored. ``deadline``: as for ``write_token``."""


class SeedLease:
    """The lease protocol behind the four seed methods of a storage with ``seed_lease=True``."""

    def __init__(self, storage: SealedTokenStorage, ttl_s: float, window_s: float) -> None:
        self._storage = storage
        self.ttl_s = ttl_s
        self.window_s = window_s
        self._waiting: set[str] = set()  # owners refused by an active holder's lease

    @cached_property
    def _records(self) -> LeaseRecords:
        return self._storage._lease_records()  # not in __init__: the backend's is not done yet

    def stored(self, api_key: str, api_secret: str) -> Token | None:
        """The stored token if it is valid."""
        token = self._storage.read_token(api_key, api_secret)
        return token if token is not None and token.is_valid(self._storage.clock()) else None

    def try_grant(
        self, api_key: str, api_secret: str, owner: str | None = None
    ) -> bool | LeaseState:
        """One look: ``True`` if a valid token is stored, ``False`` if ``owner`` (default: this
        thread) now holds the lease, else the refusal."""
        owner = thread_owner() if owner is None else owner
        if self.stored(api_key, api_secret) is not None:
            self._waiting.discard(owner)
            return True
        state = self._records.grant(api_key, owner, self.ttl_s, self.window_s)
        if not state.granted:
            if state.held:
                self._waiting.add(owner)
            return state
        if owner in self._waiting:  # the holder's grant ran out and it saved no token
            self._waiting.discard(owner)
            emit(Kind.LEASE_EXPIRED, self._storage, api_key)
        emit(Kind.LEASE_GRANTED, self._storage, api_key)
        return False

    @staticmethod
    def retry_in_s(state: LeaseState) -> float:
        """How long a refused caller waits (looking for a token) before asking again."""
        return min(max(state.retry_in_s, LEASE_POLL_S), LEASE_RETRY_S)

    def waiting_on(self, state: LeaseState) -> str:
        """What a refused caller waits for, for the message of one that gives up."""
        what = "holder of the issuance lease" if state.held else "KIS issue window"
        return f"a token (waiting on the {what})"

    def check_token_valid(self, api_key: str, api_secret: str) -> bool:
        """``True`` once a valid token is stored; ``False``: this thread holds the lease.
        :class:`TokenStorageError` if unreachable or no token shows up within ``wait_timeout``."""
        deadline = time.monotonic() + self._storage.wait_timeout
        while True:
            step = self.try_grant(api_key, api_secret)
            if isinstance(step, bool):
                return step
            retry_at = time.monotonic() + self.retry_in_s(step)
            while (now := time.monotonic()) < retry_at:
                if now >= deadline:
                    raise TokenStorageError(
                        f"timed out after {self._storage.wait_timeout:.1f} s waiting for "
                        f"{self.waiting_on(step)}"
                    )
                time.sleep(min(retry_at - now, deadline - now, jittered(LEASE_POLL_S)))
                if self.stored(api_key, api_secret) is not None:
                    return True

    def load_token(self, api_key: str, api_secret: str) -> Token | None:
        """The stored valid token, waiting (up to ``wait_timeout``) while another holds the lease.
        Never grants. :class:`TokenStorageError` if unreachable."""
        owner = thread_owner()
        deadline = time.monotonic() + self._storage.wait_timeout
        while True:
            token = self.stored(api_key, api_secret)
            if token is not None:
                return token
            if time.monotonic() >= deadline or not self._records.held_by_other(api_key, owner):
                # Once more: the holder's save (ending its lease) may have landed in between.
                return self.stored(api_key, api_secret)
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
        """Keep the newest token, mark the window, end ``owner``'s lease (default: this thread)."""
        owner = thread_owner() if owner is None else owner
        if not self._records.save_newest(
            api_key, api_secret, token, owner, self.window_s, deadline
        ):
            logger.info(
                "save_token: kept the stored token, which expires no earlier than the one being "
                "saved (both are valid at KIS)"
            )

    def released_by_delete(
        self, api_key: str, owner: str | None = None, *, unmark: bool = False
    ) -> None:
        """End ``owner``'s (default: this thread's) lease; ``unmark``: its quiet mark too."""
        self._records.release(api_key, thread_owner() if owner is None else owner, unmark=unmark)


def new_seed_lease(
    storage: SealedTokenStorage, lease_ttl: float | None, issue_window_s: float | None
) -> SeedLease:
    """The lease of ``storage``; ``ValueError`` naming the argument if a timing is unusable."""
    ttl = LEASE_TTL_S if lease_ttl is None else lease_ttl
    ttl = check_seconds("lease_ttl", ttl, high=MAX_LEASE_TTL_S)
    window = 0.0
    if issue_window_s != 0:
        window = resolve_issue_window_s(issue_window_s, name="issue_window_s")
    note_short_wait(
        storage,
        max(ttl, window) + 0.001,
        f"lease_ttl {ttl:.1f} s, issue_window_s {window:.1f} s: the next holder may issue after",
    )
    return SeedLease(storage, ttl, window)


# -- owners: one per thread, new in a forked child -----------------------------------------------
_owners = threading.local()


def thread_owner() -> str:
    """This thread's lease owner id (host, pid, a random part, not the thread ident: idents are
    reused, and a new thread must not inherit a dead one's lease)."""
    owner: str | None = getattr(_owners, "id", None)
    if owner is None:
        owner = _owners.id = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(8).hex()}"
    return owner


def _fresh_owners() -> None:
    """In a forked child: the forking thread's id is its parent's, and so would be its lease."""
    global _owners
    _owners = threading.local()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_owners)


def replaces(token: Token, stored: Token | None, now: float) -> bool:
    """Keep-the-newest: ``token`` replaces ``stored`` unless that is valid and expires no later."""
    return stored is None or not stored.is_valid(now) or stored.expires_at < token.expires_at


class LeasedLock(IssuanceLock):
    """The seed-protocol lease in front of the store's issuance lock, as one lock for the engine:
    stage 0 takes the lease (or waits in it; an active failure is handed back at once), stage 1
    the store's lock. The owner is the thread's, or (:meth:`for_task`) this call's own."""

    def __init__(self, lease: SeedLease, api_key: str, api_secret: str, lock: IssuanceLock) -> None:
        self._storage = lease._storage
        self._lease = lease
        self._api_key = api_key
        self._api_secret = api_secret
        self._lock = lock
        self._owner = thread_owner()
        self._stage = 0
        self._held_lease = False
        self._asked_kis = False
        self._retry_at = 0.0
        self._waiting_on = "a token"

    def for_task(self) -> None:
        self._owner = f"{thread_owner()}:{os.urandom(4).hex()}"
        self._lock.for_task()

    def attempt(self) -> Attempt:
        if self._stage == 1:
            return self._lock_attempt()
        failure = self._active_failure()
        if failure is not None:
            return failure
        lease, key, secret = self._lease, self._api_key, self._api_secret
        now = time.monotonic()
        if now >= self._retry_at:
            step = lease.try_grant(key, secret, self._owner)
            if step is False:
                self._held_lease = True
                return self._lock_attempt()
            if isinstance(step, LeaseState):
                self._retry_at = now + lease.retry_in_s(step)
                self._waiting_on = lease.waiting_on(step)
                return Busy(min(jittered(LEASE_POLL_S), self._retry_at - now), self._waiting_on)
        elif lease.stored(key, secret) is None:
            return Busy(min(jittered(LEASE_POLL_S), self._retry_at - now), self._waiting_on)
        token = self._storage.read_token(key, secret, fresh=True)
        if self._storage.usable(token):
            return token
        return self._lock_attempt()

    def _lock_attempt(self) -> Attempt:
        self._stage = 1
        got = self._lock.attempt()
        return replace(got, stage=1) if isinstance(got, Busy) else got

    def _active_failure(self) -> IssueFailure | None:
        storage = self._storage
        now = storage.clock()
        local = Flight(storage, self._api_key, self._api_secret).local_failure()
        if local is not None and local.active(now):
            return local
        stored = storage.read_failure(self._api_key, self._api_secret)
        return stored if stored is not None and stored.active(now) else None

    def wait(self, busy: Busy, timeout_s: float) -> Seen | None:
        if busy.stage == 1:
            return self._lock.wait(busy, timeout_s)
        return super().wait(busy, timeout_s)

    async def wait_async(self, busy: Busy, timeout_s: float) -> Seen | None:
        if busy.stage == 1:
            return await self._lock.wait_async(busy, timeout_s)
        return await super().wait_async(busy, timeout_s)

    def issuing(self) -> None:
        self._asked_kis = True
        self._lock.issuing()

    def extend(self) -> None:
        self._lock.extend()

    def save_deadline(self) -> float | None:
        return self._lock.save_deadline()

    def save(self, write: Callable[[Token, float | None], None], token: Token) -> None:
        self._lease.save(
            self._api_key, self._api_secret, token, self._owner, deadline=self.save_deadline()
        )

    def release(self) -> None:
        try:
            self._lock.release()
        finally:
            if self._held_lease:  # a no-op after our save, which ended it
                self._held_lease = False
                # Never asked KIS: nothing was issued, so our grant's quiet mark goes too and
                # the next caller is not kept out for KIS's window.
                self._lease.released_by_delete(
                    self._api_key, self._owner, unmark=not self._asked_kis
                )
