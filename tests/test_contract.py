"""The storage contract (:mod:`kis_safe_token.testing.contract`) run against every backend:
the file, the two Redis backends on a real redis-server, and a dict-backed subclass that
implements only the seed's four methods (what ``TokenStorage``'s docstring promises works)."""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kis_safe_token import (
    FileTokenStorage,
    LockedRedisTokenStorage,
    RedisTokenStorage,
    TokenStorage,
)
from kis_safe_token.token import Token

# Before the import: the contract's asserts then report values, as a test module's do.
pytest.register_assert_rewrite("kis_safe_token.testing.contract")
from kis_safe_token.testing.contract import StorageFactory, TokenStorageContract  # noqa: E402


class DictTokenStorage(TokenStorage):
    """The seed's four methods over a dict shared by its instances, and nothing else."""

    def __init__(self, store: dict[str, dict[str, Any]]) -> None:
        self.store = store
        self.guard = threading.Lock()

    def save_token(self, token_data: dict[str, Any]) -> bool:
        try:
            Token.from_token_data(token_data)
            api_key, api_secret = token_data["api_key"], token_data["api_secret"]
        except (KeyError, TypeError, ValueError):
            return False
        with self.guard:
            self.store[api_key] = dict(token_data, api_secret=api_secret)
        return True

    def load_token(self, api_key: str, api_secret: str) -> dict[str, Any] | None:
        with self.guard:
            data = self.store.get(api_key)
        if data is None or not hmac.compare_digest(data["api_secret"], api_secret):
            return None
        if not Token.from_token_data(data).is_valid(self.clock()):
            return None
        return dict(data)

    def check_token_valid(self, api_key: str, api_secret: str) -> bool:
        return self.load_token(api_key, api_secret) is not None

    def delete_token(self, api_key: str, api_secret: str) -> bool:
        with self.guard:
            self.store.pop(api_key, None)
        return True


class TestDictTokenStorage(TokenStorageContract):
    @pytest.fixture
    def make_storage(self) -> StorageFactory:
        store: dict[str, dict[str, Any]] = {}

        def make(clock: Callable[[], float] = time.time) -> TokenStorage:
            storage = DictTokenStorage(store)
            storage.clock = clock  # the base class's public attribute: no constructor needed
            return storage

        return make


class TestFileTokenStorage(TokenStorageContract):
    @pytest.fixture
    def make_storage(self, token_path: Path) -> StorageFactory:
        return lambda clock=time.time: FileTokenStorage(token_path, clock=clock)


class TestRedisTokenStorage(TokenStorageContract):
    @pytest.fixture
    def make_storage(self, redis_url: str, key_prefix: str) -> StorageFactory:
        return lambda clock=time.time: RedisTokenStorage(
            redis_url, key_prefix=key_prefix, clock=clock
        )


class TestLockedRedisTokenStorage(TokenStorageContract):
    @pytest.fixture
    def make_storage(self, redis_url: str, key_prefix: str) -> StorageFactory:
        return lambda clock=time.time: LockedRedisTokenStorage(
            redis_url, key_prefix=key_prefix, clock=clock
        )
