"""Fault points for crash tests: stop a process at a precise step instead of a lucky sleep.

A test sets ``KIS_SAFE_TOKEN_FAULT=<name>`` in a child process's environment; when that child
reaches the named point it SIGKILLs itself. The names in use: ``issue.before_kis``,
``issue.after_kis`` (KIS answered, nothing saved), ``file.before_replace`` (temp file written,
not yet renamed in), ``storage.after_save`` (token saved, waiters not woken, lock not released).
Unset (always, in production) it costs one dict lookup on a cold path.
"""

from __future__ import annotations

import os
import signal

__all__ = ["fault_point"]

FAULT_ENV = "KIS_SAFE_TOKEN_FAULT"


def fault_point(name: str) -> None:
    """SIGKILL this process if the fault ``name`` is armed in the environment."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
