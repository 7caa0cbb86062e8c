"""kis_safe_token: one KIS Open API access token, shared safely by a fleet of processes.

The asyncio side, ``AsyncKoreaInvestment`` and ``AsyncSharedToken``, is imported on first use
(it needs httpx: ``pip install 'kis-safe-token[async]'``), and is left out of ``__all__`` so that
``from kis_safe_token import *`` works without that extra.

Light imports: ``import kis_safe_token`` loads no redis, keyring, httpx or asyncio. redis-py is
imported when a Redis storage (or limiter client) is built, keyring on the first keyring lookup,
httpx and asyncio with the asyncio side; a missing extra is an ``ImportError`` naming it.
"""

import importlib
from typing import TYPE_CHECKING, Any

from .auth import KisAuth
from .client import KoreaInvestment
from .errors import (
    InsecureKeyringError,
    KisApiError,
    KisTokenError,
    SecretNotFoundError,
    TokenIssueError,
    TokenStorageError,
)
from .keyring_secrets import delete_api_secret, get_api_secret, set_api_secret
from .shared import SharedToken
from .storage import (
    FileTokenStorage,
    LockedRedisTokenStorage,
    RedisTokenStorage,
    TokenStorage,
    create_token_storage,
)
from .token import Token

if TYPE_CHECKING:
    from .async_client import AsyncKoreaInvestment as AsyncKoreaInvestment
    from .async_shared import AsyncSharedToken as AsyncSharedToken

__version__ = "0.1.0"

__all__ = [
    "FileTokenStorage",
    "InsecureKeyringError",
    "KisApiError",
    "KisAuth",
    "KisTokenError",
    "KoreaInvestment",
    "LockedRedisTokenStorage",
    "RedisTokenStorage",
    "SecretNotFoundError",
    "SharedToken",
    "Token",
    "TokenIssueError",
    "TokenStorage",
    "TokenStorageError",
    "create_token_storage",
    "delete_api_secret",
    "get_api_secret",
    "set_api_secret",
]


_LAZY = {"AsyncKoreaInvestment": "async_client", "AsyncSharedToken": "async_shared"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != "httpx":
            raise
        raise ImportError(
            f"{name} needs httpx: pip install 'kis-safe-token[async]'", name=exc.name
        ) from None
    return getattr(module, name)
