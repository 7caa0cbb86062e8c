"""The backend protocol, held to what the engine relies on: the contract's single-process
promises, and across processes one issuance for a fleet of sync and asyncio processes, a dead
holder taken over, and the failure hold, for the built-in backends and for a backend written in
the tests against the public protocol alone (``tests/sqlite_backend.py``, under 150 lines)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from backend_promises import assert_dead_holder_taken_over, assert_mixed_herd_issues_once
from herd import HERD_APP_KEY, HERD_SECRET, build_storage
from sqlite_backend import SqliteTokenStorage

from kis_safe_token import TokenIssueError
from kis_safe_token.testing import KisSimulator
from kis_safe_token.token import Token

# Before the import: the contract's asserts then report values, as a test module's do.
pytest.register_assert_rewrite("kis_safe_token.testing.contract")
from kis_safe_token.testing.contract import StorageFactory, TokenStorageContract  # noqa: E402

SOURCE = Path(__file__).with_name("sqlite_backend.py")


def test_the_protocol_backend_is_small() -> None:
    assert len(SOURCE.read_text().splitlines()) < 150


class TestSqliteTokenStorage(TokenStorageContract):
    @pytest.fixture
    def make_storage(self, tmp_path: Path) -> StorageFactory:
        def make(clock: Callable[[], float] = time.time) -> SqliteTokenStorage:
            storage = SqliteTokenStorage(str(tmp_path / "tokens.sqlite"))
            storage.clock = clock  # type: ignore[method-assign]
            return storage

        return make


@pytest.mark.parametrize("backend", ["file", "redis", "sqlite"])
def test_four_sync_and_four_asyncio_processes_issue_once(
    backend: str, spec_of: Callable[[str], dict[str, Any]]
) -> None:
    spec = spec_of(backend)
    build_storage(spec)  # created once before the herd (a SQLite schema, a folder)
    with KisSimulator(apps={HERD_APP_KEY: HERD_SECRET}, issue_latency_s=0.2) as sim:
        assert_mixed_herd_issues_once(spec, sim)


def make_token(name: str = "tok") -> Token:
    return Token(access_token=f"{name}-" + "x" * 40, expires_at=time.time() + 86_400)


@pytest.mark.parametrize("backend", ["redis", "sqlite"])
def test_a_dead_holders_lock_is_taken_over_after_its_ttl(
    backend: str, spec_of: Callable[[str], dict[str, Any]]
) -> None:
    """A holder that died holding the lock (never released, never extended): the next caller
    issues after the lock's ttl, not never. (The file lock dies with its process: the kernel
    frees it, as ``test_hardening`` shows with killed processes.)"""
    assert_dead_holder_taken_over(spec_of(backend))


@pytest.mark.parametrize("backend", ["file", "redis", "sqlite"])
def test_a_failed_issuance_is_held_for_the_fleet(
    backend: str, spec_of: Callable[[str], dict[str, Any]]
) -> None:
    """The holder's failure is seen by another process's store (another object here): it is
    re-raised without asking KIS until the hold ends."""
    spec = spec_of(backend)

    def refused() -> Token:
        raise TokenIssueError("app key revoked", code="EGW00105", status=403)

    with pytest.raises(TokenIssueError):
        build_storage(spec).get_or_issue(HERD_APP_KEY, HERD_SECRET, refused)
    asked: list[int] = []
    with pytest.raises(TokenIssueError, match="revoked"):
        build_storage(spec).get_or_issue(
            HERD_APP_KEY, HERD_SECRET, lambda: asked.append(1) or make_token()
        )
    assert asked == []
