from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import stat
import threading
import time
from pathlib import Path
from typing import Any

import filelock
import pytest
from conftest import HeldIssuance
from herd import run_herd

from kis_safe_token import FileTokenStorage, TokenStorageError
from kis_safe_token.crypto import Sealer
from kis_safe_token.testing import KisSimulator
from kis_safe_token.token import Token

TOKEN_A = "tokA-" + "a" * 80
TOKEN_B = "tokB-" + "b" * 80


def make_token(token: str = TOKEN_A) -> Token:
    return Token(token, time.time() + 86_400)


def token_data(token: str = TOKEN_A) -> dict[str, Any]:
    """A seed ``token_data`` dict for key1/secret1, valid for a day."""
    return make_token(token).to_token_data("key1", "secret1")


def test_file_holds_neither_token_nor_secret_in_clear(token_path: Path) -> None:
    FileTokenStorage(token_path).save_token(token_data())
    raw = token_path.read_bytes()
    assert TOKEN_A.encode() not in raw and b"secret1" not in raw and b"key1" not in raw
    assert json.loads(raw)["format"] == "kis_safe_token"


def test_file_is_0600_and_new_folder_0700(token_path: Path) -> None:
    FileTokenStorage(token_path).save_token(token_data())
    assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_path.parent.stat().st_mode) == 0o700


def test_lock_file_stays_after_issuance(token_path: Path) -> None:
    storage = FileTokenStorage(token_path)
    storage.get_or_issue("key1", "secret1", make_token)
    assert storage.lock_file.exists()
    assert stat.S_IMODE(storage.lock_file.stat().st_mode) & 0o077 == 0


class _Planted:
    """A pickle that would create a file if anybody ever unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize(
    "kind", ["pickle", "truncated", "tampered", "garbage", "wrong-format", "empty"]
)
def test_unreadable_file_is_a_miss_and_is_replaced(
    token_path: Path, tmp_path: Path, kind: str
) -> None:
    storage = FileTokenStorage(token_path)
    storage.save_token(token_data())
    good = token_path.read_bytes()
    marker = tmp_path / "pwned"
    if kind == "pickle":
        bad = pickle.dumps({"access_token": _Planted(marker), "api_key": "key1"})
    elif kind == "truncated":
        bad = good[: len(good) // 2]
    elif kind == "tampered":
        doc = json.loads(good)
        ((entry_id, sealed),) = doc["entries"].items()
        doc["entries"][entry_id] = sealed[:40] + ("A" if sealed[40] != "A" else "B") + sealed[41:]
        bad = json.dumps(doc).encode()
    elif kind == "garbage":
        bad = os.urandom(300)
    elif kind == "wrong-format":
        bad = json.dumps({"format": "kis_safe_token", "version": 99, "entries": {}}).encode()
    else:
        bad = b""
    token_path.write_bytes(bad)
    fresh = FileTokenStorage(token_path)
    assert fresh.load_token("key1", "secret1") is None
    assert not marker.exists()
    got = fresh.get_or_issue("key1", "secret1", lambda: make_token(TOKEN_B))
    assert got.access_token == TOKEN_B
    assert FileTokenStorage(token_path).load_token("key1", "secret1")["access_token"] == TOKEN_B
    assert not marker.exists()


def test_warm_read_does_not_decrypt_an_unchanged_file(
    token_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = FileTokenStorage(token_path)
    storage.save_token(token_data())
    assert storage.load_token("key1", "secret1")
    opened: list[int] = []
    real_open = Sealer.open
    monkeypatch.setattr(
        Sealer, "open", lambda self, sealed: opened.append(1) or real_open(self, sealed)
    )
    for _ in range(5):
        assert storage.load_token("key1", "secret1")
    assert opened == []
    FileTokenStorage(token_path).save_token(token_data(token=TOKEN_B))  # the file changes
    assert storage.load_token("key1", "secret1")["access_token"] == TOKEN_B
    assert opened == [1]


def test_wait_for_a_stuck_holder_ends_in_storage_error(token_path: Path) -> None:
    waiter = FileTokenStorage(token_path, wait_timeout=0.3)
    with HeldIssuance(FileTokenStorage(token_path), make_token):
        started = time.monotonic()
        with pytest.raises(TokenStorageError, match="timed out"):
            waiter.get_or_issue("key1", "secret1", lambda: pytest.fail("waiter must not issue"))
        assert time.monotonic() - started < 3


def test_eight_processes_cold_start_share_one_issuance(sim: KisSimulator, token_path: Path) -> None:
    herd = run_herd(8, {"kind": "file", "path": str(token_path)}, sim.base_url)
    assert herd.errors == []
    assert len(herd.rows) == 8
    assert sim.issued == 1
    assert sim.rate_limited == 0
    assert len(herd.tokens()) == 1
    later = run_herd(1, {"kind": "file", "path": str(token_path)}, sim.base_url)
    assert later.errors == []
    assert later.tokens() == herd.tokens()
    assert sim.issued == 1


def test_four_live_clients_make_one_reissue_after_expiry(
    sim: KisSimulator, token_path: Path
) -> None:
    herd = run_herd(
        4,
        {"kind": "file", "path": str(token_path)},
        sim.base_url,
        rounds=2,
        between_rounds=lambda _: sim.expire_tokens(),
    )
    assert herd.errors == []
    assert sim.issued == 2
    assert sim.counts["EGW00123"] >= 1
    assert sim.rate_limited == 0
    assert len(herd.tokens(0)) == 1 and len(herd.tokens(1)) == 1
    assert herd.tokens(0) != herd.tokens(1)


def _hammer_writer(path: str, n: int, barrier: Any) -> None:
    storage = FileTokenStorage(path)
    barrier.wait(30)
    for i in range(n):
        storage.save_token(token_data(token=f"tok{i:06d}-" + "w" * 200))


def _hammer_reader(path: str, n: int, barrier: Any, out: Any) -> None:
    sealer = Sealer("key1", "secret1")
    bad = reads = 0
    barrier.wait(30)
    deadline = time.monotonic() + 60
    while reads < n and time.monotonic() < deadline:
        try:
            doc = json.loads(Path(path).read_bytes())
            (sealed,) = doc["entries"].values()
            if sealer.open(sealed) is None:
                bad += 1
        except Exception:
            bad += 1
        reads += 1
    out.put((reads, bad))


def test_reader_never_sees_a_torn_file_while_writers_replace_it(token_path: Path) -> None:
    FileTokenStorage(token_path).save_token(token_data())
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(4)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_hammer_writer, args=(str(token_path), 150, barrier)) for _ in range(2)
    ]
    procs += [
        ctx.Process(target=_hammer_reader, args=(str(token_path), 3000, barrier, out))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=90) for _ in range(2)]
    for p in procs:
        p.join(120)  # the writers' 150 fsynced saves each may outlast the readers on a busy box
        assert p.exitcode == 0
    assert all(reads > 100 for reads, _ in results)
    assert [bad for _, bad in results] == [0, 0]


def test_invalidating_an_already_replaced_token_takes_no_lock(token_path: Path) -> None:
    storage = FileTokenStorage(token_path, wait_timeout=0.2)
    storage.save_token(token_data(token=TOKEN_B))
    other = filelock.FileLock(storage.lock_file)
    with other.acquire(timeout=5):  # another process is busy issuing
        started = time.monotonic()
        assert storage.invalidate_token("key1", "secret1", TOKEN_A) is False
        assert time.monotonic() - started < storage.wait_timeout  # no wait for the lock
        with pytest.raises(TokenStorageError, match="timed out"):
            storage.invalidate_token("key1", "secret1", TOKEN_B)  # this one needs the lock
    assert storage.invalidate_token("key1", "secret1", TOKEN_B) is True
    assert storage.load_token("key1", "secret1") is None


def test_two_threads_making_the_lock_at_once_get_one_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock object is made on first use (a warm read imports no filelock), under a guard:
    two objects on one file would let a holder's re-entrant write deadlock on itself."""
    made: list[object] = []
    both_inside = threading.Barrier(2)
    real = filelock.FileLock

    def slow_lock(*args: Any, **kwargs: Any) -> Any:
        try:
            both_inside.wait(0.5)  # a second maker arrives only without the guard
        except threading.BrokenBarrierError:
            pass
        lock = real(*args, **kwargs)
        made.append(lock)
        return lock

    monkeypatch.setattr(filelock, "FileLock", slow_lock)
    storage = FileTokenStorage(tmp_path / "tokens.json")
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(storage._lock())) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(made) == 1 and got == [made[0], made[0]]


class _OtherProcessHolds:
    """The issuance lock held as another process holds it: ``flock`` on an open file of its own."""

    def __init__(self, storage: FileTokenStorage) -> None:
        import fcntl

        storage.lock_file.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(storage.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def release(self) -> None:
        os.close(self._fd)  # closing the file drops the flock, as a holder's death does


@pytest.mark.skipif(os.name == "nt", reason="flock: Windows waiters poll")
def test_a_waiter_is_woken_by_the_release_not_by_its_poll(token_path: Path) -> None:
    """``wait`` with a 60 s bound returns at the release (a sleeping waiter would take 60 s), and
    the next attempt takes the lock at once instead of at its next lock retry."""
    storage = FileTokenStorage(token_path)
    holder = _OtherProcessHolds(storage)
    lock = storage.issuance_lock("key1", "secret1")
    busy = lock.attempt()
    assert busy is not True and getattr(busy, "wake", None) is not None
    waiter = threading.Thread(target=lock.wait, args=(busy, 60.0))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive()  # not woken before the release
    holder.release()
    waiter.join(10)
    assert not waiter.is_alive()
    assert lock.attempt() is True
    lock.release()


@pytest.mark.skipif(os.name == "nt", reason="flock: Windows waiters poll")
def test_an_asyncio_waiter_is_woken_by_the_release_on_the_loop(token_path: Path) -> None:
    import asyncio

    storage = FileTokenStorage(token_path)
    holder = _OtherProcessHolds(storage)
    lock = storage.issuance_lock("key1", "secret1")

    async def wait_for_the_release() -> object:
        busy = lock.attempt()
        assert busy is not True and getattr(busy, "wake", None) is not None
        threads = threading.active_count()
        waiting = asyncio.ensure_future(lock.wait_async(busy, 60.0))  # type: ignore[arg-type]
        await asyncio.sleep(0.3)
        assert not waiting.done() and threading.active_count() == threads  # no worker thread
        holder.release()
        await asyncio.wait_for(waiting, 10)
        return lock.attempt()

    assert asyncio.run(wait_for_the_release()) is True
    lock.release()


@pytest.mark.skipif(os.name == "nt", reason="flock: Windows waiters poll")
def test_a_waiter_does_not_poll_the_token_file_while_the_holder_works(
    token_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One second behind a holder: a handful of looks (about one per lock retry), where polling
    every 4-8 ms made over a hundred; the holder's save is what the waiter then gets."""
    storage = FileTokenStorage(token_path)
    lock_class = type(storage.issuance_lock("key1", "secret1"))
    real_attempt = lock_class.attempt
    attempts = 0

    def counted(self: Any) -> Any:
        nonlocal attempts
        attempts += 1
        return real_attempt(self)

    got: list[Token] = []
    with HeldIssuance(FileTokenStorage(token_path), make_token) as held:
        monkeypatch.setattr(lock_class, "attempt", counted)
        waiter = threading.Thread(
            target=lambda: got.append(storage.get_or_issue("key1", "secret1", make_token))
        )
        waiter.start()
        time.sleep(1.0)  # the holder at work: the waiter's looks meanwhile are what is counted
        held.finish()
        waiter.join(10)
    assert not waiter.is_alive() and got[0].access_token == TOKEN_A
    assert 1 <= attempts <= 20
