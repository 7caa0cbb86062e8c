"""File backend: one JSON document of Fernet-sealed entries (one per app key, sealed with its own
secret), replaced atomically, guarded by ``filelock``. Layout and hardening: ``docs/storages.md``,
``docs/security.md``."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from .._faults import fault_point
from .._fork import renew_after_fork
from ..crypto import key_id
from ..errors import TokenStorageError
from ..failure import IssueFailure
from ..flight.lock import HELD, Attempt, Busy, IssuanceLock, jittered
from ..ratelimit.file import FileRateLimiter, shared_file_rate_limiter
from ..token import REFRESH_MARGIN_S, Token
from .base import SealedTokenStorage, check_seconds
from .lease import CLOCK_SKEW_S, MAX_LEASE_TTL_S, LeaseRecords, LeaseState, replaces

if sys.platform != "win32":
    import fcntl

if TYPE_CHECKING:  # filelock and platformdirs are imported when first needed
    import filelock

__all__ = ["FileTokenStorage", "default_token_path"]

logger = logging.getLogger("kis_safe_token")

FILE_FORMAT = "kis_safe_token"
FILE_VERSION = 1
POLL_INTERVAL_S = 0.004
LOCK_RETRY_S = 0.2
#: A waiter's looks spread out (x1.5 each) from ``poll_interval_s`` to this: a quick save is seen
#: within milliseconds, and a herd does not take the CPU the holder needs.
MAX_POLL_S = 0.008
#: Reads stop past this many bytes (an entry is ~0.5 KB): a bigger file is not ours, and a miss.
MAX_TOKEN_FILE_BYTES: Final = 1 << 20
#: A link is not followed (ELOOP); a FIFO opens at once instead of waiting for a writer.
_OPEN_FLAGS: Final = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_BINARY", 0)
)
_geteuid: Final = getattr(os, "geteuid", None)  # none on Windows: no owner check there
_Signature = tuple[int, int, int]


def default_token_path() -> Path:
    """``<user cache dir>/kis_safe_token/tokens.json`` (``~/.cache/...`` on Linux)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("kis_safe_token", appauthor=False)) / "tokens.json"


class FileTokenStorage(SealedTokenStorage):
    """Tokens in one local file, shared by every process of this user on this host.

    Issuance is guarded by a ``filelock`` on ``<file>.lock``; saves replace the file atomically.
    Only a regular file of this user's is read; anything else there is a miss, or a
    :class:`TokenStorageError` if a save could not replace it (``docs/security.md``).

    ``file_path``: default :func:`default_token_path`. ``encryption_keys``: optional explicit
    Fernet keys (first encrypts). ``wait_timeout``: how long to wait for another's issuance.
    ``poll_interval_s``: a waiter's first look. ``seed_lease``, ``lease_ttl``,
    ``issue_window_s``: the opt-in seed-protocol lease (:mod:`kis_safe_token.storage.lease`).
    """

    def __init__(
        self,
        file_path: Path | str | None = None,
        *,
        encryption_keys: Sequence[bytes | str] = (),
        refresh_margin_s: float = REFRESH_MARGIN_S,
        wait_timeout: float | None = None,
        poll_interval_s: float = POLL_INTERVAL_S,
        clock: Callable[[], float] = time.time,
        seed_lease: bool = False,
        lease_ttl: float | None = None,
        issue_window_s: float | None = None,
    ) -> None:
        super().__init__(
            encryption_keys=encryption_keys,
            refresh_margin_s=refresh_margin_s,
            wait_timeout=wait_timeout,
            clock=clock,
            seed_lease=seed_lease,
            lease_ttl=lease_ttl,
            issue_window_s=issue_window_s,
        )
        try:
            path = Path(file_path).expanduser() if file_path else default_token_path()
        except RuntimeError:  # "~nosuchuser/...": no such home directory
            raise ValueError("file_path names the home of a user this host does not know") from None
        if not path.is_absolute():  # made absolute once: a later chdir() changes nothing
            logger.info("FileTokenStorage: relative file_path %s is %s", path, path.absolute())
            path = path.absolute()
        self.token_file = path
        self.lock_file = self.token_file.with_name(self.token_file.name + ".lock")
        self.poll_interval_s = check_seconds("poll_interval_s", poll_interval_s, high=1.0)
        # One lock object per storage, made under a guard: two threads racing to create it would
        # each lock a different object, and the holder's re-entrant write would deadlock.
        self._flock: filelock.FileLock | None = None
        self._flock_guard = threading.Lock()
        renew_after_fork(self)
        self._doc: tuple[_Signature, dict[str, str]] | None = None
        self._opened: dict[tuple[str, str], tuple[_Signature, Token | None]] = {}

    def __repr__(self) -> str:
        return f"FileTokenStorage({str(self.token_file)!r})"

    def _ready_flock(self) -> filelock.FileLock:
        with self._flock_guard:
            if self._flock is None:
                import filelock

                self._flock = filelock.FileLock(
                    self.lock_file,
                    mode=0o600,
                    preserve_lock_file=True,
                    poll_interval=self.poll_interval_s,
                )
            return self._flock

    def _after_fork(self) -> None:
        # filelock raises RuntimeError on a lock object inherited from the parent (it closes the
        # child's copy of the descriptor itself); a guard a parent's thread held is renewed too.
        self._flock = None
        self._flock_guard = threading.Lock()

    # -- reading -----------------------------------------------------------------------------
    def read_token(self, api_key: str, api_secret: str, *, fresh: bool = False) -> Token | None:
        sig = self._signature()
        token = None
        if sig is not None:
            creds = (api_key, api_secret)
            seen = self._opened.get(creds)
            if seen is not None and seen[0] == sig and not fresh:
                return seen[1]
            entries = self._entries(sig, fresh=fresh)
            token = self._sealer(api_key, api_secret).open(entries.get(key_id(api_key)))
            self._opened[creds] = (sig, token)
        if token is None:  # a miss: waiting comes next; derive the keys and get the lock ready
            self._sealer(api_key, api_secret)
            self._ready_flock()
        return token

    def _signature(self) -> _Signature | None:
        # lstat: the cache keys on the entry a read would open, so a link stays a miss.
        try:
            st = os.lstat(self.token_file)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TokenStorageError(f"cannot stat token file {self.token_file}: {exc}") from exc
        _refuse_foreign(self.token_file, st.st_mode)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _entries(self, sig: _Signature, *, fresh: bool = False) -> dict[str, str]:
        if self._doc is not None and self._doc[0] == sig and not fresh:
            return self._doc[1]
        raw = self._read_file(sig)
        entries = {} if raw is None else _parse_document(raw, self.token_file)
        self._doc = (sig, entries)
        return entries

    def _read_file(self, sig: _Signature) -> bytes | None:
        """The token file's bytes; ``None`` if it is gone or is not ours to read (a miss)."""
        path = self.token_file
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            return None
        except OSError as exc:
            problem = _why_not_opened(path)
            if problem is None:
                raise TokenStorageError(f"cannot read token file {path}: {exc}") from exc
            self._skip(sig, problem)
            return None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise TokenStorageError(
                    f"token path {path} is a directory: move it away or use another file path"
                )
            problem = not_a_private_file(st)
            if problem is None:
                with open(fd, "rb", closefd=False) as fh:  # one past the cap: a file that grew
                    raw = fh.read(MAX_TOKEN_FILE_BYTES + 1)
                if len(raw) <= MAX_TOKEN_FILE_BYTES:
                    return raw
                problem = f"it is larger than {MAX_TOKEN_FILE_BYTES} bytes"
        except OSError as exc:
            raise TokenStorageError(f"cannot read token file {path}: {exc}") from exc
        finally:
            os.close(fd)
        self._skip(sig, problem)
        return None

    _last_skipped: tuple[_Signature, str] | None = None

    def _skip(self, sig: _Signature, reason: str) -> None:
        """Log a miss once per file and cause: a fresh read under the lock sees it again."""
        if self._last_skipped != (sig, reason):
            self._last_skipped = (sig, reason)
            logger.warning("ignoring %s: %s; the next save replaces it", self.token_file, reason)

    # -- writing (the caller may or may not hold the lock: it is re-entrant) ------------------
    def write_token(
        self, api_key: str, api_secret: str, token: Token, deadline: float | None = None
    ) -> None:
        sealed = self._sealer(api_key, api_secret).seal(token).decode()

        def put(entries: dict[str, str]) -> bool:
            entries[key_id(api_key)] = sealed
            entries.pop(_failure_id(api_key), None)
            return True

        self._update(put)

    def _entry(self, entry_id: str) -> str | None:
        sig = self._signature()
        return None if sig is None else self._entries(sig).get(entry_id)

    def read_failure(self, api_key: str, api_secret: str) -> IssueFailure | None:
        return self._sealer(api_key, api_secret).open_failure(self._entry(_failure_id(api_key)))

    def write_failure(self, api_key: str, api_secret: str, failure: IssueFailure) -> None:
        sealed = self._sealer(api_key, api_secret).seal_failure(failure).decode()

        def put(entries: dict[str, str]) -> bool:
            entries[_failure_id(api_key)] = sealed
            return True

        self._update(put)

    def _delete(self, api_key: str) -> None:
        self._update(lambda entries: entries.pop(key_id(api_key), None) is not None)

    def invalidate_token(self, api_key: str, api_secret: str, access_token: str) -> bool:
        # A fresh read: a quick replace on coarse timestamps can repeat (mtime, size, inode).
        stored = self.read_token(api_key, api_secret, fresh=True)
        if stored is None or stored.access_token != access_token:
            return False  # already replaced: N workers seeing one failure lock the file once

        def drop_if_same(entries: dict[str, str]) -> bool:
            token = self._sealer(api_key, api_secret).open(entries.get(key_id(api_key)))
            if token is None or token.access_token != access_token:
                return False
            del entries[key_id(api_key)]
            return True

        return self._update(drop_if_same)

    def _update(self, change: Callable[[dict[str, str]], bool]) -> bool:
        """Read-modify-write the document under the lock; write only if ``change`` says so."""
        lock = self._acquire(self.wait_timeout)
        if lock is None:
            raise TokenStorageError(
                f"timed out after {self.wait_timeout:.1f} s waiting for {self.lock_file}"
            )
        try:
            sig = self._signature()
            entries = dict(self._entries(sig, fresh=True)) if sig else {}
            changed = change(entries)
            if changed:
                self._replace(entries)
                self._doc = None  # our own write: read it back rather than trust a signature
                self._opened.clear()
            return changed
        finally:
            lock.release()

    def _replace(self, entries: dict[str, str]) -> None:
        doc = {"format": FILE_FORMAT, "version": FILE_VERSION, "entries": entries}
        data = json.dumps(doc, separators=(",", ":")).encode()
        folder = self.token_file.parent
        tmp: str | None = None
        try:
            make_private_dir(folder)
            fd, tmp = tempfile.mkstemp(
                dir=folder, prefix=f".{self.token_file.name}.", suffix=".tmp"
            )
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o600)
            fault_point("file.before_replace")
            os.replace(tmp, self.token_file)
            tmp = None
            with contextlib.suppress(OSError):  # the rename itself, made durable where possible
                dir_fd = os.open(folder, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except OSError as exc:
            raise TokenStorageError(f"cannot write token file {self.token_file}: {exc}") from exc
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    # -- the issuance lock -------------------------------------------------------------------
    def _lock(self) -> filelock.FileLock:
        """The issuance lock (re-entrant in one thread), its folder created if missing; nothing
        is created beside a token path that is not the library's own file."""
        self._signature()  # TokenStorageError for a device, FIFO, socket or directory there
        try:
            make_private_dir(self.lock_file.parent)
        except OSError as exc:
            raise TokenStorageError(f"cannot create {self.lock_file.parent}: {exc}") from exc
        return self._ready_flock()

    def _acquire(self, timeout: float) -> filelock.FileLock | None:
        """The issuance lock, taken within ``timeout``; ``None`` if another holds it."""
        import filelock

        lock = self._lock()
        try:
            lock.acquire(timeout=timeout)
        except filelock.Timeout:
            return None
        except OSError as exc:
            raise TokenStorageError(f"cannot lock {self.lock_file}: {exc}") from exc
        return lock

    def issuance_lock(self, api_key: str, api_secret: str) -> IssuanceLock:
        """The host-wide ``filelock`` on ``<file>.lock`` (behind the seed lease, if on)."""
        return self._leased(FileIssuanceLock(self, api_key, api_secret), api_key, api_secret)

    def rate_limiter(
        self, api_key: str, calls_per_second: float, *, api_secret: str | None = None
    ) -> FileRateLimiter:
        """Host-wide: a 24-byte record in ``<token file>.rate-<key id>`` (one limiter object per
        file and rate in a process)."""
        self._signature()  # no sibling beside a device, FIFO, socket or directory
        path = self.token_file.with_name(f"{self.token_file.name}.rate-{key_id(api_key)}")
        return shared_file_rate_limiter(path, calls_per_second)

    def _lease_records(self) -> FileLeaseRecords:
        return FileLeaseRecords(self)

    def fleet(self) -> dict[str, dict[str, Any]]:
        """Every entry of the token file; the lock is one for the whole file (held: another
        process holds it now; since when, a file lock does not say)."""
        sig = self._signature()
        entries = {} if sig is None else self._entries(sig, fresh=True)
        held = self._acquire(0)
        if held is not None:
            held.release()
        view: dict[str, dict[str, Any]] = {}
        for name in sorted(entries):
            ident, _, kind = name.partition(":")
            info = view.setdefault(ident, {"records": [], "lock_held": held is None})
            info.update(lock_held_s=None, token_ttl_s=None)
            info["records"].append(kind or "token")
        return view

    #: Reads are a ``stat`` (a Fernet open when the file changed): the asyncio driver performs
    #: this store's steps on the event loop, whose thread then holds the ``filelock``.
    inline_io = True


class _ReleaseWatch:
    """A thread blocked in a shared ``flock`` on the lock file, which the kernel grants the moment
    the holder lets go (saved, failed or died): the waiter wakes then, instead of polling the
    token file every few milliseconds while KIS answers (a herd of pollers takes the CPU the
    holder needs). Started after the waiter's own try failed, so no release is missed."""

    def __init__(self, fd: int) -> None:
        self.released = threading.Event()
        self._guard = threading.Lock()
        self._on_release: list[Callable[[], None]] = []
        threading.Thread(target=self._watch, args=(fd,), daemon=True).start()

    @classmethod
    def start(cls, lock_file: Path) -> _ReleaseWatch | None:
        """A watch on ``lock_file``; ``None`` where there is no ``flock`` (Windows: polling)."""
        if sys.platform == "win32":
            return None
        try:
            fd = os.open(lock_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        return cls(fd)

    def _watch(self, fd: int) -> None:
        try:
            if sys.platform != "win32":
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_SH)
                    fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
            with self._guard:
                self.released.set()
                callbacks, self._on_release = self._on_release, []
            for callback in callbacks:
                callback()

    async def wait_async(self, timeout_s: float) -> None:
        """Until released or ``timeout_s``, on the event loop (no worker thread per wait)."""
        import asyncio

        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not woken.done():
                woken.set_result(None)

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(settle)

        with self._guard:
            pending = not self.released.is_set()
            if pending:
                self._on_release.append(wake)
        if pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken, timeout_s)


class FileIssuanceLock(IssuanceLock):
    """The storage's ``filelock`` on ``<file>.lock``. A waiter is woken by the holder's release
    (:class:`_ReleaseWatch`) and tries the lock again only every ``LOCK_RETRY_S`` meanwhile; where
    there is no ``flock``, it ``stat``s the token file every poll (``docs/storages.md``)."""

    def __init__(self, storage: FileTokenStorage, api_key: str, api_secret: str) -> None:
        self._storage = storage
        self._api_key = api_key
        self._api_secret = api_secret
        self._flock: filelock.FileLock | None = None
        self._next_try = 0.0
        self._poll_s = storage.poll_interval_s
        self._watch: _ReleaseWatch | None = None

    def attempt(self) -> Attempt:
        """The lock if a try is due and it is free, else a usable token or an active failure in
        the store, else :class:`Busy`."""
        storage = self._storage
        if self._watch is not None and self._watch.released.is_set():
            self._watch = None  # the holder let go: what it left first, then the lock at once
            seen = self._seen()
            if seen is not None:
                return seen
            self._next_try = 0.0
        if time.monotonic() >= self._next_try:
            self._flock = storage._acquire(0)
            if self._flock is not None:
                return HELD
            self._next_try = time.monotonic() + jittered(LOCK_RETRY_S)
            if self._watch is None:
                self._watch = _ReleaseWatch.start(storage.lock_file)
        seen = self._seen()
        if seen is not None:
            return seen
        waiting_on = f"the issuing process holding {storage.lock_file}"
        if self._watch is not None:
            return Busy(jittered(LOCK_RETRY_S), waiting_on, wake=str(storage.lock_file))
        poll_s = self._poll_s
        self._poll_s = min(poll_s * 1.5, max(storage.poll_interval_s, MAX_POLL_S))
        return Busy(jittered(poll_s), waiting_on)

    def _seen(self) -> Token | IssueFailure | None:
        storage = self._storage
        token = storage.read_token(self._api_key, self._api_secret)
        if storage.usable(token):
            return token
        failure = storage.read_failure(self._api_key, self._api_secret)
        if failure is not None and failure.active(storage.clock()):
            return failure
        return None

    def wait(self, busy: Busy, timeout_s: float) -> None:
        if self._watch is None:
            time.sleep(timeout_s)
        else:
            self._watch.released.wait(timeout_s)

    async def wait_async(self, busy: Busy, timeout_s: float) -> None:
        if self._watch is None:
            await super().wait_async(busy, timeout_s)
        else:
            await self._watch.wait_async(timeout_s)

    def release(self) -> None:
        if self._flock is not None:
            self._flock.release()
            self._flock = None


def _parse_document(raw: bytes, path: Path) -> dict[str, str]:
    """The entries of a token file; an unreadable file is logged and read as empty."""
    if raw[:1] == b"\x80":
        logger.warning(
            "ignoring %s: it looks like a pickle (never unpickled); it will be replaced", path
        )
        return {}
    try:
        doc: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        logger.warning("ignoring %s: not a kis_safe_token file (unreadable or torn)", path)
        return {}
    if (
        not isinstance(doc, dict)
        or doc.get("format") != FILE_FORMAT
        or doc.get("version") != FILE_VERSION
        or not isinstance(doc.get("entries"), dict)
    ):
        logger.warning("ignoring %s: unknown format or version", path)
        return {}
    return {k: v for k, v in doc["entries"].items() if isinstance(k, str) and isinstance(v, str)}


def _failure_id(api_key: str) -> str:
    return key_id(api_key) + ":failure"


def _lease_id(api_key: str) -> str:
    return key_id(api_key) + ":lease"


_FOREIGN_KINDS: Final = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _refuse_foreign(path: Path, mode: int) -> None:
    """:class:`TokenStorageError` naming what is at ``path`` unless it is a regular file or a
    link (a miss, which a save replaces): nothing is read, written or created beside it."""
    kind = _FOREIGN_KINDS.get(stat.S_IFMT(mode))
    if kind is not None:
        raise TokenStorageError(
            f"token path {path} is {kind}, not a token file: nothing was read or written "
            "there; give the storage a file path of its own (file_path= or "
            "KOREA_INVESTMENT_TOKEN_FILE)"
        )


def _why_not_opened(path: Path) -> str | None:
    """Why a failed open is a miss the next save replaces (a link: ELOOP, EMLINK or EFTYPE; a
    socket or driverless device: ENXIO; another user's file: EACCES), or ``None`` for a real
    fault (a directory, our own file we may not read)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link (not followed; point at the real file)"
    if stat.S_ISDIR(st.st_mode):
        return None
    return not_a_private_file(st)


def not_a_private_file(st: os.stat_result) -> str | None:
    """Why a token path is not read, or ``None`` if it is a private regular file."""
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file (a FIFO, socket or device)"
    if _geteuid is not None and st.st_uid != _geteuid():  # root too: not a file others planted
        return f"it is owned by uid {st.st_uid}, not by this user"
    if st.st_size > MAX_TOKEN_FILE_BYTES:
        return f"it is larger than {MAX_TOKEN_FILE_BYTES} bytes"
    return None


def make_private_dir(folder: Path) -> None:
    """Create the folder and each missing parent 0700 whatever the umask (``mkdir(parents=True)``
    would make the parents ``0777 & ~umask``); an existing folder is left as it is."""
    missing: list[Path] = []
    while not folder.is_dir():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for level in reversed(missing):
        try:
            os.mkdir(level, 0o700)
        except FileExistsError:
            continue  # made meanwhile by another process, which sets its mode
        os.chmod(level, 0o700)  # the umask may have taken bits off: 0o277 would leave 0500


# -- the seed-protocol lease -----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _FileLease:
    """The lease entry of one app key in the token document (plain JSON: nothing secret)."""

    owner: str | None
    at: float  # grant time (epoch s)
    ttl: float
    mark: float  # last grant or save (epoch s)
    window: float

    def active(self, now: float) -> bool:
        return self.owner is not None and self.at - CLOCK_SKEW_S <= now < self.at + self.ttl

    def dumps(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def loads(cls, raw: str | None) -> _FileLease | None:
        """The record, or ``None`` if missing or malformed (a miss, like any unreadable entry)."""
        if not raw:
            return None
        try:
            body: Any = json.loads(raw)
            owner = body["owner"]
            at, ttl, mark, window = (float(body[k]) for k in ("at", "ttl", "mark", "window"))
        except (ValueError, TypeError, KeyError):
            return None
        if owner is not None and not isinstance(owner, str):
            return None
        if not 0 <= ttl <= MAX_LEASE_TTL_S or not 0 <= window <= MAX_LEASE_TTL_S:
            return None
        return cls(owner, at, ttl, mark, window)


def _refusal(lease: _FileLease | None, owner: str, now: float) -> LeaseState | None:
    """The answer that needs no write (refused, or ``owner``'s already), or ``None``: grant."""
    if lease is not None and lease.active(now):
        if lease.owner == owner:
            return LeaseState(True)
        return LeaseState(False, lease.at + lease.ttl - now, held=True)
    if lease is not None and lease.mark - CLOCK_SKEW_S <= now < lease.mark + lease.window:
        return LeaseState(False, lease.mark + lease.window - now)  # the quiet mark lives
    return None


class FileLeaseRecords(LeaseRecords):
    """The lease as an entry ``<key id>:lease`` of the token document, read without the lock and
    changed under it (held only for that read-modify-write, never across the holder's issue)."""

    def __init__(self, storage: FileTokenStorage) -> None:
        self._storage = storage

    def _peek(self, api_key: str) -> _FileLease | None:
        return _FileLease.loads(self._storage._entry(_lease_id(api_key)))

    def grant(self, api_key: str, owner: str, ttl_s: float, window_s: float) -> LeaseState:
        storage = self._storage
        refused = _refusal(self._peek(api_key), owner, storage.clock())
        if refused is not None:
            return refused  # without taking the file lock
        decided: list[LeaseState | None] = [None]

        def take(entries: dict[str, str]) -> bool:
            now = storage.clock()
            decided[0] = _refusal(_FileLease.loads(entries.get(_lease_id(api_key))), owner, now)
            if decided[0] is not None:
                return False
            entries[_lease_id(api_key)] = _FileLease(owner, now, ttl_s, now, window_s).dumps()
            return True

        storage._update(take)
        return decided[0] or LeaseState(True)

    def held_by_other(self, api_key: str, owner: str) -> bool:
        lease = self._peek(api_key)
        return lease is not None and lease.active(self._storage.clock()) and lease.owner != owner

    def release(self, api_key: str, owner: str, *, unmark: bool = False) -> None:
        peek = self._peek(api_key)
        if peek is None or peek.owner != owner:
            return

        def drop(entries: dict[str, str]) -> bool:
            lease = _FileLease.loads(entries.get(_lease_id(api_key)))
            if lease is None or lease.owner != owner:
                return False
            ours = unmark and lease.mark == lease.at  # the mark our grant set, not a save's
            ended = _FileLease(None, lease.at, 0.0, 0.0 if ours else lease.mark, lease.window)
            entries[_lease_id(api_key)] = ended.dumps()
            return True

        self._storage._update(drop)

    def save_newest(
        self,
        api_key: str,
        api_secret: str,
        token: Token,
        owner: str,
        window_s: float,
        deadline: float | None = None,
    ) -> bool:
        storage = self._storage
        sealer = storage._sealer(api_key, api_secret)
        sealed = sealer.seal(token).decode()
        written = [False]

        def put(entries: dict[str, str]) -> bool:
            now = storage.clock()
            if replaces(token, sealer.open(entries.get(key_id(api_key))), now):
                entries[key_id(api_key)] = sealed
                entries.pop(_failure_id(api_key), None)
                written[0] = True
            lease = _FileLease.loads(entries.get(_lease_id(api_key)))
            if lease is None or lease.owner == owner or not lease.active(now):
                lease = _FileLease(None, now, 0.0, now, window_s)
            else:  # another holder's active lease stays; only the mark moves
                lease = _FileLease(lease.owner, lease.at, lease.ttl, now, window_s)
            entries[_lease_id(api_key)] = lease.dumps()
            return True

        storage._update(put)
        return written[0]
