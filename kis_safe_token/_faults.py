"""Fault points for crash tests: stop a process at a precise step instead of a lucky sleep.

A process that reaches a point armed by :func:`arm_fault` SIGKILLs itself, once; any other
value of ``KIS_SAFE_TOKEN_FAULT`` is ignored with one warning (docs/security.md). The
environment is read at each call, so a spawned child armed after import works.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import stat
import tempfile
from typing import Final

__all__ = ["FAULT_ENV", "FAULT_POINTS", "arm_fault", "fault_point"]

FAULT_ENV: Final = "KIS_SAFE_TOKEN_FAULT"
#: Every fault point in the library; arming any other name is an error.
FAULT_POINTS: Final = frozenset(
    {"issue.before_kis", "issue.after_kis", "file.before_replace", "storage.after_save"}
)

_log = logging.getLogger(__name__)


def arm_fault(name: str, folder: str | os.PathLike[str]) -> dict[str, str]:
    """Arm the fault point ``name`` once, with an arming file in ``folder``: the environment
    entry to give the victim process. :class:`ValueError` for a name not in :data:`FAULT_POINTS`.
    """
    if name not in FAULT_POINTS:
        raise ValueError(f"unknown fault point {name!r}; known: {', '.join(sorted(FAULT_POINTS))}")
    fd, path = tempfile.mkstemp(prefix=f"fault-{name}-", suffix=".arm", dir=folder)  # 0600
    with os.fdopen(fd, "w") as fh:
        fh.write(name)
    return {FAULT_ENV: f"{name}:{os.path.abspath(path)}"}


def fault_point(name: str) -> None:
    """SIGKILL this process if the harness armed the fault ``name``."""
    value = os.environ.get(FAULT_ENV)
    if not value:
        return
    armed, _, path = value.partition(":")
    if armed in FAULT_POINTS and os.path.isabs(path):
        if armed != name:
            return  # armed for another point
        if _use_up_arming_file(name, path):
            os.kill(os.getpid(), signal.SIGKILL)
    _warn_ignored()


def _use_up_arming_file(name: str, path: str) -> bool:
    """Whether ``path`` is a valid arming file for ``name``; if so, delete it (one shot)."""
    # O_NOFOLLOW refuses a symlink; O_NONBLOCK keeps a FIFO planted there from blocking us.
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        valid = (
            stat.S_ISREG(st.st_mode)
            and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            and (not hasattr(os, "getuid") or st.st_uid == os.getuid())
            and os.read(fd, len(name) + 1) == name.encode()
        )
    except OSError:
        return False
    finally:
        os.close(fd)
    if not valid:
        return False
    try:
        os.unlink(path)  # the claim: of two processes racing here, one wins
    except OSError:
        return False
    return True


@functools.cache
def _warn_ignored() -> None:
    """Once per process."""
    _log.warning(
        "%s is set but was not armed by a test harness (it needs an arming file; see "
        "kis_safe_token._faults); ignored. Remove it from this environment.",
        FAULT_ENV,
    )
