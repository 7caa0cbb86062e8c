"""Crashes at precise steps, Redis and disk faults: survivors get a valid token, nothing is torn.

A victim process, given a fault point armed by ``arm_fault`` (``KIS_SAFE_TOKEN_FAULT`` and an
arming file), SIGKILLs itself exactly there; then the survivors, already started and imported, go.
"""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import HeldIssuance
from herd import HERD_APP_KEY, HERD_SECRET, gated_client, run_herd

from kis_safe_token import (
    FileTokenStorage,
    LockedRedisTokenStorage,
    TokenIssueError,
    TokenStorageError,
)
from kis_safe_token._faults import FAULT_ENV, arm_fault, fault_point
from kis_safe_token.testing import KisSimulator
from kis_safe_token.testing.redis_server import RedisServer
from kis_safe_token.token import Token

LOCK_TTL_S = 3.0
OTHER_TOKEN = "other-" + "o" * 80


# Short timeouts so takeovers are quick; lock_ttl (3 s) must exceed the HTTP timeout, and the
# EGW00133 sit-out must be longer than the simulator's 1 s window, as 61 s is longer than KIS's.
FAST = {"rate_limit_wait_s": 1.1, "timeout": (1.0, 1.5)}


FILE_FAULTS = ["issue.before_kis", "issue.after_kis", "file.before_replace", "storage.after_save"]
REDIS_FAULTS = ["issue.before_kis", "issue.after_kis", "storage.after_save"]
# KIS issuances the victim makes before it dies (lost unless it saved).
VICTIM_ISSUES = {
    "issue.before_kis": 0,
    "issue.after_kis": 1,
    "file.before_replace": 1,
    "storage.after_save": 1,
}


@pytest.mark.parametrize(
    ("backend", "fault"),
    [("file", f) for f in FILE_FAULTS] + [("redis", f) for f in REDIS_FAULTS],
)
def test_issuer_killed_at_each_step_survivors_recover(
    backend: str, fault: str, tmp_path: Path, redis_url: str, key_prefix: str
) -> None:
    token_path = tmp_path / "cache" / "tokens.json"
    if backend == "file":
        spec = {"kind": "file", "path": str(token_path)}
        # Another app key's entry must survive whatever happens to ours.
        FileTokenStorage(token_path).save_token(
            Token(OTHER_TOKEN, time.time() + 3600).to_token_data("other-key", "other-secret")
        )
    else:
        spec = {
            "kind": "redis",
            "url": redis_url,
            "key_prefix": key_prefix,
            "options": {"lock_ttl": LOCK_TTL_S, "poll_interval_s": 0.1},
        }
    with KisSimulator(
        apps={HERD_APP_KEY: HERD_SECRET}, issue_window_s=1.0, issue_latency_s=0
    ) as sim:
        ctx = mp.get_context("spawn")
        out, go = ctx.Queue(), ctx.Event()
        survivors = [
            ctx.Process(target=gated_client, args=(spec, sim.base_url, go, out, None, FAST))
            for _ in range(3)
        ]
        for p in survivors:
            p.start()
        assert [out.get(timeout=120)[0] for _ in survivors] == ["ready"] * 3
        armed = arm_fault(fault, tmp_path)
        victim = ctx.Process(target=gated_client, args=(spec, sim.base_url, None, out, armed, FAST))
        victim.start()
        victim.join(60)
        assert victim.exitcode == -9, f"the victim did not die at {fault}"
        assert sim.issued == VICTIM_ISSUES[fault]
        started = time.monotonic()
        go.set()
        results = [out.get(timeout=60) for _ in survivors]
        for p in survivors:
            p.join(10)
    assert [r[0] for r in results] == ["ok"] * 3, results
    assert len({r[1] for r in results}) == 1
    assert max(r[2] for r in results) - started < LOCK_TTL_S + 5
    assert sim.issued <= VICTIM_ISSUES[fault] + 1  # at most one extra issuance
    assert sim.issued >= 1
    if backend == "file":
        doc = json.loads(token_path.read_bytes())  # never torn
        assert doc["format"] == "kis_safe_token"
        other = FileTokenStorage(token_path).load_token("other-key", "other-secret")
        assert other is not None and other["access_token"] == OTHER_TOKEN


# -- Redis faults ---------------------------------------------------------------------------------


def test_dropped_connection_while_waiting_never_hangs(redis_url: str, key_prefix: str) -> None:
    waiter = LockedRedisTokenStorage(
        redis_url, key_prefix=key_prefix, poll_interval_s=2.0, wait_timeout=40
    )
    outcome: list[object] = []

    def wait() -> None:
        try:
            outcome.append(waiter.get_or_issue("key1", "secret1", lambda: pytest.fail("no issue")))
        except TokenStorageError as exc:
            outcome.append(exc)

    token = Token("tok-" + "t" * 60, time.time() + 86_400)
    with HeldIssuance(
        LockedRedisTokenStorage(redis_url, key_prefix=key_prefix), lambda: token
    ) as held:
        t = threading.Thread(target=wait)
        t.start()
        admin = redis.from_url(redis_url)
        deadline = time.monotonic() + 10
        while not any(c.get("cmd") == "blpop" for c in admin.client_list()):
            assert time.monotonic() < deadline, "the waiter never blocked in BLPOP"
            time.sleep(0.01)
        killed = sum(
            admin.client_kill_filter(_id=int(c["id"]))
            for c in admin.client_list()
            if c.get("cmd") == "blpop"
        )
        assert killed >= 1
        held.finish()
        t.join(8)
    assert not t.is_alive(), "the waiter hung after its connection was dropped"
    assert len(outcome) == 1
    assert isinstance(outcome[0], (Token, TokenStorageError))
    if isinstance(outcome[0], Token):
        assert outcome[0] == token


def test_server_restarted_mid_herd_recovers(sim: KisSimulator) -> None:
    with RedisServer() as server:
        spec = {"kind": "redis", "url": server.url, "key_prefix": "restart"}
        first = run_herd(4, spec, sim.base_url)
        assert first.errors == [] and sim.issued == 1
        server.stop()
        storage = LockedRedisTokenStorage(server.url, key_prefix="restart")
        started = time.monotonic()
        with pytest.raises(TokenStorageError):
            storage.get_or_issue(HERD_APP_KEY, HERD_SECRET, lambda: pytest.fail("no issue"))
        assert time.monotonic() - started < 5
        server.start()
        sim.expire_tokens()  # the restarted server lost the token: the next herd issues once
        second = run_herd(4, spec, sim.base_url)
        assert second.errors == []
        assert sim.issued == 2 and sim.rate_limited == 0
        assert len(second.tokens()) == 1


# -- disk faults ----------------------------------------------------------------------------------


def _good_file(token_path: Path) -> bytes:
    FileTokenStorage(token_path).save_token(
        Token(OTHER_TOKEN, time.time() + 3600).to_token_data("key1", "secret1")
    )
    return token_path.read_bytes()


@pytest.mark.parametrize(
    ("where", "err"),
    [
        ("mkstemp", errno.EROFS),
        ("mkstemp", errno.EACCES),
        ("fsync", errno.ENOSPC),
        ("replace", errno.EROFS),
    ],
)
def test_disk_fault_is_a_clear_error_and_the_old_file_survives(
    token_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, err: int
) -> None:
    before = _good_file(token_path)

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise OSError(err, os.strerror(err))

    target = {"mkstemp": "tempfile.mkstemp", "fsync": "os.fsync", "replace": "os.replace"}[where]
    monkeypatch.setattr(target, fail)
    storage = FileTokenStorage(token_path)
    fresh = Token("new-" + "n" * 60, time.time() + 86_400)
    assert storage.save_token(fresh.to_token_data("key1", "secret1")) is False
    with pytest.raises(TokenStorageError, match=os.strerror(err)):
        storage.invalidate_token("key1", "secret1", OTHER_TOKEN)
    monkeypatch.undo()
    assert token_path.read_bytes() == before
    assert [p.name for p in token_path.parent.iterdir() if p.name.endswith(".tmp")] == []
    loaded = FileTokenStorage(token_path).load_token("key1", "secret1")
    assert loaded is not None and loaded["access_token"] == OTHER_TOKEN


@pytest.mark.parametrize("backend", ["file", "redis"])
def test_waiters_of_a_failed_issuance_get_its_failure_at_once(
    backend: str, token_path: Path, redis_url: str, key_prefix: str
) -> None:
    now = [time.time()]

    def storage() -> Any:
        if backend == "file":
            return FileTokenStorage(token_path, clock=lambda: now[0])
        return LockedRedisTokenStorage(
            redis_url, key_prefix=key_prefix, poll_interval_s=2.0, clock=lambda: now[0]
        )

    def refused() -> Token:
        raise TokenIssueError("KIS is down", code="EGW00000", status=503)

    def must_not_issue() -> Token:
        raise AssertionError("a waiter of a failed issuance asked KIS itself")

    token = Token("tok-" + "w" * 60, time.time() + 86_400)
    errors: list[BaseException] = []
    waiters = [storage() for _ in range(3)]

    def wait(waiter: Any) -> None:
        try:
            waiter.get_or_issue("key1", "secret1", must_not_issue)
        except BaseException as exc:
            errors.append(exc)

    with HeldIssuance(storage(), refused) as held:
        threads = [threading.Thread(target=wait, args=(w,)) for w in waiters]
        for t in threads:
            t.start()
        time.sleep(0.1)  # let the waiters start waiting (not needed for correctness)
        started = time.monotonic()
        held.finish()
        for t in threads:
            t.join(10)
    assert isinstance(held.error, TokenIssueError)  # the holder saw KIS's refusal
    assert len(errors) == 3 and all(isinstance(e, TokenIssueError) for e in errors), errors
    assert all(e.code == "EGW00000" and "KIS is down" in str(e) for e in errors)
    assert time.monotonic() - started < 1.5
    # A newcomer during the hold gets it too, without asking KIS; after the hold, one asks.
    with pytest.raises(TokenIssueError, match="KIS is down"):
        storage().get_or_issue("key1", "secret1", must_not_issue)
    now[0] += 6  # past the first failure's 5 s hold
    assert storage().get_or_issue("key1", "secret1", lambda: token) == token


# -- the switch itself: inert unless the harness armed it ------------------------------------------


def test_plain_fault_variable_does_not_kill_a_client(
    tmp_path: Path, sim: KisSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A variable copied from a test config into a deployment (no arming file) kills no one."""
    monkeypatch.setenv(FAULT_ENV, "issue.after_kis")  # inherited by the child
    spec = {"kind": "file", "path": str(tmp_path / "cache" / "tokens.json")}
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=gated_client, args=(spec, sim.base_url, None, out))
    child.start()
    child.join(60)
    assert child.exitcode == 0, f"the child died with {child.exitcode}"
    result = out.get(timeout=10)
    assert result[0] == "ok", result
    assert sim.issued == 1


def test_plain_fault_variable_warns_once(tmp_path: Path) -> None:
    code = (
        "import logging\n"
        "logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(message)s')\n"
        "from kis_safe_token._faults import fault_point\n"
        "for name in ('issue.before_kis', 'issue.after_kis', 'issue.after_kis'):\n"
        "    fault_point(name)\n"
        "print('alive')\n"
    )
    env = {**os.environ, FAULT_ENV: "issue.after_kis"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert result.stdout.strip() == "alive"
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, result.stderr
    assert FAULT_ENV in warnings[0] and "ignored" in warnings[0]


@pytest.fixture
def kills(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Record the fault points' kills instead of dying (in process)."""
    seen: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: seen.append((pid, sig)))
    return seen


def test_armed_fault_fires_once_at_its_point_only(
    tmp_path: Path, kills: list[tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = arm_fault("issue.after_kis", tmp_path)
    [(name, value)] = env.items()
    monkeypatch.setenv(name, value)
    arming_file = Path(value.split(":", 1)[1])
    fault_point("issue.before_kis")
    assert kills == [] and arming_file.exists()  # another point: nothing, still armed
    fault_point("issue.after_kis")
    assert kills == [(os.getpid(), signal.SIGKILL)]
    assert not arming_file.exists()  # one shot: the arming file is used up
    fault_point("issue.after_kis")
    assert len(kills) == 1


def _arm_wrongly(how: str, tmp_path: Path) -> str:
    [value] = arm_fault("issue.after_kis", tmp_path).values()
    path = Path(value.split(":", 1)[1])
    if how == "other content":
        path.write_text("issue.before_kis")
    elif how == "missing file":
        path.unlink()
    elif how == "relative path":
        return f"issue.after_kis:{os.path.relpath(path)}"
    elif how == "symlink":
        link = tmp_path / "link"
        link.symlink_to(path)
        return f"issue.after_kis:{link}"
    elif how == "group writable":
        path.chmod(0o620)
    elif how == "directory":
        path.unlink()
        path.mkdir()
        return f"issue.after_kis:{path}"
    elif how == "unknown point":
        return f"issue.after_lunch:{path}"
    return value


@pytest.mark.parametrize(
    "how",
    [
        "other content",
        "missing file",
        "relative path",
        "symlink",
        "group writable",
        "directory",
        "unknown point",
    ],
)
def test_badly_armed_fault_is_ignored(
    how: str, tmp_path: Path, kills: list[tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULT_ENV, _arm_wrongly(how, tmp_path))
    fault_point("issue.after_kis")
    assert kills == []
