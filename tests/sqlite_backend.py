"""A token store in one SQLite file, written to the public backend protocol alone: what a user
adds to get fleet-wide single flight on a backend of their own. The contract tests
(``test_backend_contract.py``) hold it to the same promises as the built-in backends."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from typing import Any

from kis_safe_token import Token, TokenStorage
from kis_safe_token.crypto import Sealer, key_id
from kis_safe_token.storage import HELD, Attempt, Busy, IssuanceLock, IssueFailure

SCHEMA = """
CREATE TABLE IF NOT EXISTS entry (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS lock (name TEXT PRIMARY KEY, owner TEXT NOT NULL, until REAL NOT NULL);
"""


class SqliteTokenStorage(TokenStorage):
    """Tokens and failure records sealed in ``entry``; the issuance lock a row of ``lock`` with
    an expiry, so a dead holder blocks the fleet at most ``lock_ttl``."""

    def __init__(self, path: str, *, lock_ttl: float = 5.0) -> None:
        self.path, self.lock_ttl = path, lock_ttl
        self.wait_timeout = lock_ttl + 61 + 2 * 13.05 + 5  # the holder's worst case
        self._local = threading.local()
        self.db().executescript(SCHEMA)

    def db(self) -> sqlite3.Connection:
        """This thread's connection (sqlite3's may not cross threads, nor a fork)."""
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            local.pid = os.getpid()
        conn: sqlite3.Connection = local.conn
        return conn

    def takeover_s(self) -> float:
        return self.lock_ttl

    def _get(self, name: str) -> Any:
        row = self.db().execute("SELECT value FROM entry WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def _put(self, name: str, value: bytes | None) -> None:
        if value is None:
            self.db().execute("DELETE FROM entry WHERE name = ?", (name,))
        else:
            self.db().execute("REPLACE INTO entry VALUES (?, ?)", (name, value))

    # -- the primitives the engine uses ----------------------------------------------------------
    def read_token(self, api_key: str, api_secret: str, *, fresh: bool = False) -> Token | None:
        return Sealer(api_key, api_secret).open(self._get(key_id(api_key)))

    def write_token(
        self, api_key: str, api_secret: str, token: Token, deadline: float | None = None
    ) -> None:
        self._put(key_id(api_key), Sealer(api_key, api_secret).seal(token))
        self._put(key_id(api_key) + ":failure", None)

    def read_failure(self, api_key: str, api_secret: str) -> IssueFailure | None:
        return Sealer(api_key, api_secret).open_failure(self._get(key_id(api_key) + ":failure"))

    def write_failure(self, api_key: str, api_secret: str, failure: IssueFailure) -> None:
        self._put(key_id(api_key) + ":failure", Sealer(api_key, api_secret).seal_failure(failure))

    def invalidate_token(self, api_key: str, api_secret: str, access_token: str) -> bool:
        db = self.db()
        db.execute("BEGIN IMMEDIATE")  # compare-and-delete in one write transaction
        try:
            token = self.read_token(api_key, api_secret)
            if token is None or token.access_token != access_token:
                return False
            self._put(key_id(api_key), None)
            return True
        finally:
            db.execute("COMMIT")

    def issuance_lock(self, api_key: str, api_secret: str) -> IssuanceLock:
        return SqliteLock(self, api_key, api_secret)

    # -- the seed's four methods, on the primitives ----------------------------------------------
    def save_token(self, token_data: dict[str, Any]) -> bool:
        try:
            token = Token.from_token_data(token_data)
            self.write_token(token_data["api_key"], token_data["api_secret"], token)
        except (KeyError, TypeError, ValueError):
            return False
        return True

    def load_token(self, api_key: str, api_secret: str) -> dict[str, Any] | None:
        token = self.read_token(api_key, api_secret)
        if token is None or not token.is_valid(self.clock()):
            return None
        return token.to_token_data(api_key, api_secret)

    def check_token_valid(self, api_key: str, api_secret: str) -> bool:
        return self.load_token(api_key, api_secret) is not None

    def delete_token(self, api_key: str, api_secret: str) -> bool:
        self._put(key_id(api_key), None)
        return True


class SqliteLock(IssuanceLock):
    """Taken by inserting the row (or replacing an expired one) in a write transaction."""

    def __init__(self, storage: SqliteTokenStorage, api_key: str, api_secret: str) -> None:
        self.storage, self.api_key, self.api_secret = storage, api_key, api_secret
        self.name, self.owner = key_id(api_key), uuid.uuid4().hex

    def attempt(self) -> Attempt:
        db, now = self.storage.db(), time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT owner, until FROM lock WHERE name = ?", (self.name,))
            holder = row.fetchone()
            if holder is None or holder[0] == self.owner or holder[1] < now:
                db.execute(
                    "REPLACE INTO lock VALUES (?, ?, ?)",
                    (self.name, self.owner, now + self.storage.lock_ttl),
                )
                return HELD
        finally:
            db.execute("COMMIT")
        token = self.storage.read_token(self.api_key, self.api_secret)
        if self.storage.usable(token):
            return token
        failure = self.storage.read_failure(self.api_key, self.api_secret)
        if failure is not None and failure.active(self.storage.clock()):
            return failure
        return Busy(0.05, "the process holding the SQLite issuance lock")

    def extend(self) -> None:
        self.storage.db().execute(
            "UPDATE lock SET until = ? WHERE name = ? AND owner = ?",
            (time.time() + self.storage.lock_ttl, self.name, self.owner),
        )

    def release(self) -> None:
        self.storage.db().execute(
            "DELETE FROM lock WHERE name = ? AND owner = ?", (self.name, self.owner)
        )
