"""The in-process tier of single flight: one token in memory in front of a store, driven by the
engine like a store (one thread asks the store behind it; failure records and the ``EGW00133``
sit-out are that store's)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..failure import IssueFailure
from ..token import Token
from .drivers import run_sync
from .engine import Flight, get_or_issue
from .lock import IssuanceLock, LocalIssuanceLock

__all__ = ["InMemory"]


class InMemory:
    """A token kept in memory, refreshed once at a time by this process's threads.

    ``fresh_until`` and ``bearer`` are read without the lock; :meth:`write_token` writes them in
    an order that makes a reader seeing a fresh ``fresh_until`` see its ``bearer``. ``what``
    names the refresh for a thread that gives up waiting on it.
    """

    records_failures = False

    def __init__(
        self,
        *,
        wait_timeout: float,
        refresh_margin_s: float,
        clock: Callable[[], float],
        what: str = "another thread's refresh",
    ) -> None:
        self.wait_timeout = wait_timeout
        self.refresh_margin_s = refresh_margin_s
        self.clock = clock
        self.token: Token | None = None
        self.bearer = ""
        self.fresh_until = float("-inf")
        self._what = what
        self._lock = threading.Lock()

    def get(self, fetch: Callable[[], Token]) -> Token:
        """The token in memory while fresh; else ``fetch()``, by one thread at a time.
        :class:`TokenStorageError` after ``wait_timeout``."""
        flight = Flight(self, "", "")
        token: Token = run_sync(flight, get_or_issue(flight), fetch)
        return token

    def forget(self, access_token: str | None = None) -> None:
        """Drop the token in memory (only if it is still ``access_token``, when one is given)."""
        with self._lock:
            current = self.token
            if access_token is None or (current and current.access_token == access_token):
                self.fresh_until = float("-inf")
                self.token = None

    def renew_after_fork(self) -> None:
        """A lock a parent's thread held at ``fork()`` would never be released in the child."""
        self._lock = threading.Lock()

    # -- what the engine asks of a store ---------------------------------------------------------
    def takeover_s(self) -> float:
        return 0.0

    def issuance_lock(self, api_key: str, api_secret: str) -> IssuanceLock:
        return LocalIssuanceLock(api_key, lock=self._lock, waiting_on=self._what)

    def read_token(self, api_key: str, api_secret: str, *, fresh: bool = False) -> Token | None:
        return self.token

    def write_token(
        self, api_key: str, api_secret: str, token: Token, deadline: float | None = None
    ) -> None:
        self.token = token
        self.bearer = token.bearer
        self.fresh_until = token.refresh_at(self.refresh_margin_s)

    def read_failure(self, api_key: str, api_secret: str) -> IssueFailure | None:
        return None

    def write_failure(self, api_key: str, api_secret: str, failure: IssueFailure) -> None:
        return None
