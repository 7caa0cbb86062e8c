"""Single flight for the KIS clients people already run: one module per client (one extra each),
each a thin subclass of the client's own class. Nothing here is imported by ``kis_safe_token``
itself. The manual: ``docs/integrations.md``.
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
    """Import a third-party client, or raise an ``ImportError`` naming the extra that installs it.

    ``version``: the release the integration was written and tested against; if the installed
    ``distribution`` (default: ``extra``) is another, a ``RuntimeWarning`` says so and how to pin
    it, once per process and distribution."""
    try:
        imported = importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{module!r} is not installed (or failed to import: {exc}); "
            f"install it with: pip install 'kis-safe-token[{extra}]'"
        ) from exc
    distribution = distribution or extra
    if version is None or distribution in _warned:
        return imported
    installed = importlib.metadata.version(distribution)
    if installed != version:
        _warned.add(distribution)
        warnings.warn(
            f"kis_safe_token's {distribution} integration was written and tested with "
            f"{distribution} {version}, not {installed}: pin it with "
            f"pip install 'kis-safe-token[{extra}]'",
            RuntimeWarning,
            stacklevel=2,
        )
    return imported
