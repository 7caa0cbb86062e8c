"""``create_token_storage()``: the backend named by the seed's environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from urllib.parse import urlsplit

from .base import TokenStorage
from .file import FileTokenStorage

__all__ = [
    "DEFAULT_REDIS_URL",
    "STORAGE_ENV",
    "create_token_storage",
    "validate_redis_url",
]

STORAGE_ENV = "KOREA_INVESTMENT_TOKEN_STORAGE"
FILE_ENV = "KOREA_INVESTMENT_TOKEN_FILE"
REDIS_URL_ENV = "KOREA_INVESTMENT_REDIS_URL"
REDIS_PASSWORD_ENV = "KOREA_INVESTMENT_REDIS_PASSWORD"
DEFAULT_REDIS_URL = "redis://localhost:6379/0"
STORAGE_TYPES = ("file", "redis")
REDIS_SCHEMES = ("redis", "rediss", "unix")


def validate_redis_url(url: str, source: str = "redis_url") -> str:
    """``url`` if it is a usable ``redis://``, ``rediss://`` or ``unix://`` URL; else a
    ``ValueError`` naming ``source`` and the allowed forms."""
    allowed = "redis://[user:password@]host[:port][/db], rediss://… or unix:///path/to/socket"
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ValueError(f"{source} is not a valid Redis URL; expected {allowed}") from None
    if parts.scheme not in REDIS_SCHEMES:
        raise ValueError(f"{source} has scheme {parts.scheme or '(none)'!r}; expected {allowed}")
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"{source} names no socket path; expected {allowed}")
    elif not parts.hostname:
        raise ValueError(f"{source} names no host; expected {allowed}")
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"{source} has port {port} out of range; expected {allowed}")
    db = parts.path.lstrip("/")
    if parts.scheme != "unix" and db and not db.isdigit():
        raise ValueError(f"{source} has database {db[:20]!r}, not a number; expected {allowed}")
    return url.strip()


def create_token_storage(environ: Mapping[str, str] | None = None) -> TokenStorage:
    """The storage the environment asks for (the seed's variables and defaults).

    ``KOREA_INVESTMENT_TOKEN_STORAGE``: ``file`` (default) or ``redis`` (the locked backend);
    ``KOREA_INVESTMENT_TOKEN_FILE``; ``KOREA_INVESTMENT_REDIS_URL``;
    ``KOREA_INVESTMENT_REDIS_PASSWORD``. A bad value raises ``ValueError`` naming the variable.
    """
    env = os.environ if environ is None else environ
    kind = (env.get(STORAGE_ENV) or "file").strip().lower()
    if kind == "file":
        path = (env.get(FILE_ENV) or "").strip()
        return FileTokenStorage(path or None)
    if kind == "redis":
        url = validate_redis_url(env.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL, REDIS_URL_ENV)
        password = env.get(REDIS_PASSWORD_ENV) or None
        from .redis import LockedRedisTokenStorage

        try:
            return LockedRedisTokenStorage(url, password=password)
        except (ValueError, TypeError) as exc:
            # redis-py's own message may quote the URL, password included: name the variable.
            raise ValueError(
                f"{REDIS_URL_ENV} is not a usable Redis URL ({type(exc).__name__}); "
                "expected redis://[user:password@]host[:port][/db], rediss://… or unix:///path"
            ) from None
    raise ValueError(
        f"{STORAGE_ENV}={kind[:40]!r} is not a storage type; allowed values: "
        + ", ".join(STORAGE_TYPES)
    )
