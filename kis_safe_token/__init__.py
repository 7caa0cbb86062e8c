"""kis_safe_token: one KIS Open API access token, shared safely by a fleet of processes.

The asyncio side, ``AsyncKoreaInvestment`` and ``AsyncSharedToken``, and the realtime side,
``KisRealtime`` and ``AsyncKisRealtime``, are imported on first use (they need httpx:
``pip install 'kis-safe-token[async]'``, and websockets: ``[realtime]``), and are left out of
``__all__`` so that ``from kis_safe_token import *`` works without those extras.

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
    RealtimeError,
    RealtimeLimitError,
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
    from .realtime.aio import AsyncKisRealtime as AsyncKisRealtime
    from .realtime.client import KisRealtime as KisRealtime

__version__ = "0.1.0"

__all__ = [
    "FileTokenStorage",
    "InsecureKeyringError",
    "KisApiError",
    "KisAuth",
    "KisTokenError",
    "KoreaInvestment",
    "LockedRedisTokenStorage",
    "RealtimeError",
    "RealtimeLimitError",
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


#: name: (module, the package it needs, the extra that installs it)
_LAZY = {
    "AsyncKoreaInvestment": ("async_client", "httpx", "async"),
    "AsyncSharedToken": ("async_shared", "httpx", "async"),
    "KisRealtime": ("realtime.client", "websockets", "realtime"),
    "AsyncKisRealtime": ("realtime.aio", "websockets", "realtime"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, package, extra = _LAZY[name]
    try:
        module = importlib.import_module(f".{module_name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != package:
            raise
        raise ImportError(
            f"{name} needs {package}: pip install 'kis-safe-token[{extra}]'", name=exc.name
        ) from None
    return getattr(module, name)
