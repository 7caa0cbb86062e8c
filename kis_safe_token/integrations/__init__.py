"""Single flight for the KIS clients people already run.

One module per client, each a thin subclass of the client's own class that takes its token from a
:class:`~kis_safe_token.storage.TokenStorage` (one issuance per app key, fleet-wide) instead of
the client's own cache:

- :mod:`kis_safe_token.integrations.korea_investment_stock` (extra ``[korea-investment-stock]``)
- :mod:`kis_safe_token.integrations.pykis` (extra ``[python-kis]``)
- :mod:`kis_safe_token.integrations.mojito` (extra ``[mojito2]``)
- :mod:`kis_safe_token.integrations.kis_trader` (extra ``[kis-trader]``)

Each also keeps to the fleet-wide call-rate limit of its app key: every KIS REST call
it routes through the client's own HTTP code takes a slot of the limiter ``KoreaInvestment`` and
``KisAuth`` use, and ``EGW00201`` is penalized and re-sent, bounded (``_client_token``; where
each client is hooked: its module docstring).

Nothing here is imported by ``kis_safe_token`` itself; each module imports its client when it is
imported, and says which extra to install when the client is missing.
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
