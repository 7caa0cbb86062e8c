"""Checks of numbers given as settings, shared by every module that takes them."""

from __future__ import annotations

import math

__all__ = ["check_seconds"]


def check_seconds(name: str, value: float, *, low: float = 0.0, high: float = 86_400.0) -> float:
    """``value`` as a float if ``low < value <= high``; else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not (math.isfinite(value) and low < value <= high):
        raise ValueError(f"{name} must be more than {low:g} and at most {high:g} seconds")
    return float(value)
