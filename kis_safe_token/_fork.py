"""Fresh in-process state in a forked child.

``fork()`` copies every lock as some parent thread left it (a refresh's ``threading.Lock`` held
for ever; ``filelock`` refuses an inherited lock): registered objects get ``_after_fork()`` in
the child before any of its code runs (``os.register_at_fork``).
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Protocol

__all__ = ["renew_after_fork"]


class _Renewable(Protocol):
    def _after_fork(self) -> None: ...


_objects: weakref.WeakSet[_Renewable] = weakref.WeakSet()


def renew_after_fork(obj: _Renewable) -> None:
    """Call ``obj._after_fork()`` in every child forked from now on (while ``obj`` lives)."""
    _objects.add(obj)


def _renew_all() -> None:
    for obj in list(_objects):
        try:
            obj._after_fork()
        except Exception:  # noqa: BLE001 - one object's failure must not leave the rest stale
            logging.getLogger("kis_safe_token").exception("renewing %s after fork failed", obj)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_all)
