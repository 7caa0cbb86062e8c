"""Odd or hostile things at the token path, the lock path and the folders the library creates.

Whatever sits at the token path, a read finishes in bounded time and bounded memory: a FIFO, a
symlink (to a device or to a file elsewhere), a huge file or a file owned by another user is a
logged cache miss that the next save replaces; a directory is a :class:`TokenStorageError`. Cases
that hung or ate memory before run in a spawned process under a deadline and an address-space
limit, so a regression fails the test instead of hanging or starving the suite.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import queue
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import filelock
import pytest

from kis_safe_token import FileTokenStorage, TokenStorageError, create_token_storage
from kis_safe_token.token import Token

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file types and modes")

TOKEN_A = "tokA-" + "a" * 80
TOKEN_B = "tokB-" + "b" * 80
CHILD_DEADLINE_S = 60.0
"""Spawning the child and importing the library takes a second or two, far more on a busy CI box;
a hang is only reported this late when something regressed."""
OPERATION_BOUND_S = 3.0
"""How long the hostile read plus an issuance may take inside the child."""
SMALL_FILE_BYTES = 4096
"""A token file with one or two entries is well under this."""


def make_token(token: str = TOKEN_A) -> Token:
    return Token(token, time.time() + 86_400)


def token_data(token: str = TOKEN_A) -> dict[str, Any]:
    """The seed's dict of ``make_token(token)``, for ``save_token``."""
    return make_token(token).to_token_data("key1", "secret1")


def fail_issue() -> Token:
    raise AssertionError("must not issue")


# -- running a hostile case in a child with a deadline and a memory limit ---------------------


def _child(
    scenario: Callable[[str], dict[str, Any]], path: str, memory_headroom: int, out: Any
) -> None:
    if memory_headroom:
        import resource

        page = os.sysconf("SC_PAGE_SIZE")
        with open("/proc/self/statm") as fh:
            used = int(fh.read().split()[0]) * page
        resource.setrlimit(resource.RLIMIT_AS, (used + memory_headroom, used + memory_headroom))
    try:
        out.put(("ok", scenario(path)))
    except BaseException as exc:  # report MemoryError and friends to the parent
        out.put(("raised", f"{type(exc).__name__}: {exc}"))


def run_bounded(
    scenario: Callable[[str], dict[str, Any]],
    path: Path,
    *,
    memory_headroom: int = 512 << 20,
) -> dict[str, Any]:
    """``scenario(str(path))`` in a spawned process; a hang or an exception fails the test."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_child, args=(scenario, str(path), memory_headroom, out))
    proc.start()
    try:
        status, value = out.get(timeout=CHILD_DEADLINE_S)
    except queue.Empty:
        pytest.fail(f"{scenario.__name__} did not finish within {CHILD_DEADLINE_S} s (hung)")
    finally:
        proc.kill()
        proc.join(10)
    if status != "ok":
        pytest.fail(f"{scenario.__name__} raised {value}")
    result: dict[str, Any] = value
    return result


def _bytes_read() -> int:
    """Bytes this process has read through read(2) and friends, page cache included."""
    with open("/proc/self/io") as fh:
        for line in fh:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def load_then_issue(path: str) -> dict[str, Any]:
    storage = FileTokenStorage(path, wait_timeout=5)
    started = time.monotonic()
    loaded = storage.load_token("key1", "secret1")
    got = storage.get_or_issue("key1", "secret1", make_token)
    return {
        "loaded": loaded,
        "issued": got.access_token,
        "elapsed_s": time.monotonic() - started,
    }


def load_then_save_twice(path: str) -> dict[str, Any]:
    storage = FileTokenStorage(path, wait_timeout=5)
    started = time.monotonic()
    before = _bytes_read()
    loaded = storage.load_token("key1", "secret1")
    after_load = _bytes_read()
    first_saved = storage.save_token(token_data())
    after_first = _bytes_read()
    size_after_first = os.lstat(path).st_size
    second_saved = storage.save_token(token_data(TOKEN_B))
    after_second = _bytes_read()
    return {
        "loaded": loaded,
        "saved": [first_saved, second_saved],
        "read_by_load": after_load - before,
        "read_by_first_save": after_first - after_load,
        "read_by_second_save": after_second - after_first,
        "size_after_first_save": size_after_first,
        "elapsed_s": time.monotonic() - started,
    }


def issue_holding_lock(path: str) -> dict[str, Any]:
    storage = FileTokenStorage(path, wait_timeout=2)
    started = time.monotonic()
    try:
        got = storage.get_or_issue("key1", "secret1", make_token).access_token
    except TokenStorageError as exc:
        got = f"TokenStorageError: {exc}"
    return {"got": got, "elapsed_s": time.monotonic() - started}


def assert_miss_then_replaced(result: dict[str, Any], path: Path) -> None:
    assert result["loaded"] is None
    assert result["issued"] == TOKEN_A
    assert result["elapsed_s"] < OPERATION_BOUND_S
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode)
    assert st.st_size < SMALL_FILE_BYTES
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert FileTokenStorage(path).load_token("key1", "secret1")["access_token"] == TOKEN_A


@pytest.fixture
def token_dir(token_path: Path) -> Path:
    token_path.parent.mkdir(mode=0o700)
    return token_path.parent


# -- the token path ------------------------------------------------------------------------


def refuse_then_touch_nothing(path: str) -> dict[str, Any]:
    """Every operation on a token path that is not the library's own file: an error or a miss
    in bounded time, nothing written there or beside it."""
    storage = FileTokenStorage(path, wait_timeout=5)
    started = time.monotonic()
    result: dict[str, Any] = {"loaded": storage.load_token("key1", "secret1")}
    result["saved"] = storage.save_token(token_data())
    errors = []
    for attempt in (
        lambda: storage.get_or_issue("key1", "secret1", fail_issue),
        lambda: storage.rate_limiter("key1", 20),
        lambda: storage.invalidate_token("key1", "secret1", TOKEN_A),
    ):
        try:
            attempt()
            errors.append("no error")
        except TokenStorageError as exc:
            errors.append(str(exc))
    result["errors"] = errors
    result["elapsed_s"] = time.monotonic() - started
    return result


def assert_refused_and_untouched(result: dict[str, Any], path: Path, kind: str) -> None:
    assert result["loaded"] is None and result["saved"] is False
    assert len(result["errors"]) == 3
    for message in result["errors"]:
        assert f"is {kind}, not a token file" in message and str(path) in message, message
    assert result["elapsed_s"] < OPERATION_BOUND_S
    siblings = sorted(p.name for p in path.parent.iterdir() if p.name != path.name)
    assert siblings == [], siblings  # no lock, rate or temporary file beside it


@pytest.mark.timeout(120)
def test_fifo_at_the_token_path_is_refused_and_left_alone(
    token_dir: Path, token_path: Path
) -> None:
    os.mkfifo(token_path, 0o600)
    assert_refused_and_untouched(
        run_bounded(refuse_then_touch_nothing, token_path), token_path, "a FIFO"
    )
    assert stat.S_ISFIFO(os.lstat(token_path).st_mode)


@pytest.mark.timeout(120)
def test_device_node_at_the_token_path_is_refused_and_left_alone(tmp_path: Path) -> None:
    """Pointed at a device node (``/dev/null`` as root): the node stays a node, and nothing
    is created in its folder. A node of our own in a private folder stands in for ``/dev``."""
    folder = tmp_path / "dev"
    folder.mkdir(mode=0o700)
    node = folder / "null"
    # The real one first (any user): refused before anything is created in /dev.
    with pytest.raises(TokenStorageError, match="/dev/null is a character device"):
        FileTokenStorage("/dev/null").get_or_issue("key1", "secret1", fail_issue)
    assert not Path("/dev/null.lock").exists()
    try:
        os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
    except PermissionError:  # a privilege, not a missing part: CI runs as root and gets here
        pytest.skip("making a device node needs root")
    assert_refused_and_untouched(
        run_bounded(refuse_then_touch_nothing, node), node, "a character device"
    )
    assert stat.S_ISCHR(os.lstat(node).st_mode)


def test_relative_file_path_is_made_absolute_once_and_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="kis_safe_token"):
        storage = FileTokenStorage("cache/tokens.json")
    assert storage.token_file == tmp_path / "cache" / "tokens.json"
    assert f"is {tmp_path / 'cache' / 'tokens.json'}" in caplog.text
    monkeypatch.chdir("/")  # a later chdir() does not move the store
    assert storage.save_token(token_data())
    assert (tmp_path / "cache" / "tokens.json").is_file()
    monkeypatch.setenv("KOREA_INVESTMENT_TOKEN_FILE", "cache/tokens.json")
    with pytest.raises(ValueError, match="KOREA_INVESTMENT_TOKEN_FILE must be an absolute path"):
        create_token_storage()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_symlink_to_a_device_is_a_miss_and_is_replaced(
    token_dir: Path, token_path: Path, device: str
) -> None:
    token_path.symlink_to(device)
    assert_miss_then_replaced(run_bounded(load_then_issue, token_path), token_path)
    assert stat.S_ISCHR(os.stat(device).st_mode)


def test_unix_socket_at_the_token_path_is_refused_and_left_alone(
    token_dir: Path, token_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(token_dir)  # a socket's path must be short
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(token_path.name)
        assert stat.S_ISSOCK(os.lstat(token_path).st_mode)
        assert_refused_and_untouched(
            refuse_then_touch_nothing(str(token_path)), token_path, "a socket"
        )
        assert stat.S_ISSOCK(os.lstat(token_path).st_mode)


def test_symlink_to_a_token_file_elsewhere_is_not_followed(
    token_dir: Path, token_path: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere" / "tokens.json"
    FileTokenStorage(elsewhere).save_token(token_data(TOKEN_B))
    original = elsewhere.read_bytes()
    token_path.symlink_to(elsewhere)
    storage = FileTokenStorage(token_path)
    assert storage.load_token("key1", "secret1") is None
    assert storage.get_or_issue("key1", "secret1", make_token).access_token == TOKEN_A
    assert elsewhere.read_bytes() == original
    assert stat.S_ISREG(os.lstat(token_path).st_mode)
    assert FileTokenStorage(elsewhere).load_token("key1", "secret1")["access_token"] == TOKEN_B
    assert FileTokenStorage(token_path).load_token("key1", "secret1")["access_token"] == TOKEN_A


def test_warm_read_of_a_symlinked_token_path_stays_a_miss_when_its_target_changes(
    token_dir: Path, token_path: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere" / "tokens.json"
    token_path.symlink_to(elsewhere)
    storage = FileTokenStorage(token_path)
    assert storage.load_token("key1", "secret1") is None
    FileTokenStorage(elsewhere).save_token(token_data(TOKEN_B))  # the target appears
    assert storage.load_token("key1", "secret1") is None


@pytest.mark.timeout(120)
@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="counts bytes via /proc")
@pytest.mark.parametrize("kind", ["sparse-100MB", "our-format-3MiB"])
def test_huge_token_file_is_a_miss_read_no_further_than_the_cap_and_replaced_small(
    token_dir: Path, token_path: Path, kind: str
) -> None:
    if kind == "sparse-100MB":
        with open(token_path, "wb") as fh:
            fh.truncate(100 << 20)
    else:
        junk = {f"junk{i}": "A" * (1 << 20) for i in range(3)}
        doc = {"format": "kis_safe_token", "version": 1, "entries": junk}
        token_path.write_text(json.dumps(doc))
    os.chmod(token_path, 0o600)
    result = run_bounded(load_then_save_twice, token_path, memory_headroom=0)
    assert result["loaded"] is None
    assert result["saved"] == [True, True]
    assert result["read_by_load"] < 2 << 20
    assert result["read_by_first_save"] < 2 << 20
    assert result["size_after_first_save"] < SMALL_FILE_BYTES
    assert result["read_by_second_save"] < 1 << 20
    assert result["elapsed_s"] < OPERATION_BOUND_S
    assert os.lstat(token_path).st_size < SMALL_FILE_BYTES
    assert FileTokenStorage(token_path).load_token("key1", "secret1")["access_token"] == TOKEN_B


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown needs root")
def test_token_file_owned_by_another_user_is_a_miss_even_for_root(
    token_dir: Path, token_path: Path
) -> None:
    FileTokenStorage(token_path).save_token(token_data(TOKEN_B))
    os.chown(token_path, 65534, 65534)
    storage = FileTokenStorage(token_path)
    assert storage.load_token("key1", "secret1") is None
    assert storage.get_or_issue("key1", "secret1", make_token).access_token == TOKEN_A
    assert os.lstat(token_path).st_uid == os.geteuid()
    assert FileTokenStorage(token_path).load_token("key1", "secret1")["access_token"] == TOKEN_A


NOBODY = 65534


def load_then_issue_as_nobody(path: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as warm_up:  # import what the scenario needs, as root
        load_then_issue(os.path.join(warm_up, "tokens.json"))
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    return load_then_issue(path)


@pytest.mark.timeout(120)
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="setuid needs root")
def test_unreadable_token_file_of_another_user_is_a_miss_and_is_replaced() -> None:
    outside = Path(tempfile.mkdtemp())  # pytest's tmp_path is closed to other users
    try:
        os.chmod(outside, 0o755)
        token_path = outside / "cache" / "tokens.json"
        FileTokenStorage(outside / "planted.json").save_token(token_data(TOKEN_B))
        token_path.parent.mkdir(mode=0o700)
        os.chown(token_path.parent, NOBODY, NOBODY)
        os.replace(outside / "planted.json", token_path)  # root's, 0600: nobody gets EACCES
        result = run_bounded(load_then_issue_as_nobody, token_path)
        assert result["loaded"] is None
        assert result["issued"] == TOKEN_A
        assert result["elapsed_s"] < OPERATION_BOUND_S
        st = os.lstat(token_path)
        assert stat.S_ISREG(st.st_mode) and st.st_uid == NOBODY
        assert stat.S_IMODE(st.st_mode) == 0o600
    finally:
        shutil.rmtree(outside)


def test_directory_at_the_token_path_is_a_storage_error_without_issuing(
    token_dir: Path, token_path: Path
) -> None:
    token_path.mkdir(mode=0o700)
    (token_path / "keep").write_text("a user's file")
    storage = FileTokenStorage(token_path, wait_timeout=1)
    started = time.monotonic()
    assert storage.load_token("key1", "secret1") is None
    with pytest.raises(TokenStorageError, match="directory"):
        storage.get_or_issue("key1", "secret1", fail_issue)
    assert storage.save_token(token_data()) is False
    assert time.monotonic() - started < OPERATION_BOUND_S
    assert (token_path / "keep").read_text() == "a user's file"


def test_miss_is_logged_once_with_the_path_and_never_the_contents(
    token_dir: Path, token_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text('{"secret-looking": "content-never-logged"}')
    token_path.symlink_to(elsewhere)
    storage = FileTokenStorage(token_path)
    with caplog.at_level("WARNING", logger="kis_safe_token"):
        assert storage.load_token("key1", "secret1") is None
        assert storage.load_token("key1", "secret1") is None
        storage.get_or_issue("key1", "secret1", make_token)
    warnings = [r.getMessage() for r in caplog.records if "symbolic link" in r.getMessage()]
    assert len(warnings) == 1
    assert str(token_path) in warnings[0]
    assert "content-never-logged" not in caplog.text


# -- the lock path -------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_symlink_at_the_lock_path_is_a_storage_error_and_its_target_untouched(
    token_dir: Path, token_path: Path, tmp_path: Path
) -> None:
    precious = tmp_path / "precious"
    precious.write_bytes(b"do not touch")
    Path(str(token_path) + ".lock").symlink_to(precious)
    result = run_bounded(issue_holding_lock, token_path)
    assert result["got"].startswith("TokenStorageError")
    assert result["elapsed_s"] < OPERATION_BOUND_S
    assert precious.read_bytes() == b"do not touch"
    assert not token_path.exists()


@pytest.mark.timeout(120)
def test_fifo_at_the_lock_path_still_locks_without_blocking(
    token_dir: Path, token_path: Path
) -> None:
    lock_path = Path(str(token_path) + ".lock")
    os.mkfifo(lock_path, 0o600)
    result = run_bounded(issue_holding_lock, token_path)
    assert result["got"] == TOKEN_A
    assert result["elapsed_s"] < OPERATION_BOUND_S
    with filelock.FileLock(lock_path, preserve_lock_file=True).acquire(timeout=5):
        waiter = FileTokenStorage(token_path, wait_timeout=0.2)
        with pytest.raises(TokenStorageError, match="timed out"):
            waiter.get_or_issue("key2", "secret2", fail_issue)


def test_directory_at_the_lock_path_is_a_storage_error(token_dir: Path, token_path: Path) -> None:
    Path(str(token_path) + ".lock").mkdir()
    storage = FileTokenStorage(token_path, wait_timeout=1)
    started = time.monotonic()
    with pytest.raises(TokenStorageError, match="lock"):
        storage.get_or_issue("key1", "secret1", fail_issue)
    assert time.monotonic() - started < OPERATION_BOUND_S


# -- the folders the library creates -------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o000, 0o077, 0o777])
def test_every_folder_created_is_0700_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    before = stat.S_IMODE(tmp_path.stat().st_mode)
    path = tmp_path / "one" / "two" / "three" / "tokens.json"
    previous = os.umask(umask)
    try:
        assert FileTokenStorage(path).save_token(token_data())
    finally:
        os.umask(previous)
    for folder in (tmp_path / "one", tmp_path / "one" / "two", path.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert stat.S_IMODE(tmp_path.stat().st_mode) == before
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_existing_folder_is_left_as_it_is(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o750)
    path = shared / "mine" / "tokens.json"
    assert FileTokenStorage(path).save_token(token_data())
    assert stat.S_IMODE(shared.stat().st_mode) == 0o750
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
