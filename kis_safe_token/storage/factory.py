"""``create_token_storage()``: the backend named by the seed's environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping

from .base import TokenStorage
from .file import FileTokenStorage
from .redis import DEFAULT_REDIS_URL, LockedRedisTokenStorage, validate_redis_url

__all__ = [
    "FILE_ENV",
    "REDIS_PASSWORD_ENV",
    "REDIS_URL_ENV",
    "STORAGE_ENV",
    "STORAGE_TYPES",
    "create_token_storage",
]

STORAGE_ENV = "KOREA_INVESTMENT_TOKEN_STORAGE"
FILE_ENV = "KOREA_INVESTMENT_TOKEN_FILE"
REDIS_URL_ENV = "KOREA_INVESTMENT_REDIS_URL"
REDIS_PASSWORD_ENV = "KOREA_INVESTMENT_REDIS_PASSWORD"
STORAGE_TYPES = ("file", "redis")


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
