"""The behaviour every :class:`~kis_safe_token.TokenStorage` must show, as a pytest test class.

Requires pytest. Subclass :class:`TokenStorageContract` under a name pytest collects and override
its ``make_storage`` fixture (docs/storages.md shows one).
"""

from __future__ import annotations

import functools
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

try:
    import pytest
except ImportError as exc:  # pragma: no cover - exercised only without pytest
    raise ImportError(
        "kis_safe_token.testing.contract requires pytest: pip install pytest"
    ) from exc

from ..errors import TokenIssueError
from ..failure import FAILURE_HOLD_S
from ..storage.base import TokenStorage
from ..token import Token, format_kst

__all__ = ["ManualClock", "StorageFactory", "TokenStorageContract"]

#: The keys of the seed's ``token_data`` dict, which ``load_token`` returns.
SEED_KEYS = frozenset(
    {"access_token", "access_token_token_expired", "timestamp", "api_key", "api_secret"}
)
#: How long a test waits for its threads before it calls the backend stuck.
THREAD_WAIT_S = 30.0
THREADS = 8
DAY_S = 86_400


class StorageFactory(Protocol):
    """Builds a new storage object on the current test's store, reading time from ``clock``."""

    def __call__(self, clock: Callable[[], float] = ...) -> TokenStorage: ...


class ManualClock:
    """A clock that starts at the real time and moves only when told to (:meth:`advance`)."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def new_app() -> tuple[str, str]:
    """A fresh (app key, secret) pair: tests sharing a store or a process do not meet."""
    tag = uuid.uuid4().hex
    return f"PScontract{tag[:20]}", f"contract-secret-{tag}"


def access_token(name: str) -> str:
    return f"contract-{name}-" + name[0] * 60


def make_token(name: str = "A", *, now: float | None = None, ttl_s: float = DAY_S) -> Token:
    """A token called ``name`` that expires ``ttl_s`` after ``now`` (default: the real time)."""
    return Token(access_token(name), int((time.time() if now is None else now) + ttl_s))


def seed_token_data(api_key: str, api_secret: str, token: Token) -> dict[str, Any]:
    """``token`` as the seed's five-key ``token_data`` dict (nothing of this library's own)."""
    return {
        "access_token": token.access_token,
        "access_token_token_expired": format_kst(token.expires_at),
        "timestamp": int(token.expires_at),
        "api_key": api_key,
        "api_secret": api_secret,
    }


class Issuer:
    """An issue function that counts its calls and hands out ``token`` (or raises ``error``)."""

    def __init__(self, token: Token | None = None, error: BaseException | None = None) -> None:
        self.token = make_token() if token is None else token
        self.error = error
        self.calls = 0
        self._guard = threading.Lock()

    def __call__(self) -> Token:
        with self._guard:
            self.calls += 1
        if self.error is not None:
            raise self.error
        return self.token


def stored(storage: TokenStorage, api_key: str, api_secret: str) -> str | None:
    """The access token ``load_token`` returns, or ``None``."""
    data = storage.load_token(api_key, api_secret)
    return None if data is None else data["access_token"]


def refuse() -> Token:
    """An issue function for callers that must be served from the cache."""
    raise AssertionError("issue() was called although a usable token is stored")


def issues_once(
    storage: TokenStorage, key: str, secret: str, name: str, now: float | None = None
) -> None:
    """``get_or_issue`` on ``storage`` calls KIS once and returns the token ``name`` issued."""
    issue = Issuer(make_token(name, now=now))
    assert storage.get_or_issue(key, secret, issue).access_token == access_token(name)
    assert issue.calls == 1


_GONE = object()
_JUNK: list[tuple[str, dict[str, Any]]] = [
    ("empty", {k: _GONE for k in SEED_KEYS}),
    ("no access_token", {"access_token": _GONE}),
    ("no api_key", {"api_key": _GONE}),
    ("no api_secret", {"api_secret": _GONE}),
    ("no expiry", {"timestamp": _GONE, "access_token_token_expired": _GONE}),
    ("unreadable expiry", {"timestamp": "tomorrow", "access_token_token_expired": _GONE}),
]


class TokenStorageContract:
    """The contract: seed methods, ``get_or_issue`` single flight, compare-and-delete, several
    app keys, wrong secrets, expiry, the failure hold and junk input, run on ``make_storage``."""

    #: Whether ``make_storage(clock=…)`` makes the backend read time from ``clock``.
    takes_clock: ClassVar[bool] = True

    @pytest.fixture
    def make_storage(self) -> StorageFactory:
        """Override: a factory of new storage objects on one store private to the test."""
        raise NotImplementedError(f"{type(self).__name__} must override the make_storage fixture")

    def _clocked(
        self, make_storage: StorageFactory
    ) -> tuple[ManualClock, Callable[[], TokenStorage]]:
        if not self.takes_clock:
            pytest.skip("the backend takes no clock (takes_clock = False)")
        clock = ManualClock()
        return clock, functools.partial(make_storage, clock=clock)

    # -- the seed's four methods -----------------------------------------------------------------
    def test_saved_token_loads_back_in_the_seed_shape(self, make_storage: StorageFactory) -> None:
        (key, secret), storage = new_app(), make_storage()
        saved = seed_token_data(key, secret, make_token())
        assert storage.save_token(dict(saved)) is True
        loaded = storage.load_token(key, secret)
        assert isinstance(loaded, dict)
        assert SEED_KEYS <= set(loaded)
        assert {k: loaded[k] for k in SEED_KEYS} == saved

    def test_check_token_valid_says_whether_a_token_is_stored(
        self, make_storage: StorageFactory
    ) -> None:
        (key, secret), storage = new_app(), make_storage()
        assert storage.check_token_valid(key, secret) is False
        assert storage.save_token(seed_token_data(key, secret, make_token()))
        assert storage.check_token_valid(key, secret) is True

    def test_deleted_token_is_gone(self, make_storage: StorageFactory) -> None:
        (key, secret), storage = new_app(), make_storage()
        assert storage.save_token(seed_token_data(key, secret, make_token()))
        assert storage.delete_token(key, secret) is True
        assert storage.load_token(key, secret) is None
        assert storage.check_token_valid(key, secret) is False
        assert isinstance(storage.delete_token(key, secret), bool)  # nothing left: no error

    def test_expired_token_is_not_loaded_and_get_or_issue_issues(
        self, make_storage: StorageFactory
    ) -> None:
        (key, secret), storage = new_app(), make_storage()
        storage.save_token(seed_token_data(key, secret, make_token("old", ttl_s=-60)))
        assert storage.load_token(key, secret) is None
        assert storage.check_token_valid(key, secret) is False
        issues_once(storage, key, secret, "new")

    def test_token_expiring_while_stored_is_a_miss_and_reissued(
        self, make_storage: StorageFactory
    ) -> None:
        clock, make = self._clocked(make_storage)
        (key, secret), storage = new_app(), make()
        assert storage.save_token(seed_token_data(key, secret, make_token("old", ttl_s=3600)))
        assert storage.load_token(key, secret) is not None
        clock.advance(3601)
        assert storage.load_token(key, secret) is None
        assert storage.check_token_valid(key, secret) is False
        issues_once(storage, key, secret, "new", now=clock())

    @pytest.mark.parametrize("junk", [change for _, change in _JUNK], ids=[n for n, _ in _JUNK])
    def test_junk_token_data_is_refused_without_raising(
        self, make_storage: StorageFactory, junk: dict[str, Any]
    ) -> None:
        (key, secret), storage = new_app(), make_storage()
        data = {**seed_token_data(key, secret, make_token()), **junk}
        assert storage.save_token({k: v for k, v in data.items() if v is not _GONE}) is False
        assert storage.load_token(key, secret) is None

    # -- credentials and stores --------------------------------------------------------------
    def test_wrong_secret_reads_as_a_miss(self, make_storage: StorageFactory) -> None:
        (key, secret), storage = new_app(), make_storage()
        assert storage.save_token(seed_token_data(key, secret, make_token()))
        for other in (storage, make_storage()):
            assert other.load_token(key, "not-" + secret) is None
            assert other.check_token_valid(key, "not-" + secret) is False
        assert storage.load_token(key, secret) is not None  # the right secret still reads it

    def test_app_keys_in_one_store_do_not_evict_each_other(
        self, make_storage: StorageFactory
    ) -> None:
        (key1, secret1), (key2, secret2) = new_app(), new_app()
        first, second = make_storage(), make_storage()
        assert first.save_token(seed_token_data(key1, secret1, make_token("A")))
        assert second.save_token(seed_token_data(key2, secret2, make_token("B")))
        for storage in (first, second):
            assert stored(storage, key1, secret1) == access_token("A")
            assert stored(storage, key2, secret2) == access_token("B")
        key3, secret3 = new_app()
        issues_once(first, key3, secret3, "C")
        assert first.delete_token(key2, secret2)
        assert second.load_token(key2, secret2) is None
        assert stored(second, key1, secret1) == access_token("A")
        assert second.get_or_issue(key3, secret3, refuse).access_token == access_token("C")

    def test_token_saved_by_one_object_is_read_by_another(
        self, make_storage: StorageFactory
    ) -> None:
        key, secret = new_app()
        writer, reader = make_storage(), make_storage()
        assert reader.load_token(key, secret) is None
        assert writer.save_token(seed_token_data(key, secret, make_token("A")))
        assert stored(reader, key, secret) == access_token("A")
        assert reader.get_or_issue(key, secret, refuse).access_token == access_token("A")
        assert reader.delete_token(key, secret)
        assert writer.load_token(key, secret) is None

    # -- single flight -------------------------------------------------------------------------
    def test_get_or_issue_issues_once_then_serves_the_cache(
        self, make_storage: StorageFactory
    ) -> None:
        (key, secret), storage = new_app(), make_storage()
        issued = make_token("A")
        issue = Issuer(issued)
        first = storage.get_or_issue(key, secret, issue)
        assert isinstance(first, Token)
        assert first.access_token == issued.access_token
        assert abs(first.expires_at - issued.expires_at) < 1
        again = storage.get_or_issue(key, secret, issue)
        assert isinstance(again, Token) and again.access_token == issued.access_token
        other = make_storage().get_or_issue(key, secret, issue)
        assert isinstance(other, Token) and other.access_token == issued.access_token
        assert issue.calls == 1
        assert stored(storage, key, secret) == issued.access_token

    @pytest.mark.parametrize("objects", ["one object", "an object per thread"])
    def test_threads_of_one_process_share_one_issuance(
        self, make_storage: StorageFactory, objects: str
    ) -> None:
        key, secret = new_app()
        shared = make_storage()
        storages = [shared if objects == "one object" else make_storage() for _ in range(THREADS)]
        entered, release = threading.Event(), threading.Event()
        inner = Issuer(make_token("A"))

        def issue() -> Token:
            entered.set()
            release.wait(THREAD_WAIT_S)  # hold the issuance while the others pile up
            return inner()

        barrier = threading.Barrier(THREADS)
        results: list[Token] = []
        errors: list[BaseException] = []

        def run(storage: TokenStorage) -> None:
            try:
                barrier.wait(THREAD_WAIT_S)
                results.append(storage.get_or_issue(key, secret, issue))
            except BaseException as exc:  # noqa: BLE001 - reported by the test thread below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(s,)) for s in storages]
        for t in threads:
            t.start()
        try:
            assert entered.wait(THREAD_WAIT_S), "no thread reached issue()"
        finally:
            release.set()
            for t in threads:
                t.join(THREAD_WAIT_S)
        assert not any(t.is_alive() for t in threads), "a thread is stuck in get_or_issue"
        assert errors == []
        assert inner.calls == 1
        assert len(results) == THREADS
        assert all(isinstance(t, Token) for t in results)
        assert {t.access_token for t in results} == {access_token("A")}

    def test_issue_returning_a_non_token_is_a_type_error(
        self, make_storage: StorageFactory
    ) -> None:
        (key, secret), storage = new_app(), make_storage()
        as_dict = seed_token_data(key, secret, make_token("A"))
        with pytest.raises(TypeError, match="Token"):
            storage.get_or_issue(key, secret, lambda: as_dict)  # type: ignore[arg-type, return-value]
        assert storage.load_token(key, secret) is None
        issues_once(storage, key, secret, "B")  # the lock was released: the next caller issues

    # -- the failure hold --------------------------------------------------------------------
    def test_failed_issuance_is_held_for_the_next_caller(
        self, make_storage: StorageFactory
    ) -> None:
        (key, secret), storage = new_app(), make_storage()
        issue = Issuer(error=TokenIssueError("KIS is down", code="EGW00000", status=500))
        with pytest.raises(TokenIssueError, match="KIS is down") as first:
            storage.get_or_issue(key, secret, issue)
        assert first.value is issue.error  # the holder gets KIS's own error
        for caller in (storage, make_storage()):
            with pytest.raises(TokenIssueError, match="KIS is down") as held:
                caller.get_or_issue(key, secret, issue)
            assert (held.value.code, held.value.status) == ("EGW00000", 500)
        assert issue.calls == 1

    def test_after_the_hold_the_next_caller_issues(self, make_storage: StorageFactory) -> None:
        clock, make = self._clocked(make_storage)
        (key, secret), storage = new_app(), make()
        failing = Issuer(error=TokenIssueError("KIS is down", code="EGW00000", status=500))
        with pytest.raises(TokenIssueError):
            storage.get_or_issue(key, secret, failing)
        clock.advance(FAILURE_HOLD_S - 1)
        with pytest.raises(TokenIssueError):
            make().get_or_issue(key, secret, failing)
        assert failing.calls == 1
        clock.advance(2)
        issues_once(make(), key, secret, "A", now=clock())
        assert storage.get_or_issue(key, secret, refuse).access_token == access_token("A")

    # -- compare-and-delete ------------------------------------------------------------------
    def test_invalidate_deletes_only_the_matching_token(self, make_storage: StorageFactory) -> None:
        (key, secret), storage = new_app(), make_storage()
        assert storage.invalidate_token(key, secret, access_token("A")) is False  # none stored
        assert storage.save_token(seed_token_data(key, secret, make_token("A")))
        assert storage.invalidate_token(key, secret, access_token("X")) is False
        assert stored(storage, key, secret) == access_token("A")
        assert make_storage().invalidate_token(key, secret, access_token("A")) is True
        assert storage.load_token(key, secret) is None
        assert storage.invalidate_token(key, secret, access_token("A")) is False

    def test_stale_invalidate_keeps_the_fresh_token(self, make_storage: StorageFactory) -> None:
        key, secret = new_app()
        late, fresh = make_storage(), make_storage()
        assert late.save_token(seed_token_data(key, secret, make_token("old")))
        assert stored(late, key, secret) == access_token("old")
        # Another worker saw "old" rejected first and already put a fresh token in its place.
        assert fresh.invalidate_token(key, secret, access_token("old")) is True
        fresh.get_or_issue(key, secret, Issuer(make_token("new")))
        assert late.invalidate_token(key, secret, access_token("old")) is False
        assert late.get_or_issue(key, secret, refuse).access_token == access_token("new")
