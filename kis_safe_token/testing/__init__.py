"""Offline KIS for tests and demos: :class:`KisSimulator`."""

from .simulator import KisSimulator

__all__ = ["KisSimulator"]
