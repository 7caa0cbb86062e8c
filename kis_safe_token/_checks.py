"""Checks of numbers given as settings, shared by every module that takes them."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

__all__ = ["check_seconds", "env_seconds", "note_short_wait"]

logger = logging.getLogger("kis_safe_token")


def check_seconds(name: str, value: float, *, low: float = 0.0, high: float = 86_400.0) -> float:
    """``value`` as a float if ``low < value <= high``; else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not (math.isfinite(value) and low < value <= high):
        raise ValueError(f"{name} must be more than {low:g} and at most {high:g} seconds")
    return float(value)


def env_seconds(
    env: Mapping[str, str], name: str, default: float, *, high: float = 3600.0
) -> float:
    """``$name`` as seconds in (0, ``high``], ``default`` if unset; ``ValueError`` naming it."""
    text = (env.get(name) or "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= high):
        raise ValueError(
            f"{name}={text[:20]!r} must be a number of seconds, more than 0, <= {high:g}"
        )
    return value


def note_short_wait(store: object, need_s: float, worst_case: str) -> None:
    """Log once per ``store`` (at INFO) that its ``wait_timeout`` is shorter than ``need_s``, the
    holder's worst case (``worst_case`` says what it is made of). A short wait is the caller's
    choice (a web request with a 5 s budget): its waiter raises ``TokenStorageError`` when the
    wait runs out, holding nothing, while the holder goes on and the fleet still issues once."""
    wait_s = float(getattr(store, "wait_timeout", 0.0))
    if wait_s >= need_s or getattr(store, "_short_wait_noted", False):
        return
    try:
        store._short_wait_noted = True  # type: ignore[attr-defined]
    except AttributeError:  # a store with __slots__: noted every time, still correct
        pass
    logger.info(
        "%s: wait_timeout %.1f s is shorter than a holder's worst case, %.1f s (%s): a caller "
        "that waits longer raises TokenStorageError and holds nothing; the holder goes on",
        type(store).__name__,
        wait_s,
        need_s,
        worst_case,
    )
