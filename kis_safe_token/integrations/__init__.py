"""Single flight for the KIS clients people already run.

One module per client, each a thin subclass of the client's own class that takes its token from a
:class:`~kis_safe_token.storage.TokenStorage` (one issuance per app key, fleet-wide) instead of
the client's own cache:

- :mod:`kis_safe_token.integrations.korea_investment_stock` (extra ``[korea-investment-stock]``)
- :mod:`kis_safe_token.integrations.pykis` (extra ``[python-kis]``)
- :mod:`kis_safe_token.integrations.mojito` (extra ``[mojito2]``)
- :mod:`kis_safe_token.integrations.kis_trader` (extra ``[kis-trader]``)

Nothing here is imported by ``kis_safe_token`` itself; each module imports its client when it is
imported, and says which extra to install when the client is missing.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str) -> ModuleType:
    """Import a third-party client, or raise an ``ImportError`` naming the extra that
    installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{module!r} is not installed (or failed to import: {exc}); "
            f"install it with: pip install 'kis-safe-token[{extra}]'"
        ) from exc
