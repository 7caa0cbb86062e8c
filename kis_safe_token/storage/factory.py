"""``create_token_storage()``: the backend named by the seed's environment variables."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from .base import TokenStorage
from .file import FileTokenStorage
from .lease import MAX_LEASE_TTL_S
from .redis import DEFAULT_REDIS_URL, LockedRedisTokenStorage, validate_redis_url

__all__ = [
    "FILE_ENV",
    "REDIS_PASSWORD_ENV",
    "REDIS_URL_ENV",
    "SEED_LEASE_ENV",
    "SEED_LEASE_TTL_ENV",
    "STORAGE_ENV",
    "STORAGE_TYPES",
    "create_token_storage",
]

STORAGE_ENV = "KOREA_INVESTMENT_TOKEN_STORAGE"
FILE_ENV = "KOREA_INVESTMENT_TOKEN_FILE"
REDIS_URL_ENV = "KOREA_INVESTMENT_REDIS_URL"
REDIS_PASSWORD_ENV = "KOREA_INVESTMENT_REDIS_PASSWORD"
STORAGE_TYPES = ("file", "redis")
SEED_LEASE_ENV = "KOREA_INVESTMENT_SEED_LEASE"
SEED_LEASE_TTL_ENV = "KOREA_INVESTMENT_SEED_LEASE_TTL"
_ON = ("1", "true", "yes", "on")
_OFF = ("", "0", "false", "no", "off")


def create_token_storage(environ: Mapping[str, str] | None = None) -> TokenStorage:
    """The storage the environment asks for (the seed's variables and defaults).

    ``KOREA_INVESTMENT_TOKEN_STORAGE``: ``file`` (default) or ``redis`` (the locked backend);
    ``KOREA_INVESTMENT_TOKEN_FILE``; ``KOREA_INVESTMENT_REDIS_URL``;
    ``KOREA_INVESTMENT_REDIS_PASSWORD``; ``KOREA_INVESTMENT_SEED_LEASE`` (``1``/``true``/``yes``/
    ``on`` turns on the seed-protocol lease, default off) and ``KOREA_INVESTMENT_SEED_LEASE_TTL``
    (its ``lease_ttl`` in seconds). A bad value raises ``ValueError`` naming the variable.
    """
    env = os.environ if environ is None else environ
    lease = _lease_options(env)
    kind = (env.get(STORAGE_ENV) or "file").strip().lower()
    if kind == "file":
        path = (env.get(FILE_ENV) or "").strip()
        return FileTokenStorage(path or None, **lease)
    if kind == "redis":
        url = validate_redis_url(env.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL, REDIS_URL_ENV)
        password = env.get(REDIS_PASSWORD_ENV) or None
        try:
            return LockedRedisTokenStorage(url, password=password, **lease)
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


def _lease_options(env: Mapping[str, str]) -> dict[str, Any]:
    """``seed_lease`` and ``lease_ttl`` from the environment; ``ValueError`` naming the variable."""
    flag = (env.get(SEED_LEASE_ENV) or "").strip().lower()
    if flag not in _ON + _OFF:
        raise ValueError(
            f"{SEED_LEASE_ENV}={flag[:20]!r} is not a switch; allowed values: "
            + ", ".join(repr(v) for v in _ON + _OFF[1:])
        )
    options: dict[str, Any] = {"seed_lease": flag in _ON}
    ttl_text = (env.get(SEED_LEASE_TTL_ENV) or "").strip()
    if ttl_text:
        try:
            ttl = float(ttl_text)
        except ValueError:
            ttl = math.nan
        if not (math.isfinite(ttl) and 0 < ttl <= MAX_LEASE_TTL_S):
            raise ValueError(
                f"{SEED_LEASE_TTL_ENV}={ttl_text[:20]!r} is not a lease TTL; expected a number of "
                f"seconds more than 0 and at most {MAX_LEASE_TTL_S:g}"
            )
        options["lease_ttl"] = ttl
    return options
