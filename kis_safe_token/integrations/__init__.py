"""Single flight for the KIS clients people already run: one module per client, each a thin
subclass of the client's own class that takes its token from one of our storages and keeps to
the fleet's call rate (``korea_investment_stock``, ``pykis``, ``mojito``, ``kis_trader``; one
extra each). Nothing here is imported by ``kis_safe_token`` itself; a missing client is an
``ImportError`` naming the extra. The manual: ``docs/integrations.md``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import warnings
from types import ModuleType

__all__ = ["require"]

_warned: set[str] = set()
"""The distributions whose version mismatch was already warned about in this process."""


def require(
    module: str, extra: str, *, version: str | None = None, distribution: str | None = None
) -> ModuleType:
    """Import a third-party client, or raise an ``ImportError`` naming the extra that
    installs it.

    ``version``: the release the integration was written and tested against; if the installed
    ``distribution`` (default: ``extra``, which is named after it) is another, a
    ``RuntimeWarning`` says so and how to pin it, once per process and distribution."""
    try:
        imported = importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{module!r} is not installed (or failed to import: {exc}); "
            f"install it with: pip install 'kis-safe-token[{extra}]'"
        ) from exc
    if version is not None:
        _check_version(distribution or extra, extra, version)
    return imported


def _check_version(distribution: str, extra: str, version: str) -> None:
    installed = importlib.metadata.version(distribution)
    if installed == version or distribution in _warned:
        return
    _warned.add(distribution)
    warnings.warn(
        f"kis_safe_token's {distribution} integration was written and tested with "
        f"{distribution} {version}, not {installed}: pin it with "
        f"pip install 'kis-safe-token[{extra}]'",
        RuntimeWarning,
        stacklevel=3,
    )
