"""The fleet of one host: its realtime leader is elected with ``flock`` and serves the other
processes over a Unix domain socket, both beside the token file.

``<token file>.realtime-<key id>.lock`` is held (``flock``, released by the kernel when the
holder dies, SIGKILL included) by the one process that opens the KIS session;
``<token file>.realtime-<key id>.sock`` (mode 0600, and only peers of this user are served) is
where it listens. The lines on the socket are text, one message each, fields split by tabs:

- to the leader: ``S tr_id tr_key`` (wanted), ``U tr_id tr_key`` (no longer wanted);
- to a follower: ``A tr_id tr_key code message`` (the answer to ``S``),
  ``D received_at frame`` (a plain KIS data frame), ``G`` (events may have been missed).

A follower's wants live as long as its connection: a dead process's wants end with it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

from ..crypto import key_id
from ..errors import TokenStorageError
from ..storage.file import make_private_dir, not_a_private_file

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock and no AF_UNIX here
    fcntl = None  # type: ignore[assignment]

__all__ = ["LocalHub"]

#: The longest ``sun_path`` used as it is; longer paths go through ``/proc/self/fd`` (Linux).
_SUN_PATH_MAX = 100
_PEERCRED = struct.Struct("3i")
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


class LocalHub:
    """Where the processes of one host sharing ``token_file`` meet for ``api_key``'s session."""

    def __init__(self, token_file: Path, api_key: str) -> None:
        if fcntl is None:  # pragma: no cover
            raise TokenStorageError("KisRealtime with a FileTokenStorage needs flock (POSIX)")
        stem = f"{token_file.name}.realtime-{key_id(api_key)}"
        self.lock_path = token_file.with_name(stem + ".lock")
        self.socket_path = token_file.with_name(stem + ".sock")
        self._bound: int | None = None  # the inode of the socket file this process bound

    def __repr__(self) -> str:
        return f"LocalHub({str(self.socket_path)!r})"

    def try_lead(self) -> int | None:
        """The descriptor holding the leader's ``flock`` (close it to step down), or ``None``
        while another process leads."""
        try:
            make_private_dir(self.lock_path.parent)
            fd = os.open(self.lock_path, _LOCK_FLAGS, 0o600)
        except OSError as exc:
            raise _error("open", self.lock_path, exc) from None
        try:
            problem = not_a_private_file(os.fstat(fd))
            if problem is not None:
                raise TokenStorageError(f"{self.lock_path} is not used: {problem}")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def listen(self) -> socket.socket:
        """The leader's listening socket (call holding the lock): a stale socket of this user's
        is replaced; anything else at the path is left alone and refused."""
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.socket_path)
            if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
                raise TokenStorageError(
                    f"{self.socket_path} is not a socket of this user: nothing was written there"
                )
            os.unlink(self.socket_path)  # the last leader's, dead: we hold the lock
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _sun_path(self.socket_path) as address:
                server.bind(address)
            os.chmod(self.socket_path, 0o600)
            self._bound = os.lstat(self.socket_path).st_ino
            server.listen(64)
        except OSError as exc:
            server.close()
            raise _error("listen on", self.socket_path, exc) from None
        return server

    def connect(self) -> socket.socket | None:
        """A connection to the leader, or ``None`` while there is none listening."""
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _sun_path(self.socket_path) as address:
                client.connect(address)
        except (FileNotFoundError, ConnectionRefusedError):
            client.close()
            return None
        except OSError as exc:
            client.close()
            raise _error("connect to", self.socket_path, exc) from None
        if not same_user(client):  # a socket another user bound first in a shared folder
            client.close()
            raise TokenStorageError(f"{self.socket_path} is served by another user: not followed")
        return client

    def unlink(self) -> None:
        """Remove the socket file if it is still the one this process bound."""
        bound, self._bound = self._bound, None
        with contextlib.suppress(OSError):
            if bound is not None and os.lstat(self.socket_path).st_ino == bound:
                os.unlink(self.socket_path)


def same_user(conn: socket.socket) -> bool:
    """Whether the peer of a Unix connection runs as this user (``SO_PEERCRED``)."""
    if not hasattr(socket, "SO_PEERCRED"):  # pragma: no cover - the 0600 socket file decides
        return True
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    uid: int = _PEERCRED.unpack(raw)[1]
    return uid == os.geteuid()


@contextlib.contextmanager
def _sun_path(path: Path) -> Iterator[str]:
    """``path`` as a ``sun_path`` short enough for ``bind``/``connect``."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _error(doing: str, path: Path, exc: OSError) -> TokenStorageError:
    return TokenStorageError(f"cannot {doing} {path}: {exc.strerror}")
